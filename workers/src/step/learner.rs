//! A learning model served: a logistic regression predicting with the newest weights its
//! learner published (`<prefix>.<model>.weights`), swapped in between batches, and logging each
//! answer to `<prefix>.<model>.predictions` (acknowledged before the answer goes out, so every
//! answered request can be learned from). Answers carry the weights version.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use sluice_common::Deployment;
use sluice_common::config::ModelConfig;
use sluice_learn::{Weights, WeightsRecord, hash_feature};
use sluice_schemas::learning::PredictionRecord;
use sluice_schemas::{DataType, Tensor};

use super::prediction_log::PredictionLog;
use super::seam::{BuildError, Step, StepFailure, StepInput, StepResult, wait_for};
use super::snapshots::{Slot, Snapshot, current, follow};
/// Longest wait for the broker to log a batch's answers when requests carry no deadline.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// One answer: P(y = 1), the dense row, the hashed features.
type Answer = (f64, Vec<f64>, Vec<u32>);

/// A served learner.
pub struct LearnerStep {
    model: String,
    /// The dense FP32 input, if any.
    input: Option<String>,
    /// The categorical (BYTES) inputs, hashed into `buckets`.
    categorical: Vec<String>,
    buckets: u32,
    outputs: Vec<String>,
    dims: usize,
    weights: Slot<Weights>,
    log: PredictionLog,
}

impl LearnerStep {
    /// The step for model `name`; starts following its weights topic when built on the
    /// runtime (zero weights, or its `warm_start` file, until a snapshot arrives).
    pub fn new(
        name: &str,
        model: &ModelConfig,
        deployment: &Deployment,
    ) -> Result<LearnerStep, BuildError> {
        let cfg = &deployment.config;
        let learner = model
            .learner
            .as_ref()
            .ok_or_else(|| BuildError::Settings(format!("model '{name}' is not a learner")))?;
        let dense = model.inputs.iter().find(|i| i.datatype == DataType::Fp32);
        let dims = dense
            .and_then(|i| i.shape.get(1))
            .map_or(Ok(0), |&d| usize::try_from(d))
            .map_err(|_| BuildError::Settings(format!("model '{name}': input [-1, d]")))?;
        let categorical = model
            .inputs
            .iter()
            .filter(|i| i.datatype == DataType::Bytes)
            .map(|i| i.name.clone())
            .collect();
        let start = match &learner.warm_start {
            Some(path) => Weights::read(path).map_err(BuildError::Settings)?,
            None => Weights::zero(dims, learner.scale),
        };
        let weights: Slot<Weights> = Arc::new(RwLock::new(Arc::new(start)));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(follow::<Weights>(
                Arc::downgrade(&weights),
                cfg.clone(),
                deployment.topics.weights(name),
                name.to_string(),
                (),
            ));
        }
        tracing::info!(model = %name, dims, "learner model served");
        Ok(LearnerStep {
            log: PredictionLog::new(name, deployment)?,
            model: name.to_string(),
            input: dense.map(|i| i.name.clone()),
            categorical,
            buckets: learner.hash_buckets,
            outputs: model.outputs.iter().map(|o| o.name.clone()).collect(),
            dims,
            weights,
        })
    }

    /// The row a job asks about (dense inputs, hashed categorical features), or why it
    /// cannot be answered.
    fn row(&self, job: &StepInput) -> Result<(Vec<f64>, Vec<u32>), StepFailure> {
        let tensor = |name: &str| {
            let t = job
                .tensors
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| StepFailure::invalid(format!("input '{name}' is missing")))?;
            if t.rows() != 1 {
                return Err(StepFailure::invalid(format!(
                    "a learning model answers one row per request (feedback is given per request id); got {} rows",
                    t.rows()
                )));
            }
            Ok(t)
        };
        let x = match &self.input {
            None => Vec::new(),
            Some(input) => {
                let x = tensor(input)?
                    .to_f64()
                    .ok_or_else(|| StepFailure::invalid("input must be numeric"))?;
                if x.len() != self.dims || x.iter().any(|v| !v.is_finite()) {
                    return Err(StepFailure::invalid(format!(
                        "input '{input}' must hold {} finite numbers",
                        self.dims
                    )));
                }
                x
            }
        };
        let mut hashed = Vec::new();
        for name in &self.categorical {
            let values = tensor(name)?
                .bytes_elements()
                .map_err(|e| StepFailure::invalid(format!("input '{name}': {e}")))?;
            hashed.extend(values.iter().map(|v| hash_feature(name, v, self.buckets)));
        }
        Ok((x, hashed))
    }

    fn outputs(&self, p: f64, version: u64) -> Vec<Tensor> {
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.outputs
            .iter()
            .map(|name| match name.as_str() {
                "label" => {
                    Tensor::from_values(name, DataType::Int64, vec![1, 1], &[i64::from(p > 0.5)])
                }
                "weights_version" => {
                    Tensor::from_values(name, DataType::Int64, vec![1, 1], &[version])
                }
                _ => Tensor::from_values(name, DataType::Fp32, vec![1, 1], &[p as f32]),
            })
            .collect()
    }

    async fn batch(&self, batch: Vec<StepInput>) -> Vec<StepResult> {
        // One snapshot for the whole batch: a swap lands between batches, never inside one.
        let weights = current(&self.weights);
        let now = sluice_common::now_ms();
        let version = i64::try_from(weights.version).unwrap_or(i64::MAX);
        let answers: Vec<Result<Answer, StepFailure>> = batch
            .iter()
            .map(|job| {
                let (x, hashed) = self.row(job)?;
                Ok((weights.predict_with(&x, &hashed), x, hashed))
            })
            .collect();
        let records: Vec<Option<PredictionRecord>> = answers
            .iter()
            .zip(&batch)
            .map(|(a, job)| {
                let (p, x, hashed) = a.as_ref().ok()?;
                Some(PredictionRecord {
                    id: job.id.clone(),
                    model: self.model.clone(),
                    weights_version: version,
                    features: x.clone(),
                    probability: *p,
                    time_ms: now,
                    arm: None,
                    hashed: hashed.iter().map(|&h| i64::from(h)).collect(),
                })
            })
            .collect();
        let logged = self
            .log
            .write(&records, wait_for(&batch, LOG_TIMEOUT))
            .await;
        answers
            .into_iter()
            .zip(logged)
            .map(|(a, l)| {
                let (p, _, _) = a?;
                l?;
                Ok(self.outputs(p, weights.version))
            })
            .collect()
    }
}

impl Step for LearnerStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(self.batch(batch))
    }
}

impl Snapshot for Weights {
    type Context = ();

    fn parse(payload: &[u8], name: &str, _: &()) -> Result<Option<Weights>, String> {
        let r: WeightsRecord = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        Ok((r.model == name).then_some(r.weights))
    }

    fn version(&self) -> u64 {
        self.version
    }
}
