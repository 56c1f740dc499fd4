//! What follows a record once its step ran (or could not): the model's answer, the graph's next
//! records, a join's decision, a shadow comparison, and the dead letters of failures.

use sluice_common::graph::{Graph, StepKind};
use sluice_schemas::ErrorCode;
use sluice_schemas::ReplyFormat;
use sluice_schemas::{InferenceError, InferenceRequest, InferenceResult, Tensor};

use crate::pipeline::completion::{Completion, DeadLetter};
use crate::pipeline::flow::{self, Next, after_step, failed};
use crate::pipeline::job::{GraphJob, Job, Source};
use crate::telemetry::WorkerMetrics;

/// A completion that only finishes its record.
pub(crate) fn bare(source: Source) -> Completion {
    Completion {
        source,
        ..Default::default()
    }
}

/// The completion that delivers what follows a graph step.
pub(crate) fn next_completion(
    source: Source,
    graph: &Graph,
    base: &InferenceRequest,
    next: Next,
) -> Completion {
    let answered = next.answer.is_some();
    Completion {
        source,
        reply: if answered { base.reply.clone() } else { None },
        deadline: base.deadline,
        result: next.answer,
        result_topic: Some(graph.result_topic.clone()),
        json_result: base.reply_format == ReplyFormat::Json,
        forwards: next.forwards,
        dead_letter: None,
    }
}

/// Completions for every record a failed join held: the first delivers what follows.
pub(crate) fn failed_join_completions(
    topics: &[String],
    graph: &Graph,
    d: crate::pipeline::joiner::Decided,
) -> Vec<Completion> {
    let mut out = Vec::with_capacity(d.records.len());
    let mut next = Some(d.next);
    for &source in &d.records {
        match next.take() {
            Some(n) => {
                // A join that could not answer dead-letters the request (its first part).
                let error = n.answer.as_ref().and_then(|a| a.error.clone());
                let mut c = next_completion(source, graph, &d.base, n);
                if let Some(e) = error {
                    let topic = topics.get(source.topic_index).map_or("", String::as_str);
                    c.dead_letter = Some(graph_dead_letter(topic, source, &d.base, &e));
                }
                out.push(c);
            }
            None => out.push(bare(source)),
        }
    }
    out
}

/// A dead letter for a graph record a step failed on: the record as it arrived, its origin, and
/// the error.
pub(crate) fn graph_dead_letter(
    topic: &str,
    source: Source,
    request: &InferenceRequest,
    e: &InferenceError,
) -> DeadLetter {
    let class = e.code;
    DeadLetter {
        key: Some(request.id.clone().into_bytes()),
        payload: sluice_schemas::encode_request(request).unwrap_or_default(),
        topic: topic.to_string(),
        partition: source.partition,
        offset: source.offset,
        class,
        message: format!("step '{}': {}", e.step, e.message),
    }
}

/// Per-batch facts copied into each answer.
#[derive(Clone, Copy)]
pub(crate) struct BatchFacts {
    pub(crate) queue_us: i64,
    pub(crate) infer_us: i64,
    pub(crate) batch_size: i32,
}

/// The name errors carry: the graph step, or the unit.
pub(crate) fn step_label(j: &Job, unit: &str) -> String {
    match &j.graph {
        Some(g) => g.graph.steps[g.step].name.clone(),
        None => unit.to_string(),
    }
}

/// Who is finishing jobs: what results and comparisons say about the step that ran.
pub(crate) struct Finisher<'a> {
    /// The unit's name (a model's name for model units).
    pub(crate) unit: &'a str,
    /// The model's version, for model units.
    pub(crate) version: &'a str,
    /// Whether the unit runs a model (model steps record who served them and feed shadows).
    pub(crate) model: bool,
    /// Counters.
    pub(crate) metrics: &'a WorkerMetrics,
}

impl Finisher<'_> {
    /// What follows a step's outcome for one job: its answer, its graph's next records, or a
    /// shadow comparison; then a bare completion for each other record it held.
    pub(crate) fn finish(
        &self,
        mut j: Job,
        outcome: Result<Vec<Tensor>, InferenceError>,
        facts: BatchFacts,
    ) -> Vec<Completion> {
        let held = std::mem::take(&mut j.held);
        let first = match j.graph.take() {
            None => self.plain(j, outcome, facts),
            Some(g) if g.shadow => self.shadow_completion(&j, &g, outcome),
            Some(g) => self.graph_step(j, g, outcome, facts),
        };
        std::iter::once(first)
            .chain(held.into_iter().map(bare))
            .collect()
    }

    fn plain(
        &self,
        j: Job,
        outcome: Result<Vec<Tensor>, InferenceError>,
        facts: BatchFacts,
    ) -> Completion {
        let result = match outcome {
            Ok(outputs) => InferenceResult {
                id: j.request.id.clone(),
                client_id: j.request.client_id.clone(),
                model: j.request.model.clone(),
                model_version: self.version.to_string(),
                error: None,
                outputs,
                parameters: Default::default(),
                queue_us: facts.queue_us,
                infer_us: facts.infer_us,
                batch_size: facts.batch_size,
            },
            Err(e) => InferenceResult::failure(&j.request, e.code, e.message),
        };
        completion_of(j, result)
    }

    fn graph_step(
        &self,
        mut j: Job,
        g: GraphJob,
        outcome: Result<Vec<Tensor>, InferenceError>,
        facts: BatchFacts,
    ) -> Completion {
        let source = j.source;
        let step = &g.graph.steps[g.step];
        if self.model
            && let Some(hop) = j.request.hop.as_mut()
        {
            hop.served.insert(step.name.clone(), self.unit.to_string());
        }
        let (next, dead_letter) = match outcome {
            Ok(outputs) => {
                let mut shadows = Vec::new();
                if self.model
                    && !step.shadows.is_empty()
                    && matches!(&step.kind, StepKind::Model(p) if p == self.unit)
                {
                    shadows = flow::shadow_copies(
                        &g.graph,
                        g.step,
                        &j.request,
                        &j.request.inputs,
                        &outputs,
                    );
                }
                j.request.inputs.clear();
                // A router's choice can fail (no route): its dead letter replays what it carried.
                let replay_inputs = match step.kind {
                    StepKind::Route(_) => g.carried.clone(),
                    _ => Vec::new(),
                };
                let mut dead_letter = None;
                let mut next = match after_step(&g.graph, g.step, &j.request, g.carried, outputs) {
                    Ok(n) => n,
                    Err(e) => {
                        let replay = InferenceRequest {
                            inputs: replay_inputs,
                            ..j.request.clone()
                        };
                        dead_letter = Some(graph_dead_letter(&j.topic, source, &replay, &e));
                        failed(&g.graph, g.step, &j.request, e)
                    }
                };
                if let Some(a) = next.answer.as_mut() {
                    a.queue_us = facts.queue_us;
                    a.infer_us = facts.infer_us;
                    a.batch_size = facts.batch_size;
                }
                next.forwards.extend(shadows);
                (next, dead_letter)
            }
            Err(e) => {
                let replay = InferenceRequest {
                    inputs: g.carried.clone(),
                    ..j.request.clone()
                };
                let dl = (e.code != ErrorCode::DeadlineExceeded)
                    .then(|| graph_dead_letter(&j.topic, source, &replay, &e));
                (failed(&g.graph, g.step, &j.request, e), dl)
            }
        };
        let mut c = next_completion(source, &g.graph, &j.request, next);
        c.dead_letter = dead_letter;
        c
    }

    /// A shadow's outputs compared with the primary's: metrics and a record on the comparison topic.
    fn shadow_completion(
        &self,
        j: &Job,
        g: &GraphJob,
        outcome: Result<Vec<Tensor>, InferenceError>,
    ) -> Completion {
        let model_name = self.unit;
        let step = &g.graph.steps[g.step];
        let primary = match &step.kind {
            StepKind::Model(p) => p.clone(),
            _ => String::new(),
        };
        let counters = self.metrics.shadow(&g.graph.name, &step.name, model_name);
        let mut parameters = std::collections::BTreeMap::from([
            ("graph".to_string(), format!("\"{}\"", g.graph.name)),
            ("step".to_string(), format!("\"{}\"", step.name)),
            ("primary".to_string(), format!("\"{primary}\"")),
        ]);
        let result = match outcome {
            Ok(outputs) => {
                let c = flow::compare(&step.name, &g.carried, &outputs);
                if let Some(m) = counters {
                    if c.agree { &m.agree } else { &m.disagree }.increment(1);
                    m.max_abs_diff.record(c.max_abs_diff);
                }
                parameters.insert("agree".into(), c.agree.to_string());
                parameters.insert("max_abs_diff".into(), c.max_abs_diff.to_string());
                parameters.insert("rows_differing".into(), c.rows_differing.to_string());
                InferenceResult {
                    id: j.request.id.clone(),
                    client_id: j.request.client_id.clone(),
                    model: model_name.to_string(),
                    model_version: self.version.to_string(),
                    outputs,
                    parameters,
                    ..Default::default()
                }
            }
            Err(e) => {
                if let Some(m) = counters {
                    m.failed.increment(1);
                }
                let mut r = InferenceResult::failure(&j.request, e.code, e.message);
                r.model = model_name.to_string();
                r.parameters = parameters;
                r
            }
        };
        Completion {
            source: j.source,
            result: Some(result),
            result_topic: Some(g.graph.comparison_topic.clone()),
            ..Default::default()
        }
    }
}

/// The completion answering a plain request: result, reply, and for a model failure a dead letter.
pub(crate) fn completion_of(j: Job, result: InferenceResult) -> Completion {
    // A request the model failed on is dead-lettered too, so it can be inspected and replayed.
    let dead_letter = result
        .error
        .as_ref()
        .filter(|e| e.code == ErrorCode::ModelFailed)
        .map(|e| DeadLetter {
            key: Some(j.request.id.clone().into_bytes()),
            payload: sluice_schemas::encode_request(&j.request).unwrap_or_default(),
            topic: j.topic.clone(),
            partition: j.source.partition,
            offset: j.source.offset,
            class: ErrorCode::ModelFailed,
            message: e.message.clone(),
        });
    Completion {
        source: j.source,
        reply: j.request.reply.clone(),
        deadline: j.request.deadline,
        json_result: j.request.reply_format == ReplyFormat::Json,
        result: Some(result),
        dead_letter,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use sluice_schemas::decode_request;

    use super::*;

    fn job() -> Job {
        Job {
            request: InferenceRequest {
                id: "r1".into(),
                model: "m".into(),
                deadline: sluice_schemas::Deadline::from_wire(42),
                ..Default::default()
            },
            input: Default::default(),
            source: Source {
                topic_index: 0,
                partition: 3,
                offset: 17,
            },
            held: Vec::new(),
            topic: "sluice.m.requests".into(),
            graph: None,
        }
    }

    #[test]
    fn a_graph_dead_letter_is_classed_by_its_error_code() {
        let j = job();
        for code in ErrorCode::ALL {
            let e = InferenceError {
                code,
                message: "m".into(),
                step: "features".into(),
            };
            let dl = graph_dead_letter("t", j.source, &j.request, &e);
            assert_eq!(dl.class, code, "{code}");
        }
    }

    #[test]
    fn model_failures_are_dead_lettered_with_their_origin() {
        let j = job();
        let failed = InferenceResult::failure(&j.request, ErrorCode::ModelFailed, "boom");
        let c = completion_of(j, failed);
        let d = c.dead_letter.unwrap();
        assert_eq!(
            (d.topic.as_str(), d.partition, d.offset, d.class),
            ("sluice.m.requests", 3, 17, ErrorCode::ModelFailed)
        );
        assert_eq!(
            decode_request(&d.payload).unwrap().id,
            "r1",
            "the request itself, replayable"
        );
        assert_eq!(c.deadline, sluice_schemas::Deadline::from_wire(42));
    }

    #[test]
    fn successes_and_expiries_are_not_dead_lettered() {
        let j = job();
        let expired = InferenceResult::failure(&j.request, ErrorCode::DeadlineExceeded, "late");
        assert!(completion_of(j, expired).dead_letter.is_none());
        let ok = InferenceResult {
            id: "r1".into(),
            ..Default::default()
        };
        assert!(completion_of(job(), ok).dead_letter.is_none());
    }
}
