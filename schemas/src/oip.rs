//! Open Inference Protocol v2 (KServe / Triton) REST bodies: JSON tensors and Triton's binary
//! tensor extension, to and from Sluice's raw-byte [`Tensor`]s.

use std::fmt;

use crate::{DataType, Number, Tensor, tensor::element_count};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Why an Open Inference Protocol body could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OipError {
    /// Malformed JSON or binary framing.
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed, but a tensor's data does not fit its datatype or shape.
    #[error("{0}")]
    InvalidTensor(String),
    /// Encoding failed.
    #[error("{0}")]
    Internal(String),
}

impl OipError {
    /// The HTTP status this error maps to (400, 422 or 500).
    pub fn http_status(&self) -> u16 {
        match self {
            OipError::BadRequest(_) => 400,
            OipError::InvalidTensor(_) => 422,
            OipError::Internal(_) => 500,
        }
    }
}

/// Header giving the JSON part's length when binary tensors follow it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An infer request body's JSON part.
#[derive(Debug, Deserialize)]
pub struct InferRequestJson {
    /// Caller's request id, echoed back.
    pub id: Option<String>,
    /// Request parameters (`timeout` in µs, `binary_data_output`).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Input tensors.
    pub inputs: Vec<InputJson>,
    /// Requested outputs.
    #[serde(default)]
    pub outputs: Vec<RequestedOutput>,
}

/// One input tensor in JSON.
#[derive(Debug, Deserialize)]
pub struct InputJson {
    /// Input name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Datatype name.
    pub datatype: String,
    /// `binary_data_size` when the data follows in binary.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Data, flat or nested (row-major).
    pub data: Option<FlatData>,
}

/// An output the caller asks for.
#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    /// Output name.
    pub name: String,
    /// `binary_data: true` to receive it in binary.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// A JSON scalar from a tensor's `data` array.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// Negative integer.
    I(i64),
    /// Non-negative integer.
    U(u64),
    /// Float.
    F(f64),
    /// Boolean.
    B(bool),
    /// String (a BYTES element).
    S(String),
}

/// A tensor's `data`, flattened in row-major order whatever its nesting.
#[derive(Debug, Default)]
pub struct FlatData(pub Vec<Scalar>);

impl<'de> Deserialize<'de> for FlatData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        d.deserialize_any(Flatten(&mut out))?;
        Ok(FlatData(out))
    }
}

struct Flatten<'a>(&'a mut Vec<Scalar>);

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("numbers, booleans or strings, possibly in nested arrays")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.push(if v >= 0 {
            Scalar::U(v as u64)
        } else {
            Scalar::I(v)
        });
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.push(Scalar::U(v));
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.push(Scalar::F(v));
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.push(Scalar::B(v));
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push(Scalar::S(v.to_string()));
        Ok(())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.0.push(Scalar::S(v));
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(FlattenSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

struct FlattenSeed<'a>(&'a mut Vec<Scalar>);

impl<'de> DeserializeSeed<'de> for FlattenSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Flatten(self.0))
    }
}

/// A parsed infer request.
#[derive(Debug)]
pub struct ParsedRequest {
    /// Caller's id.
    pub id: Option<String>,
    /// Parameters.
    pub parameters: Map<String, Value>,
    /// Inputs as raw tensors.
    pub inputs: Vec<Tensor>,
    /// Requested outputs and whether each should come back binary.
    pub outputs: Vec<(String, bool)>,
    /// `binary_data_output` for outputs not listed.
    pub binary_by_default: bool,
}

fn param_bool(p: &Map<String, Value>, key: &str) -> bool {
    matches!(p.get(key), Some(Value::Bool(true)))
}

/// Parses an infer request body. `json_len` is the `Inference-Header-Content-Length` header value
/// when the body carries binary tensors after its JSON part.
pub fn parse_request(body: &[u8], json_len: Option<usize>) -> Result<ParsedRequest, OipError> {
    let (json, mut binary) = match json_len {
        Some(n) if n > body.len() => {
            return Err(OipError::BadRequest(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let req: InferRequestJson = serde_json::from_slice(json)
        .map_err(|e| OipError::BadRequest(format!("malformed request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        inputs.push(parse_input(input, json_len.is_some(), &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(OipError::BadRequest(format!(
            "{} binary bytes follow the JSON but no input claims them",
            binary.len()
        )));
    }
    let binary_by_default = param_bool(&req.parameters, "binary_data_output");
    let outputs = req
        .outputs
        .into_iter()
        .map(|o| {
            let binary = match o.parameters.get("binary_data") {
                Some(Value::Bool(b)) => *b,
                _ => binary_by_default,
            };
            (o.name, binary)
        })
        .collect();
    Ok(ParsedRequest {
        id: req.id,
        parameters: req.parameters,
        inputs,
        outputs,
        binary_by_default,
    })
}

/// One input: its data from JSON, or its `binary_data_size` bytes taken from the front of
/// `binary` (when the request has a binary part); checked against its shape.
fn parse_input(
    input: InputJson,
    has_binary_part: bool,
    binary: &mut &[u8],
) -> Result<Tensor, OipError> {
    let datatype: DataType = input.datatype.parse().map_err(|e: crate::TensorError| {
        OipError::InvalidTensor(format!("input '{}': {e}", input.name))
    })?;
    let count = element_count(&input.shape).ok_or_else(|| {
        OipError::InvalidTensor(format!(
            "input '{}' has an invalid shape {:?}",
            input.name, input.shape
        ))
    })?;
    let name = &input.name;
    let data = match (input.parameters.get("binary_data_size"), input.data) {
        (Some(size), None) => {
            let size = size.as_u64().ok_or_else(|| {
                OipError::BadRequest(format!(
                    "input '{name}': binary_data_size must be a non-negative integer"
                ))
            })? as usize;
            if !has_binary_part {
                return Err(OipError::BadRequest(format!(
                    "input '{name}' has binary_data_size but the request has no Inference-Header-Content-Length header"
                )));
            }
            if size > binary.len() {
                return Err(OipError::BadRequest(format!(
                    "input '{name}' declares {size} binary bytes but only {} remain",
                    binary.len()
                )));
            }
            let (chunk, rest) = binary.split_at(size);
            *binary = rest;
            chunk.to_vec()
        }
        (None, Some(flat)) => json_to_bytes(name, datatype, &flat.0)?,
        (Some(_), Some(_)) => {
            return Err(OipError::BadRequest(format!(
                "input '{name}' has both data and binary_data_size"
            )));
        }
        (None, None) => {
            return Err(OipError::BadRequest(format!("input '{name}' has no data")));
        }
    };
    let tensor = Tensor {
        name: input.name,
        datatype,
        shape: input.shape,
        data,
    };
    check_count(&tensor, count)?;
    Ok(tensor)
}

/// Fixed-size data holds `count` elements; BYTES data is framed right.
fn check_count(tensor: &Tensor, count: usize) -> Result<(), OipError> {
    match tensor.datatype.element_size() {
        Some(size) if tensor.data.len() != count.saturating_mul(size) => {
            Err(OipError::InvalidTensor(format!(
                "input '{}' has {} elements of data but shape {:?} needs {count}",
                tensor.name,
                tensor.data.len() / size,
                tensor.shape
            )))
        }
        Some(_) => Ok(()),
        None => tensor.check().map(|_| ()).map_err(|e| match e {
            crate::TensorError::BytesFraming { problem, .. } => {
                OipError::InvalidTensor(format!("input '{}' (BYTES): {problem}", tensor.name))
            }
            e => OipError::InvalidTensor(e.to_string()),
        }),
    }
}

fn json_to_bytes(name: &str, dt: DataType, values: &[Scalar]) -> Result<Vec<u8>, OipError> {
    let bad = |i: usize, v: &Scalar, why: &dyn fmt::Display| {
        OipError::InvalidTensor(format!(
            "input '{name}': element {i} ({v:?}) is not a valid {dt} value: {why}"
        ))
    };
    let mut out = Vec::with_capacity(values.len() * dt.element_size().unwrap_or(8));
    match dt {
        DataType::Fp16 => {
            return Err(OipError::InvalidTensor(format!(
                "input '{name}': FP16 data is accepted only as binary tensor data"
            )));
        }
        DataType::Bytes => {
            for (i, v) in values.iter().enumerate() {
                match v {
                    Scalar::S(s) => crate::tensor::push_bytes_element(&mut out, s.as_bytes()),
                    _ => {
                        return Err(OipError::InvalidTensor(format!(
                            "input '{name}': element {i} ({v:?}) is not a string; BYTES data in JSON is strings"
                        )));
                    }
                }
            }
        }
        _ => {
            for (i, v) in values.iter().enumerate() {
                let n = match *v {
                    Scalar::I(n) => Number::Int(n),
                    Scalar::U(n) => Number::UInt(n),
                    Scalar::F(f) => Number::Float(f),
                    Scalar::B(b) => Number::Bool(b),
                    Scalar::S(_) => return Err(bad(i, v, &"a string is not a number")),
                };
                n.push_element(dt, &mut out).map_err(|e| bad(i, v, &e))?;
            }
        }
    }
    Ok(out)
}

/// Typed JSON data of an output tensor.
#[derive(Serialize)]
#[serde(untagged)]
enum JsonData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

fn bytes_to_json(t: &Tensor) -> Result<JsonData, OipError> {
    use crate::tensor::le;
    let d = &t.data;
    Ok(match t.datatype {
        DataType::Bool => JsonData::Bool(d.iter().map(|b| *b != 0).collect()),
        DataType::Uint8 => JsonData::U64(d.iter().map(|b| u64::from(*b)).collect()),
        DataType::Uint16 => JsonData::U64(le(d, |a| u64::from(u16::from_le_bytes(a)))),
        DataType::Uint32 => JsonData::U64(le(d, |a| u64::from(u32::from_le_bytes(a)))),
        DataType::Uint64 => JsonData::U64(le(d, u64::from_le_bytes)),
        DataType::Int8 => JsonData::I64(d.iter().map(|b| i64::from(*b as i8)).collect()),
        DataType::Int16 => JsonData::I64(le(d, |a| i64::from(i16::from_le_bytes(a)))),
        DataType::Int32 => JsonData::I64(le(d, |a| i64::from(i32::from_le_bytes(a)))),
        DataType::Int64 => JsonData::I64(le(d, i64::from_le_bytes)),
        DataType::Fp32 => JsonData::F32(finite(t, le(d, f32::from_le_bytes), f32::is_finite)?),
        DataType::Fp64 => JsonData::F64(finite(t, le(d, f64::from_le_bytes), f64::is_finite)?),
        DataType::Fp16 => {
            return Err(OipError::InvalidTensor(format!(
                "output '{}' is FP16: request it with binary_data",
                t.name
            )));
        }
        DataType::Bytes => {
            let elements = t
                .bytes_elements()
                .map_err(|e| OipError::Internal(e.to_string()))?;
            let strings = elements
                .into_iter()
                .map(|e| String::from_utf8(e.to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    OipError::InvalidTensor(format!(
                        "output '{}' holds bytes that are not UTF-8: request it with binary_data",
                        t.name
                    ))
                })?;
            JsonData::Str(strings)
        }
    })
}

/// `values` unchanged when every one is finite; JSON has no NaN or infinity, so an output holding
/// one is refused (never written as `null` or a made-up number) with the way to get it: binary.
fn finite<T: Copy>(
    t: &Tensor,
    values: Vec<T>,
    is_finite: fn(T) -> bool,
) -> Result<Vec<T>, OipError> {
    match values.iter().position(|&v| !is_finite(v)) {
        None => Ok(values),
        Some(i) => Err(OipError::InvalidTensor(format!(
            "output '{}' element {i} is NaN or infinite, which JSON cannot carry: request it with binary_data",
            t.name
        ))),
    }
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData>,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    parameters: Map<String, Value>,
    outputs: Vec<OutputJson<'a>>,
}

/// An encoded infer response: the body, and the JSON part's length when binary data follows.
#[derive(Debug)]
pub struct EncodedResponse {
    /// Full body.
    pub body: Vec<u8>,
    /// `Inference-Header-Content-Length` value, when binary outputs follow the JSON.
    pub json_len: Option<usize>,
}

/// Which outputs to return, each with binary or JSON encoding.
pub fn select_outputs<'a>(
    outputs: &'a [Tensor],
    requested: &[(String, bool)],
    binary_by_default: bool,
) -> Vec<(&'a Tensor, bool)> {
    if requested.is_empty() {
        outputs.iter().map(|t| (t, binary_by_default)).collect()
    } else {
        requested
            .iter()
            .filter_map(|(name, bin)| outputs.iter().find(|t| &t.name == name).map(|t| (t, *bin)))
            .collect()
    }
}

/// Encodes an infer response.
pub fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    parameters: Map<String, Value>,
    outputs: &[(&Tensor, bool)],
) -> Result<EncodedResponse, OipError> {
    let mut binary = Vec::new();
    let mut json_outputs = Vec::with_capacity(outputs.len());
    for (t, as_binary) in outputs {
        if *as_binary {
            binary.extend_from_slice(&t.data);
            json_outputs.push(OutputJson {
                name: &t.name,
                datatype: t.datatype.as_str(),
                shape: &t.shape,
                parameters: Some(serde_json::json!({ "binary_data_size": t.data.len() })),
                data: None,
            });
        } else {
            json_outputs.push(OutputJson {
                name: &t.name,
                datatype: t.datatype.as_str(),
                shape: &t.shape,
                parameters: None,
                data: Some(bytes_to_json(t)?),
            });
        }
    }
    let resp = ResponseJson {
        model_name: model,
        model_version: version,
        id,
        parameters,
        outputs: json_outputs,
    };
    let mut body = serde_json::to_vec(&resp)
        .map_err(|e| OipError::Internal(format!("encoding response: {e}")))?;
    let has_binary = outputs.iter().any(|(_, b)| *b);
    let json_len = has_binary.then_some(body.len());
    body.extend_from_slice(&binary);
    Ok(EncodedResponse { body, json_len })
}

/// Reads a request record written as an Open Inference Protocol JSON body (direct Kafka clients
/// that set `content-type: application/json`). The id is the body's `id`, else the record key;
/// a `timeout` parameter (µs, as over HTTP) sets the deadline from `now_ms`.
pub fn request_from_json(
    body: &[u8],
    key: Option<&str>,
    model: &str,
    now_ms: i64,
) -> Result<crate::InferenceRequest, OipError> {
    let parsed = parse_request(body, None)?;
    let id = parsed
        .id
        .clone()
        .or_else(|| key.map(str::to_string))
        .ok_or_else(|| {
            OipError::BadRequest("a JSON request needs an id (or a record key)".into())
        })?;
    let deadline = match parsed.parameters.get("timeout") {
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|us| now_ms + i64::try_from(us / 1000).unwrap_or(i64::MAX / 2))
            .map(crate::Deadline::from_wire)
            .ok_or_else(|| OipError::BadRequest("timeout must be a whole number of µs".into()))?,
        Some(_) => return Err(OipError::BadRequest("timeout must be a number (µs)".into())),
        None => None,
    };
    Ok(crate::InferenceRequest {
        id: id.clone(),
        client_id: Some(id),
        model: model.to_string(),
        deadline,
        sent_at_us: now_ms * 1000,
        parameters: parsed
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        inputs: parsed.inputs,
        outputs: parsed.outputs.into_iter().map(|(n, _)| n).collect(),
        reply_format: crate::ReplyFormat::Json,
        ..Default::default()
    })
}

/// Writes a result as an Open Inference Protocol JSON response body; a failed result becomes
/// `{"id", "model_name", "error", "code", "step"}`.
pub fn result_to_json(r: &crate::InferenceResult) -> Vec<u8> {
    if let Some(e) = &r.error {
        let v = serde_json::json!({
            "id": r.id, "model_name": r.model, "error": e.message, "code": e.code.as_str(), "step": e.step
        });
        return v.to_string().into_bytes();
    }
    let parameters = r
        .parameters
        .iter()
        .map(|(k, v)| {
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
            (k.clone(), value)
        })
        .collect();
    let outputs: Vec<(&Tensor, bool)> = r.outputs.iter().map(|t| (t, false)).collect();
    match encode_response(
        &r.model,
        &r.model_version,
        Some(&r.id),
        parameters,
        &outputs,
    ) {
        Ok(e) => e.body,
        Err(e) => serde_json::json!({"id": r.id, "model_name": r.model, "error": e.to_string()})
            .to_string()
            .into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn json_records_round_trip_through_the_envelopes() {
        let body = br#"{"id":"k1","parameters":{"timeout":5000000,"tier":"gold"},
            "inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[1.5,2]}]}"#;
        let r = request_from_json(body, None, "g", 1_000).unwrap();
        assert_eq!(
            (
                r.id.as_str(),
                crate::Deadline::to_wire(r.deadline),
                r.reply_format.as_wire()
            ),
            ("k1", 6_000, "json")
        );
        assert_eq!(r.parameters["tier"], "\"gold\"");
        assert_eq!(r.inputs[0].values::<f32>(), [1.5, 2.0]);
        let no_id = br#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        assert_eq!(
            request_from_json(no_id, Some("key-7"), "g", 0).unwrap().id,
            "key-7"
        );
        assert!(request_from_json(no_id, None, "g", 0).is_err());

        let result = crate::InferenceResult {
            id: "k1".into(),
            model: "g".into(),
            model_version: "1".into(),
            outputs: vec![Tensor::from_values(
                "label",
                DataType::Int64,
                vec![1],
                &[4i64],
            )],
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&result_to_json(&result)).unwrap();
        assert_eq!(v["outputs"][0]["data"][0], 4);
        assert_eq!(v["id"], "k1");
    }

    #[test]
    fn parses_nested_and_flat_json_data() {
        let body = br#"{"id":"r1","inputs":[
            {"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[-3,4]]},
            {"name":"k","shape":[2],"datatype":"INT64","data":[7,-8]},
            {"name":"b","shape":[1],"datatype":"BOOL","data":[true]}]}"#;
        let r = parse_request(body, None).unwrap();
        assert_eq!(r.id.as_deref(), Some("r1"));
        assert_eq!(r.inputs[0].values::<f32>(), vec![1.0, 2.5, -3.0, 4.0]);
        assert_eq!(r.inputs[1].values::<i64>(), vec![7, -8]);
        assert_eq!(r.inputs[2].data, vec![1]);
    }

    #[test]
    fn bytes_travel_as_json_strings_and_binary_elements() {
        let json = r#"{"inputs":[{"name":"ids","shape":[2,1],"datatype":"BYTES","data":[["u1"],["héllo"]]},
            {"name":"raw","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":11}}]}"#
            .as_bytes();
        let mut body = json.to_vec();
        body.extend_from_slice(&[2, 0, 0, 0, 0xff, 0x00, 1, 0, 0, 0, b'z']);
        let r = parse_request(&body, Some(json.len())).unwrap();
        assert_eq!(
            r.inputs[0].bytes_elements().unwrap(),
            vec![&b"u1"[..], "héllo".as_bytes()]
        );
        assert_eq!(
            r.inputs[1].bytes_elements().unwrap(),
            vec![&[0xff, 0][..], b"z"]
        );
        // JSON answers carry strings; bytes that are not UTF-8 need binary_data.
        let ok = encode_response("m", "1", None, Map::new(), &[(&r.inputs[0], false)]).unwrap();
        let v: Value = serde_json::from_slice(&ok.body).unwrap();
        assert_eq!(v["outputs"][0]["data"], serde_json::json!(["u1", "héllo"]));
        let err =
            encode_response("m", "1", None, Map::new(), &[(&r.inputs[1], false)]).unwrap_err();
        assert_eq!(err.http_status(), 422);
        let bin = encode_response("m", "1", None, Map::new(), &[(&r.inputs[1], true)]).unwrap();
        assert_eq!(&bin.body[bin.json_len.unwrap()..], &body[json.len()..]);
        // Wrong element counts, broken framing and non-strings are 422s naming the input.
        for (bad, bin) in [
            (&br#"{"inputs":[{"name":"s","shape":[3],"datatype":"BYTES","data":["a","b"]}]}"#[..], &[][..]),
            (br#"{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","data":[7]}]}"#, &[]),
            (br#"{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":5}}]}"#,
             &[9, 0, 0, 0, b'a']),
        ] {
            let mut body = bad.to_vec();
            body.extend_from_slice(bin);
            let e = parse_request(&body, (!bin.is_empty()).then_some(bad.len())).unwrap_err();
            assert_eq!(e.http_status(), 422, "{e}");
            assert!(e.to_string().contains("'s'"), "{e}");
        }
    }

    #[test]
    fn rejects_bad_values_with_4xx() {
        let cases: [(&[u8], u16); 6] = [
            (b"{not json", 400),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[300]}]}"#,
                422,
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT32","data":[1.5]}]}"#,
                422,
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
                422,
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FLOAT","data":[1]}]}"#,
                422,
            ),
            (
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
                400,
            ),
        ];
        for (body, status) in cases {
            let err = parse_request(body, None).unwrap_err();
            assert_eq!(
                err.http_status(),
                status,
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn parses_binary_extension() {
        let json = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}},
            {"name":"y","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}}],
            "outputs":[{"name":"out","parameters":{"binary_data":true}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(bytemuck::cast_slice(&[1.5f32, -2.0]));
        body.extend_from_slice(&42i64.to_le_bytes());
        let r = parse_request(&body, Some(json.len())).unwrap();
        assert_eq!(r.inputs[0].values::<f32>(), vec![1.5, -2.0]);
        assert_eq!(r.inputs[1].values::<i64>(), vec![42]);
        assert_eq!(r.outputs, vec![("out".to_string(), true)]);
        // Too few bytes, or bytes left over, are errors.
        assert_eq!(
            parse_request(&body[..body.len() - 1], Some(json.len()))
                .unwrap_err()
                .http_status(),
            400
        );
        let mut extra = body.clone();
        extra.push(0);
        assert_eq!(
            parse_request(&extra, Some(json.len()))
                .unwrap_err()
                .http_status(),
            400
        );
        assert_eq!(
            parse_request(&body, Some(body.len() + 1))
                .unwrap_err()
                .http_status(),
            400
        );
    }

    #[test]
    fn encodes_json_and_binary_outputs() {
        let label = Tensor::from_values("label", DataType::Int64, vec![2], &[3i64, 9]);
        let probs =
            Tensor::from_values("probabilities", DataType::Fp32, vec![2, 1], &[0.25f32, 0.5]);
        let resp = encode_response(
            "m",
            "1",
            Some("r"),
            Map::new(),
            &[(&label, false), (&probs, true)],
        )
        .unwrap();
        let n = resp.json_len.unwrap();
        let head: Value = serde_json::from_slice(&resp.body[..n]).unwrap();
        assert_eq!(head["outputs"][0]["data"], serde_json::json!([3, 9]));
        assert_eq!(head["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert_eq!(
            &resp.body[n..],
            bytemuck::cast_slice::<f32, u8>(&[0.25, 0.5])
        );
        let plain = encode_response("m", "1", None, Map::new(), &[(&label, false)]).unwrap();
        assert!(plain.json_len.is_none());
    }

    /// `t` written as a JSON output, then read back as a JSON input of the same datatype.
    fn through_json(t: &Tensor) -> Tensor {
        let resp = encode_response("m", "1", None, Map::new(), &[(t, false)]).unwrap();
        let out: Value = serde_json::from_slice(&resp.body).unwrap();
        let o = &out["outputs"][0];
        let req = serde_json::json!({"inputs": [{"name": t.name, "datatype": o["datatype"], "shape": o["shape"], "data": o["data"]}]});
        parse_request(req.to_string().as_bytes(), None)
            .unwrap()
            .inputs
            .remove(0)
    }

    proptest::proptest! {
        /// Every finite FP32 and FP64 value, and every integer of every integer datatype, is the
        /// same bits after a trip out as JSON and back in as JSON.
        #[test]
        fn json_out_and_back_in_is_exact(bits in proptest::collection::vec(proptest::prelude::any::<u64>(), 1..6), pick in 0usize..11) {
            let dt = [DataType::Bool, DataType::Uint8, DataType::Uint16, DataType::Uint32, DataType::Uint64,
                DataType::Int8, DataType::Int16, DataType::Int32, DataType::Int64, DataType::Fp32, DataType::Fp64][pick];
            let size = dt.element_size().unwrap_or(1);
            let mut data: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()[..size].to_vec()).collect();
            match dt {
                DataType::Bool => data.iter_mut().for_each(|b| *b &= 1),
                DataType::Fp32 => data.chunks_exact_mut(4).for_each(|c| {
                    let f = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if !f.is_finite() { c.copy_from_slice(&1.5f32.to_le_bytes()) }
                }),
                DataType::Fp64 => data.chunks_exact_mut(8).for_each(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    if !f64::from_le_bytes(a).is_finite() { c.copy_from_slice(&1.5f64.to_le_bytes()) }
                }),
                _ => {}
            }
            let t = Tensor { name: "x".into(), datatype: dt, shape: vec![1, bits.len() as i64], data };
            proptest::prop_assert_eq!(through_json(&t), t);
        }
    }

    #[test]
    fn selects_requested_outputs() {
        let a = Tensor::from_values("a", DataType::Int64, vec![1], &[1i64]);
        let b = Tensor::from_values("b", DataType::Int64, vec![1], &[2i64]);
        let all = [a, b];
        assert_eq!(select_outputs(&all, &[], true).len(), 2);
        let sel = select_outputs(&all, &[("b".into(), false)], true);
        assert_eq!(sel.len(), 1);
        assert_eq!(sel[0].0.name, "b");
        assert!(!sel[0].1);
    }
}
