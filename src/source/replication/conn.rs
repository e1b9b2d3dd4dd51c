//! The framed connection: sends frontend messages, receives backend messages, and
//! handles the asynchronous ones (notices, parameter changes) on the way.

use std::collections::HashMap;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use postgres_protocol::message::backend::Message;
use tokio_util::codec::Framed;

use super::codec::{BackendMessage, PgCodec};
use super::error::{ReplicationError, ServerError};
use super::transport::Socket;

pub(crate) struct Connection {
    framed: Framed<Socket, PgCodec>,
    parameters: HashMap<String, String>,
    backend_pid: Option<i32>,
}

impl Connection {
    pub(crate) fn new(socket: Socket) -> Connection {
        Connection {
            framed: Framed::new(socket, PgCodec),
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
            let msg = match self.framed.next().await {
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
                    if e.is_fatal() {
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
