//! A join's state: the parts of each request seen so far, keyed by request id. Every part is
//! keyed by its request id on the join's topic, so all parts of one request reach the same join
//! worker. A part's offset is not committed until its request is answered, so a restarted
//! worker rebuilds this state from the records it is sent again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_common::graph::{Graph, Join, StepKind};
use sluice_schemas::envelope::codes;
use sluice_schemas::{InferenceError, InferenceRequest, Tensor};

use crate::combine::combine;
use crate::flow::{Next, after_step, failed, parse_failed, step_error};

/// A consumed record held by a join until its request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A request's fate once its join decides.
#[derive(Debug)]
pub struct Decided {
    /// What follows the join (next records, or the answer).
    pub next: Next,
    /// Every record of this request that the join held.
    pub records: Vec<Held>,
    /// The envelope of the first part (reply route, deadline).
    pub base: InferenceRequest,
}

struct Pending {
    first_seen: Instant,
    base: InferenceRequest,
    /// Arrival order: (index in `join.parts`, carried tensors or the part's error).
    parts: Vec<(usize, Result<Vec<Tensor>, InferenceError>)>,
    records: Vec<Held>,
}

/// The state of one combine step in one worker.
pub struct Joiner {
    graph: Arc<Graph>,
    step: usize,
    pending: HashMap<String, Pending>,
    /// Recently answered requests: late or repeated parts for them are dropped.
    answered: HashSet<String>,
    answered_order: VecDeque<String>,
    remember: usize,
}

/// What [`Joiner::offer`] made of a part.
#[derive(Debug)]
pub enum Offered {
    /// Held until the other parts arrive.
    Held,
    /// The request was already answered (or this part repeats one held): nothing to do.
    Duplicate,
    /// The join decided.
    Decided(Box<Decided>),
}

impl Joiner {
    /// A joiner for step `step` of `graph` (a combine step).
    pub fn new(graph: Arc<Graph>, step: usize) -> Joiner {
        Joiner {
            graph,
            step,
            pending: HashMap::new(),
            answered: HashSet::new(),
            answered_order: VecDeque::new(),
            remember: 100_000,
        }
    }

    fn join(&self) -> Option<&Join> {
        match &self.graph.steps[self.step].kind {
            StepKind::Combine(j) => Some(j),
            _ => None,
        }
    }

    /// Requests waiting for parts.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one part (`request.hop.from` names it).
    pub fn offer(&mut self, request: InferenceRequest, held: Held) -> Offered {
        let Some(join) = self.join().cloned() else {
            return Offered::Duplicate;
        };
        let id = request.id.clone();
        if self.answered.contains(&id) {
            return Offered::Duplicate;
        }
        let hop = request.hop.clone().unwrap_or_default();
        let Some(part) = join.parts.iter().position(|(s, _)| *s == hop.from) else {
            // Not one of ours: answer with an error rather than wait for a timeout.
            let err = step_error(
                codes::INVALID_INPUT,
                &self.graph.steps[self.step].name,
                format!("'{}' is not a part of this join", hop.from),
            );
            return self.decide_with(request, vec![held], Err(err));
        };
        let value = if hop.failed.is_empty() {
            Ok(request.inputs.clone())
        } else {
            Err(parse_failed(&hop.failed))
        };
        let entry = self.pending.entry(id.clone()).or_insert_with(|| Pending {
            first_seen: Instant::now(),
            base: InferenceRequest {
                inputs: Vec::new(),
                ..request.clone()
            },
            parts: Vec::new(),
            records: Vec::new(),
        });
        entry.records.push(held);
        if entry.parts.iter().any(|(p, _)| *p == part) {
            return Offered::Held; // a repeat of a part we hold; its offset completes with the rest
        }
        // Served-by accounting from every branch.
        if let (Some(base_hop), Some(h)) = (entry.base.hop.as_mut(), request.hop.as_ref()) {
            base_hop.served.extend(h.served.clone());
        }
        entry.parts.push((part, value));
        let ok = entry.parts.iter().filter(|(_, v)| v.is_ok()).count();
        let all = entry.parts.len() == join.parts.len();
        let first_wins = join.combiner == sluice_common::graph::Combiner::First && ok > 0;
        if all || first_wins {
            let p = self.pending.remove(&id);
            return match p {
                Some(p) => Offered::Decided(Box::new(self.decide(p, &join, false))),
                None => Offered::Held,
            };
        }
        Offered::Held
    }

    /// Decides every request whose timeout has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Decided> {
        let Some(join) = self.join().cloned() else {
            return Vec::new();
        };
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.first_seen) >= join.timeout)
            .map(|(id, _)| id.clone())
            .collect();
        due.into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .map(|p| self.decide(p, &join, true))
            .collect()
    }

    /// Forgets requests whose records came from partitions this worker no longer owns (their
    /// new owner is sent them again).
    pub fn forget_partitions(&mut self, partitions: &[i32]) {
        self.pending
            .retain(|_, p| !p.records.iter().any(|h| partitions.contains(&h.partition)));
    }

    /// The longest any pending request may still wait.
    pub fn next_timeout(&self) -> Option<Duration> {
        let join = self.join()?;
        self.pending
            .values()
            .map(|p| join.timeout.saturating_sub(p.first_seen.elapsed()))
            .min()
    }

    fn decide(&mut self, p: Pending, join: &Join, timed_out: bool) -> Decided {
        let name = self.graph.steps[self.step].name.clone();
        let ok: Vec<(usize, Vec<Tensor>)> = p
            .parts
            .iter()
            .filter_map(|(i, v)| v.as_ref().ok().map(|t| (*i, t.clone())))
            .collect();
        let failures: Vec<&InferenceError> =
            p.parts.iter().filter_map(|(_, v)| v.as_ref().err()).collect();
        let outcome = if ok.len() >= join.quorum || (join.combiner == sluice_common::graph::Combiner::First && !ok.is_empty()) {
            self.combine_parts(join, &p.base, &ok)
        } else {
            let missing: Vec<&str> = join
                .parts
                .iter()
                .enumerate()
                .filter(|(i, _)| !p.parts.iter().any(|(k, _)| k == i))
                .map(|(_, (s, _))| s.as_str())
                .collect();
            let mut why = Vec::new();
            if !missing.is_empty() {
                why.push(format!("missing parts {missing:?}"));
            }
            for f in &failures {
                why.push(format!("part '{}' failed: {} ({})", f.step, f.message, f.code));
            }
            let code = if timed_out && !missing.is_empty() {
                codes::JOIN_TIMEOUT
            } else {
                failures.first().map(|f| f.code.as_str()).unwrap_or(codes::INTERNAL)
            };
            let waited = if timed_out {
                format!(" after waiting {:?}", join.timeout)
            } else {
                String::new()
            };
            Err(step_error(
                code,
                &name,
                format!(
                    "{} of {} parts answered, {} needed{waited}: {}",
                    ok.len(),
                    join.parts.len(),
                    join.quorum,
                    why.join("; ")
                ),
            ))
        };
        let next = match outcome {
            Ok(next) => next,
            Err(e) => failed(&self.graph, self.step, &p.base, e),
        };
        self.remember_answered(&p.base.id);
        Decided {
            next,
            records: p.records,
            base: p.base,
        }
    }

    fn decide_with(
        &mut self,
        base: InferenceRequest,
        records: Vec<Held>,
        outcome: Result<Next, InferenceError>,
    ) -> Offered {
        let next = match outcome {
            Ok(n) => n,
            Err(e) => failed(&self.graph, self.step, &base, e),
        };
        Offered::Decided(Box::new(Decided {
            next,
            records,
            base,
        }))
    }

    fn combine_parts(
        &self,
        join: &Join,
        base: &InferenceRequest,
        ok: &[(usize, Vec<Tensor>)],
    ) -> Result<Next, InferenceError> {
        let step = &self.graph.steps[self.step];
        let output = step.outputs.first().map(|o| o.name.clone()).unwrap_or_default();
        let mut tensors = Vec::with_capacity(ok.len());
        let mut carried: BTreeMap<String, Tensor> = BTreeMap::new();
        for (i, part_carried) in ok {
            let src = &join.parts[*i].1;
            let t = part_carried.iter().find(|t| &t.name == src).ok_or_else(|| {
                step_error(
                    codes::INTERNAL,
                    &step.name,
                    format!("part '{}' does not carry '{src}'", join.parts[*i].0),
                )
            })?;
            tensors.push((*i, t.clone()));
            for c in part_carried {
                carried.entry(c.name.clone()).or_insert_with(|| c.clone());
            }
        }
        let combined = combine(join, &output, &tensors)
            .map_err(|e| step_error(codes::INVALID_INPUT, &step.name, e))?;
        after_step(
            &self.graph,
            self.step,
            base,
            carried.into_values().collect(),
            vec![combined],
        )
    }

    fn remember_answered(&mut self, id: &str) {
        if self.answered.insert(id.to_string()) {
            self.answered_order.push_back(id.to_string());
            if self.answered_order.len() > self.remember
                && let Some(old) = self.answered_order.pop_front()
            {
                self.answered.remove(&old);
            }
        }
    }
}

