//! Sinks: where encoded events go (Kafka, stdout), and how their acknowledgements flow back.
//!
//! The pipeline hands the sink an ordered stream of [`SinkItem`]s through a bounded channel.
//! Records are published in that order; a [`SinkItem::Checkpoint`] is reported on the `acked`
//! watch only once **every record sent before it** has been acknowledged (Kafka: delivery
//! report with `acks=all`; stdout: written and flushed). The replication side confirms to
//! PostgreSQL nothing beyond the last reported checkpoint — that is the whole no-loss
//! argument, so a sink must never report a checkpoint early, and must never drop a record:
//! when it cannot keep up it stops reading the channel, which stops reading WAL.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::source::Lsn;

pub mod kafka;
pub mod stdout;

/// One message for a topic. `value: None` is a tombstone.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    /// JSON bytes of the key object, or `None` for tables without a key.
    pub key: Option<Bytes>,
    /// JSON bytes of the event, or `None` for a tombstone.
    pub value: Option<Bytes>,
}

/// What flows from the pipeline to a sink, in order.
#[derive(Debug)]
pub enum SinkItem {
    Record(Record),
    /// Report `Lsn` on the `acked` watch once every earlier record is acknowledged.
    /// Also the end of a transaction: the stdout sink flushes here.
    Checkpoint(Lsn),
    /// Resolved once every earlier record is acknowledged (used to wait for the snapshot).
    Barrier(oneshot::Sender<()>),
}
