//! A servable's signature (what callers send and get back) and the checks of request tensors
//! against it, shared by the gateway and the workers. Models and graphs both have one.

use sluice_schemas::{DataType, Tensor, tensor::element_count};

use crate::config::{ModelConfig, TensorSpec};

/// What a model or graph takes and gives: checked against every request it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Version reported in metadata and results.
    pub version: String,
    /// Request tensors (batch dimension first, -1 for variable dimensions).
    pub inputs: Vec<TensorSpec>,
    /// Answer tensors.
    pub outputs: Vec<TensorSpec>,
    /// Most rows one request may carry.
    pub max_batch_size: usize,
    /// Most elements one input tensor may carry (unset: bounded by the body limit only).
    pub max_input_elements: Option<usize>,
    /// Largest request body for this servable (unset: the gateway's `max_body_bytes`).
    pub max_body_bytes: Option<usize>,
    /// BYTES inputs must be UTF-8 text: an ONNX model's string tensors (the `ort` crate hands
    /// onnxruntime Rust strings), so other bytes are refused up front, naming the element.
    pub utf8_bytes: bool,
}

impl ModelConfig {
    /// The model's signature as declared in config.
    pub fn signature(&self) -> Signature {
        Signature {
            version: self.version.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            max_batch_size: self.max_batch_size,
            max_input_elements: self.max_input_elements,
            max_body_bytes: self.max_body_bytes,
            utf8_bytes: self.onnx.is_some(),
        }
    }
}

/// Why a request's tensors do not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// A BYTES element that is not UTF-8, for a model that needs text.
    #[error("input '{name}' element {element} is not UTF-8; this model's BYTES inputs are text")]
    NotText {
        /// Input name.
        name: String,
        /// The element's index.
        element: usize,
    },
    /// A declared input is absent.
    #[error("missing input '{0}'")]
    Missing(String),
    /// An input the model does not declare.
    #[error("unexpected input '{name}'; the model's inputs are {expected:?}")]
    Unexpected {
        /// Given name.
        name: String,
        /// Declared names.
        expected: Vec<String>,
    },
    /// The same input twice.
    #[error("input '{0}' given more than once")]
    Duplicate(String),
    /// Wrong element type.
    #[error("input '{name}' has datatype {got}, the model expects {want}")]
    Datatype {
        /// Input name.
        name: String,
        /// Declared datatype.
        want: DataType,
        /// Given datatype.
        got: DataType,
    },
    /// Shape incompatible with the declared one.
    #[error("input '{name}' has shape {got:?}, the model expects {want:?} (-1 = any size)")]
    Shape {
        /// Input name.
        name: String,
        /// Declared shape.
        want: Vec<i64>,
        /// Given shape.
        got: Vec<i64>,
    },
    /// More elements in one tensor than the servable's `max_input_elements`.
    #[error("input '{name}' has {got} elements, more than max_input_elements ({max})")]
    TooManyElements {
        /// Input name.
        name: String,
        /// Elements given.
        got: usize,
        /// The servable's limit.
        max: usize,
    },
    /// Batch dimension larger than the model allows.
    #[error("input '{name}' has batch size {got}, the model's max_batch_size is {max}")]
    BatchTooLarge {
        /// Input name.
        name: String,
        /// Given batch size.
        got: i64,
        /// Allowed maximum.
        max: usize,
    },
    /// Inputs disagree on the batch size.
    #[error("inputs disagree on the batch size: '{a}' has {na}, '{b}' has {nb}")]
    BatchMismatch {
        /// First input.
        a: String,
        /// Its batch size.
        na: i64,
        /// Second input.
        b: String,
        /// Its batch size.
        nb: i64,
    },
    /// Data length does not match the shape.
    #[error("input '{name}' has {got} elements of data but shape {shape:?} needs {want}")]
    ElementCount {
        /// Input name.
        name: String,
        /// Shape given.
        shape: Vec<i64>,
        /// Elements needed.
        want: usize,
        /// Elements given.
        got: usize,
    },
    /// An output that the model does not have was requested.
    #[error("unknown output '{name}'; the model's outputs are {expected:?}")]
    UnknownOutput {
        /// Requested name.
        name: String,
        /// Declared names.
        expected: Vec<String>,
    },
}

fn shape_fits(spec: &TensorSpec, shape: &[i64]) -> bool {
    spec.shape.len() == shape.len()
        && spec
            .shape
            .iter()
            .zip(shape)
            .all(|(&w, &g)| g >= 0 && (w == -1 || w == g))
}

/// Checks `inputs` against the model's declared inputs; returns the batch size (rows).
pub fn validate_inputs(model: &Signature, inputs: &[Tensor]) -> Result<usize, InputError> {
    let mut batch: Option<(String, i64)> = None;
    for (i, t) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(InputError::Duplicate(t.name.clone()));
        }
        let spec = model
            .inputs
            .iter()
            .find(|s| s.name == t.name)
            .ok_or_else(|| InputError::Unexpected {
                name: t.name.clone(),
                expected: model.inputs.iter().map(|s| s.name.clone()).collect(),
            })?;
        if spec.datatype != t.datatype {
            return Err(InputError::Datatype {
                name: t.name.clone(),
                want: spec.datatype,
                got: t.datatype,
            });
        }
        if !shape_fits(spec, &t.shape) {
            return Err(InputError::Shape {
                name: t.name.clone(),
                want: spec.shape.clone(),
                got: t.shape.clone(),
            });
        }
        let rows = t.shape[0];
        if rows < 1 || rows as u64 > model.max_batch_size as u64 {
            return Err(InputError::BatchTooLarge {
                name: t.name.clone(),
                got: rows,
                max: model.max_batch_size,
            });
        }
        match &batch {
            Some((a, na)) if *na != rows => {
                return Err(InputError::BatchMismatch {
                    a: a.clone(),
                    na: *na,
                    b: t.name.clone(),
                    nb: rows,
                });
            }
            Some(_) => {}
            None => batch = Some((t.name.clone(), rows)),
        }
        check_elements(model, t)?;
    }
    if let Some(missing) = model
        .inputs
        .iter()
        .find(|s| !inputs.iter().any(|t| t.name == s.name))
    {
        return Err(InputError::Missing(missing.name.clone()));
    }
    Ok(batch.map(|(_, n)| n as usize).unwrap_or(0))
}

/// Checks one input's elements: within the signature's limit, as many as its shape says, and
/// (for a text model) BYTES elements that are UTF-8.
fn check_elements(model: &Signature, t: &Tensor) -> Result<(), InputError> {
    let want = element_count(&t.shape).unwrap_or(usize::MAX);
    if let Some(max) = model.max_input_elements
        && want > max
    {
        return Err(InputError::TooManyElements {
            name: t.name.clone(),
            got: want,
            max,
        });
    }
    // A BYTES tensor's elements, split once for the count and the UTF-8 check.
    let elements = match t.datatype {
        DataType::Bytes => sluice_schemas::tensor::bytes_elements(&t.data).ok(),
        _ => None,
    };
    let got = match (t.datatype.element_size(), &elements) {
        (Some(size), _) => t.data.len() / size,
        (None, Some(e)) => e.len(),
        (None, None) => usize::MAX,
    };
    if model.utf8_bytes
        && let Some(element) = elements
            .iter()
            .flatten()
            .position(|e| std::str::from_utf8(e).is_err())
    {
        return Err(InputError::NotText {
            name: t.name.clone(),
            element,
        });
    }
    if got != want
        || t.datatype
            .element_size()
            .is_some_and(|size| want.saturating_mul(size) != t.data.len())
    {
        return Err(InputError::ElementCount {
            name: t.name.clone(),
            shape: t.shape.clone(),
            want,
            got,
        });
    }
    Ok(())
}

/// Checks that every requested output exists.
pub fn validate_outputs(model: &Signature, requested: &[String]) -> Result<(), InputError> {
    for name in requested {
        if !model.outputs.iter().any(|s| &s.name == name) {
            return Err(InputError::UnknownOutput {
                name: name.clone(),
                expected: model.outputs.iter().map(|s| s.name.clone()).collect(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn model() -> ModelConfig {
        ModelConfig {
            onnx: Some("m.onnx".into()),
            learner: None,
            version: "1".into(),
            inputs: vec![
                TensorSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![-1, 3],
                },
                TensorSpec {
                    name: "k".into(),
                    datatype: DataType::Int64,
                    shape: vec![-1],
                },
            ],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::Fp32,
                shape: vec![-1],
            }],
            max_batch_size: 4,
            max_input_elements: None,
            max_body_bytes: None,
            max_delay: Duration::ZERO,
            threads: 1,
            intra_op_threads: 1,
            partitions: 1,
            workers: 1,
        }
    }

    fn x(rows: i64) -> Tensor {
        Tensor::from_values(
            "x",
            DataType::Fp32,
            vec![rows, 3],
            &vec![0f32; rows as usize * 3],
        )
    }
    fn k(rows: i64) -> Tensor {
        Tensor::from_values("k", DataType::Int64, vec![rows], &vec![0i64; rows as usize])
    }

    #[test]
    fn accepts_matching_inputs_and_returns_rows() {
        assert_eq!(validate_inputs(&model().signature(), &[x(2), k(2)]), Ok(2));
    }

    #[test]
    fn names_each_kind_of_mismatch() {
        let m = model().signature();
        assert_eq!(
            validate_inputs(&m, &[x(1)]),
            Err(InputError::Missing("k".into()))
        );
        assert!(matches!(
            validate_inputs(
                &m,
                &[
                    x(1),
                    k(1),
                    Tensor {
                        name: "z".into(),
                        ..k(1)
                    }
                ]
            ),
            Err(InputError::Unexpected { .. })
        ));
        assert_eq!(
            validate_inputs(&m, &[x(1), x(1)]),
            Err(InputError::Duplicate("x".into()))
        );
        let wrong_type = Tensor::from_values("x", DataType::Fp64, vec![1, 3], &[0f64; 3]);
        assert!(matches!(
            validate_inputs(&m, &[wrong_type, k(1)]),
            Err(InputError::Datatype { .. })
        ));
        let wrong_shape = Tensor::from_values("x", DataType::Fp32, vec![1, 4], &[0f32; 4]);
        assert!(matches!(
            validate_inputs(&m, &[wrong_shape, k(1)]),
            Err(InputError::Shape { .. })
        ));
        assert!(matches!(
            validate_inputs(&m, &[x(5), k(5)]),
            Err(InputError::BatchTooLarge { got: 5, max: 4, .. })
        ));
        assert!(matches!(
            validate_inputs(&m, &[x(0), k(0)]),
            Err(InputError::BatchTooLarge { got: 0, .. })
        ));
        assert!(matches!(
            validate_inputs(&m, &[x(2), k(1)]),
            Err(InputError::BatchMismatch { .. })
        ));
        let mut short = x(1);
        short.data.truncate(8);
        assert!(matches!(
            validate_inputs(&m, &[short, k(1)]),
            Err(InputError::ElementCount {
                want: 3,
                got: 2,
                ..
            })
        ));
    }

    #[test]
    fn outputs_must_exist() {
        assert_eq!(
            validate_outputs(&model().signature(), &["y".into()]),
            Ok(())
        );
        assert!(matches!(
            validate_outputs(&model().signature(), &["nope".into()]),
            Err(InputError::UnknownOutput { .. })
        ));
    }
}
