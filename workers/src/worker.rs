//! A worker: one member of a unit's consumer group. A unit is a model (whose pool serves plain
//! requests and every graph step that runs it) or a graph's built-in, combine or route step. It
//! consumes its topics, batches model requests dynamically and runs them on dedicated inference
//! threads, moves graph requests on to their next step, delivers results and replies, and stores
//! each offset only once everything up to it has been delivered (at-least-once).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sluice_common::graph::{Graphs, StepKind, Unit};
use sluice_common::ops::ReloadRequest;
use sluice_common::{Config, ModelConfig, now_ms, now_us};
use sluice_schemas::envelope::codes;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::admission::{Admission, Admit, admit};
pub use crate::admission::{GraphJob, Job};
use crate::backend::{Backend, OrtBackend};
use crate::batcher::{Dispatched, Item, run_batcher};
use crate::flow::step_error;
use crate::join::{Joiner, Offered};
pub use crate::offsets::Source;
use crate::offsets::{GapGuard, Observed, OffsetTracker};
use crate::outcome::{BatchFacts, bare, decided_completions, finish_job, run_step, step_label};
use crate::runner::run_batch;
use crate::sink::{Completion, Sink};
use crate::telemetry::WorkerMetrics;

/// Why a worker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The unit is not in the config.
    #[error(
        "'{0}' is neither a model nor a built-in, combine or route step of a graph in the config"
    )]
    UnknownUnit(String),
    /// The config's graphs do not compile.
    #[error("config: {0}")]
    Config(String),
    /// Loading the model failed.
    #[error("{0}")]
    Backend(#[from] crate::backend::BackendError),
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

type PartitionKey = (usize, i32);

/// Keeps the offset tracker in step with partition assignment and marks the worker ready.
struct GroupContext {
    topics: Arc<Vec<String>>,
    tracker: Arc<Mutex<OffsetTracker<PartitionKey>>>,
    gaps: Arc<Mutex<GapGuard<PartitionKey>>>,
    stored: Arc<Mutex<HashMap<PartitionKey, i64>>>,
    revoked: Arc<Mutex<Vec<i32>>>,
    joined: Arc<AtomicBool>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (kind, tpl) = match rebalance {
            Rebalance::Assign(tpl) => ("assigned", *tpl),
            Rebalance::Revoke(tpl) => ("revoked", *tpl),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        let keys: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .filter_map(|e| {
                let t = self.topics.iter().position(|t| t == e.topic())?;
                Some((t, e.partition()))
            })
            .collect();
        let mut tracker = lock(&self.tracker);
        let mut stored = lock(&self.stored);
        let mut gaps = lock(&self.gaps);
        for k in &keys {
            tracker.forget(*k);
            stored.remove(k);
            gaps.forget(*k);
        }
        let shown: Vec<(&str, i32)> = keys
            .iter()
            .map(|(t, p)| (self.topics[*t].as_str(), *p))
            .collect();
        tracing::info!(partitions = ?shown, "partitions {kind}");
        if kind == "assigned" {
            self.joined.store(true, Ordering::Relaxed);
        } else {
            lock(&self.revoked).extend(keys.iter().map(|(_, p)| *p));
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => tracing::trace!(?offsets, "offsets committed"),
            Err(e) => tracing::debug!(error = %e, "offset commit failed"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the consumer loop and the completion tasks.
struct Shared {
    consumer: StreamConsumer<GroupContext>,
    topics: Arc<Vec<String>>,
    tracker: Arc<Mutex<OffsetTracker<PartitionKey>>>,
    sink: Sink,
    stored: Arc<Mutex<HashMap<PartitionKey, i64>>>,
    metrics: Arc<WorkerMetrics>,
}

impl Shared {
    /// Delivers completions, then stores the offsets that became committable.
    async fn complete(&self, items: Vec<Completion>) {
        self.sink.deliver(&items).await;
        let mut advanced = Vec::new();
        {
            let mut tracker = lock(&self.tracker);
            for c in &items {
                let key = (c.source.topic_index, c.source.partition);
                if let Some(next) = tracker.finish(key, c.source.offset) {
                    advanced.push((key, next));
                }
            }
        }
        self.metrics.in_flight.decrement(items.len() as f64);
        if advanced.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), next) in &advanced {
            if let Err(e) = tpl.add_partition_offset(&self.topics[*t], *p, Offset::Offset(*next)) {
                tracing::warn!(error = %e, "bad offset");
            }
        }
        match self.consumer.store_offsets(&tpl) {
            Ok(()) => {
                let mut stored = lock(&self.stored);
                for (k, next) in advanced {
                    let e = stored.entry(k).or_insert(next);
                    *e = (*e).max(next);
                }
            }
            // The partition was revoked meanwhile: its new owner re-reads from the last commit.
            Err(e) => tracing::debug!(error = %e, "could not store offsets"),
        }
    }

    fn spawn_complete(self: &Arc<Self>, tasks: &mut JoinSet<()>, items: Vec<Completion>) {
        if items.is_empty() {
            return;
        }
        let shared = Arc::clone(self);
        tasks.spawn(async move { shared.complete(items).await });
    }
}

/// Runs a worker for `unit` until `shutdown` resolves, then drains and leaves the group.
/// `config_path` is re-read on SIGHUP or `POST /admin/reload` to change graph routing (canary
/// shares, shadows, router rules, join settings) without a restart.
pub async fn run(
    cfg: Config,
    unit: &Unit,
    config_path: Option<PathBuf>,
    metrics_listen: SocketAddr,
    metrics: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    let mut graphs = cfg
        .compiled_graphs()
        .map_err(|p| WorkerError::Config(p.join("; ")))?;
    let label = unit.to_string();
    let model: Option<ModelConfig> = match unit {
        Unit::Model(m) => Some(
            cfg.model(m)
                .cloned()
                .ok_or_else(|| WorkerError::UnknownUnit(label.clone()))?,
        ),
        Unit::Step { graph, step } => {
            let known = graphs.get(graph).and_then(|g| {
                let i = g.step_index(step)?;
                (!matches!(g.steps[i].kind, StepKind::Model(_))).then_some(())
            });
            known.ok_or_else(|| WorkerError::UnknownUnit(label.clone()))?;
            None
        }
    };
    let mut backends = Vec::new();
    if let Some(m) = &model {
        for _ in 0..m.threads {
            backends.push(OrtBackend::load(m)?);
        }
        tracing::info!(model = %label, threads = m.threads, onnx = %m.onnx.display(), "model loaded");
    }
    let threads_n = model.as_ref().map_or(1, |m| m.threads);

    let topics = Arc::new(cfg.unit_topics(unit, &graphs));
    let entries: HashMap<String, String> = graphs
        .values()
        .filter(|g| topics[1..].contains(&g.entry_topic))
        .map(|g| (g.entry_topic.clone(), g.name.clone()))
        .collect();
    let client_id = format!("sluice-worker-{label}-{}", std::process::id());
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let gaps = Arc::new(Mutex::new(GapGuard::default()));
    let joined = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(Mutex::new(HashMap::new()));
    let revoked = Arc::new(Mutex::new(Vec::new()));
    let consumer: StreamConsumer<GroupContext> =
        sluice_common::kafka::consumer_config(&cfg, &cfg.unit_group(unit), &client_id)
            .create_with_context(GroupContext {
                topics: Arc::clone(&topics),
                tracker: Arc::clone(&tracker),
                gaps: Arc::clone(&gaps),
                stored: Arc::clone(&stored),
                revoked: Arc::clone(&revoked),
                joined: Arc::clone(&joined),
            })?;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    let producer: FutureProducer =
        sluice_common::kafka::producer_config(&cfg, &client_id, cfg.worker.result_linger)
            .create()?;
    let forward_producer: FutureProducer = sluice_common::kafka::producer_config(
        &cfg,
        &format!("{client_id}-forward"),
        cfg.worker.forward_linger,
    )
    .create()?;
    let redis =
        redis::aio::ConnectionManager::new(redis::Client::open(cfg.redis.url.as_str())?).await?;

    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let (ops_stop_tx, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ops_addr = sluice_common::ops::serve_ops(
        metrics_listen,
        metrics,
        Arc::clone(&joined),
        Some(reload_tx),
        async {
            let _ = ops_stop_rx.await;
        },
    )
    .await?;
    tracing::info!(%ops_addr, topics = ?topics, "worker serving metrics and health");

    let wm = Arc::new(WorkerMetrics::new(&label));
    let result_topic = match unit {
        Unit::Model(m) => cfg.result_topic(m),
        Unit::Step { graph, .. } => cfg.result_topic(graph),
    };
    let shared = Arc::new(Shared {
        consumer,
        topics: Arc::clone(&topics),
        tracker,
        sink: Sink::new(
            producer.clone(),
            forward_producer.clone(),
            redis,
            result_topic,
            cfg.dead_letter_topic(),
            label.clone(),
        ),
        stored,
        metrics: Arc::clone(&wm),
    });

    // Model units: consumer loop → batcher → inference threads → completion tasks.
    let (job_tx, job_rx) = mpsc::channel::<Item<Job>>(cfg.worker.max_queued);
    let (batch_tx, batch_rx) = mpsc::channel::<Dispatched<Job>>(threads_n);
    let (done_tx, mut done_rx) = mpsc::channel::<Vec<Completion>>(threads_n * 2);
    let slots = Arc::new(Semaphore::new(threads_n));
    let (max_batch, max_delay) = model
        .as_ref()
        .map_or((1, Duration::ZERO), |m| (m.max_batch_size, m.max_delay));
    let batcher = tokio::spawn(run_batcher(job_rx, batch_tx, slots, max_batch, max_delay));
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let mut threads = Vec::new();
    if let Some(m) = &model {
        for (i, backend) in backends.into_iter().enumerate() {
            let rx = Arc::clone(&batch_rx);
            let tx = done_tx.clone();
            let m = m.clone();
            let wm = Arc::clone(&wm);
            let name = label.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("infer-{label}-{i}"))
                    .spawn(move || inference_thread(backend, &m, &name, &wm, &rx, &tx))?,
            );
        }
    }
    drop(done_tx);

    let completer = {
        let shared = Arc::clone(&shared);
        let limit = Arc::new(Semaphore::new(threads_n * 4));
        tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            while let Some(items) = done_rx.recv().await {
                let permit = Arc::clone(&limit).acquire_owned().await;
                let shared = Arc::clone(&shared);
                tasks.spawn(async move {
                    shared.complete(items).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    // Combine steps hold parts until their request is decided.
    let mut joiner = match unit {
        Unit::Step { graph, step } => graphs.get(graph).and_then(|g| {
            let i = g.step_index(step)?;
            matches!(g.steps[i].kind, StepKind::Combine(_)).then(|| Joiner::new(Arc::clone(g), i))
        }),
        Unit::Model(_) => None,
    };
    let join_pending = metrics::gauge!("sluice_join_pending", "unit" => label.clone());

    let own_topic = topics[0].clone();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // Records finished without a batch (rejected, built-in steps, joins) complete on their own tasks.
    let mut side = JoinSet::new();
    let mut gap_check = tokio::time::interval(Duration::from_millis(250));
    gap_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        // Requests whose parts came from revoked partitions belong to their new owner now.
        if let Some(j) = joiner.as_mut() {
            let gone: Vec<i32> = lock(&revoked).drain(..).collect();
            if !gone.is_empty() {
                j.forget_partitions(&gone);
            }
        }
        let wait = joiner.as_ref().and_then(Joiner::next_timeout);
        let room = joiner
            .as_ref()
            .is_none_or(|j| j.pending() < cfg.worker.max_queued);
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = hangup.recv() => {
                let outcome = reload(config_path.as_ref(), &mut graphs, &mut joiner);
                tracing::info!(?outcome, "SIGHUP: config reloaded");
            }
            Some(reply) = reload_rx.recv() => {
                let _ = reply.send(reload(config_path.as_ref(), &mut graphs, &mut joiner));
            }
            _ = gap_check.tick() => {
                // Parts overdue at a join may sit unseen in its partition until the next append.
                if let Some(j) = joiner.as_mut() {
                    for (t, p) in j.overdue(Duration::from_millis(200)) {
                        metrics::counter!("sluice_join_nudges_total", "unit" => label.clone()).increment(1);
                        let (shared, topic) = (Arc::clone(&shared), topics[t].clone());
                        side.spawn(async move { shared.sink.nudge(&topic, p).await });
                    }
                }
                let idle = lock(&gaps).idle(Instant::now(), Duration::from_millis(500));
                if !idle.is_empty() {
                    // Off the loop: a slow broker answer must not hold up consumption.
                    let (shared, label) = (Arc::clone(&shared), label.clone());
                    side.spawn(async move { reread_stalled_partitions(&shared, idle, &label).await });
                }
            }
            _ = sleep_or_forever(wait) => {
                if let Some(j) = joiner.as_mut() {
                    for decided in j.expire(Instant::now()) {
                        metrics::counter!("sluice_join_timeouts_total", "unit" => label.clone()).increment(1);
                        let items = decided_completions(&topics, &j.graph(), decided);
                        shared.spawn_complete(&mut side, items);
                    }
                    join_pending.set(j.pending() as f64);
                }
            }
            msg = shared.consumer.recv(), if room => match msg {
                Ok(m) => {
                    let Some(topic_index) = topics.iter().position(|t| t == m.topic()) else {
                        continue;
                    };
                    let source = Source { topic_index, partition: m.partition(), offset: m.offset() };
                    match lock(&gaps).observe((topic_index, m.partition()), m.offset(), Instant::now()) {
                        Observed::Next => {}
                        Observed::Seen | Observed::Gap { seek: false, .. } => continue,
                        Observed::Gap { expected, seek: true } => {
                            metrics::counter!("sluice_worker_fetch_gaps_total", "unit" => label.clone()).increment(1);
                            tracing::warn!(topic = m.topic(), partition = m.partition(), expected, got = m.offset(), "the fetch skipped records; re-reading from the first one missing");
                            let (topic, partition) = (m.topic().to_string(), m.partition());
                            drop(m);
                            if let Err(e) = shared.consumer.seek(&topic, partition, Offset::Offset(expected), Duration::from_secs(1)) {
                                tracing::warn!(error = %e, "seek failed");
                            }
                            continue;
                        }
                    }
                    lock(&shared.tracker).begin((topic_index, m.partition()), m.offset());
                    wm.in_flight.increment(1.0);
                    let ctx = Admit {
                        unit,
                        model: model.as_ref(),
                        own_topic: &own_topic,
                        graphs: &graphs,
                        entries: &entries,
                        metrics: &wm,
                    };
                    match admit(&m, source, &ctx) {
                        Admission::Batch(job) => {
                            let rows = job.rows;
                            if job_tx.send(Item { item: job, rows }).await.is_err() {
                                break;
                            }
                        }
                        Admission::Done(completion) => {
                            shared.spawn_complete(&mut side, vec![*completion]);
                        }
                        Admission::Step(job) => {
                            let items = vec![run_step(job, &wm)];
                            shared.spawn_complete(&mut side, items);
                        }
                        Admission::Part(request, source) => {
                            let items = match joiner.as_mut() {
                                Some(j) => {
                                    let items = match j.offer(request, source) {
                                        Offered::Held => Vec::new(),
                                        Offered::Duplicate => {
                                            metrics::counter!("sluice_join_late_parts_total", "unit" => label.clone()).increment(1);
                                            vec![bare(source)]
                                        }
                                        Offered::Decided(d) => decided_completions(&topics, &j.graph(), *d),
                                    };
                                    join_pending.set(j.pending() as f64);
                                    items
                                }
                                None => vec![bare(source)],
                            };
                            shared.spawn_complete(&mut side, items);
                        }
                    }
                    while side.try_join_next().is_some() {}
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
    joined.store(false, Ordering::Relaxed);
    drop(job_tx);
    let drained = tokio::time::timeout(cfg.worker.drain_timeout, async {
        let _ = batcher.await;
        let _ = completer.await;
        while side.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?cfg.worker.drain_timeout, "drain timed out; unfinished records will be redelivered");
    }
    for t in threads {
        if drained.is_ok() {
            let _ = t.join();
        }
    }
    // Commit what was stored, for the partitions this worker still owns.
    let owned: Vec<(String, i32)> = shared
        .consumer
        .assignment()
        .map(|a| {
            a.elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect()
        })
        .unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for ((t, p), next) in lock(&shared.stored).iter() {
        let topic = &topics[*t];
        if owned.iter().any(|(ot, op)| ot == topic && op == p) {
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*next));
        }
    }
    if tpl.count() > 0
        && let Err(e) = shared.consumer.commit(&tpl, CommitMode::Sync)
    {
        tracing::warn!(error = %e, "final commit failed");
    }
    shared.consumer.unsubscribe();
    let _ = ops_stop_tx.send(());
    use rdkafka::producer::Producer;
    let _ = producer.flush(Duration::from_secs(5));
    let _ = forward_producer.flush(Duration::from_secs(5));
    tracing::info!("worker stopped");
    Ok(())
}

/// Seeks back on partitions that delivered nothing for a while although the broker's high
/// watermark is past what arrived: a record skipped at the end of a partition shows no gap until
/// something follows it.
async fn reread_stalled_partitions(
    shared: &Arc<Shared>,
    idle: Vec<(PartitionKey, i64)>,
    label: &str,
) {
    for ((t, p), expected) in idle {
        let (query, topic) = (Arc::clone(shared), shared.topics[t].clone());
        let hi = tokio::task::spawn_blocking(move || {
            query
                .consumer
                .fetch_watermarks(&topic, p, Duration::from_millis(500))
                .map(|(_, hi)| hi)
        })
        .await;
        if hi.is_ok_and(|hi| hi.is_ok_and(|hi| hi > expected)) {
            let topic = &shared.topics[t];
            metrics::counter!("sluice_worker_fetch_gaps_total", "unit" => label.to_string())
                .increment(1);
            tracing::warn!(%topic, partition = p, expected, "records below the high watermark never arrived; re-reading");
            if let Err(e) =
                shared
                    .consumer
                    .seek(topic, p, Offset::Offset(expected), Duration::from_secs(1))
            {
                tracing::warn!(error = %e, "seek failed");
            }
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d.max(Duration::from_millis(1))).await,
        None => std::future::pending().await,
    }
}

/// Re-reads the config's graphs; routing changes apply to records arriving from now on.
fn reload(
    path: Option<&PathBuf>,
    graphs: &mut Graphs,
    joiner: &mut Option<Joiner>,
) -> Result<String, String> {
    let cfg = Config::load(path.map(PathBuf::as_path)).map_err(|e| e.to_string())?;
    let fresh = cfg.compiled_graphs().map_err(|p| p.join("; "))?;
    if let Some(j) = joiner.as_mut() {
        j.replace_graph(&fresh);
    }
    let summary: Vec<String> = fresh
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
    *graphs = fresh;
    metrics::counter!("sluice_worker_config_reloads_total").increment(1);
    Ok(format!(
        "reloaded {} graphs; {}",
        graphs.len(),
        summary.join("; ")
    ))
}

/// One inference thread: owns a backend, runs batches handed to it, passes completions on.
fn inference_thread(
    mut backend: impl Backend,
    model: &ModelConfig,
    model_name: &str,
    wm: &WorkerMetrics,
    batches: &Mutex<mpsc::Receiver<Dispatched<Job>>>,
    done: &mpsc::Sender<Vec<Completion>>,
) {
    loop {
        let next = lock(batches).blocking_recv();
        let Some(Dispatched { items, permit }) = next else {
            return;
        };
        let started = Instant::now();
        let started_us = now_us();
        let now = now_ms();
        let (expired, live): (Vec<Job>, Vec<Job>) = items
            .into_iter()
            .partition(|j| j.request.deadline_ms != 0 && now >= j.request.deadline_ms);
        let mut completions = Vec::with_capacity(expired.len() + live.len());
        let none = BatchFacts {
            queue_us: 0,
            infer_us: 0,
            batch_size: 0,
        };
        for j in expired {
            wm.expired.increment(1);
            let error = step_error(
                codes::DEADLINE_EXCEEDED,
                &step_label(&j, model_name),
                "the deadline passed before the request could run",
            );
            completions.push(finish_job(j, Err(error), none, model, model_name));
        }
        if !live.is_empty() {
            let rows: usize = live.iter().map(|j| j.rows).sum();
            wm.batch_size.record(rows as f64);
            let outcomes = run_batch(&mut backend, model, &live);
            let infer_us = now_us() - started_us;
            wm.inference_seconds.record(started.elapsed().as_secs_f64());
            for (j, outcome) in live.into_iter().zip(outcomes) {
                let queue_us = (started_us - j.request.sent_at_us).max(0);
                wm.queue_wait_seconds.record(queue_us as f64 / 1e6);
                let facts = BatchFacts {
                    queue_us,
                    infer_us,
                    batch_size: i32::try_from(rows).unwrap_or(i32::MAX),
                };
                let outcome = match outcome {
                    Ok(outputs) => {
                        wm.ok.increment(1);
                        Ok(outputs)
                    }
                    Err(message) => {
                        wm.failed.increment(1);
                        tracing::warn!(
                            id = %j.request.id,
                            traceparent = j.request.trace.get("traceparent").map(String::as_str),
                            error = %message,
                            "inference failed"
                        );
                        Err(step_error(
                            codes::MODEL_FAILED,
                            &step_label(&j, model_name),
                            message,
                        ))
                    }
                };
                completions.push(finish_job(j, outcome, facts, model, model_name));
            }
        }
        drop(permit);
        if done.blocking_send(completions).is_err() {
            return;
        }
    }
}
