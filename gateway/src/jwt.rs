//! Bearer JSON Web Tokens (`[gateway.auth.jwt]`): RS256 or ES256, verified against the
//! identity provider's public keys (a JWKS file read at start), with `iss`, `aud`, `exp` (and
//! `nbf` when present) checked within the configured leeway. A valid token acts as an API key
//! named by its `sub`, with the scopes of its `scope` claim and the servables of its
//! `sluice_servables` claim (default: all).

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use sluice_common::config::{ApiKey, JwtConfig, Scope};

/// The provider's keys and what a token must say.
pub(crate) struct Verifier {
    /// Each key of the set, with its `kid`.
    keys: Vec<(Option<String>, DecodingKey)>,
    issuer: String,
    audience: String,
    leeway_s: u64,
}

/// The claims Sluice reads.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    sluice_servables: Option<Vec<String>>,
}

impl Verifier {
    /// Reads the JWKS file named in `cfg`.
    pub(crate) fn load(cfg: &JwtConfig) -> Result<Verifier, String> {
        let file = cfg.jwks.display();
        let text = std::fs::read_to_string(&cfg.jwks)
            .map_err(|e| format!("gateway.auth.jwt.jwks {file}: {e}"))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("gateway.auth.jwt.jwks {file}: not a JWK set: {e}"))?;
        let keys = set
            .keys
            .iter()
            .map(|k| {
                let key = DecodingKey::from_jwk(k)
                    .map_err(|e| format!("gateway.auth.jwt.jwks {file}: a key is unusable: {e}"))?;
                Ok((k.common.key_id.clone(), key))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if keys.is_empty() {
            return Err(format!("gateway.auth.jwt.jwks {file}: no keys"));
        }
        Ok(Verifier {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_s: cfg.leeway_s,
        })
    }

    /// The identity `token` carries, or why it is refused (answered 401).
    pub(crate) fn verify(&self, token: &str) -> Result<ApiKey, String> {
        let header = decode_header(token).map_err(|e| format!("malformed bearer token: {e}"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(format!(
                "bearer token signed with {:?}; RS256 and ES256 are accepted",
                header.alg
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.leeway_s;
        let mut refused = "no key of the JWKS matches the token's kid".to_string();
        let candidates = self
            .keys
            .iter()
            .filter(|(kid, _)| header.kid.is_none() || *kid == header.kid);
        for (_, key) in candidates {
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => return Ok(identity(data.claims)),
                Err(e) => refused = describe(&e),
            }
        }
        Err(refused)
    }
}

/// The key a token's claims amount to.
fn identity(c: Claims) -> ApiKey {
    let scopes = c
        .scope
        .split_whitespace()
        .filter_map(|s| match s {
            "infer" => Some(Scope::Infer),
            "feedback" => Some(Scope::Feedback),
            "admin" => Some(Scope::Admin),
            _ => None,
        })
        .collect();
    ApiKey {
        name: format!("jwt:{}", c.sub),
        sha256: String::new(),
        scopes,
        servables: c.sluice_servables.unwrap_or_else(|| vec!["*".into()]),
        revoked: false,
        rate: None,
        burst: None,
    }
}

/// Why a token failed, in words.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "bearer token expired".into(),
        K::ImmatureSignature => "bearer token not valid yet (nbf)".into(),
        K::InvalidAudience => "bearer token is for another audience".into(),
        K::InvalidIssuer => "bearer token is from another issuer".into(),
        K::InvalidSignature => "bearer token signature does not verify".into(),
        K::MissingRequiredClaim(c) => format!("bearer token lacks the '{c}' claim"),
        other => format!("bearer token refused: {other:?}"),
    }
}
