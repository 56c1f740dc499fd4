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
use crate::pipeline::job::Source;
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

impl PartitionState {
    /// A record of partition `key` at `offset` arrived and is being handled.
    pub(crate) fn begin(&self, key: PartitionKey, offset: i64) {
        lock(&self.tracker).begin(key, offset);
    }

    /// Marks the records at `sources` finished (a record finished twice, as hops in process
    /// may, counts once); returns each partition whose commit point moved, and where to.
    pub(crate) fn finish(
        &self,
        sources: impl IntoIterator<Item = Source>,
    ) -> Vec<(PartitionKey, i64)> {
        let mut tracker = lock(&self.tracker);
        sources
            .into_iter()
            .filter_map(|s| {
                let key = (s.topic_index, s.partition);
                tracker.finish(key, s.offset).map(|next| (key, next))
            })
            .collect()
    }

    /// Records offsets handed to the consumer for commit (never moving one back).
    pub(crate) fn stored(&self, advanced: &[(PartitionKey, i64)]) {
        let mut stored = lock(&self.stored);
        for &(k, next) in advanced {
            let e = stored.entry(k).or_insert(next);
            *e = (*e).max(next);
        }
    }

    /// Partitions that changed hands: what was tracked and stored for them is forgotten (their
    /// new owner re-reads from the last commit); revoked ones are queued for the loop, whose
    /// joins drop their parts.
    pub(crate) fn rebalanced(&self, keys: &[PartitionKey], assigned: bool) {
        {
            let mut tracker = lock(&self.tracker);
            let mut stored = lock(&self.stored);
            for k in keys {
                tracker.forget(*k);
                stored.remove(k);
            }
        }
        if assigned {
            self.joined.store(true, Ordering::Relaxed);
        } else {
            lock(&self.revoked).extend(keys.iter().copied());
        }
    }

    /// What the final commit writes: the stored offsets of the partitions still `owned`.
    pub(crate) fn final_commits(&self, owned: &[PartitionKey]) -> Vec<(PartitionKey, i64)> {
        let stored = lock(&self.stored);
        let mut commits: Vec<_> = stored
            .iter()
            .filter(|(k, _)| owned.contains(k))
            .map(|(k, next)| (*k, *next))
            .collect();
        commits.sort_unstable();
        commits
    }
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
        self.state.rebalanced(&keys, kind == "assigned");
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
        let advanced = self.state.finish(items.iter().map(|c| c.source));
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
            Ok(()) => self.state.stored(&advanced),
            // The partition was revoked meanwhile: its new owner re-reads from the last commit.
            Err(e) => tracing::debug!(error = %e, "could not store offsets"),
        }
    }

    /// Commits what was stored for the partitions this worker still owns, and leaves the group.
    pub(crate) fn commit_and_leave(&self) {
        let owned: Vec<PartitionKey> = self
            .consumer
            .assignment()
            .map(|a| {
                a.elements()
                    .iter()
                    .filter_map(|e| {
                        let t = self.topics.iter().position(|t| t == e.topic())?;
                        Some((t, e.partition()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for ((t, p), next) in self.state.final_commits(&owned) {
            let _ = tpl.add_partition_offset(&self.topics[t], p, Offset::Offset(next));
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "final commit failed");
        }
        self.consumer.unsubscribe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic_index: usize, partition: i32, offset: i64) -> Source {
        Source {
            topic_index,
            partition,
            offset,
        }
    }

    #[test]
    fn a_commit_point_moves_only_past_records_whose_predecessors_finished() {
        let state = PartitionState::default();
        for offset in 10..13 {
            state.begin((0, 0), offset);
        }
        state.begin((1, 0), 5);
        // 11 and 12 finish first: nothing below them is done, so nothing moves.
        assert_eq!(state.finish([at(0, 0, 12), at(0, 0, 11)]), []);
        // 10 finishes (twice: a hop run in process completes the same record again).
        assert_eq!(state.finish([at(0, 0, 10), at(0, 0, 10)]), [((0, 0), 13)]);
        assert_eq!(state.finish([at(1, 0, 5)]), [((1, 0), 6)]);
        state.stored(&[((0, 0), 13), ((1, 0), 6)]);
        state.stored(&[((0, 0), 11)]);
        assert_eq!(
            state.final_commits(&[(0, 0), (1, 0)]),
            [((0, 0), 13), ((1, 0), 6)],
            "a stored offset never moves back"
        );
    }

    #[test]
    fn a_revoked_partition_commits_nothing_more_and_its_joins_are_told() {
        let state = PartitionState::default();
        state.begin((0, 1), 40);
        state.begin((0, 2), 7);
        assert_eq!(state.finish([at(0, 2, 7)]), [((0, 2), 8)]);
        state.stored(&[((0, 2), 8)]);
        state.rebalanced(&[(0, 1), (0, 2)], false);
        // A record of a revoked partition finishing late stores nothing: its new owner
        // re-reads it from the last commit.
        assert_eq!(state.finish([at(0, 1, 40)]), []);
        assert_eq!(state.final_commits(&[(0, 1), (0, 2)]), []);
        assert_eq!(*lock(&state.revoked), [(0, 1), (0, 2)]);
        assert!(!state.joined.load(Ordering::Relaxed));
    }

    #[test]
    fn a_reassigned_partition_starts_over_at_the_first_offset_it_reads() {
        let state = PartitionState::default();
        state.rebalanced(&[(0, 0)], true);
        assert!(state.joined.load(Ordering::Relaxed), "assigned: ready");
        state.begin((0, 0), 100);
        state.begin((0, 0), 101);
        assert_eq!(state.finish([at(0, 0, 101)]), [], "100 is still running");
        assert_eq!(state.finish([at(0, 0, 100)]), [((0, 0), 102)]);
    }

    #[test]
    fn the_final_commit_covers_only_partitions_still_owned() {
        let state = PartitionState::default();
        state.stored(&[((0, 0), 3), ((0, 1), 9), ((2, 0), 4)]);
        assert_eq!(
            state.final_commits(&[(0, 1), (2, 0)]),
            [((0, 1), 9), ((2, 0), 4)]
        );
    }
}
