//! `pgcdc run`: checks, snapshot, then the stream, until stopped.
//!
//! ```text
//!  PostgreSQL ──(COPY in the exported snapshot)──┐
//!       │                                         ├─► ChangeBuilder/Encoder ─► [bounded channel] ─► sink task ─► Kafka / stdout
//!       └──(START_REPLICATION, pgoutput)──────────┘                                                       │
//!                 ▲                                                                                          │
//!                 └────────── standby status: confirmed = last checkpoint the sink acknowledged ◄──────────┘
//! ```
//!
//! The one rule: the LSN confirmed to PostgreSQL is always a checkpoint that the sink reported
//! after acknowledging every record before it (see [`crate::sink`]). Everything else — retries,
//! reconnects, crashes — can only cause re-publication of the unconfirmed tail, which carries
//! the same `lsn`/`commit_lsn` and is therefore detectable by consumers.
//!
//! The streaming loop is one `select!` with fixed priorities: (1) a stop signal, (2) the sink's
//! acknowledgements, (3) the status timer — it fires even while the sink applies backpressure,
//! so `wal_sender_timeout` never cuts a slow but healthy stream — (4) handing queued items to
//! the sink, and only when nothing is queued, (5) reading more WAL.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::{self, FileStore, Progress, SnapshotState};
use crate::cli::{RunArgs, SinkKind, SnapshotMode, StopLsn};
use crate::config::conninfo::ConnInfo;
use crate::event::Encoder;
use crate::sink::{self, kafka, Record, SinkItem};
use crate::source::catalog::{self, quote_ident, TableInfo};
use crate::source::changes::{topic_name, ChangeBuilder};
use crate::source::pgoutput::Decoder;
use crate::source::replication::{
    ReplicationClient, ReplicationMessage, ReplicationStream, SnapshotAction,
};
use crate::source::{connect, snapshot, Lsn};

/// What kind of failure ended the run; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Bad flags or configuration (exit 2).
    Usage,
    /// PostgreSQL refused or failed (exit 3).
    Source,
    /// Kafka or stdout failed (exit 4).
    Sink,
}

impl FailureKind {
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Usage => 2,
            FailureKind::Source => 3,
            FailureKind::Sink => 4,
        }
    }
}

/// A failed run: what kind, and the error chain to print.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub error: anyhow::Error,
}

trait Classify<T> {
    fn or_fail(self, kind: FailureKind) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> Classify<T> for Result<T, E> {
    fn or_fail(self, kind: FailureKind) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            kind,
            error: e.into(),
        })
    }
}

use FailureKind::{Sink as SinkFail, Source as SourceFail, Usage};

/// Where the snapshot state is kept.
enum ProgressStore {
    Kafka {
        cfg: kafka::KafkaConfig,
        topic: String,
        key: String,
    },
    File(FileStore),
}

impl ProgressStore {
    async fn load(&self) -> Result<Option<Progress>, Failure> {
        match self {
            ProgressStore::Kafka { cfg, topic, key } => {
                let bytes = kafka::read_last_value(cfg, topic, key.as_bytes())
                    .await
                    .or_fail(SinkFail)?;
                bytes
                    .map(|b| checkpoint::decode(&format!("{key} in topic {topic}"), &b))
                    .transpose()
                    .or_fail(SinkFail)
            }
            ProgressStore::File(f) => f.load().or_fail(SinkFail),
        }
    }

    /// Durably stores `p` after everything queued before it is acknowledged.
    async fn save(&self, p: &Progress, tx: &mpsc::Sender<SinkItem>) -> Result<(), Failure> {
        if let ProgressStore::Kafka { topic, key, .. } = self {
            let record = Record {
                topic: topic.as_str().into(),
                key: Some(key.clone().into_bytes().into()),
                value: Some(checkpoint::encode(p).into()),
            };
            tx.send(SinkItem::Record(record))
                .await
                .map_err(|_| sink_gone())?;
        }
        barrier(tx).await?;
        if let ProgressStore::File(f) = self {
            f.save(p).or_fail(SinkFail)?;
        }
        Ok(())
    }
}

fn sink_gone() -> Failure {
    Failure {
        kind: SinkFail,
        error: anyhow!("the sink stopped"),
    }
}

/// Waits until everything sent so far is acknowledged.
async fn barrier(tx: &mpsc::Sender<SinkItem>) -> Result<(), Failure> {
    let (done_tx, done_rx) = oneshot::channel();
    tx.send(SinkItem::Barrier(done_tx))
        .await
        .map_err(|_| sink_gone())?;
    done_rx.await.map_err(|_| sink_gone())
}

/// Runs `pgcdc run` until done, stopped (`stop` turns true) or failed.
pub async fn run(args: RunArgs, mut stop: watch::Receiver<bool>) -> Result<(), Failure> {
    let conninfo = ConnInfo::parse(&args.source)
        .context("invalid --source")
        .or_fail(Usage)?;
    if args.sink == SinkKind::Kafka && args.kafka.is_none() {
        return Err(Failure {
            kind: Usage,
            error: anyhow!(
                "--kafka <bootstrap> is required for the Kafka sink (or choose --sink stdout)"
            ),
        });
    }
    tracing::info!(source = %conninfo.redacted(), "connecting to PostgreSQL");
    let client = connect::connect(&conninfo)
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
    let encoder = Encoder::new(&args.topic_prefix, &server.database);
    let progress_key = Progress::key(&server.database, &args.slot);

    // The sink runs as its own task from here on; `tx` is the only way to reach it.
    let (sink, store) = match args.sink {
        SinkKind::Kafka => {
            let cfg = kafka::KafkaConfig {
                bootstrap: args.kafka.clone().unwrap_or_default(),
                properties: args
                    .kafka_properties
                    .iter()
                    .map(|p| (p.key.clone(), p.value.clone()))
                    .collect(),
                max_in_flight: 100_000,
            };
            kafka::wait_for_cluster(&cfg, args.kafka_timeout)
                .await
                .or_fail(SinkFail)?;
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
        SinkKind::Stdout => {
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
    let (tx, rx) = mpsc::channel::<SinkItem>(4096);
    let (acked_tx, acked_rx) = watch::channel(Lsn::INVALID);
    let sink_task = tokio::spawn(sink::run(sink, rx, acked_tx));

    let outcome = capture(
        &args, &conninfo, &client, &server, &tables, stop_lsn, &encoder, &store, &tx, acked_rx,
        &mut stop,
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
    let acked = match &sink_result {
        Ok(Ok(summary)) => {
            tracing::info!(?summary, "sink finished");
            None
        }
        Ok(Err(sink::SinkError::OutputClosed)) => {
            tracing::info!("output closed; stopping without confirming what was not written");
            None
        }
        Ok(Err(e)) => Some(Failure {
            kind: SinkFail,
            error: anyhow!("{e}"),
        }),
        Err(e) => Some(Failure {
            kind: SinkFail,
            error: anyhow!("sink task failed: {e}"),
        }),
    };
    if let Some(mut stream) = stream {
        if let Some(final_lsn) = stream.final_lsn {
            let _ = stream
                .stream
                .send_standby_status(final_lsn, final_lsn, final_lsn, false)
                .await;
            tracing::info!(confirmed = %final_lsn, "confirmed position sent to PostgreSQL");
        }
        let _ = stream.stream.stop().await;
    }
    match (result, acked) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => Ok(()),
    }
}

/// A stream that ended in an orderly way, with the position to confirm last.
struct EndedStream {
    stream: ReplicationStream,
    final_lsn: Option<Lsn>,
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
    store: &ProgressStore,
    tx: &mpsc::Sender<SinkItem>,
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
    let new_progress = |snapshot: SnapshotState, slot_lsn: Lsn| Progress {
        version: Progress::VERSION,
        system_id: ident.systemid.clone(),
        database: server.database.clone(),
        slot: slot_name.to_string(),
        snapshot,
        slot_lsn: slot_lsn.0,
        acked_lsn: 0,
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
        let (name, temporary) = if args.snapshot_only {
            (format!("pgcdc_snapshot_{}", std::process::id()), true)
        } else {
            if existing.is_some() {
                tracing::warn!(slot = slot_name, "slot exists but no completed snapshot is recorded for it: dropping and re-creating it to take a consistent snapshot");
                repl.drop_slot(slot_name, false)
                    .await
                    .or_fail(SourceFail)
                    .map_err(no_stream)?;
            }
            (slot_name.to_string(), false)
        };
        let created = repl
            .create_logical_slot(&name, "pgoutput", SnapshotAction::Export, temporary)
            .await
            .context("cannot create the replication slot")
            .or_fail(SourceFail)
            .map_err(no_stream)?;
        let snapshot_name = created.snapshot_name.clone().ok_or_else(|| {
            no_stream(Failure {
                kind: SourceFail,
                error: anyhow!("the server created the slot but exported no snapshot"),
            })
        })?;
        tracing::info!(slot = %name, consistent_point = %created.consistent_point, snapshot = %snapshot_name, "slot created; snapshot starts");
        if !args.snapshot_only {
            store
                .save(
                    &new_progress(
                        SnapshotState::InProgress {
                            tables: table_list.clone(),
                        },
                        created.consistent_point,
                    ),
                    tx,
                )
                .await
                .map_err(no_stream)?;
        }
        // The replication connection stays open and idle: that keeps the snapshot importable.
        let stats = snapshot::run(
            client,
            &snapshot_name,
            created.consistent_point,
            tables,
            &args.topic_prefix,
            encoder,
            tx,
            stop,
        )
        .await;
        let stats = match stats {
            Ok(s) => s,
            Err(snapshot::SnapshotError::Interrupted) => {
                tracing::info!("stopped during the snapshot; the next run takes it again");
                return Ok(None);
            }
            Err(e) => {
                return Err(no_stream(Failure {
                    kind: SourceFail,
                    error: e.into(),
                }))
            }
        };
        barrier(tx).await.map_err(no_stream)?;
        tracing::info!(rows = stats.rows, "snapshot published and acknowledged");
        if args.snapshot_only {
            let _ = repl.close().await;
            return Ok(None);
        }
        store
            .save(
                &new_progress(
                    SnapshotState::Completed {
                        tables: table_list.clone(),
                        rows: stats.rows,
                    },
                    created.consistent_point,
                ),
                tx,
            )
            .await
            .map_err(no_stream)?;
        created.consistent_point
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

    let publication = quote_ident(&args.publication);
    let mut options: Vec<(&str, &str)> = vec![("publication_names", publication.as_str())];
    if repl.server_version_num() >= 140000 {
        options.push(("proto_version", "2"));
        options.push(("messages", "true"));
    } else {
        options.push(("proto_version", "1"));
    }
    let stream = repl
        .start_logical_replication(slot_name, start, &options)
        .await
        .context("cannot start replication")
        .or_fail(SourceFail)
        .map_err(no_stream)?;
    tracing::info!(slot = slot_name, from = %start, "streaming changes");
    let builder = ChangeBuilder::new(encoder.clone(), &args.topic_prefix, tables, args.tombstones);
    stream_changes(
        stream,
        builder,
        tx,
        acked_rx,
        stop,
        stop_lsn,
        args.status_interval,
    )
    .await
}

/// The streaming loop; see the module docs for its priorities.
async fn stream_changes(
    mut stream: ReplicationStream,
    mut builder: ChangeBuilder,
    tx: &mpsc::Sender<SinkItem>,
    mut acked_rx: watch::Receiver<Lsn>,
    stop: &mut watch::Receiver<bool>,
    stop_lsn: Option<Lsn>,
    status_interval: Duration,
) -> CaptureResult {
    let mut decoder = Decoder::new();
    let mut pending: VecDeque<SinkItem> = VecDeque::new();
    let mut scratch: Vec<SinkItem> = Vec::new();
    let mut queued_position = Lsn::INVALID;
    let mut tick = tokio::time::interval(status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reached = |acked: Lsn| stop_lsn.is_some_and(|s| acked.is_valid() && acked >= s);

    macro_rules! fail {
        ($kind:expr, $err:expr) => {
            return Err((
                Some(EndedStream {
                    final_lsn: Some(*acked_rx.borrow()).filter(|l| l.is_valid()),
                    stream,
                }),
                Failure {
                    kind: $kind,
                    error: $err.into(),
                },
            ))
        };
    }

    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => {
                tracing::info!("stop requested: finishing in-flight events");
                break;
            }
            changed = acked_rx.changed() => {
                if changed.is_err() {
                    // The sink ended; `run` reports why.
                    break;
                }
                let acked = *acked_rx.borrow_and_update();
                if reached(acked) {
                    tracing::info!(%acked, "reached --stop-lsn");
                    break;
                }
            }
            _ = tick.tick() => {
                let acked = *acked_rx.borrow();
                if acked.is_valid() {
                    if let Err(e) = stream.send_standby_status(acked, acked, acked, true).await {
                        fail!(SourceFail, e);
                    }
                }
            }
            permit = tx.reserve(), if !pending.is_empty() => {
                match (permit, pending.pop_front()) {
                    (Ok(permit), Some(item)) => permit.send(item),
                    _ => break,
                }
            }
            msg = stream.next_message(), if pending.is_empty() => {
                match msg {
                    Ok(Some(ReplicationMessage::XLogData { wal_start, data, .. })) => {
                        let decoded = match decoder.decode(data) {
                            Ok(m) => m,
                            Err(e) => fail!(SourceFail, anyhow::Error::new(e).context("cannot decode a pgoutput message")),
                        };
                        if let Err(e) = builder.handle(decoded, wal_start, &mut scratch) {
                            fail!(SourceFail, e);
                        }
                        pending.extend(scratch.drain(..));
                    }
                    Ok(Some(ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. })) => {
                        // Between transactions every change up to wal_end has been sent, so
                        // confirming it (once acknowledged) lets idle slots release WAL.
                        if !builder.in_transaction() && wal_end > queued_position {
                            pending.push_back(SinkItem::Checkpoint(wal_end));
                            queued_position = wal_end;
                        }
                        if reply_requested {
                            let acked = *acked_rx.borrow();
                            if acked.is_valid() {
                                if let Err(e) = stream.send_standby_status(acked, acked, acked, false).await {
                                    fail!(SourceFail, e);
                                }
                            }
                        }
                    }
                    Ok(None) => fail!(SourceFail, anyhow!("PostgreSQL ended the replication stream")),
                    Err(e) => fail!(SourceFail, e),
                }
            }
        }
    }
    tracing::info!(events = builder.events, "stream stopped");
    Ok(Some(EndedStream {
        final_lsn: None,
        stream,
    }))
}
