//! `sluice learn --model NAME`: the one learner of a learning model or of a graph's bandit
//! router. It reads the logged predictions (or choices) and the feedback
//! (`<prefix>.<name>.predictions`, `.feedback`), joins them by request id within the
//! configured window (a wall-clock timer resolves predictions whose feedback never came, even
//! with no traffic), learns each joined example, publishes the learned state to
//! `<prefix>.<name>.weights` for the serving replicas, and checkpoints its whole state (learned
//! state, join state, read positions, counts) to Redis. A restarted learner resumes from the
//! checkpoint and re-reads what came after it, so nothing is lost or counted twice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use redis::AsyncCommands;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_common::Deployment;
use sluice_common::config::{LearnTiming, LearnerConfig};
use sluice_common::producer::{AsyncProducer, FutureRecord};
use sluice_learn::{
    Bandit, BanditRecord, Feedback, Join, JoinCounts, Learner, Outcome, PageHinkley, Prediction,
    Weights, WeightsRecord,
};
use sluice_schemas::learning::{decode_feedback, decode_prediction};

/// How often the clock-driven work runs (window ends, snapshots, checkpoints) while there is
/// some to do: predictions waiting for feedback, weights not yet published or checkpointed.
const TICK: Duration = Duration::from_millis(20);
/// How often it runs when there is none (an idle learner wakes less).
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Arguments of `sluice learn`.
#[derive(clap::Args)]
pub struct LearnArgs {
    /// The learning model (one with `[models.<name>.learner]`) or a graph with a bandit step.
    #[arg(long)]
    model: String,
    /// Address for /metrics and health (default: an ephemeral port on 127.0.0.1).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Print the learner's last checkpoint (counts, weights version, read positions) as JSON
    /// and exit.
    #[arg(long)]
    status: bool,
}

/// What a learner process trains: a logistic regression's weights or a bandit's arms.
trait Trainee: Serialize + DeserializeOwned + Send {
    /// Its settings.
    type Settings: Sync;
    /// Updates learned so far (the version its snapshots carry).
    fn version(&self) -> u64;
    /// Learns what the join produced.
    fn learn(
        &mut self,
        settings: &Self::Settings,
        outcomes: Vec<Outcome>,
        counts: &mut LearnCounts,
        drift: &mut PageHinkley,
    );
    /// The snapshot published for the replicas of `name` (JSON).
    fn snapshot(&self, name: &str) -> serde_json::Result<Vec<u8>>;
    /// A summary for `--status` (`null` when there is nothing beyond the counts).
    fn summary(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Sets its own metrics (per arm, say); called when a changed state is published.
    fn record_metrics(&self, _name: &str) {}
}

/// A bandit's settings as its learner needs them.
struct BanditSettings {
    settings: sluice_common::config::BanditConfig,
    dims: usize,
}

/// Everything the learner has: saved as one Redis value, so a restart resumes exactly here.
#[derive(Serialize, Deserialize)]
#[serde(bound = "T: Trainee")]
struct State<T> {
    learner: T,
    join: Join,
    /// Next offsets to read: predictions, feedback.
    next: [i64; 2],
    counts: LearnCounts,
    /// Watches the served error rate.
    #[serde(default)]
    drift: PageHinkley,
}

/// What the learner did with what it read (with the join's counts, in the checkpoint and
/// printed by `sluice learn --model M --status`).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(default)]
struct LearnCounts {
    /// Examples learned from feedback.
    learned: u64,
    /// Examples learned from a window that ended without feedback (`no_feedback_label`).
    learned_no_feedback: u64,
    /// Joined answers whose served prediction matched the truth.
    served_correct: u64,
    /// Joined answers with a truth to compare with.
    served_judged: u64,
    /// Records on the input topics that could not be decoded (skipped, logged).
    undecodable: u64,
    /// Weights snapshots published.
    snapshots: u64,
    /// Rises of the served error rate, or falls of a bandit's reward (Page-Hinkley, River's
    /// defaults).
    drifts: u64,
    /// Sum of the rewards joined (bandits).
    rewards: f64,
}

/// The checkpoint as `sluice learn --status` and tests read it.
#[derive(Serialize)]
struct Status<'a> {
    model: &'a str,
    weights_version: u64,
    next: [i64; 2],
    pending: usize,
    join: JoinCounts,
    learned: LearnCounts,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    arms: serde_json::Value,
}

/// Runs the learner of `args.model` until SIGINT/SIGTERM.
pub async fn run(deployment: Deployment, args: LearnArgs) -> anyhow::Result<()> {
    if args.status {
        let text = status(&deployment, &args.model)
            .await?
            .with_context(|| format!("no checkpoint of '{}' yet", args.model))?;
        use std::io::Write;
        writeln!(std::io::stdout(), "{text}")?;
        return Ok(());
    }
    let name = args.model.clone();
    match learned(&deployment, &name)? {
        Learned::Logistic(settings, dims) => {
            let start = fresh_learner(&settings, dims)?;
            serve(
                &deployment,
                &args,
                settings.timing(),
                settings,
                start,
                |l, _| l,
            )
            .await
        }
        Learned::Bandit(b) => {
            let start = Bandit::new(&b.settings.arms, b.dims);
            serve(
                &deployment,
                &args,
                b.settings.timing(),
                b,
                start,
                |bandit, b| bandit.aligned(&b.settings.arms, b.dims),
            )
            .await
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

/// The learner loop of `args.model`: `start` when there is no checkpoint, else the checkpoint
/// passed through `fit` (which adapts it to changed settings).
async fn serve<T: Trainee>(
    deployment: &Deployment,
    args: &LearnArgs,
    timing: LearnTiming,
    settings: T::Settings,
    start: T,
    fit: impl Fn(T, &T::Settings) -> T,
) -> anyhow::Result<()> {
    let cfg = &deployment.config;
    let name = args.model.as_str();
    let redis = sluice_common::redis_client::client(&cfg.redis)?;
    let mut redis = redis::aio::ConnectionManager::new(redis).await?;
    let key = checkpoint_key(&cfg.redis.key_prefix, name);
    let mut state: State<T> = match redis.get::<_, Option<String>>(&key).await? {
        Some(text) => {
            let saved = serde_json::from_str::<State<T>>(&text)
                .with_context(|| format!("checkpoint {key} does not parse"))?;
            State {
                learner: fit(saved.learner, &settings),
                ..saved
            }
        }
        None => State {
            learner: start,
            join: new_join(&timing),
            next: [0, 0],
            counts: LearnCounts::default(),
            drift: PageHinkley::default(),
        },
    };
    tracing::info!(model = name, version = state.learner.version(), next = ?state.next, pending = state.join.pending(), "learner starting");
    let topics = [
        deployment.topics.predictions(name),
        deployment.topics.feedback(name),
    ];
    let client = format!("sluice-learner-{name}-{}", std::process::id());
    let consumer: StreamConsumer = sluice_common::kafka::reader_config(cfg, &client).create()?;
    let consumer = Arc::new(consumer);
    // Windows end by the clock only once what was written before the start has been read, so
    // a restart does not call "no feedback" on predictions whose feedback it has yet to read.
    let ends = watermarks(&consumer, &topics).await?;
    if state.next.iter().zip(ends).any(|(n, e)| *n > e) {
        // The broker lost the topics the checkpoint read (an in-memory broker restarted): keep
        // what was learned, start the join afresh on the new topics.
        tracing::warn!(model = name, checkpoint = ?state.next, ends = ?ends, "the input topics are shorter than the checkpoint read; keeping the weights, reading the topics from the start");
        state.join = new_join(&timing);
        state.next = [0, 0];
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, next) in topics.iter().zip(state.next) {
        tpl.add_partition_offset(topic, 0, Offset::Offset(next))?;
    }
    consumer.assign(&tpl)?;
    let producer: AsyncProducer = sluice_common::kafka::producer(cfg, &client, Duration::ZERO)?;
    let weights_topic = deployment.topics.weights(name);
    let dead_letters = deployment.topics.dead_letter();

    let ready = Arc::new(AtomicBool::new(true));
    let (stop_ops, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ops_addr = sluice_common::ops::serve_ops(
        args.metrics_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        sluice_common::telemetry::install_metrics(),
        ready,
        None,
        &cfg.gateway.auth,
        async {
            let _ = stop_rx.await;
        },
    )
    .await?;
    tracing::info!(model = name, %ops_addr, "learner serving metrics and health");

    let metrics = Metrics::new(name);
    let mut published = state.learner.version();
    let mut last_snapshot = Instant::now();
    let mut last_checkpoint = Instant::now();
    // Whether the state changed since the last checkpoint.
    let mut dirty = false;
    let mut caught_up = false;
    let shutdown = sluice_common::ops::shutdown_signal();
    tokio::pin!(shutdown);
    let mut next_tick = tokio::time::Instant::now() + TICK;
    loop {
        tokio::select! {
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the learner's inputs");
                        continue;
                    }
                };
                let which = usize::from(msg.topic() == topics[1]);
                state.next[which] = msg.offset() + 1;
                let now = sluice_common::now_ms();
                let decoded: Result<Vec<Outcome>, String> = match (which, msg.payload()) {
                    (0, Some(bytes)) => decode_prediction(bytes)
                        .map(|p| state.join.prediction(Prediction {
                            id: p.id,
                            features: p.features,
                            probability: p.probability,
                            weights_version: u64::try_from(p.weights_version).unwrap_or(0),
                            time_ms: p.time_ms,
                            arm: p.arm,
                            hashed: p.hashed.iter().filter_map(|&h| u32::try_from(h).ok()).collect(),
                        }, now))
                        .map_err(|e| e.to_string()),
                    (_, Some(bytes)) => decode_feedback(bytes)
                        .map(|f| state.join.feedback(Feedback {
                            id: f.id,
                            truth: f.truth,
                            reward: f.reward,
                            time_ms: f.time_ms,
                        }, now))
                        .map_err(|e| e.to_string()),
                    (_, None) => Err("empty record".to_string()),
                };
                let outcomes = match decoded {
                    Ok(outcomes) => outcomes,
                    Err(e) => {
                        undecodable(&mut state, &topics[which], msg.offset(), &e);
                        dead_letter(&producer, &dead_letters, name, &msg, &e).await;
                        Vec::new()
                    }
                };
                state.learn(&settings, outcomes);
                dirty = true;
                next_tick = next_tick.min(tokio::time::Instant::now() + TICK);
            }
            _ = tokio::time::sleep_until(next_tick) => {
                caught_up = caught_up || state.next.iter().zip(ends).all(|(n, e)| *n >= e);
                if caught_up {
                    let outcomes = state.join.expire(sluice_common::now_ms());
                    dirty |= !outcomes.is_empty();
                    state.learn(&settings, outcomes);
                }
                metrics.record(&state);
                if state.learner.version() != published && last_snapshot.elapsed() >= timing.snapshot_every {
                    if publish(&producer, &weights_topic, name, &state.learner).await {
                        published = state.learner.version();
                        state.counts.snapshots += 1;
                        state.learner.record_metrics(name);
                        metrics.version.set(published as f64);
                    }
                    last_snapshot = Instant::now();
                }
                if dirty && last_checkpoint.elapsed() >= timing.checkpoint_every {
                    dirty = !checkpoint(&mut redis, &key, &state).await;
                    last_checkpoint = Instant::now();
                }
                let busy = dirty || state.join.pending() > 0 || state.learner.version() != published;
                next_tick = tokio::time::Instant::now() + if busy { TICK } else { IDLE_TICK };
            }
            () = &mut shutdown => break,
        }
    }
    if state.learner.version() != published {
        publish(&producer, &weights_topic, name, &state.learner).await;
    }
    checkpoint(&mut redis, &key, &state).await;
    let _ = stop_ops.send(());
    tracing::info!(
        model = name,
        version = state.learner.version(),
        "learner stopped"
    );
    Ok(())
}

/// Where a model's learner keeps its checkpoint in Redis.
pub fn checkpoint_key(prefix: &str, model: &str) -> String {
    format!("{prefix}:learner:{model}")
}

/// An empty join with the configured window and bound.
fn new_join(timing: &LearnTiming) -> Join {
    Join::new(
        i64::try_from(timing.window.as_millis()).unwrap_or(i64::MAX),
        timing.max_pending,
    )
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

fn undecodable<T>(state: &mut State<T>, topic: &str, offset: i64, e: &str) {
    state.counts.undecodable += 1;
    tracing::warn!(%topic, offset, error = %e, "skipped a record that does not decode");
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

impl<T: Trainee> State<T> {
    /// Learns what the join produced.
    fn learn(&mut self, settings: &T::Settings, outcomes: Vec<Outcome>) {
        if !outcomes.is_empty() {
            self.learner
                .learn(settings, outcomes, &mut self.counts, &mut self.drift);
        }
    }
}

/// Feeds the drift detector one loss (1 = wrong, or no reward); counts and logs a detection.
fn watch_drift(drift: &mut PageHinkley, counts: &mut LearnCounts, loss: f64) {
    if drift.update(loss) {
        counts.drifts += 1;
        tracing::warn!(
            judged = counts.served_judged,
            drifts = counts.drifts,
            "drift: the served error rate rose"
        );
    }
}

impl Trainee for Learner {
    type Settings = LearnerConfig;

    fn version(&self) -> u64 {
        self.updates()
    }

    fn learn(
        &mut self,
        settings: &LearnerConfig,
        outcomes: Vec<Outcome>,
        counts: &mut LearnCounts,
        drift: &mut PageHinkley,
    ) {
        for o in outcomes {
            let (p, y, joined) = match o {
                Outcome::Joined(p, f) => {
                    let y = f.truth.or(f.reward);
                    if let Some(truth) = f.truth {
                        let right = (p.probability > 0.5) == (truth > 0.5);
                        counts.served_judged += 1;
                        counts.served_correct += u64::from(right);
                        watch_drift(drift, counts, if right { 0.0 } else { 1.0 });
                    }
                    (p, y, true)
                }
                Outcome::NoFeedback(p) => (p, settings.no_feedback_label, false),
            };
            let Some(y) = y else { continue };
            if settings.frozen_at(self.updates()) || p.features.len() != self.dims() {
                continue;
            }
            self.learn_with(&p.features, &p.hashed, y);
            if joined {
                counts.learned += 1;
            } else {
                counts.learned_no_feedback += 1;
            }
        }
    }

    fn snapshot(&self, name: &str) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&WeightsRecord {
            model: name.to_string(),
            time_ms: sluice_common::now_ms(),
            weights: self.weights(),
        })
    }
}

impl Trainee for Bandit {
    type Settings = BanditSettings;

    fn version(&self) -> u64 {
        Bandit::version(self)
    }

    fn learn(
        &mut self,
        b: &BanditSettings,
        outcomes: Vec<Outcome>,
        counts: &mut LearnCounts,
        drift: &mut PageHinkley,
    ) {
        for o in outcomes {
            let (p, reward, joined) = match o {
                Outcome::Joined(p, f) => (p, f.reward, true),
                Outcome::NoFeedback(p) => (p, b.settings.no_feedback_reward, false),
            };
            let Some(reward) = reward.map(|r| r.clamp(0.0, 1.0)) else {
                continue;
            };
            if joined {
                counts.rewards += reward;
                counts.served_judged += 1;
                watch_drift(drift, counts, 1.0 - reward);
            }
            if b.settings.frozen_at(Bandit::version(self)) {
                continue;
            }
            let Some(arm) = p.arm else { continue };
            self.forget(b.settings.discount);
            if Bandit::learn(self, &arm, &p.features, reward) {
                if joined {
                    counts.learned += 1;
                } else {
                    counts.learned_no_feedback += 1;
                }
            }
        }
    }

    fn snapshot(&self, name: &str) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&BanditRecord {
            graph: name.to_string(),
            time_ms: sluice_common::now_ms(),
            bandit: self.clone(),
        })
    }

    fn summary(&self) -> serde_json::Value {
        self.arms()
            .iter()
            .map(|a| {
                serde_json::json!({"arm": a.name, "rewards_learned": a.pulls, "mean_reward": a.mean()})
            })
            .collect()
    }

    fn record_metrics(&self, name: &str) {
        for a in self.arms() {
            let labels = [("graph", name.to_string()), ("arm", a.name.clone())];
            metrics::gauge!("sluice_bandit_arm_rewards_learned", &labels).set(a.pulls);
            metrics::gauge!("sluice_bandit_arm_mean_reward", &labels).set(a.mean());
        }
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

fn status_of<T: Trainee>(model: &str, checkpoint: &str) -> anyhow::Result<String> {
    let state: State<T> = serde_json::from_str(checkpoint)?;
    Ok(serde_json::to_string(&Status {
        model,
        weights_version: state.learner.version(),
        next: state.next,
        pending: state.join.pending(),
        join: state.join.counts(),
        learned: state.counts,
        arms: state.learner.summary(),
    })?)
}
