//! What the consumer loop hands on: where a record came from, and a job for a step (the request's
//! envelope, what the step reads, and for a graph request its place in the graph).

use sluice_schemas::Deadline;
use std::sync::Arc;

use sluice_common::graph::Graph;
use sluice_schemas::{InferenceRequest, Tensor};

/// Where a consumed record came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Source {
    /// Index of its topic among the worker's topics.
    pub topic_index: usize,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// One job's input: tensors under the names the step reads them by.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepInput {
    /// The request's id (set when its batch runs), for steps that log what they answered.
    pub id: String,
    /// The tensors, batch dimension first.
    pub tensors: Vec<Tensor>,
    /// Outputs the caller asked for (empty: all).
    pub wanted: Vec<String>,
    /// When the request's caller stops waiting. Steps that wait on I/O bound their waits by it.
    pub deadline: Option<Deadline>,
    /// The request's parameters (JSON-encoded values).
    pub parameters: std::collections::BTreeMap<String, String>,
}

impl StepInput {
    /// Time left before the deadline (`Duration::MAX` without one; zero once passed).
    pub fn time_left(&self) -> std::time::Duration {
        sluice_schemas::deadline::time_left(self.deadline)
    }

    /// Rows this job contributes (the first tensor's batch dimension).
    pub fn rows(&self) -> usize {
        self.tensors
            .first()
            .and_then(|t| t.shape.first())
            .map_or(0, |&n| usize::try_from(n).unwrap_or(0))
    }
}

/// A graph request at a step.
#[derive(Debug)]
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

/// A request waiting for, or in, a batch of its step.
#[derive(Debug)]
pub struct Job {
    /// The envelope (reply route, deadline, parameters). A plain request keeps its inputs here
    /// for its dead letter; a graph request's step inputs are here only when a shadow needs them.
    pub request: InferenceRequest,
    /// What the step reads (taken when the batch runs).
    pub input: StepInput,
    /// The record it came from.
    pub source: Source,
    /// Other records finished with this one (the other parts a join held).
    pub held: Vec<Source>,
    /// The topic it came from.
    pub topic: String,
    /// Set for a graph request.
    pub graph: Option<GraphJob>,
}

impl Job {
    /// Rows it contributes to a batch.
    pub fn rows(&self) -> usize {
        self.input.rows()
    }
}
