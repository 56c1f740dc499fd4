//! The step seam: every kind of step (a model, a built-in, a join's combiner, a router; later
//! lookups, validators, encoders, learners, user steps) runs behind [`Step`]. A step takes a batch
//! of jobs, each a set of named tensors, and returns per job its named output tensors or an error.
//! The consumer loop, batching, deadlines, offsets and delivery are the same for every kind; a new
//! kind is one module here plus its config type, built in [`for_unit`].
//!
//! Steps run on the async runtime: one whose work is CPU-heavy moves it off (the model step runs
//! on inference threads of its own, see [`crate::pool`]).

mod argmax;
pub mod combine;
mod model;
mod route;

use std::sync::Arc;

use futures::future::BoxFuture;
use sluice_common::Deployment;
use sluice_common::graph::{StepKind, Unit};
use sluice_schemas::Tensor;
use sluice_schemas::envelope::codes;

pub use crate::job::StepInput;
pub use model::ModelStep;

/// Why a step could not produce a job's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    /// Error class (`codes::MODEL_FAILED`, `codes::INVALID_INPUT`, ...).
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

impl StepFailure {
    /// The inputs did not suit the step.
    pub fn invalid(message: impl Into<String>) -> StepFailure {
        StepFailure {
            code: codes::INVALID_INPUT,
            message: message.into(),
        }
    }
}

/// One job's outcome: output tensors (unqualified names) or a failure.
pub type StepResult = Result<Vec<Tensor>, StepFailure>;

/// A kind of step.
pub trait Step: Send + Sync {
    /// Runs a batch; returns one result per job, in order.
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>>;
}

/// Why a unit's step could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Not a model, nor a non-model step of a graph.
    #[error(
        "'{0}' is neither a model nor a built-in, combine or route step of a graph in the config"
    )]
    UnknownUnit(String),
    /// Loading the model failed.
    #[error("{0}")]
    Backend(#[from] crate::backend::BackendError),
    /// Inference threads could not start.
    #[error("inference threads: {0}")]
    Threads(#[from] std::io::Error),
}

/// The step a worker unit runs, built from the deployment.
pub fn for_unit(deployment: &Deployment, unit: &Unit) -> Result<Arc<dyn Step>, BuildError> {
    let unknown = || BuildError::UnknownUnit(unit.to_string());
    match unit {
        Unit::Model(name) => {
            let model = deployment.model(name).ok_or_else(unknown)?;
            Ok(Arc::new(ModelStep::load(name, model)?))
        }
        Unit::Step { graph, step } => {
            let g = deployment.graph(graph).ok_or_else(unknown)?;
            let i = g.step_index(step).ok_or_else(unknown)?;
            let output = g.steps[i].outputs.first().map(|o| o.name.clone());
            match &g.steps[i].kind {
                StepKind::Model(_) => Err(unknown()),
                StepKind::Builtin(b) => Ok(Arc::new(argmax::Argmax::new(*b))),
                StepKind::Combine(join) => Ok(Arc::new(combine::CombineStep::new(
                    join.clone(),
                    output.unwrap_or_default(),
                ))),
                StepKind::Route(_) => Ok(Arc::new(route::RouteStep)),
            }
        }
    }
}
