//! Graphs: named DAGs of steps declared in config and compiled, at start-up, into a routing plan
//! that every process holds. A step is a model, a built-in step, a combiner (a join), a router,
//! or a business-logic step (validation, encoding, decision, feature lookup).
//! Each step reads tensors from the request (`request.<input>`) or from earlier steps
//! (`<step>.<output>`); the compiled plan says which topic each step consumes, where each step's
//! records go next, and which tensors a record must still carry. [`compile`] runs the passes in
//! `compile/`; this module holds what they produce.

mod compile;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::config::TensorSpec;
pub use crate::config::{
    BanditConfig, Builtin, CanaryConfig, Combiner, DecideConfig, EncodeColumn, FeaturesConfig,
    GraphConfig, RouteConfig, StepConfig, StepKindConfig, TieRule, ValidationRule,
};
use crate::signature::Signature;
pub use compile::compile;

/// A compiled graph: the plan every process routes by.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Graph name (served as a model of that name).
    pub name: String,
    /// What callers send and get back (the answer is the final step's outputs), checked
    /// against every request entering the graph.
    pub signature: Signature,
    /// Partitions of the graph's topics.
    pub partitions: i32,
    /// Steps in an order where every step comes after those it reads from.
    pub steps: Vec<Step>,
    /// The step that reads the graph's entry topic.
    pub entry: usize,
    /// Where clients (and the gateway) write requests.
    pub entry_topic: String,
    /// Where final results are written.
    pub result_topic: String,
    /// Where shadow comparisons are written.
    pub comparison_topic: String,
}

/// A compiled step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Step name.
    pub name: String,
    /// What it runs.
    pub kind: StepKind,
    /// (name the step reads, source) pairs.
    pub inputs: Vec<(String, String)>,
    /// The tensors it produces (unqualified names).
    pub outputs: Vec<TensorSpec>,
    /// Steps its records go to next (a router picks among these).
    pub next: Vec<usize>,
    /// Sources a record arriving at this step must carry.
    pub carry: BTreeSet<String>,
    /// For a step inside a branch of a join: the join, and the parts a failure here stands for.
    pub failure_join: Option<(usize, Vec<String>)>,
    /// The topic the step's workers consume (for model steps, the primary model's topic).
    pub topic: String,
    /// Canary variant.
    pub canary: Option<Canary>,
    /// Shadow models: (model, its request topic).
    pub shadows: Vec<(String, String)>,
    /// Workers `sluice up` starts (built-in, combine and route steps).
    pub workers: usize,
    /// Runs in process right after its only predecessor, in that step's worker.
    pub fused: bool,
}

/// A compiled canary.
#[derive(Debug, Clone)]
pub struct Canary {
    /// Candidate model.
    pub model: String,
    /// Its request topic.
    pub topic: String,
    /// Share of requests, 0.0..=1.0.
    pub share: f64,
    /// Request parameter that keys the choice; `None` = the request id.
    pub key_parameter: Option<String>,
}

/// What a step runs.
#[derive(Debug, Clone)]
pub enum StepKind {
    /// A model (its worker pool is shared by every graph using it).
    Model(String),
    /// A built-in step.
    Builtin(Builtin),
    /// A join.
    Combine(Join),
    /// A router.
    Route(Route),
    /// Validation rules.
    Validate(Vec<ValidationRule>),
    /// Encodings into one feature vector, named by the second field.
    Encode(Vec<EncodeColumn>, String),
    /// A decision.
    Decide(DecideConfig),
    /// A feature lookup.
    Features(Box<FeaturesConfig>),
    /// A PostgreSQL lookup.
    Postgres(Box<crate::config::PostgresConfig>),
    /// An HTTP call.
    Http(Box<crate::config::HttpConfig>),
    /// Image decoding into the tensor named by the second field.
    DecodeImage(Box<crate::config::DecodeImageConfig>, String),
    /// A user step, built by the kind's registered builder.
    Custom(Box<crate::config::CustomStepConfig>),
}

/// A compiled combine step.
#[derive(Debug, Clone)]
pub struct Join {
    /// How parts merge.
    pub combiner: Combiner,
    /// (part step name, source) per part, in listed order.
    pub parts: Vec<(String, String)>,
    /// Per-part weights (`weighted_mean`).
    pub weights: Vec<f64>,
    /// Tie rule (`majority_vote`).
    pub tie: TieRule,
    /// Parts needed to answer at the timeout.
    pub quorum: usize,
    /// Wait after the first part.
    pub timeout: Duration,
}

/// A compiled router.
#[derive(Debug, Clone)]
pub struct Route {
    /// What the rule reads.
    pub by: Selector,
    /// Value → step indices.
    pub cases: BTreeMap<String, Vec<usize>>,
    /// Step indices for other values.
    pub default: Vec<usize>,
    /// A bandit router: it chooses the value (its own `arm` output) by a learned policy.
    pub bandit: Option<Box<Bandit>>,
}

/// A compiled bandit router.
#[derive(Debug, Clone)]
pub struct Bandit {
    /// Its settings (arms named by step, in config order).
    pub settings: crate::config::BanditConfig,
    /// Numbers per context row (0 for a policy that reads none).
    pub dims: usize,
}

/// What a router reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// A request parameter (JSON strings compare without their quotes).
    Parameter(String),
    /// The first element of a carried tensor.
    Tensor(String),
}

/// What one worker process runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// A model's worker pool.
    Model(String),
    /// A graph's step that is not a model.
    Step {
        /// The graph.
        graph: String,
        /// The step.
        step: String,
    },
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Model(m) => write!(f, "{m}"),
            Unit::Step { graph, step } => write!(f, "{graph}.{step}"),
        }
    }
}

impl Unit {
    /// Parses `model` or `graph.step`.
    pub fn parse(s: &str) -> Unit {
        match s.split_once('.') {
            Some((graph, step)) => Unit::Step {
                graph: graph.into(),
                step: step.into(),
            },
            None => Unit::Model(s.into()),
        }
    }
}

/// Every compiled graph, by name.
pub type Graphs = BTreeMap<String, Arc<Graph>>;

impl Graph {
    /// The step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The step that fused step `i` runs after, if `i` is fused.
    pub fn fused_after(&self, i: usize) -> Option<usize> {
        if !self.steps[i].fused {
            return None;
        }
        self.steps.iter().position(|s| s.next.contains(&i))
    }

    /// The graph's bandit router, if it has one: its step index and settings.
    pub fn bandit(&self) -> Option<(usize, &Bandit)> {
        self.steps
            .iter()
            .enumerate()
            .find_map(|(i, s)| match &s.kind {
                StepKind::Route(r) => r.bandit.as_deref().map(|b| (i, b)),
                _ => None,
            })
    }

    /// The unit that runs step `i` (for model steps, the primary model).
    pub fn unit_of(&self, i: usize) -> Unit {
        match &self.steps[i].kind {
            StepKind::Model(m) => Unit::Model(m.clone()),
            _ => Unit::Step {
                graph: self.name.clone(),
                step: self.steps[i].name.clone(),
            },
        }
    }
}

/// Whether the canary candidate serves the request keyed `key` (FNV-1a, stable across processes
/// and versions).
pub fn canary_picks(key: &str, share: f64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let threshold = (share.clamp(0.0, 1.0) * 10_000.0).round() as u64;
    h % 10_000 < threshold
}
