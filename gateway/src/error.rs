//! Every way a request can fail, and the one place that maps each to an HTTP status.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_common::signature::InputError;
use sluice_schemas::ErrorCode;
use sluice_schemas::InferenceError;

/// A request failure as the caller sees it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApiError {
    /// The request is malformed (bad JSON, bad binary framing, bad parameter).
    #[error("{0}")]
    BadRequest(String),
    /// No model of that name.
    #[error("unknown model '{0}'")]
    ModelNotFound(String),
    /// The body is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// An input tensor larger than the servable's `max_input_elements`.
    #[error("{0}")]
    TensorTooLarge(String),
    /// The client did not send the whole body within `body_read_timeout`.
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// Well-formed, but the tensors do not fit the model.
    #[error("{0}")]
    InvalidTensor(String),
    /// The in-flight cap is reached; retry later.
    #[error("too many requests in flight (limit {limit}); retry later")]
    Overloaded {
        /// The cap.
        limit: usize,
    },
    /// The broker or Redis is not reachable.
    #[error("{0}")]
    Unavailable(String),
    /// The deadline passed before an answer came.
    #[error("no answer within the deadline of {0:?}")]
    DeadlineExceeded(Duration),
    /// The model failed on this request.
    #[error("model '{step}' failed: {message}")]
    ModelFailed {
        /// The step that failed.
        step: String,
        /// Its message.
        message: String,
    },
    /// A step of a graph gave up waiting (a join short of its parts).
    #[error("{0}")]
    StepTimedOut(String),
    /// A bug or an unexpected state.
    #[error("internal error: {0}")]
    Internal(String),
    /// No credentials, malformed ones, or an unknown or revoked key.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key outside its scope or servables.
    #[error("{0}")]
    Forbidden(String),
    /// A key over its rate limit.
    #[error("key '{key}' is over its rate limit of {rate}/s; retry in {retry_after_s} s")]
    RateLimited {
        /// The key's name.
        key: String,
        /// Its rate.
        rate: f64,
        /// Seconds until a request will be admitted.
        retry_after_s: u64,
    },
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } | ApiError::TensorTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::InvalidTensor(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Overloaded { .. } | ApiError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded(_) | ApiError::StepTimedOut(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ApiError::ModelFailed { .. } | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Maps an error a worker reported in a result.
    pub fn from_result(e: &InferenceError) -> ApiError {
        let msg = if e.step.is_empty() {
            e.message.clone()
        } else {
            format!("step '{}': {}", e.step, e.message)
        };
        match e.code {
            ErrorCode::InvalidInput => ApiError::InvalidTensor(msg),
            ErrorCode::Undecodable | ErrorCode::NoRoute => ApiError::BadRequest(msg),
            ErrorCode::JoinTimeout => ApiError::StepTimedOut(msg),
            ErrorCode::Unavailable => ApiError::Unavailable(msg),
            ErrorCode::DeadlineExceeded => ApiError::DeadlineExceeded(Duration::ZERO),
            ErrorCode::ModelFailed => ApiError::ModelFailed {
                step: e.step.clone(),
                message: e.message.clone(),
            },
            ErrorCode::ProduceFailed | ErrorCode::Internal => ApiError::Internal(msg),
        }
    }
}

impl From<sluice_schemas::oip::OipError> for ApiError {
    fn from(e: sluice_schemas::oip::OipError) -> ApiError {
        use sluice_schemas::oip::OipError;
        match e {
            OipError::BadRequest(m) => ApiError::BadRequest(m),
            OipError::InvalidTensor(m) => ApiError::InvalidTensor(m),
            OipError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> ApiError {
        match e {
            InputError::TooManyElements { .. } => ApiError::TensorTooLarge(e.to_string()),
            _ => ApiError::InvalidTensor(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        let mut resp = (status, body).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::RateLimited { retry_after_s, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"sluice\""),
                );
            }
            _ if status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::ModelNotFound("m".into()), 404),
            (ApiError::PayloadTooLarge { limit: 1 }, 413),
            (ApiError::InvalidTensor("x".into()), 422),
            (ApiError::Overloaded { limit: 1 }, 429),
            (ApiError::Unavailable("x".into()), 503),
            (ApiError::DeadlineExceeded(Duration::ZERO), 504),
            (ApiError::Internal("x".into()), 500),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e:?}");
        }
    }

    #[test]
    fn overload_carries_retry_after() {
        let resp = ApiError::Overloaded { limit: 3 }.into_response();
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
    }

    #[test]
    fn worker_error_codes_map_to_statuses() {
        let e = |code: ErrorCode| InferenceError {
            code,
            message: "m".into(),
            step: "mlp".into(),
        };
        assert_eq!(
            ApiError::from_result(&e(ErrorCode::InvalidInput)).status(),
            422
        );
        assert_eq!(
            ApiError::from_result(&e(ErrorCode::DeadlineExceeded)).status(),
            504
        );
        assert_eq!(
            ApiError::from_result(&e(ErrorCode::ModelFailed)).status(),
            500
        );
        assert_eq!(
            ApiError::from_result(&e(ErrorCode::Undecodable)).status(),
            400
        );
        assert_eq!(ApiError::from_result(&e(ErrorCode::NoRoute)).status(), 400);
        assert_eq!(
            ApiError::from_result(&e(ErrorCode::JoinTimeout)).status(),
            504
        );
        assert_eq!(
            ApiError::from_result(&e(ErrorCode::Unavailable)).status(),
            503
        );
        assert_eq!(
            ApiError::from_result(&e(ErrorCode::ProduceFailed)).status(),
            500
        );
        assert_eq!(ApiError::from_result(&e(ErrorCode::Internal)).status(), 500);
        assert!(
            ApiError::from_result(&e(ErrorCode::ModelFailed))
                .to_string()
                .contains("mlp")
        );
    }
}
