//! Building graphs from TOML snippets in tests (enabled by the `fixtures` feature).

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_schemas::DataType;

use super::{Graph, GraphConfig, compile};
use crate::config::{ModelConfig, TensorSpec};
use crate::topics::Topics;

/// A (name, datatype, shape) tensor declaration.
pub type Spec<'a> = (&'a str, DataType, Vec<i64>);

/// A model declaration with these inputs and outputs (file name `m.onnx`, batch 8).
pub fn model(inputs: &[Spec<'_>], outputs: &[Spec<'_>]) -> ModelConfig {
    let specs = |v: &[Spec<'_>]| {
        v.iter()
            .map(|(name, datatype, shape)| TensorSpec {
                name: name.to_string(),
                datatype: *datatype,
                shape: shape.clone(),
            })
            .collect()
    };
    ModelConfig {
        onnx: Some("m.onnx".into()),
        learner: None,
        version: "1".into(),
        inputs: specs(inputs),
        outputs: specs(outputs),
        max_batch_size: 8,
        max_input_elements: None,
        max_body_bytes: None,
        max_delay: Duration::ZERO,
        threads: 1,
        intra_op_threads: 1,
        partitions: 1,
        workers: 1,
    }
}

/// Compiles graph `g` from `[[steps]]` TOML, with one FP32 request input `input` of
/// `[-1, width]`, topics prefixed `prefix`.
pub fn compile_steps(
    steps: &str,
    width: i64,
    models: &BTreeMap<String, ModelConfig>,
    prefix: &str,
) -> Result<Graph, Vec<String>> {
    let text = format!(
        "inputs = [{{ name = \"input\", datatype = \"FP32\", shape = [-1, {width}] }}]\n{steps}"
    );
    let g: GraphConfig = toml::from_str(&text).map_err(|e| vec![e.to_string()])?;
    compile("g", &g, models, &Topics::new(prefix))
}
