//! Business-logic steps as written in config: validation rules, encodings, decisions and feature
//! lookups. Each is one field of a graph step (`validate`, `encode`, `decide`, `features`); the
//! graph compiler checks them against the tensors they read ([`crate::graph`]), the workers run
//! them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_schemas::{DataType, Number};

/// One validation rule (`validate = [{ input = "amount", rule = "range", min = 0 }, ...]`).
/// A request breaking any rule fails with 422 naming the input, the row and the rule; nothing
/// after the step runs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidationRule {
    /// The step input it checks (a key of the step's `inputs`); or, for `required`, the
    /// request parameter named by `parameter`.
    pub input: Option<String>,
    /// For `required`: a request parameter that must be present.
    pub parameter: Option<String>,
    /// What it checks.
    pub rule: RuleKind,
    /// `range`: smallest allowed value; `length`, `sequence_length`: fewest characters/elements.
    pub min: Option<f64>,
    /// `range`: largest allowed value; `length`, `sequence_length`: most characters/elements.
    pub max: Option<f64>,
    /// `one_of`: the allowed values (strings for BYTES inputs, numbers otherwise).
    #[serde(default)]
    pub values: Vec<AllowedValue>,
    /// `regex`: the pattern every element must match (use `^...$` to match whole strings).
    pub pattern: Option<String>,
}

/// The kinds of validation rule.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// The input has elements and none is empty (BYTES) or NaN (floats); or the named request
    /// parameter is present.
    Required,
    /// Every element is a number within `[min, max]` (either bound may be left out).
    Range,
    /// Every element is one of `values`.
    OneOf,
    /// Every element is a finite number (no NaN or ±Inf).
    Finite,
    /// Every BYTES element has between `min` and `max` characters.
    Length,
    /// Every BYTES element matches `pattern`.
    Regex,
    /// Each row has between `min` and `max` elements (the second dimension).
    SequenceLength,
}

/// A value written in the config (a `one_of` value, a default), in the TOML type it was
/// written as: `true`, `-3`, `2.5` or `"unknown"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum AllowedValue {
    /// A boolean.
    Bool(bool),
    /// An integer (kept exact).
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Text(String),
}

impl AllowedValue {
    /// The value as a number (booleans included); `None` for a string.
    pub fn number(&self) -> Option<Number> {
        match self {
            AllowedValue::Bool(b) => Some(Number::Bool(*b)),
            AllowedValue::Int(i) => Some(Number::Int(*i)),
            AllowedValue::Float(f) => Some(Number::Float(*f)),
            AllowedValue::Text(_) => None,
        }
    }

    /// Why this value cannot be a value of `datatype` (for a default checked at start-up), or
    /// `None` when it fits exactly: strings for BYTES, `true`/`false` for BOOL, integers in range
    /// for integer datatypes, numbers a float datatype holds exactly for FP32 and FP64.
    pub fn misfit(&self, datatype: DataType) -> Option<String> {
        match (self, datatype) {
            (AllowedValue::Text(_), DataType::Bytes) => None,
            (_, DataType::Bytes) => Some(format!("{self} is not a string (BYTES)")),
            (AllowedValue::Text(_), d) => Some(format!("{self} is a string, not {d}")),
            (AllowedValue::Int(0 | 1), DataType::Bool) => None,
            (AllowedValue::Int(_) | AllowedValue::Float(_), DataType::Bool) => {
                Some(format!("{self} is not a boolean: write true or false"))
            }
            (AllowedValue::Float(f), d) if d != DataType::Fp64 && d != DataType::Fp32 => {
                Some(format!("{f} is not an integer ({d})"))
            }
            (v, d) => {
                let n = v.number()?;
                n.push_element(d, &mut Vec::new())
                    .err()
                    .map(|e| e.to_string())
            }
        }
    }
}

impl std::fmt::Display for AllowedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllowedValue::Bool(b) => write!(f, "{b}"),
            AllowedValue::Int(i) => write!(f, "{i}"),
            AllowedValue::Float(n) => write!(f, "{n:?}"),
            AllowedValue::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// One column group of an `encode` step: an input, transformed by `ops` in order, becomes one
/// or more columns of the step's FP32 feature vector.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncodeColumn {
    /// The step input ([batch] or [batch, k]).
    pub input: String,
    /// Transforms, applied in order: numeric ones element by element, then at most one
    /// categorical one (`one_hot`, `ordinal`, `hash`), last.
    #[serde(default)]
    pub ops: Vec<EncodeOp>,
}

/// A transform of an encode column.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum EncodeOp {
    /// `(x - mean) / std` (scikit-learn's StandardScaler).
    Standardize {
        /// Mean.
        mean: f64,
        /// Standard deviation (> 0).
        std: f64,
    },
    /// `(x - min) / (max - min)` (scikit-learn's MinMaxScaler).
    MinMax {
        /// Value mapped to 0.
        min: f64,
        /// Value mapped to 1.
        max: f64,
    },
    /// `ln(1 + x)`.
    Log1p,
    /// Clamped to `[min, max]`.
    Clip {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// The index of the bucket `x` falls in: the number of edges `<= x` (numpy's `digitize`).
    Bucketize {
        /// Increasing bucket edges.
        edges: Vec<f64>,
    },
    /// One column per vocabulary entry, 1 where the element equals it (scikit-learn's
    /// OneHotEncoder with fixed categories).
    OneHot {
        /// The categories, in column order.
        vocabulary: Vec<String>,
        /// What an element outside the vocabulary becomes.
        #[serde(default)]
        unknown: Unknown,
    },
    /// The element's index in the vocabulary (scikit-learn's OrdinalEncoder); unknowns -1
    /// (or an error, or an extra index).
    Ordinal {
        /// The categories, in index order.
        vocabulary: Vec<String>,
        /// What an element outside the vocabulary becomes.
        #[serde(default)]
        unknown: Unknown,
    },
    /// The hashing trick for high-cardinality strings: `buckets` columns, each element adding
    /// ±1 to the column its MurmurHash3 picks (scikit-learn's FeatureHasher, string input,
    /// alternate signs).
    Hash {
        /// Number of columns.
        buckets: usize,
    },
}

/// What a categorical encoding does with a value outside its vocabulary.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    /// `one_hot`: all zeros; `ordinal`: -1.
    #[default]
    Ignore,
    /// An extra category after the vocabulary (`one_hot`: one more column).
    Bucket,
    /// The request fails with 422 naming the value.
    Error,
}

/// A decision step: rules turn scores (and any other inputs) into a business answer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecideConfig {
    /// Rules, tried in order per row; the first that holds decides.
    pub rules: Vec<DecisionRule>,
    /// The decision when no rule holds.
    pub otherwise: String,
    /// Inputs passed through to the answer next to `decision` and `rule` (default: all).
    pub keep: Option<Vec<String>>,
}

/// One decision rule: `input[column] <op> value` → `decision`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecisionRule {
    /// Rule name, reported in the `rule` output (default: `<input> <op> <value>`).
    pub name: Option<String>,
    /// The step input it reads ([batch] or [batch, k]).
    pub input: String,
    /// Which column of a [batch, k] input (default 0).
    #[serde(default)]
    pub column: usize,
    /// Comparison: `>`, `>=`, `<`, `<=`, `==`, `!=`.
    pub op: String,
    /// The threshold.
    pub value: f64,
    /// The answer when it holds.
    pub decision: String,
}

/// A feature lookup: entity keys from a request tensor, features from Redis, one pipelined
/// round trip per batch.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeaturesConfig {
    /// The step input holding one entity key per row ([batch] or [batch, 1]; BYTES, INT64 or
    /// INT32).
    pub entity: String,
    /// How features are laid out in Redis.
    #[serde(default)]
    pub layout: FeatureLayout,
    /// Redis URL (default: `redis.url`).
    pub redis: Option<String>,
    /// `sluice` layout: the hash key is this prefix plus the entity key.
    #[serde(default)]
    pub key_prefix: String,
    /// `feast` layout: the Feast project.
    pub project: Option<String>,
    /// `feast` layout: the entity's join key name (default: the `entity` input's name).
    pub join_key: Option<String>,
    /// `feast` layout: the join key's Feast value type (default from the tensor: BYTES →
    /// string, INT64 → int64, INT32 → int32).
    pub join_key_type: Option<JoinKeyType>,
    /// `feast` layout: entity key serialization version (3 from Feast 0.50; 1 or 2 for stores
    /// written by older Feast).
    #[serde(default = "three")]
    pub entity_key_version: u32,
    /// `feast` layout: features written longer ago than this count as missing.
    #[serde(with = "humantime_serde", default)]
    pub max_age: Option<Duration>,
    /// A missing entity or feature: its default, or a 422 naming it.
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Longest wait for Redis (capped by the request's deadline); past it the request fails
    /// with 503.
    #[serde(with = "humantime_serde", default = "default_lookup_timeout")]
    pub timeout: Duration,
    /// Longest wait for a new connection to Redis (capped by the request's deadline); the
    /// worker opens it at start, so a request waits for it only after Redis was down.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// The features, in output order.
    pub features: Vec<FeatureSpec>,
}

/// One looked-up feature, output as a tensor of its name.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Feature name (and output tensor name).
    pub name: String,
    /// `feast` layout: its feature view.
    pub view: Option<String>,
    /// Output datatype (FP32, FP64, INT64, INT32, BOOL or BYTES).
    pub datatype: DataType,
    /// List features: elements per row (output [batch, length]); scalars leave it out.
    pub length: Option<usize>,
    /// Used when the entity or the feature is missing (`on_missing = "default"`); without one,
    /// a missing value fails the request with 422.
    pub default: Option<AllowedValue>,
}

/// How features are laid out in Redis.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLayout {
    /// One hash per entity (`<key_prefix><entity>`), plain text fields named by feature.
    #[default]
    Sluice,
    /// What `feast materialize` writes (serialized entity key + project; murmur3 field names;
    /// protobuf values; `_ts:<view>` timestamps).
    Feast,
}

/// A Feast join key's value type.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JoinKeyType {
    /// STRING.
    String,
    /// INT64.
    Int64,
    /// INT32.
    Int32,
}

/// What a lookup does when an entity or a feature is missing.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// Each feature's `default` (a feature without one fails the request).
    #[default]
    Default,
    /// The request fails with 422 naming the entity and feature.
    Reject,
}

/// A PostgreSQL lookup: one parameterized query per batch (`$1` is the array of the batch's
/// keys), each declared column output as a tensor.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` (redacted in logs; set it from the
    /// environment with `SLUICE__GRAPHS__<G>__STEPS__<N>__POSTGRES__URL` or keep the password
    /// in `PGPASSWORD`).
    pub url: String,
    /// The query; `$1` is the keys (`text[]` for BYTES keys, `bigint[]` for INT64, `int[]` for
    /// INT32), e.g. `SELECT id, risk FROM merchants WHERE id = ANY($1)`.
    pub query: String,
    /// The step input holding one key per row.
    pub key: String,
    /// The result column matching the keys (default: the first column).
    pub key_column: Option<String>,
    /// Result columns to output, by name, each with its datatype and default.
    pub columns: Vec<FeatureSpec>,
    /// A missing row or NULL value: the column's default, or a 422.
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Statement timeout and longest wait for a query (capped by the request's deadline); past
    /// it, 503.
    #[serde(with = "humantime_serde", default = "default_query_timeout")]
    pub timeout: Duration,
    /// Longest wait for a new connection, its login and its prepared query (capped by the
    /// request's deadline); the worker opens its connections at start, so a request waits for
    /// one only after the database was down or dropped it.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Connections kept open.
    #[serde(default = "default_pool")]
    pub pool: usize,
}

fn default_query_timeout() -> Duration {
    Duration::from_millis(200)
}
fn default_pool() -> usize {
    4
}

/// An HTTP call step: an external JSON API called per row (a URL template) or per batch
/// (`{"instances": [...]}` → `{"predictions": [...]}`), its JSON fields mapped to tensors.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `http://host:port/path`; in `row` mode `{input}` is replaced by that input's value for
    /// the row (URL-encoded).
    pub url: String,
    /// `GET` or `POST` (`POST` sends the row's inputs as a JSON object; `batch` mode always posts).
    #[serde(default = "default_method")]
    pub method: String,
    /// `row`: one call per row; `batch`: one call per batch.
    #[serde(default)]
    pub mode: HttpMode,
    /// Per attempt.
    #[serde(with = "humantime_serde", default = "default_http_timeout")]
    pub timeout: Duration,
    /// Attempts after the first, for connection errors, timeouts and 5xx answers, while the
    /// request's deadline allows.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait before the first retry, doubling after each.
    #[serde(with = "humantime_serde", default = "default_backoff")]
    pub backoff: Duration,
    /// Calls in flight at most (per worker).
    #[serde(default = "default_http_concurrency")]
    pub concurrency: usize,
    /// Consecutive failed calls (after retries) that open the circuit: calls then fail at once
    /// with 503 until `open_for` has passed, when one call is let through to probe.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long the circuit stays open.
    #[serde(with = "humantime_serde", default = "default_open_for")]
    pub open_for: Duration,
    /// JSON fields of the answer (dotted paths) to output, each with its datatype and default.
    pub fields: Vec<HttpField>,
}

/// One field of an HTTP answer, output as a tensor.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpField {
    /// Output tensor name.
    pub name: String,
    /// Dotted path in the answer's JSON (default: `name`).
    pub path: Option<String>,
    /// FP32, FP64, INT64, INT32, BOOL or BYTES.
    pub datatype: DataType,
    /// Used when the field is missing or null; without one, that fails the request with 422.
    pub default: Option<AllowedValue>,
}

/// How an HTTP step calls its API.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HttpMode {
    /// One call per row.
    #[default]
    Row,
    /// One call per batch.
    Batch,
}

fn default_method() -> String {
    "GET".into()
}
fn default_http_timeout() -> Duration {
    Duration::from_millis(200)
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> Duration {
    Duration::from_millis(20)
}
fn default_http_concurrency() -> usize {
    32
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_open_for() -> Duration {
    Duration::from_secs(5)
}

/// Image decoding: PNG or JPEG bytes (one image per row) → a resized, normalized FP32 tensor.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecodeImageConfig {
    /// The BYTES input holding the encoded images.
    pub input: String,
    /// Output width in pixels (images of another size are resized).
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// 1 (grayscale) or 3 (RGB).
    #[serde(default = "one_channel")]
    pub channels: u32,
    /// Resizing filter: `nearest`, `bilinear` (default) or `lanczos3`.
    #[serde(default = "default_filter")]
    pub filter: String,
    /// Each pixel value (0–255) is divided by this first.
    #[serde(default = "default_divide")]
    pub divide: f64,
    /// Then per channel `(x - mean) / std`.
    #[serde(default)]
    pub mean: Vec<f64>,
    /// Per channel standard deviations.
    #[serde(default)]
    pub std: Vec<f64>,
    /// `hwc` ([batch, height, width, channels]), `chw` ([batch, channels, height, width]) or
    /// `flat` ([batch, height × width × channels], row-major HWC).
    #[serde(default = "default_layout")]
    pub layout: String,
}

fn one_channel() -> u32 {
    1
}
fn default_filter() -> String {
    "bilinear".into()
}
fn default_divide() -> f64 {
    255.0
}
fn default_layout() -> String {
    "hwc".into()
}

/// A user step: a kind registered by the binary that runs the worker
/// (`sluice_workers::registry::register`), its settings, and the outputs it declares.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CustomStepConfig {
    /// The registered kind.
    pub kind: String,
    /// Free-form settings handed to the step's builder.
    #[serde(default)]
    pub settings: serde_json::Value,
    /// The tensors the step produces (checked against what later steps read).
    pub outputs: Vec<super::TensorSpec>,
}

fn three() -> u32 {
    3
}
fn default_lookup_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
