//! Where a request's time goes, stage by stage, from the stack's own histograms: `sluice bench`
//! reads the gateway's and every worker's `/metrics` before and after a load level and divides
//! each histogram's added time by the requests answered in between.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;

use crate::http::HttpClient;

/// Histograms a stage is read from (their `_sum` and `_count`, over every series).
const GATEWAY_TOTAL: &str = "sluice_gateway_request_duration_seconds";
const PRODUCE: &str = "sluice_gateway_produce_seconds";
const FETCH: &str = "sluice_worker_fetch_seconds";
const BATCH_WAIT: &str = "sluice_worker_batch_wait_seconds";
const COMPUTE: &str = "sluice_worker_inference_seconds";
const NAMES: [&str; 5] = [GATEWAY_TOTAL, PRODUCE, FETCH, BATCH_WAIT, COMPUTE];

/// Each histogram's (sum in seconds, count), summed over its series.
pub(crate) type Totals = HashMap<&'static str, (f64, f64)>;

/// The `/metrics` addresses of the gateway (`gateway`, a base URL) and of every worker in
/// `<state_dir>/stack.json` (written by `sluice up`; none when absent).
pub(crate) fn metrics_urls(gateway: &str, state_dir: &Path) -> Vec<String> {
    let mut urls = vec![format!("{gateway}/metrics")];
    let stack = std::fs::read_to_string(state_dir.join("stack.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<crate::up::StackFile>(&t).ok());
    for p in stack.iter().flat_map(|s| &s.processes) {
        if p.role == crate::supervise::Role::Worker
            && let Some(addr) = &p.addr
        {
            urls.push(format!("http://{addr}/metrics"));
        }
    }
    urls
}

/// Reads every URL's metrics and adds up the stage histograms (an unreachable one counts 0).
pub(crate) async fn scrape(client: &HttpClient, urls: &[String]) -> Totals {
    let mut totals = Totals::new();
    for url in urls {
        let Ok((200, body)) = crate::http::get(client, url).await else {
            continue;
        };
        add_totals(&mut totals, &body);
    }
    totals
}

/// Adds the `_sum` and `_count` lines of the stage histograms in Prometheus text `body`.
fn add_totals(totals: &mut Totals, body: &Bytes) {
    for line in String::from_utf8_lossy(body).lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or(series);
        for name in NAMES {
            let entry = totals.entry(name).or_default();
            if metric.strip_prefix(name) == Some("_sum") {
                entry.0 += value;
            } else if metric.strip_prefix(name) == Some("_count") {
                entry.1 += value;
            }
        }
    }
}

/// One line: the mean time per request in each stage between `before` and `after` (requests
/// counted by the gateway), with a client-side mean latency of `client_ms`.
pub(crate) fn breakdown(before: &Totals, after: &Totals, client_ms: f64) -> String {
    let delta = |name: &str| {
        let (a, b) = (
            after.get(name).copied().unwrap_or_default(),
            before.get(name).copied().unwrap_or_default(),
        );
        (a.0 - b.0, a.1 - b.1)
    };
    let requests = delta(GATEWAY_TOTAL).1.max(1.0);
    let per_request = |name: &str| delta(name).0 * 1000.0 / requests;
    let gateway = per_request(GATEWAY_TOTAL);
    let produce = per_request(PRODUCE);
    let fetch = per_request(FETCH);
    let batch_wait = per_request(BATCH_WAIT);
    let compute = per_request(COMPUTE);
    format!(
        "mean ms per request: client {client_ms:.3} = HTTP and client {:.3} + gateway {gateway:.3} \
         (produce acknowledged {produce:.3}; send → worker's consumer loop {fetch:.3}, of which broker and fetch after \
         the produce {:.3}; batch wait {batch_wait:.3}; compute {compute:.3}; the rest: admission, \
         deliver, Redis reply, gateway wake-up {:.3})",
        client_ms - gateway,
        (fetch - produce).max(0.0),
        gateway - fetch - batch_wait - compute,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_every_series_of_each_stage() {
        let mut t = Totals::new();
        let text = "# TYPE sluice_worker_fetch_seconds summary\n\
            sluice_worker_fetch_seconds{unit=\"mlp\",quantile=\"0.5\"} 0.001\n\
            sluice_worker_fetch_seconds_sum{unit=\"mlp\"} 0.5\n\
            sluice_worker_fetch_seconds_count{unit=\"mlp\"} 100\n\
            sluice_worker_fetch_seconds_sum{unit=\"heavy\"} 0.25\n\
            sluice_worker_fetch_seconds_count{unit=\"heavy\"} 50\n";
        add_totals(&mut t, &Bytes::from(text));
        assert_eq!(t[FETCH], (0.75, 150.0));
    }

    #[test]
    fn the_breakdown_divides_the_added_time_by_the_requests() {
        let before = Totals::from([(GATEWAY_TOTAL, (1.0, 10.0)), (FETCH, (0.5, 10.0))]);
        let after = Totals::from([(GATEWAY_TOTAL, (2.0, 110.0)), (FETCH, (0.6, 110.0))]);
        let line = breakdown(&before, &after, 12.0);
        assert!(line.contains("gateway 10.000"), "{line}");
        assert!(
            line.contains("send → worker's consumer loop 1.000"),
            "{line}"
        );
        assert!(line.contains("HTTP and client 2.000"), "{line}");
    }
}
