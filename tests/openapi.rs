//! The gateway against its OpenAPI document (`docs/openapi.yaml`), fuzzed by a stock tool:
//! schemathesis generates valid and invalid requests for every operation and checks that each
//! answer's status, content type and body are the documented ones and that invalid input is
//! refused with a 4xx, on the real stack (Kafka, redis-server, onnxruntime).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_answers_as_its_openapi_document_says() {
    let Some(python) = venv_python(".venv-schemathesis") else {
        return;
    };
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let st = python.with_file_name("schemathesis");
    let out = Command::new(&st)
        .args(["run", "docs/openapi.yaml", "--url", &stack.gateway])
        .args([
            "--checks",
            "status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
        ])
        .args(["--max-examples", "25", "--generation-deterministic"])
        .args(["--request-timeout", "70", "--workers", "1"])
        .current_dir(root())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found responses that break the document:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It did exercise the operations (a run that tested nothing also exits 0).
    assert!(report.contains("Tested: 18"), "{report}");

    // What it found once: a load body that is not a JSON object used to reload the model.
    let r = post(
        &http(),
        &format!("{}/v2/repository/models/mlp/load", stack.gateway),
        &[],
        "[null, null]",
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
}
