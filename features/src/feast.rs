//! Feast's Redis online-store format at byte level (Feast 0.67; facts in the design notes):
//! the serialized entity key plus project as the hash key, MurmurHash3 field names per
//! `<view>:<feature>`, `feast.types.Value` protobuf values and `_ts:<view>` timestamps.

use sluice_config::config::JoinKeyType;
use sluice_config::hash::murmur3_32;

use crate::Value;
use sluice_schemas::Number;

/// An entity key value, as Feast types it.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyValue {
    /// STRING (value type 2).
    String(String),
    /// INT64 (value type 4).
    Int64(i64),
    /// INT32 (value type 3).
    Int32(i32),
}

impl KeyValue {
    /// The key `raw` (UTF-8 text or a decimal number) as `ty`.
    pub fn parse(raw: &str, ty: JoinKeyType) -> Result<KeyValue, String> {
        Ok(match ty {
            JoinKeyType::String => KeyValue::String(raw.to_string()),
            JoinKeyType::Int64 => KeyValue::Int64(
                raw.parse()
                    .map_err(|_| format!("entity key '{raw}' is not an INT64"))?,
            ),
            JoinKeyType::Int32 => KeyValue::Int32(
                raw.parse()
                    .map_err(|_| format!("entity key '{raw}' is not an INT32"))?,
            ),
        })
    }
}

/// The Redis key of an entity: `serialize_entity_key(join keys, version)` + project.
/// Join keys are sorted by name, as Feast sorts them.
pub fn redis_key(project: &str, keys: &[(&str, &KeyValue)], version: u32) -> Vec<u8> {
    let mut sorted: Vec<&(&str, &KeyValue)> = keys.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::with_capacity(64);
    let u32le = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    if version > 2 {
        u32le(&mut out, sorted.len() as u32);
    }
    for (name, _) in &sorted {
        u32le(&mut out, 2);
        if version > 2 {
            u32le(&mut out, name.len() as u32);
        }
        out.extend_from_slice(name.as_bytes());
    }
    for (_, value) in &sorted {
        let (ty, bytes): (u32, Vec<u8>) = match value {
            KeyValue::String(s) => (2, s.as_bytes().to_vec()),
            KeyValue::Int32(v) => (3, v.to_le_bytes().to_vec()),
            // Version 1 packed INT64 in 4 bytes (a Feast bug fixed in version 2).
            KeyValue::Int64(v) if version <= 1 => (4, (*v as i32).to_le_bytes().to_vec()),
            KeyValue::Int64(v) => (4, v.to_le_bytes().to_vec()),
        };
        u32le(&mut out, ty);
        u32le(&mut out, bytes.len() as u32);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(project.as_bytes());
    out
}

/// The hash field of a feature: MurmurHash3 of `<view>:<feature>`, 4 bytes little-endian.
pub fn field(view: &str, feature: &str) -> Vec<u8> {
    murmur3_32(format!("{view}:{feature}").as_bytes(), 0)
        .to_le_bytes()
        .to_vec()
}

/// The timestamp field of a view.
pub fn ts_field(view: &str) -> Vec<u8> {
    format!("_ts:{view}").into_bytes()
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at).ok_or("truncated varint")?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take<'a>(buf: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = at
        .checked_add(n)
        .filter(|&e| e <= buf.len())
        .ok_or("truncated field")?;
    let s = &buf[*at..end];
    *at = end;
    Ok(s)
}

/// Decodes a serialized `feast.types.Value` (the members a model step uses: bytes, string,
/// int32/64, float, double, bool, unix timestamp and their list forms). Empty bytes (a null)
/// and unknown members are `Value::Missing`.
pub fn decode_value(buf: &[u8]) -> Result<Value, String> {
    let mut at = 0;
    let mut out = Value::Missing;
    while at < buf.len() {
        let tag = varint(buf, &mut at)?;
        let (number, wire) = (tag >> 3, tag & 7);
        out = match (number, wire) {
            (1 | 2, 2) => {
                let n = varint(buf, &mut at)? as usize;
                Value::Text(take(buf, &mut at, n)?.to_vec())
            }
            (3, 0) => Value::Int(i64::from(varint(buf, &mut at)? as i32)),
            (4 | 8, 0) => Value::Int(varint(buf, &mut at)? as i64),
            (5, 1) => {
                let b = take(buf, &mut at, 8)?;
                Value::Float(f64::from_le_bytes(b.try_into().map_err(|_| "double")?))
            }
            (6, 5) => {
                let b = take(buf, &mut at, 4)?;
                Value::Float(f64::from(f32::from_le_bytes(
                    b.try_into().map_err(|_| "float")?,
                )))
            }
            (7, 0) => Value::Bool(varint(buf, &mut at)? != 0),
            (13..=16, 2) => {
                let n = varint(buf, &mut at)? as usize;
                Value::List(decode_list(number, take(buf, &mut at, n)?)?)
            }
            (_, 0) => {
                varint(buf, &mut at)?;
                Value::Missing
            }
            (_, 1) => {
                take(buf, &mut at, 8)?;
                Value::Missing
            }
            (_, 5) => {
                take(buf, &mut at, 4)?;
                Value::Missing
            }
            (_, 2) => {
                let n = varint(buf, &mut at)? as usize;
                take(buf, &mut at, n)?;
                Value::Missing
            }
            _ => return Err(format!("unsupported protobuf wire type {wire}")),
        };
    }
    Ok(out)
}

/// A `*List{repeated val = 1}` message: packed (or unpacked) numbers.
fn decode_list(number: u64, buf: &[u8]) -> Result<Vec<Number>, String> {
    let mut at = 0;
    let mut out = Vec::new();
    let mut one = |payload: &[u8], packed: bool| -> Result<(), String> {
        let mut p = 0;
        while p < payload.len() {
            match number {
                13 => out.push(Number::Int(i64::from(varint(payload, &mut p)? as i32))),
                14 => out.push(Number::Int(varint(payload, &mut p)? as i64)),
                15 => out.push(Number::Float(f64::from_le_bytes(
                    take(payload, &mut p, 8)?.try_into().map_err(|_| "double")?,
                ))),
                _ => out.push(Number::Float(f64::from(f32::from_le_bytes(
                    take(payload, &mut p, 4)?.try_into().map_err(|_| "float")?,
                )))),
            }
            if !packed {
                break;
            }
        }
        Ok(())
    };
    while at < buf.len() {
        let tag = varint(buf, &mut at)?;
        match tag & 7 {
            2 => {
                let n = varint(buf, &mut at)? as usize;
                one(take(buf, &mut at, n)?, true)?;
            }
            0 => {
                let start = at;
                varint(buf, &mut at)?;
                one(&buf[start..at], false)?;
            }
            1 => one(take(buf, &mut at, 8)?, false)?,
            5 => one(take(buf, &mut at, 4)?, false)?,
            w => return Err(format!("unsupported list wire type {w}")),
        }
    }
    Ok(out)
}

/// Feast's value type a feature is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// `float_val`.
    Float32,
    /// `double_val`.
    Float64,
    /// `int64_val`.
    Int64,
    /// `int32_val`.
    Int32,
    /// `bool_val`.
    Bool,
    /// `string_val`.
    String,
    /// `float_list_val`.
    Float32List,
    /// `double_list_val`.
    Float64List,
    /// `int64_list_val`.
    Int64List,
}

/// Encodes a value as `feast.types.Value` bytes of `kind`.
pub fn encode_value(v: &Value, kind: ValueKind) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let number = |v: &Value| v.number().ok_or_else(|| format!("{v:?} is not a number"));
    let exact = |e: sluice_schemas::Unfit| e.to_string();
    match (kind, v) {
        (_, Value::Missing) => {}
        (ValueKind::Float32, v) => {
            out.push(0x35);
            out.extend_from_slice(&number(v)?.to_f32().map_err(exact)?.to_le_bytes());
        }
        (ValueKind::Float64, v) => {
            out.push(0x29);
            out.extend_from_slice(&number(v)?.to_f64().map_err(exact)?.to_le_bytes());
        }
        (ValueKind::Int64, v) => {
            out.push(0x20);
            put_varint(&mut out, number(v)?.to_i64().map_err(exact)? as u64);
        }
        (ValueKind::Int32, v) => {
            out.push(0x18);
            put_varint(
                &mut out,
                i64::from(number(v)?.to_i32().map_err(exact)?) as u64,
            );
        }
        (ValueKind::Bool, v) => {
            out.push(0x38);
            out.push(u8::from(number(v)?.to_bool().map_err(exact)?));
        }
        (ValueKind::String, Value::Text(t)) => {
            out.push(0x12);
            put_varint(&mut out, t.len() as u64);
            out.extend_from_slice(t);
        }
        (ValueKind::String, v) => return Err(format!("{v:?} is not a string")),
        (list, Value::List(xs)) => {
            let (tag, mut packed) = (list_tag(list), Vec::new());
            for x in xs {
                match list {
                    ValueKind::Float32List => {
                        packed.extend_from_slice(&x.to_f32().map_err(exact)?.to_le_bytes())
                    }
                    ValueKind::Float64List => {
                        packed.extend_from_slice(&x.to_f64().map_err(exact)?.to_le_bytes())
                    }
                    _ => put_varint(&mut packed, x.to_i64().map_err(exact)? as u64),
                }
            }
            let mut inner = vec![0x0a];
            put_varint(&mut inner, packed.len() as u64);
            inner.extend_from_slice(&packed);
            out.extend_from_slice(tag);
            put_varint(&mut out, inner.len() as u64);
            out.extend_from_slice(&inner);
        }
        (_, v) => return Err(format!("{v:?} is not a list")),
    }
    Ok(out)
}

fn list_tag(kind: ValueKind) -> &'static [u8] {
    match kind {
        ValueKind::Float32List => &[0x82, 0x01],
        ValueKind::Float64List => &[0x7a],
        _ => &[0x72],
    }
}

/// Decodes a `google.protobuf.Timestamp`: its seconds.
pub fn decode_timestamp(buf: &[u8]) -> Result<i64, String> {
    let mut at = 0;
    let mut seconds = 0;
    while at < buf.len() {
        let tag = varint(buf, &mut at)?;
        let v = varint(buf, &mut at)?;
        if tag == 0x08 {
            seconds = v as i64;
        }
    }
    Ok(seconds)
}

/// Encodes a `google.protobuf.Timestamp` of whole seconds.
pub fn encode_timestamp(seconds: i64) -> Vec<u8> {
    let mut out = Vec::new();
    if seconds != 0 {
        out.push(0x08);
        put_varint(&mut out, seconds as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_match_feasts_vectors() {
        // Feast's own unit test: join key "entity" = int32 1, project "test", version 3.
        let k = redis_key("test", &[("entity", &KeyValue::Int32(1))], 3);
        assert_eq!(
            k,
            b"\x01\x00\x00\x00\x02\x00\x00\x00\x06\x00\x00\x00entity\x03\x00\x00\x00\x04\x00\x00\x00\x01\x00\x00\x00test"
        );
        // driver_id = 1001 (INT64), project feast_demo, version 3.
        let k = redis_key("feast_demo", &[("driver_id", &KeyValue::Int64(1001))], 3);
        let mut want = vec![1, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0];
        want.extend_from_slice(b"driver_id");
        want.extend_from_slice(&[4, 0, 0, 0, 8, 0, 0, 0, 0xe9, 0x03, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"feast_demo");
        assert_eq!(k, want);
        // Version 1 (Cassandra example in Feast's spec): INT64 in 4 bytes, no count or lengths.
        let k = redis_key("", &[("driver_id", &KeyValue::Int64(1002))], 1);
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "020000006472697665725f69640400000004000000ea030000");
        // Several join keys are sorted by name.
        let (a, b) = (KeyValue::String("x".into()), KeyValue::Int32(2));
        assert_eq!(
            redis_key("p", &[("b", &b), ("a", &a)], 3),
            redis_key("p", &[("a", &a), ("b", &b)], 3)
        );
    }

    fn floats(xs: &[f64]) -> Value {
        Value::List(xs.iter().map(|&x| Number::Float(x)).collect())
    }

    #[test]
    fn values_round_trip_and_match_the_spec_bytes() {
        assert_eq!(
            decode_value(&[0x35, 0xf5, 0x69, 0x6d, 0x3f]).unwrap(),
            Value::Float(f64::from(0.927_398_f32))
        );
        assert_eq!(decode_value(&[]).unwrap(), Value::Missing);
        let cases = [
            (Value::Float(1.5), ValueKind::Float32),
            (Value::Float(-2.25), ValueKind::Float64),
            (Value::Int(-7), ValueKind::Int64),
            (Value::Int(-3), ValueKind::Int32),
            (Value::Int(300), ValueKind::Int32),
            (Value::Bool(true), ValueKind::Bool),
            (Value::Text(b"gold".to_vec()), ValueKind::String),
            (floats(&[1.0, -2.5]), ValueKind::Float32List),
            (floats(&[1.0, 2.0]), ValueKind::Float64List),
            (
                Value::List(vec![Number::Int(5), Number::Int(-6)]),
                ValueKind::Int64List,
            ),
            (Value::Int(i64::MIN), ValueKind::Int64),
            (Value::Int(-2654276660701483516), ValueKind::Int64),
            (Value::Int(i64::from(i32::MIN)), ValueKind::Int32),
            (
                Value::List(vec![Number::Int(i64::MAX), Number::Int((1 << 53) + 1)]),
                ValueKind::Int64List,
            ),
        ];
        for (v, kind) in cases {
            let bytes = encode_value(&v, kind).unwrap();
            assert_eq!(decode_value(&bytes).unwrap(), v, "{kind:?}");
        }
        // A zero is still written (empty bytes mean null).
        assert_eq!(
            encode_value(&Value::Float(0.0), ValueKind::Float32).unwrap(),
            vec![0x35, 0, 0, 0, 0]
        );
        assert_eq!(
            decode_timestamp(&encode_timestamp(1_700_000_000)).unwrap(),
            1_700_000_000
        );
        assert_eq!(decode_timestamp(&[0x08, 0x01, 0x10, 0x05]).unwrap(), 1);
    }
}
