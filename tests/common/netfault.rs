//! A TCP proxy between Sluice's processes and the broker that injects network faults: added
//! latency, packet loss (as the retransmission delay it causes), cut connections and a
//! partition. This kernel has no `netem` qdisc, so the faults are made here, in user space, on
//! the only path the processes have to the broker.
//!
//! Each direction of a connection delivers every chunk it reads at `read time + delay`, plus
//! one retransmission timeout (`RTO`) for a chunk that is "lost", never before the chunk ahead
//! of it (TCP's in-order delivery: a loss holds up what follows it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Linux's minimum retransmission timeout: what one lost segment costs the stream behind it.
const RTO: Duration = Duration::from_millis(200);

/// The faults in force; shared by every connection of one proxy.
#[derive(Default)]
struct Faults {
    delay_us: AtomicU64,
    loss_per_mille: AtomicU64,
    /// While set, nothing is forwarded (a partition); what was read is held and flows on heal.
    partitioned: AtomicBool,
    /// A seed for the loss draws.
    seed: AtomicU64,
    /// What the faults did, so a drill can show they took effect.
    counts: Counters,
}

/// Running counts of what the proxy did.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    cut: AtomicU64,
    delayed: AtomicU64,
    lost: AtomicU64,
    held: AtomicU64,
}

/// What the proxy did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultCounts {
    /// Connections accepted (each reconnection after a cut counts again).
    pub connections: u64,
    /// Open connections reset by [`NetFault::cut_all`].
    pub cut: u64,
    /// Chunks delivered late because of the added delay.
    pub delayed: u64,
    /// Chunks "lost" (delivered one retransmission timeout late).
    pub lost: u64,
    /// Chunks held back by a partition.
    pub held: u64,
}

/// A running fault-injecting proxy; dropping it leaves it running until the test ends.
#[derive(Clone)]
pub struct NetFault {
    faults: Arc<Faults>,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
    /// The address clients connect to.
    pub addr: String,
}

impl NetFault {
    /// Starts a proxy on a free port forwarding to `upstream` (on its own thread and runtime, so
    /// it serves whatever the test's runtime is doing).
    pub fn start(upstream: &str) -> NetFault {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap().to_string();
        let faults = Arc::new(Faults::default());
        faults.seed.store(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let (cut, cut_rx) = watch::channel(0u64);
        let upstream: SocketAddr = upstream.parse().unwrap();
        let shared = faults.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let faults = shared.clone();
                    faults.counts.connections.fetch_add(1, Ordering::Relaxed);
                    let cut_rx = cut_rx.clone();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            serve(client, server, faults, cut_rx).await;
                        }
                    });
                }
            });
        });
        NetFault { faults, cut, addr }
    }

    /// Every chunk, each way, arrives `delay` later.
    pub fn set_delay(&self, delay: Duration) {
        self.faults
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Each chunk is lost (and arrives one retransmission timeout late) with this probability.
    pub fn set_loss(&self, fraction: f64) {
        self.faults
            .loss_per_mille
            .store((fraction * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Resets every open connection (clients reconnect through the proxy).
    pub fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Holds (true) or lets flow (false) all traffic, both ways, on every connection.
    pub fn partition(&self, on: bool) {
        self.faults.partitioned.store(on, Ordering::Relaxed);
    }

    /// What the faults did so far.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.faults.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            connections: get(&c.connections),
            cut: get(&c.cut),
            delayed: get(&c.delayed),
            lost: get(&c.lost),
            held: get(&c.held),
        }
    }

    /// Back to a clean network.
    pub fn heal(&self) {
        self.set_delay(Duration::ZERO);
        self.set_loss(0.0);
        self.partition(false);
    }
}

/// Forwards both ways until either side closes or the connection is cut.
async fn serve(
    client: TcpStream,
    server: TcpStream,
    faults: Arc<Faults>,
    mut cut: watch::Receiver<u64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    cut.mark_unchanged();
    tokio::select! {
        _ = pipe(cr, sw, faults.clone()) => {}
        _ = pipe(sr, cw, faults.clone()) => {}
        _ = cut.changed() => {
            faults.counts.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One direction: reads chunks and delivers each at its due time, in order. Dropping it (a
/// cut) drops both halves and whatever was still in flight.
async fn pipe<R, W>(mut from: R, mut to: W, faults: Arc<Faults>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async {
        let mut last_due = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let delay_us = faults.delay_us.load(Ordering::Relaxed);
            let mut due = Instant::now() + Duration::from_micros(delay_us);
            if delay_us > 0 {
                faults.counts.delayed.fetch_add(1, Ordering::Relaxed);
            }
            if lost(&faults) {
                faults.counts.lost.fetch_add(1, Ordering::Relaxed);
                due += RTO;
            }
            last_due = last_due.max(due);
            if tx.send((last_due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
        drop(tx);
    };
    let write = async {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if faults.partitioned.load(Ordering::Relaxed) {
                faults.counts.held.fetch_add(1, Ordering::Relaxed);
            }
            while faults.partitioned.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}

/// One loss draw (xorshift over a shared seed).
fn lost(faults: &Faults) -> bool {
    let per_mille = faults.loss_per_mille.load(Ordering::Relaxed);
    if per_mille == 0 {
        return false;
    }
    let mut x = faults.seed.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    faults.seed.store(x, Ordering::Relaxed);
    x % 1000 < per_mille
}
