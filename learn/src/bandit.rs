//! Bandit policies over a graph's arm steps: what each arm has earned so far ([`Bandit`], the
//! state one learner updates and every replica chooses with) and the probability each arm gets
//! for a request. Replicas draw the arm from those probabilities, so the probability logged
//! with each choice is exactly the one it was drawn with (what off-policy evaluation needs).
//!
//! Policies: ε-greedy; Beta-Bernoulli Thompson sampling (each arm's probability is the chance
//! that its posterior draw is the highest, estimated once per published state by
//! [`Bandit::thompson_shares`]); LinUCB (Li et al. 2010, disjoint linear models with a ridge
//! prior). `max_explore` caps, for every policy, the share sent to arms other than the one
//! that looks best.

use serde::{Deserialize, Serialize};
use sluice_config::config::{BanditConfig, Policy};

/// What one arm has earned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    /// The arm's step.
    pub name: String,
    /// Rewards learned.
    pub pulls: f64,
    /// Their sum.
    pub reward: f64,
    /// LinUCB: A⁻¹ (d × d, row-major), A = I + Σ x xᵀ.
    a_inv: Vec<f64>,
    /// LinUCB: Σ r x.
    b: Vec<f64>,
}

impl Arm {
    fn new(name: &str, dims: usize) -> Arm {
        let mut a_inv = vec![0.0; dims * dims];
        for i in 0..dims {
            a_inv[i * dims + i] = 1.0;
        }
        Arm {
            name: name.to_string(),
            pulls: 0.0,
            reward: 0.0,
            a_inv,
            b: vec![0.0; dims],
        }
    }

    /// Mean reward learned (0 before any).
    pub fn mean(&self) -> f64 {
        if self.pulls > 0.0 {
            self.reward / self.pulls
        } else {
            0.0
        }
    }

    /// A⁻¹x.
    fn a_inv_x(&self, x: &[f64]) -> Vec<f64> {
        let d = x.len();
        (0..d)
            .map(|i| (0..d).map(|j| self.a_inv[i * d + j] * x[j]).sum())
            .collect()
    }

    /// LinUCB's estimate θ·x (θ = A⁻¹b) and its confidence width √(xᵀA⁻¹x).
    fn linear(&self, x: &[f64]) -> (f64, f64) {
        let u = self.a_inv_x(x);
        let mean = u.iter().zip(&self.b).map(|(a, b)| a * b).sum();
        let var: f64 = u.iter().zip(x).map(|(a, b)| a * b).sum();
        (mean, var.max(0.0).sqrt())
    }
}

/// A bandit's learned state: one entry per arm, in config order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bandit {
    arms: Vec<Arm>,
    dims: usize,
    updates: u64,
}

/// A bandit's state as published on `<prefix>.<graph>.weights` (JSON), newest last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanditRecord {
    /// The graph whose bandit this is.
    pub graph: String,
    /// When it was published (ms since the epoch).
    pub time_ms: i64,
    /// The state.
    pub bandit: Bandit,
}

impl Bandit {
    /// Nothing learned yet; `dims` numbers per context row (0 for a policy without context).
    pub fn new(arms: &[String], dims: usize) -> Bandit {
        Bandit {
            arms: arms.iter().map(|a| Arm::new(a, dims)).collect(),
            dims,
            updates: 0,
        }
    }

    /// This state fitted to (possibly changed) settings: arms kept by name in the configured
    /// order, new arms start empty, a changed context width starts the linear models afresh.
    pub fn aligned(self, arms: &[String], dims: usize) -> Bandit {
        let same_dims = self.dims == dims;
        let mut old = self.arms;
        Bandit {
            arms: arms
                .iter()
                .map(|name| match old.iter().position(|a| &a.name == name) {
                    Some(k) if same_dims => old.swap_remove(k),
                    Some(k) => Arm {
                        pulls: old[k].pulls,
                        reward: old[k].reward,
                        ..Arm::new(name, dims)
                    },
                    None => Arm::new(name, dims),
                })
                .collect(),
            dims,
            updates: self.updates,
        }
    }

    /// Rewards learned so far (the version replicas report).
    pub fn version(&self) -> u64 {
        self.updates
    }

    /// The arms, in config order.
    pub fn arms(&self) -> &[Arm] {
        &self.arms
    }

    /// Numbers per context row.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Learns `reward` for `arm` chosen on `context`; false (nothing learned) for an arm it
    /// does not have or a context of the wrong width.
    pub fn learn(&mut self, arm: &str, context: &[f64], reward: f64) -> bool {
        let d = self.dims;
        let Some(a) = self.arms.iter_mut().find(|a| a.name == arm) else {
            return false;
        };
        if context.len() != d || !reward.is_finite() {
            return false;
        }
        a.pulls += 1.0;
        a.reward += reward;
        if d > 0 {
            // Sherman–Morrison: (A + x xᵀ)⁻¹ = A⁻¹ − (A⁻¹x)(A⁻¹x)ᵀ / (1 + xᵀA⁻¹x).
            let u = a.a_inv_x(context);
            let denom = 1.0 + u.iter().zip(context).map(|(p, q)| p * q).sum::<f64>();
            for i in 0..d {
                for j in 0..d {
                    a.a_inv[i * d + j] -= u[i] * u[j] / denom;
                }
                a.b[i] += reward * context[i];
            }
        }
        self.updates += 1;
        true
    }

    /// Multiplies every arm's counts by `factor` (old rewards fade; ε-greedy and Thompson
    /// sampling only, the linear models keep theirs).
    pub fn forget(&mut self, factor: f64) {
        if factor < 1.0 {
            for a in &mut self.arms {
                a.pulls *= factor;
                a.reward *= factor;
            }
        }
    }

    /// The arm that looks best now (ties: the first listed). ε-greedy tries an arm with no
    /// reward yet before any other.
    pub fn greedy(&self, policy: Policy, context: &[f64]) -> usize {
        let score = |a: &Arm| match policy {
            Policy::EpsilonGreedy if a.pulls == 0.0 => f64::INFINITY,
            Policy::EpsilonGreedy => a.mean(),
            Policy::Thompson => (1.0 + a.reward) / (2.0 + a.pulls),
            Policy::Linucb => a.linear(context).0,
        };
        argmax(self.arms.iter().map(score))
    }

    /// For Thompson sampling: each arm's chance of drawing the highest sample from its
    /// Beta(1 + reward, 1 + pulls − reward) posterior, estimated from `draws` rounds.
    pub fn thompson_shares(&self, draws: usize, rng: &mut Rng) -> Vec<f64> {
        let mut wins = vec![0.0; self.arms.len()];
        for _ in 0..draws {
            let best = argmax(
                self.arms
                    .iter()
                    .map(|a| rng.beta(1.0 + a.reward, 1.0 + (a.pulls - a.reward).max(0.0))),
            );
            wins[best] += 1.0;
        }
        let n = draws.max(1) as f64;
        wins.iter().map(|w| w / n).collect()
    }

    /// The probability of each arm for a request with `context` (empty for a policy without
    /// one); `shares` are this state's [`Bandit::thompson_shares`] (Thompson only). Sums to 1.
    pub fn probabilities(
        &self,
        settings: &BanditConfig,
        context: &[f64],
        shares: &[f64],
    ) -> Vec<f64> {
        let k = self.arms.len();
        if k == 0 {
            return Vec::new();
        }
        let g = self.greedy(settings.policy, context);
        let cap = settings.max_explore.clamp(0.0, 1.0);
        let mut p = vec![0.0; k];
        match settings.policy {
            Policy::EpsilonGreedy => {
                // Other arms get ε(k−1)/k in all; capped at max_explore.
                let most = if k > 1 {
                    cap * k as f64 / (k - 1) as f64
                } else {
                    0.0
                };
                let eps = settings.epsilon.min(most).clamp(0.0, 1.0);
                p.iter_mut().for_each(|x| *x = eps / k as f64);
                p[g] += 1.0 - eps;
            }
            Policy::Thompson if shares.len() == k => {
                let explore = 1.0 - shares[g];
                // Follow the posterior with probability r, else the greedy arm, so that the
                // other arms get r · explore ≤ cap.
                let r = if explore > cap { cap / explore } else { 1.0 };
                for (x, s) in p.iter_mut().zip(shares) {
                    *x = r * s;
                }
                p[g] += 1.0 - r;
            }
            Policy::Thompson => p[g] = 1.0,
            Policy::Linucb => {
                let ucb = argmax(self.arms.iter().map(|a| {
                    let (mean, width) = a.linear(context);
                    mean + settings.alpha * width
                }));
                if ucb == g {
                    p[g] = 1.0;
                } else {
                    p[ucb] = cap;
                    p[g] = 1.0 - cap;
                }
            }
        }
        p
    }
}

/// The index of the largest value (the first of equals); 0 for none.
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// A small, fast pseudo-random generator (SplitMix64) with the draws the policies need.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded with `seed` (the same seed gives the same draws).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the clock and the process id (different in every replica).
    pub fn from_entropy() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(nanos ^ (u64::from(std::process::id()) << 32))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Gamma(shape, 1) (Marsaglia and Tsang 2000).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.uniform();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.uniform();
            if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
                return d * v;
            }
        }
    }

    /// Beta(a, b).
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y > 0.0 { x / (x + y) } else { 0.5 }
    }

    /// An index drawn with the given probabilities (which sum to 1).
    pub fn pick(&mut self, probabilities: &[f64]) -> usize {
        let mut u = self.uniform();
        for (i, p) in probabilities.iter().enumerate() {
            if u < *p {
                return i;
            }
            u -= p;
        }
        probabilities.iter().rposition(|p| *p > 0.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings(policy: &str, extra: &str) -> BanditConfig {
        toml::from_str(&format!(
            "policy = \"{policy}\"\narms = [\"a\", \"b\", \"c\"]\n{extra}"
        ))
        .unwrap()
    }

    /// Plays `rounds` Bernoulli rewards with per-arm success rates `p(t)` and returns the
    /// policy's total reward, learning after every `delay` rounds (a snapshot's lag), with the
    /// policy's discount.
    fn play(
        s: &BanditConfig,
        rounds: usize,
        delay: usize,
        p: impl Fn(usize) -> [f64; 3],
        seed: u64,
    ) -> f64 {
        let mut rng = Rng::seeded(seed);
        let mut served = Bandit::new(&s.arms, 0);
        let mut learner = served.clone();
        let mut shares = served.thompson_shares(2000, &mut rng);
        let mut total = 0.0;
        for t in 0..rounds {
            if t % delay == 0 {
                served = learner.clone();
                shares = served.thompson_shares(2000, &mut rng);
            }
            let probs = served.probabilities(s, &[], &shares);
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{probs:?}");
            let arm = rng.pick(&probs);
            let r = f64::from(u8::from(rng.uniform() < p(t)[arm]));
            total += r;
            learner.forget(s.discount);
            learner.learn(&s.arms[arm], &[], r);
        }
        total
    }

    #[test]
    fn policies_beat_uniform_by_far_and_stay_near_the_best_arm() {
        let rates = |_| [0.3, 0.5, 0.7];
        let rounds = 5000;
        let best = 0.7 * rounds as f64;
        let uniform_regret = best - 0.5 * rounds as f64; // 1000
        for (policy, extra) in [("epsilon_greedy", "epsilon = 0.1"), ("thompson", "")] {
            let s = settings(policy, extra);
            let regret = best - play(&s, rounds, 20, rates, 7);
            assert!(
                regret < 0.25 * uniform_regret,
                "{policy}: regret {regret} vs uniform {uniform_regret}"
            );
        }
    }

    #[test]
    fn thompson_follows_the_best_arm_when_it_changes() {
        // Arm c is best for the first half, arm a for the second.
        let rates = |t: usize| {
            if t < 3000 {
                [0.2, 0.4, 0.8]
            } else {
                [0.8, 0.4, 0.2]
            }
        };
        let s = settings("thompson", "");
        let got = play(&s, 6000, 20, rates, 3);
        // Best fixed arm over the whole stream earns 0.5 per round; uniform 0.467.
        assert!(got > 0.55 * 6000.0, "earned {got}");
        // Forgetting old rewards follows the change sooner: more reward after it.
        let after = |s: &BanditConfig| play(s, 6000, 20, rates, 3) - play(s, 3000, 20, rates, 3);
        let discounted = settings("thompson", "discount = 0.99");
        let (plain, fading) = (after(&s), after(&discounted));
        assert!(
            fading > plain + 100.0,
            "after the change: {plain} plain, {fading} discounted"
        );
    }

    #[test]
    fn exploration_is_capped_and_probabilities_match_the_policy() {
        let s = settings("epsilon_greedy", "epsilon = 0.3");
        let mut b = Bandit::new(&s.arms, 0);
        for (arm, r) in [("a", 0.0), ("b", 1.0), ("c", 0.0)] {
            b.learn(arm, &[], r);
        }
        let p = b.probabilities(&s, &[], &[]);
        assert!(
            (p[1] - 0.8).abs() < 1e-12 && (p[0] - 0.1).abs() < 1e-12,
            "{p:?}"
        );
        let capped = settings("epsilon_greedy", "epsilon = 0.3\nmax_explore = 0.05");
        let p = b.probabilities(&capped, &[], &[]);
        assert!((p[0] + p[2] - 0.05).abs() < 1e-12, "{p:?}");
        let ts = settings("thompson", "max_explore = 0.1");
        let shares = [0.3, 0.4, 0.3];
        let p = b.probabilities(&ts, &[], &shares);
        assert!((p[0] + p[2] - 0.1).abs() < 1e-12, "{p:?}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let none = settings("thompson", "max_explore = 0");
        assert_eq!(b.probabilities(&none, &[], &shares), vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn thompson_shares_match_a_closed_form() {
        // Two arms: Beta(2, 1) vs Beta(1, 1); P(X > Y) = 2/3.
        let mut b = Bandit::new(&["x".into(), "y".into()], 0);
        b.learn("x", &[], 1.0);
        let shares = b.thompson_shares(200_000, &mut Rng::seeded(1));
        assert!((shares[0] - 2.0 / 3.0).abs() < 0.005, "{shares:?}");
    }

    #[test]
    fn linucb_learns_which_arm_suits_which_context() {
        let s = settings("linucb", "alpha = 0.5");
        let mut b = Bandit::new(&s.arms, 2);
        let mut rng = Rng::seeded(11);
        let mut regret = 0.0;
        for t in 0..3000 {
            // Context e0 → arm a pays 0.9; e1 → arm c pays 0.9; everything else 0.1.
            let ctx = if t % 2 == 0 { [1.0, 0.0] } else { [0.0, 1.0] };
            let best = if t % 2 == 0 { 0 } else { 2 };
            let probs = b.probabilities(&s, &ctx, &[]);
            let arm = rng.pick(&probs);
            let rate = if arm == best { 0.9 } else { 0.1 };
            regret += 0.9 - rate;
            let r = f64::from(u8::from(rng.uniform() < rate));
            b.learn(&s.arms[arm], &ctx, r);
        }
        // The best fixed arm would lose 0.8 on half the rounds: 1,200.
        assert!(regret < 150.0, "regret {regret}");
        assert_eq!(b.greedy(Policy::Linucb, &[1.0, 0.0]), 0);
        assert_eq!(b.greedy(Policy::Linucb, &[0.0, 1.0]), 2);
    }

    #[test]
    fn state_follows_changed_arms_and_refuses_what_it_cannot_learn() {
        let mut b = Bandit::new(&["a".into(), "b".into()], 1);
        assert!(b.learn("a", &[1.0], 1.0));
        assert!(!b.learn("z", &[1.0], 1.0));
        assert!(!b.learn("a", &[1.0, 2.0], 1.0));
        let b = b.aligned(&["b".into(), "a".into(), "c".into()], 1);
        assert_eq!(b.arms()[1].pulls, 1.0);
        assert_eq!(b.arms()[2].pulls, 0.0);
        assert_eq!(b.version(), 1);
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Bandit>(&text).unwrap(), b);
    }
}
