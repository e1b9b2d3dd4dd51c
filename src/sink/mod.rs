//! Sinks: where encoded events go (Kafka, stdout), and how their acknowledgements flow back.
//!
//! The pipeline hands the sink an ordered stream of [`SinkItem`]s through a channel bounded in
//! items and in bytes ([`crate::model::channel`]).
//! Records are published in that order; a [`SinkItem::Checkpoint`] is reported on the `acked`
//! watch only once **every record sent before it** has been acknowledged (Kafka: delivery
//! report with `acks=all`; stdout: written and flushed). The replication side confirms to
//! PostgreSQL nothing beyond the last reported checkpoint — that is the whole no-loss
//! argument, so a sink must never report a checkpoint early, and must never drop a record:
//! when it cannot keep up it stops reading the channel, which stops reading WAL.
//!
//! [`run`] drives either sink until the channel is closed **and** everything already handed
//! over has been acknowledged (the drain on shutdown), then returns a [`SinkSummary`]. An
//! error ends the run at once: whatever was not acknowledged is simply not confirmed, and the
//! next start replays it from PostgreSQL (at-least-once, never at-most-once).

use tokio::sync::watch;

use crate::model::Lsn;

pub mod kafka;
pub mod stdout;

// The sink's input, defined in the model (the source fills the channel, the sink drains it).
pub use crate::kafka::SinkError;
pub use crate::model::{channel, Budget, Charge, SinkReceiver, SinkSender};
pub use crate::model::{Header, Record, SinkItem};
pub use kafka::KafkaSink;
pub use stdout::StdoutSink;

/// The destination of a run.
pub enum Sink {
    Kafka(KafkaSink),
    Stdout(StdoutSink),
}

/// What a finished run acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkSummary {
    /// Records acknowledged (delivered to Kafka, or written and flushed to the output).
    pub records: u64,
    /// Key plus value bytes of those records.
    pub bytes: u64,
    /// Of those records, how many were tombstones (`value: None`).
    pub tombstones: u64,
    /// Records left out because they were larger than Kafka accepts (`--oversized skip`).
    pub oversized_skipped: u64,
}

impl SinkSummary {
    pub(crate) fn add(&mut self, payload_bytes: usize, tombstone: bool) {
        self.records += 1;
        self.bytes += payload_bytes as u64;
        self.tombstones += u64::from(tombstone);
    }
}

/// Runs `sink` until `rx` is closed and everything handed over has been acknowledged, reporting
/// each [`SinkItem::Checkpoint`] on `acked` once every record before it is acknowledged.
///
/// Backpressure: the sink stops reading `rx` while it is at its in-flight limit (Kafka) or while
/// its output blocks (stdout); it never buffers without bound and never drops a record. It
/// drops each item's [`Charge`] once the item's records are handed on (to librdkafka, or
/// written), which frees their bytes for the pipeline.
pub async fn run(
    sink: Sink,
    rx: SinkReceiver,
    acked: watch::Sender<Lsn>,
) -> Result<SinkSummary, SinkError> {
    match sink {
        Sink::Kafka(k) => k.run(rx, acked).await,
        Sink::Stdout(s) => s.run(rx, acked).await,
    }
}

/// Publishes `lsn` on the watch unless an equal or later position is already there: progress
/// only moves forward, even if a caller repeats a checkpoint.
pub(crate) fn report(acked: &watch::Sender<Lsn>, lsn: Lsn) {
    acked.send_if_modified(|cur| {
        if lsn > *cur {
            *cur = lsn;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_only_moves_forward() {
        let (tx, rx) = watch::channel(Lsn(0));
        report(&tx, Lsn(10));
        report(&tx, Lsn(5));
        assert_eq!(*rx.borrow(), Lsn(10));
        report(&tx, Lsn(11));
        assert_eq!(*rx.borrow(), Lsn(11));
    }
}
