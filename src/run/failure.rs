//! Why a run failed, and the exit code that says so.

use crate::sink::SinkError;
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
    /// Starting the whole run again may clear it: nothing unconfirmed was confirmed, so a new
    /// run publishes again what this one could not (see [`super::run`]).
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

    /// A PostgreSQL failure, transient when the replication error says so. While streaming,
    /// a busy slot is transient too: after a network cut the old walsender holds the slot
    /// until `wal_sender_timeout` ends it.
    pub(super) fn replication(e: ReplicationError) -> Self {
        let transient = e.is_transient() || e.server_error().is_some_and(|s| s.is_object_in_use());
        Failure {
            kind: FailureKind::Source,
            error: e.into(),
            transient,
            restart: false,
        }
    }
}

impl Failure {
    /// The snapshot's failure: a lost or shut-down connection starts the run again, which
    /// takes a new snapshot (what was published is published again, as after a crash).
    pub(super) fn snapshot(e: crate::source::snapshot::SnapshotError) -> Self {
        let transient = e.is_transient();
        Failure {
            kind: FailureKind::Source,
            error: e.into(),
            transient,
            restart: transient,
        }
    }

    /// The slot's lock could not be taken: another process holds it (definite), or the server
    /// could not be reached (transient: while streaming, the usual reconnect follows).
    pub(super) fn slot_lock(e: crate::source::slot_lock::SlotLockError) -> Self {
        let transient = e.is_transient();
        Failure {
            kind: FailureKind::Source,
            error: e.into(),
            transient,
            restart: false,
        }
    }

    /// The sink task's failure: transient when restarting the pipeline may clear it (a
    /// delivery Kafka failed, a producer in a fatal state), not for configuration, permission,
    /// size or output problems.
    pub(super) fn sink(e: SinkError) -> Self {
        let transient = matches!(
            e,
            SinkError::Delivery { .. } | SinkError::ProducerFatal { .. }
        );
        Failure {
            kind: FailureKind::Sink,
            error: e.into(),
            transient,
            restart: transient,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: after a broker outage Kafka failed a record ("Unknown broker error") and
    /// pgcdc exited with code 4; such failures now restart the pipeline in process.
    #[test]
    fn failed_deliveries_restart_the_pipeline_but_size_and_config_problems_do_not() {
        let delivery = SinkError::Delivery {
            topic: "t".into(),
            source: rdkafka::error::KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::Unknown,
            ),
        };
        let delivery = Failure::sink(delivery);
        assert!(delivery.transient && delivery.restart);
        assert!(Failure::sink(SinkError::ProducerFatal { reason: "x".into() }).restart);
        let too_large = SinkError::MessageTooLarge {
            topic: "t".into(),
            bytes: 10,
        };
        assert!(!Failure::sink(too_large).restart);
        let refused = SinkError::Rejected {
            topic: "t".into(),
            keyless: true,
            reason: "Broker: Invalid record".into(),
        };
        assert!(!Failure::sink(refused).restart);
        assert!(!Failure::sink(SinkError::Config("x".into())).restart);
        assert!(!Failure::sink(SinkError::OutputClosed).restart);
    }

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server(Box::new(crate::source::replication::ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
            ..Default::default()
        }))
    }

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
    fn replication_failures_are_transient_as_the_error_says_and_a_busy_slot_too() {
        let lost = Failure::replication(ReplicationError::ConnectionClosed);
        assert_eq!(lost.kind, FailureKind::Source);
        assert!(lost.transient && !lost.restart);
        // 55006 object_in_use: the old walsender still holds the slot after a cut.
        assert!(Failure::replication(server("55006")).transient);
        // 57P01 admin_shutdown: the server restarts.
        assert!(Failure::replication(server("57P01")).transient);
        // 28P01 invalid_password, 42501 insufficient_privilege: retrying cannot help.
        assert!(!Failure::replication(server("28P01")).transient);
        assert!(!Failure::replication(server("42501")).transient);
        let auth = Failure::replication(ReplicationError::PasswordRequired { user: "u".into() });
        assert!(!auth.transient && !auth.restart);
    }

    #[test]
    fn a_classified_error_is_definite_and_keeps_its_message() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("disk on fire"));
        let f = r.or_fail(FailureKind::Usage).unwrap_err();
        assert_eq!(f.kind, FailureKind::Usage);
        assert!(!f.transient && !f.restart);
        assert!(f.error.to_string().contains("disk on fire"));
        let gone = sink_gone();
        assert_eq!(gone.kind, FailureKind::Sink);
        assert!(!gone.transient && !gone.restart);
    }
}
