//! Bearer JSON Web Tokens at the gateway against the real stack: an ES256 and an RS256 key
//! made with `openssl`, published in a JWKS file; tokens signed here. Valid tokens reach what
//! their `scope` and `sluice_servables` claims allow (answers equal to onnxruntime's); expired,
//! wrongly addressed, forged and HS256 tokens get 401; tokens outside their scope 403.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

/// Writes a new EC P-256 private key (PEM) to `path`.
fn make_ec_key(path: &str) {
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        path,
    ]);
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Makes an EC P-256 and an RSA key in `dir`; returns their PEM paths and the JWKS with both
/// public keys (kids "ec-1", "rsa-1").
fn keys(dir: &Path) -> (String, String, serde_json::Value) {
    let ec = dir.join("ec.pem").display().to_string();
    let rsa = dir.join("rsa.pem").display().to_string();
    make_ec_key(&ec);
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &rsa,
    ]);
    // The uncompressed point 0x04 || X || Y ends the public key's DER.
    let der = openssl(&["pkey", "-in", &ec, "-pubout", "-outform", "DER"]);
    let point = &der[der.len() - 64..];
    let modulus = String::from_utf8(openssl(&["rsa", "-in", &rsa, "-noout", "-modulus"])).unwrap();
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let jwks = json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
         "x": b64(&point[..32]), "y": b64(&point[32..])},
        {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig", "n": b64(&n), "e": "AQAB"},
    ]});
    (ec, rsa, jwks)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_reach_what_their_claims_allow() {
    let dir = tempfile::tempdir().unwrap();
    let (ec, rsa, jwks) = keys(dir.path());
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let extra = format!(
        "\n[gateway.auth]\nenabled = true\n[gateway.auth.jwt]\njwks = \"{}\"\nissuer = \"https://id.example\"\naudience = \"sluice\"\n",
        jwks_path.display()
    );
    let Some(mut stack) = Stack::start_config(config_variant("jwt", &[], &extra), &[]) else {
        return;
    };
    stack.start_worker("mlp");
    let client = http();
    let base = stack.gateway.clone();
    let s = samples();
    let body = infer_body(&[&s.scaled[0]]);
    let infer_url = |m: &str| format!("{base}/v2/models/{m}/infer");

    let ec_key = EncodingKey::from_ec_pem(&std::fs::read(&ec).unwrap()).unwrap();
    let rsa_key = EncodingKey::from_rsa_pem(&std::fs::read(&rsa).unwrap()).unwrap();
    let claims = |scope: &str, exp: u64| {
        json!({"sub": "team-a", "iss": "https://id.example", "aud": "sluice", "exp": exp,
               "scope": scope, "sluice_servables": ["mlp"]})
    };
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        encode(&header, claims, key).unwrap()
    };
    let bearer = |t: &str| [("authorization", format!("Bearer {t}"))];

    // ES256 and RS256 tokens, in scope: answered, equal to onnxruntime's.
    let es = sign(
        Algorithm::ES256,
        "ec-1",
        &ec_key,
        &claims("infer", now() + 300),
    );
    let rs = sign(
        Algorithm::RS256,
        "rsa-1",
        &rsa_key,
        &claims("infer feedback", now() + 300),
    );
    for token in [&es, &rs] {
        let r = post(&client, &infer_url("mlp"), &bearer(token), body.clone()).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_close(
            &flat_f64(&r.json()["outputs"][1]["data"]),
            &flat_f64(&s.expected["mlp"]["probabilities"][0]),
            "mlp with a bearer token",
        );
    }
    // Outside its servables or its scope: 403.
    let r = post(&client, &infer_url("logreg"), &bearer(&es), body.clone()).await;
    assert_eq!(r.status, 403);
    let fb = format!("{base}/v2/models/mlp/feedback");
    assert_eq!(
        post(&client, &fb, &bearer(&es), "{}".to_string())
            .await
            .status,
        403
    );

    // Refused with 401, each for its reason.
    let mut wrong_aud = claims("infer", now() + 300);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("infer", now() + 300);
    wrong_iss["iss"] = json!("https://evil.example");
    let forged_key = {
        let other = dir.path().join("other.pem").display().to_string();
        make_ec_key(&other);
        EncodingKey::from_ec_pem(&std::fs::read(&other).unwrap()).unwrap()
    };
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims("admin", now() + 300),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    for (token, says) in [
        (
            sign(
                Algorithm::ES256,
                "ec-1",
                &ec_key,
                &claims("infer", now() - 120),
            ),
            "expired",
        ),
        (
            sign(Algorithm::ES256, "ec-1", &ec_key, &wrong_aud),
            "another audience",
        ),
        (
            sign(Algorithm::ES256, "ec-1", &ec_key, &wrong_iss),
            "another issuer",
        ),
        (
            sign(
                Algorithm::ES256,
                "ec-1",
                &forged_key,
                &claims("admin", now() + 300),
            ),
            "signature does not verify",
        ),
        (hs, "RS256 and ES256 are accepted"),
        ("not.a.token".to_string(), "malformed bearer token"),
    ] {
        let r = post(&client, &infer_url("mlp"), &bearer(&token), body.clone()).await;
        assert_eq!(
            r.status,
            401,
            "{says}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = String::from_utf8_lossy(&r.body);
        assert!(msg.contains(says), "{says}: {msg}");
    }
}
