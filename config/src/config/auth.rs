//! Who may call the gateway (`[gateway.auth]`): API keys, stored as SHA-256 hashes, each with
//! the actions it may take, the servables it may reach and an optional rate limit.

use serde::{Deserialize, Serialize};

/// The gateway's authentication settings. Off by default (the local demo stack); when on,
/// every route but health needs a key (`Authorization: Bearer <key>` or `X-API-Key: <key>`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Require a key.
    #[serde(default)]
    pub enabled: bool,
    /// Serve `/metrics` without a key (otherwise it needs the `admin` scope).
    #[serde(default = "yes")]
    pub open_metrics: bool,
    /// The keys.
    #[serde(default)]
    pub keys: Vec<ApiKey>,
    /// Bearer JSON Web Tokens, accepted next to the keys.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

/// JSON Web Tokens signed by an identity provider (RS256 or ES256), checked against its public
/// keys (a JWKS file), issuer, audience and expiry. The token's `scope` claim (space-separated,
/// as OAuth 2.0 writes it) carries `infer`, `feedback`, `admin`; `sluice_servables` (a list of
/// names or prefixes ending in `*`) the servables it reaches (default: all); `sub` names it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The provider's JSON Web Key Set, a file (relative to the config file).
    pub jwks: std::path::PathBuf,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
}

fn default_leeway() -> u64 {
    30
}

/// One API key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds it (named in logs and metrics; the key itself never is).
    pub name: String,
    /// SHA-256 of the key, lowercase hex (`sluice keys hash` prints it).
    pub sha256: String,
    /// What it may do: `infer` (inference, metadata), `feedback`, `admin` (model loads and
    /// pushes, metrics when they are not open).
    pub scopes: Vec<Scope>,
    /// The models and graphs it may reach: names, or prefixes ending in `*` (default: all).
    #[serde(default = "everything")]
    pub servables: Vec<String>,
    /// Refused with 401 (kept in config so the refusal names it in the log).
    #[serde(default)]
    pub revoked: bool,
    /// Requests per second it may make (token bucket); unlimited when unset.
    pub rate: Option<f64>,
    /// Requests it may make at once above the rate (the bucket's size; default: one second's
    /// worth, at least 1).
    pub burst: Option<f64>,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Inference and model metadata.
    Infer,
    /// Feedback on answers.
    Feedback,
    /// Model loads and pushes; metrics when they are not open.
    Admin,
}

impl ApiKey {
    /// Whether it may reach servable `name`.
    pub fn reaches(&self, name: &str) -> bool {
        self.servables.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }
}

impl AuthConfig {
    /// What is wrong with the keys.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        let mut hashes = std::collections::BTreeSet::new();
        for k in &self.keys {
            let key = format!("gateway.auth.keys '{}'", k.name);
            if !names.insert(&k.name) {
                p.push(format!("{key}: the name is used twice"));
            }
            let hex = k.sha256.len() == 64
                && k.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                p.push(format!(
                    "{key}.sha256: must be 64 lowercase hex digits (sluice keys hash KEY)"
                ));
            } else if !hashes.insert(&k.sha256) {
                p.push(format!("{key}.sha256: another key has the same hash"));
            }
            if k.scopes.is_empty() {
                p.push(format!("{key}.scopes: give it at least one scope"));
            }
            if k.rate.is_some_and(|r| !(r > 0.0 && r.is_finite()))
                || k.burst.is_some_and(|b| !(b >= 1.0 && b.is_finite()))
            {
                p.push(format!("{key}: rate must be > 0 and burst >= 1"));
            }
        }
        if self.enabled && self.jwt.is_none() && self.keys.iter().all(|k| k.revoked) {
            p.push("gateway.auth: enabled with no usable key: every request would get 401".into());
        }
        p
    }
}

fn yes() -> bool {
    true
}
fn everything() -> Vec<String> {
    vec!["*".into()]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn keys_are_checked_and_reach_what_they_name() {
        let ok: AuthConfig = toml::from_str(&format!(
            "enabled = true\n[[keys]]\nname = \"a\"\nsha256 = \"{HASH}\"\nscopes = [\"infer\"]\nservables = [\"mlp\", \"digits-*\"]\n"
        ))
        .unwrap();
        assert!(ok.problems().is_empty(), "{:?}", ok.problems());
        let k = &ok.keys[0];
        assert!(k.reaches("mlp") && k.reaches("digits-pipeline") && !k.reaches("logreg"));
        let bad: AuthConfig = toml::from_str(
            "enabled = true\n[[keys]]\nname = \"a\"\nsha256 = \"XYZ\"\nscopes = []\nrate = 0\nrevoked = true\n",
        )
        .unwrap();
        assert_eq!(bad.problems().len(), 4, "{:?}", bad.problems());
        let typo = toml::from_str::<AuthConfig>("[[keys]]\nname = \"a\"\nsha = \"x\"\nscopes = []");
        assert!(typo.unwrap_err().to_string().contains("sha"));
    }
}
