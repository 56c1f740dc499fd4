//! Finding what a request names: the model or graph (and version) it calls, or 404.

use std::sync::Arc;

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

/// The model or graph called `name` at `version`, or 404.
pub(crate) fn model_version<'a>(
    gw: &'a Gateway,
    name: &str,
    version: &str,
) -> Result<&'a Servable, ApiError> {
    let m = model(gw, name)?;
    if m.signature.version == version {
        Ok(m)
    } else {
        Err(ApiError::ModelNotFound(format!("{name} version {version}")))
    }
}
