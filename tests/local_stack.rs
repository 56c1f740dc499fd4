//! `sluice up`, the README's first command: it starts the broker, Redis, gateway and workers,
//! prints a curl line that answers correctly, and stops everything on SIGTERM.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `sluice up --models mlp` with the broker, Redis, gateway and first worker on these ports.
fn up_mlp((kp, rp, gp, wp): (u16, u16, u16, u16)) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.current_dir(root())
        .args(["--config", "examples/digits.toml", "up", "--models", "mlp"])
        .env("SLUICE__KAFKA__BROKERS", format!("127.0.0.1:{kp}"))
        .env("SLUICE__LOCAL__KAFKA_DIR", kafka_dir(kp))
        .env(
            "SLUICE__LOCAL__KAFKA_CONTROLLER",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("SLUICE__REDIS__URL", format!("redis://127.0.0.1:{rp}"))
        .env("SLUICE__GATEWAY__LISTEN", format!("127.0.0.1:{gp}"))
        .env("SLUICE__WORKER__METRICS_LISTEN", format!("127.0.0.1:{wp}"))
        .env("SLUICE__LOCAL__STATE_DIR", state_dir());
    c
}

/// A running `sluice up`, stopped (SIGTERM, then SIGKILL after 30 s) when dropped, so a test
/// that fails midway leaves no stack running.
struct Up(std::process::Child);

impl std::ops::Deref for Up {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Up {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(30);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `child`'s stdout, line by line, as it comes.
fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// A state folder of this test process's own (the stacks of tests running at once apart).
fn state_dir() -> std::path::PathBuf {
    root().join(format!("target/test-state/{}", std::process::id()))
}

/// The folder of the Kafka broker `up` starts on port `kp` (one per test).
fn kafka_dir(kp: u16) -> std::path::PathBuf {
    state_dir().join(format!("kafka-{kp}"))
}

#[test]
fn up_serves_the_example_and_stops_cleanly() {
    if services_available().is_none() {
        return;
    }
    let (kp, rp, gp, wp) = (free_port(), free_port(), free_port(), free_port());
    let mut up = up_mlp((kp, rp, gp, wp))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Up)
        .unwrap();
    // Read the banner until the curl line for mlp appears.
    let rx = stdout_lines(&mut up);
    let end = Instant::now() + Duration::from_secs(90);
    let curl_line = loop {
        let line = rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .expect("no curl line printed");
        if line.contains("curl") && line.contains("/v2/models/mlp/infer") {
            break line;
        }
    };
    let out = Command::new("sh")
        .current_dir(root())
        .args(["-c", curl_line.trim()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let want = samples().expected["mlp"]["label"][0].clone();
    assert_eq!(
        v["outputs"][0]["data"][0], want,
        "the printed curl gives the right digit"
    );

    Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "sluice up did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    // Everything it started is gone: nothing listens on the broker, Redis or gateway ports.
    for p in [kp, rp, gp] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "port {p} still open"
        );
    }
}

/// A running `sluice up`: the process, its ports (broker, Redis, gateway, worker), and its log
/// (in a temporary folder that lives as long as this).
struct LoggedUp(
    Up,
    (u16, u16, u16, u16),
    tempfile::TempDir,
    std::path::PathBuf,
);

/// `sluice up --models mlp` on free ports, logging to a file; `None` when the services are
/// missing.
fn spawn_up_logged() -> Option<LoggedUp> {
    services_available()?;
    let ports = (free_port(), free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("up.log");
    let up = up_mlp(ports)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Up)
        .unwrap();
    Some(LoggedUp(up, ports, dir, log))
}

/// SIGTERM to `sluice up`, then waits (at most 40 s) for it to stop.
async fn stop_up(up: &mut std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(40);
    while up.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "sluice up did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pid of the process whose command line holds every one of `parts`.
fn pid_with(parts: &[&str]) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if parts.iter().all(|p| cmdline.contains(p)) {
            return Some(pid);
        }
    }
    None
}

/// One answered call: when it was sent and when its answer came, both from the test's clock.
struct Answered {
    sent: Instant,
    done: Instant,
}

/// Closed-loop `mlp` callers through `gateway` until `stop`; every answer checked.
fn mlp_callers(
    gateway: &str,
    clients: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Answered>>> {
    let s = std::sync::Arc::new(samples());
    (0..clients)
        .map(|c| {
            let (s, stop) = (s.clone(), stop.clone());
            let url = format!("{gateway}/v2/models/mlp/infer");
            tokio::spawn(async move {
                let client = http();
                let mut answers = Vec::new();
                let mut i = c;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let k = i % s.scaled.len();
                    let body = serde_json::json!({"parameters": {"timeout": 30_000_000}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[k]}]});
                    let sent = Instant::now();
                    let r = post(&client, &url, &[], body.to_string()).await;
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    assert_eq!(r.json()["outputs"][0]["data"][0], s.expected["mlp"]["label"][k]);
                    answers.push(Answered { sent, done: Instant::now() });
                    i += clients;
                }
                answers
            })
        })
        .collect()
}

/// A worker killed (-9) under load from 8 clients is restarted by `up` under the same
/// instance name (a static group member), so it takes its partitions back at once instead of
/// waiting out the session timeout: the first request sent after the kill is answered within
/// 1 s of it, and every request is answered, correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_restarts_a_worker_killed_under_load() {
    let Some(LoggedUp(mut up, (_, _, gp, wp), _dir, log)) = spawn_up_logged() else {
        return;
    };
    let gateway = format!("http://127.0.0.1:{gp}");
    let end = Instant::now() + Duration::from_secs(90);
    let worker_addr = format!("127.0.0.1:{wp}");
    let first = loop {
        if blocking_get_status(&format!("http://{worker_addr}/health/ready")) == Ok(200) {
            break pid_with(&["worker", "--unit", "all", &worker_addr]).expect("the worker's pid");
        }
        assert!(Instant::now() < end, "the stack did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = mlp_callers(&gateway, 8, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    // A new worker process takes its place.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = pid_with(&["worker", "--unit", "all", &worker_addr])
            && pid != first
        {
            break;
        }
        assert!(Instant::now() < end, "the worker was not restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    for t in load {
        answers.extend(t.await.unwrap());
    }
    let after: Vec<&Answered> = answers.iter().filter(|a| a.sent > killed).collect();
    let recovered = after
        .iter()
        .map(|a| a.done - killed)
        .min()
        .expect("answers after the kill");
    let longest = answers.iter().map(|a| a.done - a.sent).max().unwrap();
    println!(
        "answered {} ({} sent after the kill); first answer to a request sent after the kill {recovered:?} after it; longest wait {longest:?}",
        answers.len(),
        after.len()
    );
    assert!(after.len() > 100, "{}", after.len());
    assert!(
        recovered <= Duration::from_secs(1),
        "first answer {recovered:?} after the kill"
    );
    assert!(up.try_wait().unwrap().is_none(), "the stack kept running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("restarted"), "{text}");
    stop_up(&mut up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_restarts_a_broker_killed_and_serving_resumes() {
    let Some(LoggedUp(mut up, (kp, _, gp, wp), _dir, log)) = spawn_up_logged() else {
        return;
    };
    let gateway = format!("http://127.0.0.1:{gp}");
    let url = format!("{gateway}/v2/models/mlp/infer");
    let s = samples();
    let client = http();
    let body = |k: usize| {
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[k]}]})
            .to_string()
    };
    let broker_dir = kafka_dir(kp).display().to_string();
    let end = Instant::now() + Duration::from_secs(90);
    // Ready means the worker has joined and the gateway sees the broker (its check runs every
    // second, so right after start it may still report the broker unreachable).
    let first = loop {
        if blocking_get_status(&format!("http://127.0.0.1:{wp}/health/ready")) == Ok(200)
            && blocking_get_status(&format!("{gateway}/v2/health/ready")) == Ok(200)
            && let Some(pid) = pid_with(&["kafka.Kafka", &broker_dir])
        {
            break pid;
        }
        assert!(Instant::now() < end, "the stack did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let r = post(&client, &url, &[], body(0)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    // A new broker takes its place, the topics are created again, and mlp answers again.
    let end = Instant::now() + Duration::from_secs(90);
    let mut k = 1;
    loop {
        // The gateway may be restarting too (connection refused): only the outcome counts.
        let r = try_post(&client, &url, body(k)).await;
        if let Some(r) = r.as_ref().filter(|r| r.status == 200) {
            assert_eq!(
                r.json()["outputs"][0]["data"][0],
                s.expected["mlp"]["label"][k]
            );
            break;
        }
        assert!(
            Instant::now() < end,
            "serving did not resume after the broker restart: {:?}\n{}",
            r.map(|r| (r.status, String::from_utf8_lossy(&r.body).to_string())),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        k = (k + 1) % s.scaled.len();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let second = pid_with(&["kafka.Kafka", &broker_dir]).expect("a broker runs");
    assert_ne!(second, first, "the broker was restarted");
    assert!(up.try_wait().unwrap().is_none(), "the stack kept running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("topics applied after the broker restart"),
        "{text}"
    );
    stop_up(&mut up).await;
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
            after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// Whether `pid` runs (not a zombie) with the same command line as when it was seen.
fn still_running(pid: u32, cmdline: &[u8]) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rfind(')')
        .is_some_and(|i| stat[i + 2..].starts_with('Z'));
    !zombie
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .as_deref()
            == Some(cmdline)
}

/// Watches `up`'s children until it exits (or `within` passes): returns its exit status and
/// every child seen, with its command line.
fn watch_children(
    up: &mut std::process::Child,
    within: Duration,
    mut on_tick: impl FnMut(usize),
) -> (Option<std::process::ExitStatus>, Vec<(u32, Vec<u8>)>) {
    let mut seen: Vec<(u32, Vec<u8>)> = Vec::new();
    let end = Instant::now() + within;
    while Instant::now() < end {
        for pid in children_of(up.id()) {
            if !seen.iter().any(|(p, _)| *p == pid)
                && let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            {
                seen.push((pid, cmd));
            }
        }
        if let Some(status) = up.try_wait().unwrap() {
            return (Some(status), seen);
        }
        on_tick(seen.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    (None, seen)
}

/// No process `up` started is left running.
fn assert_no_orphans(seen: &[(u32, Vec<u8>)]) {
    // The children were told to stop; give the kernel a moment to reap what was killed.
    std::thread::sleep(Duration::from_millis(300));
    let left: Vec<String> = seen
        .iter()
        .filter(|(pid, cmd)| still_running(*pid, cmd))
        .map(|(pid, cmd)| format!("{pid}: {}", String::from_utf8_lossy(cmd).replace('\0', " ")))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

fn sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

/// A worker whose ops port stays taken exits at every start; `up` retries it with backoff, and
/// when the stack is not ready within `local.start_timeout` it stops everything and exits
/// non-zero with the worker's last lines.
#[test]
fn up_with_a_port_taken_stops_everything_and_says_why() {
    if services_available().is_none() {
        return;
    }
    let ports = (free_port(), free_port(), free_port(), free_port());
    let taken = std::net::TcpListener::bind(("127.0.0.1", ports.3)).unwrap();
    let started = Instant::now();
    let mut up = up_mlp(ports)
        .env("SLUICE__LOCAL__START_TIMEOUT", "10s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Up)
        .unwrap();
    let stderr = up.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let (status, seen) = watch_children(&mut up, Duration::from_secs(60), |_| {});
    let status = status.expect("sluice up did not give up");
    let log = reader.join().unwrap();
    assert!(!status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "took {:?}",
        started.elapsed()
    );
    assert!(log.contains("did not come up within"), "{log}");
    assert!(
        log.contains("Address already in use"),
        "the worker's own error: {log}"
    );
    assert!(log.contains("restart"), "retried before giving up: {log}");
    assert!(seen.len() >= 4, "broker, Redis, gateway, worker: {seen:?}");
    assert_no_orphans(&seen);
    drop(taken);
}

/// A port taken only for the first seconds: the worker that failed on it is restarted and the
/// stack comes up; then SIGTERM while requests are in flight stops it within the bound
/// (gateway.drain_timeout, then worker.drain_timeout), every request answered 200 or 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_retries_a_failed_start_and_stops_under_load_within_its_bound() {
    if services_available().is_none() {
        return;
    }
    let (_, _, gp, wp) = (free_port(), free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("up.log");
    // The worker's port is held when `up` starts, and freed once the worker has failed on it
    // (the broker's start comes first and takes seconds).
    let taken = std::net::TcpListener::bind(("127.0.0.1", wp)).unwrap();
    let watched = log.clone();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end
            && !std::fs::read_to_string(&watched)
                .unwrap_or_default()
                .contains("Address already in use")
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(taken);
    });
    let mut up = up_mlp((free_port(), free_port(), gp, wp))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Up)
        .unwrap();
    let ready = format!("http://127.0.0.1:{wp}/health/ready");
    let end = Instant::now() + Duration::from_secs(90);
    while blocking_get_status(&ready) != Ok(200) {
        assert!(
            Instant::now() < end,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("Address already in use") && text.contains("restarting"),
        "{text}"
    );

    // Load: 8 callers in a loop until the gateway stops taking connections.
    let client = http();
    let base = format!("http://127.0.0.1:{gp}");
    let row = samples().scaled[0].clone();
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (client, base, row) = (client.clone(), base.clone(), row.clone());
        callers.push(tokio::spawn(async move {
            let url = format!("{base}/v2/models/mlp/infer");
            let mut statuses = Vec::new();
            while let Some(r) = try_post(&client, &url, infer_body(&[&row])).await {
                statuses.push(r.status);
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = up.id();
    let children: Vec<(u32, Vec<u8>)> = children_of(pid)
        .into_iter()
        .filter_map(|p| Some((p, std::fs::read(format!("/proc/{p}/cmdline")).ok()?)))
        .collect();
    let stopping = Instant::now();
    sigterm(pid);
    while up.try_wait().unwrap().is_none() {
        assert!(
            stopping.elapsed() < Duration::from_secs(40),
            "sluice up did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = stopping.elapsed();
    let mut statuses = Vec::new();
    for c in callers {
        statuses.extend(c.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let other: Vec<&u16> = statuses
        .iter()
        .filter(|s| **s != 200 && **s != 503)
        .collect();
    println!(
        "stopped in {took:?}; {ok} answered 200, {} 503",
        statuses.len() - ok - other.len()
    );
    assert!(ok > 0, "no request was answered");
    assert!(
        other.is_empty(),
        "statuses other than 200 and 503: {other:?}"
    );
    // The bound: gateway.drain_timeout (5 s) + worker.drain_timeout (20 s) + 2 s each; a
    // worker with nothing in flight leaves at once, so the stack stops well within it.
    assert!(took < Duration::from_secs(15), "stopping took {took:?}");
    assert!(up.wait().unwrap().success());
    assert_no_orphans(&children);
}

/// SIGTERM while the stack is still starting stops every process started so far.
#[test]
fn sigterm_during_start_up_leaves_no_process_behind() {
    let Some(LoggedUp(mut up, _, _dir, log)) = spawn_up_logged() else {
        return;
    };
    let mut signalled = false;
    let pid = up.id();
    // Once the broker, Redis and the gateway are started (the worker may not be ready yet).
    let (status, seen) = watch_children(&mut up, Duration::from_secs(60), |n| {
        if n >= 3 && !signalled {
            sigterm(pid);
            signalled = true;
        }
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(signalled, "fewer than 3 processes started: {text}");
    let status = status.unwrap_or_else(|| panic!("sluice up did not stop: {text}"));
    assert!(status.success(), "{status}: {text}");
    assert!(
        text.contains("signal during start-up"),
        "the signal came before the stack was up: {text}"
    );
    assert_no_orphans(&seen);
}

/// The front door: `sluice up` with the config `deploy/up.sh` serves (examples/stack.toml)
/// loads the fraud graph's data itself, and every call it prints works as printed: each
/// model's and graph's (digits pipelines and ensembles, fraud, sea, the bandits), an answer and
/// its feedback for each learning model, each learner's status, and `sluice status`.
#[test]
fn the_demo_stack_answers_every_call_it_prints() {
    if services_available().is_none() {
        return;
    }
    let (kp, rp, gp) = (free_port(), free_port(), free_port());
    let mut up = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(root())
        .args(["--config", "examples/stack.toml", "up"])
        .env("SLUICE__KAFKA__BROKERS", format!("127.0.0.1:{kp}"))
        .env("SLUICE__LOCAL__KAFKA_DIR", kafka_dir(kp))
        .env(
            "SLUICE__LOCAL__KAFKA_CONTROLLER",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("SLUICE__REDIS__URL", format!("redis://127.0.0.1:{rp}"))
        .env("SLUICE__GATEWAY__LISTEN", format!("127.0.0.1:{gp}"))
        .env("SLUICE__LOCAL__STATE_DIR", state_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Up)
        .unwrap();
    let rx = stdout_lines(&mut up);
    let end = Instant::now() + Duration::from_secs(180);
    let mut printed = Vec::new();
    loop {
        let line = rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .expect("the stack did not come up");
        if line.contains("Press Ctrl-C") {
            break;
        }
        printed.push(line);
    }
    let text = printed.join("\n");
    let run = |line: &str| {
        // -f: a 4xx or 5xx fails the command (the lines print `curl -s`).
        let cmd = line.trim().replace("curl -s ", "curl -sf ");
        let cmd = cmd.split("   # ").next().unwrap().to_string();
        // The printed commands read the config; this test's ports override it, as for `up`.
        let out = Command::new("sh")
            .current_dir(root())
            .args(["-c", &cmd])
            .env("SLUICE__KAFKA__BROKERS", format!("127.0.0.1:{kp}"))
            .env("SLUICE__LOCAL__KAFKA_DIR", kafka_dir(kp))
            .env(
                "SLUICE__LOCAL__KAFKA_CONTROLLER",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("SLUICE__REDIS__URL", format!("redis://127.0.0.1:{rp}"))
            .env("SLUICE__GATEWAY__LISTEN", format!("127.0.0.1:{gp}"))
            .env("SLUICE__LOCAL__STATE_DIR", state_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut infer = 0;
    for line in printed
        .iter()
        .filter(|l| l.contains("/infer -H") && l.trim().starts_with("curl"))
    {
        let v: serde_json::Value = serde_json::from_str(&run(line)).unwrap();
        assert!(
            v["outputs"].as_array().is_some_and(|o| !o.is_empty()),
            "{line}: {v}"
        );
        if line.contains("/models/fraud/") {
            let decision = v["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == "decision");
            assert_eq!(decision.unwrap()["shape"], serde_json::json!([2]), "{v}");
        }
        infer += 1;
    }
    for must in [
        "digits-pipeline",
        "digits-ensemble",
        "fraud",
        "sea",
        "digits-bandit",
    ] {
        assert!(
            text.contains(&format!("/v2/models/{must}/infer")),
            "no call for {must}: {text}"
        );
    }
    let feedback: Vec<&String> = printed
        .iter()
        .filter(|l| l.trim().starts_with("id=$("))
        .collect();
    assert_eq!(
        feedback.len(),
        5,
        "sea, sea-frozen and three bandits: {text}"
    );
    for line in feedback {
        run(line);
    }
    for line in printed
        .iter()
        .filter(|l| l.contains(" learn --model ") || l.contains(" status "))
    {
        run(line);
    }
    // The seed data is there: the merchant table, and a known user's Feast features in Redis.
    let got = run(&format!(
        "{} --config examples/stack.toml features get --step fraud.user_features u00932",
        env!("CARGO_BIN_EXE_sluice")
    ));
    let merchants =
        run("psql -h 127.0.0.1 -U postgres -tAc 'select count(*) from fraud_merchants'");
    assert_eq!(merchants.trim(), "200");
    assert!(got.contains("\"found\":true"), "{got}");
    println!("{infer} infer calls answered as printed");
    // The README's calls, as written, against this stack (its ports put in).
    let readme = readme_calls();
    assert!(readme.len() >= 12, "README calls found: {readme:?}");
    for line in &readme {
        let line = line
            .replace("localhost:8000", &format!("127.0.0.1:{gp}"))
            .replace("127.0.0.1:9092", &format!("127.0.0.1:{kp}"))
            .replace("target/release/sluice", env!("CARGO_BIN_EXE_sluice"));
        let out = run(&line);
        if line.contains("/infer") && !line.contains("feedback") {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert!(
                v["outputs"].as_array().is_some_and(|o| !o.is_empty()),
                "{line}: {v}"
            );
        }
    }
    println!("{} README calls run as written", readme.len());
    sigterm(up.id());
    let (status, _) = watch_children(&mut up, Duration::from_secs(60), |_| {});
    assert!(status.unwrap().success());
}

/// The commands in the README's `sh` blocks that call a running stack (curl, kcat, `sluice`
/// subcommands), one per line; the set-up commands (`deploy/…`) are left to CI itself.
fn readme_calls() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut calls = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        let call = line.trim();
        let calls_stack = ["curl ", "kcat ", "id=$(curl ", "target/release/sluice "]
            .iter()
            .any(|p| call.starts_with(p));
        if in_sh && calls_stack {
            calls.push(call.to_string());
        }
    }
    calls
}
