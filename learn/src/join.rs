//! Predictions joined with their feedback by request id, within a window, whichever comes
//! first (feedback can be read before its prediction when the two topics are read at different
//! speeds). A prediction whose window ends without feedback becomes a "no feedback" outcome; a
//! repeated feedback is a duplicate and late feedback (after its prediction's window ended) is
//! counted and dropped. Time is passed in, so the learner drives it by the wall clock and tests
//! by hand.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// A logged prediction: what the model saw and answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The request id (the answer's `id`).
    pub id: String,
    /// The inputs, one row.
    pub features: Vec<f64>,
    /// The answer: P(y = 1).
    pub probability: f64,
    /// Weights version it was answered with.
    pub weights_version: u64,
    /// When it was answered (ms since the epoch).
    pub time_ms: i64,
    /// A bandit's choice: the arm step (then `probability` is its propensity).
    #[serde(default)]
    pub arm: Option<String>,
    /// A learner's hashed categorical features.
    #[serde(default)]
    pub hashed: Vec<u32>,
}

/// Feedback on an earlier answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// The answer's request id.
    pub id: String,
    /// The true label, if known.
    pub truth: Option<f64>,
    /// A reward in [0, 1], if given.
    pub reward: Option<f64>,
    /// When it was sent (ms since the epoch).
    pub time_ms: i64,
}

/// What the join produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A prediction and its feedback.
    Joined(Prediction, Feedback),
    /// A prediction whose window ended without feedback.
    NoFeedback(Prediction),
}

/// Counts of what the join saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinCounts {
    /// Predictions read.
    pub predictions: u64,
    /// Feedback read (duplicates included).
    pub feedback: u64,
    /// Predictions joined with feedback.
    pub joined: u64,
    /// Predictions whose window ended without feedback.
    pub no_feedback: u64,
    /// Feedback repeated for an id already joined or waiting.
    pub duplicate: u64,
    /// Feedback after its prediction's window ended, or whose prediction never came.
    pub late: u64,
    /// Predictions and feedback resolved before their window ended because `max_pending`
    /// was reached.
    pub evicted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Waiting {
    Prediction(Prediction),
    Feedback(Feedback),
}

/// The join's state: what waits for its other half, and the ids resolved recently (so repeats
/// and late feedback are recognised).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    window_ms: i64,
    max_pending: usize,
    waiting: HashMap<String, Waiting>,
    /// Ids in arrival order with when their window ends (an id may appear after it left
    /// `waiting`; such entries are skipped).
    order: VecDeque<(i64, String)>,
    /// Ids resolved, until when they are remembered.
    resolved: HashMap<String, i64>,
    resolved_order: VecDeque<(i64, String)>,
    counts: JoinCounts,
}

impl Join {
    /// An empty join with a window of `window_ms` holding at most `max_pending` entries.
    pub fn new(window_ms: i64, max_pending: usize) -> Join {
        Join {
            window_ms,
            max_pending: max_pending.max(1),
            waiting: HashMap::new(),
            order: VecDeque::new(),
            resolved: HashMap::new(),
            resolved_order: VecDeque::new(),
            counts: JoinCounts::default(),
        }
    }

    /// What the join has seen.
    pub fn counts(&self) -> JoinCounts {
        self.counts
    }

    /// Entries waiting for their other half.
    pub fn pending(&self) -> usize {
        self.waiting.len()
    }

    /// A prediction read at `now`; its outcome if its feedback was already waiting.
    pub fn prediction(&mut self, p: Prediction, now: i64) -> Vec<Outcome> {
        self.counts.predictions += 1;
        if self.resolved.contains_key(&p.id) {
            // Logged twice (a redelivered record): the first one counted.
            return Vec::new();
        }
        match self.waiting.remove(&p.id) {
            Some(Waiting::Feedback(f)) => {
                self.resolve(&p.id, now);
                self.counts.joined += 1;
                vec![Outcome::Joined(p, f)]
            }
            Some(Waiting::Prediction(first)) => {
                self.waiting
                    .insert(first.id.clone(), Waiting::Prediction(first));
                Vec::new()
            }
            None => {
                let id = p.id.clone();
                self.waiting.insert(id.clone(), Waiting::Prediction(p));
                self.order.push_back((now + self.window_ms, id));
                self.evict(now)
            }
        }
    }

    /// Feedback read at `now`; its outcome if its prediction was waiting.
    pub fn feedback(&mut self, f: Feedback, now: i64) -> Vec<Outcome> {
        self.counts.feedback += 1;
        if let Some(&until) = self.resolved.get(&f.id) {
            // Joined already (a repeat) or resolved without feedback (late).
            if until == i64::MIN {
                self.counts.late += 1;
            } else {
                self.counts.duplicate += 1;
            }
            return Vec::new();
        }
        match self.waiting.remove(&f.id) {
            Some(Waiting::Prediction(p)) => {
                self.resolve(&f.id, now);
                self.counts.joined += 1;
                vec![Outcome::Joined(p, f)]
            }
            Some(Waiting::Feedback(first)) => {
                self.counts.duplicate += 1;
                self.waiting
                    .insert(first.id.clone(), Waiting::Feedback(first));
                Vec::new()
            }
            None => {
                let id = f.id.clone();
                self.waiting.insert(id.clone(), Waiting::Feedback(f));
                self.order.push_back((now + self.window_ms, id));
                self.evict(now)
            }
        }
    }

    /// Resolves everything whose window ended by `now`: predictions become no-feedback
    /// outcomes, feedback whose prediction never came is counted late. Forgets resolved ids
    /// once a second window has passed.
    pub fn expire(&mut self, now: i64) -> Vec<Outcome> {
        let mut out = Vec::new();
        while self.order.front().is_some_and(|(end, _)| *end <= now) {
            if let Some((_, id)) = self.order.pop_front() {
                out.extend(self.close(&id, now));
            }
        }
        while self
            .resolved_order
            .front()
            .is_some_and(|(until, _)| *until <= now)
        {
            if let Some((_, id)) = self.resolved_order.pop_front() {
                self.resolved.remove(&id);
            }
        }
        out
    }

    /// Resolves the oldest entries while more than `max_pending` wait.
    fn evict(&mut self, now: i64) -> Vec<Outcome> {
        let mut out = Vec::new();
        while self.waiting.len() > self.max_pending {
            let Some((_, id)) = self.order.pop_front() else {
                break;
            };
            if self.waiting.contains_key(&id) {
                self.counts.evicted += 1;
            }
            out.extend(self.close(&id, now));
        }
        out
    }

    fn close(&mut self, id: &str, now: i64) -> Option<Outcome> {
        match self.waiting.remove(id)? {
            Waiting::Prediction(p) => {
                self.counts.no_feedback += 1;
                self.remember(id, now, i64::MIN);
                Some(Outcome::NoFeedback(p))
            }
            Waiting::Feedback(_) => {
                self.counts.late += 1;
                self.remember(id, now, i64::MIN + 1);
                None
            }
        }
    }

    fn resolve(&mut self, id: &str, now: i64) {
        self.remember(id, now, now);
    }

    /// Remembers `id` as resolved for another window; `tag` tells joined (a time) from
    /// resolved without feedback (`i64::MIN`).
    fn remember(&mut self, id: &str, now: i64, tag: i64) {
        self.resolved.insert(id.to_string(), tag);
        self.resolved_order
            .push_back((now + self.window_ms, id.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str) -> Prediction {
        Prediction {
            id: id.into(),
            features: vec![1.0],
            probability: 0.5,
            weights_version: 0,
            time_ms: 0,
            arm: None,
            hashed: Vec::new(),
        }
    }

    fn f(id: &str) -> Feedback {
        Feedback {
            id: id.into(),
            truth: Some(1.0),
            reward: None,
            time_ms: 0,
        }
    }

    #[test]
    fn joins_in_either_order_and_counts_repeats_once() {
        let mut j = Join::new(1000, 100);
        assert!(j.prediction(p("a"), 0).is_empty());
        assert_eq!(
            j.feedback(f("a"), 10),
            vec![Outcome::Joined(p("a"), f("a"))]
        );
        assert!(j.feedback(f("b"), 20).is_empty());
        assert_eq!(
            j.prediction(p("b"), 30),
            vec![Outcome::Joined(p("b"), f("b"))]
        );
        assert!(j.feedback(f("a"), 40).is_empty());
        assert!(j.feedback(f("b"), 40).is_empty());
        assert!(j.prediction(p("a"), 50).is_empty());
        let c = j.counts();
        assert_eq!(
            (c.joined, c.duplicate, c.feedback, c.predictions),
            (2, 2, 4, 3)
        );
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn a_window_without_feedback_resolves_by_the_clock_and_late_feedback_is_dropped() {
        let mut j = Join::new(1000, 100);
        j.prediction(p("a"), 0);
        j.feedback(f("orphan"), 0);
        assert!(j.expire(999).is_empty());
        assert_eq!(j.expire(1000), vec![Outcome::NoFeedback(p("a"))]);
        assert!(j.feedback(f("a"), 1500).is_empty());
        let c = j.counts();
        assert_eq!((c.no_feedback, c.late, c.joined), (1, 2, 0));
        // Forgotten after a second window: state stays bounded.
        j.expire(2001);
        assert_eq!(j.pending(), 0);
        assert!(j.resolved.is_empty() && j.resolved_order.is_empty());
    }

    #[test]
    fn max_pending_bounds_the_state() {
        let mut j = Join::new(1_000_000, 2);
        j.prediction(p("a"), 0);
        j.prediction(p("b"), 1);
        assert_eq!(j.prediction(p("c"), 2), vec![Outcome::NoFeedback(p("a"))]);
        assert_eq!(j.pending(), 2);
        assert_eq!(j.counts().evicted, 1);
    }
}
