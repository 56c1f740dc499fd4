//! What a worker makes of a consumed record on arrival: decode it (Avro, or Open Inference
//! Protocol JSON), place it in its graph, check it against the model or step, and hand back a
//! model job for the batcher, a built-in step or join part to run here, or, for a record that
//! cannot run, its answer and dead letter at once.

use std::collections::HashMap;
use std::sync::Arc;

use sluice_common::graph::{Graph, Graphs, StepKind, Unit};
use sluice_common::kafka::headers as kafka_headers;
use sluice_common::now_ms;
use sluice_common::signature::{Signature, validate_inputs, validate_outputs};
use sluice_schemas::ErrorCode;
use sluice_schemas::{
    GraphHop, InferenceRequest, InferenceResult, ReplyRoute, Tensor, decode_request,
};

use crate::pipeline::completion::{Completion, DeadLetter};
use crate::pipeline::flow::{self, Outgoing, entry_carried, step_error, step_inputs, topic_for};
use crate::pipeline::job::{GraphJob, Job, Source};
use crate::pipeline::outcome::next_completion;
use crate::pipeline::record::Record;
use crate::step::StepInput;
use crate::telemetry::WorkerMetrics;

/// What became of a consumed record on arrival.
#[derive(Debug)]
pub enum Admission {
    /// Nothing to run: deliver this and finish the record.
    Done(Box<Completion>),
    /// A job for this worker's step.
    Run(Box<Job>),
    /// A part for this worker's join.
    Part(Box<InferenceRequest>, Source),
}

/// What a record is checked against on arrival.
pub struct Admit<'a> {
    /// The unit this worker serves.
    pub unit: &'a Unit,
    /// The model's signature, for a model unit.
    pub model: Option<&'a Signature>,
    /// The unit's own topic (a canary or shadow record for another model is not ours).
    pub own_topic: &'a str,
    /// Every graph, as compiled now.
    pub graphs: &'a Graphs,
    /// Graph entry topic → graph name.
    pub entries: &'a HashMap<String, String>,
    /// How long an error reply for an undecodable record is stored.
    pub result_ttl_ms: i64,
    /// Counters.
    pub metrics: &'a WorkerMetrics,
}

/// The record as a dead letter of `class`.
pub fn dead_letter_of(r: &Record<'_>, class: ErrorCode, message: String) -> DeadLetter {
    DeadLetter {
        key: r.key.map(<[u8]>::to_vec),
        payload: r.payload.to_vec(),
        topic: r.topic.to_string(),
        partition: r.partition,
        offset: r.offset,
        class,
        message,
    }
}

/// Decodes and routes a record: a model request for the batcher, a graph step to run here, a
/// join part, or (for a record that cannot be run) a completion at once: dead letter, plus an
/// error reply when the caller can be named.
pub fn admit(m: &Record<'_>, source: Source, ctx: &Admit<'_>) -> Admission {
    let entry_graph = ctx.entries.get(m.topic);
    let json = m
        .header(kafka_headers::CONTENT_TYPE)
        .is_some_and(|v| v.starts_with("application/json"));
    let decoded = if json {
        let name = entry_graph.cloned().unwrap_or_else(|| ctx.unit.to_string());
        sluice_schemas::oip::request_from_json(m.payload, m.key_str(), &name, now_ms())
            .map_err(|e| e.to_string())
    } else {
        decode_request(m.payload).map_err(|e| e.to_string())
    };
    let entry_results = entry_graph
        .and_then(|g| ctx.graphs.get(g))
        .map(|g| g.result_topic.clone());
    let mut request = match decoded {
        Ok(r) => r,
        Err(e) => return undecodable(m, source, ctx, e, entry_results, json),
    };
    match place_in_graph(&mut request, entry_graph, ctx.graphs) {
        Ok(Some((graph, step, fresh))) => {
            let carried = std::mem::take(&mut request.inputs);
            let shadow = request.hop.as_ref().is_some_and(|h| h.shadow);
            let record = GraphRecord {
                m,
                source,
                ctx,
                graph,
                step,
                base: request,
                carried,
                fresh,
                shadow,
            };
            record.admit()
        }
        Ok(None) => admit_model_request(m, source, ctx, request),
        Err(message) => rejected(m, source, ctx, &request, message, json, entry_results),
    }
}

/// Where a graph record is: the step its hop names, or, fresh on a graph's entry topic, the
/// graph's first step (its hop set, its inputs checked against the graph's signature and
/// carried under their qualified names). `None` for a plain model request.
fn place_in_graph(
    request: &mut InferenceRequest,
    entry_graph: Option<&String>,
    graphs: &Graphs,
) -> Result<Option<(Arc<Graph>, usize, bool)>, String> {
    if let Some(hop) = &request.hop {
        let graph = graphs
            .get(&hop.graph)
            .ok_or_else(|| format!("unknown graph '{}'", hop.graph))?;
        let step = graph
            .step_index(&hop.step)
            .ok_or_else(|| format!("graph '{}' has no step '{}'", hop.graph, hop.step))?;
        return Ok(Some((Arc::clone(graph), step, false)));
    }
    let Some(name) = entry_graph else {
        return Ok(None);
    };
    let graph = graphs
        .get(name)
        .ok_or_else(|| format!("unknown graph '{name}'"))?;
    if request.model != *name {
        return Err(format!(
            "request for '{}' arrived on the entry topic of graph '{name}'",
            request.model
        ));
    }
    let signature = &graph.signature;
    validate_inputs(signature, &request.inputs)
        .and_then(|_| validate_outputs(signature, &request.outputs))
        .map_err(|e| e.to_string())?;
    let inputs = std::mem::take(&mut request.inputs);
    request.inputs = entry_carried(inputs);
    request.hop = Some(GraphHop {
        graph: graph.name.clone(),
        step: graph.steps[graph.entry].name.clone(),
        ..Default::default()
    });
    Ok(Some((Arc::clone(graph), graph.entry, true)))
}

/// A graph record placed at its step, being admitted.
struct GraphRecord<'a, 'r> {
    m: &'a Record<'r>,
    source: Source,
    ctx: &'a Admit<'a>,
    graph: Arc<Graph>,
    step: usize,
    /// The envelope, its inputs taken out.
    base: InferenceRequest,
    /// The tensors the record carries.
    carried: Vec<Tensor>,
    /// Fresh on the graph's entry topic (not yet forwarded anywhere).
    fresh: bool,
    /// A shadow copy.
    shadow: bool,
}

impl GraphRecord<'_, '_> {
    /// By the step's kind and the unit this worker serves: a model job, a join part, a job for
    /// another kind of step, or the failure of a record that is not this worker's.
    fn admit(mut self) -> Admission {
        let step_name = self.graph.steps[self.step].name.clone();
        match (&self.graph.steps[self.step].kind, self.ctx.unit) {
            (StepKind::Model(_), Unit::Model(me)) => self.model_step(me),
            (StepKind::Combine(_), Unit::Step { step: mine, .. }) if *mine == step_name => {
                let part = InferenceRequest {
                    inputs: self.carried,
                    ..self.base
                };
                Admission::Part(Box::new(part), self.source)
            }
            // Every other kind of step (built-ins, routers, business logic, user steps) reads
            // its inputs from what the record carries.
            (kind, Unit::Step { step: mine, .. })
                if *mine == step_name && !matches!(kind, StepKind::Model(_)) =>
            {
                match step_inputs(&self.graph, self.step, &self.carried) {
                    Ok(inputs) => {
                        let carried = std::mem::take(&mut self.carried);
                        self.shadow = false;
                        self.into_job(inputs, Vec::new(), carried)
                    }
                    Err(e) => self.invalid(e),
                }
            }
            _ => {
                let unit = self.ctx.unit;
                self.invalid(format!(
                    "a record for step '{step_name}' arrived at worker '{unit}'"
                ))
            }
        }
    }

    /// A model step's record: forwarded on when a canary picks another model, else checked
    /// against the model and made a job (keeping the inputs for shadows to compare with).
    fn model_step(mut self, me: &str) -> Admission {
        let (graph, step) = (&self.graph, self.step);
        let Some(signature) = self.ctx.model else {
            return self.fail(ErrorCode::Internal, "no model".into());
        };
        // A fresh entry record whose canary picks another model moves on unchanged (only a
        // fresh record's variant is still to be picked).
        let topic = self.fresh.then(|| topic_for(graph, step, &self.base));
        if let Some(topic) = topic.filter(|t| *t != self.ctx.own_topic) {
            let forward = Outgoing {
                topic: topic.to_string(),
                request: InferenceRequest {
                    inputs: self.carried,
                    ..self.base
                },
            };
            return Admission::Done(Box::new(Completion {
                source: self.source,
                forwards: vec![forward],
                ..Default::default()
            }));
        }
        let carried = std::mem::take(&mut self.carried);
        let (inputs, carried) = if self.shadow {
            carried
                .into_iter()
                .partition(|t| signature.inputs.iter().any(|i| i.name == t.name))
        } else {
            match step_inputs(graph, step, &carried) {
                Ok(inputs) => (inputs, carried),
                Err(e) => return self.invalid(e),
            }
        };
        if let Err(e) = validate_inputs(signature, &inputs) {
            return self.invalid(e.to_string());
        }
        let s = &graph.steps[step];
        if !self.shadow && s.canary.is_some() {
            self.ctx.metrics.canary_served(&graph.name, &s.name, me);
        }
        // The primary's inputs go with its outputs to each shadow: keep a copy then.
        let kept = if !self.shadow && !s.shadows.is_empty() {
            inputs.clone()
        } else {
            Vec::new()
        };
        self.into_job(inputs, kept, carried)
    }

    /// The job running this step on `inputs`; the envelope keeps `kept` as its own inputs.
    fn into_job(self, inputs: Vec<Tensor>, kept: Vec<Tensor>, carried: Vec<Tensor>) -> Admission {
        let request = InferenceRequest {
            inputs: kept,
            ..self.base
        };
        let at = GraphJob {
            graph: self.graph,
            step: self.step,
            carried,
            shadow: self.shadow,
        };
        graph_job(request, inputs, self.source, self.m.topic, at)
    }

    /// The record's inputs do not suit its step.
    fn invalid(&self, message: String) -> Admission {
        self.fail(ErrorCode::InvalidInput, message)
    }

    /// Fails the record at its step (what follows a failure there: the graph's answer, or a
    /// failed part for its join) and dead-letters it as invalid input.
    fn fail(&self, code: ErrorCode, message: String) -> Admission {
        self.ctx.metrics.invalid.increment(1);
        let step_name = &self.graph.steps[self.step].name;
        let error = step_error(code, step_name, message);
        let next = flow::failed(&self.graph, self.step, &self.base, error.clone());
        let mut c = next_completion(self.source, &self.graph, &self.base, next);
        c.dead_letter = Some(dead_letter_of(
            self.m,
            ErrorCode::InvalidInput,
            error.message,
        ));
        Admission::Done(Box::new(c))
    }
}

/// The job running a graph request's step on `inputs`.
fn graph_job(
    request: InferenceRequest,
    inputs: Vec<Tensor>,
    source: Source,
    topic: &str,
    at: GraphJob,
) -> Admission {
    Admission::Run(Box::new(Job {
        request,
        input: StepInput {
            tensors: inputs,
            wanted: Vec::new(),
            ..Default::default()
        },
        source,
        held: Vec::new(),
        topic: topic.to_string(),
        graph: Some(at),
    }))
}

/// A record that could not be decoded: dead-lettered, and answered on the result topic
/// (`result_topic`, or the unit's) under the request id when one is known: from the gateway's
/// headers (which also name the waiting caller's reply route) or, for a direct producer, the
/// record's key; so no caller is left waiting for its deadline.
fn undecodable(
    m: &Record<'_>,
    source: Source,
    ctx: &Admit<'_>,
    error: String,
    result_topic: Option<String>,
    json: bool,
) -> Admission {
    ctx.metrics.undecodable.increment(1);
    let message = format!("undecodable request record: {error}");
    let id = m
        .header(kafka_headers::REQUEST_ID)
        .or_else(|| m.key_str())
        .filter(|id| !id.is_empty());
    let reply = match (
        m.header(kafka_headers::REPLY_CHANNEL),
        m.header(kafka_headers::REPLY_KEY),
    ) {
        (Some(channel), Some(key)) => Some(ReplyRoute {
            channel: channel.to_string(),
            key: key.to_string(),
            ttl_ms: ctx.result_ttl_ms,
        }),
        _ => None,
    };
    let result = id.map(|id| {
        let stub = InferenceRequest {
            id: id.to_string(),
            model: ctx.unit.to_string(),
            ..Default::default()
        };
        InferenceResult::failure(&stub, ErrorCode::Undecodable, message.clone())
    });
    Admission::Done(Box::new(Completion {
        source,
        reply: reply.filter(|_| result.is_some()),
        result,
        result_topic,
        json_result: json,
        dead_letter: Some(dead_letter_of(m, ErrorCode::Undecodable, message)),
        ..Default::default()
    }))
}

/// A request that does not fit what it was sent to: answered with `invalid_input` (on
/// `result_topic`, or the unit's) and dead-lettered.
fn rejected(
    m: &Record<'_>,
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
            ErrorCode::InvalidInput,
            message.clone(),
        )),
        reply: request.reply.clone(),
        deadline: request.deadline,
        json_result: json,
        result_topic,
        dead_letter: Some(dead_letter_of(m, ErrorCode::InvalidInput, message)),
        ..Default::default()
    }))
}

/// A plain request for this worker's model.
fn admit_model_request(
    m: &Record<'_>,
    source: Source,
    ctx: &Admit<'_>,
    request: InferenceRequest,
) -> Admission {
    let json = request.reply_format == sluice_schemas::ReplyFormat::Json;
    let checked = match (ctx.model, ctx.unit) {
        (Some(signature), Unit::Model(name)) if request.model == *name => {
            validate_inputs(signature, &request.inputs)
                .and_then(|_| validate_outputs(signature, &request.outputs))
                .map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "request for model '{}' arrived on a topic of '{}'",
            request.model, ctx.unit
        )),
    };
    match checked {
        Ok(()) => {
            // The request keeps its inputs for a dead letter, should the model fail on them.
            let input = StepInput {
                tensors: request.inputs.clone(),
                wanted: request.outputs.clone(),
                ..Default::default()
            };
            Admission::Run(Box::new(Job {
                request,
                input,
                source,
                held: Vec::new(),
                topic: m.topic.to_string(),
                graph: None,
            }))
        }
        Err(message) => rejected(m, source, ctx, &request, message, json, None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use sluice_common::graph::fixtures::model;
    use sluice_common::{Config, Deployment};
    use sluice_schemas::{DataType, Tensor, encode_request};

    use super::*;

    fn deployment() -> Deployment {
        let mut cfg = Config::load_with_env(None, &[]).unwrap();
        let m = model(
            &[("x", DataType::Fp32, vec![-1, 2])],
            &[("y", DataType::Fp32, vec![-1])],
        );
        cfg.models.insert("m".into(), m);
        Deployment::compile(cfg).unwrap()
    }

    fn request(rows: i64) -> InferenceRequest {
        let x = vec![1f32; rows as usize * 2];
        InferenceRequest {
            id: "r1".into(),
            model: "m".into(),
            deadline: sluice_schemas::Deadline::from_wire(99),
            inputs: vec![Tensor::from_values("x", DataType::Fp32, vec![rows, 2], &x)],
            reply: Some(ReplyRoute {
                channel: "c".into(),
                key: "k".into(),
                ttl_ms: 1000,
            }),
            ..Default::default()
        }
    }

    /// Admits `payload` (with `headers`) arriving on model `m`'s topic at offset 7.
    fn admit_payload(payload: &[u8], headers: &[(&str, &[u8])]) -> Admission {
        let d = deployment();
        let unit = Unit::Model("m".into());
        let signature = d.model("m").unwrap().signature();
        let metrics = WorkerMetrics::new("m", &d);
        let ctx = Admit {
            unit: &unit,
            model: Some(&signature),
            own_topic: "sluice.m.requests",
            graphs: &d.graphs,
            entries: &HashMap::new(),
            result_ttl_ms: 60_000,
            metrics: &metrics,
        };
        let record = Record {
            topic: "sluice.m.requests",
            partition: 2,
            offset: 7,
            key: Some(b"r1"),
            payload,
            headers,
        };
        let source = Source {
            topic_index: 0,
            partition: 2,
            offset: 7,
        };
        admit(&record, source, &ctx)
    }

    #[test]
    fn a_fitting_request_becomes_a_job_with_its_rows() {
        let Admission::Run(job) = admit_payload(&encode_request(&request(3)).unwrap(), &[]) else {
            panic!("not a job")
        };
        assert_eq!(job.rows(), 3);
        assert_eq!(job.input.tensors, request(3).inputs);
        assert_eq!(
            job.request.inputs,
            request(3).inputs,
            "kept for a dead letter"
        );
        assert_eq!((job.source.partition, job.source.offset), (2, 7));
        assert!(job.graph.is_none());
    }

    #[test]
    fn a_request_that_does_not_fit_is_answered_and_dead_lettered() {
        let mut r = request(1);
        r.inputs[0] = Tensor::from_values("x", DataType::Fp32, vec![1, 3], &[0f32; 3]);
        let Admission::Done(c) = admit_payload(&encode_request(&r).unwrap(), &[]) else {
            panic!("not answered at once")
        };
        let e = c.result.as_ref().unwrap().error.clone().unwrap();
        assert_eq!(e.code, ErrorCode::InvalidInput);
        assert!(e.message.contains("shape"), "{}", e.message);
        assert_eq!(c.reply.as_ref().unwrap().key, "k", "the caller is answered");
        let d = c.dead_letter.unwrap();
        assert_eq!(
            (d.class, d.partition, d.offset),
            (ErrorCode::InvalidInput, 2, 7)
        );
    }

    #[test]
    fn an_undecodable_record_named_by_headers_gets_an_error_reply() {
        let headers: [(&str, &[u8]); 3] = [
            (kafka_headers::REQUEST_ID, b"r9"),
            (kafka_headers::REPLY_CHANNEL, b"chan"),
            (kafka_headers::REPLY_KEY, b"key9"),
        ];
        let Admission::Done(c) = admit_payload(b"not avro", &headers) else {
            panic!("not answered at once")
        };
        let result = c.result.unwrap();
        assert_eq!(result.id, "r9");
        assert_eq!(result.error.unwrap().code, ErrorCode::Undecodable);
        let reply = c.reply.unwrap();
        assert_eq!(
            (reply.channel.as_str(), reply.key.as_str(), reply.ttl_ms),
            ("chan", "key9", 60_000)
        );
        assert_eq!(c.dead_letter.unwrap().payload, b"not avro");
    }

    #[test]
    fn an_undecodable_record_from_a_direct_producer_is_answered_under_its_key() {
        let Admission::Done(c) = admit_payload(b"not avro", &[]) else {
            panic!("not answered at once")
        };
        let result = c.result.unwrap();
        assert_eq!(result.id, "r1", "the record's key names the request");
        assert_eq!(result.error.unwrap().code, ErrorCode::Undecodable);
        assert!(c.reply.is_none(), "no caller waits on Redis");
        assert!(c.dead_letter.is_some());
    }
}
