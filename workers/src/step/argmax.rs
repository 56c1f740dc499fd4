//! Built-in steps: `argmax` turns `probabilities` [batch, classes] into `label` (INT64) and its
//! `probability` (FP32). Cheap enough to run on the async runtime.

use futures::future::BoxFuture;
use sluice_common::graph::Builtin;

use super::combine::argmax;
use super::seam::{Step, StepFailure, StepInput, StepResult};

/// A built-in step.
pub struct Argmax {
    builtin: Builtin,
}

impl Argmax {
    /// The step for `builtin`.
    pub fn new(builtin: Builtin) -> Argmax {
        Argmax { builtin }
    }

    fn one(&self, job: &StepInput) -> StepResult {
        match self.builtin {
            Builtin::Argmax => {
                let p = job
                    .tensors
                    .iter()
                    .find(|t| t.name == "probabilities")
                    .ok_or_else(|| StepFailure::invalid("argmax has no input 'probabilities'"))?;
                argmax(p).map_err(StepFailure::invalid)
            }
        }
    }
}

impl Step for Argmax {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move { batch.iter().map(|j| self.one(j)).collect() })
    }
}
