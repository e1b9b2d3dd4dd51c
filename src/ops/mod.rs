//! Operating pgcdc: `status`, `verify` and `drop`.
//!
//! These commands answer the questions an operator has about a running (or stopped)
//! pipeline without touching its data path: how far is the slot, how much WAL does it keep,
//! does the topic say what the table says, and how is it all removed. They share the
//! connection flags of [`ConnArgs`] and find pgcdc's progress record where `run` keeps it
//! (see [`crate::checkpoint`]).
//!
//! Each command returns its exit code on success (`status` and `verify` have outcomes that
//! are not errors but still deserve a non-zero code) and a [`Failure`] otherwise; the codes
//! are listed in [`crate::cli::EXIT_CODES_HELP`].

pub mod drop;
pub mod status;
pub mod verify;

use anyhow::Context;

use crate::checkpoint::{self, FileStore, Progress};
use crate::cli::ConnArgs;
use crate::config::conninfo::ConnInfo;
use crate::run::ops_api::{Classify, Failure, FailureKind};
use crate::sink::kafka::{self, KafkaConfig};
use crate::source::connect;

/// Exit code: `verify` found differences.
pub const EXIT_DIFFERENT: u8 = 1;
/// Exit code: `status` found a slot that needs attention.
pub const EXIT_UNHEALTHY: u8 = 5;

/// Parses `--source` and connects.
pub(crate) async fn connect_source(
    conn: &ConnArgs,
) -> Result<(ConnInfo, tokio_postgres::Client), Failure> {
    let info = ConnInfo::parse(&conn.source)
        .context("invalid --source")
        .or_fail(FailureKind::Usage)?;
    // The session settings `run` pins, so values print (and encode) as in the events.
    let info = crate::source::session::canonical(&info);
    tracing::debug!(source = %info.redacted(), "connecting to PostgreSQL");
    let client = connect::connect(&info)
        .await
        .context("cannot connect to PostgreSQL (check --source and that the server is up)")
        .or_fail(FailureKind::Source)?;
    Ok((info, client))
}

/// The Kafka settings of `conn`, if `--kafka` was given.
pub(crate) fn kafka_config(conn: &ConnArgs) -> Option<KafkaConfig> {
    conn.kafka.as_ref().map(|b| KafkaConfig {
        bootstrap: b.clone(),
        properties: conn
            .kafka_properties
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
        max_in_flight: kafka::DEFAULT_MAX_IN_FLIGHT,
        // Only `run` produces events; the other commands read.
        oversized: kafka::Oversized::default(),
        bulk: false,
    })
}

/// Where `run` keeps the progress record of `database`/`slot`: the Kafka progress topic
/// when `--kafka` is given, else the stdout sink's file.
pub(crate) enum ProgressLocation {
    Kafka {
        cfg: KafkaConfig,
        topic: String,
        key: String,
    },
    File(FileStore),
}

impl ProgressLocation {
    pub(crate) fn new(conn: &ConnArgs, database: &str) -> Self {
        match kafka_config(conn) {
            Some(cfg) => ProgressLocation::Kafka {
                cfg,
                topic: format!("{}._progress", conn.topic_prefix),
                key: Progress::key(database, &conn.slot),
            },
            None => ProgressLocation::File(FileStore {
                path: conn
                    .progress_file
                    .clone()
                    .unwrap_or_else(|| FileStore::default_path(database, &conn.slot)),
            }),
        }
    }

    /// Where, for messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            ProgressLocation::Kafka { topic, key, .. } => {
                format!("key `{key}` of Kafka topic `{topic}`")
            }
            ProgressLocation::File(f) => format!("file {}", f.path.display()),
        }
    }

    pub(crate) async fn load(&self) -> Result<Option<Progress>, Failure> {
        match self {
            ProgressLocation::Kafka { cfg, topic, key } => {
                let bytes = kafka::read_last_value(cfg, topic, key.as_bytes())
                    .await
                    .or_fail(FailureKind::Sink)?;
                bytes
                    .map(|b| checkpoint::decode(&format!("{key} in topic {topic}"), &b))
                    .transpose()
                    .or_fail(FailureKind::Sink)
            }
            ProgressLocation::File(f) => f.load().or_fail(FailureKind::Sink),
        }
    }
}

/// Bytes as `1.5 GiB`.
pub(crate) fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kiB", "MiB", "GiB", "TiB"];
    let mut v = n.unsigned_abs() as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let sign = if n < 0 { "-" } else { "" };
    if u == 0 {
        format!("{sign}{v:.0} {}", UNITS[u])
    } else {
        format!("{sign}{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes() {
        assert_eq!(super::human_bytes(0), "0 B");
        assert_eq!(super::human_bytes(1536), "1.5 kiB");
        assert_eq!(super::human_bytes(3 << 30), "3.0 GiB");
    }
}
