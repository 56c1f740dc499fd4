//! The step seam: every kind of step (a model, a built-in, a join's combiner, a router, a
//! validator, an encoder, a decision, a feature lookup) runs behind [`Step`]. A step takes a batch
//! of jobs, each a set of named tensors, and returns per job its named output tensors or an error.
//! The consumer loop, batching, deadlines, offsets and delivery are the same for every kind; a new
//! kind is one module here plus its config type, built in [`for_unit`].
//!
//! Steps run on the async runtime: one whose work is CPU-heavy moves it off (the model step runs
//! on inference threads of its own, see [`crate::step::pool`]).

mod argmax;
mod bandit;
pub mod combine;
mod decide;
mod encode;
mod features;
mod http;
mod image;
pub mod learner;
mod model;
pub(crate) mod pool;
mod postgres;
mod prediction_log;
pub mod registry;
mod route;
pub(crate) mod runner;
mod seam;
mod snapshots;
mod validate;

use std::sync::Arc;

use sluice_common::Deployment;
use sluice_common::graph::{StepKind, Unit};

pub use model::ModelStep;
pub use seam::{BuildError, Step, StepFailure, StepInput, StepResult, wait_for};

/// The step a worker unit runs, built from the deployment; its [`Step::warm`] starts in the
/// background when built on the async runtime.
pub fn for_unit(deployment: &Deployment, unit: &Unit) -> Result<Arc<dyn Step>, BuildError> {
    let step = build(deployment, unit)?;
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let warming = Arc::clone(&step);
        runtime.spawn(async move { warming.warm().await });
    }
    Ok(step)
}

fn build(deployment: &Deployment, unit: &Unit) -> Result<Arc<dyn Step>, BuildError> {
    let unknown = || BuildError::UnknownUnit(unit.to_string());
    match unit {
        Unit::Model(name) => {
            let model = deployment.model(name).ok_or_else(unknown)?;
            if model.learner.is_some() {
                return Ok(Arc::new(learner::LearnerStep::new(
                    name, model, deployment,
                )?));
            }
            Ok(Arc::new(ModelStep::load(name, model)?))
        }
        Unit::Step { graph, step } => {
            let g = deployment.graph(graph).ok_or_else(unknown)?;
            let i = g.step_index(step).ok_or_else(unknown)?;
            let output = g.steps[i].outputs.first().map(|o| o.name.clone());
            match &g.steps[i].kind {
                StepKind::Model(_) => Err(unknown()),
                StepKind::Builtin(b) => Ok(Arc::new(argmax::Argmax::new(*b))),
                StepKind::Combine(join) => Ok(Arc::new(combine::CombineStep::new(
                    join.clone(),
                    output.unwrap_or_default(),
                ))),
                StepKind::Route(r) => match &r.bandit {
                    Some(b) => Ok(Arc::new(bandit::BanditStep::new(&g.name, b, deployment)?)),
                    None => Ok(Arc::new(route::RouteStep)),
                },
                StepKind::Validate(rules) => Ok(Arc::new(validate::ValidateStep::new(rules)?)),
                StepKind::Encode(columns, output) => Ok(Arc::new(encode::EncodeStep::new(
                    columns.clone(),
                    output.clone(),
                ))),
                StepKind::Decide(d) => Ok(Arc::new(decide::DecideStep::new(d.clone()))),
                StepKind::Features(f) => Ok(Arc::new(features::FeaturesStep::new(
                    &unit.to_string(),
                    f,
                    &deployment.config.redis.url,
                )?)),
                StepKind::DecodeImage(d, output) => {
                    Ok(Arc::new(image::DecodeImageStep::new(d, output.clone())))
                }
                StepKind::Http(h) => Ok(Arc::new(http::HttpStep::new(&g.steps[i].name, h))),
                StepKind::Postgres(pg) => Ok(Arc::new(postgres::PostgresStep::new(pg))),
                StepKind::Custom(c) => registry::build(
                    &registry::StepContext {
                        graph: &g.name,
                        step: &g.steps[i].name,
                        settings: &c.settings,
                        inputs: &g.steps[i].inputs,
                        outputs: &c.outputs,
                        deployment,
                    },
                    &c.kind,
                ),
            }
        }
    }
}
