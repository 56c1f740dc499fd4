//! The seam itself: what every step kind implements, and what goes in and out.

use futures::future::BoxFuture;
use sluice_schemas::ErrorCode;
use sluice_schemas::{Deadline, Tensor};

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

/// Why a step could not produce a job's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    /// Error class (`ErrorCode::ModelFailed`, `ErrorCode::InvalidInput`, ...).
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl StepFailure {
    /// The inputs did not suit the step.
    pub fn invalid(message: impl Into<String>) -> StepFailure {
        StepFailure {
            code: ErrorCode::InvalidInput,
            message: message.into(),
        }
    }
}

impl StepFailure {
    /// A service the step needs is down or too slow (503 at the gateway).
    pub fn unavailable(message: impl Into<String>) -> StepFailure {
        StepFailure {
            code: ErrorCode::Unavailable,
            message: message.into(),
        }
    }
}

/// How long a step may wait on I/O for a batch: `limit`, or less when a job's deadline comes
/// sooner.
pub fn wait_for(batch: &[StepInput], limit: std::time::Duration) -> std::time::Duration {
    batch
        .iter()
        .map(StepInput::time_left)
        .fold(limit, std::cmp::Ord::min)
}

/// One job's outcome: output tensors (unqualified names) or a failure.
pub type StepResult = Result<Vec<Tensor>, StepFailure>;

/// A kind of step.
pub trait Step: Send + Sync {
    /// Runs a batch; returns one result per job, in order.
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>>;

    /// Opens what the step needs before its first batch (connections, say), so the first
    /// request does not pay for it; runs in the background once the step is built. A failure
    /// is logged and left to the first batch to retry.
    fn warm(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The version its answers report, when the step has its own (a model loaded from a pushed
    /// version); otherwise the unit's.
    fn version(&self) -> Option<&str> {
        None
    }
}

/// Why a unit's step could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Not a model, nor a non-model step of a graph.
    #[error("'{0}' is neither a model nor a step of a graph in the config")]
    UnknownUnit(String),
    /// Loading the model failed.
    #[error("{0}")]
    Backend(#[from] crate::backend::BackendError),
    /// Inference threads could not start.
    #[error("inference threads: {0}")]
    Threads(#[from] std::io::Error),
    /// The step's settings cannot be used.
    #[error("{0}")]
    Settings(String),
    /// A `custom` step names a kind the running binary did not register.
    #[error(
        "no step kind '{kind}' is registered in this binary (registered: {registered:?}); a user step needs a binary that registers it, see examples/custom-step"
    )]
    UnknownKind {
        /// The kind asked for.
        kind: String,
        /// The kinds registered.
        registered: Vec<String>,
    },
}
