//! Why a run (or an operations command) failed, and the exit code that says so.
//!
//! The taxonomy is shared by `run` and `ops`; each error type's classification (which
//! [`FailureKind`], whether reconnecting or restarting may help) lives next to whoever turns
//! that error into a [`Failure`] (for `run`: `crate::run`'s `failure` module).

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
    /// Starting the whole run again may clear it: nothing unconfirmed was confirmed, so a new
    /// run publishes again what this one could not (see `crate::run::run`).
    pub restart: bool,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            kind,
            error: error.into(),
            transient: false,
            restart: false,
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
pub(crate) fn sink_gone() -> Failure {
    Failure::new(FailureKind::Sink, anyhow::anyhow!("the sink stopped"))
}
