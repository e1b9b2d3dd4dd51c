//! Reading pgcdc's topics: every partition assigned by hand, from the beginning, on a thread
//! of its own, into a bounded channel.
//!
//! No consumer group and no committed offsets: every start re-reads the topics, and the
//! versions make that a no-op for what is already indexed (see [`super::plan`]). That keeps
//! the indexer stateless — its only state is in the search engine — at the cost of a full
//! re-read on restart, which is fine for a demo-sized index. (A group join also takes tens of
//! seconds on some brokers.) Topics that do not exist yet are waited for: pgcdc creates them
//! when it starts.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::kafka::SinkError;
use crate::kafka::{client_config, config_error, KafkaConfig, PgcdcContext, Role};
use crate::model::failure::{Recoverable, Recovery};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the broker may hold a fetch when there is nothing new: bounds the delay between a
/// record being written and the indexer seeing it, on brokers that do not answer early.
const FETCH_WAIT_MS: &str = "50";

/// One record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
}

/// Starts the reader thread. It ends when `tx`'s receiver is dropped (`Ok`) or on a fatal
/// Kafka error.
pub fn spawn(
    cfg: KafkaConfig,
    topics: Vec<String>,
    tx: mpsc::Sender<SourceRecord>,
) -> std::thread::JoinHandle<Result<(), SinkError>> {
    std::thread::spawn(move || read(&cfg, &topics, &tx))
}

fn read(
    cfg: &KafkaConfig,
    topics: &[String],
    tx: &mpsc::Sender<SourceRecord>,
) -> Result<(), SinkError> {
    let mut config = client_config(cfg, Role::Reader);
    if !cfg.properties.iter().any(|(k, _)| k == "fetch.wait.max.ms") {
        config.set("fetch.wait.max.ms", FETCH_WAIT_MS);
    }
    let consumer: BaseConsumer<PgcdcContext> = config
        .create_with_context(PgcdcContext::new(Role::Reader))
        .map_err(config_error)?;

    // Wait for every topic, then assign all their partitions from the beginning.
    let mut tpl = TopicPartitionList::new();
    let mut waiting_logged = HashSet::new();
    for topic in topics {
        let partitions = loop {
            if tx.is_closed() {
                return Ok(());
            }
            let err = |source| SinkError::Read {
                topic: topic.clone(),
                source,
            };
            let md = match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                Ok(md) => md,
                // The broker is not up yet: librdkafka retries; so do we.
                Err(e) if e.recovery() == Recovery::Reconnect => {
                    tracing::debug!("metadata of `{topic}`: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(err(e)),
            };
            let found = md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>());
            match found {
                Some(p) => break p,
                None => {
                    if waiting_logged.insert(topic.clone()) {
                        tracing::info!(
                            "waiting for topic `{topic}` (pgcdc creates it when it starts)"
                        );
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        for p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|source| SinkError::Read {
                    topic: topic.clone(),
                    source,
                })?;
        }
    }
    consumer.assign(&tpl).map_err(|source| SinkError::Read {
        topic: topics.join(","),
        source,
    })?;
    tracing::info!("reading {} from the beginning", topics.join(", "));

    loop {
        if tx.is_closed() {
            return Ok(());
        }
        let msg = match consumer.poll(POLL_INTERVAL) {
            None => continue,
            Some(Ok(msg)) => msg,
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(e)) => match e.rdkafka_error_code() {
                Some(
                    code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::Fatal),
                ) => {
                    return Err(SinkError::Read {
                        topic: topics.join(","),
                        source: KafkaError::MessageConsumption(code),
                    })
                }
                _ => {
                    tracing::debug!("reading: {e}");
                    continue;
                }
            },
        };
        let record = SourceRecord {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            value: msg.payload().map(<[u8]>::to_vec),
        };
        if tx.blocking_send(record).is_err() {
            return Ok(());
        }
    }
}
