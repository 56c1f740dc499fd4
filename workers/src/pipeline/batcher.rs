//! Dynamic batching: when the model is idle, what is queued runs at once; while batches run,
//! what arrives waits for a free slot and at most `max_delay` for more to fill its batch (the
//! window applies only while the model is busy: a lone request never waits for company that is
//! not coming).
//!
//! [`BatchQueue`] is the pure decision logic; [`run_batcher`] is the task that feeds it from a
//! channel and hands batches to free inference slots.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

/// A queued item with its row count and arrival time.
#[derive(Debug)]
struct Queued<T> {
    item: T,
    rows: usize,
    arrived: Instant,
}

/// What the batcher should do next.
#[derive(Debug, PartialEq)]
pub enum Next<T> {
    /// Run this batch now.
    Batch(Vec<T>),
    /// Nothing is due before this instant (unless more items arrive).
    WaitUntil(Instant),
    /// Nothing is queued.
    Empty,
}

/// The batching decision, free of I/O and clocks.
#[derive(Debug)]
pub struct BatchQueue<T> {
    items: VecDeque<Queued<T>>,
    queued_rows: usize,
    max_rows: usize,
    max_delay: Duration,
}

impl<T> BatchQueue<T> {
    /// A queue that forms batches of at most `max_rows` rows.
    pub fn new(max_rows: usize, max_delay: Duration) -> Self {
        BatchQueue {
            items: VecDeque::new(),
            queued_rows: 0,
            max_rows: max_rows.max(1),
            max_delay,
        }
    }

    /// Queues an item of `rows` rows that arrived at `now`.
    pub fn push(&mut self, item: T, rows: usize, now: Instant) {
        self.queued_rows += rows;
        self.items.push_back(Queued {
            item,
            rows,
            arrived: now,
        });
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Decides, with a slot free at `now` and the model `idle` (no batch running) or not: an
    /// idle model, a full batch or the oldest item's delay expired gives a batch; otherwise wait
    /// for the oldest item's delay.
    pub fn next_batch(&mut self, now: Instant, idle: bool) -> Next<T> {
        let Some(oldest) = self.items.front() else {
            return Next::Empty;
        };
        let due = oldest.arrived + self.max_delay;
        if !idle && self.queued_rows < self.max_rows && now < due {
            return Next::WaitUntil(due);
        }
        let mut batch = Vec::new();
        let mut rows = 0;
        while let Some(front) = self.items.front() {
            if !batch.is_empty() && rows + front.rows > self.max_rows {
                break;
            }
            rows += front.rows;
            self.queued_rows -= front.rows;
            if let Some(q) = self.items.pop_front() {
                batch.push(q.item);
            }
        }
        Next::Batch(batch)
    }
}

/// An item entering the batcher, with its row count.
pub struct Item<T> {
    /// The payload.
    pub item: T,
    /// Rows (batch dimension) it contributes.
    pub rows: usize,
}

/// A batch handed to an inference slot; drop the permit when the slot is free again.
pub struct Dispatched<T> {
    /// The batch.
    pub items: Vec<T>,
    /// Held while the batch runs.
    pub permit: SlotPermit,
}

/// An inference slot held while a batch runs; dropping it frees the slot and tells the batcher,
/// which may be waiting to run its queue the moment the model is idle.
pub struct SlotPermit {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        // The slot is back before the batcher looks.
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

/// Queues `i` with the time it arrived (kept beside it too, to record how long it waited).
fn push_now<T>(queue: &mut BatchQueue<(T, Instant)>, i: Item<T>) {
    let now = Instant::now();
    queue.push((i.item, now), i.rows, now);
}

/// Forms batches from `input` whenever one of `slots` is free, and sends them to `output`;
/// records each item's time from arrival to dispatch in `waited`. Returns when `input` is
/// closed and everything queued has been dispatched.
pub async fn run_batcher<T: Send>(
    mut input: mpsc::Receiver<Item<T>>,
    output: mpsc::Sender<Dispatched<T>>,
    slots: Arc<Semaphore>,
    max_rows: usize,
    max_delay: Duration,
    waited: metrics::Histogram,
) {
    // Items are queued with their arrival, to record how long each waited.
    let mut queue: BatchQueue<(T, Instant)> = BatchQueue::new(max_rows, max_delay);
    let mut open = true;
    // Every slot free but the one this batcher holds: no batch runs.
    let all_slots = slots.available_permits();
    let freed = Arc::new(Notify::new());
    let depth = metrics::histogram!("sluice_worker_queue_depth_at_dispatch");
    loop {
        if queue.is_empty() {
            if !open {
                return;
            }
            match input.recv().await {
                Some(i) => push_now(&mut queue, i),
                None => return,
            }
        }
        // Wait for a free model slot, still accepting arrivals.
        let permit = loop {
            tokio::select! {
                biased;
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => return,
                },
                i = input.recv(), if open => match i {
                    Some(i) => push_now(&mut queue, i),
                    None => open = false,
                },
            }
        };
        // A slot is free: take what is queued at once if the model is idle, else waiting at most
        // max_delay for the batch to fill (or until the model turns idle).
        let permit = SlotPermit {
            permit: Some(permit),
            freed: Arc::clone(&freed),
        };
        loop {
            while let Ok(i) = input.try_recv() {
                push_now(&mut queue, i);
            }
            let now = Instant::now();
            let idle = slots.available_permits() + 1 >= all_slots;
            match queue.next_batch(if open { now } else { now + max_delay }, idle) {
                Next::Batch(timed) => {
                    depth.record(queue.len() as f64);
                    let items = timed
                        .into_iter()
                        .map(|(item, arrived)| {
                            waited.record(now.duration_since(arrived).as_secs_f64());
                            item
                        })
                        .collect();
                    if output.send(Dispatched { items, permit }).await.is_err() {
                        return;
                    }
                    break;
                }
                Next::WaitUntil(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = freed.notified() => {}
                        i = input.recv(), if open => match i {
                            Some(i) => push_now(&mut queue, i),
                            None => open = false,
                        },
                    }
                }
                Next::Empty => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn empty_queue_has_nothing() {
        let mut q: BatchQueue<u32> = BatchQueue::new(4, MS);
        assert_eq!(q.next_batch(Instant::now(), true), Next::Empty);
    }

    #[test]
    fn a_busy_model_waits_for_delay_then_takes_what_is_queued() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(4, 2 * MS);
        q.push(1, 1, t0);
        q.push(2, 1, t0 + MS);
        assert_eq!(
            q.next_batch(t0, false),
            Next::WaitUntil(t0 + 2 * MS),
            "deadline of the oldest"
        );
        assert_eq!(q.next_batch(t0 + 2 * MS, false), Next::Batch(vec![1, 2]));
        assert!(q.is_empty());
    }

    #[test]
    fn an_idle_model_takes_what_is_queued_at_once() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(4, Duration::from_secs(1));
        q.push(1, 1, t0);
        q.push(2, 1, t0);
        assert_eq!(q.next_batch(t0, true), Next::Batch(vec![1, 2]));
    }

    #[test]
    fn full_batch_goes_at_once_and_respects_max_rows() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(3, Duration::from_secs(1));
        for i in 0..5 {
            q.push(i, 1, t0);
        }
        assert_eq!(q.next_batch(t0, false), Next::Batch(vec![0, 1, 2]));
        assert_eq!(
            q.next_batch(t0, false),
            Next::WaitUntil(t0 + Duration::from_secs(1))
        );
    }

    #[test]
    fn multi_row_items_are_not_split_and_an_oversized_one_goes_alone() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(4, Duration::ZERO);
        q.push("a", 3, t0);
        q.push("b", 2, t0);
        q.push("c", 5, t0);
        assert_eq!(q.next_batch(t0, true), Next::Batch(vec!["a"]));
        assert_eq!(q.next_batch(t0, true), Next::Batch(vec!["b"]));
        assert_eq!(q.next_batch(t0, true), Next::Batch(vec!["c"]));
    }

    #[test]
    fn zero_delay_dispatches_immediately() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(8, Duration::ZERO);
        q.push(7, 1, t0);
        assert_eq!(q.next_batch(t0, false), Next::Batch(vec![7]));
    }

    fn channels(
        slots: usize,
        max_rows: usize,
        delay: Duration,
    ) -> (
        mpsc::Sender<Item<u32>>,
        mpsc::Receiver<Dispatched<u32>>,
        Arc<Semaphore>,
    ) {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(64);
        let sem = Arc::new(Semaphore::new(slots));
        tokio::spawn(run_batcher(
            in_rx,
            out_tx,
            Arc::clone(&sem),
            max_rows,
            delay,
            metrics::histogram!("test_batch_wait_seconds"),
        ));
        (in_tx, out_rx, sem)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_request_runs_at_once_on_an_idle_model() {
        let (tx, mut rx, _) = channels(1, 8, Duration::from_secs(10));
        let t0 = Instant::now();
        tx.send(Item { item: 1, rows: 1 }).await.ok();
        assert_eq!(rx.recv().await.map(|d| d.items), Some(vec![1]));
        assert_eq!(Instant::now(), t0, "no window on an idle model");
    }

    #[tokio::test(start_paused = true)]
    async fn while_a_batch_runs_a_free_slot_never_waits_longer_than_max_delay() {
        let (tx, mut rx, _) = channels(2, 8, 5 * MS);
        tx.send(Item { item: 0, rows: 1 }).await.ok();
        let running = rx.recv().await;
        let t0 = Instant::now();
        tx.send(Item { item: 1, rows: 1 }).await.ok();
        tokio::time::sleep(2 * MS).await;
        tx.send(Item { item: 2, rows: 1 }).await.ok();
        let d = rx.recv().await.map(|d| d.items);
        assert_eq!(d, Some(vec![1, 2]));
        assert_eq!(
            Instant::now() - t0,
            5 * MS,
            "dispatched exactly at the oldest item's deadline"
        );
        drop(running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_batch_runs_the_moment_the_model_turns_idle() {
        let (tx, mut rx, _) = channels(2, 8, Duration::from_secs(10));
        tx.send(Item { item: 0, rows: 1 }).await.ok();
        let running = rx.recv().await;
        tx.send(Item { item: 1, rows: 1 }).await.ok();
        tokio::time::sleep(3 * MS).await;
        let t1 = Instant::now();
        drop(running);
        assert_eq!(rx.recv().await.map(|d| d.items), Some(vec![1]));
        assert_eq!(Instant::now(), t1, "not the 10 s window");
    }

    #[tokio::test(start_paused = true)]
    async fn batcher_sends_a_full_batch_without_waiting() {
        let (tx, mut rx, _) = channels(1, 2, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..2 {
            tx.send(Item { item: i, rows: 1 }).await.ok();
        }
        assert_eq!(rx.recv().await.map(|d| d.items), Some(vec![0, 1]));
        assert_eq!(Instant::now(), t0);
    }

    #[tokio::test(start_paused = true)]
    async fn batcher_accumulates_while_the_model_is_busy() {
        let (tx, mut rx, _) = channels(1, 16, Duration::ZERO);
        tx.send(Item { item: 0, rows: 1 }).await.ok();
        let first = rx.recv().await;
        assert_eq!(first.as_ref().map(|d| d.items.clone()), Some(vec![0]));
        // The only slot is held by the first batch: later arrivals queue up.
        for i in 1..6 {
            tx.send(Item { item: i, rows: 1 }).await.ok();
        }
        tokio::time::sleep(10 * MS).await;
        assert!(rx.try_recv().is_err(), "no slot free, no batch");
        drop(first); // the model is free again
        assert_eq!(rx.recv().await.map(|d| d.items), Some(vec![1, 2, 3, 4, 5]));
    }

    #[tokio::test(start_paused = true)]
    async fn batcher_flushes_everything_when_input_closes() {
        let (tx, mut rx, _) = channels(2, 2, Duration::from_secs(60));
        for i in 0..3 {
            tx.send(Item { item: i, rows: 1 }).await.ok();
        }
        drop(tx);
        let mut got = Vec::new();
        while let Some(d) = rx.recv().await {
            got.extend(d.items);
        }
        assert_eq!(got, vec![0, 1, 2]);
    }
}
