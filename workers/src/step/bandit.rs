//! A bandit router's step: per request it draws one arm from the policy's probabilities under
//! the newest state its learner published (`<prefix>.<graph>.weights`), logs the choice with
//! its probability and context to `<prefix>.<graph>.predictions` (acknowledged before the
//! request moves on), and outputs `arm` (the arm step's name, which the graph routes by) and
//! `probability`.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use sluice_common::Deployment;
use sluice_common::config::{BanditConfig, Policy};
use sluice_learn::{Bandit, BanditRecord, Rng};
use sluice_schemas::learning::PredictionRecord;
use sluice_schemas::{DataType, Tensor};

use super::prediction_log::PredictionLog;
use super::seam::{BuildError, Step, StepFailure, StepInput, StepResult, wait_for};
use super::snapshots::{Slot, Snapshot, current, follow};

/// Longest wait for the broker to log a batch's choices when requests carry no deadline.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds drawn to estimate Thompson sampling's probabilities, once per published state.
const THOMPSON_DRAWS: usize = 4000;

/// A bandit state as a replica serves it.
pub(super) struct Served {
    bandit: Bandit,
    /// Thompson sampling's per-arm probabilities under this state (empty for other policies).
    shares: Vec<f64>,
}

/// What fits a published state to this replica's settings: arm names, context width, policy.
pub(super) type Fit = (Vec<String>, usize, Policy);

impl Served {
    fn new(bandit: Bandit, (arms, dims, policy): &Fit) -> Served {
        let bandit = bandit.aligned(arms, *dims);
        let shares = if *policy == Policy::Thompson {
            bandit.thompson_shares(THOMPSON_DRAWS, &mut Rng::from_entropy())
        } else {
            Vec::new()
        };
        Served { bandit, shares }
    }
}

impl Snapshot for Served {
    type Context = Fit;

    fn parse(payload: &[u8], name: &str, fit: &Fit) -> Result<Option<Served>, String> {
        let r: BanditRecord = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        Ok((r.graph == name).then(|| Served::new(r.bandit, fit)))
    }

    fn version(&self) -> u64 {
        self.bandit.version()
    }
}

/// One request's choice: the arm's index, its probability, the context.
type Choice = (usize, f64, Vec<f64>);

/// A graph's bandit router.
pub struct BanditStep {
    graph: String,
    settings: BanditConfig,
    dims: usize,
    state: Slot<Served>,
    rng: Mutex<Rng>,
    log: PredictionLog,
    /// Choices per arm (`sluice_bandit_choices{graph,arm}`), registered once.
    chosen: Vec<metrics::Counter>,
}

impl BanditStep {
    /// The bandit of `graph`; starts following its learner's state when built on the runtime
    /// (nothing learned until a state arrives).
    pub fn new(
        graph: &str,
        bandit: &sluice_common::graph::Bandit,
        deployment: &Deployment,
    ) -> Result<BanditStep, BuildError> {
        let settings = bandit.settings.clone();
        let fit: Fit = (settings.arms.clone(), bandit.dims, settings.policy);
        let start = Served::new(Bandit::new(&settings.arms, bandit.dims), &fit);
        let state: Slot<Served> = Arc::new(RwLock::new(Arc::new(start)));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(follow::<Served>(
                Arc::downgrade(&state),
                deployment.config.clone(),
                deployment.topics.weights(graph),
                graph.to_string(),
                fit,
            ));
        }
        tracing::info!(%graph, policy = ?settings.policy, arms = ?settings.arms, "bandit router serving");
        let chosen = settings
            .arms
            .iter()
            .map(|arm| metrics::counter!("sluice_bandit_choices", "graph" => graph.to_string(), "arm" => arm.clone()))
            .collect();
        Ok(BanditStep {
            chosen,
            log: PredictionLog::new(graph, deployment)?,
            graph: graph.to_string(),
            dims: bandit.dims,
            settings,
            state,
            rng: Mutex::new(Rng::from_entropy()),
        })
    }

    /// The context a job is chosen on (empty for a policy without one).
    fn context(&self, job: &StepInput) -> Result<Vec<f64>, StepFailure> {
        if self.dims == 0 {
            return Ok(Vec::new());
        }
        let t = job
            .tensors
            .iter()
            .find(|t| t.name == "context")
            .ok_or_else(|| StepFailure::invalid("the bandit's context is missing"))?;
        let x = t
            .to_f64()
            .ok_or_else(|| StepFailure::invalid("the bandit's context must be numeric"))?;
        if t.rows() != 1 || x.len() != self.dims || x.iter().any(|v| !v.is_finite()) {
            return Err(StepFailure::invalid(format!(
                "a bandit chooses once per request: its context must be one row of {} finite numbers",
                self.dims
            )));
        }
        Ok(x)
    }

    async fn batch(&self, batch: Vec<StepInput>) -> Vec<StepResult> {
        // One state for the whole batch: a new one lands between batches.
        let served = current(&self.state);
        let now = sluice_common::now_ms();
        let version = i64::try_from(served.bandit.version()).unwrap_or(i64::MAX);
        let choices: Vec<Result<Choice, StepFailure>> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            batch
                .iter()
                .map(|job| {
                    let x = self.context(job)?;
                    let p = served
                        .bandit
                        .probabilities(&self.settings, &x, &served.shares);
                    let arm = rng.pick(&p);
                    Ok((arm, p[arm], x))
                })
                .collect()
        };
        let records: Vec<Option<PredictionRecord>> = choices
            .iter()
            .zip(&batch)
            .map(|(c, job)| {
                let (arm, p, x) = c.as_ref().ok()?;
                Some(PredictionRecord {
                    id: job.id.clone(),
                    model: self.graph.clone(),
                    weights_version: version,
                    features: x.clone(),
                    probability: *p,
                    time_ms: now,
                    arm: Some(self.settings.arms[*arm].clone()),
                    hashed: Vec::new(),
                })
            })
            .collect();
        let logged = self
            .log
            .write(&records, wait_for(&batch, LOG_TIMEOUT))
            .await;
        choices
            .into_iter()
            .zip(logged)
            .map(|(c, l)| {
                let (arm, p, _) = c?;
                l?;
                self.chosen[arm].increment(1);
                let name = &self.settings.arms[arm];
                Ok(vec![
                    Tensor::from_bytes_elements("arm", vec![1, 1], [name.as_bytes()]),
                    Tensor::from_values("probability", DataType::Fp32, vec![1, 1], &[p as f32]),
                ])
            })
            .collect()
    }
}

impl Step for BanditStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(self.batch(batch))
    }
}
