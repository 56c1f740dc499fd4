//! HTTP routes of the Open Inference Protocol v2 (server and model metadata, readiness, Triton's
//! model configuration and statistics extensions), plus `/metrics`. Inference is in [`crate::infer`].

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Json;
use axum::routing::{get, post};
use serde_json::{Value, json};
use sluice_common::deployment::Servable;

use crate::Gateway;
use crate::error::ApiError;
use crate::infer::{infer, infer_v};
use crate::servable::{Shared, model, model_version};

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
            "/v2/models/{model}/feedback",
            post(crate::feedback::feedback),
        )
        .route(
            "/v2/repository/models/{model}/load",
            post(crate::repository::load),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(crate::repository::unload),
        )
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
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gw),
            crate::auth::check,
        ))
        .with_state(gw)
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "sluice",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration", "statistics", "parameters", "model_repository", "sluice_feedback"]
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
        .deployment
        .servables()
        .iter()
        .map(|(name, s)| json!({"name": name, "version": s.signature.version, "state": if gw.is_ready() {"READY"} else {"UNAVAILABLE"}}))
        .collect();
    Json(json!({ "models": models }))
}

fn tensor_meta(specs: &[sluice_common::TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({"name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape}))
        .collect()
}

async fn metadata_json(gw: &Gateway, name: &str, s: &Servable) -> Json<Value> {
    Json(json!({
        "name": name,
        "versions": [gw.serving_version(name, s).await],
        "platform": s.kind.platform(),
        "inputs": tensor_meta(&s.signature.inputs),
        "outputs": tensor_meta(&s.signature.outputs),
    }))
}

async fn model_metadata(
    State(gw): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(metadata_json(&gw, &name, model(&gw, &name)?).await)
}

async fn model_metadata_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(metadata_json(&gw, &name, model_version(&gw, &name, &version).await?).await)
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
    model_version(&gw, &name, &version).await?;
    Ok(ready_status(&gw))
}

/// Triton's `model_configuration`: dims exclude the batch dimension. Batching and instance
/// settings come from the model's config; a graph reports no batching delay and one instance.
async fn config_json(gw: &Gateway, name: &str, s: &Servable) -> Json<Value> {
    let platform = s.kind.platform();
    let m = &s.signature;
    let version = gw.serving_version(name, s).await;
    let model = gw.deployment.model(name);
    let max_delay = model.map_or(0, |c| c.max_delay.as_micros() as u64);
    let instances = model.map_or(1, |c| c.threads * c.workers);
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
        "version_policy": {"specific": {"versions": [version]}},
        "max_batch_size": m.max_batch_size,
        "input": dims(&m.inputs),
        "output": dims(&m.outputs),
        "dynamic_batching": {
            "max_queue_delay_microseconds": max_delay,
            "preferred_batch_size": []
        },
        "instance_group": [{"name": name, "kind": "KIND_CPU", "count": instances}],
    }))
}

async fn model_config(
    State(gw): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(config_json(&gw, &name, model(&gw, &name)?).await)
}

async fn model_config_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(config_json(&gw, &name, model_version(&gw, &name, &version).await?).await)
}

async fn stats_json(gw: &Gateway, name: &str, m: &Servable) -> Json<Value> {
    let version = gw.serving_version(name, m).await;
    let stats = gw
        .stats
        .get(name)
        .map(|(s, _)| s.to_json(name, &version))
        .unwrap_or(Value::Null);
    Json(json!({ "model_stats": [stats] }))
}

async fn model_stats(State(gw): Shared, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let m = model(&gw, &name)?;
    Ok(stats_json(&gw, &name, m).await)
}

async fn model_stats_v(
    State(gw): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let m = model_version(&gw, &name, &version).await?;
    Ok(stats_json(&gw, &name, m).await)
}

async fn render_metrics(State(gw): Shared) -> String {
    gw.metrics.render()
}
