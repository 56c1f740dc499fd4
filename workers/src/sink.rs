//! Delivering what a worker has to say about each record: the result on the model's result topic,
//! the reply through Redis (SET with TTL, then PUBLISH), and dead-letter records.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::aio::ConnectionManager;
use sluice_common::kafka::headers as h;
use sluice_common::now_ms;
use sluice_schemas::{InferenceResult, ReplyRoute, encode_request, encode_result};

use crate::flow::Outgoing;
use crate::offsets::Source;

/// A record no step could process, with where it came from and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original payload.
    pub payload: Vec<u8>,
    /// Original topic.
    pub topic: String,
    /// Original partition.
    pub partition: i32,
    /// Original offset.
    pub offset: i64,
    /// Error class: `undecodable`, `invalid_input`, `model_failed`.
    pub class: &'static str,
    /// Error message.
    pub message: String,
}

/// Everything to deliver for one consumed record before its offset may be committed.
#[derive(Debug, Default)]
pub struct Completion {
    /// The consumed record.
    pub source: Source,
    /// The result to publish: a model's answer, a graph's answer (or error), a shadow
    /// comparison. Absent for records too broken to name a request id and for graph records
    /// that move on to a next step.
    pub result: Option<InferenceResult>,
    /// Where the result goes; `None`: the model's result topic.
    pub result_topic: Option<String>,
    /// Write the result record as Open Inference Protocol JSON (the request came as JSON).
    pub json_result: bool,
    /// Records for the next steps of a graph.
    pub forwards: Vec<Outgoing>,
    /// Where the waiting caller listens.
    pub reply: Option<ReplyRoute>,
    /// Request deadline (epoch ms, 0 = none): replies are retried until then.
    pub deadline_ms: i64,
    /// A dead-letter record to write.
    pub dead_letter: Option<DeadLetter>,
}

/// Writes results, replies and dead letters.
#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
    forward_producer: FutureProducer,
    redis: ConnectionManager,
    result_topic: String,
    dead_letter_topic: String,
    model: String,
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Sink {
    /// A sink producing results and dead letters with `producer`, and records for a graph's next
    /// steps (on the caller's path, so with a shorter linger) with `forward_producer`.
    pub fn new(
        producer: FutureProducer,
        forward_producer: FutureProducer,
        redis: ConnectionManager,
        result_topic: String,
        dead_letter_topic: String,
        model: String,
    ) -> Sink {
        Sink {
            producer,
            forward_producer,
            redis,
            result_topic,
            dead_letter_topic,
            model,
        }
    }

    /// Delivers a batch of completions. Kafka writes are retried until acknowledged (the offsets
    /// must not be committed before); Redis replies are retried until the request's deadline.
    pub async fn deliver(&self, items: &[Completion]) {
        let encoded: Vec<Option<Vec<u8>>> = items
            .iter()
            .map(|c| {
                c.result.as_ref().and_then(|r| match encode_result(r) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::error!(id = %r.id, error = %e, "cannot encode result");
                        None
                    }
                })
            })
            .collect();
        let json: Vec<Option<Vec<u8>>> = items
            .iter()
            .map(|c| {
                c.result
                    .as_ref()
                    .filter(|_| c.json_result)
                    .map(sluice_schemas::oip::result_to_json)
            })
            .collect();
        let forwards: Vec<(&Outgoing, Vec<u8>)> = items
            .iter()
            .flat_map(|c| &c.forwards)
            .filter_map(|o| match encode_request(&o.request) {
                Ok(b) => Some((o, b)),
                Err(e) => {
                    tracing::error!(id = %o.request.id, error = %e, "cannot encode request");
                    None
                }
            })
            .collect();
        let kafka = async {
            let results =
                items
                    .iter()
                    .zip(encoded.iter().zip(&json))
                    .filter_map(|(c, (avro, json))| {
                        let r = c.result.as_ref()?;
                        let (bytes, headers) = match json {
                            Some(j) => (j, h::build(&[(h::CONTENT_TYPE, "application/json")])),
                            None => (avro.as_ref()?, OwnedHeaders::new()),
                        };
                        let topic = c.result_topic.as_deref().unwrap_or(&self.result_topic);
                        Some(self.produce_until_acked(topic, Some(r.id.as_bytes()), bytes, headers))
                    });
            let next = forwards.iter().map(|(o, bytes)| {
                self.produce_until_acked_with(
                    &self.forward_producer,
                    &o.topic,
                    Some(o.request.id.as_bytes()),
                    bytes,
                    OwnedHeaders::new(),
                )
            });
            let dead = items.iter().filter_map(|c| {
                let d = c.dead_letter.as_ref()?;
                Some(self.dead_letter(d, c.result.as_ref().map(|r| r.id.as_str())))
            });
            tokio::join!(join_all(results), join_all(next), join_all(dead));
        };
        let replies = self.reply_all(items, &encoded);
        tokio::join!(kafka, replies);
    }

    /// Writes an empty nudge record to `partition` of `topic` (see
    /// [`sluice_common::kafka::headers::NUDGE`]); best effort.
    pub async fn nudge(&self, topic: &str, partition: i32) {
        let headers = h::build(&[(h::NUDGE, "1")]);
        let empty: &[u8] = &[];
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .partition(partition)
            .payload(empty)
            .headers(headers);
        if let Err((e, _)) = self
            .forward_producer
            .send(record, Duration::from_secs(1))
            .await
        {
            tracing::debug!(%topic, partition, error = %e, "nudge not written");
        }
    }

    async fn produce_until_acked(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) {
        self.produce_until_acked_with(&self.producer, topic, key, payload, headers)
            .await
    }

    async fn produce_until_acked_with(
        &self,
        producer: &FutureProducer,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) {
        let mut backoff = Duration::from_millis(20);
        loop {
            let mut record = FutureRecord::to(topic)
                .payload(payload)
                .headers(headers.clone());
            if let Some(k) = key {
                record = record.key(k);
            }
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => return,
                Err((e, _)) => {
                    metrics::counter!("sluice_worker_produce_retries_total", "model" => self.model.clone()).increment(1);
                    tracing::warn!(%topic, error = %e, "produce failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn dead_letter(&self, d: &DeadLetter, request_id: Option<&str>) {
        let partition = d.partition.to_string();
        let offset = d.offset.to_string();
        let message: String = d.message.chars().take(1024).collect();
        let mut pairs = vec![
            (h::ORIGINAL_TOPIC, d.topic.as_str()),
            (h::ORIGINAL_PARTITION, partition.as_str()),
            (h::ORIGINAL_OFFSET, offset.as_str()),
            (h::MODEL, self.model.as_str()),
            (h::ERROR_CLASS, d.class),
            (h::ERROR_MESSAGE, message.as_str()),
        ];
        if let Some(id) = request_id {
            pairs.push((h::DEAD_REQUEST_ID, id));
        }
        let headers = h::build(&pairs);
        metrics::counter!("sluice_worker_dead_letters_total", "model" => self.model.clone(), "class" => d.class).increment(1);
        tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, class = d.class, error = %d.message, "dead-lettered");
        self.produce_until_acked(
            &self.dead_letter_topic,
            d.key.as_deref(),
            &d.payload,
            headers,
        )
        .await;
    }

    async fn reply_all(&self, items: &[Completion], encoded: &[Option<Vec<u8>>]) {
        let mut pipe = redis::pipe();
        let mut latest_deadline = 0;
        let mut any = false;
        for (c, bytes) in items.iter().zip(encoded) {
            let (Some(route), Some(bytes)) = (&c.reply, bytes) else {
                continue;
            };
            pipe.cmd("SET")
                .arg(&route.key)
                .arg(bytes.as_slice())
                .arg("PX")
                .arg(route.ttl_ms.max(1000))
                .ignore();
            pipe.cmd("PUBLISH")
                .arg(&route.channel)
                .arg(bytes.as_slice())
                .ignore();
            latest_deadline = latest_deadline.max(c.deadline_ms);
            any = true;
        }
        if !any {
            return;
        }
        let mut backoff = Duration::from_millis(10);
        loop {
            let mut conn = self.redis.clone();
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => return,
                Err(e) => {
                    if latest_deadline != 0 && now_ms() >= latest_deadline {
                        metrics::counter!("sluice_worker_replies_dropped_total", "model" => self.model.clone()).increment(1);
                        tracing::warn!(error = %e, "redis reply failed past every deadline; results stay on the result topic");
                        return;
                    }
                    tracing::warn!(error = %e, "redis reply failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
