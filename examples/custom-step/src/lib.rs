//! An example user step: `merchant_risk` maps each row's merchant category (BYTES) to a risk
//! score (FP32) from a table in its settings. It is plain Rust: a function of one job, run off
//! the async runtime by [`cpu_step`]; a step that waits on I/O would implement
//! `sluice_workers::step::Step` itself.
//!
//! ```toml
//! [[graphs.fraud.steps]]
//! name = "merchant"
//! inputs = { category = "request.merchant_category" }
//! custom = { kind = "merchant_risk", settings = { default = 0.1, scores = { crypto = 0.9 } },
//!            outputs = [{ name = "risk", datatype = "FP32", shape = [-1] }] }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_schemas::{DataType, Tensor};
use sluice_workers::step::registry::{StepContext, cpu_step};
use sluice_workers::step::{BuildError, Step, StepFailure, StepInput, StepResult};

/// The kind name used in config.
pub const KIND: &str = "merchant_risk";

/// Registers the step with Sluice (call before `sluice::main()`).
pub fn register() {
    sluice_workers::step::registry::register(KIND, build);
}

/// Builds the step from its settings: `scores` (category → risk) and `default`.
pub fn build(ctx: &StepContext<'_>) -> Result<Arc<dyn Step>, BuildError> {
    let bad = |m: &str| BuildError::Settings(format!("step '{}': {m}", ctx.step));
    let default = ctx
        .settings
        .get("default")
        .map_or(Some(0.0), serde_json::Value::as_f64)
        .ok_or_else(|| bad("settings.default must be a number"))? as f32;
    let mut scores = BTreeMap::new();
    if let Some(table) = ctx.settings.get("scores") {
        let table = table
            .as_object()
            .ok_or_else(|| bad("settings.scores must be a table"))?;
        for (category, v) in table {
            let score = v
                .as_f64()
                .ok_or_else(|| bad("settings.scores values must be numbers"))?;
            scores.insert(category.clone().into_bytes(), score as f32);
        }
    }
    if ctx.inputs.len() != 1 {
        return Err(bad("reads exactly one input (the merchant category)"));
    }
    let output = ctx
        .outputs
        .first()
        .map(|o| o.name.clone())
        .ok_or_else(|| bad("declares no output"))?;
    Ok(cpu_step(move |job: StepInput| {
        score(&job, &scores, default, &output)
    }))
}

fn score(
    job: &StepInput,
    scores: &BTreeMap<Vec<u8>, f32>,
    default: f32,
    output: &str,
) -> StepResult {
    let t = job
        .tensors
        .first()
        .ok_or_else(|| StepFailure::invalid("no merchant category input"))?;
    let categories = t
        .bytes_elements()
        .map_err(|e| StepFailure::invalid(e.to_string()))?;
    let risk: Vec<f32> = categories
        .iter()
        .map(|c| scores.get(*c).copied().unwrap_or(default))
        .collect();
    Ok(vec![Tensor::from_values(
        output,
        DataType::Fp32,
        vec![risk.len() as i64],
        &risk,
    )])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CONFIG: &str = r#"
[models]
[graphs.g]
inputs = [{ name = "merchant_category", datatype = "BYTES", shape = [-1] }]
[[graphs.g.steps]]
name = "merchant"
inputs = { category = "request.merchant_category" }
custom = { kind = "merchant_risk", settings = { default = 0.1, scores = { crypto = 0.9, gambling = 0.8 } }, outputs = [{ name = "risk", datatype = "FP32", shape = [-1] }] }
"#;

    #[tokio::test]
    async fn the_registered_step_is_built_from_config_and_scores_rows() {
        let dir = std::env::temp_dir().join(format!("sluice-custom-step-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("custom.toml");
        std::fs::write(&path, CONFIG).unwrap();
        let deployment = sluice_common::Deployment::load(Some(&path)).unwrap();
        let unit = sluice_common::graph::Unit::parse("g.merchant");
        // Not registered yet: the error names the kind and where to look.
        let err = sluice_workers::step::for_unit(&deployment, &unit)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("no step kind 'merchant_risk'"),
            "{err}"
        );
        register();
        let step = sluice_workers::step::for_unit(&deployment, &unit).unwrap();
        let job = StepInput {
            tensors: vec![Tensor::from_bytes_elements(
                "category",
                vec![3],
                ["crypto", "grocery", "gambling"],
            )],
            ..Default::default()
        };
        let out = step.run(vec![job]).await;
        let risk: Vec<f32> = out[0].as_ref().unwrap()[0].values();
        assert_eq!(risk, [0.9, 0.1, 0.8]);
        // The compiled graph answers with what the step declared.
        let g = deployment.graph("g").unwrap();
        assert_eq!(g.signature.outputs[0].name, "risk");
    }
}
