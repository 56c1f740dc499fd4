//! Readiness: the broker and Redis are probed every `gateway.health_interval`; a dependency counts
//! as down after `gateway.health_failures` failed probes in a row, so one slow answer from a busy
//! broker does not turn requests away (a broker that is really gone also fails the produce of
//! every request, which answers 503 on its own).

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::Gateway;

/// Consecutive failed probes of one dependency; `None` until its first success.
#[derive(Debug, Default)]
struct Probes(Option<u32>);

impl Probes {
    /// Records a probe; returns whether the dependency counts as up.
    fn settle(&mut self, ok: bool, failures_to_mark_down: u32) -> bool {
        self.0 = match (ok, self.0) {
            (true, _) => Some(0),
            (false, Some(n)) => Some(n + 1),
            (false, None) => None,
        };
        ok || self.0.is_some_and(|n| n < failures_to_mark_down)
    }
}

/// Probes until the gateway is dropped, recording readiness for `/v2/health/ready` and 503s.
pub(crate) async fn probe_loop(gw: Weak<Gateway>, mut redis: redis::aio::ConnectionManager) {
    let (mut broker_probes, mut redis_probes) = (Probes::default(), Probes::default());
    loop {
        let Some(g) = gw.upgrade() else { return };
        let cfg = &g.config().gateway;
        let (interval, failures) = (cfg.health_interval, cfg.health_failures);
        let producer = g.publisher.producer();
        // One topic's metadata proves the broker answers, without listing every topic.
        let probe = g.deployment.topics.dead_letter();
        let timeout = interval.max(Duration::from_millis(100));
        let broker = tokio::task::spawn_blocking(move || producer.broker_answers(&probe, timeout))
            .await
            .unwrap_or(false);
        let pong: Result<Result<String, _>, _> =
            tokio::time::timeout(timeout, redis::cmd("PING").query_async(&mut redis)).await;
        let broker = broker_probes.settle(broker, failures);
        let redis_ok = redis_probes.settle(matches!(pong, Ok(Ok(_))), failures);
        if g.broker_ok.swap(broker, Ordering::Relaxed) != broker {
            tracing::info!(reachable = broker, "broker health changed");
        }
        if g.redis_ok.swap(redis_ok, Ordering::Relaxed) != redis_ok {
            tracing::info!(reachable = redis_ok, "redis health changed");
        }
        g.ready_gauge.set(if g.is_ready() { 1.0 } else { 0.0 });
        drop(g);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_only_after_enough_failures_in_a_row() {
        let mut p = Probes::default();
        assert!(!p.settle(false, 3), "never seen up: down");
        assert!(p.settle(true, 3));
        assert!(
            p.settle(false, 3) && p.settle(false, 3),
            "two failures: still up"
        );
        assert!(!p.settle(false, 3), "the third marks it down");
        assert!(p.settle(true, 3), "one success brings it back");
    }
}
