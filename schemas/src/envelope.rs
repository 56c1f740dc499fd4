//! The request and result envelopes as Rust types (see `schemas/avro/*.avsc`).

use std::collections::BTreeMap;

use crate::Tensor;

/// Where a worker sends a result besides the result topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRoute {
    /// Redis pub/sub channel the waiting gateway listens on.
    pub channel: String,
    /// Redis key the result is stored under (read by the gateway if it missed the publish).
    pub key: String,
    /// Lifetime of the stored result, milliseconds.
    pub ttl_ms: i64,
}

/// One inference request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InferenceRequest {
    /// Unique id; correlation key and Kafka message key.
    pub id: String,
    /// The caller's own id, echoed back.
    pub client_id: Option<String>,
    /// Target model.
    pub model: String,
    /// Unix epoch ms after which nobody waits; 0 means none.
    pub deadline_ms: i64,
    /// Unix epoch µs when produced.
    pub sent_at_us: i64,
    /// Redis reply route; `None` for fire-and-forget producers that read the result topic.
    pub reply: Option<ReplyRoute>,
    /// W3C trace context.
    pub trace: BTreeMap<String, String>,
    /// Request parameters, JSON-encoded values.
    pub parameters: BTreeMap<String, String>,
    /// Input tensors.
    pub inputs: Vec<Tensor>,
    /// Requested outputs; empty means all.
    pub outputs: Vec<String>,
    /// Position inside a graph; `None` for a model request or a graph's entry record.
    pub hop: Option<GraphHop>,
    /// Encoding of the result record: `""`/`avro` or `json`.
    pub reply_format: String,
}

/// Where a request is inside a graph.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GraphHop {
    /// The graph.
    pub graph: String,
    /// The step this record is addressed to.
    pub step: String,
    /// The step whose outputs this record carries (a join's part); empty otherwise.
    pub from: String,
    /// A shadow copy, compared with the primary and never answered.
    pub shadow: bool,
    /// A failed part on its way to a join: the error as JSON; empty otherwise.
    pub failed: String,
    /// Which model served each step so far.
    pub served: BTreeMap<String, String>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceError {
    /// Stable machine-readable code: `invalid_input`, `deadline_exceeded`, `model_failed`,
    /// `undecodable`, `internal`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// The step (model) that failed.
    pub step: String,
}

/// Error codes carried in [`InferenceError::code`].
pub mod codes {
    /// The inputs do not match the model.
    pub const INVALID_INPUT: &str = "invalid_input";
    /// The deadline passed before the request was run.
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    /// The model raised an error.
    pub const MODEL_FAILED: &str = "model_failed";
    /// The record could not be decoded.
    pub const UNDECODABLE: &str = "undecodable";
    /// A join gave up waiting for its parts.
    pub const JOIN_TIMEOUT: &str = "join_timeout";
    /// A router found no route for the request.
    pub const NO_ROUTE: &str = "no_route";
    /// A record could not be written to Kafka for good (too large, not authorized, no topic).
    pub const PRODUCE_FAILED: &str = "produce_failed";
    /// A service a step depends on (Redis, a database, an HTTP API) is down or too slow.
    pub const UNAVAILABLE: &str = "unavailable";
    /// Anything else.
    pub const INTERNAL: &str = "internal";
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InferenceResult {
    /// Request id.
    pub id: String,
    /// The caller's own id.
    pub client_id: Option<String>,
    /// Model that answered.
    pub model: String,
    /// Its version.
    pub model_version: String,
    /// Set on failure.
    pub error: Option<InferenceError>,
    /// Output tensors (empty on failure).
    pub outputs: Vec<Tensor>,
    /// Response parameters, JSON-encoded values.
    pub parameters: BTreeMap<String, String>,
    /// Produce → start of inference, µs.
    pub queue_us: i64,
    /// Batch inference time, µs.
    pub infer_us: i64,
    /// Requests in the batch.
    pub batch_size: i32,
}

impl InferenceResult {
    /// A failed result for `request`.
    pub fn failure(request: &InferenceRequest, code: &str, message: impl Into<String>) -> Self {
        InferenceResult {
            id: request.id.clone(),
            client_id: request.client_id.clone(),
            model: request.model.clone(),
            error: Some(InferenceError {
                code: code.to_string(),
                message: message.into(),
                step: request.model.clone(),
            }),
            ..Default::default()
        }
    }
}
