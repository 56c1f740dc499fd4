//! Pass 5, carried tensors: what a record arriving at each step must carry (its own sources plus
//! what later steps need that it does not produce), and, for steps inside a join's branch, the
//! join a failure there goes to as a failed part.

use std::collections::{BTreeMap, BTreeSet};

use super::order::Order;
use super::source_step;
use super::tensors::Flow;
use crate::config::{GraphConfig, StepKindConfig};

/// Per step (config order): carried sources, and the join and parts a failure stands for.
pub(super) struct Carried {
    /// Sources an arriving record carries.
    pub(super) carry: Vec<BTreeSet<String>>,
    /// For a step inside a join's branch: the join and the parts it would cost.
    pub(super) failure_join: Vec<Option<(usize, Vec<String>)>>,
}

/// Works out what each record carries, last step first.
pub(super) fn resolve(
    g: &GraphConfig,
    index: &BTreeMap<String, usize>,
    shape: &Order,
    flow: &Flow,
) -> Carried {
    let (order, next, ancestors, joins) =
        (&shape.order, &shape.next, &shape.ancestors, &flow.joins);
    let n = g.steps.len();
    let mut carry: Vec<BTreeSet<String>> = vec![BTreeSet::new(); n];
    for &i in order.iter().rev() {
        let s = &g.steps[i];
        let mut c: BTreeSet<String> = s.sources().cloned().collect();
        if let StepKindConfig::Route(r) = &s.kind
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
        for &j in order {
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
    Carried {
        carry,
        failure_join,
    }
}
