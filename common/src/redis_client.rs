//! Redis clients for every process, from `[redis]`: plain `redis://`, or `rediss://` (TLS,
//! rustls) trusting the system's roots or `tls_ca`, with an optional client certificate.

use redis::{ErrorKind, RedisError};

use crate::config::RedisConfig;

/// A client for `cfg.url` with `cfg`'s TLS settings (no connection is made yet).
pub fn client(cfg: &RedisConfig) -> Result<redis::Client, RedisError> {
    if cfg.tls_ca.is_none() && cfg.tls_cert.is_none() {
        return redis::Client::open(cfg.url.as_str());
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "cannot read a Redis TLS file",
                format!("{}: {e}", path.display()),
            ))
        })
    };
    let client_tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    let root_cert = cfg.tls_ca.as_deref().map(read).transpose()?;
    redis::Client::build_with_tls(
        cfg.url.as_str(),
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}
