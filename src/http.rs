//! A minimal keep-alive HTTP/1 client for readiness checks and load generation.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Shared HTTP client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with keep-alive and no Nagle delay.
pub fn client(max_idle_per_host: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

/// GETs `url`; returns the status code.
pub async fn get_status(client: &HttpClient, url: &str) -> anyhow::Result<u16> {
    let req = Request::get(url).body(Full::new(Bytes::new()))?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// GETs `url`; returns status and body.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<(u16, Bytes)> {
    let req = Request::get(url).body(Full::new(Bytes::new()))?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// POSTs a JSON body; returns status and body.
pub async fn post_json(
    client: &HttpClient,
    url: &str,
    body: Bytes,
) -> anyhow::Result<(u16, Bytes)> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
