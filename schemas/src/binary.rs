//! A direct Avro binary encoder/decoder for the current envelope schemas: no intermediate value
//! tree and no per-record schema resolution. Records written with any other schema go through
//! apache-avro's generic resolution instead (see [`crate::codec`]); tests check that both paths
//! produce and read identical bytes.

use std::collections::BTreeMap;

use crate::envelope::{GraphHop, InferenceError, InferenceRequest, InferenceResult, ReplyRoute};
use crate::error::CodecError;
use crate::{DataType, Tensor};

/// Appends Avro values to a buffer.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    /// A zig-zag varint `long` (also used for `int`).
    pub fn long(&mut self, v: i64) {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        while n >= 0x80 {
            self.0.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.0.extend_from_slice(b);
    }
    fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt_string(&mut self, s: &Option<String>) {
        match s {
            None => self.long(0),
            Some(s) => {
                self.long(1);
                self.string(s);
            }
        }
    }
    fn string_map(&mut self, m: &BTreeMap<String, String>) {
        if !m.is_empty() {
            self.long(m.len() as i64);
            for (k, v) in m {
                self.string(k);
                self.string(v);
            }
        }
        self.long(0);
    }
    fn tensors(&mut self, ts: &[Tensor]) {
        if !ts.is_empty() {
            self.long(ts.len() as i64);
            for t in ts {
                self.string(&t.name);
                self.string(t.datatype.as_str());
                if !t.shape.is_empty() {
                    self.long(t.shape.len() as i64);
                    for d in &t.shape {
                        self.long(*d);
                    }
                }
                self.long(0);
                self.bytes(&t.data);
            }
        }
        self.long(0);
    }
}

/// Encodes a request datum (no single-object header).
pub fn write_request(r: &InferenceRequest, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.string(&r.id);
    w.opt_string(&r.client_id);
    w.string(&r.model);
    w.long(crate::Deadline::to_wire(r.deadline));
    w.long(r.sent_at_us);
    match &r.reply {
        None => w.long(0),
        Some(route) => {
            w.long(1);
            w.string(&route.channel);
            w.string(&route.key);
            w.long(route.ttl_ms);
        }
    }
    w.string_map(&r.trace);
    w.string_map(&r.parameters);
    w.tensors(&r.inputs);
    if !r.outputs.is_empty() {
        w.long(r.outputs.len() as i64);
        for o in &r.outputs {
            w.string(o);
        }
    }
    w.long(0);
    match &r.hop {
        None => w.long(0),
        Some(hop) => {
            w.long(1);
            w.string(&hop.graph);
            w.string(&hop.step);
            w.string(&hop.from);
            w.0.push(u8::from(hop.shadow));
            w.string(
                &hop.failed
                    .as_ref()
                    .map(InferenceError::to_json)
                    .unwrap_or_default(),
            );
            w.string_map(&hop.served);
        }
    }
    w.string(r.reply_format.as_wire());
}

/// Encodes a result datum (no single-object header).
pub fn write_result(r: &InferenceResult, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.string(&r.id);
    w.opt_string(&r.client_id);
    w.string(&r.model);
    w.string(&r.model_version);
    match &r.error {
        None => w.long(0),
        Some(e) => {
            w.long(1);
            w.string(e.code.as_str());
            w.string(&e.message);
            w.string(&e.step);
        }
    }
    w.tensors(&r.outputs);
    w.string_map(&r.parameters);
    w.long(r.queue_us);
    w.long(r.infer_us);
    w.long(i64::from(r.batch_size));
}

/// Reads Avro values from a byte slice, failing (never panicking) on truncated or bad input.
pub struct Reader<'a> {
    buf: &'a [u8],
    field: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, field: "" }
    }
    fn err(&self) -> CodecError {
        CodecError::Field(self.field)
    }
    fn long(&mut self) -> Result<i64, CodecError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or_else(|| self.err())?;
            self.buf = rest;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
        }
        Err(self.err())
    }
    fn len(&mut self) -> Result<usize, CodecError> {
        let n = self.long()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.buf.len())
            .ok_or_else(|| self.err())
    }
    fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.len()?;
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }
    fn string(&mut self) -> Result<String, CodecError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| self.err())
    }
    fn boolean(&mut self) -> Result<bool, CodecError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.err())?;
        self.buf = rest;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.err()),
        }
    }
    fn union_index(&mut self, max: i64) -> Result<i64, CodecError> {
        let i = self.long()?;
        if (0..=max).contains(&i) {
            Ok(i)
        } else {
            Err(self.err())
        }
    }
    fn opt_string(&mut self) -> Result<Option<String>, CodecError> {
        Ok(match self.union_index(1)? {
            0 => None,
            _ => Some(self.string()?),
        })
    }
    /// Reads array/map blocks, calling `item` once per element.
    fn blocks(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        loop {
            let mut count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                // A negative count is followed by the block's size in bytes.
                count = count.checked_neg().ok_or_else(|| self.err())?;
                self.long()?;
            }
            if count as u64 > self.buf.len() as u64 {
                return Err(self.err());
            }
            for _ in 0..count {
                item(self)?;
            }
        }
    }
    fn string_map(&mut self) -> Result<BTreeMap<String, String>, CodecError> {
        let mut m = BTreeMap::new();
        self.blocks(|r| {
            let k = r.string()?;
            m.insert(k, r.string()?);
            Ok(())
        })?;
        Ok(m)
    }
    fn tensors(&mut self) -> Result<Vec<Tensor>, CodecError> {
        let mut ts = Vec::new();
        self.blocks(|r| {
            let name = r.string()?;
            let datatype: DataType = r.string()?.parse()?;
            let mut shape = Vec::new();
            r.blocks(|r| {
                shape.push(r.long()?);
                Ok(())
            })?;
            let data = r.bytes()?.to_vec();
            ts.push(Tensor {
                name,
                datatype,
                shape,
                data,
            });
            Ok(())
        })?;
        Ok(ts)
    }
    fn at(&mut self, field: &'static str) -> &mut Self {
        self.field = field;
        self
    }
    fn finish<T>(self, value: T) -> Result<T, CodecError> {
        if self.buf.is_empty() {
            Ok(value)
        } else {
            Err(CodecError::Field("trailing bytes"))
        }
    }
}

/// Decodes a request datum written with the current schema.
pub fn read_request(buf: &[u8]) -> Result<InferenceRequest, CodecError> {
    let mut r = Reader::new(buf);
    let id = r.at("id").string()?;
    let client_id = r.at("client_id").opt_string()?;
    let model = r.at("model").string()?;
    let deadline = crate::Deadline::from_wire(r.at("deadline_ms").long()?);
    let sent_at_us = r.at("sent_at_us").long()?;
    let reply = match r.at("reply").union_index(1)? {
        0 => None,
        _ => Some(ReplyRoute {
            channel: r.string()?,
            key: r.string()?,
            ttl_ms: r.long()?,
        }),
    };
    let trace = r.at("trace").string_map()?;
    let parameters = r.at("parameters").string_map()?;
    let inputs = r.at("inputs").tensors()?;
    let mut outputs = Vec::new();
    r.at("outputs").blocks(|r| {
        outputs.push(r.string()?);
        Ok(())
    })?;
    let hop = match r.at("hop").union_index(1)? {
        0 => None,
        _ => Some(GraphHop {
            graph: r.string()?,
            step: r.string()?,
            from: r.string()?,
            shadow: r.boolean()?,
            failed: InferenceError::from_json(&r.string()?),
            served: r.string_map()?,
        }),
    };
    let reply_format = crate::ReplyFormat::from_wire(&r.at("reply_format").string()?);
    r.finish(InferenceRequest {
        id,
        client_id,
        model,
        deadline,
        sent_at_us,
        reply,
        trace,
        parameters,
        inputs,
        outputs,
        hop,
        reply_format,
    })
}

/// Decodes a result datum written with the current schema.
pub fn read_result(buf: &[u8]) -> Result<InferenceResult, CodecError> {
    let mut r = Reader::new(buf);
    let id = r.at("id").string()?;
    let client_id = r.at("client_id").opt_string()?;
    let model = r.at("model").string()?;
    let model_version = r.at("model_version").string()?;
    let error = match r.at("error").union_index(1)? {
        0 => None,
        _ => Some(InferenceError {
            code: crate::ErrorCode::from_wire(&r.string()?),
            message: r.string()?,
            step: r.string()?,
        }),
    };
    let outputs = r.at("outputs").tensors()?;
    let parameters = r.at("parameters").string_map()?;
    let queue_us = r.at("queue_us").long()?;
    let infer_us = r.at("infer_us").long()?;
    let batch_size =
        i32::try_from(r.at("batch_size").long()?).map_err(|_| CodecError::Field("batch_size"))?;
    r.finish(InferenceResult {
        id,
        client_id,
        model,
        model_version,
        error,
        outputs,
        parameters,
        queue_us,
        infer_us,
        batch_size,
    })
}
