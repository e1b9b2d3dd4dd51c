//! Reading a whole topic back, and the per-key order rules a consumer relies on: shared by
//! the fault suite's checker (`tests/faults/check.rs`) and the integrity oracle
//! (`tests/integrity/oracle.rs`).
//!
//! **Order.** A key's events are ordered by `(commit_lsn, lsn)`, with one refinement: a
//! snapshot read at consistent point `C` holds what committed *before* `C`, so a change whose
//! transaction commits at exactly `C` is newer than the read although its own `lsn` is
//! smaller (the same rule as `pgcdc verify`). Per key the position never goes backwards,
//! except for an exact replay: the same event (position, op and content, the encoding time
//! aside) published again after a restart.

use std::collections::HashMap;
use std::time::Duration;

use pgcdc::kafka::{read_topic, ConsumedRecord, KafkaConfig, ReadStop};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

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
    .unwrap_or_else(|e| panic!("cannot read {topic}: {e}"));
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
/// ([`pgcdc::event::order::Version`]: a snapshot read below a change of its `commit_lsn`).
pub type Position = pgcdc::event::order::Version;

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
