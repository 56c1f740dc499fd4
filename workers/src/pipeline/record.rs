//! A consumed record as plain data (borrowed from the Kafka message), so what a worker makes of a
//! record can be decided, and tested, without a broker.

use rdkafka::message::{BorrowedMessage, Headers, Message};

/// One record: where it is, its key, payload and headers.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Payload (empty for a null payload).
    pub payload: &'a [u8],
    /// Headers, in order.
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl<'a> Record<'a> {
    /// The headers of `m`, to build a record with (kept by the caller for the record's lifetime).
    pub fn headers_of(m: &'a BorrowedMessage<'_>) -> Vec<(&'a str, &'a [u8])> {
        m.headers()
            .map(|h| h.iter().filter_map(|h| Some((h.key, h.value?))).collect())
            .unwrap_or_default()
    }

    /// `m` as a record, with `headers` from [`Record::headers_of`].
    pub fn of(m: &'a BorrowedMessage<'_>, headers: &'a [(&'a str, &'a [u8])]) -> Record<'a> {
        Record {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload().unwrap_or_default(),
            headers,
        }
    }

    /// The first header called `key` (case-insensitive), when it is UTF-8.
    pub fn header(&self, key: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The key, when it is UTF-8.
    pub fn key_str(&self) -> Option<&'a str> {
        self.key.and_then(|k| std::str::from_utf8(k).ok())
    }
}
