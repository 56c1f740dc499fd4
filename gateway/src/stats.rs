//! Per-model counters behind Triton's statistics extension (`/v2/models/{m}/stats`), and the
//! Prometheus handles the request path uses (registered once, not per request).

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Histogram};

/// Status codes the gateway answers with; each gets its own pre-registered counter.
const CODES: [u16; 10] = [200, 400, 404, 413, 422, 429, 500, 503, 504, 0];

/// Prometheus handles for one model.
pub struct ModelMetrics {
    by_code: Vec<(u16, Counter)>,
    model: String,
    /// End-to-end request duration.
    pub duration: Histogram,
}

impl ModelMetrics {
    /// Registers the handles for `model`.
    pub fn new(model: &str) -> ModelMetrics {
        ModelMetrics {
            by_code: CODES
                .iter()
                .map(|c| {
                    let code = if *c == 0 { "other".to_string() } else { c.to_string() };
                    (*c, metrics::counter!("sluice_gateway_requests_total", "model" => model.to_string(), "code" => code))
                })
                .collect(),
            model: model.to_string(),
            duration: metrics::histogram!("sluice_gateway_request_duration_seconds", "model" => model.to_string()),
        }
    }

    /// Counts one answered request.
    pub fn count(&self, status: u16) {
        match self.by_code.iter().find(|(c, _)| *c == status) {
            Some((_, counter)) => counter.increment(1),
            None => metrics::counter!("sluice_gateway_requests_total", "model" => self.model.clone(), "code" => status.to_string())
                .increment(1),
        }
    }
}

/// Cumulative counts and durations (ns) for one model.
#[derive(Default)]
pub struct ModelStats {
    success_count: AtomicU64,
    success_ns: AtomicU64,
    fail_count: AtomicU64,
    fail_ns: AtomicU64,
    queue_ns: AtomicU64,
    infer_ns: AtomicU64,
    last_inference_ms: AtomicU64,
}

impl ModelStats {
    /// Records a successful request.
    pub fn success(&self, total_ns: u64, queue_ns: u64, infer_ns: u64, now_ms: u64) {
        self.success_count.fetch_add(1, Ordering::Relaxed);
        self.success_ns.fetch_add(total_ns, Ordering::Relaxed);
        self.queue_ns.fetch_add(queue_ns, Ordering::Relaxed);
        self.infer_ns.fetch_add(infer_ns, Ordering::Relaxed);
        self.last_inference_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Records a failed request.
    pub fn failure(&self, total_ns: u64) {
        self.fail_count.fetch_add(1, Ordering::Relaxed);
        self.fail_ns.fetch_add(total_ns, Ordering::Relaxed);
    }

    /// Triton's `model_stats` entry.
    pub fn to_json(&self, name: &str, version: &str) -> serde_json::Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ok = n(&self.success_count);
        serde_json::json!({
            "name": name,
            "version": version,
            "last_inference": n(&self.last_inference_ms),
            "inference_count": ok,
            "execution_count": ok,
            "inference_stats": {
                "success": {"count": ok, "ns": n(&self.success_ns)},
                "fail": {"count": n(&self.fail_count), "ns": n(&self.fail_ns)},
                "queue": {"count": ok, "ns": n(&self.queue_ns)},
                "compute_input": {"count": ok, "ns": 0},
                "compute_infer": {"count": ok, "ns": n(&self.infer_ns)},
                "compute_output": {"count": ok, "ns": 0},
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0}
            },
            "batch_stats": []
        })
    }
}
