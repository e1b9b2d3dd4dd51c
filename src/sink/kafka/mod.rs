//! The Kafka sink: the producer that publishes the pipeline's records and reports checkpoints
//! once Kafka acknowledged everything before them. Its client configuration (the defaults
//! below, `-X` properties, the librdkafka context) is shared with the other Kafka clients in
//! [`crate::kafka`].
//!
//! # Why the producer is configured the way it is
//!
//! pgcdc confirms a WAL position to PostgreSQL only after Kafka acknowledged every record
//! before it (see [`crate::sink`]). Everything below serves that rule:
//!
//! - **`acks=all` and `enable.idempotence=true`.** An acknowledgement means the record is on
//!   every in-sync replica, and librdkafka's retries can neither duplicate nor reorder records
//!   within a partition (sequence numbers per partition; up to 5 requests in flight stay in
//!   order). Without idempotence a retried batch could land after a later one, and a row's
//!   update could overtake its insert.
//! - **`message.timeout.ms=0` (retry forever).** With a finite timeout, a broker outage longer
//!   than the timeout fails records; pgcdc could only stop, and the records after the failed
//!   one would already be queued and might still be written — a gap in the partition. Retrying
//!   forever turns an outage into a *stall*: acknowledgements stop, the in-flight window
//!   fills, the sink stops reading its channel, the pipeline stops reading WAL, and PostgreSQL
//!   keeps the WAL for the slot. When the broker returns, delivery resumes in order. librdkafka
//!   reports the outage through its log and error callbacks, which surface here as `tracing`
//!   warnings, and the sink adds its own warning when nothing has been acknowledged for
//!   [`producer::STALL_WARNING_AFTER`] while records are in flight.
//! - **`partitioner=murmur2_random`.** The same key goes to the same partition as with the
//!   Java client (Kafka Connect, Debezium), so consumers and compaction see one partition per
//!   row, whichever tool wrote it.
//! - **`linger.ms=5`, `compression.type=lz4`.** Small batches cost latency nothing noticeable
//!   and save most of the per-request overhead; lz4 is cheap on CPU.
//! - **Bounded in flight.** At most [`crate::kafka::KafkaConfig::max_in_flight`] records lie between the
//!   oldest one not yet acknowledged and the newest one sent, and librdkafka's queue holds at
//!   most `queue.buffering.max.kbytes` of them (16 MiB; enough for one record of
//!   `message.max.bytes`). At either limit (`QueueFull`) the sink waits for acknowledgements
//!   before taking more: backpressure, never a dropped record. Records wait for the sink in a
//!   channel bounded in bytes ([`crate::model::channel`]); the sink gives their bytes back once
//!   librdkafka has them. Both bounds make up the memory bound of the README's Guarantees.
//!
//! Every `-X key=value` property given by the user overrides these defaults; an invalid one
//! fails at creation with [`crate::kafka::SinkError::Config`] naming it (defaults:
//! [`crate::kafka::PRODUCER_DEFAULTS`]).
//!
//! # Ordering of acknowledgements
//!
//! Delivery reports of different partitions arrive in any order. The sink numbers its records
//! and keeps a watermark: how many records, counted from the first, are acknowledged without
//! a gap. A checkpoint is reported only once the watermark has passed every record sent before
//! it. See [`producer`].

mod native;
pub mod producer;

pub use producer::KafkaSink;
