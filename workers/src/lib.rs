//! Sluice's worker: one member of a unit's consumer group (models and graph steps). Folders by
//! role, each depending only on those listed before it:
//!
//! - `backend` (ONNX Runtime), `telemetry` (metric handles), `tasks`, `fail_point`;
//! - `step/`: **the step seam**: model (with its inference threads), built-in, combine, route,
//!   bandit, validate, encode, decide, feature/PostgreSQL/HTTP lookup, image decoding and user
//!   steps behind one trait; it uses nothing of `pipeline/` or `transport/`;
//! - `pipeline/`: a record between consuming and delivering it: admission, batching, running a
//!   batch through a step (and fused steps), joins, what follows each result, and hops to the
//!   worker's other lanes in process; it uses nothing of `transport/`;
//! - `transport/`: the consumer loop ([`run`]) and each lane's loop, the group, offsets, the
//!   Kafka sink, Redis replies and purging;
//! - `swap`: hot-swapping a model's version while serving.

pub mod backend;
mod fail_point;
mod pipeline;
pub mod step;
mod swap;
mod tasks;
mod telemetry;
mod transport;

pub use step::BuildError;
pub use transport::consumer::{Ops, WorkerError, run};
