//! Hops in process: what a lane's batch leads to among the worker's other lanes (the lane's
//! loop, which runs each batch through its step, fused steps and these hops, is in
//! `transport::consumer`).
//!
//! Local hops: a graph's next step served by another lane of the same worker runs in process,
//! in the batch's own task, instead of going out to its topic and back through the broker.
//!
//! A forward becomes a job of the lane that owns its topic (checked as that lane checks a
//! consumed record: the step's inputs, a model's signature), runs through that lane's step (the
//! same ONNX session and inference threads), and its completions join the batch's: they carry
//! the consumed record's source, so its offset is stored only once everything the chain led to
//! has been delivered (at-least-once holds as for one step). A join whose parts all come out of
//! the same round here is decided here too (a fresh [`Joiner`] per round, so the same rules).
//! What cannot run here goes through its topic as before: parts of a join that are not all here
//! (the others may come from other workers), shadow copies (off the caller's path), steps of
//! other workers, and records whose inputs do not fit (their worker says why).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::future::join_all;
use sluice_common::graph::{Graph, Graphs, StepKind, Unit};
use sluice_common::signature::{Signature, validate_inputs};
use sluice_schemas::InferenceRequest;

use crate::pipeline::completion::Completion;
use crate::pipeline::executor::{FusedSlot, StepSlot, UnitFacts, run_batch, run_fused};
use crate::pipeline::flow::{Outgoing, step_inputs};
use crate::pipeline::job::{GraphJob, Job, Source};
use crate::pipeline::joiner::{Decision, Joiner, Offered};
use crate::pipeline::outcome::failed_join_completions;
use crate::step::StepInput;
use crate::telemetry::WorkerMetrics;

/// A lane of the worker, as a local hop reaches it.
pub(crate) struct LocalLane {
    /// The step pool.
    pub(crate) unit: Unit,
    /// Its step (the lane's own slot: a swapped model is seen here too).
    pub(crate) step: StepSlot,
    /// Steps fused after it.
    pub(crate) fused: FusedSlot,
    /// What its finished jobs say about it.
    pub(crate) facts: UnitFacts,
    /// Its counters.
    pub(crate) metrics: Arc<WorkerMetrics>,
    /// The model's signature (model lanes).
    pub(crate) signature: Option<Signature>,
    /// Rows per batch at most.
    pub(crate) max_rows: usize,
    /// Whether it holds a join.
    pub(crate) joins: bool,
    /// Index of its own topic among the worker's topics.
    pub(crate) own_topic: usize,
}

/// Join parts that came out of one round, by the join's lane and request id: each with its
/// graph and step, and the record it came from.
type RoundParts = HashMap<(usize, String), Vec<(Arc<Graph>, usize, Source, Outgoing)>>;

/// Where a forward goes from here.
enum Hop {
    /// A job of lane `.0`.
    Run(usize, Job),
    /// A part of the join of lane `lane`, step `step` of `graph`.
    Part {
        lane: usize,
        graph: Arc<Graph>,
        step: usize,
        part: Outgoing,
    },
    /// Through its topic.
    Remote(Outgoing),
}

/// The worker's lanes by their own topic, and the graphs hops are placed in.
pub(crate) struct LocalLanes {
    /// The worker's topics, by index (where a record came from).
    topics: Arc<Vec<String>>,
    by_topic: HashMap<String, usize>,
    lanes: Vec<LocalLane>,
    graphs: RwLock<Graphs>,
    /// Records that ran in process instead of through their topic.
    hops: metrics::Counter,
}

/// Set once every lane of the worker has started; empty while local hops are off.
pub(crate) type LocalSlot = Arc<std::sync::OnceLock<LocalLanes>>;

impl LocalLanes {
    /// The lanes, each reached by its own topic (`topics[i]` for lane `i`).
    pub(crate) fn new(
        lanes: Vec<(String, LocalLane)>,
        graphs: Graphs,
        topics: Arc<Vec<String>>,
        unit: &str,
    ) -> LocalLanes {
        let mut by_topic = HashMap::new();
        let mut all = Vec::new();
        for (i, (topic, lane)) in lanes.into_iter().enumerate() {
            by_topic.insert(topic, i);
            all.push(lane);
        }
        LocalLanes {
            topics,
            by_topic,
            lanes: all,
            graphs: RwLock::new(graphs),
            hops: metrics::counter!("sluice_worker_local_hops_total", "unit" => unit.to_string()),
        }
    }

    /// Places hops in `graphs` from now on (a config reload).
    pub(crate) fn replace_graphs(&self, graphs: Graphs) {
        *self.graphs.write().unwrap_or_else(|e| e.into_inner()) = graphs;
    }

    fn graph(&self, name: &str) -> Option<Arc<Graph>> {
        let graphs = self.graphs.read().unwrap_or_else(|e| e.into_inner());
        graphs.get(name).cloned()
    }

    /// Where forward `f` goes: a job or join part of the lane that owns its topic, or its topic.
    fn hop_for(&self, f: Outgoing, source: Source) -> Hop {
        let Some(&i) = self.by_topic.get(&f.topic) else {
            return Hop::Remote(f);
        };
        let lane = &self.lanes[i];
        let Some(hop) = f.request.hop.as_ref().filter(|h| !h.shadow) else {
            return Hop::Remote(f);
        };
        let Some((graph, step)) = self
            .graph(&hop.graph)
            .and_then(|g| Some((Arc::clone(&g), g.step_index(&hop.step)?)))
        else {
            return Hop::Remote(f);
        };
        let s = &graph.steps[step];
        let ours = match (&s.kind, &lane.unit) {
            (StepKind::Model(_), Unit::Model(_)) => lane.signature.is_some(),
            (kind, Unit::Step { .. }) => {
                !matches!(kind, StepKind::Model(_)) && graph.unit_of(step) == lane.unit
            }
            _ => false,
        };
        if !ours {
            return Hop::Remote(f);
        }
        if lane.joins {
            return Hop::Part {
                lane: i,
                graph,
                step,
                part: f,
            };
        }
        let Ok(inputs) = step_inputs(&graph, step, &f.request.inputs) else {
            return Hop::Remote(f);
        };
        if let (Some(signature), Unit::Model(me)) = (&lane.signature, &lane.unit) {
            if validate_inputs(signature, &inputs).is_err() {
                return Hop::Remote(f);
            }
            if s.canary.is_some() {
                lane.metrics.canary_served(&graph.name, &s.name, me);
            }
        }
        // The primary's inputs go with its outputs to each shadow: keep a copy then.
        let kept = if s.shadows.is_empty() {
            Vec::new()
        } else {
            inputs.clone()
        };
        let Outgoing { topic, mut request } = f;
        let carried = std::mem::take(&mut request.inputs);
        let job = Job {
            request: InferenceRequest {
                inputs: kept,
                ..request
            },
            input: StepInput {
                tensors: inputs,
                ..Default::default()
            },
            source,
            held: Vec::new(),
            topic,
            graph: Some(GraphJob {
                graph,
                step,
                carried,
                shadow: false,
            }),
        };
        Hop::Run(i, job)
    }

    /// Decides, here, the joins whose parts all came out of this round (`parts`, by lane and
    /// request id): a combine job for the lane, or the failed join's completions. The parts of
    /// a join not all here go through its topic, in completions of their record.
    fn join_here(
        &self,
        parts: RoundParts,
        jobs: &mut [Vec<Job>],
        completions: &mut Vec<Completion>,
    ) {
        for ((lane, _), parts) in parts {
            let Some((graph, step)) = parts.first().map(|(g, s, _, _)| (Arc::clone(g), *s)) else {
                continue;
            };
            let wanted = match &graph.steps[step].kind {
                StepKind::Combine(j) => j.parts.len(),
                _ => usize::MAX,
            };
            let mut named: Vec<&str> = parts
                .iter()
                .filter_map(|(_, _, _, o)| Some(o.request.hop.as_ref()?.from.as_str()))
                .collect();
            named.sort_unstable();
            named.dedup();
            let all_here = named.len() == parts.len() && parts.len() == wanted;
            if !all_here {
                completions.extend(parts.into_iter().map(|(_, _, source, o)| Completion {
                    source,
                    forwards: vec![o],
                    ..Default::default()
                }));
                continue;
            }
            let topic = self.topics.get(self.lanes[lane].own_topic).cloned();
            let mut joiner = Joiner::new(Arc::clone(&graph), step, topic.unwrap_or_default());
            self.hops.increment(parts.len() as u64);
            for (_, _, source, o) in parts {
                let Offered::Decided(d) = joiner.offer(o.request, source) else {
                    continue;
                };
                match *d {
                    Decision::Combine(job) => jobs[lane].push(*job),
                    Decision::Failed(d) => {
                        completions.extend(failed_join_completions(&self.topics, &graph, *d));
                    }
                }
            }
        }
    }

    /// Runs `jobs` through lane `i`'s step (in batches of its size) and the steps fused after it.
    async fn run(&self, i: usize, jobs: Vec<Job>) -> Vec<Completion> {
        let lane = &self.lanes[i];
        let step = Arc::clone(&*lane.step.read().unwrap_or_else(|e| e.into_inner()));
        let fused = Arc::clone(&*lane.fused.read().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::with_capacity(jobs.len());
        for batch in batches_of(jobs, lane.max_rows) {
            let mut done =
                Box::pin(run_batch(step.as_ref(), batch, &lane.facts, &lane.metrics)).await;
            if !fused.is_empty() {
                done = Box::pin(run_fused(done, &fused, &lane.metrics)).await;
            }
            out.extend(done);
        }
        out
    }
}

/// Runs in process every hop the completions forward to a lane of this worker, and the hops
/// those lead to, until only answers and records for other workers are left. Each job's
/// completions are added to the list with the consumed record's source.
pub(crate) async fn run_local(completions: Vec<Completion>, local: &LocalLanes) -> Vec<Completion> {
    // A plain model's batch forwards nothing: no work here.
    if completions.iter().all(|c| c.forwards.is_empty()) {
        return completions;
    }
    let mut done = Vec::with_capacity(completions.len());
    let mut pending = completions;
    loop {
        let mut jobs: Vec<Vec<Job>> = (0..local.lanes.len()).map(|_| Vec::new()).collect();
        let mut parts = RoundParts::new();
        for mut c in pending.drain(..) {
            if !c.forwards.is_empty() {
                let mut remote = Vec::new();
                for f in std::mem::take(&mut c.forwards) {
                    match local.hop_for(f, c.source) {
                        Hop::Run(i, job) => {
                            local.hops.increment(1);
                            jobs[i].push(job);
                        }
                        Hop::Part {
                            lane,
                            graph,
                            step,
                            part,
                        } => parts
                            .entry((lane, part.request.id.clone()))
                            .or_default()
                            .push((graph, step, c.source, part)),
                        Hop::Remote(f) => remote.push(f),
                    }
                }
                c.forwards = remote;
            }
            done.push(c);
        }
        local.join_here(parts, &mut jobs, &mut done);
        if jobs.iter().all(Vec::is_empty) {
            return done;
        }
        // A graph half done: its first steps ran, the next ones have not, nothing produced.
        crate::fail_point::pass("mid_chain");
        let runs = jobs
            .into_iter()
            .enumerate()
            .filter(|(_, j)| !j.is_empty())
            .map(|(i, j)| local.run(i, j));
        for completions in join_all(runs).await {
            pending.extend(completions);
        }
    }
}

/// `jobs` in order, grouped into batches of at most `max_rows` rows (a larger job alone).
fn batches_of(jobs: Vec<Job>, max_rows: usize) -> Vec<Vec<Job>> {
    let mut out: Vec<Vec<Job>> = Vec::new();
    let mut rows = 0;
    for j in jobs {
        let r = j.rows();
        match out.last_mut() {
            Some(last) if rows + r <= max_rows => {
                rows += r;
                last.push(j);
            }
            _ => {
                rows = r;
                out.push(vec![j]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{DataType, Tensor};

    fn job(rows: i64) -> Job {
        Job {
            request: InferenceRequest::default(),
            input: StepInput {
                tensors: vec![Tensor {
                    name: "input".into(),
                    datatype: DataType::Fp32,
                    shape: vec![rows, 1],
                    data: vec![0; 4 * usize::try_from(rows).unwrap_or(0)],
                }],
                ..Default::default()
            },
            source: Source::default(),
            held: Vec::new(),
            topic: String::new(),
            graph: None,
        }
    }

    #[test]
    fn batches_hold_at_most_max_rows_and_keep_order() {
        let sizes = |b: &Vec<Vec<Job>>| -> Vec<Vec<usize>> {
            b.iter()
                .map(|b| b.iter().map(Job::rows).collect())
                .collect()
        };
        let b = batches_of(vec![job(3), job(2), job(4), job(10), job(1)], 5);
        assert_eq!(sizes(&b), vec![vec![3, 2], vec![4], vec![10], vec![1]]);
        assert!(batches_of(Vec::new(), 5).is_empty());
    }
}
