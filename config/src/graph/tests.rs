//! Compiler tests: plans for the example shapes, and start-up errors naming graph and step.
#![allow(clippy::unwrap_used)]

use super::fixtures::model;
use super::*;
use crate::config::ModelConfig;
use sluice_schemas::DataType;

fn models() -> BTreeMap<String, ModelConfig> {
    let classifier = || {
        model(
            &[("input", DataType::Fp32, vec![-1, 64])],
            &[
                ("label", DataType::Int64, vec![-1]),
                ("probabilities", DataType::Fp32, vec![-1, 10]),
            ],
        )
    };
    [
        (
            "scaler".to_string(),
            model(
                &[("input", DataType::Fp32, vec![-1, 64])],
                &[("scaled", DataType::Fp32, vec![-1, 64])],
            ),
        ),
        ("mlp".to_string(), classifier()),
        ("logreg".to_string(), classifier()),
        ("forest".to_string(), classifier()),
    ]
    .into()
}

fn graph(toml_steps: &str) -> Result<Graph, Vec<String>> {
    fixtures::compile_steps(toml_steps, 64, &models(), "sluice")
}

const PIPELINE: &str = r#"
[[steps]]
name = "post"
builtin = "argmax"
inputs = { probabilities = "classify.probabilities" }
[[steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[steps]]
name = "classify"
model = "mlp"
inputs = { input = "scale.scaled" }
"#;

const ENSEMBLE: &str = r#"
[[steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[steps]]
name = "mlp"
model = "mlp"
inputs = { input = "scale.scaled" }
[[steps]]
name = "logreg"
model = "logreg"
inputs = { input = "scale.scaled" }
[[steps]]
name = "forest"
model = "forest"
inputs = { input = "scale.scaled" }
[[steps]]
name = "vote"
combine = "majority_vote"
parts = ["mlp.label", "logreg.label", "forest.label"]
"#;

#[test]
fn pipeline_compiles_in_order_with_carried_tensors() {
    let g = graph(PIPELINE).unwrap();
    let names: Vec<&str> = g.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["scale", "classify", "post"]);
    assert_eq!(g.entry, 0);
    assert_eq!(g.steps[0].topic, "sluice.scaler.requests");
    assert_eq!(g.steps[2].topic, "sluice.g.post.requests");
    assert_eq!(g.steps[0].next, [1]);
    assert_eq!(g.steps[1].next, [2]);
    assert!(g.steps[2].next.is_empty());
    assert_eq!(
        g.steps[1].carry,
        BTreeSet::from(["scale.scaled".to_string()])
    );
    assert_eq!(
        g.steps[2].carry,
        BTreeSet::from(["classify.probabilities".to_string()])
    );
    let outs: Vec<&str> = g
        .signature
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(outs, ["label", "probability"]);
    assert_eq!(g.entry_topic, "sluice.g.requests");
}

#[test]
fn ensemble_fans_out_and_joins() {
    let g = graph(ENSEMBLE).unwrap();
    let scale = g.step_index("scale").unwrap();
    let vote = g.step_index("vote").unwrap();
    assert_eq!(g.steps[scale].next.len(), 3);
    assert!(g.steps[scale].failure_join.is_none(), "before the fan-out");
    let mlp = g.step_index("mlp").unwrap();
    assert_eq!(g.steps[mlp].next, [vote]);
    assert_eq!(
        g.steps[mlp].failure_join,
        Some((vote, vec!["mlp".to_string()]))
    );
    let StepKind::Combine(j) = &g.steps[vote].kind else {
        panic!("not a join")
    };
    assert_eq!(j.quorum, 3);
    assert_eq!(g.signature.outputs[0].name, "label");
    assert_eq!(g.signature.outputs[0].datatype, DataType::Int64);
}

fn err(steps: &str) -> String {
    graph(steps).unwrap_err().join("\n")
}

#[test]
fn cycles_unknown_steps_and_missing_tensors_are_named() {
    let cyc = err(r#"
[[steps]]
name = "a"
model = "scaler"
inputs = { input = "b.scaled" }
[[steps]]
name = "b"
model = "scaler"
inputs = { input = "a.scaled" }
"#);
    assert!(cyc.contains("cycle") && cyc.contains("\"a\""), "{cyc}");
    let unknown = err(&PIPELINE.replace("scale.scaled", "scal.scaled"));
    assert!(
        unknown.contains("step 'classify'") && unknown.contains("no step 'scal'"),
        "{unknown}"
    );
    let missing = err(&PIPELINE.replace("scale.scaled", "scale.nothing"));
    assert!(
        missing.contains("'scale.nothing', which no step produces"),
        "{missing}"
    );
    let model = err(&PIPELINE.replace("model = \"mlp\"", "model = \"mpl\""));
    assert!(model.contains("unknown model 'mpl'"), "{model}");
}

#[test]
fn mismatched_dtypes_and_shapes_are_named() {
    let dtype = err(&PIPELINE.replace("scale.scaled", "classify.label"));
    assert!(
        dtype.contains("cycle") || dtype.contains("own output"),
        "{dtype}"
    );
    let dtype = err(&PIPELINE.replace(
        "builtin = \"argmax\"\ninputs = { probabilities = \"classify.probabilities\" }",
        "model = \"scaler\"\ninputs = { input = \"classify.label\" }",
    ));
    assert!(
        dtype.contains("step 'post': input 'input' wants FP32, but 'classify.label' is INT64"),
        "{dtype}"
    );
    let shape = err(&ENSEMBLE.replace(
        "parts = [\"mlp.label\", \"logreg.label\", \"forest.label\"]",
        "parts = [\"mlp.label\", \"logreg.probabilities\"]",
    ));
    assert!(shape.contains("different"), "{shape}");
}

#[test]
fn parallel_steps_without_a_join_are_rejected() {
    let no_join = err(&ENSEMBLE.replace(
        "combine = \"majority_vote\"\nparts = [\"mlp.label\", \"logreg.label\", \"forest.label\"]",
        "builtin = \"argmax\"\ninputs = { probabilities = \"mlp.probabilities\" }",
    ));
    assert!(no_join.contains("answered"), "{no_join}");
    let two_preds = err(&ENSEMBLE.replace(
        "combine = \"majority_vote\"\nparts = [\"mlp.label\", \"logreg.label\", \"forest.label\"]",
        "model = \"scaler\"\ninputs = { input = \"mlp.probabilities\", other = \"logreg.probabilities\" }",
    ));
    assert!(two_preds.contains("run in parallel"), "{two_preds}");
}

#[test]
fn routers_pick_among_branches_that_each_answer() {
    let g = graph(
        r#"
[[steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[steps]]
name = "pick"
after = "scale"
route = { by = "parameter:tier", cases = { fast = ["fast"] }, default = ["accurate"] }
[[steps]]
name = "fast"
model = "logreg"
inputs = { input = "scale.scaled" }
[[steps]]
name = "accurate"
model = "mlp"
inputs = { input = "scale.scaled" }
"#,
    )
    .unwrap();
    let pick = g.step_index("pick").unwrap();
    assert_eq!(g.steps[pick].next.len(), 2);
    let StepKind::Route(r) = &g.steps[pick].kind else {
        panic!("not a router")
    };
    assert_eq!(r.by, Selector::Parameter("tier".into()));
    assert_eq!(r.cases["fast"], [g.step_index("fast").unwrap()]);
    assert!(g.steps[pick].carry.contains("scale.scaled"));
}

#[test]
fn canary_and_shadow_need_compatible_models() {
    let ok = graph(&PIPELINE.replace(
        "model = \"mlp\"",
        "model = \"mlp\"\ncanary = { model = \"logreg\", share = 0.25 }\nshadow = [\"forest\"]",
    ))
    .unwrap();
    let c = ok.steps[1].canary.as_ref().unwrap();
    assert_eq!(
        (c.model.as_str(), c.topic.as_str()),
        ("logreg", "sluice.logreg.requests")
    );
    assert_eq!(ok.steps[1].shadows[0].0, "forest");
    let bad = err(&PIPELINE.replace(
        "model = \"mlp\"",
        "model = \"mlp\"\ncanary = { model = \"scaler\", share = 2.0 }",
    ));
    assert!(
        bad.contains("same inputs and outputs") && bad.contains("share"),
        "{bad}"
    );
}

#[test]
fn partitions_default_to_the_models_and_must_agree_when_set() {
    assert_eq!(graph(PIPELINE).unwrap().partitions, 1);
    let e = err(&format!("partitions = 2\n{PIPELINE}"));
    assert!(
        e.contains("step 'scale': model 'scaler' has 1 partitions, the graph 2"),
        "{e}"
    );
}

#[test]
fn canary_choice_is_stable_and_close_to_the_share() {
    let picked = (0..10_000)
        .filter(|i| canary_picks(&format!("req-{i}"), 0.2))
        .count();
    assert!((1_800..2_200).contains(&picked), "{picked}");
    assert!(canary_picks("x", 1.0) && !canary_picks("x", 0.0));
    assert_eq!(canary_picks("user-7", 0.5), canary_picks("user-7", 0.5));
}

#[test]
fn canary_choice_matches_published_fnv1a_vectors() {
    // FNV-1a 64 test vectors (the algorithm's reference values): "" = 0xcbf29ce484222325,
    // "a" = 0xaf63dc4c8601ec8c, "foobar" = 0x85944171f73967e8. A key is picked when its hash
    // modulo 10,000 is below share × 10,000: buckets 6037, 1996 and 6968.
    for (key, bucket) in [("", 6037u32), ("a", 1996), ("foobar", 6968)] {
        let share = |b: u32| f64::from(b) / 10_000.0;
        assert!(
            !canary_picks(key, share(bucket)),
            "{key:?} is not below its own bucket"
        );
        assert!(
            canary_picks(key, share(bucket + 1)),
            "{key:?} is picked one step above"
        );
    }
}

#[test]
fn business_logic_steps_compile_with_their_outputs_and_fused_edges() {
    let g = graph(
        r#"
[[steps]]
name = "check"
inputs = { input = "request.input" }
validate = [{ input = "input", rule = "finite" }, { input = "input", rule = "range", min = -100, max = 100 }]
[[steps]]
name = "enc"
fused = true
inputs = { input = "check.input" }
output = "x"
encode = [{ input = "input", ops = [{ op = "clip", min = -5, max = 5 }] }]
[[steps]]
name = "classify"
model = "mlp"
inputs = { input = "enc.x" }
[[steps]]
name = "decide"
fused = true
inputs = { probabilities = "classify.probabilities" }
decide = { otherwise = "no", rules = [{ input = "probabilities", column = 3, op = ">=", value = 0.5, decision = "three" }] }
"#,
    )
    .unwrap();
    let enc = g.step_index("enc").unwrap();
    assert_eq!(g.steps[enc].outputs[0].shape, vec![-1, 64]);
    assert_eq!(g.fused_after(enc), g.step_index("check"));
    let names: Vec<&str> = g
        .signature
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(names, ["decision", "rule", "probabilities"]);
    assert_eq!(g.signature.outputs[0].datatype, DataType::Bytes);
    assert_eq!(
        g.fused_after(g.step_index("decide").unwrap()),
        g.step_index("classify")
    );
}

#[test]
fn bad_business_logic_and_fusion_are_named() {
    let cases = [
        (
            "[[steps]]\nname = \"a\"\ninputs = { input = \"request.input\" }\nvalidate = [{ input = \"input\", rule = \"regex\", pattern = \"x\" }]",
            "needs a BYTES input",
        ),
        (
            "[[steps]]\nname = \"a\"\ninputs = { input = \"request.input\" }\nvalidate = [{ input = \"nope\", rule = \"finite\" }]",
            "'nope' is not one of the step's inputs",
        ),
        (
            "[[steps]]\nname = \"a\"\ninputs = { input = \"request.input\" }\nencode = [{ input = \"input\", ops = [{ op = \"standardize\", mean = 0, std = 0 }] }]",
            "standardize needs std > 0",
        ),
        (
            "[[steps]]\nname = \"a\"\nfused = true\ninputs = { input = \"request.input\" }\nencode = [{ input = \"input\" }]",
            "the first step cannot be fused",
        ),
        (
            "[[steps]]\nname = \"a\"\ninputs = { input = \"request.input\" }\nfeatures = { entity = \"input\", features = [{ name = \"f\", datatype = \"FP32\" }] }",
            "must be BYTES, INT64 or INT32",
        ),
        (
            "[[steps]]\nname = \"a\"\ninputs = { input = \"request.input\" }\nencode = [{ input = \"input\" }]\n[[steps]]\nname = \"m\"\nmodel = \"mlp\"\nfused = true\ninputs = { input = \"a.features\" }",
            "a model or combine step cannot be fused",
        ),
    ];
    for (steps, want) in cases {
        let errors = graph(steps).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{want}: got {errors:?}"
        );
    }
}

const BANDIT_ARMS: &str = r#"
[[steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[steps]]
name = "fast"
model = "logreg"
inputs = { input = "scale.scaled" }
[[steps]]
name = "accurate"
model = "mlp"
inputs = { input = "scale.scaled" }
"#;

#[test]
fn a_bandit_routes_by_its_own_arm_output_among_its_arms() {
    let g = graph(&format!(
        "{BANDIT_ARMS}[[steps]]\nname = \"choose\"\nafter = \"scale\"\nbandit = {{ policy = \"thompson\", arms = [\"fast\", \"accurate\"] }}\n"
    ))
    .unwrap();
    let (i, b) = g.bandit().unwrap();
    assert_eq!(g.steps[i].name, "choose");
    assert_eq!(b.dims, 0);
    let StepKind::Route(r) = &g.steps[i].kind else {
        panic!("not a router")
    };
    assert_eq!(r.by, Selector::Tensor("choose.arm".into()));
    assert_eq!(r.cases["accurate"], [g.step_index("accurate").unwrap()]);
    assert!(r.default.is_empty());
    let outputs: Vec<&str> = g.steps[i].outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outputs, ["arm", "probability"]);
    assert!(g.steps[i].carry.contains("scale.scaled"));
}

#[test]
fn bad_bandits_are_named() {
    let step = |bandit: &str, inputs: &str| {
        format!(
            "{BANDIT_ARMS}[[steps]]\nname = \"choose\"\nafter = \"scale\"\n{inputs}bandit = {bandit}\n"
        )
    };
    let unknown = err(&step(
        "{ policy = \"thompson\", arms = [\"fast\", \"nope\"] }",
        "",
    ));
    assert!(
        unknown.contains("routes to unknown step 'nope'"),
        "{unknown}"
    );
    let no_context = err(&step(
        "{ policy = \"linucb\", arms = [\"fast\", \"accurate\"] }",
        "",
    ));
    assert!(
        no_context.contains("reads a `context` input"),
        "{no_context}"
    );
    let contextual = graph(&step(
        "{ policy = \"linucb\", arms = [\"fast\", \"accurate\"] }",
        "inputs = { context = \"request.input\" }\n",
    ))
    .unwrap();
    assert_eq!(contextual.bandit().unwrap().1.dims, 64);
    let bad = err(&step(
        "{ policy = \"epsilon_greedy\", epsilon = 3, arms = [\"fast\", \"accurate\"] }",
        "",
    ));
    assert!(
        bad.contains("bandit.epsilon: must be within 0..=1"),
        "{bad}"
    );
    let two = err(&format!(
        "{}[[steps]]\nname = \"again\"\nafter = \"choose\"\nbandit = {{ policy = \"thompson\", arms = [\"fast\", \"accurate\"] }}\n",
        step(
            "{ policy = \"thompson\", arms = [\"fast\", \"accurate\"] }",
            ""
        )
    ));
    assert!(!two.is_empty(), "two bandits in one graph must not compile");
}
