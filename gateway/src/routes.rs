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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::body::Body;
    use axum::http::Request;
    use sluice_common::{Config, Deployment};
    use tower::ServiceExt;

    use super::*;

    /// One model, a broker nobody answers at, and a Redis of the test's own: the gateway comes
    /// up (not ready), and every route answers without a worker.
    const CONFIG: &str = r#"
[kafka]
brokers = "127.0.0.1:1"
[gateway]
max_body_bytes = 4096
[models.mlp]
onnx = "mlp.onnx"
version = "3"
max_batch_size = 8
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 2] }]
outputs = [{ name = "label", datatype = "INT64", shape = [-1] }]
"#;

    async fn gateway(redis_url: &str) -> Router {
        let toml = format!("{CONFIG}[redis]\nurl = \"{redis_url}\"\n");
        let deployment = Deployment::compile(Config::from_toml(&toml).unwrap()).unwrap();
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        router(Gateway::connect(deployment, metrics).await.unwrap())
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: impl Into<String>,
    ) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.into()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn metadata_and_health_routes_answer_what_the_protocol_says() {
        let Some(redis) = crate::test_redis::redis().await else {
            return;
        };
        let app = gateway(&redis.url).await;
        let (status, server) = call(&app, "GET", "/v2", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(server["name"], "sluice");
        assert_eq!(
            call(&app, "GET", "/v2/health/live", "").await.0,
            StatusCode::OK
        );
        // No broker answers: not ready, and neither is the model.
        let ready = call(&app, "GET", "/v2/health/ready", "").await.0;
        assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE);
        let (status, meta) = call(&app, "GET", "/v2/models/mlp", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(meta["name"], "mlp");
        assert_eq!(meta["inputs"][0]["name"], "input");
        assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 2]));
        let (status, err) = call(&app, "GET", "/v2/models/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(err["error"].as_str().unwrap().contains("nope"), "{err}");
        let (status, _) = call(&app, "GET", "/v2/models/mlp/versions/3", "").await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = call(&app, "GET", "/v2/models/mlp/versions/4", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            call(&app, "GET", "/v2/nowhere", "").await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn infer_checks_the_request_before_the_broker() {
        let Some(redis) = crate::test_redis::redis().await else {
            return;
        };
        let app = gateway(&redis.url).await;
        let infer = |body: &str| call(&app, "POST", "/v2/models/mlp/infer", body.to_string());
        let ok = r#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#;
        // Malformed JSON: 400; a tensor that does not fit the model: 422 naming it.
        assert_eq!(infer("{").await.0, StatusCode::BAD_REQUEST);
        let wide = ok
            .replace("[1,2],\"datatype", "[1,3],\"datatype")
            .replace("[1,2]}", "[1,2,3]}");
        let (status, err) = infer(&wide).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
        assert!(err["error"].as_str().unwrap().contains("input"), "{err}");
        // Over the body limit: 413; a valid request with no broker: 503 saying so.
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000));
        assert_eq!(infer(&big).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, err) = infer(ok).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            err["error"].as_str().unwrap().contains("Kafka broker"),
            "{err}"
        );
        // A model nobody serves: 404.
        let (status, _) = call(&app, "POST", "/v2/models/nope/infer", ok.to_string()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
