//! Fault drills: the real stack (Kafka, redis-server, onnxruntime, gateway, workers) under a
//! closed-loop load of `heavy` requests while one fault is injected; then an oracle reads every
//! answer and every record of the result topic and reports: requests sent, answered correctly
//! (equal to onnxruntime's answer for that input), wrong, errors by status, lost (accepted, no
//! answer and no result record), duplicate result records. Every drill holds 0 lost and 0 wrong.
//!
//! `SLUICE_DRILL_SECONDS` sets the load's length (default 4: the short versions CI runs);
//! `SLUICE_DRILL_REPORT=FILE` appends each drill's row of the Markdown report to FILE
//! (`deploy/drills.sh` runs them all for 30 s each and writes `docs/drills.md`).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::drill::{
    self, HEAVY, LONG, Load, Outcome, SHORT, call_once, drill_seconds, read_topic,
};
use common::*;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use sluice_schemas::InferenceResult;

/// Drills share this lock: each holds it to read, and the overload drill to write, so that
/// drill runs alone (its capacity measurement must not share the machine with another drill).
static DRILLS: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(|| tokio::sync::RwLock::new(()));

/// The model every drill here loads: batching, milliseconds per call, two partitions.
const MODEL: &str = HEAVY.name;
const RESULTS: &str = HEAVY.results;

/// [`drill::under_load`] of `heavy`.
async fn under_load<F>(
    stack: &mut Stack,
    tag: &str,
    deadline: Duration,
    fault: F,
) -> (Vec<Outcome>, Arc<Samples>)
where
    F: AsyncFnOnce(&mut Stack, &Load),
{
    drill::under_load(stack, &HEAVY, tag, deadline, fault).await
}

/// [`drill::judge`] of `heavy`'s answers.
async fn judge(
    drill: &str,
    stack: &Stack,
    samples: &Samples,
    outcomes: &[Outcome],
    note: &str,
) -> DrillReport {
    drill::judge(drill, stack, &HEAVY, samples, outcomes, note).await
}
/// The stack every drill starts from: `heavy` on two partitions, one worker.
fn drill_stack(extra_env: &[(&str, &str)]) -> Option<(Stack, usize)> {
    drill_stack_with(extra_env, Broker::default())
}

/// As [`drill_stack`], with the broker run as `broker` says (durable, behind a proxy).
fn drill_stack_with(extra_env: &[(&str, &str)], broker: Broker) -> Option<(Stack, usize)> {
    let mut env = vec![("SLUICE__MODELS__HEAVY__PARTITIONS", "2")];
    env.extend_from_slice(extra_env);
    let mut stack = Stack::start_with(root().join("examples/digits.toml"), &env, broker)?;
    let w = stack.start_worker(MODEL);
    Some((stack, w))
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_kill_9_under_load() {
    let _turn = DRILLS.read().await;
    let Some((mut stack, w)) = drill_stack(&[]) else {
        return;
    };
    let (outcomes, samples) = under_load(&mut stack, "kill9", LONG, async |stack, load| {
        stack.signal(w, "KILL");
        stack.start_worker(MODEL);
        load.wait_answers(20).await;
    })
    .await;
    judge(
        "worker kill -9",
        &stack,
        &samples,
        &outcomes,
        "a new worker started at once",
    )
    .await
    .holds(&[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_sigterm_drains_under_load() {
    let _turn = DRILLS.read().await;
    let Some((mut stack, w)) = drill_stack(&[]) else {
        return;
    };
    let (outcomes, samples) = under_load(&mut stack, "term", LONG, async |stack, load| {
        stack.signal(w, "TERM");
        assert!(
            stack.wait_exit(w, Duration::from_secs(25)),
            "drained, exit 0"
        );
        stack.start_worker(MODEL);
        load.wait_answers(20).await;
    })
    .await;
    judge(
        "worker SIGTERM (drain)",
        &stack,
        &samples,
        &outcomes,
        "replaced after it exited",
    )
    .await
    .holds(&[]);
}

/// Kills the worker at a fail point (compiled into test builds only) and starts a clean one.
#[cfg(feature = "fail-points")]
async fn fail_point_drill(point: &str, passes: u32, drill: &str) {
    let Some(mut stack) = Stack::start(&[("SLUICE__MODELS__HEAVY__PARTITIONS", "2")]) else {
        return;
    };
    let spec = format!("{point}:{passes}");
    let addr = format!("127.0.0.1:{}", free_port());
    let w = stack.spawn_sluice(
        "worker-heavy-failing",
        &["worker", "--model", MODEL, "--metrics-listen", &addr],
        &[("SLUICE_FAIL_POINT", spec.as_str())],
    );
    stack.wait_ready(&format!("http://{addr}/health/ready"));
    let (outcomes, samples) = under_load(&mut stack, point, LONG, async |stack, load| {
        // The n-th pass of the point kills it (the load is flowing by now).
        // `wait_exit` fails the test if the worker has not exited within a minute.
        let exited_cleanly = stack.wait_exit(w, Duration::from_secs(60));
        assert!(
            !exited_cleanly,
            "the worker exited cleanly instead of dying at the fail point"
        );
        load.mark_fault();
        assert!(stack.log_of(w).contains("fail point reached"));
        stack.start_worker(MODEL);
        load.wait_answers(20).await;
    })
    .await;
    judge(
        drill,
        &stack,
        &samples,
        &outcomes,
        "SIGKILL at the point; a clean worker started",
    )
    .await
    .holds(&[]);
}

#[cfg(feature = "fail-points")]
#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_before_its_results_are_produced() {
    let _turn = DRILLS.read().await;
    fail_point_drill("before_produce", 40, "kill -9 before the result produce").await;
}

#[cfg(feature = "fail-points")]
#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_after_produce_before_offset_stored() {
    let _turn = DRILLS.read().await;
    fail_point_drill(
        "after_produce",
        40,
        "kill -9 after produce, before offset store",
    )
    .await;
}

#[cfg(feature = "fail-points")]
#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_after_a_commit() {
    let _turn = DRILLS.read().await;
    fail_point_drill("after_commit", 3, "kill -9 after a commit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rebalance_storm_under_load() {
    let _turn = DRILLS.read().await;
    let Some((mut stack, first)) = drill_stack(&[]) else {
        return;
    };
    let (outcomes, samples) = under_load(&mut stack, "storm", LONG, async |stack, load| {
        // Workers added, stopped and killed in turn for the middle of the drill.
        let mut alive = vec![first];
        let end = Instant::now() + Duration::from_secs(drill_seconds().max(3));
        let mut round = 0;
        while Instant::now() < end {
            match round % 3 {
                0 => alive.push(stack.start_worker(MODEL)),
                1 if alive.len() > 1 => {
                    let w = alive.remove(0);
                    stack.signal(w, "TERM");
                }
                _ if alive.len() > 1 => {
                    let w = alive.remove(0);
                    stack.signal(w, "KILL");
                }
                _ => alive.push(stack.start_worker(MODEL)),
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        load.wait_answers(20).await;
    })
    .await;
    judge(
        "rebalance storm",
        &stack,
        &samples,
        &outcomes,
        "workers added, stopped (TERM) and killed (KILL) in turn, one every 0.7 s",
    )
    .await
    .holds(&[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_paused_then_resumed() {
    let _turn = DRILLS.read().await;
    // SLUICE_DRILL_KAFKA_DEBUG=cgrp,... turns on librdkafka's debug log in the worker.
    let debug = std::env::var("SLUICE_DRILL_KAFKA_DEBUG").ok();
    let env: Vec<(&str, &str)> = debug
        .iter()
        .map(|d| ("SLUICE__KAFKA__CONSUMER__DEBUG", d.as_str()))
        .collect();
    let Some((mut stack, _)) = drill_stack(&env) else {
        return;
    };
    // Longer than the workers' session.timeout.ms (6 s): each worker's session expires and the
    // group forms again once the broker resumes.
    let pause = Duration::from_secs(
        std::env::var("SLUICE_DRILL_BROKER_PAUSE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let (outcomes, samples) = under_load(&mut stack, "brokerstop", LONG, async |stack, load| {
        let broker = stack.index_of("kafka");
        stack.signal_keep(broker, "STOP");
        tokio::time::sleep(pause).await;
        stack.signal_keep(broker, "CONT");
        load.wait_answers(20).await;
    })
    .await;
    // While the broker is frozen, requests already published wait; new ones are refused with
    // 503 once the gateway's probes fail (or wait in the producer within their deadline).
    judge(
        "broker SIGSTOP, SIGCONT",
        &stack,
        &samples,
        &outcomes,
        &format!("Kafka frozen {} s", pause.as_secs()),
    )
    .await
    .holds(&[503]);
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_killed_and_restarted() {
    let _turn = DRILLS.read().await;
    let Some((mut stack, _)) = drill_stack(&[]) else {
        return;
    };
    let (outcomes, samples) = under_load(&mut stack, "brokerkill", LONG, async |stack, load| {
        stack.restart_broker();
        load.wait_answers(20).await;
    })
    .await;
    // While the broker is down new requests are refused (503) once the gateway's probes fail;
    // published ones are kept on disk and answered after the restart.
    judge(
        "broker kill -9, restart",
        &stack,
        &samples,
        &outcomes,
        "Kafka (log on disk) killed -9, restarted at once",
    )
    .await
    .holds(&[503]);
}

#[tokio::test(flavor = "multi_thread")]
async fn network_delay_loss_cuts_and_a_partition() {
    let _turn = DRILLS.read().await;
    let broker = Broker { proxied: true };
    let Some((mut stack, _)) = drill_stack_with(&[], broker) else {
        return;
    };
    let net = stack.net.clone().unwrap();
    let phase = Duration::from_secs(drill_seconds()).max(Duration::from_secs(3)) / 3;
    let before = net.counts();
    let (outcomes, samples) = under_load(&mut stack, "network", LONG, async |_, load| {
        // Latency and loss on every connection to the broker, then every connection reset
        // twice, then a partition shorter than the session timeout, then a clean network.
        net.set_delay(Duration::from_millis(25));
        net.set_loss(0.02);
        tokio::time::sleep(phase).await;
        let lossy = net.counts();
        assert!(
            lossy.delayed > before.delayed,
            "nothing was delayed: {lossy:?}"
        );
        assert!(lossy.lost > before.lost, "nothing was lost: {lossy:?}");
        net.cut_all();
        tokio::time::sleep(Duration::from_millis(500)).await;
        net.cut_all();
        tokio::time::sleep(phase).await;
        let cut = net.counts();
        // Both cuts reset connections, and the clients came back through the proxy.
        assert!(
            cut.cut >= lossy.cut + 2,
            "connections not cut twice: {cut:?}"
        );
        assert!(
            cut.connections > lossy.connections,
            "no reconnection: {cut:?}"
        );
        net.partition(true);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            net.counts().held > cut.held,
            "the partition held nothing back"
        );
        net.heal();
        load.wait_answers(20).await;
    })
    .await;
    judge(
        "network: delay, loss, cuts, partition",
        &stack,
        &samples,
        &outcomes,
        "every broker connection through a proxy: +25 ms and 2% loss, all cut twice, partitioned 3 s",
    )
    .await
    .holds(&[503]);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_and_restarted() {
    let _turn = DRILLS.read().await;
    let Some((mut stack, _)) = drill_stack(&[]) else {
        return;
    };
    let (outcomes, samples) = under_load(&mut stack, "redisrestart", SHORT, async |stack, load| {
        stack.restart_redis();
        load.wait_answers(20).await;
    })
    .await;
    // A reply lost with the old Redis is answered 504 at its deadline (a result record exists);
    // new requests get 503 until the gateway sees Redis again.
    judge(
        "Redis kill -9, restart",
        &stack,
        &samples,
        &outcomes,
        "fresh redis-server on the same port",
    )
    .await
    .holds(&[503, 504]);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_paused_then_resumed() {
    let _turn = DRILLS.read().await;
    let Some((mut stack, _)) = drill_stack(&[]) else {
        return;
    };
    let (outcomes, samples) = under_load(&mut stack, "redisstop", SHORT, async |stack, load| {
        let redis = stack.index_of("redis");
        stack.signal_keep(redis, "STOP");
        tokio::time::sleep(Duration::from_secs(3)).await;
        stack.signal_keep(redis, "CONT");
        load.wait_answers(20).await;
    })
    .await;
    judge(
        "Redis SIGSTOP 3 s, SIGCONT",
        &stack,
        &samples,
        &outcomes,
        "",
    )
    .await
    .holds(&[503, 504]);
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_killed_with_requests_in_flight() {
    let _turn = DRILLS.read().await;
    // Results live until the later of their deadline (8 s) and result_ttl (2 s): orphaned
    // results must be gone from Redis soon after.
    let Some((mut stack, _)) = drill_stack(&[("SLUICE__REDIS__RESULT_TTL", "2s")]) else {
        return;
    };
    let redis_url = stack.redis_url.clone();
    let keys = move || {
        let client = redis::Client::open(redis_url.as_str()).unwrap();
        let mut c = client.get_connection().unwrap();
        redis::cmd("DBSIZE").query::<usize>(&mut c).unwrap()
    };
    let baseline = keys();
    let (outcomes, samples) = under_load(&mut stack, "gwkill", SHORT, async |stack, load| {
        let gw = stack.index_of("gateway");
        stack.signal(gw, "KILL");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stack.spawn_sluice("gateway", &["gateway"], &[]);
        let ready = format!("{}/v2/health/ready", stack.gateway);
        stack.wait_ready(&ready);
        load.wait_answers(20).await;
    })
    .await;
    let report = judge(
        "gateway kill -9",
        &stack,
        &samples,
        &outcomes,
        "callers cut off mid-request get no answer; 503 from the new gateway until its probes pass",
    )
    .await;
    report.holds(&[0, 503]);
    // Orphaned results expire: Redis returns to its baseline.
    let end = Instant::now() + Duration::from_secs(45);
    while keys() > baseline {
        assert!(
            Instant::now() < end,
            "{} keys left in Redis (baseline {baseline})",
            keys()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Poison records produced straight onto the request topic while callers are served.
fn poison_records(samples: &Samples) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    use sluice_schemas::{DataType, InferenceRequest, Tensor, encode_request};
    let request = |id: &str, shape: Vec<i64>, values: &[f32]| InferenceRequest {
        id: id.into(),
        model: MODEL.into(),
        deadline: Some(sluice_schemas::Deadline::after(
            std::time::Duration::from_millis(60_000),
        )),
        sent_at_us: sluice_common::now_us(),
        inputs: vec![Tensor::from_values("input", DataType::Fp32, shape, values)],
        ..Default::default()
    };
    let valid = encode_request(&request("poison-valid", vec![1, 64], &samples.scaled[0])).unwrap();
    let mut unknown_schema = valid.clone();
    // Single-object encoding: 0xC3 0x01, then the schema's 8-byte fingerprint.
    for b in &mut unknown_schema[2..10] {
        *b ^= 0x5a;
    }
    let random: Vec<u8> = (0..300u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let nan: Vec<f32> = (0..64)
        .map(|i| match i % 3 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            _ => f32::NEG_INFINITY,
        })
        .collect();
    vec![
        ("poison-random", random, "undecodable"),
        (
            "poison-truncated",
            valid[..valid.len() / 2].to_vec(),
            "undecodable",
        ),
        ("poison-schema", unknown_schema, "undecodable"),
        ("poison-empty", Vec::new(), "undecodable"),
        (
            "poison-shape",
            encode_request(&request(
                "poison-shape",
                vec![1, 63],
                &samples.scaled[0][..63],
            ))
            .unwrap(),
            "invalid_input",
        ),
        (
            "poison-huge",
            encode_request(&request(
                "poison-huge",
                vec![1, 1 << 40],
                &samples.scaled[0],
            ))
            .unwrap(),
            "invalid_input",
        ),
        (
            "poison-nan",
            encode_request(&request("poison-nan", vec![1, 64], &nan)).unwrap(),
            "answered",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_are_dead_lettered_without_a_crash_or_a_stall() {
    let _turn = DRILLS.read().await;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let Some((mut stack, w)) = drill_stack(&[]) else {
        return;
    };
    let kafka = stack.kafka.clone();
    let poison = poison_records(&samples());
    let sent = poison.clone();
    let (outcomes, samples) = under_load(&mut stack, "poison", LONG, async |_, load| {
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka)
            .create()
            .unwrap();
        for round in 0..3 {
            for (key, payload, _) in &sent {
                producer
                    .send(
                        FutureRecord::to("sluice.heavy.requests")
                            .key(*key)
                            .partition(round % 2)
                            .payload(payload),
                        Duration::from_secs(5),
                    )
                    .await
                    .unwrap();
            }
        }
        load.wait_answers(50).await;
    })
    .await;
    let report = judge(
        "poison records",
        &stack,
        &samples,
        &outcomes,
        "random bytes, truncated Avro, unknown schema, empty, wrong shape, 2^40 elements (x3 each, both partitions): dead-lettered; NaN/Inf answered",
    )
    .await;
    report.holds(&[]);
    assert!(
        !stack.wait_exit_within(w, Duration::from_millis(10)),
        "the worker is still running"
    );
    // Each bad record is dead-lettered with its origin; each gets an error result under its
    // key, so a direct producer is not left waiting; NaN/Inf inputs are a valid request.
    let dead = read_topic(&stack, "sluice.dead-letter", Duration::from_secs(3)).await;
    let results = read_topic(&stack, RESULTS, Duration::from_secs(3)).await;
    let header = |m: &OwnedMessage, key: &str| {
        use rdkafka::message::Headers;
        m.headers()?
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    for (key, _, class) in &poison {
        let dead_lettered: Vec<_> = dead
            .iter()
            .filter(|m| m.key() == Some(key.as_bytes()))
            .collect();
        let answered: Vec<InferenceResult> = results
            .iter()
            .filter(|m| m.key() == Some(key.as_bytes()))
            .map(|m| sluice_schemas::decode_result(m.payload().unwrap()).unwrap())
            .collect();
        assert_eq!(
            answered.len(),
            3,
            "{key}: a result record per poison record"
        );
        if *class == "answered" {
            assert!(dead_lettered.is_empty(), "{key}");
            assert!(answered.iter().all(|r| r.error.is_none()), "{key}");
            continue;
        }
        assert_eq!(dead_lettered.len(), 3, "{key}: dead-lettered each time");
        for m in dead_lettered {
            assert_eq!(
                header(m, "x-original-topic").as_deref(),
                Some("sluice.heavy.requests")
            );
            assert_eq!(header(m, "x-error-class").as_deref(), Some(*class), "{key}");
            assert!(header(m, "x-original-offset").is_some());
        }
        for r in answered {
            assert_eq!(r.error.map(|e| e.code.as_str()), Some(*class), "{key}");
        }
    }
}

/// Sends requests at `rate` per second (open loop: not waiting for answers) for `length`.
async fn open_loop(
    stack: &Stack,
    samples: &Arc<Samples>,
    tag: &str,
    rate: f64,
    length: Duration,
) -> Vec<Outcome> {
    let url = format!("{}/v2/models/{MODEL}/infer", stack.gateway);
    let client = http();
    let mut tasks = Vec::new();
    let started = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < length {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as usize;
        while sent < due {
            let k = (sent * 31) % samples.scaled.len();
            let id = format!("{tag}-{sent}");
            let (client, url, samples) = (client.clone(), url.clone(), samples.clone());
            tasks.push(tokio::spawn(async move {
                call_once(
                    &client,
                    &HEAVY,
                    &url,
                    &samples,
                    id,
                    k,
                    LONG.as_micros() as u64,
                )
                .await
            }));
            sent += 1;
        }
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    outcomes
}

/// The `q` quantile of the latencies of outcomes with `status`, in ms.
fn quantile_ms(outcomes: &[Outcome], status: u16, q: f64) -> f64 {
    let mut l: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.status == status)
        .map(|o| o.latency.as_secs_f64() * 1000.0)
        .collect();
    if l.is_empty() {
        return 0.0;
    }
    l.sort_by(f64::total_cmp);
    l[((l.len() as f64 * q) as usize).min(l.len() - 1)]
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_at_two_and_five_times_capacity() {
    let _alone = DRILLS.write().await;
    // 64 requests in flight at most: the rest are turned away at once with 429, so accepted
    // requests wait for at most 64 ahead of them.
    let Some((stack, _)) = drill_stack(&[("SLUICE__GATEWAY__MAX_IN_FLIGHT", "64")]) else {
        return;
    };
    let samples = Arc::new(samples());
    let length = Duration::from_secs(drill_seconds());
    let gateway = stack.index_of("gateway");
    // Capacity: closed loop, 16 callers, with no other drill running (measured beside another
    // drill it once came out at half the capacity, and 2× that overloaded nothing).
    let load = Load::start(&stack, &HEAVY, 16, &samples, "capacity", LONG);
    load.wait_answers(50).await;
    let from = (Instant::now(), load.answered.load(Ordering::Relaxed));
    tokio::time::sleep(length).await;
    let capacity =
        (load.answered.load(Ordering::Relaxed) - from.1) as f64 / from.0.elapsed().as_secs_f64();
    let baseline = load.stop().await;
    let rss_before = stack.rss_kib(gateway);
    let p99_before = quantile_ms(&baseline, 200, 0.99);
    for times in [2.0, 5.0] {
        let outcomes = open_loop(
            &stack,
            &samples,
            &format!("over{times}"),
            capacity * times,
            length,
        )
        .await;
        let accepted = outcomes.iter().filter(|o| o.status == 200).count();
        let note = format!(
            "capacity {capacity:.0}/s (closed loop, p99 {p99_before:.0} ms); offered {:.0}/s; accepted {:.0}/s, p99 {:.0} ms; 429 p50 {:.1} ms, p99 {:.1} ms; gateway RSS {} → {} MiB",
            capacity * times,
            accepted as f64 / length.as_secs_f64(),
            quantile_ms(&outcomes, 200, 0.99),
            quantile_ms(&outcomes, 429, 0.5),
            quantile_ms(&outcomes, 429, 0.99),
            rss_before / 1024,
            stack.rss_kib(gateway) / 1024,
        );
        let report = judge(
            &format!("overload {times}x"),
            &stack,
            &samples,
            &outcomes,
            &note,
        )
        .await;
        report.holds(&[429]);
        assert!(
            report.errors.get(&429).copied().unwrap_or(0) > 0,
            "over capacity, some requests are turned away: {}",
            report.row()
        );
        // Memory stays bounded: the gateway holds at most 64 requests.
        assert!(
            stack.rss_kib(gateway) < rss_before + 200 * 1024,
            "gateway RSS grew from {rss_before} KiB to {} KiB",
            stack.rss_kib(gateway)
        );
    }
    // Back to normal once the load stops: a closed loop again, every request answered.
    let load = Load::start(&stack, &HEAVY, 16, &samples, "after", LONG);
    load.wait_answers(50).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = load.stop().await;
    assert!(
        after.iter().all(|o| o.status == 200 && o.correct),
        "after the overload every request is answered correctly"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_offset_zero_gives_the_same_answers() {
    let _turn = DRILLS.read().await;
    use rdkafka::consumer::{BaseConsumer, CommitMode};
    use rdkafka::{Offset, TopicPartitionList};
    let Some((mut stack, w)) = drill_stack(&[]) else {
        return;
    };
    let (outcomes, samples) = under_load(&mut stack, "replay", LONG, async |_, _| {}).await;
    // Stop the worker, move its group back to offset 0, start a worker: every request is read
    // and answered again (within their 40 s deadlines).
    stack.signal(w, "TERM");
    assert!(stack.wait_exit(w, Duration::from_secs(25)));
    let rewind: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .set("group.id", "sluice.heavy")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset("sluice.heavy.requests", p, Offset::Offset(0))
            .unwrap();
    }
    rewind.assign(&tpl).unwrap();
    rewind.commit(&tpl, CommitMode::Sync).unwrap();
    drop(rewind);
    stack.start_worker(MODEL);
    let report = judge(
        "replay from offset 0",
        &stack,
        &samples,
        &outcomes,
        "worker stopped, its group's offsets set to 0, a worker started: every record read again",
    )
    .await;
    report.holds(&[]);
    // Every request answered twice, the second time the same (judge compared every record
    // with onnxruntime's answer).
    assert!(
        report.duplicates >= outcomes.len(),
        "every request was answered again: {}",
        report.row()
    );
}

#[cfg(feature = "fail-points")]
#[tokio::test(flavor = "multi_thread")]
async fn a_step_that_stalls_holds_its_records_and_answers_them_once() {
    let _turn = DRILLS.read().await;
    // A worker whose step hangs 12 s next to a healthy one. Its consumer keeps polling (the
    // poll loop does not wait for steps; it stops only when the queue is full), so it keeps
    // its partition: the records it holds wait out the stall within their deadline and are
    // answered once; the other partition is served meanwhile.
    let Some(mut stack) = Stack::start(&[("SLUICE__MODELS__HEAVY__PARTITIONS", "2")]) else {
        return;
    };
    let addr = format!("127.0.0.1:{}", free_port());
    let stalled = stack.spawn_sluice(
        "worker-heavy-stalling",
        &["worker", "--model", MODEL, "--metrics-listen", &addr],
        &[("SLUICE_FAIL_STALL", "30:12")],
    );
    stack.wait_ready(&format!("http://{addr}/health/ready"));
    stack.start_worker(MODEL);
    let (outcomes, samples) = under_load(&mut stack, "stall", LONG, async |stack, load| {
        let end = Instant::now() + Duration::from_secs(30);
        while !stack.log_of(stalled).contains("stalled batch resumes") {
            assert!(Instant::now() < end, "the stall never ended");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        load.wait_answers(50).await;
    })
    .await;
    let report = judge(
        "step stalled 12 s",
        &stack,
        &samples,
        &outcomes,
        "one of two workers; its consumer keeps polling, so it keeps its partition and answers the held records after the stall",
    )
    .await;
    report.holds(&[]);
    assert!(
        stack
            .log_of(stalled)
            .contains("fail point reached: stalling")
    );
}
