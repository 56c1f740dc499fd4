//! Purging consumed records (`kafka.purge_consumed`). Every topic a worker consumes is a request,
//! graph-entry or step topic that nobody reads again once its group has committed past a record,
//! so each worker deletes, every `kafka.purge_interval`, the records below its group's committed
//! offset on the partitions it owns (one owner per partition: no two workers purge one partition).
//! This is what Kafka Streams does for its repartition topics. Results, comparisons and dead
//! letters are never consumed by workers, so never purged.
//!
//! A broker that refuses `DeleteRecords` (not supported, or not authorized) is logged once and
//! left alone: the topics' own retention bounds them then. Any other failure is tried again at
//! the next interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use sluice_common::Config;

use crate::transport::group::GroupContext;

/// How long one purge request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Purges this worker's partitions every `kafka.purge_interval` until aborted.
pub(crate) async fn run(consumer: Arc<StreamConsumer<GroupContext>>, cfg: Config) {
    let admin: AdminClient<DefaultClientContext> = match sluice_common::kafka::admin_config(&cfg)
        .create()
    {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create an admin client; consumed records are not purged");
            return;
        }
    };
    let mut purged: HashMap<(String, i32), i64> = HashMap::new();
    let mut every = tokio::time::interval(cfg.kafka.purge_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let c = Arc::clone(&consumer);
        let committed =
            tokio::task::spawn_blocking(move || c.committed(Duration::from_secs(5))).await;
        let Ok(Ok(committed)) = committed else {
            tracing::debug!("committed offsets unavailable; purging later");
            continue;
        };
        let due = purgeable(&committed, &purged);
        if due.count() == 0 {
            continue;
        }
        let opts = AdminOptions::new()
            .operation_timeout(Some(REQUEST_TIMEOUT))
            .request_timeout(Some(REQUEST_TIMEOUT));
        // librdkafka retries a request whose connection dropped; bound the whole call.
        let answer = tokio::time::timeout(REQUEST_TIMEOUT * 2, admin.delete_records(&due, &opts))
            .await
            .unwrap_or(Err(KafkaError::AdminOp(RDKafkaErrorCode::RequestTimedOut)));
        // A request answered with an error for every partition failed as a whole.
        let answer = answer.and_then(|result| {
            let errors: Vec<KafkaError> = result
                .elements()
                .iter()
                .filter_map(|e| e.error().err())
                .collect();
            match errors.into_iter().next() {
                Some(e) if result.elements().iter().all(|p| p.error().is_err()) => Err(e),
                _ => Ok(result),
            }
        });
        match answer {
            Ok(result) => {
                for e in result.elements() {
                    match e.error() {
                        Ok(()) => {
                            if let Some(Offset::Offset(o)) = due
                                .find_partition(e.topic(), e.partition())
                                .map(|p| p.offset())
                            {
                                purged.insert((e.topic().to_string(), e.partition()), o);
                            }
                        }
                        Err(err) => {
                            tracing::debug!(topic = e.topic(), partition = e.partition(), error = %err, "purge failed; trying again later");
                        }
                    }
                }
                tracing::debug!(partitions = due.count(), "purged consumed records");
            }
            Err(e) if unsupported(&e) => {
                tracing::warn!(error = %e, "the broker cannot delete records; consumed records stay until retention removes them");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "purging consumed records failed; trying again later");
            }
        }
    }
}

/// The committed offsets that moved past what was last purged: delete below each.
fn purgeable(
    committed: &TopicPartitionList,
    purged: &HashMap<(String, i32), i64>,
) -> TopicPartitionList {
    let mut due = TopicPartitionList::new();
    for e in committed.elements() {
        let Offset::Offset(o) = e.offset() else {
            continue;
        };
        let before = purged
            .get(&(e.topic().to_string(), e.partition()))
            .copied()
            .unwrap_or(0);
        if o > before {
            let _ = due.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
        }
    }
    due
}

/// Whether `e` says the broker does not do `DeleteRecords` at all, or not for this worker.
fn unsupported(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnsupportedVersion
                | RDKafkaErrorCode::InvalidRequest
                | RDKafkaErrorCode::UnsupportedFeature
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_partitions_committed_past_the_last_purge_are_due() {
        let mut committed = TopicPartitionList::new();
        committed
            .add_partition_offset("t", 0, Offset::Offset(10))
            .unwrap();
        committed
            .add_partition_offset("t", 1, Offset::Offset(5))
            .unwrap();
        committed
            .add_partition_offset("t", 2, Offset::Invalid)
            .unwrap();
        committed
            .add_partition_offset("u", 0, Offset::Offset(0))
            .unwrap();
        let purged = HashMap::from([(("t".to_string(), 1), 5)]);
        let due = purgeable(&committed, &purged);
        let got: Vec<(String, i32, Offset)> = due
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
            .collect();
        assert_eq!(got, [("t".to_string(), 0, Offset::Offset(10))]);
    }
}
