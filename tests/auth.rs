//! API keys at the gateway against the real stack: 401 without a usable key, 403 outside a
//! key's scope or servables, 429 with `Retry-After` over its rate, health always open; a key's
//! answers are the model's (equal to onnxruntime's).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn keys_admit_what_their_scopes_and_servables_allow() {
    let hash = |key: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.args(["keys", "hash"]).stdin(std::process::Stdio::piped());
        c.stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(key.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .trim_start_matches("sha256: ")
            .to_string()
    };
    let extra = format!(
        r#"
[gateway.auth]
enabled = true
open_metrics = false
[[gateway.auth.keys]]
name = "team-a"
sha256 = "{}"
scopes = ["infer"]
servables = ["mlp", "digits-*"]
rate = 5.0
burst = 5
[[gateway.auth.keys]]
name = "ops"
sha256 = "{}"
scopes = ["admin"]
[[gateway.auth.keys]]
name = "former"
sha256 = "{}"
scopes = ["infer"]
revoked = true
"#,
        hash("team-a-secret"),
        hash("ops-secret"),
        hash("former-secret")
    );
    let config = config_variant("auth", &[], &extra);
    let Some(mut stack) = Stack::start_config(config, &[]) else {
        return;
    };
    let (_, worker_ops) = stack.start_worker_at("mlp");
    let client = http();
    let base = stack.gateway.clone();
    let s = samples();
    let url = |m: &str| format!("{base}/v2/models/{m}/infer");
    let body = infer_body(&[&s.scaled[0]]);
    let bearer = |k: &str| format!("Bearer {k}");

    let r = post(&client, &url("mlp"), &[], body.clone()).await;
    assert_eq!(r.status, 401);
    assert!(String::from_utf8_lossy(&r.body).contains("API key is required"));
    for headers in [
        [("authorization", "Basic dGVhbQ==".to_string())],
        [("x-api-key", "guessed".to_string())],
        [("authorization", bearer("former-secret"))],
    ] {
        let r = post(&client, &url("mlp"), &headers, body.clone()).await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert!(r.headers.contains_key("www-authenticate"));
    }
    let team = [("authorization", bearer("team-a-secret"))];
    let r = post(&client, &url("mlp"), &team, body.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = flat_f64(&r.json()["outputs"][1]["data"]);
    assert_close(
        &got,
        &flat_f64(&s.expected["mlp"]["probabilities"][0]),
        "mlp for team-a",
    );
    assert_eq!(
        post(&client, &url("logreg"), &team, body.clone())
            .await
            .status,
        403
    );
    let fb = format!("{base}/v2/models/mlp/feedback");
    assert_eq!(
        post(&client, &fb, &team, "{}".to_string()).await.status,
        403
    );
    let load = format!("{base}/v2/repository/models/mlp/unload");
    assert_eq!(
        post(&client, &load, &team, "{}".to_string()).await.status,
        403
    );
    // The admin key reaches the repository (unload is refused for its own reason: 400).
    assert_eq!(
        post(
            &client,
            &load,
            &[("x-api-key", "ops-secret".to_string())],
            "{}".to_string()
        )
        .await
        .status,
        400
    );
    // Health is open; metrics are not (open_metrics = false).
    assert_eq!(
        get(&client, &format!("{base}/v2/health/ready"))
            .await
            .status,
        200
    );
    assert_eq!(get(&client, &format!("{base}/metrics")).await.status, 401);
    // Over its rate (5/s, burst 5): refused at once with when to retry.
    let mut refused = None;
    for _ in 0..20 {
        let r = post(&client, &url("mlp"), &team, body.clone()).await;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200);
    }
    let r = refused.expect("a key over its rate is refused");
    assert_eq!(
        r.headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        post(&client, &url("mlp"), &team, body.clone()).await.status,
        200
    );
    // Keys are never logged.
    // The gateway is the third process the harness starts (after Kafka and Redis).
    let logs = stack.log_of(2);
    assert!(logs.contains("revoked key was refused"), "{logs}");
    assert!(!logs.contains("team-a-secret") && !logs.contains("former-secret"));

    // The worker's ops port takes the same keys: health open, reload for admin keys only,
    // metrics closed as configured.
    let ops = |path: &str| format!("http://{worker_ops}{path}");
    assert_eq!(get(&client, &ops("/health/ready")).await.status, 200);
    assert_eq!(get(&client, &ops("/metrics")).await.status, 401);
    let reload = ops("/admin/reload");
    let r = post(&client, &reload, &[], String::new()).await;
    assert_eq!(r.status, 401);
    assert!(r.headers.contains_key("www-authenticate"));
    assert_eq!(
        post(&client, &reload, &team, String::new()).await.status,
        403
    );
    let former = [("x-api-key", "former-secret".to_string())];
    assert_eq!(
        post(&client, &reload, &former, String::new()).await.status,
        401
    );
    let admin = [("authorization", bearer("ops-secret"))];
    let r = post(&client, &reload, &admin, String::new()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("reloaded"));
}
