//! Redis credentials pass through `redis.url` (`redis://user:password@host:port`): a gateway
//! and a worker against a redis-server whose only user is an ACL user with a password answer
//! correctly (equal to onnxruntime's answer) and never log the password; a wrong password is
//! refused at start, the log saying so. TLS (`rediss://`): the same against a redis-server
//! serving TLS only, with a certificate authority made by `openssl` (`redis.tls_ca`); without
//! that CA the certificate is refused at start.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_acl_user_with_a_password_is_used_for_replies() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    let port = free_port();
    stack.start_redis_with(
        "redis-acl",
        port,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "sluice",
            "on",
            ">s3cret-pw",
            "~*",
            "&*",
            "+@all",
        ],
    );
    let url = format!("redis://sluice:s3cret-pw@127.0.0.1:{port}");
    let ops = format!("127.0.0.1:{}", free_port());
    stack.spawn_sluice(
        "worker-mlp-acl",
        &["worker", "--model", "mlp", "--metrics-listen", &ops],
        &[("SLUICE__REDIS__URL", url.as_str())],
    );
    stack.wait_ready(&format!("http://{ops}/health/ready"));
    let listen = format!("127.0.0.1:{}", free_port());
    let gateway = stack.spawn_sluice(
        "gateway-acl",
        &["gateway"],
        &[
            ("SLUICE__REDIS__URL", url.as_str()),
            ("SLUICE__GATEWAY__LISTEN", listen.as_str()),
        ],
    );
    stack.wait_ready(&format!("http://{listen}/v2/health/ready"));

    let s = samples();
    let r = infer(&http(), &format!("http://{listen}"), "mlp", &[&s.scaled[4]]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_close(
        &flat_f64(&r.json()["outputs"][1]["data"]),
        &flat_f64(&s.expected["mlp"]["probabilities"][4]),
        "mlp through an ACL user's Redis",
    );
    let log = stack.log_of(gateway);
    assert!(
        !log.contains("s3cret-pw"),
        "the password is not logged: {log}"
    );

    // A wrong password: the gateway stops, saying why.
    let wrong = format!("redis://sluice:guessed@127.0.0.1:{port}");
    let log = refused_at_start(&mut stack, "gateway-wrong-password", &wrong);
    assert!(log.contains("Password authentication failed"), "{log}");
    assert!(
        !log.contains("guessed"),
        "the password is not logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_with_a_private_ca_is_used_for_replies() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    // A certificate authority, and the server's certificate signed by it (webpki refuses a
    // self-signed CA certificate as the server's own).
    let dir = stack.dir.path().to_path_buf();
    let path = |name: &str| dir.join(name).display().to_string();
    let (ca_s, ca_key) = (path("ca.pem"), path("ca-key.pem"));
    let (cert_s, key_s, csr, ext) = (
        path("redis-cert.pem"),
        path("redis-key.pem"),
        path("redis.csr"),
        path("san.ext"),
    );
    std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    for args in [
        [
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-days",
                "1",
                "-subj",
                "/CN=sluice-test-ca",
                "-keyout",
                &ca_key,
                "-out",
                &ca_s,
            ][..],
        ]
        .concat(),
        [
            &["req"][..],
            &ec[..],
            &["-subj", "/CN=localhost", "-keyout", &key_s, "-out", &csr][..],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_s,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert_s,
        ],
    ] {
        openssl(&args);
    }
    let port = free_port();
    // TLS only: the plain port is closed.
    let redis = stack.start_redis_tls(
        "redis-tls",
        port,
        &[
            "--tls-cert-file",
            &cert_s,
            "--tls-key-file",
            &key_s,
            "--tls-ca-cert-file",
            &ca_s,
            "--tls-auth-clients",
            "no",
        ],
    );
    let url = format!("rediss://127.0.0.1:{port}");
    let tls = [
        ("SLUICE__REDIS__URL", url.as_str()),
        ("SLUICE__REDIS__TLS_CA", ca_s.as_str()),
    ];
    let ops = format!("127.0.0.1:{}", free_port());
    stack.spawn_sluice(
        "worker-mlp-tls",
        &["worker", "--model", "mlp", "--metrics-listen", &ops],
        &tls,
    );
    stack.wait_ready(&format!("http://{ops}/health/ready"));
    let listen = format!("127.0.0.1:{}", free_port());
    let mut env = tls.to_vec();
    env.push(("SLUICE__GATEWAY__LISTEN", listen.as_str()));
    stack.spawn_sluice("gateway-tls-redis", &["gateway"], &env);
    stack.wait_ready(&format!("http://{listen}/v2/health/ready"));

    let s = samples();
    let r = infer(&http(), &format!("http://{listen}"), "mlp", &[&s.scaled[7]]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_close(
        &flat_f64(&r.json()["outputs"][1]["data"]),
        &flat_f64(&s.expected["mlp"]["probabilities"][7]),
        "mlp with replies through Redis over TLS",
    );
    // The reply went through that Redis: it holds the stored result.
    let keys = std::process::Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &ca_s,
            "-p",
            &port.to_string(),
            "--scan",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&keys.stdout).contains(":result:"),
        "no stored result in the TLS Redis: {}",
        String::from_utf8_lossy(&keys.stdout)
    );
    assert!(stack.is_running(redis));

    // Without the CA the server's certificate is not trusted: refused at start, saying so.
    let log = refused_at_start(&mut stack, "gateway-untrusted", &url);
    assert!(log.to_lowercase().contains("certificate"), "{log}");
}

/// Starts a gateway with Redis at `redis_url` and no other Redis settings; waits (at most 20 s)
/// for it to stop, as it must when it cannot use that Redis; returns its log.
fn refused_at_start(stack: &mut Stack, name: &str, redis_url: &str) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let gateway = stack.spawn_sluice(
        name,
        &["gateway"],
        &[
            ("SLUICE__REDIS__URL", redis_url),
            ("SLUICE__GATEWAY__LISTEN", listen.as_str()),
        ],
    );
    let end = Instant::now() + Duration::from_secs(20);
    while !stack.wait_exit_within(gateway, Duration::from_millis(200)) {
        assert!(
            Instant::now() < end,
            "{name}: still running, not refused at start"
        );
    }
    stack.log_of(gateway)
}
