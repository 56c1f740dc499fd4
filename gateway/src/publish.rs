//! Publishing a validated request: its reply route, the Avro record with the headers that name
//! the caller, and the produce to the servable's request topic with Kafka errors mapped to
//! HTTP answers.
//!
//! Two producers: a prompt one (no linger) while few requests are in flight, and one that lingers
//! `gateway.produce_linger` once `gateway.produce_linger_from` are, so a busy gateway sends fewer,
//! fuller produce requests (less broker and client CPU) without making a lone request wait
//! (librdkafka wakes a lingering producer with millisecond granularity: see docs/benchmarks.md).

use std::sync::RwLock;
use std::time::Duration;

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use sluice_common::Config;
use sluice_common::kafka::headers as kafka_headers;
use sluice_common::kafka::producer;
use sluice_common::producer::{AsyncProducer, FutureRecord};
use sluice_common::topics::Topics;
use sluice_schemas::{InferenceRequest, ReplyRoute, encode_request};
use tokio::time::Instant;

use crate::error::ApiError;

/// The gateway's producers: a prompt one, and one that lingers (none when `produce_linger` is 0).
#[derive(Clone)]
struct Producers {
    prompt: AsyncProducer,
    lingering: Option<AsyncProducer>,
}

impl Producers {
    fn create(cfg: &Config, client_id: &str) -> KafkaResult<Producers> {
        let prompt = producer(cfg, client_id, Duration::ZERO)?;
        let lingering = if cfg.gateway.produce_linger.is_zero() {
            None
        } else {
            let linger = cfg.gateway.produce_linger;
            Some(producer(cfg, &format!("{client_id}-linger"), linger)?)
        };
        Ok(Producers { prompt, lingering })
    }
}

/// Writes request records for one gateway instance.
pub struct Publisher {
    /// Replaced when a producer fails for good (an idempotent producer whose broker lost its
    /// state, e.g. a restarted in-memory broker, cannot go on).
    producers: RwLock<Producers>,
    cfg: Config,
    client_id: String,
    linger_from: usize,
    topics: Topics,
    reply_channel: String,
    result_key_prefix: String,
    result_ttl: Duration,
}

impl Publisher {
    /// A publisher for gateway `gateway_id`: a prompt producer, and a lingering one used once
    /// `gateway.produce_linger_from` requests are in flight; replies routed to the gateway's
    /// channel.
    pub fn new(cfg: &Config, gateway_id: &str) -> KafkaResult<Publisher> {
        let client_id = format!("sluice-gateway-{gateway_id}");
        Ok(Publisher {
            producers: RwLock::new(Producers::create(cfg, &client_id)?),
            cfg: cfg.clone(),
            client_id,
            linger_from: cfg.gateway.produce_linger_from,
            topics: sluice_common::topics::Topics::new(&cfg.kafka.topic_prefix),
            reply_channel: cfg.reply_channel(gateway_id),
            result_key_prefix: cfg.result_key(""),
            result_ttl: cfg.redis.result_ttl,
        })
    }

    fn current(&self) -> Producers {
        self.producers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The prompt producer (for health probes).
    pub fn producer(&self) -> AsyncProducer {
        self.current().prompt
    }

    /// Waits up to `timeout` for records still queued in either producer.
    pub fn flush(&self, timeout: Duration) {
        let p = self.current();
        for p in std::iter::once(&p.prompt).chain(&p.lingering) {
            let _ = p.flush(timeout);
        }
    }

    /// The producer for a request arriving with `in_flight` requests in flight (itself included).
    fn producer_for(&self, in_flight: usize) -> AsyncProducer {
        let p = self.current();
        match p.lingering {
            Some(l) if in_flight >= self.linger_from => l,
            _ => p.prompt,
        }
    }

    /// Replaces the producers after one failed for good; later requests use the new ones.
    fn replace_producers(&self) {
        match Producers::create(&self.cfg, &self.client_id) {
            Ok(fresh) => {
                *self.producers.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                tracing::warn!("the Kafka producer failed for good; replaced it");
            }
            Err(e) => tracing::error!(error = %e, "cannot replace the failed Kafka producer"),
        }
    }

    /// Where request `id`'s answer is published and stored. The stored result outlives the
    /// request's deadline (the gateway reads it one last time then), and at least
    /// `redis.result_ttl`.
    pub fn reply_route(&self, id: &str, timeout: Duration) -> ReplyRoute {
        ReplyRoute {
            channel: self.reply_channel.clone(),
            key: format!("{}{id}", self.result_key_prefix),
            ttl_ms: result_ttl(self.result_ttl, timeout).as_millis() as i64,
        }
    }

    /// Produces `request` to `servable`'s request topic, waiting at most until `deadline`;
    /// `in_flight` (requests in flight now) picks the producer.
    pub async fn publish(
        &self,
        servable: &str,
        request: &InferenceRequest,
        deadline: Instant,
        timeout: Duration,
        in_flight: usize,
    ) -> Result<(), ApiError> {
        let payload = encode_request(request).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut pairs = vec![(kafka_headers::REQUEST_ID, request.id.as_str())];
        if let Some(route) = &request.reply {
            pairs.push((kafka_headers::REPLY_CHANNEL, &route.channel));
            pairs.push((kafka_headers::REPLY_KEY, &route.key));
        }
        let headers = kafka_headers::build(&pairs);
        let topic = self.topics.requests(servable);
        let record = FutureRecord::to(&topic)
            .key(&request.id)
            .payload(&payload)
            .headers(headers);
        let remaining = deadline.saturating_duration_since(Instant::now());
        match self.producer_for(in_flight).send(record, remaining).await {
            Ok(_) => Ok(()),
            Err((e, _)) => {
                if sluice_common::kafka::producer_is_dead(&e) {
                    self.replace_producers();
                }
                Err(produce_error(e, Instant::now() >= deadline, timeout))
            }
        }
    }
}

/// How long a stored result must live: past the deadline, and at least the configured TTL.
fn result_ttl(configured: Duration, timeout: Duration) -> Duration {
    configured.max(timeout + Duration::from_secs(1))
}

/// The HTTP answer for a failed produce.
fn produce_error(e: KafkaError, past_deadline: bool, timeout: Duration) -> ApiError {
    match e {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) if past_deadline => {
            ApiError::DeadlineExceeded(timeout)
        }
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
            ApiError::Unavailable("the Kafka producer queue is full; retry later".into())
        }
        KafkaError::MessageProduction(code) => {
            ApiError::Unavailable(format!("could not publish the request to Kafka: {code}"))
        }
        other => ApiError::Unavailable(format!("could not publish the request to Kafka: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn a_stored_result_outlives_the_deadline() {
        let s = Duration::from_secs;
        assert_eq!(result_ttl(s(60), s(10)), s(60));
        assert_eq!(result_ttl(s(60), s(300)), s(301));
    }

    #[test]
    fn produce_errors_map_to_503_or_504() {
        let t = Duration::from_secs(1);
        let timed_out = || KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(
            produce_error(timed_out(), true, t).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            produce_error(timed_out(), false, t).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let full = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        let e = produce_error(full, false, t);
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.to_string().contains("queue is full"), "{e}");
    }
}
