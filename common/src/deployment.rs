//! The deployment: the config file loaded, validated and compiled once into everything a Sluice
//! process needs (models, compiled graphs, topic names, each servable's signature, the worker
//! units and their topics). The gateway, workers, `topics apply`, `up` and `bench` all take one,
//! so a graph that does not compile stops start-up instead of going missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigError, ModelConfig, Serves};
use crate::graph::{self, Graph, Graphs, StepKind, Unit};
use crate::signature::Signature;
use crate::topics::{TopicSpec, Topics};

/// What kind of thing is served under a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServableKind {
    /// An ONNX model.
    Model,
    /// A model learned from feedback while it serves.
    Learner,
    /// A graph of steps.
    Graph,
}

impl ServableKind {
    /// The platform reported in metadata (`onnxruntime_onnx`, `sluice_learner` or
    /// `sluice_graph`).
    pub fn platform(self) -> &'static str {
        match self {
            ServableKind::Model => "onnxruntime_onnx",
            ServableKind::Learner => "sluice_learner",
            ServableKind::Graph => "sluice_graph",
        }
    }
}

/// Something callers can name in `/v2/models/<name>`: a model or a graph.
#[derive(Debug, Clone)]
pub struct Servable {
    /// What it takes and gives.
    pub signature: Signature,
    /// Model or graph.
    pub kind: ServableKind,
    /// Partitions of its request topic.
    pub partitions: i32,
}

/// A validated, compiled configuration.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The effective configuration.
    pub config: Config,
    /// Topic and group names.
    pub topics: Topics,
    /// Every graph, compiled.
    pub graphs: Graphs,
    servables: BTreeMap<String, Servable>,
    worker_units: Vec<WorkerUnit>,
}

/// What one worker process serves through one consumer: a deployment unit (`[units.<name>]`,
/// several step pools in one consumer group), or a single step pool (a model, or a graph's
/// built-in, combine or route step, in a group of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUnit {
    /// The unit's name, or the pool's (`mlp`, `graph.step`): the `unit` label of its metrics.
    pub name: String,
    /// Its consumer group.
    pub group: String,
    /// The step pools it serves, each on its own topics.
    pub members: Vec<Unit>,
    /// Workers `sluice up` starts.
    pub workers: usize,
}

/// The deployment unit implied when the config declares none: everything in one.
pub const IMPLIED_UNIT: &str = "all";

impl Deployment {
    /// Loads defaults → `file` → `SLUICE__…` environment, validates and compiles.
    pub fn load(file: Option<&Path>) -> Result<Deployment, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(file, &vars)
    }

    /// As [`Deployment::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Deployment, ConfigError> {
        let config = Config::load_with_env(file, env)?;
        let file_name = file.map_or_else(|| "<defaults>".into(), |f| f.display().to_string());
        Self::compile(config).map_err(|problems| ConfigError::Invalid {
            file: file_name,
            problems,
        })
    }

    /// Compiles a loaded config; every problem found, each naming its graph and step.
    pub fn compile(config: Config) -> Result<Deployment, Vec<String>> {
        let topics = Topics::new(&config.kafka.topic_prefix);
        let mut problems = Vec::new();
        let mut graphs = Graphs::new();
        for (name, g) in &config.graphs {
            match graph::compile(name, g, &config.models, &topics) {
                Ok(compiled) => {
                    graphs.insert(name.clone(), Arc::new(compiled));
                }
                Err(p) => problems.extend(p),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut servables: BTreeMap<String, Servable> = config
            .models
            .iter()
            .map(|(name, m)| {
                let s = Servable {
                    signature: m.signature(),
                    kind: if m.learner.is_some() {
                        ServableKind::Learner
                    } else {
                        ServableKind::Model
                    },
                    partitions: m.partitions,
                };
                (name.clone(), s)
            })
            .collect();
        for (name, g) in &graphs {
            let s = Servable {
                signature: g.signature.clone(),
                kind: ServableKind::Graph,
                partitions: g.partitions,
            };
            servables.insert(name.clone(), s);
        }
        let mut deployment = Deployment {
            config,
            topics,
            graphs,
            servables,
            worker_units: Vec::new(),
        };
        deployment.worker_units = deployment.resolve_units()?;
        Ok(deployment)
    }

    /// Resolves `[units.*]` (or the implied `all`) into their step pools: named entries first,
    /// then `"*"` takes what no unit named. A pool in two units, an unknown name, two `"*"` units
    /// or an empty unit is a problem.
    fn resolve_units(&self) -> Result<Vec<WorkerUnit>, Vec<String>> {
        let mut declared = self.config.units.clone();
        if declared.is_empty() {
            declared.insert(
                IMPLIED_UNIT.into(),
                crate::config::UnitConfig {
                    serves: Serves::All("*".into()),
                    workers: 1,
                },
            );
        }
        let pools: Vec<Unit> = self.units().into_iter().map(|(u, _)| u).collect();
        let mut problems = Vec::new();
        let mut owner: BTreeMap<Unit, String> = BTreeMap::new();
        let mut resolved: BTreeMap<String, Vec<Unit>> = BTreeMap::new();
        let mut wildcard = None;
        for (name, u) in &declared {
            let key = format!("units.{name}");
            if u.workers == 0 {
                problems.push(format!("{key}.workers: must be at least 1"));
            }
            let names = match &u.serves {
                Serves::All(s) if s == "*" => {
                    if let Some(other) = wildcard.replace(name.clone()) {
                        problems.push(format!(
                            "{key}.serves: \"*\" is also served by units.{other}"
                        ));
                    }
                    continue;
                }
                Serves::All(s) => {
                    problems.push(format!("{key}.serves: \"{s}\" is neither \"*\" nor a list"));
                    continue;
                }
                Serves::Named(names) => names,
            };
            let mut members = Vec::new();
            for n in names {
                match self.pools_named(n) {
                    Some(found) => members.extend(found),
                    None => problems.push(format!(
                        "{key}.serves: '{n}' is not a model, a graph or a graph's step"
                    )),
                }
            }
            for m in members {
                match owner.get(&m) {
                    Some(other) if other != name => problems.push(format!(
                        "{key}.serves: '{m}' is also served by units.{other} (a topic read by two groups is processed twice)"
                    )),
                    Some(_) => {}
                    None => {
                        owner.insert(m.clone(), name.clone());
                        resolved.entry(name.clone()).or_default().push(m);
                    }
                }
            }
        }
        if let Some(name) = &wildcard {
            let rest: Vec<Unit> = pools
                .iter()
                .filter(|p| !owner.contains_key(*p))
                .cloned()
                .collect();
            resolved.entry(name.clone()).or_default().extend(rest);
        }
        let mut units = Vec::new();
        for (name, u) in &declared {
            let members = resolved.remove(name).unwrap_or_default();
            if u.serves == Serves::Named(Vec::new()) {
                problems.push(format!("units.{name}.serves: names nothing"));
            }
            // A "*" unit that everything else was named away from has nothing to run.
            if members.is_empty() {
                continue;
            }
            units.push(WorkerUnit {
                name: name.clone(),
                group: self.topics.unit_group(name),
                members,
                workers: u.workers,
            });
        }
        if problems.is_empty() {
            Ok(units)
        } else {
            Err(problems)
        }
    }

    /// The step pools a unit's `serves` entry names: a model, every pool of a graph (its steps,
    /// canaries and shadows), or one graph step (a model step names its model's pool).
    pub fn pools_named(&self, name: &str) -> Option<Vec<Unit>> {
        if self.config.models.contains_key(name) {
            return Some(vec![Unit::Model(name.into())]);
        }
        if let Some(g) = self.graph(name) {
            let mut pools = Vec::new();
            for (i, s) in g.steps.iter().enumerate() {
                pools.push(g.unit_of(i));
                pools.extend(s.canary.iter().map(|c| Unit::Model(c.model.clone())));
                pools.extend(s.shadows.iter().map(|(m, _)| Unit::Model(m.clone())));
            }
            let mut unique = Vec::new();
            for p in pools {
                if !unique.contains(&p) {
                    unique.push(p);
                }
            }
            return Some(unique);
        }
        let (graph, step) = name.split_once('.')?;
        let g = self.graph(graph)?;
        g.step_index(step).map(|i| vec![g.unit_of(i)])
    }

    /// The deployment units: those declared under `[units.*]`, or the implied `all` serving
    /// every step pool when none is declared.
    pub fn worker_units(&self) -> &[WorkerUnit] {
        &self.worker_units
    }

    /// The deployment unit called `name`.
    pub fn worker_unit(&self, name: &str) -> Option<&WorkerUnit> {
        self.worker_units.iter().find(|u| u.name == name)
    }

    /// A single step pool as a worker unit of its own (`sluice worker --model/--step`).
    pub fn pool_unit(&self, unit: &Unit) -> WorkerUnit {
        WorkerUnit {
            name: unit.to_string(),
            group: self.unit_group(unit),
            members: vec![unit.clone()],
            workers: 1,
        }
    }

    /// Step pools that no declared unit serves: `sluice up` runs them in groups of their own.
    pub fn pools_outside_units(&self) -> Vec<(Unit, usize)> {
        self.units()
            .into_iter()
            .filter(|(u, _)| !self.worker_units.iter().any(|w| w.members.contains(u)))
            .collect()
    }

    /// Every model and graph, by name.
    pub fn servables(&self) -> &BTreeMap<String, Servable> {
        &self.servables
    }

    /// The model or graph called `name`.
    pub fn servable(&self, name: &str) -> Option<&Servable> {
        self.servables.get(name)
    }

    /// Serves `push`: its model's ONNX file and version become the pushed ones (in metadata
    /// too). False when the config has no such ONNX model.
    pub fn apply_push(&mut self, push: &crate::control::ModelPush) -> bool {
        let Some(m) = self.config.models.get_mut(&push.model) else {
            return false;
        };
        if m.learner.is_some() {
            return false;
        }
        m.onnx = Some(push.onnx.clone());
        m.version.clone_from(&push.version);
        if let Some(s) = self.servables.get_mut(&push.model) {
            s.signature.version.clone_from(&push.version);
        }
        true
    }

    /// Whether servable `name` learns from feedback: a learning model, or a graph with a
    /// bandit router.
    pub fn learns(&self, name: &str) -> bool {
        self.model(name).is_some_and(|m| m.learner.is_some())
            || self.graph(name).is_some_and(|g| g.bandit().is_some())
    }

    /// Every servable that learns from feedback (each has one learner process), by name.
    pub fn learning(&self) -> Vec<String> {
        self.servables
            .keys()
            .filter(|name| self.learns(name))
            .cloned()
            .collect()
    }

    /// The model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.config.models.get(name)
    }

    /// The graph called `name`.
    pub fn graph(&self, name: &str) -> Option<&Arc<Graph>> {
        self.graphs.get(name)
    }

    /// Every worker unit with the workers `sluice up` starts: each model, then each graph's
    /// built-in, combine and route steps.
    pub fn units(&self) -> Vec<(Unit, usize)> {
        let mut units: Vec<(Unit, usize)> = self
            .config
            .models
            .iter()
            .map(|(m, c)| (Unit::Model(m.clone()), c.workers))
            .collect();
        for g in self.graphs.values() {
            for s in &g.steps {
                if !matches!(s.kind, StepKind::Model(_)) {
                    let unit = Unit::Step {
                        graph: g.name.clone(),
                        step: s.name.clone(),
                    };
                    units.push((unit, s.workers));
                }
            }
        }
        units
    }

    /// Whether `unit` is in this deployment (a model, or a graph's non-model step).
    pub fn has_unit(&self, unit: &Unit) -> bool {
        match unit {
            Unit::Model(m) => self.config.models.contains_key(m),
            Unit::Step { graph, step } => self.graph(graph).is_some_and(|g| {
                g.step_index(step)
                    .is_some_and(|i| !matches!(g.steps[i].kind, StepKind::Model(_)))
            }),
        }
    }

    /// The topics a unit's workers consume: its own first, then the entry topic of every graph
    /// whose first step it runs.
    pub fn unit_topics(&self, unit: &Unit) -> Vec<String> {
        let mut topics = vec![match unit {
            Unit::Model(m) => self.topics.requests(m),
            Unit::Step { graph, step } => self.topics.step(graph, step),
        }];
        for g in self.graphs.values() {
            if &g.unit_of(g.entry) == unit {
                topics.push(g.entry_topic.clone());
            }
        }
        topics
    }

    /// Consumer group of a unit's workers.
    pub fn unit_group(&self, unit: &Unit) -> String {
        self.topics.group(&unit.to_string())
    }

    /// Where a unit writes results of plain requests: its model's result topic, or its graph's.
    pub fn unit_result_topic(&self, unit: &Unit) -> String {
        match unit {
            Unit::Model(m) => self.topics.results(m),
            Unit::Step { graph, .. } => self.topics.results(graph),
        }
    }

    /// Every topic the deployment needs: each model's request and result topics, each graph's
    /// entry, result and comparison topics and its non-model steps' topics, and the dead letters.
    pub fn required_topics(&self) -> Vec<TopicSpec> {
        let spec = |name: String, partitions: i32| TopicSpec { name, partitions };
        let mut topics = vec![
            spec(self.topics.dead_letter(), 1),
            spec(self.topics.control(), 1),
        ];
        for (name, m) in &self.config.models {
            topics.push(spec(self.topics.requests(name), m.partitions));
            topics.push(spec(self.topics.results(name), m.partitions));
        }
        for name in self.learning() {
            topics.push(spec(self.topics.predictions(&name), 1));
            topics.push(spec(self.topics.feedback(&name), 1));
            topics.push(spec(self.topics.weights(&name), 1));
        }
        for g in self.graphs.values() {
            let mut names = vec![
                g.entry_topic.clone(),
                g.result_topic.clone(),
                g.comparison_topic.clone(),
            ];
            for s in &g.steps {
                if !matches!(s.kind, StepKind::Model(_)) {
                    names.push(s.topic.clone());
                }
            }
            topics.extend(names.into_iter().map(|n| spec(n, g.partitions)));
        }
        topics
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    fn load(toml: &str) -> Result<Deployment, ConfigError> {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        Deployment::load_with_env(Some(f.path()), &[])
    }

    #[test]
    fn every_example_config_loads_and_prints_back_to_an_equal_plan() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let d = Deployment::load_with_env(Some(&path), &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // The flat step tables survive printing: the printed config compiles to the same
            // steps, kinds and routes.
            let printed = toml::to_string(&d.config).unwrap();
            let again = Deployment::compile(toml::from_str(&printed).unwrap()).unwrap();
            assert_eq!(format!("{:?}", d.graphs), format!("{:?}", again.graphs));
            seen += 1;
        }
        assert!(seen >= 6, "examples/*.toml: {seen} found");
    }

    #[test]
    fn a_step_with_two_kinds_or_another_kinds_key_is_refused() {
        let two = r#"
[graphs.g]
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 2] }]
[[graphs.g.steps]]
name = "s"
builtin = "argmax"
combine = "mean"
inputs = { probabilities = "request.x" }
"#;
        let e = load(two).unwrap_err().to_string();
        assert!(e.contains("step 's': set exactly one of model"), "{e}");
        let stray = two.replace("combine = \"mean\"", "weights = [1.0]");
        let e = load(&stray).unwrap_err().to_string();
        assert!(
            e.contains("step 's': 'weights' does not apply to a builtin step"),
            "{e}"
        );
        let ok = two.replace("combine = \"mean\"\n", "");
        load(&ok).unwrap();
    }

    /// A graph with one feature lookup whose features have these `(datatype, default)`.
    fn lookup(features: &[(&str, &str)]) -> String {
        let specs: Vec<String> = features
            .iter()
            .enumerate()
            .map(|(i, (dt, default))| {
                format!(r#"{{ name = "f{i}", datatype = "{dt}", default = {default} }}"#)
            })
            .collect();
        format!(
            r#"
[graphs.look]
inputs = [{{ name = "user", datatype = "BYTES", shape = [-1] }}]
[[graphs.look.steps]]
name = "features"
inputs = {{ user = "request.user" }}
features = {{ entity = "user", features = [{}] }}
"#,
            specs.join(", ")
        )
    }

    #[test]
    fn a_default_is_written_as_its_features_type_and_checked_at_start_up() {
        // Each datatype's own TOML type: a boolean for BOOL (the regression: `true` was refused).
        let ok = [
            ("BOOL", "true"),
            ("INT64", "-3"),
            ("INT64", "-2654276660701483516"),
            ("INT32", "-2147483648"),
            ("FP32", "2.5"),
            ("FP64", "0"),
            ("BYTES", "\"unknown\""),
        ];
        load(&lookup(&ok)).unwrap();
        let refused = [
            (("BOOL", "2.5"), "write true or false"),
            (("INT64", "2.5"), "not an integer"),
            (("INT32", "3000000000"), "out of range for INT32"),
            (("INT64", "true"), "boolean"),
            (("FP32", "\"x\""), "a string"),
            (("BYTES", "1"), "not a string"),
            (("FP32", "16777217"), "no exact FP32 value"),
        ];
        for ((dt, default), says) in refused {
            let e = load(&lookup(&[(dt, default)])).unwrap_err().to_string();
            assert!(
                e.contains("f0") && e.contains("default") && e.contains(says),
                "{dt} {default}: {e}"
            );
        }
    }

    #[test]
    fn a_frozen_learner_still_takes_feedback() {
        // Its feedback scores the accuracy window and drift; it learns nothing from it.
        let d = load(
            r#"
[models.m]
max_batch_size = 8
inputs = [{ name = "x", datatype = "FP32", shape = [-1, 2] }]
outputs = [{ name = "label", datatype = "INT64", shape = [-1, 1] }]
[models.m.learner]
algorithm = "sgd"
frozen = true
"#,
        )
        .unwrap();
        assert!(d.learns("m"));
    }

    const MODELS: &str = r#"
[models.scaler]
onnx = "scaler.onnx"
max_batch_size = 8
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "scaled", datatype = "FP32", shape = [-1, 4] }]
[models.clf]
onnx = "clf.onnx"
max_batch_size = 8
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "probabilities", datatype = "FP32", shape = [-1, 3] }]
[graphs.g]
inputs = [{ name = "input", datatype = "FP32", shape = [-1, 4] }]
[[graphs.g.steps]]
name = "scale"
model = "scaler"
inputs = { input = "request.input" }
[[graphs.g.steps]]
name = "classify"
model = "clf"
inputs = { input = "scale.scaled" }
[[graphs.g.steps]]
name = "post"
builtin = "argmax"
inputs = { probabilities = "classify.probabilities" }
"#;

    #[test]
    fn compiles_once_into_servables_units_and_topics() {
        let d = load(MODELS).unwrap();
        let names: Vec<&String> = d.servables().keys().collect();
        assert_eq!(names, ["clf", "g", "scaler"]);
        let g = d.servable("g").unwrap();
        assert_eq!(g.kind.platform(), "sluice_graph");
        let outs: Vec<&str> = g
            .signature
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect();
        assert_eq!(outs, ["label", "probability"]);
        let post = Unit::parse("g.post");
        assert!(d.has_unit(&post) && !d.has_unit(&Unit::parse("g.classify")));
        assert_eq!(d.unit_topics(&post), ["sluice.g.post.requests"]);
        assert_eq!(
            d.unit_topics(&Unit::Model("scaler".into())),
            ["sluice.scaler.requests", "sluice.g.requests"],
            "the first step's pool also reads the graph's entry topic"
        );
        let topics: Vec<String> = d.required_topics().into_iter().map(|t| t.name).collect();
        assert!(topics.contains(&"sluice.g.post.requests".to_string()));
        assert!(topics.contains(&"sluice.dead-letter".to_string()));
    }

    #[test]
    fn a_graph_that_does_not_compile_stops_loading() {
        let err = load(&MODELS.replace("scale.scaled", "scale.nothing"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("graphs.g step 'classify'") && err.contains("scale.nothing"),
            "{err}"
        );
    }
}
