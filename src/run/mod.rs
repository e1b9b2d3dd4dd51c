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
//! Modules: `stream` holds the streaming loop and its priorities, `progress` the durable
//! snapshot state, `failure` the exit codes, `events` what shapes the events.

mod events;
mod failure;
mod observe;
mod progress;
mod stream;

use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::watch;

use crate::checkpoint::{FileStore, Progress, SnapshotState};
use crate::cli::{Oversized, RunArgs, SinkKind, SnapshotMode, StopLsn};
use crate::config::conninfo::ConnInfo;
use crate::event::Encoder;
use crate::sink::{self, kafka, SinkSender};
use crate::source::catalog::{self, TableInfo};
use crate::source::changes::{topic_name, ChangeBuilder, ChangeOptions};
use crate::source::replication::{ReplicationClient, ReplicationStream, SnapshotAction};
use crate::source::{connect, session, snapshot, Lsn};

use failure::{
    Classify,
    FailureKind::{Sink as SinkFail, Source as SourceFail, Usage},
};
pub use failure::{Failure, FailureKind};
use progress::{barrier, ProgressStore};
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

/// Runs `pgcdc run` until done, stopped (`stop` turns true) or failed.
///
/// A Kafka delivery failure that a restart can clear (the broker failed a record after an
/// outage, or the producer entered a fatal state), or a snapshot whose PostgreSQL connection
/// was lost or shut down, starts the pipeline again, as a supervisor would: nothing after the
/// confirmed position was confirmed, so the new run re-publishes it from the slot (or takes
/// the unfinished snapshot again). Configuration, permission and size problems end the run.
pub async fn run(args: RunArgs, stop: watch::Receiver<bool>) -> Result<(), Failure> {
    let mut delay = RESTART_FIRST_DELAY;
    loop {
        let started = std::time::Instant::now();
        let mut stop_rx = stop.clone();
        match run_once(args.clone(), stop.clone()).await {
            Err(f) if f.restart && !*stop.borrow() => {
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
                    tracing::warn!(
                        error,
                        "lost PostgreSQL during the snapshot; starting again with a new snapshot in {delay:?}"
                    );
                }
                tokio::select! {
                    _ = stop_rx.wait_for(|s| *s) => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RESTART_MAX_DELAY);
            }
            other => return other,
        }
    }
}

/// One run of the pipeline: checks, snapshot or resume, stream.
async fn run_once(args: RunArgs, mut stop: watch::Receiver<bool>) -> Result<(), Failure> {
    let conninfo = ConnInfo::parse(&args.source)
        .context("invalid --source")
        .or_fail(Usage)?;
    // Both connections print values in one canonical form (see source::session).
    let conninfo = session::canonical(&conninfo);
    if args.sink == SinkKind::Kafka && args.kafka.is_none() {
        return Err(Failure::new(
            Usage,
            anyhow!("--kafka <bootstrap> is required for the Kafka sink (or choose --sink stdout)"),
        ));
    }
    observe::start_metrics(&args).await?;
    let kafka_cfg = (args.sink == SinkKind::Kafka).then(|| kafka::KafkaConfig {
        bootstrap: args.kafka.clone().unwrap_or_default(),
        properties: args
            .kafka_properties
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
        max_in_flight: 100_000,
        oversized: match args.oversized {
            Oversized::Fail => kafka::Oversized::Fail,
            Oversized::Skip => kafka::Oversized::Skip,
        },
        bulk: args.snapshot_only,
    });
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
    let (source, ()) = tokio::try_join!(prepare_source(&args, &conninfo), kafka_ready)?;
    let Source {
        client,
        server,
        tables,
        mut events,
        stop_lsn,
    } = source;
    let progress_key = Progress::key(&server.database, &args.slot);

    // The sink runs as its own task from here on; `tx` is the only way to reach it.
    let (sink, store) = match kafka_cfg {
        Some(cfg) => {
            let progress_topic = format!("{}._progress", args.topic_prefix);
            let mut specs: Vec<kafka::TopicSpec> = tables
                .iter()
                .map(|t| kafka::TopicSpec {
                    name: topic_name(&args.topic_prefix, &t.name),
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
            kafka::ensure_topics(&cfg, &specs).await.or_fail(SinkFail)?;
            let sink = sink::Sink::Kafka(kafka::KafkaSink::new(cfg.clone()).or_fail(Usage)?);
            let store = ProgressStore::Kafka {
                cfg,
                topic: progress_topic,
                key: progress_key,
            };
            (sink, store)
        }
        None => {
            let path = args
                .progress_file
                .clone()
                .unwrap_or_else(|| FileStore::default_path(&server.database, &args.slot));
            (
                sink::Sink::Stdout(sink::stdout::StdoutSink::new(tokio::io::stdout())),
                ProgressStore::File(FileStore { path }),
            )
        }
    };
    events.attach_lookup(&args, &conninfo, &store);
    let events::Events {
        encoder,
        changes,
        tables,
    } = events;
    // Bounded in items and in bytes: what waits here while the sink waits for Kafka.
    let (tx, rx) = sink::channel(sink::channel::CHANNEL_ITEMS, sink::channel::CHANNEL_BYTES);
    let (acked_tx, acked_rx) = watch::channel(Lsn::INVALID);
    let final_acked = acked_rx.clone();
    let sink_task = tokio::spawn(sink::run(sink, rx, acked_tx));

    let outcome = capture(
        &args, &conninfo, &client, &server, &tables, stop_lsn, &encoder, &changes, &store, &tx,
        acked_rx, &mut stop,
    )
    .await;

    // Drain: whatever happened, let the sink finish what it has, so the final status update
    // confirms everything that was acknowledged.
    drop(tx);
    let sink_result = sink_task.await;
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
        // Everything the sink acknowledged, and nothing else, is confirmed on the way out.
        let confirm = stream::confirmable(&final_acked, ended.start);
        if confirm.is_valid() {
            let _ = ended
                .stream
                .send_standby_status(confirm, confirm, confirm, false)
                .await;
            tracing::info!(confirmed = %confirm, "confirmed position sent to PostgreSQL");
        }
        let _ = ended.stream.stop().await;
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

/// What the run learned from PostgreSQL before anything is captured.
struct Source {
    client: tokio_postgres::Client,
    server: catalog::ServerInfo,
    tables: Vec<catalog::TableInfo>,
    events: events::Events,
    stop_lsn: Option<Lsn>,
}

/// Connects, checks the server, the tables and the publication, and sets up the encoding.
async fn prepare_source(args: &RunArgs, conninfo: &ConnInfo) -> Result<Source, Failure> {
    tracing::info!(source = %conninfo.redacted(), "connecting to PostgreSQL");
    let client = connect::connect(conninfo)
        .await
        .context("cannot connect to PostgreSQL")
        .or_fail(SourceFail)?;
    let server = catalog::check_server(&client).await.or_fail(SourceFail)?;
    // Named tables are checked before the publication is touched, so a missing table or
    // privilege is reported as such rather than as a failed CREATE PUBLICATION.
    if !args.tables.is_empty() {
        catalog::describe_tables(&client, &args.tables)
            .await
            .or_fail(SourceFail)?;
    }
    let names = catalog::ensure_publication(&client, &args.publication, &args.tables)
        .await
        .or_fail(SourceFail)?;
    let tables = catalog::describe_tables(&client, &names)
        .await
        .or_fail(SourceFail)?;
    let events = events::setup(args, &client, &server.database, &tables).await?;
    let stop_lsn = match args.stop_lsn {
        None => None,
        Some(StopLsn::At(l)) => Some(l),
        Some(StopLsn::Now) => {
            let row = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .or_fail(SourceFail)?;
            let lsn: String = row.get(0);
            Some(lsn.parse::<Lsn>().or_fail(SourceFail)?)
        }
    };
    Ok(Source {
        client,
        server,
        tables,
        events,
        stop_lsn,
    })
}

/// A stream that is still open, for the final status update and a clean stop.
struct EndedStream {
    stream: ReplicationStream,
    /// Where it started: already confirmed.
    start: Lsn,
}

type CaptureResult = Result<Option<EndedStream>, (Option<EndedStream>, Failure)>;

/// Decides between snapshot and resume, runs them, then streams.
#[allow(clippy::too_many_arguments)]
async fn capture(
    args: &RunArgs,
    conninfo: &ConnInfo,
    client: &tokio_postgres::Client,
    server: &catalog::ServerInfo,
    tables: &[TableInfo],
    stop_lsn: Option<Lsn>,
    encoder: &Encoder,
    changes: &ChangeOptions,
    store: &ProgressStore,
    tx: &SinkSender,
    acked_rx: watch::Receiver<Lsn>,
    stop: &mut watch::Receiver<bool>,
) -> CaptureResult {
    let no_stream = |f: Failure| (None, f);
    let mut repl = ReplicationClient::connect(conninfo)
        .await
        .context("cannot open a replication connection")
        .or_fail(SourceFail)
        .map_err(no_stream)?;
    let ident = repl
        .identify_system()
        .await
        .or_fail(SourceFail)
        .map_err(no_stream)?;
    let slot_name = args.slot.as_str();
    // After a crash, the old walsender may hold the slot for a moment: give it a few seconds.
    let mut attempts = 0;
    let existing = loop {
        match catalog::inspect_slot(client, slot_name, &server.database).await {
            Err(catalog::PreflightError::SlotActive { .. }) if attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other.or_fail(SourceFail).map_err(no_stream)?,
        }
    };
    let progress = if args.snapshot_only {
        None
    } else {
        store
            .load()
            .await
            .map_err(no_stream)?
            .filter(|p| p.system_id == ident.systemid && p.slot == slot_name)
    };
    let table_list: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    // Once the snapshot is acknowledged, everything up to the slot's point is published.
    let new_progress = |snapshot: SnapshotState, slot_lsn: Lsn| Progress {
        version: Progress::VERSION,
        system_id: ident.systemid.clone(),
        database: server.database.clone(),
        slot: slot_name.to_string(),
        acked_lsn: match snapshot {
            SnapshotState::InProgress { .. } => 0,
            _ => slot_lsn.0,
        },
        snapshot,
        slot_lsn: slot_lsn.0,
        updated_ms: crate::event::now_ms(),
    };

    let snapshot_done = existing.is_some() && progress.as_ref().is_some_and(|p| p.snapshot_done());
    let take_snapshot = args.snapshot_only
        || match args.snapshot {
            SnapshotMode::Never => false,
            SnapshotMode::Always => true,
            SnapshotMode::Initial => !snapshot_done,
        };

    let start = if take_snapshot {
        // The snapshot comes from a temporary slot: its consistent point C is where the new
        // stream starts. An old slot is first drained up to C (so nothing committed between
        // its position and C is skipped, deletes included), then advanced to C: it then
        // yields exactly what the snapshot does not see, and it exists at every moment, so a
        // crash at any point leaves a slot that covers everything not yet published.
        // Without an old slot, the temporary one is copied to the permanent name.
        // `--snapshot-only` keeps nothing.
        let temp_name = format!("pgcdc_{}_{}", std::process::id(), crate::event::now_ms());
        let created = repl
            .create_logical_slot(&temp_name, "pgoutput", SnapshotAction::Export, true)
            .await
            .context("cannot create the replication slot")
            .or_fail(SourceFail)
            .map_err(no_stream)?;
        let snapshot_name = created.snapshot_name.clone().ok_or_else(|| {
            no_stream(Failure::new(
                SourceFail,
                anyhow!("the server created the slot but exported no snapshot"),
            ))
        })?;
        let at = created.consistent_point;
        tracing::info!(consistent_point = %at, snapshot = %snapshot_name, "snapshot exported");
        if !args.snapshot_only {
            if existing.is_some() {
                tracing::warn!(slot = slot_name, "slot exists but no completed snapshot is recorded for it (or --snapshot always): publishing its changes up to the new snapshot, then moving it to the snapshot's position");
                let caught_up = catch_up(
                    args, conninfo, slot_name, at, tables, encoder, changes, tx, &acked_rx, stop,
                )
                .await
                .map_err(no_stream)?;
                if !caught_up {
                    return Ok(None);
                }
                advance_slot(client, slot_name, at)
                    .await
                    .map_err(no_stream)?;
            } else {
                client
                    .query_one(
                        "SELECT pg_copy_logical_replication_slot($1, $2, false)::text",
                        &[&temp_name, &slot_name],
                    )
                    .await
                    .context("cannot copy the new slot to its permanent name")
                    .or_fail(SourceFail)
                    .map_err(no_stream)?;
            }
            store
                .save(
                    &new_progress(
                        SnapshotState::InProgress {
                            tables: table_list.clone(),
                        },
                        at,
                    ),
                    tx,
                )
                .await
                .map_err(no_stream)?;
        }
        // The replication connection stays open and idle: that keeps the snapshot importable.
        let display =
            observe::snapshot_display(args, crate::logging::format(), client, tables).await;
        let stats = snapshot::run(
            client,
            &snapshot_name,
            at,
            tables,
            &args.topic_prefix,
            encoder,
            tx,
            stop,
            snapshot::SnapshotOptions {
                workers: usize::from(args.snapshot_workers),
                conninfo,
                copy: args.snapshot_copy,
            },
        )
        .await;
        display.finish().await;
        let stats = match stats {
            Ok(s) => s,
            Err(snapshot::SnapshotError::SinkClosed) => {
                return Err(no_stream(failure::sink_gone()))
            }
            Err(snapshot::SnapshotError::Interrupted) => {
                tracing::info!("stopped during the snapshot; the next run takes it again");
                return Ok(None);
            }
            Err(e) => return Err(no_stream(Failure::snapshot(e))),
        };
        barrier(tx).await.map_err(no_stream)?;
        tracing::info!(rows = stats.rows, "snapshot published and acknowledged");
        // Closing the connection drops the temporary slot.
        let _ = repl.close().await;
        if args.snapshot_only {
            return Ok(None);
        }
        store
            .save(
                &new_progress(
                    SnapshotState::Completed {
                        tables: table_list.clone(),
                        rows: stats.rows,
                    },
                    at,
                ),
                tx,
            )
            .await
            .map_err(no_stream)?;
        repl = ReplicationClient::connect(conninfo)
            .await
            .context("cannot open a replication connection")
            .or_fail(SourceFail)
            .map_err(no_stream)?;
        at
    } else if let Some(slot) = existing {
        tracing::info!(slot = slot_name, confirmed_flush = %slot.confirmed_flush, "resuming from the slot");
        slot.confirmed_flush
    } else {
        let created = repl
            .create_logical_slot(slot_name, "pgoutput", SnapshotAction::NoExport, false)
            .await
            .context("cannot create the replication slot")
            .or_fail(SourceFail)
            .map_err(no_stream)?;
        store
            .save(
                &new_progress(SnapshotState::Skipped, created.consistent_point),
                tx,
            )
            .await
            .map_err(no_stream)?;
        tracing::info!(slot = slot_name, consistent_point = %created.consistent_point, "slot created without snapshot (--snapshot never)");
        created.consistent_point
    };

    // Stream; a transient failure (restart, dropped connection, slot still held by the old
    // walsender) reconnects with backoff and resumes after the last acknowledged position.
    let mut repl = Some(repl);
    let mut start = start;
    let mut backoff = RECONNECT_FIRST_DELAY;
    loop {
        let attempt = async {
            let client = match repl.take() {
                Some(r) => r,
                None => ReplicationClient::connect(conninfo)
                    .await
                    .map_err(Failure::replication)?,
            };
            let stream = start_stream(&args.publication, client, slot_name, start).await?;
            tracing::info!(slot = slot_name, from = %start, "streaming changes");
            observe::register_tables(&args.topic_prefix, tables);
            Ok::<_, Failure>(stream)
        };
        let outcome = match attempt.await {
            Ok(stream) => {
                // Streaming again: the outage is over, the next one starts with a short wait.
                backoff = RECONNECT_FIRST_DELAY;
                let builder = ChangeBuilder::new(
                    encoder.clone(),
                    &args.topic_prefix,
                    tables,
                    args.tombstones,
                )
                .with_options(changes.clone());
                stream_changes(
                    stream,
                    builder,
                    tx,
                    acked_rx.clone(),
                    stop,
                    Bounds {
                        start,
                        until: Until::StopLsn(stop_lsn),
                        timers: Timers::of(args),
                    },
                )
                .await
                .map(|(stream, _)| stream)
            }
            Err(f) => Err((None, f)),
        };
        match outcome {
            Ok(stream) => return Ok(Some(EndedStream { stream, start })),
            Err((_, f)) if f.transient => {
                crate::metrics::global().reconnecting();
                tracing::warn!(
                    error = format!("{:#}", f.error),
                    "lost the replication stream; reconnecting in {backoff:?}"
                );
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Ok(None),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_MAX_DELAY);
                // Resume after what the sink acknowledged; the server skips what it confirmed.
                let acked = *acked_rx.borrow();
                if acked > start {
                    start = acked;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Moves a slot (whose walsender may take a moment to exit) forward to `to`.
async fn advance_slot(client: &tokio_postgres::Client, slot: &str, to: Lsn) -> Result<(), Failure> {
    let mut attempts = 0;
    loop {
        match client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&slot, &to.to_string()],
            )
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

/// What the operations commands (`crate::ops`) share with `run`: failures and exit codes.
pub(crate) mod ops_api {
    pub(crate) use super::failure::{Classify, Failure, FailureKind};
}
