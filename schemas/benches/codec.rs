//! Is the hand-written Avro codec worth keeping? Encodes and decodes a request record like the
//! gateway's (reply route, trace context, one [1, 64] FP32 tensor) and a result record like a
//! worker's, with the direct codec and with apache-avro (`Value` + schema), and prints the time
//! per record and the ratio. Run: `cargo bench -p sluice-schemas --bench codec`.
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use sluice_schemas::codec::{
    request_from_value, request_schemas, request_to_value, result_from_value, result_schemas,
    result_to_value,
};
use sluice_schemas::{
    DataType, InferenceRequest, InferenceResult, ReplyRoute, Tensor, decode_request, decode_result,
    encode_request, encode_result,
};

fn request() -> InferenceRequest {
    let input: Vec<f32> = (0..64).map(|i| i as f32 / 16.0).collect();
    InferenceRequest {
        id: "5f2c9a1b03de-1a2b".into(),
        client_id: Some("client-7".into()),
        model: "mlp".into(),
        deadline: sluice_schemas::Deadline::from_wire(1_764_000_000_000),
        sent_at_us: 1_764_000_000_000_000,
        reply: Some(ReplyRoute {
            channel: "sluice:reply:5f2c9a1b03de".into(),
            key: "sluice:result:5f2c9a1b03de-1a2b".into(),
            ttl_ms: 60_000,
        }),
        trace: [(
            "traceparent".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        )]
        .into(),
        inputs: vec![Tensor::from_values(
            "input",
            DataType::Fp32,
            vec![1, 64],
            &input,
        )],
        ..Default::default()
    }
}

fn result() -> InferenceResult {
    let p: Vec<f32> = (0..10).map(|i| i as f32 / 10.0).collect();
    InferenceResult {
        id: "5f2c9a1b03de-1a2b".into(),
        model: "mlp".into(),
        model_version: "1".into(),
        outputs: vec![
            Tensor::from_values("label", DataType::Int64, vec![1], &[2i64]),
            Tensor::from_values("probabilities", DataType::Fp32, vec![1, 10], &p),
        ],
        queue_us: 120,
        infer_us: 30,
        batch_size: 4,
        ..Default::default()
    }
}

/// Mean time per call over about `budget`.
fn time(budget: Duration, mut f: impl FnMut()) -> Duration {
    for _ in 0..1000 {
        f();
    }
    let (start, mut n) = (Instant::now(), 0u32);
    while start.elapsed() < budget {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    start.elapsed() / n
}

fn row(what: &str, direct: Duration, avro: Duration) {
    println!(
        "{what:<16} direct {:>7.2} µs   apache-avro {:>7.2} µs   apache-avro / direct {:>5.1}×",
        direct.as_secs_f64() * 1e6,
        avro.as_secs_f64() * 1e6,
        avro.as_secs_f64() / direct.as_secs_f64()
    );
}

fn main() {
    let budget = Duration::from_millis(700);
    let (req, res) = (request(), result());
    let (req_set, res_set) = (request_schemas(), result_schemas());
    let req_bytes = encode_request(&req).unwrap();
    let res_bytes = encode_result(&res).unwrap();
    assert_eq!(
        req_bytes,
        req_set.encode(request_to_value(&req)).unwrap(),
        "same bytes"
    );
    assert_eq!(
        res_bytes,
        res_set.encode(result_to_value(&res)).unwrap(),
        "same bytes"
    );
    println!(
        "request record {} bytes, result record {} bytes",
        req_bytes.len(),
        res_bytes.len()
    );
    row(
        "encode request",
        time(budget, || drop(black_box(encode_request(black_box(&req))))),
        time(budget, || {
            drop(black_box(req_set.encode(request_to_value(black_box(&req)))))
        }),
    );
    row(
        "decode request",
        time(budget, || {
            drop(black_box(decode_request(black_box(&req_bytes))))
        }),
        time(budget, || {
            let v = req_set.decode(black_box(&req_bytes), None).unwrap();
            drop(black_box(request_from_value(v)));
        }),
    );
    row(
        "encode result",
        time(budget, || drop(black_box(encode_result(black_box(&res))))),
        time(budget, || {
            drop(black_box(res_set.encode(result_to_value(black_box(&res)))))
        }),
    );
    row(
        "decode result",
        time(budget, || {
            drop(black_box(decode_result(black_box(&res_bytes))))
        }),
        time(budget, || {
            let v = res_set.decode(black_box(&res_bytes), None).unwrap();
            drop(black_box(result_from_value(v)));
        }),
    );
}
