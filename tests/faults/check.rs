//! The checker: reads every topic from the beginning and every table at the end, and proves
//!
//! 1. **no loss** — replaying each topic like a consumer that drops what it has seen gives
//!    exactly the table (deleted rows end in a delete or tombstone), and every change of every
//!    committed transaction is in the topics, with the transaction's xid and marker;
//! 2. **order** — per key, the version (`(commit_lsn, lsn)`, a snapshot read below a change
//!    with its `commit_lsn`: pgcdc's one rule, `pgcdc::event::order`) never goes backwards,
//!    except for an exact replay of an event already seen (`common::topics`, shared with the
//!    integrity oracle); and in each partition a snapshot's marker comes after every read of
//!    that snapshot;
//! 3. **bounded duplicates** — a duplicate is an exact copy of an earlier event (same key,
//!    position and content), and none was written before the first fault;
//!
//! and nothing is invented: every change event belongs to a committed transaction.
//! [`wal_retention`] checks the fourth property: the slot's retained WAL returns to near zero.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

pub use crate::common::topics::read_all;
use crate::common::topics::{self, KeyOrder, Seen};
use crate::workload::{Expect, Txn};

/// A table to check: its name in `public` and its key columns.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    pub key: &'static [&'static str],
}

/// The workload's tables.
pub const WORKLOAD_TABLES: &[Table] = &[
    Table {
        name: "accounts",
        key: &["id"],
    },
    Table {
        name: "orders",
        key: &["id"],
    },
    Table {
        name: "docs",
        key: &["id"],
    },
    Table {
        name: "ledger",
        key: &["account", "seq"],
    },
];

/// What the checker counted.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Records read (events and tombstones).
    pub records: usize,
    /// Change and read events (not tombstones).
    pub events: usize,
    /// Exact re-publications of an event already in the topic.
    pub duplicates: usize,
    /// Read events of a snapshot taken again (after a crash during a snapshot).
    pub snapshot_rereads: usize,
    /// Snapshot markers (one per partition per completed table snapshot).
    pub markers: usize,
    /// Committed transactions whose changes were all found.
    pub transactions: usize,
    /// Row changes of those transactions.
    pub changes: usize,
    /// Rows compared with the tables at the end.
    pub rows: usize,
    /// Records with an event id (`pgcdc-event-id`; the test kit turns the headers off but in
    /// one scenario, as tansu reads records with headers ~30 times slower).
    pub ids: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} events ({} records), {} transactions / {} changes all present, {} rows equal, \
             0 lost, {} duplicates, {} snapshot re-reads, {} snapshot markers",
            self.events,
            self.records,
            self.transactions,
            self.changes,
            self.rows,
            self.duplicates,
            self.snapshot_rereads,
            self.markers
        )
    }
}

/// One record, decoded.
#[derive(Debug, Clone)]
struct Event {
    offset: i64,
    partition: i32,
    /// The canonical key; empty for a snapshot marker (the only record without a key).
    key: String,
    value: Option<Value>,
    timestamp: Option<i64>,
    /// The `pgcdc-event-id` header.
    id: Option<String>,
}

impl Event {
    fn op(&self) -> &str {
        self.value
            .as_ref()
            .and_then(|v| v["op"].as_str())
            .unwrap_or("")
    }

    fn is_marker(&self) -> bool {
        self.op() == "s"
    }

    fn position(&self) -> topics::Position {
        topics::position(self.value.as_ref().expect("not a tombstone"))
            .expect("source.commit_lsn and source.lsn")
    }

    /// The event without the time it was encoded, which differs between re-publications.
    fn content(&self) -> Value {
        topics::content(self.value.as_ref().unwrap_or(&Value::Null))
    }
}

/// A key as one canonical string (object keys sorted).
fn canonical(v: &Value) -> String {
    serde_json::to_string(v).expect("JSON")
}

/// Reads every table's topic (in parallel).
async fn read_topics(
    kafka: &str,
    prefix: &str,
    tables: &[Table],
) -> BTreeMap<&'static str, Vec<Event>> {
    let mut handles = Vec::new();
    for t in tables {
        let kafka = kafka.to_string();
        let topic = crate::common::api::topic_name(
            prefix,
            &crate::common::api::TableName::new("public", t.name.to_string()),
        );
        handles.push((
            t.name,
            tokio::task::spawn_blocking(move || read_all(&kafka, &topic)),
        ));
    }
    let mut out = BTreeMap::new();
    for (name, h) in handles {
        let records = h.await.expect("reader thread");
        let events = records
            .into_iter()
            .map(|r| Event {
                offset: r.offset,
                partition: r.partition,
                key: r.key.as_deref().map_or(String::new(), |k| {
                    canonical(&serde_json::from_slice(k).expect("the key is JSON"))
                }),
                value: r
                    .value
                    .map(|v| serde_json::from_slice(&v).expect("the value is JSON")),
                id: topics::header(&r.headers, "pgcdc-event-id").map(str::to_string),
                timestamp: r.timestamp,
            })
            .collect();
        out.insert(name, events);
    }
    out
}

/// The rows of a table as JSON objects, by canonical key.
async fn table_rows(client: &tokio_postgres::Client, t: &Table) -> BTreeMap<String, Value> {
    let rows = client
        .query(
            &format!("SELECT to_jsonb(t)::text FROM public.{} t", t.name),
            &[],
        )
        .await
        .expect("read the table");
    rows.iter()
        .map(|r| {
            let v: Value = serde_json::from_str(&r.get::<_, String>(0)).expect("row JSON");
            let key: Map<String, Value> = t
                .key
                .iter()
                .map(|k| (k.to_string(), v[*k].clone()))
                .collect();
            (canonical(&Value::Object(key)), v)
        })
        .collect()
}

/// Per key, while replaying a topic.
#[derive(Default)]
struct KeyState {
    /// Positions and contents seen: order and replays.
    order: KeyOrder,
    /// The row as a consumer has it, `None` once deleted.
    row: Option<Value>,
    last_op: String,
    /// The event id of the key's last event.
    last_id: Option<String>,
    reads: usize,
}

/// Checks everything; panics with an account of the first problems found.
/// `first_fault_ms`: when the first fault was injected (no duplicate may be older).
pub async fn check(
    kafka: &str,
    prefix: &str,
    tables: &[Table],
    db: &tokio_postgres::Client,
    committed: &[Txn],
    first_fault_ms: Option<i64>,
) -> Summary {
    let topics = read_topics(kafka, prefix, tables).await;
    let mut summary = Summary::default();
    let mut problems: Vec<String> = Vec::new();
    // (table, key, xid, op class, marker) of every change event, for the transaction check.
    let mut found: HashSet<(String, String, u32, char, String)> = HashSet::new();
    let mut xids_seen: BTreeMap<u32, usize> = BTreeMap::new();

    for t in tables {
        let events = &topics[t.name];
        let mut keys: HashMap<String, KeyState> = HashMap::new();
        // Event ids (unique in a topic): id → the event it names, and the other way round.
        let mut named: HashMap<String, String> = HashMap::new();
        let mut id_of: HashMap<String, String> = HashMap::new();
        // Ids are checked when the topic has them (`--event-headers`): then on every record.
        let with_ids = events.iter().any(|e| e.id.is_some());
        summary.ids += events.iter().filter(|e| e.id.is_some()).count();
        let mut by_partition: BTreeMap<i32, Vec<&Event>> = BTreeMap::new();
        for e in events {
            by_partition.entry(e.partition).or_default().push(e);
        }
        for (partition, events) in by_partition {
            // Snapshot points whose marker this partition has shown.
            let mut completed: HashSet<u64> = HashSet::new();
            for e in events {
                summary.records += 1;
                if e.key.is_empty() {
                    let v = e.value.as_ref().unwrap_or(&Value::Null);
                    if !e.is_marker() || v["snapshot"]["partition"] != partition {
                        problems.push(format!(
                            "{}: a record without a key that is not this partition's snapshot \
                             marker at offset {}: {v}",
                            t.name, e.offset
                        ));
                    }
                    summary.markers += 1;
                    let suffix = format!(".marker.{partition}");
                    if with_ids && !e.id.as_deref().is_some_and(|id| id.ends_with(&suffix)) {
                        problems.push(format!(
                            "{}: marker at offset {} has event id {:?}, not …{suffix}",
                            t.name, e.offset, e.id
                        ));
                    }
                    completed.insert(e.position().commit_lsn);
                    continue;
                }
                let k = keys.entry(e.key.clone()).or_default();
                let Some(v) = &e.value else {
                    // A tombstone follows a delete of the same key.
                    if k.last_op != "d" {
                        problems.push(format!(
                            "{}: tombstone of {} at offset {} does not follow a delete",
                            t.name, e.key, e.offset
                        ));
                    }
                    let expected = k.last_id.as_ref().map(|id| format!("{id}.t"));
                    if with_ids && e.id != expected {
                        problems.push(format!(
                            "{}: tombstone of {} at offset {} has event id {:?}, not {expected:?}",
                            t.name, e.key, e.offset, e.id
                        ));
                    }
                    k.row = None;
                    continue;
                };
                summary.events += 1;
                let op = e.op().to_string();
                let pos = e.position();
                // One id per event, the same whenever it is published again.
                let identity = format!("{} {pos:?} {op}", e.key);
                match &e.id {
                    None if !with_ids => {}
                    None => problems.push(format!(
                        "{}: {} at offset {} has no event id",
                        t.name, e.key, e.offset
                    )),
                    Some(id) => {
                        let other = named.entry(id.clone()).or_insert_with(|| identity.clone());
                        if *other != identity {
                            problems.push(format!(
                                "{}: event id {id} names two events: {other} and {identity}",
                                t.name
                            ));
                        }
                        let other = id_of.entry(identity.clone()).or_insert_with(|| id.clone());
                        if other != id {
                            problems.push(format!(
                                "{}: {identity} published again under another event id: {other}, then {id}",
                                t.name
                            ));
                        }
                    }
                }
                k.last_id = e.id.clone();
                if op == "r" && completed.contains(&pos.commit_lsn) {
                    problems.push(format!(
                        "{}: read of {} at offset {} after its snapshot's marker",
                        t.name, e.key, e.offset
                    ));
                }
                if op != "r" {
                    let xid = v["source"]["txId"].as_u64().expect("txId") as u32;
                    *xids_seen.entry(xid).or_default() += 1;
                    let (class, marker) = match op.as_str() {
                        "d" => ('D', String::new()),
                        _ => (
                            'U',
                            v["after"]["marker"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        ),
                    };
                    found.insert((t.name.to_string(), e.key.clone(), xid, class, marker));
                }
                let content = e.content();
                match k.order.observe(pos, &op, content.clone()) {
                    Seen::New => {}
                    Seen::Backwards { high } => problems.push(format!(
                        "{}: {} goes backwards: {op} at {pos:?} (offset {}) after {high:?}, and is not a replay",
                        t.name, e.key, e.offset
                    )),
                    replay => {
                        summary.duplicates += 1;
                        if let Seen::ConflictingReplay { earlier } = replay {
                            problems.push(format!(
                                "{}: {} at {pos:?} was published twice with different content:\n{earlier}\n{content}",
                                t.name, e.key
                            ));
                        }
                        if let (Some(first), Some(ts)) = (first_fault_ms, e.timestamp) {
                            if ts < first {
                                problems.push(format!(
                                    "{}: duplicate of {} at {pos:?} (offset {}) written before any fault",
                                    t.name, e.key, e.offset
                                ));
                            }
                        }
                        k.last_op = op;
                        continue;
                    }
                }
                match op.as_str() {
                    "d" => k.row = None,
                    "r" | "c" | "u" => {
                        if op == "r" {
                            k.reads += 1;
                            if k.reads > 1 {
                                summary.snapshot_rereads += 1;
                            }
                        }
                        let mut row = v["after"].clone();
                        // An unchanged TOASTed value is left out of `after`: keep the one
                        // the consumer already has.
                        if let (Some(new), Some(Value::Object(old))) =
                            (row.as_object_mut(), k.row.as_ref())
                        {
                            for (col, val) in old {
                                new.entry(col.clone()).or_insert_with(|| val.clone());
                            }
                        }
                        k.row = Some(row);
                    }
                    other => problems.push(format!("{}: unknown op {other:?}", t.name)),
                }
                k.last_op = op;
            }
        }

        // The end state equals the table.
        let table = table_rows(db, t).await;
        summary.rows += table.len();
        let mut missing = Vec::new();
        let mut differing = Vec::new();
        for (key, row) in &table {
            match keys.get(key).and_then(|k| k.row.as_ref()) {
                None => missing.push(key.clone()),
                Some(r) if r != row => differing.push(format!("{key}: topic {r} table {row}")),
                Some(_) => {}
            }
        }
        let extra: Vec<&String> = keys
            .iter()
            .filter(|(key, k)| k.row.is_some() && !table.contains_key(*key))
            .map(|(key, _)| key)
            .collect();
        if !missing.is_empty() || !extra.is_empty() || !differing.is_empty() {
            problems.push(format!(
                "{}: topic != table: {} rows missing (e.g. {:?}), {} deleted rows not deleted \
                 (e.g. {:?}), {} differ (e.g. {:?})",
                t.name,
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>(),
                extra.len(),
                extra.iter().take(3).collect::<Vec<_>>(),
                differing.len(),
                differing
                    .iter()
                    .take(2)
                    .map(|d| truncate(d))
                    .collect::<Vec<_>>()
            ));
        }
    }

    // Every change of every committed transaction is present.
    let mut lost = Vec::new();
    let committed_xids: HashSet<u32> = committed.iter().map(|t| t.xid).collect();
    for txn in committed {
        for ex in &txn.expects {
            let wanted = match ex {
                Expect::Upsert { table, key } => (
                    table.to_string(),
                    canonical(key),
                    txn.xid,
                    'U',
                    txn.marker.clone(),
                ),
                Expect::Delete { table, key } => (
                    table.to_string(),
                    canonical(key),
                    txn.xid,
                    'D',
                    String::new(),
                ),
            };
            if found.contains(&wanted) {
                summary.changes += 1;
            } else {
                lost.push(format!("{wanted:?}"));
            }
        }
    }
    summary.transactions = committed.len();
    if !lost.is_empty() {
        problems.push(format!(
            "{} changes of committed transactions are not in the topics, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    // Nothing invented: change events belong to committed transactions.
    let invented: Vec<(&u32, &usize)> = xids_seen
        .iter()
        .filter(|(x, _)| !committed_xids.contains(x))
        .collect();
    if !invented.is_empty() {
        problems.push(format!(
            "events of {} transactions that were not committed (xid, events): {:?}",
            invented.len(),
            &invented[..invented.len().min(5)]
        ));
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems
            .iter()
            .take(12)
            .map(|p| truncate(p))
            .collect::<Vec<_>>()
            .join("\n")
    );
    summary
}

fn truncate(s: &str) -> String {
    if s.len() > 600 {
        let mut end = 600;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s.to_string()
    }
}

/// The WAL the slot holds back, in bytes: from `confirmed_flush_lsn` and from `restart_lsn`
/// to the server's current position.
pub async fn wal_retention(client: &tokio_postgres::Client, slot: &str) -> Option<(i64, i64)> {
    let row = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()??;
    Some((row.get(0), row.get(1)))
}

/// Waits until the slot's confirmed position is within `limit` bytes of the server's
/// current position (pgcdc caught up and confirmed); returns the retention then.
pub async fn wait_retention_below(
    client: &tokio_postgres::Client,
    slot: &str,
    limit: i64,
    timeout: Duration,
) -> Result<(i64, i64), Option<(i64, i64)>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(r) = wal_retention(client, slot).await {
            if r.0 <= limit {
                return Ok(r);
            }
            last = Some(r);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server's current WAL position.
pub async fn current_lsn(client: &tokio_postgres::Client) -> u64 {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .expect("current lsn");
    row.get::<_, crate::common::api::Lsn>(0).0
}

/// The slot's confirmed position.
pub async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()??;
    row.get::<_, Option<crate::common::api::Lsn>>(0)
        .map(|l| l.0)
}

/// Waits until the slot confirmed `target`.
pub async fn wait_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
    target: u64,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if confirmed_flush(client, slot)
            .await
            .is_some_and(|c| c >= target)
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
