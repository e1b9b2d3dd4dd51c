//! The change model and its encoders.
//!
//! Snapshot rows (from `COPY`) and streamed changes (from pgoutput) are both turned into the
//! same [`Change`] and encoded by the same [`Encoder`], so a row has one JSON form whether it
//! was read or streamed. Values arrive in PostgreSQL's text form — the form both `COPY ... TO
//! STDOUT` and pgoutput's text tuple data use — and [`json`] maps them to JSON by the
//! column's [`Kind`], resolved once per column from the type catalog ([`kind`]).
//!
//! Two value formats ([`Format`]): a Debezium-style envelope (`before`, `after`, `source`,
//! `op`, `ts_ms`) without the Kafka Connect schema wrapper, or the flat row with `__op`,
//! `__table`, `__lsn`, `__deleted`. The key is a JSON object of the primary-key columns
//! either way. Besides row events, a snapshot marker ends each table's snapshot
//! ([`Encoder::snapshot_marker`]). The README's "Event format" section is the reference for
//! every field; [`order`] holds the one rule that orders a row's events.

use std::sync::Arc;

use bytes::Bytes;

use crate::model::Lsn;
pub use crate::model::Op;

pub mod headers;
pub mod json;
pub mod kind;
mod nested;
pub mod order;
mod time;

pub use kind::{BinaryMode, DecimalMode, Kind, TypeDesc, TypeRegistry};

/// `--format`: the shape of an event value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// {"before","after","source","op","ts_ms"}, as Debezium writes it.
    #[default]
    Envelope,
    /// The row itself plus "__op", "__table", "__lsn" and "__deleted".
    Flat,
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
    /// How its values are encoded.
    pub kind: Kind,
    /// `"name":` pre-encoded, so the hot path writes it with one copy.
    json_label: Box<[u8]>,
}

impl Column {
    /// A column of a built-in type (other types are encoded as text); see [`Column::with_kind`].
    pub fn new(name: impl Into<String>, type_oid: u32) -> Self {
        let kind = kind::builtin(type_oid, DecimalMode::default(), BinaryMode::default())
            .unwrap_or(Kind::Text);
        Column::with_kind(name, type_oid, kind)
    }

    pub fn with_kind(name: impl Into<String>, type_oid: u32, kind: Kind) -> Self {
        let name = name.into();
        let mut label = Vec::with_capacity(name.len() + 3);
        json::write_str(&mut label, name.as_bytes());
        label.push(b':');
        Column {
            name,
            type_oid,
            kind,
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
    /// Fingerprint of the column names and types, in order: `source.schema_id`.
    pub schema_id: u64,
    /// `schema.table`, unquoted: transaction metadata and `__table`.
    pub qualified: Arc<str>,
    /// `,"schema":…,"table":…,"schema_id":…` pre-encoded for `source`.
    source_fields: Box<[u8]>,
    /// `"__table":"schema.table"` pre-encoded for the flat format.
    flat_table: Box<[u8]>,
    /// Bytes of one encoded row besides its values: braces, labels, commas, quotes.
    row_overhead: usize,
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
        let schema: String = schema.into();
        let name: String = name.into();
        let qualified: Arc<str> = format!("{schema}.{name}").into();
        let id = schema_id(&columns);
        let mut source_fields = Vec::with_capacity(schema.len() + name.len() + 60);
        source_fields.extend_from_slice(b",\"schema\":");
        json::write_str(&mut source_fields, schema.as_bytes());
        source_fields.extend_from_slice(b",\"table\":");
        json::write_str(&mut source_fields, name.as_bytes());
        push_fmt(
            &mut source_fields,
            format_args!(",\"schema_id\":\"{id:016x}\""),
        );
        let row_overhead = 2 + columns
            .iter()
            .map(|c| c.json_label.len() + 3)
            .sum::<usize>();
        let mut flat_table = b"\"__table\":".to_vec();
        json::write_str(&mut flat_table, qualified.as_bytes());
        TableSchema {
            schema_id: id,
            schema,
            name,
            topic,
            columns,
            key,
            qualified,
            source_fields: source_fields.into_boxed_slice(),
            flat_table: flat_table.into_boxed_slice(),
            row_overhead,
        }
    }

    /// `schema.table`, for messages.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The first key column `row` has no value for (NULL, not sent, or absent). A keyed
    /// table's key columns are NOT NULL and in every row and old key tuple PostgreSQL sends,
    /// so such a row is a bug to report, never an event to publish under a null key.
    pub fn missing_key(&self, row: &[Datum<'_>]) -> Option<&str> {
        self.key
            .iter()
            .find(|&&i| matches!(row.get(i), None | Some(Datum::Null | Datum::Unchanged)))
            .map(|&i| self.columns[i].name.as_str())
    }
}

/// FNV-1a over the names and type OIDs: stable across runs and between snapshot and stream.
fn schema_id(columns: &[Column]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for c in columns {
        eat(c.name.as_bytes());
        eat(&[0]);
        eat(&c.type_oid.to_le_bytes());
    }
    h
}

/// A column value in PostgreSQL's text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datum<'a> {
    Null,
    Text(&'a [u8]),
    /// The JSON the encoder would write for this column's text form, written already (binary
    /// snapshot rows, see [`crate::source::copy_binary`]).
    Json(&'a [u8]),
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

/// A data event's place in its transaction (`--transaction-metadata`).
#[derive(Debug, Clone, Copy)]
pub struct TxnOrder<'a> {
    /// `<xid>:<commit_lsn>`, the id of the BEGIN/END events.
    pub id: &'a str,
    /// 1-based position among the transaction's data events.
    pub total_order: u64,
    /// 1-based position among the transaction's events for this table.
    pub data_collection_order: u64,
}

/// One change to one row, borrowing its values.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub op: Op,
    pub before: Option<&'a [Datum<'a>]>,
    pub after: Option<&'a [Datum<'a>]>,
    pub position: Position,
    pub transaction: Option<TxnOrder<'a>>,
    /// The transaction's annotations so far, a JSON object already encoded (see
    /// `source::changes`): `source.annotations`, or `__annotations` in the flat format.
    pub annotations: Option<&'a [u8]>,
}

/// A `pg_logical_emit_message` message.
#[derive(Debug, Clone, Copy)]
pub struct MessageEvent<'a> {
    pub prefix: &'a str,
    pub content: &'a [u8],
    pub transactional: bool,
    pub position: Position,
}

/// Choices that shape every event of a run, decided once from the event flags
/// (`cli::RunArgs::event_options`); `verify` decides them from the same flags
/// (`cli::EventArgs::event_options`), so it encodes a row as `run` published it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventOptions {
    pub format: Format,
    /// Add `transaction` to envelopes (`--transaction-metadata`).
    pub transaction_metadata: bool,
    /// How `numeric` values are written (`--decimal`).
    pub decimal: DecimalMode,
    /// How `bytea` values and message contents are written (`--binary`).
    pub binary: BinaryMode,
    /// Whether Kafka records carry pgcdc's headers (`--event-headers`, see [`headers`]).
    pub headers: EventHeaders,
}

/// `--event-headers`: whether records carry the event id and annotations headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventHeaders {
    #[default]
    On,
    Off,
}

impl EventOptions {
    /// The type registry these options encode with: the built-in types, before the
    /// server's own are loaded into it (`source::schema::load_types`).
    pub fn types(&self) -> TypeRegistry {
        TypeRegistry::new(self.decimal, self.binary)
    }
}

/// Encodes keys and values. Holds what is the same for every event of a run.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// `"source":{"connector":"pgcdc","version":…,"name":…,"db":…,` pre-encoded.
    source_prefix: Vec<u8>,
    options: EventOptions,
    /// The types known at start: what snapshot and stream resolve column kinds with.
    types: Arc<TypeRegistry>,
}

/// The end of a snapshot read event, pre-encoded by [`Encoder::read_tail`].
#[derive(Debug, Clone)]
pub struct ReadTail {
    bytes: Vec<u8>,
    position: Position,
    now_ms: i64,
}

impl ReadTail {
    /// The snapshot's position, which every read event of the table carries.
    pub fn position(&self) -> Position {
        self.position
    }
}

impl Encoder {
    /// `name` is the logical server name (the topic prefix), `db` the database name. Default
    /// options, built-in types only.
    pub fn new(name: &str, db: &str) -> Self {
        Encoder::with_options(name, db, EventOptions::default(), TypeRegistry::default())
    }

    pub fn with_options(name: &str, db: &str, options: EventOptions, types: TypeRegistry) -> Self {
        let mut p = Vec::with_capacity(96);
        p.extend_from_slice(b"\"source\":{\"connector\":\"pgcdc\",\"version\":");
        json::write_str(&mut p, env!("CARGO_PKG_VERSION").as_bytes());
        p.extend_from_slice(b",\"name\":");
        json::write_str(&mut p, name.as_bytes());
        p.extend_from_slice(b",\"db\":");
        json::write_str(&mut p, db.as_bytes());
        Encoder {
            source_prefix: p,
            options,
            types: Arc::new(types),
        }
    }

    pub fn options(&self) -> EventOptions {
        self.options
    }

    /// The type registry built at start.
    pub fn types(&self) -> &Arc<TypeRegistry> {
        &self.types
    }

    /// The Kafka key: `{"id":42}` from the key columns of `row`, or `None` without a key.
    pub fn key(&self, table: &TableSchema, row: &[Datum<'_>]) -> Option<Bytes> {
        if table.key.is_empty() {
            return None;
        }
        // Exact for numbers and plain text, so `Bytes` can take the buffer over without
        // allocating its shared header.
        let len = 1 + table
            .key
            .iter()
            .map(|&i| {
                let col = &table.columns[i];
                1 + col.json_label.len() + json_len_guess(&col.kind, row.get(i))
            })
            .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.push(b'{');
        for (n, &i) in table.key.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            let col = &table.columns[i];
            out.extend_from_slice(&col.json_label);
            json::write_value(
                &mut out,
                &col.kind,
                row.get(i).copied().unwrap_or(Datum::Null),
            );
        }
        out.push(b'}');
        Some(out.into())
    }

    /// The event value, in the run's [`Format`].
    pub fn value(&self, table: &TableSchema, change: &Change<'_>, now_ms: i64) -> Bytes {
        let mut out = Vec::with_capacity(self.value_capacity(table, change));
        match self.options.format {
            Format::Envelope => self.envelope(&mut out, table, change, now_ms),
            Format::Flat => flat(&mut out, table, change),
        }
        out.into()
    }

    /// A guess at the encoded size, so the buffer is rarely reallocated: the values' text
    /// (JSON is about as long; escapes and the odd long timestamp may exceed it) plus the rest.
    fn value_capacity(&self, table: &TableSchema, change: &Change<'_>) -> usize {
        let row = |r: Option<&[Datum<'_>]>| {
            r.map_or(4, |r| {
                table.row_overhead + r.iter().map(|d| text_len(Some(d))).sum::<usize>()
            })
        };
        let transaction = change.transaction.map_or(0, |t| t.id.len() + 96)
            + change.annotations.map_or(0, |a| a.len() + 20);
        // 192: the envelope's field names, the op, and up to five 20-digit integers.
        row(change.before)
            + row(change.after)
            + self.source_prefix.len()
            + table.source_fields.len()
            + transaction
            + 192
    }

    fn envelope(&self, out: &mut Vec<u8>, table: &TableSchema, change: &Change<'_>, now_ms: i64) {
        out.extend_from_slice(b"{\"before\":");
        write_row(out, table, change.before);
        out.extend_from_slice(b",\"after\":");
        write_row(out, table, change.after);
        if let Some(after) = change.after {
            write_unchanged(out, b",\"unchanged\":", table, after);
        }
        self.envelope_tail(out, table, change, now_ms);
    }

    /// The envelope after the row data: the source block, op, time and transaction.
    fn envelope_tail(
        &self,
        out: &mut Vec<u8>,
        table: &TableSchema,
        change: &Change<'_>,
        now_ms: i64,
    ) {
        out.push(b',');
        out.extend_from_slice(&self.source_prefix);
        out.extend_from_slice(&table.source_fields);
        write_position(out, &change.position);
        if let Some(a) = change.annotations {
            out.extend_from_slice(b",\"annotations\":");
            out.extend_from_slice(a);
        }
        out.extend_from_slice(b"},\"op\":\"");
        out.extend_from_slice(change.op.code().as_bytes());
        out.extend_from_slice(b"\",\"ts_ms\":");
        push_int(out, now_ms);
        if self.options.transaction_metadata {
            match &change.transaction {
                None => out.extend_from_slice(b",\"transaction\":null"),
                Some(t) => {
                    out.extend_from_slice(b",\"transaction\":{\"id\":");
                    json::write_str(out, t.id.as_bytes());
                    out.extend_from_slice(b",\"total_order\":");
                    push_int(out, t.total_order);
                    out.extend_from_slice(b",\"data_collection_order\":");
                    push_int(out, t.data_collection_order);
                    out.push(b'}');
                }
            }
        }
        out.push(b'}');
    }

    /// What every snapshot read event of `table` shares after its row, encoded once: a
    /// snapshot reads all rows at one position and time, so the ~230 bytes of source block,
    /// op and times are copied per row instead of formatted per row. See [`Self::read_value`].
    pub fn read_tail(&self, table: &TableSchema, position: Position, now_ms: i64) -> ReadTail {
        let change = Change {
            op: Op::Read,
            before: None,
            after: None,
            position,
            transaction: None,
            annotations: None,
        };
        let mut tail = Vec::new();
        self.envelope_tail(&mut tail, table, &change, now_ms);
        ReadTail {
            bytes: tail,
            position,
            now_ms,
        }
    }

    /// The value of a snapshot read event of `row`: the same bytes as [`Self::value`] with
    /// `op: Read`, the tail's position and time, and no transaction.
    pub fn read_value(&self, table: &TableSchema, row: &[Datum<'_>], tail: &ReadTail) -> Bytes {
        let change = Change {
            op: Op::Read,
            before: None,
            after: Some(row),
            position: tail.position,
            transaction: None,
            annotations: None,
        };
        if self.options.format != Format::Envelope {
            return self.value(table, &change, tail.now_ms);
        }
        let mut out = Vec::with_capacity(self.value_capacity(table, &change));
        out.extend_from_slice(b"{\"before\":null,\"after\":");
        write_row(&mut out, table, Some(row));
        write_unchanged(&mut out, b",\"unchanged\":", table, row);
        out.extend_from_slice(&tail.bytes);
        out.into()
    }

    /// Marks an encoded snapshot read event as the snapshot's last (`"snapshot":"last"`).
    /// The flat format has no marker: nothing to do.
    pub fn mark_last(&self, value: &mut [u8]) {
        if self.options.format != Format::Envelope {
            return;
        }
        // The source block follows the row data and only `transaction` (null for reads)
        // comes after it, so the last occurrence is the right one; both words have four
        // letters, so it is patched in place.
        const NEEDLE: &[u8] = b"\"snapshot\":\"true\"";
        if let Some(pos) = value.windows(NEEDLE.len()).rposition(|w| w == NEEDLE) {
            let at = pos + b"\"snapshot\":\"".len();
            value[at..at + 4].copy_from_slice(b"last");
        }
    }

    /// The value of a snapshot marker: the snapshot of `table` at `position` (its consistent
    /// point, `snapshot` `"true"`) is complete in `partition` of the topic's `partitions` —
    /// every one of its `rows` read events (counted over the whole table) was published before
    /// it. Published with a null key, explicitly to each partition (one marker in all on
    /// stdout: partition 0 of 1). Envelope:
    /// `{"before":null,"after":null,"source":{…},"op":"s","snapshot":{"partition":0,"partitions":3,"rows":42},"ts_ms":…}`;
    /// flat: `{"__op":"s","__table":…,"__lsn":…,"__deleted":false,"__partition":0,"__partitions":3,"__rows":42}`.
    pub fn snapshot_marker(
        &self,
        table: &TableSchema,
        position: Position,
        partition: i32,
        partitions: i32,
        rows: u64,
        now_ms: i64,
    ) -> Bytes {
        let mut out =
            Vec::with_capacity(self.source_prefix.len() + table.source_fields.len() + 256);
        match self.options.format {
            Format::Envelope => {
                out.extend_from_slice(b"{\"before\":null,\"after\":null,");
                out.extend_from_slice(&self.source_prefix);
                out.extend_from_slice(&table.source_fields);
                write_position(&mut out, &position);
                out.extend_from_slice(b"},\"op\":\"s\",\"snapshot\":{\"partition\":");
                push_int(&mut out, partition);
                out.extend_from_slice(b",\"partitions\":");
                push_int(&mut out, partitions);
                out.extend_from_slice(b",\"rows\":");
                push_int(&mut out, rows);
                out.extend_from_slice(b"},\"ts_ms\":");
                push_int(&mut out, now_ms);
                if self.options.transaction_metadata {
                    out.extend_from_slice(b",\"transaction\":null");
                }
                out.push(b'}');
            }
            Format::Flat => {
                out.extend_from_slice(b"{\"__op\":\"s\",");
                out.extend_from_slice(&table.flat_table);
                out.extend_from_slice(b",\"__lsn\":");
                push_int(&mut out, position.lsn.0);
                out.extend_from_slice(b",\"__deleted\":false,\"__partition\":");
                push_int(&mut out, partition);
                out.extend_from_slice(b",\"__partitions\":");
                push_int(&mut out, partitions);
                out.extend_from_slice(b",\"__rows\":");
                push_int(&mut out, rows);
                out.push(b'}');
            }
        }
        out.into()
    }

    /// Key and value of a logical decoding message (`<prefix>.message` topic). The key is
    /// the message prefix, so messages with one prefix stay in order on one partition.
    pub fn message(&self, m: &MessageEvent<'_>, binary: BinaryMode, now_ms: i64) -> (Bytes, Bytes) {
        let mut key = Vec::with_capacity(m.prefix.len() + 14);
        key.extend_from_slice(b"{\"prefix\":");
        json::write_str(&mut key, m.prefix.as_bytes());
        key.push(b'}');
        let mut out = Vec::with_capacity(160 + m.content.len() * 4 / 3);
        out.extend_from_slice(b"{\"op\":\"m\",\"ts_ms\":");
        push_int(&mut out, now_ms);
        out.push(b',');
        out.extend_from_slice(&self.source_prefix);
        write_position(&mut out, &m.position);
        out.extend_from_slice(b"},\"message\":{\"prefix\":");
        json::write_str(&mut out, m.prefix.as_bytes());
        out.extend_from_slice(b",\"content\":");
        json::write_bytes(&mut out, m.content, binary == BinaryMode::Hex);
        out.extend_from_slice(if m.transactional {
            b",\"transactional\":true}}"
        } else {
            b",\"transactional\":false}}"
        });
        (key.into(), out.into())
    }

    /// Key and value of a transaction's BEGIN (`counts: None`) or END event
    /// (`<prefix>.transaction` topic). `counts` holds the events per table.
    pub fn transaction(
        &self,
        id: &str,
        ts_ms: i64,
        counts: Option<&[(Arc<str>, u64)]>,
    ) -> (Bytes, Bytes) {
        let mut key = Vec::with_capacity(id.len() + 10);
        key.extend_from_slice(b"{\"id\":");
        json::write_str(&mut key, id.as_bytes());
        key.push(b'}');
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"{\"status\":");
        out.extend_from_slice(if counts.is_some() {
            b"\"END\""
        } else {
            b"\"BEGIN\""
        });
        out.extend_from_slice(b",\"id\":");
        json::write_str(&mut out, id.as_bytes());
        out.extend_from_slice(b",\"ts_ms\":");
        push_int(&mut out, ts_ms);
        match counts {
            None => out.extend_from_slice(b",\"event_count\":null,\"data_collections\":null}"),
            Some(counts) => {
                let total: u64 = counts.iter().map(|(_, n)| n).sum();
                out.extend_from_slice(b",\"event_count\":");
                push_int(&mut out, total);
                out.extend_from_slice(b",\"data_collections\":[");
                for (i, (table, n)) in counts.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(b"{\"data_collection\":");
                    json::write_str(&mut out, table.as_bytes());
                    out.extend_from_slice(b",\"event_count\":");
                    push_int(&mut out, *n);
                    out.push(b'}');
                }
                out.extend_from_slice(b"]}");
            }
        }
        (key.into(), out.into())
    }
}

/// `,"lsn":…,"txId":…,"ts_ms":…,"snapshot":…,"commit_lsn":…` (the source block stays open).
fn write_position(out: &mut Vec<u8>, p: &Position) {
    out.extend_from_slice(b",\"lsn\":");
    push_int(out, p.lsn.0);
    out.extend_from_slice(b",\"txId\":");
    match p.xid {
        Some(x) => push_int(out, x),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"ts_ms\":");
    push_int(out, p.commit_ts_ms);
    out.extend_from_slice(b",\"snapshot\":\"");
    out.extend_from_slice(p.snapshot.as_str().as_bytes());
    out.extend_from_slice(b"\",\"commit_lsn\":");
    push_int(out, p.commit_lsn.0);
}

/// The flat format: the row (`after`, or `before` for a delete) and `__` fields.
fn flat(out: &mut Vec<u8>, table: &TableSchema, change: &Change<'_>) {
    out.push(b'{');
    let row = change.after.or(change.before);
    let wrote = row.is_some_and(|r| write_fields(out, table, r));
    if let Some(after) = change.after {
        write_unchanged(out, b",\"__unchanged\":", table, after);
    }
    if wrote {
        out.push(b',');
    }
    out.extend_from_slice(b"\"__op\":\"");
    out.extend_from_slice(change.op.code().as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(&table.flat_table);
    out.extend_from_slice(b",\"__lsn\":");
    push_int(out, change.position.lsn.0);
    if let Some(a) = change.annotations {
        out.extend_from_slice(b",\"__annotations\":");
        out.extend_from_slice(a);
    }
    out.extend_from_slice(if change.op == Op::Delete {
        b",\"__deleted\":true}"
    } else {
        b",\"__deleted\":false}"
    });
}

fn write_row(out: &mut Vec<u8>, table: &TableSchema, row: Option<&[Datum<'_>]>) {
    let Some(row) = row else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    write_fields(out, table, row);
    out.push(b'}');
}

/// Length of a datum's text form (0 for none).
fn text_len(d: Option<&Datum<'_>>) -> usize {
    match d {
        Some(Datum::Text(t) | Datum::Json(t)) => t.len(),
        _ => 0,
    }
}

/// The likely length of a datum's JSON.
fn json_len_guess(kind: &Kind, d: Option<&Datum<'_>>) -> usize {
    match (kind, d) {
        (Kind::Int | Kind::NumericNumber | Kind::Float, Some(Datum::Text(t))) => t.len(),
        (Kind::Bool, Some(Datum::Text(t))) => 4 + usize::from(*t == b"f"),
        (_, Some(Datum::Text(t))) => t.len() + 2,
        (_, Some(Datum::Json(j))) => j.len(),
        _ => 4,
    }
}

/// `"a":1,"b":2` without braces; unchanged TOAST values are left out. True if any was written.
fn write_fields(out: &mut Vec<u8>, table: &TableSchema, row: &[Datum<'_>]) -> bool {
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
        json::write_value(out, &col.kind, *datum);
    }
    !first
}

/// `<label>["a","b"]` naming the unchanged TOAST columns of `row`, if there are any.
fn write_unchanged(out: &mut Vec<u8>, label: &[u8], table: &TableSchema, row: &[Datum<'_>]) {
    if !row.contains(&Datum::Unchanged) {
        return;
    }
    out.extend_from_slice(label);
    out.push(b'[');
    let mut first = true;
    for (col, datum) in table.columns.iter().zip(row.iter()) {
        if *datum == Datum::Unchanged {
            if !first {
                out.push(b',');
            }
            first = false;
            json::write_str(out, col.name.as_bytes());
        }
    }
    out.push(b']');
}

/// Appends an integer in decimal, as `Display` would write it.
fn push_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = out.write_fmt(args);
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
            transaction: None,
            annotations: None,
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
    fn read_value_with_a_tail_equals_value() {
        let row = [
            Datum::Text(b"42"),
            Datum::Text(b"tab\there \"q\""),
            Datum::Null,
            Datum::Text(br#"{"a": [1, 2]}"#),
        ];
        let position = Position {
            snapshot: SnapshotMarker::True,
            xid: None,
            ..pos()
        };
        let change = Change {
            op: Op::Read,
            before: None,
            after: Some(&row),
            position,
            transaction: None,
            annotations: None,
        };
        for format in [Format::Envelope, Format::Flat] {
            for transaction_metadata in [false, true] {
                let options = EventOptions {
                    format,
                    transaction_metadata,
                    ..EventOptions::default()
                };
                let enc = Encoder::with_options("pgcdc", "shop", options, TypeRegistry::default());
                let tail = enc.read_tail(&table(), position, 5);
                assert_eq!(
                    enc.read_value(&table(), &row, &tail),
                    enc.value(&table(), &change, 5),
                    "{format:?} transaction_metadata={transaction_metadata}"
                );
            }
        }
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
            transaction: None,
            annotations: None,
        };
        let v = Encoder::new("p", "d").value(&table(), &change, 0);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert!(parsed["after"].get("note").is_none());
        assert_eq!(parsed["after"]["paid"], false);
        assert_eq!(parsed["after"]["doc"], serde_json::Value::Null);
        assert_eq!(parsed["unchanged"], serde_json::json!(["note"]));
    }

    #[test]
    fn schema_id_follows_the_shape() {
        let a = table();
        let mut cols = a.columns.clone();
        assert_eq!(
            a.schema_id,
            TableSchema::new("x", "y", Arc::from("t"), cols.clone(), &[]).schema_id
        );
        cols[1] = Column::new("note", oid::INT4);
        assert_ne!(
            a.schema_id,
            TableSchema::new("public", "orders", Arc::from("t"), cols, &[]).schema_id
        );
        let v = Encoder::new("p", "d").value(
            &a,
            &Change {
                op: Op::Read,
                before: None,
                after: Some(&[Datum::Text(b"1"), Datum::Null, Datum::Null, Datum::Null]),
                position: pos(),
                transaction: None,
                annotations: None,
            },
            0,
        );
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(
            parsed["source"]["schema_id"],
            format!("{:016x}", a.schema_id)
        );
        assert!(parsed.get("unchanged").is_none());
        assert!(parsed.get("transaction").is_none());
    }

    fn encoder(format: Format, transaction_metadata: bool) -> Encoder {
        Encoder::with_options(
            "p",
            "d",
            EventOptions {
                format,
                transaction_metadata,
                ..EventOptions::default()
            },
            TypeRegistry::default(),
        )
    }

    #[test]
    fn annotations_in_both_formats() {
        let row = [
            Datum::Text(b"42"),
            Datum::Null,
            Datum::Text(b"t"),
            Datum::Null,
        ];
        let change = Change {
            op: Op::Create,
            before: None,
            after: Some(&row[..]),
            position: pos(),
            transaction: None,
            annotations: Some(br#"{"request_id":"r1"}"#),
        };
        let e = encoder(Format::Envelope, false);
        let v: serde_json::Value = serde_json::from_slice(&e.value(&table(), &change, 0)).unwrap();
        assert_eq!(v["source"]["annotations"]["request_id"], "r1");
        assert_eq!(v["source"]["commit_lsn"], 200);
        let e = encoder(Format::Flat, false);
        let v = e.value(&table(), &change, 0);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"id":42,"note":null,"paid":true,"doc":null,"__op":"c","__table":"public.orders","__lsn":100,"__annotations":{"request_id":"r1"},"__deleted":false}"#
        );
    }

    #[test]
    fn flat_format() {
        let row = [
            Datum::Text(b"42"),
            Datum::Unchanged,
            Datum::Text(b"t"),
            Datum::Null,
        ];
        let e = encoder(Format::Flat, false);
        let change = |op, before, after| Change {
            op,
            before,
            after,
            position: pos(),
            transaction: None,
            annotations: None,
        };
        let v = e.value(&table(), &change(Op::Update, None, Some(&row[..])), 0);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"id":42,"paid":true,"doc":null,"__unchanged":["note"],"__op":"u","__table":"public.orders","__lsn":100,"__deleted":false}"#
        );
        let key = [Datum::Text(b"42"), Datum::Null, Datum::Null, Datum::Null];
        let v = e.value(&table(), &change(Op::Delete, Some(&key[..]), None), 0);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["id"], 42);
        assert_eq!(parsed["__deleted"], true);
        let v = e.value(&table(), &change(Op::Truncate, None, None), 0);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"__op":"t","__table":"public.orders","__lsn":100,"__deleted":false}"#
        );
        // A column named like the marker must not be patched.
        let mut v = br#"{"snapshot":"true"}"#.to_vec();
        e.mark_last(&mut v);
        assert_eq!(&v, br#"{"snapshot":"true"}"#);
    }

    #[test]
    fn transaction_metadata() {
        let e = encoder(Format::Envelope, true);
        let row = [Datum::Text(b"1"), Datum::Null, Datum::Null, Datum::Null];
        let t = TxnOrder {
            id: "7:200",
            total_order: 3,
            data_collection_order: 2,
        };
        let v = e.value(
            &table(),
            &Change {
                op: Op::Create,
                before: None,
                after: Some(&row),
                position: pos(),
                transaction: Some(t),
                annotations: None,
            },
            0,
        );
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(
            parsed["transaction"],
            serde_json::json!({"id":"7:200","total_order":3,"data_collection_order":2})
        );
        let (k, v) = e.transaction("7:200", 5, None);
        assert_eq!(&k[..], br#"{"id":"7:200"}"#);
        assert_eq!(&v[..], br#"{"status":"BEGIN","id":"7:200","ts_ms":5,"event_count":null,"data_collections":null}"#);
        let counts = [(Arc::from("public.a"), 2), (Arc::from("public.b"), 1)];
        let (_, v) = e.transaction("7:200", 5, Some(&counts));
        assert_eq!(&v[..], br#"{"status":"END","id":"7:200","ts_ms":5,"event_count":3,"data_collections":[{"data_collection":"public.a","event_count":2},{"data_collection":"public.b","event_count":1}]}"#);
    }

    #[test]
    fn position_digits_match_display() {
        for (lsn, xid, ts) in [
            (0, None, 0),
            (u64::MAX, Some(u32::MAX), i64::MIN),
            (0x1_6B37_4D48, Some(7), -1),
            (10, Some(0), i64::MAX),
        ] {
            let p = Position {
                lsn: Lsn(lsn),
                commit_lsn: Lsn(lsn / 3),
                xid,
                commit_ts_ms: ts,
                snapshot: SnapshotMarker::True,
            };
            let mut out = Vec::new();
            write_position(&mut out, &p);
            let xid = xid.map_or("null".to_string(), |x| x.to_string());
            let want = format!(
                ",\"lsn\":{lsn},\"txId\":{xid},\"ts_ms\":{ts},\"snapshot\":\"true\",\"commit_lsn\":{}",
                lsn / 3
            );
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn snapshot_markers() {
        let position = Position {
            lsn: Lsn(200),
            commit_lsn: Lsn(200),
            xid: None,
            commit_ts_ms: 7,
            snapshot: SnapshotMarker::True,
        };
        let v = encoder(Format::Envelope, false).snapshot_marker(&table(), position, 1, 3, 42, 9);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["op"], "s");
        assert_eq!(parsed["before"], serde_json::Value::Null);
        assert_eq!(parsed["after"], serde_json::Value::Null);
        assert_eq!(
            parsed["snapshot"],
            serde_json::json!({"partition": 1, "partitions": 3, "rows": 42})
        );
        assert_eq!(parsed["ts_ms"], 9);
        let source = &parsed["source"];
        assert_eq!(
            (&source["lsn"], &source["commit_lsn"]),
            (&200.into(), &200.into())
        );
        assert_eq!(source["snapshot"], "true");
        assert_eq!(source["table"], "orders");
        assert_eq!(source["txId"], serde_json::Value::Null);
        assert!(parsed.get("transaction").is_none());
        // The source block is the one the table's read events carry.
        let read = encoder(Format::Envelope, false).read_value(
            &table(),
            &[Datum::Text(b"1"), Datum::Null, Datum::Null, Datum::Null],
            &encoder(Format::Envelope, false).read_tail(&table(), position, 9),
        );
        let read: serde_json::Value = serde_json::from_slice(&read).unwrap();
        assert_eq!(read["source"], parsed["source"]);

        let v = encoder(Format::Envelope, true).snapshot_marker(&table(), position, 0, 1, 0, 9);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["transaction"], serde_json::Value::Null);
        assert!(parsed.as_object().unwrap().contains_key("transaction"));

        let v = encoder(Format::Flat, false).snapshot_marker(&table(), position, 2, 3, 5, 9);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"__op":"s","__table":"public.orders","__lsn":200,"__deleted":false,"__partition":2,"__partitions":3,"__rows":5}"#
        );
    }

    #[test]
    fn messages() {
        let e = Encoder::new("p", "d");
        let m = MessageEvent {
            prefix: "outbox",
            content: b"hi",
            transactional: false,
            position: pos(),
        };
        let (k, v) = e.message(&m, BinaryMode::Base64, 9);
        assert_eq!(&k[..], br#"{"prefix":"outbox"}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["op"], "m");
        assert_eq!(
            parsed["message"],
            serde_json::json!({"prefix":"outbox","content":"aGk=","transactional":false})
        );
        assert_eq!(parsed["source"]["lsn"], 100);
    }
}
