//! Graphs: named DAGs of steps declared in config and compiled, at start-up, into a routing plan
//! that every process holds. A step is a model, a built-in step, a combiner (a join) or a router.
//! Each step reads tensors from the request (`request.<input>`) or from earlier steps
//! (`<step>.<output>`); the compiled plan says which topic each step consumes, where each step's
//! records go next, and which tensors a record must still carry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_schemas::DataType;

use crate::config::{ModelConfig, TensorSpec};

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
    /// Partitions of the graph's own topics (entry, steps, results). When set, every model step's
    /// topic must have as many; when not, the most any of its models has.
    pub partitions: Option<i32>,
    /// The steps, in any order.
    pub steps: Vec<StepConfig>,
}

/// One step as written in config. Exactly one of `model`, `builtin`, `combine`, `route` is set.
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
    /// Run after this step even without reading from it (e.g. a router choosing by a request
    /// parameter once `after` has run).
    pub after: Option<String>,
    /// Model and built-in steps: input name → source (`request.<input>` or `<step>.<output>`).
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Combine steps: one source per part, each from a different parallel step.
    #[serde(default)]
    pub parts: Vec<String>,
    /// Combine steps: name of the combined tensor (default: the parts' tensor name).
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
    /// Built-in, combine and route steps: workers `sluice up` starts.
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

/// A compiled graph: the plan every process routes by.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Graph name (served as a model of that name).
    pub name: String,
    /// Version.
    pub version: String,
    /// Request tensors.
    pub inputs: Vec<TensorSpec>,
    /// Answer tensors: the outputs of the final step.
    pub outputs: Vec<TensorSpec>,
    /// Most rows per request.
    pub max_batch_size: usize,
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
    /// The interface as a model declaration (see [`Graph::interface`]).
    interface: ModelConfig,
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
    /// A graph's built-in, combine or route step.
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
    /// The graph's interface as a model: what clients send and get back (inputs, outputs,
    /// version, batch limit), checked against every request entering the graph.
    pub fn interface(&self) -> &ModelConfig {
        &self.interface
    }

    /// The step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
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

/// Topic names a graph's steps use (so compilation needs no whole [`crate::Config`]).
pub struct TopicNames<'a> {
    /// `kafka.topic_prefix`.
    pub prefix: &'a str,
}

impl TopicNames<'_> {
    /// A model's (or graph's) request topic.
    pub fn requests(&self, name: &str) -> String {
        format!("{}.{name}.requests", self.prefix)
    }
    /// A built-in step's topic.
    pub fn step(&self, graph: &str, step: &str) -> String {
        format!("{}.{graph}.{step}.requests", self.prefix)
    }
}

fn source_step(source: &str) -> Option<&str> {
    match source.split_once('.') {
        Some(("request", _)) => None,
        Some((step, _)) => Some(step),
        None => None,
    }
}

fn shapes_compatible(a: &[i64], b: &[i64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| *x == -1 || *y == -1 || x == y)
}

fn valid_step_name(s: &str) -> bool {
    !s.is_empty()
        && s != "request"
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Compiles graph `name`; every problem found is returned, each naming the graph and step.
pub fn compile(
    name: &str,
    g: &GraphConfig,
    models: &BTreeMap<String, ModelConfig>,
    topics: &TopicNames<'_>,
) -> Result<Graph, Vec<String>> {
    let key = format!("graphs.{name}");
    let mut p = Vec::new();
    if g.steps.is_empty() {
        return Err(vec![format!("{key}.steps: at least one step is required")]);
    }
    if g.inputs.is_empty() {
        p.push(format!("{key}.inputs: at least one is required"));
    }
    for s in &g.inputs {
        if s.shape.first() != Some(&-1) {
            p.push(format!(
                "{key}.inputs.{}.shape: the first dimension is the batch and must be -1",
                s.name
            ));
        }
    }
    if g.partitions.is_some_and(|n| n < 1) {
        p.push(format!("{key}.partitions: must be at least 1"));
    }
    if g.max_batch_size == 0 {
        p.push(format!("{key}.max_batch_size: must be at least 1"));
    }
    // Names and kinds.
    let mut index = BTreeMap::new();
    for (i, s) in g.steps.iter().enumerate() {
        let skey = format!("{key} step '{}'", s.name);
        if !valid_step_name(&s.name) {
            p.push(format!(
                "{skey}: step names may only contain a-z, 0-9, '_' and '-' (and not be 'request')"
            ));
        }
        if index.insert(s.name.clone(), i).is_some() {
            p.push(format!("{skey}: declared twice"));
        }
        let kinds = [
            s.model.is_some(),
            s.builtin.is_some(),
            s.combine.is_some(),
            s.route.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            p.push(format!(
                "{skey}: set exactly one of model, builtin, combine, route"
            ));
        }
        if let Some(m) = &s.model
            && !models.contains_key(m)
        {
            p.push(format!("{skey}: unknown model '{m}'"));
        }
        if s.model.is_none() && (s.canary.is_some() || !s.shadow.is_empty()) {
            p.push(format!(
                "{skey}: canary and shadow apply to model steps only"
            ));
        }
        if s.workers == 0 {
            p.push(format!("{skey}.workers: must be at least 1"));
        }
    }
    if !p.is_empty() {
        return Err(p);
    }

    // Dependencies: the steps each step reads from (plus a router for its targets).
    let n = g.steps.len();
    let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    let mut route_targets: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in g.steps.iter().enumerate() {
        let mut sources: Vec<&String> = s.inputs.values().chain(&s.parts).collect();
        if let Some(a) = &s.after {
            match index.get(a) {
                Some(&d) if d != i => {
                    deps[i].insert(d);
                }
                _ => p.push(format!(
                    "{key} step '{}': after = '{a}' names no other step",
                    s.name
                )),
            }
        }
        if let Some(r) = &s.route {
            if !r.by.starts_with("parameter:") {
                sources.push(&r.by);
            }
            for t in r.cases.values().flatten().chain(&r.default) {
                match index.get(t) {
                    Some(&ti) => {
                        if !route_targets[i].contains(&ti) {
                            route_targets[i].push(ti);
                        }
                    }
                    None => p.push(format!(
                        "{key} step '{}': routes to unknown step '{t}'",
                        s.name
                    )),
                }
            }
        }
        for src in sources {
            if !src.contains('.') {
                p.push(format!(
                    "{key} step '{}': source '{src}' must be request.<input> or <step>.<output>",
                    s.name
                ));
                continue;
            }
            if let Some(step) = source_step(src) {
                match index.get(step) {
                    Some(&d) if d == i => {
                        p.push(format!("{key} step '{}': reads its own output", s.name))
                    }
                    Some(&d) => {
                        deps[i].insert(d);
                    }
                    None => p.push(format!(
                        "{key} step '{}': reads '{src}', but there is no step '{step}'",
                        s.name
                    )),
                }
            }
        }
    }
    for (r, targets) in route_targets.iter().enumerate() {
        for &t in targets {
            deps[t].insert(r);
        }
    }
    if !p.is_empty() {
        return Err(p);
    }

    // Topological order (Kahn); what is left over is on a cycle.
    let mut indegree: Vec<usize> = deps.iter().map(BTreeSet::len).collect();
    let mut order = Vec::with_capacity(n);
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    while let Some(i) = ready.pop() {
        order.push(i);
        for j in 0..n {
            if deps[j].contains(&i) {
                indegree[j] -= 1;
                if indegree[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    if order.len() < n {
        let cyclic: Vec<&str> = (0..n)
            .filter(|i| !order.contains(i))
            .map(|i| g.steps[i].name.as_str())
            .collect();
        return Err(vec![format!(
            "{key}: steps {cyclic:?} form a cycle (each reads, directly or not, from the others)"
        )]);
    }
    // Ancestors, in topological order.
    let mut ancestors: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    for &i in &order {
        let mut a = BTreeSet::new();
        for &d in &deps[i] {
            a.insert(d);
            a.extend(ancestors[d].iter().copied());
        }
        ancestors[i] = a;
    }
    // Immediate predecessors: dependencies not already reached through another dependency.
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut entries = Vec::new();
    for (i, (s, dep)) in g.steps.iter().zip(&deps).enumerate() {
        let preds: Vec<usize> = dep
            .iter()
            .copied()
            .filter(|&d| !dep.iter().any(|&o| o != d && ancestors[o].contains(&d)))
            .collect();
        if preds.is_empty() {
            entries.push(i);
        }
        if s.combine.is_none() && preds.len() > 1 {
            let names: Vec<&str> = preds.iter().map(|&d| g.steps[d].name.as_str()).collect();
            p.push(format!(
                "{key} step '{}': reads from {names:?}, which run in parallel; join them with a combine step first",
                s.name
            ));
        }
        for d in preds {
            next[d].push(i);
        }
    }
    if entries.len() != 1 {
        let names: Vec<&str> = entries.iter().map(|&i| g.steps[i].name.as_str()).collect();
        p.push(format!(
            "{key}: a graph needs exactly one first step (reading only request tensors), found {names:?}"
        ));
    }
    for (r, targets) in route_targets.iter().enumerate() {
        if g.steps[r].route.is_none() {
            continue;
        }
        for t in &next[r] {
            if !targets.contains(t) {
                p.push(format!(
                    "{key} step '{}': follows router '{}' but is not one of its routes",
                    g.steps[*t].name, g.steps[r].name
                ));
            }
        }
        for t in targets {
            if !next[r].contains(t) {
                p.push(format!(
                    "{key} step '{}': routed to by '{}' but reads from a step after it",
                    g.steps[*t].name, g.steps[r].name
                ));
            }
        }
    }
    if !p.is_empty() {
        return Err(p);
    }
    let entry = entries[0];

    // Tensor specs, step by step in order.
    let mut outputs: Vec<Vec<TensorSpec>> = vec![Vec::new(); n];
    let spec_of = |src: &str, outputs: &Vec<Vec<TensorSpec>>| -> Option<TensorSpec> {
        let (step, tensor) = src.split_once('.')?;
        if step == "request" {
            return g.inputs.iter().find(|t| t.name == tensor).cloned();
        }
        let i = *index.get(step)?;
        outputs[i].iter().find(|t| t.name == tensor).cloned()
    };
    let mut joins: Vec<Option<Join>> = vec![None; n];
    let mut routes: Vec<Option<Route>> = vec![None; n];
    for &i in &order {
        let s = &g.steps[i];
        let skey = format!("{key} step '{}'", s.name);
        let reads = |src: &str, p: &mut Vec<String>| -> Option<TensorSpec> {
            if let Some(step) = source_step(src)
                && let Some(&d) = index.get(step)
                && !ancestors[i].contains(&d)
            {
                p.push(format!(
                    "{skey}: reads '{src}' from a step that does not run before it"
                ));
                return None;
            }
            let spec = spec_of(src, &outputs);
            if spec.is_none() {
                p.push(format!("{skey}: reads '{src}', which no step produces"));
            }
            spec
        };
        if let Some(m) = s.model.as_ref().and_then(|m| models.get(m)) {
            for want in &m.inputs {
                if !s.inputs.contains_key(&want.name) {
                    p.push(format!("{skey}: model input '{}' is not mapped", want.name));
                }
            }
            for (input, src) in &s.inputs {
                let Some(want) = m.inputs.iter().find(|t| &t.name == input) else {
                    p.push(format!(
                        "{skey}: model '{}' has no input '{input}'",
                        s.model.as_deref().unwrap_or_default()
                    ));
                    continue;
                };
                if let Some(got) = reads(src, &mut p) {
                    check_fit(&skey, input, src, want, &got, &mut p);
                }
            }
            outputs[i] = m.outputs.clone();
            let variants = s
                .canary
                .iter()
                .map(|c| c.model.clone())
                .chain(s.shadow.iter().cloned());
            for v in variants {
                match models.get(&v) {
                    None => p.push(format!("{skey}: unknown candidate/shadow model '{v}'")),
                    Some(c) => {
                        if c.inputs != m.inputs || c.outputs != m.outputs {
                            p.push(format!(
                                "{skey}: model '{v}' must have the same inputs and outputs as '{}'",
                                s.model.as_deref().unwrap_or_default()
                            ));
                        }
                    }
                }
            }
            if let Some(c) = &s.canary {
                if !(0.0..=1.0).contains(&c.share) {
                    p.push(format!("{skey}.canary.share: must be between 0 and 1"));
                }
                if let Some(k) = &c.key
                    && !k.starts_with("parameter:")
                {
                    p.push(format!("{skey}.canary.key: must be parameter:<name>"));
                }
            }
            if let Some(want) = g.partitions
                && m.partitions != want
            {
                p.push(format!(
                    "{skey}: model '{}' has {} partitions, the graph {want}; a graph's topics must agree",
                    s.model.as_deref().unwrap_or_default(),
                    m.partitions,
                ));
            }
        } else if let Some(b) = s.builtin {
            match b {
                Builtin::Argmax => {
                    let names: Vec<&String> = s.inputs.keys().collect();
                    if names != ["probabilities"] {
                        p.push(format!(
                            "{skey}: argmax reads exactly one input, 'probabilities'"
                        ));
                    } else if let Some(got) = reads(&s.inputs["probabilities"], &mut p)
                        && (got.datatype != DataType::Fp32 || got.shape.len() != 2)
                    {
                        p.push(format!(
                            "{skey}: argmax needs FP32 [batch, classes] probabilities, '{}' is {} {:?}",
                            s.inputs["probabilities"], got.datatype, got.shape
                        ));
                    }
                    outputs[i] = vec![
                        spec("label", DataType::Int64, vec![-1]),
                        spec("probability", DataType::Fp32, vec![-1]),
                    ];
                }
            }
        } else if let Some(c) = s.combine {
            let mut part_specs = Vec::new();
            let mut parts = Vec::new();
            for src in &s.parts {
                if let Some(got) = reads(src, &mut p) {
                    part_specs.push(got);
                }
                let step = source_step(src).unwrap_or("request");
                if parts.iter().any(|(st, _): &(String, String)| st == step) {
                    p.push(format!("{skey}: two parts come from step '{step}'"));
                }
                parts.push((step.to_string(), src.clone()));
            }
            if parts.is_empty() {
                p.push(format!("{skey}: a combine step needs parts"));
            }
            if !s.inputs.is_empty() {
                p.push(format!(
                    "{skey}: a combine step takes 'parts', not 'inputs'"
                ));
            }
            let quorum = s.quorum.unwrap_or(parts.len());
            if quorum == 0 || quorum > parts.len() {
                p.push(format!(
                    "{skey}.quorum: must be between 1 and {}",
                    parts.len()
                ));
            }
            if c == Combiner::WeightedMean
                && (s.weights.len() != parts.len()
                    || s.weights.iter().any(|w| !w.is_finite() || *w < 0.0)
                    || s.weights.iter().sum::<f64>() <= 0.0)
            {
                p.push(format!(
                    "{skey}.weights: weighted_mean needs one non-negative weight per part ({}), not all zero",
                    parts.len()
                ));
            }
            if let Some(out) = combined_spec(&skey, c, &part_specs, s.output.as_deref(), &mut p)
                && part_specs.len() == parts.len()
            {
                outputs[i] = vec![out];
            }
            joins[i] = Some(Join {
                combiner: c,
                parts,
                weights: s.weights.clone(),
                tie: s.tie,
                quorum,
                timeout: s.timeout,
            });
        } else if let Some(r) = &s.route {
            let by = match r.by.strip_prefix("parameter:") {
                Some(name) => Selector::Parameter(name.to_string()),
                None => {
                    reads(&r.by, &mut p);
                    Selector::Tensor(r.by.clone())
                }
            };
            let idx = |names: &Vec<String>| -> Vec<usize> {
                names.iter().filter_map(|t| index.get(t).copied()).collect()
            };
            routes[i] = Some(Route {
                by,
                cases: r.cases.iter().map(|(k, v)| (k.clone(), idx(v))).collect(),
                default: idx(&r.default),
            });
        }
    }
    if !p.is_empty() {
        return Err(p);
    }

    // Every way through the routers must reach exactly one final step, run no non-join step
    // twice, and bring each join all of its parts.
    let terminals: Vec<usize> = (0..n).filter(|&i| next[i].is_empty()).collect();
    check_flows(
        &key, g, &order, entry, &next, &routes, &joins, &index, &mut p,
    );
    for &t in &terminals {
        if routes[t].is_some() {
            p.push(format!(
                "{key} step '{}': a router cannot be the last step",
                g.steps[t].name
            ));
        }
        if outputs[t] != outputs[terminals[0]] {
            p.push(format!(
                "{key}: final steps '{}' and '{}' produce different outputs; every way through the graph must answer alike",
                g.steps[terminals[0]].name, g.steps[t].name
            ));
        }
    }
    if !p.is_empty() {
        return Err(p);
    }

    // What each arriving record must carry: the step's own sources, plus what later steps need
    // that this step does not produce.
    let mut carry: Vec<BTreeSet<String>> = vec![BTreeSet::new(); n];
    for &i in order.iter().rev() {
        let s = &g.steps[i];
        let mut c: BTreeSet<String> = s.inputs.values().chain(&s.parts).cloned().collect();
        if let Some(r) = &s.route
            && !r.by.starts_with("parameter:")
        {
            c.insert(r.by.clone());
        }
        for &j in &next[i] {
            for src in &carry[j] {
                if source_step(src) != Some(s.name.as_str()) {
                    c.insert(src.clone());
                }
            }
        }
        carry[i] = c;
    }
    // A failure inside a join's branch goes to the join as a failed part.
    let mut failure_join: Vec<Option<(usize, Vec<String>)>> = vec![None; n];
    for (i, slot) in failure_join.iter_mut().enumerate() {
        for &j in &order {
            let Some(join) = &joins[j] else { continue };
            let reached: Vec<String> = join
                .parts
                .iter()
                .filter(|(st, _)| {
                    index
                        .get(st)
                        .is_some_and(|&ps| ps == i || ancestors[ps].contains(&i))
                })
                .map(|(st, _)| st.clone())
                .collect();
            if !reached.is_empty() && reached.len() < join.parts.len() {
                *slot = Some((j, reached));
                break;
            }
        }
    }

    let steps: Vec<Step> = order
        .iter()
        .map(|&i| {
            let s = &g.steps[i];
            let kind = match (&s.model, s.builtin, &joins[i], &routes[i]) {
                (Some(m), _, _, _) => StepKind::Model(m.clone()),
                (_, Some(b), _, _) => StepKind::Builtin(b),
                (_, _, Some(j), _) => StepKind::Combine(j.clone()),
                (_, _, _, Some(r)) => StepKind::Route(r.clone()),
                _ => StepKind::Builtin(Builtin::Argmax),
            };
            let topic = match &s.model {
                Some(m) => topics.requests(m),
                None => topics.step(name, &s.name),
            };
            Step {
                name: s.name.clone(),
                kind,
                inputs: s
                    .inputs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                outputs: outputs[i].clone(),
                next: next[i].clone(),
                carry: carry[i].clone(),
                failure_join: failure_join[i].clone(),
                topic,
                canary: s.canary.as_ref().map(|c| Canary {
                    model: c.model.clone(),
                    topic: topics.requests(&c.model),
                    share: c.share,
                    key_parameter: c
                        .key
                        .as_ref()
                        .and_then(|k| k.strip_prefix("parameter:"))
                        .map(str::to_string),
                }),
                shadows: s
                    .shadow
                    .iter()
                    .map(|m| (m.clone(), topics.requests(m)))
                    .collect(),
                workers: s.workers,
            }
        })
        .collect();
    // Re-index step references from config order to topological order.
    let pos: Vec<usize> = {
        let mut pos = vec![0; n];
        for (k, &i) in order.iter().enumerate() {
            pos[i] = k;
        }
        pos
    };
    let mut steps = steps;
    for s in &mut steps {
        s.next = s.next.iter().map(|&i| pos[i]).collect();
        if let Some((j, parts)) = &s.failure_join {
            s.failure_join = Some((pos[*j], parts.clone()));
        }
        if let StepKind::Route(r) = &mut s.kind {
            for v in r.cases.values_mut().chain(std::iter::once(&mut r.default)) {
                *v = v.iter().map(|&i| pos[i]).collect();
            }
        }
    }
    let partitions = g.partitions.unwrap_or_else(|| {
        g.steps
            .iter()
            .filter_map(|s| models.get(s.model.as_ref()?))
            .map(|m| m.partitions)
            .max()
            .unwrap_or(1)
    });
    let interface = ModelConfig {
        onnx: Default::default(),
        version: g.version.clone(),
        inputs: g.inputs.clone(),
        outputs: outputs[terminals[0]].clone(),
        max_batch_size: g.max_batch_size,
        max_delay: Duration::ZERO,
        threads: 1,
        intra_op_threads: 1,
        partitions,
        workers: 1,
    };
    Ok(Graph {
        name: name.to_string(),
        version: g.version.clone(),
        inputs: g.inputs.clone(),
        outputs: outputs[terminals[0]].clone(),
        max_batch_size: g.max_batch_size,
        partitions,
        interface,
        steps,
        entry: pos[entry],
        entry_topic: topics.requests(name),
        result_topic: format!("{}.{name}.results", topics.prefix),
        comparison_topic: format!("{}.{name}.comparisons", topics.prefix),
    })
}

fn spec(name: &str, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype,
        shape,
    }
}

fn check_fit(
    skey: &str,
    input: &str,
    src: &str,
    want: &TensorSpec,
    got: &TensorSpec,
    p: &mut Vec<String>,
) {
    if want.datatype != got.datatype {
        p.push(format!(
            "{skey}: input '{input}' wants {}, but '{src}' is {}",
            want.datatype, got.datatype
        ));
    } else if !shapes_compatible(&want.shape, &got.shape) {
        p.push(format!(
            "{skey}: input '{input}' wants shape {:?}, but '{src}' has {:?}",
            want.shape, got.shape
        ));
    }
}

fn combined_spec(
    skey: &str,
    c: Combiner,
    parts: &[TensorSpec],
    output: Option<&str>,
    p: &mut Vec<String>,
) -> Option<TensorSpec> {
    let first = parts.first()?;
    let name = output.unwrap_or(&first.name).to_string();
    for t in &parts[1..] {
        if t.datatype != first.datatype {
            p.push(format!(
                "{skey}: parts have different datatypes ({} and {})",
                first.datatype, t.datatype
            ));
            return None;
        }
        if c != Combiner::Concat && !shapes_compatible(&t.shape, &first.shape) {
            p.push(format!(
                "{skey}: parts have different shapes ({:?} and {:?})",
                first.shape, t.shape
            ));
            return None;
        }
    }
    let fp32 = first.datatype == DataType::Fp32;
    let integer = matches!(first.datatype, DataType::Int64 | DataType::Int32);
    let ok = match c {
        Combiner::Mean | Combiner::WeightedMean => fp32,
        Combiner::MaxConfidence => fp32 && first.shape.len() == 2,
        Combiner::MajorityVote => integer && first.shape.len() == 1,
        Combiner::First => true,
        Combiner::Concat => parts.iter().all(|t| t.shape.len() == 2),
    };
    if !ok {
        p.push(format!(
            "{skey}: {c:?} cannot combine {} {:?} (mean/weighted_mean: FP32; max_confidence: FP32 [batch, k]; majority_vote: INT32/INT64 [batch]; concat: [batch, k])",
            first.datatype, first.shape
        ));
        return None;
    }
    let shape = if c == Combiner::Concat {
        let width = parts.iter().try_fold(0i64, |acc, t| {
            let d = t.shape[1];
            (d > 0).then_some(acc + d)
        });
        vec![-1, width.unwrap_or(-1)]
    } else {
        first.shape.clone()
    };
    Some(TensorSpec {
        name,
        datatype: first.datatype,
        shape,
    })
}

#[allow(clippy::too_many_arguments)]
fn check_flows(
    key: &str,
    g: &GraphConfig,
    order: &[usize],
    entry: usize,
    next: &[Vec<usize>],
    routes: &[Option<Route>],
    joins: &[Option<Join>],
    index: &BTreeMap<String, usize>,
    p: &mut Vec<String>,
) {
    let routers: Vec<usize> = (0..next.len()).filter(|&i| routes[i].is_some()).collect();
    let options = |r: usize| -> Vec<Vec<usize>> {
        let route = routes[r].as_ref().map(|r| {
            let mut o: Vec<Vec<usize>> = r.cases.values().cloned().collect();
            if !r.default.is_empty() {
                o.push(r.default.clone());
            }
            o
        });
        route.unwrap_or_default()
    };
    let mut choice = vec![0usize; routers.len()];
    for _ in 0..4096 {
        let picked: BTreeMap<usize, Vec<usize>> = routers
            .iter()
            .zip(&choice)
            .map(|(&r, &c)| (r, options(r).get(c).cloned().unwrap_or_default()))
            .collect();
        let mut tokens = vec![0usize; next.len()];
        let mut from: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); next.len()];
        tokens[entry] = 1;
        let mut answers = 0;
        for &i in order {
            if tokens[i] == 0 {
                continue;
            }
            let name = &g.steps[i].name;
            if let Some(j) = &joins[i] {
                let missing: Vec<&str> = j
                    .parts
                    .iter()
                    .filter(|(st, _)| !index.get(st).is_some_and(|ps| from[i].contains(ps)))
                    .map(|(st, _)| st.as_str())
                    .collect();
                if !missing.is_empty() {
                    p.push(format!(
                        "{key} step '{name}': on some routes parts {missing:?} never arrive"
                    ));
                    return;
                }
            } else if tokens[i] > 1 {
                p.push(format!(
                    "{key} step '{name}': would run {} times per request; join the parallel steps before it with a combine step",
                    tokens[i]
                ));
                return;
            }
            let targets = picked.get(&i).cloned().unwrap_or_else(|| next[i].clone());
            if next[i].is_empty() {
                answers += 1;
            }
            for t in targets {
                tokens[t] += 1;
                from[t].insert(i);
            }
        }
        if answers != 1 {
            p.push(format!(
                "{key}: a request would be answered {answers} times; parallel steps must end in a combine step"
            ));
            return;
        }
        // Next combination of router choices.
        let mut k = 0;
        loop {
            if k == routers.len() {
                return;
            }
            choice[k] += 1;
            if choice[k] < options(routers[k]).len().max(1) {
                break;
            }
            choice[k] = 0;
            k += 1;
        }
    }
}

/// Building graphs from TOML snippets in tests (enabled by the `fixtures` feature).
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use sluice_schemas::DataType;

    use super::{Graph, GraphConfig, TopicNames, compile};
    use crate::config::{ModelConfig, TensorSpec};

    /// A (name, datatype, shape) tensor declaration.
    pub type Spec<'a> = (&'a str, DataType, Vec<i64>);

    /// A model declaration with these inputs and outputs (file name `m.onnx`, batch 8).
    pub fn model(inputs: &[Spec<'_>], outputs: &[Spec<'_>]) -> ModelConfig {
        let specs = |v: &[Spec<'_>]| {
            v.iter()
                .map(|(name, datatype, shape)| TensorSpec {
                    name: name.to_string(),
                    datatype: *datatype,
                    shape: shape.clone(),
                })
                .collect()
        };
        ModelConfig {
            onnx: "m.onnx".into(),
            version: "1".into(),
            inputs: specs(inputs),
            outputs: specs(outputs),
            max_batch_size: 8,
            max_delay: Duration::ZERO,
            threads: 1,
            intra_op_threads: 1,
            partitions: 1,
            workers: 1,
        }
    }

    /// Compiles graph `g` from `[[steps]]` TOML, with one FP32 request input `input` of
    /// `[-1, width]`, topics prefixed `prefix`.
    pub fn compile_steps(
        steps: &str,
        width: i64,
        models: &BTreeMap<String, ModelConfig>,
        prefix: &str,
    ) -> Result<Graph, Vec<String>> {
        let text = format!(
            "inputs = [{{ name = \"input\", datatype = \"FP32\", shape = [-1, {width}] }}]\n{steps}"
        );
        let g: GraphConfig = toml::from_str(&text).map_err(|e| vec![e.to_string()])?;
        compile("g", &g, models, &TopicNames { prefix })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::fixtures::model;
    use super::*;

    fn models() -> BTreeMap<String, ModelConfig> {
        let classifier = || {
            model(
                &[("input", DataType::Fp32, vec![-1, 64])],
                &[
                    ("label", DataType::Int64, vec![-1]),
                    ("probabilities", DataType::Fp32, vec![-1, 10]),
                ],
            )
        };
        [
            (
                "scaler".to_string(),
                model(
                    &[("input", DataType::Fp32, vec![-1, 64])],
                    &[("scaled", DataType::Fp32, vec![-1, 64])],
                ),
            ),
            ("mlp".to_string(), classifier()),
            ("logreg".to_string(), classifier()),
            ("forest".to_string(), classifier()),
        ]
        .into()
    }

    fn graph(toml_steps: &str) -> Result<Graph, Vec<String>> {
        fixtures::compile_steps(toml_steps, 64, &models(), "sluice")
    }

    const PIPELINE: &str = r#"
[[steps]]
name = "post"
builtin = "argmax"
inputs = { probabilities = "classify.probabilities" }
[[steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[steps]]
name = "classify"
model = "mlp"
inputs = { input = "scale.scaled" }
"#;

    const ENSEMBLE: &str = r#"
[[steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[steps]]
name = "mlp"
model = "mlp"
inputs = { input = "scale.scaled" }
[[steps]]
name = "logreg"
model = "logreg"
inputs = { input = "scale.scaled" }
[[steps]]
name = "forest"
model = "forest"
inputs = { input = "scale.scaled" }
[[steps]]
name = "vote"
combine = "majority_vote"
parts = ["mlp.label", "logreg.label", "forest.label"]
"#;

    #[test]
    fn pipeline_compiles_in_order_with_carried_tensors() {
        let g = graph(PIPELINE).unwrap();
        let names: Vec<&str> = g.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["scale", "classify", "post"]);
        assert_eq!(g.entry, 0);
        assert_eq!(g.steps[0].topic, "sluice.scaler.requests");
        assert_eq!(g.steps[2].topic, "sluice.g.post.requests");
        assert_eq!(g.steps[0].next, [1]);
        assert_eq!(g.steps[1].next, [2]);
        assert!(g.steps[2].next.is_empty());
        assert_eq!(
            g.steps[1].carry,
            BTreeSet::from(["scale.scaled".to_string()])
        );
        assert_eq!(
            g.steps[2].carry,
            BTreeSet::from(["classify.probabilities".to_string()])
        );
        let outs: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outs, ["label", "probability"]);
        assert_eq!(g.entry_topic, "sluice.g.requests");
    }

    #[test]
    fn ensemble_fans_out_and_joins() {
        let g = graph(ENSEMBLE).unwrap();
        let scale = g.step_index("scale").unwrap();
        let vote = g.step_index("vote").unwrap();
        assert_eq!(g.steps[scale].next.len(), 3);
        assert!(g.steps[scale].failure_join.is_none(), "before the fan-out");
        let mlp = g.step_index("mlp").unwrap();
        assert_eq!(g.steps[mlp].next, [vote]);
        assert_eq!(
            g.steps[mlp].failure_join,
            Some((vote, vec!["mlp".to_string()]))
        );
        let StepKind::Combine(j) = &g.steps[vote].kind else {
            panic!("not a join")
        };
        assert_eq!(j.quorum, 3);
        assert_eq!(g.outputs[0].name, "label");
        assert_eq!(g.outputs[0].datatype, DataType::Int64);
    }

    fn err(steps: &str) -> String {
        graph(steps).unwrap_err().join("\n")
    }

    #[test]
    fn cycles_unknown_steps_and_missing_tensors_are_named() {
        let cyc = err(r#"
[[steps]]
name = "a"
model = "scaler"
inputs = { input = "b.scaled" }
[[steps]]
name = "b"
model = "scaler"
inputs = { input = "a.scaled" }
"#);
        assert!(cyc.contains("cycle") && cyc.contains("\"a\""), "{cyc}");
        let unknown = err(&PIPELINE.replace("scale.scaled", "scal.scaled"));
        assert!(
            unknown.contains("step 'classify'") && unknown.contains("no step 'scal'"),
            "{unknown}"
        );
        let missing = err(&PIPELINE.replace("scale.scaled", "scale.nothing"));
        assert!(
            missing.contains("'scale.nothing', which no step produces"),
            "{missing}"
        );
        let model = err(&PIPELINE.replace("model = \"mlp\"", "model = \"mpl\""));
        assert!(model.contains("unknown model 'mpl'"), "{model}");
    }

    #[test]
    fn mismatched_dtypes_and_shapes_are_named() {
        let dtype = err(&PIPELINE.replace("scale.scaled", "classify.label"));
        assert!(
            dtype.contains("cycle") || dtype.contains("own output"),
            "{dtype}"
        );
        let dtype = err(&PIPELINE.replace(
            "builtin = \"argmax\"\ninputs = { probabilities = \"classify.probabilities\" }",
            "model = \"scaler\"\ninputs = { input = \"classify.label\" }",
        ));
        assert!(
            dtype.contains("step 'post': input 'input' wants FP32, but 'classify.label' is INT64"),
            "{dtype}"
        );
        let shape = err(&ENSEMBLE.replace(
            "parts = [\"mlp.label\", \"logreg.label\", \"forest.label\"]",
            "parts = [\"mlp.label\", \"logreg.probabilities\"]",
        ));
        assert!(shape.contains("different"), "{shape}");
    }

    #[test]
    fn parallel_steps_without_a_join_are_rejected() {
        let no_join = err(&ENSEMBLE.replace(
            "combine = \"majority_vote\"\nparts = [\"mlp.label\", \"logreg.label\", \"forest.label\"]",
            "builtin = \"argmax\"\ninputs = { probabilities = \"mlp.probabilities\" }",
        ));
        assert!(no_join.contains("answered"), "{no_join}");
        let two_preds = err(&ENSEMBLE.replace(
            "combine = \"majority_vote\"\nparts = [\"mlp.label\", \"logreg.label\", \"forest.label\"]",
            "model = \"scaler\"\ninputs = { input = \"mlp.probabilities\", other = \"logreg.probabilities\" }",
        ));
        assert!(two_preds.contains("run in parallel"), "{two_preds}");
    }

    #[test]
    fn routers_pick_among_branches_that_each_answer() {
        let g = graph(
            r#"
[[steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[steps]]
name = "pick"
after = "scale"
route = { by = "parameter:tier", cases = { fast = ["fast"] }, default = ["accurate"] }
[[steps]]
name = "fast"
model = "logreg"
inputs = { input = "scale.scaled" }
[[steps]]
name = "accurate"
model = "mlp"
inputs = { input = "scale.scaled" }
"#,
        )
        .unwrap();
        let pick = g.step_index("pick").unwrap();
        assert_eq!(g.steps[pick].next.len(), 2);
        let StepKind::Route(r) = &g.steps[pick].kind else {
            panic!("not a router")
        };
        assert_eq!(r.by, Selector::Parameter("tier".into()));
        assert_eq!(r.cases["fast"], [g.step_index("fast").unwrap()]);
        assert!(g.steps[pick].carry.contains("scale.scaled"));
    }

    #[test]
    fn canary_and_shadow_need_compatible_models() {
        let ok = graph(&PIPELINE.replace(
            "model = \"mlp\"",
            "model = \"mlp\"\ncanary = { model = \"logreg\", share = 0.25 }\nshadow = [\"forest\"]",
        ))
        .unwrap();
        let c = ok.steps[1].canary.as_ref().unwrap();
        assert_eq!(
            (c.model.as_str(), c.topic.as_str()),
            ("logreg", "sluice.logreg.requests")
        );
        assert_eq!(ok.steps[1].shadows[0].0, "forest");
        let bad = err(&PIPELINE.replace(
            "model = \"mlp\"",
            "model = \"mlp\"\ncanary = { model = \"scaler\", share = 2.0 }",
        ));
        assert!(
            bad.contains("same inputs and outputs") && bad.contains("share"),
            "{bad}"
        );
    }

    #[test]
    fn partitions_default_to_the_models_and_must_agree_when_set() {
        assert_eq!(graph(PIPELINE).unwrap().partitions, 1);
        let e = err(&format!("partitions = 2\n{PIPELINE}"));
        assert!(
            e.contains("step 'scale': model 'scaler' has 1 partitions, the graph 2"),
            "{e}"
        );
    }

    #[test]
    fn canary_choice_is_stable_and_close_to_the_share() {
        let picked = (0..10_000)
            .filter(|i| canary_picks(&format!("req-{i}"), 0.2))
            .count();
        assert!((1_800..2_200).contains(&picked), "{picked}");
        assert!(canary_picks("x", 1.0) && !canary_picks("x", 0.0));
        assert_eq!(canary_picks("user-7", 0.5), canary_picks("user-7", 0.5));
    }
}
