//! A worker: one member of a unit's consumer group. It consumes the unit's topics, turns each
//! record into a job ([`crate::admission`]), batches jobs and runs them through the unit's step
//! ([`crate::executor`]), holds a join's parts until their request is decided, delivers what
//! follows, and stores each offset only once everything up to it has been delivered
//! (at-least-once, [`crate::group`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, Producer};
use sluice_common::Deployment;
use sluice_common::config::BrokerQuirks;
use sluice_common::graph::{StepKind, Unit};
use sluice_common::ops::ReloadRequest;
use tokio::sync::{Semaphore, mpsc};

use crate::admission::{Admission, Admit, admit};
use crate::batcher::{Dispatched, Item, run_batcher};
use crate::executor::{StepSlot, UnitFacts};
use crate::group::{Completer, GroupContext, PartitionState, lock};
use crate::job::{Job, Source};
use crate::join::{Decision, Joiner, Offered};
use crate::outcome::{bare, failed_join_completions};
use crate::quirks::{Arrival, TansuQuirks};
use crate::record::Record;
use crate::reply::Replier;
use crate::sink::{Producers, Sink, SinkNames};
use crate::tasks::BoundedTasks;
use crate::telemetry::WorkerMetrics;

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

/// Runs a worker for `unit` until `shutdown` resolves, then drains and leaves the group.
/// `config_path` is re-read on SIGHUP or `POST /admin/reload` to change graph routing (canary
/// shares, shadows, router rules, join settings) without a restart.
pub async fn run(
    deployment: Deployment,
    unit: &Unit,
    config_path: Option<PathBuf>,
    ops: Ops,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    let mut worker = Worker::start(&deployment, unit, config_path, ops).await?;
    worker.serve(shutdown).await?;
    worker.drain().await;
    Ok(())
}

/// A running worker: its clients, its pipeline (batcher → executor → delivery) and its join.
struct Worker<'a> {
    deployment: &'a Deployment,
    unit: &'a Unit,
    config_path: Option<PathBuf>,
    completer: Arc<Completer>,
    state: Arc<PartitionState>,
    topics: Arc<Vec<String>>,
    /// Graph entry topic → graph name.
    entries: HashMap<String, String>,
    signature: Option<sluice_common::Signature>,
    /// How long an error reply for an undecodable record is stored (ms).
    result_ttl_ms: i64,
    step: StepSlot,
    graphs: sluice_common::graph::Graphs,
    metrics: Arc<WorkerMetrics>,
    jobs: Option<mpsc::Sender<Item<Job>>>,
    pipeline: Vec<tokio::task::JoinHandle<()>>,
    joiner: Option<Joiner>,
    quirks: Option<TansuQuirks>,
    /// Records finished without a batch (rejected records, join decisions).
    side: BoundedTasks,
    reloads: mpsc::Receiver<ReloadRequest>,
    ops_stop: Option<tokio::sync::oneshot::Sender<()>>,
    producers: [FutureProducer; 2],
}

impl<'a> Worker<'a> {
    /// Builds the unit's step, connects to Kafka and Redis, serves ops, starts the pipeline.
    // Long on purpose: the worker's start-up in order (step, clients, ops server, sink, pipeline,
    // join, quirks); each piece takes what the earlier ones made.
    async fn start(
        deployment: &'a Deployment,
        unit: &'a Unit,
        config_path: Option<PathBuf>,
        ops: Ops,
    ) -> Result<Worker<'a>, WorkerError> {
        let cfg = &deployment.config;
        let label = unit.to_string();
        let step: StepSlot = Arc::new(RwLock::new(crate::step::for_unit(deployment, unit)?));
        let model = match unit {
            Unit::Model(m) => deployment.model(m),
            Unit::Step { .. } => None,
        };
        let topics = Arc::new(deployment.unit_topics(unit));
        let entries = deployment
            .graphs
            .values()
            .filter(|g| topics[1..].contains(&g.entry_topic))
            .map(|g| (g.entry_topic.clone(), g.name.clone()))
            .collect();
        let client_id = format!("sluice-worker-{label}-{}", std::process::id());
        let state = Arc::new(PartitionState::default());
        let consumer: StreamConsumer<GroupContext> =
            sluice_common::kafka::consumer_config(cfg, &deployment.unit_group(unit), &client_id)
                .create_with_context(GroupContext {
                    topics: Arc::clone(&topics),
                    state: Arc::clone(&state),
                    assigned: Default::default(),
                    assigned_gauge: metrics::gauge!("sluice_worker_assigned_partitions", "unit" => label.clone()),
                })?;
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        let producer: FutureProducer =
            sluice_common::kafka::producer_config(cfg, &client_id, cfg.worker.result_linger)
                .create()?;
        let forward_producer: FutureProducer = sluice_common::kafka::producer_config(
            cfg,
            &format!("{client_id}-forward"),
            cfg.worker.forward_linger,
        )
        .create()?;
        let redis =
            redis::aio::ConnectionManager::new(redis::Client::open(cfg.redis.url.as_str())?)
                .await?;

        let (reload_tx, reloads) = mpsc::channel::<ReloadRequest>(4);
        let (ops_stop, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ops_addr = sluice_common::ops::serve_ops(
            ops.listen,
            ops.metrics,
            Arc::clone(&state.joined),
            Some(reload_tx),
            async {
                let _ = ops_stop_rx.await;
            },
        )
        .await?;
        tracing::info!(%ops_addr, topics = ?topics, "worker serving metrics and health");

        let wm = Arc::new(WorkerMetrics::new(&label, deployment));
        let completer = Arc::new(Completer {
            consumer,
            topics: Arc::clone(&topics),
            state: Arc::clone(&state),
            sink: Sink::new(
                Producers {
                    results: producer.clone(),
                    forwards: forward_producer.clone(),
                },
                Replier::new(redis, Arc::clone(&wm)),
                SinkNames {
                    result_topic: deployment.unit_result_topic(unit),
                    dead_letter_topic: deployment.topics.dead_letter(),
                    unit: label.clone(),
                    topics: Arc::clone(&topics),
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
        let (jobs, job_rx) = mpsc::channel::<Item<Job>>(cfg.worker.max_queued);
        let (batch_tx, batch_rx) = mpsc::channel::<Dispatched<Job>>(slots);
        let batcher = tokio::spawn(run_batcher(
            job_rx,
            batch_tx,
            Arc::new(Semaphore::new(slots)),
            max_batch,
            max_delay,
        ));
        let facts = UnitFacts {
            name: label.clone(),
            version: model.map(|m| m.version.clone()).unwrap_or_default(),
            model: model.is_some(),
        };
        let executor = tokio::spawn(crate::executor::run(
            batch_rx,
            Arc::clone(&step),
            facts,
            Arc::clone(&completer),
            slots * 4,
        ));

        // Combine steps hold parts until their request is decided.
        let joiner = match unit {
            Unit::Step { graph, step } => deployment.graph(graph).and_then(|g| {
                let i = g.step_index(step)?;
                matches!(g.steps[i].kind, StepKind::Combine(_))
                    .then(|| Joiner::new(Arc::clone(g), i, topics[0].clone()))
            }),
            Unit::Model(_) => None,
        };
        let quirks = (cfg.kafka.broker_quirks == BrokerQuirks::Tansu).then_some(TansuQuirks {
            stalled_after: cfg.worker.stalled_partition_after,
            nudge_after: cfg.worker.join_nudge_after,
        });
        Ok(Worker {
            deployment,
            unit,
            config_path,
            completer,
            state,
            topics,
            entries,
            signature: model.map(|m| m.signature()),
            result_ttl_ms: i64::try_from(cfg.redis.result_ttl.as_millis()).unwrap_or(i64::MAX),
            step,
            graphs: deployment.graphs.clone(),
            metrics: wm,
            jobs: Some(jobs),
            pipeline: vec![batcher, executor],
            joiner,
            quirks,
            side: BoundedTasks::new(cfg.worker.max_queued),
            reloads,
            ops_stop: Some(ops_stop),
            producers: [producer, forward_producer],
        })
    }

    /// The consumer loop: one `select!` over every event source (shutdown, reloads, the tansu
    /// checks, join timeouts, records), so their order is decided in one place. Returns at
    /// shutdown, or when the pipeline is gone.
    async fn serve(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        let max_queued = self.deployment.config.worker.max_queued;
        let mut quirk_check = tokio::time::interval(
            self.quirks
                .map_or(Duration::from_secs(3600), |q| q.check_interval()),
        );
        quirk_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let completer = Arc::clone(&self.completer);
        tokio::pin!(shutdown);
        loop {
            // Requests whose parts came from revoked partitions belong to their new owner now.
            if let Some(j) = self.joiner.as_mut() {
                let gone: Vec<i32> = lock(&self.state.revoked).drain(..).collect();
                if !gone.is_empty() {
                    j.forget_partitions(&gone);
                }
            }
            let wait = self.joiner.as_ref().and_then(Joiner::next_timeout);
            let room = self
                .joiner
                .as_ref()
                .is_none_or(|j| j.pending() < max_queued);
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
                _ = quirk_check.tick(), if self.quirks.is_some() => {
                    if let Some(q) = self.quirks {
                        q.check(&completer, self.joiner.as_mut(), &mut self.side).await;
                    }
                    true
                }
                _ = sleep_or_forever(wait) => self.expire_joins().await,
                msg = completer.consumer.recv(), if room => match msg {
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
        let key = (topic_index, m.partition());
        if let Some(q) = &self.quirks {
            match q.arrival(&self.completer, key, m.offset()) {
                Arrival::Next => {}
                Arrival::Skip => return true,
                Arrival::SeekBack(expected) => {
                    tracing::warn!(
                        topic = m.topic(),
                        partition = m.partition(),
                        expected,
                        got = m.offset(),
                        "the fetch skipped records; re-reading from the first one missing"
                    );
                    self.completer.seek(m.topic(), m.partition(), expected);
                    return true;
                }
            }
        }
        let source = Source {
            topic_index,
            partition: m.partition(),
            offset: m.offset(),
        };
        lock(&self.state.tracker).begin(key, m.offset());
        self.metrics.in_flight.increment(1.0);
        let ctx = Admit {
            unit: self.unit,
            model: self.signature.as_ref(),
            own_topic: &self.topics[0],
            graphs: &self.graphs,
            entries: &self.entries,
            result_ttl_ms: self.result_ttl_ms,
            metrics: &self.metrics,
        };
        let headers = Record::headers_of(m);
        let admission = admit(&Record::of(m, &headers), source, &ctx);
        match admission {
            Admission::Run(job) => self.run(*job).await,
            Admission::Done(completion) => {
                self.finish(vec![*completion]).await;
                true
            }
            Admission::Part(request, source) => {
                let Some(j) = self.joiner.as_mut() else {
                    self.finish(vec![bare(source)]).await;
                    return true;
                };
                let offered = j.offer(*request, source);
                self.metrics.join_pending.set(j.pending() as f64);
                match offered {
                    Offered::Held => true,
                    Offered::Duplicate => {
                        self.metrics.join_late_parts.increment(1);
                        self.finish(vec![bare(source)]).await;
                        true
                    }
                    Offered::Decided(d) => self.decide(*d).await,
                }
            }
        }
    }

    /// Decides every join request whose timeout has passed.
    async fn expire_joins(&mut self) -> bool {
        let Some(j) = self.joiner.as_mut() else {
            return true;
        };
        let decided = j.expire(Instant::now());
        self.metrics.join_pending.set(j.pending() as f64);
        for d in decided {
            self.metrics.join_timeouts.increment(1);
            if !self.decide(d).await {
                return false;
            }
        }
        true
    }

    /// Hands a job to the batcher; false when the pipeline is gone.
    async fn run(&mut self, job: Job) -> bool {
        let rows = job.rows().max(1);
        match &self.jobs {
            Some(jobs) => jobs.send(Item { item: job, rows }).await.is_ok(),
            None => false,
        }
    }

    /// Delivers completions of records finished without a batch, off the loop (bounded).
    async fn finish(&mut self, items: Vec<crate::completion::Completion>) {
        let c = Arc::clone(&self.completer);
        self.side
            .spawn(async move { c.complete(items).await })
            .await;
    }

    /// Acts on a join's decision: its combine job goes to the batcher, a failure is delivered.
    async fn decide(&mut self, d: Decision) -> bool {
        match d {
            Decision::Combine(job) => self.run(*job).await,
            Decision::Failed(d) => {
                let Some(graph) = self.joiner.as_ref().map(Joiner::graph) else {
                    return true;
                };
                let items = failed_join_completions(&self.topics, &graph, *d);
                self.finish(items).await;
                true
            }
        }
    }

    /// Re-reads the config's graphs; routing changes apply to records arriving from now on, and
    /// a non-model step is rebuilt (a join's weights, say).
    fn reload(&mut self) -> Result<String, String> {
        let fresh = Deployment::load(self.config_path.as_deref()).map_err(|e| e.to_string())?;
        if let Some(j) = self.joiner.as_mut() {
            j.replace_graph(&fresh.graphs);
        }
        if matches!(self.unit, Unit::Step { .. }) && fresh.has_unit(self.unit) {
            let rebuilt = crate::step::for_unit(&fresh, self.unit).map_err(|e| e.to_string())?;
            *self.step.write().unwrap_or_else(|e| e.into_inner()) = rebuilt;
        }
        let summary = routing_summary(&fresh.graphs);
        self.graphs = fresh.graphs;
        self.metrics.config_reloads.increment(1);
        Ok(format!("reloaded {} graphs; {summary}", self.graphs.len()))
    }

    /// Stops taking records, finishes everything taken, stores and commits, leaves the group.
    /// Parts a join still holds stay uncommitted: whoever owns the partition next reads them again.
    async fn drain(&mut self) {
        tracing::info!("draining");
        self.state.joined.store(false, Ordering::Relaxed);
        self.jobs = None;
        let timeout = self.deployment.config.worker.drain_timeout;
        let (pipeline, side) = (std::mem::take(&mut self.pipeline), &mut self.side);
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
        self.completer.commit_and_leave();
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
