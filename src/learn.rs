//! `sluice learn`: runs the learner service (`sluice-learner`) of a learning model or a graph's
//! bandit, or prints its last checkpoint.

use std::net::SocketAddr;

use anyhow::Context;
use sluice_common::Deployment;

/// Arguments of `sluice learn`.
#[derive(clap::Args)]
pub struct LearnArgs {
    /// The learning model (one with `[models.<name>.learner]`) or a graph with a bandit step.
    #[arg(long)]
    model: String,
    /// Address for /metrics and health (default: an ephemeral port on 127.0.0.1).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Print the learner's last checkpoint (counts, weights version, read positions) as JSON
    /// and exit.
    #[arg(long)]
    status: bool,
}

/// Runs the learner of `args.model` until SIGINT/SIGTERM, or prints its status.
pub async fn run(deployment: Deployment, args: LearnArgs) -> anyhow::Result<()> {
    if args.status {
        let text = sluice_learner::status(&deployment, &args.model)
            .await?
            .with_context(|| format!("no checkpoint of '{}' yet", args.model))?;
        use std::io::Write;
        writeln!(std::io::stdout(), "{text}")?;
        return Ok(());
    }
    let opts = sluice_learner::Options {
        model: args.model,
        metrics_listen: args.metrics_listen,
    };
    sluice_learner::run(deployment, opts).await
}
