//! The HTTP accept loop: at most `max_connections` open at once (one more is answered 503 and
//! closed, so a flood of idle connections cannot exhaust the process), headers within
//! `header_read_timeout` (a slow-loris client is cut off, the TLS handshake included), HTTPS
//! when `[gateway.tls]` names a certificate, and a graceful drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use sluice_common::config::TlsConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Limits on the connections one gateway holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
}

/// How long in-flight requests may take to finish once shutdown begins.
const DRAIN_WITHIN: Duration = Duration::from_secs(30);

/// The answer to a connection over the limit.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 55\r\n\r\n{\"error\":\"too many connections to the gateway; retry\"}\n";

/// The TLS side of the gateway: its certificate chain and key from PEM files, TLS 1.2 and 1.3
/// (rustls with ring), HTTP/1.1 by ALPN.
pub(crate) fn tls_acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, String> {
    let cert = |e: &dyn std::fmt::Display| format!("gateway.tls.cert {}: {e}", cfg.cert.display());
    let certs = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| cert(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert(&e))?;
    if certs.is_empty() {
        return Err(cert(&"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| format!("gateway.tls.key {}: {e}", cfg.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("gateway.tls: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` (over TLS when `tls` is set) until `shutdown` resolves, then
/// waits for open connections' requests to finish (up to 30 s).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics::counter!("sluice_gateway_connections_refused_total").increment(1);
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (http, app, tls, watcher) =
            (http.clone(), app.clone(), tls.clone(), graceful.watcher());
        let handshake_within = limits.header_read_timeout;
        tokio::spawn(async move {
            match tls {
                None => serve_connection(&http, stream, app, watcher).await,
                Some(tls) => {
                    match tokio::time::timeout(handshake_within, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(&http, stream, app, watcher).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_WITHIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(within = ?DRAIN_WITHIN, "connections still open after the drain; closing them");
    }
}

/// Serves HTTP/1.1 on one connection until it closes (or the drain ends it).
async fn serve_connection<I>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    app: Router,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    // Errors here are the client's (a reset, a header timeout): nothing to act on.
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await
    })
    .await;
}
