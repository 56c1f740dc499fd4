//! A graph step as written in TOML: one flat table whose kind is the one kind key set
//! (`model`, `combine`, `features`, ...). [`StepConfig`] is parsed from it (exactly one kind,
//! no key of another kind) and printed back to it, so the file format stays flat while the code
//! works with one variant per kind.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::bandit::BanditConfig;
use super::graphs::{
    Builtin, CanaryConfig, CombineStep, Combiner, DecodeImageStep, EncodeStep, ModelStep,
    RouteConfig, StepConfig, StepKindConfig, TieRule,
};
use super::logic::{
    CustomStepConfig, DecideConfig, DecodeImageConfig, EncodeColumn, FeaturesConfig, HttpConfig,
    PostgresConfig, ValidationRule,
};

/// How long a combine step waits for every part after the first, unless set.
const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The flat table (field docs: [`StepConfig`] and the per-kind structs).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StepToml {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    builtin: Option<Builtin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    combine: Option<Combiner>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<RouteConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bandit: Option<BanditConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    validate: Option<Vec<ValidationRule>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encode: Option<Vec<EncodeColumn>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decide: Option<DecideConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    features: Option<FeaturesConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<PostgresConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<HttpConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_image: Option<DecodeImageConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom: Option<CustomStepConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    parts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    weights: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tie: Option<TieRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quorum: Option<usize>,
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary: Option<CanaryConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    shadow: Vec<String>,
    #[serde(default)]
    fused: bool,
    #[serde(default = "one")]
    workers: usize,
}

fn one() -> usize {
    1
}

impl TryFrom<StepToml> for StepConfig {
    type Error = String;

    fn try_from(mut t: StepToml) -> Result<StepConfig, String> {
        let who = format!("step '{}'", t.name);
        let mut kinds = t.take_kinds();
        let kind = match (kinds.pop(), kinds.is_empty()) {
            (Some(kind), true) => kind,
            _ => {
                return Err(format!(
                    "{who}: set exactly one of model, builtin, combine, route, bandit, validate, encode, decide, features, postgres, http, decode_image, custom"
                ));
            }
        };
        if let Some(key) = t.leftover_key() {
            return Err(format!(
                "{who}: '{key}' does not apply to a {} step",
                kind.key()
            ));
        }
        Ok(StepConfig {
            name: t.name,
            kind,
            after: t.after,
            inputs: t.inputs,
            fused: t.fused,
            workers: t.workers,
        })
    }
}

impl StepToml {
    /// Moves every kind set (and that kind's own keys) out of the table.
    fn take_kinds(&mut self) -> Vec<StepKindConfig> {
        use StepKindConfig as K;
        let mut kinds = Vec::new();
        if let Some(model) = self.model.take() {
            kinds.push(K::Model(ModelStep {
                model,
                canary: self.canary.take(),
                shadow: std::mem::take(&mut self.shadow),
            }));
        }
        if let Some(combiner) = self.combine.take() {
            kinds.push(K::Combine(CombineStep {
                combiner,
                parts: std::mem::take(&mut self.parts),
                output: self.output.take(),
                weights: std::mem::take(&mut self.weights),
                tie: self.tie.take().unwrap_or_default(),
                quorum: self.quorum.take(),
                timeout: self.timeout.take().unwrap_or(DEFAULT_JOIN_TIMEOUT),
            }));
        }
        if let Some(columns) = self.encode.take() {
            let output = self.output.take().unwrap_or_else(|| "features".into());
            kinds.push(K::Encode(EncodeStep { columns, output }));
        }
        if let Some(settings) = self.decode_image.take() {
            let output = self.output.take().unwrap_or_else(|| "pixels".into());
            kinds.push(K::DecodeImage(DecodeImageStep {
                settings: Box::new(settings),
                output,
            }));
        }
        kinds.extend(self.builtin.take().map(K::Builtin));
        kinds.extend(self.route.take().map(K::Route));
        kinds.extend(self.bandit.take().map(K::Bandit));
        kinds.extend(self.validate.take().map(K::Validate));
        kinds.extend(self.decide.take().map(K::Decide));
        kinds.extend(self.features.take().map(|f| K::Features(Box::new(f))));
        kinds.extend(self.postgres.take().map(|p| K::Postgres(Box::new(p))));
        kinds.extend(self.http.take().map(|h| K::Http(Box::new(h))));
        kinds.extend(self.custom.take().map(|c| K::Custom(Box::new(c))));
        kinds
    }

    /// A kind-specific key still set after the kind took its own.
    fn leftover_key(&self) -> Option<&'static str> {
        [
            ("parts", !self.parts.is_empty()),
            ("output", self.output.is_some()),
            ("weights", !self.weights.is_empty()),
            ("tie", self.tie.is_some()),
            ("quorum", self.quorum.is_some()),
            ("timeout", self.timeout.is_some()),
            ("canary", self.canary.is_some()),
            ("shadow", !self.shadow.is_empty()),
        ]
        .into_iter()
        .find_map(|(key, set)| set.then_some(key))
    }
}

impl From<StepConfig> for StepToml {
    fn from(s: StepConfig) -> StepToml {
        use StepKindConfig as K;
        let mut t = StepToml {
            name: s.name,
            after: s.after,
            inputs: s.inputs,
            fused: s.fused,
            workers: s.workers,
            ..StepToml::default()
        };
        match s.kind {
            K::Model(m) => {
                t.model = Some(m.model);
                t.canary = m.canary;
                t.shadow = m.shadow;
            }
            K::Combine(c) => {
                t.combine = Some(c.combiner);
                t.parts = c.parts;
                t.output = c.output;
                t.weights = c.weights;
                t.tie = Some(c.tie);
                t.quorum = c.quorum;
                t.timeout = Some(c.timeout);
            }
            K::Encode(e) => {
                t.encode = Some(e.columns);
                t.output = Some(e.output);
            }
            K::DecodeImage(d) => {
                t.decode_image = Some(*d.settings);
                t.output = Some(d.output);
            }
            K::Builtin(b) => t.builtin = Some(b),
            K::Route(r) => t.route = Some(r),
            K::Bandit(b) => t.bandit = Some(b),
            K::Validate(v) => t.validate = Some(v),
            K::Decide(d) => t.decide = Some(d),
            K::Features(f) => t.features = Some(*f),
            K::Postgres(p) => t.postgres = Some(*p),
            K::Http(h) => t.http = Some(*h),
            K::Custom(c) => t.custom = Some(*c),
        }
        t
    }
}
