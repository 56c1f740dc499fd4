//! Triton's model repository extension, for hot-swapping ONNX models while serving:
//! `POST /v2/repository/models/{name}/load` loads a new version into every worker serving the
//! model (from `parameters."file:<name>"`, the file's base64 bytes as Triton takes them; from
//! `parameters.onnx`, a path the workers can read; or, with neither, the config's file again),
//! answering once the workers reported: 200 when each loaded, checked and swapped it in, 400
//! naming why when one could not (the old version keeps serving there). `unload` is refused:
//! a model serves for as long as its workers run; roll back by loading the earlier file.

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Json;
use base64::Engine;
use serde_json::{Value, json};
use sluice_common::control::{self, PushRefused, PushSource};

use crate::error::ApiError;
use crate::servable::Shared;

/// How long a load waits for the workers' reports.
const REPORTS_WITHIN: Duration = Duration::from_secs(60);
/// How long after the last report a load waits for more (other workers of the model).
const REPORTS_SETTLE: Duration = Duration::from_millis(700);

/// `POST /v2/repository/models/{name}/load`.
pub(crate) async fn load(
    State(gw): Shared,
    Path(name): Path<String>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let limits = &gw.config().gateway;
    let (_, body) =
        crate::infer::read_body(req, limits.max_body_bytes, limits.body_read_timeout).await?;
    let params = if body.is_empty() {
        serde_json::Map::new()
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("load body is not JSON: {e}")))?;
        // Found by schemathesis: `[null, null]` used to load the config's file again.
        if !v.is_object() {
            return Err(ApiError::BadRequest(
                "load body must be a JSON object ({\"parameters\": {...}})".into(),
            ));
        }
        match v.get("parameters") {
            None => serde_json::Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "'parameters' must be an object".into(),
                ));
            }
        }
    };
    let file = params
        .iter()
        .find(|(k, _)| k.starts_with("file:"))
        .map(|(k, v)| {
            let text = v
                .as_str()
                .ok_or_else(|| ApiError::BadRequest(format!("'{k}' must be base64 text")))?;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| ApiError::BadRequest(format!("'{k}' is not base64: {e}")))
        })
        .transpose()?;
    let path = params
        .get("onnx")
        .and_then(Value::as_str)
        .map(std::path::PathBuf::from);
    let source = match (&file, &path) {
        (Some(bytes), _) => PushSource::Bytes(bytes),
        (None, Some(p)) => PushSource::File(p),
        (None, None) => PushSource::Config,
    };
    let version = params.get("version").map(|v| {
        v.as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string())
    });
    let cfg = gw.deployment.config.clone();
    let redis = sluice_common::redis_client::client(&cfg.redis)
        .map_err(|e| ApiError::Unavailable(format!("Redis: {e}")))?;
    let mut redis = redis::aio::ConnectionManager::new(redis)
        .await
        .map_err(|e| ApiError::Unavailable(format!("Redis: {e}")))?;
    let push = control::prepare_push(&gw.deployment, &mut redis, &name, source, version)
        .await
        .map_err(|e| match e {
            PushRefused::Unknown(m) => ApiError::ModelNotFound(m),
            PushRefused::Invalid(m) => ApiError::BadRequest(m),
            PushRefused::Store(e) => ApiError::BadRequest(format!("the model file: {e}")),
            PushRefused::Failed(e) => ApiError::Unavailable(e.to_string()),
        })?;
    control::publish(&gw.publisher.producer(), &mut redis, &gw.deployment, &push)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let reports = control::reports(&mut redis, &cfg, &push.id, REPORTS_WITHIN, REPORTS_SETTLE)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if reports.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "no worker serving '{name}' reported within {REPORTS_WITHIN:?}; the push (version {}) stays on the control topic and applies when one starts",
            push.version
        )));
    }
    let failures: Vec<&str> = reports
        .values()
        .filter(|r| !r.ok)
        .map(|r| r.message.as_str())
        .collect();
    if !failures.is_empty() {
        return Err(ApiError::BadRequest(failures.join("; ")));
    }
    Ok((
        StatusCode::OK,
        Json(json!({"model_name": name, "version": push.version, "workers": reports.len()})),
    ))
}

/// `POST /v2/repository/models/{name}/unload`: refused, saying how to roll back instead.
pub(crate) async fn unload(State(gw): Shared, Path(name): Path<String>) -> ApiError {
    if gw.deployment.model(&name).is_none() {
        return ApiError::ModelNotFound(name);
    }
    ApiError::BadRequest(format!(
        "unload is not supported: '{name}' serves while its workers run; to roll back, load the earlier file (sluice models push {name} FILE)"
    ))
}
