//! `sluice bench`: where the time goes.
//!
//! Three measurements, so every figure reads as compute + transport + Sluice's own overhead:
//! 1. **transport**: the broker's produce→consume latency, one record at a time, with the same
//!    client settings the gateway and workers use (the floor any Kafka hop pays);
//! 2. **compute**: ONNX Runtime in-process on the same model at each batch size (the model's limit);
//!    for a graph, each of its models at batch 1 and their sum;
//! 3. **http**: closed-loop load at each concurrency against a running gateway: requests/s, p50,
//!    p90, p99, errors, and the CPU time Sluice's own processes (gateway, workers) spent per request.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sluice_common::kafka::{TopicSpec, apply_topics, consumer_config};
use sluice_common::producer::{AsyncProducer, FutureRecord};
use sluice_common::{Config, Deployment};
use sluice_schemas::{DataType, Tensor};
use sluice_workers::backend::{Backend, OrtBackend};

use crate::procs::{cpu_ticks, pids_of, sluice_pids, ticks_per_s};

/// Options of `sluice bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model or graph to measure.
    #[arg(long)]
    model: String,
    /// Gateway base URL (default: http://<gateway.listen>).
    #[arg(long)]
    url: Option<String>,
    /// Concurrency levels for the HTTP load, comma-separated; also the compute batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    concurrency: Vec<usize>,
    /// Measurement time per level.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Warm-up time per level (not measured).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Request body (JSON); default: `requests/<model>.json` in the folder above the model's ONNX file
    /// (examples/requests/ for the example models).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Skip the HTTP load.
    #[arg(long)]
    skip_http: bool,
    /// Skip the in-process compute measurement.
    #[arg(long)]
    skip_compute: bool,
    /// Skip the broker transport measurement.
    #[arg(long)]
    skip_transport: bool,
    /// Soak mode: closed-loop HTTP load at the first --concurrency level for this long, printing
    /// each --report-every: req/s, p50/p99, errors, the broker's memory and CPU, the stack's and
    /// the load generator's CPU, the host's steal time; then the last-to-first ratio. Nothing
    /// else is measured.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Soak mode: the reporting interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    report_every: Duration,
    /// Idle mode: send nothing for this long and print the CPU the stack's processes used
    /// (% of one core). Nothing else is measured.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
}

/// Latency summary in milliseconds.
struct Summary {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
}

fn summarize(mut us: Vec<u64>) -> Summary {
    us.sort_unstable();
    let pick = |q: f64| -> f64 {
        if us.is_empty() {
            return f64::NAN;
        }
        let i = ((us.len() as f64 - 1.0) * q).round() as usize;
        us[i] as f64 / 1000.0
    };
    Summary {
        count: us.len(),
        p50: pick(0.50),
        p90: pick(0.90),
        p99: pick(0.99),
    }
}

#[allow(clippy::print_stdout)]
pub async fn run(deployment: Deployment, args: BenchArgs) -> anyhow::Result<()> {
    let cfg = &deployment.config;
    let graph = deployment.graph(&args.model).cloned();
    let Some(servable) = deployment.servable(&args.model) else {
        bail!(
            "'{}' is neither a model nor a graph in the config",
            args.model
        );
    };
    // Request samples live in `requests/` beside the models' folder (the first model of a graph).
    let model_file = match &graph {
        None => deployment.model(&args.model).and_then(|m| m.onnx.clone()),
        Some(g) => g.steps.iter().find_map(|s| match &s.kind {
            sluice_common::graph::StepKind::Model(m) => {
                deployment.model(m).and_then(|m| m.onnx.clone())
            }
            _ => None,
        }),
    };
    let body = request_body(&args, &servable.signature, model_file.as_deref())?;
    if let Some(idle) = args.idle {
        return crate::soak::idle(idle).await;
    }
    let base = args
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.gateway.listen));
    let url = format!("{base}/v2/models/{}/infer", args.model);
    if let Some(total) = args.soak {
        let concurrency = args.concurrency.first().copied().unwrap_or(32);
        return crate::soak::soak(&url, body, concurrency, total, args.report_every).await;
    }
    println!(
        "sluice bench: model {}, {} per level after {} warm-up",
        args.model,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup)
    );
    let mut baselines = Baselines::default();
    if !args.skip_transport {
        let s = transport(cfg, args.duration.min(Duration::from_secs(10))).await?;
        println!(
            "transport  produce→consume, 1 in flight: n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms",
            s.count, s.p50, s.p90, s.p99
        );
        baselines.transport_p50 = Some(s.p50);
    }
    if !args.skip_compute {
        match &graph {
            Some(g) => baselines.graph_compute_ms = Some(graph_compute(&deployment, g, &body)?),
            None => model_compute(&deployment, &args, &body)?,
        }
    }
    if !args.skip_http {
        let stage_urls = crate::stages::metrics_urls(&base, &cfg.local.state_dir);
        for &c in &args.concurrency {
            http_level(
                &args,
                &url,
                &body,
                c,
                &stage_urls,
                graph.as_deref(),
                baselines,
            )
            .await?;
        }
    }
    Ok(())
}

/// What HTTP figures are compared with: the broker's own round trip, and a graph's models
/// run in process.
#[derive(Clone, Copy, Default)]
struct Baselines {
    transport_p50: Option<f64>,
    graph_compute_ms: Option<f64>,
}

/// Each model step of graph `g` run in process on the sample, batch 1; returns the sum of
/// their p50s (ms).
#[allow(clippy::print_stdout)] // a report on the terminal
fn graph_compute(
    deployment: &Deployment,
    g: &sluice_common::graph::Graph,
    body: &[u8],
) -> anyhow::Result<f64> {
    let inputs = parse_inputs(body)?;
    let mut sum = 0.0;
    for step in &g.steps {
        let sluice_common::graph::StepKind::Model(name) = &step.kind else {
            continue;
        };
        let Some(m) = deployment.model(name) else {
            continue;
        };
        // Every example model reads one [batch, 64] FP32 tensor: the sample, renamed.
        let input: Vec<Tensor> = m
            .inputs
            .iter()
            .zip(&inputs)
            .map(|(spec, t)| Tensor {
                name: spec.name.clone(),
                ..t.clone()
            })
            .collect();
        let (_, s) = compute(m, &input, 1, Duration::from_secs(2))?;
        println!(
            "compute    step {} ({name}) in-process, batch 1: per call p50={:.3}ms p99={:.3}ms",
            step.name, s.p50, s.p99
        );
        sum += s.p50;
    }
    println!(
        "compute    graph {}: sum of its models' in-process p50 = {sum:.3}ms over {} topic hops",
        g.name,
        hops(g)
    );
    Ok(sum)
}

/// The model run in process at each concurrency's batch size, with its own settings and with
/// one intra-op thread (the single-core limit) if they differ.
#[allow(clippy::print_stdout)] // a report on the terminal
fn model_compute(deployment: &Deployment, args: &BenchArgs, body: &[u8]) -> anyhow::Result<()> {
    let Some(model) = deployment.model(&args.model) else {
        return Ok(());
    };
    let inputs = parse_inputs(body)?;
    let mut variants = vec![model.clone()];
    if model.intra_op_threads > 1 {
        variants.push(sluice_common::ModelConfig {
            intra_op_threads: 1,
            ..model.clone()
        });
    }
    for m in &variants {
        for &c in &args.concurrency {
            let batch = c.clamp(1, m.max_batch_size);
            let (rows_per_s, s) =
                compute(m, &inputs, batch, args.duration.min(Duration::from_secs(5)))?;
            println!(
                "compute    onnxruntime in-process, batch {batch}, {} intra-op thread(s): {rows_per_s:.0} rows/s, per call p50={:.3}ms p99={:.3}ms",
                m.intra_op_threads, s.p50, s.p99
            );
        }
    }
    Ok(())
}

/// One HTTP load level at concurrency `c` through the gateway, printed with the CPU it cost,
/// its stages, and its latency over the baselines.
#[allow(clippy::print_stdout)] // a report on the terminal
async fn http_level(
    args: &BenchArgs,
    url: &str,
    body: &bytes::Bytes,
    c: usize,
    stage_urls: &[String],
    graph: Option<&sluice_common::graph::Graph>,
    baselines: Baselines,
) -> anyhow::Result<()> {
    let pids = sluice_pids();
    let level = Level {
        concurrency: c,
        warmup: args.warmup,
        duration: args.duration,
    };
    let (r, cpu_ms_per_req) = http_load(url, body.clone(), level, &pids, stage_urls).await?;
    println!("           CPU (% of one core): {}", r.cpu_breakdown);
    println!("           stages, {}", r.stages);
    if let Some(e) = &r.first_error {
        println!("           first error: {e}");
    }
    let s = summarize(r.latencies_us);
    let rps = s.count as f64 / args.duration.as_secs_f64();
    let over = match (graph, baselines.graph_compute_ms, baselines.transport_p50) {
        (Some(g), Some(compute_ms), Some(t)) => {
            let n = hops(g) as f64;
            format!(
                ", {n} hops: (p50 - models' sum) / hops = {:.2}ms per hop vs transport p50 + 1ms = {:.2}ms",
                (s.p50 - compute_ms) / n,
                t + 1.0
            )
        }
        (None, _, Some(t)) => format!(", p50 - transport p50 = {:.2}ms", s.p50 - t),
        _ => String::new(),
    };
    println!(
        "http       concurrency {c}: {rps:.0} req/s, p50={:.2}ms p90={:.2}ms p99={:.2}ms, errors={}, sluice CPU {:.3} ms/req over {} processes{over}",
        s.p50,
        s.p90,
        s.p99,
        r.errors,
        cpu_ms_per_req,
        pids.len()
    );
    Ok(())
}

/// Topic hops on a graph's longest path: one per step a request passes through.
fn hops(g: &sluice_common::graph::Graph) -> usize {
    let mut depth = vec![1usize; g.steps.len()];
    for i in 0..g.steps.len() {
        for &n in &g.steps[i].next {
            depth[n] = depth[n].max(depth[i] + 1);
        }
    }
    depth.into_iter().max().unwrap_or(1)
}

fn request_body(
    args: &BenchArgs,
    model: &sluice_common::Signature,
    model_file: Option<&std::path::Path>,
) -> anyhow::Result<Bytes> {
    let path = args.input.clone().unwrap_or_else(|| {
        let dir = model_file
            .and_then(|f| f.parent())
            .and_then(|p| p.parent())
            .map(PathBuf::from)
            .unwrap_or_default();
        dir.join("requests").join(format!("{}.json", args.model))
    });
    if path.is_file() {
        return Ok(Bytes::from(
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        ));
    }
    // No sample: zeros of the declared shapes, one row.
    let inputs: Vec<serde_json::Value> = model
        .inputs
        .iter()
        .map(|s| {
            let mut shape = s.shape.clone();
            shape[0] = 1;
            let n: i64 = shape.iter().map(|d| d.max(&1)).product();
            serde_json::json!({"name": s.name, "datatype": s.datatype.as_str(), "shape": shape, "data": vec![0; n as usize]})
        })
        .collect();
    Ok(Bytes::from(serde_json::to_vec(
        &serde_json::json!({ "inputs": inputs }),
    )?))
}

fn parse_inputs(body: &[u8]) -> anyhow::Result<Vec<Tensor>> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let mut out = Vec::new();
    for i in v["inputs"].as_array().context("request has no inputs")? {
        let dt: DataType = i["datatype"].as_str().unwrap_or_default().parse()?;
        if dt != DataType::Fp32 {
            bail!("the compute bench supports FP32 inputs only");
        }
        let shape: Vec<i64> = serde_json::from_value(i["shape"].clone())?;
        let mut flat = Vec::new();
        flatten(&i["data"], &mut flat);
        out.push(Tensor::from_values(
            i["name"].as_str().unwrap_or_default(),
            dt,
            shape,
            &flat,
        ));
    }
    Ok(out)
}

fn flatten(v: &serde_json::Value, out: &mut Vec<f32>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap_or(0.0) as f32),
        _ => {}
    }
}

fn compute(
    model: &sluice_common::ModelConfig,
    sample: &[Tensor],
    batch: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Summary)> {
    let mut backend = OrtBackend::load(model)?;
    let inputs: Vec<Tensor> = sample
        .iter()
        .map(|t| {
            let mut shape = t.shape.clone();
            let rows = shape[0].max(1) as usize;
            shape[0] = (batch * rows) as i64;
            Tensor {
                name: t.name.clone(),
                datatype: t.datatype,
                shape,
                data: t.data.repeat(batch),
            }
        })
        .collect();
    let outputs: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
    for _ in 0..10 {
        backend.infer(&inputs, &outputs)?;
    }
    let start = Instant::now();
    let mut calls = Vec::new();
    while start.elapsed() < duration {
        let t = Instant::now();
        backend.infer(&inputs, &outputs)?;
        calls.push(t.elapsed().as_micros() as u64);
    }
    let rows = (calls.len() * batch) as f64 / start.elapsed().as_secs_f64();
    Ok((rows, summarize(calls)))
}

async fn transport(cfg: &Config, duration: Duration) -> anyhow::Result<Summary> {
    let topic = format!("{}.bench-transport", cfg.kafka.topic_prefix);
    apply_topics(
        cfg,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 1,
        }],
    )
    .await?;
    let producer: AsyncProducer =
        sluice_common::kafka::producer(cfg, "sluice-bench", Duration::ZERO)?;
    let group = format!("sluice-bench-{}", std::process::id());
    let consumer: StreamConsumer = consumer_config(cfg, &group, "sluice-bench").create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::End)?;
    consumer.assign(&tpl)?;
    // Prime the connection and fetch position.
    let deadline = Instant::now() + duration + Duration::from_secs(10);
    let mut samples = Vec::new();
    let mut n = 0u64;
    let measured_from = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && (Instant::now() < measured_from + duration) {
        n += 1;
        let key = n.to_string();
        let t = Instant::now();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&key),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await??;
            if m.key() == Some(key.as_bytes()) {
                break;
            }
        }
        if Instant::now() > measured_from {
            samples.push(t.elapsed().as_micros() as u64);
        }
    }
    Ok(summarize(samples))
}

struct LoadResult {
    latencies_us: Vec<u64>,
    errors: u64,
    /// The first error seen, as status and body.
    first_error: Option<String>,
    /// CPU use by process kind, in % of one core, and per request over all of them.
    cpu_breakdown: String,
    /// Where the time went, stage by stage ([`crate::stages::breakdown`]).
    stages: String,
}

/// One level of closed-loop load.
#[derive(Clone, Copy)]
struct Level {
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
}

async fn http_load(
    url: &str,
    body: Bytes,
    level: Level,
    pids: &[u32],
    stage_urls: &[String],
) -> anyhow::Result<(LoadResult, f64)> {
    let Level {
        concurrency,
        warmup,
        duration,
    } = level;
    let client = crate::http::client(concurrency);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let body = body.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let outcome = crate::http::post_json(&client, &url, body.clone()).await;
                if t >= measure_from {
                    match outcome {
                        Ok((200, _)) => lat.push(t.elapsed().as_micros() as u64),
                        Ok((status, body)) => {
                            errors.push(format!("{status} {}", String::from_utf8_lossy(&body)))
                        }
                        Err(e) => errors.push(format!("transport: {e}")),
                    }
                }
            }
            (lat, errors)
        }));
    }
    let kinds = ["gateway", "workers", "learners", "broker", "redis"];
    let kind_pids: Vec<Vec<u32>> = kinds.iter().map(|k| pids_of(k)).collect();
    let me = [std::process::id()];
    let scraper = crate::http::client(4);
    tokio::time::sleep_until(measure_from.into()).await;
    let stages_before = crate::stages::scrape(&scraper, stage_urls).await;
    let before = cpu_ticks(pids);
    let kinds_before: Vec<u64> = kind_pids.iter().map(|p| cpu_ticks(p)).collect();
    let me_before = cpu_ticks(&me);
    tokio::time::sleep_until(end.into()).await;
    let after = cpu_ticks(pids);
    let kinds_after: Vec<u64> = kind_pids.iter().map(|p| cpu_ticks(p)).collect();
    let me_after = cpu_ticks(&me);
    let stages_after = crate::stages::scrape(&scraper, stage_urls).await;
    let mut result = LoadResult {
        latencies_us: Vec::new(),
        errors: 0,
        first_error: None,
        cpu_breakdown: String::new(),
        stages: String::new(),
    };
    for t in tasks {
        let (lat, errors) = t.await?;
        result.latencies_us.extend(lat);
        result.errors += errors.len() as u64;
        if result.first_error.is_none() {
            result.first_error = errors.into_iter().next();
        }
    }
    let ticks_per_s = ticks_per_s();
    let cpu_ms = (after.saturating_sub(before)) as f64 * 1000.0 / ticks_per_s;
    let per_req = cpu_ms / (result.latencies_us.len().max(1) as f64);
    let secs = duration.as_secs_f64();
    let share = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / ticks_per_s / secs * 100.0;
    let mut parts: Vec<String> = kinds
        .iter()
        .zip(kinds_after.iter().zip(&kinds_before))
        .map(|(k, (a, b))| format!("{k} {:.0}%", share(*a, *b)))
        .collect();
    parts.push(format!("load generator {:.0}%", share(me_after, me_before)));
    let stack_ticks: u64 = kinds_after
        .iter()
        .zip(&kinds_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    let answered = result.latencies_us.len().max(1) as f64;
    parts.push(format!(
        "the whole stack {:.3} ms CPU per request",
        stack_ticks as f64 * 1000.0 / ticks_per_s / answered
    ));
    result.cpu_breakdown = parts.join(", ");
    let client_ms = result.latencies_us.iter().sum::<u64>() as f64 / 1000.0 / answered;
    result.stages = crate::stages::breakdown(&stages_before, &stages_after, client_ms);
    Ok((result, per_req))
}
