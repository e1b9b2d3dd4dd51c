//! Why a run failed, and the exit code that says so.

use crate::source::replication::ReplicationError;

/// What kind of failure ended the run; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Bad flags or configuration (exit 2).
    Usage,
    /// PostgreSQL refused or failed (exit 3).
    Source,
    /// Kafka or stdout failed (exit 4).
    Sink,
}

impl FailureKind {
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Usage => 2,
            FailureKind::Source => 3,
            FailureKind::Sink => 4,
        }
    }

    /// What failed, for the log line that accompanies the error.
    pub fn describe(self) -> &'static str {
        match self {
            FailureKind::Usage => "usage or configuration error",
            FailureKind::Source => "PostgreSQL error",
            FailureKind::Sink => "sink error",
        }
    }
}

/// A failed run: what kind, and the error chain to print.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub error: anyhow::Error,
    /// Reconnecting may help (the connection dropped, the server restarts).
    pub transient: bool,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            kind,
            error: error.into(),
            transient: false,
        }
    }

    /// A PostgreSQL failure, transient when the replication error says so. While streaming,
    /// a busy slot is transient too: after a network cut the old walsender holds the slot
    /// until `wal_sender_timeout` ends it.
    pub(super) fn replication(e: ReplicationError) -> Self {
        let transient = e.is_transient() || e.server_error().is_some_and(|s| s.is_object_in_use());
        Failure {
            kind: FailureKind::Source,
            error: e.into(),
            transient,
        }
    }
}

pub(crate) trait Classify<T> {
    fn or_fail(self, kind: FailureKind) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> Classify<T> for Result<T, E> {
    fn or_fail(self, kind: FailureKind) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(kind, e))
    }
}

/// The sink task ended before it was asked to.
pub(super) fn sink_gone() -> Failure {
    Failure::new(FailureKind::Sink, anyhow::anyhow!("the sink stopped"))
}
