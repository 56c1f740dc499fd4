//! The worker's metrics, registered once at start-up so the hot path only touches handles. Every
//! worker metric is labelled `unit` (the model or `graph.step` the worker serves); graph metrics
//! add `graph`, `step` and the `model` that served.

use std::collections::HashMap;

use metrics::{Counter, Gauge, Histogram};
use sluice_common::Deployment;
use sluice_common::graph::StepKind;
use sluice_schemas::envelope::codes;

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
    /// Records received and not yet fully handled.
    pub in_flight: Gauge,
    /// Produce attempts retried.
    pub produce_retries: Counter,
    /// Records given up on (fatal error, or retried past the deadline).
    pub produce_failures: Counter,
    /// Redis replies given up on past every deadline.
    pub replies_dropped: Counter,
    /// Records a fetch skipped, read again (`broker_quirks = "tansu"`).
    pub fetch_gaps: Counter,
    /// Joins: nudge records written (`broker_quirks = "tansu"`).
    pub join_nudges: Counter,
    /// Joins: parts for requests already answered.
    pub join_late_parts: Counter,
    /// Joins: requests decided by their timeout.
    pub join_timeouts: Counter,
    /// Joins: requests waiting for parts.
    pub join_pending: Gauge,
    /// Config reloads applied.
    pub config_reloads: Counter,
    dead_letters: Vec<(&'static str, Counter)>,
    canary: HashMap<(String, String, String), Counter>,
    shadows: HashMap<(String, String, String), ShadowMetrics>,
}

const DEAD_LETTER_CLASSES: [&str; 8] = [
    codes::UNDECODABLE,
    codes::INVALID_INPUT,
    codes::MODEL_FAILED,
    codes::DEADLINE_EXCEEDED,
    codes::JOIN_TIMEOUT,
    codes::NO_ROUTE,
    codes::PRODUCE_FAILED,
    codes::INTERNAL,
];

impl WorkerMetrics {
    /// Registers the handles for `unit`, and the canary and shadow handles of every graph step
    /// it could serve in `deployment`.
    pub fn new(unit: &str, deployment: &Deployment) -> WorkerMetrics {
        let u = || unit.to_string();
        let requests = |outcome: &'static str| metrics::counter!("sluice_worker_requests_total", "unit" => u(), "outcome" => outcome);
        let mut canary = HashMap::new();
        let mut shadows = HashMap::new();
        for g in deployment.graphs.values() {
            for s in &g.steps {
                let StepKind::Model(primary) = &s.kind else {
                    continue;
                };
                if let Some(c) = &s.canary {
                    for m in [primary, &c.model] {
                        let key = (g.name.clone(), s.name.clone(), m.clone());
                        let counter = metrics::counter!("sluice_canary_served_total", "graph" => key.0.clone(), "step" => key.1.clone(), "model" => key.2.clone());
                        canary.insert(key, counter);
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
                    shadows.insert((g.name.clone(), s.name.clone(), shadow.clone()), m);
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
            in_flight: metrics::gauge!("sluice_worker_in_flight", "unit" => u()),
            produce_retries: metrics::counter!("sluice_worker_produce_retries_total", "unit" => u()),
            produce_failures: metrics::counter!("sluice_worker_produce_failures_total", "unit" => u()),
            replies_dropped: metrics::counter!("sluice_worker_replies_dropped_total", "unit" => u()),
            fetch_gaps: metrics::counter!("sluice_worker_fetch_gaps_total", "unit" => u()),
            join_nudges: metrics::counter!("sluice_join_nudges_total", "unit" => u()),
            join_late_parts: metrics::counter!("sluice_join_late_parts_total", "unit" => u()),
            join_timeouts: metrics::counter!("sluice_join_timeouts_total", "unit" => u()),
            join_pending: metrics::gauge!("sluice_join_pending", "unit" => u()),
            config_reloads: metrics::counter!("sluice_worker_config_reloads_total", "unit" => u()),
            dead_letters: DEAD_LETTER_CLASSES
                .iter()
                .map(|c| (*c, metrics::counter!("sluice_worker_dead_letters_total", "unit" => u(), "class" => *c)))
                .collect(),
            canary,
            shadows,
        }
    }

    /// The dead-letter counter for `class` (unknown classes count as `internal`).
    pub fn dead_letter(&self, class: &str) -> &Counter {
        let found = self.dead_letters.iter().find(|(c, _)| *c == class);
        let internal = self.dead_letters.last();
        match found.or(internal) {
            Some((_, c)) => c,
            None => unreachable_counter(),
        }
    }

    /// Counts a canary-step request served by `model`.
    pub fn canary_served(&self, graph: &str, step: &str, model: &str) {
        let key = (graph.to_string(), step.to_string(), model.to_string());
        if let Some(c) = self.canary.get(&key) {
            c.increment(1);
        }
    }

    /// The comparison handles of `shadow` at `graph`'s `step`.
    pub fn shadow(&self, graph: &str, step: &str, shadow: &str) -> Option<&ShadowMetrics> {
        self.shadows
            .get(&(graph.to_string(), step.to_string(), shadow.to_string()))
    }
}

/// A counter that records nothing (never used: the class list is not empty).
fn unreachable_counter() -> &'static Counter {
    static NOOP: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
    NOOP.get_or_init(Counter::noop)
}
