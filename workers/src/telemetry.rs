//! The worker's metrics, registered once at start-up so the hot path only touches handles. Every
//! worker metric is labelled `unit` (the model or `graph.step` the worker serves); graph metrics
//! add `graph`, `step` and the `model` that served.

use std::collections::HashMap;

use metrics::{Counter, Gauge, Histogram};
use sluice_common::Deployment;
use sluice_common::graph::StepKind;
use sluice_schemas::ErrorCode;

/// Shadow comparison handles for one (graph, step, shadow model).
pub struct ShadowMetrics {
    /// Comparisons where the shadow agreed.
    pub agree: Counter,
    /// Comparisons where it did not.
    pub disagree: Counter,
    /// Shadow runs that failed.
    pub failed: Counter,
    /// Largest absolute difference per comparison.
    pub max_abs_diff: Histogram,
}

/// Metric handles for one worker.
pub struct WorkerMetrics {
    /// Requests answered with outputs.
    pub ok: Counter,
    /// Requests skipped because their deadline had passed.
    pub expired: Counter,
    /// Records that decoded but did not fit the model.
    pub invalid: Counter,
    /// Records that could not be decoded.
    pub undecodable: Counter,
    /// Requests the step failed on.
    pub failed: Counter,
    /// Rows per step call.
    pub batch_size: Histogram,
    /// Duration of a step call.
    pub inference_seconds: Histogram,
    /// Time from produce to the start of the step.
    pub queue_wait_seconds: Histogram,
    /// Time from the gateway's send to the record in the worker's consumer loop (produce,
    /// broker, fetch): requests from the gateway only.
    pub fetch_seconds: Histogram,
    /// Time from a job's arrival at its step's batcher to its batch's dispatch.
    pub batch_wait_seconds: Histogram,
    /// Records received and not yet fully handled.
    pub in_flight: Gauge,
    /// Produce attempts retried.
    pub produce_retries: Counter,
    /// Records given up on (fatal error, or retried past the deadline).
    pub produce_failures: Counter,
    /// Redis replies given up on past every deadline.
    pub replies_dropped: Counter,
    /// Joins: parts for requests already answered.
    pub join_late_parts: Counter,
    /// Joins: requests decided by their timeout.
    pub join_timeouts: Counter,
    /// Joins: requests waiting for parts.
    pub join_pending: Gauge,
    /// Config reloads applied.
    pub config_reloads: Counter,
    dead_letters: HashMap<&'static str, Counter>,
    /// Canary counters by graph, step, then model (looked up by `&str`, no allocation).
    canary: ByStep<Counter>,
    /// Shadow comparison handles by graph, step, then shadow model.
    shadows: ByStep<ShadowMetrics>,
}

/// Handles by graph → step → model.
type ByStep<T> = HashMap<String, HashMap<String, HashMap<String, T>>>;

fn by_step<'a, T>(map: &'a ByStep<T>, graph: &str, step: &str, model: &str) -> Option<&'a T> {
    map.get(graph)?.get(step)?.get(model)
}

fn insert<T>(map: &mut ByStep<T>, graph: &str, step: &str, model: &str, value: T) {
    map.entry(graph.to_string())
        .or_default()
        .entry(step.to_string())
        .or_default()
        .insert(model.to_string(), value);
}

impl WorkerMetrics {
    /// Registers the handles for `unit`, and the canary and shadow handles of every graph step
    /// it could serve in `deployment`.
    pub fn new(unit: &str, deployment: &Deployment) -> WorkerMetrics {
        let u = || unit.to_string();
        let requests = |outcome: &'static str| metrics::counter!("sluice_worker_requests_total", "unit" => u(), "outcome" => outcome);
        let mut canary = ByStep::new();
        let mut shadows = ByStep::new();
        for g in deployment.graphs.values() {
            for s in &g.steps {
                let StepKind::Model(primary) = &s.kind else {
                    continue;
                };
                if let Some(c) = &s.canary {
                    for m in [primary, &c.model] {
                        let counter = metrics::counter!("sluice_canary_served_total", "graph" => g.name.clone(), "step" => s.name.clone(), "model" => m.clone());
                        insert(&mut canary, &g.name, &s.name, m, counter);
                    }
                }
                for (shadow, _) in &s.shadows {
                    let labels = |outcome: &'static str| metrics::counter!("sluice_shadow_comparisons_total", "graph" => g.name.clone(), "step" => s.name.clone(), "shadow" => shadow.clone(), "outcome" => outcome);
                    let m = ShadowMetrics {
                        agree: labels("agree"),
                        disagree: labels("disagree"),
                        failed: labels("failed"),
                        max_abs_diff: metrics::histogram!("sluice_shadow_max_abs_diff", "graph" => g.name.clone(), "step" => s.name.clone(), "shadow" => shadow.clone()),
                    };
                    insert(&mut shadows, &g.name, &s.name, shadow, m);
                }
            }
        }
        WorkerMetrics {
            ok: requests("ok"),
            expired: requests("expired"),
            invalid: requests("invalid"),
            undecodable: requests("undecodable"),
            failed: requests("failed"),
            batch_size: metrics::histogram!("sluice_worker_batch_size", "unit" => u()),
            inference_seconds: metrics::histogram!("sluice_worker_inference_seconds", "unit" => u()),
            queue_wait_seconds: metrics::histogram!("sluice_worker_queue_wait_seconds", "unit" => u()),
            fetch_seconds: metrics::histogram!("sluice_worker_fetch_seconds", "unit" => u()),
            batch_wait_seconds: metrics::histogram!("sluice_worker_batch_wait_seconds", "unit" => u()),
            in_flight: metrics::gauge!("sluice_worker_in_flight", "unit" => u()),
            produce_retries: metrics::counter!("sluice_worker_produce_retries_total", "unit" => u()),
            produce_failures: metrics::counter!("sluice_worker_produce_failures_total", "unit" => u()),
            replies_dropped: metrics::counter!("sluice_worker_replies_dropped_total", "unit" => u()),
            join_late_parts: metrics::counter!("sluice_join_late_parts_total", "unit" => u()),
            join_timeouts: metrics::counter!("sluice_join_timeouts_total", "unit" => u()),
            join_pending: metrics::gauge!("sluice_join_pending", "unit" => u()),
            config_reloads: metrics::counter!("sluice_worker_config_reloads_total", "unit" => u()),
            dead_letters: ErrorCode::ALL
                .iter()
                .map(|c| (c.as_str(), metrics::counter!("sluice_worker_dead_letters_total", "unit" => u(), "class" => c.as_str())))
                .collect(),
            canary,
            shadows,
        }
    }

    /// Counts a dead letter of `class`.
    pub fn dead_letter(&self, class: ErrorCode) {
        let counter = self.dead_letters.get(class.as_str());
        if let Some(c) = counter {
            c.increment(1);
        }
    }

    /// Counts a canary-step request served by `model`.
    pub fn canary_served(&self, graph: &str, step: &str, model: &str) {
        if let Some(c) = by_step(&self.canary, graph, step, model) {
            c.increment(1);
        }
    }

    /// The comparison handles of `shadow` at `graph`'s `step`.
    pub fn shadow(&self, graph: &str, step: &str, shadow: &str) -> Option<&ShadowMetrics> {
        by_step(&self.shadows, graph, step, shadow)
    }
}
