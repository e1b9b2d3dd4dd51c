//! From a Kafka record written by pgcdc to what the indexer needs: the document id, the
//! version, and the change. Pure functions, no I/O.
//!
//! - **Version**: [`Version`], the crate's one ordering rule for events
//!   ([`crate::event::order`]): `(source.commit_lsn, source.lsn)`, compared in that order,
//!   except that a snapshot read ranks below every change with its `commit_lsn` (its version
//!   is `(C, 0)`). Commit order is the order in which PostgreSQL made changes visible, and
//!   within one transaction the LSN orders changes of the same row, so a later version is
//!   always the newer state of the row. A re-published event carries the same pair, so equal
//!   versions mean "the same event".
//! - **Document id**: derived from the record key (the primary-key columns) so that every key
//!   maps to one id Meilisearch accepts (`[A-Za-z0-9_-]`, at most 511 bytes) and no two keys
//!   of a table map to the same id (see [`doc_id`]).
//! - **Change**: snapshot reads and inserts carry the whole row and *replace* the document;
//!   updates *merge*, because pgcdc leaves an unchanged TOASTed column out of `after` and the
//!   document must keep its value; deletes remove the document. Tombstones (null values) are
//!   recognised and carry nothing to apply: the delete before them did the work and has the
//!   version.
//! - **Snapshot markers** (`op` `s`, no key) say that one partition of the topic holds every
//!   row of the table's snapshot at their point: [`SnapshotDone`], which the indexer counts
//!   until every partition has shown it (see [`super`]).

use openssl::sha::sha256;
use serde_json::{Map, Value};

/// The field holding the document id in every document.
pub const ID_FIELD: &str = "_id";
/// The field holding the version ([`Version::encode`]) in every document.
pub const VERSION_FIELD: &str = "_version";

pub use crate::event::order::Version;

/// A document id Meilisearch accepts, unique per key within one table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId(String);

impl DocId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An id read back from the search engine (already valid).
    pub fn from_stored(s: &str) -> Option<DocId> {
        valid_id(s).then(|| DocId(s.to_string()))
    }
}

impl std::fmt::Display for DocId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 511
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The document id of a record key (`{"id":42}`, `{"a":"x","b":2}`):
///
/// - one integer column → its decimal form (`42`, `-7`);
/// - one string column of ASCII letters, digits and `_` (1 to 128 bytes) → the string;
/// - anything else (composite keys, other characters, other types) → `k-` and the SHA-256
///   of the key's canonical JSON (object keys sorted), in hex.
///
/// No two keys of one table share an id: a key column has one type, so a table uses one of
/// the first two forms or the third; the third starts with `k-`, which neither of the others
/// can (integers start with a digit or `-`, plain strings contain no `-`).
pub fn doc_id(key: &Value) -> Result<DocId, EventError> {
    let Value::Object(cols) = key else {
        return Err(EventError::KeyNotObject);
    };
    if cols.is_empty() {
        return Err(EventError::NoKey);
    }
    if cols.len() == 1 {
        if let Some(v) = cols.values().next() {
            match v {
                Value::Number(n) if n.is_i64() || n.is_u64() => return Ok(DocId(n.to_string())),
                Value::String(s)
                    if s.len() <= 128
                        && !s.is_empty()
                        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
                {
                    return Ok(DocId(s.clone()))
                }
                _ => {}
            }
        }
    }
    // serde_json's map is ordered by key, so this serialization is canonical.
    let canonical = serde_json::to_vec(key).map_err(|_| EventError::KeyNotObject)?;
    let digest = sha256(&canonical);
    let mut id = String::with_capacity(2 + 64);
    id.push_str("k-");
    for b in digest {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(DocId(id))
}

/// What an event does to its document.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The whole row (snapshot read, insert): the document becomes these fields.
    Replace(Map<String, Value>),
    /// An update: these fields change, fields left out keep their value (unchanged TOAST).
    Merge(Map<String, Value>),
    /// The row is gone.
    Delete,
}

/// One event the indexer can apply.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEvent {
    pub id: DocId,
    pub version: Version,
    pub change: Change,
}

/// A snapshot marker: in the partition it was read from, every row of the table's snapshot
/// taken at `point` came before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotDone {
    /// The snapshot's consistent point (`source.commit_lsn`).
    pub point: u64,
    /// How many partitions the topic had when the snapshot was published: the snapshot is
    /// complete once the marker was seen in partitions `0..partitions`.
    pub partitions: u32,
}

/// What a record turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Event(IndexEvent),
    /// A tombstone: the end of a delete, nothing to apply.
    Tombstone(DocId),
    /// A snapshot marker.
    SnapshotDone(SnapshotDone),
}

/// Why a record cannot be indexed. The indexer logs it and goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the record has no key: only tables with a primary key can be indexed")]
    NoKey,
    #[error("the record key is not a JSON object of key columns")]
    KeyNotObject,
    #[error("the record is not JSON: {0}")]
    NotJson(String),
    #[error("the event has no source.commit_lsn/source.lsn, so it cannot be versioned")]
    NoVersion,
    #[error("the event has no `after` row")]
    NoAfter,
    #[error("operation `{0}` is not supported by the indexer; the event is skipped")]
    UnsupportedOp(String),
    #[error("column `{0}` clashes with a field the indexer adds (`_id`, `_version`); rename it")]
    ReservedColumn(String),
    #[error("snapshot marker without a valid `snapshot.partitions`")]
    BadMarker,
}

/// Parses one record: `key` and `value` as pgcdc wrote them (`value: None` is a tombstone).
pub fn parse_record(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Parsed, EventError> {
    let not_json = |e: serde_json::Error| EventError::NotJson(e.to_string());
    let value: Option<Value> = value
        .map(|v| serde_json::from_slice(v).map_err(not_json))
        .transpose()?;
    if let Some(v) = value.as_ref().filter(|v| v["op"] == "s") {
        return snapshot_done(v).map(Parsed::SnapshotDone);
    }
    let key = key.ok_or(EventError::NoKey)?;
    let key: Value = serde_json::from_slice(key).map_err(not_json)?;
    let id = doc_id(&key)?;
    let Some(mut value) = value else {
        return Ok(Parsed::Tombstone(id));
    };
    let source = &value["source"];
    let op = value["op"].as_str().unwrap_or_default().to_string();
    let version = match (source["commit_lsn"].as_u64(), source["lsn"].as_u64()) {
        (Some(c), Some(l)) => Version::of_event(&op, c, l),
        _ => return Err(EventError::NoVersion),
    };
    let change = match op.as_str() {
        "r" | "c" => Change::Replace(take_after(&mut value)?),
        "u" => Change::Merge(take_after(&mut value)?),
        "d" => Change::Delete,
        _ => return Err(EventError::UnsupportedOp(op)),
    };
    Ok(Parsed::Event(IndexEvent {
        id,
        version,
        change,
    }))
}

fn snapshot_done(value: &Value) -> Result<SnapshotDone, EventError> {
    let point = value["source"]["commit_lsn"]
        .as_u64()
        .ok_or(EventError::NoVersion)?;
    let partitions = value["snapshot"]["partitions"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or(EventError::BadMarker)?;
    Ok(SnapshotDone { point, partitions })
}

fn take_after(value: &mut Value) -> Result<Map<String, Value>, EventError> {
    let Some(Value::Object(after)) = value.get_mut("after").map(Value::take) else {
        return Err(EventError::NoAfter);
    };
    for reserved in [ID_FIELD, VERSION_FIELD] {
        if after.contains_key(reserved) {
            return Err(EventError::ReservedColumn(reserved.to_string()));
        }
    }
    Ok(after)
}

/// The document stored for a row: its columns, flat at the top level, plus `_id` and
/// `_version`.
pub fn shape(id: &DocId, version: Version, mut fields: Map<String, Value>) -> Map<String, Value> {
    fields.insert(ID_FIELD.into(), Value::String(id.0.clone()));
    fields.insert(VERSION_FIELD.into(), Value::String(version.encode()));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(v: Value) -> String {
        doc_id(&v)
            .map(|d| d.0)
            .unwrap_or_else(|e| format!("error: {e}"))
    }

    #[test]
    fn ids_are_readable_when_possible_and_valid_always() {
        assert_eq!(id(json!({"id": 42})), "42");
        assert_eq!(id(json!({"id": -7})), "-7");
        assert_eq!(id(json!({"id": u64::MAX})), u64::MAX.to_string());
        assert_eq!(id(json!({"code": "SKU_12"})), "SKU_12");
        for hashed in [
            json!({"code": "a b"}),
            json!({"code": "a-b"}),
            json!({"code": ""}),
            json!({"price": "19.90"}),
            json!({"a": 1, "b": "x"}),
            json!({"u": "é"}),
        ] {
            let s = id(hashed.clone());
            assert!(s.starts_with("k-") && s.len() == 66, "{hashed}: {s}");
            assert!(valid_id(&s));
        }
        assert_eq!(
            id(json!([1])),
            "error: the record key is not a JSON object of key columns"
        );
        assert!(id(json!({})).starts_with("error"));
    }

    #[test]
    fn composite_ids_do_not_depend_on_column_order_and_differ_by_value() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a":2,"b":1}"#).unwrap();
        assert_eq!(doc_id(&a), doc_id(&b));
        assert_ne!(doc_id(&a), doc_id(&c));
    }

    fn value(op: &str, after: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "before": null, "after": after, "op": op, "ts_ms": 1,
            "source": {"lsn": 120, "commit_lsn": 200, "table": "orders"}
        }))
        .unwrap()
    }

    #[test]
    fn ops_map_to_changes() {
        let key = br#"{"id":1}"#;
        let row = json!({"id": 1, "status": "paid"});
        let Ok(Parsed::Event(e)) = parse_record(Some(key), Some(&value("r", row.clone()))) else {
            panic!("not an event")
        };
        assert_eq!(e.id.as_str(), "1");
        assert_eq!(
            e.version,
            Version::new(200, 0),
            "a read ranks below changes at 200"
        );
        assert!(matches!(e.change, Change::Replace(ref m) if m["status"] == "paid"));
        let Ok(Parsed::Event(e)) = parse_record(Some(key), Some(&value("u", row.clone()))) else {
            panic!("not an event")
        };
        assert!(matches!(e.change, Change::Merge(_)));
        assert_eq!(e.version, Version::new(200, 120));
        let Ok(Parsed::Event(e)) = parse_record(Some(key), Some(&value("d", Value::Null))) else {
            panic!("not an event")
        };
        assert_eq!(e.change, Change::Delete);
        assert_eq!(
            parse_record(Some(key), None),
            Ok(Parsed::Tombstone(DocId("1".into())))
        );
    }

    #[test]
    fn snapshot_markers_are_recognised() {
        let marker = |snapshot: Value| {
            serde_json::to_vec(&json!({
                "before": null, "after": null, "op": "s", "snapshot": snapshot,
                "source": {"lsn": 200, "commit_lsn": 200, "snapshot": "true"}
            }))
            .unwrap()
        };
        let m = marker(json!({"partition": 1, "partitions": 3, "rows": 7}));
        assert_eq!(
            parse_record(None, Some(&m)),
            Ok(Parsed::SnapshotDone(SnapshotDone {
                point: 200,
                partitions: 3
            }))
        );
        for bad in [
            json!(null),
            json!({"partitions": 0}),
            json!({"partitions": "3"}),
        ] {
            assert_eq!(
                parse_record(None, Some(&marker(bad))),
                Err(EventError::BadMarker)
            );
        }
    }

    #[test]
    fn bad_records_are_typed_errors() {
        let key = br#"{"id":1}"#;
        assert_eq!(parse_record(None, Some(b"{}")), Err(EventError::NoKey));
        assert!(matches!(
            parse_record(Some(b"{"), None),
            Err(EventError::NotJson(_))
        ));
        assert!(matches!(
            parse_record(Some(key), Some(b"\xff")),
            Err(EventError::NotJson(_))
        ));
        assert_eq!(
            parse_record(Some(key), Some(br#"{"op":"c","after":{}}"#)),
            Err(EventError::NoVersion)
        );
        assert_eq!(
            parse_record(Some(key), Some(&value("t", Value::Null))),
            Err(EventError::UnsupportedOp("t".into()))
        );
        assert_eq!(
            parse_record(Some(key), Some(&value("c", Value::Null))),
            Err(EventError::NoAfter)
        );
        assert_eq!(
            parse_record(Some(key), Some(&value("c", json!({"_id": 3})))),
            Err(EventError::ReservedColumn("_id".into()))
        );
    }

    #[test]
    fn documents_are_flat_rows_with_id_and_version() {
        let mut row = Map::new();
        row.insert("id".into(), json!(1));
        row.insert("doc".into(), json!({"a": [1]}));
        let d = shape(&DocId("1".into()), Version::new(2, 1), row);
        assert_eq!(
            Value::Object(d),
            json!({"id": 1, "doc": {"a": [1]}, "_id": "1",
                   "_version": "0000000000000002.0000000000000001"})
        );
    }
}
