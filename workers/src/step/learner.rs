//! A learning model served: a logistic regression predicting with the newest weights its
//! learner published (`<prefix>.<model>.weights`), swapped in between batches, and logging each
//! answer to `<prefix>.<model>.predictions` (acknowledged before the answer goes out, so every
//! answered request can be learned from). Answers carry the weights version.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use sluice_common::config::ModelConfig;
use sluice_common::{Config, Deployment};
use sluice_learn::{Weights, WeightsRecord};
use sluice_schemas::learning::{PredictionRecord, encode_prediction};
use sluice_schemas::{DataType, Tensor};

use super::seam::{BuildError, Step, StepFailure, StepInput, StepResult, wait_for};

/// How long the broker holds a weights fetch: the most a new snapshot waits to be seen.
const WEIGHTS_FETCH_WAIT: Duration = Duration::from_millis(50);
/// Longest wait for the broker to log a batch's answers when requests carry no deadline.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

type Shared = Arc<RwLock<Arc<Weights>>>;

/// A served learner.
pub struct LearnerStep {
    model: String,
    input: String,
    outputs: Vec<String>,
    dims: usize,
    weights: Shared,
    producer: FutureProducer,
    topic: String,
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
        let input = model
            .inputs
            .first()
            .ok_or_else(|| BuildError::Settings(format!("model '{name}' has no input")))?;
        let dims = input
            .shape
            .get(1)
            .and_then(|&d| usize::try_from(d).ok())
            .ok_or_else(|| BuildError::Settings(format!("model '{name}': input [-1, d]")))?;
        let start = match &learner.warm_start {
            Some(path) => Weights::read(path).map_err(BuildError::Settings)?,
            None => Weights::zero(dims, learner.scale),
        };
        let weights: Shared = Arc::new(RwLock::new(Arc::new(start)));
        let producer = sluice_common::kafka::producer_config(
            cfg,
            &format!("sluice-predictions-{name}-{}", std::process::id()),
            Duration::from_micros(300),
        )
        .create()
        .map_err(|e| BuildError::Settings(format!("prediction log producer: {e}")))?;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(follow(
                Arc::downgrade(&weights),
                cfg.clone(),
                deployment.topics.weights(name),
                name.to_string(),
            ));
        }
        tracing::info!(model = %name, dims, "learner model served");
        Ok(LearnerStep {
            model: name.to_string(),
            input: input.name.clone(),
            outputs: model.outputs.iter().map(|o| o.name.clone()).collect(),
            dims,
            weights,
            producer,
            topic: deployment.topics.predictions(name),
        })
    }

    /// The row a job asks about, or why it cannot be answered.
    fn row(&self, job: &StepInput) -> Result<Vec<f64>, StepFailure> {
        let t = job
            .tensors
            .iter()
            .find(|t| t.name == self.input)
            .ok_or_else(|| StepFailure::invalid(format!("input '{}' is missing", self.input)))?;
        if t.rows() != 1 {
            return Err(StepFailure::invalid(format!(
                "a learning model answers one row per request (feedback is given per request id); got {} rows",
                t.rows()
            )));
        }
        let x = t
            .to_f64()
            .ok_or_else(|| StepFailure::invalid("input must be numeric"))?;
        if x.len() != self.dims || x.iter().any(|v| !v.is_finite()) {
            return Err(StepFailure::invalid(format!(
                "input '{}' must hold {} finite numbers",
                self.input, self.dims
            )));
        }
        Ok(x)
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
        let weights = Arc::clone(&self.weights.read().unwrap_or_else(|e| e.into_inner()));
        let now = sluice_common::now_ms();
        let version = i64::try_from(weights.version).unwrap_or(i64::MAX);
        let answers: Vec<Result<(f64, Vec<f64>), StepFailure>> = batch
            .iter()
            .map(|job| {
                let x = self.row(job)?;
                Ok((weights.predict(&x), x))
            })
            .collect();
        let wait = wait_for(&batch, LOG_TIMEOUT);
        let logged = answers.iter().zip(&batch).map(|(a, job)| async move {
            let Ok((p, x)) = a else { return Ok(()) };
            let record = PredictionRecord {
                id: job.id.clone(),
                model: self.model.clone(),
                weights_version: version,
                features: x.clone(),
                probability: *p,
                time_ms: now,
            };
            let bytes = encode_prediction(&record)
                .map_err(|e| StepFailure::unavailable(format!("prediction log: {e}")))?;
            self.producer
                .send(
                    FutureRecord::to(&self.topic)
                        .key(&record.id)
                        .payload(&bytes),
                    wait,
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| {
                    StepFailure::unavailable(format!("the prediction log was not written: {e}"))
                })
        });
        let logged = futures::future::join_all(logged).await;
        answers
            .into_iter()
            .zip(logged)
            .map(|(a, l)| {
                let (p, _) = a?;
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

/// Keeps `weights` at the newest snapshot on `topic` until the step is dropped.
async fn follow(weights: Weak<RwLock<Arc<Weights>>>, cfg: Config, topic: String, model: String) {
    let client = format!("sluice-weights-{model}-{}", std::process::id());
    let consumer: StreamConsumer =
        match sluice_common::kafka::reader_config(&cfg, &client, WEIGHTS_FETCH_WAIT).create() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, %model, "cannot follow the learner's weights");
                return;
            }
        };
    let consumer = Arc::new(consumer);
    // Start at the newest snapshot (the topic's last record).
    let start = loop {
        if weights.strong_count() == 0 {
            return;
        }
        match sluice_common::kafka::watermarks(&consumer, &topic).await {
            Ok((low, high)) => break (high - 1).max(low),
            Err(e) => tracing::warn!(error = %e, %topic, "weights topic not readable yet"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let served = metrics::gauge!("sluice_served_weights_version", "model" => model.clone());
    let mut tpl = TopicPartitionList::new();
    if let Err(e) = tpl.add_partition_offset(&topic, 0, Offset::Offset(start)) {
        tracing::error!(error = %e, %topic, "cannot follow the learner's weights");
        return;
    }
    if let Err(e) = consumer.assign(&tpl) {
        tracing::error!(error = %e, %topic, "cannot follow the learner's weights");
        return;
    }
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await;
        let Some(slot) = weights.upgrade() else {
            return;
        };
        let Ok(msg) = msg else { continue };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, %topic, "reading weights");
                continue;
            }
        };
        let Some(payload) = msg.payload() else {
            continue;
        };
        match serde_json::from_slice::<WeightsRecord>(payload) {
            Ok(r) if r.model == model => {
                let version = r.weights.version;
                *slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r.weights);
                served.set(version as f64);
                tracing::debug!(%model, version, "weights swapped");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, %topic, "a weights record that is not a snapshot"),
        }
    }
}
