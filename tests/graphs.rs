//! Graphs end to end over real processes (Kafka, redis-server, gateway, workers running
//! onnxruntime): answers checked against onnxruntime's own outputs for the same inputs
//! (examples/samples.json), joins, canary and shadow accounting, routing, reload, direct Kafka,
//! scaling a step under load.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sluice_schemas::{DataType, InferenceRequest, Tensor, decode_result, encode_request};

/// onnxruntime's outputs for sample `i`: (label, probabilities) of `model`.
fn expected(s: &Samples, model: &str, i: usize) -> (i64, Vec<f64>) {
    let e = &s.expected[model];
    (
        e["label"][i].as_i64().unwrap(),
        flat_f64(&e["probabilities"][i]),
    )
}

/// Majority vote over (mlp, logreg, forest), ties to the earliest listed.
fn vote(labels: [i64; 3]) -> i64 {
    let count = |l: i64| labels.iter().filter(|x| **x == l).count();
    let top = labels.iter().map(|l| count(*l)).max().unwrap();
    *labels.iter().find(|l| count(**l) == top).unwrap()
}

fn output<'a>(resp: &'a Value, name: &str) -> &'a Value {
    resp["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {resp}"))
}

fn served_by(resp: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(resp["parameters"]["served_by"].clone()).unwrap()
}

async fn infer_with(
    client: &Http,
    stack: &Stack,
    graph: &str,
    rows: &[&Vec<f32>],
    parameters: Value,
) -> Reply {
    let mut body: Value = serde_json::from_str(&infer_body(rows)).unwrap();
    body["parameters"] = parameters;
    post(
        client,
        &format!("{}/v2/models/{graph}/infer", stack.gateway),
        &[],
        body.to_string(),
    )
    .await
}

/// Closed-loop load on `graph` from 8 tasks, each request a different sample (so a tensor merged
/// into the wrong request shows), every answer checked against `want(sample)`. Runs until `stop`;
/// each task returns how many requests it got answered.
fn spawn_checked_load(
    stack: &Stack,
    graph: &'static str,
    want: fn(&Samples, usize) -> i64,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    let s = Arc::new(samples());
    let client = Arc::new(http());
    (0..8)
        .map(|c| {
            let (client, gw, s, stop) = (
                Arc::clone(&client),
                stack.gateway.clone(),
                Arc::clone(&s),
                Arc::clone(stop),
            );
            tokio::spawn(async move {
                let mut answered = 0usize;
                let mut i = c;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sample = i % s.raw.len();
                    let r = infer(&client, &gw, graph, &[&s.raw[sample]]).await;
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let got = output(&r.json(), "label")["data"][0].as_i64();
                    assert_eq!(got, Some(want(&s, sample)), "{graph} sample {sample}");
                    answered += 1;
                    i += 8;
                }
                answered
            })
        })
        .collect()
}

async fn total_answered(load: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut total = 0;
    for t in load {
        total += t.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_and_ensemble_answer_as_onnxruntime_does() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    for unit in EXAMPLE_GRAPH_UNITS {
        stack.start_worker(unit);
    }
    let s = samples();
    let client = http();

    // Graphs are listed and described like models.
    let models = get(&client, &format!("{}/v2/models", stack.gateway))
        .await
        .json();
    let names: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"digits-pipeline") && names.contains(&"mlp"),
        "{names:?}"
    );
    let meta = get(
        &client,
        &format!("{}/v2/models/digits-pipeline", stack.gateway),
    )
    .await
    .json();
    assert_eq!(meta["platform"], "sluice_graph");
    assert_eq!(meta["inputs"][0]["name"], "input");
    let outs: Vec<&str> = meta["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(outs, ["label", "probability"]);
    let config = get(
        &client,
        &format!("{}/v2/models/digits-ensemble/config", stack.gateway),
    )
    .await
    .json();
    assert_eq!(config["output"][0]["name"], "label");

    for (i, x) in s.raw.iter().enumerate() {
        let (mlp_label, mlp_probs) = expected(&s, "mlp", i);
        let r = infer(&client, &stack.gateway, "digits-pipeline", &[x]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let resp = r.json();
        assert_eq!(resp["model_name"], "digits-pipeline");
        assert_eq!(output(&resp, "label")["data"][0].as_i64(), Some(mlp_label));
        let best = mlp_probs.iter().copied().fold(f64::MIN, f64::max);
        assert_close(
            &flat_f64(&output(&resp, "probability")["data"]),
            &[best],
            "probability",
        );
        assert_eq!(served_by(&resp)["classify"], "mlp");

        let labels = ["mlp", "logreg", "forest"].map(|m| expected(&s, m, i).0);
        let r = infer(&client, &stack.gateway, "digits-ensemble", &[x]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let resp = r.json();
        assert_eq!(
            output(&resp, "label")["data"][0].as_i64(),
            Some(vote(labels)),
            "sample {i}: votes {labels:?}"
        );
        let served = served_by(&resp);
        assert_eq!(
            (
                served["mlp"].as_str(),
                served["logreg"].as_str(),
                served["forest"].as_str()
            ),
            ("mlp", "logreg", "forest")
        );
    }
    // All samples in one request, 50 requests at once.
    let all: Vec<&Vec<f32>> = s.raw.iter().collect();
    let want: Vec<i64> = (0..s.raw.len()).map(|i| expected(&s, "mlp", i).0).collect();
    let client = Arc::new(client);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (client, gw, rows) = (Arc::clone(&client), stack.gateway.clone(), all.clone());
        let rows: Vec<Vec<f32>> = rows.into_iter().cloned().collect();
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&Vec<f32>> = rows.iter().collect();
            infer(&client, &gw, "digits-pipeline", &refs).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        let got: Vec<i64> =
            serde_json::from_value(output(&r.json(), "label")["data"].clone()).unwrap();
        assert_eq!(got, want);
    }
    // A request the graph's interface rejects never enters it.
    let bad = post(
        &client,
        &format!("{}/v2/models/digits-pipeline/infer", stack.gateway),
        &[],
        json!({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).to_string(),
    )
    .await;
    assert_eq!(bad.status, 422, "{}", String::from_utf8_lossy(&bad.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_time_out_naming_missing_parts_or_answer_with_a_quorum() {
    // forest never runs: the plain ensemble times out, a 2-of-3 copy answers with two parts.
    let quorum = std::fs::read_to_string(root().join("examples/digits.toml"))
        .unwrap()
        .split("[graphs.digits-ensemble]")
        .nth(1)
        .unwrap()
        .split("# Canary")
        .next()
        .unwrap()
        .replace("digits-ensemble", "quorum-ensemble")
        .replace("timeout = \"2s\"", "timeout = \"1s\"\nquorum = 2");
    let config = config_variant(
        "joins",
        &[
            ("timeout = \"2s\"", "timeout = \"1s\""),
            (
                "cases = { fast = [\"fast\"] }, default = [\"accurate\"]",
                "cases = { fast = [\"fast\"], accurate = [\"accurate\"] }",
            ),
        ],
        &format!("\n[graphs.quorum-ensemble]{quorum}"),
    );
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    for unit in [
        "scaler",
        "mlp",
        "logreg",
        "digits-ensemble.vote",
        "quorum-ensemble.vote",
        "digits-routed.pick",
    ] {
        stack.start_worker(unit);
    }
    let s = samples();
    let client = http();
    let x = &s.raw[0];
    // Warm each model up, so the join's timeout measures a missing part, not a first call.
    for m in ["scaler", "mlp", "logreg"] {
        assert_eq!(
            infer(&client, &stack.gateway, m, &[&s.scaled[0]])
                .await
                .status,
            200
        );
    }

    let r = infer(&client, &stack.gateway, "digits-ensemble", &[x]).await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("step 'vote'") && message.contains("[\"forest\"]"),
        "{message}"
    );

    let r = infer(&client, &stack.gateway, "quorum-ensemble", &[x]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Two votes: if mlp and logreg agree that label wins, and a tie goes to mlp (listed first).
    assert_eq!(
        output(&r.json(), "label")["data"][0].as_i64(),
        Some(expected(&s, "mlp", 0).0)
    );

    // A router with no route for the request answers 400 naming the step and the value.
    let r = infer(&client, &stack.gateway, "digits-routed", &[x]).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("step 'pick'") && message.contains("tier"),
        "{message}"
    );

    // Both failures are dead-lettered with their origin and class.
    let consumer = from_start(&stack, "sluice.dead-letter");
    let mut stream = consumer.stream();
    let mut classes = BTreeMap::new();
    while classes.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("dead letters")
            .unwrap()
            .unwrap();
        let header = |k: &str| header_of(&m, k);
        classes.insert(header("x-error-class"), header("x-original-topic"));
    }
    assert_eq!(
        classes.get("join_timeout").map(String::as_str),
        Some("sluice.digits-ensemble.vote.requests")
    );
    assert_eq!(
        classes.get("no_route").map(String::as_str),
        Some("sluice.digits-routed.pick.requests")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_shadow_and_routing_are_accounted_and_reloadable() {
    let config = config_variant("canary", &[], "");
    let Some(mut stack) = Stack::start_config(config.clone(), &[]) else {
        return;
    };
    let (scaler, _) = stack.start_worker_at("scaler");
    stack.start_worker("mlp");
    stack.start_worker("logreg");
    let (_, forest_ops) = stack.start_worker_at("forest");
    stack.start_worker("digits-routed.pick");
    let s = samples();
    let client = http();

    // Canary: the `user` parameter picks the variant, the same way every time.
    let mut served = BTreeMap::<String, usize>::new();
    for i in 0..40 {
        let sample = i % s.raw.len();
        let user = format!("user-{i}");
        let r = infer_with(
            &client,
            &stack,
            "digits-canary",
            &[&s.raw[sample]],
            json!({"user": user}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let resp = r.json();
        // Known answers, worked out apart from the code under test: FNV-1a 64 of "user-<i>",
        // modulo 10,000, is below 3,000 (a 30% share) for exactly these users.
        const LOGREG_USERS: [usize; 9] = [1, 6, 10, 11, 20, 23, 25, 36, 37];
        let model = if LOGREG_USERS.contains(&i) {
            "logreg"
        } else {
            "mlp"
        };
        assert_eq!(served_by(&resp)["classify"], model, "{user}");
        let (label, probs) = expected(&s, model, sample);
        assert_eq!(output(&resp, "label")["data"][0].as_i64(), Some(label));
        assert_close(
            &flat_f64(&output(&resp, "probabilities")["data"]),
            &probs,
            model,
        );
        *served.entry(model.to_string()).or_default() += 1;
    }
    assert!(served.len() == 2, "both variants served: {served:?}");

    // Shadow: callers get mlp's answers; forest's agreement is counted per request.
    let n = s.raw.len();
    let mut agree_want = 0.0;
    for (i, x) in s.raw.iter().enumerate() {
        let r = infer(&client, &stack.gateway, "digits-shadow", &[x]).await;
        assert_eq!(r.status, 200);
        let resp = r.json();
        assert_eq!(
            output(&resp, "label")["data"][0].as_i64(),
            Some(expected(&s, "mlp", i).0)
        );
        assert_eq!(
            served_by(&resp).get("classify").map(String::as_str),
            Some("mlp")
        );
        if expected(&s, "mlp", i).0 == expected(&s, "forest", i).0 {
            agree_want += 1.0;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let agree = metric_sum(
            &client,
            &forest_ops,
            "sluice_shadow_comparisons_total",
            "outcome=\"agree\"",
        )
        .await;
        let disagree = metric_sum(
            &client,
            &forest_ops,
            "sluice_shadow_comparisons_total",
            "outcome=\"disagree\"",
        )
        .await;
        if agree + disagree >= n as f64 {
            assert_eq!((agree, disagree), (agree_want, n as f64 - agree_want));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shadow comparisons: {agree} + {disagree} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ... and written to the comparison topic, one record per request.
    let consumer = reader(&stack.kafka, "sluice.digits-shadow.comparisons");
    let mut stream = consumer.stream();
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let c = decode_result(m.payload().unwrap()).unwrap();
        assert_eq!(c.model, "forest");
        assert_eq!(c.parameters["primary"], "\"mlp\"");
        assert!(c.parameters.contains_key("agree"));
    }

    // Routing by a request parameter.
    let r = infer_with(
        &client,
        &stack,
        "digits-routed",
        &[&s.raw[1]],
        json!({"tier": "fast"}),
    )
    .await;
    let resp = r.json();
    assert_eq!(served_by(&resp)["fast"], "logreg");
    assert_eq!(
        output(&resp, "label")["data"][0].as_i64(),
        Some(expected(&s, "logreg", 1).0)
    );
    let r = infer(&client, &stack.gateway, "digits-routed", &[&s.raw[1]]).await;
    assert_eq!(served_by(&r.json())["accurate"], "mlp");

    // Reload under load: every user moves to the candidate, no request is dropped.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("share = 0.3", "share = 1.0")).unwrap();
    let client = Arc::new(client);
    let mut load = Vec::new();
    for i in 0..60 {
        let (client, gw, x) = (
            Arc::clone(&client),
            stack.gateway.clone(),
            s.raw[i % n].clone(),
        );
        load.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let body = json!({"parameters": {"user": format!("user-{i}")}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]});
            post(&client, &format!("{gw}/v2/models/digits-canary/infer"), &[], body.to_string()).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stack.signal_keep(scaler, "HUP");
    for t in load {
        assert_eq!(t.await.unwrap().status, 200);
    }
    // The same reload through a worker's ops port.
    let r = post(
        &client,
        &format!("http://{forest_ops}/admin/reload"),
        &[],
        "",
    )
    .await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, 200, "{text}");
    assert!(
        text.contains("digits-canary.classify: canary logreg at 1"),
        "{text}"
    );
    for i in 0..10 {
        let r = infer_with(
            &client,
            &stack,
            "digits-canary",
            &[&s.raw[0]],
            json!({"user": format!("after-{i}")}),
        )
        .await;
        assert_eq!(served_by(&r.json())["classify"], "logreg");
    }
}

fn graph_request(id: &str, x: &[f32]) -> InferenceRequest {
    InferenceRequest {
        id: id.into(),
        model: "digits-pipeline".into(),
        deadline: Some(sluice_schemas::Deadline::after(
            std::time::Duration::from_millis(30_000),
        )),
        sent_at_us: sluice_common::now_us(),
        inputs: vec![Tensor::from_values("input", DataType::Fp32, vec![1, 64], x)],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_is_callable_over_kafka_in_avro_and_json() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    for unit in ["scaler", "mlp", "digits-pipeline.postprocess"] {
        stack.start_worker(unit);
    }
    let s = samples();
    let consumer = reader(&stack.kafka, "sluice.digits-pipeline.results");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .create()
        .unwrap();
    let avro = encode_request(&graph_request("avro-1", &s.raw[2])).unwrap();
    producer
        .send(
            FutureRecord::to("sluice.digits-pipeline.requests")
                .key("avro-1")
                .payload(&avro),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let json_body = json!({"id": "json-1", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.raw[3]}]}).to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: "content-type",
        value: Some("application/json"),
    });
    producer
        .send(
            FutureRecord::to("sluice.digits-pipeline.requests")
                .key("json-1")
                .payload(&json_body)
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let mut stream = consumer.stream();
    let mut seen = BTreeMap::new();
    while seen.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("no result")
            .unwrap()
            .unwrap();
        let key = String::from_utf8_lossy(m.key().unwrap()).to_string();
        let payload = m.payload().unwrap().to_vec();
        seen.insert(key, payload);
    }
    let avro_result = decode_result(&seen["avro-1"]).unwrap();
    assert!(avro_result.error.is_none(), "{:?}", avro_result.error);
    let label = avro_result
        .outputs
        .iter()
        .find(|t| t.name == "label")
        .unwrap();
    assert_eq!(label.values::<i64>(), [expected(&s, "mlp", 2).0]);
    let json_result: Value = serde_json::from_slice(&seen["json-1"]).unwrap();
    assert_eq!(json_result["id"], "json-1");
    assert_eq!(
        output(&json_result, "label")["data"][0].as_i64(),
        Some(expected(&s, "mlp", 3).0)
    );

    // The README's example client, Avro and JSON, against the graph.
    let first_label = expected(&s, "mlp", 0).0;
    for json_flag in [false, true] {
        let mut cmd = tokio::process::Command::new(root().join(".venv/bin/python"));
        cmd.arg(root().join("examples/kafka_direct.py")).args([
            "--brokers",
            &stack.kafka,
            "--model",
            "digits-pipeline",
        ]);
        if json_flag {
            cmd.arg("--json");
        }
        let out = cmd.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("label [1] [{first_label}]")),
            "json={json_flag}: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_a_step_from_one_to_three_workers_and_back_loses_nothing() {
    // Every model and graph gets 3 partitions (a graph's topics must agree).
    let config = config_variant(
        "scaling",
        &[
            ("]\ninputs = [{ name", "]\npartitions = 3\ninputs = [{ name"),
            ("onnx = \"models/", "partitions = 3\nonnx = \"models/"),
        ],
        "",
    );
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_worker("scaler");
    stack.start_worker("digits-pipeline.postprocess");
    let (_, first) = stack.start_worker_at("mlp");
    let client = http();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = spawn_checked_load(
        &stack,
        "digits-pipeline",
        |s, i| expected(s, "mlp", i).0,
        &stop,
    );
    let assigned = "sluice_worker_assigned_partitions";
    let ok = "sluice_worker_requests_total";
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric_sum(&client, &first, assigned, "").await,
        3.0,
        "one worker owns all"
    );
    let (second, second_ops) = stack.start_worker_at("mlp");
    let (third, third_ops) = stack.start_worker_at("mlp");
    // Each added worker is given a partition and answers requests on it (a cooperative
    // rebalance takes a few seconds per member).
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    let owned = loop {
        let mut owned = 0.0;
        let mut all_serve = true;
        for ops in [&first, &second_ops, &third_ops] {
            let n = metric_sum(&client, ops, assigned, "").await;
            let answered = metric_sum(&client, ops, ok, "outcome=\"ok\"").await;
            all_serve &= n >= 1.0 && answered > 0.0;
            owned += n;
        }
        if all_serve {
            break owned;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "not every worker owns a partition and answers"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(owned, 3.0, "the three partitions are shared, none twice");
    stack.signal(second, "TERM");
    stack.signal(third, "TERM");
    assert!(stack.wait_exit(second, Duration::from_secs(30)));
    assert!(stack.wait_exit(third, Duration::from_secs(30)));
    // The first worker took their partitions over, and keeps answering (every answer checked).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric_sum(&client, &first, assigned, "").await,
        3.0,
        "taken back over"
    );
    let before = metric_sum(&client, &first, ok, "outcome=\"ok\"").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = metric_sum(&client, &first, ok, "outcome=\"ok\"").await;
    assert!(
        after > before,
        "the remaining worker serves: {before} → {after}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = total_answered(load).await;
    println!("answered {total} requests while scaling mlp 1 → 3 → 1");
    assert!(total > 50, "{total}");
}

#[test]
fn a_broken_graph_is_reported_at_start_naming_graph_and_step() {
    let config = config_variant(
        "broken",
        &[],
        "\n[graphs.loop]\ninputs = [{ name = \"input\", datatype = \"FP32\", shape = [-1, 64] }]\n[[graphs.loop.steps]]\nname = \"a\"\nmodel = \"scaler\"\ninputs = { input = \"b.scaled\" }\n[[graphs.loop.steps]]\nname = \"b\"\nmodel = \"scaler\"\ninputs = { input = \"a.scaled\" }\n[graphs.typo]\ninputs = [{ name = \"input\", datatype = \"FP32\", shape = [-1, 64] }]\n[[graphs.typo.steps]]\nname = \"s\"\nmodel = \"scaler\"\ninputs = { input = \"request.input\" }\n[[graphs.typo.steps]]\nname = \"m\"\nmodel = \"mlp\"\ninputs = { input = \"s.scaledd\" }\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&config)
        .args(["topics", "apply"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("graphs.loop") && err.contains("cycle"),
        "{err}"
    );
    assert!(
        err.contains("graphs.typo step 'm'") && err.contains("'s.scaledd', which no step produces"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_worker_killed_under_load_loses_and_mixes_nothing() {
    let Some(mut stack) = Stack::start(&[("SLUICE__GATEWAY__DEFAULT_TIMEOUT", "40s")]) else {
        return;
    };
    for unit in ["scaler", "mlp", "logreg", "forest"] {
        stack.start_worker(unit);
    }
    let vote_worker = stack.start_worker("digits-ensemble.vote");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vote_of =
        |s: &Samples, i: usize| vote(["mlp", "logreg", "forest"].map(|m| expected(s, m, i).0));
    let load = spawn_checked_load(&stack, "digits-ensemble", vote_of, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.signal(vote_worker, "KILL");
    stack.wait_exit(vote_worker, Duration::from_secs(10));
    stack.start_worker("digits-ensemble.vote");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = total_answered(load).await;
    println!("answered {total} ensemble requests across a join worker's SIGKILL");
    assert!(total > 16, "{total}");
    // Every answer was checked above (200 and the vote of onnxruntime's three answers).
    DrillReport {
        drill: "join worker kill -9 (ensemble vote)".into(),
        sent: total,
        correct: total,
        note: "digits-ensemble, 8 callers; a new vote worker started at once".into(),
        ..DrillReport::default()
    }
    .publish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_to_pass_on_is_answered_and_dead_lettered() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    // The scale step's producer takes records up to 2,000 bytes: 1 row passes on, 16 do not.
    let small = config_variant(
        "small-records",
        &[],
        "\n[kafka.producer]\n\"message.max.bytes\" = \"2000\"\n",
    );
    stack.start_worker_with_config("scaler", &small);
    stack.start_worker("mlp");
    stack.start_worker("digits-pipeline.postprocess");
    let s = samples();
    let client = http();
    let r = infer(&client, &stack.gateway, "digits-pipeline", &[&s.raw[0]]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rows: Vec<&Vec<f32>> = (0..16).map(|i| &s.raw[i % s.raw.len()]).collect();
    let started = std::time::Instant::now();
    let r = infer(&client, &stack.gateway, "digits-pipeline", &rows).await;
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("could not be passed on") && message.contains("sluice.mlp.requests"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once, not at the deadline"
    );
    // The partition is not pinned: the next request is served.
    let r = infer(&client, &stack.gateway, "digits-pipeline", &[&s.raw[1]]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let consumer = from_start(&stack, "sluice.dead-letter");
    let mut stream = consumer.stream();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("a dead letter")
            .unwrap()
            .unwrap();
        let header = |k: &str| header_of(&m, k);
        if header("x-error-class") == "produce_failed" {
            assert_eq!(
                header("x-original-topic"),
                "sluice.digits-pipeline.requests"
            );
            assert!(header("x-error-message").contains("sluice.mlp.requests"));
            break;
        }
    }
}

/// A consumer of `topic` from its first record.
fn from_start(stack: &Stack, topic: &str) -> StreamConsumer {
    reader(&stack.kafka, topic)
}

/// Header `k` of `m` as text (empty when absent).
fn header_of(m: &rdkafka::message::BorrowedMessage<'_>, k: &str) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == k).and_then(|x| x.value))
        .map(|v| String::from_utf8_lossy(v).to_string())
        .unwrap_or_default()
}
