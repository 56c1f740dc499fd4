//! Bandit routers: a graph step that picks one of several arm steps per request by a policy
//! learned from rewards (`bandit = { policy = ..., arms = [...] }`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::learn::LearnTiming;

/// A bandit router as written in config. Its learner (`sluice learn --model <graph>`) joins the
/// logged choices with the graph's feedback and publishes the policy's state; every replica of
/// the step chooses with the newest state.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BanditConfig {
    /// How the arm is chosen.
    pub policy: Policy,
    /// The steps it chooses among (each request goes to exactly one).
    pub arms: Vec<String>,
    /// `epsilon_greedy`: share of requests spread evenly over all arms.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// `linucb`: width of the confidence bound (more explores more).
    #[serde(default = "one")]
    pub alpha: f64,
    /// `epsilon_greedy` and `thompson`: every arm's counts are multiplied by this at each
    /// reward learned, so old rewards fade (1 = never forget; 0.995 remembers about the last
    /// 200): the policy follows a best arm that changes.
    #[serde(default = "one")]
    pub discount: f64,
    /// Most share of requests sent to an arm other than the one that looks best now (caps
    /// every policy's exploration; 0 = always the best-looking arm).
    #[serde(default = "one")]
    pub max_explore: f64,
    /// Keep choosing with the state learned so far, but stop learning (rewards are still
    /// joined and counted).
    #[serde(default)]
    pub frozen: bool,
    /// Learn only from the first this many rewards, then serve frozen.
    #[serde(default)]
    pub freeze_after: Option<u64>,
    /// How long a choice waits for its reward (and a reward for its choice).
    #[serde(with = "humantime_serde", default = "default_window")]
    pub window: Duration,
    /// A choice whose reward never came: learned as this reward (e.g. 0 for "no click"), or
    /// only counted when unset.
    #[serde(default)]
    pub no_feedback_reward: Option<f64>,
    /// Most choices and unmatched rewards held at once.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How often the learned state is published to the replicas (when it changed).
    #[serde(with = "humantime_serde", default = "default_snapshot_every")]
    pub snapshot_every: Duration,
    /// How often the learner's whole state is saved to Redis.
    #[serde(with = "humantime_serde", default = "default_checkpoint_every")]
    pub checkpoint_every: Duration,
}

/// A bandit's policy.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The arm with the best mean reward, and with probability ε an arm drawn uniformly.
    EpsilonGreedy,
    /// Beta-Bernoulli Thompson sampling: each arm with the probability that it is the best
    /// under its Beta(1 + rewards, 1 + misses) posterior.
    Thompson,
    /// LinUCB (Li et al. 2010, disjoint model) over the step's `context` input: the arm with
    /// the highest upper confidence bound on its linear reward estimate.
    Linucb,
}

impl Policy {
    /// Whether it reads a per-request context.
    pub fn contextual(self) -> bool {
        self == Policy::Linucb
    }
}

impl BanditConfig {
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

    /// What is wrong with it (`key` names it in messages); arms are checked by the graph
    /// compiler.
    pub fn problems(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.arms.len() < 2 {
            p.push(format!("{key}.arms: a bandit needs at least two arms"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &self.arms {
            if !seen.insert(a) {
                p.push(format!("{key}.arms: '{a}' is listed twice"));
            }
        }
        for (name, v) in [("epsilon", self.epsilon), ("max_explore", self.max_explore)] {
            if !(0.0..=1.0).contains(&v) {
                p.push(format!("{key}.{name}: must be within 0..=1"));
            }
        }
        if !(self.discount > 0.0 && self.discount <= 1.0) {
            p.push(format!("{key}.discount: must be within (0, 1]"));
        } else if self.discount < 1.0 && self.policy.contextual() {
            p.push(format!(
                "{key}.discount: applies to epsilon_greedy and thompson, not {:?}",
                self.policy
            ));
        }
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            p.push(format!("{key}.alpha: must be >= 0"));
        }
        if self
            .no_feedback_reward
            .is_some_and(|r| !(0.0..=1.0).contains(&r))
        {
            p.push(format!("{key}.no_feedback_reward: must be within 0..=1"));
        }
        p.extend(self.timing().problems(key));
        p
    }
}

fn one() -> f64 {
    1.0
}
fn default_epsilon() -> f64 {
    0.1
}
fn default_window() -> Duration {
    Duration::from_secs(30)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn settings_are_checked_and_typos_refused() {
        let ok: BanditConfig =
            toml::from_str("policy = \"thompson\"\narms = [\"a\", \"b\"]").unwrap();
        assert!(ok.problems("b").is_empty());
        assert_eq!(ok.max_explore, 1.0);
        let bad: BanditConfig = toml::from_str(
            "policy = \"epsilon_greedy\"\narms = [\"a\", \"a\"]\nepsilon = 2\nmax_explore = -1\nwindow = \"0s\"\nno_feedback_reward = 3",
        )
        .unwrap();
        let p = bad.problems("b");
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p[0].contains("listed twice"), "{p:?}");
        let typo = toml::from_str::<BanditConfig>("policy = \"ucb\"\narms = [\"a\", \"b\"]");
        assert!(typo.unwrap_err().to_string().contains("ucb"));
    }
}
