//! Work-arounds for tansu 0.6.0, on only with `kafka.broker_quirks = "tansu"` (a correct Kafka
//! broker needs none). tansu sometimes leaves records out of a fetch, or unseen until the next
//! append, when several producers write one partition:
//! - the gap guard: an offset past the next expected one means records were skipped, so the
//!   worker seeks back instead of committing past them;
//! - stalled partitions: one silent for `worker.stalled_partition_after` although its high
//!   watermark is past what arrived is read again (a partition that stays silent is checked
//!   less and less often, up to every 8 × that, so an idle worker costs the broker little);
//! - join nudges: a join whose parts are `worker.join_nudge_after` overdue writes an empty record
//!   to its partition, which makes tansu show what it held back.

use std::sync::Arc;

use rdkafka::consumer::Consumer;
use std::time::{Duration, Instant};

use crate::group::{Completer, PartitionKey, PartitionState, lock};
use crate::join::Joiner;
use crate::offsets::Observed;
use crate::tasks::BoundedTasks;

/// The tansu work-arounds' settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TansuQuirks {
    pub(crate) stalled_after: Duration,
    pub(crate) nudge_after: Duration,
    pub(crate) rejoin_stuck_after: Duration,
}

/// What the consumer loop does with a record, by the gap guard.
pub(crate) enum Arrival {
    /// The next record: handle it.
    Next,
    /// Already seen, or a gap accepted after a while: skip it.
    Skip,
    /// Records before it were skipped: seek back to `expected`.
    SeekBack(i64),
}

impl TansuQuirks {
    /// How often the periodic checks run.
    pub(crate) fn check_interval(&self) -> Duration {
        (self.stalled_after.min(self.nudge_after) / 2).max(Duration::from_millis(10))
    }

    /// Checks a record's offset against what its partition delivered so far.
    pub(crate) fn arrival(&self, completer: &Completer, key: PartitionKey, offset: i64) -> Arrival {
        match lock(&completer.state.gaps).observe(key, offset, Instant::now()) {
            Observed::Next => Arrival::Next,
            Observed::Seen | Observed::Gap { seek: false, .. } => Arrival::Skip,
            Observed::Gap {
                expected,
                seek: true,
            } => {
                completer.metrics.fetch_gaps.increment(1);
                Arrival::SeekBack(expected)
            }
        }
    }

    /// Nudges the partitions of a join's overdue requests, off the consumer loop.
    pub(crate) async fn nudge(
        &self,
        completer: &Arc<Completer>,
        joiner: &mut Joiner,
        side: &mut BoundedTasks,
    ) {
        for (t, p) in joiner.overdue(self.nudge_after) {
            completer.metrics.join_nudges.increment(1);
            let (c, topic) = (Arc::clone(completer), completer.topics[t].clone());
            side.spawn(async move { c.sink.nudge(&topic, p).await })
                .await;
        }
    }

    /// Re-reads stalled partitions, off the consumer loop (a slow broker answer must not hold
    /// up consumption). `by_topic` is the completer of the lane serving each topic.
    pub(crate) async fn reread_stalled(
        &self,
        state: &PartitionState,
        paused: impl Fn(&PartitionKey) -> bool,
        by_topic: Vec<Arc<Completer>>,
        side: &mut BoundedTasks,
    ) {
        let mut idle = lock(&state.gaps).idle(Instant::now(), self.stalled_after);
        idle.retain(|(k, _)| !paused(k));
        if !idle.is_empty() {
            side.spawn(async move { reread_stalled_partitions(&by_topic, idle).await })
                .await;
        }
    }
}

/// Seeks back on partitions that delivered nothing for a while although the broker's high
/// watermark is past what arrived: a record skipped at the end of a partition shows no gap until
/// something follows it.
async fn reread_stalled_partitions(by_topic: &[Arc<Completer>], idle: Vec<(PartitionKey, i64)>) {
    for ((t, p), expected) in idle {
        let Some(c) = by_topic.get(t) else {
            continue;
        };
        let (query, topic) = (Arc::clone(c), c.topics[t].clone());
        let hi = tokio::task::spawn_blocking(move || {
            query
                .consumer
                .fetch_watermarks(&topic, p, Duration::from_millis(500))
                .map(|(_, hi)| hi)
        })
        .await;
        if hi.is_ok_and(|hi| hi.is_ok_and(|hi| hi > expected)) {
            let topic = &c.topics[t];
            c.metrics.fetch_gaps.increment(1);
            tracing::warn!(%topic, partition = p, expected, "records below the high watermark never arrived; re-reading");
            c.seek(topic, p, expected);
        }
    }
}

/// How long the rejoin helper stays in the group: long enough to join (tansu holds a
/// follower's JoinGroup 3 s) while the stuck member retries.
const HELPER_STAYS: Duration = Duration::from_secs(8);

/// Whether the worker's group membership has been unsettled longer than `after`.
pub(crate) fn membership_stuck(state: &PartitionState, after: Duration) -> bool {
    lock(&state.unsettled_since).is_some_and(|since| since.elapsed() > after)
}

/// Joins the worker's group with a second, short-lived member and leaves again. tansu 0.6.0 can
/// keep a member whose session expired as the group's leader although it is no longer a member
/// (after the broker was frozen longer than the session timeout, say): every SyncGroup of the
/// real member is then refused. A concurrent member's requests make tansu reload the group and
/// drop that leader. The helper never commits, so records it may be handed meanwhile are read
/// again by the worker (at-least-once holds).
pub(crate) fn spawn_rejoin_helper(config: rdkafka::ClientConfig, topics: Vec<String>) {
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::BaseConsumer;
        let mut config = config;
        config.set("enable.auto.commit", "false");
        let helper: BaseConsumer = match config.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "rejoin helper not created");
                return;
            }
        };
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = helper.subscribe(&refs) {
            tracing::warn!(error = %e, "rejoin helper could not subscribe");
            return;
        }
        let end = Instant::now() + HELPER_STAYS;
        while Instant::now() < end {
            // Records handed to the helper are dropped unprocessed and uncommitted.
            let _ = helper.poll(Duration::from_millis(100));
        }
        helper.unsubscribe();
        tracing::info!("rejoin helper left the group");
    });
}
