//! PostgreSQL lookup steps: the batch's keys go to the database as one array parameter of one
//! parameterized query (`... WHERE id = ANY($1)`); each declared column of the matching rows is
//! output as a tensor. A missing row or NULL takes the column's default, or fails the request
//! with 422 naming the key and column; the database down or slower than the timeout (capped by the
//! request's deadline) fails the batch with 503. Connections are kept in a small pool and
//! replaced when they break; each runs with `statement_timeout` set to the step's timeout and
//! holds the query prepared. The worker opens them when it starts, so the first request does not
//! wait for a login.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use sluice_common::config::PostgresConfig;
use sluice_features::Value;
use sluice_schemas::DataType;
use tokio::sync::Mutex;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::features::{entity_keys, missing_value, to_tensor};
use super::seam::{Step, StepFailure, StepInput, StepResult, wait_for};

/// A PostgreSQL lookup step.
pub struct PostgresStep {
    config: PostgresConfig,
    /// The URL with its password hidden, for messages.
    shown: String,
    pool: Vec<Mutex<Option<Connection>>>,
    next: AtomicUsize,
}

/// An open connection and the step's query, prepared on it.
struct Connection {
    client: Client,
    query: Statement,
}

impl PostgresStep {
    /// The step for `config`; connects in [`Step::warm`] or on first use, so a worker starts
    /// while the database is down.
    pub fn new(config: &PostgresConfig) -> PostgresStep {
        PostgresStep {
            shown: sluice_common::config::redact_url(&config.url),
            pool: (0..config.pool.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            config: config.clone(),
        }
    }

    fn down(&self, e: impl std::fmt::Display) -> StepFailure {
        StepFailure::unavailable(format!("database {}: {e}", self.shown))
    }

    /// A database error as a failure: the database gone, dropping the connection or past the
    /// statement timeout is 503; anything else (a bad query, say) is the config's.
    fn failure(&self, e: &tokio_postgres::Error) -> StepFailure {
        if broken(e) || timed_out(e) {
            self.down(e)
        } else {
            StepFailure {
                code: sluice_schemas::envelope::ErrorCode::Internal,
                message: format!("database query failed: {e}"),
            }
        }
    }

    /// Opens a connection, sets its statement timeout and prepares the query.
    async fn open(&self) -> Result<Connection, StepFailure> {
        let (client, connection) = tokio_postgres::connect(&self.config.url, NoTls)
            .await
            .map_err(|e| self.down(e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "database connection closed");
            }
        });
        let ms = self.config.timeout.as_millis().max(1);
        client
            .batch_execute(&format!("SET statement_timeout = {ms}"))
            .await
            .map_err(|e| self.down(e))?;
        let query = client
            .prepare(&self.config.query)
            .await
            .map_err(|e| self.failure(&e))?;
        Ok(Connection { client, query })
    }

    /// Runs the query for `keys` on a pooled connection, opened or replaced as needed within
    /// `connect`; the query itself may take `query`.
    async fn query(
        &self,
        keys: &(dyn ToSql + Sync),
        connect: Duration,
        query: Duration,
    ) -> Result<Vec<Row>, StepFailure> {
        let slot = &self.pool[self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len()];
        let mut conn = tokio::time::timeout(connect, async {
            let mut conn = slot.lock().await;
            if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                *conn = Some(self.open().await?);
            }
            Ok::<_, StepFailure>(conn)
        })
        .await
        .map_err(|_| self.down(format!("no connection within {}ms", connect.as_millis())))??;
        let Some(c) = conn.as_ref() else {
            return Err(self.down("no connection"));
        };
        match tokio::time::timeout(query, c.client.query(&c.query, &[keys])).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                // Opened (and prepared) afresh next time, unless the query only ran too long: a
                // changed table needs a new prepare, a broken connection a new connection.
                if !timed_out(&e) {
                    *conn = None;
                }
                Err(self.failure(&e))
            }
            Err(_) => Err(self.down(format!("no answer within {}ms", query.as_millis()))),
        }
    }

    async fn batch(&self, batch: &[StepInput]) -> Result<Vec<StepResult>, StepFailure> {
        let datatype = batch
            .first()
            .and_then(|j| j.tensors.iter().find(|t| t.name == self.config.key))
            .map_or(DataType::Bytes, |t| t.datatype);
        let per_job: Vec<Result<Vec<String>, StepFailure>> = batch
            .iter()
            .map(|j| entity_keys(j, &self.config.key))
            .collect();
        let mut keys: Vec<String> = per_job.iter().flatten().flatten().cloned().collect();
        keys.sort();
        keys.dedup();
        let connect = wait_for(batch, self.config.connect_timeout);
        let wait = wait_for(batch, self.config.timeout);
        let rows = if keys.is_empty() {
            Vec::new()
        } else {
            match datatype {
                DataType::Int64 => {
                    let ks = parse_keys::<i64>(&keys)?;
                    self.query(&ks, connect, wait).await?
                }
                DataType::Int32 => {
                    let ks = parse_keys::<i32>(&keys)?;
                    self.query(&ks, connect, wait).await?
                }
                _ => self.query(&keys, connect, wait).await?,
            }
        };
        let by_key = self.index(&rows)?;
        Ok(per_job
            .into_iter()
            .map(|keys| self.tensors(&keys?, &by_key))
            .collect())
    }

    /// Each row's declared columns, by its key (as text).
    fn index(&self, rows: &[Row]) -> Result<HashMap<String, Vec<Value>>, StepFailure> {
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let key_at = match &self.config.key_column {
                Some(name) => row.columns().iter().position(|c| c.name() == name),
                None => Some(0),
            }
            .ok_or_else(|| self.config_error("the key column is not in the query's result"))?;
            let key = match value(row, key_at)? {
                Value::Text(t) => String::from_utf8_lossy(&t).into_owned(),
                Value::Int(i) => i.to_string(),
                other => return Err(self.config_error(&format!("key column holds {other:?}"))),
            };
            let values = self
                .config
                .columns
                .iter()
                .map(|c| {
                    let at = row
                        .columns()
                        .iter()
                        .position(|col| col.name() == c.name)
                        .ok_or_else(|| {
                            self.config_error(&format!(
                                "column '{}' is not in the query's result",
                                c.name
                            ))
                        })?;
                    value(row, at)
                })
                .collect::<Result<Vec<Value>, StepFailure>>()?;
            out.insert(key, values);
        }
        Ok(out)
    }

    fn config_error(&self, m: &str) -> StepFailure {
        StepFailure {
            code: sluice_schemas::envelope::ErrorCode::Internal,
            message: format!("database lookup: {m}"),
        }
    }

    fn tensors(&self, keys: &[String], by_key: &HashMap<String, Vec<Value>>) -> StepResult {
        let mut columns: Vec<Vec<Value>> =
            vec![Vec::with_capacity(keys.len()); self.config.columns.len()];
        for key in keys {
            let row = by_key.get(key);
            for (k, spec) in self.config.columns.iter().enumerate() {
                let v = match row.map(|r| &r[k]) {
                    Some(Value::Missing) => missing_value(
                        self.config.on_missing,
                        spec,
                        format!("row '{key}' has no value for column '{}'", spec.name),
                    )?,
                    None => missing_value(
                        self.config.on_missing,
                        spec,
                        format!("no row for key '{key}' (column '{}')", spec.name),
                    )?,
                    Some(v) => v.clone(),
                };
                columns[k].push(v);
            }
        }
        self.config
            .columns
            .iter()
            .zip(columns)
            .map(|(spec, values)| to_tensor(spec, &values))
            .collect()
    }
}

/// Whether `e` means the connection is gone (rather than the query failing on it).
fn broken(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.as_db_error().is_none()
}

/// Whether `e` is the statement timeout cancelling the query.
fn timed_out(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| d.code().code() == "57014")
}

fn parse_keys<T: std::str::FromStr>(keys: &[String]) -> Result<Vec<T>, StepFailure> {
    keys.iter()
        .map(|k| {
            k.parse()
                .map_err(|_| StepFailure::invalid(format!("key '{k}' is not a number")))
        })
        .collect()
}

/// Column `at` of `row` as a value (NULL → missing).
fn value(row: &Row, at: usize) -> Result<Value, StepFailure> {
    let ty = row.columns()[at].type_().clone();
    let bad = |e: tokio_postgres::Error| StepFailure {
        code: sluice_schemas::envelope::ErrorCode::Internal,
        message: format!("column '{}': {e}", row.columns()[at].name()),
    };
    let v = match ty {
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(at)
            .map_err(bad)?
            .map(Value::Float),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(at)
            .map_err(bad)?
            .map(|x| Value::Float(f64::from(x))),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(at)
            .map_err(bad)?
            .map(Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(at)
            .map_err(bad)?
            .map(|x| Value::Int(i64::from(x))),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(at)
            .map_err(bad)?
            .map(|x| Value::Int(i64::from(x))),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(at)
            .map_err(bad)?
            .map(Value::Bool),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<String>>(at)
            .map_err(bad)?
            .map(|s| Value::Text(s.into_bytes())),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(at)
            .map_err(bad)?
            .map(Value::Text),
        other => {
            return Err(StepFailure {
                code: sluice_schemas::envelope::ErrorCode::Internal,
                message: format!(
                    "column '{}' is {other}; cast it in the query to float8, int8, bool or text",
                    row.columns()[at].name()
                ),
            });
        }
    };
    Ok(v.unwrap_or(Value::Missing))
}

impl Step for PostgresStep {
    fn warm(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for slot in &self.pool {
                let mut conn = slot.lock().await;
                if conn.is_some() {
                    continue;
                }
                match tokio::time::timeout(self.config.connect_timeout, self.open()).await {
                    Ok(Ok(c)) => *conn = Some(c),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e.message, "database not reachable at start; the first batch tries again");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(database = %self.shown, "database did not accept a connection at start; the first batch tries again");
                        return;
                    }
                }
            }
        })
    }

    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move {
            match self.batch(&batch).await {
                Ok(results) => results,
                Err(e) => {
                    tracing::warn!(error = %e.message, jobs = batch.len(), "database lookup failed");
                    batch.iter().map(|_| Err(e.clone())).collect()
                }
            }
        })
    }
}
