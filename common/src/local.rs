//! How to run the local stack's services (Apache Kafka, redis-server); shared by `sluice up` and the
//! integration tests so both start them the same way.

use std::path::PathBuf;
use std::process::Command;

/// The Apache Kafka version `deploy/kafka/pom.xml` pins; `deploy/setup.sh` copies its jars to
/// `~/.cache/sluice/kafka-<version>/libs`.
pub const KAFKA_VERSION: &str = "4.4.0";

/// The folder holding Kafka's jars: `SLUICE_KAFKA_LIBS`, else the one `deploy/setup.sh` fills;
/// `None` when it holds no Kafka server jar.
pub fn kafka_libs() -> Option<PathBuf> {
    let dir = match std::env::var_os("SLUICE_KAFKA_LIBS") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            cache.join(format!("sluice/kafka-{KAFKA_VERSION}/libs"))
        }
    };
    let has_server = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("kafka_2.13-"));
    has_server.then_some(dir)
}

/// `java`: `$JAVA_HOME/bin/java` when `JAVA_HOME` is set, else the one on PATH.
pub fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin/java"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// A single-node Apache Kafka in KRaft mode (broker and controller in one JVM) for one machine:
/// one replica for internal topics, no initial rebalance delay, small segments and a retention
/// that bound its disk. Its folder holds `server.properties`, the log4j configuration and the
/// log (`data/`), which survives restarts and a kill -9.
#[derive(Debug, Clone)]
pub struct KafkaNode {
    /// Kafka's jars ([`kafka_libs`]).
    pub libs: PathBuf,
    /// The node's folder.
    pub dir: PathBuf,
    /// Where clients connect (`host:port`).
    pub listen: String,
    /// What the broker tells clients to connect to (a proxy in front of it, say).
    pub advertised: String,
    /// The controller's own listener (`host:port`), used only inside the JVM.
    pub controller: String,
    /// The JVM's maximum heap (`-Xmx`), e.g. `512m`.
    pub heap: String,
}

/// Why a Kafka node could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum KafkaNodeError {
    /// Its folder or files could not be written.
    #[error("kafka folder {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// `kafka.tools.StorageTool format` failed.
    #[error("formatting the kafka log folder failed: {0}")]
    Format(String),
}

impl KafkaNode {
    /// The log folder.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Writes the node's settings and formats its log folder unless it was formatted before.
    pub fn prepare(&self) -> Result<(), KafkaNodeError> {
        let io = |e| KafkaNodeError::Io(self.dir.clone(), e);
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        std::fs::write(self.dir.join("server.properties"), self.properties()).map_err(io)?;
        std::fs::write(self.dir.join("log4j2.yaml"), LOG4J2).map_err(io)?;
        if self.data_dir().join("meta.properties").is_file() {
            return Ok(());
        }
        let out = self
            .java(&["-XX:TieredStopAtLevel=1", "-Xmx256m"])
            .args([
                "kafka.tools.StorageTool",
                "format",
                "-t",
                &cluster_id(),
                "-c",
            ])
            .arg(self.dir.join("server.properties"))
            .output()
            .map_err(io)?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(KafkaNodeError::Format(said));
        }
        Ok(())
    }

    /// The command that runs the node (after [`KafkaNode::prepare`]).
    pub fn command(&self) -> Command {
        let heap = format!("-Xmx{}", self.heap);
        let mut c = self.java(&[
            "-Xms64m",
            &heap,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
        ]);
        c.arg("kafka.Kafka").arg(self.dir.join("server.properties"));
        c
    }

    /// `java` with `jvm` options, the log4j configuration and Kafka's jars on the class path.
    fn java(&self, jvm: &[&str]) -> Command {
        let mut c = Command::new(java());
        c.args(jvm)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.yaml").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()));
        c
    }

    /// `server.properties` for this node.
    fn properties(&self) -> String {
        format!(
            "# Written by Sluice for a single-node local broker; rewritten at every start.\n\
             process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@{controller}\n\
             listeners=PLAINTEXT://{listen},CONTROLLER://{controller}\n\
             advertised.listeners=PLAINTEXT://{advertised}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={data}\n\
             {SINGLE_NODE}",
            controller = self.controller,
            listen = self.listen,
            advertised = self.advertised,
            data = self.data_dir().display(),
        )
    }
}

/// Settings for one broker on one machine: internal topics with one replica, a consumer group
/// formed at once, threads for two cores, and a disk bound (8 MiB segments with 1 MiB index
/// files; a partition keeps at most 64 MiB and one hour, checked every 30 s, and a segment past
/// either is removed from disk after 1 s instead of Kafka's minute).
const SINGLE_NODE: &str = "\
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
metadata.max.idle.interval.ms=5000
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=8388608
log.index.size.max.bytes=1048576
log.retention.bytes=67108864
log.retention.ms=3600000
log.retention.check.interval.ms=30000
log.segment.delete.delay.ms=1000
";

/// The broker's log: warnings and errors, plus the line saying it started, to stderr.
const LOG4J2: &str = "\
Configuration:
  Appenders:
    Console:
      name: STDERR
      target: SYSTEM_ERR
      PatternLayout:
        pattern: \"[%d] %p %m (%c)%n\"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDERR
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
";

/// A new KRaft cluster id: 16 bytes (from the clock and the process id) in unpadded base64url,
/// as `kafka-storage random-uuid` prints them.
fn cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let bits = nanos ^ (u128::from(std::process::id()) << 96) ^ 0x5ed1_ce00_u128;
    // 128 bits as 22 six-bit digits; the last digit holds the 2 lowest bits.
    (0..22)
        .map(|i| {
            let shift = 128i32 - 6 * (i + 1);
            let digit = if shift >= 0 {
                (bits >> shift) & 63
            } else {
                (bits << -shift) & 63
            };
            char::from(ALPHABET[digit as usize])
        })
        .collect()
}

/// A throwaway redis-server on 127.0.0.1:`port` that keeps nothing on disk.
pub fn redis_command(port: u16) -> Command {
    let mut c = Command::new("redis-server");
    c.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_is_22_base64url_digits() {
        let id = cluster_id();
        assert_eq!(id.len(), 22);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn the_pinned_version_is_the_one_setup_fetches() {
        let pom = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/kafka/pom.xml"
        ))
        .expect("deploy/kafka/pom.xml");
        assert!(pom.contains(&format!("<kafka.version>{KAFKA_VERSION}</kafka.version>")));
    }

    #[test]
    fn properties_name_every_address() {
        let node = KafkaNode {
            libs: PathBuf::from("/libs"),
            dir: PathBuf::from("/stack/kafka"),
            listen: "127.0.0.1:1".into(),
            advertised: "127.0.0.1:2".into(),
            controller: "127.0.0.1:3".into(),
            heap: "256m".into(),
        };
        let p = node.properties();
        assert!(p.contains("listeners=PLAINTEXT://127.0.0.1:1,CONTROLLER://127.0.0.1:3\n"));
        assert!(p.contains("advertised.listeners=PLAINTEXT://127.0.0.1:2\n"));
        assert!(p.contains("controller.quorum.voters=1@127.0.0.1:3\n"));
        assert!(p.contains("log.dirs=/stack/kafka/data\n"));
    }
}
