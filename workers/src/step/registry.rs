//! User steps: step kinds a binary registers by name, used in config like a built-in
//! (`custom = { kind = "...", settings = {...}, outputs = [...] }`). A user writes a [`Step`] in
//! plain Rust in their own crate, registers a builder for it before running Sluice's command line
//! (`sluice::main()`), and ships that binary as their worker. See `examples/custom-step`.
//!
//! A step that waits on I/O implements [`Step`] directly (its `run` is async); a CPU-bound one
//! can use [`cpu_step`], which runs it on Tokio's blocking threads, off the async runtime.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

use futures::future::BoxFuture;
use sluice_common::Deployment;
use sluice_common::config::TensorSpec;
use sluice_schemas::ErrorCode;

use super::seam::{BuildError, Step, StepFailure, StepInput, StepResult};

/// What a builder gets to build one step from.
pub struct StepContext<'a> {
    /// The graph the step is in.
    pub graph: &'a str,
    /// The step's name.
    pub step: &'a str,
    /// Its `settings` table, as JSON.
    pub settings: &'a serde_json::Value,
    /// (name the step reads, source) pairs.
    pub inputs: &'a [(String, String)],
    /// The outputs it declared (and must produce).
    pub outputs: &'a [TensorSpec],
    /// The whole deployment (e.g. for `redis.url`).
    pub deployment: &'a Deployment,
}

/// Builds a step of one kind.
pub type Builder = fn(&StepContext<'_>) -> Result<Arc<dyn Step>, BuildError>;

fn registry() -> &'static RwLock<BTreeMap<String, Builder>> {
    static REGISTRY: OnceLock<RwLock<BTreeMap<String, Builder>>> = OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(BTreeMap::new()))
}

/// Registers `kind` (replacing an earlier builder of that name).
pub fn register(kind: &str, builder: Builder) {
    registry()
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(kind.to_string(), builder);
}

/// The kinds registered so far.
pub fn registered() -> Vec<String> {
    registry()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect()
}

/// Builds a step of `kind`.
pub fn build(ctx: &StepContext<'_>, kind: &str) -> Result<Arc<dyn Step>, BuildError> {
    let builder = registry()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(kind)
        .copied();
    match builder {
        Some(b) => b(ctx),
        None => Err(BuildError::UnknownKind {
            kind: kind.to_string(),
            registered: registered(),
        }),
    }
}

/// A CPU-bound step from a function of one job, run on the blocking thread pool so it never
/// stalls the async runtime (the consumer loop, deliveries, other lanes).
pub fn cpu_step<F>(f: F) -> Arc<dyn Step>
where
    F: Fn(StepInput) -> StepResult + Send + Sync + 'static,
{
    Arc::new(CpuStep(Arc::new(f)))
}

type JobFn = dyn Fn(StepInput) -> StepResult + Send + Sync;

struct CpuStep(Arc<JobFn>);

impl Step for CpuStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        let f = Arc::clone(&self.0);
        let n = batch.len();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || batch.into_iter().map(|j| f(j)).collect())
                .await
            {
                Ok(results) => results,
                Err(e) => (0..n)
                    .map(|_| {
                        Err(StepFailure {
                            code: ErrorCode::Internal,
                            message: format!("the step panicked: {e}"),
                        })
                    })
                    .collect(),
            }
        })
    }
}
