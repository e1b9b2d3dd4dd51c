//! Operating pgcdc: `status`, `verify`, `drop` and `wait`.
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
pub mod wait;

use anyhow::Context;

use crate::checkpoint::ProgressStore;
use crate::cli::ConnArgs;
use crate::config;
use crate::kafka::KafkaConfig;
use crate::model::failure::{Classify, Failure, FailureKind};
use crate::source::connect;
use crate::source::conninfo::ConnInfo;

/// Exit code: `verify` found differences.
pub const EXIT_DIFFERENT: u8 = 1;
/// Exit code: `status` found a slot that needs attention.
pub const EXIT_UNHEALTHY: u8 = 5;

/// Parses `--source` and connects.
pub(crate) async fn connect_source(
    conn: &ConnArgs,
) -> Result<(ConnInfo, tokio_postgres::Client), Failure> {
    let info = config::postgres(&conn.pg)?;
    tracing::debug!(source = %info.redacted(), "connecting to PostgreSQL");
    let client = connect::connect(&info)
        .await
        .context("cannot connect to PostgreSQL (check --source and that the server is up)")
        .or_fail(FailureKind::Source)?;
    Ok((info, client))
}

/// The Kafka settings of `conn`, if `--kafka` was given.
pub(crate) fn kafka_config(conn: &ConnArgs) -> Option<KafkaConfig> {
    // Only `run` produces events; the other commands read.
    config::kafka(&conn.kafka, None)
}

/// Where `run` keeps the progress record of `database`/`slot`: the Kafka progress topic
/// when `--kafka` is given, else the stdout sink's file.
pub(crate) fn progress_store(conn: &ConnArgs, database: &str) -> ProgressStore {
    ProgressStore::new(
        kafka_config(conn),
        &conn.kafka.topic_prefix,
        database,
        &conn.pg.slot,
        conn.progress_file.path.clone(),
    )
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
