//! Image decoding steps: PNG or JPEG bytes, one image per row, decoded (the `image` crate),
//! converted to grayscale or RGB, resized to the declared size when it differs, and normalized
//! (`(pixel / divide - mean) / std` per channel) into one FP32 tensor. Decoding runs on the
//! blocking thread pool, off the async runtime. A row that is not a decodable image fails its
//! request with 422 naming the row.

use futures::future::BoxFuture;
use image::imageops::FilterType;
use sluice_common::config::DecodeImageConfig;
use sluice_schemas::{DataType, Tensor};
use std::sync::Arc;

use super::seam::{Step, StepFailure, StepInput, StepResult};

/// An image decoding step.
pub struct DecodeImageStep {
    config: Arc<DecodeImageConfig>,
    output: Arc<str>,
}

impl DecodeImageStep {
    /// The step for `config`, writing the tensor `output`.
    pub fn new(config: &DecodeImageConfig, output: String) -> DecodeImageStep {
        DecodeImageStep {
            config: Arc::new(config.clone()),
            output: output.into(),
        }
    }
}

/// One job's images as the configured tensor.
fn decode_job(c: &DecodeImageConfig, output: &str, job: &StepInput) -> StepResult {
    let t = job
        .tensors
        .iter()
        .find(|t| t.name == c.input)
        .ok_or_else(|| StepFailure::invalid(format!("no input '{}'", c.input)))?;
    let images = t
        .bytes_elements()
        .map_err(|e| StepFailure::invalid(e.to_string()))?;
    let (w, h, ch) = (c.width as usize, c.height as usize, c.channels as usize);
    let mut out = Vec::with_capacity(images.len() * w * h * ch);
    for (row, bytes) in images.iter().enumerate() {
        let pixels = decode(c, bytes)
            .map_err(|e| StepFailure::invalid(format!("'{}' row {row}: {e}", c.input)))?;
        match c.layout.as_str() {
            "chw" => {
                for k in 0..ch {
                    out.extend(pixels.iter().skip(k).step_by(ch));
                }
            }
            _ => out.extend_from_slice(&pixels),
        }
    }
    let n = images.len() as i64;
    let (w, h, ch) = (
        i64::from(c.width),
        i64::from(c.height),
        i64::from(c.channels),
    );
    let shape = match c.layout.as_str() {
        "chw" => vec![n, ch, h, w],
        "flat" => vec![n, h * w * ch],
        _ => vec![n, h, w, ch],
    };
    Ok(vec![Tensor::from_values(
        output,
        DataType::Fp32,
        shape,
        &out,
    )])
}

/// One image's normalized pixels, row-major HWC.
fn decode(c: &DecodeImageConfig, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let img =
        image::load_from_memory(bytes).map_err(|e| format!("not a PNG or JPEG image: {e}"))?;
    let filter = match c.filter.as_str() {
        "nearest" => FilterType::Nearest,
        "lanczos3" => FilterType::Lanczos3,
        _ => FilterType::Triangle,
    };
    let img = if img.width() != c.width || img.height() != c.height {
        img.resize_exact(c.width, c.height, filter)
    } else {
        img
    };
    let raw: Vec<u8> = match c.channels {
        3 => img.to_rgb8().into_raw(),
        _ => img.to_luma8().into_raw(),
    };
    let ch = c.channels as usize;
    Ok(raw
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let k = i % ch;
            let mean = c.mean.get(k).copied().unwrap_or(0.0);
            let std = c.std.get(k).copied().unwrap_or(1.0);
            ((f64::from(p) / c.divide - mean) / std) as f32
        })
        .collect())
}

impl Step for DecodeImageStep {
    fn run(&self, batch: Vec<StepInput>) -> BoxFuture<'_, Vec<StepResult>> {
        let (config, output) = (Arc::clone(&self.config), Arc::clone(&self.output));
        let n = batch.len();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                batch
                    .iter()
                    .map(|j| decode_job(&config, &output, j))
                    .collect()
            })
            .await
            .unwrap_or_else(|e| {
                (0..n)
                    .map(|_| {
                        Err(StepFailure::invalid(format!(
                            "image decoding panicked: {e}"
                        )))
                    })
                    .collect()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(toml: &str) -> DecodeImageConfig {
        toml::from_str(toml).unwrap()
    }

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
        let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_normalizes_and_lays_out() {
        let c = config("input = \"img\"\nwidth = 2\nheight = 2\ndivide = 15\nlayout = \"flat\"");
        let a = png(2, 2, |x, y| (15 * (x + 2 * y)) as u8);
        let job = StepInput {
            tensors: vec![Tensor::from_bytes_elements("img", vec![2], [a.clone(), a])],
            ..Default::default()
        };
        let out = decode_job(&c, "pixels", &job).unwrap();
        assert_eq!(out[0].shape, vec![2, 4]);
        assert_eq!(out[0].values::<f32>(), vec![0., 1., 2., 3., 0., 1., 2., 3.]);
        // Another size is resized; garbage is a 422 naming the row.
        let big = png(4, 4, |_, _| 30);
        let job = StepInput {
            tensors: vec![Tensor::from_bytes_elements(
                "img",
                vec![2],
                [big, b"nope".to_vec()],
            )],
            ..Default::default()
        };
        let e = decode_job(&c, "pixels", &job).unwrap_err();
        assert!(e.message.contains("'img' row 1"), "{}", e.message);
        let rgb = config(
            "input = \"img\"\nwidth = 1\nheight = 1\nchannels = 3\nlayout = \"chw\"\nmean = [0, 0.5, 0]\nstd = [1, 0.5, 1]",
        );
        let job = StepInput {
            tensors: vec![Tensor::from_bytes_elements(
                "img",
                vec![1],
                [png(1, 1, |_, _| 255)],
            )],
            ..Default::default()
        };
        let out = decode_job(&rgb, "pixels", &job).unwrap();
        assert_eq!(out[0].shape, vec![1, 3, 1, 1]);
        assert_eq!(out[0].values::<f32>(), vec![1.0, 1.0, 1.0]);
    }
}
