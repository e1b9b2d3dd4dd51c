//! Errors of the replication connection, and what recovering from each takes.

use std::fmt;
use std::io;
use std::time::Duration;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

use super::tls::TlsError;
use super::wire::WireError;
use crate::model::failure::{Recoverable, Recovery};

/// SQLSTATE codes pgcdc looks at. The full list is in PostgreSQL's `errcodes.txt`.
pub mod sqlstate {
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CRASH_SHUTDOWN: &str = "57P02";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INSUFFICIENT_RESOURCES: &str = "53000";
    pub const DISK_FULL: &str = "53100";
    pub const OUT_OF_MEMORY: &str = "53200";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK_DETECTED: &str = "40P01";
    pub const IO_ERROR: &str = "58030";
    pub const OBJECT_IN_USE: &str = "55006";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const DUPLICATE_OBJECT: &str = "42710";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const SYNTAX_ERROR: &str = "42601";
}

/// An `ErrorResponse` (or `NoticeResponse`) from the server, field by field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerError {
    /// `ERROR`, `FATAL`, `PANIC` (or `WARNING`, `NOTICE`... for notices), not localized.
    pub severity: String,
    /// The SQLSTATE, e.g. `28P01`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// 1-based character position in the query text.
    pub position: Option<String>,
    /// The call stack context (`W` field).
    pub where_: Option<String>,
    pub schema: Option<String>,
    pub table: Option<String>,
    pub column: Option<String>,
    pub datatype: Option<String>,
    pub constraint: Option<String>,
    /// Source location in the server, for bug reports.
    pub file: Option<String>,
    pub line: Option<String>,
    pub routine: Option<String>,
}

impl ServerError {
    /// Reads the fields of an `ErrorResponse` or `NoticeResponse`. Malformed bodies
    /// yield what could be read; a missing message says so instead of failing.
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> ServerError {
        let mut e = ServerError::default();
        let mut localized_severity = None;
        loop {
            let field = match fields.next() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!(error = %err, "malformed error fields from the server");
                    break;
                }
            };
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => e.severity = value,
                b'S' => localized_severity = Some(value),
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                b'P' => e.position = Some(value),
                b'W' => e.where_ = Some(value),
                b's' => e.schema = Some(value),
                b't' => e.table = Some(value),
                b'c' => e.column = Some(value),
                b'd' => e.datatype = Some(value),
                b'n' => e.constraint = Some(value),
                b'F' => e.file = Some(value),
                b'L' => e.line = Some(value),
                b'R' => e.routine = Some(value),
                _ => {}
            }
        }
        if e.severity.is_empty() {
            e.severity = localized_severity.unwrap_or_else(|| "ERROR".to_string());
        }
        if e.code.is_empty() {
            e.code = "XX000".to_string();
        }
        if e.message.is_empty() {
            e.message = "(the server sent an error without a message)".to_string();
        }
        e
    }

    /// Whether retrying the same operation later can reasonably succeed.
    ///
    /// Transient: the server is shutting down, crashed or still starting (57P01,
    /// 57P02, 57P03), connection exceptions (class 08), resource shortages (53000,
    /// 53100, 53200, 53300 too many connections), serialization failures and deadlocks
    /// (40001, 40P01) and I/O errors on the server (58030).
    ///
    /// **Not** transient: everything else, notably authentication (28P01, 28000),
    /// missing objects (42704), privileges (42501), unsupported features (0A000), bad
    /// parameters (22023), and *object in use* (55006). A 55006 on a replication slot
    /// ("replication slot ... is active for PID ...") usually means another consumer is
    /// reading the slot; retrying forever would hide a second pgcdc instance fighting
    /// for the same slot, which must be fixed by a human. The one benign case is our
    /// own previous connection that the server has not noticed is dead yet (until
    /// `wal_sender_timeout`); a caller that wants to ride that out can check
    /// [`ServerError::is_object_in_use`] and retry for a bounded time.
    pub fn is_transient(&self) -> bool {
        use sqlstate::*;
        self.code.starts_with("08")
            || [
                ADMIN_SHUTDOWN,
                CRASH_SHUTDOWN,
                CANNOT_CONNECT_NOW,
                INSUFFICIENT_RESOURCES,
                DISK_FULL,
                OUT_OF_MEMORY,
                TOO_MANY_CONNECTIONS,
                SERIALIZATION_FAILURE,
                DEADLOCK_DETECTED,
                IO_ERROR,
            ]
            .contains(&self.code.as_str())
    }

    /// Whether the server ends the session after this error (FATAL or PANIC).
    pub fn ends_session(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }

    /// SQLSTATE 55006: e.g. the replication slot is active for another process.
    pub fn is_object_in_use(&self) -> bool {
        self.code == sqlstate::OBJECT_IN_USE
    }

    /// Whether this is an authentication failure (class 28).
    pub fn is_authentication_failure(&self) -> bool {
        self.code.starts_with("28")
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Everything that can go wrong on a replication connection.
///
/// Its [`Recovery`] tells a retry loop whether reconnecting may help. Messages never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("could not connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },

    #[error("timed out after {}s connecting to PostgreSQL at {target} (connect_timeout)", timeout.as_secs())]
    ConnectTimeout { target: String, timeout: Duration },

    #[error("I/O error on the PostgreSQL connection: {0}")]
    Io(#[from] io::Error),

    #[error("the PostgreSQL server closed the connection unexpectedly")]
    ConnectionClosed,

    #[error(transparent)]
    Tls(#[from] TlsError),

    #[error(transparent)]
    Server(Box<ServerError>),

    #[error(
        "the server asks for a password for user \"{user}\" but none was given: set \
         password=... in the connection string, the PGPASSWORD environment variable, or \
         an entry in ~/.pgpass (or the file named by PGPASSFILE)"
    )]
    PasswordRequired { user: String },

    #[error(
        "the server asks for {method} authentication, which pgcdc does not support: \
         use scram-sha-256, md5, password or trust for this user in pg_hba.conf"
    )]
    UnsupportedAuthentication { method: String },

    #[error(
        "the server offers only SCRAM-SHA-256-PLUS (channel binding), which pgcdc does \
         not implement: allow plain SCRAM-SHA-256 on the server (e.g. do not set \
         channel_binding=require on its side) and use sslmode=verify-full to \
         authenticate the server"
    )]
    ChannelBindingRequired,

    #[error("SCRAM authentication with the server failed: {0}")]
    Scram(String),

    #[error("a message from the server is {len} bytes long, more than the {max}-byte limit; the server is misbehaving or this is not PostgreSQL")]
    MessageTooLarge { len: usize, max: usize },

    #[error("protocol violation: {0}")]
    Protocol(String),

    #[error("malformed replication message: {0}")]
    Wire(#[from] WireError),

    #[error("unexpected answer to {command}: {detail}")]
    UnexpectedResponse {
        command: &'static str,
        detail: String,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Recoverable for ReplicationError {
    /// Reconnect after network errors, the server closing the connection, a connect timeout,
    /// and the server errors that [`ServerError::is_transient`] lists. A busy slot too: after
    /// a network cut the old walsender holds the slot until `wal_sender_timeout` ends it (a
    /// second pgcdc is kept out by the slot's lock, not by this). Authentication, TLS
    /// verification, protocol violations and bad arguments stop: retrying cannot fix them.
    fn recovery(&self) -> Recovery {
        let reconnect = match self {
            ReplicationError::Connect { .. }
            | ReplicationError::ConnectTimeout { .. }
            | ReplicationError::Io(_)
            | ReplicationError::ConnectionClosed => true,
            ReplicationError::Server(e) => e.is_transient() || e.is_object_in_use(),
            _ => false,
        };
        if reconnect {
            Recovery::Reconnect
        } else {
            Recovery::Stop
        }
    }
}

impl ReplicationError {
    /// The server's error, if this is one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::Server(e) => Some(e),
            _ => None,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        self.server_error().map(|e| e.code.as_str())
    }
}

impl From<ServerError> for ReplicationError {
    fn from(e: ServerError) -> Self {
        ReplicationError::Server(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ServerError {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
            ..Default::default()
        }
        .into()
    }

    #[test]
    fn classification() {
        let transient = |code: &str| match server(code) {
            ReplicationError::Server(e) => e.is_transient(),
            _ => unreachable!(),
        };
        for code in ["57P01", "57P02", "57P03", "53300", "08006", "40001"] {
            assert!(transient(code), "{code}");
            assert_eq!(server(code).recovery(), Recovery::Reconnect, "{code}");
        }
        for code in [
            "28P01", "28000", "42704", "42501", "0A000", "22023", "55006", "55000",
        ] {
            assert!(!transient(code), "{code}");
        }
        for code in [
            "28P01", "28000", "42704", "42501", "0A000", "22023", "55000",
        ] {
            assert_eq!(server(code).recovery(), Recovery::Stop, "{code}");
        }
        // A slot still held by the walsender of a connection lost a moment ago.
        assert_eq!(server("55006").recovery(), Recovery::Reconnect);
        assert_eq!(
            ReplicationError::ConnectionClosed.recovery(),
            Recovery::Reconnect
        );
        let io = ReplicationError::Io(io::Error::other("x"));
        assert_eq!(io.recovery(), Recovery::Reconnect);
        let password = ReplicationError::PasswordRequired { user: "u".into() };
        assert_eq!(password.recovery(), Recovery::Stop);
        assert_eq!(
            ReplicationError::Protocol("x".into()).recovery(),
            Recovery::Stop
        );
        assert_eq!(server("42704").sqlstate(), Some("42704"));
    }

    #[test]
    fn display() {
        let e = ServerError {
            severity: "FATAL".into(),
            code: "28P01".into(),
            message: "password authentication failed for user \"x\"".into(),
            ..Default::default()
        };
        assert_eq!(
            ReplicationError::from(e.clone()).to_string(),
            "FATAL 28P01: password authentication failed for user \"x\""
        );
        let e = ServerError {
            hint: Some("do this".into()),
            detail: Some("because".into()),
            ..e
        };
        assert!(e.to_string().ends_with("; detail: because; hint: do this"));
        let msg = ReplicationError::PasswordRequired { user: "bob".into() }.to_string();
        assert!(msg.contains("PGPASSWORD") && msg.contains(".pgpass") && msg.contains("bob"));
    }
}
