//! Online learning: the native learners against River on River's own bundled data set, and
//! learning while serving over real processes (Kafka, redis-server, gateway, a worker, the
//! learner): feedback codes, the join's counts, weights swapped into the serving replicas, a
//! drifting stream recovered, and a learner killed under load resuming with nothing counted
//! twice.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::*;
use serde_json::Value;
use sluice_common::config::LearnerConfig;
use sluice_learn::{Direction, Learner, PageHinkley};

/// Progressive validation (predict, then learn) on River's Phishing rows, in River's order:
/// every prediction within 1e-9 of River's, so accuracy agrees to the example.
#[test]
fn learners_predict_what_river_predicts_on_phishing() {
    let Some(python) = venv_python(".venv") else {
        return;
    };
    let out = stdout_of(
        std::process::Command::new(python).arg(root().join("tests/learning/river_phishing.py")),
    );
    let d: Value = serde_json::from_slice(&out).unwrap();
    let rows: Vec<Vec<f64>> = serde_json::from_value(d["rows"].clone()).unwrap();
    let labels: Vec<f64> = serde_json::from_value(d["labels"].clone()).unwrap();
    assert_eq!(rows.len(), 1250);
    for (name, settings) in [
        ("ftrl", "algorithm = \"ftrl\""),
        ("sgd", "algorithm = \"sgd\"\nlearning_rate = 0.1"),
    ] {
        let river: Vec<f64> = serde_json::from_value(d[name].clone()).unwrap();
        let config: LearnerConfig = toml::from_str(settings).unwrap();
        let mut l = Learner::new(&config, rows[0].len());
        let (mut ours_right, mut river_right) = (0, 0);
        for (i, (x, &y)) in rows.iter().zip(&labels).enumerate() {
            let p = l.predict(x);
            assert!(
                (p - river[i]).abs() < 1e-9,
                "{name}: row {i}: Sluice {p}, River {}",
                river[i]
            );
            ours_right += usize::from((p > 0.5) == (y == 1.0));
            river_right += usize::from((river[i] > 0.5) == (y == 1.0));
            l.learn(x, y);
        }
        println!(
            "{name}: progressive accuracy Sluice {:.4}, River {:.4}",
            ours_right as f64 / 1250.0,
            river_right as f64 / 1250.0
        );
        assert_eq!(ours_right, river_right);
    }
}

/// Page-Hinkley against River's on seeded error streams (a rise, a rise then a fall, none):
/// drift reported at the same events, in both directions and upward only.
#[test]
fn drift_is_detected_where_river_detects_it() {
    let Some(python) = venv_python(".venv") else {
        return;
    };
    let out = stdout_of(
        std::process::Command::new(python).arg(root().join("tests/learning/river_drift.py")),
    );
    let streams: Vec<Value> = serde_json::from_slice(&out).unwrap();
    let mut detections = 0;
    for s in &streams {
        let xs: Vec<f64> = serde_json::from_value(s["values"].clone()).unwrap();
        for (mode, direction) in [("both", Direction::Both), ("up", Direction::Up)] {
            let river: Vec<usize> = serde_json::from_value(s[mode].clone()).unwrap();
            let mut d = PageHinkley::new(direction);
            let ours: Vec<usize> = (0..xs.len()).filter(|&i| d.update(xs[i])).collect();
            assert_eq!(ours, river, "mode {mode}");
            detections += ours.len();
        }
    }
    assert!(detections >= 3, "the streams' changes are detected");
}

fn sea_config(name: &str, replacements: &[(&str, &str)], extra: &str) -> std::path::PathBuf {
    example_variant("sea", name, replacements, extra)
}

/// One answer of `model` for `x`: (id, label, weights version).
async fn answer(client: &Http, base: &str, model: &str, x: [f32; 3]) -> (String, i64, i64) {
    let body = serde_json::json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": x}]});
    let r = post(
        client,
        &format!("{base}/v2/models/{model}/infer"),
        &[],
        body.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let out = |name: &str| {
        v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap()["data"][0]
            .as_i64()
            .unwrap()
    };
    (
        v["id"].as_str().unwrap().to_string(),
        out("label"),
        out("weights_version"),
    )
}

async fn feedback(client: &Http, base: &str, model: &str, body: &str) -> Reply {
    post(
        client,
        &format!("{base}/v2/models/{model}/feedback"),
        &[],
        body.to_string(),
    )
    .await
}

fn start_learner(stack: &mut Stack, model: &str) -> (usize, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let i = stack.spawn_sluice(
        &format!("learner-{model}"),
        &["learn", "--model", model, "--metrics-listen", &addr],
        &[],
    );
    stack.wait_ready(&format!("http://{addr}/health/ready"));
    (i, addr)
}

/// A model that does not learn, appended to the SEA config.
fn mlp_model() -> String {
    format!(
        "\n[models.mlp]\nonnx = \"{}\"\nmax_batch_size = 8\ninputs = [{{ name = \"input\", datatype = \"FP32\", shape = [-1, 64] }}]\noutputs = [{{ name = \"probabilities\", datatype = \"FP32\", shape = [-1, 10] }}]\n",
        root().join("examples/models/mlp.onnx").display()
    )
}

/// Feedback codes; a repeat counts once; windows end by the wall clock with no traffic at
/// all (no-feedback outcomes, then late feedback dropped); learned weights reach the serving
/// replicas and answers carry their version.
#[tokio::test(flavor = "multi_thread")]
async fn feedback_joins_once_and_windows_end_by_the_clock() {
    let config = sea_config(
        "sea-feedback",
        &[(
            "window = \"30s\"\nsnapshot_every",
            "window = \"1500ms\"\nsnapshot_every",
        )],
        &mlp_model(),
    );
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_unit("all", &[]);
    start_learner(&mut stack, "sea");
    let client = http();
    let base = stack.gateway.clone();

    let mut ids = Vec::new();
    for i in 0..5 {
        let (id, _, version) = answer(&client, &base, "sea", [9.0, 9.0, i as f32]).await;
        assert_eq!(version, 0, "nothing learned yet");
        ids.push(id);
    }
    for (body, code) in [
        (format!(r#"{{"id":"{}","truth":1}}"#, ids[0]), 202),
        (format!(r#"{{"id":"{}","truth":[1]}}"#, ids[1]), 202),
        (
            format!(r#"{{"id":"{}","truth":true,"reward":1}}"#, ids[2]),
            202,
        ),
        (format!(r#"{{"id":"{}","truth":1}}"#, ids[2]), 202),
        (format!(r#"{{"id":"{}"}}"#, ids[3]), 422),
        (format!(r#"{{"id":"{}","truth":3}}"#, ids[3]), 422),
        ("not json".to_string(), 422),
    ] {
        let r = feedback(&client, &base, "sea", &body).await;
        assert_eq!(
            r.status,
            code,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = feedback(&client, &base, "nope", r#"{"id":"a","truth":1}"#).await;
    assert_eq!(r.status, 404);
    let r = feedback(&client, &base, "mlp", r#"{"id":"a","truth":1}"#).await;
    assert_eq!(r.status, 422);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("does not learn")
    );
    let v2 = get(&client, &format!("{base}/v2")).await.json();
    assert!(
        v2["extensions"]
            .as_array()
            .unwrap()
            .contains(&"sluice_feedback".into())
    );

    // Joined: 3, one repeat; then, with no traffic at all, the other two windows end.
    let s = wait_learner_status(&stack, "sea", "two windows end without feedback", |s| {
        s["join"]["no_feedback"] == 2
    })
    .await;
    assert_eq!(s["join"]["predictions"], 5, "{s}");
    assert_eq!(s["join"]["feedback"], 4, "{s}");
    assert_eq!(s["join"]["joined"], 3, "{s}");
    assert_eq!(s["join"]["duplicate"], 1, "{s}");
    assert_eq!(s["learned"]["learned"], 3, "{s}");
    assert_eq!(s["pending"], 0, "{s}");
    let r = feedback(
        &client,
        &base,
        "sea",
        &format!(r#"{{"id":"{}","truth":0}}"#, ids[4]),
    )
    .await;
    assert_eq!(r.status, 202);
    let s = wait_learner_status(&stack, "sea", "late feedback counted", |s| {
        s["join"]["late"] == 1
    })
    .await;
    assert_eq!(
        s["learned"]["learned"], 3,
        "late feedback is not learned: {s}"
    );
    assert_eq!(s["weights_version"], 3, "{s}");

    // The serving replica answers with the learned weights.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, label, version) = answer(&client, &base, "sea", [9.0, 9.0, 1.0]).await;
        if version == 3 {
            assert_eq!(label, 1, "three positives learned");
            break;
        }
        assert!(std::time::Instant::now() < end, "weights version {version}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Poison on the learner's own input topics (a direct producer's junk): counted, dead-lettered
    // with its origin, never a stall of the join.
    {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &stack.kafka)
            .create()
            .unwrap();
        for (topic, payload) in [
            ("sluice.sea.feedback", &b"\x00\x01 not avro"[..]),
            ("sluice.sea.predictions", &[0xc3, 0x01, 0xff][..]),
        ] {
            producer
                .send(
                    FutureRecord::to(topic).key("poison").payload(payload),
                    std::time::Duration::from_secs(5),
                )
                .await
                .unwrap();
        }
    }
    let s = wait_learner_status(&stack, "sea", "poison counted", |s| {
        s["learned"]["undecodable"] == 2
    })
    .await;
    assert_eq!(s["join"]["feedback"], 5, "poison is not feedback: {s}");
    let dead = dead_letters(&stack).await;
    for topic in ["sluice.sea.feedback", "sluice.sea.predictions"] {
        assert!(
            dead.iter()
                .any(|(origin, class)| origin == topic && class == "undecodable"),
            "no dead letter from {topic}: {dead:?}"
        );
    }
    // And the join goes on past them.
    let (id, _, _) = answer(&client, &base, "sea", [9.0, 9.0, 2.0]).await;
    let r = feedback(
        &client,
        &base,
        "sea",
        &format!(r#"{{"id":"{id}","truth":1}}"#),
    )
    .await;
    assert_eq!(r.status, 202);
    wait_learner_status(&stack, "sea", "joined after the poison", |s| {
        s["join"]["joined"] == 4
    })
    .await;
}

/// kill -9 of the learner under load: the restarted learner resumes from its checkpoint and
/// re-reads what followed, so every prediction and feedback is counted and learned exactly
/// once; two serving replicas both swap to the final weights.
#[tokio::test(flavor = "multi_thread")]
async fn a_learner_killed_under_load_loses_nothing_and_counts_nothing_twice() {
    let config = sea_config(
        "sea-kill",
        &[
            (
                "window = \"30s\"\nsnapshot_every = \"100ms\"",
                "window = \"60s\"\nsnapshot_every = \"100ms\"\ncheckpoint_every = \"300ms\"",
            ),
            (
                "[models.sea]\nmax_batch_size = 64",
                "[models.sea]\nmax_batch_size = 64\npartitions = 2",
            ),
        ],
        "",
    );
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    let (_, replica_a) = stack.start_worker_at("sea");
    let (_, replica_b) = stack.start_worker_at("sea");
    let (learner, _) = start_learner(&mut stack, "sea");
    let client = http();
    let base = stack.gateway.clone();

    const EVENTS: usize = 600;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (client, base, sent) = (client.clone(), base.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..EVENTS).step_by(8) {
                let x = [(i % 10) as f32, ((i / 10) % 10) as f32, 1.0];
                let (id, _, _) = answer(&client, &base, "sea", x).await;
                let y = u8::from(x[0] + x[1] > 9.0);
                let r = feedback(
                    &client,
                    &base,
                    "sea",
                    &format!(r#"{{"id":"{id}","truth":{y}}}"#),
                )
                .await;
                assert_eq!(r.status, 202);
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // Killed once it has checkpointed part of the stream.
    wait_learner_status(&stack, "sea", "a first checkpoint", |s| {
        s["next"][0].as_u64() > Some(0)
    })
    .await;
    stack.signal(learner, "KILL");
    stack.wait_exit(learner, std::time::Duration::from_secs(5));
    // What the killed learner had saved: part of the stream, the rest to be re-read.
    let saved = learner_status(&stack, "sea").expect("a checkpoint before the kill");
    let read = saved["next"][0].as_u64().unwrap();
    assert!(read > 0 && read < EVENTS as u64, "{saved}");
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 2 * EVENTS / 3 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    start_learner(&mut stack, "sea");
    for t in tasks {
        t.await.unwrap();
    }
    let s = wait_learner_status(&stack, "sea", "every event learned", |s| {
        s["learned"]["learned"] == EVENTS
    })
    .await;
    assert_eq!(s["join"]["predictions"], EVENTS, "{s}");
    assert_eq!(s["join"]["feedback"], EVENTS, "{s}");
    assert_eq!(s["join"]["joined"], EVENTS, "{s}");
    assert_eq!(s["join"]["duplicate"], 0, "{s}");
    assert_eq!(s["join"]["no_feedback"], 0, "{s}");
    assert_eq!(s["weights_version"], EVENTS, "{s}");
    DrillReport {
        drill: "joiner/learner kill -9 (online learning)".into(),
        sent: EVENTS,
        correct: s["learned"]["learned"].as_u64().unwrap_or(0) as usize,
        note: "600 predictions with feedback; each learned exactly once after the restart".into(),
        ..DrillReport::default()
    }
    .publish();
    // Both replicas follow the weights topic: each swaps to the last snapshot.
    for replica in [&replica_a, &replica_b] {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let v = metric_sum(&client, replica, "sluice_served_weights_version", "sea").await;
            if v == EVENTS as f64 {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "replica {replica} serves version {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// The SEA stream with a change of concept (examples/sea_drift.py through the gateway, with
/// feedback): the online learner is back near its accuracy before the change, the copy frozen
/// before the change is not.
#[tokio::test(flavor = "multi_thread")]
async fn an_online_learner_recovers_from_drift_and_a_frozen_one_does_not() {
    let Some(python) = venv_python(".venv") else {
        return;
    };
    let config = sea_config(
        "sea-drift",
        &[("freeze_after = 2000", "freeze_after = 1000")],
        "",
    );
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_unit("all", &[]);
    start_learner(&mut stack, "sea");
    start_learner(&mut stack, "sea-frozen");
    let gateway = stack.gateway.trim_start_matches("http://").to_string();
    let out = stdout_of(
        std::process::Command::new(python)
            .arg(root().join("examples/sea_drift.py"))
            .args([
                "--url", &gateway, "--events", "3000", "--drift", "1500", "--plot", "", "--json",
            ]),
    );
    let t: Value = serde_json::from_slice(&out).unwrap();
    println!("{t}");
    let acc = |window: &str, model: &str| t[window][model].as_f64().unwrap();
    assert!(acc("before", "sea") > 0.88, "{t}");
    assert!(
        acc("recovering", "sea") >= acc("before", "sea") - 0.03,
        "online did not recover: {t}"
    );
    assert!(
        acc("recovering", "sea-frozen") < acc("recovering", "sea") - 0.08,
        "frozen should stay wrong after the change: {t}"
    );
    // The frozen model's served error rose for good: its learner reports drift.
    let s = wait_learner_status(&stack, "sea-frozen", "drift reported", |s| {
        s["learned"]["served_judged"] == 3000
    })
    .await;
    assert!(s["learned"]["drifts"].as_u64().unwrap() >= 1, "{s}");
}

/// A learner over a hashed categorical input (BYTES, one user id per request) learns each
/// user's label from feedback while serving, and its prediction log carries the features.
#[tokio::test(flavor = "multi_thread")]
async fn a_learner_over_hashed_categories_learns_each_users_label() {
    let extra = r#"
[models.clicks]
max_batch_size = 64
inputs = [{ name = "user", datatype = "BYTES", shape = [-1, 1] }]
outputs = [
  { name = "probability", datatype = "FP32", shape = [-1, 1] },
  { name = "label", datatype = "INT64", shape = [-1, 1] },
  { name = "weights_version", datatype = "INT64", shape = [-1, 1] },
]
[models.clicks.learner]
algorithm = "ftrl"
alpha = 0.5
hash_buckets = 65536
"#;
    let config = sea_config("clicks", &[], extra);
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_worker("clicks");
    start_learner(&mut stack, "clicks");
    let client = http();
    let base = stack.gateway.clone();
    // 40 users; even-numbered users click (label 1), odd ones do not.
    let ask = |i: usize| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let user = format!("user-{}", (i * 7) % 40);
            let body = serde_json::json!({"inputs": [{"name": "user", "datatype": "BYTES", "shape": [1, 1], "data": [user]}]});
            let r = post(
                &client,
                &format!("{base}/v2/models/clicks/infer"),
                &[],
                body.to_string(),
            )
            .await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let v = r.json();
            let label = flat_f64(&v["outputs"][1]["data"])[0] as i64;
            let truth = i64::from(((i * 7) % 40).is_multiple_of(2));
            (v["id"].as_str().unwrap().to_string(), label, truth)
        }
    };
    const TRAIN: usize = 400;
    for round in 0..TRAIN / 8 {
        let answers = futures::future::join_all((0..8).map(|k| ask(round * 8 + k))).await;
        for (id, _, truth) in answers {
            let r = feedback(
                &client,
                &base,
                "clicks",
                &format!(r#"{{"id":"{id}","truth":{truth}}}"#),
            )
            .await;
            assert_eq!(r.status, 202);
        }
    }
    let s = wait_learner_status(&stack, "clicks", "every example learned", |s| {
        s["learned"]["learned"] == TRAIN
    })
    .await;
    assert_eq!(s["join"]["joined"], TRAIN, "{s}");
    // The replicas serve what was learned: every user's label right.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut right = 0;
    for i in TRAIN..TRAIN + 80 {
        let (_, label, truth) = ask(i).await;
        right += usize::from(label == truth);
    }
    assert_eq!(right, 80, "users answered right after learning");
}

/// (origin topic, error class) of every record on the dead-letter topic.
async fn dead_letters(stack: &Stack) -> Vec<(String, String)> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let consumer = reader(&stack.kafka, "sluice.dead-letter");
    let mut out = Vec::new();
    while let Ok(Ok(m)) =
        tokio::time::timeout(std::time::Duration::from_secs(5), consumer.recv()).await
    {
        let header = |key: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == key).and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        out.push((header("x-original-topic"), header("x-error-class")));
    }
    out
}
