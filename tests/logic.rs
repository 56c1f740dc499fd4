//! Business-logic steps end to end over real processes (Kafka, redis-server, gateway, a worker
//! running onnxruntime): the `fraud` example graph (validate → feature lookup in Redis → encode
//! → gradient-boosted model → decision) answers what examples/make_fraud.py computed with
//! scikit-learn, numpy and onnxruntime on the same rows; bad requests get 422s naming the rule;
//! a batch costs one Redis round trip; a feature store that is down answers 503 in time, then
//! recovers.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn fraud_samples() -> Value {
    let text = std::fs::read_to_string(root().join("examples/fraud/samples.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// An infer body carrying `rows` transactions (one row each, all in one request).
fn fraud_body(rows: &[&Value]) -> String {
    let col = |k: &str| -> Vec<Value> { rows.iter().map(|r| r[k].clone()).collect() };
    let n = rows.len();
    json!({"inputs": [
        {"name": "user_id", "datatype": "BYTES", "shape": [n], "data": col("user_id")},
        {"name": "merchant_id", "datatype": "BYTES", "shape": [n], "data": col("merchant_id")},
        {"name": "amount", "datatype": "FP32", "shape": [n], "data": col("amount")},
        {"name": "merchant_category", "datatype": "BYTES", "shape": [n], "data": col("merchant_category")},
        {"name": "hour", "datatype": "INT64", "shape": [n], "data": col("hour")},
        {"name": "country", "datatype": "BYTES", "shape": [n], "data": col("country")},
        {"name": "device", "datatype": "BYTES", "shape": [n], "data": col("device")},
    ]})
    .to_string()
}

fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {body}"))
}

/// The fraud example with its feature store in a Redis of its own (port `features_port`), and
/// a second graph answering the encoded feature vector, to compare with the Python reference.
/// A fresh database named `<prefix>_<n>` on the machine's PostgreSQL, or `None` (skipped)
/// outside CI when there is none.
fn postgres_db(prefix: &str) -> Option<String> {
    if !psql("postgres", "select 1") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PostgreSQL not reachable at 127.0.0.1:5432 under CI=true; run deploy/setup.sh"
        );
        eprintln!("SKIPPED: no PostgreSQL at 127.0.0.1:5432");
        return None;
    }
    let db = format!("{prefix}_{}", free_port());
    psql("postgres", &format!("DROP DATABASE IF EXISTS {db}"));
    assert!(psql("postgres", &format!("CREATE DATABASE {db}")));
    Some(db)
}

/// The fraud example's merchant table in a fresh database (the example's own SQL), or `None`
/// (skipped) outside CI without PostgreSQL.
fn fraud_db() -> Option<String> {
    let db = postgres_db("sluice_fraud")?;
    let sql = root().join("examples/fraud/merchants.sql");
    let ok = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            &db,
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
        ])
        .arg(sql)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "loading merchants.sql failed");
    Some(db)
}

/// `examples/fraud.toml` reading the merchant table from `db`, with more replacements.
fn fraud_variant(name: &str, db: &str, more: &[(&str, &str)], extra: &str) -> std::path::PathBuf {
    let url = format!("url = \"postgres://postgres@127.0.0.1:5432/{db}\"");
    let mut all = vec![(
        "url = \"postgres://postgres@127.0.0.1:5432/postgres\"",
        url.as_str(),
    )];
    all.extend_from_slice(more);
    example_variant("fraud", name, &all, extra)
}

fn fraud_stack(features_port: u16) -> Option<(Stack, usize)> {
    let db = fraud_db()?;
    let config = fraud_variant(
        &format!("fraud-logic-{features_port}"),
        &db,
        &[(
            "layout = \"feast\"",
            &format!("layout = \"feast\"\nredis = \"redis://127.0.0.1:{features_port}\""),
        )],
        r#"
[graphs.fraud-features]
inputs = [
  { name = "user_id", datatype = "BYTES", shape = [-1] },
  { name = "merchant_id", datatype = "BYTES", shape = [-1] },
  { name = "amount", datatype = "FP32", shape = [-1] },
  { name = "merchant_category", datatype = "BYTES", shape = [-1] },
  { name = "hour", datatype = "INT64", shape = [-1] },
  { name = "country", datatype = "BYTES", shape = [-1] },
  { name = "device", datatype = "BYTES", shape = [-1] },
]
"#,
    );
    // The second graph reuses the first one's steps minus the model and decision.
    let text = std::fs::read_to_string(&config).unwrap();
    let steps_start = text.find("[[graphs.fraud.steps]]").unwrap();
    let model_step = text
        .find("[[graphs.fraud.steps]]\nname = \"model\"")
        .unwrap();
    let copied =
        text[steps_start..model_step].replace("graphs.fraud.steps", "graphs.fraud-features.steps");
    std::fs::write(&config, format!("{text}\n{copied}")).unwrap();
    let mut stack = Stack::start_config(config, &[])?;
    let store = stack.start_redis("redis-features", features_port);
    load_user_features(&stack, features_port);
    Some((stack, store))
}

/// `sluice features load` of the example's user aggregates into the Redis on `port`; checks
/// that every row was written.
fn load_user_features(stack: &Stack, port: u16) {
    let csv = root().join("examples/fraud/user_features.csv");
    let out = stack
        .sluice(&[
            "features",
            "load",
            csv.to_str().unwrap(),
            "--step",
            "fraud.user_features",
        ])
        .env("SLUICE__REDIS__URL", format!("redis://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1000 rows written, 0 rejected"),
        "features load failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn redis_hmget_calls(port: u16) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "commandstats"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_hmget:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_graph_answers_what_sklearn_and_onnxruntime_compute() {
    let features_port = free_port();
    let Some((mut stack, _store)) = fraud_stack(features_port) else {
        return;
    };
    let (_, ops) = stack.start_unit("all", &[]);
    let s = fraud_samples();
    let requests: Vec<&Value> = s["requests"].as_array().unwrap().iter().collect();
    let exp = &s["expected"];
    let client = http();
    let gw = stack.gateway.clone();
    let url = |g: &str| format!("{gw}/v2/models/{g}/infer");

    // One request of 40 rows: one batch, so one Redis round trip of 40 HMGETs.
    let trips_before =
        metric_sum(&client, &ops, "sluice_feature_redis_round_trips_total", "").await;
    let hmget_before = redis_hmget_calls(features_port);
    let r = post(&client, &url("fraud"), &[], fraud_body(&requests)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    let decisions: Vec<&str> = output(&body, "decision")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want: Vec<&str> = exp["decision"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(decisions, want);
    assert_eq!(output(&body, "rule")["data"], exp["rule"]);
    assert_close(
        &flat_f64(&output(&body, "probabilities")["data"]),
        &flat_f64(&exp["probabilities"]),
        "fraud probabilities vs onnxruntime",
    );
    assert_eq!(
        redis_hmget_calls(features_port) - hmget_before,
        requests.len() as u64,
        "one HMGET per entity"
    );
    let trips = metric_sum(&client, &ops, "sluice_feature_redis_round_trips_total", "").await;
    assert_eq!(
        trips - trips_before,
        1.0,
        "one pipelined round trip for the batch"
    );
    // The fused steps ran in process (check → merchant → user_features → encode, model → decision).
    for step in ["merchant", "user_features", "encode", "decision"] {
        let label = format!("step=\"{step}\"");
        let runs = metric_sum(&client, &ops, "sluice_fused_runs_total", &label).await;
        assert!(runs >= 1.0, "{step} fused runs: {runs}");
    }

    // The encoded vectors equal the Python reference (sklearn / numpy on the same rows, with
    // unknown users getting the configured defaults).
    let r = post(&client, &url("fraud-features"), &[], fraud_body(&requests)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    let got = output(&body, "input");
    let width = exp["features"][0].as_array().unwrap().len();
    assert_eq!(got["shape"], json!([requests.len(), width]));
    assert_close(
        &flat_f64(&got["data"]),
        &flat_f64(&exp["features"]),
        "encoded features vs sklearn",
    );

    // Single-row requests, concurrently: each answers its own row.
    let calls = requests.iter().enumerate().map(|(i, row)| {
        let client = client.clone();
        let u = url("fraud");
        let body = fraud_body(&[row]);
        async move { (i, post(&client, &u, &[], body).await) }
    });
    for (i, r) in futures::future::join_all(calls).await {
        assert_eq!(
            r.status,
            200,
            "row {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let b = r.json();
        assert_eq!(
            output(&b, "decision")["data"][0],
            exp["decision"][i],
            "row {i}"
        );
    }

    // A stock Triton client sends BYTES (binary and JSON) and reads BYTES answers.
    let Some(python) = venv_python(".venv-triton") else {
        return;
    };
    let out = tokio::process::Command::new(python)
        .arg(root().join("tests/triton_bytes.py"))
        .arg(gw.trim_start_matches("http://"))
        .arg(root().join("examples/fraud/samples.json"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("tritonclient BYTES OK"),
        "tritonclient failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transactions_get_422_naming_the_rule_and_nothing_downstream_runs() {
    let features_port = free_port();
    let Some((mut stack, _store)) = fraud_stack(features_port) else {
        return;
    };
    let (_, ops) = stack.start_unit("all", &[]);
    let s = fraud_samples();
    let good = s["requests"][20].clone();
    let client = http();
    let url = format!("{}/v2/models/fraud/infer", stack.gateway);
    let hmget_before = redis_hmget_calls(features_port);
    let cases: [(&str, Value, &str); 5] = [
        (
            "amount",
            json!(-5.0),
            "'amount' row 0: range [0, 1000000]: -5 is out of range",
        ),
        ("merchant_category", json!("casino"), "one_of"),
        (
            "user_id",
            json!("bob"),
            "regex ^u[0-9]{5}$: \"bob\" does not match",
        ),
        ("country", json!("USA"), "length [2, 2]: 3 characters"),
        ("hour", json!(24), "'hour' row 0: range [0, 23]"),
    ];
    for (field, value, message) in cases {
        let mut row = good.clone();
        row[field] = value;
        let r = post(&client, &url, &[], fraud_body(&[&row])).await;
        assert_eq!(
            r.status,
            422,
            "{field}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let err = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            err.contains("step 'check'") && err.contains(message),
            "{field}: {err}"
        );
    }
    // A wrong datatype for a BYTES input is refused by the gateway.
    let mut bad: Value = serde_json::from_str(&fraud_body(&[&good])).unwrap();
    bad["inputs"][5]["datatype"] = json!("FP32");
    let bad = bad.to_string();
    assert_eq!(post(&client, &url, &[], bad).await.status, 422);
    assert_eq!(
        redis_hmget_calls(features_port),
        hmget_before,
        "no lookup ran for a rejected request"
    );
    let failed = metric_sum(
        &client,
        &ops,
        "sluice_worker_requests_total",
        "outcome=\"failed\"",
    )
    .await;
    assert!(failed >= 5.0, "failed requests counted: {failed}");
    // The good one still answers.
    let r = post(&client, &url, &[], fraud_body(&[&good])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_store_down_answers_503_within_the_deadline_then_recovers() {
    let features_port = free_port();
    let Some((mut stack, store)) = fraud_stack(features_port) else {
        return;
    };
    let (_, ops) = stack.start_unit("all", &[]);
    let s = fraud_samples();
    let row = s["requests"][20].clone();
    let want = s["expected"]["decision"][20].clone();
    let client = http();
    let url = format!("{}/v2/models/fraud/infer", stack.gateway);
    let r = post(&client, &url, &[], fraud_body(&[&row])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Down: connection refused → 503 naming the feature store.
    stack.signal(store, "KILL");
    stack.wait_exit(store, Duration::from_secs(10));
    let started = Instant::now();
    let r = post(&client, &url, &[], fraud_body(&[&row])).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("feature store")
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "503 took {:?}",
        started.elapsed()
    );
    // Its dead letter is counted under the class the record carries, `unavailable`.
    let dead = |class: &'static str| {
        let (client, ops) = (client.clone(), ops.clone());
        async move {
            let label = format!("class=\"{class}\"");
            metric_sum(&client, &ops, "sluice_worker_dead_letters_total", &label).await
        }
    };
    let end = Instant::now() + Duration::from_secs(5);
    while dead("unavailable").await < 1.0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead("unavailable").await, 1.0);
    assert_eq!(dead("internal").await, 0.0);

    // Frozen (SIGSTOP): the step's 100 ms timeout answers 503, the request does not hang.
    let frozen = stack.start_redis("redis-features", features_port);
    load_user_features(&stack, features_port);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let r = post(&client, &url, &[], fraud_body(&[&row])).await;
        if r.status == 200 {
            assert_eq!(output(&r.json(), "decision")["data"][0], want);
            break;
        }
        assert!(
            Instant::now() < end,
            "no recovery: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.signal_keep(frozen, "STOP");
    let started = Instant::now();
    let r = post(&client, &url, &[], fraud_body(&[&row])).await;
    stack.signal_keep(frozen, "CONT");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "503 took {:?}",
        started.elapsed()
    );
    let r = post(&client, &url, &[], fraud_body(&[&row])).await;
    assert_eq!(
        r.status,
        200,
        "after SIGCONT: {}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_materialized_by_feast_are_read_and_sluices_are_read_by_feast() {
    let Some(python) = venv_python(".venv-feast") else {
        return;
    };
    let features_port = free_port();
    let Some((mut stack, _store)) = fraud_stack(features_port) else {
        return;
    };
    // Feast's own writer fills a fresh store; Sluice's lookup answers from it.
    let feast_port = free_port();
    stack.start_redis("redis-feast", feast_port);
    let script = root().join("examples/fraud/feast_materialize.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .env("FEAST_REDIS", format!("127.0.0.1:{feast_port}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "feast materialize failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The whole graph in one worker whose lookup reads the store Feast filled.
    let db = fraud_db().unwrap();
    let config_feast = fraud_variant(
        &format!("fraud-feast-{feast_port}"),
        &db,
        &[(
            "layout = \"feast\"",
            &format!("layout = \"feast\"\nredis = \"redis://127.0.0.1:{feast_port}\""),
        )],
        "",
    );
    stack.start_unit_with_config("all", &config_feast);
    let s = fraud_samples();
    let requests: Vec<&Value> = s["requests"].as_array().unwrap().iter().collect();
    let client = http();
    let url = format!("{}/v2/models/fraud/infer", stack.gateway);
    let r = post(&client, &url, &[], fraud_body(&requests)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(output(&body, "decision")["data"], s["expected"]["decision"]);
    assert_close(
        &flat_f64(&output(&body, "probabilities")["data"]),
        &flat_f64(&s["expected"]["probabilities"]),
        "probabilities from Feast-materialized features",
    );

    // What `sluice features load` wrote (the Feast layout, in the test's feature store) is
    // what Feast's get_online_features returns.
    let out = std::process::Command::new(&python)
        .args([
            script.to_str().unwrap(),
            "--read",
            "u00001",
            "u00002",
            "u99999",
        ])
        .env("FEAST_REDIS", format!("127.0.0.1:{features_port}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let csv = std::fs::read_to_string(root().join("examples/fraud/user_features.csv")).unwrap();
    for (k, user) in ["u00001", "u00002"].iter().enumerate() {
        let line = csv.lines().find(|l| l.starts_with(user)).unwrap();
        let f: Vec<f64> = line
            .split(',')
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        assert_close(
            &[
                got["txn_count_7d"][k].as_f64().unwrap(),
                got["avg_amount_30d"][k].as_f64().unwrap(),
                got["chargebacks_90d"][k].as_f64().unwrap(),
                got["account_age_days"][k].as_f64().unwrap(),
            ],
            &f,
            "Feast reading Sluice-written features",
        );
    }
    assert_eq!(got["txn_count_7d"][2], Value::Null, "unknown user: {got}");

    // The Parquet file Feast read from loads with `sluice features load` too (after a flush).
    let flushed = std::process::Command::new("redis-cli")
        .args(["-p", &feast_port.to_string(), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(flushed.status.success());
    let parquet = root().join("examples/fraud/feature_repo/data/user_stats.parquet");
    let out = stack
        .sluice_with_config(
            &config_feast,
            &[
                "features",
                "load",
                parquet.to_str().unwrap(),
                "--step",
                "fraud.user_features",
            ],
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains("1000 rows written, 0 rejected"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = stack
        .sluice_with_config(
            &config_feast,
            &["features", "get", "--step", "fraud.user_features", "u00002"],
        )
        .output()
        .unwrap();
    let got: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let line = csv.lines().find(|l| l.starts_with("u00002")).unwrap();
    let want: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let f = &got["features"];
    assert_close(
        &[
            f["txn_count_7d"].as_f64().unwrap(),
            f["avg_amount_30d"].as_f64().unwrap(),
            f["chargebacks_90d"].as_f64().unwrap(),
            f["account_age_days"].as_f64().unwrap(),
        ],
        &want,
        "features loaded from Parquet",
    );
}

/// Runs SQL through psql against the machine's PostgreSQL (127.0.0.1:5432, user postgres).
fn psql(db: &str, sql: &str) -> bool {
    std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            sql,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh database with a small `merchants` table, or `None` (skipped) outside CI without
/// PostgreSQL.
fn merchants_db() -> Option<String> {
    let db = postgres_db("sluice_test")?;
    assert!(psql(
        &db,
        "CREATE TABLE merchants (id text PRIMARY KEY, risk real, chargeback_rate double precision, \
         orders bigint, region text, active boolean);
         INSERT INTO merchants VALUES ('m1', 0.25, 0.01, -2654276660701483516, 'eu', true),
                                      ('m2', 0.75, 0.20, 9223372036854775807, 'us', false),
                                      ('m3', NULL, 0.05, NULL, NULL, true);"
    ));
    Some(db)
}

fn merchants_config(name: &str, url: &str, on_missing: &str) -> std::path::PathBuf {
    example_variant(
        "fraud",
        name,
        &[],
        &format!(
            r#"
[graphs.merchants]
inputs = [{{ name = "merchant_id", datatype = "BYTES", shape = [-1] }}]
[[graphs.merchants.steps]]
name = "lookup"
inputs = {{ merchant_id = "request.merchant_id" }}
[graphs.merchants.steps.postgres]
url = "{url}"
query = "SELECT id, risk, chargeback_rate, orders, region, active FROM merchants WHERE id = ANY($1)"
key = "merchant_id"
on_missing = "{on_missing}"
timeout = "300ms"
pool = 2
columns = [
  {{ name = "risk", datatype = "FP32", default = 0.5 }},
  {{ name = "chargeback_rate", datatype = "FP64", default = 0 }},
  {{ name = "orders", datatype = "INT64", default = 0 }},
  {{ name = "region", datatype = "BYTES", default = "unknown" }},
  {{ name = "active", datatype = "BOOL", default = true }},
]
"#
        ),
    )
}

fn merchants_body(ids: &[&str]) -> String {
    json!({"inputs": [{"name": "merchant_id", "datatype": "BYTES", "shape": [ids.len()], "data": ids}]})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lookup_maps_rows_to_tensors_with_defaults_and_fails_clearly() {
    let Some(db) = merchants_db() else {
        return;
    };
    let url = format!("postgres://postgres:secret-pw@127.0.0.1:5432/{db}");
    let config = merchants_config(&format!("merchants-{db}"), &url, "default");
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    let (unit, _) = stack.start_unit("all", &[]);
    let client = http();
    let url_infer = format!("{}/v2/models/merchants/infer", stack.gateway);
    // Present, NULL-valued, absent, and a repeated key, in one request.
    let r = post(
        &client,
        &url_infer,
        &[],
        merchants_body(&["m2", "m3", "nope", "m1", "m2"]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let b = r.json();
    assert_close(
        &flat_f64(&output(&b, "risk")["data"]),
        &[0.75, 0.5, 0.5, 0.25, 0.75],
        "risk",
    );
    assert_close(
        &flat_f64(&output(&b, "chargeback_rate")["data"]),
        &[0.2, 0.05, 0.0, 0.01, 0.2],
        "chargeback_rate",
    );
    // int8 beyond 2^53 arrives exactly (it was once rounded through a float).
    assert_eq!(
        output(&b, "orders")["data"],
        json!([i64::MAX, 0, 0, -2_654_276_660_701_483_516i64, i64::MAX])
    );
    assert_eq!(
        output(&b, "region")["data"],
        json!(["us", "unknown", "unknown", "eu", "us"])
    );
    assert_eq!(
        output(&b, "active")["data"],
        json!([false, true, true, true, false])
    );
    // The password never reaches the logs.
    assert!(
        !stack.log_of(unit).contains("secret-pw"),
        "password in the worker's log"
    );

    // Connections killed by the server (as in a restart) are replaced.
    assert!(psql(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")
    ));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(&client, &url_infer, &[], merchants_body(&["m1"])).await;
        if r.status == 200 {
            assert_close(
                &flat_f64(&output(&r.json(), "risk")["data"]),
                &[0.25],
                "risk after",
            );
            break;
        }
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            Instant::now() < end,
            "no recovery after the connections were killed"
        );
    }
    psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_missing_rows_rejected_and_an_unreachable_database_is_503() {
    let Some(db) = merchants_db() else {
        return;
    };
    // on_missing = "reject": an absent merchant is a 422 naming it.
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let config = merchants_config(&format!("merchants-reject-{db}"), &url, "reject");
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_unit("all", &[]);
    let client = http();
    let infer = format!("{}/v2/models/merchants/infer", stack.gateway);
    let r = post(&client, &infer, &[], merchants_body(&["m1", "ghost"])).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("step 'lookup'") && e.contains("no row for key 'ghost'"),
        "{e}"
    );
    psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );

    // A database that does not answer: 503 naming it (password hidden), well within 2 s.
    let dead = format!("postgres://postgres:pw@127.0.0.1:{}/{db}", free_port());
    let config = merchants_config(&format!("merchants-dead-{db}"), &dead, "default");
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_unit("all", &[]);
    let infer = format!("{}/v2/models/merchants/infer", stack.gateway);
    let started = Instant::now();
    let r = post(&client, &infer, &[], merchants_body(&["m1"])).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("database postgres://postgres:***@127.0.0.1") && !e.contains(":pw@"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

/// A PostgreSQL server of the test's own (initdb in a temporary folder, run as the `postgres`
/// user when the test runs as root) on a free port, so a drill can kill and restart it without
/// touching the machine's.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    /// Starts one, or `None` (skipped) outside CI when Debian's PostgreSQL binaries are missing.
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).max())
            .filter(|b| b.join("initdb").is_file());
        let Some(bin) = bin else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PostgreSQL's server binaries missing under CI=true; run deploy/setup.sh"
            );
            eprintln!("SKIPPED: no /usr/lib/postgresql/*/bin/initdb");
            return None;
        };
        let pg = PrivatePostgres {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            bin,
        };
        // initdb refuses to run as root: the folder goes to the postgres user.
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(pg.dir.path())
            .status();
        assert!(pg.run(
            "initdb",
            &["-A", "trust", "-U", "postgres", "-D", &pg.data()]
        ));
        assert!(pg.start_server(), "private PostgreSQL did not start");
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one of PostgreSQL's programs (as `postgres` when this test is root).
    fn run(&self, program: &str, args: &[&str]) -> bool {
        let exe = self.bin.join(program);
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        let mut c = if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        c.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start_server(&self) -> bool {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &["start", "-w", "-D", &self.data(), "-l", &log, "-o", &opts],
        )
    }

    /// Stops it at once, as a crash would (no checkpoint, clients cut).
    fn kill(&self) -> bool {
        self.run("pg_ctl", &["stop", "-m", "immediate", "-D", &self.data()])
    }

    fn psql(&self, db: &str, sql: &str) -> bool {
        std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Drill: the lookup step's PostgreSQL killed (immediate stop) and restarted under load. Every
/// answer is checked against the table; while the database is down requests get 503 naming it;
/// none is lost (504) or wrong, and answers are correct again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_answers_503_then_recovers() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    assert!(pg.psql(
        "postgres",
        "CREATE TABLE merchants (id text PRIMARY KEY, risk real, chargeback_rate double precision, \
         orders bigint, region text, active boolean);
         INSERT INTO merchants VALUES ('m1', 0.25, 0.01, 120, 'eu', true),
                                      ('m2', 0.75, 0.20, 5, 'us', false);"
    ));
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let config = merchants_config(&format!("merchants-restart-{}", pg.port), &url, "default");
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_unit("all", &[]);
    let infer = format!("{}/v2/models/merchants/infer", stack.gateway);
    let seconds = std::env::var("SLUICE_DRILL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4u64)
        .max(3);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cases = [("m1", 0.25), ("m2", 0.75), ("absent", 0.5)];
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (infer, stop) = (infer.clone(), stop.clone());
            tokio::spawn(async move {
                let client = http();
                // (status, correct, latency, sent after the restart)
                let mut seen = Vec::new();
                let mut i = c;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (id, risk) = cases[i % cases.len()];
                    i += 1;
                    let started = Instant::now();
                    let r = post(&client, &infer, &[], merchants_body(&[id])).await;
                    let correct = r.status == 200
                        && (flat_f64(&output(&r.json(), "risk")["data"])[0] - risk).abs() < 1e-6;
                    if r.status != 200 && r.status != 503 {
                        eprintln!("{}: {}", r.status, String::from_utf8_lossy(&r.body));
                    }
                    seen.push((r.status, correct, started.elapsed(), Instant::now()));
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds) / 3).await;
    assert!(pg.kill(), "pg_ctl stop -m immediate failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(pg.start_server(), "PostgreSQL did not start again");
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds) * 2 / 3).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut report = DrillReport {
        drill: "PostgreSQL kill (immediate stop), restart".into(),
        note: "the lookup step's database stopped 1 s; rows compared with the table".into(),
        ..DrillReport::default()
    };
    let mut latencies = Vec::new();
    let mut correct_after_restart = 0;
    for c in clients {
        for (status, correct, latency, at) in c.await.unwrap() {
            report.sent += 1;
            match status {
                200 if correct => {
                    report.correct += 1;
                    latencies.push(latency.as_secs_f64() * 1000.0);
                    if at > restarted + Duration::from_secs(1) {
                        correct_after_restart += 1;
                    }
                }
                200 => report.wrong += 1,
                s => {
                    *report.errors.entry(s).or_default() += 1;
                    // Accepted and never answered within the deadline.
                    if s == 504 {
                        report.lost += 1;
                    }
                }
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    report.p99_ms = latencies
        .get(((latencies.len() as f64 * 0.99) as usize).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    report.publish();
    report.holds(&[503]);
    assert!(
        correct_after_restart > 0,
        "no correct answer after the restart: {}",
        report.row()
    );
}

/// A scoring API the HTTP step calls: `GET /score/{user}` answers `{"score": len/10, "info":
/// {"tier": ...}}`, `POST /batch` answers `{"predictions": [...]}`; `mode` makes it slow (1 s),
/// failing (500) or flaky (each user's first two calls fail). Counts calls per user.
#[derive(Clone, Default)]
struct Api {
    mode: Arc<Mutex<&'static str>>,
    calls: Arc<Mutex<std::collections::HashMap<String, usize>>>,
}

impl Api {
    fn set(&self, mode: &'static str) {
        *self.mode.lock().unwrap() = mode;
    }
    fn calls(&self, user: &str) -> usize {
        self.calls.lock().unwrap().get(user).copied().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }
    fn score(user: &str) -> Value {
        json!({"score": user.len() as f64 / 10.0, "info": {"tier": if user.starts_with('g') { "gold" } else { "basic" }}})
    }
    async fn serve(self) -> u16 {
        use axum::extract::{Path, State};
        use axum::http::StatusCode;
        async fn one(
            State(api): State<Api>,
            Path(user): Path<String>,
        ) -> (StatusCode, axum::Json<Value>) {
            let n = {
                let mut calls = api.calls.lock().unwrap();
                let c = calls.entry(user.clone()).or_default();
                *c += 1;
                *c
            };
            let mode = *api.mode.lock().unwrap();
            match mode {
                "slow" => tokio::time::sleep(Duration::from_secs(1)).await,
                "failing" => return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({}))),
                "flaky" if n <= 2 => {
                    return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
                }
                _ => {}
            }
            if user == "missing" {
                return (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error": "no such user"})),
                );
            }
            (StatusCode::OK, axum::Json(Api::score(&user)))
        }
        async fn batch(
            State(api): State<Api>,
            axum::Json(body): axum::Json<Value>,
        ) -> axum::Json<Value> {
            let rows = body["instances"].as_array().cloned().unwrap_or_default();
            *api.calls.lock().unwrap().entry("batch".into()).or_default() += 1;
            axum::Json(
                json!({"predictions": rows.iter().map(|r| Api::score(r["user_id"].as_str().unwrap_or(""))).collect::<Vec<_>>()}),
            )
        }
        let app = axum::Router::new()
            .route("/score/{user}", axum::routing::get(one))
            .route("/batch", axum::routing::post(batch))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_step_retries_times_out_and_breaks_the_circuit() {
    let api = Api::default();
    let port = api.clone().serve().await;
    let step = |name: &str, extra: &str| {
        format!(
            r#"
[graphs.{name}]
inputs = [{{ name = "user_id", datatype = "BYTES", shape = [-1] }}]
[[graphs.{name}.steps]]
name = "call"
inputs = {{ user_id = "request.user_id" }}
[graphs.{name}.steps.http]
timeout = "100ms"
retries = 2
backoff = "10ms"
breaker_failures = 3
open_for = "1s"
fields = [{{ name = "score", datatype = "FP32" }}, {{ name = "tier", path = "info.tier", datatype = "BYTES", default = "none" }}]
{extra}
"#
        )
    };
    let extra = step(
        "scoring",
        &format!("url = \"http://127.0.0.1:{port}/score/{{user_id}}\""),
    ) + &step(
        "scoring-batch",
        &format!("url = \"http://127.0.0.1:{port}/batch\"\nmode = \"batch\""),
    );
    let config = example_variant("digits", &format!("http-step-{port}"), &[], &extra);
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_unit("all", &[]);
    let client = http();
    let url = |g: &str| format!("{}/v2/models/{g}/infer", stack.gateway);
    let body = |ids: &[&str]| {
        json!({"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [ids.len()], "data": ids}]}).to_string()
    };

    // Per row and per batch: the API's fields as tensors.
    for g in ["scoring", "scoring-batch"] {
        let r = post(&client, &url(g), &[], body(&["gus", "ab"])).await;
        assert_eq!(r.status, 200, "{g}: {}", String::from_utf8_lossy(&r.body));
        let b = r.json();
        assert_close(&flat_f64(&output(&b, "score")["data"]), &[0.3, 0.2], g);
        assert_eq!(output(&b, "tier")["data"], json!(["gold", "basic"]));
    }
    assert_eq!(api.calls("batch"), 1, "one call for the batch");
    // A 4xx is the request's fault: 422, not retried.
    let r = post(&client, &url("scoring"), &[], body(&["missing"])).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(api.calls("missing"), 1);

    // Flaky: two 503s, then an answer, within one request (two retries).
    api.set("flaky");
    let r = post(&client, &url("scoring"), &[], body(&["flaky-user"])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(api.calls("flaky-user"), 3);

    // Slow: each attempt times out at 100 ms; 503 well before the 1 s answers would come.
    api.set("slow");
    let started = Instant::now();
    let r = post(&client, &url("scoring"), &[], body(&["slow-user"])).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );

    // Failing: after 3 failed calls the circuit opens and calls stop reaching the API.
    api.set("failing");
    for u in ["f1", "f2"] {
        assert_eq!(
            post(&client, &url("scoring"), &[], body(&[u])).await.status,
            503
        );
    }
    let reached = api.total();
    for _ in 0..5 {
        let r = post(&client, &url("scoring"), &[], body(&["f3"])).await;
        assert_eq!(r.status, 503);
        assert!(
            String::from_utf8_lossy(&r.body).contains("circuit open"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(api.total(), reached, "an open circuit sends nothing");
    // Recovered API, circuit closed again after open_for.
    api.set("ok");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = post(&client, &url("scoring"), &[], body(&["back"])).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn png_digits_decode_to_the_numeric_pipelines_inputs_and_labels() {
    let exp: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("examples/images/expected.json")).unwrap(),
    )
    .unwrap();
    let files: Vec<String> = exp["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let mut data = Vec::new();
    for f in &files {
        let png = std::fs::read(root().join("examples/images").join(f)).unwrap();
        data.extend_from_slice(&(png.len() as u32).to_le_bytes());
        data.extend_from_slice(&png);
    }
    let config = config_variant(
        "digits-images-decode",
        &[],
        r#"
[graphs.digits-images-decode]
inputs = [{ name = "image", datatype = "BYTES", shape = [-1] }]
[[graphs.digits-images-decode.steps]]
name = "decode"
inputs = { image = "request.image" }
output = "input"
decode_image = { input = "image", width = 8, height = 8, divide = 15, layout = "flat" }
"#,
    );
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    stack.start_unit("all", &[]);
    let client = http();
    let binary_body = |n: usize| {
        let header = json!({"inputs": [{"name": "image", "shape": [n], "datatype": "BYTES",
            "parameters": {"binary_data_size": data.len()}}]})
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&data);
        (header.len(), body)
    };
    let (len, body) = binary_body(files.len());
    let headers = [("inference-header-content-length", len.to_string())];
    let url = |g: &str| format!("{}/v2/models/{g}/infer", stack.gateway);
    // The decoded pixels are the digits rows exactly (Pillow decodes the PNGs to the same).
    let r = post(
        &client,
        &url("digits-images-decode"),
        &headers,
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = flat_f64(&output(&r.json(), "input")["data"]);
    assert_eq!(got, flat_f64(&exp["pixels"]));
    // The whole graph answers the numeric pipeline's labels.
    let r = post(&client, &url("digits-images"), &headers, body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(output(&r.json(), "label")["data"], exp["label"]);
    // Not an image: 422 naming the row.
    let header = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
        "parameters": {"binary_data_size": 8}}]})
    .to_string();
    let mut bad = header.clone().into_bytes();
    bad.extend_from_slice(&[4, 0, 0, 0, b'n', b'o', b'p', b'e']);
    let r = post(
        &client,
        &url("digits-images"),
        &[("inference-header-content-length", header.len().to_string())],
        bad,
    )
    .await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("'image' row 0"));
    // Stock tritonclient sends the PNGs as BYTES too (examples/digits_images.py).
    let Some(python) = venv_python(".venv-triton") else {
        return;
    };
    let out = tokio::process::Command::new(python)
        .arg(root().join("examples/digits_images.py"))
        .arg(stack.gateway.trim_start_matches("http://"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
