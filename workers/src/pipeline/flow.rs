//! Moving a request through a compiled graph: which tensors a step reads, where its record goes
//! next (with canary choice and shadow copies), what a final answer or a failure looks like.
//! Pure functions over [`Graph`]; the worker does the Kafka and Redis I/O.

use std::collections::BTreeMap;

use sluice_common::graph::{Graph, Selector, StepKind, canary_picks};
use sluice_schemas::ErrorCode;
use sluice_schemas::{
    DataType, GraphHop, InferenceError, InferenceRequest, InferenceResult, Tensor,
};

/// A record to produce (key: the request id).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Destination topic.
    pub topic: String,
    /// The envelope.
    pub request: InferenceRequest,
}

/// What follows a step: records for the next steps, and/or the graph's answer.
#[derive(Debug, Default, PartialEq)]
pub struct Next {
    /// Records for the next steps (or a join).
    pub forwards: Vec<Outgoing>,
    /// The answer, when this was the last step or the request failed outside a join's branch.
    pub answer: Option<InferenceResult>,
}

/// Renames a step's outputs to `<step>.<output>`.
pub fn qualify(step: &str, outputs: &[Tensor]) -> Vec<Tensor> {
    outputs
        .iter()
        .map(|t| Tensor {
            name: format!("{step}.{}", t.name),
            ..t.clone()
        })
        .collect()
}

/// A graph's request tensors as carried tensors (`request.<input>`).
pub fn entry_carried(inputs: Vec<Tensor>) -> Vec<Tensor> {
    inputs
        .into_iter()
        .map(|t| Tensor {
            name: format!("request.{}", t.name),
            ..t
        })
        .collect()
}

/// The tensors step `i` reads, under the names it reads them by.
pub fn step_inputs(graph: &Graph, i: usize, carried: &[Tensor]) -> Result<Vec<Tensor>, String> {
    graph.steps[i]
        .inputs
        .iter()
        .map(|(name, src)| {
            carried
                .iter()
                .find(|t| &t.name == src)
                .map(|t| Tensor {
                    name: name.clone(),
                    ..t.clone()
                })
                .ok_or_else(|| format!("the record does not carry '{src}'"))
        })
        .collect()
}

/// The key that picks a canary variant: a request parameter, or the request id.
fn canary_key(param: Option<&str>, request: &InferenceRequest) -> String {
    param
        .and_then(|p| request.parameters.get(p))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| request.id.clone())
}

/// The topic that serves step `t` for this request (the canary's when it picks the candidate).
pub fn topic_for<'a>(graph: &'a Graph, t: usize, request: &InferenceRequest) -> &'a str {
    let step = &graph.steps[t];
    match &step.canary {
        Some(c) if canary_picks(&canary_key(c.key_parameter.as_deref(), request), c.share) => {
            &c.topic
        }
        _ => &step.topic,
    }
}

/// The record sending `base` to step `t`, carrying what `t` and later steps need.
pub fn send_to(
    graph: &Graph,
    t: usize,
    base: &InferenceRequest,
    carried: &[Tensor],
    from: &str,
) -> Outgoing {
    let step = &graph.steps[t];
    let served = base
        .hop
        .as_ref()
        .map(|h| h.served.clone())
        .unwrap_or_default();
    let request = InferenceRequest {
        inputs: carried
            .iter()
            .filter(|c| step.carry.contains(&c.name))
            .cloned()
            .collect(),
        hop: Some(GraphHop {
            graph: graph.name.clone(),
            step: step.name.clone(),
            from: from.to_string(),
            shadow: false,
            failed: None,
            served,
        }),
        ..base.clone()
    };
    Outgoing {
        topic: topic_for(graph, t, &request).to_string(),
        request,
    }
}

/// What follows step `i` once it produced `outputs` (unqualified) for `base`, which carried
/// `carried`.
pub fn after_step(
    graph: &Graph,
    i: usize,
    base: &InferenceRequest,
    mut carried: Vec<Tensor>,
    outputs: Vec<Tensor>,
) -> Result<Next, InferenceError> {
    let step = &graph.steps[i];
    if step.next.is_empty() {
        return Ok(Next {
            forwards: Vec::new(),
            answer: Some(final_result(graph, base, outputs)),
        });
    }
    // A router may route by its own output (a bandit's `arm`).
    carried.extend(qualify(&step.name, &outputs));
    let targets = match &step.kind {
        StepKind::Route(_) => route_targets(graph, i, base, &carried)?,
        _ => step.next.clone(),
    };
    Ok(Next {
        forwards: targets
            .into_iter()
            .map(|t| send_to(graph, t, base, &carried, &step.name))
            .collect(),
        answer: None,
    })
}

/// The steps a router sends `base` to.
pub fn route_targets(
    graph: &Graph,
    i: usize,
    base: &InferenceRequest,
    carried: &[Tensor],
) -> Result<Vec<usize>, InferenceError> {
    let step = &graph.steps[i];
    let StepKind::Route(route) = &step.kind else {
        return Ok(step.next.clone());
    };
    let value = match &route.by {
        Selector::Parameter(p) => base
            .parameters
            .get(p)
            .map(|v| v.trim_matches('"').to_string()),
        Selector::Tensor(src) => carried
            .iter()
            .find(|t| &t.name == src)
            .and_then(first_value),
    };
    let chosen = value
        .as_ref()
        .and_then(|v| route.cases.get(v))
        .unwrap_or(&route.default);
    if chosen.is_empty() {
        return Err(step_error(
            ErrorCode::NoRoute,
            &step.name,
            format!(
                "no route for {} = {}",
                match &route.by {
                    Selector::Parameter(p) => format!("parameter '{p}'"),
                    Selector::Tensor(s) => format!("'{s}'"),
                },
                value.as_deref().unwrap_or("(absent)")
            ),
        ));
    }
    Ok(chosen.clone())
}

/// The first element of a tensor, as a router compares it.
fn first_value(t: &Tensor) -> Option<String> {
    if t.datatype == DataType::Bytes {
        let first = *t.bytes_elements().ok()?.first()?;
        return Some(String::from_utf8_lossy(first).into_owned());
    }
    let size = t.datatype.element_size()?;
    let b = t.data.get(..size)?;
    let arr = |n: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&b[..n]);
        a
    };
    Some(match t.datatype {
        DataType::Bool => (b[0] != 0).to_string(),
        DataType::Int8 => (b[0] as i8).to_string(),
        DataType::Uint8 => b[0].to_string(),
        DataType::Int16 => i16::from_le_bytes([b[0], b[1]]).to_string(),
        DataType::Uint16 => u16::from_le_bytes([b[0], b[1]]).to_string(),
        DataType::Int32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        DataType::Uint32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        DataType::Int64 => i64::from_le_bytes(arr(8)).to_string(),
        DataType::Uint64 => u64::from_le_bytes(arr(8)).to_string(),
        DataType::Fp32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        DataType::Fp64 => f64::from_le_bytes(arr(8)).to_string(),
        DataType::Fp16 | DataType::Bytes => return None,
    })
}

/// An error attributed to a step.
pub fn step_error(code: ErrorCode, step: &str, message: impl Into<String>) -> InferenceError {
    InferenceError {
        code,
        message: message.into(),
        step: step.to_string(),
    }
}

/// The graph's answer from its last step's outputs.
pub fn final_result(
    graph: &Graph,
    base: &InferenceRequest,
    outputs: Vec<Tensor>,
) -> InferenceResult {
    let outputs = if base.outputs.is_empty() {
        outputs
    } else {
        outputs
            .into_iter()
            .filter(|t| base.outputs.contains(&t.name))
            .collect()
    };
    InferenceResult {
        id: base.id.clone(),
        client_id: base.client_id.clone(),
        model: graph.name.clone(),
        model_version: graph.signature.version.clone(),
        error: None,
        outputs,
        parameters: served_parameter(base),
        ..Default::default()
    }
}

/// `served_by`: which model served each model step (a JSON object), for canary accounting.
fn served_parameter(base: &InferenceRequest) -> BTreeMap<String, String> {
    let served = base
        .hop
        .as_ref()
        .map(|h| h.served.clone())
        .unwrap_or_default();
    let json = serde_json::to_string(&served).unwrap_or_else(|_| "{}".into());
    [("served_by".to_string(), json)].into()
}

/// What follows a failure at step `i`: inside a join's branch, a failed part for the join (which
/// decides with its other parts); elsewhere, the error as the graph's answer.
pub fn failed(graph: &Graph, i: usize, base: &InferenceRequest, error: InferenceError) -> Next {
    let step = &graph.steps[i];
    if let Some((j, parts)) = &step.failure_join {
        let join = &graph.steps[*j];
        let served = base
            .hop
            .as_ref()
            .map(|h| h.served.clone())
            .unwrap_or_default();
        return Next {
            forwards: parts
                .iter()
                .map(|part| Outgoing {
                    topic: join.topic.clone(),
                    request: InferenceRequest {
                        inputs: Vec::new(),
                        hop: Some(GraphHop {
                            graph: graph.name.clone(),
                            step: join.name.clone(),
                            from: part.clone(),
                            shadow: false,
                            failed: Some(error.clone()),
                            served: served.clone(),
                        }),
                        ..base.clone()
                    },
                })
                .collect(),
            answer: None,
        };
    }
    Next {
        forwards: Vec::new(),
        answer: Some(InferenceResult {
            id: base.id.clone(),
            client_id: base.client_id.clone(),
            model: graph.name.clone(),
            model_version: graph.signature.version.clone(),
            error: Some(error),
            parameters: served_parameter(base),
            ..Default::default()
        }),
    }
}

/// Copies of step `i`'s request for its shadow models: the model inputs plus the primary's
/// outputs (`<step>.<output>`), which the shadow compares its own with.
pub fn shadow_copies(
    graph: &Graph,
    i: usize,
    base: &InferenceRequest,
    model_inputs: &[Tensor],
    outputs: &[Tensor],
) -> Vec<Outgoing> {
    let step = &graph.steps[i];
    step.shadows
        .iter()
        .map(|(_, topic)| {
            let mut inputs = model_inputs.to_vec();
            inputs.extend(qualify(&step.name, outputs));
            Outgoing {
                topic: topic.clone(),
                request: InferenceRequest {
                    inputs,
                    reply: None,
                    hop: Some(GraphHop {
                        graph: graph.name.clone(),
                        step: step.name.clone(),
                        from: step.name.clone(),
                        shadow: true,
                        failed: None,
                        served: BTreeMap::new(),
                    }),
                    ..base.clone()
                },
            }
        })
        .collect()
}

/// How a shadow's outputs compare with the primary's.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The shadow agrees: its integer outputs (labels) equal the primary's, or, for a model with
    /// float outputs only, they are within `1e-4` of the primary's.
    pub agree: bool,
    /// Largest absolute difference over the float outputs.
    pub max_abs_diff: f64,
    /// Rows where an integer output differs (e.g. a different predicted label).
    pub rows_differing: usize,
}

/// Compares a shadow's outputs with the primary's (`<step>.<output>` in `primary`).
pub fn compare(step: &str, primary: &[Tensor], shadow: &[Tensor]) -> Comparison {
    let mut max_abs_diff = 0f64;
    let mut rows_differing = 0;
    let mut integer_outputs = 0;
    let mut mismatched = false;
    for s in shadow {
        let name = format!("{step}.{}", s.name);
        let Some(p) = primary.iter().find(|p| p.name == name) else {
            mismatched = true;
            continue;
        };
        if p.shape != s.shape || p.datatype != s.datatype {
            mismatched = true;
            continue;
        }
        match s.datatype {
            DataType::Fp32 => {
                let (a, b): (Vec<f32>, Vec<f32>) = (p.values(), s.values());
                for (x, y) in a.iter().zip(&b) {
                    max_abs_diff = max_abs_diff.max(f64::from((x - y).abs()));
                }
            }
            _ => {
                integer_outputs += 1;
                let rows = p.shape.first().copied().unwrap_or(1).max(1) as usize;
                let width = p.data.len() / rows;
                let differing = (0..rows)
                    .filter(|r| {
                        let span = r * width..(r + 1) * width;
                        p.data.get(span.clone()) != s.data.get(span)
                    })
                    .count();
                rows_differing = rows_differing.max(differing);
            }
        }
    }
    let agree = !mismatched
        && if integer_outputs > 0 {
            rows_differing == 0
        } else {
            max_abs_diff <= 1e-4
        };
    Comparison {
        agree,
        max_abs_diff,
        rows_differing,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use sluice_common::ModelConfig;
    use sluice_common::graph::fixtures::{compile_steps, model};

    use super::*;

    fn graph(steps: &str) -> Graph {
        let classifier = model(
            &[("input", DataType::Fp32, vec![-1, 2])],
            &[
                ("label", DataType::Int64, vec![-1]),
                ("probabilities", DataType::Fp32, vec![-1, 2]),
            ],
        );
        let models: BTreeMap<String, ModelConfig> = [
            ("a".to_string(), classifier.clone()),
            ("b".to_string(), classifier),
        ]
        .into();
        compile_steps(steps, 2, &models, "s").unwrap()
    }

    const ENSEMBLE: &str = r#"
[[steps]]
name = "first"
model = "a"
inputs = { input = "request.input" }
[[steps]]
name = "left"
model = "a"
inputs = { input = "request.input" }
after = "first"
[[steps]]
name = "right"
model = "b"
inputs = { input = "request.input" }
after = "first"
shadow = ["a"]
[[steps]]
name = "vote"
combine = "majority_vote"
parts = ["left.label", "right.label"]
"#;

    fn request() -> InferenceRequest {
        InferenceRequest {
            id: "r1".into(),
            model: "g".into(),
            ..Default::default()
        }
    }

    fn row(v: &[f32]) -> Tensor {
        Tensor::from_values("input", DataType::Fp32, vec![1, 2], v)
    }

    #[test]
    fn fan_out_carries_only_what_each_branch_needs() {
        let g = graph(ENSEMBLE);
        let first = g.step_index("first").unwrap();
        let carried = entry_carried(vec![row(&[1.0, 2.0])]);
        let outputs = vec![Tensor::from_values(
            "label",
            DataType::Int64,
            vec![1],
            &[1i64],
        )];
        let next = after_step(&g, first, &request(), carried, outputs).unwrap();
        assert!(next.answer.is_none());
        let topics: Vec<&str> = next.forwards.iter().map(|o| o.topic.as_str()).collect();
        assert_eq!(topics, ["s.a.requests", "s.b.requests"]);
        for o in &next.forwards {
            let names: Vec<&str> = o.request.inputs.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(
                names,
                ["request.input"],
                "first.label is read by nobody later"
            );
            assert_eq!(o.request.hop.as_ref().unwrap().from, "first");
        }
        let left = g.step_index("left").unwrap();
        let inputs = step_inputs(&g, left, &next.forwards[0].request.inputs).unwrap();
        assert_eq!(inputs[0].name, "input");
    }

    #[test]
    fn a_failure_inside_a_branch_goes_to_the_join() {
        let g = graph(ENSEMBLE);
        let right = g.step_index("right").unwrap();
        let err = step_error(ErrorCode::ModelFailed, "right", "boom");
        let next = failed(&g, right, &request(), err.clone());
        assert!(next.answer.is_none());
        assert_eq!(next.forwards.len(), 1);
        let hop = next.forwards[0].request.hop.clone().unwrap();
        assert_eq!((hop.step.as_str(), hop.from.as_str()), ("vote", "right"));
        assert_eq!(hop.failed.as_ref(), Some(&err));
        assert_eq!(next.forwards[0].topic, "s.g.vote.requests");
        // Before the fan-out, the failure is the answer.
        let first = g.step_index("first").unwrap();
        let answer = failed(&g, first, &request(), err).answer.unwrap();
        assert_eq!(answer.error.unwrap().step, "right");
    }

    #[test]
    fn the_last_step_answers_with_its_outputs_and_who_served() {
        let g = graph(ENSEMBLE);
        let vote = g.step_index("vote").unwrap();
        let mut base = request();
        base.hop = Some(GraphHop {
            served: [("left".to_string(), "a".to_string())].into(),
            ..Default::default()
        });
        let label = Tensor::from_values("label", DataType::Int64, vec![1], &[3i64]);
        let next = after_step(&g, vote, &base, vec![], vec![label.clone()]).unwrap();
        let answer = next.answer.unwrap();
        assert_eq!(answer.outputs, [label]);
        assert_eq!(answer.model, "g");
        assert_eq!(answer.parameters["served_by"], r#"{"left":"a"}"#);
    }

    #[test]
    fn shadow_copies_carry_inputs_and_primary_outputs_and_compare() {
        let g = graph(ENSEMBLE);
        let right = g.step_index("right").unwrap();
        let out = vec![Tensor::from_values(
            "label",
            DataType::Int64,
            vec![2],
            &[1i64, 0],
        )];
        let copies = shadow_copies(&g, right, &request(), &[row(&[1.0, 2.0])], &out);
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].topic, "s.a.requests");
        let r = &copies[0].request;
        assert!(r.hop.as_ref().unwrap().shadow && r.reply.is_none());
        assert_eq!(r.inputs[1].name, "right.label");
        let same = compare("right", &r.inputs, &out);
        assert!(same.agree);
        let other = vec![Tensor::from_values(
            "label",
            DataType::Int64,
            vec![2],
            &[1i64, 1],
        )];
        let diff = compare("right", &r.inputs, &other);
        assert_eq!((diff.agree, diff.rows_differing), (false, 1));
    }

    #[test]
    fn routers_choose_by_a_tensor_value_from_an_earlier_step() {
        let g = graph(
            r#"
[[steps]]
name = "first"
model = "a"
inputs = { input = "request.input" }
[[steps]]
name = "pick"
route = { by = "first.label", cases = { "7" = ["seven"] }, default = ["other"] }
[[steps]]
name = "seven"
model = "b"
inputs = { input = "request.input" }
[[steps]]
name = "other"
model = "a"
inputs = { input = "request.input" }
"#,
        );
        let pick = g.step_index("pick").unwrap();
        let label = |v: i64| {
            let mut carried = entry_carried(vec![row(&[0.0, 1.0])]);
            carried.push(Tensor::from_values(
                "first.label",
                DataType::Int64,
                vec![1],
                &[v],
            ));
            carried
        };
        let to = |v| {
            after_step(&g, pick, &request(), label(v), vec![])
                .unwrap()
                .forwards[0]
                .topic
                .clone()
        };
        assert_eq!(to(7), "s.b.requests");
        assert_eq!(to(3), "s.a.requests");
    }

    #[test]
    fn routers_choose_by_parameter_or_fail_naming_the_value() {
        let g = graph(
            r#"
[[steps]]
name = "pick"
route = { by = "parameter:tier", cases = { gold = ["big"] } }
[[steps]]
name = "big"
model = "a"
inputs = { input = "request.input" }
"#,
        );
        let pick = g.step_index("pick").unwrap();
        let mut base = request();
        base.parameters.insert("tier".into(), "\"gold\"".into());
        let carried = entry_carried(vec![row(&[0.0, 1.0])]);
        let next = after_step(&g, pick, &base, carried.clone(), vec![]).unwrap();
        assert_eq!(next.forwards[0].topic, "s.a.requests");
        base.parameters.insert("tier".into(), "\"tin\"".into());
        let err = after_step(&g, pick, &base, carried, vec![]).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoRoute);
        assert!(err.message.contains("tin"), "{}", err.message);
    }
}
