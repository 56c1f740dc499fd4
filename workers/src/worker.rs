//! A worker: one member of a model's consumer group. It consumes requests, batches them
//! dynamically, runs the model on dedicated inference threads, delivers results and replies, and
//! stores each offset only once everything up to it has been delivered (at-least-once).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sluice_common::kafka::headers as kafka_headers;
use sluice_common::model::{validate_inputs, validate_outputs};
use sluice_common::{Config, ModelConfig, now_ms, now_us};
use sluice_schemas::envelope::codes;
use sluice_schemas::{InferenceRequest, InferenceResult, ReplyRoute, decode_request};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::backend::{Backend, OrtBackend};
use crate::batcher::{Dispatched, Item, run_batcher};
use crate::offsets::OffsetTracker;
use crate::runner::run_batch;
use crate::sink::{Completion, DeadLetter, Sink};
use crate::telemetry::WorkerMetrics;

/// Why a worker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The model is not in the config.
    #[error("model '{0}' is not in the config")]
    UnknownModel(String),
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

/// A consumed request waiting for, or in, a batch.
pub struct Job {
    /// The decoded request.
    pub request: InferenceRequest,
    /// Partition it came from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The topic it came from.
    pub topic: String,
    /// Rows it contributes to a batch.
    pub rows: usize,
}

/// Keeps the offset tracker in step with partition assignment and marks the worker ready.
struct GroupContext {
    tracker: Arc<Mutex<OffsetTracker>>,
    stored: Arc<Mutex<HashMap<i32, i64>>>,
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
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let mut tracker = lock(&self.tracker);
        let mut stored = lock(&self.stored);
        for p in &partitions {
            tracker.forget(*p);
            stored.remove(p);
        }
        tracing::info!(?partitions, "partitions {kind}");
        if kind == "assigned" {
            self.joined.store(true, Ordering::Relaxed);
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
    tracker: Arc<Mutex<OffsetTracker>>,
    sink: Sink,
    topic: String,
    stored: Arc<Mutex<HashMap<i32, i64>>>,
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
                if let Some(next) = tracker.finish(c.partition, c.offset) {
                    advanced.push((c.partition, next));
                }
            }
        }
        self.metrics.in_flight.decrement(items.len() as f64);
        if advanced.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &advanced {
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*next)) {
                tracing::warn!(error = %e, "bad offset");
            }
        }
        match self.consumer.store_offsets(&tpl) {
            Ok(()) => {
                let mut stored = lock(&self.stored);
                for (p, next) in advanced {
                    let e = stored.entry(p).or_insert(next);
                    *e = (*e).max(next);
                }
            }
            // The partition was revoked meanwhile: its new owner re-reads from the last commit.
            Err(e) => tracing::debug!(error = %e, "could not store offsets"),
        }
    }
}

/// Runs a worker for `model_name` until `shutdown` resolves, then drains and leaves the group.
pub async fn run(
    cfg: Config,
    model_name: &str,
    metrics_listen: SocketAddr,
    metrics: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    let model = cfg
        .model(model_name)
        .cloned()
        .ok_or_else(|| WorkerError::UnknownModel(model_name.to_string()))?;
    let mut backends = Vec::with_capacity(model.threads);
    for _ in 0..model.threads {
        backends.push(OrtBackend::load(&model)?);
    }
    tracing::info!(model = model_name, threads = model.threads, onnx = %model.onnx.display(), "model loaded");

    let client_id = format!("sluice-worker-{model_name}-{}", std::process::id());
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let joined = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(Mutex::new(HashMap::new()));
    let consumer: StreamConsumer<GroupContext> =
        sluice_common::kafka::consumer_config(&cfg, &cfg.consumer_group(model_name), &client_id)
            .create_with_context(GroupContext {
                tracker: Arc::clone(&tracker),
                stored: Arc::clone(&stored),
                joined: Arc::clone(&joined),
            })?;
    let topic = cfg.request_topic(model_name);
    consumer.subscribe(&[&topic])?;
    let producer: FutureProducer =
        sluice_common::kafka::producer_config(&cfg, &client_id, cfg.worker.result_linger)
            .create()?;
    let redis =
        redis::aio::ConnectionManager::new(redis::Client::open(cfg.redis.url.as_str())?).await?;

    let (ops_stop_tx, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ops_addr =
        sluice_common::ops::serve_ops(metrics_listen, metrics, Arc::clone(&joined), async {
            let _ = ops_stop_rx.await;
        })
        .await?;
    tracing::info!(%ops_addr, %topic, "worker serving metrics and health");

    let wm = Arc::new(WorkerMetrics::new(model_name));
    let shared = Arc::new(Shared {
        consumer,
        tracker,
        sink: Sink::new(
            producer.clone(),
            redis,
            cfg.result_topic(model_name),
            cfg.dead_letter_topic(),
            model_name.to_string(),
        ),
        topic: topic.clone(),
        stored,
        metrics: Arc::clone(&wm),
    });

    // Pipeline: consumer loop → batcher → inference threads → completion tasks.
    let (job_tx, job_rx) = mpsc::channel::<Item<Job>>(cfg.worker.max_queued);
    let (batch_tx, batch_rx) = mpsc::channel::<Dispatched<Job>>(model.threads);
    let (done_tx, mut done_rx) = mpsc::channel::<Vec<Completion>>(model.threads * 2);
    let slots = Arc::new(Semaphore::new(model.threads));
    let batcher = tokio::spawn(run_batcher(
        job_rx,
        batch_tx,
        slots,
        model.max_batch_size,
        model.max_delay,
    ));
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let mut threads = Vec::new();
    for (i, backend) in backends.into_iter().enumerate() {
        let rx = Arc::clone(&batch_rx);
        let tx = done_tx.clone();
        let m = model.clone();
        let wm = Arc::clone(&wm);
        threads.push(
            std::thread::Builder::new()
                .name(format!("infer-{model_name}-{i}"))
                .spawn(move || inference_thread(backend, &m, &wm, &rx, &tx))?,
        );
    }
    drop(done_tx);

    let completer = {
        let shared = Arc::clone(&shared);
        let limit = Arc::new(Semaphore::new(model.threads * 4));
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

    // Records rejected before batching (undecodable, invalid) complete on their own tasks.
    let mut rejected = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            msg = shared.consumer.recv() => match msg {
                Ok(m) => {
                    lock(&shared.tracker).begin(m.partition(), m.offset());
                    wm.in_flight.increment(1.0);
                    match admit(&m, &model, model_name, &wm) {
                        Ok(job) => {
                            let rows = job.rows;
                            if job_tx.send(Item { item: job, rows }).await.is_err() {
                                break;
                            }
                        }
                        Err(completion) => {
                            let shared = Arc::clone(&shared);
                            rejected.spawn(async move { shared.complete(vec![*completion]).await });
                        }
                    }
                    while rejected.try_join_next().is_some() {}
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    // Drain: stop taking records, finish everything taken, store and commit, leave the group.
    tracing::info!("draining");
    joined.store(false, Ordering::Relaxed);
    drop(job_tx);
    let drained = tokio::time::timeout(cfg.worker.drain_timeout, async {
        let _ = batcher.await;
        let _ = completer.await;
        while rejected.join_next().await.is_some() {}
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
    let owned: Vec<i32> = shared
        .consumer
        .assignment()
        .map(|a| a.elements().iter().map(|e| e.partition()).collect())
        .unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for (p, next) in lock(&shared.stored)
        .iter()
        .filter(|(p, _)| owned.contains(p))
    {
        let _ = tpl.add_partition_offset(&topic, *p, Offset::Offset(*next));
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
    tracing::info!("worker stopped");
    Ok(())
}

fn header<'a>(m: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Decodes and validates a record; a record that cannot be run becomes a completion at once
/// (dead letter, plus an error reply when the caller can be named).
fn admit(
    m: &BorrowedMessage<'_>,
    model: &ModelConfig,
    model_name: &str,
    wm: &WorkerMetrics,
) -> Result<Job, Box<Completion>> {
    let dead = |class: &'static str, message: String| DeadLetter {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        class,
        message,
    };
    let request = match decode_request(m.payload().unwrap_or_default()) {
        Ok(r) => r,
        Err(e) => {
            wm.undecodable.increment(1);
            let message = format!("undecodable request record: {e}");
            // The gateway also names the request and its reply route in headers, so even a
            // record that cannot be decoded gets an error reply instead of a timeout.
            let (result, reply) = match (
                header(m, kafka_headers::REQUEST_ID),
                header(m, kafka_headers::REPLY_CHANNEL),
                header(m, kafka_headers::REPLY_KEY),
            ) {
                (Some(id), Some(channel), Some(key)) => {
                    let stub = InferenceRequest {
                        id: id.to_string(),
                        model: model_name.to_string(),
                        ..Default::default()
                    };
                    (
                        Some(InferenceResult::failure(
                            &stub,
                            codes::UNDECODABLE,
                            message.clone(),
                        )),
                        Some(ReplyRoute {
                            channel: channel.to_string(),
                            key: key.to_string(),
                            ttl_ms: 60_000,
                        }),
                    )
                }
                _ => (None, None),
            };
            return Err(Box::new(Completion {
                partition: m.partition(),
                offset: m.offset(),
                result,
                reply,
                deadline_ms: 0,
                dead_letter: Some(dead(codes::UNDECODABLE, message)),
            }));
        }
    };
    let checked = if request.model != model_name {
        Err(format!(
            "request for model '{}' arrived on the topic of '{model_name}'",
            request.model
        ))
    } else {
        validate_inputs(model, &request.inputs)
            .and_then(|rows| validate_outputs(model, &request.outputs).map(|()| rows))
            .map_err(|e| e.to_string())
    };
    match checked {
        Ok(rows) => Ok(Job {
            request,
            partition: m.partition(),
            offset: m.offset(),
            topic: m.topic().to_string(),
            rows,
        }),
        Err(message) => {
            wm.invalid.increment(1);
            Err(Box::new(Completion {
                partition: m.partition(),
                offset: m.offset(),
                result: Some(InferenceResult::failure(
                    &request,
                    codes::INVALID_INPUT,
                    message.clone(),
                )),
                reply: request.reply.clone(),
                deadline_ms: request.deadline_ms,
                dead_letter: Some(dead(codes::INVALID_INPUT, message)),
            }))
        }
    }
}

/// One inference thread: owns a backend, runs batches handed to it, passes completions on.
fn inference_thread(
    mut backend: impl Backend,
    model: &ModelConfig,
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
        for j in expired {
            wm.expired.increment(1);
            let result = InferenceResult::failure(
                &j.request,
                codes::DEADLINE_EXCEEDED,
                "the deadline passed before the request could run",
            );
            completions.push(completion_of(j, result));
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
                let result = match outcome {
                    Ok(outputs) => {
                        wm.ok.increment(1);
                        InferenceResult {
                            id: j.request.id.clone(),
                            client_id: j.request.client_id.clone(),
                            model: j.request.model.clone(),
                            model_version: model.version.clone(),
                            error: None,
                            outputs,
                            parameters: Default::default(),
                            queue_us,
                            infer_us,
                            batch_size: i32::try_from(rows).unwrap_or(i32::MAX),
                        }
                    }
                    Err(message) => {
                        wm.failed.increment(1);
                        tracing::warn!(
                            id = %j.request.id,
                            traceparent = j.request.trace.get("traceparent").map(String::as_str),
                            error = %message,
                            "inference failed"
                        );
                        InferenceResult::failure(&j.request, codes::MODEL_FAILED, message)
                    }
                };
                completions.push(completion_of(j, result));
            }
        }
        drop(permit);
        if done.blocking_send(completions).is_err() {
            return;
        }
    }
}

fn completion_of(j: Job, result: InferenceResult) -> Completion {
    // A request the model failed on is dead-lettered too, so it can be inspected and replayed.
    let dead_letter = result
        .error
        .as_ref()
        .filter(|e| e.code == codes::MODEL_FAILED)
        .map(|e| DeadLetter {
            key: Some(j.request.id.clone().into_bytes()),
            payload: sluice_schemas::encode_request(&j.request).unwrap_or_default(),
            topic: j.topic.clone(),
            partition: j.partition,
            offset: j.offset,
            class: codes::MODEL_FAILED,
            message: e.message.clone(),
        });
    Completion {
        partition: j.partition,
        offset: j.offset,
        reply: j.request.reply.clone(),
        deadline_ms: j.request.deadline_ms,
        result: Some(result),
        dead_letter,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn job() -> Job {
        Job {
            request: InferenceRequest {
                id: "r1".into(),
                model: "m".into(),
                deadline_ms: 42,
                ..Default::default()
            },
            partition: 3,
            offset: 17,
            topic: "sluice.m.requests".into(),
            rows: 1,
        }
    }

    #[test]
    fn model_failures_are_dead_lettered_with_their_origin() {
        let j = job();
        let failed = InferenceResult::failure(&j.request, codes::MODEL_FAILED, "boom");
        let c = completion_of(j, failed);
        let d = c.dead_letter.unwrap();
        assert_eq!(
            (d.topic.as_str(), d.partition, d.offset, d.class),
            ("sluice.m.requests", 3, 17, codes::MODEL_FAILED)
        );
        assert_eq!(
            decode_request(&d.payload).unwrap().id,
            "r1",
            "the request itself, replayable"
        );
        assert_eq!(c.deadline_ms, 42);
    }

    #[test]
    fn successes_and_expiries_are_not_dead_lettered() {
        let j = job();
        let expired = InferenceResult::failure(&j.request, codes::DEADLINE_EXCEEDED, "late");
        assert!(completion_of(j, expired).dead_letter.is_none());
        let ok = InferenceResult {
            id: "r1".into(),
            ..Default::default()
        };
        assert!(completion_of(job(), ok).dead_letter.is_none());
    }
}
