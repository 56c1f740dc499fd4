//! Kafka topic and consumer-group names: the one place that spells them.

/// A topic Sluice needs, with its partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
}

/// Names of every topic and group, from `kafka.topic_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
        }
    }

    /// Where a model's (or graph's) requests are produced: `<prefix>.<name>.requests`.
    pub fn requests(&self, name: &str) -> String {
        format!("{}.{name}.requests", self.prefix)
    }

    /// Where a model's (or graph's) results are produced: `<prefix>.<name>.results`.
    pub fn results(&self, name: &str) -> String {
        format!("{}.{name}.results", self.prefix)
    }

    /// The topic a graph's non-model step consumes: `<prefix>.<graph>.<step>.requests`.
    pub fn step(&self, graph: &str, step: &str) -> String {
        format!("{}.{graph}.{step}.requests", self.prefix)
    }

    /// Where a graph's shadow comparisons go: `<prefix>.<graph>.comparisons`.
    pub fn comparisons(&self, graph: &str) -> String {
        format!("{}.{graph}.comparisons", self.prefix)
    }

    /// A learning model's logged answers: `<prefix>.<model>.predictions`.
    pub fn predictions(&self, model: &str) -> String {
        format!("{}.{model}.predictions", self.prefix)
    }

    /// Feedback on a model's answers: `<prefix>.<model>.feedback`.
    pub fn feedback(&self, model: &str) -> String {
        format!("{}.{model}.feedback", self.prefix)
    }

    /// A learning model's published weights, newest last: `<prefix>.<model>.weights`.
    pub fn weights(&self, model: &str) -> String {
        format!("{}.{model}.weights", self.prefix)
    }

    /// Model versions pushed while serving: `<prefix>.control`.
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// Records no step could process: `<prefix>.dead-letter`.
    pub fn dead_letter(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    /// The consumer group of a worker unit (`<prefix>.<unit>`).
    pub fn group(&self, unit: &str) -> String {
        format!("{}.{unit}", self.prefix)
    }

    /// The consumer group of a deployment unit (`<prefix>.unit:<name>`; `:` is in no model or
    /// graph name, so it never meets a step pool's group).
    pub fn unit_group(&self, name: &str) -> String {
        format!("{}.unit:{name}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_scheme() {
        let t = Topics::new("sluice");
        assert_eq!(t.requests("mlp"), "sluice.mlp.requests");
        assert_eq!(t.results("mlp"), "sluice.mlp.results");
        assert_eq!(t.step("g", "vote"), "sluice.g.vote.requests");
        assert_eq!(t.comparisons("g"), "sluice.g.comparisons");
        assert_eq!(t.dead_letter(), "sluice.dead-letter");
        assert_eq!(t.predictions("sea"), "sluice.sea.predictions");
        assert_eq!(t.feedback("sea"), "sluice.sea.feedback");
        assert_eq!(t.weights("sea"), "sluice.sea.weights");
        assert_eq!(t.group("g.vote"), "sluice.g.vote");
        assert_eq!(t.unit_group("cpu"), "sluice.unit:cpu");
    }
}
