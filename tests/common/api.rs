//! Every item of pgcdc's library that a test uses, re-exported from this one place: when a
//! module of pgcdc moves, this file is the only one of the tests to change. Tests and the kit
//! import pgcdc's internals as `common::api::…`, never as `pgcdc::…`.

pub use pgcdc::cli::Cli;
pub use pgcdc::event::order::Version;
pub use pgcdc::kafka::{
    ensure_topics, read_last_value, read_topic, wait_for_cluster, ConsumedRecord, KafkaConfig,
    ReadStop, TopicReader, TopicSpec,
};
pub use pgcdc::model::failure::{Recoverable, Recovery};
pub use pgcdc::model::Lsn;
pub use pgcdc::sink::{
    self, Header, KafkaSink, Record, Sink, SinkError, SinkItem, SinkSender, SinkSummary, StdoutSink,
};
pub use pgcdc::source::catalog::TableName;
pub use pgcdc::source::connect::{connect, ConnectError};
pub use pgcdc::source::conninfo::ConnInfo;
pub use pgcdc::source::topic::topic_name;

/// The event model and encoder (the integrity oracle encodes the expected events itself).
pub mod event {
    pub use pgcdc::event::{
        BinaryMode, Change, Column, Datum, DecimalMode, Encoder, EventOptions, Format, Position,
        SnapshotMarker, TableSchema, TypeRegistry,
    };
    pub use pgcdc::model::Op;
    pub use pgcdc::source::copy_text;
    pub use pgcdc::source::schema::load_types;
}

/// The pgoutput decoder.
pub mod pgoutput {
    pub use pgcdc::source::pgoutput::{
        decode, pg_timestamp_to_unix_millis, ColumnValue, DecodeError, Decoder, LogicalMessage,
        OldTuple, Relation, ReplicaIdentity, TupleData,
    };
}

/// The replication-protocol client.
pub mod replication {
    pub use pgcdc::source::replication::{
        ReplicationClient, ReplicationError, ReplicationMessage, ReplicationStream, SnapshotAction,
        TlsError,
    };
}

/// The search indexer.
pub mod indexer {
    pub use pgcdc::indexer::http::HttpClient;
    pub use pgcdc::indexer::meili::MeiliTarget;
    pub use pgcdc::indexer::source::SourceRecord;
    pub use pgcdc::indexer::target::TargetError;
    pub use pgcdc::indexer::Indexer;
}
