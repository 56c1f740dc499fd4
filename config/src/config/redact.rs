//! The effective config printed without its secrets.

use super::{Config, StepKindConfig};

impl Config {
    /// The effective config as TOML, with secrets replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut c = self.clone();
        c.redis.url = redact_url(&c.redis.url);
        for g in c.graphs.values_mut() {
            for s in &mut g.steps {
                match &mut s.kind {
                    StepKindConfig::Postgres(p) => p.url = redact_url(&p.url),
                    StepKindConfig::Features(f) => {
                        if let Some(url) = f.redis.as_mut() {
                            *url = redact_url(url);
                        }
                    }
                    _ => {}
                }
            }
        }
        for map in [
            &mut c.kafka.client,
            &mut c.kafka.producer,
            &mut c.kafka.consumer,
        ] {
            for (k, v) in map.iter_mut() {
                if is_secret_key(k) {
                    *v = "***".into();
                }
            }
        }
        toml::to_string(&c).unwrap_or_else(|e| format!("<unprintable config: {e}>"))
    }
}

fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas"]
        .iter()
        .any(|s| k.contains(s))
}

/// Replaces the password of a `scheme://user:password@host` URL with `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{user}:***@{}", &url[..s], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
