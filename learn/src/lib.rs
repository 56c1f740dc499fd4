//! Online learning, without I/O: a logistic regression updated one labelled example at a time
//! (FTRL-Proximal or SGD, optionally after an online standard scaler), the weights a serving
//! replica predicts with, and the join of logged predictions with their later feedback.
//!
//! Bandit policies (ε-greedy, Thompson sampling, LinUCB) choose among a graph's arm steps from
//! rewards. A Page-Hinkley detector watches the served error rate for drift.
//!
//! The learner process (`sluice learn`) feeds these from Kafka; workers serve [`Weights`].

mod bandit;
mod drift;
mod join;
mod model;

pub use bandit::{Arm, Bandit, BanditRecord, Rng};
pub use drift::{Direction, PageHinkley};
pub use join::{Feedback, Join, JoinCounts, Outcome, Prediction};
pub use model::{Learner, Weights, WeightsRecord, hash_feature};
