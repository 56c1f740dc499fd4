//! The learner and the weights it serves with.
//!
//! The update rules follow River's `preprocessing.StandardScaler |
//! linear_model.LogisticRegression(optimizer)` step for step (the scaler learns the example
//! first, the regression then learns the scaled example; the intercept by plain SGD; FTRL sets a
//! weight from its `z, n` before updating them), so a stream gives the same predictions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_config::config::{Algorithm, LearnerConfig};

/// The hashed feature of value `value` of categorical input `input`: murmur3 of
/// `"<input>=<value>"` (seed 0, scikit-learn FeatureHasher's naming) mod `buckets`.
pub fn hash_feature(input: &str, value: &[u8], buckets: u32) -> u32 {
    let mut name = Vec::with_capacity(input.len() + 1 + value.len());
    name.extend_from_slice(input.as_bytes());
    name.push(b'=');
    name.extend_from_slice(value);
    sluice_config::hash::murmur3_32(&name, 0) % buckets.max(1)
}

/// Running mean and variance per input (Welford), as River's `StandardScaler`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Scaler {
    count: f64,
    mean: Vec<f64>,
    var: Vec<f64>,
}

impl Scaler {
    fn new(d: usize) -> Scaler {
        Scaler {
            count: 0.0,
            mean: vec![0.0; d],
            var: vec![0.0; d],
        }
    }

    fn learn(&mut self, x: &[f64]) {
        self.count += 1.0;
        for ((m, v), &xi) in self.mean.iter_mut().zip(&mut self.var).zip(x) {
            let old = *m;
            *m += (xi - old) / self.count;
            *v += ((xi - old) * (xi - *m) - *v) / self.count;
        }
    }
}

/// The optimizer's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Optimizer {
    Ftrl {
        alpha: f64,
        beta: f64,
        l1: f64,
        l2: f64,
        z: Vec<f64>,
        n: Vec<f64>,
        /// (z, n) of each hashed feature seen.
        #[serde(default)]
        sparse: BTreeMap<u32, (f64, f64)>,
    },
    Sgd {
        learning_rate: f64,
        l2: f64,
    },
}

/// An online logistic regression over `d` dense inputs, with its scaler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Learner {
    scaler: Option<Scaler>,
    weights: Vec<f64>,
    /// Weights of the hashed categorical features seen (indicators, not scaled).
    #[serde(default)]
    hashed: BTreeMap<u32, f64>,
    intercept: f64,
    intercept_lr: f64,
    optimizer: Optimizer,
    /// Examples learned so far (the weights' version).
    updates: u64,
}

impl Learner {
    /// A learner with zero weights over `d` inputs.
    pub fn new(config: &LearnerConfig, d: usize) -> Learner {
        let optimizer = match config.algorithm {
            Algorithm::Ftrl => Optimizer::Ftrl {
                alpha: config.alpha,
                beta: config.beta,
                l1: config.l1,
                l2: config.l2(),
                z: vec![0.0; d],
                n: vec![0.0; d],
                sparse: BTreeMap::new(),
            },
            Algorithm::Sgd => Optimizer::Sgd {
                learning_rate: config.learning_rate,
                l2: config.l2(),
            },
        };
        Learner {
            scaler: config.scale.then(|| Scaler::new(d)),
            weights: vec![0.0; d],
            hashed: BTreeMap::new(),
            intercept: 0.0,
            intercept_lr: config.intercept_lr,
            optimizer,
            updates: 0,
        }
    }

    /// A learner starting from served weights (a warm start): the same predictions, with the
    /// optimizer's history reset.
    pub fn from_weights(config: &LearnerConfig, w: &Weights) -> Learner {
        let mut l = Learner::new(config, w.weights.len());
        l.weights.clone_from(&w.weights);
        l.hashed.clone_from(&w.hashed);
        l.intercept = w.intercept;
        l.updates = w.version;
        if let Some(s) = l.scaler.as_mut() {
            s.mean.clone_from(&w.mean);
            s.var = w.std.iter().map(|sd| sd * sd).collect();
            s.count = w.scaled_count;
        }
        if let Optimizer::Ftrl {
            alpha,
            beta,
            l2,
            l1,
            z,
            sparse,
            ..
        } = &mut l.optimizer
        {
            // z that gives back the same weights with no gradient history (n = 0).
            let z_of = |wi: f64| -wi * (*beta / *alpha + *l2) - wi.signum() * *l1;
            for (zi, &wi) in z.iter_mut().zip(&w.weights) {
                *zi = z_of(wi);
            }
            *sparse = w
                .hashed
                .iter()
                .map(|(&k, &wi)| (k, (z_of(wi), 0.0)))
                .collect();
        }
        l
    }

    /// Inputs the learner reads.
    pub fn dims(&self) -> usize {
        self.weights.len()
    }

    /// Examples learned so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// P(y = 1 | x) with the current weights.
    pub fn predict(&self, x: &[f64]) -> f64 {
        self.weights().predict(x)
    }

    /// Learns one example with label `y` (0 or 1).
    pub fn learn(&mut self, x: &[f64], y: f64) {
        self.learn_with(x, &[], y);
    }

    /// Learns one example of dense inputs `x` and hashed categorical features `hashed` (each
    /// an indicator, value 1) with label `y` (0 or 1).
    pub fn learn_with(&mut self, x: &[f64], hashed: &[u32], y: f64) {
        if let Some(s) = self.scaler.as_mut() {
            s.learn(x);
        }
        let x = scale(self.scaler.as_ref(), x);
        let raw = dot(&self.weights, &x)
            + hashed
                .iter()
                .map(|h| self.hashed.get(h).copied().unwrap_or(0.0))
                .sum::<f64>()
            + self.intercept;
        let loss_gradient = sigmoid(raw) - y;
        self.intercept -= self.intercept_lr * loss_gradient;
        match &mut self.optimizer {
            Optimizer::Sgd { learning_rate, l2 } => {
                for (w, xi) in self.weights.iter_mut().zip(&x) {
                    let g = loss_gradient * xi + *l2 * *w;
                    *w -= *learning_rate * g;
                }
                for h in hashed {
                    let w = self.hashed.entry(*h).or_insert(0.0);
                    *w -= *learning_rate * (loss_gradient + *l2 * *w);
                }
            }
            Optimizer::Ftrl {
                alpha,
                beta,
                l1,
                l2,
                z,
                n,
                sparse,
            } => {
                let ftrl = |w: &mut f64, z: &mut f64, n: &mut f64, xi: f64| {
                    if z.abs() > *l1 {
                        *w = -(*z - z.signum() * *l1) / ((*beta + n.sqrt()) / *alpha + *l2);
                    }
                    let g = loss_gradient * xi;
                    let s = ((*n + g * g).sqrt() - n.sqrt()) / *alpha;
                    *z += g - s * *w;
                    *n += g * g;
                };
                for i in 0..x.len() {
                    ftrl(&mut self.weights[i], &mut z[i], &mut n[i], x[i]);
                }
                for h in hashed {
                    let (zh, nh) = sparse.entry(*h).or_insert((0.0, 0.0));
                    let w = self.hashed.entry(*h).or_insert(0.0);
                    ftrl(w, zh, nh, 1.0);
                }
            }
        }
        self.updates += 1;
    }

    /// What a serving replica predicts with.
    pub fn weights(&self) -> Weights {
        let (mean, std, scaled_count) = match &self.scaler {
            Some(s) => (
                s.mean.clone(),
                s.var.iter().map(|v| v.sqrt()).collect(),
                s.count,
            ),
            None => (Vec::new(), Vec::new(), 0.0),
        };
        Weights {
            version: self.updates,
            mean,
            std,
            scaled_count,
            weights: self.weights.clone(),
            hashed: self.hashed.clone(),
            intercept: self.intercept,
        }
    }
}

/// Weights as published on `<prefix>.<model>.weights` (JSON, keyed by the model), and as a
/// `warm_start` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsRecord {
    /// The model.
    pub model: String,
    /// When the learner published it (ms since the epoch).
    pub time_ms: i64,
    /// The weights.
    pub weights: Weights,
}

/// A snapshot of a learner's weights: what every serving replica predicts with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Examples learned when it was taken.
    pub version: u64,
    /// The scaler's means (empty: inputs are not scaled).
    pub mean: Vec<f64>,
    /// The scaler's standard deviations.
    pub std: Vec<f64>,
    /// Examples the scaler has seen.
    #[serde(default)]
    pub scaled_count: f64,
    /// One weight per input.
    pub weights: Vec<f64>,
    /// Weights of the hashed categorical features seen (bucket → weight).
    #[serde(default)]
    pub hashed: BTreeMap<u32, f64>,
    /// The intercept.
    pub intercept: f64,
}

impl Weights {
    /// A `warm_start` file: a published [`WeightsRecord`] or bare [`Weights`], as JSON.
    pub fn read(path: &std::path::Path) -> Result<Weights, String> {
        let fail = |e: &dyn std::fmt::Display| format!("warm_start {}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
        serde_json::from_str::<WeightsRecord>(&text)
            .map(|r| r.weights)
            .or_else(|_| serde_json::from_str::<Weights>(&text))
            .map_err(|e| fail(&e))
    }

    /// Zero weights over `d` inputs (every prediction 0.5).
    pub fn zero(d: usize, scaled: bool) -> Weights {
        Weights {
            version: 0,
            mean: if scaled { vec![0.0; d] } else { Vec::new() },
            std: if scaled { vec![0.0; d] } else { Vec::new() },
            scaled_count: 0.0,
            weights: vec![0.0; d],
            hashed: BTreeMap::new(),
            intercept: 0.0,
        }
    }

    /// P(y = 1 | x).
    pub fn predict(&self, x: &[f64]) -> f64 {
        self.predict_with(x, &[])
    }

    /// P(y = 1 | x, hashed categorical features).
    pub fn predict_with(&self, x: &[f64], hashed: &[u32]) -> f64 {
        let mut raw = self.intercept
            + hashed
                .iter()
                .map(|h| self.hashed.get(h).copied().unwrap_or(0.0))
                .sum::<f64>();
        for (i, (&xi, w)) in x.iter().zip(&self.weights).enumerate() {
            let xi = match (self.mean.get(i), self.std.get(i)) {
                (Some(m), Some(&s)) if s > 0.0 => (xi - m) / s,
                (Some(_), Some(_)) => 0.0,
                _ => xi,
            };
            raw += w * xi;
        }
        sigmoid(raw)
    }

    /// P(y = 1 | x) for a row of FP32 inputs.
    pub fn predict_f32(&self, x: &[f32]) -> f64 {
        let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        self.predict(&x)
    }
}

fn scale(s: Option<&Scaler>, x: &[f64]) -> Vec<f64> {
    match s {
        None => x.to_vec(),
        Some(s) => x
            .iter()
            .zip(s.mean.iter().zip(&s.var))
            .map(|(xi, (m, v))| if *v > 0.0 { (xi - m) / v.sqrt() } else { 0.0 })
            .collect(),
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The logistic function, without overflow for large |z|.
fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_categories_are_learned_and_served_alongside_dense_inputs() {
        // The label is the user's (half the users click); the dense input is noise.
        for algorithm in ["ftrl", "sgd"] {
            let c = config(&format!(
                "algorithm = \"{algorithm}\"\nlearning_rate = 0.5\nalpha = 0.5\nhash_buckets = 4096"
            ));
            let mut l = Learner::new(&c, 1);
            let user = |t: usize| format!("u{}", (t * 7) % 40);
            let label = |t: usize| f64::from(u8::from(((t * 7) % 40).is_multiple_of(2)));
            let mut correct = 0;
            for t in 0..4000 {
                let h = [hash_feature("user", user(t).as_bytes(), c.hash_buckets)];
                let x = [(t % 13) as f64];
                if t >= 3000 {
                    let served = l.weights().predict_with(&x, &h);
                    correct += usize::from((served > 0.5) == (label(t) > 0.5));
                }
                l.learn_with(&x, &h, label(t));
            }
            assert!(correct > 980, "{algorithm}: {correct} of 1000");
            let w = l.weights();
            assert_eq!(w.hashed.len(), 40);
            let text = serde_json::to_string(&w).expect("weights as JSON");
            let back: Weights = serde_json::from_str(&text).expect("weights from JSON");
            assert_eq!(back.hashed.len(), w.hashed.len());
            for (k, v) in &w.hashed {
                assert!((back.hashed[k] - v).abs() < 1e-12);
            }
            // A warm start serves the same predictions.
            let warm = Learner::from_weights(&c, &w);
            let h = [hash_feature("user", b"u3", c.hash_buckets)];
            assert!(
                (warm.weights().predict_with(&[1.0], &h) - w.predict_with(&[1.0], &h)).abs()
                    < 1e-12
            );
        }
        assert_eq!(
            hash_feature("user", b"u1", 1 << 20),
            sluice_config::hash::murmur3_32(b"user=u1", 0) % (1 << 20)
        );
    }

    fn config(toml_text: &str) -> LearnerConfig {
        toml::from_str(toml_text).expect("learner config")
    }

    #[test]
    fn sgd_without_scaling_is_the_textbook_update() {
        let c =
            config("algorithm = \"sgd\"\nlearning_rate = 0.5\nscale = false\nintercept_lr = 0.5");
        let mut l = Learner::new(&c, 2);
        assert!((l.predict(&[1.0, 2.0]) - 0.5).abs() < 1e-12);
        l.learn(&[1.0, 2.0], 1.0);
        // g = 0.5 - 1 = -0.5: w = 0.25 * x, b = 0.25.
        let w = l.weights();
        assert_eq!(w.weights, vec![0.25, 0.5]);
        assert_eq!(w.intercept, 0.25);
        assert_eq!(w.version, 1);
        let raw: f64 = 0.25 + 0.25 + 1.0;
        assert!((l.predict(&[1.0, 2.0]) - 1.0 / (1.0 + (-raw).exp())).abs() < 1e-12);
    }

    #[test]
    fn ftrl_learns_a_separable_stream_and_serves_what_it_learned() {
        let c = config("algorithm = \"ftrl\"");
        let mut l = Learner::new(&c, 2);
        let mut correct = 0;
        for t in 0..2000 {
            let x = [f64::from(t % 7) - 3.0, f64::from(t % 5) - 2.0];
            let y = if x[0] + x[1] > 0.0 { 1.0 } else { 0.0 };
            if t >= 1000 && (l.predict(&x) > 0.5) == (y == 1.0) {
                correct += 1;
            }
            l.learn(&x, y);
        }
        assert!(correct > 900, "{correct} of 1000");
        let w = l.weights();
        let x = [2.0, 1.0];
        assert!((w.predict(&x) - l.predict(&x)).abs() < 1e-12);
        let warm = Learner::from_weights(&c, &w);
        assert!((warm.predict(&x) - l.predict(&x)).abs() < 1e-9);
    }

    #[test]
    fn a_constant_input_scales_to_zero() {
        let c = config("algorithm = \"sgd\"");
        let mut l = Learner::new(&c, 1);
        for _ in 0..10 {
            l.learn(&[3.0], 1.0);
        }
        assert_eq!(l.weights().std, vec![0.0]);
        assert!(l.predict(&[100.0]) > 0.5);
    }
}
