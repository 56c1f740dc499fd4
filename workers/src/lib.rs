//! Sluice's worker: one member of a unit's consumer group (models and graph steps). Modules in
//! dependency order, leaves first:
//!
//! - `record` (a consumed record as plain data), `job` (where it came from, the job for a step),
//!   `completion` (what must be delivered before its offset commits), `offsets`, `batcher`,
//!   `backend` (ONNX Runtime), `runner` (concatenate and split a batch), `flow` (moving a
//!   request through its graph), `telemetry`, `tasks`;
//! - `pool` (inference threads), `step` (**the step seam**: model, built-in, combine, route,
//!   validate, encode, decide, feature/PostgreSQL/HTTP lookup, image decoding and user steps
//!   behind one trait), `join` (holding a join's parts), `outcome` (what follows a step's
//!   result), `admission` (what a record is), `reply` (Redis) and `sink` (Kafka);
//! - `group` (partitions, offsets, delivery), `executor` (a batch through a step, and fused
//!   steps in process), `local` (a lane's loop over its batches, and hops to the worker's other
//!   lanes in process), `purge` (deleting consumed records);
//! - `consumer`: the consumer loop, [`run`].

mod admission;
pub mod backend;
mod batcher;
mod completion;
mod consumer;
mod executor;
mod fail_point;
mod flow;
mod group;
mod job;
mod join;
mod local;
mod offsets;
mod outcome;
mod pool;
mod purge;
mod record;
mod reply;
mod runner;
mod sink;
pub mod step;
mod swap;
mod tasks;
mod telemetry;

pub use consumer::{Ops, WorkerError, run};
pub use step::BuildError;
