//! Configuration: the `--config` file, merged under the command line's flags ([`file`]), and
//! the flags turned once into checked values that `run` and the operations commands share:
//! the PostgreSQL conninfo ([`postgres`]) and the Kafka client ([`kafka`]); where the progress
//! record lives is [`crate::checkpoint::ProgressStore::new`]'s one decision. A flag's meaning is decided here, not again by each
//! command. How to reach PostgreSQL (a libpq-compatible conninfo) is the source's:
//! [`crate::source::conninfo`].

pub mod file;

use anyhow::Context;

use crate::cli::{KafkaArgs, Oversized, PgArgs};
use crate::kafka::{self, KafkaConfig};
use crate::model::failure::{Classify, Failure, FailureKind};
use crate::source::conninfo::ConnInfo;
use crate::source::session;

/// `--source`, checked: parsed (PG* variables and ~/.pgpass fill what it leaves out) and
/// pinned to the session settings every pgcdc connection uses, so values print (and encode)
/// the same on each (see [`crate::source::session`]).
pub fn postgres(pg: &PgArgs) -> Result<ConnInfo, Failure> {
    let info = ConnInfo::parse(&pg.source)
        .context("invalid --source")
        .or_fail(FailureKind::Usage)?;
    Ok(session::canonical(&info))
}

/// How `run` produces with the Kafka client (the other commands only read).
#[derive(Debug, Clone, Copy)]
pub struct Producing {
    pub oversized: Oversized,
    /// A snapshot-only run: tuned for throughput over latency.
    pub bulk: bool,
}

/// The Kafka client of `--kafka` and `-X`, when `--kafka` is given.
pub fn kafka(args: &KafkaArgs, producing: Option<Producing>) -> Option<KafkaConfig> {
    let bootstrap = args.bootstrap.as_ref()?;
    let mut cfg = KafkaConfig::new(bootstrap.clone());
    cfg.properties = args
        .properties
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect();
    if let Some(p) = producing {
        cfg.oversized = match p.oversized {
            Oversized::Fail => kafka::Oversized::Fail,
            Oversized::Skip => kafka::Oversized::Skip,
        };
        cfg.bulk = p.bulk;
    }
    Some(cfg)
}
