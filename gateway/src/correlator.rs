//! Matches results arriving on this gateway's Redis reply channel with the callers waiting for them.
//!
//! The gateway subscribes once, before it produces anything. A worker stores each result under its
//! key (with a TTL) and then publishes it on the channel. Each waiting caller holds a
//! [`PendingReply`]; a result for an id nobody waits for (a duplicate from an at-least-once
//! redelivery, or one that came after its deadline) is ignored. If the subscription drops, every
//! waiter's key is read once after re-subscribing, so a publish missed in the gap is not lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use sluice_schemas::{InferenceResult, decode_result};
use tokio::sync::oneshot;

type Waiters = HashMap<String, oneshot::Sender<InferenceResult>>;

/// The reply side of request/response over Kafka.
pub struct Correlator {
    waiters: Mutex<Waiters>,
    /// Set when the gateway's drain ends: callers still waiting are answered at once.
    closing: tokio::sync::watch::Sender<bool>,
    subscribed: AtomicBool,
    redis: ConnectionManager,
    key_of: Box<dyn Fn(&str) -> String + Send + Sync>,
    unmatched: metrics::Counter,
}

/// A caller's claim on the result for one request id; dropping it stops waiting.
pub struct PendingReply {
    id: String,
    rx: Option<oneshot::Receiver<InferenceResult>>,
    correlator: Arc<Correlator>,
}

fn lock(m: &Mutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
    // A panic while holding this lock cannot leave the map half-updated (single insert/remove).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Correlator {
    /// Subscribes to `channel` and starts delivering results. Returns once the first subscription
    /// is confirmed, so nothing produced afterwards can be answered unseen.
    pub async fn start(
        client: redis::Client,
        channel: String,
        redis: ConnectionManager,
        key_of: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> redis::RedisResult<Arc<Correlator>> {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&channel).await?;
        let c = Arc::new(Correlator {
            waiters: Mutex::new(HashMap::new()),
            closing: tokio::sync::watch::Sender::new(false),
            subscribed: AtomicBool::new(true),
            redis,
            key_of: Box::new(key_of),
            unmatched: metrics::counter!("sluice_gateway_unmatched_replies_total"),
        });
        tokio::spawn(listen(Arc::clone(&c), client, channel, pubsub));
        Ok(c)
    }

    /// Whether the reply subscription is live.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// Ends every wait now and from now on (the gateway's drain is over): each caller gets
    /// [`Unanswered::ShuttingDown`] unless its result is already stored.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Number of callers waiting.
    pub fn waiting(&self) -> usize {
        lock(&self.waiters).len()
    }

    /// Registers interest in `id`; do this before producing the request.
    pub fn register(self: &Arc<Self>, id: &str) -> PendingReply {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id.to_string(), tx);
        PendingReply {
            id: id.to_string(),
            rx: Some(rx),
            correlator: Arc::clone(self),
        }
    }

    fn deliver(&self, result: InferenceResult) {
        let tx = lock(&self.waiters).remove(&result.id);
        match tx {
            Some(tx) => {
                // The receiver may have gone (caller gave up) between remove and send: fine.
                let _ = tx.send(result);
            }
            None => {
                self.unmatched.increment(1);
                tracing::debug!(id = %result.id, "reply for a request nobody waits for (duplicate or late)");
            }
        }
    }

    /// Reads a stored result directly (the fallback for a missed publish).
    pub async fn fetch_stored(&self, id: &str) -> Option<InferenceResult> {
        self.read_stored(id).await.ok().flatten()
    }

    /// The result stored for `id`, if any; an error when Redis did not answer.
    async fn read_stored(&self, id: &str) -> redis::RedisResult<Option<InferenceResult>> {
        let mut conn = self.redis.clone();
        let bytes: Option<Vec<u8>> = conn.get((self.key_of)(id)).await?;
        Ok(bytes.and_then(|b| decode_result(&b).ok()))
    }

    /// After re-subscribing: reads every waiter's key once, so a result published while the
    /// subscription was down is delivered now, not at its caller's deadline. The shared
    /// connection may still be reconnecting (its first commands after a Redis restart fail), so
    /// a read that errs is tried again for a while.
    async fn recover_missed(&self) {
        let ids: Vec<String> = lock(&self.waiters).keys().cloned().collect();
        let mut recovered = 0usize;
        for id in ids {
            let mut backoff = Duration::from_millis(20);
            for _ in 0..RECOVER_ATTEMPTS {
                match self.read_stored(&id).await {
                    Ok(Some(result)) => {
                        self.deliver(result);
                        recovered += 1;
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "reading a missed reply failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            }
        }
        tracing::info!(
            recovered,
            "replies missed while unsubscribed read from their keys"
        );
    }
}

/// How often [`Correlator::recover_missed`] tries one key while Redis does not answer (about
/// 5 s in all).
const RECOVER_ATTEMPTS: usize = 14;

/// Why a caller got no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The request's deadline passed.
    Deadline,
    /// The gateway is shutting down and its drain is over.
    ShuttingDown,
}

impl PendingReply {
    /// Waits for the result until `deadline` or the correlator closes; then reads the stored
    /// result once (a publish missed in a gap is not lost).
    pub async fn wait(
        mut self,
        deadline: tokio::time::Instant,
    ) -> Result<InferenceResult, Unanswered> {
        let rx = self.rx.take().ok_or(Unanswered::Deadline)?;
        let mut closing = self.correlator.closing.subscribe();
        let why = tokio::select! {
            r = tokio::time::timeout_at(deadline, rx) => match r {
                Ok(Ok(result)) => return Ok(result),
                _ => Unanswered::Deadline,
            },
            _ = closing.wait_for(|closed| *closed) => Unanswered::ShuttingDown,
        };
        self.correlator.fetch_stored(&self.id).await.ok_or(why)
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        lock(&self.correlator.waiters).remove(&self.id);
    }
}

async fn listen(
    c: Arc<Correlator>,
    client: redis::Client,
    channel: String,
    mut pubsub: redis::aio::PubSub,
) {
    loop {
        {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                match decode_result(msg.get_payload_bytes()) {
                    Ok(result) => c.deliver(result),
                    Err(e) => tracing::warn!(error = %e, "undecodable reply on {channel}"),
                }
            }
        }
        c.subscribed.store(false, Ordering::Relaxed);
        tracing::warn!(%channel, "reply subscription lost; reconnecting");
        let mut backoff = Duration::from_millis(50);
        pubsub = loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            match client.get_async_pubsub().await {
                Ok(mut p) => match p.subscribe(&channel).await {
                    Ok(()) => break p,
                    Err(e) => tracing::warn!(error = %e, "resubscribe failed"),
                },
                Err(e) => tracing::debug!(error = %e, "redis reconnect failed"),
            }
        };
        c.subscribed.store(true, Ordering::Relaxed);
        tracing::info!(%channel, "reply subscription restored");
        c.recover_missed().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_schemas::encode_result;
    use tokio::time::Instant;

    use crate::test_redis::redis;

    async fn start(url: &str) -> (Arc<Correlator>, ConnectionManager) {
        let client = redis::Client::open(url).unwrap();
        let conn = ConnectionManager::new(client.clone()).await.unwrap();
        let c = Correlator::start(client, "test:reply:gw".into(), conn.clone(), |id| {
            format!("test:result:{id}")
        })
        .await
        .unwrap();
        (c, conn)
    }

    fn result(id: &str, label: i64) -> InferenceResult {
        InferenceResult {
            id: id.into(),
            outputs: vec![sluice_schemas::Tensor::from_values(
                "label",
                sluice_schemas::DataType::Int64,
                vec![1],
                &[label],
            )],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_published_reply_reaches_its_caller_once() {
        let Some(r) = redis().await else { return };
        let (c, mut conn) = start(&r.url).await;
        let pending = c.register("r1");
        assert_eq!(c.waiting(), 1);
        let publish = |res: InferenceResult| {
            let bytes = encode_result(&res).unwrap();
            redis::cmd("PUBLISH")
                .arg("test:reply:gw")
                .arg(bytes)
                .to_owned()
        };
        // A reply for nobody is dropped; the caller's own arrives.
        publish(result("other", 9))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        publish(result("r1", 3))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let got = pending
            .wait(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.outputs[0].values::<i64>(), [3]);
        assert_eq!(c.waiting(), 0, "the waiter is gone once answered");
        // A duplicate after the answer finds nobody (no panic, nothing delivered twice).
        publish(result("r1", 3))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.waiting(), 0);
    }

    #[tokio::test]
    async fn a_missed_publish_is_read_from_the_stored_result_at_the_deadline() {
        let Some(r) = redis().await else { return };
        let (c, mut conn) = start(&r.url).await;
        let pending = c.register("r2");
        let bytes = encode_result(&result("r2", 5)).unwrap();
        redis::cmd("SET")
            .arg("test:result:r2")
            .arg(bytes)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let started = Instant::now();
        let got = pending
            .wait(started + Duration::from_millis(200))
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "read at the deadline"
        );
        assert_eq!(got.outputs[0].values::<i64>(), [5]);
        // Nothing stored and nothing published: no answer.
        let pending = c.register("r3");
        assert_eq!(
            pending
                .wait(Instant::now() + Duration::from_millis(50))
                .await
                .err(),
            Some(Unanswered::Deadline)
        );
    }

    #[tokio::test]
    async fn closing_answers_every_waiter_at_once() {
        let Some(r) = redis().await else { return };
        let (c, _) = start(&r.url).await;
        let (a, b) = (c.register("r5"), c.register("r6"));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        let waits = tokio::spawn(async move { (a.wait(deadline).await, b.wait(deadline).await) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.close();
        let (a, b) = waits.await.unwrap();
        assert_eq!(a.err(), Some(Unanswered::ShuttingDown));
        assert_eq!(b.err(), Some(Unanswered::ShuttingDown));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not left to the deadline"
        );
        // A wait that starts after the close ends at once too.
        let late = c
            .register("r7")
            .wait(Instant::now() + Duration::from_secs(30))
            .await;
        assert_eq!(late.err(), Some(Unanswered::ShuttingDown));
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_stops_waiting() {
        let Some(r) = redis().await else { return };
        let (c, _) = start(&r.url).await;
        drop(c.register("r4"));
        assert_eq!(c.waiting(), 0);
    }
}
