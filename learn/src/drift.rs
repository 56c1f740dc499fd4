//! Page-Hinkley change detection (Page 1954; as River's `drift.PageHinkley`, step for step):
//! cumulative deviations from the running mean, with a forgetting factor, tested against a
//! threshold. The learner feeds it each judged answer's error (1 wrong, 0 right), so a rise in
//! the served error rate is reported as drift.

use serde::{Deserialize, Serialize};

/// Which way a change counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// The mean rising.
    Up,
    /// The mean falling.
    Down,
    /// Either.
    Both,
}

/// A Page-Hinkley detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageHinkley {
    min_instances: u64,
    delta: f64,
    threshold: f64,
    alpha: f64,
    direction: Direction,
    n: u64,
    mean: f64,
    sum_increase: f64,
    sum_decrease: f64,
    /// The least `sum_increase` seen; `None` before the first value (not +∞: JSON, the
    /// checkpoint's format, has no infinity, so a fresh detector's checkpoint would not load).
    min_increase: Option<f64>,
    max_decrease: f64,
    detected: bool,
}

impl Default for PageHinkley {
    /// River's defaults, watching for a rise.
    fn default() -> PageHinkley {
        PageHinkley::new(Direction::Up)
    }
}

impl PageHinkley {
    /// River's defaults: 30 values before testing, δ 0.005, threshold 50, α 1 − 10⁻⁴.
    pub fn new(direction: Direction) -> PageHinkley {
        PageHinkley::with(30, 0.005, 50.0, 1.0 - 0.0001, direction)
    }

    /// A detector with these settings.
    pub fn with(
        min_instances: u64,
        delta: f64,
        threshold: f64,
        alpha: f64,
        direction: Direction,
    ) -> PageHinkley {
        let mut d = PageHinkley {
            min_instances,
            delta,
            threshold,
            alpha,
            direction,
            n: 0,
            mean: 0.0,
            sum_increase: 0.0,
            sum_decrease: 0.0,
            min_increase: None,
            max_decrease: -1.0,
            detected: false,
        };
        d.reset();
        d
    }

    fn reset(&mut self) {
        self.n = 0;
        self.mean = 0.0;
        self.sum_increase = 0.0;
        self.sum_decrease = 0.0;
        self.min_increase = None;
        self.max_decrease = -1.0;
        self.detected = false;
    }

    /// Adds `x`; true when it completes a change (the detector then starts afresh).
    pub fn update(&mut self, x: f64) -> bool {
        if self.detected {
            self.reset();
        }
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        let dev = x - self.mean;
        self.sum_increase = self.alpha * self.sum_increase + dev - self.delta;
        self.sum_decrease = self.alpha * self.sum_decrease + dev + self.delta;
        let min_increase = self
            .min_increase
            .map_or(self.sum_increase, |m| m.min(self.sum_increase));
        self.min_increase = Some(min_increase);
        self.max_decrease = self.max_decrease.max(self.sum_decrease);
        if self.n >= self.min_instances {
            let up = self.sum_increase - min_increase > self.threshold;
            let down = self.max_decrease - self.sum_decrease > self.threshold;
            self.detected = match self.direction {
                Direction::Up => up,
                Direction::Down => down,
                Direction::Both => up || down,
            };
        }
        self.detected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_detector_survives_its_checkpoint() {
        // It used to hold +∞, written to JSON as null and refused on reading back.
        let fresh = PageHinkley::default();
        let text = serde_json::to_string(&fresh).unwrap_or_default();
        let back: Result<PageHinkley, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(fresh), "{text}");
    }

    #[test]
    fn a_steady_stream_is_quiet_and_a_rise_is_caught_soon_after() {
        let mut d = PageHinkley::new(Direction::Up);
        // A 10 % error rate, then 60 %: a deterministic pattern.
        let at = |t: usize, every: usize| if t.is_multiple_of(every) { 1.0 } else { 0.0 };
        for t in 0..2000 {
            assert!(!d.update(at(t, 10)), "false alarm at {t}");
        }
        let caught = (0..2000).find(|&t| d.update(if t % 5 < 3 { 1.0 } else { 0.0 }));
        let caught = caught.expect("the rise is detected");
        assert!(caught < 400, "caught after {caught}");
    }
}
