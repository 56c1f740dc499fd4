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
use super::step_toml::StepToml;

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

/// One step as written in config: its name, what it reads, where it runs, and its kind.
/// Written flat in TOML (`model = "mlp"`, `combine = "mean"`, `features = { ... }`); exactly one
/// kind key is set, and a key that belongs to another kind is refused (see [`super::step_toml`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "StepToml", into = "StepToml")]
pub struct StepConfig {
    /// Step name, unique in the graph (`a-z`, `0-9`, `_`, `-`).
    pub name: String,
    /// What the step runs, with that kind's own settings.
    pub kind: StepKindConfig,
    /// Run after this step even without reading from it (e.g. a router choosing by a request
    /// parameter once `after` has run).
    pub after: Option<String>,
    /// Every step but combine and route: input name → source (`request.<input>` or
    /// `<step>.<output>`).
    pub inputs: BTreeMap<String, String>,
    /// Run in the worker of the step it reads from, in process, with no broker hop between
    /// them (that step must lead only here, and this step must not be a model or combine
    /// step). The step keeps its topic, so a record that cannot be fused still gets through.
    pub fused: bool,
    /// Steps other than models: workers `sluice up --per-step` starts.
    pub workers: usize,
}

impl StepConfig {
    /// Every source the step reads: its inputs' and, for a combine step, its parts'.
    pub fn sources(&self) -> impl Iterator<Item = &String> {
        let parts = match &self.kind {
            StepKindConfig::Combine(c) => c.parts.as_slice(),
            _ => &[],
        };
        self.inputs.values().chain(parts)
    }
}

/// What a step runs: one variant per step kind, each with its own settings.
#[derive(Debug, Clone)]
pub enum StepKindConfig {
    /// Run a model (`model = "..."`), with an optional canary and shadows.
    Model(ModelStep),
    /// Run a built-in step (`builtin = "argmax"`).
    Builtin(Builtin),
    /// Join parallel steps and combine one tensor from each (`combine = "..."`).
    Combine(CombineStep),
    /// Pick the next step(s) by a rule (`route = { by, cases, default }`).
    Route(RouteConfig),
    /// Pick one of several arm steps by a policy learned from rewards (one per graph; a
    /// contextual policy reads the step's `context` input).
    Bandit(BanditConfig),
    /// Check the inputs against rules; outputs them unchanged (under their input names).
    Validate(Vec<ValidationRule>),
    /// Encode the inputs into one FP32 feature vector.
    Encode(EncodeStep),
    /// Turn scores into a business decision (`decision`, `rule` outputs).
    Decide(DecideConfig),
    /// Look features up in Redis by the entity keys of an input.
    Features(Box<FeaturesConfig>),
    /// Look rows up in PostgreSQL by the keys of an input.
    Postgres(Box<PostgresConfig>),
    /// Call an external JSON API.
    Http(Box<HttpConfig>),
    /// Decode PNG/JPEG images into a normalized FP32 tensor.
    DecodeImage(DecodeImageStep),
    /// Run a user step registered under this kind (in the binary running the worker).
    Custom(Box<CustomStepConfig>),
}

impl StepKindConfig {
    /// The config key that selects this kind (`model`, `combine`, ...).
    pub fn key(&self) -> &'static str {
        match self {
            Self::Model(_) => "model",
            Self::Builtin(_) => "builtin",
            Self::Combine(_) => "combine",
            Self::Route(_) => "route",
            Self::Bandit(_) => "bandit",
            Self::Validate(_) => "validate",
            Self::Encode(_) => "encode",
            Self::Decide(_) => "decide",
            Self::Features(_) => "features",
            Self::Postgres(_) => "postgres",
            Self::Http(_) => "http",
            Self::DecodeImage(_) => "decode_image",
            Self::Custom(_) => "custom",
        }
    }

    /// Whether the step chooses where records go next (a router or a bandit).
    pub fn is_router(&self) -> bool {
        matches!(self, Self::Route(_) | Self::Bandit(_))
    }

    /// The model a model step runs.
    pub fn model(&self) -> Option<&str> {
        match self {
            Self::Model(m) => Some(&m.model),
            _ => None,
        }
    }
}

/// A model step's settings.
#[derive(Debug, Clone)]
pub struct ModelStep {
    /// The model it runs.
    pub model: String,
    /// Send a share of requests to a candidate model instead.
    pub canary: Option<CanaryConfig>,
    /// Models that get a copy of every request, compared with the primary.
    pub shadow: Vec<String>,
}

/// A combine step's settings (a join of parallel steps).
#[derive(Debug, Clone)]
pub struct CombineStep {
    /// How the parts merge.
    pub combiner: Combiner,
    /// One source per part, each from a different parallel step.
    pub parts: Vec<String>,
    /// Name of the combined tensor (default: the parts' tensor name).
    pub output: Option<String>,
    /// `weighted_mean`: one weight per part.
    pub weights: Vec<f64>,
    /// `majority_vote`: how a tie is broken.
    pub tie: TieRule,
    /// Parts needed to answer when the timeout passes (default: all).
    pub quorum: Option<usize>,
    /// How long to wait for every part after the first arrives.
    pub timeout: Duration,
}

/// An encode step's settings.
#[derive(Debug, Clone)]
pub struct EncodeStep {
    /// One encoding per input column.
    pub columns: Vec<EncodeColumn>,
    /// Name of the feature vector (default `features`).
    pub output: String,
}

/// A decode-image step's settings.
#[derive(Debug, Clone)]
pub struct DecodeImageStep {
    /// How images are decoded and normalized.
    pub settings: Box<DecodeImageConfig>,
    /// Name of the pixel tensor (default `pixels`).
    pub output: String,
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
