//! Model hot-swap over real processes (Kafka, redis-server, gateway, a worker running
//! onnxruntime): new versions pushed while 8 clients call the model, by `sluice models push`
//! and by Triton's repository API; no request fails, and every answer is the old model's or the
//! new one's for its sample, as its `model_version` says, never a mix. A version that does not
//! load leaves the old one serving and says why; a restarted worker serves the newest version
//! that loads.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Which model file each version of `mlp` is, in this test.
fn file_of(version: &str) -> &'static str {
    match version {
        "1" | "4" => "mlp",
        "2" | "3" => "logreg",
        other => panic!("unexpected version {other}"),
    }
}

/// Checks one answer against onnxruntime's outputs for its version's file; returns the version.
fn check(v: &Value, s: &Samples, k: usize) -> String {
    let version = v["model_version"].as_str().unwrap().to_string();
    let want = &s.expected[file_of(&version)];
    let outputs = v["outputs"].as_array().unwrap();
    let label = outputs.iter().find(|o| o["name"] == "label").unwrap();
    let probs = outputs
        .iter()
        .find(|o| o["name"] == "probabilities")
        .unwrap();
    assert_eq!(
        label["data"][0], want["label"][k],
        "version {version}, sample {k}"
    );
    assert_close(
        &flat_f64(&probs["data"]),
        &flat_f64(&want["probabilities"][k]),
        &format!("version {version} sample {k}"),
    );
    version
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_swap_under_load_with_no_failed_request_and_no_mixed_answer() {
    let Some(mut stack) = Stack::start(&[(
        "SLUICE__MODEL_STORE",
        std::env::temp_dir()
            .join(format!("sluice-store-{}", std::process::id()))
            .to_str()
            .unwrap(),
    )]) else {
        return;
    };
    let (worker, _) = stack.start_worker_at("mlp");
    let base = stack.gateway.clone();
    let s = Arc::new(samples());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (base, s, stop) = (base.clone(), Arc::clone(&s), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let client = http();
            let mut seen: Vec<String> = Vec::new();
            let mut k = c;
            while !stop.load(Ordering::Relaxed) {
                k = (k + 1) % s.scaled.len();
                let r = post(
                    &client,
                    &format!("{base}/v2/models/mlp/infer"),
                    &[],
                    infer_body(&[&s.scaled[k]]),
                )
                .await;
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                seen.push(check(&r.json(), &s, k));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Version 2 (logreg's file) by `sluice models push`: served once the command returns.
    let logreg = root().join("examples/models/logreg.onnx");
    let out = push(&stack, &logreg, "2");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("serving version 2"), "{text}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A file that is not a model: refused, named, and version 2 keeps serving.
    let junk = stack.dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    let out = push(&stack, &junk, "5");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("version 5 of 'mlp' not served (load failed")
            && text.contains("version 2 keeps serving"),
        "{text}"
    );

    // Version 3 through Triton's repository API, the file's bytes in base64.
    let client = http();
    let bytes = std::fs::read(&logreg).unwrap();
    let body =
        serde_json::json!({"parameters": {"version": "3", "file:1/model.onnx": b64(&bytes)}});
    let r = post(
        &client,
        &format!("{base}/v2/repository/models/mlp/load"),
        &[],
        body.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["version"], "3");
    let r = post(
        &client,
        &format!("{base}/v2/repository/models/mlp/unload"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(
        &client,
        &format!("{base}/v2/repository/models/nope/load"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    // Rolling back is pushing the earlier file: version 4 is mlp's again.
    let mlp = root().join("examples/models/mlp.onnx");
    let out = push(&stack, &mlp, "4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for c in clients {
        let seen = c.await.unwrap();
        // Each client calls one request at a time: once it saw a version, it never sees an
        // older one (a swap lands between batches, and no batch runs a mix).
        let numbers: Vec<u32> = seen.iter().map(|v| v.parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[0] <= w[1]), "{numbers:?}");
        all.extend(seen);
    }
    for v in ["1", "2", "3", "4"] {
        let n = all.iter().filter(|x| *x == v).count();
        println!("version {v}: {n} answers");
        assert!(n > 0, "no answer from version {v}");
    }
    assert!(all.len() > 100, "{} answers", all.len());
    // Metadata names the version serving now; versioned calls reach it, other versions 404.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let meta = get(&client, &format!("{base}/v2/models/mlp")).await.json();
    assert_eq!(meta["versions"], serde_json::json!(["4"]), "{meta}");
    let r = post(
        &client,
        &format!("{base}/v2/models/mlp/versions/4/infer"),
        &[],
        infer_body(&[&s.scaled[1]]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(check(&r.json(), &s, 1), "4");
    let r = post(
        &client,
        &format!("{base}/v2/models/mlp/versions/1/infer"),
        &[],
        infer_body(&[&s.scaled[1]]),
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(String::from_utf8_lossy(&r.body).contains("version 4 serves now"));

    // A restarted worker serves the newest version that loads (4), not the config's.
    stack.signal(worker, "KILL");
    stack.wait_exit(worker, Duration::from_secs(5));
    stack.start_worker("mlp");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let r = post(
            &client,
            &format!("{base}/v2/models/mlp/infer"),
            &[],
            infer_body(&[&s.scaled[0]]),
        )
        .await;
        if r.status == 200 {
            assert_eq!(check(&r.json(), &s, 0), "4");
            break;
        }
        assert!(Instant::now() < end, "no answer after the restart");
    }
}

/// `sluice models push mlp FILE --version VERSION`, waited for.
fn push(stack: &Stack, file: &std::path::Path, version: &str) -> std::process::Output {
    stack
        .sluice(&[
            "models",
            "push",
            "mlp",
            file.to_str().unwrap(),
            "--version",
            version,
        ])
        .output()
        .unwrap()
}

/// Standard base64 (the repository API's file encoding).
fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
