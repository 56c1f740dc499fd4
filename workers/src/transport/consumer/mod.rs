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
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use sluice_common::graph::Unit;
use sluice_common::ops::ReloadRequest;
use sluice_common::producer::AsyncProducer;
use sluice_common::{Deployment, WorkerUnit};
use tokio::sync::mpsc;

use crate::pipeline::admission::{Admission, Admit, admit};
use crate::pipeline::batcher::Item;
use crate::pipeline::job::{Job, Source};
use crate::pipeline::joiner::{Decision, Joiner, Offered};
use crate::pipeline::outcome::{bare, failed_join_completions};
use crate::pipeline::record::Record;
use crate::tasks::BoundedTasks;
use crate::transport::group::{GroupContext, PartitionKey, PartitionState, lock};

mod lanes;
mod lifecycle;

use lanes::{Lane, Shared};

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
    /// The group member cannot go on (librdkafka's fatal error): with `worker.instance` set,
    /// another process joined as the same static member and fenced this one.
    #[error(
        "the group member stopped for good ({0}); is another worker running as the same worker.instance?"
    )]
    MemberFenced(String),
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
            crate::swap::apply_pushes(&mut deployment, unit, pushes).await;
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
    crate::swap::record_serving(&deployment, unit).await;
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
    async fn start(
        deployment: &'a Deployment,
        spec: &'a WorkerUnit,
        config_path: Option<PathBuf>,
        ops: Ops,
    ) -> Result<Worker<'a>, WorkerError> {
        let cfg = &deployment.config;
        let TopicLayout {
            topics,
            lane_of,
            own_topics,
        } = topics_of(deployment, spec)?;
        let topics = Arc::new(topics);
        let client_id = format!("sluice-worker-{}-{}", spec.name, std::process::id());
        let state = Arc::new(PartitionState::default());
        let consumer = subscribe(deployment, spec, &topics, &state, &client_id)?;
        let producers = [
            sluice_common::kafka::producer(cfg, &client_id, cfg.worker.result_linger)?,
            sluice_common::kafka::producer(
                cfg,
                &format!("{client_id}-forward"),
                cfg.worker.forward_linger,
            )?,
        ];
        let redis_client = sluice_common::redis_client::client(&cfg.redis)?;
        let redis = redis::aio::ConnectionManager::new(redis_client).await?;
        let (reloads, ops_stop) = serve_ops(deployment, spec, ops, &state, &topics).await?;
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
        let lanes = Lane::start_all(&shared, spec, own_topics)?;
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
                        if let Some((_, reason)) = consumer.client().fatal_error() {
                            return Err(WorkerError::MemberFenced(reason));
                        }
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
        self.state.begin(key, m.offset());
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
}

/// The worker's topics, lane by lane.
struct TopicLayout {
    /// Every topic the worker consumes.
    topics: Vec<String>,
    /// Topic index → the lane serving it.
    lane_of: Vec<usize>,
    /// Lane → the index of its own topic.
    own_topics: Vec<usize>,
}

fn topics_of(deployment: &Deployment, spec: &WorkerUnit) -> Result<TopicLayout, WorkerError> {
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
    Ok(TopicLayout {
        topics,
        lane_of,
        own_topics,
    })
}

/// The unit's group member, subscribed to its topics.
fn subscribe(
    deployment: &Deployment,
    spec: &WorkerUnit,
    topics: &Arc<Vec<String>>,
    state: &Arc<PartitionState>,
    client_id: &str,
) -> Result<Arc<StreamConsumer<GroupContext>>, WorkerError> {
    let cfg = &deployment.config;
    let consumer: StreamConsumer<GroupContext> =
        sluice_common::kafka::consumer_config(cfg, &spec.group, client_id).create_with_context(
            GroupContext {
                topics: Arc::clone(topics),
                state: Arc::clone(state),
                assigned: Default::default(),
                assigned_gauge: metrics::gauge!("sluice_worker_assigned_partitions", "unit" => spec.name.clone()),
            },
        )?;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    Ok(Arc::new(consumer))
}

/// Serves `/metrics`, health and reload; returns the reload requests and what stops the server.
async fn serve_ops(
    deployment: &Deployment,
    spec: &WorkerUnit,
    ops: Ops,
    state: &PartitionState,
    topics: &[String],
) -> Result<
    (
        mpsc::Receiver<ReloadRequest>,
        tokio::sync::oneshot::Sender<()>,
    ),
    WorkerError,
> {
    let (reload_tx, reloads) = mpsc::channel::<ReloadRequest>(4);
    let (ops_stop, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ops_addr = sluice_common::ops::serve_ops(
        ops.listen,
        ops.metrics,
        Arc::clone(&state.joined),
        Some(reload_tx),
        &deployment.config.gateway.auth,
        async {
            let _ = ops_stop_rx.await;
        },
    )
    .await?;
    tracing::info!(%ops_addr, unit = %spec.name, group = %spec.group, ?topics, "worker serving metrics and health");
    Ok((reloads, ops_stop))
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d.max(Duration::from_millis(1))).await,
        None => std::future::pending().await,
    }
}
