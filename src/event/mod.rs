//! The change model and its encoders.
//!
//! Snapshot rows (from `COPY`) and streamed changes (from pgoutput) are both turned into the
//! same [`Change`] and encoded by the same [`Encoder`], so a row has one JSON form whether it
//! was read or streamed. Values arrive in PostgreSQL's text form — the form both `COPY ... TO
//! STDOUT` and pgoutput's text tuple data use — and [`json`] maps them to JSON by type OID.
//!
//! The value is a Debezium-style envelope (`before`, `after`, `source`, `op`, `ts_ms`) without
//! the Kafka Connect schema wrapper; the key is a JSON object of the primary-key columns.

use std::sync::Arc;

use bytes::Bytes;

use crate::source::Lsn;

pub mod json;

/// What happened to a row. Serialized as Debezium's one-letter codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A row read by the snapshot.
    Read,
    Create,
    Update,
    Delete,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
        }
    }
}

/// Debezium's `source.snapshot` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMarker {
    /// A snapshot row that is not the last one.
    True,
    /// The final row of the snapshot.
    Last,
    /// A streamed change.
    False,
}

impl SnapshotMarker {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotMarker::True => "true",
            SnapshotMarker::Last => "last",
            SnapshotMarker::False => "false",
        }
    }
}

/// One column of a table as the encoder needs it.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// `"name":` pre-encoded, so the hot path writes it with one copy.
    json_label: Box<[u8]>,
}

impl Column {
    pub fn new(name: impl Into<String>, type_oid: u32) -> Self {
        let name = name.into();
        let mut label = Vec::with_capacity(name.len() + 3);
        json::write_str(&mut label, name.as_bytes());
        label.push(b':');
        Column {
            name,
            type_oid,
            json_label: label.into_boxed_slice(),
        }
    }
}

/// The shape of a published table: what both the snapshot and the stream encode against.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub schema: String,
    pub name: String,
    pub topic: Arc<str>,
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the Kafka key columns, in key order. Empty: no key.
    pub key: Vec<usize>,
}

impl TableSchema {
    /// Builds a schema; `key_names` are the primary-key columns in key order. Key names that
    /// are not among `columns` are ignored (the caller validates keys up front).
    pub fn new(
        schema: impl Into<String>,
        name: impl Into<String>,
        topic: Arc<str>,
        columns: Vec<Column>,
        key_names: &[String],
    ) -> Self {
        let key = key_names
            .iter()
            .filter_map(|k| columns.iter().position(|c| &c.name == k))
            .collect();
        TableSchema {
            schema: schema.into(),
            name: name.into(),
            topic,
            columns,
            key,
        }
    }

    /// `schema.table`, for messages.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A column value in PostgreSQL's text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datum<'a> {
    Null,
    Text(&'a [u8]),
    /// An unchanged TOASTed value that pgoutput did not send: it is left out of the event.
    Unchanged,
}

/// Where a change comes from, for `source`.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    /// This change's LSN.
    pub lsn: Lsn,
    /// The LSN of its transaction's commit (the snapshot's consistent point for reads).
    pub commit_lsn: Lsn,
    pub xid: Option<u32>,
    /// Commit time (snapshot start for reads), Unix epoch milliseconds.
    pub commit_ts_ms: i64,
    pub snapshot: SnapshotMarker,
}

/// One change to one row, borrowing its values.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub op: Op,
    pub before: Option<&'a [Datum<'a>]>,
    pub after: Option<&'a [Datum<'a>]>,
    pub position: Position,
}

/// Encodes keys and envelopes. Holds what is the same for every event of a run.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// `"source":{"connector":"pgcdc","version":…,"name":…,"db":…,` pre-encoded.
    source_prefix: Vec<u8>,
}

impl Encoder {
    /// `name` is the logical server name (the topic prefix), `db` the database name.
    pub fn new(name: &str, db: &str) -> Self {
        let mut p = Vec::with_capacity(96);
        p.extend_from_slice(b"\"source\":{\"connector\":\"pgcdc\",\"version\":");
        json::write_str(&mut p, env!("CARGO_PKG_VERSION").as_bytes());
        p.extend_from_slice(b",\"name\":");
        json::write_str(&mut p, name.as_bytes());
        p.extend_from_slice(b",\"db\":");
        json::write_str(&mut p, db.as_bytes());
        Encoder { source_prefix: p }
    }

    /// The Kafka key: `{"id":42}` from the key columns of `row`, or `None` without a key.
    pub fn key(&self, table: &TableSchema, row: &[Datum<'_>]) -> Option<Bytes> {
        if table.key.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(16 * table.key.len());
        out.push(b'{');
        for (n, &i) in table.key.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            let col = &table.columns[i];
            out.extend_from_slice(&col.json_label);
            json::write_datum(
                &mut out,
                col.type_oid,
                row.get(i).copied().unwrap_or(Datum::Null),
            );
        }
        out.push(b'}');
        Some(out.into())
    }

    /// The event value: the envelope with `before`, `after`, `source`, `op`, `ts_ms`.
    pub fn value(&self, table: &TableSchema, change: &Change<'_>, now_ms: i64) -> Bytes {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"before\":");
        write_row(&mut out, table, change.before);
        out.extend_from_slice(b",\"after\":");
        write_row(&mut out, table, change.after);
        out.push(b',');
        out.extend_from_slice(&self.source_prefix);
        out.extend_from_slice(b",\"schema\":");
        json::write_str(&mut out, table.schema.as_bytes());
        out.extend_from_slice(b",\"table\":");
        json::write_str(&mut out, table.name.as_bytes());
        let p = &change.position;
        push_fmt(&mut out, format_args!(",\"lsn\":{}", p.lsn.0));
        match p.xid {
            Some(x) => push_fmt(&mut out, format_args!(",\"txId\":{x}")),
            None => out.extend_from_slice(b",\"txId\":null"),
        }
        push_fmt(&mut out, format_args!(",\"ts_ms\":{}", p.commit_ts_ms));
        out.extend_from_slice(b",\"snapshot\":\"");
        out.extend_from_slice(p.snapshot.as_str().as_bytes());
        push_fmt(
            &mut out,
            format_args!("\",\"commit_lsn\":{}}},\"op\":\"", p.commit_lsn.0),
        );
        out.extend_from_slice(change.op.code().as_bytes());
        push_fmt(&mut out, format_args!("\",\"ts_ms\":{now_ms}}}"));
        out.into()
    }
}

fn write_row(out: &mut Vec<u8>, table: &TableSchema, row: Option<&[Datum<'_>]>) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    let mut first = true;
    for (col, datum) in table.columns.iter().zip(row.iter()) {
        if *datum == Datum::Unchanged {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&col.json_label);
        json::write_datum(out, col.type_oid, *datum);
    }
    out.push(b'}');
}

fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = out.write_fmt(args);
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use json::oid;

    fn table() -> TableSchema {
        TableSchema::new(
            "public",
            "orders",
            Arc::from("pgcdc.public.orders"),
            vec![
                Column::new("id", oid::INT8),
                Column::new("note", oid::TEXT),
                Column::new("paid", oid::BOOL),
                Column::new("doc", oid::JSONB),
            ],
            &["id".to_string()],
        )
    }

    fn pos() -> Position {
        Position {
            lsn: Lsn(100),
            commit_lsn: Lsn(200),
            xid: Some(7),
            commit_ts_ms: 1_700_000_000_000,
            snapshot: SnapshotMarker::False,
        }
    }

    #[test]
    fn key_is_an_object_of_key_columns() {
        let row = [
            Datum::Text(b"42"),
            Datum::Text(b"x"),
            Datum::Null,
            Datum::Null,
        ];
        let key = Encoder::new("pgcdc", "db").key(&table(), &row).unwrap();
        assert_eq!(&key[..], br#"{"id":42}"#);
    }

    #[test]
    fn envelope_has_debezium_fields() {
        let row = [
            Datum::Text(b"42"),
            Datum::Text(b"tab\there \"q\""),
            Datum::Text(b"t"),
            Datum::Text(br#"{"a": [1, 2]}"#),
        ];
        let change = Change {
            op: Op::Create,
            before: None,
            after: Some(&row),
            position: pos(),
        };
        let v = Encoder::new("pgcdc", "shop").value(&table(), &change, 5);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["op"], "c");
        assert_eq!(parsed["before"], serde_json::Value::Null);
        assert_eq!(parsed["after"]["id"], 42);
        assert_eq!(parsed["after"]["note"], "tab\there \"q\"");
        assert_eq!(parsed["after"]["paid"], true);
        assert_eq!(parsed["after"]["doc"]["a"][1], 2);
        assert_eq!(parsed["source"]["connector"], "pgcdc");
        assert_eq!(parsed["source"]["db"], "shop");
        assert_eq!(parsed["source"]["table"], "orders");
        assert_eq!(parsed["source"]["lsn"], 100);
        assert_eq!(parsed["source"]["commit_lsn"], 200);
        assert_eq!(parsed["source"]["txId"], 7);
        assert_eq!(parsed["source"]["snapshot"], "false");
        assert_eq!(parsed["ts_ms"], 5);
        // jsonb is embedded compactly, so the event stays on one line.
        assert!(v.windows(9).any(|w| w == br#"{"a":[1,2"#));
    }

    #[test]
    fn unchanged_toast_is_left_out() {
        let row = [
            Datum::Text(b"1"),
            Datum::Unchanged,
            Datum::Text(b"f"),
            Datum::Null,
        ];
        let change = Change {
            op: Op::Update,
            before: None,
            after: Some(&row),
            position: pos(),
        };
        let v = Encoder::new("p", "d").value(&table(), &change, 0);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert!(parsed["after"].get("note").is_none());
        assert_eq!(parsed["after"]["paid"], false);
        assert_eq!(parsed["after"]["doc"], serde_json::Value::Null);
    }
}
