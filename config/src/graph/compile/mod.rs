//! Compiling a graph from its config: five passes, each checking one thing and handing the next
//! what it found; then the plan is assembled in topological order with its topics.
//!
//! 1. `names`: graph settings, step names and kinds, known models.
//! 2. `order`: dependencies, topological order (cycles), successors, the first step.
//! 3. `tensors`: what each step reads and produces, and whether it fits (business-logic steps'
//!    own checks in `logic`).
//! 4. `flows`: every route answers exactly once and brings each join its parts.
//! 5. `carry`: what each record carries, and where a failure inside a branch goes.

mod carry;
mod flows;
mod logic;
mod names;
mod order;
mod tensors;

use std::collections::BTreeMap;

use super::{Canary, Graph, Step, StepKind};
use crate::config::{Builtin, CanaryConfig, GraphConfig, ModelConfig, StepConfig, StepKindConfig};
use crate::signature::Signature;
use crate::topics::Topics;

/// Compiles graph `name`; every problem found is returned, each naming the graph and step.
pub fn compile(
    name: &str,
    g: &GraphConfig,
    models: &BTreeMap<String, ModelConfig>,
    topics: &Topics,
) -> Result<Graph, Vec<String>> {
    let key = format!("graphs.{name}");
    let index = names::check(&key, g, models)?;
    let shape = order::resolve(&key, g, &index)?;
    let flow = tensors::resolve(&key, g, models, &index, &shape)?;
    let terminals = flows::check(&key, g, &index, &shape, &flow)?;
    let carried = carry::resolve(g, &index, &shape, &flow);
    check_fusion(&key, g, &shape)?;
    Ok(assemble(
        name, g, models, topics, &shape, &flow, &carried, &terminals,
    ))
}

/// The plan in topological order, step references re-indexed to that order.
#[allow(clippy::too_many_arguments)]
fn assemble(
    name: &str,
    g: &GraphConfig,
    models: &BTreeMap<String, ModelConfig>,
    topics: &Topics,
    shape: &order::Order,
    flow: &tensors::Flow,
    carried: &carry::Carried,
    terminals: &[usize],
) -> Graph {
    let mut steps: Vec<Step> = shape
        .order
        .iter()
        .map(|&i| compiled_step(name, &g.steps[i], i, topics, shape, flow, carried))
        .collect();
    reindex(&mut steps, &shape.order);
    let pos = positions(&shape.order);
    let partitions = g.partitions.unwrap_or_else(|| {
        g.steps
            .iter()
            .filter_map(|s| models.get(s.kind.model()?))
            .map(|m| m.partitions)
            .max()
            .unwrap_or(1)
    });
    Graph {
        name: name.to_string(),
        signature: Signature {
            version: g.version.clone(),
            inputs: g.inputs.clone(),
            outputs: flow.outputs[terminals[0]].clone(),
            max_batch_size: g.max_batch_size,
            max_input_elements: g.max_input_elements,
            max_body_bytes: g.max_body_bytes,
            // Each model step checks its own inputs.
            utf8_bytes: false,
        },
        partitions,
        steps,
        entry: pos[shape.entry],
        entry_topic: topics.requests(name),
        result_topic: topics.results(name),
        comparison_topic: topics.comparisons(name),
    }
}

/// Step `i` (config order) of graph `graph` compiled; step references still in config order.
fn compiled_step(
    graph: &str,
    s: &StepConfig,
    i: usize,
    topics: &Topics,
    shape: &order::Order,
    flow: &tensors::Flow,
    carried: &carry::Carried,
) -> Step {
    let (kind, topic, canary, shadows) = match &s.kind {
        StepKindConfig::Model(m) => (
            StepKind::Model(m.model.clone()),
            topics.requests(&m.model),
            m.canary.as_ref().map(|c| compiled_canary(c, topics)),
            m.shadow
                .iter()
                .map(|v| (v.clone(), topics.requests(v)))
                .collect(),
        ),
        other => {
            let kind = match (other, &flow.joins[i], &flow.routes[i]) {
                (StepKindConfig::Builtin(b), _, _) => StepKind::Builtin(*b),
                (_, Some(j), _) => StepKind::Combine(j.clone()),
                (_, _, Some(r)) => StepKind::Route(r.clone()),
                _ => logic::kind(other).unwrap_or(StepKind::Builtin(Builtin::Argmax)),
            };
            (kind, topics.step(graph, &s.name), None, Vec::new())
        }
    };
    Step {
        name: s.name.clone(),
        kind,
        inputs: s
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        outputs: flow.outputs[i].clone(),
        next: shape.next[i].clone(),
        carry: carried.carry[i].clone(),
        failure_join: carried.failure_join[i].clone(),
        topic,
        canary,
        shadows,
        workers: s.workers,
        fused: s.fused,
    }
}

fn compiled_canary(c: &CanaryConfig, topics: &Topics) -> Canary {
    Canary {
        model: c.model.clone(),
        topic: topics.requests(&c.model),
        share: c.share,
        key_parameter: c
            .key
            .as_ref()
            .and_then(|k| k.strip_prefix("parameter:"))
            .map(str::to_string),
    }
}

/// Position of each config-order step in topological `order`.
fn positions(order: &[usize]) -> Vec<usize> {
    let mut pos = vec![0; order.len()];
    for (k, &i) in order.iter().enumerate() {
        pos[i] = k;
    }
    pos
}

/// Re-indexes step references (successors, failure joins, route targets) from config order to
/// topological `order`.
fn reindex(steps: &mut [Step], order: &[usize]) {
    let pos = positions(order);
    for s in steps {
        s.next = s.next.iter().map(|&i| pos[i]).collect();
        if let Some((j, _)) = &mut s.failure_join {
            *j = pos[*j];
        }
        if let StepKind::Route(r) = &mut s.kind {
            for v in r.cases.values_mut().chain(std::iter::once(&mut r.default)) {
                *v = v.iter().map(|&i| pos[i]).collect();
            }
        }
    }
}

/// A fused step runs in its predecessor's worker: it needs exactly one predecessor, which
/// leads only to it and is not a router; it cannot be a model (its own pool) or a join.
fn check_fusion(key: &str, g: &GraphConfig, shape: &order::Order) -> Result<(), Vec<String>> {
    let mut p = Vec::new();
    for (i, s) in g.steps.iter().enumerate() {
        if !s.fused {
            continue;
        }
        let skey = format!("{key} step '{}'", s.name);
        if matches!(
            s.kind,
            StepKindConfig::Model(_) | StepKindConfig::Combine(_)
        ) {
            p.push(format!(
                "{skey}: a model or combine step cannot be fused (it has workers of its own)"
            ));
            continue;
        }
        let preds: Vec<usize> = (0..g.steps.len())
            .filter(|&d| shape.next[d].contains(&i))
            .collect();
        match preds.as_slice() {
            [] => p.push(format!(
                "{skey}: the first step cannot be fused (nothing runs before it)"
            )),
            [d] if g.steps[*d].kind.is_router() => p.push(format!(
                "{skey}: cannot be fused after router '{}'",
                g.steps[*d].name
            )),
            [d] if shape.next[*d].len() != 1 => p.push(format!(
                "{skey}: '{}' leads to several steps, so this one cannot be fused after it",
                g.steps[*d].name
            )),
            [_] => {}
            _ => p.push(format!(
                "{skey}: a fused step needs exactly one step before it"
            )),
        }
    }
    if p.is_empty() { Ok(()) } else { Err(p) }
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
