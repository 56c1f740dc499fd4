//! Online learners: a model whose weights are learned from feedback while it serves.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a learner model learns (`[models.<name>.learner]`): a logistic regression over the
/// model's one FP32 input `[-1, d]`, optionally standardized online, updated by one learner
/// process from predictions joined with feedback.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LearnerConfig {
    /// The update rule: `ftrl` (FTRL-Proximal, McMahan et al. 2013) or `sgd`.
    pub algorithm: Algorithm,
    /// FTRL's learning rate α.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// FTRL's smoothing β.
    #[serde(default = "one")]
    pub beta: f64,
    /// FTRL's L1 strength.
    #[serde(default)]
    pub l1: f64,
    /// L2 strength (default 1 for FTRL, 0 for SGD, as River's).
    #[serde(default)]
    pub l2: Option<f64>,
    /// SGD's learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Standardize each input online (running mean and variance) before the regression.
    #[serde(default = "yes")]
    pub scale: bool,
    /// Learning rate of the intercept (plain SGD, as River does, whatever the weights' rule).
    #[serde(default = "default_intercept_lr")]
    pub intercept_lr: f64,
    /// How long a prediction waits for its feedback (and feedback for its prediction).
    #[serde(with = "humantime_serde", default = "default_window")]
    pub window: Duration,
    /// A prediction whose feedback never came: learned as this label (e.g. 0 for "no click
    /// is a negative"), or only counted when unset.
    #[serde(default)]
    pub no_feedback_label: Option<f64>,
    /// Most predictions and unmatched feedback held at once; past it the oldest are resolved
    /// early (as if their window had ended) and counted.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How often new weights are published to the serving replicas (when they changed).
    #[serde(with = "humantime_serde", default = "default_snapshot_every")]
    pub snapshot_every: Duration,
    /// How often the learner's whole state (weights, join state, read positions, counts) is
    /// saved to Redis, where a restarted learner resumes from.
    #[serde(with = "humantime_serde", default = "default_checkpoint_every")]
    pub checkpoint_every: Duration,
    /// Weights to start from (a weights snapshot's JSON) when no checkpoint exists; relative
    /// to the config file.
    #[serde(default)]
    pub warm_start: Option<PathBuf>,
    /// Serve the weights but stop learning (feedback is still joined and counted).
    #[serde(default)]
    pub frozen: bool,
    /// Learn only the first this many examples, then serve frozen: a static baseline trained
    /// on the start of the stream.
    #[serde(default)]
    pub freeze_after: Option<u64>,
    /// Buckets categorical (BYTES) inputs are hashed into: each value `v` of input `name` is
    /// the indicator feature murmur3("name=v") mod `hash_buckets` (scikit-learn's
    /// FeatureHasher naming), with a weight of its own once seen.
    #[serde(default = "default_hash_buckets")]
    pub hash_buckets: u32,
}

/// A learner loop's clock and bounds (a learner model's or a bandit's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnTiming {
    /// How long a prediction waits for its feedback (and feedback for its prediction).
    pub window: Duration,
    /// Most predictions and unmatched feedback held at once.
    pub max_pending: usize,
    /// How often the learned state is published to the serving replicas.
    pub snapshot_every: Duration,
    /// How often the learner's whole state is saved to Redis.
    pub checkpoint_every: Duration,
}

impl LearnTiming {
    /// What is wrong with it (`key` names the settings in messages).
    pub fn problems(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (name, d) in [
            ("window", self.window),
            ("snapshot_every", self.snapshot_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if d.is_zero() {
                p.push(format!("{key}.{name}: must be > 0"));
            }
        }
        if self.max_pending == 0 {
            p.push(format!("{key}.max_pending: must be at least 1"));
        }
        p
    }
}

impl LearnerConfig {
    /// The learner loop's clock and bounds.
    pub fn timing(&self) -> LearnTiming {
        LearnTiming {
            window: self.window,
            max_pending: self.max_pending,
            snapshot_every: self.snapshot_every,
            checkpoint_every: self.checkpoint_every,
        }
    }

    /// Whether the learner stops after `learned` updates.
    pub fn frozen_at(&self, learned: u64) -> bool {
        self.frozen || self.freeze_after.is_some_and(|n| learned >= n)
    }

    /// The L2 strength in effect.
    pub fn l2(&self) -> f64 {
        self.l2.unwrap_or(match self.algorithm {
            Algorithm::Ftrl => 1.0,
            Algorithm::Sgd => 0.0,
        })
    }
}

/// A learner's update rule.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// FTRL-Proximal (McMahan et al. 2013), River's defaults.
    Ftrl,
    /// Plain stochastic gradient descent.
    Sgd,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn default_alpha() -> f64 {
    0.05
}
fn default_lr() -> f64 {
    0.01
}
fn default_intercept_lr() -> f64 {
    0.01
}
fn default_window() -> Duration {
    Duration::from_secs(30)
}
fn default_hash_buckets() -> u32 {
    1 << 20
}
fn default_max_pending() -> usize {
    100_000
}
fn default_snapshot_every() -> Duration {
    Duration::from_millis(100)
}
fn default_checkpoint_every() -> Duration {
    Duration::from_secs(1)
}

/// The outputs a learner model may declare: name, datatype.
pub const LEARNER_OUTPUTS: [(&str, sluice_schemas::DataType); 3] = [
    ("probability", sluice_schemas::DataType::Fp32),
    ("label", sluice_schemas::DataType::Int64),
    ("weights_version", sluice_schemas::DataType::Int64),
];

/// What is wrong with model `key`'s choice of ONNX file or learner, and with its learner.
pub(super) fn problems(key: &str, m: &super::ModelConfig) -> Vec<String> {
    let mut p = Vec::new();
    let Some(l) = &m.learner else {
        if m.onnx.is_none() {
            p.push(format!("{key}: set `onnx` (a model file) or `learner`"));
        }
        return p;
    };
    if m.onnx.is_some() {
        p.push(format!("{key}: set `onnx` or `learner`, not both"));
    }
    let dense = |i: &&super::TensorSpec| {
        i.datatype == sluice_schemas::DataType::Fp32 && i.shape.len() == 2 && i.shape[1] > 0
    };
    let categorical = |i: &&super::TensorSpec| {
        i.datatype == sluice_schemas::DataType::Bytes && i.shape.len() == 2
    };
    let fits = m.inputs.iter().all(|i| dense(&i) || categorical(&i))
        && m.inputs.iter().filter(dense).count() <= 1
        && !m.inputs.is_empty();
    if !fits {
        p.push(format!(
            "{key}.inputs: a learner reads at most one FP32 input of shape [-1, d] (d fixed) and any BYTES inputs of shape [-1, k] (categorical values, hashed)"
        ));
    }
    if l.hash_buckets == 0 {
        p.push(format!("{key}.learner.hash_buckets: must be at least 1"));
    }
    for o in &m.outputs {
        let known = LEARNER_OUTPUTS
            .iter()
            .any(|(n, t)| *n == o.name && *t == o.datatype && o.shape == [-1, 1]);
        if !known {
            p.push(format!(
                "{key}.outputs.{}: a learner outputs probability (FP32), label (INT64) and weights_version (INT64), each of shape [-1, 1]",
                o.name
            ));
        }
    }
    p.extend(l.timing().problems(&format!("{key}.learner")));
    let positive = l.alpha > 0.0 && l.learning_rate > 0.0;
    let penalties = [l.beta, l.l1, l.l2(), l.intercept_lr];
    if !positive || !penalties.iter().all(|&v| v >= 0.0) {
        p.push(format!(
            "{key}.learner: rates must be > 0 and penalties >= 0"
        ));
    }
    if l.no_feedback_label.is_some_and(|y| y != 0.0 && y != 1.0) {
        p.push(format!("{key}.learner.no_feedback_label: must be 0 or 1"));
    }
    p
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn problems_of(model: &str) -> Vec<String> {
        let m: super::super::ModelConfig = toml::from_str(model).unwrap();
        problems("models.m", &m)
    }

    const IO: &str = "max_batch_size = 8\ninputs = [{ name = \"x\", datatype = \"FP32\", shape = [-1, 3] }]\noutputs = [{ name = \"probability\", datatype = \"FP32\", shape = [-1, 1] }]\n";

    #[test]
    fn a_model_is_a_file_or_a_learner_and_a_learner_reads_one_dense_row() {
        assert!(problems_of(&format!("{IO}learner = {{ algorithm = \"ftrl\" }}")).is_empty());
        assert!(problems_of(IO)[0].contains("set `onnx`"));
        let both = problems_of(&format!(
            "onnx = \"m.onnx\"\n{IO}learner = {{ algorithm = \"sgd\" }}"
        ));
        assert!(both[0].contains("not both"), "{both:?}");
        let wide = IO.replace("[-1, 3]", "[-1, -1]");
        let p = problems_of(&format!("{wide}learner = {{ algorithm = \"sgd\" }}"));
        assert!(p[0].contains("at most one FP32 input"), "{p:?}");
        let mixed = IO.replace(
            "inputs = [{",
            "inputs = [{ name = \"user\", datatype = \"BYTES\", shape = [-1, 1] }, {",
        );
        let p = problems_of(&format!("{mixed}learner = {{ algorithm = \"ftrl\" }}"));
        assert!(p.is_empty(), "{p:?}");
        let odd = IO.replace("probability", "score");
        let p = problems_of(&format!("{odd}learner = {{ algorithm = \"sgd\" }}"));
        assert!(p[0].contains("outputs.score"), "{p:?}");
        let p = problems_of(&format!(
            "{IO}learner = {{ algorithm = \"sgd\", learning_rate = 0, window = \"0s\", no_feedback_label = 0.5 }}"
        ));
        assert_eq!(p.len(), 3, "{p:?}");
        let typo: Result<super::super::ModelConfig, _> = toml::from_str(&format!(
            "{IO}learner = {{ algorithm = \"sgd\", alpah = 1 }}"
        ));
        assert!(typo.unwrap_err().to_string().contains("alpah"));
    }
}
