//! Demo data `sluice up` loads once Redis is up and before the workers start
//! (`[[local.seed]]`): SQL scripts run against PostgreSQL, feature rows written into Redis in a
//! feature step's layout. Each is idempotent, so a restarted stack loads the same data again.

use anyhow::Context;
use sluice_common::Deployment;
use sluice_common::config::Seed;

/// Loads every seed of the config, in order; the first that fails stops the start.
pub async fn load_all(deployment: &Deployment) -> anyhow::Result<()> {
    for seed in &deployment.config.local.seed {
        match seed {
            Seed::Sql { sql, postgres } => run_sql(sql, postgres).await?,
            Seed::Features { features, step } => {
                crate::features::load_file(deployment, features.clone(), step.clone())
                    .await
                    .with_context(|| format!("seed {}", features.display()))?;
            }
        }
    }
    Ok(())
}

async fn run_sql(script: &std::path::Path, url: &str) -> anyhow::Result<()> {
    let what = || format!("seed {}", script.display());
    let text = std::fs::read_to_string(script).with_context(what)?;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("{}: connecting to {url}", what()))?;
    let task = tokio::spawn(connection);
    client.batch_execute(&text).await.with_context(what)?;
    drop(client);
    let _ = task.await;
    tracing::info!(script = %script.display(), "seed SQL run");
    Ok(())
}
