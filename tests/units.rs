//! Deployment units over real processes (tansu, redis-server, gateway, workers running
//! onnxruntime): one worker process serving models and graph steps through one consumer, killed
//! under load; idle fetching and the gateway's wake-up; topics created for purging.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_are_paused_and_the_gateway_and_forwards_wake_them() {
    // Idle after 1 s; a paused partition is probed only every 20 s on its own, so an answer
    // within a few seconds can only come from a wake-up: the gateway's (a request after a quiet
    // spell) or the worker's own (a record it forwards to a paused partition of its unit).
    let Some(mut stack) = Stack::start(&[
        ("SLUICE__KAFKA__IDLE_AFTER", "1s"),
        ("SLUICE__KAFKA__IDLE_FETCH_INTERVAL", "20s"),
    ]) else {
        return;
    };
    let topics = partitions_of_all(&stack);
    // Hops in process would keep the pipeline's next steps off their topics: this test is about
    // the records that still go through them (local_hops off, a shadow copy, a join's parts
    // from other workers).
    let (_, addr) = stack.start_unit("all", &[("SLUICE__WORKER__LOCAL_HOPS", "false")]);
    let client = http();
    let s = samples();
    let paused = || {
        metric_sum(
            &client,
            &addr,
            "sluice_worker_paused_partitions",
            "unit=\"all\"",
        )
    };
    let end = Instant::now() + Duration::from_secs(15);
    while paused().await as usize != topics {
        assert!(
            Instant::now() < end,
            "the idle worker never paused all {topics} partitions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Quiet for longer than the gateway's threshold (half of idle_after), then one request.
    for (servable, row) in [("mlp", &s.scaled[1]), ("digits-pipeline", &s.raw[1])] {
        let t = Instant::now();
        let r = infer(&client, &stack.gateway, servable, &[row]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(label_of(&r.json()), Some(want(&s, servable, 1)));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{servable}: {:?}: woken by the gateway, not by the 20 s probe",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // Under steady load on mlp alone, mlp's partition keeps fetching while the graph's
    // partitions pause again; a pipeline request then passes through partitions that were
    // paused, woken by the gateway (entry) and by the worker's own forwards (next steps).
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (stop, gw, row) = (
            Arc::clone(&stop),
            stack.gateway.clone(),
            s.scaled[2].clone(),
        );
        tokio::spawn(async move {
            let client = http();
            while !stop.load(Ordering::Relaxed) {
                let r = infer(&client, &gw, "mlp", &[&row]).await;
                assert_eq!(r.status, 200);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let end = Instant::now() + Duration::from_secs(15);
    while (paused().await as usize) < topics - 1 {
        assert!(
            Instant::now() < end,
            "the quiet partitions of a busy worker never paused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 3..6 {
        let t = Instant::now();
        let r = infer(&client, &stack.gateway, "digits-pipeline", &[&s.raw[i]]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(label_of(&r.json()), Some(want(&s, "digits-pipeline", i)));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "pipeline {i}: {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    busy.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_step_topics_are_created_to_be_purged_and_results_are_kept() {
    // The harness's broker is tansu, which cannot delete records on request: request and step
    // topics get retention.ms = kafka.purge_retention instead; results and dead letters do not.
    let Some(stack) = Stack::start(&[]) else {
        return;
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .create()
        .unwrap();
    let retention = |topic: &'static str| {
        let admin = &admin;
        async move {
            let r = admin
                .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
                .await
                .unwrap();
            let resource = r.into_iter().next().unwrap().unwrap();
            resource
                .get("retention.ms")
                .and_then(|e| e.value.clone())
                .unwrap_or_default()
        }
    };
    for purged in [
        "sluice.mlp.requests",
        "sluice.digits-pipeline.requests",
        "sluice.digits-pipeline.postprocess.requests",
    ] {
        assert_eq!(retention(purged).await, "600000", "{purged}");
    }
    for kept in [
        "sluice.mlp.results",
        "sluice.dead-letter",
        "sluice.digits-shadow.comparisons",
    ] {
        assert_ne!(retention(kept).await, "600000", "{kept}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_cannot_delete_records_is_logged_once_and_serving_goes_on() {
    // Without the tansu setting the worker asks tansu to delete what its group committed;
    // tansu 0.6.0 drops the connection instead of answering. The worker gives up, says so once,
    // and keeps serving.
    let Some(mut stack) = Stack::start(&[
        ("SLUICE__KAFKA__BROKER_QUIRKS", "none"),
        ("SLUICE__KAFKA__PURGE_INTERVAL", "500ms"),
    ]) else {
        return;
    };
    let (worker, _) = stack.start_unit("all", &[]);
    let client = http();
    let s = samples();
    let end = Instant::now() + Duration::from_secs(6);
    let mut answered = 0;
    while Instant::now() < end {
        let k = answered % s.scaled.len();
        let r = infer(&client, &stack.gateway, "mlp", &[&s.scaled[k]]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(label_of(&r.json()), Some(want(&s, "mlp", k)));
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each failed request waits for its timeout (10 s): give the worker time to give up.
    let end = Instant::now() + Duration::from_secs(60);
    while !stack
        .log_of(worker)
        .contains("does not answer DeleteRecords")
    {
        assert!(Instant::now() < end, "{}", stack.log_of(worker));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = infer(&client, &stack.gateway, "mlp", &[&s.scaled[0]]).await;
    assert_eq!(r.status, 200, "still serving");
    let log = stack.log_of(worker);
    assert_eq!(
        log.matches("does not answer DeleteRecords").count(),
        1,
        "{log}"
    );
    println!("answered {answered} requests while the purge gave up");
}

/// Records on `topic`'s partition 0 so far, read from the start (tansu 0.6.0's high watermark
/// can count a batch of several records short, so they are counted one by one).
fn records_on(stack: &Stack, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .set("group.id", "records-on")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut n = 0;
    while let Some(m) = c.poll(Duration::from_millis(1500)) {
        m.unwrap();
        n += 1;
    }
    n
}

/// Sends `n` samples to `servable` and checks each answer against onnxruntime's labels.
async fn answer_checked(stack: &Stack, servable: &str, n: usize) {
    let (s, client) = (samples(), http());
    for k in 0..n {
        let r = infer(&client, &stack.gateway, servable, &[&s.raw[k]]).await;
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
