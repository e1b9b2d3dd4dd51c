//! What flows from the pipeline to a sink: records for topics, and the checkpoints and
//! barriers between them (see [`crate::sink`] for what a sink promises about them).

use std::ffi::CStr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::model::Lsn;

/// One message for a topic. `value: None` is a tombstone.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    /// JSON bytes of the key object, or `None` for tables without a key.
    pub key: Option<Bytes>,
    /// JSON bytes of the event, or `None` for a tombstone.
    pub value: Option<Bytes>,
    /// The partition to write to; `None`: the partitioner's choice by key (every event but
    /// the snapshot markers, which go to each partition of their topic). The stdout sink has
    /// no partitions and ignores it.
    pub partition: Option<i32>,
    /// Kafka headers, in order (the event id, annotations, an outbox row's extra columns).
    /// The stdout sink writes values only and ignores them.
    pub headers: Vec<Header>,
}

/// One Kafka header of a [`Record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// NUL-terminated, as librdkafka takes it; shared, since the same few names recur on
    /// every record.
    pub name: Arc<CStr>,
    pub value: Bytes,
}

impl Record {
    /// Bytes of payload this record carries (key plus value), as the sink's summary counts
    /// them.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len)
    }
}

/// What flows from the pipeline to a sink, in order.
#[derive(Debug)]
pub enum SinkItem {
    Record(Record),
    /// Several records in a row, handed over at once: one channel operation for the lot
    /// (the snapshot sends its rows this way). The same as each of them sent as a `Record`.
    Records(Vec<Record>),
    /// Report `Lsn` on the `acked` watch once every earlier record is acknowledged.
    /// Also the end of a transaction: the stdout sink flushes here.
    Checkpoint(Lsn),
    /// Resolved once every earlier record is acknowledged (used to wait for the snapshot).
    Barrier(oneshot::Sender<()>),
}
