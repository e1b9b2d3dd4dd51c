//! `pgcdc verify`: does the topic say what the table says?
//!
//! # The comparison point
//!
//! A table and a topic can only be compared *at the same point*: the table changes while we
//! read, and the topic lags behind the table. The point used is the consistent point `C` of
//! a temporary logical slot created with an exported snapshot — the same mechanism pgcdc's
//! own snapshot rests on. PostgreSQL guarantees that this snapshot sees exactly the
//! transactions whose commit record lies before `C`. (Taking `pg_current_wal_lsn()` inside a
//! REPEATABLE READ transaction would not do: a transaction can have written its commit
//! record before that LSN and still be invisible to the snapshot, which would show up as a
//! false difference under load.)
//!
//! On the topic side, every event carries `source.commit_lsn`, the LSN of its transaction's
//! commit record (for snapshot reads, the snapshot's own consistent point). The topic's
//! state at `C` is therefore the last event per key among those with `commit_lsn < C` (reads:
//! `<= C`, as a snapshot at `C0` holds what committed before `C0`): the events
//! [`Version::visible_at`] `C`.
//!
//! Those events must all be in the topic before it is read. pgcdc confirms a position to
//! PostgreSQL only after Kafka acknowledged every event before it (see [`crate::sink`]), and
//! a transaction committing before `C` ends at or before `C` (a consistent point is a record
//! boundary). So once pgcdc's slot shows `confirmed_flush_lsn >= C`, every event we need is
//! acknowledged, and reading each partition up to its high watermark — taken after that —
//! returns all of them. Events past `C` that are read too are filtered out by `commit_lsn`.
//!
//! # A slot no pgcdc reads
//!
//! Creating the temporary slot writes WAL, so `C` always lies past what a stopped pgcdc
//! confirmed: waiting for an inactive slot (`pg_replication_slots.active` false) would be in
//! vain. Such a slot is settled at once instead. Whatever committed before its
//! `confirmed_flush_lsn` is published; what committed between it and `C` is what the slot
//! would send next, and `pg_logical_slot_peek_binary_changes` up to `C` decodes exactly that
//! without consuming it (pgoutput, protocol 1, through `--publication`, decoded by
//! [`crate::source::pgoutput`]). If no transaction committed before `C` holds an insert,
//! update, delete or truncate of the table (or of one of its partitions), every event the
//! comparison needs is already in the topic, and verify compares. Otherwise it stops at once
//! and says how to get there: start pgcdc, or `--no-wait`. The peek runs on a connection of
//! its own (an error must not end the snapshot transaction) and makes the slot active for
//! that moment; a pgcdc starting then retries, and a slot taken meanwhile is waited for as an
//! active one. An active slot is waited for, up to `--wait`.
//!
//! Per key, replays after a crash repeat older events; the event with the highest
//! [`Version`] wins — `(commit_lsn, lsn)`, a snapshot read below a streamed change at the same
//! `commit_lsn` (the crate's one ordering rule, [`crate::event::order`]) — the later offset on
//! a tie. Snapshot markers (`op` `s`, no key) carry no row and are skipped.
//!
//! # Speed
//!
//! Rows are compared by a 64-bit hash of their JSON as pgcdc encodes it — the table side is
//! encoded by the very [`Encoder`] that `run` uses, from text `COPY`, the same path as the
//! snapshot, of the same columns and rows (those `--publication` publishes: its column list
//! and row filter) — so a million rows cost one COPY, one topic scan and two hash maps of keys.
//! Only the few differing rows shown as examples are decoded and compared column by column.
//!
//! An update of a row with an unchanged TOASTed value omits that column from `after` (unless
//! REPLICA IDENTITY FULL); such keys are compared on the columns their last event carries.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::EXIT_DIFFERENT;
use crate::cli::VerifyArgs;
use crate::event::order::Version;
use crate::event::{Change, Datum, Encoder, Op, Position, SnapshotMarker, TableSchema};
use crate::kafka::{self, ConsumedRecord, KafkaConfig, ReadStop, TopicReader};
use crate::model::failure::{Classify, Failure, FailureKind};
use crate::model::Lsn;
use crate::source::catalog::{self, quote_ident, quote_literal};
use crate::source::conninfo::ConnInfo;
use crate::source::replication::{ReplicationClient, SnapshotAction};
use crate::source::topic::topic_name;
use crate::source::{copy_text, snapshot};

/// The result of a comparison; also the `--json` output.
#[derive(Debug, Serialize)]
pub struct Report {
    pub table: String,
    pub topic: String,
    /// The comparison point `C`.
    pub point: String,
    pub table_rows: u64,
    /// Keys whose last event (up to the point) is a row, not a delete.
    pub topic_keys: u64,
    pub events_read: u64,
    /// Events that committed after the point (not compared).
    pub events_after_point: u64,
    /// Records that are not pgcdc events (no `source.commit_lsn`); ignored.
    pub unreadable: u64,
    pub same: u64,
    /// Keys compared on the columns their last event carried (unchanged TOASTed values).
    pub partial: u64,
    pub missing: Kind,
    pub extra: Kind,
    pub differing: Kind,
    pub equal: bool,
    pub seconds: f64,
}

/// One kind of difference: how many, and a few keys.
#[derive(Debug, Default, Serialize)]
pub struct Kind {
    pub count: u64,
    pub examples: Vec<Example>,
}

#[derive(Debug, Serialize)]
pub struct Example {
    pub key: String,
    /// Differing columns: `column: table value ≠ topic value` (differing keys only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

impl Kind {
    fn add(&mut self, limit: usize, key: &[u8]) -> bool {
        self.count += 1;
        if self.examples.len() < limit {
            self.examples.push(Example {
                key: String::from_utf8_lossy(key).into_owned(),
                columns: Vec::new(),
            });
            true
        } else {
            false
        }
    }
}

/// The parts of an event `verify` reads.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    after: Option<&'a RawValue>,
    #[serde(borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
    source: Option<SourcePos>,
    /// Columns left out of `after` because their TOASTed value did not change.
    unchanged: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Deserialize)]
struct SourcePos {
    lsn: Option<u64>,
    commit_lsn: Option<u64>,
}

/// What the topic says about a key, at the point.
enum State {
    /// Deleted.
    Absent,
    Row {
        hash: u64,
        /// The `after` JSON, kept only when it lacks columns (see the module docs).
        partial: Option<Box<str>>,
    },
}

struct Entry {
    /// Where the event ranks among the key's events.
    pos: Version,
    state: State,
    partition: i32,
    offset: i64,
}

fn hash_bytes(b: &[u8]) -> u64 {
    // `new()` uses fixed keys: the same hash for the table and the topic side of this
    // process, which is all a comparison needs.
    let mut h = std::hash::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Runs `pgcdc verify`; returns the exit code (0 equal, 1 different).
pub async fn run(args: VerifyArgs) -> Result<u8, Failure> {
    let started = Instant::now();
    if args.outbox.tables.contains(&args.table) {
        // Its rows are events on other topics, and gone from the table once handled: there
        // is nothing a table and a topic could agree on.
        tracing::warn!(table = %args.table, "an outbox table (--outbox) is not compared: its inserted rows are published as application events, not as row changes");
        if args.output.json {
            let skipped = serde_json::json!({"table": args.table.to_string(), "outbox": true, "compared": false, "equal": true});
            println!("{skipped:#}");
        } else {
            println!("{}: an outbox table (--outbox), not compared: its rows are published as application events, not as row changes", args.table);
        }
        return Ok(0);
    }
    let Some(cfg) = super::kafka_config(&args.conn) else {
        return Err(Failure::new(
            FailureKind::Usage,
            anyhow!("--kafka <bootstrap> is required: verify reads the table's topic"),
        ));
    };
    let (info, client) = super::connect_source(&args.conn).await?;
    let mut tables = catalog::describe_tables(&client, std::slice::from_ref(&args.table))
        .await
        .or_fail(FailureKind::Source)?;
    for t in &mut tables {
        // What `run` publishes of the table: its publication's columns and rows.
        match catalog::published(&client, &args.publication.name, &t.name)
            .await
            .or_fail(FailureKind::Source)?
        {
            Some(p) => t
                .restrict(&args.publication.name, p)
                .or_fail(FailureKind::Source)?,
            None => {
                tracing::warn!(table = %t.name, publication = %args.publication.name, "the publication does not publish this table (or does not exist): comparing every column and row of it; pass the --publication that `pgcdc run` uses")
            }
        }
    }
    let exclude = crate::source::exclude::Exclusions::new(&args.events.exclude_columns);
    exclude.check(&tables).or_fail(FailureKind::Usage)?;
    let tables: Vec<catalog::TableInfo> = tables.iter().map(|t| exclude.apply(t)).collect();
    let Some(table_info) = tables.into_iter().next() else {
        return Err(Failure::new(
            FailureKind::Source,
            anyhow!("table {} not found", args.table),
        ));
    };
    if table_info.key.is_empty() {
        return Err(Failure::new(
            FailureKind::Usage,
            anyhow!(
                "{} has no primary key or replica identity index: its events have no key, so \
                 there is no \"last event per key\" to compare",
                args.table
            ),
        ));
    }
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .or_fail(FailureKind::Source)?
        .get(0);
    let topic = topic_name(&args.conn.kafka.topic_prefix, &table_info.name);
    let (schema, encoder) = row_encoding(&args, &client, &database, &table_info).await?;

    // 1. The point: a temporary slot's consistent point, and its snapshot imported here.
    let mut repl = ReplicationClient::connect(&info)
        .await
        .context("cannot open a replication connection (verify needs the REPLICATION attribute)")
        .or_fail(FailureKind::Source)?;
    let slot_name = format!(
        "pgcdc_verify_{}_{}",
        std::process::id(),
        crate::model::now_ms()
    );
    let created = repl
        .create_logical_slot(&slot_name, "pgoutput", SnapshotAction::Export, true)
        .await
        .context("cannot create a temporary replication slot (is max_replication_slots reached?)")
        .or_fail(FailureKind::Source)?;
    let point = created.consistent_point;
    let Some(snapshot_name) = created.snapshot_name else {
        return Err(Failure::new(
            FailureKind::Source,
            anyhow!("the server created the slot but exported no snapshot"),
        ));
    };
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&snapshot_name)
        ))
        .await
        .or_fail(FailureKind::Source)?;
    // Imported: the temporary slot has served its purpose.
    let _ = repl.close().await;
    tracing::info!(table = %args.table, point = %point, "comparison point fixed");

    // 2. Wait until pgcdc has published everything before the point.
    if args.no_wait {
        tracing::warn!(table = %args.table, "--no-wait: changes pgcdc has not published yet show up as differences");
    } else {
        wait_for_slot(&client, &info, &args, &table_info, point).await?;
    }

    // 3. The topic's state at the point.
    let columns = schema.columns.len();
    let topic_state = {
        let cfg = cfg.clone();
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || read_state(&cfg, &topic, point, columns))
            .await
            .map_err(|e| Failure::new(FailureKind::Sink, anyhow!("topic reader failed: {e}")))??
    };
    let (mut state, counters) = topic_state;
    tracing::info!(table = %args.table, topic = %topic, events = counters.read, keys = state.len(), secs = started.elapsed().as_secs_f64(), "topic read");

    // 4. The table at the point, compared row by row.
    let mut report = Report {
        table: table_info.name.to_string(),
        topic: topic.clone(),
        point: point.to_string(),
        table_rows: 0,
        topic_keys: state
            .values()
            .filter(|e| matches!(e.state, State::Row { .. }))
            .count() as u64,
        events_read: counters.read,
        events_after_point: counters.after_point,
        unreadable: counters.unreadable,
        same: 0,
        partial: 0,
        missing: Kind::default(),
        extra: Kind::default(),
        differing: Kind::default(),
        equal: false,
        seconds: 0.0,
    };
    let mut to_show: Vec<(usize, String, i32, i64)> = Vec::new();
    compare_table(
        &client,
        &table_info,
        &schema,
        &encoder,
        point,
        &mut state,
        &mut report,
        args.examples,
        &mut to_show,
    )
    .await?;
    let _ = client.batch_execute("COMMIT").await;
    tracing::info!(table = %args.table, rows = report.table_rows, secs = started.elapsed().as_secs_f64(), "table compared");
    for (key, entry) in &state {
        if matches!(entry.state, State::Row { .. }) {
            report.extra.add(args.examples, key);
        }
    }
    // 5. Details for the examples of differing rows.
    for (i, table_after, partition, offset) in to_show {
        let cfg = cfg.clone();
        let t = topic.clone();
        let record =
            tokio::task::spawn_blocking(move || kafka::read_one(&cfg, &t, partition, offset))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
        let topic_after = record
            .and_then(|r| r.value)
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
            .map(|v| v["after"].clone());
        if let (Some(ex), Some(topic_after)) = (report.differing.examples.get_mut(i), topic_after) {
            ex.columns = column_diff(&table_after, &topic_after);
        }
    }
    report.equal =
        report.missing.count == 0 && report.extra.count == 0 && report.differing.count == 0;
    report.seconds = started.elapsed().as_secs_f64();

    if args.output.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Failure::new(FailureKind::Usage, anyhow!("cannot encode JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.equal { 0 } else { EXIT_DIFFERENT })
}

/// The table's schema and the encoder, built exactly as `run` builds them, so a row read
/// here encodes to the bytes `run` published for it: from the same event flags (`EventArgs`),
/// turned into options the same way (`EventArgs::event_options`). (An event option of `run`
/// that changes a row's JSON belongs there.)
async fn row_encoding(
    args: &VerifyArgs,
    client: &tokio_postgres::Client,
    database: &str,
    info: &catalog::TableInfo,
) -> Result<(Arc<TableSchema>, Encoder), Failure> {
    let options = args.events.event_options();
    let mut types = options.types();
    crate::source::schema::load_types(client, &mut types, info.columns.iter().map(|(_, oid)| *oid))
        .await
        .or_fail(FailureKind::Source)?;
    let prefix = &args.conn.kafka.topic_prefix;
    let schema = snapshot::table_schema(prefix, info, &types);
    Ok((
        schema,
        Encoder::with_options(prefix, database, options, types),
    ))
}

/// The row as `run` publishes a snapshot read of it (the caller takes `after` from it).
fn encode_read(
    encoder: &Encoder,
    table: &TableSchema,
    row: &[Datum<'_>],
    position: Position,
) -> bytes::Bytes {
    let change = Change {
        op: Op::Read,
        before: None,
        after: Some(row),
        position,
        transaction: None,
        annotations: None,
    };
    encoder.value(table, &change, 0)
}

/// Polls pgcdc's slot until it confirmed `point`; a slot no process reads is settled at
/// once by peeking at what it holds (see the module docs).
async fn wait_for_slot(
    client: &tokio_postgres::Client,
    info: &ConnInfo,
    args: &VerifyArgs,
    table: &catalog::TableInfo,
    point: Lsn,
) -> Result<(), Failure> {
    let slot = args.conn.pg.slot.as_str();
    let wait = args.wait;
    let deadline = Instant::now() + wait;
    loop {
        // Outside the snapshot transaction's view? pg_replication_slots is not MVCC-protected:
        // it shows the live value even inside a REPEATABLE READ transaction.
        let row = client
            .query_opt(
                "SELECT confirmed_flush_lsn, active FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .or_fail(FailureKind::Source)?;
        let Some(row) = row else {
            return Err(Failure::new(
                FailureKind::Source,
                anyhow!(
                    "replication slot `{slot}` does not exist: verify waits until pgcdc has \
                     confirmed past the comparison point through its slot. Pass the slot `run` \
                     uses with --slot, or compare what the topic holds now with --no-wait"
                ),
            ));
        };
        let confirmed: Option<Lsn> = row.try_get(0).or_fail(FailureKind::Source)?;
        let active: bool = row.get(1);
        if confirmed.is_some_and(|c| c >= point) {
            tracing::info!(slot, confirmed = %confirmed.unwrap_or_default(), "pgcdc is past the comparison point");
            return Ok(());
        }
        if !active {
            let confirmed = confirmed.unwrap_or_default();
            match unpublished_change(info, slot, &args.publication.name, table, point).await? {
                Peeked::Busy => {} // a pgcdc took the slot meanwhile: wait for it
                Peeked::Nothing => {
                    tracing::info!(
                        slot,
                        confirmed = %confirmed,
                        "no pgcdc is reading the slot, and it holds no change of the table \
                         before the comparison point: comparing"
                    );
                    return Ok(());
                }
                Peeked::Change(commit) => {
                    return Err(Failure::new(
                        FailureKind::Source,
                        anyhow!(
                            "no pgcdc is reading replication slot `{slot}`, and it holds a \
                             change of {} that pgcdc has not published (in a transaction \
                             committed at {commit}; the slot confirmed {confirmed}, the \
                             comparison point is {point}): start `pgcdc run` for this slot \
                             and verify again, or compare what the topic holds now with \
                             --no-wait",
                            table.name
                        ),
                    ));
                }
                Peeked::TooMuch(rows) => {
                    return Err(Failure::new(
                        FailureKind::Source,
                        anyhow!(
                            "no pgcdc is reading replication slot `{slot}`, and it holds \
                             {rows} or more messages pgcdc has not published before the \
                             comparison point {point} (it confirmed {confirmed}): start \
                             `pgcdc run` for this slot and verify again, or compare what the \
                             topic holds now with --no-wait"
                        ),
                    ));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Failure::new(
                FailureKind::Source,
                anyhow!(
                    "pgcdc's slot `{slot}` confirmed only {} after {}s, short of the comparison \
                     point {point}: is `pgcdc run` running? Raise --wait, or compare what the \
                     topic holds now with --no-wait",
                    confirmed.map_or("nothing".to_string(), |l| l.to_string()),
                    wait.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What an inactive slot holds before the comparison point.
#[derive(Debug, PartialEq, Eq)]
enum Peeked {
    /// No change of the table.
    Nothing,
    /// A change of the table, in a transaction committed at this LSN.
    Change(Lsn),
    /// This many messages (the limit) or more: not looked through.
    TooMuch(i64),
    /// A process took the slot meanwhile.
    Busy,
}

/// At most this many pgoutput messages are decoded by a peek (about 2 s of the server's
/// decoding here); a slot that holds more is far behind anyway.
const PEEK_LIMIT: i32 = 200_000;

/// Peeks, without consuming, at what `slot` would send up to `point` through `publication`,
/// and looks for a change of `table` (or one of its partitions) in a transaction that
/// committed before `point`.
async fn unpublished_change(
    info: &ConnInfo,
    slot: &str,
    publication: &str,
    table: &catalog::TableInfo,
    point: Lsn,
) -> Result<Peeked, Failure> {
    // Its own connection: a failed peek must not end the snapshot transaction.
    let peek = crate::source::connect::connect(info)
        .await
        .context("cannot connect to PostgreSQL to look into the slot")
        .or_fail(FailureKind::Source)?;
    let oids: HashSet<u32> = if table.partitioned {
        // Without publish_via_partition_root, changes come under the partitions' own OIDs.
        peek.query(
            "WITH RECURSIVE t(oid) AS (SELECT $1::oid UNION \
             SELECT i.inhrelid FROM pg_inherits i JOIN t ON i.inhparent = t.oid) \
             SELECT oid FROM t",
            &[&table.oid],
        )
        .await
        .or_fail(FailureKind::Source)?
        .iter()
        .map(|r| r.get::<_, u32>(0))
        .collect()
    } else {
        HashSet::from([table.oid])
    };
    // The options' value is a list of identifiers, so the name is quoted as one.
    let publications = quote_ident(publication);
    let rows = peek
        .query_raw(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2, $3, \
             'proto_version', '1', 'publication_names', $4)",
            [
                &slot as &(dyn tokio_postgres::types::ToSql + Sync),
                &point,
                &PEEK_LIMIT,
                &publications,
            ],
        )
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return peek_error(e, slot, publication),
    };
    futures_util::pin_mut!(rows);
    let mut decoder = crate::source::pgoutput::Decoder::new();
    let mut commit = Lsn::INVALID;
    let mut seen: i64 = 0;
    while let Some(row) = rows.next().await {
        let row = match row {
            Ok(row) => row,
            Err(e) => return peek_error(e, slot, publication),
        };
        seen += 1;
        let data: Vec<u8> = row.try_get(0).or_fail(FailureKind::Source)?;
        let message = decoder.decode(bytes::Bytes::from(data)).map_err(|e| {
            Failure::new(
                FailureKind::Source,
                anyhow!("cannot decode what slot `{slot}` holds: {e}"),
            )
        })?;
        use crate::source::pgoutput::LogicalMessage as M;
        let touched = match &message {
            M::Begin(b) => {
                commit = b.final_lsn;
                false
            }
            M::Insert(m) => oids.contains(&m.relation_oid),
            M::Update(m) => oids.contains(&m.relation_oid),
            M::Delete(m) => oids.contains(&m.relation_oid),
            M::Truncate(m) => m.relation_oids.iter().any(|o| oids.contains(o)),
            _ => false,
        };
        // A transaction committing at the point itself is not in the table's snapshot.
        if touched && commit < point {
            return Ok(Peeked::Change(commit));
        }
    }
    if seen >= i64::from(PEEK_LIMIT) {
        return Ok(Peeked::TooMuch(seen));
    }
    Ok(Peeked::Nothing)
}

fn peek_error(e: tokio_postgres::Error, slot: &str, publication: &str) -> Result<Peeked, Failure> {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::OBJECT_IN_USE => Ok(Peeked::Busy),
        Some(c) if *c == SqlState::UNDEFINED_OBJECT => Err(Failure::new(
            FailureKind::Source,
            anyhow!(
                "cannot look into replication slot `{slot}` through publication \
                 `{publication}`: {}. Pass the --publication and --slot that `run` uses",
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string())
            ),
        )),
        _ => Err(Failure::new(
            FailureKind::Source,
            anyhow!("cannot look into replication slot `{slot}`: {e}"),
        )),
    }
}

#[derive(Default)]
struct Counters {
    read: u64,
    after_point: u64,
    unreadable: u64,
}

type TopicState = (HashMap<Box<[u8]>, Entry>, Counters);

/// Reads the topic to its high watermarks and keeps the state of each key at `point`.
fn read_state(
    cfg: &KafkaConfig,
    topic: &str,
    point: Lsn,
    columns: usize,
) -> Result<TopicState, Failure> {
    let mut fold = Fold::new(point, columns);
    let Some(reader) = TopicReader::open_if_exists(cfg, topic, ReadStop::HighWatermark)
        .or_fail(FailureKind::Sink)?
    else {
        tracing::warn!(
            topic,
            "the topic does not exist: every row counts as missing"
        );
        return Ok(fold.finish());
    };
    for record in reader {
        fold.add(record.or_fail(FailureKind::Sink)?);
    }
    Ok(fold.finish())
}

/// Folds a topic's records, in offset order per partition, into each key's state at `point`.
struct Fold {
    point: Lsn,
    columns: usize,
    map: HashMap<Box<[u8]>, Entry>,
    /// Keys whose latest value record committed after the point: their tombstone is too.
    after: HashSet<Box<[u8]>>,
    /// The latest TRUNCATE before the point: every key's earlier state is gone.
    truncated: Option<Version>,
    n: Counters,
}

impl Fold {
    fn new(point: Lsn, columns: usize) -> Self {
        Fold {
            point,
            columns,
            map: HashMap::new(),
            after: HashSet::new(),
            truncated: None,
            n: Counters::default(),
        }
    }

    fn add(&mut self, record: ConsumedRecord) {
        let n = &mut self.n;
        let map = &mut self.map;
        let after = &mut self.after;
        let point = self.point;
        let columns = self.columns;
        n.read += 1;
        let Some(value) = record.value else {
            // A tombstone follows its delete; it only matters when compaction removed the
            // delete itself.
            let Some(key) = record.key else {
                n.unreadable += 1;
                return;
            };
            if !after.contains(key.as_slice()) {
                let pos = map
                    .get(key.as_slice())
                    .map_or(Version::new(0, 0), |e| e.pos);
                map.insert(
                    key.into_boxed_slice(),
                    Entry {
                        pos,
                        state: State::Absent,
                        partition: record.partition,
                        offset: record.offset,
                    },
                );
            }
            return;
        };
        let Ok(env) = serde_json::from_slice::<Envelope<'_>>(&value) else {
            n.unreadable += 1;
            return;
        };
        let (Some(commit_lsn), lsn) = (
            env.source.as_ref().and_then(|s| s.commit_lsn),
            env.source.as_ref().and_then(|s| s.lsn).unwrap_or(0),
        ) else {
            n.unreadable += 1;
            return;
        };
        let op = env.op.as_deref().unwrap_or("");
        if op == "s" {
            // A snapshot marker: the end of a table's snapshot, no row.
            return;
        }
        let pos = Version::of_event(op, commit_lsn, lsn);
        let included = pos.visible_at(point.0);
        if op == "t" {
            // A TRUNCATE has no key: it empties the table for every key at once.
            if included {
                self.truncated = self.truncated.max(Some(pos));
            } else {
                n.after_point += 1;
            }
            return;
        }
        let Some(key) = record.key else {
            n.unreadable += 1;
            return;
        };
        if !included {
            n.after_point += 1;
            after.insert(key.into_boxed_slice());
            return;
        }
        after.remove(key.as_slice());
        if map.get(key.as_slice()).is_some_and(|e| pos < e.pos) {
            // A replay of an older event after a restart.
            return;
        }
        let state = match (op, env.after) {
            ("d", _) | (_, None) => State::Absent,
            (op, Some(raw)) => {
                let text = raw.get();
                // Unchanged TOASTed values are left out of an update's `after` (and, in
                // newer versions, listed in `unchanged`).
                let partial = op == "u"
                    && (env.unchanged.as_ref().is_some_and(|u| !u.is_empty())
                        || count_keys(text) < columns);
                State::Row {
                    hash: hash_bytes(text.as_bytes()),
                    partial: partial.then(|| text.into()),
                }
            }
        };
        map.insert(
            key.into_boxed_slice(),
            Entry {
                pos,
                state,
                partition: record.partition,
                offset: record.offset,
            },
        );
    }

    fn finish(mut self) -> TopicState {
        if let Some(t) = self.truncated {
            for entry in self.map.values_mut() {
                if entry.pos < t {
                    entry.state = State::Absent;
                }
            }
        }
        (self.map, self.n)
    }
}

/// Top-level keys of a JSON object (0 if it is not one).
fn count_keys(text: &str) -> usize {
    serde_json::from_str::<HashMap<String, serde::de::IgnoredAny>>(text).map_or(0, |m| m.len())
}

/// COPYs the table inside the imported snapshot and settles each row against `state`,
/// removing the keys it sees (what remains afterwards is extra).
#[allow(clippy::too_many_arguments)]
async fn compare_table(
    client: &tokio_postgres::Client,
    info: &catalog::TableInfo,
    table: &Arc<TableSchema>,
    encoder: &Encoder,
    point: Lsn,
    state: &mut HashMap<Box<[u8]>, Entry>,
    report: &mut Report,
    limit: usize,
    to_show: &mut Vec<(usize, String, i32, i64)>,
) -> Result<(), Failure> {
    // Read as the snapshot reads it.
    let sql = info.copy_sql(catalog::CopyFormat::Text);
    let stream = client.copy_out(&sql).await.or_fail(FailureKind::Source)?;
    futures_util::pin_mut!(stream);
    let position = Position {
        lsn: point,
        commit_lsn: point,
        xid: None,
        commit_ts_ms: 0,
        snapshot: SnapshotMarker::True,
    };
    let mut rows = copy_text::RowBuffer::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.or_fail(FailureKind::Source)?;
        let mut fields = Vec::with_capacity(table.columns.len());
        let Some(data) = rows.complete(&chunk) else {
            continue;
        };
        for line in copy_text::lines(data) {
            copy_text::parse_row(line, table.columns.len(), &mut fields).map_err(|e| {
                Failure::new(FailureKind::Source, anyhow!("COPY of {}: {e}", info.name))
            })?;
            let row: Vec<Datum<'_>> = fields
                .iter()
                .map(|f| match f {
                    None => Datum::Null,
                    Some(v) => Datum::Text(v),
                })
                .collect();
            report.table_rows += 1;
            let Some(key) = encoder.key(table, &row) else {
                continue;
            };
            let value = encode_read(encoder, table, &row, position);
            let envelope = serde_json::from_slice::<Envelope<'_>>(&value).ok();
            let after: &str = envelope
                .as_ref()
                .and_then(|e| e.after)
                .map_or("", |r| r.get());
            match state.remove(&key[..]) {
                None
                | Some(Entry {
                    state: State::Absent,
                    ..
                }) => {
                    report.missing.add(limit, &key);
                }
                Some(Entry {
                    state: State::Row { hash, partial },
                    partition,
                    offset,
                    ..
                }) => {
                    let same = match &partial {
                        None => hash == hash_bytes(after.as_bytes()),
                        Some(topic_after) => {
                            report.partial += 1;
                            partial_equal(after, topic_after)
                        }
                    };
                    if same {
                        report.same += 1;
                    } else if report.differing.add(limit, &key) {
                        to_show.push((
                            report.differing.examples.len() - 1,
                            after.to_string(),
                            partition,
                            offset,
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Equal on every column the topic's (partial) row carries.
fn partial_equal(table_after: &str, topic_after: &str) -> bool {
    let (Ok(t), Ok(k)) = (
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(table_after),
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(topic_after),
    ) else {
        return false;
    };
    k.iter().all(|(col, v)| t.get(col) == Some(v))
}

/// `column: table <value>, topic <value>` for each differing column.
fn column_diff(table_after: &str, topic_after: &serde_json::Value) -> Vec<String> {
    let Ok(table) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(table_after)
    else {
        return Vec::new();
    };
    let empty = serde_json::Map::new();
    let topic = topic_after.as_object().unwrap_or(&empty);
    let short = |v: Option<&serde_json::Value>| -> String {
        let s = v.map_or("(absent)".to_string(), |v| v.to_string());
        if s.chars().count() > 60 {
            format!("{}…", s.chars().take(60).collect::<String>())
        } else {
            s
        }
    };
    let mut out = Vec::new();
    for (col, v) in &table {
        if topic.get(col) != Some(v) {
            out.push(format!(
                "{col}: table {}, topic {}",
                short(Some(v)),
                short(topic.get(col))
            ));
        }
    }
    for col in topic.keys().filter(|c| !table.contains_key(*c)) {
        out.push(format!(
            "{col}: table (absent), topic {}",
            short(topic.get(col))
        ));
    }
    out
}

/// The human form.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "table        {} (at {})", r.table, r.point);
    let _ = writeln!(
        o,
        "topic        {} ({} events read, {} after the point{})",
        r.topic,
        r.events_read,
        r.events_after_point,
        if r.unreadable > 0 {
            format!(
                ", {} not envelope events (verify reads the default event format)",
                r.unreadable
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "rows         {} in the table, {} keys in the topic",
        r.table_rows, r.topic_keys
    );
    let _ = writeln!(
        o,
        "same         {}{}",
        r.same,
        if r.partial > 0 {
            format!(
                " ({} compared on the columns their last event carried)",
                r.partial
            )
        } else {
            String::new()
        }
    );
    for (name, kind, what) in [
        ("missing", &r.missing, "in the table, not in the topic"),
        ("extra", &r.extra, "in the topic, not in the table"),
        ("differing", &r.differing, "in both, with other values"),
    ] {
        let _ = writeln!(o, "{name:<12} {} ({what})", kind.count);
        for ex in &kind.examples {
            let _ = writeln!(o, "    {}", ex.key);
            for c in &ex.columns {
                let _ = writeln!(o, "        {c}");
            }
        }
    }
    let _ = writeln!(
        o,
        "result       {} ({:.1}s)",
        if r.equal { "EQUAL" } else { "DIFFERENT" },
        r.seconds
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_parts() {
        let v = br#"{"before":null,"after":{"id":1,"v":"a\"b"},"source":{"lsn":5,"commit_lsn":7},"op":"u"}"#;
        let e: Envelope<'_> = serde_json::from_slice(v).unwrap();
        assert_eq!(e.after.unwrap().get(), r#"{"id":1,"v":"a\"b"}"#);
        assert_eq!(e.op.as_deref(), Some("u"));
        assert_eq!(e.source.unwrap().commit_lsn, Some(7));
        assert_eq!(count_keys(r#"{"id":1,"v":"x"}"#), 2);
    }

    fn rec(offset: i64, key: Option<&str>, value: Option<serde_json::Value>) -> ConsumedRecord {
        ConsumedRecord {
            partition: 0,
            offset,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: value.map(|v| serde_json::to_vec(&v).unwrap()),
            timestamp: None,
            headers: Vec::new(),
        }
    }

    fn ev(op: &str, after: serde_json::Value, commit_lsn: u64, lsn: u64) -> serde_json::Value {
        serde_json::json!({"before": null, "after": after, "op": op,
                           "source": {"commit_lsn": commit_lsn, "lsn": lsn}})
    }

    fn row(map: &HashMap<Box<[u8]>, Entry>, key: &str) -> Option<(u64, bool)> {
        match &map.get(key.as_bytes())?.state {
            State::Absent => None,
            State::Row { hash, partial } => Some((*hash, partial.is_some())),
        }
    }

    #[test]
    fn fold_keeps_the_state_at_the_point() {
        use serde_json::json;
        let a1 = json!({"id": 1, "v": "a"});
        let a2 = json!({"id": 1, "v": "b"});
        let mut f = Fold::new(Lsn(100), 2);
        let k1 = r#"{"id":1}"#;
        let k2 = r#"{"id":2}"#;
        f.add(rec(0, Some(k1), Some(ev("r", a1.clone(), 10, 10))));
        f.add(rec(1, Some(k1), Some(ev("u", a2.clone(), 20, 15))));
        // A replay of the read after a restart changes nothing.
        f.add(rec(2, Some(k1), Some(ev("r", a1.clone(), 10, 10))));
        // Key 2: created before the point, deleted after it (with its tombstone).
        f.add(rec(
            3,
            Some(k2),
            Some(ev("c", json!({"id": 2, "v": "x"}), 30, 30)),
        ));
        f.add(rec(4, Some(k2), Some(ev("d", json!(null), 100, 100))));
        f.add(rec(5, Some(k2), None));
        // Not pgcdc events.
        f.add(rec(6, Some(k2), Some(json!({"hello": 1}))));
        f.add(rec(7, None, Some(ev("c", a1.clone(), 1, 1))));
        let (map, n) = f.finish();
        let hash = |v: &serde_json::Value| hash_bytes(v.to_string().as_bytes());
        assert_eq!(row(&map, k1), Some((hash(&a2), false)));
        assert!(row(&map, k2).is_some(), "the delete came after the point");
        assert_eq!((n.read, n.after_point, n.unreadable), (8, 1, 2));
    }

    #[test]
    fn truncate_empties_what_came_before_it() {
        use serde_json::json;
        let mut f = Fold::new(Lsn(100), 2);
        f.add(rec(
            0,
            Some("1"),
            Some(ev("r", json!({"id": 1, "v": "a"}), 10, 10)),
        ));
        f.add(rec(
            1,
            Some("2"),
            Some(ev("r", json!({"id": 2, "v": "a"}), 10, 10)),
        ));
        f.add(rec(2, None, Some(ev("t", json!(null), 40, 40))));
        f.add(rec(
            3,
            Some("2"),
            Some(ev("c", json!({"id": 2, "v": "b"}), 50, 50)),
        ));
        // Partial update: a column left out.
        f.add(rec(4, Some("3"), Some(ev("u", json!({"id": 3}), 60, 60))));
        let (map, _) = f.finish();
        assert_eq!(row(&map, "1"), None);
        assert!(row(&map, "2").is_some());
        assert_eq!(row(&map, "3").map(|r| r.1), Some(true));
        // A truncate after the point does not count.
        let mut f = Fold::new(Lsn(100), 2);
        f.add(rec(
            0,
            Some("1"),
            Some(ev("r", json!({"id": 1, "v": "a"}), 10, 10)),
        ));
        f.add(rec(1, None, Some(ev("t", json!(null), 200, 200))));
        let (map, n) = f.finish();
        assert!(row(&map, "1").is_some());
        assert_eq!(n.after_point, 1);
    }

    #[test]
    fn a_change_committed_at_the_snapshot_point_is_newer_than_the_read() {
        use serde_json::json;
        let k = r#"{"id":1}"#;
        let read = json!({"id": 1, "v": "a"});
        let changed = json!({"id": 1, "v": "b"});
        // The snapshot at 100, then the transaction whose commit record lies at 100.
        let mut f = Fold::new(Lsn(200), 2);
        f.add(rec(0, Some(k), Some(ev("r", read.clone(), 100, 100))));
        f.add(rec(1, Some(k), Some(ev("u", changed.clone(), 100, 40))));
        // A replay of the read after a restart changes nothing.
        f.add(rec(2, Some(k), Some(ev("r", read, 100, 100))));
        let (map, _) = f.finish();
        let hash = |v: &serde_json::Value| hash_bytes(v.to_string().as_bytes());
        assert_eq!(row(&map, k), Some((hash(&changed), false)));
    }

    #[test]
    fn snapshot_markers_are_skipped() {
        use serde_json::json;
        let mut f = Fold::new(Lsn(200), 2);
        let k = r#"{"id":1}"#;
        f.add(rec(
            0,
            Some(k),
            Some(ev("r", json!({"id": 1, "v": "a"}), 100, 100)),
        ));
        let marker = json!({"before": null, "after": null, "op": "s",
                            "source": {"commit_lsn": 100, "lsn": 100, "snapshot": "true"},
                            "snapshot": {"partition": 0, "partitions": 1, "rows": 1}});
        f.add(rec(1, None, Some(marker)));
        let (map, n) = f.finish();
        assert!(row(&map, k).is_some());
        assert_eq!((n.read, n.unreadable, n.after_point), (2, 0, 0));
    }

    #[test]
    fn partial_rows_compare_on_present_columns() {
        assert!(partial_equal(
            r#"{"id":1,"big":"x","n":2}"#,
            r#"{"id":1,"n":2}"#
        ));
        assert!(!partial_equal(
            r#"{"id":1,"big":"x","n":2}"#,
            r#"{"id":1,"n":3}"#
        ));
        let d = column_diff(r#"{"id":1,"n":2}"#, &serde_json::json!({"id":1,"n":3}));
        assert_eq!(d, vec!["n: table 2, topic 3".to_string()]);
    }
}
