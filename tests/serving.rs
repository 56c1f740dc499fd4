//! End-to-end tests over real processes: Kafka, redis-server, the gateway and workers running
//! onnxruntime. Expected outputs are onnxruntime's own (examples/samples.json, made by
//! examples/make_models.py).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const MODELS: [&str; 5] = ["scaler", "mlp", "logreg", "forest", "heavy"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_match_onnxruntime_for_every_model() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    for m in MODELS {
        stack.start_worker(m);
    }
    let s = samples();
    let client = http();
    for model in MODELS {
        let inputs = if model == "scaler" { &s.raw } else { &s.scaled };
        let expected = &s.expected[model];
        assert!(expected.is_object(), "no expected outputs for {model}");
        // One request per sample, then all samples in one request.
        for (i, x) in inputs.iter().enumerate() {
            let r = infer(&client, &stack.gateway, model, &[x]).await;
            assert_eq!(
                r.status,
                200,
                "{model} sample {i}: {}",
                String::from_utf8_lossy(&r.body)
            );
            check_outputs(&r.json(), expected, i..i + 1, model);
        }
        let all: Vec<&Vec<f32>> = inputs.iter().collect();
        let r = infer(&client, &stack.gateway, model, &all).await;
        assert_eq!(r.status, 200);
        check_outputs(&r.json(), expected, 0..inputs.len(), model);
    }
    // The classifiers are right about the digits, too.
    let r = infer(&client, &stack.gateway, "mlp", &[&s.scaled[0]]).await;
    assert_eq!(
        r.json()["outputs"][0]["data"][0].as_i64(),
        Some(s.labels[0])
    );
}

fn check_outputs(resp: &Value, expected: &Value, rows: std::ops::Range<usize>, model: &str) {
    let outputs = resp["outputs"].as_array().unwrap();
    let names: Vec<&str> = outputs
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    let want_names: Vec<&String> = expected.as_object().unwrap().keys().collect();
    assert_eq!(
        names.len(),
        want_names.len(),
        "{model}: outputs {names:?} vs {want_names:?}"
    );
    for o in outputs {
        let name = o["name"].as_str().unwrap();
        let want: Vec<Value> = expected[name].as_array().unwrap()[rows.clone()].to_vec();
        assert_eq!(
            o["shape"][0].as_u64(),
            Some(rows.len() as u64),
            "{model}.{name} batch dim"
        );
        if name == "label" {
            let got: Vec<i64> = serde_json::from_value(o["data"].clone()).unwrap();
            let want: Vec<i64> = want.iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(got, want, "{model} labels");
        } else {
            assert_close(
                &flat_f64(&o["data"]),
                &flat_f64(&Value::Array(want)),
                &format!("{model}.{name}"),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_are_all_answered_correctly() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    let (_, ops) = stack.start_worker_at("mlp");
    let s = Arc::new(samples());
    let client = http();
    let url = format!("{}/v2/models/mlp/infer", stack.gateway);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (client, url, s) = (client.clone(), url.clone(), Arc::clone(&s));
            tokio::spawn(async move {
                let k = i % s.scaled.len();
                let body = json!({"id": format!("req-{i}"), "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[k]}]});
                let r = post(&client, &url, &[], body.to_string()).await;
                (i, k, r)
            })
        })
        .collect();
    let mut answered = 0;
    for t in tasks {
        let (i, k, r) = t.await.unwrap();
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        assert_eq!(v["id"], format!("req-{i}"), "the caller's id is echoed");
        assert_eq!(
            v["outputs"][0]["data"][0], s.expected["mlp"]["label"][k],
            "request {i}"
        );
        answered += 1;
    }
    assert_eq!(answered, 200);
    // Batching happened: the batch-size histogram counts fewer model calls than rows, and some
    // batches held more than one row.
    let rows = metric_sum(&client, &ops, "sluice_worker_batch_size_sum", "").await;
    let calls = metric_sum(&client, &ops, "sluice_worker_batch_size_count", "").await;
    let single = metric_sum(&client, &ops, "sluice_worker_batch_size_bucket", "le=\"1\"").await;
    assert_eq!(rows, 200.0, "every row ran once");
    assert!(calls < rows, "{calls} model calls for {rows} rows");
    assert!(calls - single > 0.0, "no batch held more than one row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_get_exact_status_codes() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let client = http();
    let gw = stack.gateway.clone();
    let s = samples();
    let url = format!("{gw}/v2/models/mlp/infer");
    let cases: Vec<(&str, String, u16)> = vec![
        ("malformed JSON", "{\"inputs\": [".into(), 400),
        ("missing data", json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}).to_string(), 400),
        ("wrong shape", json!({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).to_string(), 422),
        ("wrong datatype", json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT32", "data": vec![1; 64]}]}).to_string(), 422),
        ("wrong input name", json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": vec![1; 64]}]}).to_string(), 422),
        ("element count", json!({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": vec![1; 64]}]}).to_string(), 422),
        ("batch too large", infer_body(&vec![&s.scaled[0]; 65]), 422),
        ("unknown output", json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[0]}], "outputs": [{"name": "nope"}]}).to_string(), 422),
        ("bad timeout", json!({"parameters": {"timeout": "soon"}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[0]}]}).to_string(), 400),
    ];
    for (what, body, want) in cases {
        let r = post(&client, &url, &[], body).await;
        assert_eq!(
            r.status,
            want,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(!msg.is_empty(), "{what}: error message");
    }
    let r = infer(&client, &gw, "nope", &[&s.scaled[0]]).await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("nope"));
    assert_eq!(
        get(&client, &format!("{gw}/v2/models/nope")).await.status,
        404
    );

    // 504: a model with no worker running, and a short per-request timeout (µs, Triton's unit).
    let started = std::time::Instant::now();
    let body = json!({"parameters": {"timeout": 300_000}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[0]}]});
    let r = post(
        &client,
        &format!("{gw}/v2/models/logreg/infer"),
        &[],
        body.to_string(),
    )
    .await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at the deadline, not later"
    );

    // 413 and 429 on a second gateway with tight limits; 503 on one whose broker is unreachable.
    let port = free_port();
    stack.spawn_sluice(
        "gateway-limits",
        &["gateway", "--listen", &format!("127.0.0.1:{port}")],
        &[
            ("SLUICE__GATEWAY__MAX_BODY_BYTES", "4096"),
            ("SLUICE__GATEWAY__MAX_IN_FLIGHT", "1"),
        ],
    );
    stack.wait_ready(&format!("http://127.0.0.1:{port}/v2/health/ready"));
    let small = format!("http://127.0.0.1:{port}");
    let r = post(
        &client,
        &format!("{small}/v2/models/mlp/infer"),
        &[],
        vec![b' '; 5000],
    )
    .await;
    assert_eq!(r.status, 413);
    // Hold the only slot with a request nobody answers (no logreg worker), then ask again.
    let hold = {
        let client = client.clone();
        let url = format!("{small}/v2/models/logreg/infer");
        let body = json!({"parameters": {"timeout": 2_000_000}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[0]}]}).to_string();
        tokio::spawn(async move { post(&client, &url, &[], body).await.status })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = infer(&client, &small, "mlp", &[&s.scaled[0]]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_eq!(hold.await.unwrap(), 504);

    let dead_port = free_port();
    let port = free_port();
    stack.spawn_sluice(
        "gateway-no-broker",
        &["gateway", "--listen", &format!("127.0.0.1:{port}")],
        &[("SLUICE__KAFKA__BROKERS", &format!("127.0.0.1:{dead_port}"))],
    );
    let no_broker = format!("http://127.0.0.1:{port}");
    wait_tcp(&format!("127.0.0.1:{port}"), Duration::from_secs(20));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        get(&client, &format!("{no_broker}/v2/health/ready"))
            .await
            .status,
        503
    );
    assert_eq!(
        get(&client, &format!("{no_broker}/v2/health/live"))
            .await
            .status,
        200
    );
    let r = infer(&client, &no_broker, "mlp", &[&s.scaled[0]]).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensor_extension_round_trips() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let s = samples();
    let client = http();
    let rows = [&s.scaled[3], &s.scaled[4]];
    let data: Vec<u8> = rows
        .iter()
        .flat_map(|r| r.iter().flat_map(|f| f.to_le_bytes()))
        .collect();
    let header = json!({
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": data.len()}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": true}}, {"name": "probabilities", "parameters": {"binary_data": false}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&data);
    let r = post(
        &client,
        &format!("{}/v2/models/mlp/infer", stack.gateway),
        &[("inference-header-content-length", header.len().to_string())],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let n: usize = r.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&r.body[..n]).unwrap();
    assert_eq!(head["outputs"][0]["name"], "label");
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 16);
    let labels: Vec<i64> = r.body[n..]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want: Vec<i64> = (3..5)
        .map(|i| s.expected["mlp"]["label"][i].as_i64().unwrap())
        .collect();
    assert_eq!(labels, want);
    let want_p = flat_f64(&Value::Array(
        s.expected["mlp"]["probabilities"].as_array().unwrap()[3..5].to_vec(),
    ));
    assert_close(
        &flat_f64(&head["outputs"][1]["data"]),
        &want_p,
        "probabilities (JSON beside binary)",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_under_load_loses_no_accepted_request() {
    let Some(mut stack) = Stack::start(&[("SLUICE__MODELS__MLP__PARTITIONS", "2")]) else {
        return;
    };
    let first = stack.start_worker("mlp");
    stack.start_worker("mlp");
    let s = Arc::new(samples());
    let client = http();
    let url = format!("{}/v2/models/mlp/infer", stack.gateway);
    let total = 400;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..total {
        let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
        let (client, url, s, done) = (
            client.clone(),
            url.clone(),
            Arc::clone(&s),
            Arc::clone(&done),
        );
        tasks.push(tokio::spawn(async move {
            let k = i % s.scaled.len();
            let body = json!({"parameters": {"timeout": 30_000_000}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[k]}]});
            let r = tokio::time::timeout(Duration::from_secs(40), post(&client, &url, &[], body.to_string())).await;
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
            (k, r)
        }));
        if i == 100 {
            stack.signal(first, "KILL");
            stack.start_worker("mlp");
        }
    }
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (k, r) = t.await.unwrap();
        let r = r.expect("a request hung past its deadline");
        if r.status == 200 {
            assert_eq!(
                r.json()["outputs"][0]["data"][0],
                s.expected["mlp"]["label"][k],
                "never a wrong answer"
            );
            ok += 1;
        } else {
            errors += 1;
        }
    }
    assert_eq!(ok + errors, total);
    assert_eq!(
        errors, 0,
        "every accepted request was answered after the kill (redelivered to a live worker)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_requests_in_flight_answers_each_exactly_once() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    // `heavy` batches (up to 6 ms) and runs for milliseconds: records are in flight at the signal.
    let w = stack.start_worker("heavy");
    let s = Arc::new(samples());
    let client = http();
    let url = format!("{}/v2/models/heavy/infer", stack.gateway);
    let total = 96;
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..total)
        .map(|i| {
            let (client, url, s, answered) = (client.clone(), url.clone(), Arc::clone(&s), Arc::clone(&answered));
            tokio::spawn(async move {
                let k = i % s.scaled.len();
                let body = json!({"id": format!("drain-{i}"), "parameters": {"timeout": 60_000_000}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[k]}]});
                let r = post(&client, &url, &[], body.to_string()).await;
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (i, k, r)
            })
        })
        .collect();
    // Signal once the worker is answering, before it has answered everything.
    let end = Instant::now() + Duration::from_secs(20);
    while answered.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < end, "nothing answered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stack.signal(w, "TERM");
    let at_signal = answered.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        at_signal < total,
        "requests were in flight at the signal ({at_signal} of {total} answered)"
    );
    assert!(
        stack.wait_exit(w, Duration::from_secs(25)),
        "worker exits 0 after SIGTERM"
    );
    let log = stack.log_of(w);
    assert!(
        log.contains("draining") && log.contains("worker stopped"),
        "{log}"
    );
    // What the first worker did not take, a new one reads from the committed offset.
    stack.start_worker("heavy");
    for t in tasks {
        let (i, k, r) = t.await.unwrap();
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        check_outputs(&r.json(), &s.expected["heavy"], k..k + 1, "heavy");
    }
    // Exactly once: each request has one record on the result topic (none redelivered and
    // answered again after the drain committed).
    let consumer = reader(&stack.kafka, "sluice.heavy.results");
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let quiet_until = |now: Instant| now + Duration::from_secs(2);
    let mut until = quiet_until(Instant::now() + Duration::from_secs(8));
    while Instant::now() < until {
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        else {
            continue;
        };
        let r = sluice_schemas::decode_result(rdkafka::Message::payload(&m).unwrap()).unwrap();
        *seen.entry(r.client_id.unwrap_or_default()).or_default() += 1;
        if seen.len() == total {
            until = until.min(quiet_until(Instant::now()));
        }
    }
    assert_eq!(seen.len(), total, "every request has a result record");
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "answered more than once: {repeated:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_tritonclient_works_against_the_gateway() {
    let Some(python) = venv_python(".venv-triton") else {
        return;
    };
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    for unit in EXAMPLE_GRAPH_UNITS {
        stack.start_worker(unit);
    }
    let host = stack.gateway.trim_start_matches("http://").to_string();
    let out = tokio::process::Command::new(python)
        .arg(root().join("tests/triton_client.py"))
        .arg(host)
        .arg(root().join("examples/samples.json"))
        .arg("--graphs")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "tritonclient failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tritonclient graphs OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_workers_recover_from_a_redis_restart() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let s = samples();
    let client = http();
    let gw = stack.gateway.clone();
    assert_eq!(
        infer(&client, &gw, "mlp", &[&s.scaled[0]]).await.status,
        200
    );
    stack.restart_redis();
    // The gateway re-subscribes and reports ready again; requests are answered again.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = infer(&client, &gw, "mlp", &[&s.scaled[1]]).await;
        if r.status == 200 {
            assert_eq!(
                r.json()["outputs"][0]["data"][0],
                s.expected["mlp"]["label"][1]
            );
            break;
        }
        assert!(
            [503, 504].contains(&r.status),
            "only unavailable/timeout while Redis is down, got {}",
            r.status
        );
        assert!(std::time::Instant::now() < end, "not recovered within 20s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        get(&client, &format!("{}/v2/health/ready", stack.gateway))
            .await
            .status,
        200
    );
    assert!(
        stack.log_of(2).contains("reply subscription restored"),
        "the gateway noticed the restart and re-subscribed"
    );
}
