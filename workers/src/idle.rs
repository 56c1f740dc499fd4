//! Fetching less while idle. tansu answers a fetch only when `fetch.wait.max.ms` expires, so a
//! consumer with a short wait (1 ms, for latency) asks it about a thousand times a second even
//! with nothing to read, and every fetch costs it work for each partition it names. A partition
//! that brought no record for `kafka.idle_after` is paused and looked at again only every
//! `kafka.idle_fetch_interval`, in one short probe (every `kafka.idle_fetch_max_interval` once
//! probes have found nothing for 10 × `idle_after`); a wake-up the gateway publishes on Redis
//! when a request arrives after a quiet spell resumes them all at once, and a record the worker
//! forwards to a partition of its own (a graph's next step in the same unit) resumes that one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use sluice_common::Config;
use tokio::sync::mpsc;

use crate::group::{GroupContext, PartitionKey};

/// The idle cycle of one worker's consumer, partition by partition: a partition that brought
/// no record for `after` is paused; paused partitions are probed together every `every` (resumed
/// for `probe`, paused again if nothing came); a wake-up resumes them all, a record this worker
/// forwarded to one of its own partitions resumes that one. So a worker serving many steps
/// fetches only the partitions that are busy, and an idle one almost nothing.
#[derive(Debug)]
pub(crate) struct IdleFetch {
    after: Duration,
    every: Duration,
    /// The probe interval once nothing has come for a long time.
    max_every: Duration,
    /// Since when nothing arrived, was forwarded or woke the worker.
    quiet_since: Instant,
    probe: Duration,
    /// The worker's topics, by index.
    topics: Arc<Vec<String>>,
    /// When each assigned partition last brought a record (or was assigned).
    last: HashMap<PartitionKey, Instant>,
    /// Partitions paused now (between probes) or being probed.
    paused: HashSet<PartitionKey>,
    /// While probing: until when.
    probing_until: Option<Instant>,
    /// When the paused partitions are probed next.
    next_probe: Instant,
    /// Rebalances seen so far (`PartitionState::rebalances`).
    rebalances: u64,
    /// `sluice_worker_paused_partitions`.
    paused_gauge: metrics::Gauge,
    /// Topics with a partition paused (shared with the sinks, see [`crate::sink::OwnWrites`]).
    paused_topics: Arc<Vec<AtomicBool>>,
}

/// librdkafka's own default for `fetch.wait.max.ms`.
const DEFAULT_FETCH_WAIT_MS: u64 = 500;

impl IdleFetch {
    /// From `kafka.idle_after` and `kafka.idle_fetch_interval`; off when the consumer's fetch
    /// wait is already as long as the idle interval (a broker that answers when data arrives).
    pub(crate) fn new(
        cfg: &Config,
        topics: Arc<Vec<String>>,
        paused_topics: Arc<Vec<AtomicBool>>,
        paused: metrics::Gauge,
    ) -> IdleFetch {
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
            max_every: cfg.kafka.idle_fetch_max_interval.max(every),
            quiet_since: Instant::now(),
            probe: wait * 2 + Duration::from_millis(10),
            topics,
            last: HashMap::new(),
            paused: HashSet::new(),
            probing_until: None,
            next_probe: Instant::now(),
            rebalances: 0,
            paused_gauge: paused,
            paused_topics,
        }
    }

    /// Whether the worker ever pauses.
    pub(crate) fn enabled(&self) -> bool {
        !self.after.is_zero()
    }

    /// Whether `key` is paused now (fetches of it stopped on purpose).
    pub(crate) fn is_paused(&self, key: &PartitionKey) -> bool {
        self.paused.contains(key)
    }

    /// When [`IdleFetch::tick`] has something to do next (`None`: never); at once after a
    /// rebalance (`rebalances` moved on).
    pub(crate) fn next_change(&self, rebalances: u64) -> Option<Instant> {
        if !self.enabled() {
            return None;
        }
        if rebalances != self.rebalances {
            return Some(Instant::now());
        }
        let first_idle = self
            .last
            .iter()
            .filter(|(k, _)| !self.paused.contains(k))
            .map(|(_, t)| *t + self.after)
            .min();
        let probe = match self.probing_until {
            Some(until) => Some(until),
            None => (!self.paused.is_empty()).then_some(self.next_probe),
        };
        [first_idle, probe].into_iter().flatten().min()
    }

    /// Moves the cycle on at `now`: pauses partitions silent for `after`, starts and ends
    /// probes. After a rebalance (`rebalances` moved on) every partition fetches at full speed
    /// for `after` first: newly assigned partitions look up their committed offsets before
    /// fetching, and pausing them meanwhile can leave them unfetched.
    pub(crate) fn tick(
        &mut self,
        consumer: &Arc<StreamConsumer<GroupContext>>,
        rebalances: u64,
        now: Instant,
    ) {
        if rebalances != self.rebalances {
            self.rebalances = rebalances;
            self.quiet_since = now;
            self.resume_all(consumer);
            self.last = self
                .assigned(consumer)
                .into_iter()
                .map(|k| (k, now))
                .collect();
            return;
        }
        if let Some(until) = self.probing_until {
            if now < until {
                return;
            }
            // Nothing came for what is still paused: pause it again until the next probe.
            self.probing_until = None;
            self.next_probe = now + self.probe_interval(now);
            let still: Vec<PartitionKey> = self.paused.iter().copied().collect();
            set_paused(consumer, &self.topics, &still, true);
        } else if !self.paused.is_empty() && now >= self.next_probe {
            let all: Vec<PartitionKey> = self.paused.iter().copied().collect();
            set_paused(consumer, &self.topics, &all, false);
            self.probing_until = Some(now + self.probe);
            return;
        }
        let silent: Vec<PartitionKey> = self
            .last
            .iter()
            .filter(|(k, t)| !self.paused.contains(k) && now >= **t + self.after)
            .map(|(k, _)| *k)
            .collect();
        if !silent.is_empty() {
            for (t, _) in &silent {
                if let Some(flag) = self.paused_topics.get(*t) {
                    flag.store(true, Ordering::Relaxed);
                }
            }
            set_paused(consumer, &self.topics, &silent, true);
            if self.paused.is_empty() {
                self.next_probe = now + self.probe_interval(now);
            }
            self.paused.extend(silent);
            self.paused_gauge.set(self.paused.len() as f64);
            tracing::debug!(
                paused = self.paused.len(),
                "idle partitions: fetching them every {:?}",
                self.every
            );
        }
    }

    /// How long until the next probe: `every`, or `max_every` once nothing has come for
    /// 10 × `after`.
    fn probe_interval(&self, now: Instant) -> Duration {
        if now.duration_since(self.quiet_since) >= self.after * 10 {
            self.max_every
        } else {
            self.every
        }
    }

    /// A record arrived on `key`: it stays fetched at full speed.
    pub(crate) fn record_arrived(&mut self, key: PartitionKey, now: Instant) {
        self.quiet_since = now;
        self.last.insert(key, now);
        // Arrived during a probe: fetched from now on.
        if self.paused.remove(&key) {
            self.paused_gauge.set(self.paused.len() as f64);
        }
    }

    /// This worker wrote a record to `key`, one of its own partitions (a graph's next step it
    /// also runs): fetch it at once if it was paused.
    pub(crate) fn written_to(
        &mut self,
        consumer: &Arc<StreamConsumer<GroupContext>>,
        key: PartitionKey,
        now: Instant,
    ) {
        self.quiet_since = now;
        self.last.insert(key, now);
        if self.paused.remove(&key) {
            self.paused_gauge.set(self.paused.len() as f64);
            if self.probing_until.is_none() {
                set_paused(consumer, &self.topics, &[key], false);
            }
        }
    }

    /// The gateway saw a request after a quiet spell: fetch everything before it arrives.
    pub(crate) fn woken(&mut self, consumer: &Arc<StreamConsumer<GroupContext>>, now: Instant) {
        self.quiet_since = now;
        for k in &self.paused {
            self.last.insert(*k, now);
        }
        self.resume_all(consumer);
    }

    /// Resumes every paused partition (a wake-up, a rebalance, draining).
    pub(crate) fn resume_all(&mut self, consumer: &Arc<StreamConsumer<GroupContext>>) {
        if self.paused.is_empty() {
            return;
        }
        let all: Vec<PartitionKey> = self.paused.drain().collect();
        for flag in self.paused_topics.iter() {
            flag.store(false, Ordering::Relaxed);
        }
        if self.probing_until.take().is_none() {
            set_paused(consumer, &self.topics, &all, false);
        }
        self.paused_gauge.set(0.0);
        tracing::debug!("fetching every partition");
    }

    /// The partitions assigned now, as keys.
    fn assigned(&self, consumer: &StreamConsumer<GroupContext>) -> Vec<PartitionKey> {
        consumer
            .assignment()
            .map(|a| {
                a.elements()
                    .iter()
                    .filter_map(|e| {
                        let t = self.topics.iter().position(|t| t == e.topic())?;
                        Some((t, e.partition()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Pauses or resumes `keys`; a resume also wakes librdkafka's fetcher ([`fetch_now`]).
fn set_paused(
    consumer: &Arc<StreamConsumer<GroupContext>>,
    topics: &[String],
    keys: &[PartitionKey],
    paused: bool,
) {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in keys {
        if let Some(topic) = topics.get(*t) {
            tpl.add_partition(topic, *p);
        }
    }
    if tpl.count() == 0 {
        return;
    }
    let done = if paused {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    match done {
        Ok(()) if !paused => fetch_now(consumer, &tpl),
        Ok(()) => {}
        Err(e) => tracing::debug!(error = %e, paused, "could not change fetching"),
    }
}

/// Makes resumed partitions fetch at once. librdkafka decides what to fetch on the broker's own
/// thread, which notices a resume only when it next wakes (measured with tansu: 0.3 to 0.9 s
/// later). Any request to that broker wakes it, so one cheap `ListOffsets` for an assigned
/// partition is sent, off the consumer loop. (With several brokers only that partition's leader
/// is woken at once; the rest follow at librdkafka's pace.)
fn fetch_now(consumer: &Arc<StreamConsumer<GroupContext>>, assigned: &TopicPartitionList) {
    let Some(first) = assigned
        .elements()
        .first()
        .map(|e| (e.topic().to_string(), e.partition()))
    else {
        return;
    };
    let c = Arc::clone(consumer);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = c.fetch_watermarks(&first.0, first.1, Duration::from_secs(1)) {
            tracing::debug!(error = %e, "waking the broker thread failed");
        }
    });
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
        IdleFetch::new(
            &cfg,
            Arc::new(vec!["t".to_string()]),
            Arc::new(vec![AtomicBool::new(false)]),
            metrics::gauge!("sluice_worker_paused_partitions"),
        )
    }

    #[test]
    fn a_broker_that_long_polls_needs_no_idle_cycle() {
        assert!(!idle("500", 2000, 100).enabled());
        assert!(!idle("1", 0, 100).enabled(), "idle_after = 0 turns it off");
        let mut i = idle("1", 2000, 100);
        assert!(i.enabled());
        assert_eq!(i.next_change(0), None, "nothing assigned: nothing to do");
        assert!(
            i.next_change(1).is_some(),
            "a rebalance is looked at at once"
        );
        let t = Instant::now();
        i.record_arrived((0, 0), t);
        i.record_arrived((0, 1), t + Duration::from_millis(500));
        assert_eq!(
            i.next_change(0),
            Some(t + Duration::from_secs(2)),
            "the first partition to fall silent"
        );
        assert!(!i.is_paused(&(0, 0)));
    }

    #[test]
    fn probes_slow_down_after_a_long_quiet_and_speed_up_when_a_record_comes() {
        let mut i = idle("1", 2000, 250);
        let t = Instant::now();
        i.record_arrived((0, 0), t);
        let ms = Duration::from_millis;
        assert_eq!(
            i.probe_interval(t + ms(19_000)),
            ms(250),
            "quiet < 10 × idle_after"
        );
        assert_eq!(
            i.probe_interval(t + ms(20_000)),
            ms(1000),
            "the default max interval"
        );
        i.record_arrived((0, 0), t + ms(30_000));
        assert_eq!(
            i.probe_interval(t + ms(31_000)),
            ms(250),
            "a record brings it back"
        );
    }
}
