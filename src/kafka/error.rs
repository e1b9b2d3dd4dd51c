//! The error of the Kafka clients and of the sinks: every message says what to do about it.

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::model::failure::{Recoverable, Recovery};

/// Why a sink stopped. Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "a record of {bytes} bytes for topic `{topic}` is larger than Kafka accepts: raise the \
         broker's message.max.bytes (or the topic's max.message.bytes) and pass \
         -X message.max.bytes={bytes_hint} to pgcdc",
        bytes_hint = bytes.saturating_add(1024)
    )]
    MessageTooLarge { topic: String, bytes: usize },

    #[error(
        "Kafka refused a record for topic `{topic}` ({reason}); pgcdc stops rather than skip \
         it. {fix}",
        fix = if *keyless {
            "The record has no key, and a compacted topic (cleanup.policy containing compact) \
             refuses those: pgcdc sends them for truncates and for tables with neither a primary \
             key nor a replica identity index. Fix: set the topic's cleanup.policy=delete, or \
             pass --truncate false and give such tables a key (ALTER TABLE … ADD PRIMARY KEY, \
             or REPLICA IDENTITY USING INDEX)"
        } else {
            "Fix: check the topic's configuration and the broker's policies for this record"
        }
    )]
    Rejected {
        topic: String,
        keyless: bool,
        reason: String,
    },

    #[error("Kafka did not accept a record for topic `{topic}`")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },

    #[error(
        "not authorized to write to Kafka topic `{topic}`: grant pgcdc's principal WRITE and \
         DESCRIBE on the topic (or fix the -X sasl.* / ssl.* credentials)"
    )]
    TopicAuthorization { topic: String },

    #[error(
        "Kafka topic `{topic}` does not exist and the broker did not create it: create it \
         yourself, or let pgcdc create it at start (it needs CREATE permission)"
    )]
    UnknownTopic { topic: String },

    #[error(
        "the Kafka producer stopped with a fatal error ({reason}); restart pgcdc: it resumes \
         from the last position Kafka acknowledged"
    )]
    ProducerFatal { reason: String },

    #[error("the output was closed (broken pipe); nothing after the last flush is confirmed")]
    OutputClosed,

    #[error("cannot write the output")]
    Io(#[source] std::io::Error),

    #[error("invalid Kafka client configuration: {0}")]
    Config(String),

    #[error(
        "Kafka at {bootstrap} is still unreachable after {waited_secs}s ({reason}): check the \
         bootstrap address, that the broker is running, and the -X security.protocol / ssl.* / \
         sasl.* settings"
    )]
    Unreachable {
        bootstrap: String,
        waited_secs: u64,
        reason: String,
    },

    #[error(
        "the broker refused to create Kafka topic `{topic}` ({reason}): create it yourself \
         (partitions={partitions}, replication factor={replication}{compact}), or grant \
         pgcdc's principal CREATE on the cluster or topic",
        compact = if *compacted { ", cleanup.policy=compact" } else { "" }
    )]
    TopicCreation {
        topic: String,
        reason: String,
        partitions: i32,
        replication: i32,
        compacted: bool,
    },

    #[error("cannot read Kafka topic `{topic}`")]
    Read {
        topic: String,
        #[source]
        source: KafkaError,
    },

    #[error("interrupted: the runtime is shutting down")]
    ShuttingDown,

    #[error("reading Kafka topic `{topic}` made no progress for {secs}s: is the broker up?")]
    ReadStalled { topic: String, secs: u64 },

    #[error(
        "key `{key}` appears in partitions {partitions:?} of Kafka topic `{topic}` (were \
         partitions added to it?): records of different partitions have no order, so pgcdc \
         cannot tell which is the latest. pgcdc's progress topic needs one partition: delete \
         the topic and start pgcdc again (it recreates it; finding no completed snapshot \
         recorded, it takes a new one, publishing the rows again)"
    )]
    KeyInSeveralPartitions {
        topic: String,
        key: String,
        partitions: Vec<i32>,
    },
}

impl Recoverable for SinkError {
    /// A delivery Kafka failed, or a producer in a fatal state, restarts the pipeline from the
    /// last confirmed position (nothing unacknowledged was confirmed). A configuration,
    /// permission or size problem stops: retrying without the operator cannot help. The rest
    /// (an unreachable or stalled broker, a shutting-down client, a closed output) is worth a
    /// reconnect where there is a loop for it (a topic created mid-stream); elsewhere it stops.
    fn recovery(&self) -> Recovery {
        match self {
            SinkError::Delivery { .. } | SinkError::ProducerFatal { .. } => Recovery::Restart,
            SinkError::MessageTooLarge { .. }
            | SinkError::Rejected { .. }
            | SinkError::TopicAuthorization { .. }
            | SinkError::UnknownTopic { .. }
            | SinkError::Config(_)
            | SinkError::TopicCreation { .. }
            | SinkError::KeyInSeveralPartitions { .. } => Recovery::Stop,
            SinkError::OutputClosed
            | SinkError::Io(_)
            | SinkError::Unreachable { .. }
            | SinkError::Read { .. }
            | SinkError::ShuttingDown
            | SinkError::ReadStalled { .. } => Recovery::Reconnect,
        }
    }
}

impl SinkError {
    /// The reader of our output went away (`pgcdc … | head`): a clean end, not a failure.
    /// The caller exits 0 without confirming what was not written.
    pub fn is_output_closed(&self) -> bool {
        matches!(self, SinkError::OutputClosed)
    }
}

/// A reader's failure (metadata, fetch): librdkafka retries what a broker that is not up yet
/// or restarting causes, and so do its callers; a refused authorization or a fatal client
/// state stops.
impl Recoverable for KafkaError {
    fn recovery(&self) -> Recovery {
        match self.rdkafka_error_code() {
            Some(RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::Fatal) => {
                Recovery::Stop
            }
            _ => Recovery::Reconnect,
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
        let restarts = |e: SinkError| e.recovery() == Recovery::Restart;
        assert!(restarts(delivery));
        assert!(restarts(SinkError::ProducerFatal { reason: "x".into() }));
        let too_large = SinkError::MessageTooLarge {
            topic: "t".into(),
            bytes: 10,
        };
        assert!(!restarts(too_large));
        let refused = SinkError::Rejected {
            topic: "t".into(),
            keyless: true,
            reason: "Broker: Invalid record".into(),
        };
        assert!(!restarts(refused));
        assert!(!restarts(SinkError::Config("x".into())));
        assert!(!restarts(SinkError::OutputClosed));
    }

    #[test]
    fn messages_name_the_fix() {
        let e = SinkError::MessageTooLarge {
            topic: "t".into(),
            bytes: 5000,
        };
        let s = e.to_string();
        assert!(s.contains("message.max.bytes=6024"), "{s}");
        assert_eq!(e.recovery(), Recovery::Stop);
        assert!(SinkError::OutputClosed.is_output_closed());
        assert_ne!(SinkError::OutputClosed.recovery(), Recovery::Stop);
        let e = SinkError::TopicCreation {
            topic: "x".into(),
            reason: "Broker: Policy violation".into(),
            partitions: 3,
            replication: 1,
            compacted: true,
        };
        assert!(e.to_string().contains("cleanup.policy=compact"));
        let rejected = |keyless| SinkError::Rejected {
            topic: "t".into(),
            keyless,
            reason: "Broker: Invalid record".into(),
        };
        let s = rejected(true).to_string();
        assert!(
            s.contains("cleanup.policy=delete") && s.contains("--truncate false"),
            "{s}"
        );
        assert!(!rejected(false).to_string().contains("no key"));
        assert_eq!(rejected(false).recovery(), Recovery::Stop);
    }
}
