//! `sluice learn --model NAME`: the one learner of a learning model. It reads the model's logged
//! predictions and its feedback (`<prefix>.<model>.predictions`, `.feedback`), joins them by
//! request id within the configured window (a wall-clock timer resolves predictions whose
//! feedback never came, even with no traffic), learns each joined example, publishes the
//! weights to `<prefix>.<model>.weights` for the serving replicas, and checkpoints its whole
//! state (weights, join state, read positions, counts) to Redis. A restarted learner resumes
//! from the checkpoint and re-reads what came after it, so nothing is lost or counted twice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sluice_common::Deployment;
use sluice_common::config::LearnerConfig;
use sluice_learn::{
    Feedback, Join, JoinCounts, Learner, Outcome, PageHinkley, Prediction, Weights, WeightsRecord,
};
use sluice_schemas::learning::{decode_feedback, decode_prediction};

/// How long the broker holds a fetch of the learner's inputs (tansu answers only then).
const FETCH_WAIT: Duration = Duration::from_millis(50);
/// How often the clock-driven work runs: window ends, snapshots, checkpoints.
const TICK: Duration = Duration::from_millis(20);

/// Arguments of `sluice learn`.
#[derive(clap::Args)]
pub struct LearnArgs {
    /// The learning model (one with `[models.<name>.learner]`).
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

/// Everything the learner has: saved as one Redis value, so a restart resumes exactly here.
#[derive(Serialize, Deserialize)]
struct State {
    learner: Learner,
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
    /// Rises of the served error rate (Page-Hinkley, River's defaults).
    drifts: u64,
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
    let cfg = &deployment.config;
    let name = args.model.as_str();
    let model = deployment
        .model(name)
        .with_context(|| format!("no model '{name}' in the config"))?;
    let settings = model
        .learner
        .clone()
        .with_context(|| format!("model '{name}' has no [models.{name}.learner]"))?;
    let dims = model
        .inputs
        .first()
        .and_then(|i| i.shape.get(1))
        .and_then(|&d| usize::try_from(d).ok())
        .context("a learner's input is [-1, d]")?;
    let redis = redis::Client::open(cfg.redis.url.as_str())?;
    let mut redis = redis::aio::ConnectionManager::new(redis).await?;
    let key = checkpoint_key(&cfg.redis.key_prefix, name);
    let mut state = match redis.get::<_, Option<String>>(&key).await? {
        Some(text) => serde_json::from_str::<State>(&text)
            .with_context(|| format!("checkpoint {key} does not parse"))?,
        None => fresh(&settings, dims)?,
    };
    tracing::info!(model = name, version = state.learner.updates(), next = ?state.next, pending = state.join.pending(), "learner starting");

    let topics = [
        deployment.topics.predictions(name),
        deployment.topics.feedback(name),
    ];
    let client = format!("sluice-learner-{name}-{}", std::process::id());
    let consumer: StreamConsumer =
        sluice_common::kafka::reader_config(cfg, &client, FETCH_WAIT).create()?;
    let consumer = Arc::new(consumer);
    // Windows end by the clock only once what was written before the start has been read, so
    // a restart does not call "no feedback" on predictions whose feedback it has yet to read.
    let ends = watermarks(&consumer, &topics).await?;
    if state.next.iter().zip(ends).any(|(n, e)| *n > e) {
        // The broker lost the topics the checkpoint read (an in-memory broker restarted): keep
        // what was learned, start the join afresh on the new topics.
        tracing::warn!(model = name, checkpoint = ?state.next, ends = ?ends, "the input topics are shorter than the checkpoint read; keeping the weights, reading the topics from the start");
        state.join = new_join(&settings);
        state.next = [0, 0];
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, next) in topics.iter().zip(state.next) {
        tpl.add_partition_offset(topic, 0, Offset::Offset(next))?;
    }
    consumer.assign(&tpl)?;
    let producer: FutureProducer =
        sluice_common::kafka::producer_config(cfg, &client, Duration::ZERO).create()?;
    let weights_topic = deployment.topics.weights(name);

    let ready = Arc::new(AtomicBool::new(true));
    let (stop_ops, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ops_addr = sluice_common::ops::serve_ops(
        args.metrics_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        sluice_common::telemetry::install_metrics(),
        ready,
        None,
        async {
            let _ = stop_rx.await;
        },
    )
    .await?;
    tracing::info!(model = name, %ops_addr, "learner serving metrics and health");

    let metrics = Metrics::new(name);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = state.learner.updates();
    let mut last_snapshot = Instant::now();
    let mut last_checkpoint = Instant::now();
    // Whether the state changed since the last checkpoint.
    let mut dirty = false;
    let mut caught_up = false;
    let shutdown = sluice_common::ops::shutdown_signal();
    tokio::pin!(shutdown);
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
                let outcomes = match (which, msg.payload()) {
                    (0, Some(bytes)) => match decode_prediction(bytes) {
                        Ok(p) => state.join.prediction(Prediction {
                            id: p.id,
                            features: p.features,
                            probability: p.probability,
                            weights_version: u64::try_from(p.weights_version).unwrap_or(0),
                            time_ms: p.time_ms,
                        }, now),
                        Err(e) => undecodable(&mut state, &topics[0], msg.offset(), &e),
                    },
                    (_, Some(bytes)) => match decode_feedback(bytes) {
                        Ok(f) => state.join.feedback(Feedback {
                            id: f.id,
                            truth: f.truth,
                            reward: f.reward,
                            time_ms: f.time_ms,
                        }, now),
                        Err(e) => undecodable(&mut state, &topics[1], msg.offset(), &e),
                    },
                    (w, None) => undecodable(&mut state, &topics[w], msg.offset(), &"empty record"),
                };
                learn(&mut state, &settings, outcomes);
                dirty = true;
            }
            _ = tick.tick() => {
                caught_up = caught_up || state.next.iter().zip(ends).all(|(n, e)| *n >= e);
                if caught_up {
                    let outcomes = state.join.expire(sluice_common::now_ms());
                    dirty |= !outcomes.is_empty();
                    learn(&mut state, &settings, outcomes);
                }
                metrics.record(&state);
                if state.learner.updates() != published && last_snapshot.elapsed() >= settings.snapshot_every {
                    if publish(&producer, &weights_topic, name, &state.learner).await {
                        published = state.learner.updates();
                        state.counts.snapshots += 1;
                        metrics.version.set(published as f64);
                    }
                    last_snapshot = Instant::now();
                }
                if dirty && last_checkpoint.elapsed() >= settings.checkpoint_every {
                    dirty = !checkpoint(&mut redis, &key, &state).await;
                    last_checkpoint = Instant::now();
                }
            }
            () = &mut shutdown => break,
        }
    }
    if state.learner.updates() != published {
        publish(&producer, &weights_topic, name, &state.learner).await;
    }
    checkpoint(&mut redis, &key, &state).await;
    let _ = stop_ops.send(());
    tracing::info!(
        model = name,
        version = state.learner.updates(),
        "learner stopped"
    );
    Ok(())
}

/// Where a model's learner keeps its checkpoint in Redis.
pub fn checkpoint_key(prefix: &str, model: &str) -> String {
    format!("{prefix}:learner:{model}")
}

/// An empty join with the configured window and bound.
fn new_join(settings: &LearnerConfig) -> Join {
    Join::new(
        i64::try_from(settings.window.as_millis()).unwrap_or(i64::MAX),
        settings.max_pending,
    )
}

/// A learner with no checkpoint: its `warm_start` weights, or zeros.
fn fresh(settings: &LearnerConfig, dims: usize) -> anyhow::Result<State> {
    let learner = match &settings.warm_start {
        Some(path) => {
            Learner::from_weights(settings, &Weights::read(path).map_err(anyhow::Error::msg)?)
        }
        None => Learner::new(settings, dims),
    };
    Ok(State {
        learner,
        join: new_join(settings),
        next: [0, 0],
        counts: LearnCounts::default(),
        drift: PageHinkley::default(),
    })
}

fn undecodable(
    state: &mut State,
    topic: &str,
    offset: i64,
    e: &dyn std::fmt::Display,
) -> Vec<Outcome> {
    state.counts.undecodable += 1;
    tracing::warn!(%topic, offset, error = %e, "skipped a record that does not decode");
    Vec::new()
}

/// Learns what the join produced.
fn learn(state: &mut State, settings: &LearnerConfig, outcomes: Vec<Outcome>) {
    for o in outcomes {
        let (p, y, joined) = match o {
            Outcome::Joined(p, f) => {
                let y = f.truth.or(f.reward);
                if let Some(truth) = f.truth {
                    let right = (p.probability > 0.5) == (truth > 0.5);
                    state.counts.served_judged += 1;
                    state.counts.served_correct += u64::from(right);
                    if state.drift.update(if right { 0.0 } else { 1.0 }) {
                        state.counts.drifts += 1;
                        tracing::warn!(
                            judged = state.counts.served_judged,
                            drifts = state.counts.drifts,
                            "drift: the served error rate rose"
                        );
                    }
                }
                (p, y, true)
            }
            Outcome::NoFeedback(p) => (p, settings.no_feedback_label, false),
        };
        let Some(y) = y else { continue };
        let frozen = settings.frozen
            || settings
                .freeze_after
                .is_some_and(|n| state.learner.updates() >= n);
        if frozen || p.features.len() != state.learner.dims() {
            continue;
        }
        state.learner.learn(&p.features, y);
        if joined {
            state.counts.learned += 1;
        } else {
            state.counts.learned_no_feedback += 1;
        }
    }
}

/// Publishes the learner's weights; false when the broker did not take them (tried again at
/// the next snapshot).
async fn publish(producer: &FutureProducer, topic: &str, model: &str, learner: &Learner) -> bool {
    let record = WeightsRecord {
        model: model.to_string(),
        time_ms: sluice_common::now_ms(),
        weights: learner.weights(),
    };
    let Ok(bytes) = serde_json::to_vec(&record) else {
        return false;
    };
    match producer
        .send(
            FutureRecord::to(topic).key(model).payload(&bytes),
            Duration::from_secs(5),
        )
        .await
    {
        Ok(_) => true,
        Err((e, _)) => {
            tracing::warn!(error = %e, %topic, "weights not published; trying again");
            false
        }
    }
}

/// Saves the whole state; false when Redis did not take it (tried again later).
async fn checkpoint(redis: &mut redis::aio::ConnectionManager, key: &str, state: &State) -> bool {
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
type Shown = (metrics::Gauge, fn(&State) -> u64);

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
                (gauge("prediction"), |s| s.join.counts().predictions),
                (gauge("feedback"), |s| s.join.counts().feedback),
                (gauge("joined"), |s| s.join.counts().joined),
                (gauge("no_feedback"), |s| s.join.counts().no_feedback),
                (gauge("duplicate"), |s| s.join.counts().duplicate),
                (gauge("late"), |s| s.join.counts().late),
                (gauge("learned"), |s| {
                    s.counts.learned + s.counts.learned_no_feedback
                }),
                (gauge("served_correct"), |s| s.counts.served_correct),
                (gauge("drift"), |s| s.counts.drifts),
            ],
        }
    }

    fn record(&self, state: &State) {
        for (g, read) in &self.outcomes {
            g.set(read(state) as f64);
        }
    }
}

/// The checkpoint of `model`'s learner as JSON (counts, version, read positions), or `None`
/// before the learner saved one.
pub async fn status(deployment: &Deployment, model: &str) -> anyhow::Result<Option<String>> {
    let cfg = &deployment.config;
    let redis = redis::Client::open(cfg.redis.url.as_str())?;
    let mut redis = redis::aio::ConnectionManager::new(redis).await?;
    let key = checkpoint_key(&cfg.redis.key_prefix, model);
    let Some(text) = redis.get::<_, Option<String>>(&key).await? else {
        return Ok(None);
    };
    let state: State = serde_json::from_str(&text)?;
    Ok(Some(serde_json::to_string(&Status {
        model,
        weights_version: state.learner.updates(),
        next: state.next,
        pending: state.join.pending(),
        join: state.join.counts(),
        learned: state.counts,
    })?))
}
