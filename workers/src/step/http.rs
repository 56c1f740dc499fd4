//! HTTP call steps: an external JSON API called per row (a URL template filled from the row's
//! inputs) or per batch (`{"instances": [...]}` → `{"predictions": [...]}`), its JSON fields
//! output as tensors. Each attempt has a timeout; connection errors, timeouts and 5xx answers
//! are retried with doubling backoff while the request's deadline allows; a 4xx answer is the
//! request's fault (422). Consecutive failures open a circuit breaker: calls then fail at once
//! with 503 until `open_for` has passed and a probe call succeeds. Calls in flight are bounded.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value as Json};
use sluice_common::config::{FeatureSpec, HttpConfig, HttpMode, OnMissing};
use sluice_features::Value;
use sluice_schemas::{DataType, Number, Tensor};
use tokio::sync::Semaphore;

use super::features::{missing_value, to_tensor};
use super::seam::{Step, StepFailure, StepInput, StepResult};

/// An HTTP call step.
pub struct HttpStep {
    config: HttpConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    slots: Semaphore,
    breaker: Mutex<Breaker>,
    calls: metrics::Counter,
    failures: metrics::Counter,
}

/// Consecutive failures, and when the circuit opened.
#[derive(Default)]
struct Breaker {
    failures: u32,
    opened: Option<Instant>,
}

/// Why one call failed: worth retrying (and counting against the breaker), or not.
enum CallError {
    Retry(String),
    Final(StepFailure),
}

impl HttpStep {
    /// The step for `config`.
    pub fn new(step: &str, config: &HttpConfig) -> HttpStep {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        let label = [("step", step.to_string())];
        HttpStep {
            client: Client::builder(TokioExecutor::new()).build(connector),
            slots: Semaphore::new(config.concurrency.max(1)),
            breaker: Mutex::new(Breaker::default()),
            calls: metrics::counter!("sluice_http_step_calls_total", &label),
            failures: metrics::counter!("sluice_http_step_failures_total", &label),
            config: config.clone(),
        }
    }

    fn circuit_open(&self) -> bool {
        let b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        b.opened
            .is_some_and(|at| at.elapsed() < self.config.open_for)
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            *b = Breaker::default();
        } else {
            self.failures.increment(1);
            b.failures += 1;
            if b.failures >= self.config.breaker_failures {
                b.opened = Some(Instant::now());
            }
        }
    }

    /// One attempt.
    async fn attempt(
        &self,
        url: &str,
        body: Option<&Json>,
        wait: Duration,
    ) -> Result<Json, CallError> {
        let method = if body.is_some() { "POST" } else { "GET" };
        let payload = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let req = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(Full::new(payload))
            .map_err(|e| {
                CallError::Final(StepFailure::invalid(format!("bad request URL {url}: {e}")))
            })?;
        self.calls.increment(1);
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| CallError::Retry(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Retry(e.to_string()))?
                .to_bytes();
            if status.is_server_error() {
                return Err(CallError::Retry(format!("answered {status}")));
            }
            if !status.is_success() {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                return Err(CallError::Final(StepFailure::invalid(format!(
                    "{url} answered {status}: {text}"
                ))));
            }
            serde_json::from_slice(&bytes).map_err(|e| {
                CallError::Final(StepFailure::unavailable(format!(
                    "{url} answered with bad JSON: {e}"
                )))
            })
        };
        tokio::time::timeout(wait, call)
            .await
            .map_err(|_| CallError::Retry(format!("no answer within {}ms", wait.as_millis())))?
    }

    /// A call with retries within the job's deadline, through the breaker and the concurrency
    /// bound.
    async fn call(
        &self,
        url: &str,
        body: Option<&Json>,
        job: &StepInput,
    ) -> Result<Json, StepFailure> {
        if self.circuit_open() {
            return Err(StepFailure::unavailable(format!(
                "{}: circuit open after {} consecutive failures",
                self.host(),
                self.config.breaker_failures
            )));
        }
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| StepFailure::unavailable("the step is shutting down"))?;
        let mut backoff = self.config.backoff;
        let mut last = String::new();
        for attempt in 0..=self.config.retries {
            let left = job.time_left();
            if left.is_zero() || (attempt > 0 && left <= backoff) {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            match self.attempt(url, body, self.config.timeout.min(left)).await {
                Ok(json) => {
                    self.record(true);
                    return Ok(json);
                }
                Err(CallError::Final(f)) => {
                    self.record(true);
                    return Err(f);
                }
                Err(CallError::Retry(e)) => last = e,
            }
        }
        self.record(false);
        Err(StepFailure::unavailable(format!("{}: {last}", self.host())))
    }

    fn host(&self) -> String {
        let rest = self.config.url.trim_start_matches("http://");
        format!("http://{}", rest.split('/').next().unwrap_or(rest))
    }

    async fn job(&self, job: StepInput) -> StepResult {
        let rows = job.rows();
        let columns = row_values(&job)?;
        let row_json = |r: usize| -> Json {
            Json::Object(
                columns
                    .iter()
                    .map(|(name, vals)| (name.clone(), vals[r].clone()))
                    .collect::<Map<String, Json>>(),
            )
        };
        let answers: Vec<Json> = match self.config.mode {
            HttpMode::Row => {
                let calls = (0..rows).map(|r| {
                    let url = fill(&self.config.url, &columns, r);
                    let body = (self.config.method == "POST").then(|| row_json(r));
                    let job = &job;
                    async move { self.call(&url, body.as_ref(), job).await }
                });
                futures::future::join_all(calls)
                    .await
                    .into_iter()
                    .collect::<Result<_, _>>()?
            }
            HttpMode::Batch => {
                let body =
                    serde_json::json!({ "instances": (0..rows).map(row_json).collect::<Vec<_>>() });
                let answer = self.call(&self.config.url, Some(&body), &job).await?;
                let predictions = answer
                    .get("predictions")
                    .and_then(Json::as_array)
                    .filter(|p| p.len() == rows)
                    .ok_or_else(|| {
                        StepFailure::unavailable(format!(
                            "{} did not answer {rows} predictions",
                            self.host()
                        ))
                    })?;
                predictions.clone()
            }
        };
        self.config
            .fields
            .iter()
            .map(|f| {
                let spec = FeatureSpec {
                    name: f.name.clone(),
                    view: None,
                    datatype: f.datatype,
                    length: None,
                    default: f.default.clone(),
                };
                let path = f.path.as_deref().unwrap_or(&f.name);
                let values = answers
                    .iter()
                    .enumerate()
                    .map(|(r, a)| match lookup(a, path) {
                        Some(v) => Ok(v),
                        None => missing_value(
                            OnMissing::Default,
                            &spec,
                            format!("row {r}: the answer has no field '{path}'"),
                        ),
                    })
                    .collect::<Result<Vec<Value>, StepFailure>>()?;
                to_tensor(&spec, &values)
            })
            .collect()
    }
}

/// Each input's values as JSON, one per row.
fn row_values(job: &StepInput) -> Result<Vec<(String, Vec<Json>)>, StepFailure> {
    job.tensors
        .iter()
        .map(|t| Ok((t.name.clone(), tensor_json(t)?)))
        .collect()
}

fn tensor_json(t: &Tensor) -> Result<Vec<Json>, StepFailure> {
    if t.datatype == DataType::Bytes {
        return Ok(t
            .bytes_elements()
            .map_err(|e| StepFailure::invalid(e.to_string()))?
            .into_iter()
            .map(|e| Json::String(String::from_utf8_lossy(e).into_owned()))
            .collect());
    }
    let values = t
        .numbers()
        .ok_or_else(|| StepFailure::invalid(format!("'{}' is {}", t.name, t.datatype)))?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Number::Int(n) => Ok(Json::from(n)),
            Number::UInt(n) => Ok(Json::from(n)),
            Number::Bool(b) => Ok(Json::from(u8::from(b))),
            Number::Float(f) => serde_json::Number::from_f64(f)
                .map(Json::Number)
                .ok_or_else(|| {
                    StepFailure::invalid(format!(
                        "'{}' element {i} is {f}, which JSON cannot carry",
                        t.name
                    ))
                }),
        })
        .collect()
}

/// The URL with each `{input}` replaced by that input's value for row `r`, URL-encoded.
fn fill(template: &str, columns: &[(String, Vec<Json>)], r: usize) -> String {
    let mut url = template.to_string();
    for (name, vals) in columns {
        let pattern = format!("{{{name}}}");
        if url.contains(&pattern) {
            let text = match &vals[r] {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            };
            url = url.replace(&pattern, &encode(&text));
        }
    }
    url
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The field at a dotted path, as a value (`None` when absent or null).
fn lookup(answer: &Json, path: &str) -> Option<Value> {
    let mut v = answer;
    for part in path.split('.') {
        v = match v {
            Json::Object(m) => m.get(part)?,
            Json::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match v {
        Json::Null => None,
        Json::Bool(b) => Some(Value::Bool(*b)),
        // Integers stay exact (never through a float).
        Json::Number(n) => n
            .as_i64()
            .map(Number::Int)
            .or_else(|| n.as_u64().map(Number::UInt))
            .or_else(|| n.as_f64().map(Number::Float))
            .map(Value::from),
        Json::String(s) => Some(Value::Text(s.clone().into_bytes())),
        other => Some(Value::Text(other.to_string().into_bytes())),
    }
}

impl Step for HttpStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(
            async move { futures::future::join_all(batch.into_iter().map(|j| self.job(j))).await },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_go_out_as_exact_json_and_big_integers_come_back_exact() {
        let big = -2_654_276_660_701_483_516i64;
        let t = Tensor::from_values("id", DataType::Int64, vec![2], &[big, i64::MAX]);
        let json = tensor_json(&t).unwrap_or_default();
        assert_eq!(json, vec![Json::from(big), Json::from(i64::MAX)]);
        let u = Tensor::from_values("u", DataType::Uint64, vec![1], &[u64::MAX]);
        assert_eq!(
            tensor_json(&u).unwrap_or_default(),
            vec![Json::from(u64::MAX)]
        );
        let nan = Tensor::from_values("x", DataType::Fp32, vec![1], &[f32::NAN]);
        assert!(
            tensor_json(&nan).is_err(),
            "NaN is refused, not sent as null"
        );
        let answer: Json =
            serde_json::from_str(r#"{"id": -2654276660701483516, "huge": 18446744073709551615}"#)
                .unwrap_or_default();
        assert_eq!(lookup(&answer, "id"), Some(Value::Int(big)));
        // Past i64 no lookup datatype holds it: kept as digits, so an INT64 field refuses it.
        assert_eq!(
            lookup(&answer, "huge"),
            Some(Value::Text(b"18446744073709551615".to_vec()))
        );
    }

    #[test]
    fn templates_fill_and_fields_resolve() {
        let cols = vec![("user".to_string(), vec![Json::from("a b/ü")])];
        assert_eq!(
            fill("http://h/u/{user}?x=1", &cols, 0),
            "http://h/u/a%20b%2F%C3%BC?x=1"
        );
        let answer = serde_json::json!({"score": 0.5, "n": 3, "info": {"tier": "gold", "ok": true}, "l": [1, 2]});
        assert_eq!(lookup(&answer, "score"), Some(Value::Float(0.5)));
        assert_eq!(lookup(&answer, "n"), Some(Value::Int(3)));
        assert_eq!(
            lookup(&answer, "info.tier"),
            Some(Value::Text(b"gold".to_vec()))
        );
        assert_eq!(lookup(&answer, "info.ok"), Some(Value::Bool(true)));
        assert_eq!(lookup(&answer, "l.1"), Some(Value::Int(2)));
        assert_eq!(lookup(&answer, "missing"), None);
    }
}
