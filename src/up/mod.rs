//! `sluice up`: the whole local stack in one command.
//!
//! Starts the broker and Redis when nothing answers at the configured addresses, creates the
//! topics, starts the gateway, the workers of each deployment unit and a learner per learning
//! model, waits until every one is ready, prints how to call it, passes SIGHUP on to the workers
//! (config reload), and restarts any process that exits (with backoff, during start-up too).
//! It starts completely or not at all: a stack not ready within `local.start_timeout` is stopped
//! and `up` exits non-zero with the failing processes' last lines. Ctrl-C or SIGTERM, at any
//! moment, stops everything it started (see [`Stack::stop`] for the order and the bound).
//!
//! Every port comes from the config; port 0 (the default for `worker.metrics_listen`) lets each
//! process pick a free one, which it writes to a file in `local.state_dir`. `up` writes the
//! stack's addresses to `<state_dir>/stack.json`, which `sluice status` reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sluice_common::{Config, Deployment, local};
use tokio::net::TcpStream;

use crate::supervise::{Role, Spec, Stack, Started, start_failed};

mod report;
mod units;

pub use report::{StackFile, status};
use report::{print_banner, write_stack_file};
pub use units::only_members;
use units::{WorkerProcess, worker_processes};

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

/// Runs the stack until Ctrl-C or SIGTERM (or a start that fails), then stops all of it.
pub async fn run(
    deployment: Deployment,
    config_path: Option<PathBuf>,
    only: Vec<String>,
    per_step: bool,
) -> anyhow::Result<()> {
    if let Some(unknown) = only.iter().find(|m| deployment.servable(m).is_none()) {
        bail!("--models: '{unknown}' is neither a model nor a graph in the config");
    }
    // Listening from the first moment: a signal during start-up stops what was started so far.
    let shutdown = sluice_common::ops::shutdown_signal();
    tokio::pin!(shutdown);
    let mut stack = Stack::default();
    let plan = Plan {
        workers: worker_processes(&deployment, &only, per_step)?,
        learners: deployment
            .learning()
            .into_iter()
            .filter(|name| only.is_empty() || only.contains(name))
            .collect(),
        config_path,
    };
    let started = tokio::select! {
        r = start(&deployment, &plan, &mut stack) => r.map(Some),
        () = &mut shutdown => {
            tracing::info!("stopping the stack (signal during start-up)");
            Ok(None)
        }
    };
    let result = match started {
        Ok(Some(running)) => {
            print_banner(&deployment, &running, &stack, plan.config_path.as_deref());
            serve(&mut stack, &running, &mut shutdown).await
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    let cfg = &deployment.config;
    stack
        .stop(
            cfg.gateway.drain_timeout + Duration::from_secs(2),
            cfg.worker.drain_timeout + Duration::from_secs(2),
        )
        .await;
    remove_state(cfg);
    result
}

/// What `up` starts besides the broker, Redis and the gateway.
struct Plan {
    workers: Vec<WorkerProcess>,
    learners: Vec<String>,
    config_path: Option<PathBuf>,
}

/// A started stack: what serving it needs.
struct Running {
    gateway: String,
    /// The config, to apply the topics again after a broker restart.
    config: Config,
    topics: Vec<sluice_common::kafka::TopicSpec>,
    broker: String,
}

/// Starts the broker and Redis (when none answers), the topics, the gateway, workers and
/// learners, and waits until all are ready.
async fn start(deployment: &Deployment, plan: &Plan, stack: &mut Stack) -> anyhow::Result<Running> {
    let cfg = &deployment.config;
    let (state, run_dir) = state_dir(cfg)?;
    let broker = start_broker(cfg, stack).await?;
    start_redis(cfg, stack).await?;
    crate::seed::load_all(deployment).await?;
    let topics = deployment.required_topics();
    apply_topics(cfg, &topics).await?;

    let exe = std::env::current_exe().context("locating the sluice binary")?;
    let component = |args: &[String]| component_spec(&exe, plan.config_path.as_deref(), args);
    let addr_file =
        |name: &str| Some(run_dir.join(format!("{}.addr", name.replace([' ', '#', '/'], "_"))));
    stack.spawn(
        "gateway",
        Role::Gateway,
        component(&["gateway".into()]),
        addr_file("gateway"),
    )?;
    let base = cfg.worker.metrics_listen;
    let mut port = base.port();
    let mut next_addr = || {
        let addr = SocketAddr::new(base.ip(), port);
        // An explicit port gives consecutive ports; port 0 lets each process pick its own.
        if port != 0 {
            port += 1;
        }
        addr.to_string()
    };
    for w in &plan.workers {
        for i in 0..w.count {
            let mut args = vec!["worker".to_string()];
            args.extend(w.args.iter().cloned());
            args.extend(["--metrics-listen".to_string(), next_addr()]);
            // A stable slot name: the restarted process takes its partitions back at once.
            args.extend(["--instance".to_string(), i.to_string()]);
            let name = format!("worker {}#{i}", w.name);
            stack.spawn(&name, Role::Worker, component(&args), addr_file(&name))?;
        }
    }
    // One learner per learning model (a single writer of its weights).
    for model in &plan.learners {
        let args = [
            "learn".to_string(),
            "--model".into(),
            model.clone(),
            "--metrics-listen".into(),
            next_addr(),
        ];
        let name = format!("learner {model}");
        stack.spawn(&name, Role::Learner, component(&args), addr_file(&name))?;
    }
    wait_all_ready(stack, cfg.local.start_timeout).await?;
    let gateway = stack
        .processes
        .iter()
        .find(|p| p.role == Role::Gateway)
        .and_then(Started::ops_addr)
        .unwrap_or_else(|| cfg.gateway.listen.to_string());
    let running = Running {
        gateway,
        config: cfg.clone(),
        topics,
        broker,
    };
    write_stack_file(&state, &running, stack)?;
    Ok(running)
}

/// `local.state_dir`, created; and this run's own folder in it (`up-<pid>`) for the processes'
/// address files, so that two stacks started from one folder do not read each other's.
fn state_dir(cfg: &Config) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = std::path::absolute(&cfg.local.state_dir)
        .with_context(|| format!("local.state_dir {}", cfg.local.state_dir.display()))?;
    let run = dir.join(format!("up-{}", std::process::id()));
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    Ok((dir, run))
}

/// Removes this run's folder, and `stack.json` when it is this run's.
fn remove_state(cfg: &Config) {
    let Ok((dir, run)) = state_dir(cfg) else {
        return;
    };
    let _ = std::fs::remove_dir_all(run);
    let path = dir.join("stack.json");
    let mine = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<StackFile>(&t).ok())
        .is_some_and(|f| f.pid == std::process::id());
    if mine {
        let _ = std::fs::remove_file(path);
    }
}

/// The broker at `kafka.brokers`: the one running there, or a single-node Apache Kafka started
/// there (its folder `local.kafka_dir`, formatted on first use). Returns its address.
async fn start_broker(cfg: &Config, stack: &mut Stack) -> anyhow::Result<String> {
    let broker = host_port(
        cfg.kafka.brokers.split(',').next().unwrap_or_default(),
        9092,
    );
    if reachable(&broker).await {
        tracing::info!(%broker, "using the broker already running");
        return Ok(broker);
    }
    let libs = local::kafka_libs().context(
        "no broker answers at kafka.brokers and Apache Kafka is not installed: run deploy/setup.sh, or point kafka.brokers at a running cluster",
    )?;
    let dir = std::path::absolute(&cfg.local.kafka_dir)
        .with_context(|| format!("local.kafka_dir {}", cfg.local.kafka_dir.display()))?;
    let node = local::KafkaNode {
        libs,
        dir,
        listen: broker.clone(),
        advertised: broker.clone(),
        controller: cfg.local.kafka_controller.clone(),
        heap: cfg.local.kafka_heap.clone(),
    };
    let prepared = node.clone();
    tokio::task::spawn_blocking(move || prepared.prepare())
        .await
        .context("preparing the Kafka broker")??;
    stack.spawn(BROKER, Role::Broker, Spec::of(&node.command()), None)?;
    wait_started(stack, &broker, BROKER, BROKER_START).await?;
    Ok(broker)
}

/// How long a Kafka broker `up` started may take to listen (a JVM; seconds on a busy machine).
const BROKER_START: Duration = Duration::from_secs(90);

/// Redis at `redis.url`: the one running there, or redis-server started there.
async fn start_redis(cfg: &Config, stack: &mut Stack) -> anyhow::Result<()> {
    let redis = host_port(&cfg.redis.url, cfg.local.redis_port);
    if reachable(&redis).await {
        tracing::info!(%redis, "using the Redis already running");
        return Ok(());
    }
    let port = redis
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(cfg.local.redis_port);
    stack.spawn(
        "redis-server",
        Role::Redis,
        Spec::of(&local::redis_command(port)),
        None,
    )?;
    wait_started(stack, &redis, "redis-server", Duration::from_secs(10)).await
}

/// Waits for the last process started to answer at `addr`; on failure, its last lines say why.
async fn wait_started(
    stack: &Stack,
    addr: &str,
    what: &str,
    within: Duration,
) -> anyhow::Result<()> {
    if let Err(e) = wait_reachable(addr, what, within).await {
        let last: Vec<&Started> = stack.processes.last().into_iter().collect();
        start_failed(&e.to_string(), &last)?;
    }
    Ok(())
}

async fn apply_topics(
    cfg: &Config,
    topics: &[sluice_common::kafka::TopicSpec],
) -> anyhow::Result<()> {
    let mut attempt = 0;
    let report = loop {
        match sluice_common::kafka::apply_topics(cfg, topics).await {
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
    Ok(())
}

/// How `up` runs one of its own components (`sluice gateway|worker|learn …`).
fn component_spec(exe: &Path, config_path: Option<&Path>, args: &[String]) -> Spec {
    let mut spec = Spec {
        program: exe.to_path_buf(),
        args: Vec::new(),
        envs: Vec::new(),
    };
    if let Some(p) = config_path {
        spec.args.push("--config".into());
        spec.args.push(p.display().to_string());
    }
    spec.args.extend(args.iter().cloned());
    spec
}

/// The readiness URL of a gateway, worker or learner, once it has written its address.
fn ready_url(p: &Started) -> Option<String> {
    Some(health_url(p.role, &p.ops_addr()?))
}

/// Where a process of `role` listening at `addr` says whether it is ready.
fn health_url(role: Role, addr: &str) -> String {
    match role {
        Role::Gateway => format!("http://{addr}/v2/health/ready"),
        _ => format!("http://{addr}/health/ready"),
    }
}

/// Waits until every gateway, worker and learner answers ready, restarting any that exits
/// meanwhile (with backoff). Past `within`, fails with the last lines of those not ready.
async fn wait_all_ready(stack: &mut Stack, within: Duration) -> anyhow::Result<()> {
    let client = crate::http::client(4);
    let deadline = tokio::time::Instant::now() + within;
    let mut waiting: Vec<usize> = (0..stack.processes.len())
        .filter(|&i| stack.processes[i].addr_file.is_some())
        .collect();
    loop {
        let mut still = Vec::with_capacity(waiting.len());
        for i in waiting {
            let ready = match ready_url(&stack.processes[i]) {
                Some(url) => matches!(crate::http::get_status(&client, &url).await, Ok(200)),
                None => false,
            };
            if !ready {
                still.push(i);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let failing: Vec<&Started> = waiting.iter().map(|&i| &stack.processes[i]).collect();
            start_failed(
                &format!(
                    "the stack did not come up within {within:?} (local.start_timeout); stopping it"
                ),
                &failing,
            )?;
        }
        tokio::select! {
            (i, status) = stack.next_exit() => stack.restart(i, &status).await?,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Serves until Ctrl-C or SIGTERM: passes SIGHUP on to the workers, restarts what exits.
async fn serve(
    stack: &mut Stack,
    running: &Running,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            () = shutdown.as_mut() => {
                tracing::info!("stopping the stack");
                return Ok(());
            }
            _ = hangup.recv() => {
                // Workers re-read the config's graphs (canary shares, shadows, routes).
                let workers: Vec<&Started> = stack.processes.iter().filter(|p| p.role == Role::Worker).collect();
                for p in &workers {
                    if let Some(pid) = p.pid() {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
                    }
                }
                tracing::info!(workers = workers.len(), "SIGHUP passed on to the workers");
            }
            (i, status) = stack.next_exit() => {
                stack.restart(i, &status).await?;
                if stack.processes[i].role == Role::Broker {
                    broker_restarted(&running.config, &running.topics, &running.broker).await;
                }
            }
        }
    }
}

/// The name `up` gives the Kafka broker it starts.
const BROKER: &str = "kafka";

/// After the broker `up` started was restarted (its log kept on disk): waits for it, and applies
/// the topics again in case its folder was removed meanwhile (a worker would otherwise wait for
/// them forever).
async fn broker_restarted(cfg: &Config, topics: &[sluice_common::kafka::TopicSpec], broker: &str) {
    if let Err(e) = wait_reachable(broker, BROKER, BROKER_START).await {
        tracing::error!(error = %e, "the restarted broker does not answer");
        return;
    }
    if let Err(e) = apply_topics(cfg, topics).await {
        tracing::error!(error = %e, "topics could not be applied after the broker restart");
    } else {
        tracing::info!("topics applied after the broker restart");
    }
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
