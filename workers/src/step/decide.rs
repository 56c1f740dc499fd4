//! Decision steps: per row, the first rule that holds (`input[column] <op> value`) gives the
//! decision; none holding gives `otherwise`. Outputs `decision` and `rule` (BYTES, one per row)
//! plus the inputs it keeps, so a caller sees the scores behind the answer.

use futures::future::BoxFuture;
use sluice_common::config::DecideConfig;
use sluice_schemas::{DataType, Tensor};

use super::seam::{Step, StepFailure, StepInput, StepResult};

/// A decision step.
pub struct DecideStep {
    config: DecideConfig,
    /// Each rule's reported name.
    names: Vec<String>,
}

impl DecideStep {
    /// The step for `config`.
    pub fn new(config: DecideConfig) -> DecideStep {
        let names = config
            .rules
            .iter()
            .map(|r| {
                r.name
                    .clone()
                    .unwrap_or_else(|| format!("{} {} {}", r.input, r.op, r.value))
            })
            .collect();
        DecideStep { config, names }
    }

    fn one(&self, job: StepInput) -> StepResult {
        let rows = job.rows();
        // Each rule's column of values, one per row.
        let mut columns = Vec::with_capacity(self.config.rules.len());
        for r in &self.config.rules {
            let t = job
                .tensors
                .iter()
                .find(|t| t.name == r.input)
                .ok_or_else(|| StepFailure::invalid(format!("no input '{}'", r.input)))?;
            let values = t.to_f64().ok_or_else(|| {
                StepFailure::invalid(format!("'{}' is {}, not numeric", r.input, t.datatype))
            })?;
            let width = values.len().checked_div(rows).unwrap_or(0);
            if r.column >= width {
                return Err(StepFailure::invalid(format!(
                    "'{}' has {width} columns; rule reads column {}",
                    r.input, r.column
                )));
            }
            // Thresholds compare at the input's precision: an FP32 0.9 is >= a threshold of 0.9.
            let threshold = match t.datatype {
                DataType::Fp32 => f64::from(r.value as f32),
                _ => r.value,
            };
            let column: Vec<f64> = (0..rows).map(|i| values[i * width + r.column]).collect();
            columns.push((column, threshold));
        }
        let mut decisions = Vec::with_capacity(rows);
        let mut fired = Vec::with_capacity(rows);
        for row in 0..rows {
            let hit = self
                .config
                .rules
                .iter()
                .zip(&columns)
                .position(|(r, (col, threshold))| holds(&r.op, col[row], *threshold));
            match hit {
                Some(k) => {
                    decisions.push(self.config.rules[k].decision.as_str());
                    fired.push(self.names[k].as_str());
                }
                None => {
                    decisions.push(self.config.otherwise.as_str());
                    fired.push("otherwise");
                }
            }
        }
        let shape = vec![rows as i64];
        let mut out = vec![
            Tensor::from_bytes_elements("decision", shape.clone(), decisions),
            Tensor::from_bytes_elements("rule", shape, fired),
        ];
        for t in job.tensors {
            let kept = match &self.config.keep {
                Some(k) => k.contains(&t.name),
                None => true,
            };
            if kept {
                out.push(t);
            }
        }
        Ok(out)
    }
}

fn holds(op: &str, v: f64, threshold: f64) -> bool {
    match op {
        ">" => v > threshold,
        ">=" => v >= threshold,
        "<" => v < threshold,
        "<=" => v <= threshold,
        "==" => v == threshold,
        "!=" => v != threshold,
        _ => false,
    }
}

impl Step for DecideStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move { batch.into_iter().map(|j| self.one(j)).collect() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn first_rule_that_holds_decides_at_the_threshold_edges() {
        let config: DecideConfig = toml::from_str(
            r#"
otherwise = "approve"
rules = [
  { name = "high_risk", input = "probabilities", column = 1, op = ">=", value = 0.9, decision = "decline" },
  { input = "probabilities", column = 1, op = ">=", value = 0.5, decision = "review" },
  { name = "big", input = "amount", op = ">", value = 5000, decision = "review" },
]"#,
        )
        .unwrap();
        let step = DecideStep::new(config);
        let p = [0.1f32, 0.9, 0.1, 0.5, 0.51, 0.49, 0.9, 0.1];
        let job = StepInput {
            tensors: vec![
                Tensor::from_values("probabilities", DataType::Fp32, vec![4, 2], &p),
                Tensor::from_values(
                    "amount",
                    DataType::Fp64,
                    vec![4],
                    &[10.0, 10.0, 5000.0, 5000.5],
                ),
            ],
            ..Default::default()
        };
        let out = step.one(job).unwrap();
        let d = out[0].bytes_elements().unwrap();
        let r = out[1].bytes_elements().unwrap();
        assert_eq!(d, vec![&b"decline"[..], b"review", b"approve", b"review"]);
        assert_eq!(
            r,
            vec![
                &b"high_risk"[..],
                b"probabilities >= 0.5",
                b"otherwise",
                b"big"
            ]
        );
        assert_eq!(out.len(), 4, "inputs are kept by default");
    }
}
