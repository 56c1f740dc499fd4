//! Which worker processes `sluice up` starts: one per deployment unit, or one per step pool.

use anyhow::bail;
use sluice_common::graph::Unit;
use sluice_common::{Deployment, WorkerUnit};

/// Worker processes of one kind that `up` starts: a name for logs, `sluice worker` arguments,
/// and how many.
pub(super) struct WorkerProcess {
    pub(super) name: String,
    pub(super) args: Vec<String>,
    pub(super) count: usize,
}

/// The worker processes to start: each deployment unit (only its members among `only`'s models
/// and graphs, when given), and a process per step pool that no unit serves; with `per_step`,
/// a process per step pool, each in a group of its own.
pub(super) fn worker_processes(
    deployment: &Deployment,
    only: &[String],
    per_step: bool,
) -> anyhow::Result<Vec<WorkerProcess>> {
    let mut wanted: Vec<Unit> = Vec::new();
    for name in only {
        wanted.extend(deployment.pools_named(name).unwrap_or_default());
    }
    let selected = |u: &Unit| only.is_empty() || wanted.contains(u);
    let pool = |u: &Unit, count: usize| {
        let (flag, name) = match u {
            Unit::Model(m) => ("--model", m.clone()),
            Unit::Step { .. } => ("--step", u.to_string()),
        };
        WorkerProcess {
            name: u.to_string(),
            args: vec![flag.into(), name],
            count,
        }
    };
    if per_step {
        return Ok(deployment
            .units()
            .iter()
            .filter(|(u, _)| selected(u))
            .map(|(u, n)| pool(u, *n))
            .collect());
    }
    let mut out = Vec::new();
    for unit in deployment.worker_units() {
        let members: Vec<String> = unit
            .members
            .iter()
            .filter(|u| selected(u))
            .map(Unit::to_string)
            .collect();
        if members.is_empty() {
            continue;
        }
        let mut args = vec!["--unit".to_string(), unit.name.clone()];
        if members.len() < unit.members.len() {
            args.extend(["--only".to_string(), members.join(",")]);
        }
        out.push(WorkerProcess {
            name: unit.name.clone(),
            args,
            count: unit.workers,
        });
    }
    out.extend(
        deployment
            .pools_outside_units()
            .iter()
            .filter(|(u, _)| selected(u))
            .map(|(u, n)| pool(u, *n)),
    );
    Ok(out)
}

/// `unit` narrowed to the pools of `only` (models, graphs, graph steps); all of it when empty.
pub fn only_members(
    deployment: &Deployment,
    unit: &WorkerUnit,
    only: &[String],
) -> anyhow::Result<WorkerUnit> {
    if only.is_empty() {
        return Ok(unit.clone());
    }
    let mut wanted = Vec::new();
    for name in only {
        let Some(pools) = deployment.pools_named(name) else {
            bail!("--only: '{name}' is not a model, a graph or a graph's step");
        };
        wanted.extend(pools);
    }
    let members: Vec<Unit> = unit
        .members
        .iter()
        .filter(|u| wanted.contains(u))
        .cloned()
        .collect();
    if members.is_empty() {
        bail!("--only: unit '{}' serves none of {only:?}", unit.name);
    }
    Ok(WorkerUnit {
        members,
        ..unit.clone()
    })
}
