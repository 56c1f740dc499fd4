//! Pass 3, tensor flow: step by step in order, what each step reads (it must exist and run
//! before it), whether it fits (datatype, shape), what each step produces, and the compiled join
//! and router settings. Canary and shadow models must match the primary's interface.

use std::collections::BTreeMap;

use sluice_schemas::DataType;

use super::logic;
use super::order::Order;
use super::{shapes_compatible, source_step};
use crate::config::{Builtin, Combiner, GraphConfig, ModelConfig, TensorSpec};
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
// Long on purpose: one walk in topological order, one arm per step kind, all sharing the
// outputs resolved so far; a new step kind's checks go in a new arm (or its own function).
pub(super) fn resolve(
    key: &str,
    g: &GraphConfig,
    models: &BTreeMap<String, ModelConfig>,
    index: &BTreeMap<String, usize>,
    shape: &Order,
) -> Result<Flow, Vec<String>> {
    let mut p = Vec::new();
    let (order, ancestors) = (&shape.order, &shape.ancestors);
    let n = g.steps.len();
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
    let mut bandits = 0;
    for &i in order {
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
        } else if logic::is_logic(s) {
            let mut specs = BTreeMap::new();
            for (input, src) in &s.inputs {
                if let Some(got) = reads(src, &mut p) {
                    specs.insert(input.clone(), got);
                }
            }
            if specs.len() == s.inputs.len() {
                outputs[i] = logic::outputs(&skey, s, &specs, &mut p);
            }
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
                bandit: None,
            });
        } else if let Some(b) = &s.bandit {
            bandits += 1;
            p.extend(b.problems(&format!("{skey}: bandit")));
            let mut dims = 0;
            for (input, src) in &s.inputs {
                let got = reads(src, &mut p);
                if input != "context" {
                    p.push(format!(
                        "{skey}: a bandit reads one input, `context` (not '{input}')"
                    ));
                    continue;
                }
                match got {
                    Some(c)
                        if c.datatype.element_size().is_some()
                            && c.datatype != DataType::Fp16
                            && c.shape.len() == 2
                            && c.shape[1] > 0 =>
                    {
                        dims = usize::try_from(c.shape[1]).unwrap_or(0);
                    }
                    Some(_) => p.push(format!(
                        "{skey}: its context must be numbers of shape [-1, d] with d fixed"
                    )),
                    None => {}
                }
            }
            if b.policy.contextual() && !s.inputs.contains_key("context") {
                p.push(format!(
                    "{skey}: policy {:?} reads a `context` input ([-1, d] numbers)",
                    b.policy
                ));
            }
            if !b.policy.contextual() && !s.inputs.is_empty() {
                p.push(format!(
                    "{skey}: policy {:?} reads no inputs (use `after` to order it)",
                    b.policy
                ));
            }
            outputs[i] = vec![
                spec("arm", DataType::Bytes, vec![-1, 1]),
                spec("probability", DataType::Fp32, vec![-1, 1]),
            ];
            routes[i] = Some(Route {
                by: Selector::Tensor(format!("{}.arm", s.name)),
                cases: b
                    .arms
                    .iter()
                    .filter_map(|a| Some((a.clone(), vec![*index.get(a)?])))
                    .collect(),
                default: Vec::new(),
                bandit: Some(Box::new(Bandit {
                    settings: b.clone(),
                    dims,
                })),
            });
        }
    }
    if bandits > 1 {
        p.push(format!(
            "{key}: at most one bandit step per graph (feedback names a request, and so one choice)"
        ));
    }
    if !p.is_empty() {
        return Err(p);
    }
    Ok(Flow {
        outputs,
        joins,
        routes,
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
