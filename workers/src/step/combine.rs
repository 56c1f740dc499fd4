//! Combine steps: what a join does with its parts once they arrived (the join itself, holding
//! parts until their request is decided, is `crate::pipeline::joiner`). Also `argmax`'s arithmetic.

use futures::future::BoxFuture;
use sluice_common::graph::{Combiner, Join, TieRule};
use sluice_schemas::{DataType, Tensor};

use super::seam::{Step, StepFailure, StepInput, StepResult};

/// The step of a combine step: its job's tensors are the parts that arrived, in arrival order,
/// each named by its source (`<step>.<output>`).
pub struct CombineStep {
    join: Join,
    output: String,
}

impl CombineStep {
    /// Combines parts by `join`'s rule into a tensor called `output`.
    pub fn new(join: Join, output: String) -> CombineStep {
        CombineStep { join, output }
    }

    fn one(&self, job: &StepInput) -> StepResult {
        let mut arrived = Vec::with_capacity(job.tensors.len());
        for t in &job.tensors {
            let i = self
                .join
                .parts
                .iter()
                .position(|(_, src)| *src == t.name)
                .ok_or_else(|| {
                    StepFailure::invalid(format!("'{}' is not a part of this join", t.name))
                })?;
            arrived.push((i, t.clone()));
        }
        combine(&self.join, &self.output, &arrived)
            .map(|t| vec![t])
            .map_err(StepFailure::invalid)
    }
}

impl Step for CombineStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move { batch.iter().map(|j| self.one(j)).collect() })
    }
}

/// `argmax`: per row of FP32 `probabilities` [batch, classes], the best class as `label` (INT64)
/// and its probability as `probability` (FP32).
pub fn argmax(probabilities: &Tensor) -> Result<Vec<Tensor>, String> {
    let (rows, width) = matrix(probabilities)?;
    let values: Vec<f32> = probabilities.values();
    let mut labels = Vec::with_capacity(rows);
    let mut best = Vec::with_capacity(rows);
    for row in values.chunks(width.max(1)).take(rows) {
        let (i, p) =
            row.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |(bi, bp), (i, &p)| {
                    if p > bp { (i, p) } else { (bi, bp) }
                });
        labels.push(i as i64);
        best.push(p);
    }
    let n = rows as i64;
    Ok(vec![
        Tensor::from_values("label", DataType::Int64, vec![n], &labels),
        Tensor::from_values("probability", DataType::Fp32, vec![n], &best),
    ])
}

fn matrix(t: &Tensor) -> Result<(usize, usize), String> {
    if t.datatype != DataType::Fp32 || t.shape.len() != 2 {
        return Err(format!(
            "'{}' must be FP32 [batch, k], got {} {:?}",
            t.name, t.datatype, t.shape
        ));
    }
    Ok((t.shape[0].max(0) as usize, t.shape[1].max(0) as usize))
}

/// Combines the parts that arrived, given in arrival order as (index in `join.parts`, tensor),
/// into one tensor called `output`.
pub fn combine(join: &Join, output: &str, arrived: &[(usize, Tensor)]) -> Result<Tensor, String> {
    let Some((_, first_arrived)) = arrived.first() else {
        return Err("no parts to combine".into());
    };
    let mut parts: Vec<&(usize, Tensor)> = arrived.iter().collect();
    parts.sort_by_key(|(i, _)| *i);
    let rows = parts[0].1.shape.first().copied().unwrap_or(0);
    if let Some((i, t)) = parts
        .iter()
        .find(|(_, t)| t.shape.first().copied() != Some(rows))
    {
        return Err(format!(
            "part '{}' has {:?} rows, another {rows}",
            join.parts[*i].0,
            t.shape.first()
        ));
    }
    let rows = rows.max(0) as usize;
    match join.combiner {
        Combiner::Mean | Combiner::WeightedMean => mean(join, output, &parts),
        Combiner::MajorityVote => Ok(majority_vote(join, output, &parts, rows)),
        Combiner::MaxConfidence => max_confidence(output, &parts, rows),
        Combiner::Concat => concat(output, &parts, rows),
        Combiner::First => Ok(Tensor {
            name: output.to_string(),
            ..first_arrived.clone()
        }),
    }
}

/// Parts in listed order: (part index, tensor).
type Parts<'a> = [&'a (usize, Tensor)];

/// Element-wise (weighted) mean over the parts that arrived, as FP32.
fn mean(join: &Join, output: &str, parts: &Parts<'_>) -> Result<Tensor, String> {
    let weights: Vec<f64> = parts
        .iter()
        .map(|(i, _)| {
            if join.combiner == Combiner::Mean {
                1.0
            } else {
                join.weights.get(*i).copied().unwrap_or(0.0)
            }
        })
        .collect();
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err("the weights of the parts that arrived sum to zero".into());
    }
    let first = &parts[0].1;
    let mut acc = vec![0f64; first.data.len() / 4];
    for ((_, t), w) in parts.iter().zip(&weights) {
        let v: Vec<f32> = t.values();
        if v.len() != acc.len() {
            return Err("parts have different shapes".into());
        }
        for (a, x) in acc.iter_mut().zip(v) {
            *a += w * f64::from(x);
        }
    }
    let mean: Vec<f32> = acc.iter().map(|a| (a / total) as f32).collect();
    Ok(Tensor::from_values(
        output,
        DataType::Fp32,
        first.shape.clone(),
        &mean,
    ))
}

/// Per row, the most common label (ties broken by the join's rule), in the parts' integer type.
fn majority_vote(join: &Join, output: &str, parts: &Parts<'_>, rows: usize) -> Tensor {
    let votes: Vec<Vec<i64>> = parts.iter().map(|(_, t)| labels(t)).collect();
    let winners: Vec<i64> = (0..rows)
        .map(|r| {
            let column: Vec<i64> = votes.iter().filter_map(|v| v.get(r).copied()).collect();
            vote(&column, join.tie)
        })
        .collect();
    let dtype = parts[0].1.datatype;
    match dtype {
        DataType::Int32 => {
            let w: Vec<i32> = winners.iter().map(|&x| x as i32).collect();
            Tensor::from_values(output, dtype, vec![rows as i64], &w)
        }
        _ => Tensor::from_values(output, DataType::Int64, vec![rows as i64], &winners),
    }
}

/// Per row, the row of the part whose highest score is highest (earlier parts win ties).
fn max_confidence(output: &str, parts: &Parts<'_>, rows: usize) -> Result<Tensor, String> {
    let (_, width) = matrix(&parts[0].1)?;
    let all: Vec<Vec<f32>> = parts.iter().map(|(_, t)| t.values()).collect();
    let mut out = Vec::with_capacity(rows * width);
    for r in 0..rows {
        let row = |v: &Vec<f32>| v[r * width..(r + 1) * width].to_vec();
        let best = all
            .iter()
            .max_by(|a, b| {
                let ma = row(a).into_iter().fold(f32::NEG_INFINITY, f32::max);
                let mb = row(b).into_iter().fold(f32::NEG_INFINITY, f32::max);
                // Earlier parts win ties: max_by keeps the last maximum, so compare
                // reversed positions by treating equal as "less".
                ma.partial_cmp(&mb)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(std::cmp::Ordering::Greater)
            })
            .map(row)
            .unwrap_or_default();
        out.extend(best);
    }
    Ok(Tensor::from_values(
        output,
        DataType::Fp32,
        vec![rows as i64, width as i64],
        &out,
    ))
}

/// The parts' rows side by side (rank-2 parts of one fixed-size datatype).
fn concat(output: &str, parts: &Parts<'_>, rows: usize) -> Result<Tensor, String> {
    let dtype = parts[0].1.datatype;
    let Some(size) = dtype.element_size() else {
        return Err("concat cannot join BYTES parts".into());
    };
    let mut width = 0i64;
    for (_, t) in parts {
        if t.shape.len() != 2 || t.datatype != dtype {
            return Err("concat needs rank-2 parts of one datatype".into());
        }
        width += t.shape[1];
    }
    let mut data = Vec::new();
    for r in 0..rows {
        for (_, t) in parts {
            let w = t.shape[1].max(0) as usize * size;
            data.extend_from_slice(&t.data[r * w..(r + 1) * w]);
        }
    }
    Ok(Tensor {
        name: output.to_string(),
        datatype: dtype,
        shape: vec![rows as i64, width],
        data,
    })
}

fn labels(t: &Tensor) -> Vec<i64> {
    match t.datatype {
        DataType::Int32 => t.values::<i32>().into_iter().map(i64::from).collect(),
        _ => t.values::<i64>(),
    }
}

/// The most common value; ties broken by `tie` (votes are in listed part order).
fn vote(votes: &[i64], tie: TieRule) -> i64 {
    let mut counts: Vec<(i64, usize, usize)> = Vec::new(); // (value, count, first position)
    for (pos, &v) in votes.iter().enumerate() {
        match counts.iter_mut().find(|(x, _, _)| *x == v) {
            Some(c) => c.1 += 1,
            None => counts.push((v, 1, pos)),
        }
    }
    let top = counts.iter().map(|c| c.1).max().unwrap_or(0);
    let tied = counts.iter().filter(|c| c.1 == top);
    match tie {
        TieRule::FirstListed => tied.min_by_key(|c| c.2).map(|c| c.0).unwrap_or(0),
        TieRule::Smallest => tied.map(|c| c.0).min().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    fn join(c: Combiner, weights: Vec<f64>, tie: TieRule) -> Join {
        Join {
            combiner: c,
            parts: vec![
                ("a".into(), "a.x".into()),
                ("b".into(), "b.x".into()),
                ("c".into(), "c.x".into()),
            ],
            weights,
            tie,
            quorum: 3,
            timeout: Duration::from_secs(1),
        }
    }

    fn f32s(v: &[f32], shape: Vec<i64>) -> Tensor {
        Tensor::from_values("x", DataType::Fp32, shape, v)
    }
    fn i64s(v: &[i64]) -> Tensor {
        Tensor::from_values("x", DataType::Int64, vec![v.len() as i64], v)
    }

    #[test]
    fn argmax_gives_label_and_probability() {
        let out = argmax(&f32s(&[0.1, 0.7, 0.2, 0.5, 0.25, 0.25], vec![2, 3])).unwrap();
        assert_eq!(out[0].values::<i64>(), [1, 0]);
        assert_eq!(out[1].values::<f32>(), [0.7, 0.5]);
    }

    #[test]
    fn mean_and_weighted_mean() {
        let parts = vec![
            (0, f32s(&[1.0, 2.0], vec![1, 2])),
            (1, f32s(&[3.0, 4.0], vec![1, 2])),
        ];
        let m = combine(
            &join(Combiner::Mean, vec![], TieRule::FirstListed),
            "p",
            &parts,
        )
        .unwrap();
        assert_eq!(m.values::<f32>(), [2.0, 3.0]);
        assert_eq!(m.name, "p");
        let w = combine(
            &join(
                Combiner::WeightedMean,
                vec![3.0, 1.0, 9.0],
                TieRule::FirstListed,
            ),
            "p",
            &parts,
        )
        .unwrap();
        // Weights of the parts that arrived only (3 and 1).
        assert_eq!(w.values::<f32>(), [1.5, 2.5]);
    }

    #[test]
    fn majority_vote_with_both_tie_rules() {
        // Row 0: 7,7,2 → 7. Row 1: 5,3,9 → tie of three.
        let parts = vec![(2, i64s(&[2, 9])), (0, i64s(&[7, 5])), (1, i64s(&[7, 3]))];
        let first = combine(
            &join(Combiner::MajorityVote, vec![], TieRule::FirstListed),
            "label",
            &parts,
        )
        .unwrap();
        assert_eq!(first.values::<i64>(), [7, 5], "part a is listed first");
        let smallest = combine(
            &join(Combiner::MajorityVote, vec![], TieRule::Smallest),
            "label",
            &parts,
        )
        .unwrap();
        assert_eq!(smallest.values::<i64>(), [7, 3]);
    }

    #[test]
    fn max_confidence_first_and_concat() {
        let parts = vec![
            (1, f32s(&[0.2, 0.8, 0.6, 0.4], vec![2, 2])),
            (0, f32s(&[0.9, 0.1, 0.5, 0.5], vec![2, 2])),
        ];
        let j = |c| join(c, vec![], TieRule::FirstListed);
        let mc = combine(&j(Combiner::MaxConfidence), "p", &parts).unwrap();
        assert_eq!(mc.values::<f32>(), [0.9, 0.1, 0.6, 0.4]);
        let first = combine(&j(Combiner::First), "p", &parts).unwrap();
        assert_eq!(
            first.values::<f32>(),
            [0.2, 0.8, 0.6, 0.4],
            "first to arrive"
        );
        let cat = combine(&j(Combiner::Concat), "p", &parts).unwrap();
        assert_eq!(cat.shape, [2, 4]);
        assert_eq!(
            cat.values::<f32>(),
            [0.9, 0.1, 0.2, 0.8, 0.5, 0.5, 0.6, 0.4]
        );
    }

    #[test]
    fn parts_with_different_rows_are_an_error() {
        let parts = vec![(0, i64s(&[1])), (1, i64s(&[1, 2]))];
        let e = combine(
            &join(Combiner::MajorityVote, vec![], TieRule::FirstListed),
            "l",
            &parts,
        )
        .unwrap_err();
        assert!(e.contains("rows"), "{e}");
    }
}
