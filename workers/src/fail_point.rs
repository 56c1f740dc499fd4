//! Fail points for fault drills: with the `fail-points` feature (test builds only),
//! `SLUICE_FAIL_POINT=<point>:<n>` kills the worker outright (SIGKILL: no drain, no flush, no
//! commit) the n-th time it passes `point`. The points bracket a record's delivery:
//! `before_produce` (results not yet produced), `after_produce` (results acknowledged, offset
//! not yet stored), `after_commit` (an offset commit acknowledged by the broker); `mid_chain`
//! is a graph half done in one unit (its first steps ran, the next in-process hops have not,
//! nothing produced). Passes are
//! counted only for deliveries that produce a result, and from the first of those on (a worker
//! also completes bare records, such as the gateway's wake-ups). Without the feature, passing a
//! point costs nothing.

#[cfg(feature = "fail-points")]
static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks that the worker has produced a result: fail points count from now on.
#[cfg(feature = "fail-points")]
pub(crate) fn serving() {
    SERVING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Marks that the worker has produced a result (fail points are compiled out).
#[cfg(not(feature = "fail-points"))]
#[inline(always)]
pub(crate) fn serving() {}

/// Marks that the worker reached `point`.
#[cfg(feature = "fail-points")]
pub(crate) fn pass(point: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("SLUICE_FAIL_POINT").ok()?;
        let (name, n) = spec.split_once(':')?;
        Some((name.to_string(), n.parse().ok()?))
    });
    let Some((name, n)) = armed else {
        return;
    };
    if !SERVING.load(Ordering::SeqCst) {
        return;
    }
    if name == point && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        tracing::error!(point, "fail point reached: killing the worker");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::process::abort();
    }
}

/// Marks that the worker reached `point` (fail points are compiled out).
#[cfg(not(feature = "fail-points"))]
#[inline(always)]
pub(crate) fn pass(_point: &str) {}

/// With the `fail-points` feature, `SLUICE_FAIL_STALL=<n>:<seconds>` makes the n-th batch
/// (counted once the worker has produced a result) wait `seconds` before it runs: a step that
/// hangs, while records keep arriving.
#[cfg(feature = "fail-points")]
pub(crate) async fn stall() {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static ARMED: OnceLock<Option<(u64, u64)>> = OnceLock::new();
    static BATCHES: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("SLUICE_FAIL_STALL").ok()?;
        let (n, secs) = spec.split_once(':')?;
        Some((n.parse().ok()?, secs.parse().ok()?))
    });
    let Some((n, secs)) = *armed else {
        return;
    };
    if SERVING.load(Ordering::SeqCst) && BATCHES.fetch_add(1, Ordering::SeqCst) + 1 == n {
        tracing::error!(seconds = secs, "fail point reached: stalling a batch");
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        tracing::info!("stalled batch resumes");
    }
}

/// A batch about to run (fail points are compiled out).
#[cfg(not(feature = "fail-points"))]
#[inline(always)]
pub(crate) async fn stall() {}
