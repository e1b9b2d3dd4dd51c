//! Turns decoded pgoutput messages into encoded sink items, in WAL order.
//!
//! pgoutput sends a transaction only once it committed, as `Begin`, its changes, `Commit`;
//! so the items of one transaction are contiguous and transactions arrive in commit order.
//! Every transaction ends with a [`SinkItem::Checkpoint`] at its commit's *end* LSN: once the
//! sink acknowledged everything up to that checkpoint, confirming that LSN makes PostgreSQL
//! skip exactly this transaction and those before it on a restart — never one after it.
//!
//! A key change (an update whose old key differs from the new one) becomes a delete of the
//! old key (plus tombstone) and a create of the new key, so each key's topic history stays a
//! valid sequence of that row's states.

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::{
    self, Change, Column, Datum, Encoder, Op, Position, SnapshotMarker, TableSchema,
};
use crate::sink::{Record, SinkItem};
use crate::source::catalog::{TableInfo, TableName};
use crate::source::pgoutput::{
    pg_timestamp_to_unix_millis, ColumnValue, LogicalMessage, OldTuple, Relation, TupleData,
};
use crate::source::Lsn;

/// A change stream pgcdc cannot turn into events.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(
        "change for relation OID {0} arrived before its Relation message (protocol violation)"
    )]
    UnknownRelation(u32),
    #[error(
        "{0} sent a binary value; pgcdc asks for text values, so this is a protocol violation"
    )]
    BinaryValue(String),
    #[error("{what} arrived outside a transaction (protocol violation)")]
    OutsideTransaction { what: &'static str },
    #[error("received a streamed (in-progress) transaction, which pgcdc did not ask for (protocol violation)")]
    Streamed,
}

struct Txn {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts_ms: i64,
}

/// Converts one replication stream's messages into sink items.
pub struct ChangeBuilder {
    encoder: Encoder,
    topic_prefix: String,
    tombstones: bool,
    /// Key column names of the captured tables.
    selected: HashMap<TableName, Vec<String>>,
    /// Relation OID → schema, or `None` for a relation that is published but not captured.
    relations: HashMap<u32, Option<Arc<TableSchema>>>,
    txn: Option<Txn>,
    /// Changes turned into events, for logs and metrics.
    pub events: u64,
}

impl ChangeBuilder {
    pub fn new(
        encoder: Encoder,
        topic_prefix: &str,
        tables: &[TableInfo],
        tombstones: bool,
    ) -> Self {
        ChangeBuilder {
            encoder,
            topic_prefix: topic_prefix.to_string(),
            tombstones,
            selected: tables
                .iter()
                .map(|t| (t.name.clone(), t.key.clone()))
                .collect(),
            relations: HashMap::new(),
            txn: None,
            events: 0,
        }
    }

    /// True between a Begin and its Commit: positions seen now must not be confirmed.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Handles one message whose XLogData started at `wal_start`, appending items to `out`.
    pub fn handle(
        &mut self,
        msg: LogicalMessage,
        wal_start: Lsn,
        out: &mut Vec<SinkItem>,
    ) -> Result<(), ChangeError> {
        match msg {
            LogicalMessage::Begin(b) => {
                self.txn = Some(Txn {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_ts_ms: pg_timestamp_to_unix_millis(b.commit_timestamp),
                });
            }
            LogicalMessage::Commit(c) => {
                self.txn = None;
                out.push(SinkItem::Checkpoint(c.end_lsn));
            }
            LogicalMessage::Relation(r) => self.relation(r),
            LogicalMessage::Insert(i) => {
                let Some(table) = self.table(i.relation_oid)? else {
                    return Ok(());
                };
                let new = datums(&table, &i.new)?;
                let pos = self.position(wal_start, "insert")?;
                self.emit(&table, Op::Create, None, Some(&new), pos, out);
            }
            LogicalMessage::Update(u) => {
                let Some(table) = self.table(u.relation_oid)? else {
                    return Ok(());
                };
                let pos = self.position(wal_start, "update")?;
                let old = match &u.old {
                    Some(o) => Some(datums(&table, o.tuple())?),
                    None => None,
                };
                let mut new = datums(&table, &u.new)?;
                if let (Some(OldTuple::Full(_)), Some(old)) = (&u.old, &old) {
                    // REPLICA IDENTITY FULL: the old row has the unchanged TOAST values.
                    for (n, o) in new.iter_mut().zip(old.iter()) {
                        if *n == Datum::Unchanged {
                            *n = *o;
                        }
                    }
                }
                let key_changed = old
                    .as_ref()
                    .is_some_and(|o| table.key.iter().any(|&k| o.get(k) != new.get(k)));
                if key_changed {
                    let old = old.as_deref();
                    self.emit(&table, Op::Delete, old, None, pos, out);
                    self.emit(&table, Op::Create, None, Some(&new), pos, out);
                } else {
                    let before = match &u.old {
                        Some(OldTuple::Full(_)) => old.as_deref(),
                        _ => None,
                    };
                    self.emit(&table, Op::Update, before, Some(&new), pos, out);
                }
            }
            LogicalMessage::Delete(d) => {
                let Some(table) = self.table(d.relation_oid)? else {
                    return Ok(());
                };
                let pos = self.position(wal_start, "delete")?;
                let old = datums(&table, d.old.tuple())?;
                self.emit(&table, Op::Delete, Some(&old), None, pos, out);
            }
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_) => return Err(ChangeError::Streamed),
            LogicalMessage::Truncate(t) => {
                tracing::warn!(relations = ?t.relation_oids, "TRUNCATE is not published yet; consumers keep the truncated rows");
            }
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) | LogicalMessage::Message(_) => {}
        }
        Ok(())
    }

    fn relation(&mut self, r: Relation) {
        let name = TableName::new(r.namespace.clone(), r.name.clone());
        let schema = self.selected.get(&name).map(|key| {
            let columns = r
                .columns
                .iter()
                .map(|c| Column::new(c.name.clone(), c.type_oid))
                .collect();
            let topic: Arc<str> = topic_name(&self.topic_prefix, &name).into();
            Arc::new(TableSchema::new(r.namespace, r.name, topic, columns, key))
        });
        self.relations.insert(r.oid, schema);
    }

    fn table(&self, oid: u32) -> Result<Option<Arc<TableSchema>>, ChangeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(ChangeError::UnknownRelation(oid))
    }

    fn position(&self, lsn: Lsn, what: &'static str) -> Result<Position, ChangeError> {
        let txn = self
            .txn
            .as_ref()
            .ok_or(ChangeError::OutsideTransaction { what })?;
        Ok(Position {
            lsn,
            commit_lsn: txn.commit_lsn,
            xid: Some(txn.xid),
            commit_ts_ms: txn.commit_ts_ms,
            snapshot: SnapshotMarker::False,
        })
    }

    fn emit(
        &mut self,
        table: &TableSchema,
        op: Op,
        before: Option<&[Datum<'_>]>,
        after: Option<&[Datum<'_>]>,
        position: Position,
        out: &mut Vec<SinkItem>,
    ) {
        let key_row = after.or(before).unwrap_or(&[]);
        let key = self.encoder.key(table, key_row);
        let change = Change {
            op,
            before,
            after,
            position,
        };
        let value = self.encoder.value(table, &change, event::now_ms());
        out.push(SinkItem::Record(Record {
            topic: table.topic.clone(),
            key: key.clone(),
            value: Some(value),
        }));
        self.events += 1;
        crate::metrics::global().count_event(&table.topic, op);
        if op == Op::Delete && self.tombstones && key.is_some() {
            out.push(SinkItem::Record(Record {
                topic: table.topic.clone(),
                key,
                value: None,
            }));
        }
    }
}

/// `<prefix>.<schema>.<table>`.
pub fn topic_name(prefix: &str, table: &TableName) -> String {
    format!("{prefix}.{}.{}", table.schema, table.name)
}

fn datums<'a>(table: &TableSchema, tuple: &'a TupleData) -> Result<Vec<Datum<'a>>, ChangeError> {
    tuple
        .0
        .iter()
        .map(|v| match v {
            ColumnValue::Null => Ok(Datum::Null),
            ColumnValue::UnchangedToast => Ok(Datum::Unchanged),
            ColumnValue::Text(b) => Ok(Datum::Text(b)),
            ColumnValue::Binary(_) => Err(ChangeError::BinaryValue(table.qualified_name())),
        })
        .collect()
}
