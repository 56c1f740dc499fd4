//! Fetching less while idle. tansu answers a fetch only when `fetch.wait.max.ms` expires, so a
//! consumer with a short wait (1 ms, for latency) asks it about a thousand times a second even
//! with nothing to read. After `kafka.idle_after` without a record the worker pauses its
//! partitions and only looks again every `kafka.idle_fetch_interval`, for one short probe; a
//! record, or a wake-up the gateway publishes on Redis when a request arrives after a quiet
//! spell, resumes full-speed fetching at once.

use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use sluice_common::Config;
use tokio::sync::mpsc;

use crate::group::GroupContext;

/// Where the consumer is in its idle cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Fetching all the time.
    Active,
    /// Partitions paused since then.
    Paused { since: Instant },
    /// Fetching until then to see whether anything arrived.
    Probing { until: Instant },
}

/// The idle cycle of one worker's consumer.
#[derive(Debug)]
pub(crate) struct IdleFetch {
    after: Duration,
    every: Duration,
    probe: Duration,
    last_record: Instant,
    /// Rebalances seen so far (`PartitionState::rebalances`).
    rebalances: u64,
    mode: Mode,
    /// `sluice_worker_fetch_paused`: 1 while the partitions are paused.
    paused: metrics::Gauge,
}

/// librdkafka's own default for `fetch.wait.max.ms`.
const DEFAULT_FETCH_WAIT_MS: u64 = 500;

impl IdleFetch {
    /// From `kafka.idle_after` and `kafka.idle_fetch_interval`; off when the consumer's fetch
    /// wait is already as long as the idle interval (a broker that answers when data arrives).
    pub(crate) fn new(cfg: &Config, paused: metrics::Gauge) -> IdleFetch {
        let wait_ms = cfg
            .kafka
            .consumer
            .get("fetch.wait.max.ms")
            .or_else(|| cfg.kafka.client.get("fetch.wait.max.ms"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_FETCH_WAIT_MS);
        let wait = Duration::from_millis(wait_ms);
        let every = cfg.kafka.idle_fetch_interval;
        let after = if wait >= every {
            Duration::ZERO
        } else {
            cfg.kafka.idle_after
        };
        IdleFetch {
            after,
            every,
            probe: wait * 2 + Duration::from_millis(10),
            last_record: Instant::now(),
            rebalances: 0,
            mode: Mode::Active,
            paused,
        }
    }

    /// Whether the worker ever pauses.
    pub(crate) fn enabled(&self) -> bool {
        !self.after.is_zero()
    }

    /// When [`IdleFetch::tick`] has something to do next (`None`: never).
    pub(crate) fn next_change(&self) -> Option<Instant> {
        if !self.enabled() {
            return None;
        }
        Some(match self.mode {
            Mode::Active => self.last_record + self.after,
            Mode::Paused { since } => since + self.every,
            Mode::Probing { until } => until,
        })
    }

    /// Moves the cycle on at `now`: pause after `after` without records, probe every `every`,
    /// pause again after a probe that found nothing. After a rebalance (`rebalances` moved on) it
    /// fetches at full speed for `after` first: newly assigned partitions look up their committed
    /// offsets before fetching, and pausing them meanwhile can leave them unfetched.
    pub(crate) fn tick(
        &mut self,
        consumer: &StreamConsumer<GroupContext>,
        rebalances: u64,
        now: Instant,
    ) {
        if rebalances != self.rebalances {
            self.rebalances = rebalances;
            self.last_record = now;
            self.activate(consumer);
            return;
        }
        match self.mode {
            Mode::Active if now >= self.last_record + self.after => {
                set_paused(consumer, true);
                self.paused.set(1.0);
                tracing::debug!("idle: fetching every {:?}", self.every);
                self.mode = Mode::Paused { since: now };
            }
            Mode::Paused { since } if now >= since + self.every => {
                set_paused(consumer, false);
                self.mode = Mode::Probing {
                    until: now + self.probe,
                };
            }
            Mode::Probing { until } if now >= until => {
                set_paused(consumer, true);
                self.mode = Mode::Paused { since: now };
            }
            _ => {}
        }
    }

    /// A record arrived: fetch at full speed.
    pub(crate) fn record_arrived(&mut self, consumer: &StreamConsumer<GroupContext>, now: Instant) {
        self.last_record = now;
        self.activate(consumer);
    }

    /// The gateway saw a request after a quiet spell: fetch at full speed before it arrives.
    pub(crate) fn woken(&mut self, consumer: &StreamConsumer<GroupContext>, now: Instant) {
        self.last_record = now;
        self.activate(consumer);
    }

    /// Resumes every partition (before draining).
    pub(crate) fn resume_all(&mut self, consumer: &StreamConsumer<GroupContext>) {
        self.activate(consumer);
    }

    fn activate(&mut self, consumer: &StreamConsumer<GroupContext>) {
        if matches!(self.mode, Mode::Paused { .. }) {
            set_paused(consumer, false);
        }
        if self.mode != Mode::Active {
            self.paused.set(0.0);
            tracing::debug!("active: fetching continuously");
        }
        self.mode = Mode::Active;
    }
}

/// Pauses or resumes every partition assigned now.
fn set_paused(consumer: &StreamConsumer<GroupContext>, paused: bool) {
    let assigned = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "no assignment to pause or resume");
            return;
        }
    };
    let done = if paused {
        consumer.pause(&assigned)
    } else {
        consumer.resume(&assigned)
    };
    if let Err(e) = done {
        tracing::warn!(error = %e, paused, "could not change fetching");
    }
}

/// Forwards wake-ups published on `channel` (by gateways, see `Config::wake_channel`) to the
/// consumer loop, resubscribing after a lost connection.
pub(crate) async fn listen_for_wake(
    client: redis::Client,
    channel: String,
    wake: mpsc::Sender<()>,
) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    while messages.next().await.is_some() {
                        // Full: a wake-up is already waiting, which is all that matters.
                        let _ = wake.try_send(());
                    }
                    if wake.is_closed() {
                        return;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "wake channel: subscribe failed"),
            },
            Err(e) => tracing::debug!(error = %e, "wake channel: no connection"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn idle(wait_ms: &str, after_ms: u64, every_ms: u64) -> IdleFetch {
        let mut cfg = Config::load_with_env(None, &[]).unwrap();
        cfg.kafka
            .consumer
            .insert("fetch.wait.max.ms".into(), wait_ms.into());
        cfg.kafka.idle_after = Duration::from_millis(after_ms);
        cfg.kafka.idle_fetch_interval = Duration::from_millis(every_ms);
        IdleFetch::new(&cfg, metrics::gauge!("sluice_worker_fetch_paused"))
    }

    #[test]
    fn a_broker_that_long_polls_needs_no_idle_cycle() {
        assert!(!idle("500", 2000, 100).enabled());
        assert!(!idle("1", 0, 100).enabled(), "idle_after = 0 turns it off");
        let i = idle("1", 2000, 100);
        assert!(i.enabled());
        assert_eq!(
            i.next_change(),
            Some(i.last_record + Duration::from_secs(2))
        );
    }
}
