//! How `run` classifies the errors of the source and the sink into [`Failure`]s (the
//! taxonomy itself is the model's: [`crate::model::failure`]).

pub(crate) use crate::model::failure::{sink_gone, Classify, Failure, FailureKind};
use crate::sink::SinkError;
use crate::source::replication::ReplicationError;

impl Failure {
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
}
