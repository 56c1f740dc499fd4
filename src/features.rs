//! `sluice features load` and `sluice features get`: write a feature step's rows into Redis in
//! its layout (Sluice's own, or Feast's so that Feast reads them), and show what the step sees
//! for an entity.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use sluice_common::Deployment;
use sluice_common::config::{FeatureLayout, FeaturesConfig, JoinKeyType};
use sluice_common::graph::StepKind;
use sluice_features::{Layout, Value};
use sluice_schemas::{DataType, Number};

/// `sluice features ...`
#[derive(Subcommand)]
pub enum FeaturesAction {
    /// Write rows (CSV with a header, JSON Lines, or Parquet) into Redis for a feature step.
    Load(LoadArgs),
    /// Show the features a step reads for entities.
    Get {
        /// The feature step, as `<graph>.<step>`.
        #[arg(long)]
        step: String,
        /// Entity keys.
        #[arg(required = true)]
        entities: Vec<String>,
    },
}

/// Arguments of `sluice features load`.
#[derive(Args)]
pub struct LoadArgs {
    /// A `.csv` (header row naming the columns), `.jsonl` or `.parquet` file.
    file: PathBuf,
    /// The feature step whose features and layout to write, as `<graph>.<step>`.
    #[arg(long)]
    step: String,
    /// The column holding the entity key (default: the step's join key, else its entity
    /// input's name).
    #[arg(long)]
    key_column: Option<String>,
    /// Layout to write (default: the step's).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Expire each entity's hash after this long (e.g. `7d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Entities per pipelined write.
    #[arg(long, default_value_t = 500)]
    batch: usize,
}

/// A layout to write.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    /// One hash per entity, plain-text fields.
    Sluice,
    /// Feast's online-store format (what `feast materialize` writes).
    Feast,
}

/// Runs a `features` subcommand.
pub async fn run(deployment: &Deployment, action: FeaturesAction) -> anyhow::Result<()> {
    match action {
        FeaturesAction::Load(args) => load(deployment, args).await,
        FeaturesAction::Get { step, entities } => get(deployment, &step, &entities).await,
    }
}

fn step_config(deployment: &Deployment, step: &str) -> anyhow::Result<FeaturesConfig> {
    let (graph, name) = step
        .split_once('.')
        .with_context(|| format!("--step takes <graph>.<step>, got '{step}'"))?;
    let g = deployment
        .graph(graph)
        .with_context(|| format!("no graph '{graph}' in the config"))?;
    let s = g
        .step_index(name)
        .map(|i| &g.steps[i])
        .with_context(|| format!("graph '{graph}' has no step '{name}'"))?;
    match &s.kind {
        StepKind::Features(f) => Ok((**f).clone()),
        _ => bail!("step '{step}' is not a feature lookup"),
    }
}

async fn connect(
    deployment: &Deployment,
    config: &FeaturesConfig,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let url = config
        .redis
        .clone()
        .unwrap_or_else(|| deployment.config.redis.url.clone());
    let client = redis::Client::open(url.as_str()).context("redis url")?;
    client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| {
            format!(
                "connecting to Redis at {}",
                sluice_common::config::redact_url(&url)
            )
        })
}

fn key_type(config: &FeaturesConfig) -> JoinKeyType {
    config.join_key_type.unwrap_or(JoinKeyType::String)
}

/// Reads rows as (column → text) maps from a CSV or JSON Lines file.
fn rows(path: &Path) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<Row>>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = std::io::BufReader::new(file);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    match ext {
        "csv" => {
            let mut lines = reader.lines();
            let header = match lines.next() {
                Some(h) => split_csv(&h?),
                None => bail!("{} is empty", path.display()),
            };
            Ok(Box::new(
                lines
                    .filter(|l| !matches!(l, Ok(s) if s.trim().is_empty()))
                    .map(move |line| {
                        let fields = split_csv(&line?);
                        if fields.len() != header.len() {
                            bail!("{} fields, the header has {}", fields.len(), header.len());
                        }
                        Ok(header
                            .iter()
                            .cloned()
                            .zip(fields.into_iter().map(Some))
                            .collect())
                    }),
            ))
        }
        "jsonl" | "ndjson" => Ok(Box::new(
            reader
                .lines()
                .filter(|l| !matches!(l, Ok(s) if s.trim().is_empty()))
                .map(|line| {
                    let v: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(&line?).context("not a JSON object")?;
                    Ok(v.into_iter()
                        .map(|(k, v)| {
                            let text = match v {
                                serde_json::Value::Null => None,
                                serde_json::Value::String(s) => Some(s),
                                other => Some(other.to_string()),
                            };
                            (k, text)
                        })
                        .collect())
                }),
        )),
        "parquet" => {
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let reader = parquet::file::serialized_reader::SerializedFileReader::new(file)
                .with_context(|| format!("{} is not a Parquet file", path.display()))?;
            let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader));
            Ok(Box::new(rows.map(|row| {
                let row = row.context("reading a Parquet row")?;
                Ok(row
                    .get_column_iter()
                    .map(|(name, field)| (name.clone(), parquet_text(field)))
                    .collect())
            })))
        }
        _ => bail!("{}: give a .csv, .jsonl or .parquet file", path.display()),
    }
}

/// A Parquet value as the text a CSV cell would hold (`None` for null); timestamps as epoch
/// seconds.
fn parquet_text(field: &parquet::record::Field) -> Option<String> {
    use parquet::record::Field;
    Some(match field {
        Field::Null => return None,
        Field::Str(s) => s.clone(),
        Field::Bytes(b) => String::from_utf8_lossy(b.data()).into_owned(),
        Field::TimestampMillis(ms) => (ms / 1000).to_string(),
        Field::TimestampMicros(us) => (us / 1_000_000).to_string(),
        Field::Date(days) => (i64::from(*days) * 86_400).to_string(),
        Field::ListInternal(list) => {
            let parts: Vec<String> = list.elements().iter().filter_map(parquet_text).collect();
            format!("[{}]", parts.join(","))
        }
        other => other.to_string(),
    })
}

/// One row: column → value (`None` for a JSON null).
type Row = std::collections::BTreeMap<String, Option<String>>;

/// Splits one CSV line (RFC 4180 quoting within the line).
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    out.push(field);
    out
}

/// `sluice features load FILE --step STEP` with every other option at its default (`sluice
/// up`'s seed data).
pub(crate) async fn load_file(
    deployment: &Deployment,
    file: PathBuf,
    step: String,
) -> anyhow::Result<()> {
    let args = LoadArgs {
        file,
        step,
        key_column: None,
        format: None,
        ttl: None,
        batch: 500,
    };
    load(deployment, args).await
}

/// How one CSV row becomes a feature-store entry.
struct Entity<'a> {
    config: &'a FeaturesConfig,
    layout: &'a Layout,
    key_column: &'a str,
    now_s: i64,
    ttl_s: Option<u64>,
}

impl Entity<'_> {
    /// Adds `row`'s entry to `pipe`: its key, its features parsed as their datatypes, stamped
    /// with its `event_timestamp` (or now).
    fn write(
        &self,
        row: &std::collections::BTreeMap<String, Option<String>>,
        pipe: &mut redis::Pipeline,
    ) -> anyhow::Result<()> {
        let key_column = self.key_column;
        let key = row
            .get(key_column)
            .cloned()
            .flatten()
            .with_context(|| format!("no '{key_column}' column value"))?;
        let values = self
            .config
            .features
            .iter()
            .map(|f| match row.get(&f.name).cloned().flatten() {
                None => Ok(Value::Missing),
                Some(s) if s.is_empty() && f.datatype != DataType::Bytes => Ok(Value::Missing),
                Some(s) => Value::parse_text(s.as_bytes(), f.datatype, f.length.is_some())
                    .map_err(|e| anyhow::anyhow!("feature '{}': {e}", f.name)),
            })
            .collect::<anyhow::Result<Vec<Value>>>()?;
        let redis_key = self
            .layout
            .key(&key, key_type(self.config))
            .map_err(anyhow::Error::msg)?;
        let event_s = match row.get("event_timestamp").cloned().flatten() {
            Some(t) => t.parse::<i64>().unwrap_or(self.now_s),
            None => self.now_s,
        };
        self.layout
            .write(pipe, &redis_key, &values, event_s, self.ttl_s)
            .map_err(anyhow::Error::msg)
    }
}

#[allow(clippy::print_stdout)]
async fn load(deployment: &Deployment, args: LoadArgs) -> anyhow::Result<()> {
    let mut config = step_config(deployment, &args.step)?;
    match args.format {
        Some(Format::Sluice) => config.layout = FeatureLayout::Sluice,
        Some(Format::Feast) => config.layout = FeatureLayout::Feast,
        None => {}
    }
    if config.layout == FeatureLayout::Feast && config.project.is_none() {
        bail!("--format feast: the step names no Feast project (features.project)");
    }
    if config.layout == FeatureLayout::Feast && config.features.iter().any(|f| f.view.is_none()) {
        bail!("--format feast: every feature needs its view (features[].view)");
    }
    let layout = Layout::new(&config);
    let key_column = args
        .key_column
        .clone()
        .or_else(|| config.join_key.clone())
        .unwrap_or_else(|| config.entity.clone());
    let mut conn = connect(deployment, &config).await?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let started = Instant::now();
    let (mut written, mut rejected) = (0u64, 0u64);
    let mut pipe = redis::pipe();
    let mut pending = 0;
    let mut stderr = std::io::stderr();
    for (n, row) in rows(&args.file)?.enumerate() {
        let line = n + 2;
        let result = row.and_then(|row| {
            let entity = Entity {
                config: &config,
                layout: &layout,
                key_column: &key_column,
                now_s,
                ttl_s: args.ttl.map(|t| t.as_secs()),
            };
            entity.write(&row, &mut pipe)
        });
        match result {
            Ok(()) => {
                written += 1;
                pending += 1;
            }
            Err(e) => {
                rejected += 1;
                if rejected <= 10 {
                    tracing::warn!(line, error = %format!("{e:#}"), "row rejected");
                }
            }
        }
        if pending >= args.batch {
            pipe.query_async::<()>(&mut conn)
                .await
                .context("writing to Redis")?;
            pipe = redis::pipe();
            pending = 0;
            let _ = write!(stderr, "\r  {written} rows written, {rejected} rejected");
        }
    }
    if pending > 0 {
        pipe.query_async::<()>(&mut conn)
            .await
            .context("writing to Redis")?;
    }
    let _ = writeln!(stderr, "\r  {written} rows written, {rejected} rejected");
    println!(
        "loaded {} into {} ({:?} layout): {written} rows written, {rejected} rejected, {:.2}s",
        args.file.display(),
        args.step,
        config.layout,
        started.elapsed().as_secs_f64()
    );
    if written == 0 {
        bail!("no row was written");
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn get(deployment: &Deployment, step: &str, entities: &[String]) -> anyhow::Result<()> {
    let config = step_config(deployment, step)?;
    let layout = Layout::new(&config);
    let mut conn = connect(deployment, &config).await?;
    let keys = entities
        .iter()
        .map(|e| layout.key(e, key_type(&config)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let raw = layout
        .fetch(&mut conn, &keys)
        .await
        .context("reading Redis")?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (entity, fields) in entities.iter().zip(raw) {
        let values = layout.decode(&fields, now_s).map_err(anyhow::Error::msg)?;
        let mut obj = serde_json::Map::new();
        for (f, v) in config.features.iter().zip(values) {
            let json = match v {
                Value::Missing => serde_json::Value::Null,
                Value::Float(x) => serde_json::json!(x),
                Value::Int(i) => serde_json::json!(i),
                Value::Bool(b) => serde_json::json!(b),
                Value::Text(t) => serde_json::json!(String::from_utf8_lossy(&t)),
                Value::List(xs) => xs.iter().map(|&n| number_json(n)).collect(),
            };
            obj.insert(f.name.clone(), json);
        }
        let found = fields.iter().any(Option::is_some);
        println!(
            "{}",
            serde_json::json!({ "entity": entity, "found": found, "features": obj })
        );
    }
    Ok(())
}

/// A number as JSON, exactly (integers as integers; a NaN or infinity, which JSON lacks, as null).
fn number_json(n: Number) -> serde_json::Value {
    match n {
        Number::Int(i) => i.into(),
        Number::UInt(u) => u.into(),
        Number::Float(f) => f.into(),
        Number::Bool(b) => b.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_split_with_quotes() {
        assert_eq!(
            split_csv("a,\"b,c\",\"d\"\"e\",\r"),
            vec!["a", "b,c", "d\"e", ""]
        );
    }
}
