//! Finding what a request names: the model or graph (and version) it calls, or 404.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use sluice_common::deployment::Servable;

use crate::Gateway;
use crate::error::ApiError;

/// The state every route gets.
pub(crate) type Shared = State<Arc<Gateway>>;

/// The model or graph called `name`, or 404.
pub(crate) fn model<'a>(gw: &'a Gateway, name: &str) -> Result<&'a Servable, ApiError> {
    gw.deployment
        .servable(name)
        .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
}

/// The model or graph called `name` at `version` (the one it serves now), or 404.
pub(crate) async fn model_version<'a>(
    gw: &'a Gateway,
    name: &str,
    version: &str,
) -> Result<&'a Servable, ApiError> {
    let m = model(gw, name)?;
    let serving = gw.serving_version(name, m).await;
    if serving == version {
        Ok(m)
    } else {
        Err(ApiError::ModelNotFound(format!(
            "{name} version {version} (version {serving} serves now)"
        )))
    }
}

/// How long the gateway trusts the version it last read for a model.
const VERSION_FRESH_FOR: Duration = Duration::from_secs(1);

/// The versions of models read recently: name → (version, when read).
#[derive(Default)]
pub(crate) struct ServingVersions(Mutex<HashMap<String, (String, Instant)>>);

impl Gateway {
    /// The version `name` serves now: the last pushed version a worker swapped in (recorded in
    /// Redis, read at most once a second), else the config's.
    pub(crate) async fn serving_version(&self, name: &str, servable: &Servable) -> String {
        {
            let cache = self.versions.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((v, at)) = cache.get(name)
                && at.elapsed() < VERSION_FRESH_FOR
            {
                return v.clone();
            }
        }
        let key = sluice_common::control::serving_key(self.config(), name);
        let mut redis = self.redis.clone();
        let read = redis::AsyncCommands::get::<_, Option<String>>(&mut redis, key).await;
        let version = match read {
            Ok(Some(v)) => v,
            Ok(None) => servable.signature.version.clone(),
            Err(e) => {
                tracing::debug!(error = %e, "serving version not read; reporting the config's");
                return servable.signature.version.clone();
            }
        };
        self.versions
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), (version.clone(), Instant::now()));
        version
    }
}
