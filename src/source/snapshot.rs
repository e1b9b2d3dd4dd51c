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
//! snapshot transaction has imported it. And streaming starts only after every snapshot row
//! was acknowledged by the sink, so per key the read event always precedes its changes.
//!
//! Rows are read with text `COPY`, whose values are the same text pgoutput sends (both
//! sessions pin the settings that shape text output, see [`super::session`]), and encoded by
//! the same [`Encoder`], with column kinds from the same type registry, as streamed changes.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::event::{Column, Datum, Encoder, Position, SnapshotMarker, TableSchema, TypeRegistry};
use crate::sink::{Record, SinkItem};
use crate::source::catalog::{quote_literal, TableInfo};
use crate::source::changes::topic_name;
use crate::source::copy_text::{self, CopyTextError};
use crate::source::Lsn;

/// Why the snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("snapshot of {table}: {source}")]
    Copy {
        table: String,
        source: CopyTextError,
    },
    #[error("the sink stopped during the snapshot")]
    SinkClosed,
    #[error("stopped by a signal during the snapshot")]
    Interrupted,
}

impl SnapshotError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SnapshotError::Query(e) if e.is_closed() || e.code().is_none())
    }
}

/// What a finished snapshot read.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotStats {
    pub rows: u64,
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

/// Reads every table inside `snapshot_name` and sends one read event per row to `tx`.
/// The very last row of the whole snapshot is marked `snapshot: "last"`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &tokio_postgres::Client,
    snapshot_name: &str,
    consistent_point: Lsn,
    tables: &[TableInfo],
    topic_prefix: &str,
    encoder: &Encoder,
    tx: &mpsc::Sender<SinkItem>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<SnapshotStats, SnapshotError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_name)
        ))
        .await?;
    let started_ms = crate::event::now_ms();
    let position = Position {
        lsn: consistent_point,
        commit_lsn: consistent_point,
        xid: None,
        commit_ts_ms: started_ms,
        snapshot: SnapshotMarker::True,
    };
    let mut stats = SnapshotStats::default();
    // One record is held back so the final one can be marked "last".
    let mut held: Option<(Arc<str>, Option<bytes::Bytes>, bytes::Bytes)> = None;
    // Per-row scratch, reused: rows borrow from each COPY message, so the vectors are
    // emptied and handed from one message's lifetime to the next without reallocating.
    let mut fields_buf: Vec<copy_text::Field<'static>> = Vec::new();
    let mut row_buf: Vec<Datum<'static>> = Vec::new();
    for info in tables {
        let table = table_schema(topic_prefix, info, encoder.types());
        let sql = info.copy_sql();
        tracing::info!(table = %info.name, "snapshot: reading table");
        let tail = encoder.read_tail(&table, position, started_ms);
        let progress = crate::metrics::global().table(&table.topic, &table.qualified_name());
        progress.snapshot_started();
        let stream = client.copy_out(&sql).await?;
        futures_util::pin_mut!(stream);
        let mut table_rows = 0u64;
        let mut rows = copy_text::RowBuffer::default();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let Some(data) = rows.complete(&chunk) else {
                continue;
            };
            let mut fields = recycle_fields(std::mem::take(&mut fields_buf));
            for line in copy_text::lines(data) {
                copy_text::parse_row(line, table.columns.len(), &mut fields).map_err(|source| {
                    SnapshotError::Copy {
                        table: info.name.to_string(),
                        source,
                    }
                })?;
                let mut row = recycle_row(std::mem::take(&mut row_buf));
                row.extend(fields.iter().map(|f| match f {
                    None => Datum::Null,
                    Some(v) => Datum::Text(v),
                }));
                let key = encoder.key(&table, &row);
                let value = encoder.read_value(&table, &row, &tail);
                if let Some((topic, key, value)) = held.take() {
                    send(tx, stop, topic, key, value).await?;
                }
                held = Some((table.topic.clone(), key, value));
                row_buf = recycle_row(row);
                table_rows += 1;
                progress.snapshot_row();
            }
            fields_buf = recycle_fields(fields);
        }
        progress.snapshot_finished();
        tracing::info!(table = %info.name, rows = table_rows, "snapshot: table done");
        stats.rows += table_rows;
    }
    if let Some((topic, key, value)) = held.take() {
        let mut value = value.to_vec();
        encoder.mark_last(&mut value);
        send(tx, stop, topic, key, value.into()).await?;
    }
    client.batch_execute("COMMIT").await?;
    Ok(stats)
}

async fn send(
    tx: &mpsc::Sender<SinkItem>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    topic: Arc<str>,
    key: Option<bytes::Bytes>,
    value: bytes::Bytes,
) -> Result<(), SnapshotError> {
    let item = SinkItem::Record(Record {
        topic,
        key,
        value: Some(value),
    });
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
fn recycle_row<'b>(mut v: Vec<Datum<'_>>) -> Vec<Datum<'b>> {
    v.clear();
    v.into_iter().map(|_| Datum::Null).collect()
}
