//! Plumbing shared by Sluice's gateway, workers and CLI: layered configuration, Kafka client
//! settings and topic administration, model input validation, telemetry and clocks.
//! [`Deployment`] is what every process starts from: the config loaded, validated and compiled.

// In dependency order: each module uses only those above it.
pub mod auth;
pub mod control;
pub mod deployment;
pub mod kafka;
pub mod local;
pub mod ops;
pub mod producer;
pub mod redis_client;
pub mod telemetry;

pub use deployment::{Deployment, WorkerUnit};
pub use sluice_config::{Config, ConfigError, ModelConfig, Signature, TensorSpec};
/// The configuration and graph compiler (the `sluice-config` crate), under their old paths.
pub use sluice_config::{config, graph, hash, signature, topics};

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
