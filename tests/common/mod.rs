//! Test harness: a real Apache Kafka broker and redis-server on free ports, plus `sluice` gateway and
//! worker processes configured through `SLUICE__…` environment variables over
//! `examples/digits.toml`. Under `CI=true` a missing broker or Redis binary fails the test.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub mod drill;
pub mod netfault;
pub use netfault::NetFault;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999), where `bind(0)` and outbound
    // connections pick their ports: a port from `bind(0)`, released for a child process to
    // bind, could be taken meanwhile by another test's `bind(0)` or by any outgoing
    // connection's local end ("Address already in use" in a gateway started in parallel).
    // Here each port is handed out once per test process, and only if nothing listens on it.
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() * 97 % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Skips (returns None) when services are missing, except under CI=true where it panics;
/// returns the folder of Kafka's jars.
pub fn services_available() -> Option<PathBuf> {
    let kafka = sluice_common::local::kafka_libs();
    let java = on_path(&sluice_common::local::java().display().to_string());
    let redis = on_path("redis-server");
    let ort = sluice_workers::backend::ort_library_path().is_some_and(|p| p.is_file());
    if let (Some(k), true, true, true) = (&kafka, java, redis, ort) {
        return Some(k.clone());
    }
    let missing = format!(
        "kafka: {}, java: {java}, redis-server: {redis}, onnxruntime: {ort}",
        kafka.is_some()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("integration services missing under CI=true ({missing}); run deploy/setup.sh");
    }
    eprintln!("SKIPPED: integration services missing ({missing}); run deploy/setup.sh");
    None
}

struct Proc {
    name: String,
    /// Signalled on purpose: its exit is expected.
    stopped: bool,
    child: Child,
    log: PathBuf,
}

/// How the harness runs the broker (a single-node Kafka whose log, in the stack's folder,
/// survives a kill -9).
#[derive(Default)]
pub struct Broker {
    /// Every process reaches the broker through a fault-injecting proxy.
    pub proxied: bool,
}

/// A running stack; everything is killed on drop.
pub struct Stack {
    pub dir: tempfile::TempDir,
    /// The broker address every process uses (the proxy's, when proxied).
    pub kafka: String,
    /// The broker itself (where it listens, its folder).
    broker: sluice_common::local::KafkaNode,
    /// The proxy in front of the broker (see [`Broker::proxied`]).
    pub net: Option<NetFault>,
    pub redis_url: String,
    pub gateway: String,
    /// The config file every process reads.
    pub config: PathBuf,
    env: Vec<(String, String)>,
    procs: Vec<Proc>,
}

pub fn wait_tcp(addr: &str, within: Duration) {
    let end = Instant::now() + within;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "{addr} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Stack {
    /// Broker + Redis + topics + one gateway; `env` adds SLUICE__ overrides for all processes.
    pub fn start(env: &[(&str, &str)]) -> Option<Stack> {
        Self::start_config(root().join("examples/digits.toml"), env)
    }

    /// As [`Stack::start`], with another config file (see [`config_variant`]).
    pub fn start_config(config: PathBuf, env: &[(&str, &str)]) -> Option<Stack> {
        Self::start_with(config, env, Broker::default())
    }

    /// As [`Stack::start_config`], with the broker run as `broker` says.
    pub fn start_with(config: PathBuf, env: &[(&str, &str)], broker: Broker) -> Option<Stack> {
        let kafka_libs = services_available()?;
        let dir = tempfile::tempdir().unwrap();
        let (kp, rp, gp) = (free_port(), free_port(), free_port());
        let broker_listen = format!("127.0.0.1:{kp}");
        let net = broker.proxied.then(|| NetFault::start(&broker_listen));
        let kafka = net
            .as_ref()
            .map_or_else(|| broker_listen.clone(), |n| n.addr.clone());
        let redis_url = format!("redis://127.0.0.1:{rp}");
        let mut stack = Stack {
            kafka: kafka.clone(),
            broker: sluice_common::local::KafkaNode {
                libs: kafka_libs,
                dir: dir.path().join("kafka"),
                listen: broker_listen,
                advertised: kafka.clone(),
                controller: format!("127.0.0.1:{}", free_port()),
                heap: "384m".into(),
            },
            net,
            redis_url: redis_url.clone(),
            gateway: format!("http://127.0.0.1:{gp}"),
            config,
            env: vec![
                ("SLUICE__KAFKA__BROKERS".into(), kafka.clone()),
                ("SLUICE__REDIS__URL".into(), redis_url),
                ("SLUICE__GATEWAY__LISTEN".into(), format!("127.0.0.1:{gp}")),
                ("SLUICE__TELEMETRY__LOG_LEVEL".into(), "info".into()),
            ],
            procs: Vec::new(),
            dir,
        };
        for (k, v) in env {
            stack.env.push((k.to_string(), v.to_string()));
        }
        stack.spawn_broker();
        stack.spawn_raw("redis", &mut sluice_common::local::redis_command(rp));
        wait_tcp(&format!("127.0.0.1:{rp}"), Duration::from_secs(10));
        let out = stack.sluice(&["topics", "apply"]).output().unwrap();
        assert!(
            out.status.success(),
            "topics apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stack.spawn_sluice("gateway", &["gateway"], &[]);
        stack.wait_ready(&format!("{}/v2/health/ready", stack.gateway));
        Some(stack)
    }

    /// Starts the broker (formatting its folder the first time) and waits for its port.
    fn spawn_broker(&mut self) {
        self.broker.prepare().unwrap();
        let mut c = self.broker.command();
        self.spawn_raw("kafka", &mut c);
        self.wait_port(self.broker.listen.clone(), Duration::from_secs(90));
    }

    /// Waits for `addr` to accept connections; fails with the last process's log if it exits.
    fn wait_port(&mut self, addr: String, within: Duration) {
        let end = Instant::now() + within;
        while std::net::TcpStream::connect(&addr).is_err() {
            let p = self.procs.last_mut().unwrap();
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    p.name,
                    tail(&p.log)
                );
            }
            assert!(Instant::now() < end, "{addr} did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the broker (SIGKILL) and starts it again on the same log and port.
    pub fn restart_broker(&mut self) {
        let i = self.index_of("kafka");
        self.signal(i, "KILL");
        self.wait_exit(i, Duration::from_secs(10));
        self.spawn_broker();
    }

    /// A `sluice` command with the stack's config and environment.
    pub fn sluice(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.arg("--config").arg(&self.config).args(args);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    /// A `sluice` command reading `config` instead of the stack's, with the stack's environment.
    pub fn sluice_with_config(&self, config: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.arg("--config").arg(config).args(args);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn spawn_raw(&mut self, name: &str, cmd: &mut Command) {
        let log = self.dir.path().join(format!(
            "{}-{}.log",
            name.replace(['#', ' '], "_"),
            self.procs.len()
        ));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push(Proc {
            name: name.into(),
            stopped: false,
            child,
            log,
        });
    }

    /// Spawns `sluice <args>` with extra env; returns its index.
    pub fn spawn_sluice(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
        let mut c = self.sluice(args);
        c.envs(env.iter().copied());
        self.spawn_raw(name, &mut c);
        self.procs.len() - 1
    }

    /// Starts a worker for `unit` reading `config` instead of the stack's (with the stack's
    /// environment), and waits until it has joined its group; returns its ops address.
    pub fn start_worker_with_config(&mut self, unit: &str, config: &Path) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        let flag = if unit.contains('.') {
            "--step"
        } else {
            "--model"
        };
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.arg("--config").arg(config);
        c.args(["worker", flag, unit, "--metrics-listen", &addr]);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.spawn_raw(&format!("worker-{unit}-own-config"), &mut c);
        self.wait_ready(&format!("http://{addr}/health/ready"));
        addr
    }

    /// Starts a worker for `unit` (a model, or `<graph>.<step>`) and waits until it has joined
    /// its group; returns its index.
    pub fn start_worker(&mut self, unit: &str) -> usize {
        self.start_worker_at(unit).0
    }

    /// As [`Stack::start_worker`]; also returns its ops address (`/metrics`, `/admin/reload`).
    pub fn start_worker_at(&mut self, unit: &str) -> (usize, String) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let flag = if unit.contains('.') {
            "--step"
        } else {
            "--model"
        };
        let i = self.spawn_sluice(
            &format!("worker-{unit}"),
            &["worker", flag, unit, "--metrics-listen", &addr],
            &[],
        );
        self.wait_ready(&format!("http://{addr}/health/ready"));
        (i, addr)
    }

    /// Starts a worker for deployment unit `unit` (`all` when the config declares none) and
    /// waits until it has joined its group; returns its index and ops address.
    pub fn start_unit(&mut self, unit: &str, env: &[(&str, &str)]) -> (usize, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let i = self.spawn_sluice(
            &format!("unit-{unit}"),
            &["worker", "--unit", unit, "--metrics-listen", &addr],
            env,
        );
        self.wait_ready(&format!("http://{addr}/health/ready"));
        (i, addr)
    }

    /// As [`Stack::start_unit`], reading `config` instead of the stack's; returns its ops address.
    pub fn start_unit_with_config(&mut self, unit: &str, config: &Path) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.arg("--config").arg(config);
        c.args(["worker", "--unit", unit, "--metrics-listen", &addr]);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.spawn_raw(&format!("unit-{unit}-own-config"), &mut c);
        self.wait_ready(&format!("http://{addr}/health/ready"));
        addr
    }

    pub fn wait_ready(&mut self, url: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(200) = blocking_get_status(url) {
                return;
            }
            for p in self.procs.iter_mut().filter(|p| !p.stopped) {
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!(
                        "{} exited ({status}) while waiting for {url}:\n{}",
                        p.name,
                        tail(&p.log)
                    );
                }
            }
            assert!(Instant::now() < end, "{url} not ready in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends a signal to process `i` (e.g. "KILL", "TERM").
    pub fn signal(&mut self, i: usize, sig: &str) {
        self.procs[i].stopped = true;
        let pid = self.procs[i].child.id().to_string();
        Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
    }

    /// Sends a signal to process `i` that it survives (e.g. "HUP").
    pub fn signal_keep(&mut self, i: usize, sig: &str) {
        let pid = self.procs[i].child.id().to_string();
        Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
    }

    /// Waits for process `i` to exit; returns whether it exited successfully.
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> bool {
        let end = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.procs[i].child.try_wait() {
                self.procs[i].stopped = true;
                return s.success();
            }
            assert!(
                Instant::now() < end,
                "{} did not exit in time",
                self.procs[i].name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether process `i` exits within `within` (without failing when it does not).
    pub fn wait_exit_within(&mut self, i: usize, within: Duration) -> bool {
        let end = Instant::now() + within;
        loop {
            if let Ok(Some(_)) = self.procs[i].child.try_wait() {
                self.procs[i].stopped = true;
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident memory of process `i`, KiB (0 when it cannot be read).
    pub fn rss_kib(&self, i: usize) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.procs[i].child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Starts another redis-server (e.g. a feature store apart from the reply Redis) on `port`;
    /// returns its index.
    pub fn start_redis(&mut self, name: &str, port: u16) -> usize {
        self.spawn_raw(name, &mut sluice_common::local::redis_command(port));
        wait_tcp(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
        self.procs.len() - 1
    }

    /// As [`Stack::start_redis`], with more redis-server arguments (ACL users, say).
    pub fn start_redis_with(&mut self, name: &str, port: u16, args: &[&str]) -> usize {
        let mut c = sluice_common::local::redis_command(port);
        c.args(args);
        self.spawn_raw(name, &mut c);
        wait_tcp(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
        self.procs.len() - 1
    }

    /// A redis-server serving TLS only on `port` (`args` name its certificate and key);
    /// returns its index.
    pub fn start_redis_tls(&mut self, name: &str, port: u16, args: &[&str]) -> usize {
        let mut c = sluice_common::local::redis_command(0);
        c.args(["--tls-port", &port.to_string()]).args(args);
        self.spawn_raw(name, &mut c);
        wait_tcp(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
        self.procs.len() - 1
    }

    /// Whether process `i` is still running.
    pub fn is_running(&mut self, i: usize) -> bool {
        matches!(self.procs[i].child.try_wait(), Ok(None))
    }

    /// Kills Redis (SIGKILL) and starts a fresh one on the same port.
    pub fn restart_redis(&mut self) {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == "redis" && !p.stopped)
            .unwrap();
        self.signal(i, "KILL");
        self.wait_exit(i, Duration::from_secs(10));
        let port: u16 = self.redis_url.rsplit(':').next().unwrap().parse().unwrap();
        self.spawn_raw("redis", &mut sluice_common::local::redis_command(port));
        wait_tcp(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    }

    /// The index of the running process named `name` (e.g. "kafka", "redis", "gateway").
    pub fn index_of(&self, name: &str) -> usize {
        self.procs
            .iter()
            .rposition(|p| p.name == name && !p.stopped)
            .unwrap_or_else(|| panic!("no running process named {name}"))
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.procs[i].log).unwrap_or_default()
    }
}

/// A reader of every partition of `topic` from its beginning. Assigned, not subscribed: it reads
/// at once, without waiting for a consumer group to form (on a fresh broker the first group also
/// waits for `__consumer_offsets` to be created), and commits nothing.
pub fn reader(kafka: &str, topic: &str) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    let c: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        partitions
            .add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&partitions).unwrap();
    c
}

/// `<venv>/bin/python` in the checkout (e.g. `.venv-triton`), or `None` (the caller skips) when
/// setup has not made it; under `CI=true` a missing venv fails instead.
pub fn venv_python(venv: &str) -> Option<PathBuf> {
    let python = root().join(venv).join("bin/python");
    if python.is_file() {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{venv} missing under CI=true; run deploy/setup.sh"
    );
    eprintln!("SKIPPED: {venv} missing; run deploy/setup.sh");
    None
}

/// Runs `openssl` with `args`; fails the test with its stderr unless it succeeded; returns
/// stdout.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    stdout_of(Command::new("openssl").args(args))
}

/// Runs `cmd` to its end; fails the test with its stderr unless it succeeded; returns stdout.
pub fn stdout_of(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes `examples/digits.toml` with each (from, to) replacement applied and `extra` appended,
/// model paths made absolute, to `target/test-configs/<name>.toml`; returns its path.
pub fn config_variant(name: &str, replacements: &[(&str, &str)], extra: &str) -> PathBuf {
    example_variant("digits", name, replacements, extra)
}

/// As [`config_variant`], from `examples/<example>.toml`.
pub fn example_variant(
    example: &str,
    name: &str,
    replacements: &[(&str, &str)],
    extra: &str,
) -> PathBuf {
    let mut text =
        std::fs::read_to_string(root().join(format!("examples/{example}.toml"))).unwrap();
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "config variant {name}: '{from}' not found"
        );
        text = text.replace(from, to);
    }
    let examples = root().join("examples");
    text = text.replace("onnx = \"", &format!("onnx = \"{}/", examples.display()));
    text.push_str(extra);
    let dir = root().join("target/test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn tail(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Stack {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        for p in self.procs.iter_mut().rev() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            if failing {
                eprintln!("---- {} log (tail) ----\n{}", p.name, tail(&p.log));
                // SLUICE_TEST_KEEP_LOGS=DIR keeps a failing test's whole logs.
                if let Ok(dir) = std::env::var("SLUICE_TEST_KEEP_LOGS") {
                    let _ = std::fs::create_dir_all(&dir);
                    if let Some(name) = p.log.file_name() {
                        let _ = std::fs::copy(&p.log, Path::new(&dir).join(name));
                    }
                }
            }
        }
    }
}

/// The status of a GET of `url`, or Err when nothing answers.
pub fn blocking_get_status(url: &str) -> Result<u16, ()> {
    // A tiny HTTP/1.0 GET, enough for health checks without a runtime.
    let rest = url.strip_prefix("http://").ok_or(())?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .ok_or(())?;
    let mut s = std::net::TcpStream::connect(host).map_err(|_| ())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|_| ())?;
    use std::io::Write;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|_| ())?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(())
}

/// Async HTTP client for requests under test.
pub type Http = Client<HttpConnector, Full<Bytes>>;

pub fn http() -> Http {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(HttpConnector::new())
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(client: &Http, req: hyper::Request<Full<Bytes>>) -> Reply {
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// As [`post`], but `None` when nothing answers (a process being restarted).
pub async fn try_post(client: &Http, url: &str, body: impl Into<Bytes>) -> Option<Reply> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(Reply {
        status,
        headers,
        body,
    })
}

pub async fn post(
    client: &Http,
    url: &str,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = hyper::Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    send(client, req.body(Full::new(body.into())).unwrap()).await
}

/// POSTs a JSON infer request of `rows` to `model` on the gateway at `base`.
pub async fn infer(client: &Http, base: &str, model: &str, rows: &[&Vec<f32>]) -> Reply {
    post(
        client,
        &format!("{base}/v2/models/{model}/infer"),
        &[],
        infer_body(rows),
    )
    .await
}

pub async fn get(client: &Http, url: &str) -> Reply {
    send(
        client,
        hyper::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

/// The committed samples with onnxruntime's expected outputs (plus heavy's, made at setup).
pub struct Samples {
    pub raw: Vec<Vec<f32>>,
    pub scaled: Vec<Vec<f32>>,
    pub labels: Vec<i64>,
    pub expected: Value,
}

pub fn samples() -> Samples {
    let v: Value =
        serde_json::from_slice(&std::fs::read(root().join("examples/samples.json")).unwrap())
            .unwrap();
    let rows = |k: &str| -> Vec<Vec<f32>> { serde_json::from_value(v[k].clone()).unwrap() };
    let mut expected = v["expected"].clone();
    if let Ok(h) = std::fs::read(root().join("examples/models/heavy.expected.json")) {
        expected["heavy"] = serde_json::from_slice(&h).unwrap();
    }
    Samples {
        raw: rows("raw"),
        scaled: rows("scaled"),
        labels: serde_json::from_value(v["labels"].clone()).unwrap(),
        expected,
    }
}

/// An OIP JSON request for `rows` of 64 features.
pub fn infer_body(rows: &[&Vec<f32>]) -> String {
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    serde_json::json!({"inputs": [{"name": "input", "shape": [rows.len(), 64], "datatype": "FP32", "data": flat}]}).to_string()
}

/// Asserts two float arrays agree within a relative/absolute tolerance.
pub fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 + 1e-4 * w.abs();
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, onnxruntime gave {w}"
        );
    }
}

pub fn flat_f64(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat_f64).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        _ => panic!("not numeric: {v}"),
    }
}

/// Workers that serve the `digits-pipeline` and `digits-ensemble` example graphs.
pub const EXAMPLE_GRAPH_UNITS: [&str; 6] = [
    "scaler",
    "mlp",
    "logreg",
    "forest",
    "digits-pipeline.postprocess",
    "digits-ensemble.vote",
];

/// Sum of the samples of metric `name` whose line contains `label`, from a worker's `/metrics`.
pub async fn metric_sum(client: &Http, addr: &str, name: &str, label: &str) -> f64 {
    let text = get(client, &format!("http://{addr}/metrics")).await.body;
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The learner's last checkpoint, as `sluice learn --status` prints it.
pub fn learner_status(stack: &Stack, model: &str) -> Option<Value> {
    let out = stack
        .sluice(&["learn", "--model", model, "--status"])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Waits until the learner's checkpoint satisfies `done`; returns it.
pub async fn wait_learner_status(
    stack: &Stack,
    model: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = learner_status(stack, model);
        if let Some(s) = s.as_ref().filter(|s| done(s)) {
            return s.clone();
        }
        assert!(std::time::Instant::now() < end, "{what}: last status {s:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// One drill's row of the fault-drill report (`deploy/drills.sh` writes them to
/// `docs/drills.md`): what was sent, answered correctly, wrong, refused (by status; 0 = no
/// answer), lost (accepted, never answered), late and duplicated.
#[derive(Default)]
pub struct DrillReport {
    pub drill: String,
    pub sent: usize,
    pub correct: usize,
    pub wrong: usize,
    pub errors: std::collections::BTreeMap<u16, usize>,
    pub lost: usize,
    /// Answered 504 while a result record exists (its reply was lost with Redis, or came late).
    pub late: usize,
    pub duplicates: usize,
    pub p99_ms: f64,
    /// From the fault to the first answer of a request sent after it, ms (when measured).
    pub recovery_ms: Option<f64>,
    /// The longest any answered request waited, ms (when measured).
    pub longest_ms: Option<f64>,
    pub note: String,
}

impl DrillReport {
    pub fn row(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(s, n)| {
                    let s = if *s == 0 {
                        "no answer".to_string()
                    } else {
                        s.to_string()
                    };
                    format!("{s}: {n}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
            self.drill,
            self.sent,
            self.correct,
            self.wrong,
            errors,
            self.lost,
            self.late,
            self.duplicates,
            if self.p99_ms > 0.0 {
                format!("{:.0}", self.p99_ms)
            } else {
                "n/a".to_string()
            },
            ms(self.recovery_ms),
            ms(self.longest_ms),
            self.note
        )
    }

    /// Prints the row, and appends it to `SLUICE_DRILL_REPORT` when set.
    pub fn publish(&self) {
        let row = self.row();
        println!("{row}");
        if let Ok(path) = std::env::var("SLUICE_DRILL_REPORT") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            writeln!(f, "{row}").unwrap();
        }
    }

    /// The drill's thresholds: something answered, 0 lost, 0 wrong (duplicates included: each
    /// was compared with onnxruntime's answer), duplicates bounded by what was sent (at-least-
    /// once redelivers, it does not multiply), every error one of `allowed`.
    pub fn holds(&self, allowed: &[u16]) {
        let row = self.row();
        assert!(self.correct > 0, "nothing answered: {row}");
        assert!(
            self.duplicates <= self.sent,
            "more duplicates than requests: {row}"
        );
        assert_eq!(self.lost, 0, "lost requests: {row}");
        assert_eq!(self.wrong, 0, "wrong answers: {row}");
        for s in self.errors.keys() {
            assert!(allowed.contains(s), "status {s} not expected here: {row}");
        }
    }
}
