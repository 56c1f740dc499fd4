//! Redis credentials pass through `redis.url` (`redis://user:password@host:port`): a gateway
//! and a worker against a redis-server whose only user is an ACL user with a password answer
//! correctly (equal to onnxruntime's answer) and never log the password; a wrong password is
//! refused at start, the log saying so.
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
    let bad_listen = format!("127.0.0.1:{}", free_port());
    let bad = stack.spawn_sluice(
        "gateway-wrong-password",
        &["gateway"],
        &[
            ("SLUICE__REDIS__URL", wrong.as_str()),
            ("SLUICE__GATEWAY__LISTEN", bad_listen.as_str()),
        ],
    );
    let end = Instant::now() + Duration::from_secs(20);
    while !stack.wait_exit_within(bad, Duration::from_millis(200)) {
        assert!(Instant::now() < end, "a wrong password is refused at start");
    }
    let log = stack.log_of(bad);
    assert!(log.contains("Password authentication failed"), "{log}");
    assert!(
        !log.contains("guessed"),
        "the password is not logged: {log}"
    );
}
