//! Writes the seed corpus of the Avro and binary-extension targets (`fuzz/corpus/<target>/`):
//! valid records of each envelope, so fuzzing starts from what Sluice really reads.
//! `cargo run --manifest-path fuzz/Cargo.toml --bin write_seeds` (stable is enough).

use std::path::Path;

use sluice_schemas::learning::{FeedbackRecord, encode_feedback};
use sluice_schemas::{
    DataType, InferenceError, InferenceRequest, InferenceResult, ReplyRoute, Tensor,
    encode_request, encode_result,
};

fn write(target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0).collect();
    let request = InferenceRequest {
        id: "seed-1".into(),
        client_id: Some("caller-1".into()),
        model: "mlp".into(),
        deadline: sluice_schemas::Deadline::from_wire(1_700_000_000_000),
        sent_at_us: 1_700_000_000_000_000,
        reply: Some(ReplyRoute {
            channel: "sluice:replies:gw".into(),
            key: "sluice:result:seed-1".into(),
            ttl_ms: 60_000,
        }),
        inputs: vec![Tensor::from_values("input", DataType::Fp32, vec![1, 64], &values)],
        outputs: vec!["label".into()],
        ..Default::default()
    };
    write("avro_envelope", "request", &encode_request(&request)?)?;
    let bytes_request = InferenceRequest {
        inputs: vec![Tensor::from_bytes_elements(
            "text",
            vec![2],
            ["hello", "world"],
        )],
        ..request.clone()
    };
    write("avro_envelope", "request-bytes", &encode_request(&bytes_request)?)?;
    let result = InferenceResult {
        id: "seed-1".into(),
        client_id: Some("caller-1".into()),
        model: "mlp".into(),
        model_version: "1".into(),
        error: None,
        outputs: vec![Tensor::from_values("label", DataType::Int64, vec![1], &[7i64])],
        parameters: Default::default(),
        queue_us: 10,
        infer_us: 20,
        batch_size: 1,
    };
    write("avro_envelope", "result", &encode_result(&result)?)?;
    let failed = InferenceResult {
        error: Some(InferenceError {
            code: sluice_schemas::ErrorCode::InvalidInput,
            message: "input 'input' has shape [1, 63]".into(),
            step: "mlp".into(),
        }),
        outputs: Vec::new(),
        ..result
    };
    write("avro_envelope", "result-error", &encode_result(&failed)?)?;
    let feedback = FeedbackRecord {
        id: "seed-1".into(),
        model: "mlp".into(),
        truth: None,
        reward: Some(1.0),
        time_ms: 1_700_000_000_000,
    };
    write("avro_envelope", "feedback", &encode_feedback(&feedback)?)?;

    // Binary extension: two length bytes (the target's framing), the JSON header, raw tensors.
    let header = br#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}],"outputs":[{"name":"label","parameters":{"binary_data":true}}]}"#;
    let mut binary = (header.len() as u16).to_le_bytes().to_vec();
    binary.extend_from_slice(header);
    for v in [0.5f32, 1.0, 1.5, 2.0] {
        binary.extend_from_slice(&v.to_le_bytes());
    }
    write("oip_binary", "fp32", &binary)?;
    Ok(())
}
