//! Feature lookup steps: the batch's entity keys read from Redis in one pipelined round trip,
//! each feature output as a tensor of its declared datatype. A missing entity or feature gets
//! its default or fails the request with 422 naming both; Redis unreachable or slower than the
//! step's timeout (capped by the request's deadline) fails the batch with 503, never a made-up
//! value.

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use sluice_common::config::{AllowedValue, FeatureSpec, FeaturesConfig, OnMissing};
use sluice_features::{Layout, Value, join_key_type};
use sluice_schemas::{DataType, Number, Tensor, tensor_from_numbers};
use tokio::sync::OnceCell;

use super::seam::{BuildError, Step, StepFailure, StepInput, StepResult, wait_for};

/// A job's entity keys (as text) and where their Redis keys sit in the batch's.
type JobKeys = (Vec<String>, std::ops::Range<usize>);

/// A feature lookup step.
pub struct FeaturesStep {
    layout: Layout,
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    metrics: LookupMetrics,
}

struct LookupMetrics {
    round_trips: metrics::Counter,
    entities: metrics::Counter,
    missing: metrics::Counter,
}

impl FeaturesStep {
    /// The step for `config`, reading `redis_url` unless the config names its own Redis.
    /// Connects in [`Step::warm`] or on first use, so a worker starts while Redis is down.
    pub fn new(
        step: &str,
        config: &FeaturesConfig,
        redis_url: &str,
    ) -> Result<FeaturesStep, BuildError> {
        let url = config.redis.as_deref().unwrap_or(redis_url);
        let client = redis::Client::open(url)
            .map_err(|e| BuildError::Settings(format!("features.redis: {e}")))?;
        let label = [("step", step.to_string())];
        Ok(FeaturesStep {
            layout: Layout::new(config),
            client,
            conn: OnceCell::new(),
            metrics: LookupMetrics {
                round_trips: metrics::counter!("sluice_feature_redis_round_trips_total", &label),
                entities: metrics::counter!("sluice_feature_entities_total", &label),
                missing: metrics::counter!("sluice_feature_missing_total", &label),
            },
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, StepFailure> {
        self.conn
            .get_or_try_init(|| async {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.layout.config().connect_timeout))
                    .set_response_timeout(Some(self.layout.config().timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), cfg).await
            })
            .await
            .cloned()
            .map_err(|e| {
                StepFailure::unavailable(format!("feature store (Redis) unreachable: {e}"))
            })
    }

    /// Runs the whole batch: keys, one round trip, values, tensors.
    async fn batch(&self, batch: &[StepInput]) -> Result<Vec<StepResult>, StepFailure> {
        let config = self.layout.config();
        // Entity keys per job, as text; a job whose keys cannot be read fails alone.
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut per_job: Vec<Result<JobKeys, StepFailure>> = Vec::with_capacity(batch.len());
        for job in batch {
            let entities = entity_keys(job, &config.entity).and_then(|e| {
                let ty = join_key_type(config, entity_datatype(job, &config.entity));
                let ks = e
                    .iter()
                    .map(|k| self.layout.key(k, ty))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StepFailure::invalid)?;
                Ok((e, ks))
            });
            per_job.push(entities.map(|(e, ks)| {
                let start = keys.len();
                keys.extend(ks);
                (e, start..keys.len())
            }));
        }
        let wait = wait_for(batch, config.timeout);
        let raw = if keys.is_empty() {
            Vec::new()
        } else {
            let connect = wait_for(batch, config.connect_timeout);
            let mut conn = tokio::time::timeout(connect, self.connection())
                .await
                .map_err(|_| {
                    StepFailure::unavailable(format!(
                        "feature store (Redis): no connection within {}ms",
                        connect.as_millis()
                    ))
                })??;
            self.metrics.round_trips.increment(1);
            self.metrics.entities.increment(keys.len() as u64);
            tokio::time::timeout(wait, self.layout.fetch(&mut conn, &keys))
                .await
                .map_err(|_| {
                    StepFailure::unavailable(format!(
                        "feature store (Redis) did not answer within {}ms",
                        wait.as_millis()
                    ))
                })?
                .map_err(|e| StepFailure::unavailable(format!("feature store (Redis): {e}")))?
        };
        let now_s = sluice_common::now_ms() / 1000;
        Ok(per_job
            .into_iter()
            .map(|job| {
                let (entities, range) = job?;
                let rows = raw.get(range).ok_or_else(|| {
                    StepFailure::unavailable(
                        "feature store (Redis) answered fewer entities than asked",
                    )
                })?;
                self.tensors(&entities, rows, now_s)
            })
            .collect())
    }

    /// One job's feature tensors from its entities' raw fields.
    fn tensors(&self, entities: &[String], raw: &[Vec<Option<Vec<u8>>>], now_s: i64) -> StepResult {
        let config = self.layout.config();
        let mut columns: Vec<Vec<Value>> =
            vec![Vec::with_capacity(entities.len()); config.features.len()];
        for (entity, fields) in entities.iter().zip(raw) {
            let values = self
                .layout
                .decode(fields, now_s)
                .map_err(|e| StepFailure::invalid(format!("entity '{entity}': {e}")))?;
            for (k, (v, spec)) in values.into_iter().zip(&config.features).enumerate() {
                let v = match v {
                    Value::Missing => {
                        self.metrics.missing.increment(1);
                        missing(config, spec, entity, fields.iter().all(Option::is_none))?
                    }
                    v => v,
                };
                columns[k].push(v);
            }
        }
        config
            .features
            .iter()
            .zip(columns)
            .map(|(spec, values)| to_tensor(spec, &values))
            .collect()
    }
}

/// The value a missing feature gets, or the 422 saying which entity and feature are missing.
fn missing(
    config: &FeaturesConfig,
    spec: &FeatureSpec,
    entity: &str,
    no_entity: bool,
) -> Result<Value, StepFailure> {
    let what = if no_entity {
        format!(
            "entity '{entity}' is not in the feature store (feature '{}')",
            spec.name
        )
    } else {
        format!("entity '{entity}' has no value for feature '{}'", spec.name)
    };
    missing_value(config.on_missing, spec, what)
}

/// A missing value's default under `on_missing`, or the 422 saying `what` is missing.
pub(super) fn missing_value(
    on_missing: OnMissing,
    spec: &FeatureSpec,
    what: String,
) -> Result<Value, StepFailure> {
    match (on_missing, &spec.default) {
        (OnMissing::Default, Some(AllowedValue::Text(t))) => Ok(Value::Text(t.as_bytes().to_vec())),
        (OnMissing::Default, Some(default)) => {
            let n = default.number().ok_or_else(|| {
                StepFailure::invalid(format!("{what}, and its default is not a number"))
            })?;
            Ok(match spec.length {
                Some(len) => Value::List(vec![n; len]),
                None => Value::from(n),
            })
        }
        (OnMissing::Default, None) => Err(StepFailure::invalid(format!(
            "{what}, and it has no default"
        ))),
        (OnMissing::Reject, _) => Err(StepFailure::invalid(what)),
    }
}

/// One feature's column as a tensor of its declared datatype, every value exactly as read (an
/// INT64 beyond 2^53 included); a value the datatype cannot hold fails with 422 naming it.
pub(super) fn to_tensor(spec: &FeatureSpec, values: &[Value]) -> Result<Tensor, StepFailure> {
    let rows = values.len() as i64;
    let wrong = |v: &Value| {
        StepFailure::invalid(format!(
            "feature '{}': {v:?} does not fit {}",
            spec.name, spec.datatype
        ))
    };
    if spec.datatype == DataType::Bytes {
        let texts = values
            .iter()
            .map(|v| match v {
                Value::Text(t) => Ok(t.clone()),
                Value::Missing => Err(wrong(v)),
                other => Ok(other.to_text()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Tensor::from_bytes_elements(
            spec.name.clone(),
            vec![rows],
            texts,
        ));
    }
    let (numbers, shape) = match spec.length {
        Some(len) => {
            let mut out = Vec::with_capacity(values.len() * len);
            for v in values {
                match v {
                    Value::List(xs) if xs.len() == len => out.extend_from_slice(xs),
                    Value::List(xs) => {
                        return Err(StepFailure::invalid(format!(
                            "feature '{}' has {} elements, {len} declared",
                            spec.name,
                            xs.len()
                        )));
                    }
                    v => return Err(wrong(v)),
                }
            }
            (out, vec![rows, len as i64])
        }
        None => (
            values
                .iter()
                .map(|v| v.number().ok_or_else(|| wrong(v)))
                .collect::<Result<Vec<Number>, _>>()?,
            vec![rows],
        ),
    };
    tensor_from_numbers(&spec.name, spec.datatype, shape, &numbers)
        .map_err(|e| StepFailure::invalid(format!("feature {e}")))
}

fn entity_datatype(job: &StepInput, input: &str) -> DataType {
    job.tensors
        .iter()
        .find(|t| t.name == input)
        .map_or(DataType::Bytes, |t| t.datatype)
}

/// The job's entity keys as text, one per row.
pub(super) fn entity_keys(job: &StepInput, input: &str) -> Result<Vec<String>, StepFailure> {
    let t = job
        .tensors
        .iter()
        .find(|t| t.name == input)
        .ok_or_else(|| StepFailure::invalid(format!("no entity input '{input}'")))?;
    match t.datatype {
        DataType::Bytes => t
            .bytes_elements()
            .map_err(|e| StepFailure::invalid(e.to_string()))?
            .into_iter()
            .map(|e| {
                String::from_utf8(e.to_vec()).map_err(|_| {
                    StepFailure::invalid(format!("'{input}': an entity key is not UTF-8"))
                })
            })
            .collect(),
        DataType::Int64 => Ok(t.values::<i64>().iter().map(i64::to_string).collect()),
        DataType::Int32 => Ok(t.values::<i32>().iter().map(i32::to_string).collect()),
        d => Err(StepFailure::invalid(format!(
            "'{input}' is {d}; entity keys are BYTES, INT64 or INT32"
        ))),
    }
}

impl Step for FeaturesStep {
    fn warm(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.connection().await {
                tracing::warn!(error = %e.message, "feature store not reachable at start; the first batch tries again");
            }
        })
    }

    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move {
            match self.batch(&batch).await {
                Ok(results) => results,
                Err(e) => {
                    tracing::warn!(error = %e.message, jobs = batch.len(), "feature lookup failed");
                    batch.iter().map(|_| Err(e.clone())).collect()
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(
        datatype: DataType,
        length: Option<usize>,
        default: Option<AllowedValue>,
    ) -> FeatureSpec {
        FeatureSpec {
            name: "f".into(),
            view: None,
            datatype,
            length,
            default,
        }
    }

    #[test]
    fn int64_features_beyond_2_53_are_exact() {
        // The values a new user's Feast store answered with, and that came back rounded.
        let big = [
            -2_654_276_660_701_483_516i64,
            (1 << 62) + 1,
            i64::MIN,
            i64::MAX,
        ];
        let values: Vec<Value> = big.iter().map(|&i| Value::Int(i)).collect();
        let t = to_tensor(&spec(DataType::Int64, None, None), &values).unwrap();
        assert_eq!(t.values::<i64>(), big);
        let list = [Value::List(big.iter().map(|&i| Number::Int(i)).collect())];
        let t = to_tensor(&spec(DataType::Int64, Some(4), None), &list).unwrap();
        assert_eq!(
            (t.shape.clone(), t.values::<i64>()),
            (vec![1, 4], big.to_vec())
        );
    }

    #[test]
    fn a_value_its_datatype_cannot_hold_is_refused_by_name() {
        let too_big = [Value::Int(i64::from(i32::MAX) + 1)];
        let e = to_tensor(&spec(DataType::Int32, None, None), &too_big).unwrap_err();
        assert!(
            e.message.contains("'f'") && e.message.contains("out of range"),
            "{}",
            e.message
        );
        let fraction = [Value::Float(1.5)];
        assert!(to_tensor(&spec(DataType::Int64, None, None), &fraction).is_err());
    }

    #[test]
    fn typed_defaults_fill_missing_values() {
        let bool_default = spec(DataType::Bool, None, Some(AllowedValue::Bool(true)));
        let v = missing_value(OnMissing::Default, &bool_default, "gone".into()).unwrap();
        let t = to_tensor(&bool_default, &[v]).unwrap();
        assert_eq!((t.datatype, t.data), (DataType::Bool, vec![1]));
        let int_default = spec(DataType::Int64, Some(2), Some(AllowedValue::Int(-3)));
        let v = missing_value(OnMissing::Default, &int_default, "gone".into()).unwrap();
        assert_eq!(
            to_tensor(&int_default, &[v]).unwrap().values::<i64>(),
            [-3, -3]
        );
    }
}
