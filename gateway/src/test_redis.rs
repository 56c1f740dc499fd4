//! A redis-server of its own for the gateway's unit tests.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

/// A redis-server of its own on a free port (None, and the test skips, where none is
/// installed outside CI; under `CI=true` a missing one fails).
pub(crate) struct Redis {
    child: std::process::Child,
    /// `redis://127.0.0.1:<port>`.
    pub(crate) url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn redis() -> Option<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let mut cmd = sluice_common::local::redis_command(port);
    cmd.stdout(std::process::Stdio::null());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("redis-server missing under CI=true: {e}")
        }
        Err(_) => return None,
    };
    let url = format!("redis://127.0.0.1:{port}");
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(Redis { child, url })
}
