//! Bandit routing against the real stack (Kafka, redis-server, onnxruntime): a Thompson
//! sampling router over the digit models, rewards from a simulated stream given back as
//! feedback, one learner, two replicas of the router.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Each arm's chance of reward in the simulated stream.
const RATES: [(&str, f64); 3] = [("logreg", 0.2), ("mlp", 0.5), ("forest", 0.8)];

/// A deterministic stand-in for a random reward: 1 with probability `rate`, keyed by `i`.
fn bernoulli(i: usize, rate: f64) -> f64 {
    let mut h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 32;
    f64::from(u8::from((h % 10_000) as f64 / 10_000.0 < rate))
}

/// Thompson sampling learns from rewards while serving: every answer comes from exactly one
/// arm and equals onnxruntime's answer of that arm's model; the expected reward is far above
/// uniform choice and near the best fixed arm; the learner counts every choice and reward once
/// per arm; both router replicas serve the learner's last state.
#[tokio::test(flavor = "multi_thread")]
async fn a_bandit_learns_the_best_arm_from_rewards_and_every_replica_follows() {
    // Without the example's discount, so each arm's count is exactly the rewards it earned.
    let config = example_variant("bandit", "bandit-sim", &[("discount = 0.995, ", "")], "");
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    for unit in ["scaler", "logreg", "mlp", "forest"] {
        stack.start_worker(unit);
    }
    let (_, replica_a) = stack.start_worker_at("digits-bandit.choose");
    let (_, replica_b) = stack.start_worker_at("digits-bandit.choose");
    let addr = format!("127.0.0.1:{}", free_port());
    stack.spawn_sluice(
        "learner",
        &[
            "learn",
            "--model",
            "digits-bandit",
            "--metrics-listen",
            &addr,
        ],
        &[],
    );
    stack.wait_ready(&format!("http://{addr}/health/ready"));
    let client = http();
    let base = stack.gateway.clone();
    let samples = Arc::new(samples());

    // Feedback codes: a bandit learns from a reward; a graph without one learns nothing.
    let fb = |model: &str, body: &str| {
        let (client, url) = (client.clone(), format!("{base}/v2/models/{model}/feedback"));
        let body = body.to_string();
        async move { post(&client, &url, &[], body).await.status }
    };
    assert_eq!(fb("digits-bandit", r#"{"id":"x","truth":1}"#).await, 422);
    assert_eq!(fb("digits-bandit", r#"{"id":"x","reward":2}"#).await, 422);
    assert_eq!(fb("digits-linucb", r#"{"id":"x"}"#).await, 422);
    assert_eq!(fb("nope", r#"{"id":"x","reward":1}"#).await, 404);

    // Two phases of 400 requests: the first learns from scratch while serving, in rounds of 50,
    // each round served with the state learned from the rounds before it (so what is measured
    // is the policy, not how fast a busy machine carries rewards to the replicas); the second,
    // once every reward is learned and both replicas serve it, shows what was learned.
    const PHASE: usize = 400;
    const ROUND: usize = 50;
    const EVENTS: usize = 2 * PHASE;
    let mut first = Vec::new();
    for start in (0..PHASE).step_by(ROUND) {
        first.extend(serve_phase(&client, &base, &samples, start..start + ROUND).await);
        wait_learned(&stack, &client, [&replica_a, &replica_b], start + ROUND).await;
    }
    let second = serve_phase(&client, &base, &samples, PHASE..EVENTS).await;

    // Regret in expectation (the chosen arm's rate), against the best fixed arm and uniform.
    let regret = |served: &[(&str, f64)]| {
        let expected: f64 = served.iter().map(|(_, r)| r).sum();
        0.8 * served.len() as f64 - expected
    };
    let uniform = (0.8 - 0.5) * PHASE as f64;
    println!(
        "regret learning {:.0}, learned {:.0}; uniform choice's {uniform:.0}",
        regret(&first),
        regret(&second)
    );
    assert!(
        regret(&first) < 0.7 * uniform,
        "learning: regret {:.0} vs the best fixed arm; uniform choice's is {uniform:.0}",
        regret(&first)
    );
    assert!(
        regret(&second) < 0.15 * uniform,
        "learned: regret {:.0} vs the best fixed arm; uniform choice's is {uniform:.0}",
        regret(&second)
    );
    let served: Vec<(&str, f64)> = first.into_iter().chain(second).collect();

    // The learner saw every choice and reward once, per arm as served, and both replicas serve
    // its last state.
    let s = wait_learned(&stack, &client, [&replica_a, &replica_b], EVENTS).await;
    assert_eq!(s["join"]["predictions"], EVENTS, "{s}");
    assert_eq!(s["join"]["joined"], EVENTS, "{s}");
    assert_eq!(s["join"]["duplicate"], 0, "{s}");
    for (arm, _) in RATES {
        let n = served.iter().filter(|(a, _)| *a == arm).count();
        let learned = s["arms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["arm"] == arm)
            .unwrap()["rewards_learned"]
            .as_f64()
            .unwrap();
        assert_eq!(learned, n as f64, "arm {arm}: {s}");
    }
}

/// Sends requests `events` to `digits-bandit` from 8 clients, checks each answer against
/// onnxruntime's for the arm that served it, gives back each request's simulated reward, and
/// returns the arm and its reward rate per request.
async fn serve_phase(
    client: &Http,
    base: &str,
    samples: &Arc<Samples>,
    events: std::ops::Range<usize>,
) -> Vec<(&'static str, f64)> {
    const CLIENTS: usize = 8;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, base, samples) = (client.clone(), base.to_string(), samples.clone());
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            let mut served = Vec::new();
            for i in events.skip(c).step_by(CLIENTS) {
                let k = i % samples.raw.len();
                let r = infer(&client, &base, "digits-bandit", &[&samples.raw[k]]).await;
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                let v = r.json();
                let by = &v["parameters"]["served_by"];
                let arms: Vec<&str> = RATES
                    .iter()
                    .map(|(a, _)| *a)
                    .filter(|a| by.get(a).is_some())
                    .collect();
                assert_eq!(arms.len(), 1, "exactly one arm per request: {v}");
                let arm = arms[0];
                let label = flat_f64(&v["outputs"][0]["data"])[0] as i64;
                let want = samples.expected[arm]["label"][k].as_i64().unwrap();
                assert_eq!(label, want, "{arm} on sample {k}: onnxruntime says {want}");
                let rate = RATES.iter().find(|(a, _)| *a == arm).unwrap().1;
                let reward = bernoulli(i, rate);
                let body = format!(
                    r#"{{"id":"{}","reward":{reward}}}"#,
                    v["id"].as_str().unwrap()
                );
                let f = post(
                    &client,
                    &format!("{base}/v2/models/digits-bandit/feedback"),
                    &[],
                    body,
                )
                .await;
                assert_eq!(f.status, 202);
                served.push((arm, rate));
            }
            served
        }));
    }
    let mut served = Vec::new();
    for t in tasks {
        served.extend(t.await.unwrap());
    }
    assert_eq!(served.len(), events.len());
    served
}

/// Waits until the learner has learned `n` rewards and every replica serves that state;
/// returns the learner's status.
async fn wait_learned(stack: &Stack, client: &Http, replicas: [&String; 2], n: usize) -> Value {
    let status = wait_learner_status(stack, "digits-bandit", "every reward learned", |s| {
        s["learned"]["learned"] == n
    })
    .await;
    for replica in replicas {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let v = metric_sum(
                client,
                replica,
                "sluice_served_weights_version",
                "digits-bandit",
            )
            .await;
            if v == n as f64 {
                break;
            }
            assert!(Instant::now() < end, "replica {replica} serves version {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    status
}
