//! Model versions pushed while serving (`sluice models push`, the repository API's `load`):
//! each push is a record on `<prefix>.control` naming the model, its new version and the ONNX
//! file to load. The topic is the record of what every model serves: a worker starting up
//! applies the newest push of each of its models before it serves, and follows the topic while
//! it runs. Each worker reports how its load went in Redis (`<prefix>:push:<id>`, one field per
//! worker), which is what the pusher waits for.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::producer::{AsyncProducer, FutureRecord};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::{Config, Deployment};

/// One push: load `onnx` as `model`'s version `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPush {
    /// Names this push in the workers' reports.
    pub id: String,
    /// The model.
    pub model: String,
    /// Its new version (reported in metadata and answers).
    pub version: String,
    /// The ONNX file, readable by every worker (an absolute path).
    pub onnx: PathBuf,
    /// When it was pushed (ms since the epoch).
    pub time_ms: i64,
}

/// How a worker's load of a push went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    /// Loaded, checked and serving.
    pub ok: bool,
    /// The version now served by this worker.
    pub serving: String,
    /// What happened (the error when not ok).
    pub message: String,
}

/// Why a push did not go out.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The broker did not take the record.
    #[error("the control record was not written: {0}")]
    Produce(String),
    /// Redis could not be read for the workers' reports.
    #[error("reading the workers' reports: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The Redis channel a push is announced on, so workers read the control topic only then
/// (an idle worker costs the broker no fetches for it).
pub fn channel(cfg: &Config) -> String {
    format!("{}:control", cfg.redis.key_prefix)
}

/// Where workers record the version of `model` they swapped in last (the gateway's metadata
/// reads it).
pub fn serving_key(cfg: &Config, model: &str) -> String {
    format!("{}:serving:{model}", cfg.redis.key_prefix)
}

/// Where the workers report on push `id`.
pub fn report_key(cfg: &Config, id: &str) -> String {
    format!("{}:push:{id}", cfg.redis.key_prefix)
}

/// Writes `push` to the control topic (acknowledged), then announces it on Redis.
pub async fn publish(
    producer: &AsyncProducer,
    redis: &mut redis::aio::ConnectionManager,
    deployment: &Deployment,
    push: &ModelPush,
) -> Result<(), PushError> {
    use redis::AsyncCommands;
    write(producer, deployment, push).await?;
    let _: i64 = redis.publish(channel(&deployment.config), &push.id).await?;
    Ok(())
}

async fn write(
    producer: &AsyncProducer,
    deployment: &Deployment,
    push: &ModelPush,
) -> Result<(), PushError> {
    let payload = serde_json::to_vec(push).map_err(|e| PushError::Produce(e.to_string()))?;
    producer
        .send(
            FutureRecord::to(&deployment.topics.control())
                .key(&push.model)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| PushError::Produce(e.to_string()))
}

/// Waits up to `within` for workers' reports on push `id`: returns them by worker once at least
/// one arrived and no new one came for `settle` (empty when none came).
pub async fn reports(
    redis: &mut redis::aio::ConnectionManager,
    cfg: &Config,
    id: &str,
    within: Duration,
    settle: Duration,
) -> Result<BTreeMap<String, PushReport>, PushError> {
    use redis::AsyncCommands;
    let key = report_key(cfg, id);
    let end = tokio::time::Instant::now() + within;
    let mut last_count = 0;
    let mut last_change = tokio::time::Instant::now();
    loop {
        let raw: BTreeMap<String, String> = redis.hgetall(&key).await?;
        let now = tokio::time::Instant::now();
        if raw.len() != last_count {
            last_count = raw.len();
            last_change = now;
        }
        if (last_count > 0 && now - last_change >= settle) || now >= end {
            return Ok(raw
                .into_iter()
                .filter_map(|(w, v)| Some((w, serde_json::from_str(&v).ok()?)))
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every push on the control topic so far, oldest first, and the offset after the last (where
/// a follower goes on). Blocking; call it off the async runtime.
pub fn read_all(
    cfg: &Config,
    topic: &str,
) -> Result<(Vec<ModelPush>, i64), rdkafka::error::KafkaError> {
    read_from(cfg, topic, None)
}

/// The pushes from offset `from` (the start when `None`) to the topic's end, and the offset
/// after the last. A short-lived reader: nothing stays connected between reads. Blocking.
pub fn read_from(
    cfg: &Config,
    topic: &str,
    from: Option<i64>,
) -> Result<(Vec<ModelPush>, i64), rdkafka::error::KafkaError> {
    let client = format!("sluice-control-{}", std::process::id());
    let consumer: BaseConsumer = crate::kafka::reader_config(cfg, &client).create()?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let low = from.map_or(low, |f| f.max(low));
    let mut pushes = Vec::new();
    if high <= low {
        return Ok((pushes, high.max(low)));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut next = low;
    while next < high && std::time::Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        next = msg.offset() + 1;
        match msg.payload().map(serde_json::from_slice::<ModelPush>) {
            Some(Ok(p)) => pushes.push(p),
            _ => tracing::warn!(
                topic,
                offset = msg.offset(),
                "skipped a control record that is not a push"
            ),
        }
    }
    Ok((pushes, next))
}

/// The newest push of each model in `pushes`.
pub fn newest(pushes: &[ModelPush]) -> BTreeMap<&str, &ModelPush> {
    let mut out = BTreeMap::new();
    for p in pushes {
        out.insert(p.model.as_str(), p);
    }
    out
}

/// Where a push's ONNX file comes from.
pub enum PushSource<'a> {
    /// The model's file as the config names it (reloaded from disk).
    Config,
    /// A file to copy into the model store.
    File(&'a std::path::Path),
    /// The file's bytes (the repository API's `file:` parameter).
    Bytes(&'a [u8]),
}

/// Why a model could not be pushed.
#[derive(Debug, thiserror::Error)]
pub enum PushRefused {
    /// No such model.
    #[error("unknown model '{0}'")]
    Unknown(String),
    /// The request cannot be served as asked.
    #[error("{0}")]
    Invalid(String),
    /// The broker or Redis failed.
    #[error(transparent)]
    Failed(#[from] PushError),
    /// The file could not be stored.
    #[error("storing the model file: {0}")]
    Store(#[from] std::io::Error),
}

/// Makes the push of `model` from `source` as `version` (default: one more than the newest
/// integer version seen, counted in Redis): stores the file, writes the control record.
pub async fn prepare_push(
    deployment: &Deployment,
    redis: &mut redis::aio::ConnectionManager,
    model: &str,
    source: PushSource<'_>,
    version: Option<String>,
) -> Result<ModelPush, PushRefused> {
    use redis::AsyncCommands;
    let cfg = &deployment.config;
    let m = deployment
        .model(model)
        .ok_or_else(|| PushRefused::Unknown(model.to_string()))?;
    let Some(configured) = m.onnx.clone() else {
        return Err(PushRefused::Invalid(format!(
            "'{model}' is a learner; its weights come from its learner, not from files"
        )));
    };
    let version = match version {
        Some(v)
            if !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
        {
            v
        }
        Some(v) => {
            return Err(PushRefused::Invalid(format!(
                "version '{v}': use letters, digits, '.', '_' and '-'"
            )));
        }
        None => {
            let base: i64 = m.version.parse().map_err(|_| {
                PushRefused::Invalid(format!(
                    "'{model}' has version '{}', not a number: give the new version",
                    m.version
                ))
            })?;
            let key = format!("{}:model-version:{model}", cfg.redis.key_prefix);
            let _: bool = redis.set_nx(&key, base).await.map_err(PushError::from)?;
            let next: i64 = redis.incr(&key, 1).await.map_err(PushError::from)?;
            next.to_string()
        }
    };
    let onnx = match source {
        PushSource::Config => configured,
        PushSource::File(path) => {
            let bytes = std::fs::read(path)?;
            store(cfg, model, &version, &bytes)?
        }
        PushSource::Bytes(bytes) => store(cfg, model, &version, bytes)?,
    };
    Ok(ModelPush {
        id: format!("{model}-{version}-{}", crate::now_ms()),
        model: model.to_string(),
        version,
        onnx: std::path::absolute(&onnx)?,
        time_ms: crate::now_ms(),
    })
}

/// Writes a pushed version's file into the model store; returns its path.
fn store(cfg: &Config, model: &str, version: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let dir = cfg.model_store.join(model);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{version}.onnx"));
    let partial = dir.join(format!(".{version}.onnx.partial"));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}
