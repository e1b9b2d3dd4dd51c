//! The one Kafka client module: where Kafka is and how to talk to it ([`KafkaConfig`], the
//! `-X` properties, the client roles and the librdkafka context every pgcdc client uses), the
//! admin requests ([`wait_for_cluster`], [`ensure_topics`], topic metadata), and the reader
//! ([`read_topic`], [`TopicReader`], [`read_last_value`]).
//!
//! The producer sink ([`crate::sink::kafka`]) builds on the configuration here; the defaults it
//! gets ([`PRODUCER_DEFAULTS`]) and why are explained there. The error of every Kafka client is
//! [`SinkError`] (the sinks' error, which `crate::sink` re-exports): one type, since a start-up
//! check, a progress read and a delivery fail for the same reasons (address, credentials,
//! permissions).
//!
//! # Utilities
//!
//! [`wait_for_cluster`] (start-up: wait for the broker rather than fail), [`ensure_topics`]
//! (create missing topics) and [`read_topic`] / [`read_last_value`] (read back; used by tests,
//! `verify`, and to load pgcdc's durable progress) use the same bootstrap address and `-X`
//! properties, so security settings are given once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext};

mod admin;
mod error;
mod reader;

pub use admin::{ensure_topics, wait_for_cluster, Partitions, TopicSpec};
pub use error::SinkError;
pub use reader::{
    read_last_value, read_one, read_topic, ConsumedRecord, ReadStop, TopicReader, Watermarks,
};

/// An error event identical to the previous one within this window is not logged again.
const REPEAT_WINDOW: Duration = Duration::from_secs(5);

/// Default bound on records awaiting their delivery report.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 100_000;

/// Producer settings applied before the user's `-X` properties (which override them).
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
    ("message.timeout.ms", "0"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    ("client.id", "pgcdc"),
    // Connect to the brokers as soon as they are known: with sparse connections the
    // idempotent producer waited up to a second for its producer id at every start.
    ("enable.sparse.connections", "false"),
    // Memory stays bounded whatever the row size: a full buffer is backpressure (QueueFull).
    // 16 MiB is part of the documented memory bound (README, Guarantees) and still tens of
    // thousands of typical events; raised automatically to hold one record of
    // -X message.max.bytes when that is larger (see `client_config`).
    ("queue.buffering.max.kbytes", "16384"),
];

/// Overrides of [`PRODUCER_DEFAULTS`] for bulk runs (`--snapshot-only`), applied before the
/// user's `-X`: nobody waits for a single row there, so librdkafka may wait longer to fill a
/// batch. Fewer, larger requests cost pgcdc and the broker less CPU (-11% wall time on the
/// 1M-row snapshot of bench/run.sh). Streaming keeps `linger.ms=5` for latency.
pub const BULK_PRODUCER_DEFAULTS: &[(&str, &str)] = &[("linger.ms", "25")];

/// Where Kafka is and how to talk to it.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port…]`.
    pub bootstrap: String,
    /// The user's `-X key=value` librdkafka properties, in the order given (later wins).
    pub properties: Vec<(String, String)>,
    /// Bound on records awaiting their delivery report (backpressure beyond it).
    pub max_in_flight: usize,
    /// What to do with a record larger than Kafka accepts.
    pub oversized: Oversized,
    /// A bulk run (`--snapshot-only`): [`BULK_PRODUCER_DEFAULTS`] apply.
    pub bulk: bool,
}

/// What to do with a record larger than Kafka accepts (`message.max.bytes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Oversized {
    /// Stop with [`SinkError::MessageTooLarge`], confirming nothing from that record on: the
    /// operator raises the limit and restarts, and nothing is lost.
    #[default]
    Fail,
    /// Leave the record out, with an error in the log naming its topic, key and size, and
    /// count it ([`crate::sink::SinkSummary::oversized_skipped`]). The row's change is lost for
    /// consumers; the user asked for that.
    Skip,
}

impl KafkaConfig {
    /// A configuration with no extra properties and the default in-flight bound.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap: bootstrap.into(),
            properties: Vec::new(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            oversized: Oversized::Fail,
            bulk: false,
        }
    }

    /// Adds a `-X` property.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }
}

/// Which kind of client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Producer,
    /// Metadata and admin requests.
    Admin,
    /// Reading topics back.
    Reader,
}

/// librdkafka client configuration for `role`: our settings for the role, then the user's
/// properties. For the producer the user's properties override our defaults; for the other
/// roles a few settings the code depends on are forced after them.
pub(crate) fn client_config(cfg: &KafkaConfig, role: Role) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap);
    match role {
        Role::Producer => {
            for (k, v) in PRODUCER_DEFAULTS {
                c.set(*k, *v);
            }
            if cfg.bulk {
                for (k, v) in BULK_PRODUCER_DEFAULTS {
                    c.set(*k, *v);
                }
            }
        }
        Role::Admin => {
            c.set("client.id", "pgcdc-admin");
        }
        Role::Reader => {
            c.set("client.id", "pgcdc-reader");
        }
    }
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    match role {
        Role::Producer => {
            // The queue must hold the largest record librdkafka accepts, or one that size
            // would wait forever for room (QueueFull with nothing in flight). One, not two:
            // a record that large then passes alone, as it does through the sink's channel
            // (see crate::model::channel), and memory stays within the documented bound plus
            // that one record.
            let user_set = |key: &str| cfg.properties.iter().any(|(k, _)| k == key);
            let max_bytes = c
                .get("message.max.bytes")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let queue_kb = c
                .get("queue.buffering.max.kbytes")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let needed_kb = max_bytes.div_ceil(1024);
            if !user_set("queue.buffering.max.kbytes") && queue_kb < needed_kb {
                c.set("queue.buffering.max.kbytes", needed_kb.to_string());
            }
        }
        Role::Admin => {
            // Asking for a topic's metadata must not create it.
            c.set("allow.auto.create.topics", "false");
        }
        Role::Reader => {
            c.set("allow.auto.create.topics", "false");
            c.set("enable.auto.commit", "false");
            c.set("enable.auto.offset.store", "false");
            c.set("enable.partition.eof", "true");
            c.set("auto.offset.reset", "earliest");
            // librdkafka wants a group id for a consumer even when partitions are assigned
            // by hand and nothing is committed; a unique one never joins anything.
            c.set("group.id", unique_group_id());
        }
    }
    c
}

/// Owns a librdkafka client and destroys it on a blocking thread when dropped:
/// `rd_kafka_destroy` joins the client's threads (~90 ms measured), which would stall every
/// task of pgcdc's single-threaded runtime.
pub(crate) struct OffThreadDrop<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffThreadDrop<T> {
    pub(crate) fn new(client: T) -> Self {
        OffThreadDrop(Some(client))
    }
}

impl<T: Send + 'static> std::ops::Deref for OffThreadDrop<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Always `Some` until dropped.
        self.0.as_ref().expect("client present until drop")
    }
}

impl<T: Send + 'static> OffThreadDrop<T> {
    /// Calls `last` with the client, then destroys it, both on a blocking thread, and waits
    /// until that is done.
    pub(crate) async fn destroy(mut self, last: impl FnOnce(&T) + Send + 'static) {
        if let Some(client) = self.0.take() {
            // A panic while destroying has been reported by the panic hook already.
            let _ = tokio::task::spawn_blocking(move || {
                last(&client);
                drop(client);
            })
            .await;
        }
    }
}

impl<T: Send + 'static> Drop for OffThreadDrop<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(move || drop(client))),
                Err(_) => drop(client),
            }
        }
    }
}

fn unique_group_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("pgcdc-reader-{}-{nanos}", std::process::id())
}

/// Maps a client creation failure to [`SinkError::Config`], naming the property but not its
/// value.
pub(crate) fn config_error(e: KafkaError) -> SinkError {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            // The value is never repeated (it may be a secret under any key); librdkafka's
            // description quotes it.
            let mut desc = desc.replace(&format!("\"{value}\""), "(the value given)");
            if value.len() >= 3 {
                desc = desc.replace(&value, "…");
            }
            SinkError::Config(format!("-X {key}: {desc}"))
        }
        KafkaError::ClientCreation(msg) => SinkError::Config(creation_error(&msg)),
        other => SinkError::Config(other.to_string()),
    }
}

/// librdkafka reports a property it could not use at creation as `<property> failed: <why>`
/// (e.g. `ssl.ca.location failed: …system lib`, for a file that does not exist): name it as
/// the `-X` it came from, and for a file say what to check.
fn creation_error(msg: &str) -> String {
    let Some((property, why)) = msg.split_once(" failed: ") else {
        return msg.to_string();
    };
    if property.contains(char::is_whitespace) || !property.contains('.') {
        return msg.to_string();
    }
    let hint = if property.ends_with(".location") {
        ": check that the file it names exists, is readable by pgcdc and holds PEM"
    } else {
        ""
    };
    format!("-X {property}: librdkafka cannot use it ({why}){hint}")
}

/// A blocking Kafka call's task ended without an answer: re-raise its panic, or report that
/// the runtime is shutting down (the only other way a blocking task ends early).
pub(crate) fn join_error(e: tokio::task::JoinError) -> SinkError {
    match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(_) => SinkError::ShuttingDown,
    }
}

/// The librdkafka client context of every pgcdc client: routes librdkafka's log lines and
/// error events to `tracing`, and remembers the last error for our own messages.
pub(crate) struct PgcdcContext {
    role: Role,
    /// Report librdkafka's error events and log lines at debug level only (the caller
    /// reports instead).
    quiet_errors: bool,
    last_error: Mutex<Option<String>>,
    /// The last error event logged and when, to drop repeats: rdkafka 0.39 hands every
    /// producer error event to the context twice, and librdkafka repeats some every second.
    last_logged: Mutex<Option<(String, Instant)>>,
}

impl PgcdcContext {
    pub(crate) fn new(role: Role) -> Self {
        PgcdcContext {
            role,
            quiet_errors: false,
            last_error: Mutex::new(None),
            last_logged: Mutex::new(None),
        }
    }

    pub(crate) fn quiet(mut self) -> Self {
        self.quiet_errors = true;
        self
    }

    /// Whether `reason` was logged less than [`REPEAT_WINDOW`] ago (and if not, remembers it).
    fn is_repeat(&self, reason: &str) -> bool {
        let Ok(mut last) = self.last_logged.lock() else {
            return false;
        };
        let now = Instant::now();
        if let Some((prev, at)) = last.as_ref() {
            if prev == reason && now.duration_since(*at) < REPEAT_WINDOW {
                return true;
            }
        }
        *last = Some((reason.to_string(), now));
        false
    }

    /// The last error event's reason, cleared by reading it.
    pub(crate) fn take_last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|mut e| e.take())
    }
}

impl ClientContext for PgcdcContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Our readers and admin clients get the user's producer properties too; librdkafka's
        // "ignored by this consumer" notes about them are noise.
        if fac == "CONFWARN" && self.role != Role::Producer {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}");
            return;
        }
        // Connection failures arrive twice: as a FAIL log line and as an error event, which
        // is the one reported (see `error`). In quiet mode the caller reports instead.
        if fac == "FAIL" || self.quiet_errors {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            // librdkafka's "errors" are mostly connection trouble it recovers from itself.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Ok(mut last) = self.last_error.lock() {
            // "N/M brokers are down" follows the specific failure; keep the specific one.
            let summary_only = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
            if !(summary_only && last.is_some()) {
                *last = Some(reason.to_string());
            }
        }
        // A consumer's end-of-partition notice travels as an error event; it is no error.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!(target: "librdkafka", "{reason}");
            return;
        }
        crate::metrics::global()
            .kafka_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.is_repeat(reason) {
            return;
        }
        let fatal = error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal);
        if fatal {
            tracing::error!(target: "librdkafka", "Kafka client fatal error: {reason}");
        } else if self.quiet_errors {
            tracing::debug!(target: "librdkafka", "Kafka client: {reason}");
        } else {
            // Broker down, connection refused, authentication failed…: librdkafka keeps
            // retrying; the operator should know.
            tracing::warn!(target: "librdkafka", "Kafka client: {reason}");
        }
    }
}

impl ConsumerContext for PgcdcContext {}

/// Only the metadata clients ([`BaseProducer`](rdkafka::producer::BaseProducer)) use this;
/// they produce nothing. The sink's producer wraps the context in its own
/// (`producer::SinkContext`), which counts delivery reports.
impl ProducerContext for PgcdcContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_properties_override_producer_defaults() {
        let cfg = KafkaConfig::new("b:9092")
            .property("linger.ms", "50")
            .property("client.id", "mine");
        let c = client_config(&cfg, Role::Producer);
        assert_eq!(c.get("linger.ms"), Some("50"));
        assert_eq!(c.get("client.id"), Some("mine"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("message.timeout.ms"), Some("0"));
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn bulk_runs_batch_longer_unless_the_user_says_otherwise() {
        let mut cfg = KafkaConfig::new("b:9092");
        assert_eq!(
            client_config(&cfg, Role::Producer).get("linger.ms"),
            Some("5")
        );
        cfg.bulk = true;
        assert_eq!(
            client_config(&cfg, Role::Producer).get("linger.ms"),
            Some("25")
        );
        let cfg = cfg.property("linger.ms", "1");
        assert_eq!(
            client_config(&cfg, Role::Producer).get("linger.ms"),
            Some("1")
        );
    }

    #[test]
    fn producer_queue_holds_the_largest_record() {
        let c = client_config(&KafkaConfig::new("b:9092"), Role::Producer);
        assert_eq!(c.get("queue.buffering.max.kbytes"), Some("16384"));
        let cfg = KafkaConfig::new("b:9092").property("message.max.bytes", "10000000");
        let c = client_config(&cfg, Role::Producer);
        assert_eq!(c.get("queue.buffering.max.kbytes"), Some("16384"));
        let cfg = KafkaConfig::new("b:9092").property("message.max.bytes", "20000000");
        let c = client_config(&cfg, Role::Producer);
        assert_eq!(c.get("queue.buffering.max.kbytes"), Some("19532"));
        let cfg = cfg.property("queue.buffering.max.kbytes", "1000");
        let c = client_config(&cfg, Role::Producer);
        assert_eq!(c.get("queue.buffering.max.kbytes"), Some("1000"));
    }

    #[test]
    fn reader_settings_the_code_depends_on_are_forced() {
        let cfg = KafkaConfig::new("b:9092").property("enable.auto.commit", "true");
        let c = client_config(&cfg, Role::Reader);
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.partition.eof"), Some("true"));
        assert!(c.get("group.id").is_some());
    }

    #[test]
    fn config_errors_name_the_property_and_hide_secrets() {
        let e = config_error(KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
            "No such configuration property".into(),
            "sasl.password.typo".into(),
            "hunter2".into(),
        ));
        let s = e.to_string();
        assert!(s.contains("sasl.password.typo"), "{s}");
        assert!(!s.contains("hunter2"), "{s}");
        let e = config_error(KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"snappier\" for configuration property \"compression.type\"".into(),
            "compression.type".into(),
            "snappier".into(),
        ));
        let s = e.to_string();
        assert!(s.contains("-X compression.type: Invalid value"), "{s}");
        let s = config_error(KafkaError::ClientCreation(
            "ssl.ca.location failed: error:05880002:x509 certificate routines::system lib".into(),
        ))
        .to_string();
        assert!(
            s.contains("-X ssl.ca.location: librdkafka cannot use it"),
            "{s}"
        );
        assert!(s.contains("file it names exists"), "{s}");
        assert!(!s.contains("snappier"), "{s}");
    }
}
