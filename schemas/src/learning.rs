//! The online-learning records: feedback (`avro/feedback.avsc`) and logged predictions
//! (`avro/prediction.avsc`), single-object encoded like the envelopes.

use std::sync::OnceLock;

use apache_avro::types::Value;

use crate::codec::{Fields, SchemaSet, opt_string};
use crate::error::CodecError;

/// Feedback's Avro schema (JSON), as shipped in `schemas/avro/feedback.avsc`.
pub const FEEDBACK_SCHEMA: &str = include_str!("../avro/feedback.avsc");
/// A logged prediction's Avro schema (JSON), as shipped in `schemas/avro/prediction.avsc`.
pub const PREDICTION_SCHEMA: &str = include_str!("../avro/prediction.avsc");

/// Feedback on an earlier answer.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRecord {
    /// The answer's request id.
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// The true label.
    pub truth: Option<f64>,
    /// A reward in [0, 1].
    pub reward: Option<f64>,
    /// When it was sent (ms since the epoch).
    pub time_ms: i64,
}

/// A learning model's answer, logged for its learner.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionRecord {
    /// The request id.
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// The weights it answered with.
    pub weights_version: i64,
    /// The input row.
    pub features: Vec<f64>,
    /// P(y = 1).
    pub probability: f64,
    /// When it answered (ms since the epoch).
    pub time_ms: i64,
    /// A bandit's choice: the arm step (then `probability` is its propensity).
    pub arm: Option<String>,
    /// A learner's hashed categorical features (bucket numbers).
    pub hashed: Vec<i64>,
}

fn schemas_of(json: &str) -> SchemaSet {
    match SchemaSet::new(json) {
        Ok(s) => s,
        // The schema is compiled in and parsed by a unit test: this cannot fail at run time.
        Err(e) => panic!("shipped schema does not parse: {e}"),
    }
}

fn schemas(json: &'static str, cell: &'static OnceLock<SchemaSet>) -> &'static SchemaSet {
    cell.get_or_init(|| schemas_of(json))
}

fn feedback_schemas() -> &'static SchemaSet {
    static CELL: OnceLock<SchemaSet> = OnceLock::new();
    schemas(FEEDBACK_SCHEMA, &CELL)
}

/// Earlier prediction schemas, still readable (records logged before an upgrade).
const PREDICTION_HISTORY: &[&str] = &[include_str!("../avro/history/prediction-v1.avsc")];

fn prediction_schemas() -> &'static SchemaSet {
    static CELL: OnceLock<SchemaSet> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut set = schemas_of(PREDICTION_SCHEMA);
        for old in PREDICTION_HISTORY {
            if let Err(e) = set.add_writer(old) {
                // Compiled in and parsed by a unit test: this cannot fail at run time.
                panic!("shipped schema does not parse: {e}");
            }
        }
        set
    })
}

fn optional(v: Option<f64>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(x) => Value::Union(1, Box::new(Value::Double(x))),
    }
}

/// Encodes feedback as a single-object Avro record.
pub fn encode_feedback(f: &FeedbackRecord) -> Result<Vec<u8>, CodecError> {
    feedback_schemas().encode(Value::Record(vec![
        ("id".into(), Value::String(f.id.clone())),
        ("model".into(), Value::String(f.model.clone())),
        ("truth".into(), optional(f.truth)),
        ("reward".into(), optional(f.reward)),
        ("time_ms".into(), Value::Long(f.time_ms)),
    ]))
}

/// Encodes a logged prediction as a single-object Avro record.
pub fn encode_prediction(p: &PredictionRecord) -> Result<Vec<u8>, CodecError> {
    prediction_schemas().encode(Value::Record(vec![
        ("id".into(), Value::String(p.id.clone())),
        ("model".into(), Value::String(p.model.clone())),
        ("weights_version".into(), Value::Long(p.weights_version)),
        (
            "features".into(),
            Value::Array(p.features.iter().map(|&x| Value::Double(x)).collect()),
        ),
        ("probability".into(), Value::Double(p.probability)),
        ("time_ms".into(), Value::Long(p.time_ms)),
        ("arm".into(), opt_string(&p.arm)),
        (
            "hashed".into(),
            Value::Array(p.hashed.iter().map(|&h| Value::Long(h)).collect()),
        ),
    ]))
}

/// Decodes a single-object feedback record.
pub fn decode_feedback(bytes: &[u8]) -> Result<FeedbackRecord, CodecError> {
    let mut f = Fields::of(feedback_schemas().decode(bytes, None)?, "feedback")?;
    Ok(FeedbackRecord {
        id: f.string("id")?,
        model: f.string("model")?,
        truth: f.opt_double("truth")?,
        reward: f.opt_double("reward")?,
        time_ms: f.long("time_ms")?,
    })
}

/// Decodes a single-object prediction record.
pub fn decode_prediction(bytes: &[u8]) -> Result<PredictionRecord, CodecError> {
    let mut f = Fields::of(prediction_schemas().decode(bytes, None)?, "prediction")?;
    let features = f
        .array("features")?
        .into_iter()
        .map(|x| match x {
            Value::Double(v) => Ok(v),
            _ => Err(CodecError::Field("features")),
        })
        .collect::<Result<Vec<f64>, _>>()?;
    Ok(PredictionRecord {
        id: f.string("id")?,
        model: f.string("model")?,
        weights_version: f.long("weights_version")?,
        features,
        probability: f.double("probability")?,
        time_ms: f.long("time_ms")?,
        arm: f.opt_string("arm")?,
        hashed: f
            .array("hashed")?
            .into_iter()
            .map(|x| match x {
                Value::Long(v) => Ok(v),
                _ => Err(CodecError::Field("hashed")),
            })
            .collect::<Result<Vec<i64>, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip() {
        for f in [
            FeedbackRecord {
                id: "r1".into(),
                model: "sea".into(),
                truth: Some(1.0),
                reward: None,
                time_ms: 5,
            },
            FeedbackRecord {
                id: "r2".into(),
                model: "sea".into(),
                truth: None,
                reward: Some(0.25),
                time_ms: 6,
            },
        ] {
            assert_eq!(decode_feedback(&encode_feedback(&f).unwrap()).unwrap(), f);
        }
        let p = PredictionRecord {
            id: "r1".into(),
            model: "sea".into(),
            weights_version: 42,
            features: vec![1.5, -2.0, 3.25],
            probability: 0.75,
            time_ms: 7,
            arm: Some("fast".into()),
            hashed: vec![3, 1 << 19],
        };
        let bytes = encode_prediction(&p).unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        // A record logged with the first schema (no arm, no hashed features) still reads.
        let v1 = apache_avro::Schema::parse_str(PREDICTION_HISTORY[0]).unwrap();
        let old = crate::codec::encode_with(
            &v1,
            Value::Record(vec![
                ("id".into(), Value::String("r0".into())),
                ("model".into(), Value::String("sea".into())),
                ("weights_version".into(), Value::Long(1)),
                ("features".into(), Value::Array(vec![Value::Double(0.5)])),
                ("probability".into(), Value::Double(0.25)),
                ("time_ms".into(), Value::Long(3)),
            ]),
        )
        .unwrap();
        let read = decode_prediction(&old).unwrap();
        assert_eq!(
            (read.arm, read.hashed.len(), read.features),
            (None, 0, vec![0.5])
        );
        assert_eq!(decode_prediction(&bytes).unwrap(), p);
        assert!(
            decode_feedback(&bytes).is_err(),
            "a prediction is not feedback"
        );
    }
}
