//! Fault drills of the default deployment: `examples/digits.toml` with no units declared, so one
//! worker process (unit `all`) serves every model and graph step, a graph's hops running in
//! process. The load calls `digits-pipeline` (scale → mlp → argmax) through the gateway, each
//! answer and result record compared with onnxruntime's; each drill reports lost, wrong and
//! duplicate results and the recovery time (see `tests/common/drill.rs`).
//!
//! The unit runs as a static group member (`worker.instance`, as `sluice up` starts it), so a
//! process restarted after a crash takes its partitions back at once; one drill runs it without
//! an instance name to show what that saves.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::drill::{self, LONG, PIPELINE, SHORT};
use common::*;

/// The unit's static member name in these drills.
const INSTANCE: (&str, &str) = ("SLUICE__WORKER__INSTANCE", "0");

/// The gateway, broker and Redis, and the default unit serving everything (a static member
/// unless `instance` is false); returns the stack and the unit's process index.
fn default_stack(instance: bool, unit_env: &[(&str, &str)]) -> Option<(Stack, usize)> {
    let mut stack = Stack::start(&[])?;
    let mut env = unit_env.to_vec();
    if instance {
        env.push(INSTANCE);
    }
    let (w, _) = stack.start_unit("all", &env);
    Some((stack, w))
}

/// Kills the unit at the `mid_chain` fail point (a request's first step done, its next hops
/// not run, nothing produced) and starts a clean one at once, named as the dead one or not.
#[cfg(feature = "fail-points")]
async fn killed_mid_chain(instance: bool, drill_name: &str) -> Option<drill::DrillFound> {
    let (mut stack, w) = default_stack(instance, &[("SLUICE_FAIL_POINT", "mid_chain:300")])?;
    let restart_env: Vec<(&str, &str)> = if instance { vec![INSTANCE] } else { vec![] };
    let (outcomes, samples) = drill::under_load(
        &mut stack,
        &PIPELINE,
        "midchain",
        LONG,
        async |stack, load| {
            assert!(
                stack.wait_exit_within(w, Duration::from_secs(60)),
                "the unit did not reach its fail point"
            );
            load.mark_fault();
            assert!(stack.log_of(w).contains("fail point reached"));
            stack.start_unit("all", &restart_env);
            load.wait_answers(20).await;
        },
    )
    .await;
    let note = if instance {
        "killed at the point with graphs half done; a new unit started at once under the same instance name"
    } else {
        "as above, the new unit a new group member: the dead one's partitions wait for its session (6 s) to expire"
    };
    let report = drill::judge(drill_name, &stack, &PIPELINE, &samples, &outcomes, note).await;
    report.holds(&[]);
    Some(drill::DrillFound { report, outcomes })
}

#[cfg(feature = "fail-points")]
#[tokio::test(flavor = "multi_thread")]
async fn default_unit_killed_mid_chain_is_back_within_a_second() {
    let Some(found) =
        killed_mid_chain(true, "default unit: kill -9 mid-chain, same instance").await
    else {
        return;
    };
    let recovery = drill::recovery(&found.outcomes).expect("answers after the kill");
    assert!(
        recovery <= Duration::from_secs(1),
        "first answer {recovery:?} after the kill: {}",
        found.report.row()
    );
}

#[cfg(feature = "fail-points")]
#[tokio::test(flavor = "multi_thread")]
async fn default_unit_killed_mid_chain_without_an_instance_name() {
    // The comparison: nothing lost either way, but a new member waits for the old session.
    let Some(found) = killed_mid_chain(false, "default unit: kill -9 mid-chain, new member").await
    else {
        return;
    };
    let recovery = drill::recovery(&found.outcomes).expect("answers after the kill");
    println!("recovery as a new group member: {recovery:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn default_unit_sigterm_drains_under_load() {
    let Some((mut stack, w)) = default_stack(true, &[]) else {
        return;
    };
    let (outcomes, samples) =
        drill::under_load(&mut stack, &PIPELINE, "term", LONG, async |stack, load| {
            stack.signal(w, "TERM");
            assert!(
                stack.wait_exit(w, Duration::from_secs(25)),
                "the unit did not drain and exit cleanly"
            );
            stack.start_unit("all", &[INSTANCE]);
            load.wait_answers(20).await;
        })
        .await;
    let note = "SIGTERM: fetching stops, batches finish, offsets committed; a new unit started after it exited";
    drill::judge(
        "default unit: SIGTERM drain",
        &stack,
        &PIPELINE,
        &samples,
        &outcomes,
        note,
    )
    .await
    .holds(&[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn default_unit_through_a_broker_restart() {
    let Some((mut stack, _)) = default_stack(true, &[]) else {
        return;
    };
    let mut down = Duration::ZERO;
    let (outcomes, samples) = drill::under_load(
        &mut stack,
        &PIPELINE,
        "brokerkill",
        LONG,
        async |stack, load| {
            let killed = std::time::Instant::now();
            stack.restart_broker();
            down = killed.elapsed();
            load.wait_answers(20).await;
        },
    )
    .await;
    let note = format!(
        "Kafka (log on disk) killed -9 and restarted at once: listening again after {:.1} s",
        down.as_secs_f64()
    );
    drill::judge(
        "default unit: broker kill -9, restart",
        &stack,
        &PIPELINE,
        &samples,
        &outcomes,
        &note,
    )
    .await
    .holds(&[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn default_unit_through_a_redis_restart() {
    let Some((mut stack, _)) = default_stack(true, &[]) else {
        return;
    };
    let (outcomes, samples) = drill::under_load(
        &mut stack,
        &PIPELINE,
        "redis",
        SHORT,
        async |stack, load| {
            stack.restart_redis();
            load.wait_answers(20).await;
        },
    )
    .await;
    let report = drill::judge(
        "default unit: Redis kill -9, restart",
        &stack,
        &PIPELINE,
        &samples,
        &outcomes,
        "fresh redis-server on the same port",
    )
    .await;
    report.holds(&[]);
    // Replies published while the gateway was re-subscribing are read from their keys then,
    // not at their callers' deadlines (8 s).
    let longest = report.longest_ms.unwrap_or_default();
    assert!(
        longest < 3000.0,
        "a caller waited {longest:.0} ms: {}",
        report.row()
    );
}
