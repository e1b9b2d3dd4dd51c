//! `pgcdc run`: checks, snapshot, then the stream, until stopped.
//!
//! ```text
//!  PostgreSQL ──(COPY in the exported snapshot)──┐
//!       │                                         ├─► ChangeBuilder/Encoder ─► [channel, bounded in items and bytes] ─► sink task ─► Kafka / stdout
//!       └──(START_REPLICATION, pgoutput)──────────┘                                                                          │
//!                 ▲                                                                                                             │
//!                 └────────── standby status: confirmed = last checkpoint the sink acknowledged ◄─────────────────────────────┘
//! ```
//!
//! The one rule: the LSN confirmed to PostgreSQL is always a checkpoint that the sink reported
//! after acknowledging every record before it (see [`crate::sink`]). Everything else — retries,
//! reconnects, crashes — can only cause re-publication of the unconfirmed tail, which carries
//! the same `lsn`/`commit_lsn` and is therefore detectable by consumers.
//!
//! Modules: `start` decides what a run does first (resume, snapshot some or all tables, or
//! refuse) from what it finds, `stream` holds the streaming loop and its priorities,
//! `events` what shapes the events. Failures and what recovering from them takes are the
//! model's ([`crate::model::failure`]); each error type classifies itself.

mod events;
mod observe;
mod start;
mod stream;

use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::watch;

use crate::checkpoint::{barrier, Progress, ProgressStore, SnapshotState};
use crate::cli::{RunArgs, SinkKind, StopLsn};
use crate::config;
use crate::event::Encoder;
use crate::kafka;
use crate::model::Lsn;
use crate::model::SinkSender;
use crate::signals;
use crate::sink;
use crate::source::catalog::TableName;
use crate::source::catalog::{self, TableInfo};
use crate::source::changes::{ChangeBuilder, ChangeOptions};
use crate::source::conninfo::ConnInfo;
use crate::source::replication::{ReplicationClient, ReplicationStream, SnapshotAction};
use crate::source::slot_lock::SlotLock;
use crate::source::topic::{self, topic_name};
use crate::source::{connect, session, snapshot};

use crate::model::failure::{
    Classify,
    FailureKind::{Sink as SinkFail, Source as SourceFail, Usage},
    Recovery,
};
pub use crate::model::{Failure, FailureKind};
use start::Plan;
use stream::{catch_up, start_stream, stream_changes, Bounds, Timers, Until};

/// First wait before reconnecting after the replication stream was lost; doubles per
/// failed attempt up to [`RECONNECT_MAX_DELAY`], and starts over once streaming resumed.
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(500);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);

/// First wait before starting the pipeline again after Kafka failed a delivery; doubles up to
/// [`RESTART_MAX_DELAY`], and starts over after a run that lasted [`RESTART_RESET_AFTER`].
const RESTART_FIRST_DELAY: Duration = Duration::from_secs(1);
const RESTART_MAX_DELAY: Duration = Duration::from_secs(30);
const RESTART_RESET_AFTER: Duration = Duration::from_secs(60);

/// After a stop signal, how long the pipeline may take to end by itself (the stream and the
/// snapshot end at once; a wait for the server or for Kafka is abandoned after this).
const STOP_GRACE: Duration = Duration::from_secs(1);
/// After a stop signal, how long the sink may take to have what it holds acknowledged, so
/// that it can be confirmed. What is not acknowledged by then is not confirmed, and is
/// published again by the next run.
const STOP_DRAIN: Duration = Duration::from_secs(10);

/// How long the last status update and the end of the replication stream may take.
const STREAM_GOODBYE: Duration = Duration::from_secs(5);

/// What holds for the whole process, across in-process restarts of the pipeline.
struct Process {
    /// Keeps a second pgcdc off the slot.
    lock: SlotLock,
    /// `--stop-lsn`, resolved once: `now` is the position when the process started.
    stop_lsn: Option<Lsn>,
    /// The published position that `/wait` answers with (see [`publish_while_streaming`]);
    /// `Lsn::INVALID` until the first stream starts. It only moves forward, across restarts:
    /// what one run had acknowledged stays in Kafka whatever the next one does.
    published: watch::Sender<Lsn>,
}

/// Runs `pgcdc run` until done, stopped (`stop` turns true) or failed.
///
/// A Kafka delivery failure that a restart can clear (the broker failed a record after an
/// outage, or the producer entered a fatal state), or a snapshot whose PostgreSQL connection
/// was lost or shut down, or one of whose tables was rewritten after its consistent point
/// (see [`crate::source::snapshot`]), starts the pipeline again, as a supervisor would:
/// nothing after the confirmed position was confirmed, so the new run re-publishes it from
/// the slot (or takes the unfinished snapshot again). Configuration, permission and size
/// problems end the run. The metrics endpoint, the slot's lock and `--stop-lsn` belong to the
/// process and outlive restarts.
pub async fn run(args: RunArgs, stop: watch::Receiver<bool>) -> Result<(), Failure> {
    // Once per process: a restarted pipeline keeps serving on the same address.
    let (published, published_rx) = watch::channel(Lsn::INVALID);
    observe::start_metrics(&args, published_rx, stop.clone()).await?;
    let mut process = Process {
        lock: SlotLock::new(&args.pg.slot, !args.snapshot_only),
        stop_lsn: None,
        published,
    };
    let result = supervise(&args, &stop, &mut process).await;
    process.lock.release().await;
    result
}

/// Runs the pipeline, again after failures a restart can clear (see [`run`]).
async fn supervise(
    args: &RunArgs,
    stop: &watch::Receiver<bool>,
    process: &mut Process,
) -> Result<(), Failure> {
    let mut delay = RESTART_FIRST_DELAY;
    loop {
        let started = std::time::Instant::now();
        let mut stop_rx = stop.clone();
        match run_once(args.clone(), stop.clone(), process).await {
            Err(f) if f.recovery == Recovery::Restart && !*stop.borrow() => {
                if started.elapsed() >= RESTART_RESET_AFTER {
                    delay = RESTART_FIRST_DELAY;
                }
                let error = format!("{:#}", f.error);
                if f.kind == SinkFail {
                    tracing::warn!(
                        error,
                        "Kafka failed a delivery; starting again from the last confirmed position in {delay:?}"
                    );
                } else {
                    // A lost connection, or a table rewritten under the snapshot.
                    tracing::warn!(
                        error,
                        "the snapshot cannot complete; starting again with a new snapshot in {delay:?}"
                    );
                }
                tokio::select! {
                    () = signals::requested(&mut stop_rx) => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RESTART_MAX_DELAY);
            }
            // Stopped by a signal while the pipeline failed in a way a restart would clear:
            // nothing was confirmed that should not be, so this is a stop like any other.
            Err(f) if f.recovery == Recovery::Restart => {
                tracing::info!(
                    error = format!("{:#}", f.error),
                    "stopped; the failure above is left to the next run"
                );
                return Ok(());
            }
            other => return other,
        }
    }
}

/// One run of the pipeline: checks, snapshot or resume, stream.
async fn run_once(
    args: RunArgs,
    mut stop: watch::Receiver<bool>,
    process: &mut Process,
) -> Result<(), Failure> {
    // Every connection prints values in one canonical form (see source::session).
    let conninfo = config::postgres(&args.pg)?;
    if args.sink == SinkKind::Stdout && !args.outbox.tables.is_empty() {
        let e = crate::source::outbox::OutboxSetupError::Stdout;
        return Err(Failure::new(Usage, anyhow::Error::new(e)));
    }
    if args.sink == SinkKind::Kafka && args.kafka.bootstrap.is_none() {
        return Err(Failure::new(
            Usage,
            anyhow!("--kafka <bootstrap> is required for the Kafka sink (or choose --sink stdout)"),
        ));
    }
    let producing = config::Producing {
        oversized: args.oversized,
        bulk: args.snapshot_only,
    };
    let kafka_cfg = match args.sink {
        SinkKind::Kafka => config::kafka(&args.kafka, Some(producing)),
        SinkKind::Stdout => None,
    };
    // Reaching Kafka needs nothing from PostgreSQL: both start at once (a few tens of
    // milliseconds off every start). A PostgreSQL failure is reported at once either way.
    let kafka_ready = async {
        match &kafka_cfg {
            Some(cfg) => kafka::wait_for_cluster(cfg, args.kafka_timeout)
                .await
                .or_fail(SinkFail),
            None => Ok(()),
        }
    };
    let mut watcher = stop.clone();
    let (source, ()) = tokio::select! {
        r = async { tokio::try_join!(prepare_source(&args, &conninfo, process), kafka_ready) } => r?,
        () = signals::requested(&mut watcher) => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    let Source {
        conninfo,
        client,
        server,
        tables,
        mut events,
        publication,
    } = source;
    let stop_lsn = process.stop_lsn;
    let progress_store = |kafka| {
        let file = args.progress_file.path.clone();
        let prefix = &args.kafka.topic_prefix;
        ProgressStore::new(kafka, prefix, &server.database, &args.pg.slot, file)
    };

    // The sink runs as its own task from here on; `tx` is the only way to reach it.
    let mut markers = snapshot::Markers::One;
    let (sink, store) = match kafka_cfg {
        Some(cfg) => {
            let progress_topic = ProgressStore::topic(&args.kafka.topic_prefix);
            let mut specs: Vec<kafka::TopicSpec> = tables
                .iter()
                .map(|t| kafka::TopicSpec {
                    name: topic_name(&args.kafka.topic_prefix, &t.name),
                    partitions: args.topic_partitions,
                    replication: args.topic_replication_factor,
                    compacted: false,
                })
                .collect();
            specs.extend(events::extra_topics(&args));
            specs.push(kafka::TopicSpec {
                name: progress_topic.clone(),
                partitions: 1,
                replication: args.topic_replication_factor,
                compacted: true,
            });
            let partitions = tokio::select! {
                r = kafka::ensure_topics(&cfg, &specs) => r.or_fail(SinkFail)?,
                () = signals::requested(&mut watcher) => {
                    tracing::info!("stopped while creating topics");
                    return Ok(());
                }
            };
            markers = snapshot::Markers::PerPartition(std::sync::Arc::new(partitions));
            let sink = sink::Sink::Kafka(sink::KafkaSink::new(cfg.clone()).or_fail(Usage)?);
            (sink, progress_store(Some(cfg)))
        }
        None => (
            sink::Sink::Stdout(sink::stdout::StdoutSink::new(tokio::io::stdout())),
            progress_store(None),
        ),
    };
    if !args.snapshot_markers {
        markers = snapshot::Markers::Off;
    }
    events.attach_lookup(&args, &conninfo, &store);
    let events::Events {
        encoder,
        changes,
        tables,
    } = events;
    // Bounded in items and in bytes: what waits here while the sink waits for Kafka.
    let (tx, rx) = crate::model::channel(
        crate::model::channel::CHANNEL_ITEMS,
        crate::model::channel::CHANNEL_BYTES,
    );
    let (acked_tx, acked_rx) = watch::channel(Lsn::INVALID);
    let final_acked = acked_rx.clone();
    let sink_task = tokio::spawn(sink::run(sink, rx, acked_tx));

    let mut capturing = Capture {
        args: &args,
        conninfo: &conninfo,
        client: &client,
        server: &server,
        tables: &tables,
        stop_lsn,
        encoder: &encoder,
        changes: &changes,
        store: &store,
        tx: &tx,
        acked_rx,
        published: &process.published,
        markers: &markers,
        publication: &publication,
        system_id: String::new(),
        timers: Timers::of(&args),
    };
    let outcome = until_stopped(
        capture(&mut capturing, &mut stop, &mut process.lock),
        &mut watcher,
        STOP_GRACE,
        "PostgreSQL",
    )
    .await
    .unwrap_or(Ok(None));
    drop(capturing);

    // Drain: whatever happened, let the sink finish what it has, so the final status update
    // confirms everything that was acknowledged.
    drop(tx);
    let mut sink_task = sink_task;
    let sink_result =
        match until_stopped(&mut sink_task, &mut watcher, STOP_DRAIN, "the sink").await {
            Some(r) => r,
            None => {
                // Stopping without it: what it holds was not acknowledged, so not confirmed.
                sink_task.abort();
                Ok(Ok(sink::SinkSummary::default()))
            }
        };
    let (stream, result) = match outcome {
        Ok(Some(stream)) => (Some(stream), Ok(())),
        Ok(None) => (None, Ok(())),
        Err((stream, e)) => (stream, Err(e)),
    };
    let output_closed = matches!(sink_result, Ok(Err(sink::SinkError::OutputClosed)));
    let acked = match sink_result {
        Ok(Ok(summary)) => {
            tracing::info!(?summary, "sink finished");
            None
        }
        Ok(Err(sink::SinkError::OutputClosed)) => {
            tracing::info!("output closed; stopping without confirming what was not written");
            None
        }
        Ok(Err(e)) => Some(Failure::sink(e)),
        Err(e) => Some(Failure::new(SinkFail, anyhow!("sink task failed: {e}"))),
    };
    if let Some(mut ended) = stream {
        // Everything the sink acknowledged, and nothing else, is confirmed on the way out; a
        // connection that went silent is not waited for long.
        let goodbye = async {
            let confirm = stream::confirmable(&final_acked, ended.start);
            if confirm.is_valid() {
                let _ = ended
                    .stream
                    .send_standby_status(confirm, confirm, confirm, false)
                    .await;
                tracing::info!(confirmed = %confirm, "confirmed position sent to PostgreSQL");
            }
            let _ = ended.stream.stop().await;
        };
        let _ = tokio::time::timeout(STREAM_GOODBYE, goodbye).await;
    }
    match (result, acked) {
        // The reader went away (`pgcdc run | head`): a clean end, and what failed after it
        // only failed because the sink was gone.
        (Err(e), _) if output_closed && e.kind == SinkFail => Ok(()),
        // The pipeline failed because the sink did: the sink's own error says why.
        (Err(e), Some(sink)) if e.kind == SinkFail => Err(sink),
        (Err(e), _) => Err(e),
        (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => Ok(()),
    }
}

/// Awaits `work`; after a stop signal, only for `grace` more (then `None`, and `work` is
/// dropped: every wait ends on a stop signal, also those that do not watch it themselves).
async fn until_stopped<F: std::future::Future>(
    work: F,
    stop: &mut watch::Receiver<bool>,
    grace: Duration,
    what: &str,
) -> Option<F::Output> {
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return Some(r),
        () = signals::requested(stop) => {}
    }
    match tokio::time::timeout(grace, work).await {
        Ok(r) => Some(r),
        Err(_) => {
            tracing::warn!("stopping without waiting any longer for {what}");
            None
        }
    }
}

/// What the run learned from PostgreSQL before anything is captured.
struct Source {
    /// What every further connection is made with (see [`session::for_server`]).
    conninfo: ConnInfo,
    client: tokio_postgres::Client,
    server: catalog::ServerInfo,
    tables: Vec<catalog::TableInfo>,
    events: events::Events,
    /// The publication as read before the tables were.
    publication: catalog::PublicationSeen,
}

/// Connects, checks the server, takes the slot's lock (see [`crate::source::slot_lock`]),
/// checks the tables and the publication, and sets up the encoding.
async fn prepare_source(
    args: &RunArgs,
    conninfo: &ConnInfo,
    process: &mut Process,
) -> Result<Source, Failure> {
    tracing::info!(source = %conninfo.redacted(), "connecting to PostgreSQL");
    let client = connect::connect(conninfo)
        .await
        .context("cannot connect to PostgreSQL")
        .or_fail(SourceFail)?;
    let server = catalog::check_server(&client).await.or_fail(SourceFail)?;
    session::pin_idle(&client, server.version_num)
        .await
        .or_fail(SourceFail)?;
    let conninfo = session::for_server(conninfo, server.version_num);
    // Before anything is created or read: a second pgcdc for the slot stops here.
    process
        .lock
        .ensure(&conninfo)
        .await
        .map_err(Failure::source)?;
    // Named tables are checked before the publication is touched, so a missing table or
    // privilege is reported as such rather than as a failed CREATE PUBLICATION.
    if !args.tables.is_empty() {
        if let Some(outbox) = events::outbox_config(args)? {
            outbox
                .check_listed(&args.tables, &args.publication.name)
                .or_fail(Usage)?;
        }
        topic::check_distinct(&args.kafka.topic_prefix, &args.tables).or_fail(Usage)?;
        catalog::describe_tables(&client, &args.tables)
            .await
            .or_fail(SourceFail)?;
    }
    // Read before what it defines, so that a change in between shows at the snapshot's
    // consistent point (see `crate::source::snapshot`); again if pgcdc creates it.
    let mut publication = catalog::publication_state(&client, &args.publication.name)
        .await
        .or_fail(SourceFail)?;
    let names = catalog::ensure_publication(&client, &args.publication.name, &args.tables)
        .await
        .or_fail(SourceFail)?;
    if !publication.exists() {
        publication = catalog::publication_state(&client, &args.publication.name)
            .await
            .or_fail(SourceFail)?;
    }
    // One topic per table, each a name Kafka accepts (see `crate::source::topic`).
    topic::check_distinct(&args.kafka.topic_prefix, &names).or_fail(Usage)?;
    let tables = catalog::describe_published(&client, &args.publication.name, &names)
        .await
        .or_fail(SourceFail)?;
    // Outbox tables are neither snapshotted nor given a topic of their own.
    let tables = match events::outbox_config(args)? {
        Some(outbox) => {
            let named = !args.tables.is_empty();
            let (tables, outbox_tables) = outbox
                .split(tables, named, &args.publication.name)
                .or_fail(Usage)?;
            crate::source::outbox::count_rows(&client, &outbox_tables)
                .await
                .or_fail(SourceFail)?;
            tables
        }
        None => tables,
    };
    let events = events::setup(args, &client, &server.database, &tables).await?;
    if process.stop_lsn.is_none() {
        process.stop_lsn = match args.stop_lsn {
            None => None,
            Some(StopLsn::At(l)) => Some(l),
            Some(StopLsn::Now) => {
                let row = client
                    .query_one("SELECT pg_current_wal_lsn()", &[])
                    .await
                    .or_fail(SourceFail)?;
                Some(row.try_get::<_, Lsn>(0).or_fail(SourceFail)?)
            }
        };
    }
    Ok(Source {
        conninfo,
        client,
        server,
        tables,
        events,
        publication,
    })
}

/// A stream that is still open, for the final status update and a clean stop.
struct EndedStream {
    stream: ReplicationStream,
    /// Where it started: already confirmed.
    start: Lsn,
}

type CaptureResult = Result<Option<EndedStream>, (Option<EndedStream>, Failure)>;

/// What every step of [`capture`] works with.
struct Capture<'a> {
    args: &'a RunArgs,
    conninfo: &'a ConnInfo,
    client: &'a tokio_postgres::Client,
    server: &'a catalog::ServerInfo,
    /// The captured tables (without their excluded columns).
    tables: &'a [TableInfo],
    stop_lsn: Option<Lsn>,
    encoder: &'a Encoder,
    changes: &'a ChangeOptions,
    store: &'a ProgressStore,
    tx: &'a SinkSender,
    acked_rx: watch::Receiver<Lsn>,
    /// The process's published position (see [`publish_while_streaming`]).
    published: &'a watch::Sender<Lsn>,
    /// Where each table's snapshot-complete markers go (see [`snapshot::Markers`]).
    markers: &'a snapshot::Markers,
    /// The publication as read at start, which the snapshot checks.
    publication: &'a catalog::PublicationSeen,
    /// IDENTIFY_SYSTEM's system identifier, recorded in progress.
    system_id: String,
    /// The streaming loop's clocks (`--status-interval`, `--receive-timeout`).
    timers: Timers,
}

/// How a snapshot's temporary slot becomes (or does not become) the run's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotHandOver {
    /// `--snapshot-only`: nothing is kept.
    None,
    /// There is no slot: the temporary one is copied to the permanent name.
    Copy,
    /// The slot exists: it first publishes what it holds before the snapshot's consistent
    /// point, then moves there.
    CatchUp,
}

/// Where streaming starts, or `None` when the run ends before streaming (stopped, or
/// `--snapshot-only` done).
type Started = Result<Option<(ReplicationClient, Lsn)>, Failure>;

/// Decides between snapshot and resume ([`start::decide`]), runs the plan, then streams.
async fn capture(
    c: &mut Capture<'_>,
    stop: &mut watch::Receiver<bool>,
    lock: &mut SlotLock,
) -> CaptureResult {
    let no_stream = |f: Failure| (None, f);
    let mut repl = c.replication().await.map_err(no_stream)?;
    let ident = repl
        .identify_system()
        .await
        .or_fail(SourceFail)
        .map_err(no_stream)?;
    c.system_id = ident.systemid;
    let started = match start(c, repl, stop).await.map_err(no_stream)? {
        Some(s) => s,
        None => return Ok(None),
    };
    stream(c, started, stop, lock).await
}

/// What start-up finds: the run's slot and its progress record on this server.
struct Found {
    slot: Option<catalog::SlotInfo>,
    progress: Option<Progress>,
}

/// Looks at the slot and the progress record, decides ([`start::decide`]), and runs the plan
/// up to where streaming starts.
async fn start(
    c: &Capture<'_>,
    repl: ReplicationClient,
    stop: &mut watch::Receiver<bool>,
) -> Started {
    let found = look(c).await?;
    let slot = match &found.slot {
        None => start::SlotState::Missing,
        Some(s) if s.invalidated => start::SlotState::Invalidated,
        Some(s) => start::SlotState::Usable {
            confirmed_flush: s.confirmed_flush,
        },
    };
    let tables: Vec<(TableName, u32)> = c.tables.iter().map(|t| (t.name.clone(), t.oid)).collect();
    let plan = start::decide(start::Found {
        slot,
        progress: found.progress.as_ref(),
        tables: &tables,
        mode: c.args.snapshot,
        snapshot_only: c.args.snapshot_only,
    });
    tracing::debug!(?plan, ?slot, "start-up plan");
    match plan {
        Plan::Refuse(r) => Err(Failure::new(
            SourceFail,
            anyhow!(r.message(&c.args.pg.slot)),
        )),
        Plan::SnapshotOnly => snapshot(c, repl, c.tables, SlotHandOver::None, None, stop).await,
        Plan::NewSlot {
            snapshot: true,
            drop_invalidated,
        } => new_slot_with_snapshot(c, repl, &found, drop_invalidated, stop).await,
        Plan::NewSlot {
            snapshot: false, ..
        } => new_slot_without_snapshot(c, repl).await.map(Some),
        Plan::Resnapshot {
            tables,
            completed,
            why,
        } => resnapshot(c, repl, &tables, &completed, why, stop).await,
        Plan::Resume { rewrite_record } => resume(c, repl, found, rewrite_record).await,
    }
}

/// The slot (waiting a few seconds for an old walsender to let go of it after a crash) and
/// the progress record of this slot on this server.
async fn look(c: &Capture<'_>) -> Result<Found, Failure> {
    let slot_name = c.args.pg.slot.as_str();
    let mut attempts = 0;
    let slot = loop {
        match catalog::inspect_slot(c.client, slot_name, &c.server.database).await {
            Err(catalog::PreflightError::SlotActive { .. }) if attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other.or_fail(SourceFail)?,
        }
    };
    let progress = match c.args.snapshot_only {
        true => None,
        false => match c.store.load().await? {
            Some(p) if p.system_id != c.system_id || p.slot != slot_name => {
                tracing::warn!(
                    slot = slot_name,
                    "the progress record belongs to another server (system identifier {}); ignoring it",
                    p.system_id
                );
                None
            }
            other => other,
        },
    };
    Ok(Found { slot, progress })
}

/// No usable slot: a new one, with a snapshot of every table (dropping an invalidated slot
/// of the name first).
async fn new_slot_with_snapshot(
    c: &Capture<'_>,
    repl: ReplicationClient,
    found: &Found,
    drop_invalidated: bool,
    stop: &mut watch::Receiver<bool>,
) -> Started {
    if let Some(p) = &found.progress {
        tracing::warn!(
            slot = c.args.pg.slot,
            acked = %p.acked(),
            "the slot is gone; taking a new snapshot of every table (--snapshot always): changes made since the recorded position that the slot held are not published, and each table's snapshot marker tells consumers which rows remain"
        );
    }
    if drop_invalidated {
        drop_slot(c.client, &c.args.pg.slot).await?;
    }
    let completed = Some(Vec::new());
    snapshot(c, repl, c.tables, SlotHandOver::Copy, completed, stop).await
}

/// The slot exists: `tables` are snapshotted over it (see [`SlotHandOver::CatchUp`]); the
/// `completed` ones stay recorded as complete.
async fn resnapshot(
    c: &Capture<'_>,
    repl: ReplicationClient,
    tables: &[TableName],
    completed: &[TableName],
    why: start::Why,
    stop: &mut watch::Receiver<bool>,
) -> Started {
    let slot = c.args.pg.slot.as_str();
    match why {
        start::Why::Requested => tracing::info!(slot, "--snapshot always: publishing the slot's changes up to a new snapshot, then moving it to the snapshot's position"),
        start::Why::NoRecord => tracing::warn!(slot, "slot exists but no snapshot is recorded for it: publishing its changes up to a new snapshot, then moving it to the snapshot's position"),
        start::Why::NotRecorded => tracing::info!(slot, tables = ?tables.iter().map(ToString::to_string).collect::<Vec<_>>(), "tables without a completed snapshot (new to the capture, or unfinished): publishing the slot's changes up to a new snapshot of them, then moving the slot to the snapshot's position"),
    }
    let subset: Vec<TableInfo> = c
        .tables
        .iter()
        .filter(|t| tables.contains(&t.name))
        .cloned()
        .collect();
    let completed = completed.iter().map(ToString::to_string).collect();
    snapshot(
        c,
        repl,
        &subset,
        SlotHandOver::CatchUp,
        Some(completed),
        stop,
    )
    .await
}

/// Streams from the slot's confirmed position; first writes the record again without the
/// tables no longer captured when `rewrite_record`.
async fn resume(
    c: &Capture<'_>,
    repl: ReplicationClient,
    found: Found,
    rewrite_record: bool,
) -> Started {
    let Some(slot) = found.slot else {
        return Err(Failure::new(
            SourceFail,
            anyhow!("internal: resume planned without a slot"),
        ));
    };
    if let (true, Some(p)) = (rewrite_record, &found.progress) {
        let rows = match &p.snapshot {
            SnapshotState::Completed { rows, .. } => *rows,
            _ => 0,
        };
        let state = SnapshotState::Completed {
            tables: c.table_names(c.tables),
            rows,
        };
        c.store
            .save(&c.record(state, Lsn(p.slot_lsn)), c.tx)
            .await?;
        tracing::info!(
            slot = c.args.pg.slot,
            "progress record updated to the captured tables"
        );
    }
    tracing::info!(slot = c.args.pg.slot, confirmed_flush = %slot.confirmed_flush, "resuming from the slot");
    Ok(Some((repl, slot.confirmed_flush)))
}

impl Capture<'_> {
    /// A progress record for this slot.
    fn record(&self, snapshot: SnapshotState, slot_lsn: Lsn) -> Progress {
        Progress {
            version: Progress::VERSION,
            system_id: self.system_id.clone(),
            database: self.server.database.clone(),
            slot: self.args.pg.slot.clone(),
            // Once a snapshot is acknowledged, everything up to the slot's point is published.
            acked_lsn: match snapshot {
                SnapshotState::InProgress { .. } => 0,
                _ => slot_lsn.0,
            },
            snapshot,
            slot_lsn: slot_lsn.0,
            updated_ms: crate::model::now_ms(),
            table_oids: self
                .tables
                .iter()
                .map(|t| (t.name.to_string(), t.oid))
                .collect(),
        }
    }

    fn table_names(&self, tables: &[TableInfo]) -> Vec<String> {
        tables.iter().map(|t| t.name.to_string()).collect()
    }

    async fn replication(&self) -> Result<ReplicationClient, Failure> {
        ReplicationClient::connect(self.conninfo)
            .await
            .context("cannot open a replication connection")
            .or_fail(SourceFail)
    }

    /// What turns the stream's messages into events, as every streaming session needs it.
    fn change_builder(&self) -> ChangeBuilder {
        ChangeBuilder::new(
            self.encoder.clone(),
            &self.args.kafka.topic_prefix,
            self.tables,
            self.args.tombstones,
        )
        .with_options(self.changes.clone())
    }
}

/// Takes a snapshot of `tables` through a temporary slot with an exported snapshot, whose
/// consistent point C is where streaming starts (see `hand_over` for what happens to the
/// run's slot). `completed`: tables recorded as snapshotted before, which stay so (`None`
/// for `--snapshot-only`, which records nothing).
async fn snapshot(
    c: &Capture<'_>,
    mut repl: ReplicationClient,
    tables: &[TableInfo],
    hand_over: SlotHandOver,
    completed: Option<Vec<String>>,
    stop: &mut watch::Receiver<bool>,
) -> Started {
    let slot_name = c.args.pg.slot.as_str();
    let temp_name = format!("pgcdc_{}_{}", std::process::id(), crate::model::now_ms());
    let created = repl
        .create_logical_slot(&temp_name, "pgoutput", SnapshotAction::Export, true)
        .await
        .context("cannot create the replication slot")
        .or_fail(SourceFail)?;
    let snapshot_name = created.snapshot_name.clone().ok_or_else(|| {
        Failure::new(
            SourceFail,
            anyhow!("the server created the slot but exported no snapshot"),
        )
    })?;
    let at = created.consistent_point;
    tracing::info!(consistent_point = %at, snapshot = %snapshot_name, "snapshot exported");
    // The run's slot exists at every moment from here on, so a crash at any point leaves a
    // slot that covers everything not yet published.
    match hand_over {
        SlotHandOver::None => {}
        SlotHandOver::CatchUp => {
            let caught_up = catch_up(c, at, stop).await?;
            if !caught_up {
                return Ok(None);
            }
            advance_slot(c.client, slot_name, at).await?;
        }
        SlotHandOver::Copy => {
            c.client
                .query_one(
                    "SELECT pg_copy_logical_replication_slot($1, $2, false)::text",
                    &[&temp_name, &slot_name],
                )
                .await
                .context("cannot copy the new slot to its permanent name")
                .or_fail(SourceFail)?;
        }
    }
    let completed_before = completed.clone().unwrap_or_default();
    if completed.is_some() {
        let record = c.record(
            SnapshotState::InProgress {
                tables: c.table_names(tables),
                completed: completed_before.clone(),
            },
            at,
        );
        c.store.save(&record, c.tx).await?;
    }
    // The replication connection stays open and idle: that keeps the snapshot importable.
    let display =
        observe::snapshot_display(c.args, crate::logging::format(), c.client, tables).await;
    let stats = snapshot::run(
        c.client,
        &snapshot_name,
        at,
        tables,
        &c.args.kafka.topic_prefix,
        c.encoder,
        c.tx,
        stop,
        snapshot::SnapshotOptions {
            workers: usize::from(c.args.snapshot_workers),
            conninfo: c.conninfo,
            copy: match c.args.snapshot_copy {
                crate::cli::SnapshotCopy::Auto => snapshot::SnapshotCopy::Auto,
                crate::cli::SnapshotCopy::Text => snapshot::SnapshotCopy::Text,
            },
            markers: c.markers,
            publication: Some(c.publication),
        },
    )
    .await;
    display.finish().await;
    let stats = match stats {
        Ok(s) => s,
        Err(snapshot::SnapshotError::SinkClosed) => return Err(crate::model::failure::sink_gone()),
        Err(snapshot::SnapshotError::Interrupted) => {
            tracing::info!("stopped during the snapshot; the next run takes it again");
            return Ok(None);
        }
        Err(e) => return Err(Failure::source(e)),
    };
    barrier(c.tx).await?;
    tracing::info!(rows = stats.rows, "snapshot published and acknowledged");
    // Closing the connection drops the temporary slot.
    let _ = repl.close().await;
    if completed.is_none() {
        return Ok(None);
    }
    // Every captured table is now complete: those read now and those recorded before.
    let record = c.record(
        SnapshotState::Completed {
            tables: c.table_names(c.tables),
            rows: stats.rows,
        },
        at,
    );
    c.store.save(&record, c.tx).await?;
    Ok(Some((c.replication().await?, at)))
}

/// `--snapshot never` without a slot: creates it; streaming starts at its consistent point.
async fn new_slot_without_snapshot(
    c: &Capture<'_>,
    mut repl: ReplicationClient,
) -> Result<(ReplicationClient, Lsn), Failure> {
    let slot_name = c.args.pg.slot.as_str();
    let created = repl
        .create_logical_slot(slot_name, "pgoutput", SnapshotAction::NoExport, false)
        .await
        .context("cannot create the replication slot")
        .or_fail(SourceFail)?;
    let record = c.record(SnapshotState::Skipped, created.consistent_point);
    c.store.save(&record, c.tx).await?;
    tracing::info!(slot = slot_name, consistent_point = %created.consistent_point, "slot created without snapshot (--snapshot never)");
    Ok((repl, created.consistent_point))
}

/// Drops an invalidated slot, so a new one of that name can be created.
async fn drop_slot(client: &tokio_postgres::Client, slot: &str) -> Result<(), Failure> {
    tracing::warn!(slot, "dropping the invalidated slot (--snapshot always)");
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .with_context(|| format!("cannot drop the invalidated slot `{slot}`"))
        .or_fail(SourceFail)?;
    Ok(())
}

/// Streams from `start`; a transient failure (restart, dropped connection, slot still held
/// by the old walsender) reconnects with backoff and resumes after the last acknowledged
/// position.
async fn stream(
    c: &Capture<'_>,
    (repl, start): (ReplicationClient, Lsn),
    stop: &mut watch::Receiver<bool>,
    lock: &mut SlotLock,
) -> CaptureResult {
    let args = c.args;
    let slot_name = args.pg.slot.as_str();
    let mut repl = Some(repl);
    let mut start = start;
    let mut backoff = RECONNECT_FIRST_DELAY;
    loop {
        let attempt = async {
            // The slot's lock went with its connection if that was lost too.
            lock.ensure(c.conninfo).await.map_err(Failure::source)?;
            let client = match repl.take() {
                Some(r) => r,
                None => ReplicationClient::connect(c.conninfo)
                    .await
                    .map_err(Failure::source)?,
            };
            let stream = start_stream(&args.publication.name, client, slot_name, start).await?;
            tracing::info!(slot = slot_name, from = %start, "streaming changes");
            observe::register_tables(&args.kafka.topic_prefix, c.tables);
            Ok::<_, Failure>(stream)
        };
        let outcome = match attempt.await {
            Ok(stream) => {
                // Streaming again: the outage is over, the next one starts with a short wait.
                backoff = RECONNECT_FIRST_DELAY;
                let streaming = stream_changes(
                    stream,
                    c.change_builder(),
                    c.tx,
                    c.acked_rx.clone(),
                    stop,
                    Bounds {
                        start,
                        until: Until::StopLsn(c.stop_lsn),
                        timers: c.timers,
                    },
                );
                tokio::select! {
                    r = streaming => r.map(|(stream, _)| stream),
                    never = publish_while_streaming(c.acked_rx.clone(), start, c.published) => match never {},
                }
            }
            Err(f) => Err((None, f)),
        };
        match outcome {
            Ok(stream) => return Ok(Some(EndedStream { stream, start })),
            Err((_, f)) if f.recovery == Recovery::Reconnect => {
                crate::metrics::global().reconnecting();
                tracing::warn!(
                    error = format!("{:#}", f.error),
                    "lost the replication stream; reconnecting in {backoff:?}"
                );
                tokio::select! {
                    () = signals::requested(stop) => return Ok(None),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_MAX_DELAY);
                // Resume after what the sink acknowledged; the server skips what it confirmed.
                let acked = *c.acked_rx.borrow();
                if acked > start {
                    start = acked;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Moves the process's published position (what `/wait` answers with, see
/// [`crate::metrics::wait`]) along with the sink's acknowledgements while a stream runs from
/// `start`; never returns (it is dropped with the stream).
///
/// Only here, not during the snapshot or the catch-up before one: there the acknowledged
/// positions are the slot's, but rows of the tables being snapshotted are published only when
/// the snapshot is acknowledged, so a wait on a write to one of them would be answered too
/// early. A stream's `start` is a position whose every change is acknowledged — the slot's
/// confirmed position, the snapshot's consistent point once the snapshot is acknowledged, or
/// what the sink acknowledged before a reconnect — and from there the sink reports only
/// checkpoints whose every earlier record is acknowledged: at a commit's end, and at a
/// keepalive's WAL end between transactions, which carries the position past a commit when
/// nothing follows it (see [`stream::stream_changes`]).
async fn publish_while_streaming(
    mut acked_rx: watch::Receiver<Lsn>,
    start: Lsn,
    published: &watch::Sender<Lsn>,
) -> std::convert::Infallible {
    loop {
        let now = stream::confirmable(&acked_rx, start);
        published.send_if_modified(|p| {
            let moved = now > *p;
            if moved {
                *p = now;
            }
            moved
        });
        if acked_rx.changed().await.is_err() {
            // The sink ended: nothing more is acknowledged by this pipeline.
            return std::future::pending().await;
        }
    }
}

/// Moves a slot (whose walsender may take a moment to exit) forward to `to`.
async fn advance_slot(client: &tokio_postgres::Client, slot: &str, to: Lsn) -> Result<(), Failure> {
    let mut attempts = 0;
    loop {
        match client
            .execute("SELECT pg_replication_slot_advance($1, $2)", &[&slot, &to])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e)
                if attempts < 40
                    && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("cannot move the slot `{slot}` to {to}"))
                    .or_fail(SourceFail)
            }
        }
    }
}
