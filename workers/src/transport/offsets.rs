//! Which offsets are safe to commit when records of one partition finish out of order.
//!
//! A record's offset may be committed only when it and every earlier record of its partition have
//! been fully handled (result produced and acknowledged, reply written). The commit point of a
//! partition is therefore its lowest unfinished offset, or one past the highest seen when none is
//! unfinished.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

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
