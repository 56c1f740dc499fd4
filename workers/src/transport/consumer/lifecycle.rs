//! A running worker's life after start-up: re-reading its config (SIGHUP, `/admin/reload`) and
//! draining at shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_common::Deployment;
use sluice_common::graph::Unit;

use super::Worker;
use crate::transport::group::lock;

impl Worker<'_> {
    /// Re-reads the config's graphs; routing changes apply to records arriving from now on, and
    /// non-model steps are rebuilt (a join's weights, say).
    pub(super) fn reload(&mut self) -> Result<String, String> {
        let fresh = Deployment::load(self.config_path.as_deref()).map_err(|e| e.to_string())?;
        for lane in &mut self.lanes {
            if let Some(j) = lane.joiner.as_mut() {
                j.replace_graph(&fresh.graphs);
            }
            if matches!(lane.unit, Unit::Step { .. }) && fresh.has_unit(&lane.unit) {
                let rebuilt =
                    crate::step::for_unit(&fresh, &lane.unit).map_err(|e| e.to_string())?;
                *lane.step.write().unwrap_or_else(|e| e.into_inner()) = rebuilt;
            }
            let fused = crate::pipeline::executor::fused_after(&fresh, &lane.unit)
                .map_err(|e| e.to_string())?;
            *lane.fused.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fused);
            lane.metrics.config_reloads.increment(1);
        }
        let summary = routing_summary(&fresh.graphs);
        if let Some(local) = self.local.get() {
            local.replace_graphs(fresh.graphs.clone());
        }
        self.graphs = fresh.graphs;
        Ok(format!("reloaded {} graphs; {summary}", self.graphs.len()))
    }

    /// Stops taking records, finishes everything taken, stores and commits, leaves the group.
    /// Parts a join still holds stay uncommitted: whoever owns the partition next reads them again.
    pub(super) async fn drain(&mut self) {
        tracing::info!("draining");
        self.state.joined.store(false, Ordering::Relaxed);
        let timeout = self.deployment.config.worker.drain_timeout;
        let mut pipeline = Vec::new();
        for lane in &mut self.lanes {
            lane.jobs = None;
            pipeline.append(&mut lane.pipeline);
        }
        let side = &mut self.side;
        let drained = tokio::time::timeout(timeout, async {
            for task in pipeline {
                let _ = task.await;
            }
            side.join_all().await;
        })
        .await;
        if drained.is_err() {
            let unfinished = lock(&self.state.tracker).unfinished();
            tracing::warn!(
                ?timeout,
                unfinished,
                "drain timed out; unfinished records will be redelivered"
            );
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        if let Some(lane) = self.lanes.first() {
            lane.completer.commit_and_leave();
        }
        if let Some(stop) = self.ops_stop.take() {
            let _ = stop.send(());
        }
        for p in &self.producers {
            let _ = p.flush(Duration::from_secs(5));
        }
        tracing::info!("worker stopped");
    }
}

/// Canary and shadow settings of every graph step, for the reload log.
fn routing_summary(graphs: &sluice_common::graph::Graphs) -> String {
    let summary: Vec<String> = graphs
        .values()
        .flat_map(|g| {
            g.steps.iter().filter_map(|s| {
                let c = s.canary.as_ref();
                (c.is_some() || !s.shadows.is_empty()).then(|| {
                    format!(
                        "{}.{}: canary {} shadows {:?}",
                        g.name,
                        s.name,
                        c.map_or("none".to_string(), |c| format!(
                            "{} at {}",
                            c.model, c.share
                        )),
                        s.shadows.iter().map(|(m, _)| m).collect::<Vec<_>>()
                    )
                })
            })
        })
        .collect();
    summary.join("; ")
}
