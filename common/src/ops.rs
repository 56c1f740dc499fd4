//! The small HTTP ops surface every worker serves: `/metrics`, `/health/live`, `/health/ready`,
//! and `POST /admin/reload` (re-read the config's graphs, as SIGHUP does).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::sync::{mpsc, oneshot};

/// A reload request: the reply says what was reloaded, or why not.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;
use metrics_exporter_prometheus::PrometheusHandle;

#[derive(Clone)]
struct OpsState {
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    reload: Option<mpsc::Sender<ReloadRequest>>,
}

/// Binds `addr` and serves the ops endpoints until `shutdown` resolves. Returns the bound address.
pub async fn serve_ops(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    reload: Option<mpsc::Sender<ReloadRequest>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health/live", get(|| async { StatusCode::OK }))
        .route("/health/ready", get(readiness))
        .route("/admin/reload", post(reload_config))
        .with_state(OpsState {
            metrics,
            ready,
            reload,
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "ops server stopped");
        }
    });
    Ok(bound)
}

async fn render_metrics(State(s): State<OpsState>) -> String {
    s.metrics.render()
}

async fn reload_config(State(s): State<OpsState>) -> (StatusCode, String) {
    let Some(tx) = s.reload else {
        return (
            StatusCode::NOT_FOUND,
            "reload is not supported here\n".into(),
        );
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx.send(reply_tx).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match reply_rx.await {
        Ok(Ok(what)) => (StatusCode::OK, format!("{what}\n")),
        Ok(Err(why)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n")),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
    }
}

async fn readiness(State(s): State<OpsState>) -> StatusCode {
    if s.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
