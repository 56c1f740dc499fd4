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
        .env("SLUICE__REDIS__URL", format!("redis://127.0.0.1:{rp}"))
        .env("SLUICE__GATEWAY__LISTEN", format!("127.0.0.1:{gp}"))
        .env("SLUICE__WORKER__METRICS_LISTEN", format!("127.0.0.1:{wp}"));
    c
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
        .unwrap();
    // Read the banner until the curl line for mlp appears.
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
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
    std::process::Child,
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

    // Closed-loop load from 8 clients; every answer checked.
    let s = std::sync::Arc::new(samples());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|c| {
            let (s, stop, gateway) = (s.clone(), stop.clone(), gateway.clone());
            tokio::spawn(async move {
                let client = http();
                let (mut answered, mut longest, mut last) = (0usize, Duration::ZERO, Instant::now());
                let mut i = c;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let k = i % s.scaled.len();
                    let body = serde_json::json!({"parameters": {"timeout": 30_000_000}, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.scaled[k]}]});
                    let url = format!("{gateway}/v2/models/mlp/infer");
                    let r = post(&client, &url, &[], body.to_string()).await;
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    assert_eq!(r.json()["outputs"][0]["data"][0], s.expected["mlp"]["label"][k]);
                    answered += 1;
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                    i += 8;
                }
                (answered, longest)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Serving goes on: requests keep being answered after the restart.
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut answered, mut longest) = (0, Duration::ZERO);
    for t in load {
        let (n, l) = t.await.unwrap();
        answered += n;
        longest = longest.max(l);
    }
    println!("answered {answered}; longest wait for an answer {longest:?}");
    assert!(answered > 100, "{answered}");
    // The dead member's partition moves once the group notices (session.timeout.ms = 6 s).
    assert!(
        longest < Duration::from_secs(15),
        "serving stopped for {longest:?}"
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
    let broker = format!("127.0.0.1:{kp}");
    let end = Instant::now() + Duration::from_secs(90);
    // Ready means the worker has joined and the gateway sees the broker (its check runs every
    // second, so right after start it may still report the broker unreachable).
    let first = loop {
        if blocking_get_status(&format!("http://127.0.0.1:{wp}/health/ready")) == Ok(200)
            && blocking_get_status(&format!("{gateway}/v2/health/ready")) == Ok(200)
            && let Some(pid) = pid_with(&["tansu", "broker", &broker])
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
    let second = pid_with(&["tansu", "broker", &broker]).expect("a broker runs");
    assert_ne!(second, first, "the broker was restarted");
    assert!(up.try_wait().unwrap().is_none(), "the stack kept running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("topics applied after the broker restart"),
        "{text}"
    );
    stop_up(&mut up).await;
}
