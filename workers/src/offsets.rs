//! Which offsets are safe to commit when records of one partition finish out of order.
//!
//! A record's offset may be committed only when it and every earlier record of its partition have
//! been fully handled (result produced and acknowledged, reply written). The commit point of a
//! partition is therefore its lowest unfinished offset, or one past the highest seen when none is
//! unfinished.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct PartitionState {
    unfinished: BTreeSet<i64>,
    next: i64,
    stored: i64,
}

/// Per-partition tracking of unfinished offsets. `K` names a partition: a partition number, or
/// (topic, partition) for a consumer of several topics.
#[derive(Debug)]
pub struct OffsetTracker<K = i32> {
    partitions: HashMap<K, PartitionState>,
}

impl<K> Default for OffsetTracker<K> {
    fn default() -> Self {
        OffsetTracker {
            partitions: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Copy> OffsetTracker<K> {
    /// Records that `offset` of `partition` was received and is being handled.
    pub fn begin(&mut self, partition: K, offset: i64) {
        // The first offset seen is where consumption (re)started: nothing below it is ours to commit.
        let p = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionState {
                stored: offset,
                ..Default::default()
            });
        p.unfinished.insert(offset);
        p.next = p.next.max(offset + 1);
    }

    /// Records that `offset` is fully handled. Returns the partition's new commit point (the next
    /// offset to consume) when it moved forward.
    pub fn finish(&mut self, partition: K, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&partition)?;
        if !p.unfinished.remove(&offset) {
            return None;
        }
        let commit = p.unfinished.first().copied().unwrap_or(p.next);
        if commit > p.stored {
            p.stored = commit;
            Some(commit)
        } else {
            None
        }
    }

    /// Forgets a partition (revoked, or newly assigned and about to be re-read).
    pub fn forget(&mut self, partition: K) {
        self.partitions.remove(&partition);
    }

    /// Records received and not yet finished, over all partitions.
    pub fn unfinished(&self) -> usize {
        self.partitions.values().map(|p| p.unfinished.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completion_advances_each_time() {
        let mut t = OffsetTracker::default();
        t.begin(0, 10);
        t.begin(0, 11);
        assert_eq!(t.finish(0, 10), Some(11));
        assert_eq!(t.finish(0, 11), Some(12));
        assert_eq!(t.unfinished(), 0);
    }

    #[test]
    fn out_of_order_completion_waits_for_the_lowest() {
        let mut t = OffsetTracker::default();
        for o in 5..9 {
            t.begin(0, o);
        }
        assert_eq!(t.finish(0, 7), None, "5 and 6 still unfinished");
        assert_eq!(t.finish(0, 6), None);
        assert_eq!(
            t.finish(0, 5),
            Some(8),
            "jumps past 6 and 7, stops at unfinished 8"
        );
        assert_eq!(t.finish(0, 8), Some(9));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.begin(0, 1);
        t.begin(1, 100);
        assert_eq!(t.finish(1, 100), Some(101));
        assert_eq!(t.unfinished(), 1);
        assert_eq!(t.finish(0, 1), Some(2));
    }

    #[test]
    fn unknown_or_repeated_finishes_are_ignored() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.finish(3, 1), None);
        t.begin(0, 1);
        assert_eq!(t.finish(0, 1), Some(2));
        assert_eq!(t.finish(0, 1), None);
        t.forget(0);
        assert_eq!(t.finish(0, 1), None);
    }
}

/// What [`GapGuard::observe`] says about a consumed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The next record of its partition: process it.
    Next,
    /// Records before it never arrived: skip it; when `seek` is set, seek back to `expected`
    /// (re-reading from there; seeks are spaced out while one is under way).
    Gap {
        /// The first offset not seen.
        expected: i64,
        /// Whether to issue a seek now.
        seek: bool,
    },
    /// Already seen (re-read after a seek): skip it.
    Seen,
}

#[derive(Debug)]
struct Expect {
    next: i64,
    /// When the partition last delivered a record (or was last sought back).
    last_seen: Instant,
    /// When the current gap was first seen, and when we last sought back for it.
    gap_since: Option<(Instant, Instant)>,
    /// Idle checks reported since the last record: each doubles the wait for the next.
    idle_checks: u32,
}

/// Catches offsets a fetch skipped. Offsets of a non-compacted, non-transactional topic are
/// contiguous, so a record past the next expected offset means the broker left records out of a
/// fetch (tansu 0.6.0 does, now and then, when several producers write to one partition at once).
/// Processing it would commit past the missing records and lose them; instead the consumer seeks
/// back and reads them again. A gap that re-reading does not fill for `accept_after` is real
/// (e.g. a compacted topic) and is passed.
#[derive(Debug)]
pub struct GapGuard<K> {
    expected: HashMap<K, Expect>,
    accept_after: Duration,
    seek_every: Duration,
}

impl<K> Default for GapGuard<K> {
    fn default() -> Self {
        GapGuard {
            expected: HashMap::new(),
            accept_after: Duration::from_secs(10),
            seek_every: Duration::from_millis(100),
        }
    }
}

impl<K: Hash + Eq + Copy> GapGuard<K> {
    /// Checks `offset` of `partition` against the next expected one, at time `now`.
    pub fn observe(&mut self, partition: K, offset: i64, now: Instant) -> Observed {
        let Some(e) = self.expected.get_mut(&partition) else {
            // The first record since assignment: where consumption (re)starts.
            self.expected.insert(
                partition,
                Expect {
                    next: offset + 1,
                    last_seen: now,
                    gap_since: None,
                    idle_checks: 0,
                },
            );
            return Observed::Next;
        };
        e.last_seen = now;
        e.idle_checks = 0;
        if offset < e.next {
            return Observed::Seen;
        }
        if offset > e.next {
            match &mut e.gap_since {
                None => {
                    e.gap_since = Some((now, now));
                    return Observed::Gap {
                        expected: e.next,
                        seek: true,
                    };
                }
                Some((since, last)) if now.duration_since(*since) < self.accept_after => {
                    let seek = now.duration_since(*last) >= self.seek_every;
                    if seek {
                        *last = now;
                    }
                    return Observed::Gap {
                        expected: e.next,
                        seek,
                    };
                }
                // Re-reading did not fill it: a real gap.
                Some(_) => {}
            }
        }
        e.next = offset + 1;
        e.gap_since = None;
        Observed::Next
    }

    /// Forgets a partition (revoked or reassigned).
    pub fn forget(&mut self, partition: K) {
        self.expected.remove(&partition);
    }

    /// Partitions that delivered nothing for `idle`, with the next offset each expects. A skipped
    /// record at the end of a partition shows no gap until something follows it; the caller
    /// compares these with the partition's high watermark and seeks back when it is past them.
    /// A partition that stays silent is reported after `idle`, then 2×, 4× and at most 8× that
    /// since the last report, so an idle worker does not keep asking the broker.
    pub fn idle(&mut self, now: Instant, idle: Duration) -> Vec<(K, i64)> {
        self.expected
            .iter_mut()
            .filter(|(_, e)| now.duration_since(e.last_seen) >= idle * (1 << e.idle_checks.min(3)))
            .map(|(k, e)| {
                e.last_seen = now;
                e.idle_checks = e.idle_checks.saturating_add(1);
                (*k, e.next)
            })
            .collect()
    }
}

#[cfg(test)]
mod gap_tests {
    use super::*;

    #[test]
    fn a_skipped_offset_is_re_read_and_repeats_are_dropped() {
        let mut g = GapGuard::default();
        let t = Instant::now();
        assert_eq!(g.observe(0, 10, t), Observed::Next);
        assert_eq!(g.observe(0, 11, t), Observed::Next);
        // 12 skipped by the fetch: 13 and 14 wait for a re-read from 12; one seek at a time.
        assert_eq!(
            g.observe(0, 13, t),
            Observed::Gap {
                expected: 12,
                seek: true
            }
        );
        assert_eq!(
            g.observe(0, 14, t),
            Observed::Gap {
                expected: 12,
                seek: false
            }
        );
        let later = t + Duration::from_millis(150);
        assert_eq!(
            g.observe(0, 13, later),
            Observed::Gap {
                expected: 12,
                seek: true
            }
        );
        assert_eq!(g.observe(0, 12, later), Observed::Next);
        assert_eq!(g.observe(0, 13, later), Observed::Next);
        assert_eq!(g.observe(0, 13, later), Observed::Seen);
        assert_eq!(
            g.observe(1, 99, t),
            Observed::Next,
            "partitions are separate"
        );
    }

    #[test]
    fn idle_partitions_are_reported_once_per_idle_period() {
        let mut g = GapGuard::default();
        let t = Instant::now();
        g.observe(0, 7, t);
        g.observe(1, 3, t + Duration::from_millis(400));
        let idle = Duration::from_millis(500);
        assert_eq!(g.idle(t + Duration::from_millis(600), idle), [(0, 8)]);
        assert!(g.idle(t + Duration::from_millis(700), idle).is_empty());
        // Still silent: partition 0's next report waits twice as long (1 s); partition 1 has
        // not been reported yet, so its first comes after 500 ms.
        assert_eq!(g.idle(t + Duration::from_millis(1500), idle), [(1, 4)]);
        assert_eq!(g.idle(t + Duration::from_millis(1600), idle), [(0, 8)]);
        // A record resets the wait to `idle`; partition 1 now waits 1 s.
        g.observe(0, 8, t + Duration::from_millis(1600));
        assert_eq!(g.idle(t + Duration::from_millis(2100), idle), [(0, 9)]);
        assert_eq!(g.idle(t + Duration::from_millis(2500), idle), [(1, 4)]);
    }

    #[test]
    fn a_gap_that_stays_is_accepted_after_a_while() {
        let mut g = GapGuard::default();
        let t = Instant::now();
        g.observe(0, 1, t);
        assert!(matches!(
            g.observe(0, 5, t),
            Observed::Gap { expected: 2, .. }
        ));
        assert!(matches!(
            g.observe(0, 5, t + Duration::from_secs(5)),
            Observed::Gap { .. }
        ));
        assert_eq!(g.observe(0, 5, t + Duration::from_secs(11)), Observed::Next);
        assert_eq!(g.observe(0, 6, t + Duration::from_secs(11)), Observed::Next);
    }
}
