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
//!
//! Shapes change while streaming. pgoutput sends a Relation message before a table's first
//! change in a session and again after its definition changed (columns added, dropped,
//! renamed or retyped), so each Relation message rebuilds that table's [`TableSchema`]; the
//! events that follow carry the new shape and a new `source.schema_id`. What a Relation
//! message cannot say — how a new type is built, the key of a table that joined the
//! publication, whether its topic exists — [`ChangeBuilder::prepare`] asks the catalog (see
//! [`super::schema`]) before the message is handled, which the streaming loop awaits.
//!
//! Keys: the Kafka key of a table is its replica identity index under `REPLICA IDENTITY USING
//! INDEX`, else its primary key (see [`crate::source::catalog::table_key`]): columns that are
//! NOT NULL and in every row and old key tuple pgoutput sends. So an event that lacks one is
//! a bug, refused ([`ChangeError::MissingKey`]) rather than published under a null key.
//!
//! Unchanged TOAST values: pgoutput leaves out large values an UPDATE did not change. Under
//! REPLICA IDENTITY FULL the old row has them and they are filled in; so are key columns
//! stored out of line, which the old key tuple carries; others are left out of `after` and
//! named in the event's `unchanged` list: never invented.
//!
//! Annotations: a transactional `pg_logical_emit_message` with the annotation prefix carries a
//! JSON object that every later change event of its transaction gets (`source.annotations`),
//! e.g. the request that caused the writes. Later in WAL order only: holding a transaction
//! back to annotate its earlier changes would need memory as large as the transaction, so
//! applications emit the message first (the README says so). Several messages merge; the
//! object ends with the transaction. A message that cannot annotate (not transactional, not
//! an object) is dropped with a rate-limited warning: an application's mistake must not stop
//! the pipeline.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::event::headers;
use crate::event::{
    BinaryMode, Change, Column, Datum, Encoder, MessageEvent, Op, Position, SnapshotMarker,
    TableSchema, TxnOrder, TypeRegistry,
};
use crate::model::failure::{Recoverable, Recovery};
use crate::model::Lsn;
use crate::model::{Header, Record, SinkItem};
use crate::source::catalog::{TableInfo, TableName};
use crate::source::exclude::{ExcludeError, Exclusions};
use crate::source::outbox::{Outbox, OutboxConfig, OutboxError};
use crate::source::pgoutput::{
    pg_timestamp_to_unix_millis, ColumnValue, LogicalMessage, Message, OldTuple, Relation,
    ReplicaIdentity, TupleData,
};
use crate::source::schema::{Lookup, LookupError};
use crate::source::topic::{topic_name, TopicError, Topics};

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
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("cannot follow a table that joined the publication or whose key changed: {0}")]
    Exclude(#[from] ExcludeError),
    #[error("cannot follow a table that joined the publication: {0}")]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Outbox(#[from] Box<OutboxError>),
    #[error("{table}: the publication does not publish its key column(s) {}, so its events could not be keyed (the Kafka key is the replica identity index under REPLICA IDENTITY USING INDEX, else the primary key). Fix: add them to the publication's column list for that table (ALTER PUBLICATION … DROP TABLE …; ALTER PUBLICATION … ADD TABLE … (columns…);)", .missing.join(", "))]
    KeyNotPublished {
        table: TableName,
        missing: Vec<String>,
    },
    #[error("an {op} of {table} carries no value for its key column `{column}`: pgcdc stops rather than publish it under a null key. This should not happen (key columns are NOT NULL, and PostgreSQL sends them in every row and old key tuple): please report it, with the table's definition and replica identity")]
    MissingKey {
        op: &'static str,
        table: String,
        column: String,
    },
}

impl Recoverable for ChangeError {
    /// Reconnecting may help when a catalog connection or the broker went away; a change
    /// that cannot be published stops.
    fn recovery(&self) -> Recovery {
        match self {
            ChangeError::Lookup(e) => e.recovery(),
            _ => Recovery::Stop,
        }
    }
}

/// What to publish besides row changes, and how to follow the catalog.
#[derive(Clone)]
pub struct ChangeOptions {
    /// `op:"t"` events for TRUNCATE.
    pub truncate: bool,
    /// `pg_logical_emit_message` messages on `<prefix>.message`.
    pub messages: bool,
    /// How message contents are written.
    pub binary: BinaryMode,
    /// Capture tables that join the publication (no `--table` given).
    pub follow_publication: bool,
    pub exclude: Arc<Exclusions>,
    /// Catalog access for new types and tables; without it, unknown types are text and
    /// tables joining the publication are ignored.
    pub lookup: Option<Arc<Lookup>>,
    /// The prefix of transactional messages whose JSON object annotates the transaction's
    /// following events (`--annotation-prefix`); `None`: annotations are off.
    pub annotation_prefix: Option<Arc<str>>,
    /// The outbox tables (`--outbox`), whose inserts are published as application events
    /// (see [`crate::source::outbox`]).
    pub outbox: Option<Arc<OutboxConfig>>,
}

impl Default for ChangeOptions {
    fn default() -> Self {
        ChangeOptions {
            truncate: true,
            messages: true,
            binary: BinaryMode::default(),
            follow_publication: false,
            exclude: Arc::default(),
            lookup: None,
            annotation_prefix: Some(Arc::from(DEFAULT_ANNOTATION_PREFIX)),
            outbox: None,
        }
    }
}

/// `--annotation-prefix`'s default.
pub const DEFAULT_ANNOTATION_PREFIX: &str = "pgcdc";

/// At most one warning about ignored annotation messages per this many seconds.
const ANNOTATION_WARN_SECS: u64 = 60;

struct Txn {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts_ms: i64,
    /// `<xid>:<commit_lsn>` (with `--transaction-metadata`).
    id: String,
    /// Whether its BEGIN event was published (on its first data event).
    begun: bool,
    total: u64,
    per_table: Vec<(Arc<str>, u64)>,
    /// The annotation messages seen so far, merged (later keys win), and that object
    /// encoded: what the transaction's following events carry.
    annotations: Option<(serde_json::Map<String, serde_json::Value>, Bytes)>,
    /// The LSN of the last event id given, and how many ids were given at that LSN: the
    /// rank part of the id (see [`crate::event::headers`]).
    last_id: (Lsn, u32),
}

/// A captured relation: its schema, which tuple columns it keeps (`None`: all), and which
/// kept columns belong to the replica identity (what a key-only old tuple carries).
struct Rel {
    schema: TableSchema,
    keep: Option<Box<[bool]>>,
    identity: Box<[bool]>,
}

impl Rel {
    /// The old row of an update or delete. A key-only tuple sends NULL for the columns
    /// outside the replica identity; those are not known, so they are left out, not null.
    fn old<'a>(&self, old: &'a OldTuple) -> Result<Vec<Datum<'a>>, ChangeError> {
        let mut row = datums(&self.schema, self.keep.as_deref(), old.tuple())?;
        if let OldTuple::Key(_) = old {
            for (d, is_key) in row.iter_mut().zip(self.identity.iter()) {
                if !is_key && *d == Datum::Null {
                    *d = Datum::Unchanged;
                }
            }
        }
        Ok(row)
    }
}

/// Converts one replication stream's messages into sink items.
pub struct ChangeBuilder {
    encoder: Encoder,
    topic_prefix: String,
    tombstones: bool,
    options: ChangeOptions,
    /// Key column names of the captured tables.
    selected: HashMap<TableName, Vec<String>>,
    /// Their topics: a table that joins may not take another's (see [`crate::source::topic`]).
    topics: Topics,
    /// Relation OID → schema, or `None` for a relation that is published but not captured.
    relations: HashMap<u32, Option<Arc<Rel>>>,
    /// Types known so far: those of the encoder, plus any learned while streaming.
    types: TypeRegistry,
    txn: Option<Txn>,
    message_topic: Arc<str>,
    message_topic_ready: bool,
    transaction_topic: Arc<str>,
    /// The event counters of the table last counted, by its topic: a lookup by name per
    /// event (lock, hash, string compare) showed in the streaming profile.
    counted: Option<(Arc<str>, Arc<crate::metrics::TableMetrics>)>,
    /// When an ignored annotation message was last warned about (rate limit).
    annotation_warned: Option<std::time::Instant>,
    headers: headers::Names,
    /// The outbox tables' relations and topics.
    outbox: Outbox,
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
            headers: headers::Names::new(encoder.options().headers),
            types: TypeRegistry::clone(encoder.types()),
            encoder,
            topic_prefix: topic_prefix.to_string(),
            tombstones,
            options: ChangeOptions::default(),
            selected: tables
                .iter()
                .map(|t| (t.name.clone(), t.key.clone()))
                .collect(),
            // Checked at start (`topic::check_distinct`): nothing to refuse here.
            topics: {
                let mut topics = Topics::new(topic_prefix);
                for t in tables {
                    let _ = topics.add(&t.name);
                }
                topics
            },
            relations: HashMap::new(),
            txn: None,
            message_topic: format!("{topic_prefix}.message").into(),
            message_topic_ready: false,
            transaction_topic: format!("{topic_prefix}.transaction").into(),
            counted: None,
            annotation_warned: None,
            outbox: Outbox::default(),
            events: 0,
        }
    }

    pub fn with_options(mut self, options: ChangeOptions) -> Self {
        self.outbox = Outbox::new(options.outbox.clone());
        self.options = options;
        self
    }

    /// True between a Begin and its Commit: positions seen now must not be confirmed.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Learns from the catalog what `msg` needs and a Relation message cannot say: the
    /// types of its columns, the key and topic of a table that joined the publication, the
    /// message topic. Call it before [`ChangeBuilder::handle`]; it returns at once unless
    /// something is new.
    pub async fn prepare(&mut self, msg: &LogicalMessage) -> Result<(), ChangeError> {
        if let Some((route, topic)) = self.outbox.new_topic(msg) {
            if let Some(lookup) = &self.options.lookup {
                lookup.ensure_topic(&topic).await?;
            }
            self.outbox.created(route, topic);
            return Ok(());
        }
        let wanted = match msg {
            LogicalMessage::Relation(_) => true,
            LogicalMessage::Message(m) => {
                self.options.messages
                    && !self.message_topic_ready
                    && self.options.annotation_prefix.as_deref() != Some(m.prefix.as_str())
            }
            _ => false,
        };
        if !wanted {
            return Ok(());
        }
        let Some(lookup) = self.options.lookup.clone() else {
            return Ok(());
        };
        if let LogicalMessage::Relation(r) = msg {
            return self.prepare_relation(&lookup, r).await;
        }
        lookup.ensure_topic(&self.message_topic).await?;
        self.message_topic_ready = true;
        Ok(())
    }

    async fn prepare_relation(&mut self, lookup: &Lookup, r: &Relation) -> Result<(), ChangeError> {
        if self.outbox.is_outbox(&r.namespace, &r.name) {
            return Ok(());
        }
        let name = TableName::new(r.namespace.clone(), r.name.clone());
        match self.selected.get(&name) {
            None if !self.options.follow_publication => return Ok(()),
            None => {
                let key = key_for(&name, lookup.table_key(r.oid).await?, r)?;
                self.options.exclude.check_key(&name, &key)?;
                // Stop rather than merge its events into another table's topic.
                let topic = self.topics.add(&name)?;
                lookup.ensure_topic(&topic).await?;
                tracing::info!(table = %name, ?key, "a table joined the publication: streaming its changes from here on (rows it held before are not snapshotted)");
                if key.is_empty() {
                    tracing::warn!(table = %name, "table has no primary key or replica identity index: its events get a null Kafka key");
                }
                self.selected.insert(name, key);
            }
            Some(key) if !key_fits(key, r) => {
                // A key column was renamed or dropped, or the replica identity changed.
                let key = key_for(&name, lookup.table_key(r.oid).await?, r)?;
                self.options.exclude.check_key(&name, &key)?;
                tracing::warn!(table = %name, ?key, "the table's key columns changed while streaming: its events are keyed by these from here on (consumers keep the rows published under the old key until they drop them, or take a new snapshot)");
                self.selected.insert(name, key);
            }
            Some(_) => {}
        }
        let unknown = self.types.unknown(r.columns.iter().map(|c| c.type_oid));
        if !unknown.is_empty() {
            tracing::debug!(types = ?unknown, "looking up new column types");
            lookup.load_types(&mut self.types, unknown).await?;
        }
        Ok(())
    }

    /// Handles one message whose XLogData started at `wal_start`, appending items to `out`.
    pub fn handle(
        &mut self,
        msg: LogicalMessage,
        wal_start: Lsn,
        out: &mut Vec<SinkItem>,
    ) -> Result<(), ChangeError> {
        let oid = match &msg {
            LogicalMessage::Insert(i) => Some(i.relation_oid),
            LogicalMessage::Update(u) => Some(u.relation_oid),
            LogicalMessage::Delete(d) => Some(d.relation_oid),
            _ => None,
        };
        if oid.is_some_and(|oid| self.outbox.owns(oid)) {
            // An outbox table's row is the application's event (see `source::outbox`).
            let pos = self.position(wal_start, "outbox change")?;
            let annotations = self.txn.as_ref().and_then(|t| t.annotations.as_ref());
            let annotations = annotations.map(|(_, encoded)| encoded);
            return Ok(self.outbox.change(&msg, &pos, annotations, out)?);
        }
        match msg {
            LogicalMessage::Begin(b) => {
                let commit_lsn = b.final_lsn;
                self.txn = Some(Txn {
                    xid: b.xid,
                    commit_lsn,
                    commit_ts_ms: pg_timestamp_to_unix_millis(b.commit_timestamp),
                    id: if self.encoder.options().transaction_metadata {
                        format!("{}:{}", b.xid, commit_lsn.0)
                    } else {
                        String::new()
                    },
                    begun: false,
                    total: 0,
                    per_table: Vec::new(),
                    annotations: None,
                    last_id: (Lsn::INVALID, 0),
                });
            }
            LogicalMessage::Commit(c) => {
                if let Some(t) = self.txn.take().filter(|t| t.begun) {
                    let (key, value) =
                        self.encoder
                            .transaction(&t.id, t.commit_ts_ms, Some(&t.per_table));
                    let hs = self
                        .headers
                        .only_id(|| headers::transaction_id(t.commit_lsn, true));
                    out.push(record(&self.transaction_topic, Some(key), Some(value), hs));
                }
                out.push(SinkItem::Checkpoint(c.end_lsn));
            }
            LogicalMessage::Relation(r) => self.relation(r)?,
            LogicalMessage::Insert(i) => {
                let Some(rel) = self.table(i.relation_oid)? else {
                    return Ok(());
                };
                let table = &rel.schema;
                let new = datums(table, rel.keep.as_deref(), &i.new)?;
                let pos = self.position(wal_start, "insert")?;
                self.emit(table, Op::Create, None, Some(&new), pos, out)?;
            }
            LogicalMessage::Update(u) => {
                let Some(rel) = self.table(u.relation_oid)? else {
                    return Ok(());
                };
                let (table, keep) = (&rel.schema, rel.keep.as_deref());
                let pos = self.position(wal_start, "update")?;
                let old = match &u.old {
                    Some(o) => Some(rel.old(o)?),
                    None => None,
                };
                let mut new = datums(table, keep, &u.new)?;
                if let Some(old) = &old {
                    // The old row has what the new one left out as unchanged TOAST: under
                    // FULL every column; otherwise the replica identity columns, which
                    // PostgreSQL sends as an old key tuple when one of them is stored out
                    // of line (a long text key), and marks unchanged in the new tuple. Both
                    // before the keys are compared and the event is written.
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
                    self.emit(table, Op::Delete, old, None, pos, out)?;
                    self.emit(table, Op::Create, None, Some(&new), pos, out)?;
                } else {
                    let before = match &u.old {
                        Some(OldTuple::Full(_)) => old.as_deref(),
                        _ => None,
                    };
                    self.emit(table, Op::Update, before, Some(&new), pos, out)?;
                }
            }
            LogicalMessage::Delete(d) => {
                let Some(rel) = self.table(d.relation_oid)? else {
                    return Ok(());
                };
                let pos = self.position(wal_start, "delete")?;
                let old = rel.old(&d.old)?;
                self.emit(&rel.schema, Op::Delete, Some(&old), None, pos, out)?;
            }
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_) => return Err(ChangeError::Streamed),
            LogicalMessage::Truncate(t) => {
                let pos = self.position(wal_start, "truncate")?;
                for oid in t.relation_oids {
                    let Some(rel) = self.table(oid)? else {
                        continue;
                    };
                    if self.options.truncate {
                        self.emit(&rel.schema, Op::Truncate, None, None, pos, out)?;
                    } else {
                        tracing::warn!(table = %rel.schema.qualified, "TRUNCATE is not published (--truncate false); consumers keep the truncated rows");
                    }
                }
            }
            LogicalMessage::Message(m) => self.message(m, wal_start, out),
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) => {}
        }
        Ok(())
    }

    fn message(&mut self, m: Message, wal_start: Lsn, out: &mut Vec<SinkItem>) {
        if self.options.annotation_prefix.as_deref() == Some(m.prefix.as_str()) {
            self.annotate(&m);
            return;
        }
        if !self.options.messages {
            return;
        }
        let lsn = if m.lsn.is_valid() { m.lsn } else { wal_start };
        let position = match (&self.txn, m.transactional) {
            (Some(t), true) => Position {
                lsn,
                commit_lsn: t.commit_lsn,
                xid: Some(t.xid),
                commit_ts_ms: t.commit_ts_ms,
                snapshot: SnapshotMarker::False,
            },
            // Not part of a transaction: sent when written, at its own position.
            _ => Position {
                lsn,
                commit_lsn: lsn,
                xid: None,
                commit_ts_ms: crate::model::now_ms(),
                snapshot: SnapshotMarker::False,
            },
        };
        let event = MessageEvent {
            prefix: &m.prefix,
            content: &m.content,
            transactional: m.transactional,
            position,
        };
        let (key, value) =
            self.encoder
                .message(&event, self.options.binary, crate::model::now_ms());
        let headers = if m.transactional {
            self.event_headers(lsn)
        } else {
            self.headers.only_id(|| headers::change_id(lsn, lsn, 0))
        };
        out.push(record(&self.message_topic, Some(key), Some(value), headers));
    }

    /// Merges an annotation message into the open transaction's annotations. What cannot
    /// annotate anything (outside a transaction, not a JSON object) is dropped with a
    /// warning, never a failure: the application's data must flow whatever it sends.
    fn annotate(&mut self, m: &Message) {
        let why = match (&mut self.txn, m.transactional) {
            (Some(t), true) => {
                match serde_json::from_slice::<serde_json::Value>(&m.content) {
                    Ok(serde_json::Value::Object(object)) => {
                        let (merged, encoded) = t.annotations.get_or_insert_with(Default::default);
                        merged.extend(object);
                        *encoded = serde_json::to_vec(merged).unwrap_or_default().into();
                        return;
                    }
                    _ => "its content is not a JSON object",
                }
            }
            _ => "it is not transactional (pg_logical_emit_message(true, …) annotates the transaction it is part of)",
        };
        let now = std::time::Instant::now();
        if self
            .annotation_warned
            .is_some_and(|at| now.duration_since(at).as_secs() < ANNOTATION_WARN_SECS)
        {
            return;
        }
        self.annotation_warned = Some(now);
        tracing::warn!(prefix = %m.prefix, lsn = %m.lsn, "annotation message ignored: {why} (at most one such warning a minute)");
    }

    fn relation(&mut self, r: Relation) -> Result<(), ChangeError> {
        if self.outbox.relation(&r) {
            self.relations.insert(r.oid, None);
            return Ok(());
        }
        let name = TableName::new(r.namespace.clone(), r.name.clone());
        let rel = self.selected.get(&name).map(|key| {
            let keep: Vec<bool> = r
                .columns
                .iter()
                .map(|c| !self.options.exclude.excludes(&name, &c.name))
                .collect();
            let columns = r
                .columns
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(c, _)| {
                    Column::with_kind(c.name.clone(), c.type_oid, self.types.kind(c.type_oid))
                })
                .collect();
            let identity = r
                .columns
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(c, _)| c.is_key)
                .collect();
            let topic: Arc<str> = topic_name(&self.topic_prefix, &name).into();
            let schema = TableSchema::new(r.namespace.clone(), r.name.clone(), topic, columns, key);
            if schema.key.len() != key.len() {
                // Not among the published columns (checked by `prepare` when it can look up
                // the catalog): a partial key would merge rows.
                return Err(ChangeError::KeyNotPublished {
                    table: name.clone(),
                    missing: key
                        .iter()
                        .filter(|k| !schema.columns.iter().any(|c| &c.name == *k))
                        .cloned()
                        .collect(),
                });
            }
            Ok(Arc::new(Rel {
                schema,
                keep: keep.contains(&false).then(|| keep.into_boxed_slice()),
                identity,
            }))
        });
        let rel = rel.transpose()?;
        if let (Some(Some(old)), Some(new)) = (self.relations.get(&r.oid), &rel) {
            if old.schema.schema_id != new.schema.schema_id {
                tracing::info!(
                    table = %new.schema.qualified,
                    schema_id = format!("{:016x}", new.schema.schema_id),
                    columns = ?new.schema.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
                    "table shape changed"
                );
            }
        }
        self.relations.insert(r.oid, rel);
        Ok(())
    }

    fn table(&self, oid: u32) -> Result<Option<Arc<Rel>>, ChangeError> {
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

    /// Counts a data event of `table` in the open transaction, publishing its BEGIN event
    /// first if this is its first. Returns (total order, order within the table).
    fn count(&mut self, table: &TableSchema, out: &mut Vec<SinkItem>) -> Option<(u64, u64)> {
        if !self.encoder.options().transaction_metadata {
            return None;
        }
        let t = self.txn.as_mut()?;
        if !t.begun {
            t.begun = true;
            let (key, value) = self.encoder.transaction(&t.id, t.commit_ts_ms, None);
            let hs = self
                .headers
                .only_id(|| headers::transaction_id(t.commit_lsn, false));
            out.push(record(&self.transaction_topic, Some(key), Some(value), hs));
        }
        t.total += 1;
        let n = match t.per_table.iter_mut().find(|(q, _)| *q == table.qualified) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                t.per_table.push((table.qualified.clone(), 1));
                1
            }
        };
        Some((t.total, n))
    }

    fn emit(
        &mut self,
        table: &TableSchema,
        op: Op,
        before: Option<&[Datum<'_>]>,
        after: Option<&[Datum<'_>]>,
        position: Position,
        out: &mut Vec<SinkItem>,
    ) -> Result<(), ChangeError> {
        let key = match op {
            Op::Truncate => None,
            _ => {
                let row = after.or(before).unwrap_or(&[]);
                if let Some(column) = table.missing_key(row) {
                    return Err(ChangeError::MissingKey {
                        op: match op {
                            Op::Create => "insert",
                            Op::Update => "update",
                            _ => "delete",
                        },
                        table: table.qualified_name(),
                        column: column.to_string(),
                    });
                }
                self.encoder.key(table, row)
            }
        };
        let order = self.count(table, out);
        let transaction = match (order, &self.txn) {
            (Some((total_order, data_collection_order)), Some(t)) => Some(TxnOrder {
                id: &t.id,
                total_order,
                data_collection_order,
            }),
            _ => None,
        };
        let change = Change {
            op,
            before,
            after,
            position,
            transaction,
            annotations: self
                .txn
                .as_ref()
                .and_then(|t| t.annotations.as_ref())
                .map(|(_, encoded)| &encoded[..]),
        };
        let value = self.encoder.value(table, &change, crate::model::now_ms());
        let headers = self.event_headers(change.position.lsn);
        if op == Op::Delete && self.tombstones && key.is_some() {
            let mut tombstone = headers.clone();
            if let Some(id) = tombstone.first_mut() {
                let mut value = id.value.to_vec();
                value.extend_from_slice(b".t");
                id.value = value.into();
            }
            out.push(record(&table.topic, key.clone(), Some(value), headers));
            out.push(record(&table.topic, key, None, tombstone));
        } else {
            out.push(record(&table.topic, key, Some(value), headers));
        }
        self.events += 1;
        self.count_metric(&table.topic, op);
        Ok(())
    }

    /// The headers of the open transaction's next event at `lsn`: its id (the event id comes
    /// first), and the annotations so far.
    fn event_headers(&mut self, lsn: Lsn) -> Vec<Header> {
        let Some(t) = self.txn.as_mut() else {
            return self.headers.only_id(|| headers::change_id(lsn, lsn, 0));
        };
        if !self.headers.on() {
            return Vec::new();
        }
        let rank = match t.last_id {
            (last, n) if last == lsn => n + 1,
            _ => 0,
        };
        t.last_id = (lsn, rank);
        let mut out = Vec::with_capacity(2);
        out.push(self.headers.id(headers::change_id(t.commit_lsn, lsn, rank)));
        if let Some((_, encoded)) = &t.annotations {
            out.push(Header {
                name: self.headers.annotations.clone(),
                value: encoded.clone(),
            });
        }
        out
    }
}

impl ChangeBuilder {
    fn count_metric(&mut self, topic: &Arc<str>, op: Op) {
        match &self.counted {
            Some((t, m)) if Arc::ptr_eq(t, topic) => m.count(op),
            _ => {
                if let Some(m) = crate::metrics::global().existing_table(topic) {
                    m.count(op);
                    self.counted = Some((topic.clone(), m));
                }
            }
        }
    }
}

fn record(
    topic: &Arc<str>,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<Header>,
) -> SinkItem {
    SinkItem::Record(Record {
        topic: topic.clone(),
        key,
        value,
        partition: None,
        headers,
    })
}

/// The key of the table of Relation message `r`, given the one the catalog holds now (see
/// [`crate::source::catalog::table_key`]). The catalog may be newer than the WAL being
/// decoded; what old rows carry is what `r` flags as the replica identity, so under DEFAULT
/// and USING INDEX those flags win when the two disagree (a key renamed or changed since, a
/// table gone). Under FULL every column is flagged: the catalog's primary key, or none.
/// Every key column must be published: a key cut short would merge rows.
fn key_for(
    name: &TableName,
    catalog: Vec<String>,
    r: &Relation,
) -> Result<Vec<String>, ChangeError> {
    let flagged = flagged(r);
    let key = match r.replica_identity {
        ReplicaIdentity::Default | ReplicaIdentity::Index
            if !flagged.is_empty() && !same_columns(&catalog, &flagged) =>
        {
            flagged.into_iter().map(str::to_string).collect()
        }
        _ => catalog,
    };
    let missing: Vec<String> = key
        .iter()
        .filter(|k| !r.columns.iter().any(|c| &c.name == *k))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(ChangeError::KeyNotPublished {
            table: name.clone(),
            missing,
        });
    }
    Ok(key)
}

/// Whether `key` is still the key of the table `r` describes: every column present, and
/// under DEFAULT and USING INDEX the replica identity columns.
fn key_fits(key: &[String], r: &Relation) -> bool {
    let present = key.iter().all(|k| r.columns.iter().any(|c| &c.name == k));
    let flagged = flagged(r);
    present
        && match r.replica_identity {
            ReplicaIdentity::Default | ReplicaIdentity::Index if !flagged.is_empty() => {
                same_columns(key, &flagged)
            }
            _ => true,
        }
}

/// The columns `r` flags as its replica identity.
fn flagged(r: &Relation) -> Vec<&str> {
    r.columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| c.name.as_str())
        .collect()
}

/// The same columns, in any order.
fn same_columns(a: &[impl AsRef<str>], b: &[impl AsRef<str>]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.iter().any(|y| y.as_ref() == x.as_ref()))
}

/// The values of `tuple` for the kept columns.
fn datums<'a>(
    table: &TableSchema,
    keep: Option<&[bool]>,
    tuple: &'a TupleData,
) -> Result<Vec<Datum<'a>>, ChangeError> {
    let datum = |v: &'a ColumnValue| match v {
        ColumnValue::Null => Ok(Datum::Null),
        ColumnValue::UnchangedToast => Ok(Datum::Unchanged),
        ColumnValue::Text(b) => Ok(Datum::Text(b)),
        ColumnValue::Binary(_) => Err(ChangeError::BinaryValue(table.qualified_name())),
    };
    match keep {
        None => tuple.0.iter().map(datum).collect(),
        Some(keep) => tuple
            .0
            .iter()
            .zip(keep.iter())
            .filter(|(_, k)| **k)
            .map(|(v, _)| datum(v))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::{json, Value};

    use super::*;
    use crate::source::pgoutput::{Decoder, RelationColumn};

    /// Captured pgoutput (see `tests/fixtures/pgoutput/README.md` for the workload).
    const TEXT: &str = include_str!("../../tests/fixtures/pgoutput/text.txt");

    /// The captured messages, decoded as the replication connection decodes them.
    fn captured() -> Vec<(Lsn, LogicalMessage)> {
        let mut decoder = Decoder::new();
        TEXT.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (lsn, hex) = l.split_once(' ').expect("`<lsn> <hex>`");
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                let msg = decoder.decode(Bytes::from(bytes)).expect("decodes");
                (lsn.parse().expect("lsn"), msg)
            })
            .collect()
    }

    /// A captured table: only its name and key matter to [`ChangeBuilder::new`].
    fn table(name: &str, key: &[&str]) -> TableInfo {
        TableInfo {
            oid: 0,
            name: TableName::new("public", name),
            columns: Vec::new(),
            attributes: Vec::new(),
            key: key.iter().map(|k| k.to_string()).collect(),
            partitioned: false,
            row_filter: None,
            unpublished: Vec::new(),
        }
    }

    fn builder(tables: &[TableInfo]) -> ChangeBuilder {
        ChangeBuilder::new(Encoder::new("p", "db"), "p", tables, true)
    }

    /// (table, key, value) of each record, JSON-decoded; `Value::Null` for no key or value.
    fn records(out: &[SinkItem]) -> Vec<(String, Value, Value)> {
        let json = |b: &Option<Bytes>| {
            b.as_ref()
                .map_or(Value::Null, |b| serde_json::from_slice(b).expect("JSON"))
        };
        out.iter()
            .filter_map(|item| match item {
                SinkItem::Record(r) => Some((
                    r.topic.trim_start_matches("p.public.").to_string(),
                    json(&r.key),
                    json(&r.value),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_replica_identity_index_keys_every_event_of_its_table() {
        // tags: PRIMARY KEY (id), REPLICA IDENTITY USING INDEX on code.
        let mut b = builder(&[table("tags", &["code"])]);
        let mut out = Vec::new();
        for (lsn, msg) in captured() {
            b.handle(msg, lsn, &mut out).expect("handled");
        }
        let tags: Vec<(Value, Option<String>)> = records(&out)
            .into_iter()
            .filter(|(t, _, _)| t == "tags")
            .map(|(_, k, v)| (k, v["op"].as_str().map(str::to_string)))
            .collect();
        let op = |o: &str| Some(o.to_string());
        assert_eq!(
            tags,
            [
                (json!({"code": "A"}), op("c")),
                (json!({"code": "B"}), op("c")),
                // UPDATE tags SET code = 'C' WHERE id = 2: the key changed.
                (json!({"code": "B"}), op("d")),
                (json!({"code": "B"}), None),
                (json!({"code": "C"}), op("c")),
                // DELETE FROM tags WHERE id = 1: the old key tuple holds only code.
                (json!({"code": "A"}), op("d")),
                (json!({"code": "A"}), None),
                (json!({"code": "from origin"}), op("c")),
            ]
        );
    }

    #[test]
    fn an_event_without_its_key_is_refused_not_published_under_a_null_key() {
        // Keyed by the primary key, which the old key tuples of tags do not carry.
        let mut b = builder(&[table("tags", &["id"])]);
        let mut out = Vec::new();
        let err = captured()
            .into_iter()
            .find_map(|(lsn, msg)| b.handle(msg, lsn, &mut out).err())
            .expect("refused");
        assert!(
            matches!(&err, ChangeError::MissingKey { op: "delete", column, .. } if column == "id"),
            "{err}"
        );
        assert!(records(&out).iter().all(|(_, k, _)| !k["id"].is_null()));
    }

    /// One transaction of `changes` on relation `rel`, through a builder capturing table t
    /// keyed by `key`; the records it produces.
    fn transaction(
        rel: Relation,
        key: &[&str],
        changes: Vec<LogicalMessage>,
    ) -> Vec<(String, Value, Value)> {
        let mut b = builder(&[table("t", key)]);
        let mut out = Vec::new();
        let begin = LogicalMessage::Begin(crate::source::pgoutput::Begin {
            final_lsn: Lsn(0x200),
            commit_timestamp: 0,
            xid: 7,
        });
        let commit = LogicalMessage::Commit(crate::source::pgoutput::Commit {
            flags: 0,
            commit_lsn: Lsn(0x200),
            end_lsn: Lsn(0x210),
            commit_timestamp: 0,
        });
        let messages = [LogicalMessage::Relation(rel), begin]
            .into_iter()
            .chain(changes)
            .chain([commit]);
        for (i, m) in messages.enumerate() {
            b.handle(m, Lsn(0x100 + i as u64), &mut out)
                .expect("handled");
        }
        records(&out)
    }

    fn text(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn update(old: Option<OldTuple>, new: Vec<ColumnValue>) -> LogicalMessage {
        LogicalMessage::Update(crate::source::pgoutput::Update {
            xid: None,
            relation_oid: 1,
            old,
            new: TupleData(new),
        })
    }

    #[test]
    fn a_key_stored_out_of_line_is_filled_from_the_old_key_tuple() {
        // `UPDATE t SET v = v + 10` of a row whose text key is TOASTed: PostgreSQL sends the
        // old key tuple ('K') and marks the key unchanged ('u') in the new tuple.
        let long = "x".repeat(2500);
        let default = relation(ReplicaIdentity::Default, &[("k", true), ("v", false)]);
        let got = transaction(
            default,
            &["k"],
            vec![update(
                Some(OldTuple::Key(TupleData(vec![
                    text(&long),
                    ColumnValue::Null,
                ]))),
                vec![ColumnValue::UnchangedToast, text("11")],
            )],
        );
        assert_eq!(
            got.len(),
            1,
            "one update, not a delete and a create: {got:?}"
        );
        let (_, key, value) = &got[0];
        assert_eq!(*key, json!({"k": long}));
        assert_eq!(value["op"], "u");
        assert_eq!(value["after"], json!({"k": long, "v": 11}));
        assert!(value.get("unchanged").is_none(), "{value}");

        // FULL: the old row ('O') has it, and is the event's `before`.
        let full = relation(ReplicaIdentity::Full, &[("k", true), ("v", true)]);
        let got = transaction(
            full,
            &["k"],
            vec![update(
                Some(OldTuple::Full(TupleData(vec![text(&long), text("1")]))),
                vec![ColumnValue::UnchangedToast, text("11")],
            )],
        );
        assert_eq!(got.len(), 1, "{got:?}");
        let (_, key, value) = &got[0];
        assert_eq!(*key, json!({"k": long}));
        assert_eq!(value["after"], json!({"k": long, "v": 11}));
        assert_eq!(value["before"], json!({"k": long, "v": 1}));

        // Another unchanged TOASTed column is not in the old key tuple: still left out.
        let more = relation(
            ReplicaIdentity::Default,
            &[("k", true), ("body", false), ("v", false)],
        );
        let got = transaction(
            more,
            &["k"],
            vec![update(
                Some(OldTuple::Key(TupleData(vec![
                    text(&long),
                    ColumnValue::Null,
                    ColumnValue::Null,
                ]))),
                vec![
                    ColumnValue::UnchangedToast,
                    ColumnValue::UnchangedToast,
                    text("11"),
                ],
            )],
        );
        assert_eq!(got.len(), 1, "{got:?}");
        let (_, key, value) = &got[0];
        assert_eq!(*key, json!({"k": long}));
        assert_eq!(value["after"], json!({"k": long, "v": 11}));
        assert_eq!(value["unchanged"], json!(["body"]));
    }

    #[test]
    fn an_update_without_its_key_is_refused() {
        // An unchanged TOASTed key and no old key tuple to fill it from (servers before the
        // fix that logs one): not published under a null key.
        let mut b = builder(&[table("t", &["k"])]);
        let mut out = Vec::new();
        let rel = relation(ReplicaIdentity::Default, &[("k", true), ("v", false)]);
        b.handle(LogicalMessage::Relation(rel), Lsn(1), &mut out)
            .unwrap();
        let begin = LogicalMessage::Begin(crate::source::pgoutput::Begin {
            final_lsn: Lsn(0x200),
            commit_timestamp: 0,
            xid: 7,
        });
        b.handle(begin, Lsn(2), &mut out).unwrap();
        let err = b
            .handle(
                update(None, vec![ColumnValue::UnchangedToast, text("11")]),
                Lsn(3),
                &mut out,
            )
            .unwrap_err();
        assert!(
            matches!(&err, ChangeError::MissingKey { op: "update", column, .. } if column == "k"),
            "{err}"
        );
        assert!(records(&out).is_empty());
    }

    fn insert(k: &str) -> LogicalMessage {
        LogicalMessage::Insert(crate::source::pgoutput::Insert {
            xid: None,
            relation_oid: 1,
            new: TupleData(vec![text(k), text("0")]),
        })
    }

    fn emit_message(transactional: bool, prefix: &str, content: &str) -> LogicalMessage {
        LogicalMessage::Message(Message {
            xid: None,
            transactional,
            lsn: Lsn(0x150),
            prefix: prefix.into(),
            content: Bytes::copy_from_slice(content.as_bytes()),
        })
    }

    #[test]
    fn annotations_apply_from_their_message_on_and_merge() {
        let rel = relation(ReplicaIdentity::Default, &[("k", true), ("v", false)]);
        let out = transaction(
            rel,
            &["k"],
            vec![
                insert("1"),
                emit_message(true, "pgcdc", r#"{"request_id": "r1", "user": "u"}"#),
                insert("2"),
                emit_message(true, "pgcdc", r#"{"request_id": "r2"}"#),
                emit_message(true, "other", r#"{"request_id": "x"}"#),
                emit_message(true, "pgcdc", r#"["not", "an", "object"]"#),
                emit_message(false, "pgcdc", r#"{"request_id": "x"}"#),
                insert("3"),
            ],
        );
        let annotations: Vec<(&str, &Value)> = out
            .iter()
            .map(|(topic, _, v)| (topic.as_str(), &v["source"]["annotations"]))
            .collect();
        assert_eq!(
            annotations,
            [
                ("t", &Value::Null),
                ("t", &json!({"request_id": "r1", "user": "u"})),
                ("p.message", &Value::Null),
                ("t", &json!({"request_id": "r2", "user": "u"})),
            ],
            "only the other prefix is published as a message"
        );
        assert!(out[0].2["source"].get("annotations").is_none());

        // Off: the message is an ordinary message, and no event is annotated.
        let mut b = builder(&[table("t", &["k"])]).with_options(ChangeOptions {
            annotation_prefix: None,
            ..ChangeOptions::default()
        });
        let mut out = Vec::new();
        let rel = relation(ReplicaIdentity::Default, &[("k", true), ("v", false)]);
        let begin = LogicalMessage::Begin(crate::source::pgoutput::Begin {
            final_lsn: Lsn(0x200),
            commit_timestamp: 0,
            xid: 7,
        });
        for m in [
            LogicalMessage::Relation(rel),
            begin,
            emit_message(true, "pgcdc", r#"{"request_id": "r1"}"#),
            insert("1"),
        ] {
            b.handle(m, Lsn(0x100), &mut out).unwrap();
        }
        let out = records(&out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, "p.message");
        assert!(out[1].2["source"].get("annotations").is_none());
    }

    #[test]
    fn annotations_end_with_their_transaction() {
        let mut b = builder(&[table("t", &["k"])]);
        let mut out = Vec::new();
        let rel = relation(ReplicaIdentity::Default, &[("k", true), ("v", false)]);
        b.handle(LogicalMessage::Relation(rel), Lsn(1), &mut out)
            .unwrap();
        for (xid, annotate) in [(7, true), (8, false)] {
            let begin = LogicalMessage::Begin(crate::source::pgoutput::Begin {
                final_lsn: Lsn(0x200 * u64::from(xid)),
                commit_timestamp: 0,
                xid,
            });
            let commit = LogicalMessage::Commit(crate::source::pgoutput::Commit {
                flags: 0,
                commit_lsn: Lsn(0x200 * u64::from(xid)),
                end_lsn: Lsn(0x200 * u64::from(xid) + 0x10),
                commit_timestamp: 0,
            });
            b.handle(begin, Lsn(2), &mut out).unwrap();
            if annotate {
                b.handle(emit_message(true, "pgcdc", r#"{"r": 1}"#), Lsn(3), &mut out)
                    .unwrap();
            }
            b.handle(insert(&xid.to_string()), Lsn(4), &mut out)
                .unwrap();
            b.handle(commit, Lsn(5), &mut out).unwrap();
        }
        let out = records(&out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].2["source"]["annotations"], json!({"r": 1}));
        assert!(out[1].2["source"].get("annotations").is_none());
    }

    fn relation(identity: ReplicaIdentity, columns: &[(&str, bool)]) -> Relation {
        Relation {
            xid: None,
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: identity,
            columns: columns
                .iter()
                .map(|(name, is_key)| RelationColumn {
                    is_key: *is_key,
                    name: name.to_string(),
                    type_oid: 23,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn keys_of_tables_met_while_streaming() {
        let t = TableName::new("public", "t");
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let key = |catalog: &[&str], r: &Relation| key_for(&t, names(catalog), r);
        use ReplicaIdentity::*;
        // The catalog agrees with the flags: its (index) order is kept.
        let r = relation(Index, &[("a", true), ("b", true), ("c", false)]);
        assert_eq!(key(&["b", "a"], &r).unwrap(), ["b", "a"]);
        // It does not (renamed since, or gone): the flags, which the old tuples follow.
        let r = relation(Default, &[("id", true), ("v", false)]);
        assert_eq!(key(&["ident"], &r).unwrap(), ["id"]);
        assert_eq!(key(&[], &r).unwrap(), ["id"]);
        // FULL flags every column: the primary key, else none.
        let r = relation(Full, &[("id", true), ("v", true)]);
        assert_eq!(key(&["id"], &r).unwrap(), ["id"]);
        assert!(key(&[], &r).unwrap().is_empty());
        // A key the publication's column list leaves out.
        let r = relation(Full, &[("v", true)]);
        assert!(matches!(
            key(&["id"], &r),
            Err(ChangeError::KeyNotPublished { missing, .. }) if missing == ["id"]
        ));

        // A known key is looked up again once it no longer fits.
        let r = relation(Index, &[("id", false), ("code", true)]);
        assert!(key_fits(&names(&["code"]), &r));
        assert!(!key_fits(&names(&["id"]), &r), "the identity changed");
        let r = relation(Full, &[("id", true), ("v", true)]);
        assert!(key_fits(&names(&["id"]), &r));
        assert!(!key_fits(&names(&["ident"]), &r), "renamed");
    }

    /// The four tables of the captured workload, keyed as pgcdc keys them.
    fn workload_tables() -> Vec<TableInfo> {
        vec![
            table("accounts", &["id"]),
            table("audit", &["id"]),
            table("docs", &["id"]),
            table("tags", &["code"]),
        ]
    }

    /// Every captured message through `b`: the items, in order.
    fn run_captured(mut b: ChangeBuilder) -> Vec<SinkItem> {
        let mut out = Vec::new();
        for (lsn, msg) in captured() {
            b.handle(msg, lsn, &mut out).expect("handled");
        }
        out
    }

    /// `(table or topic, key, value)` of each record and `("checkpoint", lsn, null)` of each
    /// checkpoint, in order.
    fn items(out: &[SinkItem]) -> Vec<(String, Value, Value)> {
        let json = |b: &Option<Bytes>| {
            b.as_ref()
                .map_or(Value::Null, |b| serde_json::from_slice(b).expect("JSON"))
        };
        out.iter()
            .map(|item| match item {
                SinkItem::Record(r) => (
                    r.topic.trim_start_matches("p.public.").to_string(),
                    json(&r.key),
                    json(&r.value),
                ),
                SinkItem::Checkpoint(lsn) => ("checkpoint".to_string(), json!(lsn.0), Value::Null),
                other => panic!("unexpected item {other:?}"),
            })
            .collect()
    }

    /// The captured transactions: (xid, Begin's final LSN, Commit's end LSN).
    fn captured_transactions() -> Vec<(u32, u64, u64)> {
        let mut txns = Vec::new();
        let mut open = None;
        for (_, msg) in captured() {
            match msg {
                LogicalMessage::Begin(b) => open = Some((b.xid, b.final_lsn.0)),
                LogicalMessage::Commit(c) => {
                    let (xid, final_lsn) = open.take().expect("a Begin before each Commit");
                    assert_eq!(final_lsn, c.commit_lsn.0);
                    txns.push((xid, final_lsn, c.end_lsn.0));
                }
                _ => {}
            }
        }
        txns
    }

    #[test]
    fn every_captured_change_is_one_event_in_commit_order_and_each_commit_a_checkpoint() {
        let got = items(&run_captured(builder(&workload_tables())));
        let summary: Vec<(String, Value, Value)> = got
            .iter()
            .map(|(t, k, v)| match t.as_str() {
                "checkpoint" => (t.clone(), Value::Null, Value::Null),
                _ => (t.clone(), k.clone(), v["op"].clone()),
            })
            .collect();
        let ev = |t: &str, k: Value, op: &str| (t.to_string(), k, json!(op));
        let tomb = |t: &str, k: Value| (t.to_string(), k, Value::Null);
        let cp = || ("checkpoint".to_string(), Value::Null, Value::Null);
        let message = |prefix: &str| {
            (
                "p.message".to_string(),
                json!({"prefix": prefix}),
                json!("m"),
            )
        };
        assert_eq!(
            summary,
            [
                // One transaction inserting into all four tables.
                ev("accounts", json!({"id": 1}), "c"),
                ev("accounts", json!({"id": 2}), "c"),
                ev("accounts", json!({"id": 3}), "c"),
                ev("audit", json!({"id": 1}), "c"),
                ev("audit", json!({"id": 2}), "c"),
                ev("docs", json!({"id": 1}), "c"),
                ev("tags", json!({"code": "A"}), "c"),
                ev("tags", json!({"code": "B"}), "c"),
                cp(),
                // A non-key column.
                ev("accounts", json!({"id": 1}), "u"),
                cp(),
                // The primary key: a delete (and tombstone) of the old key, a create.
                ev("accounts", json!({"id": 2}), "d"),
                tomb("accounts", json!({"id": 2})),
                ev("accounts", json!({"id": 20}), "c"),
                cp(),
                ev("audit", json!({"id": 1}), "u"),
                cp(),
                ev("docs", json!({"id": 1}), "u"),
                cp(),
                ev("tags", json!({"code": "B"}), "d"),
                tomb("tags", json!({"code": "B"})),
                ev("tags", json!({"code": "C"}), "c"),
                cp(),
                ev("accounts", json!({"id": 3}), "d"),
                tomb("accounts", json!({"id": 3})),
                cp(),
                ev("audit", json!({"id": 2}), "d"),
                tomb("audit", json!({"id": 2})),
                cp(),
                ev("tags", json!({"code": "A"}), "d"),
                tomb("tags", json!({"code": "A"})),
                cp(),
                message("p"),
                ev("accounts", json!({"id": 4}), "c"),
                cp(),
                // A message outside a transaction: no checkpoint of its own.
                message("p2"),
                ev("accounts", json!({"id": 5}), "c"),
                cp(),
                ev("tags", json!({"code": "from origin"}), "c"),
                cp(),
                // TRUNCATE docs, audit: one event per table, without a key.
                ev("docs", Value::Null, "t"),
                ev("audit", Value::Null, "t"),
                cp(),
            ]
        );

        // Each transaction's events carry its xid and commit LSN, at positions that do not go
        // backwards; its checkpoint is its commit's end LSN.
        let txns = captured_transactions();
        let mut txn = txns.iter();
        let mut current = txn.next();
        let mut last_lsn = 0;
        for (t, k, v) in &got {
            if t == "checkpoint" {
                let (_, _, end) = current.expect("a transaction per checkpoint");
                assert_eq!(k, &json!(end));
                current = txn.next();
                last_lsn = 0;
                continue;
            }
            if v.is_null() || v["message"]["transactional"] == false {
                continue;
            }
            let (xid, commit_lsn, _) = current.expect("an event inside a transaction");
            let source = &v["source"];
            assert_eq!(source["txId"], json!(xid), "{v}");
            assert_eq!(source["commit_lsn"], json!(commit_lsn), "{v}");
            let lsn = source["lsn"].as_u64().expect("lsn");
            assert!(lsn >= last_lsn && lsn <= *commit_lsn, "{v}");
            last_lsn = lsn;
        }
        assert!(current.is_none(), "a checkpoint per transaction");
    }

    #[test]
    fn rows_and_updates_carry_what_the_replica_identity_sends() {
        let got = items(&run_captured(builder(&workload_tables())));
        let values = |t: &str, op: &str| -> Vec<Value> {
            got.iter()
                .filter(|(tt, _, v)| tt == t && v["op"] == op)
                .map(|(_, _, v)| v.clone())
                .collect()
        };
        // Text values as the encoder writes them: numbers, NULL, non-ASCII text, an enum.
        let created = values("accounts", "c");
        assert_eq!(
            created[1]["after"],
            json!({"id": 2, "name": "bob", "balance": "-3.25", "note": "héllo ✓", "feeling": "ok"})
        );
        assert_eq!(created[2]["after"]["feeling"], Value::Null);
        // DEFAULT identity, a non-key column changed: the new row, no `before`.
        let updated = values("accounts", "u");
        assert_eq!(updated[0]["before"], Value::Null);
        assert_eq!(updated[0]["after"]["balance"], "20.00");
        // The key changed: the delete's `before` is the old key, the create is the new row.
        let deleted = values("accounts", "d");
        assert_eq!(deleted[0]["before"], json!({"id": 2}));
        assert_eq!(deleted[0]["after"], Value::Null);
        assert_eq!(created[3]["after"]["id"], 20);
        assert_eq!(created[3]["after"]["note"], "héllo ✓");
        // FULL: `before` is the old row, of updates and deletes alike.
        let audit = values("audit", "u");
        assert_eq!(
            audit[0]["before"],
            json!({"id": 1, "event": "created", "at": "2024-01-02T03:04:05.123456Z"})
        );
        assert_eq!(audit[0]["after"]["event"], "changed");
        let audit = values("audit", "d");
        assert_eq!(audit[0]["before"]["event"], "to be deleted");
        // An unchanged TOASTed column: left out of `after`, named in `unchanged`.
        let docs = values("docs", "u");
        assert_eq!(docs[0]["after"], json!({"id": 1, "title": "second title"}));
        assert_eq!(docs[0]["unchanged"], json!(["body"]));
        let docs = values("docs", "c");
        assert_eq!(docs[0]["after"]["body"].as_str().map(str::len), Some(2500));
        // A transaction replayed from a replication origin: its own commit time.
        let tags = values("tags", "c");
        assert_eq!(tags[3]["source"]["ts_ms"], 1_704_164_645_000_i64);
    }

    #[test]
    fn a_relation_message_after_alter_table_gives_later_events_the_new_shape() {
        let got = items(&run_captured(builder(&workload_tables())));
        let accounts: Vec<&Value> = got
            .iter()
            .filter(|(t, _, v)| t == "accounts" && v["op"] == "c")
            .map(|(_, _, v)| v)
            .collect();
        let (before, after) = (
            accounts[0],
            accounts.last().expect("the insert after ALTER"),
        );
        assert!(before["after"].get("extra").is_none(), "{before}");
        assert_eq!(after["after"]["extra"], 42);
        assert_ne!(
            before["source"]["schema_id"], after["source"]["schema_id"],
            "a new shape, a new schema_id"
        );
        // A Relation message that changes nothing (sent again before the TRUNCATE) keeps it.
        let docs: Vec<&Value> = got
            .iter()
            .filter(|(t, _, _)| t == "docs")
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(
            docs.first().expect("docs")["source"]["schema_id"],
            docs.last().expect("docs")["source"]["schema_id"]
        );
    }

    #[test]
    fn truncate_and_messages_can_be_left_out_and_a_table_not_captured_is_skipped() {
        // Only tags and docs captured, no TRUNCATE events, no messages.
        let b = builder(&[table("tags", &["code"]), table("docs", &["id"])]).with_options(
            ChangeOptions {
                truncate: false,
                messages: false,
                ..ChangeOptions::default()
            },
        );
        let got = items(&run_captured(b));
        assert!(
            got.iter()
                .all(|(t, _, _)| t == "tags" || t == "docs" || t == "checkpoint"),
            "{got:?}"
        );
        assert_eq!(got.iter().filter(|(t, _, _)| t == "tags").count(), 8);
        // docs: its insert and update; the TRUNCATE of docs is left out.
        let docs: Vec<&Value> = got
            .iter()
            .filter(|(t, _, _)| t == "docs")
            .map(|(_, _, v)| &v["op"])
            .collect();
        assert_eq!(docs, [&json!("c"), &json!("u")]);
        // Every transaction still ends in its checkpoint, also those with nothing published.
        let checkpoints: Vec<&Value> = got
            .iter()
            .filter(|(t, _, _)| t == "checkpoint")
            .map(|(_, k, _)| k)
            .collect();
        let ends: Vec<Value> = captured_transactions()
            .into_iter()
            .map(|(_, _, end)| json!(end))
            .collect();
        assert_eq!(checkpoints, ends.iter().collect::<Vec<_>>());
    }

    #[test]
    fn messages_keep_their_transaction_or_their_own_position() {
        let got = items(&run_captured(builder(&[])));
        let messages: Vec<&Value> = got
            .iter()
            .filter(|(t, _, _)| t == "p.message")
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(messages.len(), 2);
        let (inside, outside) = (messages[0], messages[1]);
        assert_eq!(
            inside["message"],
            json!({"prefix": "p", "content": "aGVsbG8=", "transactional": true})
        );
        let (xid, commit_lsn, _) = captured_transactions()
            .into_iter()
            .find(|(_, c, _)| json!(c) == inside["source"]["commit_lsn"])
            .expect("the message's transaction");
        assert_eq!(inside["source"]["txId"], json!(xid));
        assert!(inside["source"]["lsn"].as_u64() < Some(commit_lsn));
        // Not transactional: sent when written, at its own position, without a transaction.
        assert_eq!(outside["message"]["transactional"], false);
        assert_eq!(outside["source"]["txId"], Value::Null);
        assert_eq!(outside["source"]["commit_lsn"], outside["source"]["lsn"]);
    }

    #[test]
    fn transaction_metadata_frames_each_transaction_that_published_something() {
        let options = crate::event::EventOptions {
            transaction_metadata: true,
            ..Default::default()
        };
        let encoder = Encoder::with_options("p", "db", options, TypeRegistry::default());
        let b = ChangeBuilder::new(encoder, "p", &[table("accounts", &["id"])], true);
        let got = items(&run_captured(b));
        let txns = captured_transactions();
        let id = |xid: u32| {
            let (_, commit_lsn, _) = txns.iter().find(|(x, _, _)| *x == xid).expect("xid");
            format!("{xid}:{commit_lsn}")
        };
        let frames: Vec<(String, Value)> = got
            .iter()
            .filter(|(t, _, _)| t == "p.transaction")
            .map(|(_, k, v)| (v["status"].as_str().unwrap().to_string(), k["id"].clone()))
            .collect();
        // The transactions that changed accounts: the first (3 inserts), the update, the key
        // change, the delete, the insert with a message, the insert after ALTER.
        let with_accounts = [0, 1, 2, 6, 9, 10].map(|i| txns[i].0);
        let want: Vec<(String, Value)> = with_accounts
            .iter()
            .flat_map(|x| {
                [
                    ("BEGIN".into(), json!(id(*x))),
                    ("END".into(), json!(id(*x))),
                ]
            })
            .collect();
        assert_eq!(frames, want);
        // BEGIN before the transaction's first event, END (with the counts) after its last,
        // before its checkpoint; events numbered in the transaction and in their table.
        let first = &got[..5];
        assert_eq!(first[0].0, "p.transaction");
        assert_eq!(first[0].2["status"], "BEGIN");
        for (n, (t, _, v)) in first[1..4].iter().enumerate() {
            assert_eq!(t, "accounts");
            let n = n as u64 + 1;
            assert_eq!(
                v["transaction"],
                json!({"id": id(txns[0].0), "total_order": n, "data_collection_order": n})
            );
        }
        assert_eq!(
            first[4].2,
            json!({"status": "END", "id": id(txns[0].0), "ts_ms": first[0].2["ts_ms"],
                   "event_count": 3,
                   "data_collections": [{"data_collection": "public.accounts", "event_count": 3}]})
        );
        assert_eq!(got[5].0, "checkpoint");
        // A key change is two events of the transaction.
        let end = got
            .iter()
            .find(|(t, _, v)| {
                t == "p.transaction" && v["id"] == json!(id(txns[2].0)) && v["status"] == "END"
            })
            .expect("END of the key change");
        assert_eq!(end.2["event_count"], 2);
    }

    #[test]
    fn excluded_columns_are_in_no_event() {
        use crate::source::catalog::ColumnRef;
        let exclude = Exclusions::new(&[
            ColumnRef {
                table: TableName::new("public", "accounts"),
                column: "note".into(),
            },
            ColumnRef {
                table: TableName::new("public", "docs"),
                column: "body".into(),
            },
        ]);
        let b = builder(&workload_tables()).with_options(ChangeOptions {
            exclude: Arc::new(exclude),
            ..ChangeOptions::default()
        });
        let got = items(&run_captured(b));
        let mut seen = 0;
        for (t, _, v) in &got {
            for row in [&v["before"], &v["after"]] {
                if let Some(row) = row.as_object() {
                    match t.as_str() {
                        "accounts" => {
                            assert!(!row.contains_key("note") && row.contains_key("id"), "{v}")
                        }
                        "docs" => {
                            assert!(!row.contains_key("body") && row.contains_key("id"), "{v}")
                        }
                        _ => {}
                    }
                    seen += 1;
                }
            }
        }
        assert!(seen > 10, "{got:?}");
        // An excluded column that was unchanged is not named as unchanged either.
        let docs = got
            .iter()
            .find(|(t, _, v)| t == "docs" && v["op"] == "u")
            .expect("the docs update");
        assert!(docs.2.get("unchanged").is_none(), "{}", docs.2);
        // The other tables keep every column.
        let audit = got.iter().find(|(t, _, _)| t == "audit").expect("audit");
        assert_eq!(audit.2["after"].as_object().map(|o| o.len()), Some(3));
    }

    #[test]
    fn a_stream_that_breaks_the_protocol_is_refused() {
        // A change outside a transaction.
        let mut b = builder(&[table("t", &["k"])]);
        let mut out = Vec::new();
        let rel = relation(ReplicaIdentity::Default, &[("k", true), ("v", false)]);
        b.handle(LogicalMessage::Relation(rel), Lsn(1), &mut out)
            .unwrap();
        let insert = LogicalMessage::Insert(crate::source::pgoutput::Insert {
            xid: None,
            relation_oid: 1,
            new: TupleData(vec![text("1"), text("2")]),
        });
        let err = b.handle(insert, Lsn(2), &mut out).unwrap_err();
        assert!(
            matches!(err, ChangeError::OutsideTransaction { what: "insert" }),
            "{err}"
        );
        // A change of a relation never described.
        let delete = LogicalMessage::Delete(crate::source::pgoutput::Delete {
            xid: None,
            relation_oid: 99,
            old: OldTuple::Key(TupleData(vec![text("1")])),
        });
        let err = b.handle(delete, Lsn(3), &mut out).unwrap_err();
        assert!(matches!(err, ChangeError::UnknownRelation(99)), "{err}");
        // A streamed transaction, which pgcdc does not ask for.
        let start = LogicalMessage::StreamStart(crate::source::pgoutput::StreamStart {
            xid: 5,
            first_segment: true,
        });
        let err = b.handle(start, Lsn(4), &mut out).unwrap_err();
        assert!(matches!(err, ChangeError::Streamed), "{err}");
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(err.recovery(), Recovery::Stop);
    }

    #[test]
    fn binary_tuples_are_refused() {
        const BINARY: &str = include_str!("../../tests/fixtures/pgoutput/binary.txt");
        let mut decoder = Decoder::new();
        let mut b = builder(&workload_tables());
        let mut out = Vec::new();
        let err = BINARY
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .find_map(|l| {
                let (lsn, hex) = l.split_once(' ').expect("`<lsn> <hex>`");
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                let msg = decoder.decode(Bytes::from(bytes)).expect("decodes");
                b.handle(msg, lsn.parse().expect("lsn"), &mut out).err()
            })
            .expect("refused");
        assert!(
            matches!(&err, ChangeError::BinaryValue(t) if t.contains("accounts")),
            "{err}"
        );
        assert!(records(&out).is_empty());
    }
}
