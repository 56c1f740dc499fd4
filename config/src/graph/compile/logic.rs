//! Part of pass 3 for business-logic steps (validate, encode, decide, features): each step's
//! settings checked against the tensors it reads, and the tensors it produces.

use std::collections::BTreeMap;

use sluice_schemas::DataType;

use crate::config::{
    AllowedValue, CustomStepConfig, DecideConfig, EncodeOp, FeatureLayout, FeaturesConfig,
    RuleKind, StepKindConfig, TensorSpec, Unknown,
};
use crate::graph::StepKind;

/// The compiled kind of a business-logic step (`None` for models, joins and routers).
pub(super) fn kind(k: &StepKindConfig) -> Option<StepKind> {
    Some(match k {
        StepKindConfig::Validate(v) => StepKind::Validate(v.clone()),
        StepKindConfig::Encode(e) => StepKind::Encode(e.columns.clone(), e.output.clone()),
        StepKindConfig::Decide(d) => StepKind::Decide(d.clone()),
        StepKindConfig::Custom(c) => StepKind::Custom(c.clone()),
        StepKindConfig::Postgres(pg) => StepKind::Postgres(pg.clone()),
        StepKindConfig::Http(h) => StepKind::Http(h.clone()),
        StepKindConfig::DecodeImage(d) => {
            StepKind::DecodeImage(d.settings.clone(), d.output.clone())
        }
        StepKindConfig::Features(f) => StepKind::Features(f.clone()),
        StepKindConfig::Model(_)
        | StepKindConfig::Builtin(_)
        | StepKindConfig::Combine(_)
        | StepKindConfig::Route(_)
        | StepKindConfig::Bandit(_) => return None,
    })
}

fn numeric(d: DataType) -> bool {
    !matches!(d, DataType::Bytes | DataType::Fp16)
}

/// Elements per row of a [batch] or [batch, k] tensor; `None` for other ranks or a variable k.
fn row_width(spec: &TensorSpec) -> Option<usize> {
    match spec.shape.as_slice() {
        [_] => Some(1),
        [_, k] if *k >= 0 => usize::try_from(*k).ok(),
        _ => None,
    }
}

/// Checks a business-logic step; returns its outputs (problems go to `p`, each naming `skey`).
pub(super) fn outputs(
    skey: &str,
    kind: &StepKindConfig,
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) -> Vec<TensorSpec> {
    match kind {
        StepKindConfig::Validate(rules) => {
            validate(skey, rules, inputs, p);
            inputs.iter().map(|(n, spec)| named(n, spec)).collect()
        }
        StepKindConfig::Encode(e) => {
            let width = encode(skey, &e.columns, inputs, p);
            vec![spec(&e.output, DataType::Fp32, vec![-1, width as i64])]
        }
        StepKindConfig::Decide(d) => decide(skey, d, inputs, p),
        StepKindConfig::Features(f) => features(skey, f, inputs, p),
        StepKindConfig::Postgres(pg) => postgres(skey, pg, inputs, p),
        StepKindConfig::Http(h) => http(skey, h, inputs, p),
        StepKindConfig::DecodeImage(d) => decode_image(skey, &d.settings, &d.output, inputs, p),
        StepKindConfig::Custom(c) => custom(skey, c, p),
        StepKindConfig::Model(_)
        | StepKindConfig::Builtin(_)
        | StepKindConfig::Combine(_)
        | StepKindConfig::Route(_)
        | StepKindConfig::Bandit(_) => Vec::new(),
    }
}

/// `spec` under another name.
fn named(name: &str, spec: &TensorSpec) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        ..spec.clone()
    }
}

/// A decision: rules over numeric input columns, the inputs it keeps.
fn decide(
    skey: &str,
    d: &DecideConfig,
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) -> Vec<TensorSpec> {
    for (k, r) in d.rules.iter().enumerate() {
        let rkey = format!("{skey}.decide.rules[{k}]");
        match inputs.get(&r.input) {
            None => p.push(format!(
                "{rkey}: '{}' is not one of the step's inputs",
                r.input
            )),
            Some(t) if !numeric(t.datatype) => p.push(format!(
                "{rkey}: '{}' is {}, not numeric",
                r.input, t.datatype
            )),
            Some(t) => match row_width(t) {
                Some(w) if r.column < w => {}
                _ => p.push(format!(
                    "{rkey}: column {} is not in '{}' {:?}",
                    r.column, r.input, t.shape
                )),
            },
        }
        if !matches!(r.op.as_str(), ">" | ">=" | "<" | "<=" | "==" | "!=") {
            p.push(format!(
                "{rkey}.op: '{}' is not one of >, >=, <, <=, ==, !=",
                r.op
            ));
        }
    }
    if d.rules.is_empty() {
        p.push(format!("{skey}.decide.rules: at least one rule is needed"));
    }
    let mut out = vec![
        spec("decision", DataType::Bytes, vec![-1]),
        spec("rule", DataType::Bytes, vec![-1]),
    ];
    let keep: Vec<String> = match &d.keep {
        Some(k) => k.clone(),
        None => inputs.keys().cloned().collect(),
    };
    for k in keep {
        match inputs.get(&k) {
            Some(t) if k != "decision" && k != "rule" => out.push(named(&k, t)),
            Some(_) => p.push(format!(
                "{skey}.decide.keep: '{k}' clashes with the decision's own outputs"
            )),
            None => p.push(format!(
                "{skey}.decide.keep: '{k}' is not one of the step's inputs"
            )),
        }
    }
    out
}

/// A user step: a registered kind and declared outputs.
fn custom(skey: &str, c: &CustomStepConfig, p: &mut Vec<String>) -> Vec<TensorSpec> {
    if c.kind.is_empty() {
        p.push(format!("{skey}.custom.kind: names no step kind"));
    }
    if c.outputs.is_empty() {
        p.push(format!(
            "{skey}.custom.outputs: declare what the step produces"
        ));
    }
    c.outputs.clone()
}

fn validate(
    skey: &str,
    rules: &[crate::config::ValidationRule],
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) {
    for (k, r) in rules.iter().enumerate() {
        let rkey = format!("{skey}.validate[{k}]");
        if r.rule == RuleKind::Required && r.parameter.is_some() {
            if r.input.is_some() {
                p.push(format!("{rkey}: set input or parameter, not both"));
            }
            continue;
        }
        let Some(input) = &r.input else {
            p.push(format!("{rkey}: names no input"));
            continue;
        };
        let Some(t) = inputs.get(input) else {
            p.push(format!("{rkey}: '{input}' is not one of the step's inputs"));
            continue;
        };
        let bytes = t.datatype == DataType::Bytes;
        let problem = match r.rule {
            RuleKind::Range if r.min.is_none() && r.max.is_none() => Some("needs min or max"),
            RuleKind::Range | RuleKind::Finite if bytes => Some("needs a numeric input"),
            RuleKind::Length | RuleKind::Regex if !bytes => Some("needs a BYTES input"),
            RuleKind::Length | RuleKind::SequenceLength if r.min.is_none() && r.max.is_none() => {
                Some("needs min or max")
            }
            RuleKind::SequenceLength if t.shape.len() < 2 => Some("needs a [batch, n] input"),
            RuleKind::OneOf if r.values.is_empty() => Some("needs values"),
            RuleKind::OneOf
                if r.values
                    .iter()
                    .any(|v| matches!(v, AllowedValue::Text(_)) != bytes) =>
            {
                Some("values must be strings for a BYTES input and numbers otherwise")
            }
            RuleKind::Regex => match r.pattern.as_deref().map(regex::Regex::new) {
                None => Some("needs a pattern"),
                Some(Err(e)) => {
                    p.push(format!("{rkey}.pattern: {e}"));
                    None
                }
                Some(Ok(_)) => None,
            },
            _ => None,
        };
        if let Some(problem) = problem {
            p.push(format!("{rkey} ({:?} on '{input}'): {problem}", r.rule));
        }
    }
}

/// Checks an encode step's columns; returns the feature vector's width.
fn encode(
    skey: &str,
    columns: &[crate::config::EncodeColumn],
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) -> usize {
    let mut width = 0;
    if columns.is_empty() {
        p.push(format!("{skey}.encode: at least one column is needed"));
    }
    for (k, c) in columns.iter().enumerate() {
        let ckey = format!("{skey}.encode[{k}] ('{}')", c.input);
        let Some(t) = inputs.get(&c.input) else {
            p.push(format!("{ckey}: not one of the step's inputs"));
            continue;
        };
        let Some(w) = row_width(t) else {
            p.push(format!(
                "{ckey}: needs a [batch] or [batch, k] input with a fixed k, not {:?}",
                t.shape
            ));
            continue;
        };
        let mut text = t.datatype == DataType::Bytes;
        let mut out = w;
        for (j, op) in c.ops.iter().enumerate() {
            let last = j + 1 == c.ops.len();
            let categorical = matches!(
                op,
                EncodeOp::OneHot { .. } | EncodeOp::Ordinal { .. } | EncodeOp::Hash { .. }
            );
            if categorical && !last {
                p.push(format!(
                    "{ckey}: {} must be the column's last op",
                    op_name(op)
                ));
            }
            if !categorical && text {
                p.push(format!(
                    "{ckey}: {} needs numbers; the input is BYTES (encode it with one_hot, ordinal or hash)",
                    op_name(op)
                ));
            }
            match op {
                EncodeOp::Standardize { std, .. } if *std <= 0.0 || !std.is_finite() => {
                    p.push(format!("{ckey}: standardize needs std > 0"))
                }
                EncodeOp::MinMax { min, max } | EncodeOp::Clip { min, max } if min >= max => {
                    p.push(format!("{ckey}: {} needs min < max", op_name(op)))
                }
                EncodeOp::Bucketize { edges }
                    if edges.is_empty() || edges.windows(2).any(|e| e[0] >= e[1]) =>
                {
                    p.push(format!("{ckey}: bucketize needs increasing edges"))
                }
                EncodeOp::OneHot {
                    vocabulary,
                    unknown,
                } => {
                    let extra = usize::from(*unknown == Unknown::Bucket);
                    out = w * (vocabulary.len() + extra);
                    vocabulary_problems(&ckey, vocabulary, p);
                }
                EncodeOp::Ordinal { vocabulary, .. } => vocabulary_problems(&ckey, vocabulary, p),
                EncodeOp::Hash { buckets } => {
                    if *buckets == 0 {
                        p.push(format!("{ckey}: hash needs at least one bucket"));
                    }
                    out = *buckets;
                }
                _ => {}
            }
            if categorical {
                text = false;
            }
        }
        if text {
            p.push(format!(
                "{ckey}: a BYTES input needs a one_hot, ordinal or hash op"
            ));
        }
        width += out;
    }
    width
}

fn vocabulary_problems(ckey: &str, vocabulary: &[String], p: &mut Vec<String>) {
    if vocabulary.is_empty() {
        p.push(format!("{ckey}: the vocabulary is empty"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in vocabulary {
        if !seen.insert(v) {
            p.push(format!("{ckey}: '{v}' is in the vocabulary twice"));
        }
    }
}

fn op_name(op: &EncodeOp) -> &'static str {
    match op {
        EncodeOp::Standardize { .. } => "standardize",
        EncodeOp::MinMax { .. } => "min_max",
        EncodeOp::Log1p => "log1p",
        EncodeOp::Clip { .. } => "clip",
        EncodeOp::Bucketize { .. } => "bucketize",
        EncodeOp::OneHot { .. } => "one_hot",
        EncodeOp::Ordinal { .. } => "ordinal",
        EncodeOp::Hash { .. } => "hash",
    }
}

fn features(
    skey: &str,
    f: &FeaturesConfig,
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) -> Vec<TensorSpec> {
    let fkey = format!("{skey}.features");
    key_input(&format!("{fkey}.entity"), &f.entity, inputs, p);
    if f.layout == FeatureLayout::Feast {
        if f.project.as_deref().is_none_or(str::is_empty) {
            p.push(format!(
                "{fkey}.project: the feast layout needs the Feast project"
            ));
        }
        if !(1..=3).contains(&f.entity_key_version) {
            p.push(format!("{fkey}.entity_key_version: must be 1, 2 or 3"));
        }
    }
    if f.features.is_empty() {
        p.push(format!("{fkey}.features: at least one feature is needed"));
    }
    let mut out = Vec::new();
    for (k, feat) in f.features.iter().enumerate() {
        let key = format!("{fkey}.features[{k}] ('{}')", feat.name);
        if f.layout == FeatureLayout::Feast && feat.view.is_none() {
            p.push(format!("{key}: the feast layout needs the feature's view"));
        }
        lookup_output(&key, feat.datatype, feat.default.as_ref(), p);
        if out.iter().any(|o: &TensorSpec| o.name == feat.name) {
            p.push(format!("{key}: declared twice"));
        }
        let shape = match feat.length {
            Some(n) => vec![-1, n as i64],
            None => vec![-1],
        };
        out.push(spec(&feat.name, feat.datatype, shape));
    }
    out
}

fn postgres(
    skey: &str,
    pg: &crate::config::PostgresConfig,
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) -> Vec<TensorSpec> {
    let key = format!("{skey}.postgres");
    key_input(&format!("{key}.key"), &pg.key, inputs, p);
    if !pg.query.contains("$1") {
        p.push(format!("{key}.query: must use $1 (the batch's keys)"));
    }
    if pg.pool == 0 {
        p.push(format!("{key}.pool: must be at least 1"));
    }
    if pg.columns.is_empty() {
        p.push(format!("{key}.columns: at least one column is needed"));
    }
    let mut out = Vec::new();
    for (k, c) in pg.columns.iter().enumerate() {
        let ckey = format!("{key}.columns[{k}] ('{}')", c.name);
        if c.length.is_some() {
            p.push(format!("{ckey}: list columns are not supported"));
        }
        lookup_output(&ckey, c.datatype, c.default.as_ref(), p);
        out.push(spec(&c.name, c.datatype, vec![-1]));
    }
    out
}

fn http(
    skey: &str,
    h: &crate::config::HttpConfig,
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) -> Vec<TensorSpec> {
    let key = format!("{skey}.http");
    if !h.url.starts_with("http://") {
        p.push(format!(
            "{key}.url: only http:// URLs are supported, not '{}'",
            h.url
        ));
    }
    if !matches!(h.method.as_str(), "GET" | "POST") {
        p.push(format!("{key}.method: GET or POST, not '{}'", h.method));
    }
    // Every {name} in the URL must be an input.
    let mut rest = h.url.as_str();
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            p.push(format!("{key}.url: an unclosed '{{'"));
            break;
        };
        let name = &rest[open + 1..open + close];
        if !inputs.contains_key(name) {
            p.push(format!(
                "{key}.url: '{{{name}}}' is not one of the step's inputs"
            ));
        }
        rest = &rest[open + close + 1..];
    }
    for (name, t) in inputs {
        if row_width(t) != Some(1) {
            p.push(format!(
                "{key}: input '{name}' must hold one value per row ([batch] or [batch, 1]), not {:?}",
                t.shape
            ));
        }
    }
    if h.concurrency == 0 || h.breaker_failures == 0 {
        p.push(format!(
            "{key}: concurrency and breaker_failures must be at least 1"
        ));
    }
    if h.fields.is_empty() {
        p.push(format!("{key}.fields: at least one field is needed"));
    }
    h.fields
        .iter()
        .map(|f| {
            lookup_output(
                &format!("{key}.fields ('{}')", f.name),
                f.datatype,
                f.default.as_ref(),
                p,
            );
            spec(&f.name, f.datatype, vec![-1])
        })
        .collect()
}

fn decode_image(
    skey: &str,
    d: &crate::config::DecodeImageConfig,
    output: &str,
    inputs: &BTreeMap<String, TensorSpec>,
    p: &mut Vec<String>,
) -> Vec<TensorSpec> {
    let key = format!("{skey}.decode_image");
    match inputs.get(&d.input) {
        Some(t) if t.datatype == DataType::Bytes && row_width(t) == Some(1) => {}
        Some(t) => p.push(format!(
            "{key}.input: '{}' must be BYTES with one image per row, not {} {:?}",
            d.input, t.datatype, t.shape
        )),
        None => p.push(format!(
            "{key}.input: '{}' is not one of the step's inputs",
            d.input
        )),
    }
    let c = d.channels as usize;
    if !matches!(d.channels, 1 | 3) {
        p.push(format!("{key}.channels: 1 or 3"));
    }
    if d.width == 0 || d.height == 0 {
        p.push(format!("{key}: width and height must be at least 1"));
    }
    if !(d.mean.is_empty() || d.mean.len() == c) || !(d.std.is_empty() || d.std.len() == c) {
        p.push(format!(
            "{key}: mean and std need one value per channel ({c})"
        ));
    }
    if d.std.iter().any(|s| *s <= 0.0) || d.divide <= 0.0 {
        p.push(format!("{key}: std and divide must be > 0"));
    }
    if !matches!(d.filter.as_str(), "nearest" | "bilinear" | "lanczos3") {
        p.push(format!("{key}.filter: nearest, bilinear or lanczos3"));
    }
    let (w, h) = (i64::from(d.width), i64::from(d.height));
    let c = i64::from(d.channels);
    let shape = match d.layout.as_str() {
        "hwc" => vec![-1, h, w, c],
        "chw" => vec![-1, c, h, w],
        "flat" => vec![-1, h * w * c],
        other => {
            p.push(format!("{key}.layout: hwc, chw or flat, not '{other}'"));
            vec![-1]
        }
    };
    vec![spec(output, DataType::Fp32, shape)]
}

/// A lookup's key input: present, BYTES or an integer, one key per row.
fn key_input(key: &str, name: &str, inputs: &BTreeMap<String, TensorSpec>, p: &mut Vec<String>) {
    match inputs.get(name) {
        None => p.push(format!("{key}: '{name}' is not one of the step's inputs")),
        Some(t)
            if !matches!(t.datatype, DataType::Bytes | DataType::Int64 | DataType::Int32)
                || row_width(t) != Some(1) =>
        {
            p.push(format!(
                "{key}: '{name}' must be BYTES, INT64 or INT32 with one key per row ([batch] or [batch, 1]), not {} {:?}",
                t.datatype, t.shape
            ))
        }
        Some(_) => {}
    }
}

/// A looked-up value's output (feature, column, field): a datatype a lookup produces, and a
/// default that fits it.
fn lookup_output(
    key: &str,
    datatype: DataType,
    default: Option<&AllowedValue>,
    p: &mut Vec<String>,
) {
    if !matches!(
        datatype,
        DataType::Fp32
            | DataType::Fp64
            | DataType::Int64
            | DataType::Int32
            | DataType::Bool
            | DataType::Bytes
    ) {
        p.push(format!(
            "{key}: datatype {datatype} is not one a lookup produces (FP32, FP64, INT64, INT32, BOOL, BYTES)"
        ));
    }
    if let Some(why) = default.and_then(|d| d.misfit(datatype)) {
        p.push(format!("{key}.default: {why}"));
    }
}

fn spec(name: &str, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        datatype,
        shape,
    }
}
