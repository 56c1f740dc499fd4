//! A worker: one member of a unit's consumer group. A unit is one step pool, or a deployment
//! unit of several behind one consumer (one fetch loop for all their topics). Each record goes
//! to the lane of the step pool that owns its topic, which turns it into a job
//! ([`crate::pipeline::admission`]), batches jobs and runs them through its step ([`crate::pipeline::executor`]),
//! holds a join's parts until their request is decided and delivers what follows; each offset is
//! stored only once everything up to it has been delivered (at-least-once, [`crate::transport::group`]).
//! The lanes share the fetch: a lane whose queue is full holds up the others of its unit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use sluice_common::graph::{StepKind, Unit};
use sluice_common::ops::ReloadRequest;
use sluice_common::producer::AsyncProducer;
use sluice_common::{Deployment, WorkerUnit};
use tokio::sync::{Semaphore, mpsc};

use crate::pipeline::admission::{Admission, Admit, admit};
use crate::pipeline::batcher::{Dispatched, Item, run_batcher};
use crate::pipeline::executor::{StepSlot, UnitFacts};
use crate::pipeline::job::{Job, Source};
use crate::pipeline::joiner::{Decision, Joiner, Offered};
use crate::pipeline::outcome::{bare, failed_join_completions};
use crate::tasks::BoundedTasks;
use crate::telemetry::WorkerMetrics;
use crate::transport::group::{Completer, GroupContext, PartitionKey, PartitionState, lock};
use crate::transport::record::Record;
use crate::transport::reply::Replier;
use crate::transport::sink::{Producers, Sink, SinkNames};

/// Why a worker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The unit's step could not be built (unknown unit, model failed to load).
    #[error("{0}")]
    Step(#[from] crate::step::BuildError),
    /// Kafka client error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Redis client error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Ops server error.
    #[error("ops server: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the worker serves `/metrics`, health and reload, and what it renders there.
pub struct Ops {
    /// Listen address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The Prometheus recorder's handle.
    pub metrics: PrometheusHandle,
}

/// Runs a worker for `unit` (one step pool, or a deployment unit of several) until `shutdown`
/// resolves, then drains and leaves the group. `config_path` is re-read on SIGHUP or
/// `POST /admin/reload` to change graph routing (canary shares, shadows, router rules, join
/// settings) without a restart.
pub async fn run(
    mut deployment: Deployment,
    unit: &WorkerUnit,
    config_path: Option<PathBuf>,
    ops: Ops,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    // Serve the newest pushed version of each model from the first request on.
    let control = deployment.topics.control();
    let (cfg, topic) = (deployment.config.clone(), control.clone());
    let read =
        tokio::task::spawn_blocking(move || sluice_common::control::read_all(&cfg, &topic)).await;
    let follow_from = match read {
        Ok(Ok((pushes, next))) => {
            apply_pushes(&mut deployment, unit, pushes).await;
            Some(next)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, topic = %control, "control topic not readable: pushed model versions will not reach this worker");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the control topic failed");
            None
        }
    };
    record_serving(&deployment, unit).await;
    let mut worker = Worker::start(&deployment, unit, config_path, ops).await?;
    if let Some(start) = follow_from {
        let served = worker.served_models();
        if !served.is_empty() {
            let name = format!("{}#{}", unit.name, std::process::id());
            worker.background.push(tokio::spawn(crate::swap::follow(
                deployment.config.clone(),
                control,
                start,
                served,
                name,
            )));
        }
    }
    worker.serve(shutdown).await?;
    worker.drain().await;
    Ok(())
}

/// Records in Redis the version each ONNX model of `unit` serves (the gateway's metadata
/// reads it), so a record left by an earlier stack does not outlive it.
async fn record_serving(deployment: &Deployment, unit: &WorkerUnit) {
    let cfg = &deployment.config;
    let mut pipe = redis::pipe();
    for member in &unit.members {
        if let Unit::Model(name) = member
            && let Some(m) = deployment.model(name).filter(|m| m.onnx.is_some())
        {
            pipe.set(sluice_common::control::serving_key(cfg, name), &m.version);
        }
    }
    let written = async {
        let client = sluice_common::redis_client::client(&cfg.redis)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        pipe.query_async::<()>(&mut conn).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), written).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "serving versions not recorded"),
        Err(_) => tracing::warn!("serving versions not recorded: Redis did not answer"),
    }
}

/// Serves, for each ONNX model of `unit`, the newest pushed version that loads (a push that
/// failed to load everywhere, or whose file is gone, is passed over for the one before it).
async fn apply_pushes(
    deployment: &mut Deployment,
    unit: &WorkerUnit,
    pushes: Vec<sluice_common::control::ModelPush>,
) {
    let mut settled = std::collections::HashSet::new();
    for push in pushes.into_iter().rev() {
        if settled.contains(&push.model) {
            continue;
        }
        let Some(model) = deployment.model(&push.model) else {
            continue;
        };
        if model.onnx.is_none() || !unit.members.contains(&Unit::Model(push.model.clone())) {
            continue;
        }
        let mut candidate = model.clone();
        candidate.onnx = Some(push.onnx.clone());
        let loads = tokio::task::spawn_blocking(move || {
            crate::backend::OrtBackend::load(&candidate).map(|_| ())
        })
        .await;
        match loads {
            Ok(Ok(())) => {
                deployment.apply_push(&push);
                tracing::info!(model = %push.model, version = %push.version, "serving the pushed version");
                settled.insert(push.model.clone());
            }
            Ok(Err(e)) => {
                tracing::warn!(model = %push.model, version = %push.version, error = %e, "pushed version does not load; trying the one before");
            }
            Err(e) => tracing::warn!(error = %e, "loading a pushed version failed"),
        }
    }
}

/// One step pool inside a worker: its step, its pipeline (batcher → executor → delivery), its
/// join, and where its records come from. A worker has one lane per step pool it serves.
struct Lane {
    unit: Unit,
    /// Index of the pool's own topic among the worker's topics.
    own_topic: usize,
    /// Graph entry topic → graph name.
    entries: HashMap<String, String>,
    signature: Option<sluice_common::Signature>,
    step: StepSlot,
    /// Steps fused after this one, run in process.
    fused: crate::pipeline::executor::FusedSlot,
    metrics: Arc<WorkerMetrics>,
    completer: Arc<Completer>,
    jobs: Option<mpsc::Sender<Item<Job>>>,
    pipeline: Vec<tokio::task::JoinHandle<()>>,
    joiner: Option<Joiner>,
}

/// What every lane's pipeline is built from.
struct Shared<'a> {
    deployment: &'a Deployment,
    consumer: &'a Arc<StreamConsumer<GroupContext>>,
    state: &'a Arc<PartitionState>,
    topics: &'a Arc<Vec<String>>,
    producers: &'a [AsyncProducer; 2],
    redis: &'a redis::aio::ConnectionManager,
    /// The worker's lanes, for hops run in process (set once all have started).
    local: &'a crate::pipeline::lane::LocalSlot,
}

impl Lane {
    /// Builds the pool's step and starts its pipeline.
    fn start(
        shared: &Shared<'_>,
        unit: &Unit,
        own_topic: usize,
    ) -> Result<(Lane, crate::pipeline::lane::LocalLane), WorkerError> {
        let deployment = shared.deployment;
        let label = unit.to_string();
        let step: StepSlot = Arc::new(RwLock::new(crate::step::for_unit(deployment, unit)?));
        let fused: crate::pipeline::executor::FusedSlot = Arc::new(RwLock::new(Arc::new(
            crate::pipeline::executor::fused_after(deployment, unit)?,
        )));
        let model = match unit {
            Unit::Model(m) => deployment.model(m),
            Unit::Step { .. } => None,
        };
        let own = deployment.unit_topics(unit);
        let entries = deployment
            .graphs
            .values()
            .filter(|g| own[1..].contains(&g.entry_topic))
            .map(|g| (g.entry_topic.clone(), g.name.clone()))
            .collect();
        let wm = Arc::new(WorkerMetrics::new(&label, deployment));
        let completer = Arc::new(Completer {
            consumer: Arc::clone(shared.consumer),
            topics: Arc::clone(shared.topics),
            state: Arc::clone(shared.state),
            sink: Sink::new(
                Producers {
                    results: shared.producers[0].clone(),
                    forwards: shared.producers[1].clone(),
                },
                Replier::new(shared.redis.clone(), Arc::clone(&wm)),
                SinkNames {
                    result_topic: deployment.unit_result_topic(unit),
                    dead_letter_topic: deployment.topics.dead_letter(),
                    unit: label.clone(),
                    topics: Arc::clone(shared.topics),
                },
                Arc::clone(&wm),
            ),
            metrics: Arc::clone(&wm),
        });

        // Batcher → executor (the step) → delivery.
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
        // Combine steps hold parts until their request is decided.
        let joiner = match unit {
            Unit::Step { graph, step } => deployment.graph(graph).and_then(|g| {
                let i = g.step_index(step)?;
                matches!(g.steps[i].kind, StepKind::Combine(_))
                    .then(|| Joiner::new(Arc::clone(g), i, shared.topics[own_topic].clone()))
            }),
            Unit::Model(_) => None,
        };
        let local = crate::pipeline::lane::LocalLane {
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
        let executor = tokio::spawn(crate::pipeline::lane::run(
            batch_rx,
            Arc::clone(&step),
            facts,
            crate::pipeline::lane::InProcess {
                fused: Arc::clone(&fused),
                local: Arc::clone(shared.local),
            },
            Arc::clone(&completer),
            slots * 4,
        ));

        let lane = Lane {
            unit: unit.clone(),
            own_topic,
            entries,
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
    fn has_room(&self, max_queued: usize) -> bool {
        self.joiner
            .as_ref()
            .is_none_or(|j| j.pending() < max_queued)
    }
}

/// A running worker: one consumer and its clients, shared by one lane per step pool it serves.
struct Worker<'a> {
    deployment: &'a Deployment,
    config_path: Option<PathBuf>,
    consumer: Arc<StreamConsumer<GroupContext>>,
    state: Arc<PartitionState>,
    topics: Arc<Vec<String>>,
    /// Topic index → the lane that serves it.
    lane_of: Vec<usize>,
    lanes: Vec<Lane>,
    /// How long an error reply for an undecodable record is stored (ms).
    result_ttl_ms: i64,
    graphs: sluice_common::graph::Graphs,
    /// Records finished without a batch (rejected records, join decisions).
    side: BoundedTasks,
    reloads: mpsc::Receiver<ReloadRequest>,
    ops_stop: Option<tokio::sync::oneshot::Sender<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
    producers: [AsyncProducer; 2],
    /// The lanes as hops run in process reach them.
    local: crate::pipeline::lane::LocalSlot,
}

impl<'a> Worker<'a> {
    /// The ONNX models this worker serves, for pushes to swap.
    fn served_models(&self) -> HashMap<String, crate::swap::Served> {
        self.lanes
            .iter()
            .filter_map(|lane| {
                let Unit::Model(name) = &lane.unit else {
                    return None;
                };
                let config = self.deployment.model(name)?;
                config.onnx.as_ref()?;
                Some((
                    name.clone(),
                    crate::swap::Served {
                        config: config.clone(),
                        slot: Arc::clone(&lane.step),
                    },
                ))
            })
            .collect()
    }

    /// Connects to Kafka and Redis, serves ops, builds each lane's step and pipeline.
    // Long on purpose: the worker's start-up in order (clients, ops server, lanes, background
    // tasks); each piece takes what the earlier ones made.
    async fn start(
        deployment: &'a Deployment,
        spec: &'a WorkerUnit,
        config_path: Option<PathBuf>,
        ops: Ops,
    ) -> Result<Worker<'a>, WorkerError> {
        let cfg = &deployment.config;
        let mut topics = Vec::new();
        let mut lane_of = Vec::new();
        let mut own_topics = Vec::new();
        for (lane, unit) in spec.members.iter().enumerate() {
            if !deployment.has_unit(unit) {
                return Err(crate::step::BuildError::UnknownUnit(unit.to_string()).into());
            }
            own_topics.push(topics.len());
            for t in deployment.unit_topics(unit) {
                topics.push(t);
                lane_of.push(lane);
            }
        }
        let topics = Arc::new(topics);
        let client_id = format!("sluice-worker-{}-{}", spec.name, std::process::id());
        let state = Arc::new(PartitionState::default());
        let consumer: Arc<StreamConsumer<GroupContext>> = Arc::new(
            sluice_common::kafka::consumer_config(cfg, &spec.group, &client_id)
                .create_with_context(GroupContext {
                    topics: Arc::clone(&topics),
                    state: Arc::clone(&state),
                    assigned: Default::default(),
                    assigned_gauge: metrics::gauge!("sluice_worker_assigned_partitions", "unit" => spec.name.clone()),
                })?,
        );
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        let producer: AsyncProducer =
            sluice_common::kafka::producer(cfg, &client_id, cfg.worker.result_linger)?;
        let forward_producer: AsyncProducer = sluice_common::kafka::producer(
            cfg,
            &format!("{client_id}-forward"),
            cfg.worker.forward_linger,
        )?;
        let redis_client = sluice_common::redis_client::client(&cfg.redis)?;
        let redis = redis::aio::ConnectionManager::new(redis_client).await?;

        let (reload_tx, reloads) = mpsc::channel::<ReloadRequest>(4);
        let (ops_stop, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ops_addr = sluice_common::ops::serve_ops(
            ops.listen,
            ops.metrics,
            Arc::clone(&state.joined),
            Some(reload_tx),
            &cfg.gateway.auth,
            async {
                let _ = ops_stop_rx.await;
            },
        )
        .await?;
        tracing::info!(%ops_addr, unit = %spec.name, group = %spec.group, topics = ?topics, "worker serving metrics and health");

        let producers = [producer, forward_producer];
        let local = crate::pipeline::lane::LocalSlot::default();
        let shared = Shared {
            local: &local,
            deployment,
            consumer: &consumer,
            state: &state,
            topics: &topics,
            producers: &producers,
            redis: &redis,
        };
        let (lanes, local_lanes): (Vec<Lane>, Vec<_>) = spec
            .members
            .iter()
            .zip(own_topics)
            .map(|(unit, own)| {
                let (lane, local) = Lane::start(&shared, unit, own)?;
                Ok::<_, WorkerError>((lane, (topics[own].clone(), local)))
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        if cfg.worker.local_hops && lanes.len() > 1 {
            let lanes = crate::pipeline::lane::LocalLanes::new(
                local_lanes,
                deployment.graphs.clone(),
                Arc::clone(&topics),
                &spec.name,
            );
            let _ = local.set(lanes);
        }
        let mut background = Vec::new();
        if cfg.kafka.purge_consumed {
            background.push(tokio::spawn(crate::transport::purge::run(
                Arc::clone(&consumer),
                cfg.clone(),
            )));
        }
        Ok(Worker {
            deployment,
            config_path,
            consumer,
            state,
            topics,
            lane_of,
            lanes,
            result_ttl_ms: i64::try_from(cfg.redis.result_ttl.as_millis()).unwrap_or(i64::MAX),
            graphs: deployment.graphs.clone(),
            side: BoundedTasks::new(cfg.worker.max_queued),
            reloads,
            ops_stop: Some(ops_stop),
            background,
            producers,
            local,
        })
    }

    /// The consumer loop: one `select!` over every event source (shutdown, reloads, join
    /// timeouts, records), so their order is decided in one place.
    /// Returns at shutdown, or when a pipeline is gone.
    async fn serve(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        let max_queued = self.deployment.config.worker.max_queued;
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let consumer = Arc::clone(&self.consumer);
        tokio::pin!(shutdown);
        loop {
            // Requests whose parts came from revoked partitions belong to their new owner now.
            let gone: Vec<PartitionKey> = lock(&self.state.revoked).drain(..).collect();
            if !gone.is_empty() {
                for j in self.lanes.iter_mut().filter_map(|l| l.joiner.as_mut()) {
                    j.forget_partitions(&gone);
                }
            }
            let wait = self
                .lanes
                .iter()
                .filter_map(|l| l.joiner.as_ref().and_then(Joiner::next_timeout))
                .min();
            let room = self.lanes.iter().all(|l| l.has_room(max_queued));
            let open = tokio::select! {
                biased;
                _ = &mut shutdown => false,
                _ = hangup.recv() => {
                    let outcome = self.reload();
                    tracing::info!(?outcome, "SIGHUP: config reloaded");
                    true
                }
                Some(reply) = self.reloads.recv() => {
                    let _ = reply.send(self.reload());
                    true
                }
                _ = sleep_or_forever(wait) => self.expire_joins().await,
                msg = consumer.recv(), if room => match msg {
                    Ok(m) => self.on_record(&m).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        true
                    }
                },
            };
            if !open {
                return Ok(());
            }
        }
    }

    /// Handles one consumed record; false when the pipeline is gone (the worker is stopping).
    async fn on_record(&mut self, m: &BorrowedMessage<'_>) -> bool {
        let Some(topic_index) = self.topics.iter().position(|t| t == m.topic()) else {
            return true;
        };
        let lane_index = self.lane_of[topic_index];
        let key = (topic_index, m.partition());
        let source = Source {
            topic_index,
            partition: m.partition(),
            offset: m.offset(),
        };
        lock(&self.state.tracker).begin(key, m.offset());
        let lane = &self.lanes[lane_index];
        lane.metrics.in_flight.increment(1.0);
        let ctx = Admit {
            unit: &lane.unit,
            model: lane.signature.as_ref(),
            own_topic: &self.topics[lane.own_topic],
            graphs: &self.graphs,
            entries: &lane.entries,
            result_ttl_ms: self.result_ttl_ms,
            metrics: &lane.metrics,
        };
        let headers = Record::headers_of(m);
        let admission = admit(&Record::of(m, &headers), source, &ctx);
        match admission {
            Admission::Run(job) => {
                // Requests from the gateway carry when it sent them (a graph's later hops carry
                // the hop, a direct producer's records 0).
                let sent_us = job.request.sent_at_us;
                if sent_us > 0 && job.request.hop.is_none() {
                    let waited = (sluice_common::now_us() - sent_us).max(0);
                    self.lanes[lane_index]
                        .metrics
                        .fetch_seconds
                        .record(waited as f64 / 1e6);
                }
                self.run(lane_index, *job).await
            }
            Admission::Done(completion) => {
                self.finish(lane_index, vec![*completion]).await;
                true
            }
            Admission::Part(request, source) => {
                let lane = &mut self.lanes[lane_index];
                let Some(j) = lane.joiner.as_mut() else {
                    self.finish(lane_index, vec![bare(source)]).await;
                    return true;
                };
                let offered = j.offer(*request, source);
                lane.metrics.join_pending.set(j.pending() as f64);
                match offered {
                    Offered::Held => true,
                    Offered::Duplicate => {
                        lane.metrics.join_late_parts.increment(1);
                        self.finish(lane_index, vec![bare(source)]).await;
                        true
                    }
                    Offered::Decided(d) => self.decide(lane_index, *d).await,
                }
            }
        }
    }

    /// Decides every join request whose timeout has passed.
    async fn expire_joins(&mut self) -> bool {
        for lane_index in 0..self.lanes.len() {
            let lane = &mut self.lanes[lane_index];
            let Some(j) = lane.joiner.as_mut() else {
                continue;
            };
            let decided = j.expire(Instant::now());
            lane.metrics.join_pending.set(j.pending() as f64);
            for d in decided {
                self.lanes[lane_index].metrics.join_timeouts.increment(1);
                if !self.decide(lane_index, d).await {
                    return false;
                }
            }
        }
        true
    }

    /// Hands a job to its lane's batcher; false when the pipeline is gone.
    async fn run(&mut self, lane: usize, job: Job) -> bool {
        let rows = job.rows().max(1);
        match &self.lanes[lane].jobs {
            Some(jobs) => jobs.send(Item { item: job, rows }).await.is_ok(),
            None => false,
        }
    }

    /// Delivers completions of records finished without a batch, off the loop (bounded).
    async fn finish(&mut self, lane: usize, items: Vec<crate::pipeline::completion::Completion>) {
        let c = Arc::clone(&self.lanes[lane].completer);
        self.side
            .spawn(async move { c.complete(items).await })
            .await;
    }

    /// Acts on a join's decision: its combine job goes to the batcher, a failure is delivered.
    async fn decide(&mut self, lane: usize, d: Decision) -> bool {
        match d {
            Decision::Combine(job) => self.run(lane, *job).await,
            Decision::Failed(d) => {
                let Some(graph) = self.lanes[lane].joiner.as_ref().map(Joiner::graph) else {
                    return true;
                };
                let items = failed_join_completions(&self.topics, &graph, *d);
                self.finish(lane, items).await;
                true
            }
        }
    }

    /// Re-reads the config's graphs; routing changes apply to records arriving from now on, and
    /// non-model steps are rebuilt (a join's weights, say).
    fn reload(&mut self) -> Result<String, String> {
        let fresh = Deployment::load(self.config_path.as_deref()).map_err(|e| e.to_string())?;
        for lane in &mut self.lanes {
            if let Some(j) = lane.joiner.as_mut() {
                j.replace_graph(&fresh.graphs);
            }
            if matches!(lane.unit, Unit::Step { .. }) && fresh.has_unit(&lane.unit) {
                let rebuilt =
                    crate::step::for_unit(&fresh, &lane.unit).map_err(|e| e.to_string())?;
                *lane.step.write().unwrap_or_else(|e| e.into_inner()) = rebuilt;
            }
            let fused = crate::pipeline::executor::fused_after(&fresh, &lane.unit)
                .map_err(|e| e.to_string())?;
            *lane.fused.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fused);
            lane.metrics.config_reloads.increment(1);
        }
        let summary = routing_summary(&fresh.graphs);
        if let Some(local) = self.local.get() {
            local.replace_graphs(fresh.graphs.clone());
        }
        self.graphs = fresh.graphs;
        Ok(format!("reloaded {} graphs; {summary}", self.graphs.len()))
    }

    /// Stops taking records, finishes everything taken, stores and commits, leaves the group.
    /// Parts a join still holds stay uncommitted: whoever owns the partition next reads them again.
    async fn drain(&mut self) {
        tracing::info!("draining");
        self.state.joined.store(false, Ordering::Relaxed);
        let timeout = self.deployment.config.worker.drain_timeout;
        let mut pipeline = Vec::new();
        for lane in &mut self.lanes {
            lane.jobs = None;
            pipeline.append(&mut lane.pipeline);
        }
        let side = &mut self.side;
        let drained = tokio::time::timeout(timeout, async {
            for task in pipeline {
                let _ = task.await;
            }
            side.join_all().await;
        })
        .await;
        if drained.is_err() {
            let unfinished = lock(&self.state.tracker).unfinished();
            tracing::warn!(
                ?timeout,
                unfinished,
                "drain timed out; unfinished records will be redelivered"
            );
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        if let Some(lane) = self.lanes.first() {
            lane.completer.commit_and_leave();
        }
        if let Some(stop) = self.ops_stop.take() {
            let _ = stop.send(());
        }
        for p in &self.producers {
            let _ = p.flush(Duration::from_secs(5));
        }
        tracing::info!("worker stopped");
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d.max(Duration::from_millis(1))).await,
        None => std::future::pending().await,
    }
}

/// Canary and shadow settings of every graph step, for the reload log.
fn routing_summary(graphs: &sluice_common::graph::Graphs) -> String {
    let summary: Vec<String> = graphs
        .values()
        .flat_map(|g| {
            g.steps.iter().filter_map(|s| {
                let c = s.canary.as_ref();
                (c.is_some() || !s.shadows.is_empty()).then(|| {
                    format!(
                        "{}.{}: canary {} shadows {:?}",
                        g.name,
                        s.name,
                        c.map_or("none".to_string(), |c| format!(
                            "{} at {}",
                            c.model, c.share
                        )),
                        s.shadows.iter().map(|(m, _)| m).collect::<Vec<_>>()
                    )
                })
            })
        })
        .collect();
    summary.join("; ")
}
