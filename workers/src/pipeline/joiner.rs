//! A join's state: the parts of each request seen so far, keyed by request id. Every part is
//! keyed by its request id on the join's topic, so all parts of one request reach the same join
//! worker. A part's offset is not committed until its request is answered, so a restarted
//! worker rebuilds this state from the records it is sent again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_common::graph::{Graph, Join, StepKind};
use sluice_schemas::ErrorCode;
use sluice_schemas::{InferenceError, InferenceRequest, Tensor};

use crate::pipeline::flow::{Next, failed, step_error};
use crate::pipeline::job::{GraphJob, Job, Source};
use crate::step::StepInput;

/// Step `step`'s join settings, when it is a combine step.
fn combine_of(graph: &Graph, step: usize) -> Option<&Join> {
    match &graph.steps[step].kind {
        StepKind::Combine(j) => Some(j),
        _ => None,
    }
}

/// A request's fate once its join decides.
#[derive(Debug)]
pub enum Decision {
    /// Enough parts arrived: run the combine step on them (the job holds every record).
    Combine(Box<Job>),
    /// The join could not answer (too few parts by the timeout, failed parts, a stray part).
    Failed(Box<Decided>),
}

/// A join that failed: what follows, and the records it held.
#[derive(Debug)]
pub struct Decided {
    /// What follows the join (next records, or the answer).
    pub next: Next,
    /// Every record of this request that the join held.
    pub records: Vec<Source>,
    /// The envelope of the first part (reply route, deadline).
    pub base: InferenceRequest,
}

struct Pending {
    first_seen: Instant,
    base: InferenceRequest,
    /// Arrival order: (index in `join.parts`, carried tensors or the part's error).
    parts: Vec<(usize, Result<Vec<Tensor>, InferenceError>)>,
    records: Vec<Source>,
}

/// The state of one combine step in one worker.
pub struct Joiner {
    graph: Arc<Graph>,
    step: usize,
    topic: String,
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
    Decided(Box<Decision>),
}

impl Joiner {
    /// A joiner for step `step` of `graph` (a combine step), whose parts arrive on `topic`.
    pub fn new(graph: Arc<Graph>, step: usize, topic: String) -> Joiner {
        Joiner {
            graph,
            step,
            topic,
            pending: HashMap::new(),
            answered: HashSet::new(),
            answered_order: VecDeque::new(),
            remember: 100_000,
        }
    }

    fn join(&self) -> Option<&Join> {
        combine_of(&self.graph, self.step)
    }

    /// The graph this join belongs to.
    pub fn graph(&self) -> Arc<Graph> {
        Arc::clone(&self.graph)
    }

    /// Takes a reloaded graph (new timeout, quorum, weights) for parts arriving from now on;
    /// keeps the old one when the graph or the step is gone.
    pub fn replace_graph(&mut self, graphs: &sluice_common::graph::Graphs) {
        let name = &self.graph.steps[self.step].name;
        if let Some(g) = graphs.get(&self.graph.name)
            && let Some(i) = g.step_index(name)
            && matches!(g.steps[i].kind, StepKind::Combine(_))
        {
            self.graph = Arc::clone(g);
            self.step = i;
        }
    }

    /// Requests waiting for parts.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one part (`request.hop.from` names it).
    pub fn offer(&mut self, request: InferenceRequest, held: Source) -> Offered {
        // A handle on the graph, so the join settings are borrowed, not copied, per part.
        let graph = Arc::clone(&self.graph);
        let Some(join) = combine_of(&graph, self.step) else {
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
                ErrorCode::InvalidInput,
                &self.graph.steps[self.step].name,
                format!("'{}' is not a part of this join", hop.from),
            );
            return self.decide_with(request, vec![held], Err(err));
        };
        let value = match &hop.failed {
            None => Ok(request.inputs.clone()),
            Some(e) => Err(e.clone()),
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
                Some(p) => Offered::Decided(Box::new(self.decide(p, join, false))),
                None => Offered::Held,
            };
        }
        Offered::Held
    }

    /// Decides every request whose timeout has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Decision> {
        let graph = Arc::clone(&self.graph);
        let Some(join) = combine_of(&graph, self.step) else {
            return Vec::new();
        };
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.first_seen) >= join.timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for id in due {
            if let Some(p) = self.pending.remove(&id) {
                out.push(self.decide(p, join, true));
            }
        }
        out
    }

    /// Forgets requests whose records came from partitions this worker no longer owns (their
    /// new owner is sent them again).
    pub fn forget_partitions(&mut self, partitions: &[(usize, i32)]) {
        self.pending.retain(|_, p| {
            !p.records
                .iter()
                .any(|h| partitions.contains(&(h.topic_index, h.partition)))
        });
    }

    /// The longest any pending request may still wait.
    pub fn next_timeout(&self) -> Option<Duration> {
        let join = self.join()?;
        self.pending
            .values()
            .map(|p| join.timeout.saturating_sub(p.first_seen.elapsed()))
            .min()
    }

    fn decide(&mut self, p: Pending, join: &Join, timed_out: bool) -> Decision {
        let name = self.graph.steps[self.step].name.clone();
        let ok = p.parts.iter().filter(|(_, v)| v.is_ok()).count();
        let failures: Vec<&InferenceError> = p
            .parts
            .iter()
            .filter_map(|(_, v)| v.as_ref().err())
            .collect();
        let outcome = if ok >= join.quorum
            || (join.combiner == sluice_common::graph::Combiner::First && ok > 0)
        {
            self.remember_answered(&p.base.id);
            return match self.combine_job(join, p) {
                Ok(job) => Decision::Combine(Box::new(job)),
                Err(d) => Decision::Failed(d),
            };
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
                why.push(format!(
                    "part '{}' failed: {} ({})",
                    f.step, f.message, f.code
                ));
            }
            let code = if timed_out && !missing.is_empty() {
                ErrorCode::JoinTimeout
            } else {
                failures.first().map_or(ErrorCode::Internal, |f| f.code)
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
                    ok,
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
        Decision::Failed(Box::new(Decided {
            next,
            records: p.records,
            base: p.base,
        }))
    }

    fn decide_with(
        &mut self,
        base: InferenceRequest,
        records: Vec<Source>,
        outcome: Result<Next, InferenceError>,
    ) -> Offered {
        let next = match outcome {
            Ok(n) => n,
            Err(e) => failed(&self.graph, self.step, &base, e),
        };
        Offered::Decided(Box::new(Decision::Failed(Box::new(Decided {
            next,
            records,
            base,
        }))))
    }

    /// The combine step's job: the parts that arrived (arrival order, named by source), what
    /// every branch carried, and every record held.
    fn combine_job(&self, join: &Join, p: Pending) -> Result<Job, Box<Decided>> {
        let step = &self.graph.steps[self.step];
        let mut tensors = Vec::with_capacity(p.parts.len());
        let mut carried: BTreeMap<String, Tensor> = BTreeMap::new();
        for (i, part) in &p.parts {
            let Ok(part_carried) = part else { continue };
            let src = &join.parts[*i].1;
            let Some(t) = part_carried.iter().find(|t| &t.name == src) else {
                let e = step_error(
                    ErrorCode::Internal,
                    &step.name,
                    format!("part '{}' does not carry '{src}'", join.parts[*i].0),
                );
                return Err(Box::new(Decided {
                    next: failed(&self.graph, self.step, &p.base, e),
                    records: p.records,
                    base: p.base,
                }));
            };
            tensors.push(t.clone());
            for c in part_carried {
                carried.entry(c.name.clone()).or_insert_with(|| c.clone());
            }
        }
        let mut records = p.records.into_iter();
        let source = records.next().unwrap_or_default();
        Ok(Job {
            request: p.base,
            input: StepInput {
                tensors,
                wanted: Vec::new(),
                ..Default::default()
            },
            source,
            held: records.collect(),
            topic: self.topic.clone(),
            graph: Some(GraphJob {
                graph: Arc::clone(&self.graph),
                step: self.step,
                carried: carried.into_values().collect(),
                shadow: false,
            }),
        })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use sluice_common::ModelConfig;
    use sluice_common::graph::fixtures::{compile_steps, model};
    use sluice_schemas::{DataType, GraphHop};

    use super::*;

    fn graph(extra: &str) -> Arc<Graph> {
        let m = model(
            &[("input", DataType::Fp32, vec![-1, 2])],
            &[("label", DataType::Int64, vec![-1])],
        );
        let models: BTreeMap<String, ModelConfig> = [("m".to_string(), m)].into();
        let steps = format!(
            r#"[[steps]]
name = "first"
model = "m"
inputs = {{ input = "request.input" }}
[[steps]]
name = "a"
model = "m"
inputs = {{ input = "request.input" }}
after = "first"
[[steps]]
name = "b"
model = "m"
inputs = {{ input = "request.input" }}
after = "first"
[[steps]]
name = "c"
model = "m"
inputs = {{ input = "request.input" }}
after = "first"
[[steps]]
name = "vote"
combine = "majority_vote"
parts = ["a.label", "b.label", "c.label"]
timeout = "50ms"
{extra}
"#
        );
        Arc::new(compile_steps(&steps, 2, &models, "s").unwrap())
    }

    fn part(id: &str, from: &str, label: i64) -> InferenceRequest {
        InferenceRequest {
            id: id.into(),
            model: "g".into(),
            inputs: vec![Tensor::from_values(
                format!("{from}.label"),
                DataType::Int64,
                vec![1],
                &[label],
            )],
            hop: Some(GraphHop {
                graph: "g".into(),
                step: "vote".into(),
                from: from.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn held(offset: i64) -> Source {
        Source {
            topic_index: 0,
            partition: 0,
            offset,
        }
    }

    fn joiner(extra: &str) -> Joiner {
        let g = graph(extra);
        let vote = g.step_index("vote").unwrap();
        Joiner::new(g, vote, "s.g.vote.requests".into())
    }

    /// A failed join's answer.
    fn answer(d: &Decision) -> &sluice_schemas::InferenceResult {
        let Decision::Failed(d) = d else {
            panic!("the join did not fail")
        };
        d.next.answer.as_ref().unwrap()
    }

    /// The combined labels, by the combine step behind the seam.
    fn combined(d: &Decision) -> Vec<i64> {
        let Decision::Combine(job) = d else {
            panic!("not a combine job: {d:?}")
        };
        let g = &job.graph.as_ref().unwrap().graph;
        let StepKind::Combine(join) = &g.steps[g.step_index("vote").unwrap()].kind else {
            panic!("not a join")
        };
        let step = crate::step::combine::CombineStep::new(join.clone(), "label".into());
        use crate::step::Step;
        let out = futures::executor::block_on(step.run(vec![job.input.clone()]));
        out[0].as_ref().unwrap()[0].values::<i64>()
    }

    /// Every record a decision releases.
    fn records(d: &Decision) -> Vec<i64> {
        match d {
            Decision::Combine(job) => std::iter::once(&job.source)
                .chain(&job.held)
                .map(|s| s.offset)
                .collect(),
            Decision::Failed(d) => d.records.iter().map(|s| s.offset).collect(),
        }
    }

    #[test]
    fn all_parts_decide_with_every_record_released() {
        let mut j = joiner("");
        assert!(matches!(
            j.offer(part("r1", "a", 7), held(0)),
            Offered::Held
        ));
        assert!(matches!(
            j.offer(part("r2", "a", 1), held(1)),
            Offered::Held
        ));
        assert!(matches!(
            j.offer(part("r1", "b", 3), held(2)),
            Offered::Held
        ));
        let Offered::Decided(d) = j.offer(part("r1", "c", 3), held(3)) else {
            panic!("not decided")
        };
        assert_eq!(combined(&d), [3]);
        assert_eq!(records(&d), [0, 2, 3], "r2's record stays held");
        assert_eq!(j.pending(), 1);
        // A late repeat of an answered request is dropped, not answered again.
        assert!(matches!(
            j.offer(part("r1", "a", 7), held(4)),
            Offered::Duplicate
        ));
    }

    #[test]
    fn a_repeated_part_is_held_once_and_released_with_the_rest() {
        let mut j = joiner("");
        j.offer(part("r1", "a", 1), held(0));
        assert!(matches!(
            j.offer(part("r1", "a", 1), held(1)),
            Offered::Held
        ));
        j.offer(part("r1", "b", 1), held(2));
        let Offered::Decided(d) = j.offer(part("r1", "c", 2), held(3)) else {
            panic!("not decided")
        };
        assert_eq!(records(&d).len(), 4, "the repeat's offset completes too");
        assert_eq!(combined(&d), [1]);
    }

    #[test]
    fn timeout_without_quorum_names_the_missing_parts() {
        let mut j = joiner("");
        j.offer(part("r1", "a", 1), held(0));
        j.offer(part("r1", "c", 1), held(1));
        assert!(j.expire(Instant::now()).is_empty(), "not yet");
        let decided = j.expire(Instant::now() + Duration::from_millis(60));
        assert_eq!(decided.len(), 1);
        let e = answer(&decided[0]).error.clone().unwrap();
        assert_eq!(e.code, ErrorCode::JoinTimeout);
        assert_eq!(e.step, "vote");
        assert!(e.message.contains("[\"b\"]"), "{}", e.message);
    }

    #[test]
    fn quorum_answers_at_the_timeout_with_the_parts_it_has() {
        let mut j = joiner("quorum = 2");
        j.offer(part("r1", "c", 4), held(0));
        j.offer(part("r1", "a", 5), held(1));
        let decided = j.expire(Instant::now() + Duration::from_millis(60));
        // 5 (a) and 4 (c) tie; a is listed first.
        assert_eq!(combined(&decided[0]), [5]);
    }

    #[test]
    fn failed_parts_count_against_the_quorum_and_are_named() {
        let mut j = joiner("");
        j.offer(part("r1", "a", 1), held(0));
        j.offer(part("r1", "b", 1), held(1));
        let mut failed = part("r1", "c", 0);
        failed.inputs.clear();
        failed.hop.as_mut().unwrap().failed =
            InferenceError::from_json(r#"{"code":"model_failed","message":"boom","step":"c"}"#);
        let Offered::Decided(d) = j.offer(failed, held(2)) else {
            panic!("not decided")
        };
        let e = answer(&d).error.clone().unwrap();
        assert_eq!(e.code, ErrorCode::ModelFailed);
        assert!(e.message.contains("part 'c' failed: boom"), "{}", e.message);
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut j = joiner("");
        j.offer(part("r1", "a", 1), held(0));
        j.forget_partitions(&[(1, 0)]);
        assert_eq!(
            j.pending(),
            1,
            "another topic's partition 0 is not this one"
        );
        j.forget_partitions(&[(0, 0)]);
        assert_eq!(j.pending(), 0);
    }
}
