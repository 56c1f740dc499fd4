//! A router computes nothing: which step a request goes to next is the graph plan's decision
//! (`flow::route_targets`), made where the record leaves. Its step passes every job through.

use futures::future::BoxFuture;

use super::seam::{Step, StepInput, StepResult};

/// The step of a route step: no outputs of its own.
pub struct RouteStep;

impl Step for RouteStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move { batch.into_iter().map(|_| Ok(Vec::new())).collect() })
    }
}
