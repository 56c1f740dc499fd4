//! Every Open Inference Protocol datatype's boundary values through the running stack and back,
//! compared bit for bit with what was sent (`examples/datatypes.toml`: `echo` returns its inputs
//! through onnxruntime's Identity; `echo-twice` runs it twice in a graph). Each value goes in as
//! OIP JSON and as binary, comes back as JSON and as binary, through the Avro envelope on Kafka,
//! a graph hop in process and (second test) a graph hop through its topic. Values JSON cannot
//! carry (NaN, ±inf, FP16) are sent as binary, and asking for them as JSON is a 422 naming the
//! output; a JSON value a datatype cannot hold exactly is a 422 naming the input and element;
//! BYTES that are not UTF-8 are refused for an ONNX model's input (docs/datatypes.md).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::*;
use serde_json::{Value, json};

/// One input: datatype, its values as JSON (`None`: not sendable as JSON), and as raw bytes.
struct Case {
    dtype: &'static str,
    json: Option<Vec<Value>>,
    elements: usize,
    raw: Vec<u8>,
}

fn le<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

fn bytes_raw(elements: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// Boundary values of every datatype. `binary_only` adds those JSON cannot carry.
fn cases(binary_only: bool) -> Vec<Case> {
    macro_rules! ints {
        ($dt:literal, $t:ty, [$($v:expr),*]) => {{
            let v: Vec<$t> = vec![$($v),*];
            Case { dtype: $dt, json: Some(v.iter().map(|x| json!(x)).collect()), elements: v.len(), raw: le(&v, <$t>::to_le_bytes) }
        }};
    }
    let two53 = 1i64 << 53;
    let mut f32s = vec![
        f32::MIN,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        -0.0,
        0.1,
        16_777_216.0,
        3.402_823_5e38,
    ];
    let mut f64s = vec![
        f64::MIN,
        f64::MAX,
        f64::MIN_POSITIVE,
        f64::from_bits(1),
        -0.0,
        0.1,
        (two53 + 2) as f64,
        1e308,
    ];
    let texts: Vec<&[u8]> = vec![b"", "héllo, 日本".as_bytes(), b"a\"quote\\"];
    if binary_only {
        f32s.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        f64s.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
    }
    let json_of = |ok: bool, v: Vec<Value>| (!binary_only && ok).then_some(v);
    let mut out = vec![
        Case {
            dtype: "BOOL",
            json: Some(vec![json!(true), json!(false)]),
            elements: 2,
            raw: vec![1, 0],
        },
        ints!("UINT8", u8, [0, 255]),
        ints!("UINT16", u16, [0, u16::MAX]),
        ints!("UINT32", u32, [0, u32::MAX]),
        ints!("UINT64", u64, [0, (1 << 53) + 1, u64::MAX]),
        ints!("INT8", i8, [i8::MIN, i8::MAX, -1]),
        ints!("INT16", i16, [i16::MIN, i16::MAX]),
        ints!("INT32", i32, [i32::MIN, i32::MAX]),
        ints!(
            "INT64",
            i64,
            [
                i64::MIN,
                i64::MAX,
                two53 + 1,
                -two53 - 1,
                -2_654_276_660_701_483_516
            ]
        ),
        Case {
            dtype: "FP16",
            json: None,
            // 0, -0, max, -max, smallest subnormal, +inf, -inf, NaN (as bits).
            elements: 8,
            raw: le(
                &[
                    0x0000u16, 0x8000, 0x7bff, 0xfbff, 0x0001, 0x7c00, 0xfc00, 0x7e00,
                ],
                u16::to_le_bytes,
            ),
        },
        Case {
            dtype: "FP32",
            json: json_of(true, f32s.iter().map(|x| json!(x)).collect()),
            elements: f32s.len(),
            raw: le(&f32s, f32::to_le_bytes),
        },
        Case {
            dtype: "FP64",
            json: json_of(true, f64s.iter().map(|x| json!(x)).collect()),
            elements: f64s.len(),
            raw: le(&f64s, f64::to_le_bytes),
        },
        Case {
            dtype: "BYTES",
            json: json_of(
                true,
                texts
                    .iter()
                    .map(|t| json!(std::str::from_utf8(t).unwrap()))
                    .collect(),
            ),
            elements: texts.len(),
            raw: bytes_raw(&texts),
        },
    ];
    if binary_only {
        // Every case goes as binary; the JSON-able ones are covered by the JSON run.
        out.iter_mut().for_each(|c| c.json = None);
    }
    out
}

fn input_name(c: &Case) -> String {
    format!("t_{}", c.dtype.to_lowercase())
}

fn output_name(c: &Case) -> String {
    format!("u_{}", c.dtype.to_lowercase())
}

/// A request with every case: JSON data where it has some, binary otherwise; every output
/// asked for as binary (`binary_out`) or as JSON.
fn request(cases: &[Case], binary_out: bool) -> (Vec<u8>, Option<usize>) {
    request_with(cases, &|_| binary_out)
}

/// As [`request`], output `u_<type>` asked for as binary where `binary_out(dtype)`.
fn request_with(cases: &[Case], binary_out: &dyn Fn(&str) -> bool) -> (Vec<u8>, Option<usize>) {
    let mut binary = Vec::new();
    let inputs: Vec<Value> = cases
        .iter()
        .map(|c| {
            let mut input =
                json!({"name": input_name(c), "datatype": c.dtype, "shape": [1, c.elements]});
            match &c.json {
                Some(values) => input["data"] = json!(values),
                None => {
                    input["parameters"] = json!({"binary_data_size": c.raw.len()});
                    binary.extend_from_slice(&c.raw);
                }
            }
            input
        })
        .collect();
    let outputs: Vec<Value> = cases
        .iter()
        .map(
            |c| json!({"name": output_name(c), "parameters": {"binary_data": binary_out(c.dtype)}}),
        )
        .collect();
    let mut body = serde_json::to_vec(&json!({"inputs": inputs, "outputs": outputs})).unwrap();
    let json_len = (!binary.is_empty()).then_some(body.len());
    body.extend_from_slice(&binary);
    (body, json_len)
}

async fn send(client: &Http, url: &str, (body, json_len): (Vec<u8>, Option<usize>)) -> Reply {
    let headers: Vec<(&str, String)> = json_len
        .map(|n| vec![("inference-header-content-length", n.to_string())])
        .unwrap_or_default();
    post(client, url, &headers, body).await
}

/// The JSON data of an output as the raw bytes of its datatype (exact: integers from their
/// digits, floats parsed as their own width).
fn json_to_raw(dtype: &str, data: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in data {
        match dtype {
            "BOOL" => out.push(u8::from(v.as_bool().unwrap())),
            "UINT8" | "UINT16" | "UINT32" | "UINT64" => {
                out.extend_from_slice(&v.as_u64().unwrap().to_le_bytes()[..int_width(dtype)]);
            }
            "INT8" | "INT16" | "INT32" | "INT64" => {
                out.extend_from_slice(&v.as_i64().unwrap().to_le_bytes()[..int_width(dtype)]);
            }
            "FP32" => out.extend_from_slice(&v.to_string().parse::<f32>().unwrap().to_le_bytes()),
            "FP64" => out.extend_from_slice(&v.to_string().parse::<f64>().unwrap().to_le_bytes()),
            "BYTES" => out.extend_from_slice(&bytes_raw(&[v.as_str().unwrap().as_bytes()])),
            other => panic!("no JSON for {other}"),
        }
    }
    out
}

/// Bytes per element of an integer datatype, from its name (`INT16` → 2).
fn int_width(dtype: &str) -> usize {
    let bits: usize = dtype
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap();
    bits / 8
}

/// Checks every output of `reply` against its case, bit for bit.
fn assert_echoed(cases: &[Case], reply: &Reply, what: &str) {
    assert_eq!(
        reply.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    let json_len = reply
        .headers
        .get("inference-header-content-length")
        .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
    let (head, mut binary) = reply.body.split_at(json_len.unwrap_or(reply.body.len()));
    let v: Value = serde_json::from_slice(head).unwrap();
    for c in cases {
        let out = v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == output_name(c))
            .unwrap_or_else(|| panic!("{what}: no {}: {v}", output_name(c)));
        assert_eq!(out["datatype"], c.dtype, "{what}");
        assert_eq!(out["shape"], json!([1, c.elements]), "{what}: {}", c.dtype);
        let got = match out["parameters"]["binary_data_size"].as_u64() {
            Some(n) => {
                let (mine, rest) = binary.split_at(n as usize);
                binary = rest;
                mine.to_vec()
            }
            None => json_to_raw(c.dtype, out["data"].as_array().unwrap()),
        };
        assert_eq!(got, c.raw, "{what}: {} changed on the way", c.dtype);
    }
}

/// Both servables, JSON in / JSON out, JSON in / binary out, binary in / binary out.
async fn round_trips(stack: &Stack) {
    let client = http();
    for servable in ["echo", "echo-twice"] {
        let url = format!("{}/v2/models/{servable}/infer", stack.gateway);
        let json_cases = cases(false);
        // FP16 has no JSON form: it comes back binary beside the others' JSON.
        let reply = send(&client, &url, request_with(&json_cases, &|d| d == "FP16")).await;
        assert_echoed(&json_cases, &reply, &format!("{servable} JSON→JSON"));
        let reply = send(&client, &url, request(&json_cases, true)).await;
        assert_echoed(&json_cases, &reply, &format!("{servable} JSON→binary"));
        let binary_cases = cases(true);
        let reply = send(&client, &url, request(&binary_cases, true)).await;
        assert_echoed(&binary_cases, &reply, &format!("{servable} binary→binary"));
    }
}

/// A request of the JSON cases (FP16 in binary) with input `name`'s data replaced by `data`.
fn with_data(name: &str, data: Value) -> (Vec<u8>, Option<usize>) {
    let (body, json_len) = request(&cases(false), false);
    let (head, binary) = body.split_at(json_len.unwrap_or(body.len()));
    let mut v: Value = serde_json::from_slice(head).unwrap();
    for input in v["inputs"].as_array_mut().unwrap() {
        if input["name"] == name {
            input["shape"] = json!([1, data.as_array().unwrap().len()]);
            input["data"] = data.clone();
        }
    }
    let mut out = serde_json::to_vec(&v).unwrap();
    let len = out.len();
    out.extend_from_slice(binary);
    (out, json_len.map(|_| len))
}

/// Values a datatype cannot hold exactly are refused by name, never rounded.
async fn refusals(stack: &Stack) {
    let client = http();
    let url = format!("{}/v2/models/echo/infer", stack.gateway);
    let refused = [
        ("t_int64", json!([1, 1.5]), "element 1"),
        // 2^53 + 2 written as a float: past 2^53 a float does not say which integer it was.
        ("t_int64", json!([9.007_199_254_740_994e15]), "beyond 2^53"),
        ("t_uint8", json!([0, 256]), "out of range"),
        ("t_int32", json!([2_147_483_648i64]), "out of range"),
        ("t_uint64", json!([-1]), "out of range"),
        ("t_fp32", json!([1e39]), "out of range for FP32"),
        (
            "t_fp64",
            json!([9_007_199_254_740_993i64]),
            "no exact floating-point value",
        ),
        ("t_bool", json!([2]), "not a boolean"),
        ("t_int32", json!([true]), "boolean"),
    ];
    for (input, data, says) in refused {
        let reply = send(&client, &url, with_data(input, data.clone())).await;
        let body = String::from_utf8_lossy(&reply.body).to_string();
        assert_eq!(reply.status, 422, "{input} {data}: {body}");
        assert!(
            body.contains(input) && body.contains(says),
            "{input} {data}: {body}"
        );
    }
    // Bytes that are not UTF-8 pass every path but an ONNX model's string input (onnxruntime
    // gets text): refused up front, naming the input and element, by the gateway for a model
    // and by the model's step for a graph.
    for servable in ["echo", "echo-twice"] {
        let mut all = cases(true);
        let bytes = all.iter_mut().find(|c| c.dtype == "BYTES").unwrap();
        bytes.raw = bytes_raw(&[b"ok", &[0xff, 0x00, 0xfe]]);
        bytes.elements = 2;
        let url = format!("{}/v2/models/{servable}/infer", stack.gateway);
        let reply = send(&client, &url, request(&all, true)).await;
        let text = String::from_utf8_lossy(&reply.body).to_string();
        assert!(
            (400..500).contains(&reply.status),
            "{servable}: {} {text}",
            reply.status
        );
        assert!(
            text.contains("t_bytes") && text.contains("element 1") && text.contains("UTF-8"),
            "{servable}: {text}"
        );
    }
    // Outputs JSON cannot carry are refused as JSON, naming the output and the way to get it.
    for (dtype, output) in [("FP32", "u_fp32"), ("FP64", "u_fp64"), ("FP16", "u_fp16")] {
        let all = cases(true);
        let reply = send(&client, &url, request_with(&all, &|d| d != dtype)).await;
        let text = String::from_utf8_lossy(&reply.body).to_string();
        assert_eq!(reply.status, 422, "{dtype}: {text}");
        assert!(
            text.contains(output) && text.contains("binary_data"),
            "{dtype}: {text}"
        );
    }
}

/// The stack with `examples/datatypes.toml` and one worker serving both servables.
fn stack_with_echo(env: &[(&str, &str)]) -> Option<Stack> {
    let mut stack = Stack::start_config(root().join("examples/datatypes.toml"), env)?;
    stack.start_unit("all", env);
    Some(stack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_survives_the_stack_with_hops_in_process() {
    let Some(stack) = stack_with_echo(&[]) else {
        return;
    };
    round_trips(&stack).await;
    refusals(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_survives_hops_through_topics() {
    let Some(stack) = stack_with_echo(&[("SLUICE__WORKER__LOCAL_HOPS", "false")]) else {
        return;
    };
    round_trips(&stack).await;
}
