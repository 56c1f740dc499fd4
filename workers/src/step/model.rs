//! Model steps: ONNX models run by ONNX Runtime on inference threads ([`InferencePool`]), one
//! session per thread, the batch concatenated into one call and split back per job.

use futures::future::BoxFuture;
use sluice_common::ModelConfig;
use sluice_schemas::ErrorCode;

use super::seam::{BuildError, Step, StepFailure, StepInput, StepResult};
use crate::backend::OrtBackend;
use crate::step::pool::InferencePool;

/// A loaded model.
pub struct ModelStep {
    pool: InferencePool,
    version: String,
}

impl ModelStep {
    /// Loads `model.threads` sessions of the model and starts their threads.
    pub fn load(name: &str, model: &ModelConfig) -> Result<ModelStep, BuildError> {
        let backends = (0..model.threads)
            .map(|_| OrtBackend::load(model))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(model = %name, threads = model.threads, onnx = ?model.onnx, "model loaded");
        Ok(ModelStep {
            pool: InferencePool::start(name, model, backends)?,
            version: model.version.clone(),
        })
    }
}

impl Step for ModelStep {
    fn version(&self) -> Option<&str> {
        Some(&self.version)
    }

    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move {
            self.pool
                .run(batch)
                .await
                .into_iter()
                .map(|r| {
                    r.map_err(|message| StepFailure {
                        code: ErrorCode::ModelFailed,
                        message,
                    })
                })
                .collect()
        })
    }
}
