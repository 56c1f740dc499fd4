//! What `sluice up` tells its user: the banner with how to call the stack, the stack file it
//! writes, and `sluice status`, which reads that file back.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use sluice_common::{Config, Deployment};

use super::{Running, health_url};
use crate::supervise::{Role, Stack};

/// The stack's addresses as `up` writes them to `<state_dir>/stack.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StackFile {
    /// `up`'s own pid.
    pub pid: u32,
    /// The gateway's base URL.
    pub gateway: String,
    /// Every process `up` started.
    pub processes: Vec<StackProcess>,
}

/// One process in [`StackFile`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StackProcess {
    /// Its name in logs.
    pub name: String,
    /// What it is.
    pub role: Role,
    /// Its pid when the file was written.
    pub pid: Option<u32>,
    /// Its ops address (`/metrics`, `/health/ready`), for workers and learners; the gateway's
    /// listen address for the gateway.
    pub addr: Option<String>,
}

pub(super) fn write_stack_file(
    state: &Path,
    running: &Running,
    stack: &Stack,
) -> anyhow::Result<()> {
    let file = StackFile {
        pid: std::process::id(),
        gateway: format!("http://{}", running.gateway),
        processes: stack
            .processes
            .iter()
            .map(|p| StackProcess {
                name: p.name.clone(),
                role: p.role,
                pid: p.pid(),
                addr: p.ops_addr(),
            })
            .collect(),
    };
    let path = state.join("stack.json");
    let text = serde_json::to_string_pretty(&file)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// `sluice status`: the stack `up` runs, from `<state_dir>/stack.json`, with each process's
/// readiness now.
#[allow(clippy::print_stdout)]
pub async fn status(cfg: &Config) -> anyhow::Result<()> {
    let path = cfg.local.state_dir.join("stack.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is `sluice up` running here?)", path.display()))?;
    let file: StackFile = serde_json::from_str(&text)?;
    let alive = |pid: u32| kill(Pid::from_raw(pid as i32), None).is_ok();
    if !alive(file.pid) {
        bail!(
            "`sluice up` (pid {}) is not running; {} is left from it",
            file.pid,
            path.display()
        );
    }
    let client = crate::http::client(2);
    println!("gateway {}", file.gateway);
    for p in &file.processes {
        let ready = match &p.addr {
            Some(addr) => crate::http::get_status(&client, &health_url(p.role, addr))
                .await
                .ok(),
            None => None,
        };
        let state = match ready {
            Some(200) => "ready".to_string(),
            Some(code) => format!("not ready ({code})"),
            None if p.addr.is_none() => "running".to_string(),
            None => "not answering".to_string(),
        };
        println!(
            "{:<28} pid {:<8} {:<22} {state}",
            p.name,
            p.pid.map_or("-".into(), |x| x.to_string()),
            p.addr.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
pub(super) fn print_banner(
    deployment: &Deployment,
    running: &Running,
    stack: &Stack,
    config_path: Option<&Path>,
) {
    let cfg = &deployment.config;
    let gw = &running.gateway;
    let requests = config_path
        .and_then(Path::parent)
        .map(|d| d.join("requests"))
        .unwrap_or_else(|| PathBuf::from("examples/requests"));
    println!(
        "\nSluice is up: gateway http://{gw}, models: {}; graphs: {}",
        cfg.models.keys().cloned().collect::<Vec<_>>().join(", "),
        cfg.graphs.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    for name in cfg.models.keys().chain(cfg.graphs.keys()) {
        let file = requests.join(format!("{name}.json"));
        if file.is_file() {
            println!(
                "  curl -s -X POST http://{gw}/v2/models/{name}/infer -H 'Content-Type: application/json' -d @{}",
                file.display()
            );
        }
    }
    let me = sluice_command(config_path);
    for name in deployment.learning() {
        let given = if deployment.graph(&name).is_some() {
            r#"\"reward\": 1"#
        } else {
            r#"\"truth\": 1"#
        };
        let file = requests.join(format!("{name}.json"));
        println!(
            r#"  id=$(curl -s -X POST http://{gw}/v2/models/{name}/infer -H 'Content-Type: application/json' -d @{} | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') && curl -s -X POST http://{gw}/v2/models/{name}/feedback -d "{{\"id\": \"$id\", {given}}}"   # an answer, then its feedback"#,
            file.display()
        );
        println!("  {me} learn --model {name} --status   # what {name}'s learner learned");
    }
    println!(
        "  curl -s http://{gw}/v2/models/{}   # metadata",
        cfg.models
            .keys()
            .next()
            .map(String::as_str)
            .unwrap_or("MODEL")
    );
    println!("  curl -s http://{gw}/metrics");
    for p in stack.processes.iter().filter(|p| p.role != Role::Gateway) {
        if let Some(addr) = p.ops_addr() {
            println!("  {}: http://{addr}/metrics, /health/ready", p.name);
        }
    }
    println!(
        "  {me} status   # every process, its address and readiness ({})\nPress Ctrl-C to stop.\n",
        cfg.local.state_dir.join("stack.json").display()
    );
}

/// How to run this `sluice` with this config from the current folder (for printed commands).
pub(super) fn sluice_command(config_path: Option<&Path>) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("sluice"));
    let cwd = std::env::current_dir().unwrap_or_default();
    let exe = exe
        .strip_prefix(&cwd)
        .map_or(exe.clone(), Path::to_path_buf);
    match config_path {
        Some(c) => format!("{} --config {}", exe.display(), c.display()),
        None => exe.display().to_string(),
    }
}
