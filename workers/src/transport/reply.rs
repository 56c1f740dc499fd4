//! Answering waiting callers through Redis: for each result with a reply route, SET the result
//! under its key (with the route's TTL), then PUBLISH it on the gateway's channel; one pipeline
//! per delivered batch, retried until the latest deadline among them.

use std::time::Duration;

use redis::aio::ConnectionManager;
use sluice_schemas::Deadline;

use crate::pipeline::completion::Completion;
use crate::telemetry::WorkerMetrics;

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Writes replies to Redis.
#[derive(Clone)]
pub struct Replier {
    redis: ConnectionManager,
    metrics: std::sync::Arc<WorkerMetrics>,
}

impl Replier {
    /// A replier over `redis`.
    pub fn new(redis: ConnectionManager, metrics: std::sync::Arc<WorkerMetrics>) -> Replier {
        Replier { redis, metrics }
    }

    /// Replies for every item with a route and an encoded result (`encoded[i]` for `items[i]`).
    pub async fn reply_all(&self, items: &[Completion], encoded: &[Option<Vec<u8>>]) {
        let Some((pipe, latest_deadline)) = pipeline(items, encoded) else {
            return;
        };
        let mut backoff = Duration::from_millis(10);
        loop {
            let mut conn = self.redis.clone();
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => return,
                Err(e) => {
                    if latest_deadline.is_some_and(Deadline::passed) {
                        self.metrics.replies_dropped.increment(1);
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

/// The SET + PUBLISH pipeline for `items`, and the latest deadline among them (0: none); `None`
/// when nothing has a reply route.
fn pipeline(
    items: &[Completion],
    encoded: &[Option<Vec<u8>>],
) -> Option<(redis::Pipeline, Option<Deadline>)> {
    let mut pipe = redis::pipe();
    let mut latest_deadline = None;
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
        latest_deadline = latest_deadline.max(c.deadline);
        any = true;
    }
    any.then_some((pipe, latest_deadline))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::ReplyRoute;

    #[test]
    fn stores_then_publishes_each_routed_result() {
        let routed = |key: &str, deadline_ms| Completion {
            reply: Some(ReplyRoute {
                channel: "sluice:reply:gw".into(),
                key: key.into(),
                ttl_ms: 10,
            }),
            deadline: Deadline::from_wire(deadline_ms),
            ..Default::default()
        };
        let items = [routed("k1", 5), Completion::default(), routed("k2", 9)];
        let encoded = [
            Some(b"a".to_vec()),
            Some(b"b".to_vec()),
            Some(b"c".to_vec()),
        ];
        let (pipe, deadline) = pipeline(&items, &encoded).expect("two routed results");
        assert_eq!(deadline, Deadline::from_wire(9));
        let cmds: Vec<String> = pipe
            .cmd_iter()
            .map(|c| String::from_utf8_lossy(&c.get_packed_command()).into_owned())
            .collect();
        assert_eq!(cmds.len(), 4, "SET and PUBLISH for each routed item");
        assert!(
            cmds[0].contains("SET") && cmds[0].contains("k1") && cmds[0].contains("1000"),
            "TTL at least 1 s: {}",
            cmds[0]
        );
        assert!(cmds[1].contains("PUBLISH") && cmds[1].contains("sluice:reply:gw"));
        assert!(cmds[2].contains("k2"));
        assert!(pipeline(&[Completion::default()], &[Some(vec![])]).is_none());
    }
}
