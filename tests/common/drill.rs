//! The drills' load and oracle: closed-loop callers of a model or graph through the gateway,
//! each answer compared with onnxruntime's; then every record of the result topic read and
//! judged (lost, wrong, duplicates), as a [`DrillReport`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use sluice_schemas::InferenceResult;

use super::*;

/// What a drill loads: a model or graph, where its results land, and how its answer is judged.
pub struct Target {
    /// The model or graph called (`/v2/models/<name>/infer`).
    pub name: &'static str,
    /// Its result topic.
    pub results: &'static str,
    /// The output compared.
    pub output: &'static str,
    /// Whether it takes the raw pixels (a graph that scales them itself) or scaled ones.
    pub raw_input: bool,
    /// onnxruntime's values of that output for sample `k`.
    pub want: fn(&Samples, usize) -> Vec<f64>,
}

/// `heavy`: batching, milliseconds per call; its logits compared.
pub const HEAVY: Target = Target {
    name: "heavy",
    results: "sluice.heavy.results",
    output: "logits",
    raw_input: false,
    want: |s, k| flat_f64(&s.expected["heavy"]["logits"][k]),
};

/// `digits-pipeline` (scale → mlp → argmax, hops in process in one unit); its label compared
/// with the mlp's label of onnxruntime on the scaled sample.
pub const PIPELINE: Target = Target {
    name: "digits-pipeline",
    results: "sluice.digits-pipeline.results",
    output: "label",
    raw_input: true,
    want: |s, k| vec![s.expected["mlp"]["label"][k].as_f64().unwrap_or(f64::NAN)],
};

/// A request's deadline when the fault loses nothing: long enough to outlast the fault and a
/// group rebalance, so every request is answered.
pub const LONG: Duration = Duration::from_secs(40);
/// A request's deadline when the fault may lose a reply (Redis restarted): its caller gets 504
/// this soon.
pub const SHORT: Duration = Duration::from_secs(8);

pub fn drill_seconds() -> u64 {
    std::env::var("SLUICE_DRILL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

/// One request's fate as the caller saw it.
pub struct Outcome {
    pub id: String,
    pub sample: usize,
    /// HTTP status, or 0 when the connection gave no answer.
    pub status: u16,
    pub correct: bool,
    pub latency: Duration,
    /// When it was sent.
    pub sent: Instant,
    /// When the drill's fault struck (the same for every outcome of a load), if one did.
    pub fault_at: Option<Instant>,
}

/// Closed-loop callers of a target until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub answered: Arc<AtomicUsize>,
    fault_at: std::sync::Mutex<Option<Instant>>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

/// Whether `got` equals onnxruntime's `want` within the tolerance the other tests use.
pub fn close(got: &[f64], want: &[f64]) -> bool {
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(g, w)| (g - w).abs() <= 1e-4 + 1e-4 * w.abs())
}

/// Sends one request for sample `k` to `target` and judges its answer against onnxruntime's.
pub async fn call_once(
    client: &Http,
    target: &Target,
    url: &str,
    samples: &Samples,
    id: String,
    k: usize,
    deadline_us: u64,
) -> Outcome {
    let row = if target.raw_input {
        &samples.raw[k]
    } else {
        &samples.scaled[k]
    };
    let body = serde_json::json!({"id": id, "parameters": {"timeout": deadline_us},
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
    let started = Instant::now();
    let reply = try_post(client, url, body.to_string()).await;
    let latency = started.elapsed();
    let (status, correct) = match &reply {
        None => (0, false),
        Some(r) if r.status == 200 => {
            let json = r.json();
            let named = json["outputs"]
                .as_array()
                .and_then(|o| o.iter().find(|o| o["name"] == target.output));
            let got = named.map(|o| flat_f64(&o["data"])).unwrap_or_default();
            (200, close(&got, &(target.want)(samples, k)))
        }
        Some(r) => (r.status, false),
    };
    Outcome {
        id,
        sample: k,
        status,
        correct,
        latency,
        sent: started,
        fault_at: None,
    }
}

impl Load {
    /// Starts `clients` closed-loop callers of `target`, each request with `deadline`.
    pub fn start(
        stack: &Stack,
        target: &'static Target,
        clients: usize,
        samples: &Arc<Samples>,
        tag: &str,
        deadline: Duration,
    ) -> Load {
        let deadline_us = deadline.as_micros() as u64;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let url = format!("{}/v2/models/{}/infer", stack.gateway, target.name);
        let tasks = (0..clients)
            .map(|c| {
                let (stop, answered, url) = (stop.clone(), answered.clone(), url.clone());
                let (samples, tag) = (samples.clone(), tag.to_string());
                tokio::spawn(async move {
                    let client = http();
                    let mut outcomes = Vec::new();
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let k = (c * 7919 + i * 31) % samples.scaled.len();
                        let id = format!("{tag}-{c}-{i}");
                        let outcome =
                            call_once(&client, target, &url, &samples, id, k, deadline_us).await;
                        if outcome.status == 0 {
                            // The gateway is gone: do not spin.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                        outcomes.push(outcome);
                        i += 1;
                    }
                    outcomes
                })
            })
            .collect();
        Load {
            stop,
            answered,
            fault_at: std::sync::Mutex::new(None),
            tasks,
        }
    }

    /// Waits until `n` more requests have been answered (the load is flowing).
    pub async fn wait_answers(&self, n: usize) {
        let from = self.answered.load(Ordering::Relaxed);
        let end = Instant::now() + Duration::from_secs(60);
        while self.answered.load(Ordering::Relaxed) < from + n {
            assert!(Instant::now() < end, "the load stopped flowing");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Notes that the fault strikes now (a fault that waits for something, such as a fail
    /// point, marks the moment it struck).
    pub fn mark_fault(&self) {
        *self.fault_at.lock().unwrap() = Some(Instant::now());
    }

    /// Stops the callers; every request's outcome.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let fault_at = *self.fault_at.lock().unwrap();
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        for o in &mut all {
            o.fault_at = fault_at;
        }
        all
    }
}

/// Every record of `topic`, read until it has been quiet for `quiet` (or 2 minutes passed).
pub async fn read_topic(stack: &Stack, topic: &str, quiet: Duration) -> Vec<OwnedMessage> {
    let consumer = reader(&stack.kafka, topic);
    let mut records = Vec::new();
    let mut last = Instant::now();
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end && last.elapsed() < quiet {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            last = Instant::now();
            records.push(m.detach());
        }
    }
    records
}

/// Every result record on `topic`, by the caller's id.
pub async fn result_records(stack: &Stack, topic: &str) -> HashMap<String, Vec<InferenceResult>> {
    let mut by_id: HashMap<String, Vec<InferenceResult>> = HashMap::new();
    for m in read_topic(stack, topic, Duration::from_secs(5)).await {
        let r = sluice_schemas::decode_result(m.payload().unwrap()).unwrap();
        by_id
            .entry(r.client_id.clone().unwrap_or_default())
            .or_default()
            .push(r);
    }
    by_id
}

/// Reads the target's result topic and judges `outcomes`: every 200 equal to onnxruntime's answer,
/// every result record (duplicates included) equal to it too, and every accepted request
/// answered or holding a result record.
pub async fn judge(
    drill: &str,
    stack: &Stack,
    target: &Target,
    samples: &Samples,
    outcomes: &[Outcome],
    note: &str,
) -> DrillReport {
    let records = result_records(stack, target.results).await;
    let mut r = DrillReport {
        drill: drill.to_string(),
        sent: outcomes.len(),
        recovery_ms: recovery(outcomes).map(|d| d.as_secs_f64() * 1000.0),
        longest_ms: outcomes
            .iter()
            .filter(|o| o.status == 200)
            .map(|o| o.latency.as_secs_f64() * 1000.0)
            .max_by(f64::total_cmp),
        note: note.to_string(),
        ..DrillReport::default()
    };
    for o in outcomes {
        let held = records.get(&o.id);
        match o.status {
            200 if o.correct => r.correct += 1,
            200 => r.wrong += 1,
            s => {
                *r.errors.entry(s).or_default() += 1;
                // 504: accepted, so a result record must exist. (A dropped connection
                // may never have been published; it counts as an error, not as lost.)
                if s == 504 {
                    if held.is_some() {
                        r.late += 1;
                    } else {
                        r.lost += 1;
                    }
                }
            }
        }
        let want = (target.want)(samples, o.sample);
        for rec in held.into_iter().flatten() {
            if rec.error.is_none() {
                let named = rec.outputs.iter().find(|t| t.name == target.output);
                let got = named.and_then(|t| t.to_f64()).unwrap_or_default();
                if !close(&got, &want) {
                    r.wrong += 1;
                }
            }
        }
        r.duplicates += held.map_or(0, |h| h.len().saturating_sub(1));
    }
    let mut lat: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.status == 200)
        .map(|o| o.latency.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    if !lat.is_empty() {
        r.p99_ms = lat[((lat.len() as f64 * 0.99) as usize).min(lat.len() - 1)];
    }
    r.publish();
    r
}

/// From the fault to the first answer (200) of a request sent after it.
pub fn recovery(outcomes: &[Outcome]) -> Option<Duration> {
    let fault = outcomes.first()?.fault_at?;
    outcomes
        .iter()
        .filter(|o| o.status == 200 && o.sent >= fault)
        .map(|o| o.sent + o.latency - fault)
        .min()
}

/// Runs the load (requests with `deadline`) for the drill's length with `fault` injected after
/// a third of it (marked then; the fault may mark a later moment).
pub async fn under_load<F>(
    stack: &mut Stack,
    target: &'static Target,
    tag: &str,
    deadline: Duration,
    fault: F,
) -> (Vec<Outcome>, Arc<Samples>)
where
    F: AsyncFnOnce(&mut Stack, &Load),
{
    under_load_by(stack, target, 8, tag, deadline, fault).await
}

/// As [`under_load`], with `clients` callers.
pub async fn under_load_by<F>(
    stack: &mut Stack,
    target: &'static Target,
    clients: usize,
    tag: &str,
    deadline: Duration,
    fault: F,
) -> (Vec<Outcome>, Arc<Samples>)
where
    F: AsyncFnOnce(&mut Stack, &Load),
{
    let samples = Arc::new(samples());
    let load = Load::start(stack, target, clients, &samples, tag, deadline);
    load.wait_answers(20).await;
    let third = Duration::from_secs(drill_seconds()) / 3;
    tokio::time::sleep(third).await;
    load.mark_fault();
    fault(stack, &load).await;
    tokio::time::sleep(third * 2).await;
    (load.stop().await, samples)
}

/// A drill's report and the outcomes it judged (for assertions beyond the report's).
pub struct DrillFound {
    pub report: DrillReport,
    pub outcomes: Vec<Outcome>,
}
