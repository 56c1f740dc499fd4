//! An async Kafka producer whose event thread sleeps while nothing happens.
//!
//! rdkafka's `FutureProducer` serves its delivery reports from a thread that polls in 100 ms
//! waits and hands librdkafka the remaining time in whole milliseconds, so each wait ends with
//! up to a millisecond of spinning: about 1% of a core per idle producer (measured with `perf`
//! on that thread; docs/benchmarks.md, Idle). [`AsyncProducer`] is the same send-and-await
//! interface over a `BaseProducer` whose thread waits five seconds at a time: a delivery report
//! still wakes it at once, and the spin at the end of a wait costs a five-thousandth of the time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage, Timestamp, ToBytes};
use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::util::Timeout;
use tokio::sync::oneshot;

pub use rdkafka::producer::FutureRecord;

/// How long the event thread waits for a delivery report before checking whether to stop.
const EVENT_WAIT: Duration = Duration::from_secs(5);
/// How long a send waits before trying again when librdkafka's queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(10);

/// Where a delivery report goes: the send awaiting it.
type Reply = Box<oneshot::Sender<OwnedDeliveryResult>>;

/// Passes each delivery report to the send that is awaiting it.
struct DeliveryContext;

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Reply;

    fn delivery(&self, result: &DeliveryResult<'_>, reply: Self::DeliveryOpaque) {
        let owned = match result {
            Ok(m) => Ok(Delivery {
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp(),
            }),
            Err((e, m)) => Err((e.clone(), m.detach())),
        };
        // The awaiting send may have been dropped (its caller gave up): nothing to tell.
        let _ = reply.send(owned);
    }
}

/// Stops the event thread when the last clone of its producer goes.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A Kafka producer whose `send` resolves when the broker acknowledges the record (or refuses
/// it). Cheap to clone; the clones share one librdkafka producer.
#[derive(Clone)]
pub struct AsyncProducer {
    base: Arc<BaseProducer<DeliveryContext>>,
    _stop: Arc<StopOnDrop>,
}

impl AsyncProducer {
    /// Creates the producer from `config` and starts its event thread.
    pub fn create(config: &ClientConfig) -> KafkaResult<Self> {
        let base: Arc<BaseProducer<DeliveryContext>> =
            Arc::new(config.create_with_context(DeliveryContext)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (events, stopped) = (Arc::clone(&base), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("kafka-deliveries".into())
            .spawn(move || serve_deliveries(&events, &stopped))
            .map_err(|e| KafkaError::ClientCreation(format!("delivery thread: {e}")))?;
        Ok(Self {
            base,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    /// Sends `record` and waits for its acknowledgement. While librdkafka's queue is full the
    /// send is retried until `queue_timeout` has passed; then the queue-full error is returned.
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let started = Instant::now();
        let (reply, delivered) = oneshot::channel();
        let mut base = base_record(record, Box::new(reply));
        loop {
            match self.base.send(base) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < queue_timeout =>
                {
                    base = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((e, back)) => return Err((e, unsent(back))),
            }
        }
        match delivered.await {
            Ok(result) => result,
            // librdkafka destroyed the report without calling back: nothing is known of it.
            Err(_) => {
                let unknown = OwnedMessage::new(
                    None,
                    None,
                    String::new(),
                    Timestamp::NotAvailable,
                    -1,
                    -1,
                    None,
                );
                Err((KafkaError::Canceled, unknown))
            }
        }
    }

    /// Waits up to `timeout` for every record sent so far to be acknowledged.
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.base.flush(timeout)
    }

    /// Whether the brokers answer a metadata request for `topic` within `timeout` (blocks the
    /// calling thread).
    pub fn broker_answers(&self, topic: &str, timeout: Duration) -> bool {
        self.base
            .client()
            .fetch_metadata(Some(topic), timeout)
            .is_ok()
    }
}

/// The event thread: serves delivery reports until its producer's last clone is dropped, then
/// drops its share of the librdkafka producer (which flushes what is left for 500 ms).
fn serve_deliveries(base: &BaseProducer<DeliveryContext>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        base.poll(Timeout::After(EVENT_WAIT));
    }
}

/// `r` with `reply` as its delivery opaque.
fn base_record<'a, K, P>(r: FutureRecord<'a, K, P>, reply: Reply) -> BaseRecord<'a, K, P, Reply>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    BaseRecord {
        topic: r.topic,
        partition: r.partition,
        payload: r.payload,
        key: r.key,
        timestamp: r.timestamp,
        headers: r.headers,
        delivery_opaque: reply,
    }
}

/// The record librdkafka refused, as an owned message for the caller's error.
fn unsent<K, P>(r: BaseRecord<'_, K, P, Reply>) -> OwnedMessage
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    OwnedMessage::new(
        r.payload.map(|p| p.to_bytes().to_vec()),
        r.key.map(|k| k.to_bytes().to_vec()),
        r.topic.to_owned(),
        r.timestamp
            .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
        r.partition.unwrap_or(-1),
        -1,
        r.headers,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A producer whose broker never answers (nothing listens on port 1).
    fn unreachable(extra: &[(&str, &str)]) -> AsyncProducer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", "300");
        for (k, v) in extra {
            c.set(*k, *v);
        }
        AsyncProducer::create(&c).unwrap()
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_delivered_resolves_its_send_with_the_error() {
        let p = unreachable(&[]);
        let record = FutureRecord::<str, str>::to("t").payload("x");
        // Without a thread serving delivery reports the send would never resolve.
        let sent = tokio::time::timeout(Duration::from_secs(10), p.send(record, Duration::ZERO));
        let (e, message) = sent.await.expect("the send resolves").unwrap_err();
        assert_eq!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::MessageTimedOut)
        );
        assert_eq!(message.payload(), Some(&b"x"[..]));
    }

    #[tokio::test]
    async fn a_full_queue_is_retried_until_the_queue_timeout_then_reported() {
        let p = unreachable(&[("queue.buffering.max.messages", "1")]);
        // The first record fills the queue until its 300 ms message timeout.
        let first = tokio::spawn({
            let p = p.clone();
            async move {
                let record = FutureRecord::<str, str>::to("t").payload("a");
                p.send(record, Duration::ZERO).await.is_err()
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let second = p
            .send(
                FutureRecord::<str, str>::to("t").payload("b"),
                Duration::from_millis(50),
            )
            .await;
        let (e, message) = second.unwrap_err();
        assert_eq!(
            e,
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        );
        assert_eq!(message.payload(), Some(&b"b"[..]));
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "gave up before its queue timeout"
        );
        assert!(
            first.await.unwrap(),
            "the first record cannot have been delivered"
        );
    }
}
