//! Feature rows in Redis, as a lookup step reads them and `sluice features load` writes them.
//! Two layouts ([`FeatureLayout`]): Sluice's own (one hash per entity, plain-text fields named by
//! feature) and Feast's online store ([`feast`]), so what `feast materialize` wrote is read with
//! no glue. A batch's entities are read with one pipelined round trip (`HMGET` per entity).

pub mod feast;

use sluice_config::config::{FeatureLayout, FeaturesConfig, JoinKeyType};
use sluice_schemas::{DataType, Number};

pub use feast::ValueKind;

/// A feature value as read from Redis, exactly as stored (integers never pass through a float).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// The entity or the feature is not there (or is older than `max_age`).
    Missing,
    /// A float or double.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A string or bytes.
    Text(Vec<u8>),
    /// A list of numbers.
    List(Vec<Number>),
}

impl Value {
    /// The value as a number, if it is one.
    pub fn number(&self) -> Option<Number> {
        match self {
            Value::Float(f) => Some(Number::Float(*f)),
            Value::Int(i) => Some(Number::Int(*i)),
            Value::Bool(b) => Some(Number::Bool(*b)),
            _ => None,
        }
    }

    /// Parses Sluice's plain-text form of a feature of `datatype` (lists: `length` set, as a
    /// JSON array or comma-separated numbers), exactly: integers as integers, FP32 straight to
    /// the nearest FP32.
    pub fn parse_text(text: &[u8], datatype: DataType, list: bool) -> Result<Value, String> {
        if datatype == DataType::Bytes {
            return Ok(Value::Text(text.to_vec()));
        }
        let s = std::str::from_utf8(text)
            .map_err(|_| "a numeric feature holds bytes that are not UTF-8".to_string())?
            .trim();
        if list {
            let inner = s.trim_start_matches('[').trim_end_matches(']');
            let xs = inner
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| Number::parse(p, datatype))
                .collect::<Result<Vec<Number>, _>>()
                .map_err(|e| format!("'{s}' is not a list of {datatype} values: {e}"))?;
            return Ok(Value::List(xs));
        }
        Ok(
            match Number::parse(s, datatype).map_err(|e| e.to_string())? {
                Number::Bool(b) => Value::Bool(b),
                Number::Int(i) => Value::Int(i),
                Number::UInt(u) => {
                    Value::Int(i64::try_from(u).map_err(|_| format!("'{s}' is too large"))?)
                }
                Number::Float(f) => Value::Float(f),
            },
        )
    }

    /// Sluice's plain-text form (what [`Value::parse_text`] reads back unchanged).
    pub fn to_text(&self) -> Vec<u8> {
        match self {
            Value::Missing => Vec::new(),
            Value::Float(f) => f.to_string().into_bytes(),
            Value::Int(i) => i.to_string().into_bytes(),
            Value::Bool(b) => b.to_string().into_bytes(),
            Value::Text(t) => t.clone(),
            Value::List(xs) => {
                let parts: Vec<String> = xs.iter().map(Number::to_string).collect();
                format!("[{}]", parts.join(",")).into_bytes()
            }
        }
    }
}

impl From<Number> for Value {
    /// Exact: an unsigned integer past `i64::MAX` (no lookup datatype holds one) is kept as its
    /// digits, so a numeric feature refuses it by name instead of rounding it.
    fn from(n: Number) -> Value {
        match n {
            Number::Int(i) => Value::Int(i),
            Number::UInt(u) => i64::try_from(u)
                .map_or_else(|_| Value::Text(u.to_string().into_bytes()), Value::Int),
            Number::Float(f) => Value::Float(f),
            Number::Bool(b) => Value::Bool(b),
        }
    }
}

/// The Feast value kind a feature of `datatype` is written as.
pub fn value_kind(datatype: DataType, list: bool) -> ValueKind {
    match (datatype, list) {
        (DataType::Fp32, true) => ValueKind::Float32List,
        (DataType::Fp64, true) => ValueKind::Float64List,
        (_, true) => ValueKind::Int64List,
        (DataType::Fp64, false) => ValueKind::Float64,
        (DataType::Int64, false) => ValueKind::Int64,
        (DataType::Int32, false) => ValueKind::Int32,
        (DataType::Bool, false) => ValueKind::Bool,
        (DataType::Bytes, false) => ValueKind::String,
        _ => ValueKind::Float32,
    }
}

/// How one lookup's keys and fields are laid out: built once per step from its config.
#[derive(Debug, Clone)]
pub struct Layout {
    config: FeaturesConfig,
    /// The fields one `HMGET` asks for: each feature's, then (Feast) each view's `_ts:` field.
    fields: Vec<Vec<u8>>,
    /// Feast: each feature's view, as an index into `views`.
    view_of: Vec<usize>,
    /// Feast: the distinct views.
    views: Vec<String>,
}

impl Layout {
    /// The layout of `config`; `join_key_type` defaults from the entity tensor's datatype.
    pub fn new(config: &FeaturesConfig) -> Layout {
        let mut views: Vec<String> = Vec::new();
        let mut view_of = Vec::new();
        let mut fields = Vec::new();
        for f in &config.features {
            match config.layout {
                FeatureLayout::Sluice => fields.push(f.name.as_bytes().to_vec()),
                FeatureLayout::Feast => {
                    let view = f.view.clone().unwrap_or_default();
                    let k = views.iter().position(|v| *v == view).unwrap_or_else(|| {
                        views.push(view.clone());
                        views.len() - 1
                    });
                    view_of.push(k);
                    fields.push(feast::field(&view, &f.name));
                }
            }
        }
        fields.extend(views.iter().map(|v| feast::ts_field(v)));
        Layout {
            config: config.clone(),
            fields,
            view_of,
            views,
        }
    }

    /// The settings this layout was built from.
    pub fn config(&self) -> &FeaturesConfig {
        &self.config
    }

    /// The fields an `HMGET` of one entity asks for.
    pub fn fields(&self) -> &[Vec<u8>] {
        &self.fields
    }

    /// The Redis key of an entity (its key as text: a string or a decimal number), with the
    /// join key type `ty` (Feast layout).
    pub fn key(&self, entity: &str, ty: JoinKeyType) -> Result<Vec<u8>, String> {
        match self.config.layout {
            FeatureLayout::Sluice => Ok(format!("{}{entity}", self.config.key_prefix).into_bytes()),
            FeatureLayout::Feast => {
                let value = feast::KeyValue::parse(entity, ty)?;
                let join_key = self
                    .config
                    .join_key
                    .as_deref()
                    .unwrap_or(&self.config.entity);
                Ok(feast::redis_key(
                    self.config.project.as_deref().unwrap_or_default(),
                    &[(join_key, &value)],
                    self.config.entity_key_version,
                ))
            }
        }
    }

    /// Decodes what `HMGET` returned for one entity into one value per feature (`Missing`
    /// where absent, null, or written longer than `max_age` before `now_s`). A value that
    /// cannot be decoded is an error naming the feature.
    pub fn decode(&self, raw: &[Option<Vec<u8>>], now_s: i64) -> Result<Vec<Value>, String> {
        let n = self.config.features.len();
        let stale: Vec<bool> = match self.config.layout {
            FeatureLayout::Sluice => Vec::new(),
            FeatureLayout::Feast => (0..self.views.len())
                .map(|k| match raw.get(n + k).and_then(Option::as_ref) {
                    None => true,
                    Some(ts) => {
                        let written = feast::decode_timestamp(ts).unwrap_or(0);
                        written == 0
                            || self
                                .config
                                .max_age
                                .is_some_and(|age| now_s - written > age.as_secs() as i64)
                    }
                })
                .collect(),
        };
        self.config
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let Some(Some(bytes)) = raw.get(i) else {
                    return Ok(Value::Missing);
                };
                let decoded = match self.config.layout {
                    FeatureLayout::Sluice if bytes.is_empty() => Ok(Value::Missing),
                    FeatureLayout::Sluice => {
                        Value::parse_text(bytes, f.datatype, f.length.is_some())
                    }
                    FeatureLayout::Feast if stale[self.view_of[i]] => Ok(Value::Missing),
                    FeatureLayout::Feast => feast::decode_value(bytes),
                };
                decoded.map_err(|e| format!("feature '{}': {e}", f.name))
            })
            .collect()
    }

    /// Reads the entities' fields with one pipelined round trip: per entity, `HMGET` its key.
    pub async fn fetch<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        keys: &[Vec<u8>],
    ) -> redis::RedisResult<Vec<Vec<Option<Vec<u8>>>>> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HMGET").arg(k).arg(&self.fields);
        }
        pipe.query_async(conn).await
    }

    /// The `HSET` (and `EXPIRE`) commands that write one entity's features, adding them to
    /// `pipe`; `event_s` is the Feast timestamp written for each view.
    pub fn write(
        &self,
        pipe: &mut redis::Pipeline,
        key: &[u8],
        values: &[Value],
        event_s: i64,
        ttl_s: Option<u64>,
    ) -> Result<(), String> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (i, (f, v)) in self.config.features.iter().zip(values).enumerate() {
            if *v == Value::Missing {
                continue;
            }
            let bytes = match self.config.layout {
                FeatureLayout::Sluice => v.to_text(),
                FeatureLayout::Feast => {
                    feast::encode_value(v, value_kind(f.datatype, f.length.is_some()))
                        .map_err(|e| format!("feature '{}': {e}", f.name))?
                }
            };
            fields.push((self.fields[i].clone(), bytes));
        }
        if self.config.layout == FeatureLayout::Feast {
            for v in &self.views {
                fields.push((feast::ts_field(v), feast::encode_timestamp(event_s)));
            }
        }
        if fields.is_empty() {
            return Ok(());
        }
        pipe.cmd("HSET").arg(key);
        for (f, v) in &fields {
            pipe.arg(f).arg(v);
        }
        pipe.ignore();
        if let Some(ttl) = ttl_s {
            pipe.cmd("EXPIRE").arg(key).arg(ttl).ignore();
        }
        Ok(())
    }
}

/// The join key type to use: configured, or from the entity tensor's datatype.
pub fn join_key_type(config: &FeaturesConfig, entity: DataType) -> JoinKeyType {
    config.join_key_type.unwrap_or(match entity {
        DataType::Int64 => JoinKeyType::Int64,
        DataType::Int32 => JoinKeyType::Int32,
        _ => JoinKeyType::String,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn text_values_parse_by_datatype() {
        assert_eq!(
            Value::parse_text(b"1.5", DataType::Fp32, false),
            Ok(Value::Float(1.5))
        );
        assert_eq!(
            Value::parse_text(b"-3", DataType::Int64, false),
            Ok(Value::Int(-3))
        );
        assert_eq!(
            Value::parse_text(b"true", DataType::Bool, false),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            Value::parse_text(b"[1, 2.5]", DataType::Fp32, true),
            Ok(Value::List(vec![Number::Float(1.0), Number::Float(2.5)]))
        );
        assert!(Value::parse_text(b"x", DataType::Fp64, false).is_err());
        let v = Value::List(vec![Number::Float(1.0), Number::Float(2.0)]);
        assert_eq!(Value::parse_text(&v.to_text(), DataType::Fp32, true), Ok(v));
        // Past 2^53, integers stay exact (they were once parsed through a float).
        let big = Value::parse_text(b"-2654276660701483516", DataType::Int64, false);
        assert_eq!(big, Ok(Value::Int(-2654276660701483516)));
        let list = Value::parse_text(b"[9007199254740993, -1]", DataType::Int64, true);
        assert_eq!(
            list,
            Ok(Value::List(vec![
                Number::Int(9007199254740993),
                Number::Int(-1)
            ]))
        );
        assert!(Value::parse_text(b"1.5", DataType::Int64, false).is_err());
        assert!(Value::parse_text(b"3000000000", DataType::Int32, false).is_err());
    }
}
