//! Sluice's worker: consumes a model's request topic in its consumer group, batches dynamically,
//! runs ONNX Runtime on dedicated threads and delivers results, replies and dead letters with
//! at-least-once offset handling.

pub mod backend;
pub mod batcher;
pub mod combine;
pub mod flow;
pub mod join;
pub mod offsets;
pub mod runner;
pub mod sink;
pub mod telemetry;
pub mod worker;

pub use worker::{WorkerError, run};
