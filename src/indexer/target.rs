//! Where documents go: the [`Target`] trait, and the stdout target that prints the documents
//! it derives (for `scripts/demo.sh` and for looking at what a search engine would get).
//!
//! A target stores, per document id, either the document (with its `_version`) or — after a
//! delete — a *deletion marker* holding the version of the delete. Without the marker, a
//! deleted id would have no version, and a replayed older insert would bring the row back.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use super::event::{DocId, Version, VERSION_FIELD};
use super::http::HttpError;
use super::plan::{Planned, Write};
use crate::model::failure::{Recoverable, Recovery};

/// A search engine, or anything else that keeps documents by id.
///
/// The indexer is the only writer of its indexes: [`versions`](Target::versions) must reflect
/// every write [`apply`](Target::apply) has returned from.
// One binary drives a target on one task, so the futures need no `Send` bound.
#[allow(async_fn_in_trait)]
pub trait Target {
    /// Makes sure `index` exists and accepts the writes below.
    async fn prepare(&mut self, index: &str) -> Result<(), TargetError>;

    /// The stored version of each of `ids` that has one: the document's `_version`, or its
    /// deletion marker's, whichever is higher.
    async fn versions(
        &mut self,
        index: &str,
        ids: &[DocId],
    ) -> Result<HashMap<DocId, Version>, TargetError>;

    /// Applies `writes` (at most one per id) and returns once they are stored. For a delete,
    /// the deletion marker must be stored before the document is removed.
    async fn apply(&mut self, index: &str, writes: &[Planned]) -> Result<(), TargetError>;

    /// The `_version` of every document of `index` (deletion markers not included): what a
    /// completed snapshot is compared with to find rows it no longer holds. Documents without
    /// a valid `_version` (not written by the indexer) are left out.
    async fn documents(&mut self, index: &str) -> Result<HashMap<DocId, Version>, TargetError>;

    /// Called once when the indexer stops cleanly.
    async fn finish(&mut self) -> Result<(), TargetError> {
        Ok(())
    }
}

/// Why a target could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("Meilisearch task {task} failed: {message}")]
    TaskFailed { task: u64, message: String },
    #[error("Meilisearch task {task} is still not done after {secs} s")]
    TaskTimeout { task: u64, secs: u64 },
    #[error("unexpected answer to {what}: {detail}")]
    BadResponse { what: String, detail: String },
    #[error("cannot write the documents: {0}")]
    Output(#[from] std::io::Error),
}

impl Recoverable for TargetError {
    /// Retry the same batch (`Reconnect`) when the server was unreachable, busy or slow. Safe
    /// because every write is versioned (see [`super::plan`]). The rest stops.
    fn recovery(&self) -> Recovery {
        let retry = match self {
            TargetError::Http(e) => e.recovery() == Recovery::Reconnect,
            TargetError::Status { status, .. } => *status >= 500 || *status == 429,
            TargetError::TaskTimeout { .. } => true,
            TargetError::TaskFailed { .. }
            | TargetError::BadResponse { .. }
            | TargetError::Output(_) => false,
        };
        if retry {
            Recovery::Reconnect
        } else {
            Recovery::Stop
        }
    }
}

/// Documents and deletion markers of one index, in memory: the stdout target's state, and the
/// model the tests check the planner against.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryStore {
    pub docs: BTreeMap<DocId, Map<String, Value>>,
    pub deleted: BTreeMap<DocId, Version>,
}

impl MemoryStore {
    /// The stored version of `id`: the higher of the document's and the marker's.
    pub fn version(&self, id: &DocId) -> Option<Version> {
        let doc = self
            .docs
            .get(id)
            .and_then(|d| d.get(VERSION_FIELD))
            .and_then(Value::as_str)
            .and_then(Version::decode);
        doc.max(self.deleted.get(id).copied())
    }

    /// The version of every document (deletion markers not included).
    pub fn documents(&self) -> HashMap<DocId, Version> {
        self.docs
            .iter()
            .filter_map(|(id, d)| {
                let v = d.get(VERSION_FIELD)?.as_str()?;
                Some((id.clone(), Version::decode(v)?))
            })
            .collect()
    }

    /// Every stored version.
    pub fn versions(&self) -> HashMap<DocId, Version> {
        self.docs
            .keys()
            .chain(self.deleted.keys())
            .filter_map(|id| Some((id.clone(), self.version(id)?)))
            .collect()
    }

    /// Applies one write; returns the document as stored afterwards (`None` once deleted).
    pub fn apply(&mut self, w: &Planned) -> Option<&Map<String, Value>> {
        match &w.write {
            Write::Put { doc, merge: false } => {
                self.docs.insert(w.id.clone(), doc.clone());
            }
            Write::Put { doc, merge: true } => {
                self.docs
                    .entry(w.id.clone())
                    .or_default()
                    .extend(doc.clone());
            }
            Write::Delete => {
                self.deleted.insert(w.id.clone(), w.version);
                self.docs.remove(&w.id);
            }
        }
        self.docs.get(&w.id)
    }
}

/// Prints every write as a JSON line, then — at a clean stop — every document:
///
/// ```text
/// {"index":"orders","action":"upsert","doc":{…,"_id":"100","_version":"…"}}
/// {"index":"orders","action":"delete","_id":"101","_version":"…"}
/// {"index":"orders","action":"document","doc":{…}}
/// ```
///
/// An upsert line shows the whole document as stored after the write (merges included).
pub struct StdoutTarget<W: std::io::Write> {
    out: W,
    indexes: BTreeMap<String, MemoryStore>,
}

impl<W: std::io::Write> StdoutTarget<W> {
    pub fn new(out: W) -> Self {
        StdoutTarget {
            out,
            indexes: BTreeMap::new(),
        }
    }

    /// The documents of `index`, as stored now.
    pub fn store(&self, index: &str) -> Option<&MemoryStore> {
        self.indexes.get(index)
    }

    /// The writer (tests read what was printed).
    pub fn into_inner(self) -> W {
        self.out
    }

    fn line(&mut self, v: &Value) -> Result<(), TargetError> {
        serde_json::to_writer(&mut self.out, v).map_err(std::io::Error::from)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }
}

impl<W: std::io::Write> Target for StdoutTarget<W> {
    async fn prepare(&mut self, index: &str) -> Result<(), TargetError> {
        self.indexes.entry(index.to_string()).or_default();
        Ok(())
    }

    async fn versions(
        &mut self,
        index: &str,
        ids: &[DocId],
    ) -> Result<HashMap<DocId, Version>, TargetError> {
        let store = self.indexes.entry(index.to_string()).or_default();
        Ok(ids
            .iter()
            .filter_map(|id| Some((id.clone(), store.version(id)?)))
            .collect())
    }

    async fn apply(&mut self, index: &str, writes: &[Planned]) -> Result<(), TargetError> {
        for w in writes {
            let store = self.indexes.entry(index.to_string()).or_default();
            let line = match store.apply(w) {
                Some(doc) => json!({"index": index, "action": "upsert", "doc": doc}),
                None => json!({"index": index, "action": "delete", "_id": w.id.as_str(),
                               "_version": w.version.encode()}),
            };
            self.line(&line)?;
        }
        self.out.flush()?;
        Ok(())
    }

    async fn documents(&mut self, index: &str) -> Result<HashMap<DocId, Version>, TargetError> {
        Ok(self
            .indexes
            .get(index)
            .map(MemoryStore::documents)
            .unwrap_or_default())
    }

    async fn finish(&mut self) -> Result<(), TargetError> {
        let mut lines = Vec::new();
        for (index, store) in &self.indexes {
            for doc in store.docs.values() {
                lines.push(json!({"index": index, "action": "document", "doc": doc}));
            }
        }
        for l in &lines {
            self.line(l)?;
        }
        self.out.flush()?;
        Ok(())
    }
}
