//! The command line. Every flag has a help line and a `PGCDC_*` environment variable; this
//! file is the one place flags are defined, and each is defined once: a flag several commands
//! take (`--source`, `--kafka`, `--decimal`, …) lives in a group (`PgArgs`, `KafkaArgs`,
//! `EventArgs`, …) that each of them flattens, so its name, variable, default, parser and
//! help cannot drift apart between commands. A group's help is therefore worded for every
//! command that takes it; what only one command needs to say goes in its `after_help`.
//!
//! `--help` lists flags in the order they are added (groups included), then the global
//! flags (`display_order` 800), then `run`'s operations flags (900); tests/golden/help holds
//! the rendered help, so a change to it is deliberate.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::event::{BinaryMode, DecimalMode, EventHeaders, EventOptions, Format};
pub use crate::logging::LogFormat;
use crate::model::Lsn;
use crate::source::catalog::{ColumnRef, TableName};

/// Change data capture from PostgreSQL to Kafka: a consistent snapshot of your tables, then
/// every committed change, in commit order, keyed by primary key.
#[derive(Debug, Parser)]
#[command(name = "pgcdc", version, about, long_about = None, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Snapshot the selected tables, then stream every committed change, until stopped.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(Box<RunArgs>),
    /// Show a slot's state: active (by which process), confirmed position, WAL it retains,
    /// lag, and the snapshot progress pgcdc recorded. Warns when the slot needs attention.
    #[command(after_help = STATUS_AFTER_HELP)]
    Status(Box<StatusArgs>),
    /// Compare a table with what its topic says (the last event per key) at one consistent
    /// point; report missing, extra and differing keys.
    #[command(after_help = VERIFY_AFTER_HELP)]
    Verify(Box<VerifyArgs>),
    /// Remove a slot, its publication and pgcdc's stored progress (asks for --yes).
    #[command(after_help = DROP_AFTER_HELP)]
    Drop(Box<DropArgs>),
    /// Read-your-writes: wait until every change committed at or below an LSN is published
    /// (acknowledged by Kafka, or written by the stdout sink), then print the published
    /// position.
    #[command(after_help = WAIT_AFTER_HELP)]
    Wait(Box<WaitArgs>),
}

const RUN_AFTER_HELP: &str = "\
Examples:
  pgcdc run --source postgres://app@db/shop --kafka localhost:9092 --table public.orders
  pgcdc run --source 'host=/var/run/postgresql dbname=shop' --sink stdout --stop-lsn now

Topics are <topic-prefix>.<schema>.<table>; a name Kafka would refuse or that could be another
table's gets `_` for other characters and a hash suffix (README: Topic names). Progress is kept
in the compacted topic <topic-prefix>._progress (Kafka sink) or in --progress-file (stdout sink).
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
///
/// A flag's or the config file's value is one property, whatever it holds (a password may
/// contain `;` or `=`); only the environment variable is a list (see [`split_properties`]).
/// Neither errors nor `Debug` show the value: it may be a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
}

impl std::fmt::Debug for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Property({}=…)", self.key)
    }
}

impl FromStr for Property {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(Property {
                key: k.trim().to_string(),
                value: v.to_string(),
            }),
            // Not repeated: a mistyped `sasl.password:…` is still a password.
            _ => Err(
                "a Kafka property (-X, or an item of its variable) is not key=value; \
                 write e.g. -X compression.type=zstd (the text is not shown: it may be a \
                 secret)"
                    .to_string(),
            ),
        }
    }
}

/// Parses `-X` values for clap without repeating them in errors (clap's own message for a
/// rejected value quotes it).
#[derive(Debug, Clone, Copy)]
pub struct PropertyParser;

impl clap::builder::TypedValueParser for PropertyParser {
    type Value = Property;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Property, clap::Error> {
        let raw = |kind, msg: String| clap::Error::raw(kind, format!("{msg}\n")).with_cmd(cmd);
        let text = value.to_str().ok_or_else(|| {
            raw(
                clap::error::ErrorKind::InvalidUtf8,
                "a Kafka property (-X) is not valid UTF-8".to_string(),
            )
        })?;
        text.parse()
            .map_err(|e| raw(clap::error::ErrorKind::ValueValidation, e))
    }
}

/// The items of a `…_KAFKA_PROPERTIES` variable: `;`-separated `key=value` properties, where
/// `\;` is a semicolon inside a value and `\\` a backslash (any other backslash is kept).
/// Empty items are skipped.
pub fn split_properties(raw: &str) -> Result<Vec<Property>, String> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(';') | Some('\\')) => {
                item.extend(chars.next());
            }
            ';' => items.push(std::mem::take(&mut item)),
            c => item.push(c),
        }
    }
    items.push(item);
    items
        .iter()
        .filter(|i| !i.trim().is_empty())
        .map(|i| i.parse())
        .collect()
}

/// When the `-X` values of `matches` (id `id`) came from the environment variable, the
/// properties it lists; `None` when they came from flags, the config file or nowhere.
pub fn properties_from_env(
    matches: &clap::ArgMatches,
    id: &str,
) -> Option<Result<Vec<Property>, String>> {
    if matches.try_contains_id(id).ok()?
        && matches.value_source(id) == Some(clap::parser::ValueSource::EnvVariable)
    {
        let raw = matches.get_raw(id)?.next()?;
        Some(match raw.to_str() {
            Some(text) => split_properties(text),
            None => Err("the variable is not valid UTF-8".to_string()),
        })
    } else {
        None
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

// ---------------------------------------------------------------------------------------------
// Flags several commands take, each defined once: the commands flatten these groups.
// ---------------------------------------------------------------------------------------------

/// `--source` and `--slot`: the database and the slot pgcdc reads it through.
#[derive(Debug, Clone, Args)]
pub struct PgArgs {
    /// PostgreSQL to connect to: a libpq URL (postgres://user@host:5432/db?sslmode=require)
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

    /// The logical replication slot (`run` creates it or resumes from it).
    #[arg(long, env = "PGCDC_SLOT", default_value = "pgcdc")]
    pub slot: String,
}

/// `--kafka`, `-X` and `--topic-prefix`: the Kafka cluster and pgcdc's topics in it.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port…]: where the topics and pgcdc's progress
    /// record are. Required for the Kafka sink and for verify.
    #[arg(
        id = "kafka",
        long = "kafka",
        env = "PGCDC_KAFKA",
        value_name = "BOOTSTRAP"
    )]
    pub bootstrap: Option<String>,

    /// A librdkafka property, as kcat takes it: -X compression.type=zstd (repeatable; the
    /// value is taken whole). Overrides pgcdc's defaults. In the variable: semicolon-separated,
    /// `\;` for a semicolon inside a value.
    // The id names the config file's key (`kafka-properties`) and the variable's values
    // (`properties_from_env`).
    #[arg(
        id = "kafka_properties",
        short = 'X',
        env = "PGCDC_KAFKA_PROPERTIES",
        value_name = "KEY=VALUE",
        value_parser = PropertyParser,
        hide_env_values = true
    )]
    pub properties: Vec<Property>,

    /// Topic names are `<prefix>.<schema>.<table>`, the progress record is in
    /// `<prefix>._progress`; also the `source.name` of events.
    #[arg(
        long,
        env = "PGCDC_TOPIC_PREFIX",
        default_value = "pgcdc",
        value_name = "PREFIX"
    )]
    pub topic_prefix: String,
}

/// `--progress-file`: where the stdout sink's progress is.
#[derive(Debug, Clone, Args)]
pub struct ProgressFileArgs {
    /// Where the stdout sink (`run --sink stdout`) keeps its progress (default:
    /// `~/.local/state/pgcdc/<db>-<slot>.json`).
    #[arg(
        id = "progress_file",
        long = "progress-file",
        env = "PGCDC_PROGRESS_FILE",
        value_name = "PATH"
    )]
    pub path: Option<PathBuf>,
}

/// `--publication`.
#[derive(Debug, Clone, Args)]
pub struct PublicationArgs {
    /// The publication `run` streams; `run` creates it for the --table list when it does not
    /// exist.
    #[arg(
        id = "publication",
        long = "publication",
        env = "PGCDC_PUBLICATION",
        default_value = "pgcdc",
        value_name = "PUBLICATION"
    )]
    pub name: String,
}

/// How events encode values and which columns they leave out: `run` writes them so, `verify`
/// reads the topic so (it must be given what `run` was).
#[derive(Debug, Clone, Args)]
pub struct EventArgs {
    /// How events write `numeric` values: a string with the exact digits, or a JSON number
    /// with the exact digits (NaN and ±Infinity stay strings either way).
    #[arg(long, env = "PGCDC_DECIMAL", value_enum, default_value = "string")]
    pub decimal: DecimalMode,

    /// How events write `bytea` values and message contents.
    #[arg(long, env = "PGCDC_BINARY", value_enum, default_value = "base64")]
    pub binary: BinaryMode,

    /// Leave a column out of every event, as schema.table.column (repeatable;
    /// comma-separated in the variable). Key columns cannot be excluded.
    #[arg(
        long = "exclude-column",
        env = "PGCDC_EXCLUDE_COLUMNS",
        value_name = "SCHEMA.TABLE.COLUMN",
        value_delimiter = ','
    )]
    pub exclude_columns: Vec<ColumnRef>,
}

impl EventArgs {
    /// The event options these flags decide, for events of the default shape (the envelope,
    /// without transaction metadata): what `verify` reads.
    pub fn event_options(&self) -> EventOptions {
        EventOptions {
            decimal: self.decimal,
            binary: self.binary,
            ..EventOptions::default()
        }
    }
}

/// `--outbox`: tables whose inserted rows are the application's events, not row changes.
#[derive(Debug, Clone, Args)]
pub struct OutboxArgs {
    /// An outbox table, as schema.table (repeatable; comma-separated in the variable): each
    /// row inserted into it is published as one event to `--outbox-topic`, keyed by its
    /// aggregateid, with its payload as the value and its id and type in headers; deletes
    /// and updates of it publish nothing, and it is not snapshotted (Debezium's outbox
    /// column names; README: Outbox). `verify` does not compare outbox tables.
    #[arg(
        id = "outbox",
        long = "outbox",
        env = "PGCDC_OUTBOX",
        value_name = "SCHEMA.TABLE",
        value_delimiter = ','
    )]
    pub tables: Vec<TableName>,
}

/// `--json`: the report as one JSON object.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Print one JSON object instead of text.
    #[arg(long, env = "PGCDC_JSON")]
    pub json: bool,
}

/// `pgcdc run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pg: PgArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

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

    #[command(flatten)]
    pub publication: PublicationArgs,

    /// When to snapshot the tables before streaming.
    #[arg(long, env = "PGCDC_SNAPSHOT", value_enum, default_value = "initial")]
    pub snapshot: SnapshotMode,

    /// Take the snapshot, publish it, and exit 0 (uses a temporary slot; nothing is left behind).
    /// A bulk export: the Kafka producer batches longer by default (linger.ms=25).
    #[arg(long, env = "PGCDC_SNAPSHOT_ONLY")]
    pub snapshot_only: bool,

    /// Connections that read the snapshot at once, each on a thread of its own. Tables are
    /// read concurrently and big ones cut into page ranges (PostgreSQL 14+); all connections
    /// import the same exported snapshot, so the events are the same as with 1, in another
    /// order. Each worker is one more connection and one more busy backend on the server.
    #[arg(
        long,
        env = "PGCDC_SNAPSHOT_WORKERS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=64),
        value_name = "N"
    )]
    pub snapshot_workers: u16,

    /// The COPY format the snapshot reads tables with. `auto`: binary for tables whose
    /// columns are all of common built-in types (booleans, integers, numeric, text types,
    /// json/jsonb, date, timestamp[tz], uuid, bytea) — less work for PostgreSQL; pgcdc turns
    /// the values into the exact text the server would print, so events are the same —
    /// and text for the others. `text`: text for every table.
    #[arg(long, env = "PGCDC_SNAPSHOT_COPY", value_enum, default_value = "auto")]
    pub snapshot_copy: SnapshotCopy,

    /// After the last row of each table's snapshot, publish a snapshot marker (op "s", null
    /// key) to every partition of the table's topic, so consumers know the snapshot of the
    /// table is complete and can drop rows it no longer holds (deleted while no slot recorded
    /// deletes).
    #[arg(long, env = "PGCDC_SNAPSHOT_MARKERS", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub snapshot_markers: bool,

    /// Exit 0 once everything committed up to this LSN (e.g. 16/B374D848) is published and
    /// confirmed; nothing committed after it is published. `now` means the server's WAL
    /// position at start.
    #[arg(long, env = "PGCDC_STOP_LSN", value_name = "LSN|now")]
    pub stop_lsn: Option<StopLsn>,

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

    #[command(flatten)]
    pub progress_file: ProgressFileArgs,

    /// Give up when Kafka stays unreachable this long at start (default: keep retrying).
    #[arg(long, env = "PGCDC_KAFKA_TIMEOUT", value_name = "SECONDS", value_parser = parse_seconds)]
    pub kafka_timeout: Option<Duration>,

    /// How often to report the confirmed position to PostgreSQL (well under wal_sender_timeout).
    #[arg(long, env = "PGCDC_STATUS_INTERVAL", value_name = "SECONDS", default_value = "2", value_parser = parse_seconds)]
    pub status_interval: Duration,

    /// Shape of event values: the Debezium-style envelope, or the flat row plus `__op`,
    /// `__table`, `__lsn` and `__deleted`.
    #[arg(long, env = "PGCDC_FORMAT", value_enum, default_value = "envelope")]
    pub format: Format,

    #[command(flatten)]
    pub events: EventArgs,

    /// Publish TRUNCATE as an event with op "t" (no key) on each truncated table's topic.
    #[arg(long, env = "PGCDC_TRUNCATE", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub truncate: bool,

    /// Publish pg_logical_emit_message() messages to the topic `<prefix>.message`.
    #[arg(long, env = "PGCDC_MESSAGES", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub messages: bool,

    /// Prefix of the pg_logical_emit_message(true, …) messages whose JSON object is added to
    /// every later event of the same transaction (`source.annotations`, `__annotations`)
    /// rather than published as a message; empty turns annotations off.
    #[arg(long, env = "PGCDC_ANNOTATION_PREFIX", default_value = crate::source::changes::DEFAULT_ANNOTATION_PREFIX, value_name = "PREFIX")]
    pub annotation_prefix: String,

    /// Put pgcdc's Kafka headers on records: `pgcdc-event-id` on every one (the id
    /// consumers deduplicate replays by) and `pgcdc-annotations` on annotated ones. false:
    /// the values still carry positions and annotations; for brokers or consumers that
    /// handle headers poorly (outbox events keep theirs).
    #[arg(long, env = "PGCDC_EVENT_HEADERS", default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub event_headers: bool,

    /// Publish BEGIN/END events per transaction to `<prefix>.transaction` and add
    /// `transaction` {id, total_order, data_collection_order} to each event.
    #[arg(long, env = "PGCDC_TRANSACTION_METADATA")]
    pub transaction_metadata: bool,

    #[command(flatten)]
    pub outbox: OutboxArgs,

    /// The topic of outbox events: `{prefix}` is --topic-prefix, `{route}` the row's
    /// aggregatetype (a value Kafka would refuse gets `_` for other characters and a hash
    /// suffix).
    #[arg(long, env = "PGCDC_OUTBOX_TOPIC", default_value = crate::source::outbox::DEFAULT_TOPIC, value_name = "TEMPLATE")]
    pub outbox_topic: String,

    /// Another column for an outbox role, as role=column (repeatable; comma-separated in
    /// the variable). Roles and their default columns: id, aggregatetype, aggregateid, type,
    /// payload (e.g. aggregateid=order_id).
    #[arg(
        long = "outbox-column",
        env = "PGCDC_OUTBOX_COLUMNS",
        value_name = "ROLE=COLUMN",
        value_delimiter = ','
    )]
    pub outbox_columns: Vec<crate::source::outbox::ColumnChoice>,

    /// Treat the replication connection as lost when PostgreSQL sends nothing for this long
    /// while pgcdc waits for it (a silent network partition), and reconnect. PostgreSQL
    /// answers every status update, so keep it well above --status-interval; 0 turns it off.
    #[arg(long, env = "PGCDC_RECEIVE_TIMEOUT", value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub receive_timeout: Duration,

    /// Operations flags (metrics, health, progress display), listed last.
    #[command(flatten)]
    pub ops: RunOpsArgs,
}

// ---------------------------------------------------------------------------------------------
// Operations: global flags, `status`, `verify`, `drop`, and run's metrics/progress flags.
// ---------------------------------------------------------------------------------------------

/// Exit codes of every command; printed by `pgcdc --help` and documented in the README.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done (run: finished or stopped by a signal; verify: equal; status: slot healthy)
  1  verify: the table and its topic differ
  2  usage or configuration (flags, --config file, environment)
  3  PostgreSQL (connection, permissions, slot or publication problems)
  4  sink (Kafka or stdout)
  5  status: the slot needs attention (retains more WAL than --max-retained-wal, is
     invalidated or about to be, or does not exist)
  6  wait: the position was not published within --timeout (or the wait was interrupted)

Every flag can also be set in a --config file (TOML, keys named like the flags) or by its
PGCDC_* variable; a flag wins over the variable, the variable over the file.";

const STATUS_AFTER_HELP: &str = "\
Examples:
  pgcdc status --source postgres://app@db/shop --slot pgcdc --kafka localhost:9092
  pgcdc status --slot pgcdc --json --max-retained-wal 512MB

Exit codes: 0 healthy, 5 the slot needs attention (see the warnings), 2 usage, 3 PostgreSQL,
4 reading the progress record failed.";

const VERIFY_AFTER_HELP: &str = "\
Examples:
  pgcdc verify --source postgres://app@db/shop --kafka localhost:9092 --table public.orders

The table is read at the consistent point of a temporary replication slot; the topic is
compared once pgcdc's slot (--slot) has confirmed past that point, using only events that
committed before it. When no pgcdc reads the slot, verify does not wait: it looks through the
slot (--publication) for changes of the table pgcdc has not published, and compares at once if
there are none. Only the columns and rows the publication publishes of the table are compared
(its column list and row filter, PostgreSQL 15+). Give --decimal, --binary and --exclude-column
as `run` has them, so rows encode as they were published.
Exit codes: 0 equal, 1 different, 2 usage, 3 PostgreSQL (or pgcdc did not get past the point
within --wait, or a stopped pgcdc has not published a change), 4 Kafka.";

const DROP_AFTER_HELP: &str = "\
Examples:
  pgcdc drop --source postgres://app@db/shop --slot pgcdc --kafka localhost:9092 --yes

Without --yes, prints what would be removed and exits 2. Refuses while the slot is in use.
The publication (--publication) goes too unless --keep-publication. Topics and their events
are left alone. Exit codes: 0 removed, 2 usage, 3 PostgreSQL, 4 sink.";

const WAIT_AFTER_HELP: &str = "\
The application commits, takes the position of its write with
  SELECT pg_current_wal_insert_lsn();
and waits for it before it reads what pgcdc feeds (a consumer, a search index):
  pgcdc wait --lsn 16/B374D848 --url http://127.0.0.1:9187 --timeout 5s
  pgcdc wait --lsn 16/B374D848 --source postgres://app@db/shop --slot pgcdc

With --url (a running pgcdc's --metrics-addr), it long-polls that pgcdc's /wait: the answer
comes as soon as the sink acknowledges the position. Without it, it reads the slot's
confirmed_flush_lsn every 50 ms; pgcdc confirms only what the sink acknowledged, within about
100 ms, and the position counts only while a pgcdc streams the slot (during a snapshot the slot
is not read and its position says nothing about what is published). Prints the published
position on stdout.
Exit codes: 0 reached, 6 not reached within --timeout or interrupted (the message says what
may be wrong: pgcdc not running, the slot inactive or missing), 2 usage, 3 PostgreSQL.";

/// `pgcdc wait`.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// The position to wait for: `SELECT pg_current_wal_insert_lsn()` run after the commit
    /// (or the commit's own LSN), e.g. 16/B374D848.
    #[arg(long, env = "PGCDC_WAIT_LSN", value_name = "LSN")]
    pub lsn: Lsn,

    /// How long to wait at most, in seconds (`5`, `0.5`, `30s`).
    #[arg(long, env = "PGCDC_WAIT_TIMEOUT", value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub timeout: Duration,

    /// A running pgcdc's metrics address (its --metrics-addr, e.g. http://127.0.0.1:9187):
    /// ask its /wait rather than the slot.
    #[arg(long, env = "PGCDC_WAIT_URL", value_name = "URL")]
    pub url: Option<String>,

    #[command(flatten)]
    pub pg: PgArgs,
}

/// `--snapshot-copy`: the `COPY` format of the snapshot (the source's option of the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum SnapshotCopy {
    /// Binary for tables whose columns are all of types pgcdc converts exactly (booleans,
    /// integers, numeric, text types, json/jsonb, date, timestamp[tz], uuid, bytea), text for
    /// the others.
    #[default]
    Auto,
    /// Text for every table.
    Text,
}

/// Flags every command takes, listed after the command's own.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// A TOML file setting any flag of the command (keys named like the long flags, e.g.
    /// `topic-prefix = "shop"`). Flags and PGCDC_* variables override it.
    #[arg(
        long,
        global = true,
        env = "PGCDC_CONFIG",
        value_name = "PATH",
        display_order = 800
    )]
    pub config: Option<PathBuf>,

    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "PGCDC_LOG_FORMAT",
        value_enum,
        default_value = "human",
        display_order = 801
    )]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The options every event of the run is written with.
    pub fn event_options(&self) -> EventOptions {
        EventOptions {
            format: self.format,
            transaction_metadata: self.transaction_metadata,
            headers: if self.event_headers {
                EventHeaders::On
            } else {
                EventHeaders::Off
            },
            ..self.events.event_options()
        }
    }
}

/// `run`'s operations flags.
#[derive(Debug, Clone, Args)]
pub struct RunOpsArgs {
    /// Serve Prometheus metrics on http://<ADDR>/metrics, a health check on /health and
    /// read-your-writes on /wait?lsn=<LSN> (see `pgcdc wait`) (e.g. 127.0.0.1:9187; port 0
    /// picks a free port, logged at start).
    #[arg(
        long,
        env = "PGCDC_METRICS_ADDR",
        value_name = "HOST:PORT",
        display_order = 900
    )]
    pub metrics_addr: Option<String>,

    /// /health answers 503 once the confirmed position has not moved for this long while
    /// WAL is waiting, or the server has been silent this long.
    #[arg(long, env = "PGCDC_UNHEALTHY_AFTER", value_name = "SECONDS", default_value = "60", value_parser = parse_seconds, display_order = 901)]
    pub unhealthy_after: Duration,

    /// Snapshot progress display: a bar on a terminal, log lines otherwise (`auto`).
    #[arg(
        long,
        env = "PGCDC_PROGRESS",
        value_enum,
        default_value = "auto",
        display_order = 902
    )]
    pub progress: ProgressDisplay,
}

/// How snapshot progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressDisplay {
    /// A bar when stderr is a terminal, else log lines.
    Auto,
    /// A progress bar (drawn only when stderr is a terminal).
    Bar,
    /// Periodic log lines.
    Log,
    /// Nothing beyond the start and end of each table.
    Off,
}

/// Where PostgreSQL and pgcdc's progress are, for `status`, `verify` and `drop`.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    #[command(flatten)]
    pub pg: PgArgs,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub progress_file: ProgressFileArgs,
}

/// `pgcdc status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Warn (and exit 5) when the slot retains more WAL than this: bytes, or with a unit
    /// (kB, MB, GB, TB; powers of 1024), e.g. 512MB.
    #[arg(long, env = "PGCDC_MAX_RETAINED_WAL", value_name = "SIZE", default_value = "1GB", value_parser = parse_size)]
    pub max_retained_wal: u64,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// `pgcdc verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// The table to compare with its topic, as schema.table.
    #[arg(long, env = "PGCDC_VERIFY_TABLE", value_name = "SCHEMA.TABLE")]
    pub table: TableName,

    #[command(flatten)]
    pub publication: PublicationArgs,

    /// How long to wait for pgcdc (its --slot) to confirm past the comparison point.
    #[arg(long, env = "PGCDC_VERIFY_WAIT", value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub wait: Duration,

    /// Compare with what the topic holds now, without waiting for pgcdc (differences may
    /// then be changes pgcdc has not published yet).
    #[arg(long, env = "PGCDC_VERIFY_NO_WAIT")]
    pub no_wait: bool,

    /// How many example keys to show per kind of difference.
    #[arg(
        long,
        env = "PGCDC_VERIFY_EXAMPLES",
        value_name = "N",
        default_value_t = 5
    )]
    pub examples: usize,

    #[command(flatten)]
    pub output: OutputArgs,

    #[command(flatten)]
    pub events: EventArgs,

    #[command(flatten)]
    pub outbox: OutboxArgs,
}

/// `pgcdc drop`.
#[derive(Debug, Clone, Args)]
pub struct DropArgs {
    #[command(flatten)]
    pub conn: ConnArgs,

    #[command(flatten)]
    pub publication: PublicationArgs,

    /// Leave the publication in place (other slots may use it).
    #[arg(long, env = "PGCDC_KEEP_PUBLICATION")]
    pub keep_publication: bool,

    /// Really remove them. Deliberately not settable by a variable or the config file.
    #[arg(long)]
    pub yes: bool,
}

/// Parses `1024`, `10kB`, `512MB`, `1GB`, `2TB` (PostgreSQL's units, powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("`{s}` is not a size: write bytes or a number with kB, MB, GB or TB")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        _ => return Err(format!("`{s}` has an unknown unit: use kB, MB, GB or TB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
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
    fn events_carry_headers_unless_turned_off() {
        let run = |extra: &[&str]| {
            let mut argv = vec!["pgcdc", "run", "--source", "host=h", "--table", "public.t"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).expect("parses").command {
                Command::Run(args) => args.event_options().headers,
                _ => unreachable!(),
            }
        };
        assert_eq!(run(&[]), EventHeaders::On);
        assert_eq!(run(&["--event-headers", "false"]), EventHeaders::Off);
    }

    #[test]
    fn every_flag_has_help_and_env() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                // A confirmation must be typed: `drop --yes` has no variable on purpose.
                if matches!(arg.get_id().as_str(), "help" | "version" | "yes") {
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

    /// A flag several commands take is one definition (a flattened group): the same help,
    /// variable, default and value name wherever it appears.
    #[test]
    fn a_flag_shared_by_commands_is_the_same_everywhere() {
        let cmd = Cli::command();
        let describe = |a: &clap::Arg| {
            format!(
                "{:?} {:?} {:?} {:?} {:?} {:?} {:?}",
                a.get_help().map(|h| h.to_string()),
                a.get_long_help().map(|h| h.to_string()),
                a.get_env(),
                a.get_default_values(),
                a.get_value_names(),
                a.get_action(),
                a.get_possible_values()
                    .iter()
                    .map(|v| v.get_name().to_string())
                    .collect::<Vec<_>>(),
            )
        };
        let mut seen: std::collections::BTreeMap<String, (String, String)> = Default::default();
        let mut differ = Vec::new();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().to_string();
                let this = describe(arg);
                match seen.get(&id) {
                    Some((first, d)) if *d != this => {
                        differ.push(format!("{id}: {first} and {} differ", sub.get_name()))
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(id, (sub.get_name().to_string(), this));
                    }
                }
            }
        }
        assert!(differ.is_empty(), "{differ:#?}");
    }

    #[test]
    fn the_properties_variable_is_split_on_unescaped_semicolons() {
        // How a -X value given on the command line is taken whole: config::file's tests.
        let split = split_properties(r"a=1;b=x\;y;;c=back\\;d=C:\dir;").unwrap();
        let pairs: Vec<(&str, &str)> = split
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [("a", "1"), ("b", "x;y"), ("c", r"back\"), ("d", r"C:\dir")]
        );
        let e = split_properties("a=1;secret-4417").unwrap_err();
        assert!(e.contains("key=value") && !e.contains("secret-4417"), "{e}");
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
