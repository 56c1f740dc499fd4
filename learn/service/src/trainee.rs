//! What a learner process trains, behind one trait: a logistic regression's weights
//! ([`Learner`]) or a bandit's arms ([`Bandit`]); and the counts of what it learned.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_config::config::LearnerConfig;
use sluice_learn::{Bandit, BanditRecord, Learner, Outcome, PageHinkley, WeightsRecord};

/// What a learner process trains: a logistic regression's weights or a bandit's arms.
pub trait Trainee: Serialize + DeserializeOwned + Send {
    /// Its settings.
    type Settings: Sync;
    /// Updates learned so far (the version its snapshots carry).
    fn version(&self) -> u64;
    /// Learns what the join produced.
    fn learn(
        &mut self,
        settings: &Self::Settings,
        outcomes: Vec<Outcome>,
        counts: &mut LearnCounts,
        drift: &mut PageHinkley,
    );
    /// The snapshot published for the replicas of `name` (JSON).
    fn snapshot(&self, name: &str) -> serde_json::Result<Vec<u8>>;
    /// A summary for `--status` (`null` when there is nothing beyond the counts).
    fn summary(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Sets its own metrics (per arm, say); called when a changed state is published.
    fn record_metrics(&self, _name: &str) {}
}

/// A bandit's settings as its learner needs them.
pub struct BanditSettings {
    /// The bandit step's settings.
    pub settings: sluice_common::config::BanditConfig,
    /// Numbers per context row.
    pub dims: usize,
}

/// What the learner did with what it read (with the join's counts, in the checkpoint and
/// printed by `sluice learn --model M --status`).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(default)]
pub struct LearnCounts {
    /// Examples learned from feedback.
    pub learned: u64,
    /// Examples learned from a window that ended without feedback (`no_feedback_label`).
    pub learned_no_feedback: u64,
    /// Joined answers whose served prediction matched the truth.
    pub served_correct: u64,
    /// Joined answers with a truth to compare with.
    pub served_judged: u64,
    /// Records on the input topics that could not be decoded (skipped, logged).
    pub undecodable: u64,
    /// Weights snapshots published.
    pub snapshots: u64,
    /// Rises of the served error rate, or falls of a bandit's reward (Page-Hinkley, River's
    /// defaults).
    pub drifts: u64,
    /// Sum of the rewards joined (bandits).
    pub rewards: f64,
}

/// Feeds the drift detector one loss (1 = wrong, or no reward); counts and logs a detection.
fn watch_drift(drift: &mut PageHinkley, counts: &mut LearnCounts, loss: f64) {
    if drift.update(loss) {
        counts.drifts += 1;
        tracing::warn!(
            judged = counts.served_judged,
            drifts = counts.drifts,
            "drift: the served error rate rose"
        );
    }
}

impl Trainee for Learner {
    type Settings = LearnerConfig;

    fn version(&self) -> u64 {
        self.updates()
    }

    fn learn(
        &mut self,
        settings: &LearnerConfig,
        outcomes: Vec<Outcome>,
        counts: &mut LearnCounts,
        drift: &mut PageHinkley,
    ) {
        for o in outcomes {
            let (p, y, joined) = match o {
                Outcome::Joined(p, f) => {
                    let y = f.truth.or(f.reward);
                    if let Some(truth) = f.truth {
                        let right = (p.probability > 0.5) == (truth > 0.5);
                        counts.served_judged += 1;
                        counts.served_correct += u64::from(right);
                        watch_drift(drift, counts, if right { 0.0 } else { 1.0 });
                    }
                    (p, y, true)
                }
                Outcome::NoFeedback(p) => (p, settings.no_feedback_label, false),
            };
            let Some(y) = y else { continue };
            if settings.frozen_at(self.updates()) || p.features.len() != self.dims() {
                continue;
            }
            self.learn_with(&p.features, &p.hashed, y);
            if joined {
                counts.learned += 1;
            } else {
                counts.learned_no_feedback += 1;
            }
        }
    }

    fn snapshot(&self, name: &str) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&WeightsRecord {
            model: name.to_string(),
            time_ms: now_ms(),
            weights: self.weights(),
        })
    }
}

impl Trainee for Bandit {
    type Settings = BanditSettings;

    fn version(&self) -> u64 {
        Bandit::version(self)
    }

    fn learn(
        &mut self,
        b: &BanditSettings,
        outcomes: Vec<Outcome>,
        counts: &mut LearnCounts,
        drift: &mut PageHinkley,
    ) {
        for o in outcomes {
            let (p, reward, joined) = match o {
                Outcome::Joined(p, f) => (p, f.reward, true),
                Outcome::NoFeedback(p) => (p, b.settings.no_feedback_reward, false),
            };
            let Some(reward) = reward.map(|r| r.clamp(0.0, 1.0)) else {
                continue;
            };
            if joined {
                counts.rewards += reward;
                counts.served_judged += 1;
                watch_drift(drift, counts, 1.0 - reward);
            }
            if b.settings.frozen_at(Bandit::version(self)) {
                continue;
            }
            let Some(arm) = p.arm else { continue };
            self.forget(b.settings.discount);
            if Bandit::learn(self, &arm, &p.features, reward) {
                if joined {
                    counts.learned += 1;
                } else {
                    counts.learned_no_feedback += 1;
                }
            }
        }
    }

    fn snapshot(&self, name: &str) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&BanditRecord {
            graph: name.to_string(),
            time_ms: now_ms(),
            bandit: self.clone(),
        })
    }

    fn summary(&self) -> serde_json::Value {
        self.arms()
            .iter()
            .map(|a| {
                serde_json::json!({"arm": a.name, "rewards_learned": a.pulls, "mean_reward": a.mean()})
            })
            .collect()
    }

    fn record_metrics(&self, name: &str) {
        for a in self.arms() {
            let labels = [("graph", name.to_string()), ("arm", a.name.clone())];
            metrics::gauge!("sluice_bandit_arm_rewards_learned", &labels).set(a.pulls);
            metrics::gauge!("sluice_bandit_arm_mean_reward", &labels).set(a.mean());
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
