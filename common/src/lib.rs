//! Plumbing shared by Sluice's gateway, workers and CLI: layered configuration, Kafka client
//! settings and topic administration, model input validation, telemetry and clocks.

pub mod config;
pub mod graph;
pub mod kafka;
pub mod local;
pub mod model;
pub mod ops;
pub mod telemetry;

pub use config::{Config, ConfigError, ModelConfig, TensorSpec};

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
