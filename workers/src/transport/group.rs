//! The worker's consumer-group membership and offsets: partitions assigned and revoked, which
//! offsets are safe to store (only once every record up to them has been delivered), and the
//! final commit when the worker leaves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::pipeline::completion::Completion;
use crate::telemetry::WorkerMetrics;
use crate::transport::offsets::OffsetTracker;
use crate::transport::sink::Sink;

/// A partition of one of the worker's topics: (topic index, partition).
pub(crate) type PartitionKey = (usize, i32);

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is a single update: a panic cannot leave the state half-changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-partition state the consumer loop, the rebalance callback and delivery share.
#[derive(Default)]
pub(crate) struct PartitionState {
    /// Unfinished offsets.
    pub(crate) tracker: Mutex<OffsetTracker<PartitionKey>>,
    /// Offsets stored for commit.
    pub(crate) stored: Mutex<HashMap<PartitionKey, i64>>,
    /// Partitions revoked since the loop last looked.
    pub(crate) revoked: Mutex<Vec<PartitionKey>>,
    /// Whether the worker has been assigned partitions (readiness).
    pub(crate) joined: Arc<AtomicBool>,
}

/// Keeps the partition state in step with assignment and marks the worker ready.
pub(crate) struct GroupContext {
    pub(crate) topics: Arc<Vec<String>>,
    pub(crate) state: Arc<PartitionState>,
    /// Partitions owned now (`sluice_worker_assigned_partitions`).
    pub(crate) assigned: std::sync::atomic::AtomicI64,
    pub(crate) assigned_gauge: metrics::Gauge,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (kind, tpl) = match rebalance {
            Rebalance::Assign(tpl) => ("assigned", *tpl),
            Rebalance::Revoke(tpl) => ("revoked", *tpl),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        let keys: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                let t = self.topics.iter().position(|t| t == e.topic())?;
                Some((t, e.partition()))
            })
            .collect();
        {
            let mut tracker = lock(&self.state.tracker);
            let mut stored = lock(&self.state.stored);
            for k in &keys {
                tracker.forget(*k);
                stored.remove(k);
            }
        }
        let shown: Vec<(&str, i32)> = keys
            .iter()
            .map(|(t, p)| (self.topics[*t].as_str(), *p))
            .collect();
        tracing::info!(partitions = ?shown, "partitions {kind}");
        let n = i64::try_from(keys.len()).unwrap_or(0);
        let owned = if kind == "assigned" {
            self.assigned.fetch_add(n, Ordering::Relaxed) + n
        } else {
            self.assigned.fetch_sub(n, Ordering::Relaxed) - n
        };
        self.assigned_gauge.set(owned as f64);
        if kind == "assigned" {
            self.state.joined.store(true, Ordering::Relaxed);
        } else {
            lock(&self.state.revoked).extend(keys.iter().copied());
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                tracing::trace!(?offsets, "offsets committed");
                crate::fail_point::pass("after_commit");
            }
            Err(e) => tracing::debug!(error = %e, "offset commit failed"),
        }
    }
}

/// Delivers completions and stores the offsets that became committable.
pub(crate) struct Completer {
    /// The worker's one consumer, shared by its lanes.
    pub(crate) consumer: Arc<StreamConsumer<GroupContext>>,
    pub(crate) topics: Arc<Vec<String>>,
    pub(crate) state: Arc<PartitionState>,
    pub(crate) sink: Sink,
    pub(crate) metrics: Arc<WorkerMetrics>,
}

impl Completer {
    /// Delivers `items`, then stores the offsets that became committable.
    pub(crate) async fn complete(&self, items: Vec<Completion>) {
        if items.is_empty() {
            return;
        }
        // Fail points count deliveries that produce a result (not bare records such as wake-ups).
        let produces = items.iter().any(|c| c.result.is_some());
        if produces {
            crate::fail_point::serving();
            crate::fail_point::pass("before_produce");
        }
        self.sink.deliver(&items).await;
        if produces {
            crate::fail_point::pass("after_produce");
        }
        let advanced = self.finished(&items);
        // Hops run in process add completions of the same record: count each record once.
        let records: std::collections::HashSet<_> = items.iter().map(|c| c.source).collect();
        self.metrics.in_flight.decrement(records.len() as f64);
        if advanced.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), next) in &advanced {
            if let Err(e) = tpl.add_partition_offset(&self.topics[*t], *p, Offset::Offset(*next)) {
                tracing::warn!(error = %e, "bad offset");
            }
        }
        match self.consumer.store_offsets(&tpl) {
            Ok(()) => {
                let mut stored = lock(&self.state.stored);
                for (k, next) in advanced {
                    let e = stored.entry(k).or_insert(next);
                    *e = (*e).max(next);
                }
            }
            // The partition was revoked meanwhile: its new owner re-reads from the last commit.
            Err(e) => tracing::debug!(error = %e, "could not store offsets"),
        }
    }

    /// Marks the items' records finished; returns each partition whose commit point moved.
    fn finished(&self, items: &[Completion]) -> Vec<(PartitionKey, i64)> {
        let mut tracker = lock(&self.state.tracker);
        items
            .iter()
            .filter_map(|c| {
                let key = (c.source.topic_index, c.source.partition);
                tracker.finish(key, c.source.offset).map(|next| (key, next))
            })
            .collect()
    }

    /// Commits what was stored for the partitions this worker still owns, and leaves the group.
    pub(crate) fn commit_and_leave(&self) {
        let owned: Vec<(String, i32)> = self
            .consumer
            .assignment()
            .map(|a| {
                a.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for ((t, p), next) in lock(&self.state.stored).iter() {
            let topic = &self.topics[*t];
            if owned.iter().any(|(ot, op)| ot == topic && op == p) {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*next));
            }
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "final commit failed");
        }
        self.consumer.unsubscribe();
    }
}
