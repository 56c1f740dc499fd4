//! Waking idle workers. A worker that has seen no record for `kafka.idle_after` fetches only
//! every `kafka.idle_fetch_interval` (tansu charges for every empty fetch). So that the first
//! request after a quiet spell does not wait for that, the gateway publishes a wake-up on Redis
//! (`<prefix>:wake`) when a servable gets a request after half that long without one; every
//! worker listening resumes fetching at once. Under steady load nothing is published.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

use redis::aio::ConnectionManager;
use sluice_common::{Deployment, now_ms};

/// Publishes wake-ups for servables that were quiet.
pub(crate) struct Waker {
    conn: ConnectionManager,
    channel: String,
    /// A servable quiet this long (ms) wakes the workers; 0: never.
    quiet_ms: i64,
    /// Last request per servable (ms since the epoch).
    last: HashMap<String, AtomicI64>,
}

impl Waker {
    /// A waker for every servable of `deployment`, publishing through `conn`.
    pub(crate) fn new(deployment: &Deployment, conn: ConnectionManager) -> Waker {
        let cfg = &deployment.config;
        Waker {
            conn,
            channel: cfg.wake_channel(),
            quiet_ms: i64::try_from(cfg.kafka.idle_after.as_millis() / 2).unwrap_or(i64::MAX),
            last: deployment
                .servables()
                .keys()
                .map(|s| (s.clone(), AtomicI64::new(0)))
                .collect(),
        }
    }

    /// Notes a request for `servable`; wakes the workers (without waiting) if it was quiet.
    pub(crate) fn request_for(&self, servable: &str) {
        if self.quiet_ms == 0 {
            return;
        }
        let Some(last) = self.last.get(servable) else {
            return;
        };
        let now = now_ms();
        if now - last.swap(now, Ordering::Relaxed) < self.quiet_ms {
            return;
        }
        let (mut conn, channel) = (self.conn.clone(), self.channel.clone());
        tokio::spawn(async move {
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("wake")
                .query_async(&mut conn)
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "could not wake the workers");
            }
        });
    }
}
