//! Tensors as they travel: Open Inference Protocol datatypes over raw little-endian bytes.

use std::fmt;
use std::str::FromStr;

#[cfg(target_endian = "big")]
compile_error!(
    "Sluice's tensor bytes are little-endian and are reinterpreted in place; big-endian hosts are not supported"
);

/// An element type of the Open Inference Protocol (KServe v2 / Triton).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DataType {
    /// One byte per element, 0 or 1.
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Unsigned 64-bit integer.
    Uint64,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE half precision (binary transport only).
    Fp16,
    /// IEEE single precision.
    Fp32,
    /// IEEE double precision.
    Fp64,
}

impl DataType {
    /// Every supported datatype.
    pub const ALL: [DataType; 12] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
    ];

    /// The protocol name, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    /// Triton's model-configuration name, e.g. `TYPE_FP32`.
    pub fn triton_config_name(self) -> String {
        format!("TYPE_{}", self.as_str())
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DataType {
    type Err = TensorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DataType::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| TensorError::UnknownDatatype(s.to_string()))
    }
}

impl TryFrom<String> for DataType {
    type Error = TensorError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DataType> for String {
    fn from(d: DataType) -> String {
        d.as_str().to_string()
    }
}

/// Problems with a tensor's own description (independent of any model).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    /// The datatype name is not one Sluice supports.
    #[error(
        "unknown datatype '{0}' (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64)"
    )]
    UnknownDatatype(String),
    /// A dimension is negative.
    #[error("tensor '{name}' has a negative dimension in shape {shape:?}")]
    NegativeDim {
        /// Tensor name.
        name: String,
        /// The offending shape.
        shape: Vec<i64>,
    },
    /// The byte length does not match shape × element size.
    #[error(
        "tensor '{name}' has {got} bytes of data but shape {shape:?} of {datatype} needs {want}"
    )]
    ByteLength {
        /// Tensor name.
        name: String,
        /// Declared shape.
        shape: Vec<i64>,
        /// Declared datatype.
        datatype: DataType,
        /// Bytes required.
        want: usize,
        /// Bytes given.
        got: usize,
    },
}

/// A named tensor with its raw little-endian row-major bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Tensor name (a model input or output name).
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Full shape, batch dimension included.
    pub shape: Vec<i64>,
    /// Raw element bytes.
    pub data: Vec<u8>,
}

/// Number of elements of `shape`, or `None` if a dimension is negative or the product overflows.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        if d < 0 {
            None
        } else {
            acc.checked_mul(usize::try_from(d).ok()?)
        }
    })
}

impl Tensor {
    /// Builds a tensor from typed values (any plain-old-data element type).
    pub fn from_values<T: bytemuck::Pod>(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<i64>,
        values: &[T],
    ) -> Tensor {
        Tensor {
            name: name.into(),
            datatype,
            shape,
            data: bytemuck::cast_slice(values).to_vec(),
        }
    }

    /// Checks that the byte length matches shape and datatype; returns the element count.
    pub fn check(&self) -> Result<usize, TensorError> {
        let n = element_count(&self.shape).ok_or_else(|| TensorError::NegativeDim {
            name: self.name.clone(),
            shape: self.shape.clone(),
        })?;
        let want = n.saturating_mul(self.datatype.size());
        if want != self.data.len() {
            return Err(TensorError::ByteLength {
                name: self.name.clone(),
                shape: self.shape.clone(),
                datatype: self.datatype,
                want,
                got: self.data.len(),
            });
        }
        Ok(n)
    }

    /// Copies the elements out as `T` (which must match the datatype's size).
    pub fn values<T: bytemuck::Pod>(&self) -> Vec<T> {
        bytemuck::pod_collect_to_vec(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(d.as_str().parse::<DataType>(), Ok(d));
        }
        assert!(matches!(
            "FLOAT".parse::<DataType>(),
            Err(TensorError::UnknownDatatype(_))
        ));
    }

    #[test]
    fn check_reports_byte_length_mismatch() {
        let mut t = Tensor::from_values("x", DataType::Fp32, vec![2, 2], &[1f32, 2., 3., 4.]);
        assert_eq!(t.check(), Ok(4));
        t.data.pop();
        assert!(matches!(
            t.check(),
            Err(TensorError::ByteLength {
                want: 16,
                got: 15,
                ..
            })
        ));
        t.shape = vec![-1, 2];
        assert!(matches!(t.check(), Err(TensorError::NegativeDim { .. })));
    }

    #[test]
    fn element_count_handles_overflow() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[3, 0]), Some(0));
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }
}
