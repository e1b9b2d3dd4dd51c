//! Turning a batch of events into writes: the version rule, in one pure function.
//!
//! For every document id, the search engine remembers one version: the `_version` of the
//! document, or — once deleted — the version of the delete, kept as a *deletion marker*
//! (see [`super::target`]). [`plan`] then applies, per id:
//!
//! - an event whose version is **lower** than the stored one is stale (a replay, or an event
//!   overtaken by a newer one) and is dropped;
//! - an event whose version **equals** the stored one is the very event that wrote it: applying
//!   it again gives the same document, and it finishes a write that was interrupted halfway
//!   (marker stored, delete not yet) — so it is applied, idempotently;
//! - newer events are folded in version order into one write: the last `Replace` or `Delete`
//!   wins, and `Merge`s after it add their fields.
//!
//! So the stored version of a document never decreases, whatever the order, duplication or
//! batching of deliveries. The stored *content* is the row's state at that version when every
//! event carries the whole row. An update that left out an unchanged TOASTed column is merged;
//! that is exact when the events of a key arrive in commit order — which Kafka guarantees within
//! a partition, and pgcdc keeps a key on one partition — with replays of already-seen events
//! anywhere. Only if events of one key were reordered *and* partial could a merged column keep an
//! older value; the version still never goes back.
//!
//! [`heal`] is the rule for a completed snapshot (see [`super`]): every document whose stored
//! version is below a read of that snapshot is deleted, at that read's version.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::event::{shape, Change, DocId, IndexEvent, Version};

/// One write for one document.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Store this document (`_id` and `_version` included). `merge`: update only the fields
    /// given and keep the others; otherwise replace the whole document.
    Put {
        doc: Map<String, Value>,
        merge: bool,
    },
    /// Remove the document and remember the version of its deletion.
    Delete,
}

/// A write, with the id and version it brings the document to.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub id: DocId,
    pub version: Version,
    pub write: Write,
}

/// The writes for a batch, and what was dropped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// At most one per id, in the order ids first appeared in the batch.
    pub writes: Vec<Planned>,
    /// Events older than the stored version (replays, overtaken events).
    pub stale: usize,
}

/// The fold state of one id.
enum Acc {
    Replace(Map<String, Value>),
    Merge(Map<String, Value>),
    Delete,
}

/// Plans the writes for `events` given the `stored` versions of their ids (ids absent from
/// `stored` have none).
pub fn plan(events: Vec<IndexEvent>, stored: &HashMap<DocId, Version>) -> Plan {
    // Group by id, keeping the order of first appearance.
    let mut order: Vec<DocId> = Vec::new();
    let mut groups: HashMap<DocId, Vec<IndexEvent>> = HashMap::new();
    for e in events {
        let group = groups.entry(e.id.clone()).or_default();
        if group.is_empty() {
            order.push(e.id.clone());
        }
        group.push(e);
    }

    let mut out = Plan::default();
    for id in order {
        let Some(mut group) = groups.remove(&id) else {
            continue;
        };
        // Stable: duplicates keep their order, and are identical anyway.
        group.sort_by_key(|e| e.version);
        let floor = stored.get(&id).copied();
        let mut acc: Option<(Version, Acc)> = None;
        for e in group {
            if floor.is_some_and(|s| e.version < s) {
                out.stale += 1;
                continue;
            }
            let next = match (acc.take().map(|(_, a)| a), e.change) {
                (_, Change::Replace(row)) => Acc::Replace(row),
                (_, Change::Delete) => Acc::Delete,
                (Some(Acc::Replace(mut doc)), Change::Merge(fields)) => {
                    doc.extend(fields);
                    Acc::Replace(doc)
                }
                (Some(Acc::Merge(mut doc)), Change::Merge(fields)) => {
                    doc.extend(fields);
                    Acc::Merge(doc)
                }
                (None, Change::Merge(fields)) => Acc::Merge(fields),
                // An update after a delete cannot happen in one history (the row is gone);
                // if it did, the row it describes is all there is.
                (Some(Acc::Delete), Change::Merge(fields)) => Acc::Replace(fields),
            };
            acc = Some((e.version, next));
        }
        if let Some((version, acc)) = acc {
            let write = match acc {
                Acc::Replace(row) => Write::Put {
                    doc: shape(&id, version, row),
                    merge: false,
                },
                Acc::Merge(fields) => Write::Put {
                    doc: shape(&id, version, fields),
                    merge: true,
                },
                Acc::Delete => Write::Delete,
            };
            out.writes.push(Planned { id, version, write });
        }
    }
    out
}

/// The deletes that heal an index once the snapshot taken at `point` is complete (its marker
/// seen in every partition, after every event before it): every document whose version is
/// below a read at `point` — it was not read again, and not changed since — and whose stored
/// version (`stored`: the higher of document and deletion marker, for those ids) is too.
/// Each is deleted at the version of a read at `point`, so no stored version ever decreases.
/// In id order.
pub fn heal(
    documents: &HashMap<DocId, Version>,
    stored: &HashMap<DocId, Version>,
    point: u64,
) -> Vec<Planned> {
    let floor = Version::snapshot_read(point);
    let mut out: Vec<Planned> = documents
        .iter()
        .filter(|(id, doc)| {
            let version = stored.get(*id).map_or(**doc, |s| (*s).max(**doc));
            version < floor
        })
        .map(|(id, _)| Planned {
            id: id.clone(),
            version: floor,
            write: Write::Delete,
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The documents of `documents` (id → version) whose version is below a read at `point`:
/// the candidates [`heal`] needs the stored versions of.
pub fn heal_candidates(documents: &HashMap<DocId, Version>, point: u64) -> Vec<DocId> {
    let floor = Version::snapshot_read(point);
    let mut ids: Vec<DocId> = documents
        .iter()
        .filter(|(_, v)| **v < floor)
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort();
    ids
}

#[cfg(test)]
mod tests {
    use super::super::target::MemoryStore;
    use super::*;
    use serde_json::json;

    fn id(n: u32) -> DocId {
        DocId::from_stored(&n.to_string()).unwrap()
    }

    fn row(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn ev(key: u32, version: u64, change: Change) -> IndexEvent {
        IndexEvent {
            id: id(key),
            version: Version::new(version, version),
            change,
        }
    }

    fn put(key: u32, version: u64, status: &str) -> IndexEvent {
        ev(
            key,
            version,
            Change::Replace(row(json!({"id": key, "status": status}))),
        )
    }

    fn upd(key: u32, version: u64, status: &str) -> IndexEvent {
        ev(
            key,
            version,
            Change::Merge(row(json!({"id": key, "status": status}))),
        )
    }

    fn del(key: u32, version: u64) -> IndexEvent {
        ev(key, version, Change::Delete)
    }

    /// Feeds `batches` one after the other into a store, as the indexer does.
    fn run(store: &mut MemoryStore, batches: Vec<Vec<IndexEvent>>) -> usize {
        let mut stale = 0;
        for batch in batches {
            let p = plan(batch, &store.versions());
            stale += p.stale;
            for w in &p.writes {
                store.apply(w);
            }
        }
        stale
    }

    fn status(store: &MemoryStore, key: u32) -> Option<String> {
        store
            .docs
            .get(&id(key))
            .map(|d| d["status"].as_str().unwrap_or_default().to_string())
    }

    #[test]
    fn replaying_everything_changes_nothing() {
        let history = vec![
            put(1, 10, "new"),
            upd(1, 20, "paid"),
            put(2, 20, "new"),
            del(2, 30),
        ];
        let mut store = MemoryStore::default();
        run(&mut store, vec![history.clone()]);
        let once = store.clone();
        // Replayed one event per batch, and all at once.
        let stale = run(
            &mut store,
            history.iter().map(|e| vec![e.clone()]).collect(),
        );
        assert_eq!(stale, 2, "all but the last event of each key are stale");
        run(&mut store, vec![history]);
        assert_eq!(store, once);
        assert_eq!(status(&store, 1).as_deref(), Some("paid"));
        assert_eq!(status(&store, 2), None);
    }

    #[test]
    fn an_older_event_never_overwrites_a_newer_one() {
        let mut store = MemoryStore::default();
        run(&mut store, vec![vec![upd(1, 30, "shipped")]]);
        let stale = run(
            &mut store,
            vec![vec![put(1, 10, "new")], vec![upd(1, 20, "paid")]],
        );
        assert_eq!(stale, 2);
        assert_eq!(status(&store, 1).as_deref(), Some("shipped"));
        // Within one batch, order of arrival does not matter either.
        let mut store = MemoryStore::default();
        run(
            &mut store,
            vec![vec![
                upd(1, 30, "shipped"),
                put(1, 10, "new"),
                upd(1, 20, "paid"),
            ]],
        );
        assert_eq!(status(&store, 1).as_deref(), Some("shipped"));
        assert_eq!(
            store.version(&id(1)),
            Some(Version::new(30, 30)),
            "the document carries the version of its newest event"
        );
    }

    #[test]
    fn a_deleted_document_is_not_resurrected_by_a_replay() {
        let mut store = MemoryStore::default();
        run(&mut store, vec![vec![put(7, 10, "new")], vec![del(7, 20)]]);
        assert_eq!(store.deleted.get(&id(7)), Some(&Version::new(20, 20)));
        let stale = run(
            &mut store,
            vec![vec![put(7, 10, "new")], vec![upd(7, 15, "x")]],
        );
        assert_eq!(stale, 2);
        assert_eq!(status(&store, 7), None);
        // A newer insert brings it back (the key was re-used).
        run(&mut store, vec![vec![put(7, 40, "again")]]);
        assert_eq!(status(&store, 7).as_deref(), Some("again"));
        // ... and the old delete, replayed, does not remove it.
        run(&mut store, vec![vec![del(7, 20)]]);
        assert_eq!(status(&store, 7).as_deref(), Some("again"));
    }

    #[test]
    fn an_interrupted_delete_is_finished_by_its_replay() {
        // The marker was stored, the delete itself was not (crash in between).
        let mut store = MemoryStore::default();
        run(&mut store, vec![vec![put(3, 10, "new")]]);
        store.deleted.insert(id(3), Version::new(20, 20));
        assert_eq!(status(&store, 3).as_deref(), Some("new"));
        run(&mut store, vec![vec![upd(3, 15, "stale")]]);
        assert_eq!(
            status(&store, 3).as_deref(),
            Some("new"),
            "stale update dropped"
        );
        run(&mut store, vec![vec![del(3, 20)]]);
        assert_eq!(status(&store, 3), None);
    }

    #[test]
    fn updates_merge_so_unchanged_toast_columns_keep_their_value() {
        let mut store = MemoryStore::default();
        let insert = ev(
            1,
            10,
            Change::Replace(row(json!({"id": 1, "status": "new", "note": "big text"}))),
        );
        // pgcdc leaves `note` out: unchanged and TOASTed.
        let update = upd(1, 20, "paid");
        run(&mut store, vec![vec![insert.clone()], vec![update.clone()]]);
        let doc = &store.docs[&id(1)];
        assert_eq!(doc["note"], "big text");
        assert_eq!(doc["status"], "paid");
        // The same in one batch, and with the pair replayed.
        let mut one = MemoryStore::default();
        run(
            &mut one,
            vec![vec![insert.clone(), update.clone(), insert, update]],
        );
        assert_eq!(one, store);
    }

    #[test]
    fn primary_key_change_moves_the_document() {
        // pgcdc: delete of the old key and create of the new one, at the same position.
        let mut store = MemoryStore::default();
        run(&mut store, vec![vec![put(2, 10, "x")]]);
        let change = vec![del(2, 50), put(4, 50, "x")];
        run(&mut store, vec![change.clone()]);
        assert_eq!(status(&store, 2), None);
        assert_eq!(status(&store, 4).as_deref(), Some("x"));
        // Replaying the whole history neither resurrects 2 nor drops 4.
        run(&mut store, vec![vec![put(2, 10, "x")], change]);
        assert_eq!(status(&store, 2), None);
        assert_eq!(status(&store, 4).as_deref(), Some("x"));
        assert_eq!(store.docs[&id(4)]["_id"], "4");
    }

    #[test]
    fn plan_emits_one_write_per_id_in_first_seen_order() {
        let p = plan(
            vec![upd(2, 5, "a"), put(1, 3, "b"), upd(2, 6, "c"), del(9, 1)],
            &HashMap::new(),
        );
        let ids: Vec<&str> = p.writes.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["2", "1", "9"]);
        assert!(
            matches!(&p.writes[0].write, Write::Put { merge: true, doc } if doc["status"] == "c")
        );
        assert_eq!(p.writes[0].version, Version::new(6, 6));
        assert_eq!(p.writes[2].write, Write::Delete);
    }

    #[test]
    fn heal_deletes_what_a_snapshot_did_not_read_and_never_lowers_a_version() {
        let docs: HashMap<DocId, Version> = [
            (id(1), Version::new(50, 45)),        // older than the snapshot at 100
            (id(2), Version::snapshot_read(100)), // read by it
            (id(3), Version::new(100, 40)),       // committed exactly at its point: newer
            (id(4), Version::new(150, 140)),      // changed after it
            (id(5), Version::new(60, 55)),        // older, but its deletion marker is newer
        ]
        .into_iter()
        .collect();
        let candidates = heal_candidates(&docs, 100);
        assert_eq!(candidates, [id(1), id(5)]);
        let stored: HashMap<DocId, Version> = [
            (id(1), Version::new(50, 45)),
            (id(5), Version::new(120, 110)), // an interrupted delete
        ]
        .into_iter()
        .collect();
        let writes = heal(&docs, &stored, 100);
        assert_eq!(
            writes,
            [Planned {
                id: id(1),
                version: Version::snapshot_read(100),
                write: Write::Delete
            }]
        );
        // An older snapshot's point deletes nothing of these.
        assert!(heal(&docs, &stored, 40).is_empty());
    }

    /// Rows' lives: inserts, full-row updates and deletes, and now and then a snapshot read
    /// of a live row, in the order they happened (`events`). Versions are made as pgcdc makes
    /// them ([`Version::of_event`]): a change's `lsn` lies before its `commit_lsn`, and a
    /// snapshot is taken exactly at the commit point of the next transaction — the case where
    /// a read and a change share a `commit_lsn` (see [`crate::event::order`]).
    #[derive(Debug, Clone)]
    struct History {
        events: Vec<IndexEvent>,
    }

    fn history() -> impl proptest::strategy::Strategy<Value = History> {
        use proptest::prelude::*;
        proptest::collection::vec((0u32..4, 0u8..4, 0u8..4), 1..40).prop_map(|steps| {
            let mut alive: [Option<String>; 4] = Default::default();
            let mut events = Vec::new();
            let commit = |n: usize| 10 * (n as u64 + 1);
            for (n, (key, kind, val)) in steps.into_iter().enumerate() {
                let k = key as usize;
                let status = format!("s{val}");
                let change = |op: &str, change: Change| IndexEvent {
                    id: id(key),
                    version: Version::of_event(op, commit(n), commit(n) - 5),
                    change,
                };
                let full_row = |s: &str| row(json!({"id": key, "status": s}));
                let e = match (alive[k].clone(), kind) {
                    (None, _) => {
                        alive[k] = Some(status.clone());
                        change("c", Change::Replace(full_row(&status)))
                    }
                    (Some(_), 0) => {
                        alive[k] = None;
                        change("d", Change::Delete)
                    }
                    // A snapshot at the next step's commit point reads the row as it is.
                    (Some(now), 3) => IndexEvent {
                        id: id(key),
                        version: Version::of_event("r", commit(n + 1), commit(n + 1)),
                        change: Change::Replace(full_row(&now)),
                    },
                    // Full-row updates (see the module doc for partial ones).
                    (Some(_), _) => {
                        alive[k] = Some(status.clone());
                        change("u", Change::Merge(full_row(&status)))
                    }
                };
                events.push(e);
            }
            History { events }
        })
    }

    /// The true row of `key` after every event up to `upto` (inclusive).
    fn truth(h: &History, key: &DocId, upto: Version) -> Option<Map<String, Value>> {
        let mut doc: Option<Map<String, Value>> = None;
        for e in h
            .events
            .iter()
            .filter(|e| &e.id == key && e.version <= upto)
        {
            match &e.change {
                Change::Replace(r) => doc = Some(shape(key, e.version, r.clone())),
                Change::Merge(f) => {
                    let d = doc.get_or_insert_with(Map::new);
                    d.extend(shape(key, e.version, f.clone()));
                }
                Change::Delete => doc = None,
            }
        }
        doc
    }

    proptest::proptest! {
        /// Deliveries in any order, with any duplicates, in any batches: stored versions only
        /// grow, each document is always its row's true state at its version, and once every
        /// event arrived, the index equals the table.
        #[test]
        fn any_delivery_order_converges_without_regressing(
            h in history(),
            seed in proptest::collection::vec(0usize..1000, 1..120),
        ) {
            // Deliver every event at least once, then duplicates, shuffled and cut into batches.
            let mut delivery: Vec<IndexEvent> = h.events.clone();
            for &s in &seed {
                delivery.push(h.events[s % h.events.len()].clone());
            }
            for (i, &s) in seed.iter().enumerate() {
                let (a, b) = (i % delivery.len(), s % delivery.len());
                delivery.swap(a, b);
            }
            let mut store = MemoryStore::default();
            let mut rest = delivery.as_slice();
            let mut cut = seed.iter().cycle();
            while !rest.is_empty() {
                let n = (cut.next().copied().unwrap_or(1) % 5 + 1).min(rest.len());
                let before = store.versions();
                let p = plan(rest[..n].to_vec(), &before);
                for w in &p.writes {
                    store.apply(w);
                }
                rest = &rest[n..];
                for (id, v) in &before {
                    proptest::prop_assert!(store.version(id) >= Some(*v), "version of {id} went back");
                }
                for (id, doc) in &store.docs {
                    let v = store.version(id).unwrap_or(Version::new(0, 0));
                    let want = truth(&h, id, v);
                    proptest::prop_assert_eq!(Some(doc), want.as_ref());
                }
            }
            let last = Version::new(u64::MAX, u64::MAX);
            for (a, b) in h.events.iter().zip(&h.events[1..]) {
                proptest::prop_assert!(a.version < b.version, "versions follow history: {a:?} {b:?}");
            }
            for key in 0..4 {
                let id = id(key);
                let want = truth(&h, &id, last);
                proptest::prop_assert_eq!(store.docs.get(&id), want.as_ref());
            }
        }
    }
}
