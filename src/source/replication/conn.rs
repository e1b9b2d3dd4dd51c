//! The framed connection: sends frontend messages, receives backend messages, and
//! handles the asynchronous ones (notices, parameter changes) on the way.

use std::collections::HashMap;

use bytes::BytesMut;
use futures_util::{FutureExt, SinkExt, StreamExt};
use postgres_protocol::message::backend::Message;
use tokio_util::codec::Framed;

use super::codec::{BackendMessage, PgCodec};
use super::error::{ReplicationError, ServerError};
use super::transport::{Socket, LOOPBACK_RECV_BUFFER};

/// While batching reads, the socket wakes pgcdc once this much is queued...
const BATCH_BYTES: usize = 16 * 1024;
/// ...on loopback, once half of the receive buffer is (the kernel's cap for the mark, and it
/// also wakes pgcdc when the window is about to close). Draining the small buffer sooner
/// reopens the window the walsender's messages should queue behind (see
/// [`LOOPBACK_RECV_BUFFER`]): a 1M-row transaction to /dev/null, 3 alternating rounds,
/// 9.1–9.2 s at 16 KB, 8.5–8.8 s at 32 KB.
const LOOPBACK_BATCH_BYTES: usize = LOOPBACK_RECV_BUFFER as usize;
/// ...or once this long has passed, whichever comes first.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

pub(crate) struct Connection {
    framed: Framed<Socket, PgCodec>,
    /// See [`Connection::batch_reads`].
    batching: bool,
    /// The low-water mark while batching.
    batch_bytes: usize,
    /// When a batched read stops waiting for more.
    batch_deadline: Option<tokio::time::Instant>,
    parameters: HashMap<String, String>,
    backend_pid: Option<i32>,
}

impl Connection {
    pub(crate) fn new(socket: Socket) -> Connection {
        let batch_bytes = if socket.is_loopback() {
            LOOPBACK_BATCH_BYTES
        } else {
            BATCH_BYTES
        };
        Connection {
            batch_bytes,
            framed: Framed::new(socket, PgCodec),
            batching: false,
            batch_deadline: None,
            parameters: HashMap::new(),
            backend_pid: None,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.framed.get_ref().is_tls()
    }

    pub(crate) fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    pub(crate) fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// Reads in batches (`on`) or as soon as anything arrives. The walsender sends each
    /// message as it is decoded, so a reader that keeps up wakes for every few kilobytes, and
    /// each wake-up is a `recv` with its TCP acknowledgement work: 30% of pgcdc's time on a
    /// backlog streamed to /dev/null. Batching makes the kernel wake pgcdc only once
    /// [`BATCH_BYTES`] ([`LOOPBACK_BATCH_BYTES`]) are queued, or after [`BATCH_WAIT`] with
    /// whatever is there; it is for catching up, when a millisecond more matters to no one.
    pub(crate) fn batch_reads(&mut self, on: bool) {
        if on == self.batching {
            return;
        }
        let bytes = if on { self.batch_bytes } else { 1 };
        match self.framed.get_ref().set_recv_lowat(bytes) {
            Ok(applies) => self.batching = on && applies,
            Err(e) => {
                tracing::debug!(error = %e, "cannot set SO_RCVLOWAT; reading without batching");
                self.batching = false;
            }
        }
    }

    /// Writes and flushes already-encoded frontend messages.
    pub(crate) async fn send(&mut self, buf: BytesMut) -> Result<(), ReplicationError> {
        self.framed.send(buf.freeze()).await
    }

    /// The next message that needs the caller's attention. Notices are logged,
    /// parameter changes recorded, and neither is returned. End of stream is
    /// [`ReplicationError::ConnectionClosed`].
    ///
    /// Cancel-safe: a message is either fully consumed and returned (or handled), or
    /// left in the buffer for the next call.
    pub(crate) async fn recv(&mut self) -> Result<BackendMessage, ReplicationError> {
        loop {
            let next = if !self.batching {
                self.framed.next().await
            } else if let Some(next) = self.framed.next().now_or_never() {
                // Buffered already (most calls): no clock, no timer.
                next
            } else {
                // The deadline survives a cancelled call, so callers that poll often
                // cannot stretch the wait.
                let deadline = *self
                    .batch_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + BATCH_WAIT);
                let next = tokio::time::timeout_at(deadline, self.framed.next()).await;
                self.batch_deadline = None;
                match next {
                    Ok(next) => next,
                    // Less than a batch came in time: lowering the mark makes what is
                    // queued readable at once. The caller turns batching on again.
                    Err(_) => {
                        self.batch_reads(false);
                        continue;
                    }
                }
            };
            let msg = match next {
                Some(m) => m?,
                None => return Err(ReplicationError::ConnectionClosed),
            };
            match msg {
                BackendMessage::Message(Message::NoticeResponse(body)) => {
                    log_notice(&ServerError::from_fields(body.fields()));
                }
                BackendMessage::Message(Message::ParameterStatus(body)) => {
                    match (body.name(), body.value()) {
                        (Ok(name), Ok(value)) => {
                            tracing::trace!(name, value, "server parameter");
                            self.parameters.insert(name.to_string(), value.to_string());
                        }
                        _ => {
                            return Err(ReplicationError::Protocol(
                                "ParameterStatus is not valid UTF-8".into(),
                            ))
                        }
                    }
                }
                BackendMessage::Message(Message::BackendKeyData(body)) => {
                    self.backend_pid = Some(body.process_id());
                }
                BackendMessage::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized,
                } => {
                    tracing::debug!(
                        newest_minor,
                        ?unrecognized,
                        "server negotiated the protocol version down"
                    );
                }
                BackendMessage::Message(Message::NotificationResponse(_)) => {}
                other => return Ok(other),
            }
        }
    }

    /// Reads until ReadyForQuery. Returns the first server error seen on the way, if
    /// any (after ReadyForQuery, so the connection stays usable).
    pub(crate) async fn drain_until_ready(&mut self) -> Result<(), ReplicationError> {
        let mut error: Option<ServerError> = None;
        loop {
            match self.recv().await {
                Ok(BackendMessage::Message(Message::ReadyForQuery(_))) => break,
                Ok(BackendMessage::Message(Message::ErrorResponse(body))) => {
                    let e = ServerError::from_fields(body.fields());
                    if e.ends_session() {
                        // The server closes the connection after a FATAL error.
                        return Err(e.into());
                    }
                    error.get_or_insert(e);
                }
                Ok(_) => {}
                Err(e) => return Err(error.map(Into::into).unwrap_or(e)),
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Sends Terminate and shuts the socket down; errors are irrelevant at this point
    /// and only logged.
    pub(crate) async fn terminate(mut self) {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::terminate(&mut buf);
        if let Err(e) = self.send(buf).await {
            tracing::debug!(error = %e, "sending Terminate failed");
        }
        if let Err(e) = SinkExt::<bytes::Bytes>::close(&mut self.framed).await {
            tracing::debug!(error = %e, "closing the connection failed");
        }
    }
}

/// Logs a NoticeResponse at a level matching its severity.
pub(crate) fn log_notice(n: &ServerError) {
    match n.severity.as_str() {
        "WARNING" => tracing::warn!(code = %n.code, "PostgreSQL: {n}"),
        "DEBUG" | "LOG" => tracing::debug!(code = %n.code, "PostgreSQL: {n}"),
        _ => tracing::info!(code = %n.code, "PostgreSQL: {n}"),
    }
}
