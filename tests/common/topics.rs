//! Reading topics back (whole, until a count, or until quiet; decoded as [`Event`]s), and
//! the per-key order rules a consumer relies on, shared by the fault suite's checker
//! (`tests/faults/check.rs`) and the integrity oracle (`tests/integrity/oracle.rs`).
//!
//! **Order.** A key's events are ordered by `(commit_lsn, lsn)`, with one refinement: a
//! snapshot read at consistent point `C` holds what committed *before* `C`, so a change whose
//! transaction commits at exactly `C` is newer than the read although its own `lsn` is
//! smaller (the same rule as `pgcdc verify`). Per key the position never goes backwards,
//! except for an exact replay: the same event (position, op and content, the encoding time
//! aside) published again after a restart.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use super::api::{read_topic, ConsumedRecord, KafkaConfig, ReadStop, TopicReader, Version};

/// A record read back from a topic, JSON-decoded.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: Option<Value>,
    pub value: Option<Value>,
    /// Kafka headers: name and value (`None`: a null value).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Event {
    /// Decodes a record (its key and value must be JSON).
    pub fn of(r: ConsumedRecord) -> Event {
        Event {
            key: r
                .key
                .map(|k| serde_json::from_slice(&k).expect("key is JSON")),
            value: r
                .value
                .map(|v| serde_json::from_slice(&v).expect("value is JSON")),
            headers: r.headers,
        }
    }
    /// The value of header `name` as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn op(&self) -> Option<&str> {
        self.value.as_ref().and_then(|v| v["op"].as_str())
    }
    pub fn lsn_pair(&self) -> (u64, u64) {
        let s = &self.value.as_ref().expect("not a tombstone")["source"];
        (
            s["commit_lsn"].as_u64().expect("commit_lsn"),
            s["lsn"].as_u64().expect("lsn"),
        )
    }
    /// Where the event ranks among its key's events (pgcdc's one ordering rule).
    pub fn version(&self) -> Version {
        let (commit_lsn, lsn) = self.lsn_pair();
        Version::of_event(self.op().unwrap_or_default(), commit_lsn, lsn)
    }
    /// A snapshot marker (`op` `s`): the end of a table's snapshot, no row.
    pub fn is_marker(&self) -> bool {
        self.op() == Some("s")
    }
    /// `snapshot.rows` of a marker.
    pub fn marker_rows(&self) -> Option<u64> {
        self.value.as_ref()?["snapshot"]["rows"].as_u64()
    }
}

/// The value of header `name` among `headers` as text, if present (panics if not UTF-8).
pub fn header<'a>(headers: &'a [(String, Option<Vec<u8>>)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
        .map(|v| std::str::from_utf8(v).expect("header value is UTF-8"))
}

/// Whether a raw record is a snapshot marker (no key; `op` or, flat, `__op` `s`).
pub fn is_marker_record(r: &ConsumedRecord) -> bool {
    r.key.is_none()
        && r.value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<Value>(v).ok())
            .is_some_and(|v| v["op"] == "s" || v["__op"] == "s")
}

/// The events without the snapshot markers.
pub fn without_markers(events: Vec<Event>) -> Vec<Event> {
    events.into_iter().filter(|e| !e.is_marker()).collect()
}

/// `read_topic` on a blocking thread; panics if the topic cannot be read.
pub async fn read(kafka: &str, topic: &str, stop: ReadStop) -> Vec<ConsumedRecord> {
    let cfg = KafkaConfig::new(kafka);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_topic(&cfg, &topic, stop))
        .await
        .expect("reader thread")
        .unwrap_or_else(|e| panic!("the topic is not readable: {e}"))
}

/// The records of `topic`: until `expected` arrived (at most 60 s), or without an
/// expectation, until nothing new arrives for 3 s. Under load the first fetch can take
/// longer than that, so an empty read is tried again before it counts.
pub async fn records(kafka: &str, topic: &str, expected: Option<usize>) -> Vec<ConsumedRecord> {
    let quiet = match expected {
        Some(_) => Duration::from_secs(60),
        None => Duration::from_secs(3),
    };
    let mut records = Vec::new();
    for _ in 0..3 {
        let stop = ReadStop::Quiet {
            expected,
            quiet,
            max_wait: Duration::from_secs(60),
        };
        records = read(kafka, topic, stop).await;
        if !records.is_empty() || expected.is_some() {
            break;
        }
    }
    records
}

/// How many records `topic` holds, snapshot markers counted or not, read until 2 s pass
/// with nothing new (0 when the topic does not exist).
pub async fn count(kafka: &str, topic: &str, markers: bool) -> usize {
    let cfg = KafkaConfig::new(kafka);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let stop = ReadStop::Quiet {
            expected: None,
            quiet: Duration::from_secs(2),
            max_wait: Duration::from_secs(30),
        };
        match TopicReader::open_if_exists(&cfg, &topic, stop).expect("the topic is readable") {
            None => 0,
            Some(r) => r
                .filter(|r| markers || !r.as_ref().is_ok_and(is_marker_record))
                .count(),
        }
    })
    .await
    .expect("reader thread")
}

/// Records per topic named `<prefix>.…` on `kafka` (every topic a run with that
/// `--topic-prefix` writes, its progress topic included), read until 2 s pass with nothing new.
pub async fn published(kafka: &str, prefix: &str) -> BTreeMap<String, usize> {
    let kafka = kafka.to_string();
    let prefix = format!("{prefix}.");
    let topics: Vec<String> = tokio::task::spawn_blocking({
        let kafka = kafka.clone();
        move || {
            let lister: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &kafka)
                .create()
                .expect("a metadata client");
            let metadata = lister
                .fetch_metadata(None, Duration::from_secs(20))
                .expect("the broker lists its topics");
            metadata
                .topics()
                .iter()
                .map(|t| t.name().to_string())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        }
    })
    .await
    .expect("metadata thread");
    let mut out = BTreeMap::new();
    for topic in topics {
        let n = count(&kafka, &topic, true).await;
        out.insert(topic, n);
    }
    out
}

/// Records the broker announces for `topic` (sum of high minus low watermarks); `None` if
/// the topic does not exist.
pub fn watermark_total(kafka: &str, topic: &str) -> Option<usize> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", "pgcdc-test-reader")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("a consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .expect("topic metadata");
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    let mut total = 0;
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(30))
            .expect("watermarks");
        total += (high - low).max(0) as usize;
    }
    Some(total)
}

/// Reads a topic from the beginning: until the records the broker's watermarks announce
/// have arrived (the durable test broker reports them correctly), or nothing new arrived
/// for a while. Panics if the topic does not exist.
pub fn read_all(kafka: &str, topic: &str) -> Vec<ConsumedRecord> {
    read_all_if_exists(kafka, topic).unwrap_or_else(|| panic!("topic {topic} does not exist"))
}

/// [`read_all`], or `None` when the topic does not exist.
pub fn read_all_if_exists(kafka: &str, topic: &str) -> Option<Vec<ConsumedRecord>> {
    let expected = watermark_total(kafka, topic)?;
    if expected == 0 {
        return Some(Vec::new());
    }
    let records = read_topic(
        &KafkaConfig::new(kafka),
        topic,
        ReadStop::Quiet {
            expected: Some(expected),
            // Only matters when the broker delivers less than it announced.
            quiet: Duration::from_secs(30),
            max_wait: Duration::from_secs(180),
        },
    )
    .unwrap_or_else(|e| panic!("cannot read {topic}: {e:?}"));
    assert!(
        records.len() >= expected,
        "{topic}: read {} records, the broker holds {expected}",
        records.len()
    );
    Some(records)
}

/// An event's place in its key's history: `(commit_lsn, is a change, lsn)`; see the module
/// docs.
/// Where an event ranks among its key's events: pgcdc's one ordering rule
/// ([`Version`]: a snapshot read below a change of its `commit_lsn`).
pub type Position = Version;

/// The position of an envelope event (`None` without `source.commit_lsn`/`lsn`).
pub fn position(value: &Value) -> Option<Position> {
    let s = &value["source"];
    let commit_lsn = s["commit_lsn"].as_u64()?;
    let lsn = s["lsn"].as_u64()?;
    Some(Position::of_event(
        value["op"].as_str().unwrap_or_default(),
        commit_lsn,
        lsn,
    ))
}

/// An event without the time it was encoded, which differs between re-publications.
pub fn content(value: &Value) -> Value {
    let mut v = value.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("ts_ms");
    }
    v
}

/// What [`KeyOrder::observe`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A new event, at or after every earlier one of its key.
    New,
    /// An exact copy of an earlier event.
    Replay,
    /// The same position and op as an earlier event, with other content.
    ConflictingReplay { earlier: Value },
    /// Older than an event already seen, and not a replay.
    Backwards { high: Position },
}

/// One key's history while replaying its topic.
#[derive(Debug, Default)]
pub struct KeyOrder {
    /// The highest position seen.
    pub high: Position,
    /// Content of every event seen, by position and op.
    seen: HashMap<(Position, String), Value>,
}

impl KeyOrder {
    /// Classifies the next event of this key (`content` as [`content`] gives it) and
    /// remembers it.
    pub fn observe(&mut self, pos: Position, op: &str, content: Value) -> Seen {
        if let Some(earlier) = self.seen.get(&(pos, op.to_string())) {
            return if *earlier == content {
                Seen::Replay
            } else {
                Seen::ConflictingReplay {
                    earlier: earlier.clone(),
                }
            };
        }
        let verdict = if pos < self.high {
            Seen::Backwards { high: self.high }
        } else {
            Seen::New
        };
        self.seen.insert((pos, op.to_string()), content);
        self.high = self.high.max(pos);
        verdict
    }
}
