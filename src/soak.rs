//! `sluice bench --soak` and `--idle`: what the running stack does over time. Soak keeps a
//! closed-loop load on one servable and prints, per interval, requests/s, p50/p99, errors, and the
//! broker's resident memory and CPU, so a slowdown or a growing broker shows as it happens; idle
//! sends nothing and prints what the stack's processes cost while waiting.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::procs::{cpu_ticks, pids_of, steal_ticks, ticks_per_s};

/// One reporting interval's requests.
#[derive(Default)]
struct Interval {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// The stack's process kinds, as `sluice bench` names them.
const KINDS: [&str; 5] = ["gateway", "workers", "learners", "broker", "redis"];

/// Resident memory of `pids` in MiB.
fn rss_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum::<f64>()
        / 1024.0
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs the soak and prints one line per `every`, then the last-to-first ratio.
#[allow(clippy::print_stdout)]
pub async fn soak(
    url: &str,
    body: Bytes,
    concurrency: usize,
    total: Duration,
    every: Duration,
) -> anyhow::Result<()> {
    let every = every.min(total).max(Duration::from_secs(1));
    let intervals = (total.as_secs_f64() / every.as_secs_f64()).ceil() as usize;
    let buckets: Arc<Mutex<Vec<Interval>>> = Arc::new(Mutex::new(
        (0..intervals).map(|_| Interval::default()).collect(),
    ));
    let start = Instant::now();
    let end = start + every * intervals as u32;
    println!(
        "sluice bench --soak: {url}, concurrency {concurrency}, {} in intervals of {}",
        humantime::format_duration(every * intervals as u32),
        humantime::format_duration(every)
    );
    println!(
        "{:>8} {:>9} {:>9} {:>9} {:>7} {:>11} {:>11} {:>10} {:>9} {:>7} {:>8}",
        "interval",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "broker MiB",
        "log MiB",
        "broker %",
        "stack %",
        "load %",
        "steal %"
    );
    let load = Load {
        client: crate::http::client(concurrency),
        url: url.to_string(),
        body,
        start,
        every,
        end,
        buckets: Arc::clone(&buckets),
    };
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(load.clone().run()))
        .collect();
    let mut rates = Vec::new();
    for i in 0..intervals {
        rates.push(report_interval(i, start, every, &buckets).await);
    }
    for t in tasks {
        t.await?;
    }
    if let (Some(first), Some(last)) = (rates.first(), rates.last()) {
        println!(
            "last / first interval: {:.2} ({last:.0} / {first:.0} req/s)",
            last / first.max(1e-9)
        );
    }
    Ok(())
}

/// One load-generating client: posts the body back to back until `end`, recording each answer
/// in the interval it started in.
#[derive(Clone)]
struct Load {
    client: crate::http::HttpClient,
    url: String,
    body: Bytes,
    start: Instant,
    every: Duration,
    end: Instant,
    buckets: Arc<Mutex<Vec<Interval>>>,
}

impl Load {
    async fn run(self) {
        loop {
            let t = Instant::now();
            if t >= self.end {
                break;
            }
            let outcome = crate::http::post_json(&self.client, &self.url, self.body.clone()).await;
            let i =
                (t.duration_since(self.start).as_secs_f64() / self.every.as_secs_f64()) as usize;
            let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            let Some(bucket) = b.get_mut(i) else {
                break;
            };
            match outcome {
                Ok((200, _)) => bucket.latencies_us.push(t.elapsed().as_micros() as u64),
                Ok((status, body)) => {
                    bucket.errors += 1;
                    bucket.first_error.get_or_insert_with(|| {
                        format!("{status} {}", String::from_utf8_lossy(&body))
                    });
                }
                Err(e) => {
                    bucket.errors += 1;
                    bucket
                        .first_error
                        .get_or_insert_with(|| format!("transport: {e}"));
                }
            }
        }
    }
}

/// Waits out interval `i`, then prints its figures and the CPU each part of the stack used;
/// returns its request rate.
#[allow(clippy::print_stdout)] // a report on the terminal
async fn report_interval(
    i: usize,
    start: Instant,
    every: Duration,
    buckets: &Mutex<Vec<Interval>>,
) -> f64 {
    // Pids are looked up each interval: a supervised process may have been restarted.
    let broker = pids_of("broker");
    let stack: Vec<u32> = KINDS.iter().flat_map(|k| pids_of(k)).collect();
    let me = [std::process::id()];
    let (b0, s0, l0, v0) = (
        cpu_ticks(&broker),
        cpu_ticks(&stack),
        cpu_ticks(&me),
        steal_ticks(),
    );
    tokio::time::sleep_until((start + every * (i as u32 + 1)).into()).await;
    let (b1, s1, l1, v1) = (
        cpu_ticks(&broker),
        cpu_ticks(&stack),
        cpu_ticks(&me),
        steal_ticks(),
    );
    let secs = every.as_secs_f64();
    let share = |a: u64, b: u64| a.saturating_sub(b) as f64 / ticks_per_s() / secs * 100.0;
    // Requests still in flight at the interval's end land in it shortly after: let them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut lat, errors, first_error) = {
        let mut b = buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = std::mem::take(&mut b[i]);
        (bucket.latencies_us, bucket.errors, bucket.first_error)
    };
    lat.sort_unstable();
    let rps = lat.len() as f64 / secs;
    println!(
        "{:>8} {:>9.0} {:>9.2} {:>9.2} {:>7} {:>11.0} {:>11.1} {:>10.0} {:>9.0} {:>7.0} {:>8.1}",
        i + 1,
        rps,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        errors,
        rss_mib(&broker),
        broker_log_mib(&broker),
        share(b1, b0),
        share(s1, s0),
        share(l1, l0),
        share(v1, v0)
    );
    if let Some(e) = first_error {
        println!("         first error: {e}");
    }
    rps
}

/// The size of the log folder of the Kafka broker among `pids` (the `data` folder beside the
/// `server.properties` its command line names, as `sluice up` lays it out), MiB; 0 when unknown.
fn broker_log_mib(pids: &[u32]) -> f64 {
    let Some(cmdline) = pids
        .iter()
        .find_map(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
    else {
        return 0.0;
    };
    let properties = cmdline
        .split(|b| *b == 0)
        .rfind(|a| a.ends_with(b"server.properties"))
        .map(|a| std::path::PathBuf::from(String::from_utf8_lossy(a).to_string()));
    let Some(dir) = properties.as_deref().and_then(std::path::Path::parent) else {
        return 0.0;
    };
    folder_bytes(&dir.join("data")) as f64 / (1024.0 * 1024.0)
}

/// Bytes of disk the files under `dir` take, recursively (allocated blocks: Kafka preallocates
/// its index files sparsely, so their length overstates the disk they use).
fn folder_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => folder_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Sends nothing for `duration` and prints the CPU each kind of the stack's processes used.
#[allow(clippy::print_stdout)]
pub async fn idle(duration: Duration) -> anyhow::Result<()> {
    let pids: Vec<(&str, Vec<u32>)> = KINDS.iter().map(|k| (*k, pids_of(k))).collect();
    let before: Vec<u64> = pids.iter().map(|(_, p)| cpu_ticks(p)).collect();
    tokio::time::sleep(duration).await;
    let secs = duration.as_secs_f64();
    let mut total = 0.0;
    let mut parts = Vec::new();
    for ((kind, p), b) in pids.iter().zip(before) {
        let share = cpu_ticks(p).saturating_sub(b) as f64 / ticks_per_s() / secs * 100.0;
        total += share;
        parts.push(format!("{kind} {share:.1}% ({} processes)", p.len()));
    }
    println!(
        "idle for {}: the stack used {total:.1}% of one core: {}",
        humantime::format_duration(duration),
        parts.join(", ")
    );
    Ok(())
}
