//! Encoding steps: each column group (an input, then its ops in order) becomes columns of one
//! FP32 feature vector [batch, width]. Numeric ops work element by element in f64; categorical
//! ops (one-hot, ordinal, hashing) read strings or integers. Each op matches its scikit-learn /
//! numpy counterpart (checked by the Python reference test).

use futures::future::BoxFuture;
use sluice_common::config::{EncodeColumn, EncodeOp, Unknown};
use sluice_common::hash::murmur3_32;
use sluice_schemas::{DataType, Number, Tensor};

use super::seam::{Step, StepFailure, StepInput, StepResult};

/// An encoding step.
pub struct EncodeStep {
    columns: Vec<EncodeColumn>,
    output: String,
}

/// One element on its way through a column's ops.
enum Cell<'a> {
    Number(Number),
    Text(&'a [u8]),
}

impl EncodeStep {
    /// The step for `columns`, writing the vector `output`.
    pub fn new(columns: Vec<EncodeColumn>, output: String) -> EncodeStep {
        EncodeStep { columns, output }
    }

    fn one(&self, job: &StepInput) -> StepResult {
        let rows = job.rows();
        let mut blocks: Vec<(usize, Vec<f32>)> = Vec::with_capacity(self.columns.len());
        for c in &self.columns {
            let t = job
                .tensors
                .iter()
                .find(|t| t.name == c.input)
                .ok_or_else(|| StepFailure::invalid(format!("no input '{}'", c.input)))?;
            if t.rows() != rows {
                return Err(StepFailure::invalid(format!(
                    "'{}' has {} rows, the first input {rows}",
                    c.input,
                    t.rows()
                )));
            }
            blocks.push(encode_column(c, t, rows).map_err(StepFailure::invalid)?);
        }
        let width: usize = blocks.iter().map(|(w, _)| w).sum();
        let mut out = Vec::with_capacity(rows * width);
        for r in 0..rows {
            for (w, values) in &blocks {
                out.extend_from_slice(&values[r * w..(r + 1) * w]);
            }
        }
        Ok(vec![Tensor::from_values(
            self.output.clone(),
            DataType::Fp32,
            vec![rows as i64, width as i64],
            &out,
        )])
    }
}

impl Step for EncodeStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        Box::pin(async move { batch.iter().map(|j| self.one(j)).collect() })
    }
}

/// The text form an integer or float takes when it is looked up in a vocabulary: integers
/// exactly (INT64 ids beyond 2^53 included), whole floats as integers, booleans as 0 and 1.
fn number_text(v: Number) -> String {
    match v {
        Number::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Number::Bool(b) => u8::from(b).to_string(),
        n => n.to_string(),
    }
}

/// The value as a float for the numeric ops (booleans as 0 and 1).
fn float(v: Number) -> f64 {
    v.as_f64()
        .unwrap_or(if v == Number::Bool(true) { 1.0 } else { 0.0 })
}

/// Encodes one column group: (its width per row, rows × width values).
fn encode_column(c: &EncodeColumn, t: &Tensor, rows: usize) -> Result<(usize, Vec<f32>), String> {
    let text_store;
    let mut cells: Vec<Cell> = if t.datatype == DataType::Bytes {
        text_store = t.bytes_elements().map_err(|e| e.to_string())?;
        text_store.iter().map(|e| Cell::Text(e)).collect()
    } else {
        t.numbers()
            .ok_or_else(|| format!("'{}' is {}, which cannot be encoded", c.input, t.datatype))?
            .into_iter()
            .map(Cell::Number)
            .collect()
    };
    let per_row = cells.len().checked_div(rows).unwrap_or(0);
    for op in &c.ops {
        let categorical = match op {
            EncodeOp::OneHot {
                vocabulary,
                unknown,
            } => Some(one_hot(&c.input, &cells, vocabulary, *unknown)?),
            EncodeOp::Ordinal {
                vocabulary,
                unknown,
            } => Some(ordinal(&c.input, &cells, vocabulary, *unknown)?),
            EncodeOp::Hash { buckets } => Some(hashed(&cells, rows, *buckets)),
            _ => None,
        };
        if let Some(values) = categorical {
            let width = values.len().checked_div(rows).unwrap_or(0);
            return Ok((width, values));
        }
        for cell in &mut cells {
            let Cell::Number(x) = cell else {
                return Err(format!(
                    "'{}' holds strings; numeric ops need numbers",
                    c.input
                ));
            };
            *x = Number::Float(numeric(op, float(*x)));
        }
    }
    let values = cells
        .iter()
        .map(|cell| match cell {
            Cell::Number(x) => Ok(float(*x) as f32),
            Cell::Text(_) => Err(format!(
                "'{}' holds strings and no op encodes them",
                c.input
            )),
        })
        .collect::<Result<Vec<f32>, String>>()?;
    Ok((per_row, values))
}

fn numeric(op: &EncodeOp, x: f64) -> f64 {
    match op {
        EncodeOp::Standardize { mean, std } => (x - mean) / std,
        EncodeOp::MinMax { min, max } => (x - min) / (max - min),
        EncodeOp::Log1p => x.ln_1p(),
        EncodeOp::Clip { min, max } => x.clamp(*min, *max),
        EncodeOp::Bucketize { edges } => edges.partition_point(|e| *e <= x) as f64,
        _ => x,
    }
}

fn lookup(cell: &Cell, vocabulary: &[String]) -> Option<usize> {
    match cell {
        Cell::Text(b) => vocabulary.iter().position(|v| v.as_bytes() == *b),
        Cell::Number(x) => {
            let s = number_text(*x);
            vocabulary.iter().position(|v| *v == s)
        }
    }
}

fn shown(cell: &Cell) -> String {
    match cell {
        Cell::Text(b) => format!("{:?}", String::from_utf8_lossy(b)),
        Cell::Number(x) => number_text(*x),
    }
}

fn one_hot(
    input: &str,
    cells: &[Cell],
    vocabulary: &[String],
    unknown: Unknown,
) -> Result<Vec<f32>, String> {
    let width = vocabulary.len() + usize::from(unknown == Unknown::Bucket);
    let mut out = vec![0f32; cells.len() * width];
    for (i, cell) in cells.iter().enumerate() {
        match (lookup(cell, vocabulary), unknown) {
            (Some(k), _) => out[i * width + k] = 1.0,
            (None, Unknown::Bucket) => out[i * width + vocabulary.len()] = 1.0,
            (None, Unknown::Ignore) => {}
            (None, Unknown::Error) => {
                return Err(format!(
                    "'{input}': {} is not in the one_hot vocabulary",
                    shown(cell)
                ));
            }
        }
    }
    Ok(out)
}

fn ordinal(
    input: &str,
    cells: &[Cell],
    vocabulary: &[String],
    unknown: Unknown,
) -> Result<Vec<f32>, String> {
    cells
        .iter()
        .map(|cell| match (lookup(cell, vocabulary), unknown) {
            (Some(k), _) => Ok(k as f32),
            (None, Unknown::Bucket) => Ok(vocabulary.len() as f32),
            (None, Unknown::Ignore) => Ok(-1.0),
            (None, Unknown::Error) => Err(format!(
                "'{input}': {} is not in the ordinal vocabulary",
                shown(cell)
            )),
        })
        .collect()
}

/// scikit-learn's FeatureHasher (string input, alternate_sign): per row, each element adds
/// sign(h) to column |h| mod buckets, h being the signed MurmurHash3 of its UTF-8 bytes.
fn hashed(cells: &[Cell], rows: usize, buckets: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * buckets];
    let per_row = cells.len().checked_div(rows).unwrap_or(0);
    for (i, cell) in cells.iter().enumerate() {
        let text;
        let bytes: &[u8] = match cell {
            Cell::Text(b) => b,
            Cell::Number(x) => {
                text = number_text(*x);
                text.as_bytes()
            }
        };
        let h = murmur3_32(bytes, 0) as i32;
        let column = (i64::from(h).unsigned_abs() % buckets as u64) as usize;
        let sign = if h >= 0 { 1.0 } else { -1.0 };
        out[(i / per_row.max(1)) * buckets + column] += sign;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn integer_categories_are_looked_up_by_their_exact_digits() {
        // 2^53 + 1 rounds to 2^53 as a double: through a float the two ids were one key.
        let ids = [(1i64 << 53) + 1, 1i64 << 53];
        let cells: Vec<Cell> = ids.iter().map(|&i| Cell::Number(Number::Int(i))).collect();
        let vocabulary = vec![ids[0].to_string(), ids[1].to_string()];
        let got = ordinal("id", &cells, &vocabulary, Unknown::Error).unwrap();
        assert_eq!(got, vec![0.0, 1.0]);
        assert_eq!(number_text(Number::Float(7.0)), "7");
        assert_eq!(number_text(Number::Bool(true)), "1");
    }

    fn column(toml: &str) -> EncodeColumn {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn numeric_ops_apply_in_order_and_columns_concatenate() {
        let step = EncodeStep::new(
            vec![
                column(
                    "input = \"amount\"\nops = [{ op = \"clip\", min = 0, max = 100 }, { op = \"log1p\" }, { op = \"standardize\", mean = 1, std = 2 }]",
                ),
                column(
                    "input = \"country\"\nops = [{ op = \"one_hot\", vocabulary = [\"US\", \"GB\"], unknown = \"bucket\" }]",
                ),
                column("input = \"hour\"\nops = [{ op = \"bucketize\", edges = [6, 12, 18] }]"),
            ],
            "features".into(),
        );
        let job = StepInput {
            tensors: vec![
                Tensor::from_values("amount", DataType::Fp32, vec![2], &[-5f32, 1000.0]),
                Tensor::from_bytes_elements("country", vec![2], ["GB", "FR"]),
                Tensor::from_values("hour", DataType::Int64, vec![2], &[6i64, 23]),
            ],
            ..Default::default()
        };
        let out = step.one(&job).unwrap();
        assert_eq!(out[0].shape, vec![2, 5]);
        let v: Vec<f32> = out[0].values();
        let a0 = ((0f64).ln_1p() - 1.0) / 2.0;
        let a1 = ((100f64).ln_1p() - 1.0) / 2.0;
        assert_eq!(
            v,
            vec![a0 as f32, 0., 1., 0., 1., a1 as f32, 0., 0., 1., 3.]
        );
    }

    #[test]
    fn unknown_categories_follow_the_setting() {
        let cells = [Cell::Text(b"x")];
        let vocab = vec!["a".to_string()];
        assert_eq!(
            one_hot("c", &cells, &vocab, Unknown::Ignore).unwrap(),
            vec![0.0]
        );
        assert!(
            one_hot("c", &cells, &vocab, Unknown::Error)
                .unwrap_err()
                .contains("\"x\"")
        );
        assert_eq!(
            ordinal("c", &cells, &vocab, Unknown::Ignore).unwrap(),
            vec![-1.0]
        );
        assert_eq!(
            ordinal("c", &cells, &vocab, Unknown::Bucket).unwrap(),
            vec![1.0]
        );
        assert_eq!(
            ordinal(
                "c",
                &[Cell::Number(Number::Float(7.0))],
                &["7".into()],
                Unknown::Error
            )
            .unwrap(),
            vec![0.0]
        );
    }
}
