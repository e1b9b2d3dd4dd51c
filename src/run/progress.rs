//! Where the snapshot state is kept, and waiting for the sink to acknowledge everything.

use tokio::sync::oneshot;

use super::failure::{sink_gone, Classify, Failure, FailureKind::Sink as SinkFail};
use crate::checkpoint::{self, FileStore, Progress};
use crate::sink::{kafka, Record, SinkItem, SinkSender};

/// Where the snapshot state is kept.
pub(super) enum ProgressStore {
    Kafka {
        cfg: kafka::KafkaConfig,
        topic: String,
        key: String,
    },
    File(FileStore),
}

impl ProgressStore {
    pub(super) async fn load(&self) -> Result<Option<Progress>, Failure> {
        match self {
            ProgressStore::Kafka { cfg, topic, key } => {
                let bytes = kafka::read_last_value(cfg, topic, key.as_bytes())
                    .await
                    .or_fail(SinkFail)?;
                bytes
                    .map(|b| checkpoint::decode(&format!("{key} in topic {topic}"), &b))
                    .transpose()
                    .or_fail(SinkFail)
            }
            ProgressStore::File(f) => f.load().or_fail(SinkFail),
        }
    }

    /// Durably stores `p` after everything queued before it is acknowledged.
    pub(super) async fn save(&self, p: &Progress, tx: &SinkSender) -> Result<(), Failure> {
        if let ProgressStore::Kafka { topic, key, .. } = self {
            let record = Record {
                topic: topic.as_str().into(),
                key: Some(key.clone().into_bytes().into()),
                value: Some(checkpoint::encode(p).into()),
                partition: None,
            };
            tx.send(SinkItem::Record(record))
                .await
                .map_err(|_| sink_gone())?;
        }
        barrier(tx).await?;
        if let ProgressStore::File(f) = self {
            f.save(p).or_fail(SinkFail)?;
        }
        Ok(())
    }
}

/// Waits until everything sent so far is acknowledged.
pub(super) async fn barrier(tx: &SinkSender) -> Result<(), Failure> {
    let (done_tx, done_rx) = oneshot::channel();
    tx.send(SinkItem::Barrier(done_tx))
        .await
        .map_err(|_| sink_gone())?;
    done_rx.await.map_err(|_| sink_gone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::channel::CHANNEL_BYTES;

    #[tokio::test]
    async fn a_barrier_returns_once_the_sink_passed_it_and_fails_when_the_sink_is_gone() {
        let (tx, mut rx) = crate::sink::channel(4, CHANNEL_BYTES);
        let sink = tokio::spawn(async move {
            match rx.recv().await {
                Some((SinkItem::Barrier(done), _charge)) => {
                    let _ = done.send(());
                }
                _ => panic!("expected a barrier"),
            }
            // Then the sink ends: the next barrier is never answered.
            drop(rx);
        });
        barrier(&tx).await.expect("answered");
        sink.await.unwrap();
        let err = barrier(&tx).await.unwrap_err();
        assert_eq!(err.kind, super::super::failure::FailureKind::Sink);
    }
}
