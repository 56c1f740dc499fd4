//! `POST /v2/models/{model}/feedback` (a Sluice extension): the true label and/or a reward for
//! an earlier answer, by its `id`, published to the model's feedback topic (keyed by that id,
//! like the model's logged predictions) for its learner to join. 202 once the broker has it.

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Json;
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use sluice_schemas::learning::{FeedbackRecord, encode_feedback};

use crate::error::ApiError;
use crate::servable::{Shared, model};

/// How long the broker may take to acknowledge feedback.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts feedback for `model`'s answer: 202, 404 for an unknown model, 422 for a body that is
/// not `{"id": "...", "truth": 0|1, "reward": 0..1}` (at least one of truth and reward) or a
/// model that does not learn, 503 when the broker does not take it.
pub(crate) async fn feedback(
    State(gw): Shared,
    Path(name): Path<String>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let limits = &gw.config().gateway;
    let (_, body) =
        crate::infer::read_body(req, limits.max_body_bytes, limits.body_read_timeout).await?;
    model(&gw, &name)?;
    if !gw.deployment.learns(&name) {
        return Err(ApiError::InvalidTensor(format!(
            "'{name}' does not learn from feedback (a model needs [models.{name}.learner], a graph a bandit step)"
        )));
    }
    let record = parse(&name, &body).map_err(ApiError::InvalidTensor)?;
    let bandit = gw.deployment.graph(&name).is_some();
    if bandit && record.reward.is_none() {
        return Err(ApiError::InvalidTensor(format!(
            "graph '{name}' learns which arm to choose from a `reward` in [0, 1]; this feedback has none"
        )));
    }
    let bytes = encode_feedback(&record).map_err(|e| ApiError::Internal(e.to_string()))?;
    let topic = gw.deployment.topics.feedback(&name);
    let sent = gw
        .publisher
        .producer()
        .send(
            FutureRecord::to(&topic).key(&record.id).payload(&bytes),
            PRODUCE_TIMEOUT,
        )
        .await;
    if let Err((e, _)) = sent {
        return Err(ApiError::Unavailable(format!(
            "the Kafka broker did not take the feedback: {e}"
        )));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": record.id, "model_name": name, "accepted": true})),
    ))
}

/// The feedback in `body`, or what is wrong with it.
fn parse(model: &str, body: &[u8]) -> Result<FeedbackRecord, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("feedback body is not JSON: {e}"))?;
    let Value::Object(fields) = v else {
        return Err("feedback body must be a JSON object".into());
    };
    if let Some(k) = fields
        .keys()
        .find(|k| !["id", "truth", "reward"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown field '{k}' (expected id, truth and/or reward)"
        ));
    }
    let id = match fields.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("'id' must be the non-empty id of an earlier answer".into()),
    };
    let truth = fields.get("truth").map(truth_of).transpose()?;
    let reward = match fields.get("reward") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(r) if (0.0..=1.0).contains(&r) => Some(r),
            _ => return Err(format!("'reward' must be a number in [0, 1], got {v}")),
        },
    };
    if truth.is_none() && reward.is_none() {
        return Err("feedback needs 'truth' and/or 'reward'".into());
    }
    Ok(FeedbackRecord {
        id,
        model: model.to_string(),
        truth,
        reward,
        time_ms: sluice_common::now_ms(),
    })
}

/// A label: 0 or 1, `true`/`false`, or a one-element array of either.
fn truth_of(v: &Value) -> Result<f64, String> {
    let bad = || format!("'truth' must be a label 0 or 1 (or [0] / [1]), got {v}");
    let one = match v {
        Value::Array(a) if a.len() == 1 => &a[0],
        other => other,
    };
    let y = match one {
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if y == 0.0 || y == 1.0 {
        Ok(y)
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bodies_are_read_or_refused_with_the_reason() {
        let f = parse("sea", br#"{"id":"a","truth":1}"#).unwrap();
        assert_eq!((f.id.as_str(), f.truth, f.reward), ("a", Some(1.0), None));
        let f = parse("sea", br#"{"id":"a","truth":[false],"reward":0.5}"#).unwrap();
        assert_eq!((f.truth, f.reward), (Some(0.0), Some(0.5)));
        for (body, says) in [
            (&b"{"[..], "not JSON"),
            (br#"[1]"#, "JSON object"),
            (br#"{"truth":1}"#, "'id'"),
            (br#"{"id":"","truth":1}"#, "'id'"),
            (br#"{"id":"a"}"#, "needs 'truth'"),
            (br#"{"id":"a","truth":2}"#, "'truth'"),
            (br#"{"id":"a","reward":1.5}"#, "'reward'"),
            (
                br#"{"id":"a","truth":1,"label":1}"#,
                "unknown field 'label'",
            ),
        ] {
            let e = parse("sea", body).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
