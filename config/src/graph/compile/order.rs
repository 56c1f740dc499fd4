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
pub(super) fn resolve(
    key: &str,
    g: &GraphConfig,
    index: &BTreeMap<String, usize>,
) -> Result<Order, Vec<String>> {
    let Dependencies {
        deps,
        route_targets,
    } = dependencies(key, g, index)?;
    let order = topological(key, g, &deps)?;
    let ancestors = ancestors_of(&order, &deps);
    let mut p = Vec::new();
    let (next, entries) = successors(key, g, &deps, &ancestors, &mut p);
    if entries.len() != 1 {
        let names: Vec<&str> = entries.iter().map(|&i| g.steps[i].name.as_str()).collect();
        p.push(format!(
            "{key}: a graph needs exactly one first step (reading only request tensors), found {names:?}"
        ));
    }
    check_routes(key, g, &route_targets, &next, &mut p);
    if !p.is_empty() {
        return Err(p);
    }
    Ok(Order {
        order,
        ancestors,
        next,
        entry: entries[0],
    })
}

/// What each step depends on, in config order.
struct Dependencies {
    /// The steps each step reads from, follows (`after`), or is routed to by.
    deps: Vec<BTreeSet<usize>>,
    /// A router's (or bandit's) targets.
    route_targets: Vec<Vec<usize>>,
}

/// The steps each step reads from (plus a router for its targets).
fn dependencies(
    key: &str,
    g: &GraphConfig,
    index: &BTreeMap<String, usize>,
) -> Result<Dependencies, Vec<String>> {
    let mut p = Vec::new();
    let n = g.steps.len();
    let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    let mut route_targets: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in g.steps.iter().enumerate() {
        let skey = format!("{key} step '{}'", s.name);
        if let Some(a) = &s.after {
            match index.get(a) {
                Some(&d) if d != i => {
                    deps[i].insert(d);
                }
                _ => p.push(format!("{skey}: after = '{a}' names no other step")),
            }
        }
        let mut sources: Vec<&String> = s.sources().collect();
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
                Some(&ti) if !route_targets[i].contains(&ti) => route_targets[i].push(ti),
                Some(_) => {}
                None => p.push(format!("{skey}: routes to unknown step '{t}'")),
            }
        }
        for src in sources {
            match read_from(&skey, src, i, index) {
                Ok(Some(d)) => {
                    deps[i].insert(d);
                }
                Ok(None) => {}
                Err(problem) => p.push(problem),
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
    Ok(Dependencies {
        deps,
        route_targets,
    })
}

/// The step source `src` of step `i` reads from (`None` for a request tensor).
fn read_from(
    skey: &str,
    src: &str,
    i: usize,
    index: &BTreeMap<String, usize>,
) -> Result<Option<usize>, String> {
    if !src.contains('.') {
        return Err(format!(
            "{skey}: source '{src}' must be request.<input> or <step>.<output>"
        ));
    }
    let Some(step) = source_step(src) else {
        return Ok(None);
    };
    match index.get(step) {
        Some(&d) if d == i => Err(format!("{skey}: reads its own output")),
        Some(&d) => Ok(Some(d)),
        None => Err(format!(
            "{skey}: reads '{src}', but there is no step '{step}'"
        )),
    }
}

/// A topological order (Kahn); what is left over is on a cycle.
fn topological(
    key: &str,
    g: &GraphConfig,
    deps: &[BTreeSet<usize>],
) -> Result<Vec<usize>, Vec<String>> {
    let n = deps.len();
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
    Ok(order)
}

/// Every step each step depends on, directly or not.
fn ancestors_of(order: &[usize], deps: &[BTreeSet<usize>]) -> Vec<BTreeSet<usize>> {
    let mut ancestors: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); deps.len()];
    for &i in order {
        let mut a = BTreeSet::new();
        for &d in &deps[i] {
            a.insert(d);
            a.extend(ancestors[d].iter().copied());
        }
        ancestors[i] = a;
    }
    ancestors
}

/// Immediate successors (dependencies not already reached through another dependency lead
/// here) and the steps with no predecessor. Only a combine step may follow parallel steps.
fn successors(
    key: &str,
    g: &GraphConfig,
    deps: &[BTreeSet<usize>],
    ancestors: &[BTreeSet<usize>],
    p: &mut Vec<String>,
) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); deps.len()];
    let mut entries = Vec::new();
    for (i, (s, dep)) in g.steps.iter().zip(deps).enumerate() {
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
    (next, entries)
}

/// A router's successors are exactly its routes.
fn check_routes(
    key: &str,
    g: &GraphConfig,
    route_targets: &[Vec<usize>],
    next: &[Vec<usize>],
    p: &mut Vec<String>,
) {
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
}
