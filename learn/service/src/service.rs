//! The learner process: its inputs read from Kafka, its state checkpointed to Redis, its
//! learned state published for the serving replicas, on a clock that ends join windows even
//! with no traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use redis::AsyncCommands;
use sluice_common::Deployment;
use sluice_common::config::{LearnTiming, LearnerConfig};
use sluice_common::producer::{AsyncProducer, FutureRecord};
use sluice_learn::{Bandit, JoinCounts, Learner, Weights};

use crate::state::{Input, State, new_join, status_of};
use crate::trainee::{BanditSettings, LearnCounts, Trainee};

/// How often the clock-driven work runs (window ends, snapshots, checkpoints) while there is
/// some to do: predictions waiting for feedback, weights not yet published or checkpointed.
const TICK: Duration = Duration::from_millis(20);
/// How often it runs when there is none (an idle learner wakes less).
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Which learner to run, and where it serves its metrics.
#[derive(Debug, Clone)]
pub struct Options {
    /// The learning model (one with `[models.<name>.learner]`) or a graph with a bandit step.
    pub model: String,
    /// Address for /metrics and health (default: an ephemeral port on 127.0.0.1).
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs the learner of `opts.model` until SIGINT/SIGTERM.
pub async fn run(deployment: Deployment, opts: Options) -> anyhow::Result<()> {
    match learned(&deployment, &opts.model)? {
        Learned::Logistic(settings, dims) => {
            let start = fresh_learner(&settings, dims)?;
            let timing = settings.timing();
            serve(&deployment, &opts, timing, settings, start, |l, _| l).await
        }
        Learned::Bandit(b) => {
            let start = Bandit::new(&b.settings.arms, b.dims);
            let timing = b.settings.timing();
            let fit = |bandit: Bandit, b: &BanditSettings| bandit.aligned(&b.settings.arms, b.dims);
            serve(&deployment, &opts, timing, b, start, fit).await
        }
    }
}

/// What servable `name` learns.
enum Learned {
    /// A learning model: its settings and input width.
    Logistic(LearnerConfig, usize),
    /// A graph's bandit router.
    Bandit(BanditSettings),
}

fn learned(deployment: &Deployment, name: &str) -> anyhow::Result<Learned> {
    if let Some(model) = deployment.model(name) {
        let settings = model
            .learner
            .clone()
            .with_context(|| format!("model '{name}' has no [models.{name}.learner]"))?;
        let dims = model
            .inputs
            .iter()
            .find(|i| i.datatype == sluice_schemas::DataType::Fp32)
            .and_then(|i| i.shape.get(1))
            .map_or(Ok(0), |&d| usize::try_from(d))
            .context("a learner's dense input is [-1, d]")?;
        return Ok(Learned::Logistic(settings, dims));
    }
    let graph = deployment
        .graph(name)
        .with_context(|| format!("no model or graph '{name}' in the config"))?;
    let (_, b) = graph
        .bandit()
        .with_context(|| format!("graph '{name}' has no bandit step"))?;
    Ok(Learned::Bandit(BanditSettings {
        settings: b.settings.clone(),
        dims: b.dims,
    }))
}

/// The learner loop of `opts.model`: `start` when there is no checkpoint, else the checkpoint
/// passed through `fit` (which adapts it to changed settings).
async fn serve<T: Trainee>(
    deployment: &Deployment,
    opts: &Options,
    timing: LearnTiming,
    settings: T::Settings,
    start: T,
    fit: impl Fn(T, &T::Settings) -> T,
) -> anyhow::Result<()> {
    let cfg = &deployment.config;
    let name = opts.model.as_str();
    let redis = sluice_common::redis_client::client(&cfg.redis)?;
    let mut redis = redis::aio::ConnectionManager::new(redis).await?;
    let key = checkpoint_key(&cfg.redis.key_prefix, name);
    let state = match redis.get::<_, Option<String>>(&key).await? {
        Some(text) => {
            let saved = serde_json::from_str::<State<T>>(&text)
                .with_context(|| format!("checkpoint {key} does not parse"))?;
            State {
                learner: fit(saved.learner, &settings),
                ..saved
            }
        }
        None => State::fresh(start, &timing),
    };
    tracing::info!(model = name, version = state.learner.version(), next = ?state.next, pending = state.join.pending(), "learner starting");
    let client = format!("sluice-learner-{name}-{}", std::process::id());
    let mut learning = Learning {
        inputs: Inputs::open(deployment, name, &client).await?,
        producer: sluice_common::kafka::producer(cfg, &client, Duration::ZERO)?,
        weights_topic: deployment.topics.weights(name),
        dead_letters: deployment.topics.dead_letter(),
        name,
        redis,
        key,
        metrics: Metrics::new(name),
        published: state.learner.version(),
        state,
        settings,
        timing,
        last_snapshot: Instant::now(),
        last_checkpoint: Instant::now(),
        dirty: false,
        caught_up: false,
    };
    learning.resume()?;
    let stop_ops = serve_ops(deployment, opts).await?;
    learning.serve().await;
    learning.stop().await;
    let _ = stop_ops.send(());
    Ok(())
}

/// The learner's two input topics, read from fixed positions.
struct Inputs {
    consumer: Arc<StreamConsumer>,
    /// Predictions, feedback.
    topics: [String; 2],
    /// Their end offsets at start-up: windows end by the clock only once these are read, so a
    /// restart does not call "no feedback" on predictions whose feedback it has yet to read.
    ends: [i64; 2],
}

impl Inputs {
    async fn open(deployment: &Deployment, name: &str, client: &str) -> anyhow::Result<Inputs> {
        let topics = [
            deployment.topics.predictions(name),
            deployment.topics.feedback(name),
        ];
        let consumer: StreamConsumer =
            sluice_common::kafka::reader_config(&deployment.config, client).create()?;
        let consumer = Arc::new(consumer);
        let ends = watermarks(&consumer, &topics).await?;
        Ok(Inputs {
            consumer,
            topics,
            ends,
        })
    }
}

/// A running learner: its state, where it reads and writes, and when it last published and
/// checkpointed.
struct Learning<'a, T: Trainee> {
    inputs: Inputs,
    producer: AsyncProducer,
    weights_topic: String,
    dead_letters: String,
    name: &'a str,
    redis: redis::aio::ConnectionManager,
    key: String,
    metrics: Metrics,
    state: State<T>,
    settings: T::Settings,
    timing: LearnTiming,
    /// The version last published.
    published: u64,
    last_snapshot: Instant,
    last_checkpoint: Instant,
    /// Whether the state changed since the last checkpoint.
    dirty: bool,
    /// Whether what was written before the start has been read.
    caught_up: bool,
}

impl<T: Trainee> Learning<'_, T> {
    /// Reads on from the checkpoint's positions (from the start when the topics are shorter).
    fn resume(&mut self) -> anyhow::Result<()> {
        let (state, ends) = (&mut self.state, self.inputs.ends);
        if state.next.iter().zip(ends).any(|(n, e)| *n > e) {
            // The broker lost the topics the checkpoint read: keep what was learned, start the
            // join afresh on the new topics.
            tracing::warn!(model = self.name, checkpoint = ?state.next, ends = ?ends, "the input topics are shorter than the checkpoint read; keeping the weights, reading the topics from the start");
            state.join = new_join(&self.timing);
            state.next = [0, 0];
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, next) in self.inputs.topics.iter().zip(state.next) {
            tpl.add_partition_offset(topic, 0, Offset::Offset(next))?;
        }
        self.inputs.consumer.assign(&tpl)?;
        Ok(())
    }

    /// Reads and ticks until SIGINT/SIGTERM.
    async fn serve(&mut self) {
        let consumer = Arc::clone(&self.inputs.consumer);
        let shutdown = sluice_common::ops::shutdown_signal();
        tokio::pin!(shutdown);
        let mut next_tick = tokio::time::Instant::now() + TICK;
        loop {
            tokio::select! {
                msg = consumer.recv() => match msg {
                    Ok(m) => {
                        self.on_record(&m).await;
                        next_tick = next_tick.min(tokio::time::Instant::now() + TICK);
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the learner's inputs"),
                },
                _ = tokio::time::sleep_until(next_tick) => {
                    next_tick = tokio::time::Instant::now() + self.on_tick().await;
                }
                () = &mut shutdown => break,
            }
        }
    }

    /// Joins and learns one record; one that does not decode is dead-lettered.
    async fn on_record(&mut self, msg: &rdkafka::message::BorrowedMessage<'_>) {
        let input = if msg.topic() == self.inputs.topics[1] {
            Input::Feedback
        } else {
            Input::Predictions
        };
        let now = sluice_common::now_ms();
        let read = self
            .state
            .read(&self.settings, input, msg.offset(), msg.payload(), now);
        if let Err(e) = read {
            let topic = &self.inputs.topics[input as usize];
            tracing::warn!(%topic, offset = msg.offset(), error = %e, "skipped a record that does not decode");
            dead_letter(&self.producer, &self.dead_letters, self.name, msg, &e).await;
        }
        self.dirty = true;
    }

    /// The clock's work: windows that ended, snapshots, checkpoints, metrics. Returns how long
    /// to wait for the next tick (short while there is work pending).
    async fn on_tick(&mut self) -> Duration {
        self.caught_up = self.caught_up || self.state.caught_up(self.inputs.ends);
        if self.caught_up {
            self.dirty |= self.state.expire(&self.settings, sluice_common::now_ms());
        }
        self.metrics.record(&self.state);
        let learner = &self.state.learner;
        if learner.version() != self.published
            && self.last_snapshot.elapsed() >= self.timing.snapshot_every
        {
            if publish(&self.producer, &self.weights_topic, self.name, learner).await {
                self.published = learner.version();
                self.state.counts.snapshots += 1;
                learner.record_metrics(self.name);
                self.metrics.version.set(self.published as f64);
            }
            self.last_snapshot = Instant::now();
        }
        if self.dirty && self.last_checkpoint.elapsed() >= self.timing.checkpoint_every {
            self.dirty = !checkpoint(&mut self.redis, &self.key, &self.state).await;
            self.last_checkpoint = Instant::now();
        }
        let busy = self.dirty
            || self.state.join.pending() > 0
            || self.state.learner.version() != self.published;
        if busy { TICK } else { IDLE_TICK }
    }

    /// Publishes what is not yet published and saves the state.
    async fn stop(&mut self) {
        let learner = &self.state.learner;
        if learner.version() != self.published {
            publish(&self.producer, &self.weights_topic, self.name, learner).await;
        }
        checkpoint(&mut self.redis, &self.key, &self.state).await;
        tracing::info!(
            model = self.name,
            version = learner.version(),
            "learner stopped"
        );
    }
}

/// Serves `/metrics` and health; returns what stops the server.
async fn serve_ops(
    deployment: &Deployment,
    opts: &Options,
) -> anyhow::Result<tokio::sync::oneshot::Sender<()>> {
    let (stop_ops, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ops_addr = sluice_common::ops::serve_ops(
        opts.metrics_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        sluice_common::telemetry::install_metrics(),
        Arc::new(AtomicBool::new(true)),
        None,
        &deployment.config.gateway.auth,
        async {
            let _ = stop_rx.await;
        },
    )
    .await?;
    tracing::info!(model = %opts.model, %ops_addr, "learner serving metrics and health");
    Ok(stop_ops)
}

/// Where a model's learner keeps its checkpoint in Redis.
pub fn checkpoint_key(prefix: &str, model: &str) -> String {
    format!("{prefix}:learner:{model}")
}

/// A learner with no checkpoint: its `warm_start` weights, or zeros.
fn fresh_learner(settings: &LearnerConfig, dims: usize) -> anyhow::Result<Learner> {
    Ok(match &settings.warm_start {
        Some(path) => {
            Learner::from_weights(settings, &Weights::read(path).map_err(anyhow::Error::msg)?)
        }
        None => Learner::new(settings, dims),
    })
}

/// Writes a record the learner cannot decode to the dead-letter topic with its origin, as the
/// workers do (best effort: it is counted and logged either way).
async fn dead_letter(
    producer: &AsyncProducer,
    topic: &str,
    model: &str,
    msg: &rdkafka::message::BorrowedMessage<'_>,
    error: &str,
) {
    use rdkafka::Message;
    use sluice_common::kafka::headers as h;
    let headers = h::dead_letter(&h::DeadLetterOrigin {
        topic: msg.topic(),
        partition: msg.partition(),
        offset: msg.offset(),
        model,
        class: sluice_schemas::ErrorCode::Undecodable,
        message: error,
        request_id: None,
    });
    let mut record = FutureRecord::to(topic)
        .payload(msg.payload().unwrap_or_default())
        .headers(headers);
    if let Some(key) = msg.key() {
        record = record.key(key);
    }
    if let Err((e, _)) = producer.send(record, Duration::from_secs(5)).await {
        tracing::warn!(error = %e, %topic, "dead letter not written");
    }
}

/// Publishes the learned state; false when the broker did not take it (tried again at the
/// next snapshot).
async fn publish<T: Trainee>(
    producer: &AsyncProducer,
    topic: &str,
    name: &str,
    learner: &T,
) -> bool {
    let Ok(bytes) = learner.snapshot(name) else {
        return false;
    };
    match producer
        .send(
            FutureRecord::to(topic).key(name).payload(&bytes),
            Duration::from_secs(5),
        )
        .await
    {
        Ok(_) => true,
        Err((e, _)) => {
            tracing::warn!(error = %e, %topic, "snapshot not published; trying again");
            false
        }
    }
}

/// Saves the whole state; false when Redis did not take it (tried again later).
async fn checkpoint<T: Trainee>(
    redis: &mut redis::aio::ConnectionManager,
    key: &str,
    state: &State<T>,
) -> bool {
    let Ok(text) = serde_json::to_string(state) else {
        return false;
    };
    match redis.set::<_, _, ()>(key, text).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, %key, "checkpoint not saved; trying again");
            false
        }
    }
}

/// Each topic's end offset now.
async fn watermarks(
    consumer: &Arc<StreamConsumer>,
    topics: &[String; 2],
) -> anyhow::Result<[i64; 2]> {
    let mut ends = [0; 2];
    for (end, t) in ends.iter_mut().zip(topics) {
        *end = sluice_common::kafka::watermarks(consumer, t).await?.1;
    }
    Ok(ends)
}

/// A gauge and the count it shows.
type Shown = (metrics::Gauge, fn(&JoinCounts, &LearnCounts) -> u64);

/// The learner's metrics.
struct Metrics {
    version: metrics::Gauge,
    outcomes: [Shown; 9],
}

impl Metrics {
    fn new(model: &str) -> Metrics {
        let gauge = |outcome: &'static str| metrics::gauge!("sluice_learner_events", "model" => model.to_string(), "event" => outcome);
        Metrics {
            version: metrics::gauge!("sluice_learner_weights_version", "model" => model.to_string()),
            outcomes: [
                (gauge("prediction"), |j, _| j.predictions),
                (gauge("feedback"), |j, _| j.feedback),
                (gauge("joined"), |j, _| j.joined),
                (gauge("no_feedback"), |j, _| j.no_feedback),
                (gauge("duplicate"), |j, _| j.duplicate),
                (gauge("late"), |j, _| j.late),
                (gauge("learned"), |_, c| c.learned + c.learned_no_feedback),
                (gauge("served_correct"), |_, c| c.served_correct),
                (gauge("drift"), |_, c| c.drifts),
            ],
        }
    }

    fn record<T>(&self, state: &State<T>) {
        let join = state.join.counts();
        for (g, read) in &self.outcomes {
            g.set(read(&join, &state.counts) as f64);
        }
    }
}

/// The checkpoint of `model`'s learner as JSON (counts, version, read positions), or `None`
/// before the learner saved one.
pub async fn status(deployment: &Deployment, model: &str) -> anyhow::Result<Option<String>> {
    let cfg = &deployment.config;
    let redis = sluice_common::redis_client::client(&cfg.redis)?;
    let mut redis = redis::aio::ConnectionManager::new(redis).await?;
    let key = checkpoint_key(&cfg.redis.key_prefix, model);
    let Some(text) = redis.get::<_, Option<String>>(&key).await? else {
        return Ok(None);
    };
    Ok(Some(match learned(deployment, model)? {
        Learned::Logistic(..) => status_of::<Learner>(model, &text)?,
        Learned::Bandit(_) => status_of::<Bandit>(model, &text)?,
    }))
}
