//! The logical replication connection, written directly on the PostgreSQL wire
//! protocol.
//!
//! # Why this exists
//!
//! Streaming replication runs in the protocol's *CopyBoth* mode: after
//! `START_REPLICATION` both sides send `CopyData` messages at will. tokio-postgres as
//! published on crates.io cannot enter CopyBoth mode (and parses no `W` message), so
//! pgcdc speaks the protocol itself, with `postgres-protocol` for encoding, decoding
//! and authentication. Ordinary queries and COPY go through tokio-postgres instead
//! ([`crate::source::connect`]).
//!
//! # Protocol flow
//!
//! 1. TCP or Unix socket; for TCP an `SSLRequest` and TLS handshake as `sslmode`
//!    says ([`tls`]).
//! 2. StartupMessage with `replication=database`, then authentication (trust,
//!    cleartext, MD5, SCRAM-SHA-256), parameter statuses, `ReadyForQuery`.
//! 3. Simple-query commands: `IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT` (which can
//!    export a snapshot for a consistent initial copy), `DROP_REPLICATION_SLOT`, and
//!    ordinary SQL (a `replication=database` connection accepts it too).
//! 4. `START_REPLICATION SLOT ... LOGICAL <lsn> (options)`: the server answers
//!    `CopyBothResponse` and the connection becomes a [`ReplicationStream`]. The
//!    server sends `CopyData` carrying XLogData (`w`) and keepalives (`k`); the client
//!    sends standby status updates (`r`) reporting how far it has durably processed
//!    the stream ([`wire`] has the byte layouts).
//! 5. `CopyDone` from the client ends streaming; the server answers `CopyDone`,
//!    `CommandComplete`, `ReadyForQuery`; `Terminate` closes.
//!
//! The stream never sends a status update on its own: the caller decides what LSN is
//! safe to confirm (never one whose events the sink has not acknowledged) and when.

mod auth;
mod codec;
pub mod commands;
mod conn;
pub mod error;
pub mod tls;
mod transport;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

pub use codec::MAX_MESSAGE_LEN;
pub use commands::SnapshotAction;
pub use error::{sqlstate, ReplicationError, ServerError};
pub use tls::TlsError;
pub use wire::{ReplicationMessage, StandbyStatus};

use crate::model::Lsn;
use crate::source::conninfo::ConnInfo;
use codec::BackendMessage;
use conn::Connection;
use error::ServerError as ServerErr;

/// The `application_name` used when the conninfo sets none.
pub const DEFAULT_APPLICATION_NAME: &str = "pgcdc";

/// How long [`ReplicationStream::stop`] waits for the server to finish the stream
/// before closing the socket anyway.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One row of a simple-query result, in text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    columns: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl Row {
    /// Column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Values in column order; `None` is SQL NULL.
    pub fn values(&self) -> &[Option<String>] {
        &self.values
    }

    /// The value at `idx`; `None` for NULL or no such column.
    pub fn text(&self, idx: usize) -> Option<&str> {
        self.values.get(idx)?.as_deref()
    }

    /// The value of the first column named `name`; `None` for NULL or no such column.
    pub fn named(&self, name: &str) -> Option<&str> {
        let idx = self.columns.iter().position(|c| c == name)?;
        self.text(idx)
    }

    pub fn into_values(self) -> Vec<Option<String>> {
        self.values
    }
}

impl std::ops::Deref for Row {
    type Target = [Option<String>];

    fn deref(&self) -> &[Option<String>] {
        &self.values
    }
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (a 64-bit number, as text).
    pub systemid: String,
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to (`None` for physical replication connections).
    pub dbname: Option<String>,
}

/// The answer to `CREATE_REPLICATION_SLOT ... LOGICAL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// The slot streams every transaction that commits after this LSN; the snapshot
    /// sees exactly those committed before.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub snapshot_name: Option<String>,
    pub output_plugin: String,
}

/// A `replication=database` connection in command mode.
pub struct ReplicationClient {
    conn: Connection,
    server_version_num: u32,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("server_version_num", &self.server_version_num)
            .field("backend_pid", &self.conn.backend_pid())
            .field("tls", &self.conn.is_tls())
            .finish()
    }
}

impl ReplicationClient {
    /// Connects, negotiates TLS, authenticates and waits until the server is ready.
    /// `connect_timeout` from the conninfo bounds the whole sequence.
    pub async fn connect(info: &ConnInfo) -> Result<Self, ReplicationError> {
        let fut = Self::connect_inner(info);
        match info.connect_timeout {
            Some(timeout) => tokio::time::timeout(timeout, fut).await.map_err(|_| {
                ReplicationError::ConnectTimeout {
                    target: info.target(),
                    timeout,
                }
            })?,
            None => fut.await,
        }
    }

    async fn connect_inner(info: &ConnInfo) -> Result<Self, ReplicationError> {
        let socket = transport::open(info).await?;
        let mut conn = Connection::new(socket);
        let app = info
            .application_name
            .as_deref()
            .unwrap_or(DEFAULT_APPLICATION_NAME);
        auth::startup(&mut conn, info, app).await?;
        conn.drain_until_ready().await?;
        let mut client = ReplicationClient {
            conn,
            server_version_num: 0,
        };
        client.server_version_num = match client
            .parameter("server_version")
            .and_then(commands::parse_server_version)
        {
            Some(v) => v,
            None => {
                let rows = client.simple_query("SHOW server_version_num").await?;
                rows.first()
                    .and_then(|r| r.text(0))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| ReplicationError::UnexpectedResponse {
                        command: "SHOW server_version_num",
                        detail: "no numeric version".into(),
                    })?
            }
        };
        tracing::debug!(
            target_addr = %info.target(),
            server_version_num = client.server_version_num,
            tls = client.conn.is_tls(),
            backend_pid = ?client.conn.backend_pid(),
            "replication connection established"
        );
        Ok(client)
    }

    /// The server version as a number, e.g. 150018 for 15.18.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// A parameter the server reported (`server_version`, `server_encoding`,
    /// `TimeZone`, `integer_datetimes`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.parameter(name)
    }

    /// The process ID of the server backend (walsender), if it sent one.
    pub fn backend_pid(&self) -> Option<i32> {
        self.conn.backend_pid()
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.conn.is_tls()
    }

    /// Runs one or more commands with the simple-query protocol and returns all rows
    /// in text format. Works for SQL and for replication commands. A server error is
    /// returned after the server is ready again, so the connection stays usable.
    /// `COPY` is not supported here.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|_| {
            ReplicationError::InvalidArgument("the query contains a NUL byte".into())
        })?;
        self.conn.send(buf).await?;

        let mut rows = Vec::new();
        let mut columns: Option<Arc<[String]>> = None;
        let mut error: Option<ServerErr> = None;
        loop {
            let msg = self.conn.recv().await?;
            match msg {
                BackendMessage::Message(Message::RowDescription(body)) => {
                    columns = Some(column_names(&body)?);
                }
                BackendMessage::Message(Message::DataRow(body)) => {
                    let cols = columns.clone().ok_or_else(|| {
                        ReplicationError::Protocol("DataRow before RowDescription".into())
                    })?;
                    rows.push(Row {
                        values: row_values(&body, cols.len())?,
                        columns: cols,
                    });
                }
                BackendMessage::Message(Message::CommandComplete(_))
                | BackendMessage::Message(Message::EmptyQueryResponse) => columns = None,
                BackendMessage::Message(Message::ErrorResponse(body)) => {
                    let e = ServerErr::from_fields(body.fields());
                    if e.ends_session() {
                        return Err(e.into());
                    }
                    error.get_or_insert(e);
                }
                BackendMessage::Message(Message::CopyInResponse(_)) => {
                    let mut buf = BytesMut::new();
                    frontend::copy_fail("COPY FROM STDIN is not supported here", &mut buf)?;
                    self.conn.send(buf).await?;
                }
                BackendMessage::Message(Message::CopyOutResponse(_))
                | BackendMessage::Message(Message::CopyData(_))
                | BackendMessage::Message(Message::CopyDone) => {
                    // COPY TO STDOUT output is discarded.
                }
                BackendMessage::Message(Message::ReadyForQuery(_)) => break,
                BackendMessage::CopyBothResponse => {
                    return Err(ReplicationError::InvalidArgument(
                        "START_REPLICATION cannot run through simple_query: use \
                         start_logical_replication (the connection is now unusable)"
                            .into(),
                    ))
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} in a simple-query response",
                        other.name()
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(rows),
        }
    }

    /// `IDENTIFY_SYSTEM`: the cluster identity, timeline and current WAL position.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const CMD: &str = "IDENTIFY_SYSTEM";
        let rows = self.simple_query(CMD).await?;
        let row = single_row(CMD, &rows)?;
        let field = |name: &str| {
            row.named(name)
                .ok_or_else(|| ReplicationError::UnexpectedResponse {
                    command: CMD,
                    detail: format!("no {name} column"),
                })
        };
        let systemid = field("systemid")?.to_string();
        let timeline =
            field("timeline")?
                .parse()
                .map_err(|_| ReplicationError::UnexpectedResponse {
                    command: CMD,
                    detail: "timeline is not a number".into(),
                })?;
        let xlogpos = parse_lsn(CMD, field("xlogpos")?)?;
        Ok(SystemIdentity {
            systemid,
            timeline,
            xlogpos,
            dbname: row.named("dbname").map(str::to_string),
        })
    }

    /// Creates a logical replication slot using `plugin` (normally `pgoutput`).
    ///
    /// With [`SnapshotAction::Export`] the answer names a snapshot that sees exactly
    /// the transactions committed before `consistent_point`; another session imports
    /// it with `BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT
    /// '<name>'`. **The exported snapshot stays valid only while this connection is
    /// open and runs no other command**: import it (in every session that needs it)
    /// before calling anything else on this client, including
    /// [`start_logical_replication`](Self::start_logical_replication).
    ///
    /// A `temporary` slot disappears when this connection closes.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        plugin: &str,
        snapshot: SnapshotAction,
        temporary: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        const CMD: &str = "CREATE_REPLICATION_SLOT";
        let sql = commands::create_logical_slot(
            self.server_version_num,
            slot,
            plugin,
            snapshot,
            temporary,
        );
        let rows = self.simple_query(&sql).await?;
        let row = single_row(CMD, &rows)?;
        let consistent_point =
            row.named("consistent_point")
                .ok_or_else(|| ReplicationError::UnexpectedResponse {
                    command: CMD,
                    detail: "no consistent_point".into(),
                })?;
        Ok(CreatedSlot {
            slot_name: row.named("slot_name").unwrap_or(slot).to_string(),
            consistent_point: parse_lsn(CMD, consistent_point)?,
            snapshot_name: row.named("snapshot_name").map(str::to_string),
            output_plugin: row.named("output_plugin").unwrap_or(plugin).to_string(),
        })
    }

    /// `DROP_REPLICATION_SLOT`. With `wait`, waits until the slot is no longer active
    /// instead of failing with SQLSTATE 55006.
    pub async fn drop_slot(&mut self, slot: &str, wait: bool) -> Result<(), ReplicationError> {
        self.simple_query(&commands::drop_slot(slot, wait)).await?;
        Ok(())
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL <start> (options)` and switches to
    /// streaming. `options` go to the output plugin, e.g. `[("proto_version", "2"),
    /// ("publication_names", "\"pub\""), ("messages", "true")]`; values are quoted as
    /// literals here. The server starts at the later of `start` and the slot's
    /// `confirmed_flush_lsn`.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let cmd = commands::start_logical_replication(slot, start, options);
        let mut buf = BytesMut::new();
        frontend::query(&cmd, &mut buf).map_err(|_| {
            ReplicationError::InvalidArgument(
                "the slot name or an option contains a NUL byte".into(),
            )
        })?;
        self.conn.send(buf).await?;
        match self.conn.recv().await? {
            BackendMessage::CopyBothResponse => {
                tracing::debug!(slot, %start, "logical replication started");
                Ok(ReplicationStream {
                    conn: self.conn,
                    server_version_num: self.server_version_num,
                    server_done: false,
                })
            }
            BackendMessage::Message(Message::ErrorResponse(body)) => {
                let err = ServerErr::from_fields(body.fields());
                // Let the server finish (ReadyForQuery) before the connection is dropped.
                if !err.ends_session() {
                    let _ = self.conn.drain_until_ready().await;
                }
                Err(err.into())
            }
            other => Err(ReplicationError::Protocol(format!(
                "unexpected {} in answer to START_REPLICATION",
                other.name()
            ))),
        }
    }

    /// Sends Terminate and closes the connection.
    pub async fn close(self) -> Result<(), ReplicationError> {
        self.conn.terminate().await;
        Ok(())
    }
}

/// A connection streaming logical replication (CopyBoth mode).
pub struct ReplicationStream {
    conn: Connection,
    server_version_num: u32,
    server_done: bool,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("server_version_num", &self.server_version_num)
            .field("backend_pid", &self.conn.backend_pid())
            .field("server_done", &self.server_done)
            .finish()
    }
}

impl ReplicationStream {
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Reads in batches while catching up: see `Connection::batch_reads`. A batch waits at
    /// most a millisecond; then batching is off until this is called again.
    pub fn batch_reads(&mut self, on: bool) {
        self.conn.batch_reads(on);
    }

    /// The next XLogData or keepalive. `Ok(None)` once the server has ended the
    /// stream (CopyDone, or CommandComplete when it shuts down); call
    /// [`stop`](Self::stop) then.
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!`) loses no message;
    /// a partially received message stays buffered for the next call. The stream
    /// never answers keepalives by itself: when `reply_requested` is set, call
    /// [`send_standby_status`](Self::send_standby_status) soon.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        if self.server_done {
            return Ok(None);
        }
        match self.conn.recv().await? {
            BackendMessage::Message(Message::CopyData(body)) => {
                Ok(Some(wire::decode(body.into_bytes())?))
            }
            BackendMessage::Message(Message::CopyDone) => {
                self.server_done = true;
                Ok(None)
            }
            // A walsender that stops because the server shuts down ends the stream with
            // CommandComplete alone, no CopyDone first (walsender.c, WalSndDone).
            BackendMessage::Message(Message::CommandComplete(_)) => {
                self.server_done = true;
                Ok(None)
            }
            BackendMessage::Message(Message::ErrorResponse(body)) => {
                Err(ServerErr::from_fields(body.fields()).into())
            }
            other => Err(ReplicationError::Protocol(format!(
                "unexpected {} during streaming replication",
                other.name()
            ))),
        }
    }

    /// Sends a standby status update. `flushed` is what the server may discard WAL up
    /// to and what `confirmed_flush_lsn` becomes: pass only an LSN whose events are
    /// durably handled. `reply_requested` asks the server for an immediate keepalive.
    ///
    /// Not cancel-safe in the strict sense: if cancelled, the update may still be
    /// sent with the next write, which is harmless.
    pub async fn send_standby_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let payload = wire::encode_standby_status(&StandbyStatus {
            written,
            flushed,
            applied,
            client_time_us: wire::pg_now_us(),
            reply_requested,
        });
        let mut buf = BytesMut::with_capacity(payload.len() + 5);
        frontend::CopyData::new(&payload[..])?.write(&mut buf);
        self.conn.send(buf).await
    }

    /// Ends streaming: sends CopyDone, reads (and discards) what the server still
    /// sends until it is ready again, then sends Terminate. Waits at most
    /// [`STOP_TIMEOUT`] for the server before closing the socket anyway. A server
    /// error seen on the way is returned after the connection is closed.
    pub async fn stop(mut self) -> Result<(), ReplicationError> {
        let result = tokio::time::timeout(STOP_TIMEOUT, self.finish_copy()).await;
        let outcome = match result {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    "the server did not end the replication stream within {}s; closing the connection",
                    STOP_TIMEOUT.as_secs()
                );
                Ok(())
            }
        };
        self.conn.terminate().await;
        outcome
    }

    async fn finish_copy(&mut self) -> Result<(), ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        self.conn.send(buf).await?;
        let mut error = None;
        loop {
            match self.conn.recv().await {
                Ok(BackendMessage::Message(Message::ReadyForQuery(_))) => break,
                Ok(BackendMessage::Message(Message::ErrorResponse(body))) => {
                    error.get_or_insert_with(|| ServerErr::from_fields(body.fields()));
                }
                Ok(_) => {} // CopyData still in flight, CopyDone, CommandComplete
                // The server may close right after an error (FATAL).
                Err(ReplicationError::ConnectionClosed) if error.is_some() => break,
                Err(e) => return Err(e),
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

fn column_names(
    body: &postgres_protocol::message::backend::RowDescriptionBody,
) -> Result<Arc<[String]>, ReplicationError> {
    use fallible_iterator::FallibleIterator;
    let mut names = Vec::new();
    let mut fields = body.fields();
    while let Some(field) = fields
        .next()
        .map_err(|e| ReplicationError::Protocol(format!("malformed RowDescription: {e}")))?
    {
        names.push(field.name().to_string());
    }
    Ok(names.into())
}

fn row_values(
    body: &postgres_protocol::message::backend::DataRowBody,
    expected: usize,
) -> Result<Vec<Option<String>>, ReplicationError> {
    use fallible_iterator::FallibleIterator;
    let buf = body.buffer();
    let mut values = Vec::with_capacity(expected);
    let mut ranges = body.ranges();
    while let Some(range) = ranges
        .next()
        .map_err(|e| ReplicationError::Protocol(format!("malformed DataRow: {e}")))?
    {
        let value =
            match range {
                None => None,
                Some(r) => {
                    let bytes = buf.get(r).ok_or_else(|| {
                        ReplicationError::Protocol("DataRow value out of bounds".into())
                    })?;
                    Some(String::from_utf8(bytes.to_vec()).map_err(|_| {
                        ReplicationError::Protocol("DataRow value is not UTF-8".into())
                    })?)
                }
            };
        values.push(value);
    }
    if values.len() != expected {
        return Err(ReplicationError::Protocol(format!(
            "DataRow has {} values for {expected} columns",
            values.len()
        )));
    }
    Ok(values)
}

fn single_row<'a>(command: &'static str, rows: &'a [Row]) -> Result<&'a Row, ReplicationError> {
    match rows {
        [row] => Ok(row),
        _ => Err(ReplicationError::UnexpectedResponse {
            command,
            detail: format!("{} rows instead of one", rows.len()),
        }),
    }
}

fn parse_lsn(command: &'static str, s: &str) -> Result<Lsn, ReplicationError> {
    s.parse().map_err(
        |e: crate::model::lsn::ParseLsnError| ReplicationError::UnexpectedResponse {
            command,
            detail: e.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    use super::codec::tests::frame;

    /// Runs every body parser that sees network bytes on whatever the codec yields.
    fn exercise(bytes: &[u8]) {
        let mut codec = codec::PgCodec;
        let mut buf = BytesMut::from(bytes);
        while let Ok(Some(msg)) = codec.decode(&mut buf) {
            match msg {
                BackendMessage::Message(Message::ErrorResponse(b)) => {
                    let _ = ServerErr::from_fields(b.fields()).to_string();
                }
                BackendMessage::Message(Message::NoticeResponse(b)) => {
                    let _ = ServerErr::from_fields(b.fields());
                }
                BackendMessage::Message(Message::RowDescription(b)) => {
                    let _ = column_names(&b);
                }
                BackendMessage::Message(Message::DataRow(b)) => {
                    let _ = row_values(&b, 2);
                }
                BackendMessage::Message(Message::CopyData(b)) => {
                    let _ = wire::decode(b.into_bytes());
                }
                _ => {}
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            exercise(&bytes);
        }

        #[test]
        fn arbitrary_bodies_never_panic(
            tag in prop::sample::select(b"EgreNTDdWvZRSKCcI".to_vec()),
            body in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            exercise(&frame(tag, &body));
        }
    }

    #[test]
    fn parses_rows_and_errors() {
        let mut rd = vec![0, 2];
        for name in ["a", "b"] {
            rd.extend_from_slice(name.as_bytes());
            rd.push(0);
            rd.extend_from_slice(&[0; 18]);
        }
        let mut dr = vec![0, 2, 0, 0, 0, 1, b'x'];
        dr.extend_from_slice(&(-1i32).to_be_bytes());
        let mut err = Vec::new();
        for (t, v) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "42704"),
            (b'M', "no"),
            (b'H', "try"),
        ] {
            err.push(t);
            err.extend_from_slice(v.as_bytes());
            err.push(0);
        }
        err.push(0);
        let mut all = frame(b'T', &rd);
        all.extend(frame(b'D', &dr));
        all.extend(frame(b'E', &err));
        let mut codec = codec::PgCodec;
        let mut buf = BytesMut::from(&all[..]);
        let Some(BackendMessage::Message(Message::RowDescription(rd))) =
            codec.decode(&mut buf).unwrap()
        else {
            panic!("not a RowDescription")
        };
        let cols = column_names(&rd).unwrap();
        let Some(BackendMessage::Message(Message::DataRow(dr))) = codec.decode(&mut buf).unwrap()
        else {
            panic!("not a DataRow")
        };
        let row = Row {
            values: row_values(&dr, cols.len()).unwrap(),
            columns: cols,
        };
        assert_eq!(row.named("a"), Some("x"));
        assert_eq!(row.named("b"), None);
        assert_eq!(row.text(5), None);
        assert_eq!(row[0].as_deref(), Some("x"));
        assert_eq!(row.len(), 2);
        assert!(row_values(&dr, 3).is_err());
        let Some(BackendMessage::Message(Message::ErrorResponse(e))) =
            codec.decode(&mut buf).unwrap()
        else {
            panic!("not an ErrorResponse")
        };
        let e = ServerErr::from_fields(e.fields());
        assert_eq!(e.to_string(), "ERROR 42704: no; hint: try");
    }

    /// Regression: a fast shutdown of PostgreSQL made pgcdc exit with "protocol violation:
    /// unexpected CommandComplete during streaming replication" instead of reconnecting.
    #[tokio::test]
    async fn server_shutdown_ends_the_stream_with_command_complete_only() {
        use tokio::io::AsyncWriteExt;
        let (ours, mut server) = tokio::net::UnixStream::pair().unwrap();
        let mut stream = ReplicationStream {
            conn: Connection::new(transport::Socket::Unix(ours)),
            server_version_num: 150000,
            server_done: false,
        };
        // What a walsender sends when the server shuts down: "COPY 0", then it exits.
        server.write_all(&frame(b'C', b"COPY 0\0")).await.unwrap();
        drop(server);
        assert!(matches!(stream.next_message().await, Ok(None)));
        assert!(matches!(stream.next_message().await, Ok(None)));
    }
}
