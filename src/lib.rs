//! `sluice`: the command line of the Sluice serving system, as a library so that a binary with
//! user steps (`sluice_workers::step::registry`) can run it: register, then call [`main`].
//!
//! - `sluice up` runs the local stack (broker, Redis, gateway, one worker per model);
//!   `sluice status` shows it.
//! - `sluice gateway` / `sluice worker --model M` / `sluice worker --step G.S` run one component.
//! - `sluice topics apply` creates the topics a config needs.
//! - `sluice bench` measures HTTP load, in-process compute and the broker's transport floor.
//! - `sluice features load|get` writes and shows a feature step's rows in Redis.

mod bench;
mod features;
mod http;
mod learn;
mod models;
mod procs;
mod seed;
mod soak;
mod stages;
mod supervise;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_common::Deployment;
use sluice_common::graph::Unit;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Streaming ML inference behind Kafka"
)]
struct Cli {
    /// Config file (TOML). Defaults apply for anything it leaves out; SLUICE__… env vars win.
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local stack: broker and Redis (started if not reachable), topics, gateway, workers.
    Up {
        /// Start workers only for these models (comma-separated; default: every model).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// One worker process (and consumer group) per step pool instead of the config's
        /// deployment units.
        #[arg(long)]
        per_step: bool,
    },
    /// Show the stack `sluice up` runs here: each process, its address and readiness.
    Status,
    /// Run the HTTP gateway.
    Gateway {
        /// Listen address (overrides gateway.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run a worker for a deployment unit (several steps behind one consumer), one model, or
    /// one built-in, combine or route step of a graph.
    Worker {
        /// A deployment unit (`[units.<name>]`, or `all` when the config declares none).
        #[arg(long, conflicts_with_all = ["model", "step"], required_unless_present_any = ["model", "step"])]
        unit: Option<String>,
        /// With --unit: serve only these of its models, graphs and steps (comma-separated).
        #[arg(long, value_delimiter = ',', requires = "unit")]
        only: Vec<String>,
        /// Model name from the config.
        #[arg(long, conflicts_with = "step")]
        model: Option<String>,
        /// A graph's non-model step, as `<graph>.<step>`.
        #[arg(long)]
        step: Option<String>,
        /// Address for /metrics and health (overrides worker.metrics_listen).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// This process's stable name in its unit: joins the group as a static member, so a
        /// restart gets its partitions back at once (overrides worker.instance).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Manage topics.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Measure throughput and latency (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Run the learner of a learning model (joins its predictions with feedback, learns,
    /// publishes weights), or print its state with --status.
    Learn(learn::LearnArgs),
    /// Hot-swap model versions while serving.
    Models {
        #[command(subcommand)]
        action: models::ModelsAction,
    },
    /// Load and inspect the feature store a feature-lookup step reads.
    Features {
        #[command(subcommand)]
        action: features::FeaturesAction,
    },
    /// API keys for `[gateway.auth]`.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Print the SHA-256 of a key (for `[[gateway.auth.keys]] sha256`); the key is read from
    /// standard input, so it stays out of shell history.
    Hash,
    /// Make a new random key (32 bytes from the OS, hex) and print it with its SHA-256.
    New,
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create the topics the config needs (idempotent).
    Apply,
}

/// Runs the `sluice` command line with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let deployment = match Deployment::load(cli.config.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    sluice_common::telemetry::init_logging(&deployment.config.telemetry);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if deployment.config.runtime.threads > 0 {
        builder.worker_threads(deployment.config.runtime.threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command, cli.config, deployment));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    command: Command,
    config_path: Option<PathBuf>,
    deployment: Deployment,
) -> anyhow::Result<()> {
    match command {
        Command::Up { models, per_step } => {
            up::run(deployment, config_path, models, per_step).await
        }
        Command::Status => up::status(&deployment.config).await,
        Command::Gateway { listen } => {
            let mut deployment = deployment;
            if let Some(l) = listen {
                deployment.config.gateway.listen = l;
            }
            // The whole config is long (hundreds of lines): at debug, so a stack start stays readable.
            tracing::debug!(config = %deployment.config.redacted(), "effective config");
            let metrics = sluice_common::telemetry::install_metrics();
            let listener = tokio::net::TcpListener::bind(deployment.config.gateway.listen).await?;
            let gw = sluice_gateway::Gateway::connect(deployment, metrics).await?;
            // Routing lives in the workers; a SIGHUP meant for the whole stack must not stop the
            // gateway (graph interfaces change only with a restart).
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: the gateway has nothing to reload");
                }
            });
            let bound = listener.local_addr()?;
            sluice_common::ops::announce_addr(bound);
            tracing::info!(addr = %bound, gateway = gw.id(), "gateway listening");
            gw.serve(listener, sluice_common::ops::shutdown_signal())
                .await?;
            Ok(())
        }
        Command::Worker {
            unit,
            only,
            model,
            step,
            metrics_listen,
            instance,
        } => {
            let mut deployment = deployment;
            if instance.is_some() {
                deployment.config.worker.instance = instance;
            }
            let unit = match (unit, model, step) {
                (Some(name), _, _) => {
                    let Some(u) = deployment.worker_unit(&name) else {
                        let known: Vec<&str> = deployment
                            .worker_units()
                            .iter()
                            .map(|u| u.name.as_str())
                            .collect();
                        anyhow::bail!("--unit: no unit '{name}' (the config has: {known:?})");
                    };
                    up::only_members(&deployment, u, &only)?
                }
                (None, Some(m), _) => deployment.pool_unit(&Unit::Model(m)),
                (None, None, Some(s)) => match Unit::parse(&s) {
                    u @ Unit::Step { .. } => deployment.pool_unit(&u),
                    _ => anyhow::bail!("--step takes <graph>.<step>, got '{s}'"),
                },
                (None, None, None) => anyhow::bail!("give --unit, --model or --step"),
            };
            // The whole config is long (hundreds of lines): at debug, so a stack start stays readable.
            tracing::debug!(config = %deployment.config.redacted(), "effective config");
            let ops = sluice_workers::Ops {
                listen: metrics_listen.unwrap_or(deployment.config.worker.metrics_listen),
                metrics: sluice_common::telemetry::install_metrics(),
            };
            sluice_workers::run(
                deployment,
                &unit,
                config_path,
                ops,
                sluice_common::ops::shutdown_signal(),
            )
            .await?;
            Ok(())
        }
        Command::Topics {
            action: TopicsAction::Apply,
        } => {
            let topics = deployment.required_topics();
            let report = sluice_common::kafka::apply_topics(&deployment.config, &topics).await?;
            tracing::info!(created = ?report.created, existing = ?report.existing, "topics applied");
            sluice_common::kafka::check_partitions(&report)?;
            Ok(())
        }
        Command::Bench(args) => bench::run(deployment, args).await,
        Command::Features { action } => features::run(&deployment, action).await,
        Command::Learn(args) => learn::run(deployment, args).await,
        Command::Models { action } => models::run(&deployment, action).await,
        Command::Keys { action } => keys(action),
    }
}

/// `sluice keys hash|new`.
fn keys(action: KeysAction) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let key = match action {
        KeysAction::Hash => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            let key = text.trim().to_string();
            anyhow::ensure!(!key.is_empty(), "no key on standard input");
            key
        }
        KeysAction::New => {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
            let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(std::io::stdout(), "key:    {key}")?;
            key
        }
    };
    writeln!(
        std::io::stdout(),
        "sha256: {}",
        sluice_gateway::auth::hash_key(&key)
    )?;
    Ok(())
}
