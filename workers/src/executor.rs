//! Running batches through the unit's [`Step`]: jobs past their deadline are answered without
//! running, the rest run as one call, and each outcome becomes its completions. Batches run
//! concurrently up to the batcher's slots; delivery is bounded too, so neither grows without limit.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use sluice_common::{now_ms, now_us};
use sluice_schemas::InferenceError;
use sluice_schemas::envelope::codes;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::batcher::Dispatched;
use crate::completion::Completion;
use crate::flow::step_error;
use crate::group::Completer;
use crate::job::Job;
use crate::outcome::{BatchFacts, Finisher, step_label};
use crate::step::Step;
use crate::telemetry::WorkerMetrics;

/// The unit's step; replaced when a config reload changes it (a join's settings, say).
pub type StepSlot = Arc<RwLock<Arc<dyn Step>>>;

/// What finished jobs say about the unit.
#[derive(Clone)]
pub(crate) struct UnitFacts {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) model: bool,
}

/// Runs every batch from `batches` until it closes, then waits for the last deliveries.
pub(crate) async fn run(
    mut batches: mpsc::Receiver<Dispatched<Job>>,
    step: StepSlot,
    unit: UnitFacts,
    completer: Arc<Completer>,
    deliveries: usize,
) {
    let delivery_slots = Arc::new(Semaphore::new(deliveries.max(1)));
    let mut tasks = JoinSet::new();
    while let Some(Dispatched { items, permit }) = batches.recv().await {
        let current = Arc::clone(&*step.read().unwrap_or_else(|e| e.into_inner()));
        let (unit, completer, delivery_slots) = (
            unit.clone(),
            Arc::clone(&completer),
            Arc::clone(&delivery_slots),
        );
        tasks.spawn(async move {
            let completions = run_batch(current.as_ref(), items, &unit, &completer.metrics).await;
            // Take a delivery slot before freeing the step's, so finished batches cannot pile up.
            let delivery = delivery_slots.acquire_owned().await;
            drop(permit);
            completer.complete(completions).await;
            drop(delivery);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs one batch and returns every completion it leads to.
pub(crate) async fn run_batch(
    step: &dyn Step,
    items: Vec<Job>,
    unit: &UnitFacts,
    wm: &WorkerMetrics,
) -> Vec<Completion> {
    let finisher = Finisher {
        unit: &unit.name,
        version: &unit.version,
        model: unit.model,
        metrics: wm,
    };
    let started = Instant::now();
    let started_us = now_us();
    let now = now_ms();
    let (expired, mut live): (Vec<Job>, Vec<Job>) = items
        .into_iter()
        .partition(|j| j.request.deadline_ms != 0 && now >= j.request.deadline_ms);
    let mut completions = Vec::with_capacity(expired.len() + live.len());
    let none = BatchFacts {
        queue_us: 0,
        infer_us: 0,
        batch_size: 0,
    };
    for j in expired {
        wm.expired.increment(1);
        let error = step_error(
            codes::DEADLINE_EXCEEDED,
            &step_label(&j, &unit.name),
            "the deadline passed before the request could run",
        );
        completions.extend(finisher.finish(j, Err(error), none));
    }
    if live.is_empty() {
        return completions;
    }
    let rows: usize = live.iter().map(Job::rows).sum();
    wm.batch_size.record(rows as f64);
    let inputs = live
        .iter_mut()
        .map(|j| {
            let mut input = std::mem::take(&mut j.input);
            input.deadline_ms = j.request.deadline_ms;
            if !j.request.parameters.is_empty() {
                input.parameters = j.request.parameters.clone();
            }
            input
        })
        .collect();
    let outcomes = step.run(inputs).await;
    let infer_us = now_us() - started_us;
    wm.inference_seconds.record(started.elapsed().as_secs_f64());
    let batch_size = i32::try_from(rows).unwrap_or(i32::MAX);
    let mut outcomes = outcomes.into_iter();
    for j in live {
        let queue_us = (started_us - j.request.sent_at_us).max(0);
        wm.queue_wait_seconds.record(queue_us as f64 / 1e6);
        let facts = BatchFacts {
            queue_us,
            infer_us,
            batch_size,
        };
        let outcome: Result<_, InferenceError> = match outcomes.next() {
            Some(Ok(outputs)) => {
                wm.ok.increment(1);
                Ok(outputs)
            }
            failure => {
                wm.failed.increment(1);
                let f = failure
                    .and_then(Result::err)
                    .unwrap_or_else(|| crate::step::StepFailure {
                        code: codes::INTERNAL,
                        message: "the step returned no result for this request".into(),
                    });
                tracing::warn!(
                    id = %j.request.id,
                    traceparent = j.request.trace.get("traceparent").map(String::as_str),
                    error = %f.message,
                    "step failed"
                );
                Err(step_error(f.code, &step_label(&j, &unit.name), f.message))
            }
        };
        completions.extend(finisher.finish(j, outcome, facts));
    }
    completions
}
