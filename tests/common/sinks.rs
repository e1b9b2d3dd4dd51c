//! Driving a sink in-process (`sink::run` over its channel), for the sink tests and for a
//! test that writes to a topic directly.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::api::{sink, Lsn, Record, Sink, SinkError, SinkItem, SinkSender, SinkSummary};

/// A running sink task.
pub type Running = tokio::task::JoinHandle<Result<SinkSummary, SinkError>>;

/// One record of `topic` (default partition).
pub fn record(topic: &str, key: Option<&str>, value: Option<&str>) -> SinkItem {
    SinkItem::Record(Record {
        topic: topic.into(),
        key: key.map(|k| Bytes::from(k.to_string())),
        value: value.map(|v| Bytes::from(v.to_string())),
        partition: None,
        headers: Vec::new(),
    })
}

/// Runs `sink` behind a channel of `capacity` items: the sender, the acknowledged position
/// and the task.
pub fn start(sink: Sink, capacity: usize) -> (SinkSender, watch::Receiver<Lsn>, Running) {
    let (tx, rx) = sink::channel(capacity, sink::channel::CHANNEL_BYTES);
    let (acked_tx, acked_rx) = watch::channel(Lsn(0));
    let handle = tokio::spawn(sink::run(sink, rx, acked_tx));
    (tx, acked_rx, handle)
}

/// Waits (at most `timeout`) for the sink task to end: its summary, or its error.
pub async fn finished(handle: Running, timeout: Duration) -> Result<SinkSummary, SinkError> {
    tokio::time::timeout(timeout, handle)
        .await
        .expect("the sink ended in time")
        .expect("join")
}

/// Waits (at most `within`) until the sink acknowledged `lsn`.
pub async fn wait_acked(acked: &mut watch::Receiver<Lsn>, lsn: Lsn, within: Duration) {
    tokio::time::timeout(within, acked.wait_for(|l| *l >= lsn))
        .await
        .unwrap_or_else(|_| panic!("checkpoint {lsn} not reported within {within:?}"))
        .expect("sink alive");
}
