//! Sluice's HTTP gateway: the Open Inference Protocol v2 REST API in front of Kafka.
//!
//! A request is validated against the servable's signature ([`infer`]), published to its request
//! topic ([`publish`]), and answered when its result comes back through Redis ([`correlator`]).
//! [`health`] probes the broker and Redis; [`routes`] serves metadata.

pub mod auth;
pub mod correlator;
pub mod error;
mod feedback;
mod health;
mod infer;
mod jwt;
mod listen;
pub mod publish;
mod repository;
mod routes;
mod servable;
mod stats;
#[cfg(test)]
mod test_redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sluice_common::{Config, Deployment};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::correlator::Correlator;
use crate::publish::Publisher;
use crate::stats::{ModelMetrics, ModelStats};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Kafka client creation failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Redis was unreachable or refused the subscription.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Serving failed.
    #[error("http: {0}")]
    Io(#[from] std::io::Error),
    /// The JWT key set could not be used.
    #[error("auth: {0}")]
    Auth(String),
    /// The TLS certificate or key could not be used.
    #[error("tls: {0}")]
    Tls(String),
}

/// Shared state of one gateway instance.
pub struct Gateway {
    deployment: Deployment,
    id: String,
    next_seq: AtomicU64,
    publisher: Publisher,
    correlator: Arc<Correlator>,
    permits: Arc<Semaphore>,
    broker_ok: AtomicBool,
    redis_ok: AtomicBool,
    metrics: PrometheusHandle,
    stats: HashMap<String, (ModelStats, ModelMetrics)>,
    in_flight: metrics::Gauge,
    ready_gauge: metrics::Gauge,
    produce_seconds: metrics::Histogram,
    redis: redis::aio::ConnectionManager,
    versions: servable::ServingVersions,
    keys: Option<auth::Keys>,
}

impl Gateway {
    /// Connects to Kafka and Redis and subscribes to this instance's reply channel.
    pub async fn connect(
        deployment: Deployment,
        metrics: PrometheusHandle,
    ) -> Result<Arc<Gateway>, StartError> {
        let cfg = &deployment.config;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let client = sluice_common::redis_client::client(&cfg.redis)?;
        let manager_cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn =
            redis::aio::ConnectionManager::new_with_config(client.clone(), manager_cfg).await?;
        let key_cfg = cfg.clone();
        let correlator =
            Correlator::start(client, cfg.reply_channel(&id), conn.clone(), move |rid| {
                key_cfg.result_key(rid)
            })
            .await?;
        let stats = deployment
            .servables()
            .keys()
            .map(|m| (m.clone(), (ModelStats::default(), ModelMetrics::new(m))))
            .collect();
        let publisher = Publisher::new(cfg, &id)?;
        let keys = auth::Keys::new(&cfg.gateway.auth).map_err(StartError::Auth)?;
        let gw = Arc::new(Gateway {
            permits: Arc::new(Semaphore::new(cfg.gateway.max_in_flight)),
            deployment,
            id,
            next_seq: AtomicU64::new(0),
            publisher,
            correlator,
            broker_ok: AtomicBool::new(false),
            redis_ok: AtomicBool::new(true),
            metrics,
            stats,
            in_flight: metrics::gauge!("sluice_gateway_in_flight"),
            ready_gauge: metrics::gauge!("sluice_gateway_ready"),
            produce_seconds: metrics::histogram!("sluice_gateway_produce_seconds"),
            redis: conn.clone(),
            versions: servable::ServingVersions::default(),
            keys,
        });
        tokio::spawn(health::probe_loop(Arc::downgrade(&gw), conn));
        Ok(gw)
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.deployment.config
    }

    /// This instance's id (part of every request id and of its reply channel).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn next_request_id(&self) -> String {
        let n = self.next_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.id)
    }

    /// Ready when the broker answers, Redis answers, and the reply subscription is live.
    pub fn is_ready(&self) -> bool {
        self.broker_ok.load(Ordering::Relaxed)
            && self.redis_ok.load(Ordering::Relaxed)
            && self.correlator.is_subscribed()
    }

    /// Serves HTTP on `listener` until `shutdown` resolves, then drains in-flight requests.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let app = routes::router(Arc::clone(&self));
        let g = &self.config().gateway;
        let limits = listen::ConnectionLimits {
            max_connections: g.max_connections,
            header_read_timeout: g.header_read_timeout,
        };
        let tls = match &g.tls {
            Some(cfg) => Some(listen::tls_acceptor(cfg).map_err(StartError::Tls)?),
            None => None,
        };
        // Once shutdown begins, requests in flight have `drain_timeout` to be answered; then
        // every caller still waiting gets 503 (not its deadline's 504, seconds later).
        let (began, drain_begins) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            let _ = began.send(());
        };
        let correlator = Arc::clone(&self.correlator);
        let drain = g.drain_timeout;
        tokio::spawn(async move {
            if drain_begins.await.is_ok() {
                tokio::time::sleep(drain).await;
                tracing::info!(
                    waiting = correlator.waiting(),
                    "drain over: answering what is still waiting with 503"
                );
                correlator.close();
            }
        });
        listen::serve(listener, app, limits, tls, shutdown).await;
        self.publisher.flush(Duration::from_secs(5));
        Ok(())
    }
}
