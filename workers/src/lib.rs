//! Sluice's worker: one member of a unit's consumer group (a model, or a graph's built-in, join or
//! route step). `worker` runs the consumer loop and offsets, `admission` decides what each record
//! is, the batcher and runner feed ONNX Runtime, `flow`/`join`/`combine` move graph requests on,
//! `outcome` says what follows each record and `sink` delivers it, at least once.

pub mod admission;
pub mod backend;
pub mod batcher;
pub mod combine;
pub mod flow;
pub mod join;
pub mod offsets;
pub mod outcome;
pub mod runner;
pub mod sink;
pub mod telemetry;
pub mod worker;

pub use worker::{WorkerError, run};
