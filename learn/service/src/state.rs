//! The learner's whole state (what it learned, its join, where it read to, its counts), saved
//! as one Redis value; and what it does with each record read and each tick of the clock,
//! without any I/O, so the loop's decisions are tested here.

use serde::{Deserialize, Serialize};
use sluice_config::config::LearnTiming;
use sluice_learn::{Feedback, Join, JoinCounts, Outcome, PageHinkley, Prediction};
use sluice_schemas::learning::{decode_feedback, decode_prediction};

use crate::trainee::{LearnCounts, Trainee};

/// Which input topic a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The logged predictions (or a bandit's choices).
    Predictions = 0,
    /// The feedback.
    Feedback = 1,
}

/// Everything the learner has: saved as one Redis value, so a restart resumes exactly here.
#[derive(Serialize, Deserialize)]
#[serde(bound = "T: Trainee")]
pub struct State<T> {
    /// What is learned.
    pub learner: T,
    /// Predictions waiting for their feedback.
    pub join: Join,
    /// Next offsets to read: predictions, feedback.
    pub next: [i64; 2],
    /// What it did with what it read.
    pub counts: LearnCounts,
    /// Watches the served error rate.
    #[serde(default)]
    pub drift: PageHinkley,
}

/// The checkpoint as `sluice learn --status` and tests read it.
#[derive(Serialize)]
struct Status<'a> {
    model: &'a str,
    weights_version: u64,
    next: [i64; 2],
    pending: usize,
    join: JoinCounts,
    learned: LearnCounts,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    arms: serde_json::Value,
}

impl<T: Trainee> State<T> {
    /// A state with nothing read yet.
    pub fn fresh(learner: T, timing: &LearnTiming) -> State<T> {
        State {
            learner,
            join: new_join(timing),
            next: [0, 0],
            counts: LearnCounts::default(),
            drift: PageHinkley::default(),
        }
    }

    /// Takes the record at `offset` of `input` at wall-clock time `now_ms`: joins it and learns
    /// what the join gives. A record that does not decode is counted (and the error returned,
    /// for its dead letter); either way the read position moves past it.
    pub fn read(
        &mut self,
        settings: &T::Settings,
        input: Input,
        offset: i64,
        payload: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<(), String> {
        self.next[input as usize] = offset + 1;
        let outcomes = match (input, payload) {
            (Input::Predictions, Some(bytes)) => decode_prediction(bytes)
                .map(|p| self.join.prediction(prediction(p), now_ms))
                .map_err(|e| e.to_string()),
            (Input::Feedback, Some(bytes)) => decode_feedback(bytes)
                .map(|f| {
                    let feedback = Feedback {
                        id: f.id,
                        truth: f.truth,
                        reward: f.reward,
                        time_ms: f.time_ms,
                    };
                    self.join.feedback(feedback, now_ms)
                })
                .map_err(|e| e.to_string()),
            (_, None) => Err("empty record".to_string()),
        };
        match outcomes {
            Ok(outcomes) => {
                self.learn(settings, outcomes);
                Ok(())
            }
            Err(e) => {
                self.counts.undecodable += 1;
                Err(e)
            }
        }
    }

    /// Ends the windows that passed by `now_ms` (predictions without feedback) and learns
    /// them; true when any did.
    pub fn expire(&mut self, settings: &T::Settings, now_ms: i64) -> bool {
        let outcomes = self.join.expire(now_ms);
        let any = !outcomes.is_empty();
        self.learn(settings, outcomes);
        any
    }

    /// Whether the read positions reached `ends` (what was written before the start).
    pub fn caught_up(&self, ends: [i64; 2]) -> bool {
        self.next.iter().zip(ends).all(|(n, e)| *n >= e)
    }

    fn learn(&mut self, settings: &T::Settings, outcomes: Vec<Outcome>) {
        if !outcomes.is_empty() {
            self.learner
                .learn(settings, outcomes, &mut self.counts, &mut self.drift);
        }
    }
}

/// A logged prediction as the join takes it.
fn prediction(p: sluice_schemas::learning::PredictionRecord) -> Prediction {
    Prediction {
        id: p.id,
        features: p.features,
        probability: p.probability,
        weights_version: u64::try_from(p.weights_version).unwrap_or(0),
        time_ms: p.time_ms,
        arm: p.arm,
        hashed: p
            .hashed
            .iter()
            .filter_map(|&h| u32::try_from(h).ok())
            .collect(),
    }
}

/// An empty join with the configured window and bound.
pub fn new_join(timing: &LearnTiming) -> Join {
    Join::new(
        i64::try_from(timing.window.as_millis()).unwrap_or(i64::MAX),
        timing.max_pending,
    )
}

/// The checkpoint `checkpoint` of `model`'s learner as `sluice learn --status` prints it.
pub fn status_of<T: Trainee>(model: &str, checkpoint: &str) -> serde_json::Result<String> {
    let state: State<T> = serde_json::from_str(checkpoint)?;
    serde_json::to_string(&Status {
        model,
        weights_version: state.learner.version(),
        next: state.next,
        pending: state.join.pending(),
        join: state.join.counts(),
        learned: state.counts,
        arms: state.learner.summary(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use sluice_config::config::LearnerConfig;
    use sluice_learn::Learner;
    use sluice_schemas::learning::{
        FeedbackRecord, PredictionRecord, encode_feedback, encode_prediction,
    };

    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn settings(extra: &str) -> LearnerConfig {
        toml::from_str(&format!(
            "algorithm = \"sgd\"\nwindow = \"1s\"\nmax_pending = 100\n{extra}"
        ))
        .unwrap()
    }

    fn prediction(id: &str, probability: f64) -> Vec<u8> {
        encode_prediction(&PredictionRecord {
            id: id.into(),
            model: "m".into(),
            weights_version: 0,
            features: vec![1.0, -1.0],
            probability,
            time_ms: T0,
            arm: None,
            hashed: Vec::new(),
        })
        .unwrap()
    }

    fn feedback(id: &str, truth: f64) -> Vec<u8> {
        encode_feedback(&FeedbackRecord {
            id: id.into(),
            model: "m".into(),
            truth: Some(truth),
            reward: None,
            time_ms: T0 + 10,
        })
        .unwrap()
    }

    fn fresh(s: &LearnerConfig) -> State<Learner> {
        State::fresh(Learner::new(s, 2), &s.timing())
    }

    #[test]
    fn a_prediction_joined_with_its_feedback_is_judged_and_learned_once() {
        let s = settings("");
        let mut state = fresh(&s);
        let p = prediction("r1", 0.9);
        state.read(&s, Input::Predictions, 7, Some(&p), T0).unwrap();
        assert_eq!(
            state.learner.version(),
            0,
            "nothing learned before the feedback"
        );
        let f = feedback("r1", 0.0);
        state
            .read(&s, Input::Feedback, 3, Some(&f), T0 + 10)
            .unwrap();
        assert_eq!(
            state.next,
            [8, 4],
            "both read positions move past what was read"
        );
        assert_eq!(state.learner.version(), 1);
        let c = state.counts;
        assert_eq!((c.learned, c.served_judged, c.served_correct), (1, 1, 0));
        // The same feedback again (a redelivery) is a duplicate, not a second example.
        state
            .read(&s, Input::Feedback, 4, Some(&f), T0 + 20)
            .unwrap();
        assert_eq!(state.learner.version(), 1);
        assert_eq!(state.join.counts().duplicate + state.join.counts().late, 1);
    }

    #[test]
    fn a_record_that_does_not_decode_is_counted_and_passed_over() {
        let s = settings("");
        let mut state = fresh(&s);
        let e = state.read(&s, Input::Feedback, 0, Some(b"\x01junk"), T0);
        assert!(e.is_err());
        let e = state.read(&s, Input::Predictions, 5, None, T0);
        assert_eq!(e, Err("empty record".to_string()));
        assert_eq!(state.counts.undecodable, 2);
        assert_eq!(state.next, [6, 1]);
    }

    #[test]
    fn a_window_without_feedback_ends_by_the_clock_and_learns_the_default_label() {
        let s = settings("no_feedback_label = 0.0");
        let mut state = fresh(&s);
        let p = prediction("r1", 0.8);
        state.read(&s, Input::Predictions, 0, Some(&p), T0).unwrap();
        assert!(!state.expire(&s, T0 + 500), "the window is still open");
        assert!(state.expire(&s, T0 + 1_001));
        assert_eq!(state.counts.learned_no_feedback, 1);
        assert_eq!(state.learner.version(), 1);
        assert_eq!(state.join.pending(), 0);
        // Without a default label the window ends and nothing is learned.
        let s = settings("");
        let mut state = fresh(&s);
        state.read(&s, Input::Predictions, 0, Some(&p), T0).unwrap();
        assert!(state.expire(&s, T0 + 1_001));
        assert_eq!(state.learner.version(), 0);
    }

    #[test]
    fn caught_up_once_both_positions_reach_the_ends_seen_at_start() {
        let s = settings("");
        let mut state = fresh(&s);
        assert!(state.caught_up([0, 0]));
        assert!(!state.caught_up([1, 0]));
        state.read(&s, Input::Predictions, 0, None, T0).unwrap_err();
        assert!(state.caught_up([1, 0]));
    }

    #[test]
    fn the_checkpoint_reads_back_and_prints_as_status() {
        let s = settings("");
        let mut state = fresh(&s);
        let p = prediction("r1", 0.9);
        state.read(&s, Input::Predictions, 0, Some(&p), T0).unwrap();
        let saved = serde_json::to_string(&state).unwrap();
        let status: serde_json::Value =
            serde_json::from_str(&status_of::<Learner>("m", &saved).unwrap()).unwrap();
        assert_eq!(status["model"], "m");
        assert_eq!(status["pending"], 1);
        assert_eq!(status["next"], serde_json::json!([1, 0]));
    }
}
