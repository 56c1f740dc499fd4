//! The gateway's limits against the real stack (Kafka, redis-server, onnxruntime): a client
//! sending its headers or body too slowly is cut off (slow-loris), connections over
//! `max_connections` get 503 and are closed, per-servable body and tensor limits answer 413
//! naming the limit, and through all of it a well-behaved caller's answers equal onnxruntime's.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads what the server sends until it closes the connection or `within` passes; returns
/// the bytes and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_extra_connections_and_oversized_requests_are_cut_off() {
    let config = config_variant(
        "limits",
        &[(
            "[models.mlp]\n",
            "[models.mlp]\nmax_input_elements = 128\nmax_body_bytes = 16384\n",
        )],
        "",
    );
    let env = [
        ("SLUICE__GATEWAY__MAX_CONNECTIONS", "6"),
        ("SLUICE__GATEWAY__HEADER_READ_TIMEOUT", "1s"),
        ("SLUICE__GATEWAY__BODY_READ_TIMEOUT", "1s"),
    ];
    let Some(mut stack) = Stack::start_config(config, &env) else {
        return;
    };
    stack.start_worker("mlp");
    let client = http();
    let base = stack.gateway.clone();
    let addr = base.trim_start_matches("http://").to_string();
    let s = samples();
    let url = format!("{base}/v2/models/mlp/infer");
    let answers_right = |r: &Reply, rows: usize| {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let got = flat_f64(&r.json()["outputs"][1]["data"]);
        let want: Vec<f64> = (0..rows)
            .flat_map(|k| flat_f64(&s.expected["mlp"]["probabilities"][k]))
            .collect();
        assert_close(&got, &want, "mlp");
    };

    // Per-servable tensor limit: 2 rows of 64 fit in 128 elements, 3 do not.
    let two = post(
        &client,
        &url,
        &[],
        infer_body(&[&s.scaled[0], &s.scaled[1]]),
    )
    .await;
    answers_right(&two, 2);
    let three: Vec<&Vec<f32>> = s.scaled.iter().take(3).collect();
    let r = post(&client, &url, &[], infer_body(&three)).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let msg = String::from_utf8_lossy(&r.body);
    assert!(
        msg.contains("192 elements") && msg.contains("max_input_elements (128)"),
        "{msg}"
    );
    // Per-servable body limit: 16 KiB, checked before the JSON is parsed; another model keeps
    // the gateway's own limit.
    let padded = format!(
        r#"{{"parameters": {{"pad": "{}"}}, {}"#,
        "x".repeat(20_000),
        &infer_body(&[&s.scaled[0]])[1..]
    );
    let r = post(&client, &url, &[], padded.clone()).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("16384 bytes"));

    // Slow-loris: headers never finished are cut off after header_read_timeout.
    let mut loris = TcpStream::connect(&addr).await.unwrap();
    loris
        .write_all(b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut loris, Duration::from_secs(5)).await;
    assert!(
        closed,
        "a client that never finishes its headers is disconnected"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut off after {:?}",
        started.elapsed()
    );

    // A body that stops arriving: 408 after body_read_timeout.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"inputs\": [",
    )
    .await
    .unwrap();
    let (reply, _) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("did not arrive within 1s"), "{reply}");

    // Connections over max_connections (6): 503 and closed, while the ones held stay usable.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let (reply, closed) = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    assert!(closed && reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("retry-after: 1"), "{reply}");
    let body = infer_body(&[&s.scaled[3]]);
    let request = format!(
        "POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    held[0].write_all(request.as_bytes()).await.unwrap();
    let (reply, _) = read_until_closed(&mut held[0], Duration::from_secs(10)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let json: serde_json::Value =
        serde_json::from_str(&reply[reply.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_close(
        &flat_f64(&json["outputs"][1]["data"]),
        &flat_f64(&s.expected["mlp"]["probabilities"][3]),
        "mlp on a held connection",
    );

    // The idle connections held are cut off by the header timeout; then callers get in again.
    drop(held);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let r = post(
            &client,
            &url,
            &[],
            infer_body(&[&s.scaled[0], &s.scaled[1]]),
        )
        .await;
        if r.status == 200 {
            answers_right(&r, 2);
            break;
        }
        assert!(
            Instant::now() < end,
            "no connection admitted again: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
