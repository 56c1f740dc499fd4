//! Each step pool's lane in a worker: its step, its pipeline (batcher → executor → delivery),
//! its join, and where its records come from; started once per pool the worker serves.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use sluice_common::graph::{StepKind, Unit};
use sluice_common::producer::AsyncProducer;
use sluice_common::{Deployment, WorkerUnit};
use tokio::sync::{Semaphore, mpsc};

use super::WorkerError;
use crate::pipeline::batcher::{Dispatched, Item, run_batcher};
use crate::pipeline::executor::{FusedSlot, StepSlot, UnitFacts};
use crate::pipeline::executor::{run_batch, run_fused};
use crate::pipeline::job::Job;
use crate::pipeline::joiner::Joiner;
use crate::pipeline::lane::{LocalLane, LocalLanes, LocalSlot, run_local};
use crate::telemetry::WorkerMetrics;
use crate::transport::group::{Completer, GroupContext, PartitionState};
use crate::transport::reply::Replier;
use crate::transport::sink::{Producers, Sink, SinkNames};
use tokio::task::JoinSet;

/// One step pool inside a worker: its step, its pipeline (batcher → executor → delivery), its
/// join, and where its records come from. A worker has one lane per step pool it serves.
pub(super) struct Lane {
    pub(super) unit: Unit,
    /// Index of the pool's own topic among the worker's topics.
    pub(super) own_topic: usize,
    /// Graph entry topic → graph name.
    pub(super) entries: HashMap<String, String>,
    pub(super) signature: Option<sluice_common::Signature>,
    pub(super) step: StepSlot,
    /// Steps fused after this one, run in process.
    pub(super) fused: FusedSlot,
    pub(super) metrics: Arc<WorkerMetrics>,
    pub(super) completer: Arc<Completer>,
    pub(super) jobs: Option<mpsc::Sender<Item<Job>>>,
    pub(super) pipeline: Vec<tokio::task::JoinHandle<()>>,
    pub(super) joiner: Option<Joiner>,
}

/// What every lane's pipeline is built from.
pub(super) struct Shared<'a> {
    pub(super) deployment: &'a Deployment,
    pub(super) consumer: &'a Arc<StreamConsumer<GroupContext>>,
    pub(super) state: &'a Arc<PartitionState>,
    pub(super) topics: &'a Arc<Vec<String>>,
    pub(super) producers: &'a [AsyncProducer; 2],
    pub(super) redis: &'a redis::aio::ConnectionManager,
    /// The worker's lanes, for hops run in process (set once all have started).
    pub(super) local: &'a LocalSlot,
}

impl Lane {
    /// Starts a lane for each of `spec`'s step pools; with in-process hops on, lets them reach
    /// each other through `shared.local`.
    pub(super) fn start_all(
        shared: &Shared<'_>,
        spec: &WorkerUnit,
        own_topics: Vec<usize>,
    ) -> Result<Vec<Lane>, WorkerError> {
        let (lanes, local_lanes): (Vec<Lane>, Vec<_>) = spec
            .members
            .iter()
            .zip(own_topics)
            .map(|(unit, own)| {
                let (lane, local) = Lane::start(shared, unit, own)?;
                Ok::<_, WorkerError>((lane, (shared.topics[own].clone(), local)))
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let deployment = shared.deployment;
        if deployment.config.worker.local_hops && lanes.len() > 1 {
            let _ = shared.local.set(LocalLanes::new(
                local_lanes,
                deployment.graphs.clone(),
                Arc::clone(shared.topics),
                &spec.name,
            ));
        }
        Ok(lanes)
    }

    /// Builds the pool's step and starts its pipeline (batcher → executor → delivery).
    fn start(
        shared: &Shared<'_>,
        unit: &Unit,
        own_topic: usize,
    ) -> Result<(Lane, LocalLane), WorkerError> {
        let deployment = shared.deployment;
        let label = unit.to_string();
        let step: StepSlot = Arc::new(RwLock::new(crate::step::for_unit(deployment, unit)?));
        let fused: FusedSlot = Arc::new(RwLock::new(Arc::new(
            crate::pipeline::executor::fused_after(deployment, unit)?,
        )));
        let model = match unit {
            Unit::Model(m) => deployment.model(m),
            Unit::Step { .. } => None,
        };
        let wm = Arc::new(WorkerMetrics::new(&label, deployment));
        let completer = completer(shared, unit, &wm);
        let (slots, max_batch, max_delay) = match model {
            Some(m) => (m.threads, m.max_batch_size, m.max_delay),
            // Built-in, combine and route steps are cheap: several small batches at once.
            None => (4, 256, Duration::ZERO),
        };
        let (jobs, job_rx) = mpsc::channel::<Item<Job>>(deployment.config.worker.max_queued);
        let (batch_tx, batch_rx) = mpsc::channel::<Dispatched<Job>>(slots);
        let batcher = tokio::spawn(run_batcher(
            job_rx,
            batch_tx,
            Arc::new(Semaphore::new(slots)),
            max_batch,
            max_delay,
            wm.batch_wait_seconds.clone(),
        ));
        let facts = UnitFacts {
            name: label,
            version: model.map(|m| m.version.clone()).unwrap_or_default(),
            model: model.is_some(),
        };
        let joiner = joiner_for(deployment, unit, &shared.topics[own_topic]);
        let local = LocalLane {
            unit: unit.clone(),
            step: Arc::clone(&step),
            fused: Arc::clone(&fused),
            facts: facts.clone(),
            metrics: Arc::clone(&wm),
            signature: model.map(|m| m.signature()),
            max_rows: max_batch,
            joins: joiner.is_some(),
            own_topic,
        };
        let in_process = InProcess {
            fused: Arc::clone(&fused),
            local: Arc::clone(shared.local),
        };
        let executor = tokio::spawn(run_lane(
            batch_rx,
            Arc::clone(&step),
            facts,
            in_process,
            Arc::clone(&completer),
            slots * 4,
        ));
        let lane = Lane {
            unit: unit.clone(),
            own_topic,
            entries: entries_of(deployment, unit),
            signature: model.map(|m| m.signature()),
            step,
            fused,
            metrics: wm,
            completer,
            jobs: Some(jobs),
            pipeline: vec![batcher, executor],
            joiner,
        };
        Ok((lane, local))
    }

    /// Whether its join can hold more requests (a pool without a join always can).
    pub(super) fn has_room(&self, max_queued: usize) -> bool {
        self.joiner
            .as_ref()
            .is_none_or(|j| j.pending() < max_queued)
    }
}

/// Graph entry topic → graph name, for the graphs whose entry `unit` reads.
fn entries_of(deployment: &Deployment, unit: &Unit) -> HashMap<String, String> {
    let own = deployment.unit_topics(unit);
    deployment
        .graphs
        .values()
        .filter(|g| own[1..].contains(&g.entry_topic))
        .map(|g| (g.entry_topic.clone(), g.name.clone()))
        .collect()
}

/// What delivers the lane's completions and commits their offsets.
fn completer(shared: &Shared<'_>, unit: &Unit, wm: &Arc<WorkerMetrics>) -> Arc<Completer> {
    let deployment = shared.deployment;
    let sink = Sink::new(
        Producers {
            results: shared.producers[0].clone(),
            forwards: shared.producers[1].clone(),
        },
        Replier::new(shared.redis.clone(), Arc::clone(wm)),
        SinkNames {
            result_topic: deployment.unit_result_topic(unit),
            dead_letter_topic: deployment.topics.dead_letter(),
            unit: unit.to_string(),
            topics: Arc::clone(shared.topics),
        },
        Arc::clone(wm),
    );
    Arc::new(Completer {
        consumer: Arc::clone(shared.consumer),
        topics: Arc::clone(shared.topics),
        state: Arc::clone(shared.state),
        sink,
        metrics: Arc::clone(wm),
    })
}

/// A combine step's joiner (it holds parts until their request is decided); `None` otherwise.
fn joiner_for(deployment: &Deployment, unit: &Unit, own_topic: &str) -> Option<Joiner> {
    let Unit::Step { graph, step } = unit else {
        return None;
    };
    let g = deployment.graph(graph)?;
    let i = g.step_index(step)?;
    matches!(g.steps[i].kind, StepKind::Combine(_))
        .then(|| Joiner::new(Arc::clone(g), i, own_topic.to_string()))
}

/// What a lane's batches lead to that runs in process: steps fused after it, and hops to the
/// worker's other lanes.
pub(super) struct InProcess {
    pub(super) fused: FusedSlot,
    pub(super) local: LocalSlot,
}

/// Runs every batch from `batches` until it closes (through the step, fused steps and local
/// hops), then waits for the last deliveries. Batches run concurrently up to the batcher's
/// slots; delivery is bounded too, so neither grows without limit.
pub(super) async fn run_lane(
    mut batches: mpsc::Receiver<Dispatched<Job>>,
    step: StepSlot,
    unit: UnitFacts,
    in_process: InProcess,
    completer: Arc<Completer>,
    deliveries: usize,
) {
    let delivery_slots = Arc::new(Semaphore::new(deliveries.max(1)));
    let mut tasks = JoinSet::new();
    while let Some(Dispatched { items, permit }) = batches.recv().await {
        let current = Arc::clone(&*step.read().unwrap_or_else(|e| e.into_inner()));
        let (unit, completer, delivery_slots, fused, local) = (
            unit.clone(),
            Arc::clone(&completer),
            Arc::clone(&delivery_slots),
            Arc::clone(&*in_process.fused.read().unwrap_or_else(|e| e.into_inner())),
            Arc::clone(&in_process.local),
        );
        tasks.spawn(async move {
            let mut completions =
                run_batch(current.as_ref(), items, &unit, &completer.metrics).await;
            if !fused.is_empty() {
                completions = run_fused(completions, &fused, &completer.metrics).await;
            }
            if let Some(local) = local.get() {
                completions = run_local(completions, local).await;
            }
            // Take a delivery slot before freeing the step's, so finished batches cannot pile up.
            let delivery = delivery_slots.acquire_owned().await;
            drop(permit);
            completer.complete(completions).await;
            drop(delivery);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}
