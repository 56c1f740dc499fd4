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
    /// When nobody waits for the answer any more (on the wire `deadline_ms`, 0 for none).
    pub deadline: Option<crate::Deadline>,
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
    /// Encoding of the result record.
    pub reply_format: ReplyFormat,
}

/// How a request's result record is encoded (on the wire `reply_format`: `""` or `avro`, or
/// `json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyFormat {
    /// The Avro result envelope (the default).
    #[default]
    Avro,
    /// The Open Inference Protocol's JSON response (asked for by JSON requests).
    Json,
}

impl ReplyFormat {
    /// Reads the wire form; anything but `json` is Avro.
    pub fn from_wire(wire: &str) -> ReplyFormat {
        if wire == "json" {
            ReplyFormat::Json
        } else {
            ReplyFormat::Avro
        }
    }

    /// The wire form (`""` for Avro, as the first schema's records had none).
    pub fn as_wire(self) -> &'static str {
        match self {
            ReplyFormat::Avro => "",
            ReplyFormat::Json => "json",
        }
    }
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
    /// A failed part on its way to a join: its error (on the wire: JSON, or empty).
    pub failed: Option<InferenceError>,
    /// Which model served each step so far.
    pub served: BTreeMap<String, String>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceError {
    /// Stable machine-readable class (written on the wire as `invalid_input`, …).
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// The step (model) that failed.
    pub step: String,
}

impl InferenceError {
    /// The error as a graph hop's `failed` field carries it: `{"code", "message", "step"}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "code": self.code.as_str(), "message": self.message, "step": self.step
        })
        .to_string()
    }

    /// Reads [`InferenceError::to_json`]'s form; `None` for an empty field. Missing fields are
    /// empty, an unknown or missing code is `internal`.
    pub fn from_json(json: &str) -> Option<InferenceError> {
        if json.is_empty() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default();
        Some(InferenceError {
            code: ErrorCode::from_wire(field("code")),
            message: field("message").to_string(),
            step: field("step").to_string(),
        })
    }
}

/// Why a request failed, as a type: each variant's wire form is [`ErrorCode::as_str`], decoded
/// once where a record enters ([`ErrorCode::from_wire`]).
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
    pub fn failure(
        request: &InferenceRequest,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Self {
        InferenceResult {
            id: request.id.clone(),
            client_id: request.client_id.clone(),
            model: request.model.clone(),
            error: Some(InferenceError {
                code,
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
    }
}
