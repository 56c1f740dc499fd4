//! How graphs are written in config (`[graphs.<name>]`, `[[graphs.<name>.steps]]`): the raw
//! declarations, checked and compiled into a routing plan by [`crate::graph`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::TensorSpec;
use super::bandit::BanditConfig;
use super::logic::{
    CustomStepConfig, DecideConfig, DecodeImageConfig, EncodeColumn, FeaturesConfig, HttpConfig,
    PostgresConfig, ValidationRule,
};

/// A graph as written in config (`[graphs.<name>]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Version reported in metadata and results.
    #[serde(default = "default_version")]
    pub version: String,
    /// The graph's request tensors (read by steps as `request.<name>`).
    pub inputs: Vec<TensorSpec>,
    /// Most rows one request may carry.
    #[serde(default = "default_max_batch")]
    pub max_batch_size: usize,
    /// Most elements one input tensor of a request may carry (larger: 413).
    #[serde(default)]
    pub max_input_elements: Option<usize>,
    /// Largest request body (larger: 413); unset, the gateway's `max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Partitions of the graph's own topics (entry, steps, results). When set, every model step's
    /// topic must have as many; when not, the most any of its models has.
    pub partitions: Option<i32>,
    /// The steps, in any order.
    pub steps: Vec<StepConfig>,
}

/// One step as written in config. Exactly one of `model`, `builtin`, `combine`, `route`,
/// `bandit`, `validate`, `encode`, `decide`, `features`, `postgres`, `http`, `decode_image`, `custom` is
/// set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Step name, unique in the graph (`a-z`, `0-9`, `_`, `-`).
    pub name: String,
    /// Run this model.
    pub model: Option<String>,
    /// Run a built-in step.
    pub builtin: Option<Builtin>,
    /// Join parallel steps and combine one tensor from each.
    pub combine: Option<Combiner>,
    /// Pick the next step(s) by a rule.
    pub route: Option<RouteConfig>,
    /// Pick one of several arm steps by a policy learned from rewards (one per graph; a
    /// contextual policy reads the step's `context` input).
    pub bandit: Option<BanditConfig>,
    /// Check the inputs against rules; outputs them unchanged (under their input names).
    pub validate: Option<Vec<ValidationRule>>,
    /// Encode the inputs into one FP32 feature vector (named by `output`, default `features`).
    pub encode: Option<Vec<EncodeColumn>>,
    /// Turn scores into a business decision (`decision`, `rule` outputs).
    pub decide: Option<DecideConfig>,
    /// Look features up in Redis by the entity keys of an input.
    pub features: Option<FeaturesConfig>,
    /// Look rows up in PostgreSQL by the keys of an input.
    pub postgres: Option<PostgresConfig>,
    /// Call an external JSON API.
    pub http: Option<HttpConfig>,
    /// Decode PNG/JPEG images into a normalized FP32 tensor (named by `output`, default
    /// `pixels`).
    pub decode_image: Option<DecodeImageConfig>,
    /// Run a user step registered under this kind (in the binary running the worker).
    pub custom: Option<CustomStepConfig>,
    /// Run after this step even without reading from it (e.g. a router choosing by a request
    /// parameter once `after` has run).
    pub after: Option<String>,
    /// Every step but combine and route: input name → source (`request.<input>` or
    /// `<step>.<output>`).
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Combine steps: one source per part, each from a different parallel step.
    #[serde(default)]
    pub parts: Vec<String>,
    /// Combine steps: name of the combined tensor (default: the parts' tensor name); encode
    /// steps: name of the feature vector (default `features`); decode_image steps: name of the
    /// pixel tensor (default `pixels`).
    pub output: Option<String>,
    /// `weighted_mean`: one weight per part.
    #[serde(default)]
    pub weights: Vec<f64>,
    /// `majority_vote`: how a tie is broken.
    #[serde(default)]
    pub tie: TieRule,
    /// Combine steps: parts needed to answer when the timeout passes (default: all).
    pub quorum: Option<usize>,
    /// Combine steps: how long to wait for every part after the first arrives.
    #[serde(with = "humantime_serde", default = "default_join_timeout")]
    pub timeout: Duration,
    /// Model steps: send a share of requests to a candidate model instead.
    pub canary: Option<CanaryConfig>,
    /// Model steps: models that get a copy of every request, compared with the primary.
    #[serde(default)]
    pub shadow: Vec<String>,
    /// Run in the worker of the step it reads from, in process, with no broker hop between
    /// them (that step must lead only here, and this step must not be a model or combine
    /// step). The step keeps its topic, so a record that cannot be fused still gets through.
    #[serde(default)]
    pub fused: bool,
    /// Steps other than models: workers `sluice up --per-step` starts.
    #[serde(default = "one")]
    pub workers: usize,
}

/// Built-in steps.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    /// Reads `probabilities` [batch, classes]; outputs `label` (INT64) and its `probability` (FP32).
    Argmax,
}

/// How a combine step merges its parts' tensors.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Combiner {
    /// Element-wise mean (FP32).
    Mean,
    /// Element-wise weighted mean (FP32), weights from config.
    WeightedMean,
    /// Per row, the most common value (integer labels), ties broken by `tie`.
    MajorityVote,
    /// Per row, the part whose row has the highest maximum (FP32 scores).
    MaxConfidence,
    /// The first part to arrive.
    First,
    /// Concatenated along the last axis (rank-2 tensors).
    Concat,
}

/// How `majority_vote` breaks a tie.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TieRule {
    /// The tied value whose first vote comes from the earliest listed part.
    #[default]
    FirstListed,
    /// The smallest tied value.
    Smallest,
}

/// A canary: a share of requests goes to a candidate model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The candidate model (same inputs and outputs as the primary).
    pub model: String,
    /// Share of requests it serves, 0.0..=1.0.
    pub share: f64,
    /// What picks the variant: `parameter:<name>` (a request parameter) or, by default, the
    /// request id. The same key always gets the same variant.
    pub key: Option<String>,
}

/// A router: which step(s) get a request, from a request parameter or a tensor value.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `parameter:<name>`, or a source (`request.<input>`, `<step>.<output>`) whose first
    /// element is the value.
    pub by: String,
    /// Value → steps that get the request.
    #[serde(default)]
    pub cases: BTreeMap<String, Vec<String>>,
    /// Steps for any other value (empty: such requests fail with `no_route`).
    #[serde(default)]
    pub default: Vec<String>,
}

fn default_version() -> String {
    "1".into()
}
fn default_max_batch() -> usize {
    64
}
fn default_join_timeout() -> Duration {
    Duration::from_secs(2)
}
fn one() -> usize {
    1
}
