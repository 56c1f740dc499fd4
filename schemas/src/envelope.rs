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
    /// Stable machine-readable code: an [`ErrorCode`]'s wire form (`invalid_input`, …).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// The step (model) that failed.
    pub step: String,
}

/// Why a request failed, as a type: each variant's wire form is [`ErrorCode::as_str`], the
/// strings in [`codes`] and in `InferenceError::code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The inputs do not match the model.
    InvalidInput,
    /// The deadline passed before the request was run.
    DeadlineExceeded,
    /// The model raised an error.
    ModelFailed,
    /// The record could not be decoded.
    Undecodable,
    /// A join gave up waiting for its parts.
    JoinTimeout,
    /// A router found no route for the request.
    NoRoute,
    /// A record could not be written to Kafka for good (too large, not authorized, no topic).
    ProduceFailed,
    /// A service a step depends on (Redis, a database, an HTTP API) is down or too slow.
    Unavailable,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// Every code, so that lists of them (metric labels, dead-letter classes) cannot drift.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::InvalidInput,
        ErrorCode::DeadlineExceeded,
        ErrorCode::ModelFailed,
        ErrorCode::Undecodable,
        ErrorCode::JoinTimeout,
        ErrorCode::NoRoute,
        ErrorCode::ProduceFailed,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The code as written on the wire and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::ModelFailed => "model_failed",
            ErrorCode::Undecodable => "undecodable",
            ErrorCode::JoinTimeout => "join_timeout",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::ProduceFailed => "produce_failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code written as `wire`; a code this version does not know is `Internal`.
    pub fn from_wire(wire: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == wire)
            .unwrap_or(ErrorCode::Internal)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error codes carried in [`InferenceError::code`] (the wire forms of [`ErrorCode`]).
pub mod codes {
    use super::ErrorCode;
    /// The inputs do not match the model.
    pub const INVALID_INPUT: &str = ErrorCode::InvalidInput.as_str();
    /// The deadline passed before the request was run.
    pub const DEADLINE_EXCEEDED: &str = ErrorCode::DeadlineExceeded.as_str();
    /// The model raised an error.
    pub const MODEL_FAILED: &str = ErrorCode::ModelFailed.as_str();
    /// The record could not be decoded.
    pub const UNDECODABLE: &str = ErrorCode::Undecodable.as_str();
    /// A join gave up waiting for its parts.
    pub const JOIN_TIMEOUT: &str = ErrorCode::JoinTimeout.as_str();
    /// A router found no route for the request.
    pub const NO_ROUTE: &str = ErrorCode::NoRoute.as_str();
    /// A record could not be written to Kafka for good (too large, not authorized, no topic).
    pub const PRODUCE_FAILED: &str = ErrorCode::ProduceFailed.as_str();
    /// A service a step depends on (Redis, a database, an HTTP API) is down or too slow.
    pub const UNAVAILABLE: &str = ErrorCode::Unavailable.as_str();
    /// Anything else.
    pub const INTERNAL: &str = ErrorCode::Internal.as_str();
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

#[cfg(test)]
mod error_code_tests {
    use super::ErrorCode;

    #[test]
    fn every_code_reads_back_from_its_wire_form_and_the_forms_differ() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), code);
            assert!(seen.insert(code.as_str()), "{code} written twice");
        }
        assert_eq!(ErrorCode::from_wire("no_such_code"), ErrorCode::Internal);
        assert_eq!(super::codes::UNAVAILABLE, "unavailable");
    }
}
