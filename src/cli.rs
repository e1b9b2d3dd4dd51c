//! The command line. Every flag has a help line and a `PGCDC_*` environment variable; this
//! file is the one place flags are defined.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::source::catalog::TableName;
use crate::source::Lsn;

/// Change data capture from PostgreSQL to Kafka: a consistent snapshot of your tables, then
/// every committed change, in commit order, keyed by primary key.
#[derive(Debug, Parser)]
#[command(name = "pgcdc", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Snapshot the selected tables, then stream every committed change, until stopped.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(Box<RunArgs>),
}

const RUN_AFTER_HELP: &str = "\
Examples:
  pgcdc run --source postgres://app@db/shop --kafka localhost:9092 --table public.orders
  pgcdc run --source 'host=/var/run/postgresql dbname=shop' --sink stdout --stop-lsn now

Topics are <topic-prefix>.<schema>.<table>; progress is kept in the compacted topic
<topic-prefix>._progress (Kafka sink) or in --progress-file (stdout sink).
Exit codes: 0 done or stopped, 2 usage or configuration, 3 PostgreSQL, 4 sink (Kafka, stdout).
Logs go to stderr; set PGCDC_LOG=debug (or a tracing filter) for more.";

/// Where events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SinkKind {
    /// Kafka topics (needs --kafka).
    Kafka,
    /// One JSON object per line on standard output: {"topic":…,"key":…,"value":…}.
    Stdout,
}

/// When to take a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotMode {
    /// Snapshot once: when no completed snapshot is recorded for the slot.
    Initial,
    /// Never snapshot; stream changes from the slot's position only.
    Never,
    /// Snapshot at every start (the slot is first drained up to the new snapshot).
    Always,
}

/// What to do with a record larger than Kafka accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Oversized {
    /// Stop (exit 4) without confirming it: raise the limit and run again, nothing is lost.
    Fail,
    /// Leave it out, with an error in the log naming topic and size, and count it.
    Skip,
}

/// `--stop-lsn`: an LSN, or `now` for the server's WAL position at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopLsn {
    Now,
    At(Lsn),
}

impl FromStr for StopLsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("now") {
            return Ok(StopLsn::Now);
        }
        s.parse()
            .map(StopLsn::At)
            .map_err(|e| format!("{e}, or `now`"))
    }
}

/// A `key=value` librdkafka property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
}

impl FromStr for Property {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(Property {
                key: k.trim().to_string(),
                value: v.to_string(),
            }),
            _ => Err(format!(
                "`{s}` is not a property: write key=value, e.g. -X compression.type=zstd"
            )),
        }
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!("`{s}` is out of range (0 to 86400 seconds)"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `pgcdc run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// PostgreSQL to capture from: a libpq URL (postgres://user@host:5432/db?sslmode=require)
    /// or key=value string ("host=db dbname=shop"). PGHOST, PGPORT, PGUSER, PGPASSWORD,
    /// PGDATABASE, PGSSLMODE… and ~/.pgpass fill what it leaves out.
    #[arg(
        long,
        env = "PGCDC_SOURCE",
        value_name = "CONNINFO",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub source: String,

    /// Kafka bootstrap servers, host:port[,host:port…]. Required for the Kafka sink.
    #[arg(long, env = "PGCDC_KAFKA", value_name = "BOOTSTRAP")]
    pub kafka: Option<String>,

    /// Where events go.
    #[arg(long, env = "PGCDC_SINK", value_enum, default_value = "kafka")]
    pub sink: SinkKind,

    /// A table to capture, as schema.table (repeatable; comma-separated in the variable).
    /// Default: every table in the publication.
    #[arg(
        long = "table",
        env = "PGCDC_TABLES",
        value_name = "SCHEMA.TABLE",
        value_delimiter = ','
    )]
    pub tables: Vec<TableName>,

    /// Logical replication slot to create or resume.
    #[arg(long, env = "PGCDC_SLOT", default_value = "pgcdc")]
    pub slot: String,

    /// Publication to stream; created for the --table list when it does not exist.
    #[arg(long, env = "PGCDC_PUBLICATION", default_value = "pgcdc")]
    pub publication: String,

    /// Topic names are `<prefix>.<schema>.<table>`; also the `source.name` of events.
    #[arg(
        long,
        env = "PGCDC_TOPIC_PREFIX",
        default_value = "pgcdc",
        value_name = "PREFIX"
    )]
    pub topic_prefix: String,

    /// When to snapshot the tables before streaming.
    #[arg(long, env = "PGCDC_SNAPSHOT", value_enum, default_value = "initial")]
    pub snapshot: SnapshotMode,

    /// Take the snapshot, publish it, and exit 0 (uses a temporary slot; nothing is left behind).
    #[arg(long, env = "PGCDC_SNAPSHOT_ONLY")]
    pub snapshot_only: bool,

    /// Exit 0 once everything committed up to this LSN (e.g. 16/B374D848) is published and
    /// confirmed; `now` means the server's WAL position at start.
    #[arg(long, env = "PGCDC_STOP_LSN", value_name = "LSN|now")]
    pub stop_lsn: Option<StopLsn>,

    /// A librdkafka property, as kcat takes it: -X compression.type=zstd (repeatable;
    /// semicolon-separated in the variable). Overrides pgcdc's defaults.
    #[arg(
        short = 'X',
        env = "PGCDC_KAFKA_PROPERTIES",
        value_name = "KEY=VALUE",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub kafka_properties: Vec<Property>,

    /// A record larger than Kafka accepts (message.max.bytes): fail, or skip it with a loud
    /// log line and a count (its change is then lost for consumers).
    #[arg(long, env = "PGCDC_OVERSIZED", value_enum, default_value = "fail")]
    pub oversized: Oversized,

    /// Follow each delete with a tombstone (same key, null value) so compacted topics forget
    /// the row.
    #[arg(long, env = "PGCDC_TOMBSTONES", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub tombstones: bool,

    /// Partitions of the topics pgcdc creates (existing topics are left as they are).
    #[arg(
        long,
        env = "PGCDC_TOPIC_PARTITIONS",
        default_value_t = 1,
        value_name = "N"
    )]
    pub topic_partitions: i32,

    /// Replication factor of the topics pgcdc creates.
    #[arg(
        long,
        env = "PGCDC_TOPIC_REPLICATION_FACTOR",
        default_value_t = 1,
        value_name = "N"
    )]
    pub topic_replication_factor: i32,

    /// Where the stdout sink keeps its progress (default: `~/.local/state/pgcdc/<db>-<slot>.json`).
    #[arg(long, env = "PGCDC_PROGRESS_FILE", value_name = "PATH")]
    pub progress_file: Option<PathBuf>,

    /// Give up when Kafka stays unreachable this long at start (default: keep retrying).
    #[arg(long, env = "PGCDC_KAFKA_TIMEOUT", value_name = "SECONDS", value_parser = parse_seconds)]
    pub kafka_timeout: Option<Duration>,

    /// How often to report the confirmed position to PostgreSQL (well under wal_sender_timeout).
    #[arg(long, env = "PGCDC_STATUS_INTERVAL", value_name = "SECONDS", default_value = "2", value_parser = parse_seconds)]
    pub status_interval: Duration,

    /// Treat the replication connection as lost when PostgreSQL sends nothing for this long
    /// while pgcdc waits for it (a silent network partition), and reconnect. PostgreSQL
    /// answers every status update, so keep it well above --status-interval; 0 turns it off.
    #[arg(long, env = "PGCDC_RECEIVE_TIMEOUT", value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub receive_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_help_and_env() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                if matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("PGCDC_")),
                    "--{} has no PGCDC_ variable",
                    arg.get_id()
                );
            }
        }
    }

    #[test]
    fn parses_values() {
        assert_eq!("now".parse::<StopLsn>(), Ok(StopLsn::Now));
        assert_eq!("0/10".parse::<StopLsn>(), Ok(StopLsn::At(Lsn(16))));
        assert!("x".parse::<StopLsn>().is_err());
        assert!("=v".parse::<Property>().is_err());
        assert_eq!(
            "a=b=c".parse::<Property>().unwrap(),
            Property {
                key: "a".into(),
                value: "b=c".into()
            }
        );
    }
}
