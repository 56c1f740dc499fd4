//! The prediction log a learning step writes (`<prefix>.<servable>.predictions`): one record
//! per answer or choice, keyed by request id, acknowledged by the broker before the answer is
//! released, so every answered request can be learned from.

use std::sync::OnceLock;
use std::time::Duration;

use sluice_common::Deployment;
use sluice_common::producer::{AsyncProducer, FutureRecord};
use sluice_schemas::learning::{PredictionRecord, encode_prediction};

use super::seam::{BuildError, StepFailure};

/// A servable's prediction log.
pub(super) struct PredictionLog {
    producer: AsyncProducer,
    topic: String,
}

/// The one producer every prediction log of a process writes with (each idle librdkafka
/// producer costs a polling thread's wake-ups; a worker serving five learning steps paid five).
static PRODUCER: OnceLock<AsyncProducer> = OnceLock::new();

impl PredictionLog {
    /// The log of servable `name`.
    pub(super) fn new(name: &str, deployment: &Deployment) -> Result<PredictionLog, BuildError> {
        let producer = match PRODUCER.get() {
            Some(p) => p.clone(),
            None => {
                let created: AsyncProducer = sluice_common::kafka::producer(
                    &deployment.config,
                    &format!("sluice-predictions-{}", std::process::id()),
                    Duration::from_micros(300),
                )
                .map_err(|e| BuildError::Settings(format!("prediction log producer: {e}")))?;
                PRODUCER.get_or_init(|| created).clone()
            }
        };
        Ok(PredictionLog {
            producer,
            topic: deployment.topics.predictions(name),
        })
    }

    /// Writes each record (`None`: nothing to log for that job) and waits up to `wait` for the
    /// broker; per record, whether it was written.
    pub(super) async fn write(
        &self,
        records: &[Option<PredictionRecord>],
        wait: Duration,
    ) -> Vec<Result<(), StepFailure>> {
        let sends = records.iter().map(|r| async move {
            let Some(record) = r else { return Ok(()) };
            let bytes = encode_prediction(record)
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
        futures::future::join_all(sends).await
    }
}
