//! Deployment units over real processes (Kafka, redis-server, gateway, workers running
//! onnxruntime): one worker process serving models and graph steps through one consumer, killed
//! under load; consumed records purged up to the commit; hops and joins in process.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use serde_json::Value;
use sluice_common::Deployment;

/// The label the answer of `servable` for sample `i` must carry (onnxruntime's, see
/// examples/samples.json): mlp's for mlp and the pipeline, the vote of three for the ensemble.
fn want(s: &Samples, servable: &str, i: usize) -> i64 {
    let label = |m: &str| s.expected[m]["label"][i].as_i64().unwrap();
    match servable {
        "digits-ensemble" => {
            let l = [label("mlp"), label("logreg"), label("forest")];
            // Majority; a tie goes to the first listed (examples/digits.toml: first_listed).
            let count = |x: i64| l.iter().filter(|y| **y == x).count();
            let top = l.iter().map(|x| count(*x)).max().unwrap();
            *l.iter().find(|x| count(**x) == top).unwrap()
        }
        _ => label("mlp"),
    }
}

fn label_of(v: &Value) -> Option<i64> {
    v["outputs"]
        .as_array()?
        .iter()
        .find(|o| o["name"] == "label")?["data"][0]
        .as_i64()
}

/// Asserts `r` is a 200 carrying the label onnxruntime gives sample `k` of `servable`.
fn assert_answers(r: &Reply, s: &Samples, servable: &str, k: usize) {
    assert_eq!(
        r.status,
        200,
        "{servable}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        label_of(&r.json()),
        Some(want(s, servable, k)),
        "{servable} sample {k}"
    );
}

/// Closed-loop load from 9 clients over a model, a pipeline and an ensemble (3 each), every
/// answer checked; each task returns how many it got answered.
fn spawn_mixed_load(stack: &Stack, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<usize>> {
    let s = Arc::new(samples());
    let client = Arc::new(http());
    (0..9)
        .map(|c| {
            let servable = ["mlp", "digits-pipeline", "digits-ensemble"][c % 3];
            let (client, gw, s, stop) = (
                Arc::clone(&client),
                stack.gateway.clone(),
                Arc::clone(&s),
                Arc::clone(stop),
            );
            tokio::spawn(async move {
                let (mut answered, mut i) = (0usize, c);
                while !stop.load(Ordering::Relaxed) {
                    let k = i % s.raw.len();
                    // mlp takes scaled rows; the graphs scale raw ones themselves.
                    let row = if servable == "mlp" {
                        &s.scaled[k]
                    } else {
                        &s.raw[k]
                    };
                    let r = infer(&client, &gw, servable, &[row]).await;
                    assert_answers(&r, &s, servable, k);
                    answered += 1;
                    i += 9;
                }
                answered
            })
        })
        .collect()
}

/// Partitions the implied unit `all` reads (the example topics have one each). The config
/// declares no units, so `all` serves every model and graph step.
fn partitions_of_all(stack: &Stack) -> usize {
    let deployment = Deployment::load_with_env(Some(&stack.config), &[]).unwrap();
    let all = deployment.worker_unit("all").unwrap();
    assert!(all.members.len() >= 8, "{:?}", all.members);
    all.members
        .iter()
        .map(|u| deployment.unit_topics(u).len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unit_serves_models_and_graph_steps_through_one_consumer_and_survives_kill_9() {
    let Some(mut stack) = Stack::start(&[("SLUICE__GATEWAY__DEFAULT_TIMEOUT", "40s")]) else {
        return;
    };
    let topics = partitions_of_all(&stack);

    let (first, addr) = stack.start_unit("all", &[]);
    let client = http();
    // One consumer owns every partition of every topic the unit's steps read (1 partition each).
    let owned = metric_sum(
        &client,
        &addr,
        "sluice_worker_assigned_partitions",
        "unit=\"all\"",
    )
    .await;
    assert_eq!(
        owned as usize, topics,
        "one member owns all {topics} partitions"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_mixed_load(&stack, &stop);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Each lane counts its own requests under its own label.
    for unit in [
        "mlp",
        "scaler",
        "digits-pipeline.postprocess",
        "digits-ensemble.vote",
    ] {
        let ok = metric_sum(
            &client,
            &addr,
            "sluice_worker_requests_total",
            &format!("unit=\"{unit}\",outcome=\"ok\""),
        )
        .await;
        assert!(ok > 0.0, "{unit} served nothing");
    }
    stack.signal(first, "KILL");
    stack.wait_exit(first, Duration::from_secs(10));
    let (_, addr) = stack.start_unit("all", &[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        total += t.await.unwrap();
    }
    println!(
        "answered {total} requests over mlp, a pipeline and an ensemble across a unit's SIGKILL"
    );
    assert!(total > 50, "{total}");
    let after = metric_sum(
        &client,
        &addr,
        "sluice_worker_requests_total",
        "outcome=\"ok\"",
    )
    .await;
    assert!(after > 0.0, "the new worker served the rest");
}

/// `topic`'s partition 0: (log start offset, high watermark).
fn watermarks(stack: &Stack, topic: &str) -> (i64, i64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .create()
        .unwrap();
    c.fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap()
}

/// The offset `group` committed on `topic`'s partition 0 (-1: none).
fn committed(stack: &Stack, group: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    match got.find_partition(topic, 0).map(|p| p.offset()) {
        Some(Offset::Offset(o)) => o,
        _ => -1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_records_are_purged_up_to_the_commit_and_a_restarted_worker_resumes() {
    let Some(mut stack) = Stack::start(&[("SLUICE__KAFKA__PURGE_INTERVAL", "300ms")]) else {
        return;
    };
    let group = sluice_common::topics::Topics::new("sluice").unit_group("all");
    let (requests, step, results) = (
        "sluice.mlp.requests",
        "sluice.digits-pipeline.postprocess.requests",
        "sluice.mlp.results",
    );
    // Every hop through its topic, so the step topic has records to purge too.
    let hops_off = [("SLUICE__WORKER__LOCAL_HOPS", "false")];
    let (worker, _) = stack.start_unit("all", &hops_off);
    let n = 12;
    answer_checked(&stack, "mlp", n).await;
    answer_checked(&stack, "digits-pipeline", n).await;
    // The log start offset of both purged topics reaches their end; at every look it is at or
    // below what the group committed (nothing uncommitted deleted).
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let purged: Vec<bool> = [requests, step]
            .iter()
            .map(|t| {
                let (low, high) = watermarks(&stack, t);
                let done = committed(&stack, &group, t);
                assert!(
                    low <= done.max(0),
                    "{t}: log starts at {low}, committed {done}"
                );
                assert!(high >= n as i64, "{t}: {high} records written");
                low == high
            })
            .collect();
        if purged.iter().all(|p| *p) {
            break;
        }
        assert!(Instant::now() < end, "not purged: {purged:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(watermarks(&stack, results).0, 0, "results are never purged");

    // Requests sent while no worker runs wait in the topic past the purge point; a new worker
    // resumes at the committed offset and answers each of them (and no earlier request again).
    stack.signal(worker, "TERM");
    assert!(stack.wait_exit(worker, Duration::from_secs(20)));
    let high = watermarks(&stack, requests).1;
    let waiting: Vec<_> = (0..5)
        .map(|k| {
            let gw = stack.gateway.clone();
            tokio::spawn(async move {
                let s = samples();
                (k, infer(&http(), &gw, "mlp", &[&s.scaled[k]]).await)
            })
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(10);
    while watermarks(&stack, requests).1 < high + 5 {
        assert!(Instant::now() < end, "requests not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, addr) = stack.start_unit("all", &hops_off);
    let s = samples();
    for task in waiting {
        let (k, r) = task.await.unwrap();
        assert_answers(&r, &s, "mlp", k);
    }
    let ran = metric_sum(
        &http(),
        &addr,
        "sluice_worker_requests_total",
        "unit=\"mlp\",outcome=\"ok\"",
    )
    .await;
    assert_eq!(
        ran as usize, 5,
        "the new worker ran only what was not committed"
    );
}

/// Records written to `topic`'s partition 0 so far (its high watermark).
fn records_on(stack: &Stack, topic: &str) -> i64 {
    watermarks(stack, topic).1
}

/// Sends `n` samples to `servable` and checks each answer against onnxruntime's labels.
async fn answer_checked(stack: &Stack, servable: &str, n: usize) {
    let (s, client) = (samples(), http());
    for k in 0..n {
        // A model reads scaled pixels; a graph scales them itself.
        let row = if servable == "mlp" {
            &s.scaled[k]
        } else {
            &s.raw[k]
        };
        let r = infer(&client, &stack.gateway, servable, &[row]).await;
        assert_answers(&r, &s, servable, k);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_hops_and_joins_inside_a_unit_run_in_process_with_the_same_answers() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    let (mlp, postprocess, vote) = (
        "sluice.mlp.requests",
        "sluice.digits-pipeline.postprocess.requests",
        "sluice.digits-ensemble.vote.requests",
    );
    let count = |stack: &Stack| [mlp, postprocess, vote].map(|t| records_on(stack, t));
    let (worker, addr) = stack.start_unit("all", &[]);
    let before = count(&stack);
    let n = 12;
    answer_checked(&stack, "digits-pipeline", n).await;
    answer_checked(&stack, "digits-ensemble", n).await;
    let after = count(&stack);
    // scale → classify → postprocess ran in one process, and so did the ensemble's three
    // classifiers and its vote: nothing went through the hops' topics.
    assert_eq!(
        after[0] - before[0],
        0,
        "pipeline/ensemble records on {mlp}"
    );
    assert_eq!(after[1] - before[1], 0, "records on {postprocess}");
    assert_eq!(after[2] - before[2], 0, "parts on {vote}");
    let client = http();
    let hops = metric_sum(
        &client,
        &addr,
        "sluice_worker_local_hops_total",
        "unit=\"all\"",
    )
    .await;
    // classify + postprocess; three classifiers and their three parts.
    assert_eq!(hops as usize, 2 * n + 6 * n);
    let ok = |unit: &'static str| {
        let (client, addr) = (&client, &addr);
        async move {
            let label = format!("unit=\"{unit}\",outcome=\"ok\"");
            metric_sum(client, addr, "sluice_worker_requests_total", &label).await as usize
        }
    };
    // Each lane still counts what it ran: mlp for both graphs, forest for the ensemble.
    assert_eq!(ok("mlp").await, 2 * n);
    assert_eq!(ok("forest").await, n);
    assert_eq!(ok("digits-pipeline.postprocess").await, n);
    assert_eq!(ok("digits-ensemble.vote").await, n);

    // Switched off, every hop goes through its topic again, with the same answers.
    stack.signal(worker, "TERM");
    assert!(stack.wait_exit(worker, Duration::from_secs(20)));
    stack.start_unit("all", &[("SLUICE__WORKER__LOCAL_HOPS", "false")]);
    let before = count(&stack);
    answer_checked(&stack, "digits-pipeline", n).await;
    answer_checked(&stack, "digits-ensemble", n).await;
    let after = count(&stack);
    assert_eq!(
        after[0] - before[0],
        2 * n as i64,
        "hops to mlp through {mlp}"
    );
    assert_eq!(after[1] - before[1], n as i64, "hops through {postprocess}");
    assert_eq!(after[2] - before[2], 3 * n as i64, "parts through {vote}");
}
