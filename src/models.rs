//! `sluice models push NAME FILE`: serves a new version of an ONNX model without a restart.
//! The file is copied into the model store, a push goes on the control topic, and every worker
//! serving the model loads, checks and swaps it in between batches; this waits for their
//! reports and prints them (exit status 1 when one could not). Rolling back is pushing the
//! earlier file.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use sluice_common::Deployment;
use sluice_common::control::{self, PushSource};

/// `sluice models ...`.
#[derive(clap::Subcommand)]
pub enum ModelsAction {
    /// Serve FILE as a new version of model NAME (every worker serving it swaps it in).
    Push {
        /// The model.
        name: String,
        /// The ONNX file.
        file: PathBuf,
        /// Its version (default: one more than the newest numeric version).
        #[arg(long)]
        version: Option<String>,
        /// How long to wait for the workers' reports.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
}

/// Runs `action`.
pub async fn run(deployment: &Deployment, action: ModelsAction) -> anyhow::Result<()> {
    let ModelsAction::Push {
        name,
        file,
        version,
        wait,
    } = action;
    let cfg = &deployment.config;
    let redis = sluice_common::redis_client::client(&cfg.redis)?;
    let mut redis = redis::aio::ConnectionManager::new(redis)
        .await
        .context("connecting to Redis")?;
    let push = control::prepare_push(
        deployment,
        &mut redis,
        &name,
        PushSource::File(&file),
        version,
    )
    .await?;
    let producer = sluice_common::kafka::producer(
        cfg,
        &format!("sluice-models-push-{}", std::process::id()),
        Duration::ZERO,
    )?;
    control::publish(&producer, &mut redis, deployment, &push).await?;
    let reports =
        control::reports(&mut redis, cfg, &push.id, wait, Duration::from_millis(700)).await?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "pushed {name} version {} ({})",
        push.version,
        push.onnx.display()
    )?;
    for (worker, r) in &reports {
        writeln!(out, "  {worker}: {}", r.message)?;
    }
    if reports.is_empty() {
        anyhow::bail!(
            "no worker serving '{name}' reported within {wait:?}; the push applies when one starts"
        );
    }
    if reports.values().any(|r| !r.ok) {
        anyhow::bail!(
            "version {} of '{name}' is not served everywhere",
            push.version
        );
    }
    Ok(())
}
