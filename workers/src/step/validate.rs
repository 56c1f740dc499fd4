//! Validation steps: declarative rules checked per request. A request that breaks one fails with
//! `invalid_input` (422 at the gateway, a dead letter on the Kafka side) naming the input, the
//! row, the rule and the value; one that passes goes on with its inputs unchanged.

use futures::future::BoxFuture;
use regex::Regex;
use sluice_common::config::{AllowedValue, RuleKind, ValidationRule};
use sluice_schemas::{DataType, Number, Tensor};

use super::seam::{BuildError, Step, StepFailure, StepInput, StepResult};

/// A compiled rule.
struct Rule {
    spec: ValidationRule,
    regex: Option<Regex>,
}

/// A validation step.
pub struct ValidateStep {
    rules: Vec<Rule>,
}

impl ValidateStep {
    /// Compiles the rules (patterns were checked when the graph compiled).
    pub fn new(rules: &[ValidationRule]) -> Result<ValidateStep, BuildError> {
        let rules = rules
            .iter()
            .map(|r| {
                let regex = match (&r.rule, &r.pattern) {
                    (RuleKind::Regex, Some(p)) => Some(
                        Regex::new(p).map_err(|e| BuildError::Settings(format!("pattern: {e}")))?,
                    ),
                    _ => None,
                };
                Ok(Rule {
                    spec: r.clone(),
                    regex,
                })
            })
            .collect::<Result<_, BuildError>>()?;
        Ok(ValidateStep { rules })
    }

    fn one(&self, job: StepInput) -> StepResult {
        for rule in &self.rules {
            check(rule, &job).map_err(StepFailure::invalid)?;
        }
        Ok(job.tensors)
    }
}

impl Step for ValidateStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move { batch.into_iter().map(|j| self.one(j)).collect() })
    }
}

fn bounds(r: &ValidationRule) -> String {
    let show = |b: Option<f64>| b.map_or("..".to_string(), |v| v.to_string());
    format!("[{}, {}]", show(r.min), show(r.max))
}

fn within(r: &ValidationRule, v: f64) -> bool {
    r.min.is_none_or(|m| v >= m) && r.max.is_none_or(|m| v <= m)
}

/// Checks one rule against a job; `Err` says which input, row, rule and value failed.
fn check(rule: &Rule, job: &StepInput) -> Result<(), String> {
    let r = &rule.spec;
    if let Some(param) = &r.parameter {
        return match job.parameters.get(param) {
            Some(v) if v != "null" => Ok(()),
            _ => Err(format!(
                "validation failed: parameter '{param}' is required"
            )),
        };
    }
    let name = r.input.as_deref().unwrap_or_default();
    let t = job
        .tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("validation failed: input '{name}' is required"))?;
    let rows = t.rows().max(1);
    let fail = |index: usize, count: usize, what: String| {
        let row = index / (count / rows).max(1);
        format!("validation failed: '{name}' row {row}: {what}")
    };
    match r.rule {
        RuleKind::SequenceLength => {
            let n = t.shape.get(1).copied().unwrap_or(0) as f64;
            if !within(r, n) {
                return Err(format!(
                    "validation failed: '{name}': sequence_length {}: each row has {n} elements",
                    bounds(r)
                ));
            }
            Ok(())
        }
        _ if t.datatype == DataType::Bytes => check_text(rule, t, &fail),
        _ => check_numbers(r, t, &fail),
    }
}

fn check_text(
    rule: &Rule,
    t: &Tensor,
    fail: &dyn Fn(usize, usize, String) -> String,
) -> Result<(), String> {
    let r = &rule.spec;
    let elements = t.bytes_elements().map_err(|e| e.to_string())?;
    let n = elements.len();
    if r.rule == RuleKind::Required && n == 0 {
        return Err(fail(0, 1, "required: no value".into()));
    }
    for (i, e) in elements.iter().enumerate() {
        let text = std::str::from_utf8(e);
        match r.rule {
            RuleKind::Required if e.is_empty() => {
                return Err(fail(i, n, "required: the value is empty".into()));
            }
            RuleKind::OneOf => {
                let ok = r
                    .values
                    .iter()
                    .any(|v| matches!(v, AllowedValue::Text(s) if s.as_bytes() == *e));
                if !ok {
                    let allowed: Vec<String> = r.values.iter().map(|v| v.to_string()).collect();
                    return Err(fail(
                        i,
                        n,
                        format!(
                            "one_of [{}]: {:?} is not allowed",
                            allowed.join(", "),
                            String::from_utf8_lossy(e)
                        ),
                    ));
                }
            }
            RuleKind::Length => {
                let chars = text.map_or(e.len(), |s| s.chars().count());
                if !within(r, chars as f64) {
                    return Err(fail(
                        i,
                        n,
                        format!("length {}: {chars} characters", bounds(r)),
                    ));
                }
            }
            RuleKind::Regex => {
                let Ok(s) = text else {
                    return Err(fail(i, n, "regex: the value is not UTF-8".into()));
                };
                if rule.regex.as_ref().is_some_and(|re| !re.is_match(s)) {
                    return Err(fail(
                        i,
                        n,
                        format!(
                            "regex {}: {s:?} does not match",
                            r.pattern.as_deref().unwrap_or_default()
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_numbers(
    r: &ValidationRule,
    t: &Tensor,
    fail: &dyn Fn(usize, usize, String) -> String,
) -> Result<(), String> {
    let values = t
        .to_f64()
        .ok_or_else(|| format!("validation failed: '{}' is {}", t.name, t.datatype))?;
    let n = values.len();
    if r.rule == RuleKind::Required && n == 0 {
        return Err(fail(0, 1, "required: no value".into()));
    }
    for (i, &v) in values.iter().enumerate() {
        match r.rule {
            RuleKind::Required if v.is_nan() => {
                return Err(fail(i, n, "required: the value is NaN".into()));
            }
            RuleKind::Finite if !v.is_finite() => {
                return Err(fail(i, n, format!("finite: {v} is not a finite number")));
            }
            RuleKind::Range if !within(r, v) => {
                return Err(fail(
                    i,
                    n,
                    format!("range {}: {v} is out of range", bounds(r)),
                ));
            }
            RuleKind::OneOf => {
                let ok = r
                    .values
                    .iter()
                    .any(|a| a.number().and_then(Number::as_f64) == Some(v));
                if !ok {
                    let allowed: Vec<String> = r.values.iter().map(|v| v.to_string()).collect();
                    return Err(fail(
                        i,
                        n,
                        format!("one_of [{}]: {v} is not allowed", allowed.join(", ")),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule(toml: &str) -> ValidationRule {
        toml::from_str(toml).unwrap()
    }

    fn run(rules: &[&str], tensors: Vec<Tensor>) -> Result<(), String> {
        let rules: Vec<ValidationRule> = rules.iter().map(|r| rule(r)).collect();
        let step = ValidateStep::new(&rules).unwrap();
        step.one(StepInput {
            tensors,
            ..Default::default()
        })
        .map(|_| ())
        .map_err(|f| {
            assert_eq!(f.code, sluice_schemas::ErrorCode::InvalidInput);
            f.message
        })
    }

    fn amounts(v: &[f32]) -> Tensor {
        Tensor::from_values("amount", DataType::Fp32, vec![v.len() as i64], v)
    }

    #[test]
    fn every_rule_passes_good_values_and_names_the_bad_one() {
        let range = "input = \"amount\"\nrule = \"range\"\nmin = 0\nmax = 100";
        assert!(run(&[range], vec![amounts(&[0.0, 100.0])]).is_ok());
        let e = run(&[range], vec![amounts(&[5.0, 100.5])]).unwrap_err();
        assert!(e.contains("'amount' row 1: range [0, 100]: 100.5"), "{e}");
        let finite = "input = \"amount\"\nrule = \"finite\"";
        let e = run(&[finite], vec![amounts(&[1.0, f32::NAN])]).unwrap_err();
        assert!(e.contains("row 1: finite"), "{e}");
        assert!(run(&[finite], vec![amounts(&[f32::INFINITY])]).is_err());
        let nan_required = "input = \"amount\"\nrule = \"required\"";
        assert!(run(&[nan_required], vec![amounts(&[f32::NAN])]).is_err());

        let country = |v: &[&str]| Tensor::from_bytes_elements("country", vec![v.len() as i64], v);
        let one_of = "input = \"country\"\nrule = \"one_of\"\nvalues = [\"US\", \"GB\"]";
        assert!(run(&[one_of], vec![country(&["US", "GB"])]).is_ok());
        let e = run(&[one_of], vec![country(&["US", "FR"])]).unwrap_err();
        assert!(e.contains("row 1: one_of [\"US\", \"GB\"]: \"FR\""), "{e}");
        let required = "input = \"country\"\nrule = \"required\"";
        assert!(
            run(&[required], vec![country(&[""])])
                .unwrap_err()
                .contains("required")
        );
        let length = "input = \"country\"\nrule = \"length\"\nmin = 2\nmax = 2";
        assert!(
            run(&[length], vec![country(&["GBR"])])
                .unwrap_err()
                .contains("length [2, 2]: 3")
        );
        let regex = "input = \"country\"\nrule = \"regex\"\npattern = \"^[A-Z]{2}$\"";
        assert!(run(&[regex], vec![country(&["GB"])]).is_ok());
        assert!(
            run(&[regex], vec![country(&["gb"])])
                .unwrap_err()
                .contains("does not match")
        );

        let codes = Tensor::from_values("code", DataType::Int64, vec![2], &[3i64, 7]);
        let allowed = "input = \"code\"\nrule = \"one_of\"\nvalues = [3, 5]";
        assert!(
            run(&[allowed], vec![codes])
                .unwrap_err()
                .contains("row 1: one_of [3, 5]: 7")
        );

        let seq = Tensor::from_values("tokens", DataType::Int64, vec![1, 3], &[1i64, 2, 3]);
        let sl = "input = \"tokens\"\nrule = \"sequence_length\"\nmax = 2";
        assert!(
            run(&[sl], vec![seq])
                .unwrap_err()
                .contains("sequence_length [.., 2]")
        );

        let param = "parameter = \"tier\"\nrule = \"required\"";
        assert!(
            run(&[param], vec![])
                .unwrap_err()
                .contains("parameter 'tier'")
        );
    }

    #[test]
    fn rows_are_counted_per_row_not_per_element() {
        let t = Tensor::from_values("amount", DataType::Fp32, vec![2, 2], &[1f32, 2., 3., -4.]);
        let e = run(&["input = \"amount\"\nrule = \"range\"\nmin = 0"], vec![t]).unwrap_err();
        assert!(e.contains("row 1"), "{e}");
    }
}
