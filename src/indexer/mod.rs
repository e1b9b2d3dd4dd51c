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
//!
//! # Healing after a new snapshot
//!
//! When pgcdc takes a new snapshot without a slot that kept every change since the last one
//! (the slot was dropped, lost in a failover or invalidated, and `pgcdc run --snapshot always`
//! took a new one), rows deleted in between have no delete event, and the index would keep
//! them forever. pgcdc's snapshot markers end that: after the last row of a table's snapshot
//! at `C`, it publishes a marker to every partition of the table's topic. The indexer counts
//! them per index and snapshot ([`event::SnapshotDone`]); once it has seen the marker of `C`
//! in every partition — and applied every record before it, as it applies each partition in
//! order and heals only after the batch's own writes — it deletes every document whose
//! version is below a read at `C`, `(C, 0)`, storing deletion markers at `(C, 0)` as for an
//! ordinary delete ([`plan::heal`]).
//!
//! Why that is right, whenever it happens — for the newest snapshot, or an old marker
//! replayed long after newer snapshots (every start re-reads the topics):
//!
//! 1. *A document below `(C, 0)` holds a row that was not in the table at `C`.* Had the row
//!    been there, the snapshot at `C` read it, and that read came before the marker in its
//!    partition, so it was applied — or dropped as stale, because the stored version was
//!    higher already. Either way the stored version reached `(C, 0)`, and stored versions
//!    never decrease.
//! 2. *So deleting it at `(C, 0)` stores the row's true state at that version* — absent —
//!    which is the invariant every write keeps: a document (or its deletion marker) is its
//!    row's true state at its stored version. A later life of the key (re-inserted after
//!    `C`) has a higher version and wins when it arrives; older events of the row are stale.
//!    A change committed exactly at `C` is newer than the snapshot (the ordering rule of
//!    [`crate::event::order`]), so its document is never below `(C, 0)`.
//! 3. *No stored version decreases*: only ids whose stored version — the higher of document
//!    and deletion marker — is below `(C, 0)` are deleted, at `(C, 0)`.
//!
//! Hence an old marker replayed after a newer snapshot deletes nothing that should stay:
//! every document below its point is a row that was gone at that point and has no newer
//! state in the index. This relies on the marker covering every partition the snapshot's rows
//! went to (partitions are not added to a topic while pgcdc snapshots it) and, like
//! everything here, on the indexer being the only writer of its indexes. It costs a listing of
//! the index's versions per completed snapshot ([`Target::documents`]).

pub mod event;
pub mod http;
pub mod meili;
pub mod plan;
pub mod source;
pub mod target;
pub mod wait;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::model::failure::{Recoverable, Recovery};
use event::{DocId, IndexEvent, Parsed, SnapshotDone};
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
    Kafka(#[from] crate::kafka::SinkError),
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
    /// Snapshot markers read.
    pub markers: u64,
    /// Documents deleted because a completed snapshot no longer held their row.
    pub healed: u64,
}

/// The index a topic goes to: its last dot-separated part (`pgcdc.public.orders` →
/// `orders`), with characters Meilisearch does not allow in index names replaced by `_`.
/// pgcdc's topic names have no dot inside a table's part (`"Order.Lines"` publishes to
/// `….Order_Lines_<hash>`, see [`crate::source::topic`]), so that part is the whole table
/// name as the topic carries it.
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
    /// Per index and snapshot point: the partitions whose marker was seen, until all were.
    snapshots: BTreeMap<(String, u64), Markers>,
    /// Snapshots healed already (their markers, seen again, change nothing).
    healed: HashSet<(String, u64)>,
    /// What is applied, for read-your-writes ([`wait`]).
    applied: watch::Sender<wait::Applied>,
}

/// The markers of one snapshot of one table seen so far.
#[derive(Debug, Default)]
struct Markers {
    partitions: u32,
    seen: BTreeSet<i32>,
}

impl Markers {
    fn complete(&self) -> bool {
        self.partitions > 0 && (0..self.partitions as i32).all(|p| self.seen.contains(&p))
    }
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
            snapshots: BTreeMap::new(),
            healed: HashSet::new(),
            applied: watch::channel(wait::Applied::default()).0,
        })
    }

    /// What is applied so far, updated after each batch (see [`wait`]).
    pub fn applied(&self) -> watch::Receiver<wait::Applied> {
        self.applied.subscribe()
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

    /// Applies one batch of records, then heals after every snapshot whose markers are now
    /// complete (see the module docs). On error nothing is assumed about how much was
    /// applied: applying the same batch again is always correct.
    pub async fn apply_batch(&mut self, records: &[SourceRecord]) -> Result<Stats, TargetError> {
        let mut batch = Stats {
            records: records.len() as u64,
            ..Stats::default()
        };
        // Per index, in order of first appearance.
        let mut order: Vec<String> = Vec::new();
        // Per index, the highest commit LSN among the batch's events.
        let mut lsns: HashMap<String, u64> = HashMap::new();
        let mut events: HashMap<String, Vec<IndexEvent>> = HashMap::new();
        for r in records {
            let Some(index) = self.routes.get(&r.topic) else {
                continue;
            };
            match event::parse_record(r.key.as_deref(), r.value.as_deref()) {
                Ok(Parsed::Event(e)) => {
                    let top = lsns.entry(index.clone()).or_default();
                    *top = (*top).max(e.version.commit_lsn);
                    let list = events.entry(index.clone()).or_default();
                    if list.is_empty() {
                        order.push(index.clone());
                    }
                    list.push(e);
                }
                Ok(Parsed::Tombstone(_)) => batch.tombstones += 1,
                Ok(Parsed::SnapshotDone(done)) => {
                    batch.markers += 1;
                    marker_seen(&mut self.snapshots, &self.healed, index, r.partition, done);
                }
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
        batch.healed = self.heal_completed().await?;
        // Everything in the batch is stored now (a write returns once the target stored it).
        self.applied
            .send_modify(|a| a.record(records, &self.routes, &lsns));
        self.stats.records += batch.records;
        self.stats.writes += batch.writes;
        self.stats.stale += batch.stale;
        self.stats.tombstones += batch.tombstones;
        self.stats.invalid += batch.invalid;
        self.stats.markers += batch.markers;
        self.stats.healed += batch.healed;
        Ok(batch)
    }

    /// Heals after every snapshot whose markers were seen in all partitions; returns the
    /// documents deleted. A snapshot whose heal failed stays pending: retrying the batch
    /// heals it again (a heal is idempotent).
    async fn heal_completed(&mut self) -> Result<u64, TargetError> {
        let complete: Vec<(String, u64)> = self
            .snapshots
            .iter()
            .filter(|(_, m)| m.complete())
            .map(|(k, _)| k.clone())
            .collect();
        let mut healed = 0;
        for (index, point) in complete {
            let documents = self.target.documents(&index).await?;
            let candidates = plan::heal_candidates(&documents, point);
            let stored = if candidates.is_empty() {
                HashMap::new()
            } else {
                self.target.versions(&index, &candidates).await?
            };
            let writes = plan::heal(&documents, &stored, point);
            if !writes.is_empty() {
                self.target.apply(&index, &writes).await?;
            }
            tracing::info!(
                index = %index,
                snapshot = %crate::model::Lsn(point),
                "the snapshot is complete in every partition: {} document(s) it no longer \
                 holds deleted",
                writes.len()
            );
            healed += writes.len() as u64;
            self.snapshots.remove(&(index.clone(), point));
            self.healed.insert((index, point));
        }
        Ok(healed)
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
                Err(e) if e.recovery() == Recovery::Reconnect => {
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
                    Err(e) if e.recovery() == Recovery::Reconnect => {
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
            "stopping: {} records read, {} writes, {} stale, {} tombstones, {} skipped, \
             {} snapshot markers, {} documents healed",
            s.records,
            s.writes,
            s.stale,
            s.tombstones,
            s.invalid,
            s.markers,
            s.healed
        );
        self.target.finish().await?;
        Ok(())
    }
}

/// Notes the marker of `done` seen in `partition` of `index`'s topic.
fn marker_seen(
    snapshots: &mut BTreeMap<(String, u64), Markers>,
    healed: &HashSet<(String, u64)>,
    index: &str,
    partition: i32,
    done: SnapshotDone,
) {
    let key = (index.to_string(), done.point);
    if healed.contains(&key) {
        return;
    }
    let markers = snapshots.entry(key).or_default();
    markers.partitions = markers.partitions.max(done.partitions);
    markers.seen.insert(partition);
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
        // pgcdc's name for `a."b.c"`: the table's part is one part.
        assert_eq!(index_for_topic("pgcdc.a.b_c_ad8a94ab"), "b_c_ad8a94ab");
        let clash = Indexer::new(
            StdoutTarget::new(Vec::new()),
            &["a.public.orders".into(), "a.shop.orders".into()],
        );
        assert!(matches!(clash, Err(IndexerError::Usage(_))));
    }
}

/// Healing after snapshots: the scenario of a lost slot, its replays, and a property over
/// histories, partitions and interleavings.
#[cfg(test)]
mod heal_tests {
    use super::target::{MemoryStore, StdoutTarget};
    use super::*;
    use crate::event::order::Version;
    use serde_json::{json, Map, Value};

    const TOPIC: &str = "p.public.orders";
    type Ix = Indexer<StdoutTarget<Vec<u8>>>;

    fn record(partition: i32, key: Option<i64>, value: Option<Value>) -> SourceRecord {
        SourceRecord {
            topic: TOPIC.into(),
            partition,
            offset: 0,
            key: key.map(|k| json!({ "id": k }).to_string().into_bytes()),
            value: value.map(|v| v.to_string().into_bytes()),
        }
    }

    /// An event of row `id` on partition `id % partitions`.
    fn event(
        partitions: i32,
        id: i64,
        op: &str,
        status: &str,
        commit: u64,
        lsn: u64,
    ) -> SourceRecord {
        let after = if op == "d" {
            Value::Null
        } else {
            json!({"id": id, "status": status})
        };
        record(
            (id % i64::from(partitions)) as i32,
            Some(id),
            Some(json!({"before": null, "after": after, "op": op,
                        "source": {"commit_lsn": commit, "lsn": lsn}})),
        )
    }

    fn marker(partition: i32, partitions: i32, point: u64) -> SourceRecord {
        record(
            partition,
            None,
            Some(json!({"before": null, "after": null, "op": "s",
                        "source": {"commit_lsn": point, "lsn": point, "snapshot": "true"},
                        "snapshot": {"partition": partition, "partitions": partitions, "rows": 0}})),
        )
    }

    async fn indexer(target: StdoutTarget<Vec<u8>>) -> Ix {
        let mut ix = Indexer::new(target, &[TOPIC.into()]).unwrap();
        ix.prepare().await.unwrap();
        ix
    }

    fn store(ix: &Ix) -> MemoryStore {
        ix.target().store("orders").cloned().unwrap_or_default()
    }

    fn ids(ix: &Ix) -> Vec<String> {
        store(ix).docs.keys().map(|d| d.to_string()).collect()
    }

    /// The records of two partitions, in the order pgcdc wrote them to each.
    fn lost_slot_history() -> [Vec<SourceRecord>; 2] {
        let e = |id, op, status, commit, lsn| event(2, id, op, status, commit, lsn);
        let mut p0 = Vec::new();
        let mut p1 = Vec::new();
        // The first snapshot at 100: rows 1, 2, 3, 4.
        for id in 1..=4 {
            let r = e(id, "r", "new", 100, 100);
            if id % 2 == 0 {
                p0.push(r)
            } else {
                p1.push(r)
            }
        }
        p0.push(marker(0, 2, 100));
        p1.push(marker(1, 2, 100));
        // Streamed: row 1 paid.
        p1.push(e(1, "u", "paid", 150, 140));
        // The slot is lost; rows 2 and 3 are deleted, row 6 inserted, row 4 deleted and
        // inserted again: none of it is published. The new snapshot at 300 reads 1, 4, 6.
        p1.push(e(1, "r", "paid", 300, 300));
        p0.push(e(4, "r", "again", 300, 300));
        p0.push(e(6, "r", "new", 300, 300));
        p0.push(marker(0, 2, 300));
        // Streamed after it: row 5 inserted by the transaction committing exactly at the
        // snapshot's point (not in the snapshot), then row 7.
        p1.push(e(5, "c", "new", 300, 280));
        p1.push(marker(1, 2, 300));
        p1.push(e(7, "c", "new", 310, 305));
        [p0, p1]
    }

    #[tokio::test]
    async fn a_completed_snapshot_deletes_the_rows_it_no_longer_holds() {
        let [p0, p1] = lost_slot_history();
        let mut ix = indexer(StdoutTarget::new(Vec::new())).await;
        // Partition 0 to its end: the snapshot at 300 is complete in it only, nothing healed.
        ix.apply_batch(&p0).await.unwrap();
        ix.apply_batch(&p1[..3]).await.unwrap();
        assert_eq!(ids(&ix), ["1", "2", "3", "4", "6"]);
        assert_eq!(ix.stats().healed, 0);
        // Partition 1's marker of 300 completes it: 2 and 3 go, at the read's version.
        ix.apply_batch(&p1[3..]).await.unwrap();
        assert_eq!(ids(&ix), ["1", "4", "5", "6", "7"]);
        let s = store(&ix);
        let at_300 = Some(&Version::snapshot_read(300));
        assert_eq!(s.deleted.get(&DocId::from_stored("2").unwrap()), at_300);
        assert_eq!(s.deleted.get(&DocId::from_stored("3").unwrap()), at_300);
        assert_eq!(s.docs[&DocId::from_stored("4").unwrap()]["status"], "again");
        assert_eq!(ix.stats().healed, 2);
        assert_eq!(ix.stats().markers, 4);

        // A restart re-reads everything, partition 1 first this time, in small batches: the
        // old snapshot's markers (100) complete first and delete nothing, nor does the
        // newer one; the index is unchanged.
        let before = store(&ix);
        let mut again = indexer(ix.into_target()).await;
        for batch in p1.chunks(2).chain(p0.chunks(3)) {
            again.apply_batch(batch).await.unwrap();
        }
        assert_eq!(store(&again), before);
        assert_eq!(again.stats().healed, 0);
    }

    #[tokio::test]
    async fn an_old_marker_seen_last_deletes_nothing_newer() {
        // Partition 0 holds the newer snapshot's marker, partition 1 is read late: the old
        // snapshot (100) completes after the newer one (300) was applied, and must not
        // delete what the newer snapshot read or what changed after 100.
        let [p0, p1] = lost_slot_history();
        let mut ix = indexer(StdoutTarget::new(Vec::new())).await;
        ix.apply_batch(&p0).await.unwrap();
        ix.apply_batch(&p1[..2]).await.unwrap();
        ix.apply_batch(&p1[2..3]).await.unwrap(); // marker 100 of partition 1
        assert_eq!(ids(&ix), ["1", "2", "3", "4", "6"]);
        assert_eq!(ix.stats().healed, 0);
        ix.apply_batch(&p1[3..]).await.unwrap();
        assert_eq!(ids(&ix), ["1", "4", "5", "6", "7"]);
        assert_eq!(ix.stats().healed, 2);
    }

    /// A table's true history, as steps at increasing commit points: published changes,
    /// deletes nobody published (a lost slot), and snapshots (all live rows read, then a
    /// marker per partition). `truth` replays it.
    #[derive(Debug, Clone)]
    enum Step {
        Put {
            id: i64,
            status: String,
            version: Version,
            published: bool,
        },
        Delete {
            id: i64,
            version: Version,
            published: bool,
        },
        Snapshot {
            point: u64,
            rows: Vec<(i64, String)>,
        },
    }

    fn history(raw: &[(i64, u8, u8)]) -> Vec<Step> {
        let mut live: BTreeMap<i64, String> = BTreeMap::new();
        let mut steps = Vec::new();
        let commit = |n: usize| 10 * (n as u64 + 1);
        for (n, &(id, kind, val)) in raw.iter().enumerate() {
            let version = Version::change(commit(n), commit(n) - 5);
            let status = format!("s{val}");
            let step = match (live.contains_key(&id), kind) {
                // A snapshot at the next step's commit point.
                (_, 0) => Step::Snapshot {
                    point: commit(n + 1),
                    rows: live.iter().map(|(k, v)| (*k, v.clone())).collect(),
                },
                (true, 1 | 2) => {
                    live.remove(&id);
                    Step::Delete {
                        id,
                        version,
                        published: kind == 1,
                    }
                }
                _ => {
                    live.insert(id, status.clone());
                    Step::Put {
                        id,
                        status,
                        version,
                        published: true,
                    }
                }
            };
            steps.push(step);
        }
        // A last snapshot, so every unpublished delete is healed in the end.
        steps.push(Step::Snapshot {
            point: commit(raw.len() + 1),
            rows: live.iter().map(|(k, v)| (*k, v.clone())).collect(),
        });
        steps
    }

    /// The document of `id` at `upto` (None: absent).
    fn truth(steps: &[Step], id: &DocId, upto: Version) -> Option<Map<String, Value>> {
        let mut doc = None;
        let row = |k: i64, s: &str, v: Version| {
            let Value::Object(m) = json!({"id": k, "status": s}) else {
                unreachable!()
            };
            event::shape(&DocId::from_stored(&k.to_string()).unwrap(), v, m)
        };
        for step in steps {
            match step {
                Step::Put {
                    id: k,
                    status,
                    version,
                    ..
                } if k.to_string() == id.as_str() && *version <= upto => {
                    doc = Some(row(*k, status, *version));
                }
                Step::Delete { id: k, version, .. }
                    if k.to_string() == id.as_str() && *version <= upto =>
                {
                    doc = None;
                }
                Step::Snapshot { point, rows } if Version::snapshot_read(*point) <= upto => {
                    if let Some((k, s)) = rows.iter().find(|(k, _)| k.to_string() == id.as_str()) {
                        doc = Some(row(*k, s, Version::snapshot_read(*point)));
                    }
                }
                _ => {}
            }
        }
        doc
    }

    /// What pgcdc publishes of `steps`, per partition.
    fn topic(steps: &[Step], partitions: i32) -> Vec<Vec<SourceRecord>> {
        let mut out = vec![Vec::new(); partitions as usize];
        let part = |id: i64| (id % i64::from(partitions)) as usize;
        for step in steps {
            match step {
                Step::Put {
                    id,
                    status,
                    version,
                    published: true,
                } => out[part(*id)].push(event(
                    partitions,
                    *id,
                    "u",
                    status,
                    version.commit_lsn,
                    version.lsn,
                )),
                Step::Delete {
                    id,
                    version,
                    published: true,
                } => {
                    out[part(*id)].push(event(
                        partitions,
                        *id,
                        "d",
                        "",
                        version.commit_lsn,
                        version.lsn,
                    ));
                    out[part(*id)].push(record(part(*id) as i32, Some(*id), None));
                }
                Step::Snapshot { point, rows } => {
                    for (id, status) in rows {
                        out[part(*id)].push(event(partitions, *id, "r", status, *point, *point));
                    }
                    for (p, records) in out.iter_mut().enumerate() {
                        records.push(marker(p as i32, partitions, *point));
                    }
                }
                _ => {}
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]
        /// Whatever the history (deletes published or lost), the number of partitions, the
        /// interleaving of partitions, the batches, and a restart that replays everything:
        /// stored versions never decrease, every document and deletion marker is its row's
        /// true state at its version, and in the end the index equals the table.
        #[test]
        fn healing_is_safe_in_any_interleaving_and_replay(
            raw in proptest::collection::vec((0i64..6, 0u8..6, 0u8..4), 1..30),
            partitions in 1i32..4,
            choices in proptest::collection::vec(0usize..1000, 1..300),
            restart in 0usize..60,
        ) {
            let steps = history(&raw);
            let parts = topic(&steps, partitions);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut ix = indexer(StdoutTarget::new(Vec::new())).await;
                let mut choice = choices.iter().cycle();
                let mut delivered = 0usize;
                let mut restarted = false;
                let mut next = vec![0usize; parts.len()];
                loop {
                    if !restarted && delivered >= restart {
                        // A restart: a fresh indexer reads every partition from the start.
                        restarted = true;
                        ix = indexer(ix.into_target()).await;
                        next = vec![0; parts.len()];
                    }
                    let open: Vec<usize> = (0..parts.len()).filter(|&p| next[p] < parts[p].len()).collect();
                    if open.is_empty() {
                        if restarted { break; }
                        restarted = true;
                        ix = indexer(ix.into_target()).await;
                        next = vec![0; parts.len()];
                        continue;
                    }
                    // A batch: a few records from the partitions, each partition in order.
                    let mut batch = Vec::new();
                    for _ in 0..(choice.next().copied().unwrap_or(0) % 4 + 1) {
                        let open: Vec<usize> = (0..parts.len()).filter(|&p| next[p] < parts[p].len()).collect();
                        let Some(&p) = open.get(choice.next().copied().unwrap_or(0) % open.len().max(1)) else { break };
                        batch.push(parts[p][next[p]].clone());
                        next[p] += 1;
                    }
                    delivered += batch.len();
                    let before = store(&ix).versions();
                    ix.apply_batch(&batch).await.unwrap();
                    let after = store(&ix);
                    for (id, v) in &before {
                        proptest::prop_assert!(after.version(id) >= Some(*v), "version of {id} went back");
                    }
                    for (id, doc) in &after.docs {
                        let v = after.version(id).unwrap_or_default();
                        let want = truth(&steps, id, v);
                        proptest::prop_assert_eq!(Some(doc), want.as_ref(), "document {}", id);
                    }
                    for (id, v) in &after.deleted {
                        if !after.docs.contains_key(id) {
                            proptest::prop_assert_eq!(truth(&steps, id, *v), None, "deleted {} at {}", id, v);
                        }
                    }
                }
                let end = Version::new(u64::MAX, u64::MAX);
                let s = store(&ix);
                for id in 0..6 {
                    let id = DocId::from_stored(&id.to_string()).unwrap();
                    let want = truth(&steps, &id, end);
                    proptest::prop_assert_eq!(s.docs.get(&id), want.as_ref(), "row {} at the end", id);
                }
                Ok(())
            })?;
        }
    }
}
