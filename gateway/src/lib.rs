//! Sluice's HTTP gateway: the Open Inference Protocol v2 REST API in front of Kafka.
//!
//! A request is validated against the model's declared inputs, published to the model's request
//! topic, and answered when its result comes back through Redis ([`correlator`]).

pub mod correlator;
pub mod error;
pub mod routes;
mod stats;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::producer::{FutureProducer, Producer};
use sluice_common::{Config, ModelConfig};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::correlator::Correlator;
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
}

/// Shared state of one gateway instance.
pub struct Gateway {
    cfg: Config,
    servables: BTreeMap<String, Servable>,
    id: String,
    next_seq: AtomicU64,
    producer: FutureProducer,
    correlator: Arc<Correlator>,
    permits: Arc<Semaphore>,
    broker_ok: AtomicBool,
    redis_ok: AtomicBool,
    metrics: PrometheusHandle,
    stats: HashMap<String, (ModelStats, ModelMetrics)>,
    in_flight: metrics::Gauge,
    produce_seconds: metrics::Histogram,
}

impl Gateway {
    /// Connects to Kafka and Redis and subscribes to this instance's reply channel.
    pub async fn connect(
        cfg: Config,
        metrics: PrometheusHandle,
    ) -> Result<Arc<Gateway>, StartError> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let producer: FutureProducer = sluice_common::kafka::producer_config(
            &cfg,
            &format!("sluice-gateway-{id}"),
            Duration::ZERO,
        )
        .create()?;
        let client = redis::Client::open(cfg.redis.url.as_str())?;
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
        let servables = servables(&cfg);
        let stats = servables
            .keys()
            .map(|m| (m.clone(), (ModelStats::default(), ModelMetrics::new(m))))
            .collect();
        let gw = Arc::new(Gateway {
            servables,
            permits: Arc::new(Semaphore::new(cfg.gateway.max_in_flight)),
            cfg,
            id,
            next_seq: AtomicU64::new(0),
            producer,
            correlator,
            broker_ok: AtomicBool::new(false),
            redis_ok: AtomicBool::new(true),
            metrics,
            stats,
            in_flight: metrics::gauge!("sluice_gateway_in_flight"),
            produce_seconds: metrics::histogram!("sluice_gateway_produce_seconds"),
        });
        tokio::spawn(health_loop(Arc::downgrade(&gw), conn));
        Ok(gw)
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
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await?;
        let _ = self.producer.flush(Duration::from_secs(5));
        Ok(())
    }
}

/// Checks the broker and Redis every second and records the outcome for readiness and 503s.
/// Probes failed in a row before a dependency counts as down: one slow answer from a busy broker
/// must not turn a second of requests into 503s (a broker that is really gone also fails the
/// produce of every request, which answers 503 on its own).
const PROBES_TO_MARK_DOWN: u32 = 3;

async fn health_loop(gw: std::sync::Weak<Gateway>, mut redis: redis::aio::ConnectionManager) {
    // Consecutive failed probes per dependency; `None` until its first success.
    let (mut broker_failures, mut redis_failures) = (None::<u32>, None::<u32>);
    loop {
        let Some(g) = gw.upgrade() else { return };
        let producer = g.producer.clone();
        // One topic's metadata proves the broker answers, without listing every topic each second.
        let probe = g.cfg.dead_letter_topic();
        let broker = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&probe), Duration::from_secs(1))
                .is_ok()
        })
        .await
        .unwrap_or(false);
        let pong: Result<Result<String, _>, _> = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PING").query_async(&mut redis),
        )
        .await;
        let redis_ok = matches!(pong, Ok(Ok(_)));
        let settle = |ok: bool, failures: &mut Option<u32>| {
            *failures = match (ok, *failures) {
                (true, _) => Some(0),
                (false, Some(n)) => Some(n + 1),
                (false, None) => None,
            };
            ok || failures.is_some_and(|n| n < PROBES_TO_MARK_DOWN)
        };
        let broker = settle(broker, &mut broker_failures);
        let redis_ok = settle(redis_ok, &mut redis_failures);
        if g.broker_ok.swap(broker, Ordering::Relaxed) != broker {
            tracing::info!(reachable = broker, "broker health changed");
        }
        if g.redis_ok.swap(redis_ok, Ordering::Relaxed) != redis_ok {
            tracing::info!(reachable = redis_ok, "redis health changed");
        }
        metrics::gauge!("sluice_gateway_ready").set(if g.is_ready() { 1.0 } else { 0.0 });
        drop(g);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Something the gateway serves under a model name: a model, or a graph behind the same
/// interface (clients cannot tell them apart).
pub(crate) struct Servable {
    /// Interface: inputs, outputs, version, batch limit.
    pub(crate) config: ModelConfig,
    /// Reported platform: `onnxruntime_onnx` or `sluice_graph`.
    pub(crate) platform: &'static str,
}

fn servables(cfg: &Config) -> BTreeMap<String, Servable> {
    let mut out: BTreeMap<String, Servable> = cfg
        .models
        .iter()
        .map(|(name, m)| {
            let s = Servable {
                config: m.clone(),
                platform: "onnxruntime_onnx",
            };
            (name.clone(), s)
        })
        .collect();
    for (name, g) in cfg.compiled_graphs().unwrap_or_default() {
        let config = g.interface().clone();
        out.insert(
            name,
            Servable {
                config,
                platform: "sluice_graph",
            },
        );
    }
    out
}
