//! `pgcdc-indexer`: keeps a search index equal to the tables pgcdc captures, by applying its
//! topics — and never lets a replayed or reordered event make a document older.
//!
//! ```text
//!  Kafka topics ─► source (thread, bounded channel) ─► batch ─► event::parse_record
//!                                                         │
//!       target.versions(ids) ──► plan::plan (pure) ──► target.apply(writes) ─► Meilisearch / stdout
//! ```
//!
//! # Why no document can regress
//!
//! pgcdc gives every event a version, `(source.commit_lsn, source.lsn)` — for a snapshot read
//! `(C, 0)`, below every change committed at the snapshot's point `C` (the crate's one
//! ordering rule, [`crate::event::order`]) — that orders the changes of a row as PostgreSQL
//! committed them, and a re-published event carries the same version. The indexer stores the version in the document (`_version`) and, for deleted
//! rows, in a deletion marker. For each batch it reads the stored versions of the batch's ids,
//! drops every event older than the stored version, folds the rest per id in version order into
//! one write, and applies the writes, waiting until they are stored. The version stored for an
//! id therefore only ever grows — whatever the delivery order, duplication or batching — and
//! replaying a topic from the beginning rewrites nothing but identical documents.
//!
//! That check-then-write is safe without a conditional write in the search engine because the
//! indexer is the only writer of its indexes and reads only after its own writes completed;
//! deletes store their marker before removing the document, so a crash between the two never
//! loses the version. [`plan`] states the rule, [`meili`] how it maps onto Meilisearch's API.
//!
//! Tombstones (null values after deletes) change nothing: the delete before them carried the
//! version and did the work; applying an unversioned delete could remove a newer document
//! during a replay. (On a topic a user switched to compaction, a delete can vanish while its
//! tombstone stays; pgcdc creates its topics with `cleanup.policy=delete`.)
//!
//! Records that cannot be indexed (no key, not pgcdc's format, an operation the indexer does
//! not know such as `t` for truncate) are logged and counted, and the indexer goes on.

pub mod event;
pub mod http;
pub mod meili;
pub mod plan;
pub mod source;
pub mod target;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use event::{DocId, IndexEvent, Parsed};
use source::SourceRecord;
use target::{Target, TargetError};

/// Records applied together at most.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// Why the indexer stopped.
#[derive(Debug, thiserror::Error)]
pub enum IndexerError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Kafka(#[from] crate::sink::SinkError),
    #[error("the Kafka reader thread ended unexpectedly")]
    ReaderGone,
}

/// What the indexer did, in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    /// Documents written or deleted.
    pub writes: u64,
    /// Events older than the stored version, dropped.
    pub stale: u64,
    pub tombstones: u64,
    /// Records that could not be indexed.
    pub invalid: u64,
}

/// The index a topic goes to: its last dot-separated part (`pgcdc.public.orders` →
/// `orders`), with characters Meilisearch does not allow in index names replaced by `_`.
pub fn index_for_topic(topic: &str) -> String {
    let table = topic.rsplit('.').next().unwrap_or(topic);
    let name: String = table
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "_".into()
    } else {
        name
    }
}

/// Applies batches of records to a [`Target`].
pub struct Indexer<T: Target> {
    target: T,
    /// topic → index.
    routes: HashMap<String, String>,
    stats: Stats,
}

impl<T: Target> Indexer<T> {
    /// An indexer for `topics`; fails when two topics would share an index.
    pub fn new(target: T, topics: &[String]) -> Result<Self, IndexerError> {
        let mut routes = HashMap::new();
        let mut seen: HashMap<String, &str> = HashMap::new();
        for t in topics {
            let index = index_for_topic(t);
            if let Some(other) = seen.insert(index.clone(), t) {
                if other != t {
                    return Err(IndexerError::Usage(format!(
                        "topics `{other}` and `{t}` would both go to index `{index}`: \
                         index one set of tables per indexer"
                    )));
                }
            }
            routes.insert(t.clone(), index);
        }
        Ok(Indexer {
            target,
            routes,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn target(&self) -> &T {
        &self.target
    }

    pub fn into_target(self) -> T {
        self.target
    }

    /// Creates the indexes (idempotent).
    pub async fn prepare(&mut self) -> Result<(), TargetError> {
        let mut indexes: Vec<&String> = self.routes.values().collect();
        indexes.sort();
        indexes.dedup();
        for index in indexes {
            self.target.prepare(index).await?;
        }
        Ok(())
    }

    /// Applies one batch of records. On error nothing is assumed about how much was
    /// applied: applying the same batch again is always correct.
    pub async fn apply_batch(&mut self, records: &[SourceRecord]) -> Result<Stats, TargetError> {
        let mut batch = Stats {
            records: records.len() as u64,
            ..Stats::default()
        };
        // Per index, in order of first appearance.
        let mut order: Vec<String> = Vec::new();
        let mut events: HashMap<String, Vec<IndexEvent>> = HashMap::new();
        for r in records {
            let Some(index) = self.routes.get(&r.topic) else {
                continue;
            };
            match event::parse_record(r.key.as_deref(), r.value.as_deref()) {
                Ok(Parsed::Event(e)) => {
                    let list = events.entry(index.clone()).or_default();
                    if list.is_empty() {
                        order.push(index.clone());
                    }
                    list.push(e);
                }
                Ok(Parsed::Tombstone(_)) => batch.tombstones += 1,
                Err(e) => {
                    batch.invalid += 1;
                    tracing::warn!(
                        topic = %r.topic,
                        partition = r.partition,
                        offset = r.offset,
                        "record skipped: {e}"
                    );
                }
            }
        }
        for index in order {
            let Some(list) = events.remove(&index) else {
                continue;
            };
            let mut ids: Vec<DocId> = list.iter().map(|e| e.id.clone()).collect();
            ids.sort();
            ids.dedup();
            let stored = self.target.versions(&index, &ids).await?;
            let plan = plan::plan(list, &stored);
            batch.stale += plan.stale as u64;
            if !plan.writes.is_empty() {
                self.target.apply(&index, &plan.writes).await?;
            }
            batch.writes += plan.writes.len() as u64;
            if plan.stale > 0 || !plan.writes.is_empty() {
                tracing::info!(
                    index = %index,
                    "{} written, {} stale event(s) dropped",
                    plan.writes.len(),
                    plan.stale
                );
            }
        }
        self.stats.records += batch.records;
        self.stats.writes += batch.writes;
        self.stats.stale += batch.stale;
        self.stats.tombstones += batch.tombstones;
        self.stats.invalid += batch.invalid;
        Ok(batch)
    }

    /// Applies records from `rx` in batches of at most `max_batch` until `stop` turns true or
    /// the channel closes; retries while the target reports transient errors (re-applying a
    /// batch is always correct); calls [`Target::finish`] at a clean stop.
    pub async fn run(
        &mut self,
        mut rx: mpsc::Receiver<SourceRecord>,
        mut stop: watch::Receiver<bool>,
        max_batch: usize,
    ) -> Result<(), IndexerError> {
        let mut backoff = Backoff::new();
        loop {
            match self.prepare().await {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    if !backoff.wait(&mut stop, "preparing the indexes", &e).await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut batch = Vec::with_capacity(max_batch);
        'records: loop {
            if *stop.borrow() {
                break;
            }
            // Priorities: stop, then records.
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                first = rx.recv() => match first {
                    Some(r) => batch.push(r),
                    None => return Err(IndexerError::ReaderGone),
                },
            }
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let mut backoff = Backoff::new();
            loop {
                match self.apply_batch(&batch).await {
                    Ok(_) => break,
                    Err(e) if e.is_transient() => {
                        if !backoff.wait(&mut stop, "indexing", &e).await {
                            break 'records;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            batch.clear();
        }
        let s = self.stats;
        tracing::info!(
            "stopping: {} records read, {} writes, {} stale, {} tombstones, {} skipped",
            s.records,
            s.writes,
            s.stale,
            s.tombstones,
            s.invalid
        );
        self.target.finish().await?;
        Ok(())
    }
}

/// Growing pauses between attempts, cut short by a stop request.
struct Backoff {
    pause: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            pause: Duration::from_millis(200),
        }
    }

    /// Logs `err` and waits; `false` when `stop` turned true meanwhile.
    async fn wait(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        what: &str,
        err: &TargetError,
    ) -> bool {
        tracing::warn!("{what}: {err}; retrying in {} ms", self.pause.as_millis());
        let stopped = tokio::select! {
            _ = stop.changed() => true,
            _ = tokio::time::sleep(self.pause) => false,
        };
        self.pause = (self.pause * 2).min(Duration::from_secs(5));
        !stopped && !*stop.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::target::StdoutTarget;
    use super::*;
    use serde_json::{json, Value};

    fn rec(id: i64, value: Option<Value>) -> SourceRecord {
        SourceRecord {
            topic: "p.public.orders".into(),
            partition: 0,
            offset: 0,
            key: Some(json!({ "id": id }).to_string().into_bytes()),
            value: value.map(|v| v.to_string().into_bytes()),
        }
    }

    fn ev(id: i64, op: &str, status: &str, commit: u64) -> SourceRecord {
        let after = if op == "d" {
            Value::Null
        } else {
            json!({"id": id, "status": status})
        };
        rec(
            id,
            Some(json!({"before": null, "after": after, "op": op,
                        "source": {"lsn": commit, "commit_lsn": commit}})),
        )
    }

    fn status(ix: &Indexer<StdoutTarget<Vec<u8>>>, id: &str) -> Option<String> {
        let store = ix.target().store("orders")?;
        let doc = store.docs.get(&event::DocId::from_stored(id)?)?;
        doc["status"].as_str().map(String::from)
    }

    #[tokio::test]
    async fn tombstones_never_delete_on_their_own() {
        let mut ix =
            Indexer::new(StdoutTarget::new(Vec::new()), &["p.public.orders".into()]).unwrap();
        ix.prepare().await.unwrap();
        // Deleted, with its tombstone; then a newer life of the same key.
        let history = [
            ev(1, "c", "new", 10),
            ev(1, "d", "", 20),
            rec(1, None),
            ev(1, "c", "again", 30),
        ];
        ix.apply_batch(&history[..3]).await.unwrap();
        assert_eq!(status(&ix, "1"), None);
        ix.apply_batch(&history[3..]).await.unwrap();
        assert_eq!(status(&ix, "1").as_deref(), Some("again"));
        // A replay of the old delete and its tombstone, together or apart, or a lone
        // tombstone: the newer document stays.
        ix.apply_batch(&history[1..3]).await.unwrap();
        ix.apply_batch(&history[1..2]).await.unwrap();
        ix.apply_batch(&history[2..3]).await.unwrap();
        assert_eq!(status(&ix, "1").as_deref(), Some("again"));
        let s = ix.stats();
        assert_eq!((s.tombstones, s.stale, s.invalid), (3, 2, 0));

        // What the stdout target printed: one line per write (the first batch folded insert
        // and delete into one delete), then the final documents.
        ix.target.finish().await.unwrap();
        let out = String::from_utf8(ix.into_target().into_inner()).unwrap();
        let actions: Vec<String> = out
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["action"].to_string())
            .collect();
        assert_eq!(
            actions,
            [r#""delete""#, r#""upsert""#, r#""document""#],
            "{out}"
        );
        assert!(
            out.contains(r#""_version":"000000000000001E.000000000000001E""#),
            "{out}"
        );
    }

    /// A transaction whose commit record lies exactly at the snapshot's consistent point is
    /// streamed with `(commit_lsn = C, lsn < C)`: it is newer than the snapshot's rows.
    #[tokio::test]
    async fn a_change_committed_at_the_snapshot_point_is_applied_after_the_read() {
        let mut ix =
            Indexer::new(StdoutTarget::new(Vec::new()), &["p.public.orders".into()]).unwrap();
        ix.prepare().await.unwrap();
        let read = |id: i64, status: &str| {
            rec(
                id,
                Some(
                    json!({"before": null, "after": {"id": id, "status": status}, "op": "r",
                            "source": {"lsn": 100, "commit_lsn": 100, "snapshot": "true"}}),
                ),
            )
        };
        let change = |id: i64, op: &str, status: &str| {
            let after = if op == "d" {
                Value::Null
            } else {
                json!({"id": id, "status": status})
            };
            rec(
                id,
                Some(json!({"before": null, "after": after, "op": op,
                            "source": {"lsn": 40, "commit_lsn": 100, "snapshot": "false"}})),
            )
        };
        ix.apply_batch(&[read(1, "new"), read(2, "new")])
            .await
            .unwrap();
        ix.apply_batch(&[change(1, "u", "paid"), change(2, "d", "")])
            .await
            .unwrap();
        assert_eq!(status(&ix, "1").as_deref(), Some("paid"));
        assert_eq!(status(&ix, "2"), None);
        // In one batch, and replayed: the same.
        let mut again =
            Indexer::new(StdoutTarget::new(Vec::new()), &["p.public.orders".into()]).unwrap();
        again.prepare().await.unwrap();
        let all = [read(1, "new"), change(1, "u", "paid"), read(1, "new")];
        again.apply_batch(&all).await.unwrap();
        again.apply_batch(&all).await.unwrap();
        assert_eq!(status(&again, "1").as_deref(), Some("paid"));
        assert_eq!(ix.stats().stale, 0);
    }

    #[test]
    fn topics_map_to_index_names() {
        assert_eq!(index_for_topic("pgcdc.public.orders"), "orders");
        assert_eq!(index_for_topic("orders"), "orders");
        assert_eq!(index_for_topic("p.s.Order Lines"), "Order_Lines");
        assert_eq!(index_for_topic("p.s."), "_");
        let clash = Indexer::new(
            StdoutTarget::new(Vec::new()),
            &["a.public.orders".into(), "a.shop.orders".into()],
        );
        assert!(matches!(clash, Err(IndexerError::Usage(_))));
    }
}
