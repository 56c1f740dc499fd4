//! HTTPS at the gateway against the real stack: a certificate made with `openssl` for this
//! test, a second gateway serving it; a stock client (curl) trusting that certificate gets
//! answers equal to onnxruntime's; one that does not trust it, and plain HTTP, get nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Runs curl with `args`; returns (exit code, stdout).
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_https_with_its_certificate() {
    let Some(mut stack) = Stack::start(&[]) else {
        return;
    };
    let dir = stack.dir.path().to_path_buf();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout",
        &key_s,
        "-out",
        &cert_s,
    ]);
    stack.start_worker("mlp");

    let addr = format!("127.0.0.1:{}", free_port());
    stack.spawn_sluice(
        "gateway-tls",
        &["gateway"],
        &[
            ("SLUICE__GATEWAY__LISTEN", addr.as_str()),
            ("SLUICE__GATEWAY__TLS__CERT", cert_s.as_str()),
            ("SLUICE__GATEWAY__TLS__KEY", key_s.as_str()),
        ],
    );
    let https = format!("https://{addr}");
    let ready = format!("{https}/v2/health/ready");
    let end = Instant::now() + Duration::from_secs(30);
    while curl(&["--cacert", &cert_s, "-o", "/dev/null", &ready]).0 != 0 {
        assert!(Instant::now() < end, "the HTTPS gateway never answered");
        std::thread::sleep(Duration::from_millis(200));
    }

    let s = samples();
    let body = infer_body(&[&s.scaled[0], &s.scaled[1]]);
    let url = format!("{https}/v2/models/mlp/infer");
    // The first request may meet a stack still settling (a 503 while the gateway's broker probe
    // catches up on a busy machine): asked again until it answers 200, for at most 20 s.
    let end = Instant::now() + Duration::from_secs(20);
    let v: serde_json::Value = loop {
        let (code, out) = curl(&[
            "--cacert",
            &cert_s,
            "-H",
            "content-type: application/json",
            "-w",
            "\n%{http_code}",
            "-d",
            &body,
            &url,
        ]);
        assert_eq!(code, 0, "{out}");
        let (json, status) = out.rsplit_once('\n').unwrap();
        if status == "200" {
            break serde_json::from_str(json).unwrap();
        }
        assert!(Instant::now() < end, "HTTPS inference: {status} {json}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let want: Vec<f64> = (0..2)
        .flat_map(|k| flat_f64(&s.expected["mlp"]["probabilities"][k]))
        .collect();
    assert_close(&flat_f64(&v["outputs"][1]["data"]), &want, "mlp over HTTPS");

    // A client that does not trust the certificate refuses it (curl exit 60); plain HTTP to
    // the HTTPS port gets no HTTP answer (curl exit 1: a TLS alert read as HTTP/0.9, refused;
    // or 52/56: nothing, a reset).
    assert_eq!(curl(&["-o", "/dev/null", &ready]).0, 60);
    let (plain, _) = curl(&["-o", "/dev/null", &format!("http://{addr}/v2/health/ready")]);
    assert!(
        [1, 52, 56].contains(&plain),
        "plain HTTP got curl exit {plain}"
    );
}
