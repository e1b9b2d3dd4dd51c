//! Why a run (or an operations command) failed, what recovering from it takes, and the exit
//! code that says so.
//!
//! The taxonomy is shared by `run` and `ops`. Each error type that reaches a module boundary
//! classifies itself once, next to its definition ([`Recoverable`]): reconnect, restart the
//! pipeline, or stop with the exit code of its [`FailureKind`].

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

/// What a failure calls for. Each error type that reaches a module boundary says which, in
/// its `recovery()` ([`Recoverable`]), next to its definition; `run` acts on it in two places
/// (the stream's reconnect loop and the pipeline's supervisor) and `ops` always stops. Where
/// no loop handles an outcome (a lost connection at start-up, in `ops`), it stops with the
/// exit code of the failure's [`FailureKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The connection was lost or the server is briefly unavailable: reconnect, and resume
    /// after what the sink acknowledged.
    Reconnect,
    /// Start the pipeline again from the last confirmed position: nothing unconfirmed was
    /// confirmed, so a new run publishes again what this one could not (see `run::run`). A
    /// snapshot that cannot complete restarts as a new snapshot.
    Restart,
    /// Only the operator can fix it: stop, with the exit code of the failure's kind.
    Stop,
}

/// An error that knows what recovering from it takes.
pub trait Recoverable {
    fn recovery(&self) -> Recovery;
}

/// A failed run: what kind (the exit code), what it calls for, and the error chain to print.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub error: anyhow::Error,
    pub recovery: Recovery,
}

impl Failure {
    /// A failure only the operator can fix.
    pub(crate) fn new(kind: FailureKind, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            kind,
            error: error.into(),
            recovery: Recovery::Stop,
        }
    }

    /// A failure classified by its error type.
    pub(crate) fn classified<E>(kind: FailureKind, error: E) -> Self
    where
        E: Recoverable + Into<anyhow::Error>,
    {
        Failure {
            kind,
            recovery: error.recovery(),
            error: error.into(),
        }
    }

    /// PostgreSQL failed (exit 3 when it stops the run).
    pub(crate) fn source<E: Recoverable + Into<anyhow::Error>>(error: E) -> Self {
        Failure::classified(FailureKind::Source, error)
    }

    /// The sink failed (exit 4 when it stops the run).
    pub(crate) fn sink<E: Recoverable + Into<anyhow::Error>>(error: E) -> Self {
        Failure::classified(FailureKind::Sink, error)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_documented_exit_code() {
        assert_eq!(FailureKind::Usage.exit_code(), 2);
        assert_eq!(FailureKind::Source.exit_code(), 3);
        assert_eq!(FailureKind::Sink.exit_code(), 4);
        for kind in [FailureKind::Usage, FailureKind::Source, FailureKind::Sink] {
            assert!(!kind.describe().is_empty());
        }
    }

    #[test]
    fn a_classified_error_stops_and_keeps_its_message() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("disk on fire"));
        let f = r.or_fail(FailureKind::Usage).unwrap_err();
        assert_eq!(f.kind, FailureKind::Usage);
        assert_eq!(f.recovery, Recovery::Stop);
        assert!(f.error.to_string().contains("disk on fire"));
        let gone = sink_gone();
        assert_eq!(gone.kind, FailureKind::Sink);
        assert_eq!(gone.recovery, Recovery::Stop);
    }
}
