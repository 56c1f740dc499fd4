//! What a worker has to deliver for one consumed record before its offset may be committed.

use sluice_schemas::{Deadline, ErrorCode, InferenceResult, ReplyRoute};

use crate::pipeline::flow::Outgoing;
use crate::pipeline::job::Source;

/// A record no step could process, with where it came from and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original payload.
    pub payload: Vec<u8>,
    /// Original topic.
    pub topic: String,
    /// Original partition.
    pub partition: i32,
    /// Original offset.
    pub offset: i64,
    /// Why it could not be used.
    pub class: ErrorCode,
    /// Error message.
    pub message: String,
}

/// Everything to deliver for one consumed record before its offset may be committed.
#[derive(Debug, Default)]
pub struct Completion {
    /// The consumed record.
    pub source: Source,
    /// The result to publish: a model's answer, a graph's answer (or error), a shadow
    /// comparison. Absent for records too broken to name a request id and for graph records
    /// that move on to a next step.
    pub result: Option<InferenceResult>,
    /// Where the result goes; `None`: the model's result topic.
    pub result_topic: Option<String>,
    /// Write the result record as Open Inference Protocol JSON (the request came as JSON).
    pub json_result: bool,
    /// Records for the next steps of a graph.
    pub forwards: Vec<Outgoing>,
    /// Where the waiting caller listens.
    pub reply: Option<ReplyRoute>,
    /// Request deadline: replies are retried until then (without one, until they succeed).
    pub deadline: Option<Deadline>,
    /// A dead-letter record to write.
    pub dead_letter: Option<DeadLetter>,
}
