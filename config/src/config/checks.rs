//! Start-up checks of the settings: every invalid value, each naming its key, all reported at
//! once. Graphs are checked when they are compiled ([`crate::graph`]).

use std::time::Duration;

use super::{Config, ModelConfig, TensorSpec, learn};

impl Config {
    /// Every invalid value, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.gateway.auth.problems();
        self.kafka_problems(&mut p);
        self.redis_problems(&mut p);
        self.gateway_problems(&mut p);
        if self.worker.max_queued == 0 {
            p.push("worker.max_queued: must be at least 1".into());
        }
        for (name, m) in &self.models {
            model_problems(name, m, &mut p);
        }
        for name in self.graphs.keys() {
            if !valid_name(name) {
                p.push(format!(
                    "graphs.{name}: graph names may only contain a-z, 0-9, '_' and '-'"
                ));
            }
            if self.models.contains_key(name) {
                p.push(format!(
                    "graphs.{name}: a model has the same name; graphs and models share one namespace"
                ));
            }
        }
        p
    }

    fn kafka_problems(&self, p: &mut Vec<String>) {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            p.push("kafka.brokers: must not be empty".into());
        }
        if !valid_name(&k.topic_prefix) {
            p.push(format!(
                "kafka.topic_prefix: '{}' may only contain a-z, 0-9, '_' and '-'",
                k.topic_prefix
            ));
        }
        if k.replication_factor < 1 {
            p.push("kafka.replication_factor: must be at least 1".into());
        }
        if k.purge_interval.is_zero() {
            p.push("kafka.purge_interval: must be > 0".into());
        }
    }

    fn redis_problems(&self, p: &mut Vec<String>) {
        let r = &self.redis;
        if !r.url.starts_with("redis://") && !r.url.starts_with("rediss://") {
            p.push("redis.url: must start with redis:// or rediss://".into());
        }
        if r.tls_cert.is_some() != r.tls_key.is_some() {
            p.push("redis.tls_cert and redis.tls_key: set both or neither".into());
        }
        if (r.tls_ca.is_some() || r.tls_cert.is_some()) && !r.url.starts_with("rediss://") {
            p.push("redis.tls_ca / tls_cert: need a rediss:// url".into());
        }
        if r.result_ttl < Duration::from_secs(1) {
            p.push("redis.result_ttl: must be at least 1s".into());
        }
    }

    fn gateway_problems(&self, p: &mut Vec<String>) {
        let g = &self.gateway;
        let at_least_one = [
            ("max_in_flight", g.max_in_flight),
            ("produce_linger_from", g.produce_linger_from),
            ("health_failures", g.health_failures as usize),
            ("max_connections", g.max_connections),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                p.push(format!("gateway.{key}: must be at least 1"));
            }
        }
        if g.max_body_bytes < 1024 {
            p.push("gateway.max_body_bytes: must be at least 1024".into());
        }
        if g.default_timeout.is_zero() || g.default_timeout > g.max_timeout {
            p.push(format!(
                "gateway.default_timeout: must be > 0 and <= gateway.max_timeout ({:?})",
                g.max_timeout
            ));
        }
        if g.health_interval.is_zero() {
            p.push("gateway.health_interval: must be > 0".into());
        }
        if g.header_read_timeout.is_zero() || g.body_read_timeout.is_zero() {
            p.push("gateway.header_read_timeout, body_read_timeout: must be > 0".into());
        }
    }
}

/// Problems of model `name`'s settings and tensor specs.
fn model_problems(name: &str, m: &ModelConfig, p: &mut Vec<String>) {
    let key = format!("models.{name}");
    if !valid_name(name) {
        p.push(format!(
            "{key}: model names may only contain a-z, 0-9, '_' and '-'"
        ));
    }
    let at_least_one = [
        ("max_batch_size", m.max_batch_size),
        ("threads", m.threads),
        ("intra_op_threads", m.intra_op_threads),
        ("workers", m.workers),
    ];
    for (field, value) in at_least_one {
        if value == 0 {
            p.push(format!("{key}.{field}: must be at least 1"));
        }
    }
    p.extend(learn::problems(&key, m));
    if m.partitions < 1 {
        p.push(format!("{key}.partitions: must be at least 1"));
    }
    for (kind, specs) in [("inputs", &m.inputs), ("outputs", &m.outputs)] {
        spec_problems(&format!("{key}.{kind}"), specs, p);
    }
}

/// Problems of a model's input or output specs under `key`.
fn spec_problems(key: &str, specs: &[TensorSpec], p: &mut Vec<String>) {
    if specs.is_empty() {
        p.push(format!("{key}: at least one is required"));
    }
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        let skey = format!("{key}.{}", s.name);
        if !seen.insert(&s.name) {
            p.push(format!("{skey}: declared twice"));
        }
        if s.shape.first() != Some(&-1) {
            p.push(format!(
                "{skey}.shape: the first dimension is the batch and must be -1, got {:?}",
                s.shape
            ));
        }
        if s.shape.iter().any(|&d| d < -1 || d == 0) {
            p.push(format!(
                "{skey}.shape: dimensions must be positive or -1, got {:?}",
                s.shape
            ));
        }
    }
}

/// A model, graph or topic-prefix name: `a-z`, `0-9`, `_`, `-`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
