//! The initial snapshot, and why it meets the stream exactly.
//!
//! `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')` does two things at one
//! instant: it fixes the slot's *consistent point* C — decoding from the slot yields exactly
//! the transactions that commit after C — and it exports a snapshot that sees exactly the
//! transactions committed before C. A transaction that imports that snapshot (`SET TRANSACTION
//! SNAPSHOT`, in a REPEATABLE READ transaction) therefore reads the tables as of C, while the
//! slot holds every later change. Publishing the snapshot rows, then the stream from C, gives
//! every committed change exactly once: none missed at the hand-over, none doubled.
//!
//! Two rules keep this true. The exported snapshot stays valid only while the connection that
//! created the slot runs no other command, so the replication connection waits, idle, until the
//! snapshot transactions have imported it. And streaming starts only after every snapshot row
//! was acknowledged by the sink, so per key the read event always precedes its changes.
//!
//! A third rule: no table may be rewritten under the snapshot. `ALTER TABLE … TYPE`, `VACUUM
//! FULL`, `CLUSTER` and `TRUNCATE` write the table anew, and the new row versions carry the
//! rewriting transaction's id: a snapshot older than that transaction sees the table empty
//! (a rewrite is not MVCC-safe), and logical decoding does not turn a rewrite into row
//! changes — the rows would be silently lost. So right after importing the snapshot, its
//! transaction takes `ACCESS SHARE` locks on every captured table (partitions included; all
//! rewrites need `ACCESS EXCLUSIVE`) and keeps them to its end. That closes the window only
//! from the lock on: a rewrite may have committed between the consistent point and the lock.
//! It is detected: each table's (and partition's) `relfilenode` as the snapshot sees it in
//! `pg_class` (user queries read catalogs with the transaction's snapshot) is compared with
//! the current one (`pg_relation_filenode`, from the caches, current once the lock is held);
//! a difference means a rewrite after the consistent point, and the snapshot fails with
//! [`SnapshotError::Rewritten`], which starts the pipeline again with a new snapshot.
//!
//! A fourth: the snapshot reads the columns the stream publishes from its consistent point.
//! pgcdc reads each table's columns and its publication from the catalog at start, before the
//! slot and its consistent point exist, and `COPY` names those columns. A column added,
//! dropped, renamed or retyped in between, or a publication whose tables, column lists or row
//! filters changed, would make the snapshot read another shape than the stream's Relation
//! messages describe from C on (or fail its `COPY`: "column … does not exist"). So after its
//! lock the snapshot compares, inside its transaction, the table's columns and the
//! publication's catalog rows as they were at C (catalog queries read with the transaction's
//! snapshot) with what pgcdc read at start, and checks that every column it reads still exists
//! under the same name and type now (a query naming them, parsed against the relation's cache,
//! current once the lock is held): a column dropped or renamed after C but before the lock. Any
//! difference fails the snapshot with [`SnapshotError::CatalogChanged`], which starts the
//! pipeline again: a fresh look at the catalog, a new slot, a new snapshot. A column *added*
//! after C changes nothing here: `COPY` reads named columns, rows as of C did not have it, and
//! the stream's next Relation message brings the new shape, as for any column added while
//! streaming. From the lock on, no column can change until the snapshot ends (every such
//! `ALTER TABLE` needs `ACCESS EXCLUSIVE`).
//!
//! Several connections may import the same snapshot ([`parallel`], `--snapshot-workers`):
//! they all see the tables as of C, so splitting a table into ranges of pages read by
//! different connections reads each row version visible at C exactly once. Each key appears
//! once in a snapshot, so the order of read events between workers does not matter.
//!
//! Rows are read with text `COPY`, whose values are the same text pgoutput sends (all
//! sessions pin the settings that shape text output, see [`super::session`]), and encoded by
//! the same [`Encoder`], with column kinds from the same type registry, as streamed changes.
//! A table whose columns are all of the common built-in types that [`super::copy_binary`]
//! converts is read with binary `COPY` instead (less work for the server), and its values
//! turned into that same text before they reach the encoder (`--snapshot-copy text` turns
//! this off).
//!
//! # Snapshot markers
//!
//! After the last row of each table (an empty table too), a *snapshot marker* goes to the
//! table's topic (`--snapshot-markers`, [`Markers`]): op `s`, null key, the snapshot's position,
//! sent explicitly to every partition of the topic. Kafka keeps the order of one producer's
//! records within a partition, so a consumer that has seen the marker of the snapshot at `C`
//! in every partition has seen every row that snapshot read. That is what lets a consumer
//! forget rows the snapshot no longer holds — rows deleted while no slot recorded deletes
//! (a lost slot, then `--snapshot always`) — as the indexer does. The final row of the whole
//! snapshot is still the one marked `snapshot: "last"`: a table's markers are held back with
//! it and follow it (see [`Reader`]).

mod parallel;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::event::headers;
use crate::event::{
    Column, Datum, Encoder, Position, ReadTail, SnapshotMarker, TableSchema, TypeRegistry,
};
use crate::metrics::TableMetrics;
use crate::model::channel::RECORD_OVERHEAD;
use crate::model::failure::{Recoverable, Recovery};
use crate::model::Lsn;
use crate::model::{Budget, Charge, Record, SinkItem, SinkSender};
use crate::source::catalog::{
    self, quote_ident, quote_literal, Attribute, CopyFormat, PublicationSeen, TableInfo,
};
use crate::source::connect::{describe, ConnectError};
use crate::source::conninfo::ConnInfo;
use crate::source::copy_binary::{self, Conv, CopyBinaryError, Text};
use crate::source::copy_text::{self, CopyTextError};
use crate::source::topic::topic_name;

/// Why the snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Complete in itself (see [`describe`]), so not chained as a source.
    #[error("snapshot query failed: {}", describe(.0))]
    Query(tokio_postgres::Error),
    #[error("snapshot worker: {0}")]
    Connect(#[from] ConnectError),
    #[error("snapshot worker: {0}")]
    Worker(String),
    #[error("snapshot of {table}: {source}")]
    Copy {
        table: String,
        source: CopyTextError,
    },
    #[error(
        "snapshot of {table}: {source} (a server that sends a binary form pgcdc does not \
         know: pass --snapshot-copy text to read tables as text, and report it)"
    )]
    CopyBinary {
        table: String,
        source: CopyBinaryError,
    },
    #[error("snapshot of {table}: a row has no value for key column `{column}`: pgcdc stops rather than publish it under a null key. This should not happen (key columns are NOT NULL): please report it, with the table's definition and replica identity")]
    MissingKey { table: String, column: String },
    #[error(
        "{tables} rewritten after the snapshot's consistent point (ALTER TABLE … TYPE, VACUUM \
         FULL, CLUSTER or TRUNCATE): the snapshot would read no rows there, so a new snapshot \
         is needed"
    )]
    Rewritten {
        /// The rewritten tables or partitions, e.g. "public.b was".
        tables: String,
    },
    #[error(
        "{what}, after pgcdc read the catalog: the snapshot would not read the columns the \
         stream publishes from its consistent point, so it starts again (the catalog is read \
         again)"
    )]
    CatalogChanged {
        /// The table (or publication) and what changed.
        what: String,
    },
    #[error(
        "another session asked for a lock on {table} that conflicts with the snapshot's (ALTER \
         TABLE, VACUUM FULL, CLUSTER, TRUNCATE, LOCK TABLE…): the snapshot gives way to it and \
         starts again"
    )]
    LockQueued { table: String },
    #[error("the sink stopped during the snapshot")]
    SinkClosed,
    #[error("stopped by a signal during the snapshot")]
    Interrupted,
}

impl From<tokio_postgres::Error> for SnapshotError {
    fn from(e: tokio_postgres::Error) -> Self {
        SnapshotError::Query(e)
    }
}

impl Recoverable for SnapshotError {
    /// A snapshot cannot reconnect (its exported snapshot dies with its connection): a lost
    /// connection, or a table rewritten or changed under it, takes a new snapshot (what was
    /// published is published again, as after a crash). Everything else stops.
    fn recovery(&self) -> Recovery {
        let again = match self {
            SnapshotError::Query(e) => crate::source::connect::is_transient(e),
            SnapshotError::Connect(e) => e.is_transient(),
            // A new snapshot is taken after the rewrite, so it sees the rows.
            SnapshotError::Rewritten { .. }
            | SnapshotError::LockQueued { .. }
            | SnapshotError::CatalogChanged { .. } => true,
            _ => false,
        };
        if again {
            Recovery::Restart
        } else {
            Recovery::Stop
        }
    }
}

/// What a finished snapshot read.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotStats {
    pub rows: u64,
}

/// Where snapshot markers go (`--snapshot-markers`, see the module docs).
#[derive(Debug, Clone, Default)]
pub enum Markers {
    /// None are published (`--snapshot-markers false`).
    #[default]
    Off,
    /// One per table: the stdout sink, one ordered stream (partition 0 of 1).
    One,
    /// One per partition of each table's topic; topic → partition count, from the topics'
    /// metadata at start (a topic missing here gets no marker, with a warning).
    PerPartition(Arc<HashMap<String, i32>>),
}

impl Markers {
    /// The marker records of `table`'s snapshot at `position`, which read `rows` rows.
    fn records(
        &self,
        encoder: &Encoder,
        table: &TableSchema,
        position: Position,
        rows: u64,
    ) -> Vec<Record> {
        let now = crate::model::now_ms();
        let names = headers::Names::new(encoder.options().headers);
        let marker = |partition: Option<i32>, partitions: i32| Record {
            topic: table.topic.clone(),
            key: None,
            value: Some(encoder.snapshot_marker(
                table,
                position,
                partition.unwrap_or(0),
                partitions,
                rows,
                now,
            )),
            partition,
            headers: names.only_id(|| headers::marker_id(position.lsn, partition.unwrap_or(0))),
        };
        match self {
            Markers::Off => Vec::new(),
            Markers::One => vec![marker(None, 1)],
            Markers::PerPartition(counts) => match counts.get(&*table.topic) {
                Some(&n) if n > 0 => (0..n).map(|p| marker(Some(p), n)).collect(),
                _ => {
                    tracing::warn!(
                        table = %table.qualified,
                        topic = %table.topic,
                        "no partition count known for the topic: its snapshot marker is left out"
                    );
                    Vec::new()
                }
            },
        }
    }
}

/// How the snapshot is read.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotOptions<'a> {
    /// Connections that read at once (`--snapshot-workers`); 1 reads on the caller's
    /// connection and thread.
    pub workers: usize,
    /// What the workers connect with.
    pub conninfo: &'a ConnInfo,
    /// Which `COPY` format tables may be read with (`--snapshot-copy`).
    pub copy: SnapshotCopy,
    /// Where each table's snapshot marker goes.
    pub markers: &'a Markers,
    /// The publication as pgcdc read it at start, checked at the consistent point (see the
    /// module documentation).
    pub publication: Option<&'a PublicationSeen>,
}

/// The `COPY` format of the snapshot (`run` turns `--snapshot-copy` into it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotCopy {
    /// Binary for tables whose columns are all of types pgcdc converts exactly (booleans,
    /// integers, numeric, text types, json/jsonb, date, timestamp[tz], uuid, bytea), text for
    /// the others.
    #[default]
    Auto,
    /// Text for every table.
    Text,
}

/// Builds the encoder's view of a table from the catalog.
pub fn table_schema(
    topic_prefix: &str,
    info: &TableInfo,
    types: &TypeRegistry,
) -> Arc<TableSchema> {
    let columns = info
        .columns
        .iter()
        .map(|(name, oid)| Column::with_kind(name.clone(), *oid, types.kind(*oid)))
        .collect();
    Arc::new(TableSchema::new(
        info.name.schema.clone(),
        info.name.name.clone(),
        topic_name(topic_prefix, &info.name).into(),
        columns,
        &info.key,
    ))
}

/// Starts a transaction on `client` that reads as of the exported snapshot.
async fn import(client: &tokio_postgres::Client, snapshot_name: &str) -> Result<(), SnapshotError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_name)
        ))
        .await?;
    Ok(())
}

/// How long the snapshot waits for its table locks before it says what it waits for.
const LOCK_NOTICE_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// The captured tables' `relfilenode` in the snapshot's `pg_class` against the current one
/// (partitions of partitioned tables included, as the snapshot knows them): the names of
/// those that differ. Plain inheritance children are not read by the snapshot, so not
/// checked.
const REWRITTEN_SQL: &str = "\
    WITH RECURSIVE tree(oid) AS ( \
        SELECT unnest($1::oid[]) \
      UNION \
        SELECT i.inhrelid FROM pg_inherits i \
        JOIN tree t ON i.inhparent = t.oid \
        JOIN pg_class p ON p.oid = t.oid AND p.relkind = 'p' \
    ) \
    SELECT format('%I.%I', n.nspname, c.relname) \
    FROM tree t \
    JOIN pg_class c ON c.oid = t.oid \
    JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind IN ('r', 'm') \
      AND c.relfilenode IS DISTINCT FROM pg_relation_filenode(c.oid) \
    ORDER BY 1";

/// Locks `tables` `ACCESS SHARE` in the imported snapshot's transaction on `client`, then
/// fails with [`SnapshotError::Rewritten`] if one of them was rewritten after the consistent
/// point (see the module documentation). Waits as long as another session holds a
/// conflicting lock, saying so after a few seconds; a stop signal ends the wait.
async fn lock_tables(
    client: &tokio_postgres::Client,
    tables: &[TableInfo],
    conninfo: &ConnInfo,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), SnapshotError> {
    if tables.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    let sql = format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", "));
    let lock = client.batch_execute(&sql);
    tokio::pin!(lock);
    let notice = tokio::time::sleep(LOCK_NOTICE_AFTER);
    tokio::pin!(notice);
    let mut noticed = false;
    loop {
        tokio::select! {
            r = &mut lock => {
                r?;
                break;
            }
            () = &mut notice, if !noticed => {
                noticed = true;
                tracing::warn!(
                    "snapshot: waiting for a lock on the captured tables: another session holds \
                     a conflicting one (ALTER TABLE, VACUUM FULL, CLUSTER, TRUNCATE, LOCK TABLE…; \
                     see pg_locks); the snapshot reads once it is released"
                );
            }
            () = crate::signals::requested(stop) => {
                // The server would go on waiting for the lock: ask it to stop.
                crate::source::connect::cancel(client, conninfo).await;
                return Err(SnapshotError::Interrupted);
            }
        }
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rewritten: Vec<String> = client
        .query(REWRITTEN_SQL, &[&oids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if rewritten.is_empty() {
        return Ok(());
    }
    let tables = match rewritten.as_slice() {
        [one] => format!("{one} was"),
        many => format!("{} were", many.join(", ")),
    };
    Err(SnapshotError::Rewritten { tables })
}

/// Every column of the tables `$1` at the snapshot's consistent point (the transaction's
/// snapshot reads the catalog as it was then), as [`catalog::ATTRIBUTES_SQL`] reads them.
const ATTRIBUTES_AT_POINT_SQL: &str = "\
    SELECT attrelid, attname::text, atttypid, attgenerated = 's' FROM pg_attribute \
    WHERE attrelid = ANY($1::oid[]) AND attnum > 0 AND NOT attisdropped \
      AND attgenerated IN ('', 's') \
    ORDER BY attrelid, attnum";

/// Checks, in the snapshot's transaction and after its lock, that what pgcdc read from the
/// catalog at start still holds at the consistent point, and that the columns read still
/// exist (see the module documentation); [`SnapshotError::CatalogChanged`] otherwise.
async fn check_columns(
    client: &tokio_postgres::Client,
    tables: &[TableInfo],
    publication: Option<&PublicationSeen>,
) -> Result<(), SnapshotError> {
    let changed = |what: String| Err(SnapshotError::CatalogChanged { what });
    if let Some(seen) = publication {
        let at_point = catalog::publication_state(client, &seen.name).await?;
        if at_point.state != seen.state {
            return changed(format!(
                "publication {} changed (its tables, column lists, row filters or options) \
                 before the snapshot's consistent point",
                quote_ident(&seen.name)
            ));
        }
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let mut at_point: HashMap<u32, Vec<Attribute>> = HashMap::new();
    for r in client.query(ATTRIBUTES_AT_POINT_SQL, &[&oids]).await? {
        at_point.entry(r.get(0)).or_default().push(Attribute {
            name: r.get(1),
            type_oid: r.get(2),
            generated: r.get(3),
        });
    }
    for t in tables {
        let then = at_point.remove(&t.oid).unwrap_or_default();
        if let Some(why) = column_change(&t.attributes, &then) {
            return changed(format!(
                "{}: {why} before the snapshot's consistent point",
                t.name
            ));
        }
    }
    for t in tables {
        if t.columns.is_empty() {
            continue;
        }
        let sql = current_types_sql(t);
        match client.query_one(&sql, &[]).await {
            Ok(row) => {
                let now: Vec<u32> = row.get(0);
                let retyped = t
                    .columns
                    .iter()
                    .zip(&now)
                    .find(|((_, then), now)| then != *now);
                if let Some(((name, _), _)) = retyped {
                    return changed(format!(
                        "{}: column {} changed its type after the snapshot's consistent point",
                        t.name,
                        quote_ident(name)
                    ));
                }
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
                let detail = e.as_db_error().map(|d| d.message().to_string());
                return changed(format!(
                    "{}: a column the snapshot reads was dropped or renamed after the \
                     snapshot's consistent point ({})",
                    t.name,
                    detail.unwrap_or_default()
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What differs between a table's columns as read at start and at the consistent point.
fn column_change(start: &[Attribute], then: &[Attribute]) -> Option<String> {
    if start == then {
        return None;
    }
    let named = |list: &[Attribute], name: &str| list.iter().find(|a| a.name == name).cloned();
    for a in start {
        match named(then, &a.name) {
            None => {
                return Some(format!(
                    "column {} was dropped or renamed",
                    quote_ident(&a.name)
                ))
            }
            Some(b) if b.type_oid != a.type_oid => {
                return Some(format!("column {} changed its type", quote_ident(&a.name)))
            }
            Some(b) if b.generated != a.generated => {
                return Some(format!("column {} changed", quote_ident(&a.name)))
            }
            Some(_) => {}
        }
    }
    if let Some(b) = then.iter().find(|b| named(start, &b.name).is_none()) {
        return Some(format!("column {} was added", quote_ident(&b.name)));
    }
    Some("its columns changed".into())
}

/// A query of the current types of the columns `info` reads: parsed against the relation's
/// cache, so a column no longer there fails it (`undefined_column`). No row is read.
fn current_types_sql(info: &TableInfo) -> String {
    let names: Vec<String> = info.columns.iter().map(|(n, _)| quote_ident(n)).collect();
    let types: Vec<String> = names
        .iter()
        .map(|n| format!("pg_typeof(x.{n})::oid"))
        .collect();
    format!(
        "SELECT ARRAY[{}]::oid[] FROM (SELECT 1) AS one \
         LEFT JOIN (SELECT {} FROM ONLY {} LIMIT 0) AS x ON true",
        types.join(", "),
        names.join(", "),
        info.name
    )
}

/// The position every read event carries: the consistent point.
fn read_position(consistent_point: Lsn, started_ms: i64) -> Position {
    Position {
        lsn: consistent_point,
        commit_lsn: consistent_point,
        xid: None,
        commit_ts_ms: started_ms,
        snapshot: SnapshotMarker::True,
    }
}

/// Reads every table inside `snapshot_name` and sends one read event per row to `tx`, and
/// after each table its snapshot markers. The very last row of the whole snapshot is marked
/// `snapshot: "last"`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &tokio_postgres::Client,
    snapshot_name: &str,
    consistent_point: Lsn,
    tables: &[TableInfo],
    topic_prefix: &str,
    encoder: &Encoder,
    tx: &SinkSender,
    stop: &mut watch::Receiver<bool>,
    options: SnapshotOptions<'_>,
) -> Result<SnapshotStats, SnapshotError> {
    import(client, snapshot_name).await?;
    lock_tables(client, tables, options.conninfo, stop).await?;
    check_columns(client, tables, options.publication).await?;
    let started_ms = crate::model::now_ms();
    let position = read_position(consistent_point, started_ms);
    if options.workers > 1 {
        let stats = parallel::run(
            client,
            snapshot_name,
            position,
            tables,
            topic_prefix,
            encoder,
            tx,
            stop,
            options,
        )
        .await?;
        client.batch_execute("COMMIT").await?;
        return Ok(stats);
    }
    let mut stats = SnapshotStats::default();
    let mut reader = Reader::new(encoder, Out::sink(tx), stop.clone(), options.copy);
    for info in tables {
        let table = table_schema(topic_prefix, info, encoder.types());
        let copy = copy_label(&table, options.copy);
        tracing::info!(table = %info.name, copy, "snapshot: reading table");
        let tail = encoder.read_tail(&table, position, started_ms);
        let progress = crate::metrics::global().table(&table.topic, &table.qualified_name());
        progress.snapshot_started();
        let table_rows = reader
            .copy(client, info, None, &table, &tail, &progress)
            .await?;
        let markers = options
            .markers
            .records(encoder, &table, position, table_rows);
        reader.table_done(markers).await?;
        progress.snapshot_finished();
        tracing::info!(table = %info.name, rows = table_rows, "snapshot: table done");
        stats.rows += table_rows;
    }
    let last = reader.held.take();
    reader.finish(last).await?;
    client.batch_execute("COMMIT").await?;
    Ok(stats)
}

/// A read event not yet sent: the last one is held back so it can be marked "last".
type Held = Record;

/// Where a [`Reader`] sends its events.
enum Out<'a> {
    /// Into the sink's channel, in small batches ([`SinkItem::Records`]): one connection, on
    /// the pipeline's thread. A channel operation per row was ~6% of that thread's time.
    Sink {
        tx: &'a SinkSender,
        batch: Vec<Record>,
        bytes: usize,
    },
    /// In batches to the coordinator of a parallel snapshot, which forwards them to the sink's
    /// channel: one hand-off between threads per batch rather than per event (a hand-off per
    /// event made one worker thread slower than no thread at all). Each batch is charged to
    /// the sink channel's byte budget before it leaves the worker, and carries that charge
    /// into the channel: what waits between the workers and the sink is bounded in bytes too.
    Batches {
        tx: &'a mpsc::Sender<parallel::Piece>,
        budget: &'a Budget,
        batch: Vec<Record>,
        bytes: usize,
    },
}

impl<'a> Out<'a> {
    fn sink(tx: &'a SinkSender) -> Self {
        Out::Sink {
            tx,
            batch: Vec::with_capacity(SINK_BATCH_EVENTS),
            bytes: 0,
        }
    }
}

/// A worker's batch is handed over when it holds this many bytes of keys and values...
const BATCH_BYTES: usize = 64 * 1024;
/// ...or this many events.
const BATCH_EVENTS: usize = 256;

/// The same limits for batches of one connection into the sink's channel. Each batch is one
/// channel operation and one charge to the channel's byte budget, not one per row.
const SINK_BATCH_BYTES: usize = 8 * 1024;
const SINK_BATCH_EVENTS: usize = 16;

/// Turns `COPY` output into read events and sends them: the per-row loop of both the
/// single-connection snapshot and each worker of a parallel one.
struct Reader<'a> {
    encoder: &'a Encoder,
    out: Out<'a>,
    copy: SnapshotCopy,
    stop: watch::Receiver<bool>,
    /// The latest event, sent when the next one is ready (see [`Held`]).
    held: Option<Held>,
    /// Snapshot markers of tables whose rows are all read, waiting behind `held`: they must
    /// follow their table's rows, and the held row may be the one to mark "last".
    markers: Vec<Record>,
    /// Rows read but not yet counted in the metrics (they are counted per batch).
    uncounted: u64,
    names: headers::Names,
    // Per-row scratch, reused: rows borrow from each COPY message, so the vectors are
    // emptied and handed from one message's lifetime to the next without reallocating.
    fields_buf: Vec<copy_text::Field<'static>>,
    row_buf: Vec<Datum<'static>>,
}

impl<'a> Reader<'a> {
    fn new(
        encoder: &'a Encoder,
        out: Out<'a>,
        stop: watch::Receiver<bool>,
        copy: SnapshotCopy,
    ) -> Self {
        Reader {
            encoder,
            out,
            copy,
            stop,
            held: None,
            names: headers::Names::new(encoder.options().headers),
            markers: Vec::new(),
            uncounted: 0,
            fields_buf: Vec::new(),
            row_buf: Vec::new(),
        }
    }

    /// Sends one event on its way.
    async fn emit(&mut self, held: Held) -> Result<(), SnapshotError> {
        if self.push(held) {
            self.flush().await?;
        }
        Ok(())
    }

    /// Adds one event to the current batch; true when the batch is full and must be flushed.
    /// Not async: the per-row path builds no future unless a batch is due.
    fn push(&mut self, record: Record) -> bool {
        let (batch, bytes, max_bytes, max_events) = match &mut self.out {
            Out::Sink { batch, bytes, .. } => (batch, bytes, SINK_BATCH_BYTES, SINK_BATCH_EVENTS),
            Out::Batches { batch, bytes, .. } => (batch, bytes, BATCH_BYTES, BATCH_EVENTS),
        };
        *bytes += record.payload_len();
        batch.push(record);
        *bytes >= max_bytes || batch.len() >= max_events
    }

    /// Counts the rows read so far in `progress` and hands over the current batch.
    async fn flush_counted(&mut self, progress: &TableMetrics) -> Result<(), SnapshotError> {
        progress.snapshot_rows(std::mem::take(&mut self.uncounted));
        self.flush().await
    }

    /// Hands over the current batch, if any.
    async fn flush(&mut self) -> Result<(), SnapshotError> {
        match &mut self.out {
            Out::Batches {
                tx,
                budget,
                batch,
                bytes,
            } if !batch.is_empty() => {
                let full = std::mem::replace(batch, Vec::with_capacity(BATCH_EVENTS));
                let held = std::mem::take(bytes) + full.len() * RECORD_OVERHEAD;
                let charge = charge(budget, &mut self.stop, held).await?;
                send(tx, &mut self.stop, parallel::Piece::Rows(full, charge)).await
            }
            Out::Sink { tx, batch, bytes } if !batch.is_empty() => {
                let full = std::mem::replace(batch, Vec::with_capacity(SINK_BATCH_EVENTS));
                let held = std::mem::take(bytes) + full.len() * RECORD_OVERHEAD;
                send_to_sink(tx, &mut self.stop, SinkItem::Records(full), held).await
            }
            _ => Ok(()),
        }
    }

    /// Reads `info`'s rows (those in `pages`, a range of its pages, or all) and sends a read
    /// event per row; returns the number of rows.
    async fn copy(
        &mut self,
        client: &tokio_postgres::Client,
        info: &TableInfo,
        pages: Option<(u64, Option<u64>)>,
        table: &TableSchema,
        tail: &ReadTail,
        progress: &TableMetrics,
    ) -> Result<u64, SnapshotError> {
        let plan = binary_plan(table, self.copy);
        let format = match plan {
            Some(_) => CopyFormat::Binary,
            None => CopyFormat::Text,
        };
        let sql = match pages {
            None => info.copy_sql(format),
            Some((from, to)) => info.copy_pages_sql(from, to, format),
        };
        let stream = client.copy_out(&sql).await?;
        let rows = match plan {
            Some(plan) => {
                self.copy_binary(stream, info, &plan, table, tail, progress)
                    .await
            }
            None => self.copy_text(stream, info, table, tail, progress).await,
        };
        progress.snapshot_rows(std::mem::take(&mut self.uncounted));
        rows
    }

    /// The rows of a text `COPY`.
    async fn copy_text(
        &mut self,
        stream: tokio_postgres::CopyOutStream,
        info: &TableInfo,
        table: &TableSchema,
        tail: &ReadTail,
        progress: &TableMetrics,
    ) -> Result<u64, SnapshotError> {
        futures_util::pin_mut!(stream);
        let mut table_rows = 0u64;
        let mut rows = copy_text::RowBuffer::default();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let Some(data) = rows.complete(&chunk) else {
                continue;
            };
            let mut fields = recycle_fields(std::mem::take(&mut self.fields_buf));
            for line in copy_text::lines(data) {
                copy_text::parse_row(line, table.columns.len(), &mut fields).map_err(|source| {
                    SnapshotError::Copy {
                        table: info.name.to_string(),
                        source,
                    }
                })?;
                let mut row = recycle_row(std::mem::take(&mut self.row_buf));
                row.extend(fields.iter().map(|f| match f {
                    None => Datum::Null,
                    Some(v) => Datum::Text(v),
                }));
                let full = self.row(table, &row, tail)?;
                self.row_buf = recycle_row(row);
                table_rows += 1;
                if full {
                    self.flush_counted(progress).await?;
                }
            }
            self.fields_buf = recycle_fields(fields);
        }
        Ok(table_rows)
    }

    /// The rows of a binary `COPY`, each value turned into its text form by `plan`.
    async fn copy_binary(
        &mut self,
        stream: tokio_postgres::CopyOutStream,
        info: &TableInfo,
        plan: &[(Conv, bool)],
        table: &TableSchema,
        tail: &ReadTail,
        progress: &TableMetrics,
    ) -> Result<u64, SnapshotError> {
        futures_util::pin_mut!(stream);
        let malformed = |source| SnapshotError::CopyBinary {
            table: info.name.to_string(),
            source,
        };
        let mut table_rows = 0u64;
        let mut rows = copy_binary::RowBuffer::default();
        // Written text forms of the current row; values that are text already are borrowed.
        let mut scratch = Vec::new();
        let mut raw_buf: Vec<Option<&[u8]>> = Vec::new();
        let mut text_buf: Vec<Option<Text<'_>>> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let data = rows.complete(&chunk).map_err(malformed)?;
            let mut raw = recycle_raw(std::mem::take(&mut raw_buf));
            let mut texts = recycle_texts(std::mem::take(&mut text_buf));
            let mut pos = 0;
            while copy_binary::next_row(data, &mut pos, plan.len(), &mut raw).map_err(malformed)? {
                scratch.clear();
                texts.clear();
                for ((value, &(conv, direct)), column) in raw.iter().zip(plan).zip(&table.columns) {
                    let Some(value) = value else {
                        texts.push(None);
                        continue;
                    };
                    let text = if direct {
                        copy_binary::to_json(conv, value, &mut scratch)
                    } else {
                        copy_binary::to_text(conv, value, &mut scratch)
                    };
                    texts.push(Some(text.map_err(|what| {
                        malformed(CopyBinaryError::Value {
                            column: column.name.clone(),
                            what,
                        })
                    })?));
                }
                let mut row = recycle_row(std::mem::take(&mut self.row_buf));
                row.extend(texts.iter().map(|t| match t {
                    None => Datum::Null,
                    Some(Text::Borrowed(v)) => Datum::Text(v),
                    Some(Text::Written(r)) => {
                        Datum::Text(scratch.get(r.clone()).unwrap_or_default())
                    }
                    Some(Text::Json(r)) => Datum::Json(scratch.get(r.clone()).unwrap_or_default()),
                }));
                let full = self.row(table, &row, tail)?;
                self.row_buf = recycle_row(row);
                table_rows += 1;
                if full {
                    self.flush_counted(progress).await?;
                }
            }
            raw_buf = recycle_raw(raw);
            text_buf = recycle_texts(texts);
        }
        if !rows.finished() {
            return Err(malformed(CopyBinaryError::Truncated));
        }
        Ok(table_rows)
    }

    /// Encodes one row and queues the previous one (the last is held back, see [`Held`]).
    /// True when the batch is full and must be flushed (see [`Reader::push`]).
    fn row(
        &mut self,
        table: &TableSchema,
        row: &[Datum<'_>],
        tail: &ReadTail,
    ) -> Result<bool, SnapshotError> {
        if let Some(column) = table.missing_key(row) {
            return Err(SnapshotError::MissingKey {
                table: table.qualified_name(),
                column: column.to_string(),
            });
        }
        self.uncounted += 1;
        let key = self.encoder.key(table, row);
        let headers = match &key {
            Some(key) if self.names.on() => {
                vec![self.names.id(headers::read_id(tail.position().lsn, key))]
            }
            _ => Vec::new(),
        };
        let record = Record {
            topic: table.topic.clone(),
            key,
            value: Some(self.encoder.read_value(table, row, tail)),
            partition: None,
            headers,
        };
        Ok(self.hold(record))
    }

    /// Holds `record` back and queues the one held before it, with the markers that waited
    /// behind that one. True when the batch is full and must be flushed.
    fn hold(&mut self, record: Record) -> bool {
        let Some(previous) = self.held.replace(record) else {
            return false;
        };
        let mut full = self.push(previous);
        if !self.markers.is_empty() {
            for marker in std::mem::take(&mut self.markers) {
                full |= self.push(marker);
            }
        }
        full
    }

    /// Every row of a table has been read (and held or queued): its `markers` follow them —
    /// behind the held row, if there is one.
    async fn table_done(&mut self, markers: Vec<Record>) -> Result<(), SnapshotError> {
        if self.held.is_some() {
            self.markers.extend(markers);
            return Ok(());
        }
        for marker in markers {
            self.emit(marker).await?;
        }
        Ok(())
    }

    /// Queues the held row, if any, with the markers behind it; nothing is held afterwards.
    fn release(&mut self) -> bool {
        let mut full = false;
        if let Some(held) = self.held.take() {
            full |= self.push(held);
        }
        for marker in std::mem::take(&mut self.markers) {
            full |= self.push(marker);
        }
        full
    }

    /// Sends `last`, the snapshot's final event, marked as such, then the markers held back
    /// behind it.
    async fn finish(&mut self, last: Option<Held>) -> Result<(), SnapshotError> {
        if let Some(mut record) = last {
            if let Some(value) = record.value.take() {
                let mut value = value.to_vec();
                self.encoder.mark_last(&mut value);
                record.value = Some(value.into());
            }
            self.emit(record).await?;
        }
        for marker in std::mem::take(&mut self.markers) {
            self.emit(marker).await?;
        }
        self.flush().await
    }
}

/// How `table` is read with binary `COPY` (see [`Conv::plan`]), or `None` for text.
fn binary_plan(table: &TableSchema, copy: SnapshotCopy) -> Option<Vec<(Conv, bool)>> {
    match copy {
        SnapshotCopy::Auto => Conv::plan(&table.columns),
        SnapshotCopy::Text => None,
    }
}

/// The `COPY` format `table` is read with, as the log names it.
fn copy_label(table: &TableSchema, copy: SnapshotCopy) -> &'static str {
    match binary_plan(table, copy) {
        Some(_) => "binary",
        None => "text",
    }
}

/// Sends `item`, which holds `bytes` (see [`SinkItem::buffered_bytes`]), to the sink's
/// channel, waiting while its budget or the channel is full; gives up when `stop` is set.
async fn send_to_sink(
    tx: &SinkSender,
    stop: &mut watch::Receiver<bool>,
    item: SinkItem,
    bytes: usize,
) -> Result<(), SnapshotError> {
    if *stop.borrow() {
        return Err(SnapshotError::Interrupted);
    }
    let charge = charge(tx.budget(), stop, bytes).await?;
    send_charged(tx, stop, item, charge).await
}

/// Sends `item` with a charge taken for it, waiting while the channel is full; gives up when
/// `stop` is set.
async fn send_charged(
    tx: &SinkSender,
    stop: &mut watch::Receiver<bool>,
    item: SinkItem,
    charge: Charge,
) -> Result<(), SnapshotError> {
    // Fast path while the sink keeps up; wait (interruptibly) only when the channel is full.
    let (item, charge) = match tx.try_send_charged(item, charge) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(SnapshotError::SinkClosed),
        Err(mpsc::error::TrySendError::Full(unsent)) => unsent,
    };
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => Err(SnapshotError::Interrupted),
        r = tx.send_charged(item, charge) => r.map_err(|_| SnapshotError::SinkClosed),
    }
}

/// Takes `bytes` from `budget`, waiting while it is spent; gives up when `stop` is set.
async fn charge(
    budget: &Budget,
    stop: &mut watch::Receiver<bool>,
    bytes: usize,
) -> Result<Charge, SnapshotError> {
    if let Ok(charge) = budget.try_charge(bytes) {
        return Ok(charge);
    }
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => Err(SnapshotError::Interrupted),
        r = budget.charge(bytes) => r.map_err(|_| SnapshotError::SinkClosed),
    }
}

/// Sends `item`, waiting while the channel is full; gives up when `stop` is set.
async fn send<T>(
    tx: &mpsc::Sender<T>,
    stop: &mut watch::Receiver<bool>,
    item: T,
) -> Result<(), SnapshotError> {
    if *stop.borrow() {
        return Err(SnapshotError::Interrupted);
    }
    // Fast path while the sink keeps up; wait (interruptibly) only when the channel is full.
    let item = match tx.try_send(item) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(SnapshotError::SinkClosed),
        Err(mpsc::error::TrySendError::Full(item)) => item,
    };
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => Err(SnapshotError::Interrupted),
        r = tx.send(item) => r.map_err(|_| SnapshotError::SinkClosed),
    }
}

/// Empties `v` and gives its allocation to borrows of another lifetime.
fn recycle_fields<'b>(mut v: Vec<copy_text::Field<'_>>) -> Vec<copy_text::Field<'b>> {
    v.clear();
    v.into_iter().map(|_| None).collect()
}

/// Empties `v` and gives its allocation to borrows of another lifetime.
fn recycle_raw<'b>(mut v: Vec<Option<&[u8]>>) -> Vec<Option<&'b [u8]>> {
    v.clear();
    v.into_iter().map(|_| None).collect()
}

/// Empties `v` and gives its allocation to borrows of another lifetime.
fn recycle_texts<'b>(mut v: Vec<Option<Text<'_>>>) -> Vec<Option<Text<'b>>> {
    v.clear();
    v.into_iter().map(|_| None).collect()
}

/// Empties `v` and gives its allocation to borrows of another lifetime.
fn recycle_row<'b>(mut v: Vec<Datum<'_>>) -> Vec<Datum<'b>> {
    v.clear();
    v.into_iter().map(|_| Datum::Null).collect()
}
