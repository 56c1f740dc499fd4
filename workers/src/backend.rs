//! The inference seam: a small synchronous [`Backend`] trait, and its ONNX Runtime implementation.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use sluice_common::{ModelConfig, TensorSpec};
use sluice_schemas::{DataType, Tensor};

/// Why inference failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The model could not be loaded, or does not match its declaration.
    #[error("loading model: {0}")]
    Load(String),
    /// The model raised an error on these inputs.
    #[error("{0}")]
    Run(String),
}

/// Runs one batch: inputs already concatenated along the batch dimension.
/// Synchronous on purpose: it runs on a dedicated inference thread, never on the async runtime.
pub trait Backend: Send {
    /// Runs the model and returns the named outputs in order.
    fn infer(&mut self, inputs: &[Tensor], outputs: &[String])
    -> Result<Vec<Tensor>, BackendError>;
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Where the ONNX Runtime shared library is: `ORT_DYLIB_PATH` (`deploy/setup.sh` writes it to
/// `.sluice-env`). There is no fallback: a guessed library could be the wrong version.
pub fn ort_library_path() -> Option<PathBuf> {
    std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from)
}

/// Loads ONNX Runtime once per process.
pub fn environment() -> Result<&'static Environment, BackendError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = ort_library_path().ok_or_else(|| {
                "ONNX Runtime not found: set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 (deploy/setup.sh installs it; `source .sluice-env` sets it)"
                    .to_string()
            })?;
            if !path.is_file() {
                return Err(format!(
                    "ORT_DYLIB_PATH={} is not a file (deploy/setup.sh installs onnxruntime 1.31.1)",
                    path.display()
                ));
            }
            ort::init_from(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .with_name("sluice")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| BackendError::Load(e.clone()))
}

/// An ONNX Runtime session for one model.
pub struct OrtBackend {
    session: Session,
}

fn to_ort_type(d: DataType) -> Option<TensorElementType> {
    Some(match d {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Bytes => TensorElementType::String,
    })
}

fn check_declared(
    kind: &str,
    declared: &[TensorSpec],
    actual: &[ort::value::Outlet],
) -> Result<(), String> {
    for spec in declared {
        let outlet = actual
            .iter()
            .find(|o| o.name() == spec.name)
            .ok_or_else(|| {
                format!(
                    "declared {kind} '{}' is not in the ONNX model (it has {:?})",
                    spec.name,
                    actual.iter().map(|o| o.name()).collect::<Vec<_>>()
                )
            })?;
        let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
            return Err(format!(
                "{kind} '{}' is not a tensor in the ONNX model",
                spec.name
            ));
        };
        if to_ort_type(spec.datatype) != Some(*ty) {
            return Err(format!(
                "{kind} '{}' is declared {} but the ONNX model has {ty:?}",
                spec.name, spec.datatype
            ));
        }
        let dims: &[i64] = shape;
        let fits = dims.len() == spec.shape.len()
            && dims
                .iter()
                .zip(&spec.shape)
                .all(|(&m, &s)| m == -1 || s == -1 || m == s);
        if !fits {
            return Err(format!(
                "{kind} '{}' is declared with shape {:?} but the ONNX model has {dims:?}",
                spec.name, spec.shape
            ));
        }
    }
    Ok(())
}

impl OrtBackend {
    /// Loads the model and checks its inputs and outputs against the declaration.
    pub fn load(model: &ModelConfig) -> Result<OrtBackend, BackendError> {
        let onnx = model
            .onnx
            .as_deref()
            .ok_or_else(|| BackendError::Load("the model has no ONNX file".into()))?;
        let env = environment()?;
        let load = |e: ort::Error<_>| BackendError::Load(e.to_string());
        let session = Session::builder(env)
            .map_err(|e| BackendError::Load(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(load)?
            .with_intra_threads(model.intra_op_threads)
            .map_err(load)?
            .with_inter_threads(1)
            .map_err(load)?
            // Spinning threads would burn the cores the broker and gateway need.
            .with_intra_op_spinning(false)
            .map_err(load)?
            .commit_from_file(onnx)
            .map_err(|e| BackendError::Load(format!("{}: {e}", onnx.display())))?;
        check_declared("input", &model.inputs, session.inputs()).map_err(BackendError::Load)?;
        check_declared("output", &model.outputs, session.outputs()).map_err(BackendError::Load)?;
        Ok(OrtBackend { session })
    }
}

fn to_ort_value(t: &Tensor) -> Result<DynValue, BackendError> {
    let shape = t.shape.clone();
    macro_rules! pod {
        ($ty:ty) => {
            OrtTensor::from_array((shape, bytemuck::pod_collect_to_vec::<u8, $ty>(&t.data)))
                .map(|v| v.into_dyn())
        };
    }
    let value = match t.datatype {
        DataType::Bool => {
            OrtTensor::from_array((shape, t.data.iter().map(|b| *b != 0).collect::<Vec<bool>>()))
                .map(|v| v.into_dyn())
        }
        DataType::Uint8 => pod!(u8),
        DataType::Uint16 => pod!(u16),
        DataType::Uint32 => pod!(u32),
        DataType::Uint64 => pod!(u64),
        DataType::Int8 => pod!(i8),
        DataType::Int16 => pod!(i16),
        DataType::Int32 => pod!(i32),
        DataType::Int64 => pod!(i64),
        DataType::Fp32 => pod!(f32),
        DataType::Fp64 => pod!(f64),
        DataType::Fp16 => pod!(half::f16),
        DataType::Bytes => {
            let run = |m: String| BackendError::Run(format!("input '{}': {m}", t.name));
            let strings = t
                .bytes_elements()
                .map_err(|e| run(e.to_string()))?
                .into_iter()
                .map(|e| String::from_utf8(e.to_vec()))
                .collect::<Result<Vec<String>, _>>()
                .map_err(|_| run("an ONNX string tensor needs UTF-8 elements".into()))?;
            OrtTensor::from_string_array((shape, &strings[..])).map(|v| v.into_dyn())
        }
    };
    value.map_err(|e| BackendError::Run(format!("input '{}': {e}", t.name)))
}

fn from_ort_value(name: &str, v: &DynValue) -> Result<Tensor, BackendError> {
    let err = |e: ort::Error| BackendError::Run(format!("output '{name}': {e}"));
    macro_rules! pod {
        ($ty:ty, $dt:expr) => {{
            let (shape, data) = v.try_extract_tensor::<$ty>().map_err(err)?;
            Tensor {
                name: name.to_string(),
                datatype: $dt,
                shape: shape.to_vec(),
                data: bytemuck::cast_slice(data).to_vec(),
            }
        }};
    }
    let ty = match v.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(BackendError::Run(format!(
                "output '{name}' is {other:?}, not a tensor"
            )));
        }
    };
    Ok(match ty {
        TensorElementType::Float32 => pod!(f32, DataType::Fp32),
        TensorElementType::Float64 => pod!(f64, DataType::Fp64),
        TensorElementType::Float16 => pod!(half::f16, DataType::Fp16),
        TensorElementType::Int64 => pod!(i64, DataType::Int64),
        TensorElementType::Int32 => pod!(i32, DataType::Int32),
        TensorElementType::Int16 => pod!(i16, DataType::Int16),
        TensorElementType::Int8 => pod!(i8, DataType::Int8),
        TensorElementType::Uint64 => pod!(u64, DataType::Uint64),
        TensorElementType::Uint32 => pod!(u32, DataType::Uint32),
        TensorElementType::Uint16 => pod!(u16, DataType::Uint16),
        TensorElementType::Uint8 => pod!(u8, DataType::Uint8),
        TensorElementType::Bool => {
            let (shape, data) = v.try_extract_tensor::<bool>().map_err(err)?;
            Tensor {
                name: name.to_string(),
                datatype: DataType::Bool,
                shape: shape.to_vec(),
                data: data.iter().map(|b| u8::from(*b)).collect(),
            }
        }
        TensorElementType::String => {
            let (shape, strings) = v.try_extract_strings().map_err(err)?;
            Tensor::from_bytes_elements(name, shape.to_vec(), strings)
        }
        other => {
            return Err(BackendError::Run(format!(
                "output '{name}' has unsupported element type {other:?}"
            )));
        }
    })
}

impl Backend for OrtBackend {
    fn infer(
        &mut self,
        inputs: &[Tensor],
        outputs: &[String],
    ) -> Result<Vec<Tensor>, BackendError> {
        let values = inputs
            .iter()
            .map(|t| Ok((t.name.as_str(), to_ort_value(t)?)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        let result = self
            .session
            .run(values)
            .map_err(|e| BackendError::Run(e.to_string()))?;
        outputs
            .iter()
            .map(|name| {
                let v = result.get(name).ok_or_else(|| {
                    BackendError::Run(format!("the model produced no output '{name}'"))
                })?;
                from_ort_value(name, v)
            })
            .collect()
    }
}
