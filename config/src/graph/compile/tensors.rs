//! Pass 3, tensor flow: step by step in order, what each step reads (it must exist and run
//! before it), whether it fits (datatype, shape), what each step produces, and the compiled join
//! and router settings. Canary and shadow models must match the primary's interface.

use std::collections::{BTreeMap, BTreeSet};

use sluice_schemas::DataType;

use super::logic;
use super::order::Order;
use super::{shapes_compatible, source_step};
use crate::config::{
    BanditConfig, Builtin, CombineStep, Combiner, GraphConfig, ModelConfig, ModelStep, RouteConfig,
    StepConfig, StepKindConfig, TensorSpec,
};
use crate::graph::{Bandit, Join, Route, Selector};

/// What flows through the graph, indexed in config order.
pub(super) struct Flow {
    /// Each step's output tensors (unqualified names).
    pub(super) outputs: Vec<Vec<TensorSpec>>,
    /// Compiled joins, for combine steps.
    pub(super) joins: Vec<Option<Join>>,
    /// Compiled routers, for route steps (targets still in config order).
    pub(super) routes: Vec<Option<Route>>,
}

/// Resolves each step's inputs and outputs; every problem names its step.
pub(super) fn resolve(
    key: &str,
    g: &GraphConfig,
    models: &BTreeMap<String, ModelConfig>,
    index: &BTreeMap<String, usize>,
    shape: &Order,
) -> Result<Flow, Vec<String>> {
    let n = g.steps.len();
    let mut walk = Walk {
        g,
        models,
        index,
        ancestors: &shape.ancestors,
        outputs: vec![Vec::new(); n],
        joins: vec![None; n],
        routes: vec![None; n],
        p: Vec::new(),
    };
    for &i in &shape.order {
        walk.step(key, i);
    }
    let bandits = g
        .steps
        .iter()
        .filter(|s| matches!(s.kind, StepKindConfig::Bandit(_)))
        .count();
    if bandits > 1 {
        walk.p.push(format!(
            "{key}: at most one bandit step per graph (feedback names a request, and so one choice)"
        ));
    }
    if !walk.p.is_empty() {
        return Err(walk.p);
    }
    Ok(Flow {
        outputs: walk.outputs,
        joins: walk.joins,
        routes: walk.routes,
    })
}

/// The walk in topological order: what is resolved so far, shared by each kind's check.
struct Walk<'a> {
    g: &'a GraphConfig,
    models: &'a BTreeMap<String, ModelConfig>,
    index: &'a BTreeMap<String, usize>,
    ancestors: &'a [BTreeSet<usize>],
    outputs: Vec<Vec<TensorSpec>>,
    joins: Vec<Option<Join>>,
    routes: Vec<Option<Route>>,
    p: Vec<String>,
}

/// The step being checked: its position in config order and how problems name it.
struct At<'a> {
    i: usize,
    skey: String,
    step: &'a StepConfig,
}

impl<'a> Walk<'a> {
    /// Checks step `i` by its kind and records what it produces.
    fn step(&mut self, key: &str, i: usize) {
        let step = &self.g.steps[i];
        let at = At {
            i,
            skey: format!("{key} step '{}'", step.name),
            step,
        };
        self.outputs[i] = match &step.kind {
            StepKindConfig::Model(m) => self.model(&at, m),
            StepKindConfig::Builtin(Builtin::Argmax) => self.argmax(&at),
            StepKindConfig::Combine(c) => self.combine(&at, c),
            StepKindConfig::Route(r) => {
                self.route(&at, r);
                Vec::new()
            }
            StepKindConfig::Bandit(b) => self.bandit(&at, b),
            _ => self.logic(&at),
        };
    }

    /// The spec of source `src` read by `at`, which must run after the step producing it.
    fn reads(&mut self, at: &At<'_>, src: &str) -> Option<TensorSpec> {
        if let Some(step) = source_step(src)
            && let Some(&d) = self.index.get(step)
            && !self.ancestors[at.i].contains(&d)
        {
            self.p.push(format!(
                "{}: reads '{src}' from a step that does not run before it",
                at.skey
            ));
            return None;
        }
        let spec = self.spec_of(src);
        if spec.is_none() {
            self.p.push(format!(
                "{}: reads '{src}', which no step produces",
                at.skey
            ));
        }
        spec
    }

    fn spec_of(&self, src: &str) -> Option<TensorSpec> {
        let (step, tensor) = src.split_once('.')?;
        let specs = if step == "request" {
            &self.g.inputs
        } else {
            &self.outputs[*self.index.get(step)?]
        };
        specs.iter().find(|t| t.name == tensor).cloned()
    }

    /// A model step: every model input mapped and fitting; canary and shadows alike.
    fn model(&mut self, at: &At<'_>, step: &ModelStep) -> Vec<TensorSpec> {
        let skey = &at.skey;
        let Some(m) = self.models.get(&step.model) else {
            return Vec::new(); // reported by pass 1
        };
        for want in &m.inputs {
            if !at.step.inputs.contains_key(&want.name) {
                self.p
                    .push(format!("{skey}: model input '{}' is not mapped", want.name));
            }
        }
        for (input, src) in &at.step.inputs {
            let Some(want) = m.inputs.iter().find(|t| &t.name == input) else {
                self.p.push(format!(
                    "{skey}: model '{}' has no input '{input}'",
                    step.model
                ));
                continue;
            };
            if let Some(got) = self.reads(at, src) {
                check_fit(skey, input, src, want, &got, &mut self.p);
            }
        }
        self.variants(skey, step, m);
        if let Some(want) = self.g.partitions
            && m.partitions != want
        {
            self.p.push(format!(
                "{skey}: model '{}' has {} partitions, the graph {want}; a graph's topics must agree",
                step.model, m.partitions,
            ));
        }
        m.outputs.clone()
    }

    /// Canary and shadow models: known, with the primary's interface; a valid canary share.
    fn variants(&mut self, skey: &str, step: &ModelStep, primary: &ModelConfig) {
        let names = step.canary.iter().map(|c| &c.model).chain(&step.shadow);
        for v in names {
            match self.models.get(v) {
                None => self
                    .p
                    .push(format!("{skey}: unknown candidate/shadow model '{v}'")),
                Some(c) if c.inputs != primary.inputs || c.outputs != primary.outputs => {
                    self.p.push(format!(
                        "{skey}: model '{v}' must have the same inputs and outputs as '{}'",
                        step.model
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(c) = &step.canary {
            if !(0.0..=1.0).contains(&c.share) {
                self.p
                    .push(format!("{skey}.canary.share: must be between 0 and 1"));
            }
            if c.key.as_ref().is_some_and(|k| !k.starts_with("parameter:")) {
                self.p
                    .push(format!("{skey}.canary.key: must be parameter:<name>"));
            }
        }
    }

    /// The argmax built-in: FP32 [batch, classes] probabilities in, label and probability out.
    fn argmax(&mut self, at: &At<'_>) -> Vec<TensorSpec> {
        let skey = &at.skey;
        let inputs = &at.step.inputs;
        if inputs.keys().ne(["probabilities"]) {
            self.p.push(format!(
                "{skey}: argmax reads exactly one input, 'probabilities'"
            ));
        } else if let Some(got) = self.reads(at, &inputs["probabilities"])
            && (got.datatype != DataType::Fp32 || got.shape.len() != 2)
        {
            self.p.push(format!(
                "{skey}: argmax needs FP32 [batch, classes] probabilities, '{}' is {} {:?}",
                inputs["probabilities"], got.datatype, got.shape
            ));
        }
        vec![
            spec("label", DataType::Int64, vec![-1]),
            spec("probability", DataType::Fp32, vec![-1]),
        ]
    }

    /// A combine step: parts from distinct steps that can be merged; the compiled join.
    fn combine(&mut self, at: &At<'_>, c: &CombineStep) -> Vec<TensorSpec> {
        let skey = &at.skey;
        let mut part_specs = Vec::new();
        let mut parts: Vec<(String, String)> = Vec::new();
        for src in &c.parts {
            if let Some(got) = self.reads(at, src) {
                part_specs.push(got);
            }
            let step = source_step(src).unwrap_or("request");
            if parts.iter().any(|(st, _)| st == step) {
                self.p
                    .push(format!("{skey}: two parts come from step '{step}'"));
            }
            parts.push((step.to_string(), src.clone()));
        }
        if parts.is_empty() {
            self.p.push(format!("{skey}: a combine step needs parts"));
        }
        if !at.step.inputs.is_empty() {
            self.p.push(format!(
                "{skey}: a combine step takes 'parts', not 'inputs'"
            ));
        }
        let quorum = c.quorum.unwrap_or(parts.len());
        if quorum == 0 || quorum > parts.len() {
            self.p.push(format!(
                "{skey}.quorum: must be between 1 and {}",
                parts.len()
            ));
        }
        if c.combiner == Combiner::WeightedMean && !weights_fit(&c.weights, parts.len()) {
            self.p.push(format!(
                "{skey}.weights: weighted_mean needs one non-negative weight per part ({}), not all zero",
                parts.len()
            ));
        }
        let combined = combined_spec(
            skey,
            c.combiner,
            &part_specs,
            c.output.as_deref(),
            &mut self.p,
        );
        let complete = part_specs.len() == parts.len();
        self.joins[at.i] = Some(Join {
            combiner: c.combiner,
            parts,
            weights: c.weights.clone(),
            tie: c.tie,
            quorum,
            timeout: c.timeout,
        });
        combined.filter(|_| complete).into_iter().collect()
    }

    /// A router: what it reads and the compiled cases (targets still in config order).
    fn route(&mut self, at: &At<'_>, r: &RouteConfig) {
        let by = match r.by.strip_prefix("parameter:") {
            Some(name) => Selector::Parameter(name.to_string()),
            None => {
                self.reads(at, &r.by);
                Selector::Tensor(r.by.clone())
            }
        };
        let idx = |names: &Vec<String>| -> Vec<usize> {
            names
                .iter()
                .filter_map(|t| self.index.get(t).copied())
                .collect()
        };
        self.routes[at.i] = Some(Route {
            by,
            cases: r.cases.iter().map(|(k, v)| (k.clone(), idx(v))).collect(),
            default: idx(&r.default),
            bandit: None,
        });
    }

    /// A bandit: its settings, its `context` input (contextual policies only); a router over
    /// its arms by its own `arm` output.
    fn bandit(&mut self, at: &At<'_>, b: &BanditConfig) -> Vec<TensorSpec> {
        let skey = &at.skey;
        self.p.extend(b.problems(&format!("{skey}: bandit")));
        let dims = self.bandit_context(at, b);
        let cases = b
            .arms
            .iter()
            .filter_map(|a| Some((a.clone(), vec![*self.index.get(a)?])))
            .collect();
        self.routes[at.i] = Some(Route {
            by: Selector::Tensor(format!("{}.arm", at.step.name)),
            cases,
            default: Vec::new(),
            bandit: Some(Box::new(Bandit {
                settings: b.clone(),
                dims,
            })),
        });
        vec![
            spec("arm", DataType::Bytes, vec![-1, 1]),
            spec("probability", DataType::Fp32, vec![-1, 1]),
        ]
    }

    /// Numbers per context row a bandit reads (0 without a context).
    fn bandit_context(&mut self, at: &At<'_>, b: &BanditConfig) -> usize {
        let skey = &at.skey;
        let inputs = &at.step.inputs;
        let mut dims = 0;
        for (input, src) in inputs {
            let got = self.reads(at, src);
            if input != "context" {
                self.p.push(format!(
                    "{skey}: a bandit reads one input, `context` (not '{input}')"
                ));
                continue;
            }
            match got {
                Some(c) if is_context(&c) => dims = usize::try_from(c.shape[1]).unwrap_or(0),
                Some(_) => self.p.push(format!(
                    "{skey}: its context must be numbers of shape [-1, d] with d fixed"
                )),
                None => {}
            }
        }
        let contextual = b.policy.contextual();
        if contextual && !inputs.contains_key("context") {
            self.p.push(format!(
                "{skey}: policy {:?} reads a `context` input ([-1, d] numbers)",
                b.policy
            ));
        }
        if !contextual && !inputs.is_empty() {
            self.p.push(format!(
                "{skey}: policy {:?} reads no inputs (use `after` to order it)",
                b.policy
            ));
        }
        dims
    }

    /// A business-logic step: its inputs resolved, then its own checks in `logic`.
    fn logic(&mut self, at: &At<'_>) -> Vec<TensorSpec> {
        let mut specs = BTreeMap::new();
        for (input, src) in &at.step.inputs {
            if let Some(got) = self.reads(at, src) {
                specs.insert(input.clone(), got);
            }
        }
        if specs.len() < at.step.inputs.len() {
            return Vec::new();
        }
        logic::outputs(&at.skey, &at.step.kind, &specs, &mut self.p)
    }
}

/// One finite, non-negative weight per part, not all zero.
fn weights_fit(weights: &[f64], parts: usize) -> bool {
    weights.len() == parts
        && weights.iter().all(|w| w.is_finite() && *w >= 0.0)
        && weights.iter().sum::<f64>() > 0.0
}

/// Numbers of shape [-1, d] with d fixed.
fn is_context(c: &TensorSpec) -> bool {
    c.datatype.element_size().is_some()
        && c.datatype != DataType::Fp16
        && c.shape.len() == 2
        && c.shape[1] > 0
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
