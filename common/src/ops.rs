//! The small HTTP ops surface every worker serves: `/metrics`, `/health/live`, `/health/ready`,
//! and `POST /admin/reload` (re-read the config's graphs, as SIGHUP does). With
//! `[gateway.auth]` on, the same keys guard it: reload (and metrics unless `open_metrics`) need
//! a key with the `admin` scope (401 without a usable key, 403 without the scope); health stays
//! open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::config::{AuthConfig, Scope};
use tokio::sync::{mpsc, oneshot};

/// A reload request: the reply says what was reloaded, or why not.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;
use metrics_exporter_prometheus::PrometheusHandle;

#[derive(Clone)]
struct OpsState {
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    reload: Option<mpsc::Sender<ReloadRequest>>,
    /// The keys, when authentication is on.
    auth: Option<Arc<AuthConfig>>,
}

/// Binds `addr` and serves the ops endpoints until `shutdown` resolves, guarded by `auth` when
/// it is enabled. Returns the bound address.
pub async fn serve_ops(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    reload: Option<mpsc::Sender<ReloadRequest>>,
    auth: &AuthConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    announce_addr(bound);
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health/live", get(|| async { StatusCode::OK }))
        .route("/health/ready", get(readiness))
        .route("/admin/reload", post(reload_config));
    let state = OpsState {
        metrics,
        ready,
        reload,
        auth: auth.enabled.then(|| Arc::new(auth.clone())),
    };
    let app = app
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
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

/// Admits health always; the rest with an `admin` key when authentication is on.
async fn guard(State(s): State<OpsState>, req: Request, next: Next) -> Response {
    let Some(auth) = s.auth.as_ref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path.starts_with("/health/") || (path == "/metrics" && auth.open_metrics) {
        return next.run(req).await;
    }
    match crate::auth::configured_key(auth, req.headers()) {
        Err(refused) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            format!("{refused}\n"),
        )
            .into_response(),
        Ok(key) if !key.scopes.contains(&Scope::Admin) => (
            StatusCode::FORBIDDEN,
            format!("key '{}' lacks the admin scope\n", key.name),
        )
            .into_response(),
        Ok(_) => next.run(req).await,
    }
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

/// The environment variable naming a file where a process writes the address it bound (its ops
/// server's; the gateway's listener): how `sluice up` finds processes that picked a free port.
pub const OPS_ADDR_FILE: &str = "SLUICE_OPS_ADDR_FILE";

/// Writes `addr` to the file named by [`OPS_ADDR_FILE`], when it is set (atomically: written
/// beside it, then renamed, so a reader never sees half an address).
pub fn announce_addr(addr: SocketAddr) {
    let Some(path) = std::env::var_os(OPS_ADDR_FILE).map(std::path::PathBuf::from) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, addr.to_string()).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(error = %e, path = %path.display(), "cannot write the bound address");
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
