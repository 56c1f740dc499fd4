//! A bounded set of background tasks: spawning waits for a free place, so work finished outside
//! the batcher (rejected records, join decisions, broker probes) cannot pile up without limit.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// At most `limit` tasks at once.
pub(crate) struct BoundedTasks {
    tasks: JoinSet<()>,
    places: Arc<Semaphore>,
}

impl BoundedTasks {
    /// A set that runs at most `limit` tasks at once.
    pub(crate) fn new(limit: usize) -> BoundedTasks {
        BoundedTasks {
            tasks: JoinSet::new(),
            places: Arc::new(Semaphore::new(limit.max(1))),
        }
    }

    /// Spawns `task` once a place is free (waiting for one: backpressure on the caller).
    pub(crate) async fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        let Ok(place) = Arc::clone(&self.places).acquire_owned().await else {
            return;
        };
        self.tasks.spawn(async move {
            task.await;
            drop(place);
        });
        while self.tasks.try_join_next().is_some() {}
    }

    /// Waits for every task to finish.
    pub(crate) async fn join_all(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn never_more_than_the_limit_at_once() {
        let mut set = BoundedTasks::new(2);
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        for _ in 0..8 {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            set.spawn(async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
            })
            .await;
        }
        set.join_all().await;
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}
