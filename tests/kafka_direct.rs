//! Using Sluice without the gateway: Avro records straight onto a model's request topic, results
//! read from its result topic; bad records land on the dead-letter topic with their origin, and a
//! caller with a reply route gets an error reply instead of a timeout.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_schemas::{
    DataType, InferenceRequest, ReplyRoute, Tensor, decode_result, encode_request,
};

fn producer(stack: &Stack) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .create()
        .unwrap()
}

fn consumer(stack: &Stack, topic: &str) -> StreamConsumer {
    reader(&stack.kafka, topic)
}

async fn next_matching(c: &StreamConsumer, pred: impl Fn(&OwnedMessage) -> bool) -> OwnedMessage {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = c.recv().await.unwrap().detach();
            if pred(&m) {
                return m;
            }
        }
    })
    .await
    .expect("no matching record within 30s")
}

fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn request(id: &str, rows: &[&Vec<f32>], reply: Option<ReplyRoute>) -> InferenceRequest {
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    InferenceRequest {
        id: id.into(),
        model: "mlp".into(),
        deadline: Some(sluice_schemas::Deadline::after(
            std::time::Duration::from_millis(30_000),
        )),
        sent_at_us: sluice_common::now_us(),
        reply,
        inputs: vec![Tensor::from_values(
            "input",
            DataType::Fp32,
            vec![rows.len() as i64, 64],
            &flat,
        )],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_request_on_the_topic_gets_a_result_on_the_result_topic() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let s = samples();
    let results = consumer(&stack, "sluice.mlp.results");
    let req = request("direct-1", &[&s.scaled[5], &s.scaled[6]], None);
    producer(&stack)
        .send(
            FutureRecord::to("sluice.mlp.requests")
                .key("direct-1")
                .payload(&encode_request(&req).unwrap()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let m = next_matching(&results, |m| m.key() == Some(b"direct-1")).await;
    let result = decode_result(m.payload().unwrap()).unwrap();
    assert!(result.error.is_none(), "{:?}", result.error);
    let label = result.outputs.iter().find(|t| t.name == "label").unwrap();
    let want: Vec<i64> = (5..7)
        .map(|i| s.expected["mlp"]["label"][i].as_i64().unwrap())
        .collect();
    assert_eq!(label.values::<i64>(), want);
    assert_eq!(result.batch_size, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_and_callers_get_error_replies() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let s = samples();
    let dlq = consumer(&stack, "sluice.dead-letter");
    let p = producer(&stack);

    // Undecodable bytes: dead-lettered with their origin.
    let delivery = p
        .send(
            FutureRecord::to("sluice.mlp.requests")
                .key("junk")
                .payload("not avro"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let m = next_matching(&dlq, |m| m.key() == Some(b"junk")).await;
    assert_eq!(m.payload(), Some(&b"not avro"[..]), "original payload kept");
    // The producer is not left waiting: an error result under its key on the result topic.
    let results = consumer(&stack, "sluice.mlp.results");
    let r = next_matching(&results, |m| m.key() == Some(b"junk")).await;
    let r = decode_result(r.payload().unwrap()).unwrap();
    assert_eq!(
        (r.id.as_str(), r.error.unwrap().code.as_str()),
        ("junk", "undecodable")
    );
    assert_eq!(header(&m, "x-error-class").as_deref(), Some("undecodable"));
    assert_eq!(
        header(&m, "x-original-topic").as_deref(),
        Some("sluice.mlp.requests")
    );
    assert_eq!(
        header(&m, "x-original-partition"),
        Some(delivery.partition.to_string())
    );
    assert_eq!(
        header(&m, "x-original-offset"),
        Some(delivery.offset.to_string())
    );

    // A decodable request with the wrong shape and a reply route: dead letter + error reply.
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("test:reply").await.unwrap();
    let mut bad = request(
        "bad-1",
        &[&s.scaled[0]],
        Some(ReplyRoute {
            channel: "test:reply".into(),
            key: "test:result:bad-1".into(),
            ttl_ms: 60_000,
        }),
    );
    bad.inputs[0].shape = vec![2, 32];
    p.send(
        FutureRecord::to("sluice.mlp.requests")
            .key("bad-1")
            .payload(&encode_request(&bad).unwrap()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    let result = decode_result(reply.get_payload_bytes()).unwrap();
    assert_eq!(result.id, "bad-1");
    let err = result.error.unwrap();
    assert_eq!(err.code.as_str(), "invalid_input");
    assert!(err.message.contains("shape"), "{}", err.message);
    let m = next_matching(&dlq, |m| m.key() == Some(b"bad-1")).await;
    assert_eq!(
        header(&m, "x-error-class").as_deref(),
        Some("invalid_input")
    );
    assert_eq!(header(&m, "x-request-id").as_deref(), Some("bad-1"));
    // The stored copy is there for a gateway that missed the publish.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Option<Vec<u8>> = redis::AsyncCommands::get(&mut conn, "test:result:bad-1")
        .await
        .unwrap();
    assert_eq!(decode_result(&stored.unwrap()).unwrap().id, "bad-1");

    // Undecodable bytes whose headers name the reply route (as the gateway writes them): the
    // caller still gets an error reply instead of waiting for its deadline.
    let named = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header {
            key: "sluice-request-id",
            value: Some("junk-2"),
        })
        .insert(rdkafka::message::Header {
            key: "sluice-reply-channel",
            value: Some("test:reply"),
        })
        .insert(rdkafka::message::Header {
            key: "sluice-reply-key",
            value: Some("test:result:junk-2"),
        });
    p.send(
        FutureRecord::to("sluice.mlp.requests")
            .key("junk-2")
            .payload(&b"\xc3\x01 still not avro"[..])
            .headers(named),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    let result = decode_result(reply.get_payload_bytes()).unwrap();
    assert_eq!(result.id, "junk-2");
    assert_eq!(result.error.unwrap().code.as_str(), "undecodable");

    // The partition is not blocked: a good request after the bad ones is answered.
    let results = consumer(&stack, "sluice.mlp.results");
    let good = request("good-after-bad", &[&s.scaled[2]], None);
    p.send(
        FutureRecord::to("sluice.mlp.requests")
            .key("good-after-bad")
            .payload(&encode_request(&good).unwrap()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let m = next_matching(&results, |m| m.key() == Some(b"good-after-bad")).await;
    assert!(decode_result(m.payload().unwrap()).unwrap().error.is_none());
}

/// Runs `cmd` to its end; fails the test with its output unless it succeeded; returns stdout.
async fn stdout_ok(cmd: &mut tokio::process::Command) -> String {
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Interoperability: a stock Python Avro library (fastavro) and Kafka client encode the request
/// and decode the result, using only `schemas/avro/*.avsc` and the documented framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_avro_client_calls_a_model_through_kafka() {
    let python = root().join(".venv/bin/python");
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let stdout = stdout_ok(
        tokio::process::Command::new(python)
            .arg(root().join("examples/kafka_direct.py"))
            .args(["--brokers", &stack.kafka, "--model", "mlp"]),
    )
    .await;
    let want = samples().expected["mlp"]["label"][0].as_i64().unwrap();
    assert!(stdout.contains(&format!("label [1] [{want}]")), "{stdout}");
}

/// The gateway's request records carry the caller's W3C trace context and a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_records_carry_trace_context_and_deadline() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    stack.start_worker("mlp");
    let s = samples();
    let requests = consumer(&stack, "sluice.mlp.requests");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = post(
        &http(),
        &format!("{}/v2/models/mlp/infer", stack.gateway),
        &[("traceparent", tp.to_string())],
        infer_body(&[&s.scaled[0]]),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = next_matching(&requests, |_| true).await;
    let req = sluice_schemas::decode_request(m.payload().unwrap()).unwrap();
    assert_eq!(req.trace.get("traceparent").map(String::as_str), Some(tp));
    assert!(
        req.deadline.is_some_and(|d| !d.passed()),
        "deadline in the future when produced"
    );
    assert_eq!(m.key(), Some(req.id.as_bytes()), "keyed by request id");
    assert!(req.reply.is_some());
}

/// A worker's publish can be missed (e.g. while the gateway's subscription reconnects): the
/// gateway then reads the stored result before giving up. Here the "worker" is the test itself,
/// which stores a result under the request's reply key without publishing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reads_a_stored_result_whose_publish_it_missed() {
    let Some(stack) = Stack::start(&[]) else {
        return;
    };
    let s = samples();
    let requests = consumer(&stack, "sluice.logreg.requests");
    let gw = stack.gateway.clone();
    let body = serde_json::json!({"parameters": {"timeout": 3_000_000}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[0]}]});
    let call = tokio::spawn(async move {
        post(
            &http(),
            &format!("{gw}/v2/models/logreg/infer"),
            &[],
            body.to_string(),
        )
        .await
    });
    let m = next_matching(&requests, |_| true).await;
    let req = sluice_schemas::decode_request(m.payload().unwrap()).unwrap();
    let route = req.reply.clone().unwrap();
    let result = sluice_schemas::InferenceResult {
        id: req.id.clone(),
        model: "logreg".into(),
        model_version: "1".into(),
        outputs: vec![Tensor::from_values(
            "label",
            DataType::Int64,
            vec![1],
            &[7i64],
        )],
        ..Default::default()
    };
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::AsyncCommands::set(
        &mut conn,
        &route.key,
        sluice_schemas::encode_result(&result).unwrap(),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let r = call.await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["outputs"][0]["data"][0], 7);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered by the deadline"
    );
}

/// Stock Kafka tools against Sluice's topics on the local broker: Debian's kcat calls a graph
/// (`examples/kafka_graph.sh`, JSON both ways) and Kafka's own consumer-groups tool, from the jars
/// the broker runs, shows the worker's group with its committed offsets and lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_calls_a_graph_and_kafkas_group_tool_reads_the_lag() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    let (_, _) = stack.start_unit("all", &[]);
    let stdout = stdout_ok(
        tokio::process::Command::new(root().join("examples/kafka_graph.sh"))
            .args(["digits-pipeline", &stack.kafka]),
    )
    .await;
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let label = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap()["data"][0]
        .as_i64();
    assert_eq!(label, samples().expected["mlp"]["label"][0].as_i64());

    // The group commits within auto.commit.interval.ms (500 ms): then the tool shows lag 0.
    let group = sluice_common::topics::Topics::new("sluice").unit_group("all");
    let libs = sluice_common::local::kafka_libs().unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let table = loop {
        let out = tokio::process::Command::new(sluice_common::local::java())
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .args([
                "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                "--bootstrap-server",
                &stack.kafka,
                "--describe",
                "--group",
                &group,
            ])
            .output()
            .await
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        let row = table
            .lines()
            .find(|l| l.contains("sluice.digits-pipeline.requests"))
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>());
        // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
        if let Some(cols) = row
            && cols.len() >= 6
            && cols[3] == "1"
            && cols[4] == "1"
            && cols[5] == "0"
        {
            break table;
        }
        assert!(
            std::time::Instant::now() < end,
            "{table}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(table.contains("LAG"), "{table}");
}
