//! Pass 2, dependencies and order: which steps each step reads from (or follows, or is routed
//! to by), a topological order (what is left over is a cycle), each step's ancestors, the
//! immediate successors records go to, and the single first step.

use std::collections::{BTreeMap, BTreeSet};

use super::source_step;
use crate::config::{GraphConfig, StepKindConfig};

/// The graph's shape, indexed in config order.
pub(super) struct Order {
    /// Steps in an order where each comes after those it depends on.
    pub(super) order: Vec<usize>,
    /// Every step each step depends on, directly or not.
    pub(super) ancestors: Vec<BTreeSet<usize>>,
    /// Immediate successors: where a step's records go next.
    pub(super) next: Vec<Vec<usize>>,
    /// The one step that reads only request tensors.
    pub(super) entry: usize,
}

/// Resolves dependencies and order; every problem names its step.
// Long on purpose: one pass over the dependency graph (dependencies, topological order,
// ancestors, successors, router checks), each stage using the previous one's sets.
pub(super) fn resolve(
    key: &str,
    g: &GraphConfig,
    index: &BTreeMap<String, usize>,
) -> Result<Order, Vec<String>> {
    let mut p = Vec::new();
    // Dependencies: the steps each step reads from (plus a router for its targets).
    let n = g.steps.len();
    let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    let mut route_targets: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in g.steps.iter().enumerate() {
        let mut sources: Vec<&String> = s.sources().collect();
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
        let mut targets: Vec<&String> = Vec::new();
        match &s.kind {
            StepKindConfig::Route(r) => {
                if !r.by.starts_with("parameter:") {
                    sources.push(&r.by);
                }
                targets.extend(r.cases.values().flatten().chain(&r.default));
            }
            StepKindConfig::Bandit(b) => targets.extend(&b.arms),
            _ => {}
        }
        for t in targets {
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
        if !matches!(s.kind, StepKindConfig::Combine(_)) && preds.len() > 1 {
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
        if !g.steps[r].kind.is_router() {
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
    Ok(Order {
        order,
        ancestors,
        next,
        entry,
    })
}
