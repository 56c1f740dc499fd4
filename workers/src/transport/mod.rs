//! Where records come from and where they go: the consumer loop and its group (partitions,
//! offsets committed only after delivery), the Kafka sink (results, forwards, dead letters),
//! Redis replies, and purging consumed records.

pub(crate) mod consumer;
pub(crate) mod group;
pub(crate) mod offsets;
pub(crate) mod purge;
pub(crate) mod reply;
pub(crate) mod sink;
