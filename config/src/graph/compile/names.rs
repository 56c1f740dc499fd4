//! Pass 1, names: the graph's own settings, unique valid step names, known models (each step's
//! kind was checked when the config was parsed). Gives the index of each step by name.

use std::collections::BTreeMap;

use super::valid_step_name;
use crate::config::{GraphConfig, ModelConfig};

/// Checks names and models; returns step name → position in config order.
pub(super) fn check(
    key: &str,
    g: &GraphConfig,
    models: &BTreeMap<String, ModelConfig>,
) -> Result<BTreeMap<String, usize>, Vec<String>> {
    let mut p = Vec::new();
    if g.steps.is_empty() {
        return Err(vec![format!("{key}.steps: at least one step is required")]);
    }
    if g.inputs.is_empty() {
        p.push(format!("{key}.inputs: at least one is required"));
    }
    for s in &g.inputs {
        if s.shape.first() != Some(&-1) {
            p.push(format!(
                "{key}.inputs.{}.shape: the first dimension is the batch and must be -1",
                s.name
            ));
        }
    }
    if g.partitions.is_some_and(|n| n < 1) {
        p.push(format!("{key}.partitions: must be at least 1"));
    }
    if g.max_batch_size == 0 {
        p.push(format!("{key}.max_batch_size: must be at least 1"));
    }
    // Names and kinds.
    let mut index = BTreeMap::new();
    for (i, s) in g.steps.iter().enumerate() {
        let skey = format!("{key} step '{}'", s.name);
        if !valid_step_name(&s.name) {
            p.push(format!(
                "{skey}: step names may only contain a-z, 0-9, '_' and '-' (and not be 'request')"
            ));
        }
        if index.insert(s.name.clone(), i).is_some() {
            p.push(format!("{skey}: declared twice"));
        }
        if let Some(m) = s.kind.model()
            && !models.contains_key(m)
        {
            p.push(format!("{skey}: unknown model '{m}'"));
        }
        if s.workers == 0 {
            p.push(format!("{skey}.workers: must be at least 1"));
        }
    }
    if !p.is_empty() {
        return Err(p);
    }
    Ok(index)
}
