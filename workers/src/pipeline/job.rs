//! What the consumer loop hands on: where a record came from, and a job for a step (the request's
//! envelope, what the step reads, and for a graph request its place in the graph).

use std::sync::Arc;

use sluice_common::graph::Graph;
use sluice_schemas::{InferenceRequest, Tensor};

use crate::step::StepInput;

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
