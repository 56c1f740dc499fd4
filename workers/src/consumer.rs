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
use rdkafka::message::Message;
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
    let cfg = &deployment.config;
    let label = unit.to_string();
    let step: StepSlot = Arc::new(RwLock::new(crate::step::for_unit(&deployment, unit)?));
    let model = match unit {
        Unit::Model(m) => deployment.model(m),
        Unit::Step { .. } => None,
    };
    let signature = model.map(|m| m.signature());
    let topics = Arc::new(deployment.unit_topics(unit));
    let entries: HashMap<String, String> = deployment
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
        redis::aio::ConnectionManager::new(redis::Client::open(cfg.redis.url.as_str())?).await?;

    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let (ops_stop_tx, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
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

    let wm = Arc::new(WorkerMetrics::new(&label, &deployment));
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

    // Consumer loop → batcher → executor (the step) → delivery.
    let (slots, max_batch, max_delay) = match model {
        Some(m) => (m.threads, m.max_batch_size, m.max_delay),
        // Built-in, combine and route steps are cheap: several small batches at once.
        None => (4, 256, Duration::ZERO),
    };
    let (job_tx, job_rx) = mpsc::channel::<Item<Job>>(cfg.worker.max_queued);
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
    let mut joiner = match unit {
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
    let mut quirk_check =
        tokio::time::interval(quirks.map_or(Duration::from_secs(3600), |q| q.check_interval()));
    quirk_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let own_topic = topics[0].clone();
    let result_ttl_ms = i64::try_from(cfg.redis.result_ttl.as_millis()).unwrap_or(i64::MAX);
    let max_queued = cfg.worker.max_queued;
    let mut graphs = deployment.graphs.clone();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // Records finished without a batch (rejected records, join decisions) complete here.
    let mut side = BoundedTasks::new(max_queued);
    tokio::pin!(shutdown);
    loop {
        // Requests whose parts came from revoked partitions belong to their new owner now.
        if let Some(j) = joiner.as_mut() {
            let gone: Vec<i32> = lock(&state.revoked).drain(..).collect();
            if !gone.is_empty() {
                j.forget_partitions(&gone);
            }
        }
        let wait = joiner.as_ref().and_then(Joiner::next_timeout);
        let room = joiner.as_ref().is_none_or(|j| j.pending() < max_queued);
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = hangup.recv() => {
                let outcome = reload(config_path.as_ref(), unit, &mut graphs, &mut joiner, &step, &wm);
                tracing::info!(?outcome, "SIGHUP: config reloaded");
            }
            Some(reply) = reload_rx.recv() => {
                let _ = reply.send(reload(config_path.as_ref(), unit, &mut graphs, &mut joiner, &step, &wm));
            }
            _ = quirk_check.tick(), if quirks.is_some() => {
                if let Some(q) = &quirks {
                    q.check(&completer, joiner.as_mut(), &mut side).await;
                }
            }
            _ = sleep_or_forever(wait) => {
                if let Some(j) = joiner.as_mut() {
                    let graph = j.graph();
                    for decided in j.expire(Instant::now()) {
                        wm.join_timeouts.increment(1);
                        if !decide(decided, &topics, &graph, &job_tx, &completer, &mut side).await {
                            break;
                        }
                    }
                    wm.join_pending.set(j.pending() as f64);
                }
            }
            msg = completer.consumer.recv(), if room => match msg {
                Ok(m) => {
                    let Some(topic_index) = topics.iter().position(|t| t == m.topic()) else {
                        continue;
                    };
                    let key = (topic_index, m.partition());
                    if let Some(q) = &quirks {
                        match q.arrival(&completer, key, m.offset()) {
                            Arrival::Next => {}
                            Arrival::Skip => continue,
                            Arrival::SeekBack(expected) => {
                                tracing::warn!(topic = m.topic(), partition = m.partition(), expected, got = m.offset(), "the fetch skipped records; re-reading from the first one missing");
                                let (topic, partition) = (m.topic().to_string(), m.partition());
                                drop(m);
                                completer.seek(&topic, partition, expected);
                                continue;
                            }
                        }
                    }
                    let source = Source { topic_index, partition: m.partition(), offset: m.offset() };
                    lock(&state.tracker).begin(key, m.offset());
                    wm.in_flight.increment(1.0);
                    let ctx = Admit {
                        unit,
                        model: signature.as_ref(),
                        own_topic: &own_topic,
                        graphs: &graphs,
                        entries: &entries,
                        result_ttl_ms,
                        metrics: &wm,
                    };
                    let headers = Record::headers_of(&m);
                    let admission = admit(&Record::of(&m, &headers), source, &ctx);
                    drop(m);
                    match admission {
                        Admission::Run(job) => {
                            let rows = job.rows().max(1);
                            if job_tx.send(Item { item: *job, rows }).await.is_err() {
                                break;
                            }
                        }
                        Admission::Done(completion) => {
                            let c = Arc::clone(&completer);
                            side.spawn(async move { c.complete(vec![*completion]).await }).await;
                        }
                        Admission::Part(request, source) => {
                            let Some(j) = joiner.as_mut() else {
                                let c = Arc::clone(&completer);
                                side.spawn(async move { c.complete(vec![bare(source)]).await }).await;
                                continue;
                            };
                            let offered = j.offer(*request, source);
                            wm.join_pending.set(j.pending() as f64);
                            match offered {
                                Offered::Held => {}
                                Offered::Duplicate => {
                                    wm.join_late_parts.increment(1);
                                    let c = Arc::clone(&completer);
                                    side.spawn(async move { c.complete(vec![bare(source)]).await }).await;
                                }
                                Offered::Decided(d) => {
                                    let graph = j.graph();
                                    if !decide(*d, &topics, &graph, &job_tx, &completer, &mut side).await {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    // Drain: stop taking records, finish everything taken, store and commit, leave the group.
    // Parts a join still holds stay uncommitted: whoever owns the partition next reads them again.
    tracing::info!("draining");
    state.joined.store(false, Ordering::Relaxed);
    drop(job_tx);
    let drain = cfg.worker.drain_timeout;
    let drained = tokio::time::timeout(drain, async {
        let _ = batcher.await;
        let _ = executor.await;
        side.join_all().await;
    })
    .await;
    if drained.is_err() {
        let unfinished = lock(&state.tracker).unfinished();
        tracing::warn!(timeout = ?drain, unfinished, "drain timed out; unfinished records will be redelivered");
    }
    completer.commit_and_leave();
    let _ = ops_stop_tx.send(());
    let _ = producer.flush(Duration::from_secs(5));
    let _ = forward_producer.flush(Duration::from_secs(5));
    tracing::info!("worker stopped");
    Ok(())
}

/// Acts on a join's decision: its combine job goes to the batcher, a failure is delivered.
/// Returns false when the batcher is gone (the worker is stopping).
async fn decide(
    d: Decision,
    topics: &[String],
    graph: &sluice_common::graph::Graph,
    jobs: &mpsc::Sender<Item<Job>>,
    completer: &Arc<Completer>,
    side: &mut BoundedTasks,
) -> bool {
    match d {
        Decision::Combine(job) => {
            let rows = job.rows().max(1);
            jobs.send(Item { item: *job, rows }).await.is_ok()
        }
        Decision::Failed(d) => {
            let items = failed_join_completions(topics, graph, *d);
            let c = Arc::clone(completer);
            side.spawn(async move { c.complete(items).await }).await;
            true
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d.max(Duration::from_millis(1))).await,
        None => std::future::pending().await,
    }
}

/// Re-reads the config's graphs; routing changes apply to records arriving from now on, a
/// non-model step is rebuilt (a join's weights, say).
fn reload(
    path: Option<&PathBuf>,
    unit: &Unit,
    graphs: &mut sluice_common::graph::Graphs,
    joiner: &mut Option<Joiner>,
    step: &StepSlot,
    wm: &WorkerMetrics,
) -> Result<String, String> {
    let fresh = Deployment::load(path.map(PathBuf::as_path)).map_err(|e| e.to_string())?;
    if let Some(j) = joiner.as_mut() {
        j.replace_graph(&fresh.graphs);
    }
    if matches!(unit, Unit::Step { .. }) && fresh.has_unit(unit) {
        let rebuilt = crate::step::for_unit(&fresh, unit).map_err(|e| e.to_string())?;
        *step.write().unwrap_or_else(|e| e.into_inner()) = rebuilt;
    }
    let summary: Vec<String> = fresh
        .graphs
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
    *graphs = fresh.graphs;
    wm.config_reloads.increment(1);
    Ok(format!(
        "reloaded {} graphs; {}",
        graphs.len(),
        summary.join("; ")
    ))
}
