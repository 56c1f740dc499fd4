//! API keys at the gateway (`[gateway.auth]`): every route but health needs a key, sent as
//! `Authorization: Bearer <key>` or `X-API-Key: <key>`. Keys are known only by their SHA-256;
//! each has scopes (infer, feedback, admin), the servables it may reach and an optional rate
//! limit. 401: no key, a malformed header, an unknown or revoked key; 403: a key outside its
//! scope or its servables; 429 with `Retry-After`: over its rate. Keys are never logged (their
//! names are).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sluice_common::auth::{KeyRefused, presented_key};
use sluice_common::config::{ApiKey, AuthConfig, Scope};

use crate::error::ApiError;
use crate::servable::Shared;

pub use sluice_common::auth::hash_key;

/// The keys, by hash, and each key's rate bucket.
pub(crate) struct Keys {
    by_hash: HashMap<String, Arc<ApiKey>>,
    /// Bearer JWTs, when configured.
    jwt: Option<crate::jwt::Verifier>,
    open_metrics: bool,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A token bucket: `tokens` left at `at`.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// What a route needs.
#[derive(Debug, PartialEq)]
enum Need<'a> {
    /// Nothing (health).
    Open,
    /// Any valid key (server metadata, the model list).
    AnyKey,
    /// A key with this scope reaching this servable (or none named).
    Scope(Scope, Option<&'a str>),
}

impl Keys {
    /// The keys of `cfg` (`None` when authentication is off), or why the JWKS is unusable.
    pub(crate) fn new(cfg: &AuthConfig) -> Result<Option<Keys>, String> {
        if !cfg.enabled {
            return Ok(None);
        }
        Ok(Some(Keys {
            by_hash: cfg
                .keys
                .iter()
                .map(|k| (k.sha256.clone(), Arc::new(k.clone())))
                .collect(),
            jwt: cfg
                .jwt
                .as_ref()
                .map(crate::jwt::Verifier::load)
                .transpose()?,
            open_metrics: cfg.open_metrics,
            buckets: Mutex::new(HashMap::new()),
        }))
    }

    fn need<'a>(&self, path: &'a str) -> Need<'a> {
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        match parts.as_slice() {
            ["", "v2", "health", ..] => Need::Open,
            ["", "metrics"] if self.open_metrics => Need::Open,
            ["", "metrics"] => Need::Scope(Scope::Admin, None),
            ["", "v2", "repository", "models", m, ..] => Need::Scope(Scope::Admin, Some(m)),
            ["", "v2", "repository", ..] => Need::Scope(Scope::Admin, None),
            ["", "v2", "models", m, "feedback"] => Need::Scope(Scope::Feedback, Some(m)),
            ["", "v2", "models", m, ..] => Need::Scope(Scope::Infer, Some(m)),
            _ => Need::AnyKey,
        }
    }

    /// Whether the request may go on, or the error that answers it.
    fn admit(&self, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        let need = self.need(path);
        if need == Need::Open {
            return Ok(());
        }
        let key = self.key_of(headers)?;
        if let Need::Scope(scope, servable) = need {
            let allowed = key.scopes.contains(&scope) || key.scopes.contains(&Scope::Admin);
            if !allowed {
                return Err(ApiError::Forbidden(format!(
                    "key '{}' lacks the {scope:?} scope",
                    key.name
                )));
            }
            if let Some(s) = servable.filter(|s| !key.reaches(s)) {
                return Err(ApiError::Forbidden(format!(
                    "key '{}' may not reach '{s}'",
                    key.name
                )));
            }
        }
        self.take_token(&key)
    }

    /// The key the request presents.
    fn key_of(&self, headers: &HeaderMap) -> Result<Arc<ApiKey>, ApiError> {
        let unauthorized = |e: KeyRefused| ApiError::Unauthorized(e.to_string());
        let presented = presented_key(headers).map_err(unauthorized)?;
        // A JSON Web Token: header.payload.signature.
        if let Some(jwt) = self
            .jwt
            .as_ref()
            .filter(|_| presented.matches('.').count() == 2)
        {
            return jwt
                .verify(&presented)
                .map(Arc::new)
                .map_err(ApiError::Unauthorized);
        }
        let key = self
            .by_hash
            .get(&hash_key(&presented))
            .ok_or_else(|| unauthorized(KeyRefused::Unknown))?;
        if key.revoked {
            tracing::info!(key = %key.name, "a revoked key was refused");
            return Err(unauthorized(KeyRefused::Revoked(key.name.clone())));
        }
        Ok(Arc::clone(key))
    }

    /// Takes one token from the key's bucket, or says when one will be there.
    fn take_token(&self, key: &ApiKey) -> Result<(), ApiError> {
        let Some(rate) = key.rate else {
            return Ok(());
        };
        let burst = key.burst.unwrap_or(rate).max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(key.name.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - b.tokens) / rate).ceil().max(1.0) as u64;
        Err(ApiError::RateLimited {
            key: key.name.clone(),
            rate,
            retry_after_s: wait,
        })
    }
}

/// The middleware: admits the request or answers 401/403/429.
pub(crate) async fn check(State(gw): Shared, req: Request, next: Next) -> Response {
    let Some(keys) = gw.keys.as_ref() else {
        return next.run(req).await;
    };
    match keys.admit(req.uri().path(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;

    fn keys(extra: &str) -> Keys {
        let cfg: AuthConfig = toml::from_str(&format!(
            "enabled = true\nopen_metrics = false\n[[keys]]\nname = \"team-a\"\nsha256 = \"{}\"\nscopes = [\"infer\"]\nservables = [\"mlp\"]\n{extra}[[keys]]\nname = \"ops\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n[[keys]]\nname = \"gone\"\nsha256 = \"{}\"\nscopes = [\"infer\"]\nrevoked = true\n",
            hash_key("a-secret"),
            hash_key("ops-secret"),
            hash_key("old-secret"),
        ))
        .unwrap();
        Keys::new(&cfg).unwrap().unwrap()
    }

    fn with(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    fn status(r: Result<(), ApiError>) -> u16 {
        r.map_or_else(|e| e.status().as_u16(), |()| 200)
    }

    #[test]
    fn each_route_needs_its_scope_and_servable() {
        let k = keys("");
        let a = with("authorization", "Bearer a-secret");
        let none = HeaderMap::new();
        assert_eq!(status(k.admit("/v2/health/ready", &none)), 200);
        assert_eq!(status(k.admit("/v2/models/mlp/infer", &none)), 401);
        assert_eq!(
            status(k.admit("/v2/models/mlp/infer", &with("authorization", "Basic x"))),
            401
        );
        assert_eq!(
            status(k.admit("/v2/models/mlp/infer", &with("x-api-key", "nope"))),
            401
        );
        assert_eq!(
            status(k.admit("/v2/models/mlp/infer", &with("x-api-key", "old-secret"))),
            401
        );
        assert_eq!(status(k.admit("/v2/models/mlp/infer", &a)), 200);
        assert_eq!(status(k.admit("/v2/models/mlp/versions/1/infer", &a)), 200);
        assert_eq!(status(k.admit("/v2/models/logreg/infer", &a)), 403);
        assert_eq!(status(k.admit("/v2/models/mlp/feedback", &a)), 403);
        assert_eq!(status(k.admit("/v2/repository/models/mlp/load", &a)), 403);
        assert_eq!(status(k.admit("/metrics", &a)), 403);
        assert_eq!(status(k.admit("/v2/models", &a)), 200);
        let ops = with("x-api-key", "ops-secret");
        assert_eq!(status(k.admit("/v2/repository/models/mlp/load", &ops)), 200);
        assert_eq!(status(k.admit("/metrics", &ops)), 200);
    }

    #[test]
    fn a_key_over_its_rate_waits_for_its_bucket() {
        let k = keys("rate = 2.0\nburst = 3\n");
        let a = with("authorization", "Bearer a-secret");
        let got: Vec<u16> = (0..4)
            .map(|_| status(k.admit("/v2/models/mlp/infer", &a)))
            .collect();
        assert_eq!(got, [200, 200, 200, 429]);
        let Err(ApiError::RateLimited { retry_after_s, .. }) = k.admit("/v2/models/mlp/infer", &a)
        else {
            panic!("not rate limited")
        };
        assert_eq!(retry_after_s, 1);
        assert_eq!(
            hash_key("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
