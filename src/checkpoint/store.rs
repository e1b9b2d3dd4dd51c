//! The one progress store: where the progress record of a database's slot is kept (the Kafka
//! progress topic when the sink is Kafka, else the stdout sink's file), for `run`, which
//! writes it, and for `status`, `verify` and `drop`, which read or remove it.

use std::path::PathBuf;

use tokio::sync::oneshot;

use super::{decode, encode, FileStore, Progress};
use crate::kafka::{self, KafkaConfig};
use crate::model::failure::{sink_gone, Classify, Failure, FailureKind::Sink as SinkFail};
use crate::model::{Record, SinkItem, SinkSender};

/// Where the progress record is kept.
pub enum ProgressStore {
    Kafka {
        cfg: KafkaConfig,
        topic: String,
        key: String,
    },
    File(FileStore),
}

impl ProgressStore {
    /// The store of `database`/`slot`: key [`Progress::key`] of topic `<topic_prefix>._progress`
    /// when the sink is Kafka (`kafka` given), else `file` or the default file.
    pub fn new(
        kafka: Option<KafkaConfig>,
        topic_prefix: &str,
        database: &str,
        slot: &str,
        file: Option<PathBuf>,
    ) -> Self {
        match kafka {
            Some(cfg) => ProgressStore::Kafka {
                cfg,
                topic: Self::topic(topic_prefix),
                key: Progress::key(database, slot),
            },
            None => ProgressStore::File(FileStore {
                path: file.unwrap_or_else(|| FileStore::default_path(database, slot)),
            }),
        }
    }

    /// The progress topic of `topic_prefix`.
    pub fn topic(topic_prefix: &str) -> String {
        format!("{topic_prefix}._progress")
    }

    /// Where, for messages.
    pub fn describe(&self) -> String {
        match self {
            ProgressStore::Kafka { topic, key, .. } => {
                format!("key `{key}` of Kafka topic `{topic}`")
            }
            ProgressStore::File(f) => format!("file {}", f.path.display()),
        }
    }

    pub async fn load(&self) -> Result<Option<Progress>, Failure> {
        match self {
            ProgressStore::Kafka { cfg, topic, key } => {
                let bytes = kafka::read_last_value(cfg, topic, key.as_bytes())
                    .await
                    .or_fail(SinkFail)?;
                bytes
                    .map(|b| decode(&format!("{key} in topic {topic}"), &b))
                    .transpose()
                    .or_fail(SinkFail)
            }
            ProgressStore::File(f) => f.load().or_fail(SinkFail),
        }
    }

    /// Durably stores `p` after everything queued before it is acknowledged: for Kafka, the
    /// record goes through the sink's channel, behind the events it describes.
    pub async fn save(&self, p: &Progress, tx: &SinkSender) -> Result<(), Failure> {
        if let ProgressStore::Kafka { topic, key, .. } = self {
            let record = Record {
                topic: topic.as_str().into(),
                key: Some(key.clone().into_bytes().into()),
                value: Some(encode(p).into()),
                partition: None,
                headers: Vec::new(),
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
pub async fn barrier(tx: &SinkSender) -> Result<(), Failure> {
    let (done_tx, done_rx) = oneshot::channel();
    tx.send(SinkItem::Barrier(done_tx))
        .await
        .map_err(|_| sink_gone())?;
    done_rx.await.map_err(|_| sink_gone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::channel::CHANNEL_BYTES;
    use crate::model::FailureKind;

    #[tokio::test]
    async fn a_barrier_returns_once_the_sink_passed_it_and_fails_when_the_sink_is_gone() {
        let (tx, mut rx) = crate::model::channel(4, CHANNEL_BYTES);
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
        assert_eq!(err.kind, FailureKind::Sink);
    }
}
