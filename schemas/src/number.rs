//! Scalars kept exact from where they are read (a JSON number, a feature store, a database
//! column, an HTTP answer) to the tensor element they become, and back.
//!
//! The rules, the same on every path:
//! - an integer datatype takes an integer whose value fits it, or a float that is a whole number
//!   of magnitude at most 2^53 (past that a float no longer says which integer it was);
//! - a float datatype takes any float (the nearest FP32 for FP32; one beyond FP32's range is
//!   refused, NaN and ±inf pass as they are) and an integer it holds exactly;
//! - BOOL takes a boolean, or the integers 0 and 1;
//! - anything else is refused with the reason, never rounded, wrapped or saturated.

use std::fmt;

use crate::tensor::le;
use crate::{DataType, Tensor};

/// One scalar, exactly as it was read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// A signed integer.
    Int(i64),
    /// An unsigned integer (beyond `i64::MAX` too).
    UInt(u64),
    /// A floating-point number.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

/// Why a value cannot become an element of a datatype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfit(pub String);

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unfit {}

/// The largest magnitude up to which every integer has an exact FP64 value (2^53).
pub const EXACT_FLOAT_INTEGER: u64 = 1 << 53;

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::UInt(u) => write!(f, "{u}"),
            Number::Float(x) => write!(f, "{x}"),
            Number::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Number {
    /// The value as an exact integer (`i128` holds every `i64` and `u64`), if it is one.
    pub fn integer(self) -> Option<i128> {
        match self {
            Number::Int(i) => Some(i128::from(i)),
            Number::UInt(u) => Some(i128::from(u)),
            Number::Float(f)
                if f.is_finite() && f.fract() == 0.0 && f.abs() <= EXACT_FLOAT_INTEGER as f64 =>
            {
                Some(f as i128)
            }
            Number::Float(_) | Number::Bool(_) => None,
        }
    }

    /// The value as a float, for arithmetic that is floating-point anyway (scaling, thresholds,
    /// learners); integers beyond 2^53 come out as the nearest float. `None` for a boolean.
    pub fn as_f64(self) -> Option<f64> {
        match self {
            Number::Int(i) => Some(i as f64),
            Number::UInt(u) => Some(u as f64),
            Number::Float(f) => Some(f),
            Number::Bool(_) => None,
        }
    }

    /// The value as an exact float: a float as it is, an integer only when FP64 holds it exactly.
    fn exact_f64(self) -> Result<f64, Unfit> {
        let i = match self {
            Number::Float(f) => return Ok(f),
            Number::Bool(_) => return Err(Unfit("a boolean is not a number".into())),
            Number::Int(_) | Number::UInt(_) => self.integer().unwrap_or_default(),
        };
        let f = i as f64;
        if f as i128 == i {
            Ok(f)
        } else {
            Err(Unfit(format!("{i} has no exact floating-point value")))
        }
    }

    /// Appends the value as one little-endian element of `datatype`, or says why it cannot be
    /// one without changing it.
    pub fn push_element(self, datatype: DataType, out: &mut Vec<u8>) -> Result<(), Unfit> {
        macro_rules! int {
            ($t:ty) => {{
                let i = self.integer().ok_or_else(|| self.not_integer(datatype))?;
                let x = <$t>::try_from(i).map_err(|_| {
                    Unfit(format!(
                        "{i} is out of range for {datatype} ({}..={})",
                        <$t>::MIN,
                        <$t>::MAX
                    ))
                })?;
                out.extend_from_slice(&x.to_le_bytes());
            }};
        }
        match datatype {
            DataType::Bool => out.push(self.boolean()?),
            DataType::Uint8 => int!(u8),
            DataType::Uint16 => int!(u16),
            DataType::Uint32 => int!(u32),
            DataType::Uint64 => int!(u64),
            DataType::Int8 => int!(i8),
            DataType::Int16 => int!(i16),
            DataType::Int32 => int!(i32),
            DataType::Int64 => int!(i64),
            DataType::Fp32 => out.extend_from_slice(&self.fp32()?.to_le_bytes()),
            DataType::Fp64 => out.extend_from_slice(&self.exact_f64()?.to_le_bytes()),
            DataType::Fp16 => return Err(Unfit("FP16 is carried only as binary data".into())),
            DataType::Bytes => return Err(Unfit(format!("{self} is a number, not BYTES"))),
        }
        Ok(())
    }

    /// The value as one element of `datatype` of `N` bytes, exactly (the rules above).
    fn element<const N: usize>(self, datatype: DataType) -> Result<[u8; N], Unfit> {
        let mut out = Vec::with_capacity(N);
        self.push_element(datatype, &mut out)?;
        out.try_into()
            .map_err(|_| Unfit(format!("{datatype} is not {N} bytes wide")))
    }

    /// The value as an exact `i64` (INT64's rule).
    pub fn to_i64(self) -> Result<i64, Unfit> {
        self.element(DataType::Int64).map(i64::from_le_bytes)
    }

    /// The value as an exact `i32` (INT32's rule).
    pub fn to_i32(self) -> Result<i32, Unfit> {
        self.element(DataType::Int32).map(i32::from_le_bytes)
    }

    /// The value as an `f64` (FP64's rule: integers only when exact).
    pub fn to_f64(self) -> Result<f64, Unfit> {
        self.element(DataType::Fp64).map(f64::from_le_bytes)
    }

    /// The value as an `f32` (FP32's rule).
    pub fn to_f32(self) -> Result<f32, Unfit> {
        self.element(DataType::Fp32).map(f32::from_le_bytes)
    }

    /// The value as a boolean (BOOL's rule).
    pub fn to_bool(self) -> Result<bool, Unfit> {
        self.boolean().map(|b| b != 0)
    }

    /// Parses `text` as a value of `datatype`: integers as integers (never through a float),
    /// FP32 straight to the nearest FP32, booleans as `true`/`false`/`1`/`0`.
    pub fn parse(text: &str, datatype: DataType) -> Result<Number, Unfit> {
        let t = text.trim();
        let bad = || Unfit(format!("'{t}' is not a {datatype} value"));
        let n = match datatype {
            DataType::Bool => match t {
                "true" | "True" | "1" => Number::Bool(true),
                "false" | "False" | "0" => Number::Bool(false),
                _ => return Err(bad()),
            },
            DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Uint64 => {
                Number::UInt(t.parse().map_err(|_| bad())?)
            }
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                Number::Int(t.parse().map_err(|_| bad())?)
            }
            DataType::Fp32 => Number::Float(f64::from(t.parse::<f32>().map_err(|_| bad())?)),
            DataType::Fp64 | DataType::Fp16 => Number::Float(t.parse().map_err(|_| bad())?),
            DataType::Bytes => return Err(bad()),
        };
        // Range: a value the datatype cannot hold is refused here, not at the tensor.
        n.push_element(datatype, &mut Vec::new()).map(|()| n)
    }

    fn not_integer(self, datatype: DataType) -> Unfit {
        match self {
            Number::Float(f) if f.fract() == 0.0 && f.is_finite() => Unfit(format!(
                "{f} is beyond 2^53, where a float no longer says which {datatype} it was; send it as an integer"
            )),
            Number::Bool(b) => Unfit(format!("{b} is a boolean, not {datatype}")),
            _ => Unfit(format!("{self} is not an integer ({datatype})")),
        }
    }

    fn boolean(self) -> Result<u8, Unfit> {
        match self {
            Number::Bool(b) => Ok(u8::from(b)),
            Number::Int(0) | Number::UInt(0) => Ok(0),
            Number::Int(1) | Number::UInt(1) => Ok(1),
            _ => Err(Unfit(format!(
                "{self} is not a boolean (true, false, 0 or 1)"
            ))),
        }
    }

    fn fp32(self) -> Result<f32, Unfit> {
        let f = self.exact_f64()?;
        let g = f as f32;
        if f.is_finite() && g.is_infinite() {
            return Err(Unfit(format!("{f} is out of range for FP32")));
        }
        if !matches!(self, Number::Float(_)) && f64::from(g) != f {
            return Err(Unfit(format!("{self} has no exact FP32 value")));
        }
        Ok(g)
    }
}

impl Tensor {
    /// The elements, each exactly as stored (BOOL as booleans); `None` for BYTES and FP16.
    pub fn numbers(&self) -> Option<Vec<Number>> {
        let d = &self.data;
        let int = |x: i64| Number::Int(x);
        Some(match self.datatype {
            DataType::Bool => d.iter().map(|&b| Number::Bool(b != 0)).collect(),
            DataType::Uint8 => d.iter().map(|&b| Number::UInt(u64::from(b))).collect(),
            DataType::Uint16 => le(d, |a| Number::UInt(u64::from(u16::from_le_bytes(a)))),
            DataType::Uint32 => le(d, |a| Number::UInt(u64::from(u32::from_le_bytes(a)))),
            DataType::Uint64 => le(d, |a| Number::UInt(u64::from_le_bytes(a))),
            DataType::Int8 => d.iter().map(|&b| int(i64::from(b as i8))).collect(),
            DataType::Int16 => le(d, |a| int(i64::from(i16::from_le_bytes(a)))),
            DataType::Int32 => le(d, |a| int(i64::from(i32::from_le_bytes(a)))),
            DataType::Int64 => le(d, |a| int(i64::from_le_bytes(a))),
            DataType::Fp32 => le(d, |a| Number::Float(f64::from(f32::from_le_bytes(a)))),
            DataType::Fp64 => le(d, |a| Number::Float(f64::from_le_bytes(a))),
            DataType::Fp16 | DataType::Bytes => return None,
        })
    }
}

/// Builds a tensor of `datatype` from `values`; `Err` names the first element that does not fit.
pub fn tensor_from_numbers(
    name: &str,
    datatype: DataType,
    shape: Vec<i64>,
    values: &[Number],
) -> Result<Tensor, Unfit> {
    let mut data = Vec::with_capacity(values.len() * datatype.element_size().unwrap_or(8));
    for (i, v) in values.iter().enumerate() {
        v.push_element(datatype, &mut data)
            .map_err(|e| Unfit(format!("'{name}' element {i}: {e}")))?;
    }
    Ok(Tensor {
        name: name.to_string(),
        datatype,
        shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn one(n: Number, dt: DataType) -> Result<Vec<u8>, Unfit> {
        let mut out = Vec::new();
        n.push_element(dt, &mut out).map(|()| out)
    }

    #[test]
    fn boundaries_of_int64_stay_exact_and_floats_past_2_53_are_refused() {
        for i in [
            i64::MIN,
            i64::MAX,
            (1 << 53) + 1,
            -(1 << 53) - 1,
            -2654276660701483516,
        ] {
            assert_eq!(
                one(Number::Int(i), DataType::Int64).unwrap(),
                i.to_le_bytes()
            );
        }
        let past = 2f64.powi(53) + 2.0;
        assert!(one(Number::Float(past), DataType::Int64).is_err());
        assert_eq!(
            one(Number::Float(2f64.powi(53)), DataType::Int64).unwrap(),
            (1i64 << 53).to_le_bytes()
        );
        assert!(one(Number::Float(1.5), DataType::Int32).is_err());
        assert!(one(Number::UInt(u64::MAX), DataType::Int64).is_err());
        assert!(one(Number::Int(-1), DataType::Uint64).is_err());
        assert!(one(Number::Int(i64::from(i32::MAX) + 1), DataType::Int32).is_err());
    }

    #[test]
    fn floats_take_exact_integers_and_refuse_overflow() {
        assert!(one(Number::Int((1 << 53) + 1), DataType::Fp64).is_err());
        assert!(one(Number::Int((1 << 24) + 1), DataType::Fp32).is_err());
        assert!(one(Number::Int(1 << 40), DataType::Fp32).is_ok());
        assert!(one(Number::Float(1e39), DataType::Fp32).is_err());
        let nan = one(Number::Float(f64::NAN), DataType::Fp32).unwrap();
        assert!(f32::from_le_bytes(nan.try_into().unwrap()).is_nan());
        let inf = one(Number::Float(f64::NEG_INFINITY), DataType::Fp64).unwrap();
        assert_eq!(
            f64::from_le_bytes(inf.try_into().unwrap()),
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn booleans_are_booleans_or_zero_and_one() {
        assert_eq!(one(Number::Bool(true), DataType::Bool).unwrap(), [1]);
        assert_eq!(one(Number::Int(0), DataType::Bool).unwrap(), [0]);
        assert!(one(Number::Int(2), DataType::Bool).is_err());
        assert!(one(Number::Bool(true), DataType::Int32).is_err());
        assert!(one(Number::Float(1.0), DataType::Bool).is_err());
    }

    /// Every datatype that numbers can fill, with a strategy for its raw element bytes.
    fn numeric_tensor() -> impl Strategy<Value = Tensor> {
        let dts = DataType::ALL
            .into_iter()
            .filter(|d| !matches!(d, DataType::Fp16 | DataType::Bytes))
            .collect::<Vec<_>>();
        (prop::sample::select(dts), 0usize..6).prop_flat_map(|(dt, n)| {
            let size = dt.element_size().unwrap_or(1);
            prop::collection::vec(any::<u8>(), n * size).prop_map(move |mut data| {
                if dt == DataType::Bool {
                    data.iter_mut().for_each(|b| *b &= 1);
                }
                Tensor {
                    name: "x".into(),
                    datatype: dt,
                    shape: vec![n as i64],
                    data,
                }
            })
        })
    }

    proptest! {
        /// Any element of any numeric datatype read as a number and written back as the same
        /// datatype is the same bytes (NaN payloads included).
        #[test]
        fn every_element_survives_numbers_and_back(t in numeric_tensor()) {
            let numbers = t.numbers().unwrap();
            let back = tensor_from_numbers("x", t.datatype, t.shape.clone(), &numbers).unwrap();
            if t.datatype == DataType::Fp32 || t.datatype == DataType::Fp64 {
                // NaN payloads: compare as bits, except that a NaN stays a NaN.
                let a = t.numbers().unwrap();
                let b = back.numbers().unwrap();
                for (x, y) in a.iter().zip(&b) {
                    match (x, y) {
                        (Number::Float(x), Number::Float(y)) if x.is_nan() => prop_assert!(y.is_nan()),
                        _ => prop_assert_eq!(x, y),
                    }
                }
            } else {
                prop_assert_eq!(back.data, t.data);
            }
        }

        /// An i64 is exact as INT64 whatever its size.
        #[test]
        fn any_i64_is_exact_as_int64(i in any::<i64>()) {
            prop_assert_eq!(one(Number::Int(i), DataType::Int64).unwrap(), i.to_le_bytes().to_vec());
        }

        /// An integer either goes into a narrower datatype unchanged or is refused.
        #[test]
        fn narrowing_is_exact_or_refused(i in any::<i64>()) {
            match one(Number::Int(i), DataType::Int32) {
                Ok(b) => prop_assert_eq!(i64::from(i32::from_le_bytes(b.try_into().unwrap())), i),
                Err(_) => prop_assert!(i32::try_from(i).is_err()),
            }
            match one(Number::Int(i), DataType::Fp64) {
                Ok(b) => prop_assert_eq!(f64::from_le_bytes(b.try_into().unwrap()) as i128, i128::from(i)),
                Err(_) => prop_assert!(i.unsigned_abs() > EXACT_FLOAT_INTEGER),
            }
        }
    }
}
