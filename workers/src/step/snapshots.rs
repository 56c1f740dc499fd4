//! Following a learner's published state (`<prefix>.<name>.weights`, newest last): a served
//! learner's weights or a bandit's arms. The newest record replaces what the step serves; a
//! step reads the slot once per batch, so a swap lands between batches, never inside one.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sluice_common::Config;

/// What a step serves, shared with its follower.
pub(super) type Slot<T> = Arc<RwLock<Arc<T>>>;

/// A published state a step can serve.
pub(super) trait Snapshot: Sized + Send + Sync + 'static {
    /// What turning a record into a served state needs besides the record.
    type Context: Send + 'static;
    /// The state in a record, `None` for a record of another servable, or why it is not one.
    fn parse(payload: &[u8], name: &str, context: &Self::Context) -> Result<Option<Self>, String>;
    /// Its version (updates learned).
    fn version(&self) -> u64;
}

/// What the step serves now.
pub(super) fn current<T>(slot: &Slot<T>) -> Arc<T> {
    Arc::clone(&slot.read().unwrap_or_else(|e| e.into_inner()))
}

/// Keeps `slot` at the newest snapshot on `topic` until the step holding it is dropped.
pub(super) async fn follow<T: Snapshot>(
    slot: Weak<RwLock<Arc<T>>>,
    cfg: Config,
    topic: String,
    name: String,
    context: T::Context,
) {
    let client = format!("sluice-snapshots-{name}-{}", std::process::id());
    let consumer: StreamConsumer = match sluice_common::kafka::reader_config(&cfg, &client).create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, %name, "cannot follow the learner's snapshots");
            return;
        }
    };
    let consumer = Arc::new(consumer);
    // Start at the newest snapshot (the topic's last record).
    let start = loop {
        if slot.strong_count() == 0 {
            return;
        }
        match sluice_common::kafka::watermarks(&consumer, &topic).await {
            Ok((low, high)) => break (high - 1).max(low),
            Err(e) => tracing::warn!(error = %e, %topic, "snapshot topic not readable yet"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let served = metrics::gauge!("sluice_served_weights_version", "model" => name.clone());
    let mut tpl = TopicPartitionList::new();
    if let Err(e) = tpl
        .add_partition_offset(&topic, 0, Offset::Offset(start))
        .and_then(|()| consumer.assign(&tpl))
    {
        tracing::error!(error = %e, %topic, "cannot follow the learner's snapshots");
        return;
    }
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await;
        let Some(slot) = slot.upgrade() else {
            return;
        };
        let msg = match msg {
            Err(_) => continue,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, %topic, "reading snapshots");
                continue;
            }
            Ok(Ok(m)) => m,
        };
        let Some(payload) = msg.payload() else {
            continue;
        };
        match T::parse(payload, &name, &context) {
            Ok(Some(state)) => {
                let version = state.version();
                *slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
                served.set(version as f64);
                tracing::debug!(%name, version, "snapshot swapped in");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, %topic, "a record that is not a snapshot"),
        }
    }
}
