//! The processes `sluice up` starts: each launched with its log lines passed through (and the
//! last few kept, to explain a failed start), restarted with backoff when it exits, told its
//! ops address through a file, and stopped in tiers (gateway, then workers and learners, then
//! Redis and the broker) so that requests in flight are answered before their workers go.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

/// Restarts within this window count towards a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// Restarts within [`CRASH_WINDOW`] that make a crash loop (reported; restarts go on).
const CRASH_LOOP: usize = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Log lines kept per process to explain a start that failed.
const TAIL_LINES: usize = 15;

/// What a process is to the stack: the order it is stopped in follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The Kafka broker.
    Broker,
    /// Redis.
    Redis,
    /// The HTTP gateway.
    Gateway,
    /// A worker.
    Worker,
    /// A learner.
    Learner,
}

/// How to start a process again.
#[derive(Clone)]
pub struct Spec {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub envs: Vec<(String, String)>,
}

impl Spec {
    /// The program, arguments and environment of `c`.
    pub fn of(c: &std::process::Command) -> Spec {
        let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
        Spec {
            program: PathBuf::from(c.get_program()),
            args: c.get_args().map(text).collect(),
            envs: c
                .get_envs()
                .filter_map(|(k, v)| Some((text(k), text(v?))))
                .collect(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c.envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }
}

/// The last lines a process wrote to stderr.
type Tail = Arc<Mutex<VecDeque<String>>>;

/// A process `up` started.
pub struct Started {
    /// Its name in logs.
    pub name: String,
    /// What it is.
    pub role: Role,
    child: Child,
    spec: Spec,
    /// Where it writes its ops address (workers and learners).
    pub addr_file: Option<PathBuf>,
    tail: Tail,
    /// When it was (re)started, and the restarts within [`CRASH_WINDOW`].
    started: Instant,
    restarts: Vec<Instant>,
}

impl Started {
    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its ops address as it wrote it (`None` before it bound one).
    pub fn ops_addr(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.addr_file.as_ref()?).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    }

    /// Its last log lines, for an error report.
    pub fn last_lines(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Restarts within [`CRASH_WINDOW`].
    pub fn restarts(&self) -> usize {
        self.restarts.len()
    }
}

/// Every process `up` started.
#[derive(Default)]
pub struct Stack {
    /// The processes, in start order.
    pub processes: Vec<Started>,
}

impl Stack {
    /// Starts a process that is restarted whenever it exits.
    pub fn spawn(
        &mut self,
        name: &str,
        role: Role,
        spec: Spec,
        addr_file: Option<PathBuf>,
    ) -> anyhow::Result<()> {
        let tail = Tail::default();
        let child = launch(name, &spec, addr_file.as_deref(), &tail)?;
        self.processes.push(Started {
            name: name.to_string(),
            role,
            child,
            spec,
            addr_file,
            tail,
            started: Instant::now(),
            restarts: Vec::new(),
        });
        Ok(())
    }

    /// Resolves when any started process exits; returns its index and exit status.
    pub async fn next_exit(&mut self) -> (usize, String) {
        loop {
            for (i, p) in self.processes.iter_mut().enumerate() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    return (i, status.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Restarts process `i` after a backoff that grows with its recent restarts.
    pub async fn restart(&mut self, i: usize, status: &str) -> anyhow::Result<()> {
        let p = &mut self.processes[i];
        let now = Instant::now();
        p.restarts.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        let recent = u32::try_from(p.restarts.len()).unwrap_or(u32::MAX);
        let backoff = (Duration::from_millis(100) * 2u32.saturating_pow(recent)).min(MAX_BACKOFF);
        let ran = now.duration_since(p.started);
        if p.restarts.len() >= CRASH_LOOP {
            tracing::error!(process = %p.name, %status, restarts = p.restarts.len(), window = ?CRASH_WINDOW, "crash-looping; still restarting, every {backoff:?}");
        } else {
            tracing::warn!(process = %p.name, %status, ran = ?ran, "exited; restarting in {backoff:?}");
        }
        tokio::time::sleep(backoff).await;
        let p = &mut self.processes[i];
        p.child = launch(&p.name, &p.spec, p.addr_file.as_deref(), &p.tail)?;
        p.started = Instant::now();
        p.restarts.push(p.started);
        tracing::info!(process = %p.name, restarts = p.restarts.len(), "restarted");
        Ok(())
    }

    /// Stops everything in tiers: the gateway (it answers what is in flight, within `gateway`),
    /// then workers and learners together (each drains within `workers`), then Redis and the
    /// broker. A process still running when its tier's time is up is killed.
    pub async fn stop(&mut self, gateway: Duration, workers: Duration) {
        let tiers: [(&[Role], Duration); 3] = [
            (&[Role::Gateway], gateway),
            (&[Role::Worker, Role::Learner], workers),
            (&[Role::Redis, Role::Broker], Duration::from_secs(5)),
        ];
        for (roles, grace) in tiers {
            self.stop_tier(roles, grace).await;
        }
    }

    async fn stop_tier(&mut self, roles: &[Role], grace: Duration) {
        let (tier, rest): (Vec<Started>, Vec<Started>) = std::mem::take(&mut self.processes)
            .into_iter()
            .partition(|p| roles.contains(&p.role));
        self.processes = rest;
        for p in &tier {
            if let Some(pid) = p.pid() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for mut p in tier {
            match tokio::time::timeout_at(deadline, p.child.wait()).await {
                Ok(_) => tracing::info!(process = %p.name, "stopped"),
                Err(_) => {
                    tracing::warn!(process = %p.name, within = ?grace, "did not stop in time; killing");
                    let _ = p.child.kill().await;
                }
            }
        }
    }
}

fn launch(name: &str, spec: &Spec, addr_file: Option<&Path>, tail: &Tail) -> anyhow::Result<Child> {
    let mut cmd = spec.command();
    if let Some(file) = addr_file {
        // A stale address from the last run of this process is not its address now.
        let _ = std::fs::remove_file(file);
        cmd.env(sluice_common::ops::OPS_ADDR_FILE, file);
    }
    let mut child = cmd
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(pass_through(stderr, Arc::clone(tail)));
    }
    tracing::info!(process = name, pid = child.id(), "started");
    Ok(child)
}

/// Copies a process's stderr to ours line by line, keeping the last [`TAIL_LINES`].
async fn pass_through(stderr: ChildStderr, tail: Tail) {
    let mut lines = BufReader::new(stderr).lines();
    let mut out = tokio::io::stderr();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = out.write_all(format!("{line}\n").as_bytes()).await;
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// Fails with `what` and the last lines of each process in `failing`.
pub fn start_failed(what: &str, failing: &[&Started]) -> anyhow::Result<()> {
    let mut report = what.to_string();
    for p in failing {
        report.push_str(&format!(
            "\n--- {} ({} restarts); its last lines:\n{}",
            p.name,
            p.restarts(),
            p.last_lines()
        ));
    }
    bail!(report)
}
