//! Pass 4, flows: every way through the routers must reach exactly one final step, run no
//! non-join step twice, and bring each join all of its parts; final steps must answer alike.

use std::collections::{BTreeMap, BTreeSet};

use super::order::Order;
use super::tensors::Flow;
use crate::config::GraphConfig;
use crate::graph::{Join, Route};

/// Checks every route combination; returns the final steps (config order).
pub(super) fn check(
    key: &str,
    g: &GraphConfig,
    index: &BTreeMap<String, usize>,
    shape: &Order,
    flow: &Flow,
) -> Result<Vec<usize>, Vec<String>> {
    let mut p = Vec::new();
    let (next, routes, joins, outputs) = (&shape.next, &flow.routes, &flow.joins, &flow.outputs);
    let terminals: Vec<usize> = (0..next.len()).filter(|&i| next[i].is_empty()).collect();
    check_flows(
        key,
        g,
        &shape.order,
        shape.entry,
        next,
        routes,
        joins,
        index,
        &mut p,
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
    if p.is_empty() { Ok(terminals) } else { Err(p) }
}

/// Walks each combination of router choices, counting how often each step runs.
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
