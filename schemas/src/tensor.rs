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
    /// Variable-length byte strings (text, ids, encoded images). On the wire and in memory each
    /// element is a 4-byte little-endian length followed by its bytes, as in Triton's binary
    /// tensor extension.
    Bytes,
}

impl DataType {
    /// Every supported datatype.
    pub const ALL: [DataType; 13] = [
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
        DataType::Bytes,
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
            DataType::Bytes => "BYTES",
        }
    }

    /// Triton's model-configuration name, e.g. `TYPE_FP32` (`TYPE_STRING` for BYTES).
    pub fn triton_config_name(self) -> String {
        match self {
            DataType::Bytes => "TYPE_STRING".into(),
            d => format!("TYPE_{}", d.as_str()),
        }
    }

    /// Bytes per element; `None` for BYTES, whose elements vary in length.
    pub fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
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
        "unknown datatype '{0}' (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES)"
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
    /// A BYTES tensor's data is not a whole number of length-prefixed elements, or holds a
    /// different number of elements than its shape.
    #[error("tensor '{name}' (BYTES): {problem}")]
    BytesFraming {
        /// Tensor name.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// Each `N`-byte little-endian element of `data`, converted by `f`.
pub(crate) fn le<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

/// Appends one BYTES element (its 4-byte little-endian length, then the bytes) to `out`.
pub fn push_bytes_element(out: &mut Vec<u8>, element: &[u8]) {
    let len = u32::try_from(element.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&element[..len as usize]);
}

/// Splits BYTES data into its elements; `Err` says where the framing breaks.
pub fn bytes_elements(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(format!(
                "element {} has a truncated length prefix ({} bytes left)",
                out.len(),
                rest.len()
            ));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!(
                "element {} declares {len} bytes but only {} remain",
                out.len(),
                tail.len()
            ));
        }
        let (element, tail) = tail.split_at(len);
        out.push(element);
        rest = tail;
    }
    Ok(out)
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

    /// Builds a BYTES tensor from its elements (row-major).
    pub fn from_bytes_elements<E: AsRef<[u8]>>(
        name: impl Into<String>,
        shape: Vec<i64>,
        elements: impl IntoIterator<Item = E>,
    ) -> Tensor {
        let mut data = Vec::new();
        for e in elements {
            push_bytes_element(&mut data, e.as_ref());
        }
        Tensor {
            name: name.into(),
            datatype: DataType::Bytes,
            shape,
            data,
        }
    }

    /// A BYTES tensor's elements (row-major); `Err` for another datatype or broken framing.
    pub fn bytes_elements(&self) -> Result<Vec<&[u8]>, TensorError> {
        let framing = |problem: String| TensorError::BytesFraming {
            name: self.name.clone(),
            problem,
        };
        if self.datatype != DataType::Bytes {
            return Err(framing(format!("is {}, not BYTES", self.datatype)));
        }
        bytes_elements(&self.data).map_err(framing)
    }

    /// Checks that the data matches shape and datatype (for BYTES: whole length-prefixed
    /// elements, as many as the shape holds); returns the element count.
    pub fn check(&self) -> Result<usize, TensorError> {
        let n = element_count(&self.shape).ok_or_else(|| TensorError::NegativeDim {
            name: self.name.clone(),
            shape: self.shape.clone(),
        })?;
        let Some(size) = self.datatype.element_size() else {
            let got = self.bytes_elements()?.len();
            if got != n {
                return Err(TensorError::BytesFraming {
                    name: self.name.clone(),
                    problem: format!("holds {got} elements but shape {:?} needs {n}", self.shape),
                });
            }
            return Ok(n);
        };
        let want = n.saturating_mul(size);
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

    /// Splits the tensor along its first dimension into pieces of `rows[k]` rows each (the
    /// rows must add up to the first dimension). Works for BYTES too.
    pub fn split_rows(&self, rows: &[usize]) -> Result<Vec<Tensor>, TensorError> {
        let total: usize = rows.iter().sum();
        let per_row = element_count(self.shape.get(1..).unwrap_or_default()).unwrap_or(0);
        let framing = |problem: String| TensorError::BytesFraming {
            name: self.name.clone(),
            problem,
        };
        if self.shape.first().copied() != i64::try_from(total).ok() {
            return Err(framing(format!(
                "shape {:?} cannot be split into {total} rows",
                self.shape
            )));
        }
        // Byte offset where each element starts, plus the end.
        let bounds: Vec<usize> = match self.datatype.element_size() {
            Some(size) => (0..=total * per_row).map(|i| i * size).collect(),
            None => {
                let mut at = 0;
                let mut b = vec![0];
                for e in self.bytes_elements()? {
                    at += 4 + e.len();
                    b.push(at);
                }
                b
            }
        };
        if bounds.len() != total * per_row + 1 || bounds.last() != Some(&self.data.len()) {
            return Err(framing(format!(
                "{} bytes do not fit shape {:?}",
                self.data.len(),
                self.shape
            )));
        }
        let mut out = Vec::with_capacity(rows.len());
        let mut first = 0;
        for &n in rows {
            let mut shape = self.shape.clone();
            shape[0] = n as i64;
            let (from, to) = (bounds[first * per_row], bounds[(first + n) * per_row]);
            out.push(Tensor {
                name: self.name.clone(),
                datatype: self.datatype,
                shape,
                data: self.data[from..to].to_vec(),
            });
            first += n;
        }
        Ok(out)
    }

    /// The elements as `f64` (any numeric datatype; BOOL as 0/1); `None` for BYTES and FP16.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        let d = &self.data;
        Some(match self.datatype {
            DataType::Bool | DataType::Uint8 => d.iter().map(|&b| f64::from(b)).collect(),
            DataType::Int8 => d.iter().map(|&b| f64::from(b as i8)).collect(),
            DataType::Uint16 => le(d, |a| f64::from(u16::from_le_bytes(a))),
            DataType::Int16 => le(d, |a| f64::from(i16::from_le_bytes(a))),
            DataType::Uint32 => le(d, |a| f64::from(u32::from_le_bytes(a))),
            DataType::Int32 => le(d, |a| f64::from(i32::from_le_bytes(a))),
            DataType::Uint64 => le(d, |a| u64::from_le_bytes(a) as f64),
            DataType::Int64 => le(d, |a| i64::from_le_bytes(a) as f64),
            DataType::Fp32 => le(d, |a| f64::from(f32::from_le_bytes(a))),
            DataType::Fp64 => le(d, f64::from_le_bytes),
            DataType::Fp16 | DataType::Bytes => return None,
        })
    }

    /// Rows (the first dimension; 0 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape
            .first()
            .map_or(0, |&n| usize::try_from(n).unwrap_or(0))
    }

    /// Copies the elements out as `T` (which must match the datatype's size).
    pub fn values<T: bytemuck::Pod>(&self) -> Vec<T> {
        bytemuck::pod_collect_to_vec(&self.data)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
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
    fn bytes_elements_round_trip_and_framing_is_checked() {
        let t = Tensor::from_bytes_elements("ids", vec![3], ["u1", "", "héllo"]);
        assert_eq!(t.check(), Ok(3));
        assert_eq!(
            t.bytes_elements().unwrap(),
            vec![&b"u1"[..], b"", "héllo".as_bytes()]
        );
        assert_eq!(&t.data[..6], &[2, 0, 0, 0, b'u', b'1']);
        let mut wrong_count = t.clone();
        wrong_count.shape = vec![2];
        assert!(matches!(
            wrong_count.check(),
            Err(TensorError::BytesFraming { .. })
        ));
        let mut truncated = t.clone();
        truncated.data.pop();
        assert!(matches!(
            truncated.check(),
            Err(TensorError::BytesFraming { .. })
        ));
        truncated.data.truncate(7);
        assert!(matches!(
            truncated.check(),
            Err(TensorError::BytesFraming { .. })
        ));
    }

    #[test]
    fn split_rows_cuts_fixed_and_bytes_tensors() {
        let t = Tensor::from_values("x", DataType::Int32, vec![3, 2], &[1i32, 2, 3, 4, 5, 6]);
        let parts = t.split_rows(&[1, 2]).unwrap();
        assert_eq!(parts[0].values::<i32>(), [1, 2]);
        assert_eq!(
            (parts[1].shape.clone(), parts[1].values::<i32>()),
            (vec![2, 2], vec![3, 4, 5, 6])
        );
        let b = Tensor::from_bytes_elements("s", vec![3], ["a", "bcd", ""]);
        let parts = b.split_rows(&[2, 1]).unwrap();
        assert_eq!(parts[0].bytes_elements().unwrap(), vec![&b"a"[..], b"bcd"]);
        assert_eq!(parts[1].bytes_elements().unwrap(), vec![&b""[..]]);
        assert!(b.split_rows(&[1, 1]).is_err());
    }

    #[test]
    fn element_count_handles_overflow() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[3, 0]), Some(0));
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }
}
