//! Model hot-swap: a worker follows the control topic and, for each push of a model it serves,
//! loads the new ONNX file, checks it (declared inputs and outputs, one warm-up inference), and
//! only then swaps it in: batches already running finish on the old session, the next batch
//! runs on the new one, so no request sees a mix. A push that fails to load or to run leaves
//! the old version serving. Each worker reports the outcome in Redis for the pusher.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sluice_common::control::{ModelPush, PushReport, report_key, serving_key};
use sluice_common::{Config, ModelConfig};
use sluice_schemas::Tensor;

use crate::pipeline::executor::StepSlot;
use crate::step::{ModelStep, Step, StepInput};

/// How often the control topic is read without an announcement (one missed while Redis was
/// away, say).
const CATCH_UP_EVERY: Duration = Duration::from_secs(30);
/// How long a push's reports are kept.
const REPORT_TTL_S: i64 = 3600;

/// A model this worker serves: its declaration and where its step lives.
pub(crate) struct Served {
    pub(crate) config: ModelConfig,
    pub(crate) slot: StepSlot,
}

/// Follows the control topic from `start` until the process ends, swapping in every push of
/// the models in `served`. The topic is read when a push is announced on Redis (and every
/// `CATCH_UP_EVERY`), by a reader that lives only for that read: an idle worker keeps no fetch
/// loop for it.
pub(crate) async fn follow(
    cfg: Config,
    topic: String,
    start: i64,
    mut served: HashMap<String, Served>,
    worker: String,
) {
    let Ok(client) = sluice_common::redis_client::client(&cfg.redis) else {
        tracing::error!("cannot follow the control topic: bad Redis URL");
        return;
    };
    let mut redis = redis::aio::ConnectionManager::new(client.clone())
        .await
        .ok();
    let channel = sluice_common::control::channel(&cfg);
    let mut announcements = subscribe(&client, &channel).await;
    let mut next = start;
    let mut safety = tokio::time::interval(CATCH_UP_EVERY);
    safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match announcements.as_mut() {
            Some(sub) => {
                let mut messages = sub.on_message();
                tokio::select! {
                    m = messages.next() => {
                        if m.is_none() {
                            drop(messages);
                            tracing::warn!(%channel, "control announcements lost; resubscribing");
                            announcements = None;
                        }
                    }
                    _ = safety.tick() => {}
                }
            }
            None => {
                safety.tick().await;
                announcements = subscribe(&client, &channel).await;
            }
        }
        let (c, t) = (cfg.clone(), topic.clone());
        let read = tokio::task::spawn_blocking(move || {
            sluice_common::control::read_from(&c, &t, Some(next))
        })
        .await;
        let pushes = match read {
            Ok(Ok((pushes, after))) => {
                next = after;
                pushes
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, %topic, "reading the control topic");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the control topic failed");
                continue;
            }
        };
        for push in pushes {
            let Some(model) = served.get_mut(&push.model) else {
                continue;
            };
            let report = swap(model, &push).await;
            if let Some(r) = redis.as_mut() {
                let key = report_key(&cfg, &push.id);
                let value = serde_json::to_string(&report).unwrap_or_default();
                let mut pipe = redis::pipe();
                pipe.hset(&key, &worker, value).expire(&key, REPORT_TTL_S);
                if report.ok {
                    pipe.set(serving_key(&cfg, &push.model), &push.version);
                }
                let written: redis::RedisResult<()> = pipe.query_async(r).await;
                if let Err(e) = written {
                    tracing::warn!(error = %e, "push report not written");
                }
            }
        }
    }
}

async fn subscribe(client: &redis::Client, channel: &str) -> Option<redis::aio::PubSub> {
    let mut sub = client.get_async_pubsub().await.ok()?;
    sub.subscribe(channel).await.ok()?;
    Some(sub)
}

/// Loads, checks and swaps in `push` for `model`; the report says how it went.
async fn swap(model: &mut Served, push: &ModelPush) -> PushReport {
    let mut next = model.config.clone();
    next.onnx = Some(push.onnx.clone());
    next.version.clone_from(&push.version);
    let name = push.model.clone();
    let loading = next.clone();
    let built = tokio::task::spawn_blocking(move || ModelStep::load(&name, &loading)).await;
    let step = match built {
        Ok(Ok(step)) => step,
        Ok(Err(e)) => return failed(model, push, &format!("load failed: {e}")),
        Err(e) => return failed(model, push, &format!("load failed: {e}")),
    };
    if let Err(e) = warm_up(&step, &next).await {
        return failed(model, push, &format!("check failed: {e}"));
    }
    *model.slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(step);
    model.config = next;
    tracing::info!(model = %push.model, version = %push.version, onnx = %push.onnx.display(), "model version swapped in");
    PushReport {
        ok: true,
        serving: push.version.clone(),
        message: format!("serving version {}", push.version),
    }
}

fn failed(model: &Served, push: &ModelPush, why: &str) -> PushReport {
    tracing::warn!(model = %push.model, version = %push.version, error = why, "pushed version not served; the old one keeps serving");
    PushReport {
        ok: false,
        serving: model.config.version.clone(),
        message: format!(
            "version {} of '{}' not served ({why}); version {} keeps serving",
            push.version, push.model, model.config.version
        ),
    }
}

/// One inference on zeros (one row of each declared input), so the new session has run once
/// and runs at all before it takes requests. Models with BYTES inputs skip it.
async fn warm_up(step: &ModelStep, model: &ModelConfig) -> Result<(), String> {
    let mut tensors = Vec::new();
    for spec in &model.inputs {
        let Some(size) = spec.datatype.element_size() else {
            return Ok(());
        };
        let shape: Vec<i64> = spec.shape.iter().map(|&d| d.max(1)).collect();
        let count: i64 = shape.iter().product();
        let bytes = usize::try_from(count).unwrap_or(0) * size;
        tensors.push(Tensor {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape,
            data: vec![0; bytes],
        });
    }
    let results = step
        .run(vec![StepInput {
            tensors,
            ..Default::default()
        }])
        .await;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e.message),
        None => Err("no result".into()),
    }
}

/// Records in Redis the version each ONNX model of `unit` serves (the gateway's metadata
/// reads it), so a record left by an earlier stack does not outlive it.
pub(crate) async fn record_serving(
    deployment: &sluice_common::Deployment,
    unit: &sluice_common::WorkerUnit,
) {
    let cfg = &deployment.config;
    let mut pipe = redis::pipe();
    for member in &unit.members {
        if let sluice_common::graph::Unit::Model(name) = member
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
pub(crate) async fn apply_pushes(
    deployment: &mut sluice_common::Deployment,
    unit: &sluice_common::WorkerUnit,
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
        if model.onnx.is_none()
            || !unit
                .members
                .contains(&sluice_common::graph::Unit::Model(push.model.clone()))
        {
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
