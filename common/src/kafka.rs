//! Kafka client settings (low-latency defaults + user passthrough) and topic administration.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::Config;
use crate::producer::AsyncProducer;

/// The longest wait between attempts to reach a broker that is down (librdkafka's default, 10 s,
/// leaves a restarted broker unused for up to 10 s after it is back; a connection attempt a
/// second to a dead broker costs nothing that matters).
const RECONNECT_BACKOFF_MAX_MS: &str = "1000";

/// Producer settings: idempotent, acks=all, no Nagle, `linger` (0 on latency-critical paths);
/// then `kafka.client` and `kafka.producer` from the config.
pub fn producer_config(cfg: &Config, client_id: &str, linger: Duration) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", format!("{}", linger.as_secs_f64() * 1000.0))
        .set("socket.nagle.disable", "true")
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS)
        // A dead broker fails a request within its deadline instead of holding it for 5 minutes.
        .set("message.timeout.ms", "30000")
        .set("queue.buffering.max.messages", "100000")
        .set("queue.buffering.max.kbytes", "262144");
    apply(&mut c, &cfg.kafka.client);
    apply(&mut c, &cfg.kafka.producer);
    c
}

/// An [`AsyncProducer`] with [`producer_config`]'s settings.
pub fn producer(
    cfg: &Config,
    client_id: &str,
    linger: Duration,
) -> rdkafka::error::KafkaResult<AsyncProducer> {
    AsyncProducer::create(&producer_config(cfg, client_id, linger))
}

/// How long the broker may hold a reader's empty fetch, in ms. A group member keeps 500 ms:
/// partitions it is newly given wait for the fetch in flight to end before they are read.
const READER_FETCH_WAIT_MS: &str = "3000";

/// What every consumer shares: the brokers, its name, reading from the earliest record when it
/// has no position, offsets stored only by Sluice, and a fetch answered as soon as a byte is
/// there (no Nagle delay, short back-offs). The broker holds an empty fetch up to
/// `fetch.wait.max.ms` and answers the moment a record arrives, so a long wait costs no latency
/// and keeps an idle consumer's fetches few.
fn consumer_base(cfg: &Config, group: &str, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", client_id)
        .set("group.id", group)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("socket.nagle.disable", "true")
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS)
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", "500")
        .set("fetch.error.backoff.ms", "10")
        .set("fetch.queue.backoff.ms", "10");
    c
}

/// Consumer settings for a worker in `group`: at-least-once (auto-commit of *stored* offsets only),
/// cooperative-sticky rebalancing, a bounded prefetch queue, static membership when
/// `worker.instance` names the process; then `kafka.client` and `kafka.consumer`.
pub fn consumer_config(cfg: &Config, group: &str, client_id: &str) -> ClientConfig {
    let mut c = consumer_base(cfg, group, client_id);
    if let Some(instance) = &cfg.worker.instance {
        c.set("group.instance.id", static_member_id(group, instance));
    }
    c.set("enable.auto.commit", "true")
        // Offsets stored since the last commit go every 100 ms (only partitions whose stored
        // offset moved, so an idle worker commits nothing): a crashed worker's successor
        // re-runs at most ~100 ms of records.
        .set("auto.commit.interval.ms", "100")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("queued.max.messages.kbytes", "16384");
    apply(&mut c, &cfg.kafka.client);
    apply(&mut c, &cfg.kafka.consumer);
    c
}

/// A worker's `group.instance.id`: unique in its group, stable across its restarts.
pub fn static_member_id(group: &str, instance: &str) -> String {
    format!("{group}.{instance}")
}

/// Consumer settings for a reader that assigns itself partitions and keeps its own positions
/// (no group membership, no commits): a learner's inputs, a replica following weights, a
/// worker reading pushes. Its partitions are assigned once, so the broker may hold its empty
/// fetches longer (`READER_FETCH_WAIT_MS`): a record still ends the wait at once, and an idle
/// stack's broker answers a fraction of the fetches. `kafka.client` applies, `kafka.consumer`
/// (tuned for workers) does not.
pub fn reader_config(cfg: &Config, client_id: &str) -> ClientConfig {
    let group = format!("{}.reader", cfg.kafka.topic_prefix);
    let mut c = consumer_base(cfg, &group, client_id);
    c.set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", READER_FETCH_WAIT_MS);
    apply(&mut c, &cfg.kafka.client);
    c
}

/// Partition 0 of `topic`'s low and high watermarks, asked off the async runtime (librdkafka
/// blocks for the answer).
pub async fn watermarks<C>(
    consumer: &std::sync::Arc<C>,
    topic: &str,
) -> Result<(i64, i64), rdkafka::error::KafkaError>
where
    C: rdkafka::consumer::Consumer + Send + Sync + 'static,
{
    let (c, t) = (std::sync::Arc::clone(consumer), topic.to_string());
    tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, 0, Duration::from_secs(10)))
        .await
        .unwrap_or(Err(rdkafka::error::KafkaError::Canceled))
}

fn apply(c: &mut ClientConfig, overrides: &std::collections::BTreeMap<String, String>) {
    for (k, v) in overrides {
        c.set(k, v);
    }
}

pub use crate::topics::TopicSpec;

/// Whether a produce error leaves an idempotent producer unable to go on: librdkafka's fatal
/// error, or the broker no longer knowing or accepting its producer id and epoch (a broker
/// that lost its state in a restart). Such a producer must be replaced.
pub fn producer_is_dead(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::Fatal
                | C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::UnknownProducerId
                | C::OutOfOrderSequenceNumber
                | C::InvalidProducerIdMapping
        )
    )
}

/// Errors from topic administration.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// Existing topics disagree with the configured partition counts.
    #[error("partition counts differ: {0}")]
    Partitions(String),
    /// The broker could not be reached or refused the request.
    #[error("kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topic could not be created.
    #[error("creating topic {topic}: {code}")]
    Create {
        /// Topic name.
        topic: String,
        /// Broker error.
        code: RDKafkaErrorCode,
    },
}

/// What `apply_topics` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TopicReport {
    /// Topics created now.
    pub created: Vec<String>,
    /// Topics that were already there.
    pub existing: Vec<String>,
    /// Existing topics whose partition count differs from the config: (topic, has, wanted).
    pub mismatched: Vec<(String, i32, i32)>,
}

/// Admin client settings: the brokers, then `kafka.client` from the config.
pub fn admin_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers);
    apply(&mut c, &cfg.kafka.client);
    c
}

/// Creates the missing topics (idempotent: existing topics are left as they are).
pub async fn apply_topics(cfg: &Config, topics: &[TopicSpec]) -> Result<TopicReport, TopicError> {
    let admin: AdminClient<DefaultClientContext> = admin_config(cfg).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(cfg.kafka.replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut report = TopicReport::default();
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(topic) => report.created.push(topic),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => report.existing.push(topic),
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    // A graph's steps are keyed by request id: every topic must have the partitions configured.
    for t in topics.iter().filter(|t| report.existing.contains(&t.name)) {
        let md = admin
            .inner()
            .fetch_metadata(Some(&t.name), Duration::from_secs(10))?;
        if let Some(found) = md.topics().first() {
            let has = found.partitions().len() as i32;
            if has != t.partitions {
                report.mismatched.push((t.name.clone(), has, t.partitions));
            }
        }
    }
    Ok(report)
}

/// Fails, naming each topic, when existing topics have other partition counts than the config
/// (a graph's steps are keyed by request id, so their topics must agree).
pub fn check_partitions(report: &TopicReport) -> Result<(), TopicError> {
    if report.mismatched.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = report
        .mismatched
        .iter()
        .map(|(t, has, want)| format!("{t} has {has} partitions, the config says {want}"))
        .collect();
    Err(TopicError::Partitions(lines.join("; ")))
}

/// Kafka header names Sluice writes. The gateway names each request's reply route in headers too,
/// so a worker can answer even a record it cannot decode; dead letters carry their origin.
pub mod headers {
    /// `application/json` on request records written as Open Inference Protocol JSON (and on
    /// the result records answering them); Avro otherwise.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Request id (also the record key).
    pub const REQUEST_ID: &str = "sluice-request-id";
    /// Redis channel the waiting gateway listens on.
    pub const REPLY_CHANNEL: &str = "sluice-reply-channel";
    /// Redis key the result is stored under.
    pub const REPLY_KEY: &str = "sluice-reply-key";
    /// Dead letter: the topic the record came from.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
    /// Dead letter: its partition.
    pub const ORIGINAL_PARTITION: &str = "x-original-partition";
    /// Dead letter: its offset.
    pub const ORIGINAL_OFFSET: &str = "x-original-offset";
    /// Dead letter: the model whose worker rejected it.
    pub const MODEL: &str = "x-model";
    /// Dead letter: `undecodable`, `invalid_input` or `model_failed`.
    pub const ERROR_CLASS: &str = "x-error-class";
    /// Dead letter: the error message (at most 1 KiB).
    pub const ERROR_MESSAGE: &str = "x-error-message";
    /// Dead letter: the request id, when known.
    pub const DEAD_REQUEST_ID: &str = "x-request-id";

    /// Where a dead letter came from and why: the headers every dead letter carries (the
    /// message cut to 1 KiB; the request id when known).
    pub struct DeadLetterOrigin<'a> {
        /// The topic the record was read from.
        pub topic: &'a str,
        /// Its partition.
        pub partition: i32,
        /// Its offset.
        pub offset: i64,
        /// The model (or unit) that could not use it.
        pub model: &'a str,
        /// Why the record could not be used.
        pub class: sluice_schemas::ErrorCode,
        /// What went wrong (cut to 1 KiB in the header).
        pub message: &'a str,
        /// The request id, when known.
        pub request_id: Option<&'a str>,
    }

    /// The headers of a dead letter from `origin`.
    pub fn dead_letter(origin: &DeadLetterOrigin<'_>) -> rdkafka::message::OwnedHeaders {
        let (partition, offset) = (origin.partition.to_string(), origin.offset.to_string());
        let message: String = origin.message.chars().take(1024).collect();
        let mut pairs = vec![
            (ORIGINAL_TOPIC, origin.topic),
            (ORIGINAL_PARTITION, partition.as_str()),
            (ORIGINAL_OFFSET, offset.as_str()),
            (MODEL, origin.model),
            (ERROR_CLASS, origin.class.as_str()),
            (ERROR_MESSAGE, message.as_str()),
        ];
        if let Some(id) = origin.request_id {
            pairs.push((DEAD_REQUEST_ID, id));
        }
        build(&pairs)
    }

    /// Builds record headers from name/value pairs.
    pub fn build(pairs: &[(&str, &str)]) -> rdkafka::message::OwnedHeaders {
        pairs.iter().fold(
            rdkafka::message::OwnedHeaders::new_with_capacity(pairs.len()),
            |h, (key, value)| {
                h.insert(rdkafka::message::Header {
                    key,
                    value: Some(*value),
                })
            },
        )
    }
}
