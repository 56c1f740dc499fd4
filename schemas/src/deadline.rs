//! When a request's caller stops waiting, as one type from the gateway to the last step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An instant on the wall clock after which nobody waits for a request's answer. Written on
/// the wire as `deadline_ms` (milliseconds since the Unix epoch, 0 meaning none); in code a
/// request without one holds `None`, never a zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    epoch_ms: i64,
}

impl Deadline {
    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 2);
        Deadline {
            epoch_ms: now_epoch_ms().saturating_add(ms),
        }
    }

    /// Reads the wire form: `None` for 0 (no deadline).
    pub fn from_wire(epoch_ms: i64) -> Option<Deadline> {
        (epoch_ms != 0).then_some(Deadline { epoch_ms })
    }

    /// The wire form of an optional deadline (0 for none).
    pub fn to_wire(deadline: Option<Deadline>) -> i64 {
        deadline.map_or(0, |d| d.epoch_ms)
    }

    /// Milliseconds since the Unix epoch.
    pub fn epoch_ms(self) -> i64 {
        self.epoch_ms
    }

    /// Time left (zero once passed).
    pub fn time_left(self) -> Duration {
        let left = self.epoch_ms.saturating_sub(now_epoch_ms());
        Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }

    /// Whether the deadline has passed.
    pub fn passed(self) -> bool {
        now_epoch_ms() >= self.epoch_ms
    }
}

/// Time left before an optional deadline: `Duration::MAX` without one.
pub fn time_left(deadline: Option<Deadline>) -> Duration {
    deadline.map_or(Duration::MAX, Deadline::time_left)
}

fn now_epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_on_the_wire_is_no_deadline_and_others_read_back() {
        assert_eq!(Deadline::from_wire(0), None);
        assert_eq!(Deadline::to_wire(None), 0);
        let d = Deadline::from_wire(1_700_000_000_123);
        assert_eq!(Deadline::to_wire(d), 1_700_000_000_123);
        assert!(d.is_some_and(Deadline::passed));
        assert_eq!(time_left(None), Duration::MAX);
        assert_eq!(time_left(d), Duration::ZERO);
    }

    #[test]
    fn a_deadline_ahead_has_time_left_up_to_its_timeout() {
        let d = Deadline::after(Duration::from_secs(30));
        assert!(!d.passed());
        let left = d.time_left();
        assert!(
            left <= Duration::from_secs(30) && left > Duration::from_secs(29),
            "{left:?}"
        );
    }
}
