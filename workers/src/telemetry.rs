//! The worker's metrics, registered once per model so the hot path only touches handles.

use metrics::{Counter, Gauge, Histogram};

/// Metric handles for one model's worker.
pub struct WorkerMetrics {
    /// Requests answered with outputs.
    pub ok: Counter,
    /// Requests skipped because their deadline had passed.
    pub expired: Counter,
    /// Records that decoded but did not fit the model.
    pub invalid: Counter,
    /// Records that could not be decoded.
    pub undecodable: Counter,
    /// Requests the model failed on.
    pub failed: Counter,
    /// Rows per model call.
    pub batch_size: Histogram,
    /// Duration of a model call.
    pub inference_seconds: Histogram,
    /// Time from produce to the start of inference.
    pub queue_wait_seconds: Histogram,
    /// Records received and not yet fully handled.
    pub in_flight: Gauge,
}

impl WorkerMetrics {
    /// Registers the handles for `model`.
    pub fn new(model: &str) -> WorkerMetrics {
        let m = model.to_string();
        let requests = |outcome: &'static str| metrics::counter!("sluice_worker_requests_total", "model" => m.clone(), "outcome" => outcome);
        WorkerMetrics {
            ok: requests("ok"),
            expired: requests("expired"),
            invalid: requests("invalid"),
            undecodable: requests("undecodable"),
            failed: requests("failed"),
            batch_size: metrics::histogram!("sluice_worker_batch_size", "model" => m.clone()),
            inference_seconds: metrics::histogram!("sluice_worker_inference_seconds", "model" => m.clone()),
            queue_wait_seconds: metrics::histogram!("sluice_worker_queue_wait_seconds", "model" => m.clone()),
            in_flight: metrics::gauge!("sluice_worker_in_flight", "model" => m),
        }
    }
}
