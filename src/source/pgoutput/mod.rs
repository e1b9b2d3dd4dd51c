//! Decoding of pgoutput, PostgreSQL's logical replication output plugin.
//!
//! Each `XLogData` payload of a logical replication stream is one pgoutput message (see
//! "Logical Replication Message Formats" in the PostgreSQL docs). This module turns such a
//! payload into a typed [`LogicalMessage`] and does nothing else: no I/O, no catalog
//! lookups, no buffering. Keeping it a pure function of its input makes it testable on
//! bytes captured from a real server (`tests/fixtures/pgoutput/`) and lets the replication
//! connection own all I/O, retries and flow control. Column values are zero-copy slices of
//! the input [`Bytes`]; interpreting them needs the relation's column types, which the
//! caller keeps from [`Relation`] and [`TypeMsg`] messages.
//!
//! Malformed input never panics: every length is checked before it is used, and any
//! inconsistency, including bytes left over after a complete message, is a [`DecodeError`].
//!
//! # Stream state
//!
//! With protocol version 2 and `streaming 'on'` the server may send a large transaction
//! before it commits, in segments framed by [`LogicalMessage::StreamStart`] and
//! [`LogicalMessage::StreamStop`]. Inside a segment, Relation, Type, Insert, Update,
//! Delete, Truncate and Message carry an extra leading xid, which cannot be told apart from
//! the rest of the message by looking at its bytes. So [`decode`] takes an `in_stream`
//! flag, and [`Decoder`] tracks that flag itself from the Stream Start/Stop messages it
//! decodes. Stream Commit and Stream Abort arrive outside segments. The xid inside a
//! segment is that of the (sub)transaction the change belongs to, which can differ from
//! the Stream Start xid: group streamed changes by the segment, not by that xid.

mod error;
mod reader;
#[cfg(test)]
mod tests;

use bytes::Bytes;

pub use error::DecodeError;
use reader::Reader;

use crate::model::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMsg),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(Message),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

/// Start of a (non-streamed) transaction: 'B'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01 UTC (see [`pg_timestamp_to_unix_millis`]).
    pub commit_timestamp: i64,
    pub xid: u32,
}

/// End of a (non-streamed) transaction: 'C'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Unused by PostgreSQL so far; kept as sent.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: where to resume after this transaction.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_timestamp: i64,
}

/// The transaction was replayed from a replication origin: 'O', right after Begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN of the transaction on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// Schema of a table, sent before its first change and again after it changes: 'R'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Set inside a streamed segment.
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// `pg_class.relreplident`: which old column values updates and deletes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// 'd': the primary key columns.
    Default,
    /// 'n': nothing.
    Nothing,
    /// 'f': all columns.
    Full,
    /// 'i': the columns of a chosen unique index.
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (flags bit 1). All columns are with REPLICA IDENTITY FULL.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`; -1 when the type has none.
    pub type_modifier: i32,
}

/// A user-defined type used by a following Relation: 'Y'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMsg {
    /// Set inside a streamed segment.
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// The values of one row, in the column order of its [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<ColumnValue>);

/// One column of a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    /// 'n': SQL NULL, or (in an old key tuple) a column that is not part of the key.
    Null,
    /// 'u': an unchanged TOASTed value that the server did not send.
    UnchangedToast,
    /// 't': the type's text output, in the server encoding.
    Text(Bytes),
    /// 'b': the type's binary send format (with the `binary` option).
    Binary(Bytes),
}

/// The old row carried by an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': the replica identity columns only; the others are [`ColumnValue::Null`].
    Key(TupleData),
    /// 'O': the whole row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    /// The row values, whichever kind of old tuple this is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// 'I'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Set inside a streamed segment (may be a subtransaction's xid).
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub new: TupleData,
}

/// 'U'. `old` is present when the replica identity changed or is FULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Set inside a streamed segment (may be a subtransaction's xid).
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

/// 'D'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Set inside a streamed segment (may be a subtransaction's xid).
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub old: OldTuple,
}

/// 'T': one TRUNCATE statement, possibly over several tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Set inside a streamed segment (may be a subtransaction's xid).
    pub xid: Option<u32>,
    /// `CASCADE` (option bit 1).
    pub cascade: bool,
    /// `RESTART IDENTITY` (option bit 2).
    pub restart_identity: bool,
    pub relation_oids: Vec<u32>,
}

/// 'M': output of `pg_logical_emit_message` (with the `messages` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Set inside a streamed segment.
    pub xid: Option<u32>,
    /// Part of a transaction (between Begin and Commit) rather than sent immediately.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// 'S': a segment of an in-progress transaction starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    /// The first segment of this transaction.
    pub first_segment: bool,
}

/// 'c': a streamed transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    /// Unused by PostgreSQL so far; kept as sent.
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_timestamp: i64,
}

/// 'A': a streamed transaction, or one of its subtransactions, aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    /// Equal to `xid` when the whole transaction aborted.
    pub subxid: u32,
    /// Sent by protocol version 4 and later (parallel streaming); `None` before.
    pub abort_lsn: Option<Lsn>,
    /// Microseconds since 2000-01-01 UTC; present together with `abort_lsn`.
    pub abort_timestamp: Option<i64>,
}

/// Microseconds from the Unix epoch to the PostgreSQL epoch, 2000-01-01 00:00:00 UTC.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Converts a PostgreSQL timestamp (microseconds since 2000-01-01 UTC) to milliseconds
/// since the Unix epoch, rounding down. Defined for every input, including `infinity` and
/// `-infinity` (`i64::MAX`, `i64::MIN`), which map to very distant times.
pub fn pg_timestamp_to_unix_millis(pg_micros: i64) -> i64 {
    // Dividing first leaves ample room for the offset: this cannot overflow.
    pg_micros.div_euclid(1000) + PG_EPOCH_UNIX_MICROS / 1000
}

impl Begin {
    pub fn commit_time_unix_millis(&self) -> i64 {
        pg_timestamp_to_unix_millis(self.commit_timestamp)
    }
}

impl Commit {
    pub fn commit_time_unix_millis(&self) -> i64 {
        pg_timestamp_to_unix_millis(self.commit_timestamp)
    }
}

impl StreamCommit {
    pub fn commit_time_unix_millis(&self) -> i64 {
        pg_timestamp_to_unix_millis(self.commit_timestamp)
    }
}

/// Decodes one pgoutput message. `in_stream` says whether it arrived between Stream Start
/// and Stream Stop (see the module docs); [`Decoder`] tracks that for you.
pub fn decode(data: Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    let mut r = Reader::new(data);
    let tag = r.tag()?;
    let msg = match tag {
        b'B' => LogicalMessage::Begin(Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_timestamp: r.i64("Begin commit timestamp")?,
            xid: r.u32("Begin xid")?,
        }),
        b'C' => LogicalMessage::Commit(Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.lsn("Commit LSN")?,
            end_lsn: r.lsn("Commit end LSN")?,
            commit_timestamp: r.i64("Commit timestamp")?,
        }),
        b'O' => LogicalMessage::Origin(Origin {
            commit_lsn: r.lsn("Origin commit LSN")?,
            name: r.cstr("Origin name")?,
        }),
        b'R' => LogicalMessage::Relation(relation(&mut r, in_stream)?),
        b'Y' => LogicalMessage::Type(TypeMsg {
            xid: stream_xid(&mut r, in_stream, "Type xid")?,
            oid: r.u32("Type OID")?,
            namespace: r.cstr("Type namespace")?,
            name: r.cstr("Type name")?,
        }),
        b'I' => {
            let xid = stream_xid(&mut r, in_stream, "Insert xid")?;
            let relation_oid = r.u32("Insert relation OID")?;
            r.expect(b'N', "Insert tuple marker", "'N' (new tuple)")?;
            LogicalMessage::Insert(Insert {
                xid,
                relation_oid,
                new: tuple(&mut r)?,
            })
        }
        b'U' => LogicalMessage::Update(update(&mut r, in_stream)?),
        b'D' => {
            let xid = stream_xid(&mut r, in_stream, "Delete xid")?;
            let relation_oid = r.u32("Delete relation OID")?;
            let old = match r.u8("Delete tuple marker")? {
                b'K' => OldTuple::Key(tuple(&mut r)?),
                b'O' => OldTuple::Full(tuple(&mut r)?),
                found => return Err(unexpected("Delete tuple marker", "'K' or 'O'", found)),
            };
            LogicalMessage::Delete(Delete {
                xid,
                relation_oid,
                old,
            })
        }
        b'T' => LogicalMessage::Truncate(truncate(&mut r, in_stream)?),
        b'M' => LogicalMessage::Message(message(&mut r, in_stream)?),
        b'S' => LogicalMessage::StreamStart(StreamStart {
            xid: r.u32("Stream Start xid")?,
            first_segment: r.bool("Stream Start first-segment flag")?,
        }),
        b'E' => LogicalMessage::StreamStop,
        b'c' => LogicalMessage::StreamCommit(StreamCommit {
            xid: r.u32("Stream Commit xid")?,
            flags: r.u8("Stream Commit flags")?,
            commit_lsn: r.lsn("Stream Commit LSN")?,
            end_lsn: r.lsn("Stream Commit end LSN")?,
            commit_timestamp: r.i64("Stream Commit timestamp")?,
        }),
        b'A' => {
            let xid = r.u32("Stream Abort xid")?;
            let subxid = r.u32("Stream Abort subxid")?;
            // Protocol v4 appends the abort LSN and time; earlier versions end here.
            let (abort_lsn, abort_timestamp) = if r.remaining() == 0 {
                (None, None)
            } else {
                let lsn = r.lsn("Stream Abort LSN")?;
                (Some(lsn), Some(r.i64("Stream Abort timestamp")?))
            };
            LogicalMessage::StreamAbort(StreamAbort {
                xid,
                subxid,
                abort_lsn,
                abort_timestamp,
            })
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish(tag)?;
    Ok(msg)
}

/// Stateful convenience over [`decode`]: follows Stream Start/Stop to know whether the
/// next message is inside a streamed segment. One per replication connection.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the last decoded stream framing message was Stream Start.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one message. The stream state changes only when decoding succeeds.
    pub fn decode(&mut self, data: Bytes) -> Result<LogicalMessage, DecodeError> {
        let msg = decode(data, self.in_stream)?;
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }
}

fn unexpected(what: &'static str, expected: &'static str, found: u8) -> DecodeError {
    DecodeError::UnexpectedByte {
        what,
        expected,
        found,
    }
}

/// The leading xid that streamed messages carry.
fn stream_xid(
    r: &mut Reader,
    in_stream: bool,
    what: &'static str,
) -> Result<Option<u32>, DecodeError> {
    if in_stream {
        r.u32(what).map(Some)
    } else {
        Ok(None)
    }
}

fn relation(r: &mut Reader, in_stream: bool) -> Result<Relation, DecodeError> {
    let xid = stream_xid(r, in_stream, "Relation xid")?;
    let oid = r.u32("Relation OID")?;
    let namespace = r.cstr("Relation namespace")?;
    let name = r.cstr("Relation name")?;
    let replica_identity = match r.u8("Relation replica identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        found => {
            return Err(unexpected(
                "Relation replica identity",
                "'d', 'n', 'f' or 'i'",
                found,
            ))
        }
    };
    let count = r.count16("Relation column count")?;
    // Each column takes at least 10 bytes: don't let a bogus count reserve memory.
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        // Bit 1 is the only flag defined; unknown bits are ignored.
        let flags = r.u8("Relation column flags")?;
        columns.push(RelationColumn {
            is_key: flags & 1 != 0,
            name: r.cstr("Relation column name")?,
            type_oid: r.u32("Relation column type OID")?,
            type_modifier: r.i32("Relation column type modifier")?,
        });
    }
    Ok(Relation {
        xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(r: &mut Reader, in_stream: bool) -> Result<Update, DecodeError> {
    let xid = stream_xid(r, in_stream, "Update xid")?;
    let relation_oid = r.u32("Update relation OID")?;
    let (old, marker) = match r.u8("Update tuple marker")? {
        b'K' => (
            Some(OldTuple::Key(tuple(r)?)),
            r.u8("Update new tuple marker")?,
        ),
        b'O' => (
            Some(OldTuple::Full(tuple(r)?)),
            r.u8("Update new tuple marker")?,
        ),
        marker => (None, marker),
    };
    if marker != b'N' {
        let expected = if old.is_some() {
            "'N' (new tuple)"
        } else {
            "'K', 'O' or 'N'"
        };
        return Err(unexpected("Update tuple marker", expected, marker));
    }
    Ok(Update {
        xid,
        relation_oid,
        old,
        new: tuple(r)?,
    })
}

fn truncate(r: &mut Reader, in_stream: bool) -> Result<Truncate, DecodeError> {
    let xid = stream_xid(r, in_stream, "Truncate xid")?;
    let count = r.count32("Truncate relation count")?;
    let options = r.u8("Truncate options")?;
    if options & !3 != 0 {
        return Err(DecodeError::InvalidValue {
            what: "Truncate options",
            value: options.into(),
        });
    }
    let mut relation_oids = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        relation_oids.push(r.u32("Truncate relation OID")?);
    }
    Ok(Truncate {
        xid,
        cascade: options & 1 != 0,
        restart_identity: options & 2 != 0,
        relation_oids,
    })
}

fn message(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    let xid = stream_xid(r, in_stream, "Message xid")?;
    let transactional = r.bool("Message flags")?;
    let lsn = r.lsn("Message LSN")?;
    let prefix = r.cstr("Message prefix")?;
    let len = r.count32("Message content length")?;
    let content = r.bytes(len, "Message content")?;
    Ok(Message {
        xid,
        transactional,
        lsn,
        prefix,
        content,
    })
}

/// TupleData: Int16 column count, then a kind byte and maybe a value per column.
fn tuple(r: &mut Reader) -> Result<TupleData, DecodeError> {
    let count = r.count16("tuple column count")?;
    // At least one byte per column.
    let mut values = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        values.push(match r.u8("tuple column kind")? {
            b'n' => ColumnValue::Null,
            b'u' => ColumnValue::UnchangedToast,
            b't' => {
                let len = r.count32("text column length")?;
                ColumnValue::Text(r.bytes(len, "text column value")?)
            }
            b'b' => {
                let len = r.count32("binary column length")?;
                ColumnValue::Binary(r.bytes(len, "binary column value")?)
            }
            other => return Err(DecodeError::UnknownTupleKind(other)),
        });
    }
    Ok(TupleData(values))
}
