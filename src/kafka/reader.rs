//! Reading a topic back: tests, the `verify` command, and pgcdc's durable progress.
//!
//! The reader assigns every partition explicitly, from the beginning, and commits nothing:
//! no consumer group is joined (a group join costs seconds on some brokers and leaves state
//! behind). librdkafka insists on a `group.id` for a consumer, so a unique, never-used one
//! is set.
//!
//! Where to stop is the caller's choice ([`ReadStop`]): at the high watermarks captured when
//! the reader opened (what was in the topic at that moment — the right answer on Kafka), or
//! when the expected number of records arrived or nothing new arrived for a while (for
//! brokers whose reported watermarks cannot be trusted, such as tansu's memory storage).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{client_config, config_error, join_error, KafkaConfig, PgcdcContext, Role, SinkError};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one poll may block.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// [`ReadStop::HighWatermark`] fails when no record and no end of partition arrives for
/// this long.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// When a [`TopicReader`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStop {
    /// At the high watermark each partition had when the reader opened. Records written
    /// later are not returned.
    HighWatermark,
    /// When `expected` records arrived, or nothing new arrived for `quiet`, or `max_wait`
    /// passed since opening — whichever comes first.
    Quiet {
        expected: Option<usize>,
        quiet: Duration,
        max_wait: Duration,
    },
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// Milliseconds since the epoch, if the broker returned a timestamp.
    pub timestamp: Option<i64>,
    /// Kafka headers, in order: name and value (`None`: a null value).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Reads one topic from the beginning, in order per partition. Blocking: call it from a
/// blocking context (`tokio::task::spawn_blocking`) in async code.
pub struct TopicReader {
    consumer: BaseConsumer<PgcdcContext>,
    topic: String,
    stop: ReadStop,
    partitions: Vec<i32>,
    /// [`ReadStop::HighWatermark`]: partition → offset to read up to (exclusive), for the
    /// partitions not finished yet.
    targets: HashMap<i32, i64>,
    opened: Instant,
    last_progress: Instant,
    returned: usize,
    done: bool,
}

impl TopicReader {
    /// Opens `topic` for reading. Fails if the topic does not exist.
    pub fn open(cfg: &KafkaConfig, topic: &str, stop: ReadStop) -> Result<Self, SinkError> {
        Self::open_if_exists(cfg, topic, stop)?.ok_or_else(|| SinkError::Read {
            topic: topic.to_string(),
            source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
        })
    }

    /// Opens `topic` for reading, or `None` if it does not exist.
    pub fn open_if_exists(
        cfg: &KafkaConfig,
        topic: &str,
        stop: ReadStop,
    ) -> Result<Option<Self>, SinkError> {
        let read_err = |source| SinkError::Read {
            topic: topic.to_string(),
            source,
        };
        let consumer = reader(cfg)?;

        let metadata = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(read_err)?;
        let Some(md) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match md.error().map(RDKafkaErrorCode::from) {
            None => {}
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(None),
            Some(code) => return Err(read_err(KafkaError::MetadataFetch(code))),
        }
        let mut partitions: Vec<i32> = md.partitions().iter().map(|p| p.id()).collect();
        partitions.sort_unstable();
        if partitions.is_empty() {
            return Ok(None);
        }

        let mut targets = HashMap::new();
        if stop == ReadStop::HighWatermark {
            for &p in &partitions {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p, METADATA_TIMEOUT)
                    .map_err(read_err)?;
                if high > low {
                    targets.insert(p, high);
                }
            }
        }

        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(read_err)?;
        }
        consumer.assign(&tpl).map_err(read_err)?;

        let now = Instant::now();
        let done = stop == ReadStop::HighWatermark && targets.is_empty();
        Ok(Some(TopicReader {
            consumer,
            topic: topic.to_string(),
            stop,
            partitions,
            targets,
            opened: now,
            last_progress: now,
            returned: 0,
            done,
        }))
    }

    /// The topic's partitions.
    pub fn partitions(&self) -> &[i32] {
        &self.partitions
    }

    /// The next record, or `None` once the stop condition is met.
    pub fn next_record(&mut self) -> Result<Option<ConsumedRecord>, SinkError> {
        loop {
            if self.done || self.stop_reached() {
                self.done = true;
                return Ok(None);
            }
            if let Some(secs) = self.stalled() {
                return Err(SinkError::ReadStalled {
                    topic: self.topic.clone(),
                    secs,
                });
            }
            let polled = match self.consumer.poll(POLL_INTERVAL) {
                None => continue,
                Some(Ok(msg)) => {
                    let partition = msg.partition();
                    let offset = msg.offset();
                    Ok(ConsumedRecord {
                        partition,
                        offset,
                        key: msg.key().map(<[u8]>::to_vec),
                        value: msg.payload().map(<[u8]>::to_vec),
                        timestamp: msg.timestamp().to_millis(),
                        headers: headers_of(&msg),
                    })
                }
                Some(Err(e)) => Err(e),
            };
            match polled {
                Ok(record) => {
                    self.last_progress = Instant::now();
                    if let ReadStop::HighWatermark = self.stop {
                        let Some(&target) = self.targets.get(&record.partition) else {
                            // This partition is finished; the record was written later.
                            continue;
                        };
                        if record.offset >= target {
                            self.targets.remove(&record.partition);
                            continue;
                        }
                        if record.offset + 1 >= target {
                            self.targets.remove(&record.partition);
                        }
                    }
                    self.returned += 1;
                    return Ok(Some(record));
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    self.last_progress = Instant::now();
                    // The end of what the partition holds now, which is at or past the
                    // watermark captured at open (or the last stable offset, beyond which
                    // nothing is readable yet).
                    if self.stop == ReadStop::HighWatermark {
                        self.targets.remove(&p);
                    }
                }
                Err(e) => match e.rdkafka_error_code() {
                    Some(
                        code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::UnknownTopicOrPartition
                        | RDKafkaErrorCode::UnknownTopic
                        | RDKafkaErrorCode::Fatal),
                    ) => {
                        return Err(SinkError::Read {
                            topic: self.topic.clone(),
                            source: KafkaError::MessageConsumption(code),
                        })
                    }
                    // Connection trouble and the like: librdkafka retries; the stall limit
                    // bounds how long we wait for it.
                    _ => tracing::debug!("reading `{}`: {e}", self.topic),
                },
            }
        }
    }

    fn stop_reached(&self) -> bool {
        match self.stop {
            ReadStop::HighWatermark => self.targets.is_empty(),
            ReadStop::Quiet {
                expected,
                quiet,
                max_wait,
            } => {
                expected.is_some_and(|n| self.returned >= n)
                    || self.last_progress.elapsed() >= quiet
                    || self.opened.elapsed() >= max_wait
            }
        }
    }

    fn stalled(&self) -> Option<u64> {
        let waited = self.last_progress.elapsed();
        (self.stop == ReadStop::HighWatermark && waited >= STALL_LIMIT).then_some(waited.as_secs())
    }
}

impl Iterator for TopicReader {
    type Item = Result<ConsumedRecord, SinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Reads `topic` from the beginning until `stop`. Blocking (see [`TopicReader`]).
pub fn read_topic(
    cfg: &KafkaConfig,
    topic: &str,
    stop: ReadStop,
) -> Result<Vec<ConsumedRecord>, SinkError> {
    TopicReader::open(cfg, topic, stop)?.collect()
}

/// A consumer with the reader's settings (no group, no commits).
/// The headers of `msg`, copied.
fn headers_of(msg: &BorrowedMessage<'_>) -> Vec<(String, Option<Vec<u8>>)> {
    msg.headers().map_or_else(Vec::new, |hs| {
        hs.iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect()
    })
}

fn reader(cfg: &KafkaConfig) -> Result<BaseConsumer<PgcdcContext>, SinkError> {
    client_config(cfg, Role::Reader)
        .create_with_context(PgcdcContext::new(Role::Reader))
        .map_err(config_error)
}

/// The record at `offset` of `partition`, or `None` if there is none (any more). Blocking.
/// Used by `verify` to show the topic's side of a difference it found by hash.
pub fn read_one(
    cfg: &KafkaConfig,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<ConsumedRecord>, SinkError> {
    let read_err = |source| SinkError::Read {
        topic: topic.to_string(),
        source,
    };
    let consumer = reader(cfg)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(read_err)?;
    consumer.assign(&tpl).map_err(read_err)?;
    let deadline = Instant::now() + METADATA_TIMEOUT;
    while Instant::now() < deadline {
        match consumer.poll(POLL_INTERVAL) {
            None => continue,
            Some(Ok(msg)) if msg.partition() == partition && msg.offset() == offset => {
                return Ok(Some(ConsumedRecord {
                    partition,
                    offset,
                    key: msg.key().map(<[u8]>::to_vec),
                    value: msg.payload().map(<[u8]>::to_vec),
                    timestamp: msg.timestamp().to_millis(),
                    headers: headers_of(&msg),
                }))
            }
            Some(Ok(_)) => return Ok(None),
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
            Some(Err(e)) => tracing::debug!("reading `{topic}` at {partition}/{offset}: {e}"),
        }
    }
    Ok(None)
}

/// The latest value of `key` in `topic` (typically compacted), reading to the high
/// watermarks. `Ok(None)` if the topic does not exist, the key never appears, or its latest
/// record is a tombstone.
///
/// "Latest" is the highest offset: within a partition, offsets are the order in which the
/// broker appended the records, while timestamps are only what the producers said
/// (`CreateTime`), and a producer's clock can go backwards. pgcdc's progress topic has one
/// partition, and a key always lands on the same partition while the count is unchanged. A
/// key found in several partitions (partitions added later) has no order between them: that
/// is [`SinkError::KeyInSeveralPartitions`] rather than a guess.
pub async fn read_last_value(
    cfg: &KafkaConfig,
    topic: &str,
    key: &[u8],
) -> Result<Option<Vec<u8>>, SinkError> {
    let cfg = cfg.clone();
    let topic = topic.to_string();
    let key = key.to_vec();
    tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, SinkError> {
        let Some(reader) = TopicReader::open_if_exists(&cfg, &topic, ReadStop::HighWatermark)?
        else {
            return Ok(None);
        };
        last_by_offset(reader, &topic, &key)
    })
    .await
    .map_err(join_error)?
}

/// The value of the record of `key` with the highest offset among `records` (see
/// [`read_last_value`]).
fn last_by_offset(
    records: impl IntoIterator<Item = Result<ConsumedRecord, SinkError>>,
    topic: &str,
    key: &[u8],
) -> Result<Option<Vec<u8>>, SinkError> {
    // Partition → (offset, value) of the key's latest record there.
    let mut latest: HashMap<i32, (i64, Option<Vec<u8>>)> = HashMap::new();
    for record in records {
        let record = record?;
        if record.key.as_deref() != Some(key) {
            continue;
        }
        let newer = match latest.get(&record.partition) {
            Some((offset, _)) => record.offset > *offset,
            None => true,
        };
        if newer {
            latest.insert(record.partition, (record.offset, record.value));
        }
    }
    if latest.len() > 1 {
        let mut partitions: Vec<i32> = latest.into_keys().collect();
        partitions.sort_unstable();
        return Err(SinkError::KeyInSeveralPartitions {
            topic: topic.to_string(),
            key: String::from_utf8_lossy(key).into_owned(),
            partitions,
        });
    }
    Ok(latest.into_values().next().and_then(|(_, value)| value))
}

/// Reads the high watermarks of topics' partitions, on one consumer kept for repeated use
/// (the indexer's read-your-writes wait asks at each wait). Blocking.
pub struct Watermarks {
    consumer: BaseConsumer<PgcdcContext>,
}

impl Watermarks {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, SinkError> {
        Ok(Watermarks {
            consumer: reader(cfg)?,
        })
    }

    /// `(topic, partition)` → the offset after the partition's last record, for every
    /// partition of `topics` (a topic that does not exist yet has none).
    pub fn high(&self, topics: &[String]) -> Result<HashMap<(String, i32), i64>, SinkError> {
        let mut out = HashMap::new();
        for topic in topics {
            let read_err = |source| SinkError::Read {
                topic: topic.clone(),
                source,
            };
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), METADATA_TIMEOUT)
                .map_err(read_err)?;
            let Some(md) = metadata.topics().iter().find(|t| t.name() == topic) else {
                continue;
            };
            match md.error().map(RDKafkaErrorCode::from) {
                None => {}
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) => continue,
                Some(code) => return Err(read_err(KafkaError::MetadataFetch(code))),
            }
            for p in md.partitions() {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(topic, p.id(), METADATA_TIMEOUT)
                    .map_err(read_err)?;
                out.insert((topic.clone(), p.id()), high);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        partition: i32,
        offset: i64,
        key: &str,
        value: Option<&str>,
        ts: i64,
    ) -> ConsumedRecord {
        ConsumedRecord {
            partition,
            offset,
            key: Some(key.as_bytes().to_vec()),
            value: value.map(|v| v.as_bytes().to_vec()),
            timestamp: Some(ts),
            headers: Vec::new(),
        }
    }

    #[test]
    fn the_highest_offset_wins_whatever_the_timestamps() {
        let records = vec![
            record(0, 0, "k", Some("first"), 2_000),
            record(0, 1, "other", Some("x"), 9_000),
            record(0, 2, "k", Some("second"), 1_000),
        ];
        let last = last_by_offset(records.into_iter().map(Ok), "t", b"k").expect("one partition");
        assert_eq!(last.as_deref(), Some(&b"second"[..]));
        let tombstoned = vec![record(0, 0, "k", Some("v"), 5), record(0, 1, "k", None, 1)];
        let last = last_by_offset(tombstoned.into_iter().map(Ok), "t", b"k").expect("read");
        assert_eq!(last, None);
    }

    #[test]
    fn a_key_in_several_partitions_is_an_error_naming_them() {
        let records = vec![
            record(0, 7, "k", Some("a"), 1),
            record(2, 3, "k", Some("b"), 2),
        ];
        let err = last_by_offset(records.into_iter().map(Ok), "t", b"k").expect_err("ambiguous");
        match &err {
            SinkError::KeyInSeveralPartitions { partitions, .. } => {
                assert_eq!(partitions, &[0, 2]);
            }
            other => panic!("{other:?}"),
        }
        use crate::model::failure::{Recoverable, Recovery};
        assert_eq!(err.recovery(), Recovery::Stop);
    }
}
