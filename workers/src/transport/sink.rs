//! Delivering what a worker has to say about each record to Kafka: the result on its result
//! topic, records for a graph's next steps, and dead letters; the Redis reply goes alongside
//! ([`crate::transport::reply`]).
//!
//! Produce errors are classified. Retriable ones (broker unreachable, leader moving, queue full)
//! are retried with backoff until the request's deadline (without one, until acknowledged: the
//! offset must not be committed before). Non-retriable ones (record too large, invalid topic,
//! authorization) are not retried: the record is dead-lettered and, for a request still on its way
//! through a graph, the caller gets an error reply, so one bad record never pins its partition.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::types::RDKafkaErrorCode;
use sluice_common::kafka::headers as h;
use sluice_common::producer::{AsyncProducer, FutureRecord};
use sluice_schemas::Deadline;
use sluice_schemas::ErrorCode;
use sluice_schemas::{InferenceResult, encode_request, encode_result};

use crate::pipeline::completion::{Completion, DeadLetter};
use crate::pipeline::flow::Outgoing;
use crate::telemetry::WorkerMetrics;
use crate::transport::reply::Replier;

/// How a failed produce is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceError {
    /// Worth retrying: the broker or the network may recover.
    Retriable,
    /// Will fail the same way every time.
    Fatal,
}

/// Classifies a produce error.
pub fn classify(e: &KafkaError) -> ProduceError {
    use RDKafkaErrorCode as C;
    let code = match e {
        KafkaError::MessageProduction(c) => *c,
        _ => return ProduceError::Retriable,
    };
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidRecord
        | C::InvalidTopic
        | C::UnknownTopic
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::PolicyViolation
        | C::InvalidRequiredAcks
        | C::UnsupportedForMessageFormat => ProduceError::Fatal,
        _ => ProduceError::Retriable,
    }
}

/// Ends the worker process: its idempotent producer has failed for good (librdkafka's fatal
/// error or a fenced producer, e.g. after the broker lost its producer state in a restart), so nothing more can be
/// delivered. Offsets of undelivered records were never stored, so a restarted worker (by
/// `sluice up`, or any supervisor) processes them again: at-least-once holds.
fn exit_on_fatal_producer(error: &KafkaError) -> ! {
    tracing::error!(%error, "the Kafka producer failed for good; the worker exits to be restarted");
    // `_exit`, not `exit`: exit handlers (ONNX Runtime's among them) would run while librdkafka
    // and inference threads still use what they tear down.
    #[allow(unsafe_code)]
    // SAFETY: `_exit` ends the process at once and touches no Rust state.
    unsafe {
        libc::_exit(70)
    }
}

/// A result that could not be written for good: its completion, request id, topic and why.
type UnwrittenResult<'c> = (&'c Completion, String, String, NotWritten);

/// The Avro bytes of a completion's result (`None` when it has none, or it does not encode).
fn encode_result_of(c: &Completion) -> Option<Vec<u8>> {
    let r = c.result.as_ref()?;
    encode_result(r)
        .map_err(|e| tracing::error!(id = %r.id, error = %e, "cannot encode result"))
        .ok()
}

/// Why a record was not written.
#[derive(Debug)]
struct NotWritten {
    error: KafkaError,
    class: ProduceError,
}

/// The sink's producers.
pub struct Producers {
    /// Results and dead letters (off the caller's path: a longer linger).
    pub results: AsyncProducer,
    /// Records for a graph's next steps (on the caller's path: a short linger).
    pub forwards: AsyncProducer,
}

/// What the sink names.
pub struct SinkNames {
    /// Where plain results go.
    pub result_topic: String,
    /// Where dead letters go.
    pub dead_letter_topic: String,
    /// The unit (dead letters' `x-model`).
    pub unit: String,
    /// The worker's topics, by index.
    pub topics: std::sync::Arc<Vec<String>>,
}

/// Writes results, next-step records and dead letters.
#[derive(Clone)]
pub struct Sink {
    producer: AsyncProducer,
    forward_producer: AsyncProducer,
    replier: Replier,
    result_topic: String,
    dead_letter_topic: String,
    unit: String,
    /// The worker's topics, by index (where a record came from).
    topics: std::sync::Arc<Vec<String>>,
    metrics: std::sync::Arc<WorkerMetrics>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Dead letters keep at most this much of the original payload when the whole is too large.
const DEAD_LETTER_HEAD: usize = 64 * 1024;

impl Sink {
    /// A sink producing results and dead letters with `producers.results`, and records for a
    /// graph's next steps (on the caller's path, so with a shorter linger) with
    /// `producers.forwards`.
    pub fn new(
        producers: Producers,
        replier: Replier,
        names: SinkNames,
        metrics: std::sync::Arc<WorkerMetrics>,
    ) -> Sink {
        Sink {
            producer: producers.results,
            forward_producer: producers.forwards,
            replier,
            result_topic: names.result_topic,
            dead_letter_topic: names.dead_letter_topic,
            unit: names.unit,
            topics: names.topics,
            metrics,
        }
    }

    /// Delivers a batch of completions: Kafka records and Redis replies together. A record that
    /// cannot be written for good is dead-lettered, and its caller answered with the error.
    pub async fn deliver(&self, items: &[Completion]) {
        let encoded: Vec<Option<Vec<u8>>> = items.iter().map(encode_result_of).collect();
        let kafka = async {
            let results = items
                .iter()
                .zip(&encoded)
                .map(|(c, avro)| self.write_result(c, avro.as_deref()));
            let forwards = items
                .iter()
                .flat_map(|c| c.forwards.iter().map(move |o| self.forward(c, o)));
            let dead = items.iter().filter_map(|c| {
                let d = c.dead_letter.as_ref()?;
                Some(self.dead_letter(d, c.result.as_ref().map(|r| r.id.as_str())))
            });
            let (results, next, _) =
                tokio::join!(join_all(results), join_all(forwards), join_all(dead));
            (results, next)
        };
        let replies = self.replier.reply_all(items, &encoded);
        let ((results, next), ()) = tokio::join!(kafka, replies);
        self.undeliverable(results, next).await;
    }

    /// Writes `c`'s result (Avro, or the OIP JSON a JSON request asked for) to its result
    /// topic; the failure, if it could not be written for good.
    async fn write_result<'c>(
        &self,
        c: &'c Completion,
        avro: Option<&[u8]>,
    ) -> Option<UnwrittenResult<'c>> {
        let (Some(r), Some(avro)) = (c.result.as_ref(), avro) else {
            return None;
        };
        let json;
        let (bytes, headers) = if c.json_result {
            json = sluice_schemas::oip::result_to_json(r);
            (
                json.as_slice(),
                h::build(&[(h::CONTENT_TYPE, "application/json")]),
            )
        } else {
            (avro, OwnedHeaders::new())
        };
        let topic = c.result_topic.as_deref().unwrap_or(&self.result_topic);
        let key = Some(r.id.as_bytes());
        let sent = self
            .produce(&self.producer, topic, key, bytes, headers, c.deadline)
            .await;
        sent.err().map(|e| (c, r.id.clone(), topic.to_string(), e))
    }

    /// Passes a request on to its next step; the failure, if it could not be written for good.
    async fn forward<'c>(
        &self,
        c: &'c Completion,
        o: &'c Outgoing,
    ) -> Option<(&'c Completion, &'c Outgoing, NotWritten)> {
        let bytes = match encode_request(&o.request) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(id = %o.request.id, error = %e, "cannot encode request");
                return None;
            }
        };
        let key = Some(o.request.id.as_bytes());
        let sent = self
            .produce(
                &self.forward_producer,
                &o.topic,
                key,
                &bytes,
                OwnedHeaders::new(),
                o.request.deadline,
            )
            .await;
        sent.err().map(|e| (c, o, e))
    }

    /// Records that could not be written for good: dead letters, and errors for callers of
    /// requests that can no longer reach their next step.
    async fn undeliverable(
        &self,
        results: Vec<Option<UnwrittenResult<'_>>>,
        next: Vec<Option<(&Completion, &Outgoing, NotWritten)>>,
    ) {
        for (c, id, topic, e) in results.into_iter().flatten() {
            let message = format!("the result could not be written to '{topic}': {}", e.error);
            let d = self.produce_dead_letter(c, &id, message);
            self.dead_letter(&d, Some(&id)).await;
        }
        let mut answers = Vec::new();
        for (c, o, e) in next.into_iter().flatten() {
            let message = format!(
                "the request could not be passed on to '{}': {}",
                o.topic, e.error
            );
            let d = self.produce_dead_letter(c, &o.request.id, message.clone());
            self.dead_letter(&d, Some(&o.request.id)).await;
            if e.class == ProduceError::Fatal {
                answers.push(Completion {
                    source: c.source,
                    result: Some(InferenceResult::failure(
                        &o.request,
                        ErrorCode::ProduceFailed,
                        message,
                    )),
                    result_topic: c.result_topic.clone(),
                    json_result: c.json_result,
                    reply: o.request.reply.clone(),
                    deadline: o.request.deadline,
                    ..Default::default()
                });
            }
        }
        if !answers.is_empty() {
            Box::pin(self.deliver(&answers)).await;
        }
    }

    /// The dead letter of a record that could not be written (the destination is in `message`).
    fn produce_dead_letter(&self, c: &Completion, id: &str, message: String) -> DeadLetter {
        let from = self.topics.get(c.source.topic_index).cloned();
        DeadLetter {
            key: Some(id.as_bytes().to_vec()),
            payload: Vec::new(),
            topic: from.unwrap_or_default(),
            partition: c.source.partition,
            offset: c.source.offset,
            class: ErrorCode::ProduceFailed,
            message,
        }
    }

    /// Produces one record: retriable errors are retried with backoff until `deadline`
    /// (0: until acknowledged), fatal ones returned at once. Returns the partition written.
    async fn produce(
        &self,
        producer: &AsyncProducer,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
        deadline: Option<Deadline>,
    ) -> Result<i32, NotWritten> {
        let mut backoff = Duration::from_millis(20);
        loop {
            let mut record = FutureRecord::to(topic)
                .payload(payload)
                .headers(headers.clone());
            if let Some(k) = key {
                record = record.key(k);
            }
            let error = match producer.send(record, Duration::from_secs(5)).await {
                Ok(delivered) => return Ok(delivered.partition),
                Err((e, _)) => e,
            };
            if sluice_common::kafka::producer_is_dead(&error) {
                exit_on_fatal_producer(&error);
            }
            let class = classify(&error);
            if class == ProduceError::Fatal {
                self.metrics.produce_failures.increment(1);
                tracing::error!(%topic, %error, "produce failed for good");
                return Err(NotWritten { error, class });
            }
            if deadline.is_some_and(Deadline::passed) {
                self.metrics.produce_failures.increment(1);
                tracing::warn!(%topic, %error, "produce failed until the request's deadline passed");
                return Err(NotWritten { error, class });
            }
            self.metrics.produce_retries.increment(1);
            tracing::warn!(%topic, %error, "produce failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Writes a dead letter, retrying until acknowledged: it is the last record of what went
    /// wrong. One too large goes without the tail of its payload.
    async fn dead_letter(&self, d: &DeadLetter, request_id: Option<&str>) {
        let headers = h::dead_letter(&h::DeadLetterOrigin {
            topic: &d.topic,
            partition: d.partition,
            offset: d.offset,
            model: &self.unit,
            class: d.class,
            message: &d.message,
            request_id,
        });
        self.metrics.dead_letter(d.class);
        tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, class = %d.class, error = %d.message, "dead-lettered");
        let key = d.key.as_deref();
        let mut payload: &[u8] = &d.payload;
        loop {
            match self
                .produce(
                    &self.producer,
                    &self.dead_letter_topic,
                    key,
                    payload,
                    headers.clone(),
                    None,
                )
                .await
            {
                Ok(_) => return,
                Err(_) if payload.len() > DEAD_LETTER_HEAD => {
                    payload = &payload[..DEAD_LETTER_HEAD]
                }
                Err(e) => {
                    tracing::error!(error = %e.error, "dead letter could not be written; it is only in this log");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_invalid_topic_and_authorization_are_fatal() {
        let fatal = |c| classify(&KafkaError::MessageProduction(c));
        use RDKafkaErrorCode as C;
        for c in [
            C::MessageSizeTooLarge,
            C::InvalidTopic,
            C::UnknownTopic,
            C::TopicAuthorizationFailed,
        ] {
            assert_eq!(fatal(c), ProduceError::Fatal, "{c:?}");
        }
        for c in [
            C::QueueFull,
            C::MessageTimedOut,
            C::NotLeaderForPartition,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
        ] {
            assert_eq!(fatal(c), ProduceError::Retriable, "{c:?}");
        }
        assert_eq!(
            classify(&KafkaError::Canceled),
            ProduceError::Retriable,
            "anything else is worth another try"
        );
    }
}
