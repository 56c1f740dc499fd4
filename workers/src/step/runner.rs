//! Running a batch of requests as one model call: concatenate inputs along the batch dimension,
//! run, and split each output back per request.

use sluice_common::ModelConfig;
use sluice_schemas::Tensor;

use crate::backend::Backend;
use crate::step::StepInput;

/// The non-batch dimensions of every input: requests can share a model call only if these match.
fn signature(job: &StepInput) -> Vec<Vec<i64>> {
    job.tensors.iter().map(|t| t.shape[1..].to_vec()).collect()
}

/// Runs `jobs` (already validated) and returns each one's outputs, or its error message.
pub fn run_batch(
    backend: &mut impl Backend,
    model: &ModelConfig,
    jobs: &[StepInput],
) -> Vec<Result<Vec<Tensor>, String>> {
    let mut results: Vec<Option<Result<Vec<Tensor>, String>>> =
        (0..jobs.len()).map(|_| None).collect();
    let mut remaining: Vec<usize> = (0..jobs.len()).collect();
    while let Some(&first) = remaining.first() {
        let sig = signature(&jobs[first]);
        let (group, rest): (Vec<usize>, Vec<usize>) =
            remaining.iter().partition(|&&i| signature(&jobs[i]) == sig);
        remaining = rest;
        let members: Vec<&StepInput> = group.iter().map(|&i| &jobs[i]).collect();
        let outcome = run_group(backend, model, &members);
        for (k, &i) in group.iter().enumerate() {
            results[i] = Some(match &outcome {
                Ok(per_job) => Ok(per_job[k].clone()),
                Err(e) => Err(e.clone()),
            });
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("request was not run (internal error)".into())))
        .collect()
}

fn run_group(
    backend: &mut impl Backend,
    model: &ModelConfig,
    jobs: &[&StepInput],
) -> Result<Vec<Vec<Tensor>>, String> {
    let rows: Vec<usize> = jobs.iter().map(|j| j.rows()).collect();
    let total: usize = rows.iter().sum();
    let inputs: Vec<Tensor> = model
        .inputs
        .iter()
        .map(|spec| {
            let parts: Vec<&Tensor> = jobs
                .iter()
                .filter_map(|j| j.tensors.iter().find(|t| t.name == spec.name))
                .collect();
            concat(parts, total)
        })
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = model.outputs.iter().map(|s| s.name.clone()).collect();
    let outputs = backend.infer(&inputs, &names).map_err(|e| e.to_string())?;
    let mut per_job: Vec<Vec<Tensor>> = jobs
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in &outputs {
        if out.shape.first().copied() != Some(total as i64) {
            return Err(format!(
                "output '{}' has shape {:?}; its first dimension should be the batch of {total}",
                out.name, out.shape
            ));
        }
        let pieces = out.split_rows(&rows).map_err(|e| e.to_string())?;
        for (k, piece) in pieces.into_iter().enumerate() {
            let j = jobs[k];
            if j.wanted.is_empty() || j.wanted.contains(&out.name) {
                per_job[k].push(piece);
            }
        }
    }
    Ok(per_job)
}

/// Concatenates same-named tensors along the first dimension.
fn concat(parts: Vec<&Tensor>, total_rows: usize) -> Result<Tensor, String> {
    let first = parts.first().ok_or("no tensor to concatenate")?;
    if parts.len() == 1 {
        return Ok((*first).clone());
    }
    let mut data = Vec::with_capacity(parts.iter().map(|t| t.data.len()).sum());
    for t in &parts {
        data.extend_from_slice(&t.data);
    }
    let mut shape = first.shape.clone();
    shape[0] = total_rows as i64;
    Ok(Tensor {
        name: first.name.clone(),
        datatype: first.datatype,
        shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::BackendError;
    use sluice_common::TensorSpec;
    use sluice_schemas::DataType;
    use std::time::Duration;

    /// Doubles its input and reports the row index: enough to check concatenation and splitting.
    struct Doubler {
        calls: Vec<Vec<i64>>,
    }

    impl Backend for Doubler {
        fn infer(
            &mut self,
            inputs: &[Tensor],
            _outputs: &[String],
        ) -> Result<Vec<Tensor>, BackendError> {
            let x = &inputs[0];
            self.calls.push(x.shape.clone());
            let v: Vec<f32> = x.values::<f32>().iter().map(|a| a * 2.0).collect();
            let rows = x.shape[0];
            let idx: Vec<i64> = (0..rows).collect();
            Ok(vec![
                Tensor::from_values("y", DataType::Fp32, x.shape.clone(), &v),
                Tensor::from_values("row", DataType::Int64, vec![rows], &idx),
            ])
        }
    }

    fn model() -> ModelConfig {
        ModelConfig {
            onnx: Some("x".into()),
            learner: None,
            version: "1".into(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, -1],
            }],
            outputs: vec![
                TensorSpec {
                    name: "y".into(),
                    datatype: DataType::Fp32,
                    shape: vec![-1, -1],
                },
                TensorSpec {
                    name: "row".into(),
                    datatype: DataType::Int64,
                    shape: vec![-1],
                },
            ],
            max_batch_size: 16,
            max_input_elements: None,
            max_body_bytes: None,
            max_delay: Duration::ZERO,
            threads: 1,
            intra_op_threads: 1,
            partitions: 1,
            workers: 1,
        }
    }

    fn job(rows: usize, width: usize, start: f32, wanted: Vec<String>) -> StepInput {
        let vals: Vec<f32> = (0..rows * width).map(|i| start + i as f32).collect();
        StepInput {
            tensors: vec![Tensor::from_values(
                "x",
                DataType::Fp32,
                vec![rows as i64, width as i64],
                &vals,
            )],
            wanted,
            ..Default::default()
        }
    }

    #[test]
    fn concatenates_and_splits_per_request() {
        let mut b = Doubler { calls: vec![] };
        let jobs = vec![
            job(1, 2, 0.0, vec![]),
            job(2, 2, 10.0, vec![]),
            job(1, 2, 20.0, vec!["row".into()]),
        ];
        let out = run_batch(&mut b, &model(), &jobs);
        assert_eq!(
            b.calls,
            vec![vec![4, 2]],
            "one model call for all four rows"
        );
        let o0 = out[0].as_ref().unwrap();
        assert_eq!(o0[0].values::<f32>(), vec![0.0, 2.0]);
        let o1 = out[1].as_ref().unwrap();
        assert_eq!(o1[0].shape, vec![2, 2]);
        assert_eq!(o1[0].values::<f32>(), vec![20.0, 22.0, 24.0, 26.0]);
        assert_eq!(o1[1].values::<i64>(), vec![1, 2]);
        let o2 = out[2].as_ref().unwrap();
        assert_eq!(o2.len(), 1, "only the requested output");
        assert_eq!(o2[0].values::<i64>(), vec![3]);
    }

    #[test]
    fn different_inner_shapes_run_separately() {
        let mut b = Doubler { calls: vec![] };
        let jobs = vec![
            job(1, 2, 0.0, vec![]),
            job(1, 3, 0.0, vec![]),
            job(1, 2, 5.0, vec![]),
        ];
        let out = run_batch(&mut b, &model(), &jobs);
        assert_eq!(b.calls, vec![vec![2, 2], vec![1, 3]]);
        assert_eq!(
            out[2].as_ref().unwrap()[0].values::<f32>(),
            vec![10.0, 12.0]
        );
        assert_eq!(
            out[1].as_ref().unwrap()[0].values::<f32>(),
            vec![0.0, 2.0, 4.0]
        );
    }

    struct Failing;
    impl Backend for Failing {
        fn infer(&mut self, _: &[Tensor], _: &[String]) -> Result<Vec<Tensor>, BackendError> {
            Err(BackendError::Run("kaboom".into()))
        }
    }

    #[test]
    fn a_model_error_fails_each_request_of_the_call() {
        let out = run_batch(
            &mut Failing,
            &model(),
            &[job(1, 2, 0.0, vec![]), job(1, 2, 0.0, vec![])],
        );
        assert!(
            out.iter()
                .all(|r| r.as_ref().unwrap_err().contains("kaboom"))
        );
    }
}
