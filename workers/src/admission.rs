//! What a worker makes of a consumed record on arrival: decode it (Avro, or Open Inference
//! Protocol JSON), place it in its graph, check it against the model or step, and hand back a
//! model job for the batcher, a built-in step or join part to run here, or, for a record that
//! cannot run, its answer and dead letter at once.

use std::collections::HashMap;
use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Headers, Message};
use sluice_common::graph::{Graph, Graphs, StepKind, Unit};
use sluice_common::kafka::headers as kafka_headers;
use sluice_common::model::{validate_inputs, validate_outputs};
use sluice_common::{ModelConfig, now_ms};
use sluice_schemas::envelope::codes;
use sluice_schemas::{
    GraphHop, InferenceError, InferenceRequest, InferenceResult, ReplyRoute, Tensor, decode_request,
};

use crate::flow::{self, Outgoing, entry_carried, step_error, step_inputs, topic_for};
use crate::offsets::Source;
use crate::outcome::{bare, next_completion};
use crate::sink::{Completion, DeadLetter};
use crate::telemetry::WorkerMetrics;

/// A graph request at a model step.
pub struct GraphJob {
    /// The graph (as compiled when the record arrived).
    pub graph: Arc<Graph>,
    /// The step.
    pub step: usize,
    /// Tensors the rest of the graph needs.
    pub carried: Vec<Tensor>,
    /// A shadow copy (compared, never answered).
    pub shadow: bool,
}

/// A consumed request waiting for, or in, a batch.
pub struct Job {
    /// The decoded request; for a graph request, its inputs are the model's inputs.
    pub request: InferenceRequest,
    /// Where it came from.
    pub source: Source,
    /// The topic it came from.
    pub topic: String,
    /// Rows it contributes to a batch.
    pub rows: usize,
    /// Set for a graph request.
    pub graph: Option<GraphJob>,
}

/// A graph request at a built-in or route step.
pub(crate) struct StepJob {
    pub(crate) graph: Arc<Graph>,
    pub(crate) step: usize,
    pub(crate) base: InferenceRequest,
    pub(crate) carried: Vec<Tensor>,
    pub(crate) source: Source,
    pub(crate) topic: String,
}

/// What became of a consumed record on arrival.
pub(crate) enum Admission {
    /// Nothing to run: deliver this and finish the record.
    Done(Box<Completion>),
    /// A model request for the batcher.
    Batch(Job),
    /// A built-in or route step to run now.
    Step(StepJob),
    /// A part for this worker's join.
    Part(InferenceRequest, Source),
}

/// What a record is checked against on arrival.
pub(crate) struct Admit<'a> {
    pub(crate) unit: &'a Unit,
    /// The model, for a model unit.
    pub(crate) model: Option<&'a ModelConfig>,
    /// The unit's own topic (a canary or shadow record for another model is not ours).
    pub(crate) own_topic: &'a str,
    pub(crate) graphs: &'a Graphs,
    /// Graph entry topic → graph name.
    pub(crate) entries: &'a HashMap<String, String>,
    pub(crate) metrics: &'a WorkerMetrics,
}

pub(crate) fn header<'a>(m: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(key))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

pub(crate) fn dead_letter_of(
    m: &BorrowedMessage<'_>,
    class: &'static str,
    message: String,
) -> DeadLetter {
    DeadLetter {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        class,
        message,
    }
}

/// Decodes and routes a record: a model request for the batcher, a graph step to run here, a
/// join part, or (for a record that cannot be run) a completion at once: dead letter, plus an
/// error reply when the caller can be named.
pub(crate) fn admit(m: &BorrowedMessage<'_>, source: Source, ctx: &Admit<'_>) -> Admission {
    if header(m, kafka_headers::NUDGE).is_some() {
        return Admission::Done(Box::new(bare(source)));
    }
    let payload = m.payload().unwrap_or_default();
    let entry_graph = ctx.entries.get(m.topic());
    let json =
        header(m, kafka_headers::CONTENT_TYPE).is_some_and(|v| v.starts_with("application/json"));
    let decoded = if json {
        let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
        let name = entry_graph.cloned().unwrap_or_else(|| ctx.unit.to_string());
        sluice_schemas::oip::request_from_json(payload, key, &name, now_ms())
            .map_err(|e| e.to_string())
    } else {
        decode_request(payload).map_err(|e| e.to_string())
    };
    let mut request = match decoded {
        Ok(r) => r,
        Err(e) => return undecodable(m, source, ctx, e),
    };
    let invalid = |request: &InferenceRequest, message: String, json: bool| {
        let result_topic = entry_graph
            .and_then(|g| ctx.graphs.get(g))
            .map(|g| g.result_topic.clone());
        rejected(m, source, ctx, request, message, json, result_topic)
    };

    // A graph record: addressed to a step, or fresh on a graph's entry topic.
    let graph_step = if let Some(hop) = &request.hop {
        let Some(graph) = ctx.graphs.get(&hop.graph) else {
            let msg = format!("unknown graph '{}'", hop.graph);
            return invalid(&request, msg, json);
        };
        let Some(step) = graph.step_index(&hop.step) else {
            let msg = format!("graph '{}' has no step '{}'", hop.graph, hop.step);
            return invalid(&request, msg, json);
        };
        Some((Arc::clone(graph), step, false))
    } else if let Some(name) = entry_graph {
        let Some(graph) = ctx.graphs.get(name) else {
            return invalid(&request, format!("unknown graph '{name}'"), json);
        };
        let checked = if request.model != *name {
            Err(format!(
                "request for '{}' arrived on the entry topic of graph '{name}'",
                request.model
            ))
        } else {
            let interface = graph.interface();
            validate_inputs(interface, &request.inputs)
                .and_then(|_| validate_outputs(interface, &request.outputs))
                .map_err(|e| e.to_string())
        };
        if let Err(e) = checked {
            return invalid(&request, e, json);
        }
        let inputs = std::mem::take(&mut request.inputs);
        request.inputs = entry_carried(inputs);
        request.hop = Some(GraphHop {
            graph: graph.name.clone(),
            step: graph.steps[graph.entry].name.clone(),
            ..Default::default()
        });
        Some((Arc::clone(graph), graph.entry, true))
    } else {
        None
    };

    let Some((graph, step, fresh)) = graph_step else {
        return admit_model_request(m, source, ctx, request);
    };
    let carried = std::mem::take(&mut request.inputs);
    let base = request;
    let shadow = base.hop.as_ref().is_some_and(|h| h.shadow);
    let fail = |base: &InferenceRequest, error: InferenceError, class: &'static str| {
        ctx.metrics.invalid.increment(1);
        let next = flow::failed(&graph, step, base, error.clone());
        let mut c = next_completion(source, &graph, base, next);
        c.dead_letter = Some(dead_letter_of(m, class, error.message));
        Admission::Done(Box::new(c))
    };
    let step_name = graph.steps[step].name.clone();
    match (&graph.steps[step].kind, ctx.unit) {
        (StepKind::Model(_), Unit::Model(me)) => {
            let Some(model) = ctx.model else {
                return fail(
                    &base,
                    step_error(codes::INTERNAL, &step_name, "no model"),
                    codes::INVALID_INPUT,
                );
            };
            // A fresh entry record whose canary picks another model moves on unchanged.
            if fresh && topic_for(&graph, step, &base) != ctx.own_topic {
                let forward = Outgoing {
                    topic: topic_for(&graph, step, &base).to_string(),
                    request: InferenceRequest {
                        inputs: carried,
                        ..base.clone()
                    },
                };
                return Admission::Done(Box::new(Completion {
                    source,
                    forwards: vec![forward],
                    ..Default::default()
                }));
            }
            let (inputs, carried) = if shadow {
                carried
                    .into_iter()
                    .partition(|t| model.inputs.iter().any(|i| i.name == t.name))
            } else {
                match step_inputs(&graph, step, &carried) {
                    Ok(inputs) => (inputs, carried),
                    Err(e) => {
                        return fail(
                            &base,
                            step_error(codes::INVALID_INPUT, &step_name, e),
                            codes::INVALID_INPUT,
                        );
                    }
                }
            };
            let rows = match validate_inputs(model, &inputs) {
                Ok(rows) => rows,
                Err(e) => {
                    return fail(
                        &base,
                        step_error(codes::INVALID_INPUT, &step_name, e.to_string()),
                        codes::INVALID_INPUT,
                    );
                }
            };
            if !shadow && graph.steps[step].canary.is_some() {
                metrics::counter!("sluice_canary_served_total", "graph" => graph.name.clone(), "step" => step_name.clone(), "model" => me.clone()).increment(1);
            }
            Admission::Batch(Job {
                request: InferenceRequest { inputs, ..base },
                source,
                topic: m.topic().to_string(),
                rows,
                graph: Some(GraphJob {
                    graph,
                    step,
                    carried,
                    shadow,
                }),
            })
        }
        (StepKind::Combine(_), Unit::Step { step: mine, .. }) if *mine == step_name => {
            Admission::Part(
                InferenceRequest {
                    inputs: carried,
                    ..base
                },
                source,
            )
        }
        (StepKind::Builtin(_) | StepKind::Route(_), Unit::Step { step: mine, .. })
            if *mine == step_name =>
        {
            Admission::Step(StepJob {
                graph,
                step,
                base,
                carried,
                source,
                topic: m.topic().to_string(),
            })
        }
        _ => fail(
            &base,
            step_error(
                codes::INVALID_INPUT,
                &step_name,
                format!(
                    "a record for step '{step_name}' arrived at worker '{}'",
                    ctx.unit
                ),
            ),
            codes::INVALID_INPUT,
        ),
    }
}

/// A record that could not be decoded: dead-lettered, and answered when headers name the caller.
pub(crate) fn undecodable(
    m: &BorrowedMessage<'_>,
    source: Source,
    ctx: &Admit<'_>,
    error: String,
) -> Admission {
    ctx.metrics.undecodable.increment(1);
    let message = format!("undecodable request record: {error}");
    // The gateway also names the request and its reply route in headers, so even a record that
    // cannot be decoded gets an error reply instead of a timeout.
    let (result, reply) = match (
        header(m, kafka_headers::REQUEST_ID),
        header(m, kafka_headers::REPLY_CHANNEL),
        header(m, kafka_headers::REPLY_KEY),
    ) {
        (Some(id), Some(channel), Some(key)) => {
            let stub = InferenceRequest {
                id: id.to_string(),
                model: ctx.unit.to_string(),
                ..Default::default()
            };
            (
                Some(InferenceResult::failure(
                    &stub,
                    codes::UNDECODABLE,
                    message.clone(),
                )),
                Some(ReplyRoute {
                    channel: channel.to_string(),
                    key: key.to_string(),
                    ttl_ms: 60_000,
                }),
            )
        }
        _ => (None, None),
    };
    Admission::Done(Box::new(Completion {
        source,
        result,
        reply,
        dead_letter: Some(dead_letter_of(m, codes::UNDECODABLE, message)),
        ..Default::default()
    }))
}

/// A request that does not fit what it was sent to: answered with `invalid_input` (on
/// `result_topic`, or the unit's) and dead-lettered.
pub(crate) fn rejected(
    m: &BorrowedMessage<'_>,
    source: Source,
    ctx: &Admit<'_>,
    request: &InferenceRequest,
    message: String,
    json: bool,
    result_topic: Option<String>,
) -> Admission {
    ctx.metrics.invalid.increment(1);
    Admission::Done(Box::new(Completion {
        source,
        result: Some(InferenceResult::failure(
            request,
            codes::INVALID_INPUT,
            message.clone(),
        )),
        reply: request.reply.clone(),
        deadline_ms: request.deadline_ms,
        json_result: json,
        result_topic,
        dead_letter: Some(dead_letter_of(m, codes::INVALID_INPUT, message)),
        ..Default::default()
    }))
}

/// A plain request for this worker's model.
pub(crate) fn admit_model_request(
    m: &BorrowedMessage<'_>,
    source: Source,
    ctx: &Admit<'_>,
    request: InferenceRequest,
) -> Admission {
    let json = request.reply_format == "json";
    let checked = match (ctx.model, ctx.unit) {
        (Some(model), Unit::Model(name)) if request.model == *name => {
            validate_inputs(model, &request.inputs)
                .and_then(|rows| validate_outputs(model, &request.outputs).map(|()| rows))
                .map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "request for model '{}' arrived on a topic of '{}'",
            request.model, ctx.unit
        )),
    };
    match checked {
        Ok(rows) => Admission::Batch(Job {
            request,
            source,
            topic: m.topic().to_string(),
            rows,
            graph: None,
        }),
        Err(message) => rejected(m, source, ctx, &request, message, json, None),
    }
}
