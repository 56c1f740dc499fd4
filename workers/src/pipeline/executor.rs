//! Running a batch through a [`Step`]: jobs past their deadline are answered without running,
//! the rest run as one call, and each outcome becomes its completions; then the steps fused
//! after it. (The lane's loop over its batches is [`crate::pipeline::lane::run`].)

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use sluice_common::graph::Graph;
use sluice_common::now_us;
use sluice_schemas::Deadline;
use sluice_schemas::ErrorCode;
use sluice_schemas::InferenceError;

use crate::pipeline::completion::Completion;
use crate::pipeline::flow::step_error;
use crate::pipeline::job::Job;
use crate::pipeline::outcome::{BatchFacts, Finisher, step_label};
use crate::step::Step;
use crate::telemetry::WorkerMetrics;

/// The unit's step; replaced when a config reload changes it (a join's settings, say).
pub type StepSlot = Arc<RwLock<Arc<dyn Step>>>;

/// A step fused after the unit's (`fused = true`): its graph, index, step and facts.
pub(crate) struct FusedStep {
    pub(crate) graph: Arc<Graph>,
    pub(crate) index: usize,
    pub(crate) step: Arc<dyn Step>,
    pub(crate) facts: UnitFacts,
    /// Records that ran here instead of through the step's topic.
    pub(crate) runs: metrics::Counter,
}

/// Steps fused after the unit's, by their topic (a step's own, never shared): their records run
/// here, in process, instead of going through it.
pub(crate) type Fused = BTreeMap<String, FusedStep>;

/// The fused steps; replaced on a config reload.
pub(crate) type FusedSlot = Arc<RwLock<Arc<Fused>>>;

/// The steps fused after `unit`'s, in chains (a step fused after a fused step runs here too).
pub(crate) fn fused_after(
    deployment: &sluice_common::Deployment,
    unit: &sluice_common::graph::Unit,
) -> Result<Fused, crate::step::BuildError> {
    let mut out = Fused::new();
    for g in deployment.graphs.values() {
        let mut here: Vec<usize> = (0..g.steps.len())
            .filter(|&i| g.unit_of(i) == *unit)
            .collect();
        for i in 0..g.steps.len() {
            let Some(p) = g.fused_after(i) else { continue };
            if !here.contains(&p) {
                continue;
            }
            here.push(i);
            let own = g.unit_of(i);
            out.insert(
                g.steps[i].topic.clone(),
                FusedStep {
                    graph: Arc::clone(g),
                    index: i,
                    step: crate::step::for_unit(deployment, &own)?,
                    facts: UnitFacts {
                        name: own.to_string(),
                        version: g.signature.version.clone(),
                        model: false,
                    },
                    runs: metrics::counter!("sluice_fused_runs_total", "graph" => g.name.clone(), "step" => g.steps[i].name.clone()),
                },
            );
        }
    }
    Ok(out)
}

/// What finished jobs say about the unit.
#[derive(Clone)]
pub(crate) struct UnitFacts {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) model: bool,
}

/// Runs the fused steps the completions forward to, in process: each such forward becomes a
/// job of its step, and the job's completions (answer, further forwards, dead letter) replace
/// the forward. Repeats for chains of fused steps. A completion that also answers or
/// dead-letters keeps its forwards as records (they reach the fused step through its topic).
pub(crate) async fn run_fused(
    mut completions: Vec<Completion>,
    fused: &Fused,
    wm: &WorkerMetrics,
) -> Vec<Completion> {
    loop {
        // Per fused step (by topic): (completion index, job) for each forward that runs here.
        let mut jobs: BTreeMap<&str, Vec<(usize, Job)>> = BTreeMap::new();
        for (k, c) in completions.iter_mut().enumerate() {
            if c.result.is_some() || c.dead_letter.is_some() || c.forwards.is_empty() {
                continue;
            }
            for f in std::mem::take(&mut c.forwards) {
                let Some((topic, fs)) = fused.get_key_value(f.topic.as_str()) else {
                    c.forwards.push(f);
                    continue;
                };
                // Inputs it cannot read: the record goes through the topic, whose worker says so.
                let Ok(inputs) =
                    crate::pipeline::flow::step_inputs(&fs.graph, fs.index, &f.request.inputs)
                else {
                    c.forwards.push(f);
                    continue;
                };
                let job = fused_job(fs, f, inputs, c.source);
                jobs.entry(topic.as_str()).or_default().push((k, job));
            }
        }
        if jobs.is_empty() {
            return completions;
        }
        for (topic, batch) in jobs {
            let Some(fs) = fused.get(topic) else {
                continue;
            };
            let (owners, batch): (Vec<usize>, Vec<Job>) = batch.into_iter().unzip();
            fs.runs.increment(batch.len() as u64);
            let done = Box::pin(run_batch(fs.step.as_ref(), batch, &fs.facts, wm)).await;
            // One completion per job, in order (fused jobs hold no other records).
            for (k, mut d) in owners.into_iter().zip(done) {
                let c = &mut completions[k];
                d.forwards.append(&mut c.forwards);
                d.source = c.source;
                *c = d;
            }
        }
    }
}

/// The job a forward to a fused step becomes, reading `inputs` (as if its record had been
/// consumed).
fn fused_job(
    fs: &FusedStep,
    out: crate::pipeline::flow::Outgoing,
    inputs: Vec<sluice_schemas::Tensor>,
    source: crate::pipeline::job::Source,
) -> Job {
    let (graph, step) = (Arc::clone(&fs.graph), fs.index);
    let mut request = out.request;
    let carried = std::mem::take(&mut request.inputs);
    Job {
        request,
        input: crate::step::StepInput {
            tensors: inputs,
            ..Default::default()
        },
        source,
        held: Vec::new(),
        topic: out.topic,
        graph: Some(crate::pipeline::job::GraphJob {
            graph,
            step,
            carried,
            shadow: false,
        }),
    }
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
        version: step.version().unwrap_or(&unit.version),
        model: unit.model,
        metrics: wm,
    };
    crate::fail_point::stall().await;
    let started = Instant::now();
    let started_us = now_us();
    let (expired, mut live): (Vec<Job>, Vec<Job>) = items
        .into_iter()
        .partition(|j| j.request.deadline.is_some_and(Deadline::passed));
    let mut completions = Vec::with_capacity(expired.len() + live.len());
    let none = BatchFacts {
        queue_us: 0,
        infer_us: 0,
        batch_size: 0,
    };
    for j in expired {
        wm.expired.increment(1);
        let error = step_error(
            ErrorCode::DeadlineExceeded,
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
            input.deadline = j.request.deadline;
            // The id the caller was answered with (its own, or Sluice's).
            input
                .id
                .clone_from(j.request.client_id.as_ref().unwrap_or(&j.request.id));
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
                        code: ErrorCode::Internal,
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
