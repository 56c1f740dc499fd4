//! API-key checks shared by the gateway and the workers' and learners' ops ports: the key a
//! request presents (`Authorization: Bearer <key>` or `X-API-Key: <key>`), found by its
//! SHA-256 among the configured keys. Keys are never logged (their names are).

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::{ApiKey, AuthConfig};

/// The SHA-256 of `key` as lowercase hex: what `[[gateway.auth.keys]] sha256` holds.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a request's credentials are refused (answered 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefused {
    /// No key header at all.
    #[error("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")]
    Missing,
    /// An Authorization header that is not `Bearer <key>`.
    #[error("malformed Authorization header: expected 'Bearer <key>'")]
    Malformed,
    /// No configured key has this hash.
    #[error("unknown API key")]
    Unknown,
    /// The key is configured as revoked.
    #[error("API key '{0}' is revoked")]
    Revoked(String),
}

/// The key the request presents, as sent.
pub fn presented_key(headers: &HeaderMap) -> Result<String, KeyRefused> {
    match (
        headers.get(axum::http::header::AUTHORIZATION),
        headers.get("x-api-key"),
    ) {
        (Some(v), _) => v
            .to_str()
            .unwrap_or_default()
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .ok_or(KeyRefused::Malformed),
        (None, Some(v)) => Ok(v.to_str().unwrap_or_default().trim().to_string()),
        (None, None) => Err(KeyRefused::Missing),
    }
}

/// The key configured in `auth`, unrevoked, that the request presents.
pub fn configured_key<'a>(
    auth: &'a AuthConfig,
    headers: &HeaderMap,
) -> Result<&'a ApiKey, KeyRefused> {
    let hash = hash_key(&presented_key(headers)?);
    let key = auth
        .keys
        .iter()
        .find(|k| k.sha256 == hash)
        .ok_or(KeyRefused::Unknown)?;
    if key.revoked {
        tracing::info!(key = %key.name, "a revoked key was refused");
        return Err(KeyRefused::Revoked(key.name.clone()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hashes_match_sha256sum() {
        // `printf abc | sha256sum`
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
