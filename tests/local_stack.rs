//! `sluice up`, the README's first command: it starts the broker, Redis, gateway and workers,
//! prints a curl line that answers correctly, and stops everything on SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn up_serves_the_example_and_stops_cleanly() {
    if services_available().is_none() {
        return;
    }
    let (kp, rp, gp, wp) = (free_port(), free_port(), free_port(), free_port());
    let mut up = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(root())
        .args(["--config", "examples/digits.toml", "up", "--models", "mlp"])
        .env("SLUICE__KAFKA__BROKERS", format!("127.0.0.1:{kp}"))
        .env("SLUICE__REDIS__URL", format!("redis://127.0.0.1:{rp}"))
        .env("SLUICE__GATEWAY__LISTEN", format!("127.0.0.1:{gp}"))
        .env("SLUICE__WORKER__METRICS_LISTEN", format!("127.0.0.1:{wp}"))
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
