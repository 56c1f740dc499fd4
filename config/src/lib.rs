//! Sluice's configuration and the graph compiler, with nothing that talks to a broker or
//! Redis: what every process (and the pure `learn` and `features` crates) reads its settings
//! from.
//!
//! [`config`] layers built-in defaults, a TOML file and `SLUICE__…` variables; [`graph`]
//! compiles each graph into the routing plan every process holds; [`signature`] checks
//! requests against what a model or graph takes; [`topics`] names every topic; [`hash`] is
//! the MurmurHash3 Feast and scikit-learn share.

pub mod config;
pub mod graph;
pub mod hash;
pub mod signature;
pub mod topics;

pub use config::{Config, ConfigError, ModelConfig, TensorSpec};
pub use signature::Signature;
