//! The inference route: admission (in-flight limit, body size), parsing and validation against the
//! servable's signature, publishing, then waiting for the correlated reply until the deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use sluice_common::signature::{validate_inputs, validate_outputs};
use sluice_common::{now_ms, now_us};
use sluice_schemas::InferenceRequest;
use sluice_schemas::oip::{self, HEADER_LENGTH};

use crate::Gateway;
use crate::correlator::Unanswered;
use crate::error::ApiError;
use crate::servable::{Shared, model, model_version};

/// `POST /v2/models/{model}/versions/{version}/infer`.
pub(crate) async fn infer_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    match model_version(&gw, &name, &version).await {
        Ok(_) => infer(State(gw), Path(name), req).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /v2/models/{model}/infer`: answers with the outputs, or an error with its status.
pub(crate) async fn infer(State(gw): Shared, Path(name): Path<String>, req: Request) -> Response {
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

/// Reads the whole body: 413 over `limit` bytes, 408 when it has not arrived within `within`.
pub(crate) async fn read_body(
    req: Request,
    limit: usize,
    within: Duration,
) -> Result<(HeaderMap, bytes::Bytes), ApiError> {
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
    let bytes = tokio::time::timeout(within, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::BodyTimeout(within))?
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
        None => Ok(gw.config().gateway.default_timeout),
        Some(v) => {
            let us = v.as_u64().filter(|us| *us > 0).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "parameter 'timeout' must be a positive integer (microseconds), got {v}"
                ))
            })?;
            Ok(Duration::from_micros(us).min(gw.config().gateway.max_timeout))
        }
    }
}

type InferOk = (Response, i64, i64);

/// One request's path in order: admission, parse and validate, envelope, publish, wait for
/// the answer, encode it. Each step's error maps to its own status.
async fn infer_inner(gw: &Arc<Gateway>, name: &str, req: Request) -> Result<InferOk, ApiError> {
    let m = &model(gw, name)?.signature;
    let _permit =
        Arc::clone(&gw.permits)
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded {
                limit: gw.config().gateway.max_in_flight,
            })?;
    gw.in_flight.increment(1.0);
    let _in_flight = InFlight(gw.in_flight.clone());

    let (headers, mut parsed) = read_request(gw, m, req).await?;
    let timeout = timeout_of(gw, &parsed.parameters)?;
    check_dependencies(gw)?;
    let id = gw.next_request_id();
    let deadline = tokio::time::Instant::now() + timeout;
    let envelope = envelope(gw, name, &id, timeout, &headers, &mut parsed);

    // Register before producing so the reply can never arrive unseen.
    let pending = gw.correlator.register(&id);
    let produce_started = Instant::now();
    let in_flight = gw.config().gateway.max_in_flight - gw.permits.available_permits();
    gw.publisher
        .publish(name, &envelope, deadline, timeout, in_flight)
        .await?;
    gw.produce_seconds
        .record(produce_started.elapsed().as_secs_f64());

    let result = pending.wait(deadline).await.map_err(|why| match why {
        Unanswered::Deadline => ApiError::DeadlineExceeded(timeout),
        Unanswered::ShuttingDown => ApiError::Unavailable(format!(
            "the gateway is shutting down and request '{id}' was not answered within its drain; it may still be processed"
        )),
    })?;
    if let Some(err) = &result.error {
        return Err(match ApiError::from_result(err) {
            ApiError::DeadlineExceeded(_) => ApiError::DeadlineExceeded(timeout),
            other => other,
        });
    }
    let resp = response(name, &id, &parsed, &result)?;
    Ok((resp, result.queue_us, result.infer_us))
}

/// Reads the body (within the servable's size limit) and parses and validates it.
async fn read_request(
    gw: &Gateway,
    m: &sluice_common::Signature,
    req: Request,
) -> Result<(HeaderMap, oip::ParsedRequest), ApiError> {
    let limits = &gw.config().gateway;
    let limit = m
        .max_body_bytes
        .map_or(limits.max_body_bytes, |l| l.min(limits.max_body_bytes));
    let (headers, body) = read_body(req, limit, limits.body_read_timeout).await?;
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
    Ok((headers, parsed))
}

/// 503 when the broker or Redis is known to be unreachable (nothing is published then).
fn check_dependencies(gw: &Gateway) -> Result<(), ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    if !gw.broker_ok.load(Relaxed) {
        return Err(ApiError::Unavailable(
            "the Kafka broker is unreachable".into(),
        ));
    }
    if !gw.correlator.is_subscribed() || !gw.redis_ok.load(Relaxed) {
        return Err(ApiError::Unavailable("Redis is unreachable".into()));
    }
    Ok(())
}

/// The request envelope published for the workers (the parsed inputs move into it).
fn envelope(
    gw: &Gateway,
    name: &str,
    id: &str,
    timeout: Duration,
    headers: &HeaderMap,
    parsed: &mut oip::ParsedRequest,
) -> InferenceRequest {
    InferenceRequest {
        id: id.to_string(),
        client_id: parsed.id.clone(),
        model: name.to_string(),
        deadline: Some(sluice_schemas::Deadline::after(timeout)),
        sent_at_us: now_us(),
        reply: Some(gw.publisher.reply_route(id, timeout)),
        // W3C trace context travels with the request so workers' spans can join the caller's trace.
        trace: ["traceparent", "tracestate"]
            .iter()
            .filter_map(|k| {
                let v = headers.get(*k)?.to_str().ok()?;
                Some((k.to_string(), v.to_string()))
            })
            .collect(),
        parameters: parsed
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        inputs: std::mem::take(&mut parsed.inputs),
        outputs: parsed.outputs.iter().map(|(n, _)| n.clone()).collect(),
        hop: None,
        reply_format: sluice_schemas::ReplyFormat::Avro,
    }
}

/// The answer as the caller asked for it (JSON, or binary tensors after a JSON header).
fn response(
    name: &str,
    id: &str,
    parsed: &oip::ParsedRequest,
    result: &sluice_schemas::InferenceResult,
) -> Result<Response, ApiError> {
    let selected = oip::select_outputs(&result.outputs, &parsed.outputs, parsed.binary_by_default);
    let encoded = oip::encode_response(
        name,
        &result.model_version,
        // The caller's id, or Sluice's own: feedback names the answer by it.
        Some(parsed.id.as_deref().unwrap_or(id)),
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
    Ok(resp)
}

/// Decrements the in-flight gauge when a request ends, however it ends.
struct InFlight(metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
