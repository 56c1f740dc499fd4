//! Avro single-object encoding of the envelopes, with schema resolution by writer fingerprint.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use apache_avro::rabin::Rabin;
use apache_avro::types::Value;
use apache_avro::{Schema, from_avro_datum, to_avro_datum};

use crate::envelope::{GraphHop, InferenceError, InferenceRequest, InferenceResult, ReplyRoute};
use crate::{DataType, REQUEST_SCHEMA, REQUEST_SCHEMA_HISTORY, RESULT_SCHEMA, Tensor, binary};

/// The two marker bytes that open every single-object-encoded Avro record.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

pub use crate::error::CodecError;

/// A set of schemas for one envelope: the current (reader) schema plus older or newer writer
/// schemas it can resolve, keyed by their Rabin fingerprint.
pub struct SchemaSet {
    current: Schema,
    current_fingerprint: u64,
    known: HashMap<u64, Schema>,
}

/// The CRC-64-AVRO fingerprint of a schema's parsing canonical form.
pub fn fingerprint(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<Rabin>();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&fp.bytes[..8]);
    u64::from_le_bytes(bytes)
}

impl SchemaSet {
    /// A set whose current schema is `json`.
    pub fn new(json: &str) -> Result<SchemaSet, CodecError> {
        let current = Schema::parse_str(json).map_err(|e| CodecError::Avro(e.to_string()))?;
        let current_fingerprint = fingerprint(&current);
        let mut known = HashMap::new();
        known.insert(current_fingerprint, current.clone());
        Ok(SchemaSet {
            current,
            current_fingerprint,
            known,
        })
    }

    /// Makes records written with `json` readable.
    pub fn add_writer(&mut self, json: &str) -> Result<u64, CodecError> {
        let schema = Schema::parse_str(json).map_err(|e| CodecError::Avro(e.to_string()))?;
        let fp = fingerprint(&schema);
        self.known.insert(fp, schema);
        Ok(fp)
    }

    /// The current schema.
    pub fn current(&self) -> &Schema {
        &self.current
    }

    /// Encodes `value` with the current schema, framed as a single object.
    pub fn encode(&self, value: Value) -> Result<Vec<u8>, CodecError> {
        encode_with(&self.current, value)
    }

    /// Decodes a single-object record, resolving its writer schema into `reader` (the current
    /// schema when `None`).
    pub fn decode(&self, bytes: &[u8], reader: Option<&Schema>) -> Result<Value, CodecError> {
        limit_avro_allocations();
        let fp = header_fingerprint(bytes)?;
        let writer = self.known.get(&fp).ok_or(CodecError::UnknownSchema(fp))?;
        let reader = match reader {
            Some(r) => Some(r),
            None if fp == self.current_fingerprint => None,
            None => Some(&self.current),
        };
        let mut body = &bytes[HEADER_LEN..];
        from_avro_datum(writer, &mut body, reader).map_err(|e| CodecError::Avro(e.to_string()))
    }
}

/// The most apache-avro may allocate for one decoded string or bytes value, and the most items
/// an array or map block may declare. apache-avro checks a block's item count against this
/// limit as if it were bytes, then reserves that many `Value`s (tens of bytes each): with its
/// default (512 MiB) a 20-byte record declaring 2^28 items asks for 15 GB (found by fuzzing
/// `avro_envelope`). 16 MiB bounds that reservation near 1 GiB and is above any Kafka record
/// Sluice writes (brokers take 1 MiB by default).
pub const MAX_AVRO_ALLOCATION: usize = 16 * 1024 * 1024;

/// Sets [`MAX_AVRO_ALLOCATION`] for the process (apache-avro keeps the first value it is given).
fn limit_avro_allocations() {
    apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
}

/// Encodes `value` with `schema`, framed as a single object.
pub fn encode_with(schema: &Schema, value: Value) -> Result<Vec<u8>, CodecError> {
    let datum = to_avro_datum(schema, value).map_err(|e| CodecError::Avro(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&fingerprint(schema).to_le_bytes());
    out.extend_from_slice(&datum);
    Ok(out)
}

/// The request schema set: the current schema plus every earlier one (`avro/history/`).
pub fn request_schemas() -> &'static SchemaSet {
    static SET: OnceLock<SchemaSet> = OnceLock::new();
    SET.get_or_init(|| {
        let mut set =
            SchemaSet::new(REQUEST_SCHEMA).expect("request.avsc is valid (checked by tests)");
        for old in REQUEST_SCHEMA_HISTORY {
            set.add_writer(old)
                .expect("history/*.avsc are valid (checked by tests)");
        }
        set
    })
}

/// The result schema set (current schema only).
pub fn result_schemas() -> &'static SchemaSet {
    static SET: OnceLock<SchemaSet> = OnceLock::new();
    SET.get_or_init(|| {
        SchemaSet::new(RESULT_SCHEMA).expect("result.avsc is valid (checked by tests)")
    })
}

fn frame(fingerprint: u64, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    write(&mut out);
    out
}

fn header_fingerprint(bytes: &[u8]) -> Result<u64, CodecError> {
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(CodecError::NotSingleObject);
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&bytes[2..HEADER_LEN]);
    Ok(u64::from_le_bytes(fp))
}

/// Encodes a request envelope.
pub fn encode_request(r: &InferenceRequest) -> Result<Vec<u8>, CodecError> {
    let set = request_schemas();
    Ok(frame(set.current_fingerprint, |out| {
        binary::write_request(r, out)
    }))
}

/// Decodes a request envelope (fast path for the current schema, resolution otherwise).
pub fn decode_request(bytes: &[u8]) -> Result<InferenceRequest, CodecError> {
    let set = request_schemas();
    if header_fingerprint(bytes)? == set.current_fingerprint {
        return binary::read_request(&bytes[HEADER_LEN..]);
    }
    request_from_value(set.decode(bytes, None)?)
}

/// Encodes a result envelope.
pub fn encode_result(r: &InferenceResult) -> Result<Vec<u8>, CodecError> {
    let set = result_schemas();
    Ok(frame(set.current_fingerprint, |out| {
        binary::write_result(r, out)
    }))
}

/// Decodes a result envelope (fast path for the current schema, resolution otherwise).
pub fn decode_result(bytes: &[u8]) -> Result<InferenceResult, CodecError> {
    let set = result_schemas();
    if header_fingerprint(bytes)? == set.current_fingerprint {
        return binary::read_result(&bytes[HEADER_LEN..]);
    }
    result_from_value(set.decode(bytes, None)?)
}

fn string_map(m: &BTreeMap<String, String>) -> Value {
    Value::Map(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

pub(crate) fn opt_string(s: &Option<String>) -> Value {
    match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    }
}

fn tensors_value(ts: &[Tensor]) -> Value {
    Value::Array(
        ts.iter()
            .map(|t| {
                Value::Record(vec![
                    ("name".into(), Value::String(t.name.clone())),
                    ("datatype".into(), Value::String(t.datatype.as_str().into())),
                    (
                        "shape".into(),
                        Value::Array(t.shape.iter().map(|d| Value::Long(*d)).collect()),
                    ),
                    ("data".into(), Value::Bytes(t.data.clone())),
                ])
            })
            .collect(),
    )
}

/// Converts a request to its Avro value.
pub fn request_to_value(r: &InferenceRequest) -> Value {
    let reply = match &r.reply {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(route) => Value::Union(
            1,
            Box::new(Value::Record(vec![
                ("channel".into(), Value::String(route.channel.clone())),
                ("key".into(), Value::String(route.key.clone())),
                ("ttl_ms".into(), Value::Long(route.ttl_ms)),
            ])),
        ),
    };
    let failed_json = |h: &GraphHop| {
        h.failed
            .as_ref()
            .map(InferenceError::to_json)
            .unwrap_or_default()
    };
    let hop = match &r.hop {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(h) => Value::Union(
            1,
            Box::new(Value::Record(vec![
                ("graph".into(), Value::String(h.graph.clone())),
                ("step".into(), Value::String(h.step.clone())),
                ("from".into(), Value::String(h.from.clone())),
                ("shadow".into(), Value::Boolean(h.shadow)),
                ("failed".into(), Value::String(failed_json(h))),
                ("served".into(), string_map(&h.served)),
            ])),
        ),
    };
    Value::Record(vec![
        ("id".into(), Value::String(r.id.clone())),
        ("client_id".into(), opt_string(&r.client_id)),
        ("model".into(), Value::String(r.model.clone())),
        (
            "deadline_ms".into(),
            Value::Long(crate::Deadline::to_wire(r.deadline)),
        ),
        ("sent_at_us".into(), Value::Long(r.sent_at_us)),
        ("reply".into(), reply),
        ("trace".into(), string_map(&r.trace)),
        ("parameters".into(), string_map(&r.parameters)),
        ("inputs".into(), tensors_value(&r.inputs)),
        (
            "outputs".into(),
            Value::Array(r.outputs.iter().map(|o| Value::String(o.clone())).collect()),
        ),
        ("hop".into(), hop),
        (
            "reply_format".into(),
            Value::String(r.reply_format.as_wire().into()),
        ),
    ])
}

/// Converts a result to its Avro value.
pub fn result_to_value(r: &InferenceResult) -> Value {
    let error = match &r.error {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(e) => Value::Union(
            1,
            Box::new(Value::Record(vec![
                ("code".into(), Value::String(e.code.as_str().into())),
                ("message".into(), Value::String(e.message.clone())),
                ("step".into(), Value::String(e.step.clone())),
            ])),
        ),
    };
    Value::Record(vec![
        ("id".into(), Value::String(r.id.clone())),
        ("client_id".into(), opt_string(&r.client_id)),
        ("model".into(), Value::String(r.model.clone())),
        (
            "model_version".into(),
            Value::String(r.model_version.clone()),
        ),
        ("error".into(), error),
        ("outputs".into(), tensors_value(&r.outputs)),
        ("parameters".into(), string_map(&r.parameters)),
        ("queue_us".into(), Value::Long(r.queue_us)),
        ("infer_us".into(), Value::Long(r.infer_us)),
        ("batch_size".into(), Value::Int(r.batch_size)),
    ])
}

/// Named fields of a decoded record.
pub(crate) struct Fields(HashMap<String, Value>);

impl Fields {
    pub(crate) fn of(v: Value, what: &'static str) -> Result<Fields, CodecError> {
        match v {
            Value::Record(fields) => Ok(Fields(fields.into_iter().collect())),
            _ => Err(CodecError::Field(what)),
        }
    }
    pub(crate) fn take(&mut self, name: &'static str) -> Result<Value, CodecError> {
        self.0.remove(name).ok_or(CodecError::Field(name))
    }
    pub(crate) fn string(&mut self, name: &'static str) -> Result<String, CodecError> {
        match self.take(name)? {
            Value::String(s) => Ok(s),
            _ => Err(CodecError::Field(name)),
        }
    }
    pub(crate) fn long(&mut self, name: &'static str) -> Result<i64, CodecError> {
        match self.take(name)? {
            Value::Long(n) => Ok(n),
            Value::Int(n) => Ok(n.into()),
            _ => Err(CodecError::Field(name)),
        }
    }
    pub(crate) fn double(&mut self, name: &'static str) -> Result<f64, CodecError> {
        match self.take(name)? {
            Value::Double(x) => Ok(x),
            _ => Err(CodecError::Field(name)),
        }
    }
    pub(crate) fn opt_double(&mut self, name: &'static str) -> Result<Option<f64>, CodecError> {
        match self.opt(name)? {
            None => Ok(None),
            Some(Value::Double(x)) => Ok(Some(x)),
            Some(_) => Err(CodecError::Field(name)),
        }
    }
    pub(crate) fn opt(&mut self, name: &'static str) -> Result<Option<Value>, CodecError> {
        match self.take(name)? {
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                v => Ok(Some(v)),
            },
            Value::Null => Ok(None),
            _ => Err(CodecError::Field(name)),
        }
    }
    pub(crate) fn opt_string(&mut self, name: &'static str) -> Result<Option<String>, CodecError> {
        match self.opt(name)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(CodecError::Field(name)),
        }
    }
    fn string_map(&mut self, name: &'static str) -> Result<BTreeMap<String, String>, CodecError> {
        match self.take(name)? {
            Value::Map(m) => m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    _ => Err(CodecError::Field(name)),
                })
                .collect(),
            _ => Err(CodecError::Field(name)),
        }
    }
    pub(crate) fn array(&mut self, name: &'static str) -> Result<Vec<Value>, CodecError> {
        match self.take(name)? {
            Value::Array(a) => Ok(a),
            _ => Err(CodecError::Field(name)),
        }
    }
    fn tensors(&mut self, name: &'static str) -> Result<Vec<Tensor>, CodecError> {
        self.array(name)?
            .into_iter()
            .map(|v| {
                let mut f = Fields::of(v, name)?;
                let datatype: DataType = f.string("datatype")?.parse()?;
                let shape = f
                    .array("shape")?
                    .into_iter()
                    .map(|d| match d {
                        Value::Long(n) => Ok(n),
                        _ => Err(CodecError::Field("shape")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let data = match f.take("data")? {
                    Value::Bytes(b) => b,
                    _ => return Err(CodecError::Field("data")),
                };
                Ok(Tensor {
                    name: f.string("name")?,
                    datatype,
                    shape,
                    data,
                })
            })
            .collect()
    }
}

/// Converts a decoded Avro value to a request.
pub fn request_from_value(v: Value) -> Result<InferenceRequest, CodecError> {
    let mut f = Fields::of(v, "InferenceRequest")?;
    let reply = match f.opt("reply")? {
        None => None,
        Some(v) => {
            let mut r = Fields::of(v, "reply")?;
            Some(ReplyRoute {
                channel: r.string("channel")?,
                key: r.string("key")?,
                ttl_ms: r.long("ttl_ms")?,
            })
        }
    };
    let hop = match f.opt("hop")? {
        None => None,
        Some(v) => {
            let mut h = Fields::of(v, "hop")?;
            Some(GraphHop {
                graph: h.string("graph")?,
                step: h.string("step")?,
                from: h.string("from")?,
                shadow: matches!(h.take("shadow")?, Value::Boolean(true)),
                failed: InferenceError::from_json(&h.string("failed")?),
                served: h.string_map("served")?,
            })
        }
    };
    let reply_format = match f.take("reply_format") {
        Ok(Value::String(s)) => crate::ReplyFormat::from_wire(&s),
        _ => crate::ReplyFormat::Avro,
    };
    Ok(InferenceRequest {
        hop,
        reply_format,
        id: f.string("id")?,
        client_id: f.opt_string("client_id")?,
        model: f.string("model")?,
        deadline: crate::Deadline::from_wire(f.long("deadline_ms")?),
        sent_at_us: f.long("sent_at_us")?,
        reply,
        trace: f.string_map("trace")?,
        parameters: f.string_map("parameters")?,
        inputs: f.tensors("inputs")?,
        outputs: f
            .array("outputs")?
            .into_iter()
            .map(|o| match o {
                Value::String(s) => Ok(s),
                _ => Err(CodecError::Field("outputs")),
            })
            .collect::<Result<_, _>>()?,
    })
}

/// Converts a decoded Avro value to a result.
pub fn result_from_value(v: Value) -> Result<InferenceResult, CodecError> {
    let mut f = Fields::of(v, "InferenceResult")?;
    let error = match f.opt("error")? {
        None => None,
        Some(v) => {
            let mut e = Fields::of(v, "error")?;
            Some(InferenceError {
                code: crate::ErrorCode::from_wire(&e.string("code")?),
                message: e.string("message")?,
                step: e.string("step")?,
            })
        }
    };
    Ok(InferenceResult {
        id: f.string("id")?,
        client_id: f.opt_string("client_id")?,
        model: f.string("model")?,
        model_version: f.string("model_version")?,
        error,
        outputs: f.tensors("outputs")?,
        parameters: f.string_map("parameters")?,
        queue_us: f.long("queue_us")?,
        infer_us: f.long("infer_us")?,
        batch_size: i32::try_from(f.long("batch_size")?)
            .map_err(|_| CodecError::Field("batch_size"))?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::envelope::ErrorCode;

    fn sample_request() -> InferenceRequest {
        InferenceRequest {
            id: "gw1-42".into(),
            client_id: Some("abc".into()),
            model: "mlp".into(),
            deadline: crate::Deadline::from_wire(1_700_000_000_123),
            sent_at_us: 1_700_000_000_000_001,
            reply: Some(ReplyRoute {
                channel: "sluice:reply:gw1".into(),
                key: "sluice:result:gw1-42".into(),
                ttl_ms: 60_000,
            }),
            trace: [("traceparent".to_string(), "00-ab-cd-01".to_string())].into(),
            parameters: [("timeout".to_string(), "1000".to_string())].into(),
            inputs: vec![Tensor::from_values(
                "input",
                DataType::Fp32,
                vec![1, 3],
                &[0.5f32, -1.0, 2.25],
            )],
            outputs: vec!["label".into()],
            hop: Some(GraphHop {
                graph: "digits".into(),
                step: "vote".into(),
                from: "mlp".into(),
                shadow: true,
                failed: None,
                served: [("classify".to_string(), "mlp".to_string())].into(),
            }),
            reply_format: crate::ReplyFormat::Json,
        }
    }

    #[test]
    fn records_written_with_the_v1_schema_still_decode() {
        let v1 = Schema::parse_str(REQUEST_SCHEMA_HISTORY[0]).unwrap();
        let mut value = request_to_value(&sample_request());
        if let Value::Record(fields) = &mut value {
            fields.retain(|(k, _)| !["hop", "reply_format"].contains(&k.as_str()));
        }
        let bytes = encode_with(&v1, value).unwrap();
        let decoded = decode_request(&bytes).unwrap();
        let mut want = sample_request();
        want.hop = None;
        want.reply_format = crate::ReplyFormat::Avro;
        assert_eq!(decoded, want);
    }

    /// Any tensor of any datatype (raw bytes, BYTES elements of any bytes, UTF-8 or not) comes
    /// out of the Avro envelope exactly as it went in, in a request and in a result.
    fn any_tensor() -> impl proptest::strategy::Strategy<Value = Tensor> {
        use proptest::prelude::*;
        let fixed =
            (prop::sample::select(DataType::ALL.to_vec()), 0usize..5).prop_flat_map(|(dt, n)| {
                let size = dt.element_size().unwrap_or(1);
                prop::collection::vec(any::<u8>(), n * size).prop_map(move |data| Tensor {
                    name: "t".into(),
                    datatype: dt,
                    shape: vec![1, n as i64],
                    data,
                })
            });
        let bytes = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..6), 0..4)
            .prop_map(|es| Tensor::from_bytes_elements("b", vec![es.len() as i64], es));
        prop_oneof![
            fixed.prop_filter("BYTES is built below", |t| t.datatype != DataType::Bytes),
            bytes
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_tensor_survives_the_envelope(t in any_tensor()) {
            let mut r = sample_request();
            r.inputs = vec![t.clone()];
            proptest::prop_assert_eq!(decode_request(&encode_request(&r).unwrap()).unwrap().inputs, vec![t.clone()]);
            let res = InferenceResult { id: "x".into(), outputs: vec![t.clone()], ..Default::default() };
            proptest::prop_assert_eq!(decode_result(&encode_result(&res).unwrap()).unwrap().outputs, vec![t]);
        }
    }

    #[test]
    fn request_round_trips() {
        let r = sample_request();
        let bytes = encode_request(&r).unwrap();
        assert_eq!(bytes[..2], MAGIC);
        assert_eq!(decode_request(&bytes).unwrap(), r);
    }

    #[test]
    fn result_round_trips_success_and_failure() {
        let ok = InferenceResult {
            id: "x".into(),
            client_id: None,
            model: "mlp".into(),
            model_version: "1".into(),
            error: None,
            outputs: vec![Tensor::from_values(
                "label",
                DataType::Int64,
                vec![1],
                &[7i64],
            )],
            parameters: BTreeMap::new(),
            queue_us: 12,
            infer_us: 34,
            batch_size: 5,
        };
        assert_eq!(decode_result(&encode_result(&ok).unwrap()).unwrap(), ok);
        let failed = InferenceResult::failure(&sample_request(), ErrorCode::ModelFailed, "boom");
        assert_eq!(
            decode_result(&encode_result(&failed).unwrap()).unwrap(),
            failed
        );
    }

    /// The direct codec writes exactly what apache-avro writes, and reads what it writes.
    #[test]
    fn direct_codec_matches_apache_avro() {
        let mut req = sample_request();
        for _ in 0..2 {
            let fast = encode_request(&req).unwrap();
            let generic = request_schemas().encode(request_to_value(&req)).unwrap();
            assert_eq!(fast, generic);
            assert_eq!(
                request_from_value(request_schemas().decode(&fast, None).unwrap()).unwrap(),
                req
            );
            // Empty collections and absent unions take the other encoding branches.
            req = InferenceRequest {
                id: "e".into(),
                model: "m".into(),
                ..Default::default()
            };
        }
        let mut res = InferenceResult::failure(&sample_request(), ErrorCode::InvalidInput, "bad");
        for _ in 0..2 {
            let fast = encode_result(&res).unwrap();
            let generic = result_schemas().encode(result_to_value(&res)).unwrap();
            assert_eq!(fast, generic);
            assert_eq!(decode_result(&generic).unwrap(), res);
            res = InferenceResult {
                outputs: sample_request().inputs,
                parameters: [("k".to_string(), "\"v\"".to_string())].into(),
                batch_size: -3,
                queue_us: i64::MIN,
                infer_us: i64::MAX,
                ..Default::default()
            };
        }
    }

    #[test]
    fn direct_reader_reads_negative_block_counts() {
        // Avro lets a writer give a block count as negative, followed by the block size in bytes.
        let mut datum = Vec::new();
        let mut w = binary::Writer(&mut datum);
        w.long(2); // id: "ab"
        datum.extend_from_slice(b"ab");
        let mut w = binary::Writer(&mut datum);
        w.long(0); // client_id: null
        w.long(1);
        datum.push(b'm');
        let mut w = binary::Writer(&mut datum);
        w.long(5); // deadline
        w.long(6); // sent_at
        w.long(0); // reply null
        w.long(-1); // trace: one entry, as a negative count with a byte size
        w.long(4);
        w.long(1);
        datum.push(b'k');
        let mut w = binary::Writer(&mut datum);
        w.long(1);
        datum.push(b'v');
        let mut w = binary::Writer(&mut datum);
        w.long(0); // end of trace
        w.long(0); // parameters
        w.long(0); // inputs
        w.long(0); // outputs
        w.long(0); // hop: null
        w.long(0); // reply_format: ""
        let r = binary::read_request(&datum).unwrap();
        assert_eq!(r.id, "ab");
        assert_eq!(r.trace.get("k").map(String::as_str), Some("v"));
        assert_eq!(crate::Deadline::to_wire(r.deadline), 5);
    }

    #[test]
    fn rejects_garbage_and_unknown_fingerprints() {
        assert!(matches!(
            decode_request(b"{}"),
            Err(CodecError::NotSingleObject)
        ));
        let mut bytes = encode_request(&sample_request()).unwrap();
        bytes[3] ^= 0xff;
        assert!(matches!(
            decode_request(&bytes),
            Err(CodecError::UnknownSchema(_))
        ));
        // A result is not a request: its fingerprint is not in the request set.
        let result = encode_result(&InferenceResult::default()).unwrap();
        assert!(matches!(
            decode_request(&result),
            Err(CodecError::UnknownSchema(_))
        ));
    }

    #[test]
    fn truncated_datum_is_an_error_not_a_panic() {
        let bytes = encode_request(&sample_request()).unwrap();
        for cut in [HEADER_LEN, HEADER_LEN + 3, bytes.len() - 1] {
            assert!(decode_request(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// A plausible older request schema: no `trace`, `parameters` or `outputs` fields yet.
    fn old_request_schema() -> String {
        let mut json: serde_json_like::Json = serde_json_like::parse(REQUEST_SCHEMA);
        json.drop_fields(&["trace", "parameters", "outputs"]);
        json.0
    }

    /// A plausible newer request schema: one more field, with a default.
    fn new_request_schema() -> String {
        REQUEST_SCHEMA.replacen(
            r#""fields": ["#,
            r#""fields": [{"name": "priority", "type": "int", "default": 0},"#,
            1,
        )
    }

    #[test]
    fn new_reader_reads_old_record() {
        let old_json = old_request_schema();
        let old = Schema::parse_str(&old_json).unwrap();
        let mut value = request_to_value(&sample_request());
        if let Value::Record(fields) = &mut value {
            fields.retain(|(k, _)| !["trace", "parameters", "outputs"].contains(&k.as_str()));
        }
        let bytes = encode_with(&old, value).unwrap();

        let mut set = SchemaSet::new(REQUEST_SCHEMA).unwrap();
        assert!(matches!(
            set.decode(&bytes, None),
            Err(CodecError::UnknownSchema(_))
        ));
        set.add_writer(&old_json).unwrap();
        let decoded = request_from_value(set.decode(&bytes, None).unwrap()).unwrap();
        let mut want = sample_request();
        want.trace.clear();
        want.parameters.clear();
        want.outputs.clear();
        assert_eq!(decoded, want, "missing fields take their defaults");
    }

    #[test]
    fn old_reader_reads_new_record() {
        let new_json = new_request_schema();
        let new = Schema::parse_str(&new_json).unwrap();
        let mut value = request_to_value(&sample_request());
        if let Value::Record(fields) = &mut value {
            fields.insert(0, ("priority".into(), Value::Int(3)));
        }
        let bytes = encode_with(&new, value).unwrap();

        // Today's reader, told about the newer writer, ignores the field it does not know.
        let mut set = SchemaSet::new(REQUEST_SCHEMA).unwrap();
        set.add_writer(&new_json).unwrap();
        let decoded = request_from_value(set.decode(&bytes, None).unwrap()).unwrap();
        assert_eq!(decoded, sample_request());

        // And an even older reader reads today's records.
        let old = Schema::parse_str(&old_request_schema()).unwrap();
        let today = encode_request(&sample_request()).unwrap();
        let v = SchemaSet::new(REQUEST_SCHEMA)
            .unwrap()
            .decode(&today, Some(&old))
            .unwrap();
        let Value::Record(fields) = v else {
            panic!("not a record")
        };
        assert!(
            fields
                .iter()
                .any(|(k, v)| k == "id" && *v == Value::String("gw1-42".into()))
        );
        assert!(!fields.iter().any(|(k, _)| k == "trace"));
    }

    /// Minimal JSON editing for the evolution tests without a serde_json dependency.
    mod serde_json_like {
        pub struct Json(pub String);
        pub fn parse(s: &str) -> Json {
            Json(s.to_string())
        }
        impl Json {
            /// Removes top-level record fields by name. The schema file keeps each of these
            /// fields on lines of its own, from `{"name": "<f>"` to the matching close brace.
            pub fn drop_fields(&mut self, names: &[&str]) {
                for name in names {
                    let start_pat = format!("\"name\": \"{name}\"");
                    let Some(pos) = self.0.find(&start_pat) else {
                        continue;
                    };
                    let open = self.0[..pos].rfind('{').unwrap_or(pos);
                    let mut depth = 0usize;
                    let mut end = open;
                    for (i, c) in self.0[open..].char_indices() {
                        match c {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    end = open + i + 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    // Remove the field and the comma before it.
                    let comma = self.0[..open].rfind(',').unwrap_or(open);
                    self.0.replace_range(comma..end, "");
                }
            }
        }
    }
}
