//! HTTP routes of the Open Inference Protocol v2, plus `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Limited};
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use sluice_common::kafka::headers as kafka_headers;
use sluice_common::model::{validate_inputs, validate_outputs};
use sluice_common::{ModelConfig, now_ms, now_us};
use sluice_schemas::{InferenceRequest, ReplyRoute, encode_request};

use crate::Gateway;
use crate::error::ApiError;
use sluice_schemas::oip::{self, HEADER_LENGTH};

type Shared = State<Arc<Gateway>>;

pub(crate) fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models", get(list_models))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/stats", get(model_stats))
        .route("/v2/models/{model}/infer", post(infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_metadata_v),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config_v),
        )
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(model_stats_v),
        )
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/metrics", get(render_metrics))
        .with_state(gw)
}

fn model<'a>(gw: &'a Gateway, name: &str) -> Result<&'a ModelConfig, ApiError> {
    gw.servables
        .get(name)
        .map(|s| &s.config)
        .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
}

fn platform(gw: &Gateway, name: &str) -> &'static str {
    gw.servables
        .get(name)
        .map(|s| s.platform)
        .unwrap_or("onnxruntime_onnx")
}

fn model_version<'a>(
    gw: &'a Gateway,
    name: &str,
    version: &str,
) -> Result<&'a ModelConfig, ApiError> {
    let m = model(gw, name)?;
    if m.version == version {
        Ok(m)
    } else {
        Err(ApiError::ModelNotFound(format!("{name} version {version}")))
    }
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "sluice",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration", "statistics", "parameters"]
    }))
}

async fn server_ready(State(gw): Shared) -> StatusCode {
    if gw.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn list_models(State(gw): Shared) -> Json<Value> {
    let models: Vec<Value> = gw
        .servables
        .iter()
        .map(|(name, s)| json!({"name": name, "version": s.config.version, "state": if gw.is_ready() {"READY"} else {"UNAVAILABLE"}}))
        .collect();
    Json(json!({ "models": models }))
}

fn tensor_meta(specs: &[sluice_common::TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({"name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape}))
        .collect()
}

fn metadata_json(name: &str, m: &ModelConfig, platform: &str) -> Json<Value> {
    Json(json!({
        "name": name,
        "versions": [m.version],
        "platform": platform,
        "inputs": tensor_meta(&m.inputs),
        "outputs": tensor_meta(&m.outputs),
    }))
}

async fn model_metadata(
    State(gw): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(metadata_json(
        &name,
        model(&gw, &name)?,
        platform(&gw, &name),
    ))
}

async fn model_metadata_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(metadata_json(
        &name,
        model_version(&gw, &name, &version)?,
        platform(&gw, &name),
    ))
}

fn ready_status(gw: &Gateway) -> StatusCode {
    if gw.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_ready(State(gw): Shared, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    model(&gw, &name)?;
    Ok(ready_status(&gw))
}

async fn model_ready_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    model_version(&gw, &name, &version)?;
    Ok(ready_status(&gw))
}

/// Triton's `model_configuration`: dims exclude the batch dimension.
fn config_json(name: &str, m: &ModelConfig, platform: &str) -> Json<Value> {
    let dims = |specs: &[sluice_common::TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| {
                let dims = &s.shape[1..];
                if dims.is_empty() {
                    // One value per batch row: Triton writes this as dims [1] reshaped to [].
                    json!({"name": s.name, "data_type": s.datatype.triton_config_name(), "dims": [1], "reshape": {"shape": []}})
                } else {
                    json!({"name": s.name, "data_type": s.datatype.triton_config_name(), "dims": dims})
                }
            })
            .collect()
    };
    Json(json!({
        "name": name,
        "platform": platform,
        "backend": if platform == "onnxruntime_onnx" { "onnxruntime" } else { "sluice" },
        "version_policy": {"specific": {"versions": [m.version]}},
        "max_batch_size": m.max_batch_size,
        "input": dims(&m.inputs),
        "output": dims(&m.outputs),
        "dynamic_batching": {
            "max_queue_delay_microseconds": m.max_delay.as_micros() as u64,
            "preferred_batch_size": []
        },
        "instance_group": [{"name": name, "kind": "KIND_CPU", "count": m.threads * m.workers}],
    }))
}

async fn model_config(
    State(gw): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(config_json(&name, model(&gw, &name)?, platform(&gw, &name)))
}

async fn model_config_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(config_json(
        &name,
        model_version(&gw, &name, &version)?,
        platform(&gw, &name),
    ))
}

fn stats_json(gw: &Gateway, name: &str, m: &ModelConfig) -> Json<Value> {
    let stats = gw
        .stats
        .get(name)
        .map(|(s, _)| s.to_json(name, &m.version))
        .unwrap_or(Value::Null);
    Json(json!({ "model_stats": [stats] }))
}

async fn model_stats(State(gw): Shared, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let m = model(&gw, &name)?;
    Ok(stats_json(&gw, &name, m))
}

async fn model_stats_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let m = model_version(&gw, &name, &version)?;
    Ok(stats_json(&gw, &name, m))
}

async fn render_metrics(State(gw): Shared) -> String {
    gw.metrics.render()
}

async fn infer_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    match model_version(&gw, &name, &version) {
        Ok(_) => infer(State(gw), Path(name), req).await,
        Err(e) => e.into_response(),
    }
}

async fn infer(State(gw): Shared, Path(name): Path<String>, req: Request) -> Response {
    let started = Instant::now();
    let result = infer_inner(&gw, &name, req).await;
    let elapsed = started.elapsed();
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status(),
    };
    if let Some((stats, m)) = gw.stats.get(&name) {
        match &result {
            Ok((_, queue_us, infer_us)) => stats.success(
                elapsed.as_nanos() as u64,
                (*queue_us).max(0) as u64 * 1000,
                (*infer_us).max(0) as u64 * 1000,
                now_ms() as u64,
            ),
            Err(_) => stats.failure(elapsed.as_nanos() as u64),
        }
        m.count(status.as_u16());
        m.duration.record(elapsed.as_secs_f64());
    }
    match result {
        Ok((resp, _, _)) => resp,
        Err(e) => {
            tracing::debug!(status = status.as_u16(), error = %e, "infer failed");
            e.into_response()
        }
    }
}

async fn read_body(req: Request, limit: usize) -> Result<(HeaderMap, bytes::Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::BadRequest(format!("reading body: {e}"))
            }
        })?
        .to_bytes();
    Ok((parts.headers, bytes))
}

fn timeout_of(gw: &Gateway, params: &serde_json::Map<String, Value>) -> Result<Duration, ApiError> {
    match params.get("timeout") {
        None => Ok(gw.cfg.gateway.default_timeout),
        Some(v) => {
            let us = v.as_u64().filter(|us| *us > 0).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "parameter 'timeout' must be a positive integer (microseconds), got {v}"
                ))
            })?;
            Ok(Duration::from_micros(us).min(gw.cfg.gateway.max_timeout))
        }
    }
}

type InferOk = (Response, i64, i64);

async fn infer_inner(gw: &Arc<Gateway>, name: &str, req: Request) -> Result<InferOk, ApiError> {
    let m = model(gw, name)?;
    let _permit =
        Arc::clone(&gw.permits)
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded {
                limit: gw.cfg.gateway.max_in_flight,
            })?;
    gw.in_flight.increment(1.0);
    let _in_flight = InFlight(gw.in_flight.clone());

    let (headers, body) = read_body(req, gw.cfg.gateway.max_body_bytes).await?;
    let json_len = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Inference-Header-Content-Length is not a number".into())
                })?,
        ),
    };
    let parsed = oip::parse_request(&body, json_len)?;
    validate_inputs(m, &parsed.inputs)?;
    let requested: Vec<String> = parsed.outputs.iter().map(|(n, _)| n.clone()).collect();
    validate_outputs(m, &requested)?;
    let timeout = timeout_of(gw, &parsed.parameters)?;

    if !gw.broker_ok.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::Unavailable(
            "the Kafka broker is unreachable".into(),
        ));
    }
    if !gw.correlator.is_subscribed() || !gw.redis_ok.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::Unavailable("Redis is unreachable".into()));
    }

    let id = gw.next_request_id();
    let deadline = tokio::time::Instant::now() + timeout;
    let route = ReplyRoute {
        channel: gw.cfg.reply_channel(&gw.id),
        key: gw.cfg.result_key(&id),
        ttl_ms: gw.cfg.redis.result_ttl.as_millis() as i64,
    };
    let parameters = parsed
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    let envelope = InferenceRequest {
        id: id.clone(),
        client_id: parsed.id.clone(),
        model: name.to_string(),
        deadline_ms: now_ms() + timeout.as_millis() as i64,
        sent_at_us: now_us(),
        reply: Some(route.clone()),
        // W3C trace context travels with the request so workers' spans can join the caller's trace.
        trace: ["traceparent", "tracestate"]
            .iter()
            .filter_map(|k| {
                let v = headers.get(*k)?.to_str().ok()?;
                Some((k.to_string(), v.to_string()))
            })
            .collect(),
        parameters,
        inputs: parsed.inputs,
        outputs: requested,
        hop: None,
        reply_format: String::new(),
    };
    let payload = encode_request(&envelope).map_err(|e| ApiError::Internal(e.to_string()))?;
    let headers = kafka_headers::build(&[
        (kafka_headers::REQUEST_ID, &id),
        (kafka_headers::REPLY_CHANNEL, &route.channel),
        (kafka_headers::REPLY_KEY, &route.key),
    ]);

    // Register before producing so the reply can never arrive unseen.
    let pending = gw.correlator.register(&id);
    let topic = gw.cfg.request_topic(name);
    let record = FutureRecord::to(&topic)
        .key(&id)
        .payload(&payload)
        .headers(headers);
    let produce_started = Instant::now();
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    match gw.producer.send(record, remaining).await {
        Ok(_) => {}
        Err((rdkafka::error::KafkaError::MessageProduction(code), _)) => {
            use rdkafka::types::RDKafkaErrorCode as C;
            return Err(match code {
                C::MessageTimedOut if tokio::time::Instant::now() >= deadline => {
                    ApiError::DeadlineExceeded(timeout)
                }
                C::QueueFull => {
                    ApiError::Unavailable("the Kafka producer queue is full; retry later".into())
                }
                other => ApiError::Unavailable(format!(
                    "could not publish the request to Kafka: {other}"
                )),
            });
        }
        Err((e, _)) => {
            return Err(ApiError::Unavailable(format!(
                "could not publish the request to Kafka: {e}"
            )));
        }
    }
    gw.produce_seconds
        .record(produce_started.elapsed().as_secs_f64());

    let result = pending
        .wait(deadline)
        .await
        .ok_or(ApiError::DeadlineExceeded(timeout))?;
    if let Some(err) = &result.error {
        return Err(match ApiError::from_result(err) {
            ApiError::DeadlineExceeded(_) => ApiError::DeadlineExceeded(timeout),
            other => other,
        });
    }
    let selected = oip::select_outputs(&result.outputs, &parsed.outputs, parsed.binary_by_default);
    let encoded = oip::encode_response(
        name,
        &result.model_version,
        parsed.id.as_deref(),
        result
            .parameters
            .iter()
            .map(|(k, v)| {
                let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
                (k.clone(), value)
            })
            .collect(),
        &selected,
    )?;
    let mut resp = Response::new(Body::from(encoded.body));
    let h = resp.headers_mut();
    match encoded.json_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok((resp, result.queue_us, result.infer_us))
}

/// Decrements the in-flight gauge when a request ends, however it ends.
struct InFlight(metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
