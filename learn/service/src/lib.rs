//! `sluice learn --model NAME`: the one learner of a learning model or of a graph's bandit
//! router. It reads the logged predictions (or choices) and the feedback
//! (`<prefix>.<name>.predictions`, `.feedback`), joins them by request id within the
//! configured window (a wall-clock timer resolves predictions whose feedback never came, even
//! with no traffic), learns each joined example, publishes the learned state to
//! `<prefix>.<name>.weights` for the serving replicas, and checkpoints its whole state (learned
//! state, join state, read positions, counts) to Redis. A restarted learner resumes from the
//! checkpoint and re-reads what came after it, so nothing is lost or counted twice.
//!
//! `trainee` is what is learned, `state` what the learner does with each record and tick
//! (pure, unit-tested), `service` the process around it (Kafka, Redis, metrics).

mod service;
mod state;
mod trainee;

pub use service::{Options, checkpoint_key, run, status};
