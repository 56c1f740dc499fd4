//! Plumbing shared by Sluice's gateway, workers and CLI: layered configuration, Kafka client
//! settings and topic administration, model input validation, telemetry and clocks.
//! [`Deployment`] is what every process starts from: the config loaded, validated and compiled.

// In dependency order: each module uses only those above it.
pub mod auth;
pub mod config;
pub mod control;
pub mod deployment;
pub mod graph;
pub mod hash;
pub mod kafka;
pub mod local;
pub mod ops;
pub mod producer;
pub mod redis_client;
pub mod signature;
pub mod telemetry;
pub mod topics;

pub use config::{Config, ConfigError, ModelConfig, TensorSpec};
pub use deployment::{Deployment, WorkerUnit};
pub use signature::Signature;

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    now_us() / 1000
}
