//! Configuration: built-in defaults → TOML file → `SLUICE__…` environment, validated at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_schemas::DataType;

mod auth;
mod bandit;
mod checks;
mod graphs;
mod learn;
mod logic;
mod redact;
mod step_toml;

pub use auth::{ApiKey, AuthConfig, JwtConfig, Scope};
pub use bandit::{BanditConfig, Policy};
pub use graphs::{
    Builtin, CanaryConfig, CombineStep, Combiner, DecodeImageStep, EncodeStep, GraphConfig,
    ModelStep, RouteConfig, StepConfig, StepKindConfig, TieRule,
};
pub use learn::{Algorithm, LearnTiming, LearnerConfig};
pub use logic::{
    AllowedValue, CustomStepConfig, DecideConfig, DecisionRule, DecodeImageConfig, EncodeColumn,
    EncodeOp, FeatureLayout, FeatureSpec, FeaturesConfig, HttpConfig, HttpField, HttpMode,
    JoinKeyType, OnMissing, PostgresConfig, RuleKind, Unknown, ValidationRule,
};
pub use redact::redact_url;

const DEFAULTS: &str = include_str!("../../default.toml");

/// Everything a Sluice process needs to know.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker connection and client tuning.
    pub kafka: KafkaConfig,
    /// Redis, used for reply correlation.
    pub redis: RedisConfig,
    /// The HTTP gateway.
    pub gateway: GatewayConfig,
    /// Worker processes.
    pub worker: WorkerConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// Settings used only by `sluice up` (the local stack).
    pub local: LocalConfig,
    /// The async runtime every Sluice process runs on.
    pub runtime: RuntimeConfig,
    /// Served models, by name.
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Graphs of steps, by name (served like models).
    #[serde(default)]
    pub graphs: BTreeMap<String, GraphConfig>,
    /// Deployment units, by name: worker processes that serve several steps through one
    /// consumer. None declared: `sluice up` runs everything in one unit, `all`.
    #[serde(default)]
    pub units: BTreeMap<String, UnitConfig>,
    /// Where pushed model versions are stored (`sluice models push`, the repository API's
    /// `load` with a file): `<model_store>/<model>/<version>.onnx`, read by every worker, so on
    /// several machines a shared volume.
    #[serde(default = "default_model_store")]
    pub model_store: PathBuf,
    /// Other config files read before this one (paths relative to this file; they may not
    /// include further files). This file's own settings win over theirs.
    #[serde(default)]
    pub include: Vec<PathBuf>,
}

fn default_model_store() -> PathBuf {
    PathBuf::from(".sluice/models")
}

/// A deployment unit: the steps one worker process serves through one consumer (one group,
/// subscribed to all their topics), each record still running its own step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConfig {
    /// What it serves: `"*"` (every step no other unit names), or a list of models
    /// (`"mlp"`), graphs (`"digits-pipeline"`: each of its steps) and graph steps
    /// (`"digits-pipeline.postprocess"`).
    pub serves: Serves,
    /// Workers `sluice up` starts for this unit (they share its partitions).
    #[serde(default = "one")]
    pub workers: usize,
}

/// What a deployment unit serves.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Serves {
    /// `"*"`: every step no other unit names.
    All(String),
    /// Models, graphs and graph steps by name.
    Named(Vec<String>),
}

/// Broker connection and client tuning.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic names are `<prefix>.<model>.requests`, `<prefix>.<model>.results`, `<prefix>.dead-letter`.
    pub topic_prefix: String,
    /// Replication factor for topics Sluice creates.
    pub replication_factor: i32,
    /// Delete records of request and step topics once the group has committed past them
    /// (`DeleteRecords`, as Kafka Streams does for its repartition topics). Results, comparisons
    /// and dead letters are never purged.
    pub purge_consumed: bool,
    /// How often a worker purges the partitions it owns.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
    /// librdkafka properties for every client (applied after Sluice's defaults).
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// librdkafka properties for producers only.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// librdkafka properties for consumers only.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
}

/// Redis connection and result storage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS.
    pub url: String,
    /// With `rediss://`: a PEM file of the certificate authority to trust (instead of the
    /// system's trust store).
    #[serde(default)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// With `rediss://` and mutual TLS: this client's certificate chain (PEM).
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// With `rediss://` and mutual TLS: this client's private key (PEM).
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Prefix of reply channels (`<prefix>:reply:<gateway>`) and result keys (`<prefix>:result:<id>`).
    pub key_prefix: String,
    /// How long a stored result lives at least; a request with a longer deadline keeps its result
    /// until that deadline has passed (the gateway's last read of it happens then).
    #[serde(with = "humantime_serde")]
    pub result_ttl: Duration,
}

/// The HTTP gateway.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Listen address (Triton's convention is port 8000).
    pub listen: SocketAddr,
    /// Requests in flight at once; more get 429 at once rather than queueing without bound.
    pub max_in_flight: usize,
    /// Largest request body; larger ones get 413 before the body is read.
    pub max_body_bytes: usize,
    /// Deadline for requests that set no `timeout` parameter.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Upper bound on a request's `timeout` parameter.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// On SIGTERM: how long requests in flight may still wait for their results; then each
    /// is answered 503 (never left to its deadline).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long request records wait to be batched into one produce request (`linger.ms`):
    /// added to every request's latency, saves broker and client CPU under load.
    #[serde(with = "humantime_serde")]
    pub produce_linger: Duration,
    /// Requests in flight from which request records linger (`produce_linger`); below it they go
    /// at once, so a lone request never waits for company.
    pub produce_linger_from: usize,
    /// How often the gateway probes the broker and Redis for readiness.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Probes failed in a row before a dependency counts as down (one slow answer from a busy
    /// broker must not turn requests away).
    pub health_failures: u32,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body (408 after that).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Who may call it (off by default).
    #[serde(default)]
    pub auth: AuthConfig,
    /// HTTPS instead of HTTP (off by default).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The gateway's certificate: with it, the gateway speaks HTTPS only (TLS 1.2 and 1.3).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Worker processes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Where a worker serves `/metrics` and health (port 0 picks a free one).
    pub metrics_listen: SocketAddr,
    /// Requests decoded and waiting for a batch; when full the worker stops fetching.
    pub max_queued: usize,
    /// How long SIGTERM waits for in-flight batches before leaving.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long result records wait to be batched into one produce request. Gateway callers do
    /// not wait for this (their reply goes through Redis at once); direct Kafka consumers do.
    #[serde(with = "humantime_serde")]
    pub result_linger: Duration,
    /// Linger of records for a graph's next step: on the caller's path, so short.
    #[serde(with = "humantime_serde")]
    pub forward_linger: Duration,
    /// A graph's next step served by another lane of the same worker runs in process instead of
    /// through its topic (one broker round trip less per hop). Joins, shadow copies and steps of
    /// other workers still go through Kafka. `false`: every hop through Kafka.
    pub local_hops: bool,
    /// This process's stable name within its unit (`sluice up`'s slot number, a StatefulSet
    /// pod's name): set, the worker joins its group as a static member (`group.instance.id`
    /// `<group>.<instance>`), and a restarted process gets its partitions back at once instead
    /// of after the session timeout. A process stopped for good then holds its partitions until
    /// that timeout (6 s), so leave it unset for workers that come and go by scaling. Two live
    /// processes must never share one: the later one fences the earlier, which stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// The async runtime.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads of the async runtime (0: one per core). Inference runs on threads of its own.
    pub threads: usize,
}

/// Log output.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `sluice=debug` (`RUST_LOG` wins when set).
    pub log_level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Local stack settings (`sluice up`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The folder of the Kafka broker `up` starts when none answers at `kafka.brokers`: its
    /// settings and its log, kept between runs (a relative path is taken from the working
    /// directory).
    pub kafka_dir: PathBuf,
    /// That broker's controller listener (`host:port`; KRaft, inside its own JVM).
    pub kafka_controller: String,
    /// That broker's JVM heap limit (`-Xmx`), e.g. `512m`.
    pub kafka_heap: String,
    /// Port for a Redis that `up` starts when none answers at `redis.url`.
    pub redis_port: u16,
    /// How long `up` waits for every process to be ready before it stops them all and fails.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Where `up` writes the stack's addresses (`stack.json`, read by `sluice status`) and each
    /// process's bound address.
    pub state_dir: PathBuf,
    /// Demo data `up` loads once Redis is up and before the workers start (idempotent).
    #[serde(default)]
    pub seed: Vec<Seed>,
}

/// Data `sluice up` loads at start, so that a demo stack answers at once.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged, deny_unknown_fields)]
pub enum Seed {
    /// An SQL script run against PostgreSQL (it should be idempotent: `DROP … IF EXISTS`).
    Sql {
        /// The script (relative to the config file).
        sql: PathBuf,
        /// PostgreSQL URL.
        postgres: String,
    },
    /// Rows written into Redis for a feature step, in its layout (`sluice features load`).
    Features {
        /// A `.csv`, `.jsonl` or `.parquet` file (relative to the config file).
        features: PathBuf,
        /// The feature step, as `<graph>.<step>`.
        step: String,
    },
}

/// One served model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// ONNX file, relative to the config file (unset for a learner).
    #[serde(default)]
    pub onnx: Option<PathBuf>,
    /// Learned while serving, from feedback, instead of loaded from ONNX.
    #[serde(default)]
    pub learner: Option<LearnerConfig>,
    /// Version reported in metadata and results.
    #[serde(default = "default_version")]
    pub version: String,
    /// Declared inputs (requests are checked against these).
    pub inputs: Vec<TensorSpec>,
    /// Declared outputs.
    pub outputs: Vec<TensorSpec>,
    /// Most requests (rows) run together; the first dimension of every tensor is the batch.
    pub max_batch_size: usize,
    /// Most elements one input tensor of a request may carry (larger: 413).
    #[serde(default)]
    pub max_input_elements: Option<usize>,
    /// Largest request body (larger: 413); unset, the gateway's `max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Longest a request waits for a batch to fill while the model is free.
    #[serde(with = "humantime_serde", default)]
    pub max_delay: Duration,
    /// Inference threads per worker, each with its own ONNX Runtime session.
    #[serde(default = "one")]
    pub threads: usize,
    /// ONNX Runtime intra-op threads per session.
    #[serde(default = "one")]
    pub intra_op_threads: usize,
    /// Partitions of the model's request topic (the most workers that can share its load).
    #[serde(default = "one_i32")]
    pub partitions: i32,
    /// Workers `sluice up` starts for this model.
    #[serde(default = "one")]
    pub workers: usize,
}

fn default_version() -> String {
    "1".into()
}
fn one() -> usize {
    1
}
fn one_i32() -> i32 {
    1
}

/// A declared tensor: name, datatype and full shape (batch dimension first, -1 for variable dims).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Shape, batch dimension included; -1 marks a variable dimension.
    pub shape: Vec<i64>,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers could not be read or deserialized.
    #[error("config {file}: {message}")]
    Load {
        /// The config file (or `<defaults>`).
        file: String,
        /// What went wrong, naming the key where known.
        message: String,
    },
    /// Values that are individually fine but invalid.
    #[error("config {file}: invalid values:\n  - {}", problems.join("\n  - "))]
    Invalid {
        /// The config file.
        file: String,
        /// One line per problem, each naming its key.
        problems: Vec<String>,
    },
}

impl Config {
    /// Loads defaults, then `file` (if any), then `SLUICE__…` environment variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(file, &vars)
    }

    /// Loads defaults, then `text` (a config file's contents; relative paths stay as written),
    /// and validates: [`Config::load`] without a file or the environment (the config fuzz
    /// target's entry point).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let load_err = |e: ::config::ConfigError| ConfigError::Load {
            file: "<text>".into(),
            message: e.to_string(),
        };
        let cfg: Config = ::config::Config::builder()
            .add_source(::config::File::from_str(
                DEFAULTS,
                ::config::FileFormat::Toml,
            ))
            .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
            .build()
            .map_err(load_err)?
            .try_deserialize()
            .map_err(load_err)?;
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                file: "<text>".into(),
                problems,
            })
        }
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let file_name = file
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "<defaults>".into());
        let load_err = |e: ::config::ConfigError| ConfigError::Load {
            file: file_name.clone(),
            message: e.to_string(),
        };
        let mut builder = ::config::Config::builder().add_source(::config::File::from_str(
            DEFAULTS,
            ::config::FileFormat::Toml,
        ));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError::Load {
                    file: file_name,
                    message: "file not found".into(),
                });
            }
            for included in includes(f).map_err(|message| ConfigError::Load {
                file: file_name.clone(),
                message,
            })? {
                builder = builder.add_source(
                    ::config::File::from(included)
                        .format(::config::FileFormat::Toml)
                        .required(true),
                );
            }
            builder = builder.add_source(
                ::config::File::from(f)
                    .format(::config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env_map: ::config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("SLUICE__"))
            .cloned()
            .collect();
        builder = builder.add_source(
            ::config::Environment::with_prefix("SLUICE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let mut cfg: Config = builder
            .build()
            .map_err(load_err)?
            .try_deserialize()
            .map_err(load_err)?;
        if let Some(dir) = file.and_then(Path::parent) {
            let tls = cfg
                .gateway
                .tls
                .iter_mut()
                .flat_map(|t| [&mut t.cert, &mut t.key]);
            let jwks = cfg.gateway.auth.jwt.iter_mut().map(|j| &mut j.jwks);
            let redis = [
                &mut cfg.redis.tls_ca,
                &mut cfg.redis.tls_cert,
                &mut cfg.redis.tls_key,
            ]
            .into_iter()
            .flatten();
            let seeds = cfg.local.seed.iter_mut().map(|s| match s {
                Seed::Sql { sql, .. } => sql,
                Seed::Features { features, .. } => features,
            });
            for path in tls.chain(jwks).chain(redis).chain(seeds) {
                if path.is_relative() {
                    *path = dir.join(&*path);
                }
            }
            for m in cfg.models.values_mut() {
                for path in m
                    .onnx
                    .iter_mut()
                    .chain(m.learner.iter_mut().flat_map(|l| l.warm_start.iter_mut()))
                {
                    if path.is_relative() {
                        *path = dir.join(&*path);
                    }
                }
            }
        }
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                file: file_name,
                problems,
            })
        }
    }

    /// Redis pub/sub channel a gateway instance listens on.
    pub fn reply_channel(&self, gateway_id: &str) -> String {
        format!("{}:reply:{gateway_id}", self.redis.key_prefix)
    }

    /// Redis key a request's result is stored under.
    pub fn result_key(&self, request_id: &str) -> String {
        format!("{}:result:{request_id}", self.redis.key_prefix)
    }
}

/// The files `file` includes (its `include` list, relative to its folder), each checked to
/// exist and to include nothing itself.
fn includes(file: &Path) -> Result<Vec<PathBuf>, String> {
    #[derive(Deserialize)]
    struct Includes {
        #[serde(default)]
        include: Vec<PathBuf>,
    }
    let read = |f: &Path| -> Result<Includes, String> {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for name in read(file)?.include {
        let path = dir.join(&name);
        if !read(&path)?.include.is_empty() {
            return Err(format!(
                "include {}: an included file may not include others",
                name.display()
            ));
        }
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    fn write(toml: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        f
    }

    const MODEL: &str = r#"
[models.mlp]
onnx = "mlp.onnx"
max_batch_size = 8
max_delay = "2ms"
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 64] }]
outputs = [{ name = "label", datatype = "INT64", shape = [-1] }]
"#;

    #[test]
    fn defaults_file_and_env_layer_in_order() {
        let f = write(&format!(
            "[gateway]\nmax_in_flight = 7\n[kafka.client]\n\"fetch.wait.max.ms\" = \"1\"\n{MODEL}"
        ));
        let env = vec![
            (
                "SLUICE__GATEWAY__LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let c = Config::load_with_env(Some(f.path()), &env).unwrap();
        assert_eq!(c.gateway.max_in_flight, 7, "file overrides default");
        assert_eq!(c.gateway.listen.port(), 9999, "env overrides file");
        assert_eq!(c.gateway.max_body_bytes, 64 << 20, "default kept");
        assert_eq!(
            c.kafka.client.get("fetch.wait.max.ms").map(String::as_str),
            Some("1")
        );
        let m = &c.models["mlp"];
        assert_eq!(m.max_delay, Duration::from_millis(2));
        assert_eq!(m.onnx, Some(f.path().parent().unwrap().join("mlp.onnx")));
        assert_eq!(m.inputs[0].datatype, DataType::Fp32);
    }

    #[test]
    fn unknown_key_is_an_error_naming_key_and_file() {
        let f = write("[gateway]\nmax_inflight = 7\n");
        let err = Config::load_with_env(Some(f.path()), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_inflight"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn invalid_values_are_all_reported() {
        let f = write(
            &MODEL
                .replace("max_batch_size = 8", "max_batch_size = 0")
                .replace("[-1, 64]", "[1, 64]"),
        );
        let err = Config::load_with_env(Some(f.path()), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("models.mlp.max_batch_size"), "{err}");
        assert!(err.contains("models.mlp.inputs.input.shape"), "{err}");
    }

    #[test]
    fn bad_datatype_and_duration_are_rejected() {
        let f = write(&MODEL.replace("FP32", "FLOAT32"));
        let err = Config::load_with_env(Some(f.path()), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLOAT32"), "{err}");
        let f = write(&MODEL.replace("\"2ms\"", "\"soon\""));
        assert!(Config::load_with_env(Some(f.path()), &[]).is_err());
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load_with_env(Some(Path::new("/nonexistent/x.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/x.toml") && err.contains("not found"),
            "{err}"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let f = write(
            "[redis]\nurl = \"redis://app:hunter2@localhost:6379\"\n[kafka.client]\n\"sasl.password\" = \"hunter3\"\n",
        );
        let c = Config::load_with_env(Some(f.path()), &[]).unwrap();
        let shown = c.redacted();
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert!(shown.contains("redis://app:***@localhost:6379"), "{shown}");
    }
}
