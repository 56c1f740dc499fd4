//! `sluice up`: the whole local stack in one command.
//!
//! Starts tansu and Redis when nothing answers at the configured addresses, creates the topics,
//! starts the gateway and `workers` workers per model and per built-in graph step, waits until
//! every part is ready, prints how to call it, passes SIGHUP on to the workers (config reload),
//! restarts a gateway or worker that exits (with backoff; a crash loop is reported, not fatal),
//! and on Ctrl-C (or SIGTERM) stops everything it started: workers and gateway first (SIGTERM, so
//! they drain), then Redis and the broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sluice_common::graph::Unit;
use sluice_common::{Config, Deployment, WorkerUnit, local};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// First port handed to worker ops servers (`/metrics`, health) when `worker.metrics_listen`
/// names none; workers get consecutive ports from there.
const WORKER_PORT_BASE: u16 = 9100;

/// How to start a process again (the gateway and workers are supervised).
#[derive(Clone)]
struct Spec {
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Spec {
    /// The program, arguments and environment of `c`.
    fn of(c: &std::process::Command) -> Spec {
        Spec {
            program: PathBuf::from(c.get_program()),
            args: c
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            envs: c
                .get_envs()
                .filter_map(|(k, v)| {
                    Some((
                        k.to_string_lossy().into_owned(),
                        v?.to_string_lossy().into_owned(),
                    ))
                })
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

/// Restarts within this window count towards a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// Restarts within [`CRASH_WINDOW`] that make a crash loop (reported; restarts go on).
const CRASH_LOOP: usize = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A process `up` started, stopped in reverse order of start.
struct Started {
    name: String,
    child: Child,
    /// Set for supervised processes: restarted when they exit.
    spec: Option<Spec>,
    /// When it was (re)started, and the restarts within [`CRASH_WINDOW`].
    started: Instant,
    restarts: Vec<Instant>,
}

#[derive(Default)]
struct Stack {
    processes: Vec<Started>,
}

impl Stack {
    /// Starts a process that is restarted whenever it exits.
    fn spawn_supervised(&mut self, name: &str, spec: Spec) -> anyhow::Result<()> {
        self.start(name, &mut spec.command(), Some(spec.clone()))
    }

    fn start(&mut self, name: &str, cmd: &mut Command, spec: Option<Spec>) -> anyhow::Result<()> {
        let child = launch(name, cmd)?;
        self.processes.push(Started {
            name: name.to_string(),
            child,
            spec,
            started: Instant::now(),
            restarts: Vec::new(),
        });
        Ok(())
    }

    /// Resolves when any started process exits; returns its index and exit status.
    async fn next_exit(&mut self) -> (usize, String) {
        loop {
            for (i, p) in self.processes.iter_mut().enumerate() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    return (i, status.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resolves when any started process exits; returns its name.
    async fn any_exit(&mut self) -> String {
        let (i, status) = self.next_exit().await;
        format!("{} ({status})", self.processes[i].name)
    }

    /// Restarts supervised process `i` after a backoff that grows with its recent restarts;
    /// an unsupervised one ends the stack.
    async fn restart(&mut self, i: usize, status: &str) -> anyhow::Result<()> {
        let p = &mut self.processes[i];
        let Some(spec) = p.spec.clone() else {
            bail!("{} ({status}) exited; stopping the stack", p.name);
        };
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
        p.child = launch(&p.name, &mut spec.command())?;
        p.started = Instant::now();
        p.restarts.push(p.started);
        tracing::info!(process = %p.name, restarts = p.restarts.len(), "restarted");
        Ok(())
    }

    /// SIGTERM each process (newest first), waiting up to `grace` for each before SIGKILL.
    async fn stop(&mut self, grace: Duration) {
        while let Some(mut p) = self.processes.pop() {
            if let Some(pid) = p.child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                match tokio::time::timeout(grace, p.child.wait()).await {
                    Ok(_) => tracing::info!(process = %p.name, "stopped"),
                    Err(_) => {
                        tracing::warn!(process = %p.name, "did not stop in time; killing");
                        let _ = p.child.kill().await;
                    }
                }
            }
        }
    }
}

fn launch(name: &str, cmd: &mut Command) -> anyhow::Result<Child> {
    let child = cmd
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    tracing::info!(process = name, pid = child.id(), "started");
    Ok(child)
}

fn host_port(url_or_addr: &str, default_port: u16) -> String {
    let s = url_or_addr
        .split("://")
        .last()
        .unwrap_or(url_or_addr)
        .rsplit('@')
        .next()
        .unwrap_or(url_or_addr);
    let s = s.split('/').next().unwrap_or(s);
    if s.contains(':') {
        s.to_string()
    } else {
        format!("{s}:{default_port}")
    }
}

async fn reachable(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

async fn wait_reachable(addr: &str, what: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !reachable(addr).await {
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not come up at {addr} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn wait_http_ready(
    client: &crate::http::HttpClient,
    url: &str,
    stack: &mut Stack,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(200) = crate::http::get_status(client, url).await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{url} not ready within {within:?}");
        }
        tokio::select! {
            exited = stack.any_exit() => bail!("{exited} exited during start-up"),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

pub async fn run(
    deployment: Deployment,
    config_path: Option<PathBuf>,
    only: Vec<String>,
    per_step: bool,
) -> anyhow::Result<()> {
    if let Some(unknown) = only.iter().find(|m| deployment.servable(m).is_none()) {
        bail!("--models: '{unknown}' is neither a model nor a graph in the config");
    }
    let mut stack = Stack::default();
    let workers = worker_processes(&deployment, &only, per_step)?;
    let learners: Vec<String> = deployment
        .learning()
        .into_iter()
        .filter(|name| only.is_empty() || only.contains(name))
        .collect();
    let result = start_and_wait(
        &deployment,
        config_path.as_deref(),
        (&workers, &learners),
        &mut stack,
    )
    .await;
    stack
        .stop(deployment.config.worker.drain_timeout + Duration::from_secs(5))
        .await;
    result
}

// Long on purpose: the stack's start-up in order (broker, Redis, topics, gateway, workers, banner,
// then serve); each step uses what the previous ones started.
async fn start_and_wait(
    deployment: &Deployment,
    config_path: Option<&Path>,
    (worker_specs, learners): (&[WorkerProcess], &[String]),
    stack: &mut Stack,
) -> anyhow::Result<()> {
    let cfg = &deployment.config;
    let exe = std::env::current_exe().context("locating the sluice binary")?;
    let broker = host_port(
        cfg.kafka.brokers.split(',').next().unwrap_or_default(),
        9092,
    );
    // The components learn that the broker is tansu (and needs its work-arounds) when `up`
    // starts it; a config or environment that says otherwise wins.
    let mut quirks = None;
    if reachable(&broker).await {
        tracing::info!(%broker, "using the broker already running");
    } else {
        quirks = Some("tansu");
        let storage = local::tansu_storage(&cfg.local.kafka_storage);
        stack.spawn_supervised(BROKER, Spec::of(&local::tansu_command(&broker, &storage)))?;
        wait_reachable(&broker, "tansu", Duration::from_secs(30)).await?;
    }
    let redis = host_port(&cfg.redis.url, cfg.local.redis_port);
    if reachable(&redis).await {
        tracing::info!(%redis, "using the Redis already running");
    } else {
        let port = redis
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(cfg.local.redis_port);
        stack.spawn_supervised("redis-server", Spec::of(&local::redis_command(port)))?;
        wait_reachable(&redis, "redis-server", Duration::from_secs(10)).await?;
    }

    let topics = deployment.required_topics();
    // Topics are created as the components will see the broker (tansu: with a retention bound).
    let mut topic_cfg = cfg.clone();
    if quirks.is_some() && std::env::var_os("SLUICE__KAFKA__BROKER_QUIRKS").is_none() {
        topic_cfg.kafka.broker_quirks = sluice_common::config::BrokerQuirks::Tansu;
    }
    let mut attempt = 0;
    let report = loop {
        match sluice_common::kafka::apply_topics(&topic_cfg, &topics).await {
            Ok(r) => break r,
            Err(e) if attempt < 10 => {
                attempt += 1;
                tracing::debug!(error = %e, "topics not applied yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(created = ?report.created, existing = ?report.existing, "topics applied");
    sluice_common::kafka::check_partitions(&report)?;

    let component = |args: &[String]| {
        let mut spec = Spec {
            program: exe.clone(),
            args: Vec::new(),
            envs: Vec::new(),
        };
        if let Some(p) = config_path {
            spec.args.push("--config".into());
            spec.args.push(p.display().to_string());
        }
        spec.args.extend(args.iter().cloned());
        if let Some(q) = quirks
            && std::env::var_os("SLUICE__KAFKA__BROKER_QUIRKS").is_none()
            && cfg.kafka.broker_quirks == sluice_common::config::BrokerQuirks::None
        {
            spec.envs
                .push(("SLUICE__KAFKA__BROKER_QUIRKS".into(), q.into()));
        }
        spec
    };
    let client = crate::http::client(4);
    let mut ready_urls = vec![format!("http://{}/v2/health/ready", cfg.gateway.listen)];
    stack.spawn_supervised("gateway", component(&["gateway".into()]))?;
    let base = cfg.worker.metrics_listen;
    let mut port = if base.port() == 0 {
        WORKER_PORT_BASE
    } else {
        base.port()
    };
    let mut workers = Vec::new();
    for w in worker_specs {
        for i in 0..w.count {
            let addr = SocketAddr::new(base.ip(), port);
            let mut args = vec!["worker".to_string()];
            args.extend(w.args.iter().cloned());
            args.extend(["--metrics-listen".to_string(), addr.to_string()]);
            stack.spawn_supervised(&format!("worker {}#{i}", w.name), component(&args))?;
            workers.push(stack.processes.len() - 1);
            ready_urls.push(format!("http://{addr}/health/ready"));
            port += 1;
        }
    }
    // One learner per learning model (a single writer of its weights).
    for name in learners {
        let addr = SocketAddr::new(base.ip(), port);
        let args = [
            "learn".to_string(),
            "--model".into(),
            name.clone(),
            "--metrics-listen".into(),
            addr.to_string(),
        ];
        stack.spawn_supervised(&format!("learner {name}"), component(&args))?;
        ready_urls.push(format!("http://{addr}/health/ready"));
        port += 1;
    }
    for url in &ready_urls {
        wait_http_ready(&client, url, stack, Duration::from_secs(90)).await?;
    }
    print_banner(deployment, config_path);

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sluice_common::ops::shutdown_signal() => {
                tracing::info!("stopping the stack");
                return Ok(());
            }
            _ = hangup.recv() => {
                // Workers re-read the config's graphs (canary shares, shadows, routes).
                for &i in &workers {
                    if let Some(pid) = stack.processes[i].child.id() {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
                    }
                }
                tracing::info!(workers = workers.len(), "SIGHUP passed on to the workers");
            }
            (i, status) = stack.next_exit() => {
                stack.restart(i, &status).await?;
                if stack.processes[i].name == BROKER {
                    broker_restarted(&topic_cfg, &topics, &broker).await;
                }
            }
        }
    }
}

/// The name `up` gives the tansu process it starts.
const BROKER: &str = "tansu";

/// After the broker `up` started was restarted: says what its storage kept, and creates the
/// topics again (memory storage lost them, and a worker would otherwise wait for them forever).
async fn broker_restarted(cfg: &Config, topics: &[sluice_common::kafka::TopicSpec], broker: &str) {
    if cfg.local.kafka_storage.starts_with("memory:") {
        tracing::warn!(
            "the broker restarted on memory storage: the records and committed offsets it held are gone (requests in flight get 504 at their deadline); sqlite:// storage keeps them"
        );
    }
    if let Err(e) = wait_reachable(broker, "tansu", Duration::from_secs(30)).await {
        tracing::error!(error = %e, "the restarted broker does not answer");
        return;
    }
    for attempt in 0..10 {
        match sluice_common::kafka::apply_topics(cfg, topics).await {
            Ok(r) => {
                tracing::info!(created = ?r.created, "topics applied after the broker restart");
                return;
            }
            Err(e) if attempt < 9 => {
                tracing::debug!(error = %e, "topics not applied yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "topics could not be applied after the broker restart")
            }
        }
    }
}

/// Worker processes of one kind that `up` starts: a name for logs, `sluice worker` arguments,
/// and how many.
struct WorkerProcess {
    name: String,
    args: Vec<String>,
    count: usize,
}

/// The worker processes to start: each deployment unit (only its members among `only`'s models
/// and graphs, when given), and a process per step pool that no unit serves; with `per_step`,
/// a process per step pool, each in a group of its own.
fn worker_processes(
    deployment: &Deployment,
    only: &[String],
    per_step: bool,
) -> anyhow::Result<Vec<WorkerProcess>> {
    let mut wanted: Vec<Unit> = Vec::new();
    for name in only {
        wanted.extend(deployment.pools_named(name).unwrap_or_default());
    }
    let selected = |u: &Unit| only.is_empty() || wanted.contains(u);
    let pool = |u: &Unit, count: usize| {
        let (flag, name) = match u {
            Unit::Model(m) => ("--model", m.clone()),
            Unit::Step { .. } => ("--step", u.to_string()),
        };
        WorkerProcess {
            name: u.to_string(),
            args: vec![flag.into(), name],
            count,
        }
    };
    if per_step {
        return Ok(deployment
            .units()
            .iter()
            .filter(|(u, _)| selected(u))
            .map(|(u, n)| pool(u, *n))
            .collect());
    }
    let mut out = Vec::new();
    for unit in deployment.worker_units() {
        let members: Vec<String> = unit
            .members
            .iter()
            .filter(|u| selected(u))
            .map(Unit::to_string)
            .collect();
        if members.is_empty() {
            continue;
        }
        let mut args = vec!["--unit".to_string(), unit.name.clone()];
        if members.len() < unit.members.len() {
            args.extend(["--only".to_string(), members.join(",")]);
        }
        out.push(WorkerProcess {
            name: unit.name.clone(),
            args,
            count: unit.workers,
        });
    }
    out.extend(
        deployment
            .pools_outside_units()
            .iter()
            .filter(|(u, _)| selected(u))
            .map(|(u, n)| pool(u, *n)),
    );
    Ok(out)
}

/// `unit` narrowed to the pools of `only` (models, graphs, graph steps); all of it when empty.
pub fn only_members(
    deployment: &Deployment,
    unit: &WorkerUnit,
    only: &[String],
) -> anyhow::Result<WorkerUnit> {
    if only.is_empty() {
        return Ok(unit.clone());
    }
    let mut wanted = Vec::new();
    for name in only {
        let Some(pools) = deployment.pools_named(name) else {
            bail!("--only: '{name}' is not a model, a graph or a graph's step");
        };
        wanted.extend(pools);
    }
    let members: Vec<Unit> = unit
        .members
        .iter()
        .filter(|u| wanted.contains(u))
        .cloned()
        .collect();
    if members.is_empty() {
        bail!("--only: unit '{}' serves none of {only:?}", unit.name);
    }
    Ok(WorkerUnit {
        members,
        ..unit.clone()
    })
}

#[allow(clippy::print_stdout)]
fn print_banner(deployment: &Deployment, config_path: Option<&Path>) {
    let cfg = &deployment.config;
    let gw = cfg.gateway.listen;
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
    for name in deployment.learning() {
        let given = if deployment.graph(&name).is_some() {
            "\"reward\": 1"
        } else {
            "\"truth\": 1"
        };
        println!(
            "  curl -s -X POST http://{gw}/v2/models/{name}/feedback -d '{{\"id\": \"<an answer's id>\", {given}}}'   # feedback; sluice learn --model {name} --status"
        );
    }
    println!(
        "  curl -s http://{gw}/v2/models/{}   # metadata",
        cfg.models
            .keys()
            .next()
            .map(String::as_str)
            .unwrap_or("MODEL")
    );
    println!("  curl -s http://{gw}/metrics\nPress Ctrl-C to stop.\n");
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_handles_urls_and_bare_addresses() {
        assert_eq!(
            host_port("redis://127.0.0.1:6380/0", 6379),
            "127.0.0.1:6380"
        );
        assert_eq!(host_port("redis://:pw@localhost", 6379), "localhost:6379");
        assert_eq!(host_port("127.0.0.1:9092", 9092), "127.0.0.1:9092");
        assert_eq!(host_port("kafka", 9092), "kafka:9092");
    }
}
