//! Durable progress: which slot a completed snapshot belongs to, and how far events are
//! acknowledged.
//!
//! Two positions matter and live in two places:
//!
//! * **The stream position** lives in PostgreSQL, as the slot's `confirmed_flush_lsn`. pgcdc
//!   confirms an LSN only after the sink acknowledged every event at or below it (see
//!   [`crate::sink`]), so after any crash the server re-sends at most the unacknowledged tail.
//! * **The snapshot state** cannot live in the slot: a slot says nothing about whether the
//!   rows of its exported snapshot were all published. It is kept as a [`Progress`] record
//!   next to the data — in a compacted Kafka topic keyed by database and slot, or in a file
//!   for the stdout sink — and written *after* the sink acknowledged every snapshot row.
//!   [`ProgressStore`] is the one place that finds, reads and writes it: for `run`, and for
//!   the `status`, `verify` and `drop` commands.
//!
//! The record names the tables whose snapshot is complete, so start-up can tell a table that
//! needs one (new to the capture, or unfinished) from those that do not, and a record whose
//! slot is gone from a first start (the decision table is in `run::start`). Because the
//! record is an ordinary keyed Kafka message, a later transactional mode can commit events
//! and progress in one transaction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::Lsn;

mod store;

pub use store::{barrier, ProgressStore};

/// What is durably known about one slot's run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Format version of this record.
    pub version: u32,
    /// PostgreSQL's system identifier (IDENTIFY_SYSTEM), so a record never applies to
    /// another server that happens to have a slot of the same name.
    pub system_id: String,
    pub database: String,
    pub slot: String,
    pub snapshot: SnapshotState,
    /// The slot's consistent point when it was created by pgcdc.
    pub slot_lsn: u64,
    /// The highest LSN whose events were all acknowledged when this record was written.
    pub acked_lsn: u64,
    /// Wall-clock time of the write, Unix epoch milliseconds.
    pub updated_ms: i64,
    /// The OID each recorded table had when its snapshot was taken: a table dropped and
    /// created again under the same name is a new table, whose rows need a snapshot.
    /// Absent in records written before pgcdc kept it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub table_oids: BTreeMap<String, u32>,
}

/// Where the snapshot of a slot's tables stands. Table names are written as `schema.table`
/// with SQL quoting where a part needs it (read back with [`TableName`]'s parser, which
/// accepts both the quoted and the bare form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SnapshotState {
    /// A snapshot of `tables` started and did not finish: a restart must redo it. The
    /// tables in `completed` were snapshotted before (by an earlier run of this slot) and
    /// need nothing more.
    InProgress {
        tables: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        completed: Vec<String>,
    },
    /// Every row of every table in `tables` was acknowledged by the sink.
    Completed { tables: Vec<String>, rows: u64 },
    /// `--snapshot never`: streaming without a snapshot, by request.
    Skipped,
}

impl SnapshotState {
    /// The tables whose snapshot is complete.
    pub fn completed_tables(&self) -> &[String] {
        match self {
            SnapshotState::InProgress { completed, .. } => completed,
            SnapshotState::Completed { tables, .. } => tables,
            SnapshotState::Skipped => &[],
        }
    }
}

impl Progress {
    pub const VERSION: u32 = 1;

    /// True when this record says the slot's snapshot is done (or was skipped by request).
    pub fn snapshot_done(&self) -> bool {
        matches!(
            self.snapshot,
            SnapshotState::Completed { .. } | SnapshotState::Skipped
        )
    }

    /// The key of this record in the progress topic.
    pub fn key(database: &str, slot: &str) -> String {
        format!("{database}/{slot}")
    }

    pub fn acked(&self) -> Lsn {
        Lsn(self.acked_lsn)
    }
}

/// Why progress could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read progress file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write progress file {path}: {source} (choose a writable place with --progress-file)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("progress record {what} is not valid ({source}); move it aside to start over with a new snapshot")]
    Corrupt {
        what: String,
        source: serde_json::Error,
    },
}

/// Parses a stored record.
pub fn decode(what: &str, bytes: &[u8]) -> Result<Progress, CheckpointError> {
    serde_json::from_slice(bytes).map_err(|source| CheckpointError::Corrupt {
        what: what.to_string(),
        source,
    })
}

/// Serializes a record.
pub fn encode(p: &Progress) -> Vec<u8> {
    // A struct of strings and integers always serializes.
    serde_json::to_vec(p).unwrap_or_default()
}

/// Progress kept in a local file (the stdout sink has nowhere else to keep it).
#[derive(Debug, Clone)]
pub struct FileStore {
    pub path: PathBuf,
}

impl FileStore {
    /// The default file: `$XDG_STATE_HOME/pgcdc/` (or `~/.local/state/pgcdc/`), named after
    /// the database and slot.
    pub fn default_path(database: &str, slot: &str) -> PathBuf {
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
            .unwrap_or_else(|| PathBuf::from("."));
        let safe = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        base.join("pgcdc")
            .join(format!("{}-{}.json", safe(database), safe(slot)))
    }

    pub fn load(&self) -> Result<Option<Progress>, CheckpointError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => decode(&self.path.display().to_string(), &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Writes atomically: a temporary file, fsync, rename, fsync of the directory.
    pub fn save(&self, p: &Progress) -> Result<(), CheckpointError> {
        use std::io::Write;
        let err = |source| CheckpointError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&encode(p)).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Progress {
        Progress {
            version: Progress::VERSION,
            system_id: "7300000000000000001".into(),
            database: "shop".into(),
            slot: "pgcdc".into(),
            snapshot: SnapshotState::Completed {
                tables: vec!["public.orders".into()],
                rows: 10,
            },
            slot_lsn: 100,
            acked_lsn: 200,
            updated_ms: 1,
            table_oids: BTreeMap::new(),
        }
    }

    #[test]
    fn file_store_round_trip() {
        let dir = std::env::temp_dir().join(format!("pgcdc-ckpt-{}", std::process::id()));
        let store = FileStore {
            path: dir.join("x/p.json"),
        };
        assert_eq!(store.load().unwrap(), None);
        store.save(&sample()).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample()));
        std::fs::write(&store.path, b"{nope").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn in_progress_is_not_done() {
        let mut p = sample();
        assert!(p.snapshot_done());
        p.snapshot = SnapshotState::InProgress {
            tables: vec![],
            completed: vec![],
        };
        assert!(!p.snapshot_done());
        let json = String::from_utf8(encode(&p)).unwrap();
        assert!(json.contains(r#""state":"in_progress""#), "{json}");
    }
}
