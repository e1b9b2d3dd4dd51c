//! The streaming loop: WAL in, sink items out, confirmed positions back to PostgreSQL.
//!
//! One `select!` with fixed priorities: (1) a stop signal, (2) the sink's acknowledgements,
//! (3) the status timer — it fires even while the sink applies backpressure, so
//! `wal_sender_timeout` never cuts a slow but healthy stream — (4) handing queued items to the
//! sink, and only when nothing is queued, (5) the receive timeout and (6) reading more WAL. At
//! most one message's items are queued here; everything else waits in the channel (bounded in
//! items and bytes, see [`crate::model::channel`]) or in PostgreSQL.
//!
//! The receive timeout exists because a connection can die silently: a partition or a
//! middlebox that forgets the connection delivers neither data nor a reset, and TCP would only
//! notice after many minutes. Every status update asks the server for a reply, so a healthy
//! connection is never silent for long while pgcdc reads; silence for `--receive-timeout`
//! counts as a lost connection and the usual reconnect follows. Time spent waiting for the
//! sink does not count.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;

use super::{Capture, EndedStream};
use crate::checkpoint::barrier;
use crate::cli::RunArgs;
use crate::model::failure::{sink_gone, Failure, FailureKind::Source as SourceFail};
use crate::model::Lsn;
use crate::model::{SinkItem, SinkSender};
use crate::source::catalog::quote_ident;
use crate::source::changes::ChangeBuilder;
use crate::source::pgoutput::{Decoder, LogicalMessage};
use crate::source::replication::{
    ReplicationClient, ReplicationError, ReplicationMessage, ReplicationStream,
};

/// START_REPLICATION with pgcdc's plugin options.
pub(super) async fn start_stream(
    publication: &str,
    repl: ReplicationClient,
    slot: &str,
    start: Lsn,
) -> Result<ReplicationStream, Failure> {
    let publication = quote_ident(publication);
    let mut options: Vec<(&str, &str)> = vec![("publication_names", publication.as_str())];
    if repl.server_version_num() >= 140000 {
        options.push(("proto_version", "2"));
        options.push(("messages", "true"));
    } else {
        options.push(("proto_version", "1"));
    }
    repl.start_logical_replication(slot, start, &options)
        .await
        .map_err(Failure::source)
}

/// Publishes what the run's slot holds before `until` (the consistent point of a new
/// snapshot). Returns false when stopped by a signal first.
pub(super) async fn catch_up(
    c: &Capture<'_>,
    until: Lsn,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, Failure> {
    let repl = c.replication().await?;
    let slot = c.args.pg.slot.as_str();
    let stream = start_stream(&c.args.publication.name, repl, slot, Lsn::INVALID).await?;
    let (mut stream, end) = stream_changes(
        stream,
        c.change_builder(),
        c.tx,
        c.acked_rx.clone(),
        stop,
        Bounds {
            start: Lsn::INVALID,
            until: Until::Before(until),
            timers: c.timers,
        },
    )
    .await
    .map_err(|(_, f)| f)?;
    if end == End::CaughtUp {
        barrier(c.tx).await?;
        let confirm = confirmable(&c.acked_rx, Lsn::INVALID);
        if confirm.is_valid() {
            let _ = stream
                .send_standby_status(confirm, confirm, confirm, false)
                .await;
        }
    }
    let _ = stream.stop().await;
    Ok(end == End::CaughtUp)
}

/// The position to report: what the sink acknowledged, but never below where this stream
/// started — that position is confirmed already, and reporting it keeps the connection alive
/// (`wal_sender_timeout`) before the first acknowledgement and never moves the slot backwards.
pub(super) fn confirmable(acked_rx: &watch::Receiver<Lsn>, start: Lsn) -> Lsn {
    (*acked_rx.borrow()).max(start)
}

/// Where a streaming session starts and ends, and its clocks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    /// The slot position the session started from (already confirmed).
    pub start: Lsn,
    pub until: Until,
    pub timers: Timers,
}

/// The streaming loop's clocks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timers {
    /// How often the confirmed position is reported (asking for a reply).
    pub status_interval: Duration,
    /// Silence from the server for this long, while reading, means the connection is lost
    /// (zero: never).
    pub receive_timeout: Duration,
}

impl Timers {
    pub(super) fn of(args: &RunArgs) -> Self {
        Timers {
            status_interval: args.status_interval,
            receive_timeout: args.receive_timeout,
        }
    }
}

/// When the streaming loop ends by itself.
#[derive(Debug, Clone, Copy)]
pub(super) enum Until {
    /// Run until stopped, or until this LSN is published and confirmed.
    StopLsn(Option<Lsn>),
    /// Publish every transaction committing before this LSN, then end.
    Before(Lsn),
}

/// How the streaming loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Stopped (signal, sink gone, or --stop-lsn reached); nothing queued is needed.
    Stopped,
    /// `--stop-lsn` reached: everything up to it is acknowledged.
    Drained,
    /// The first transaction past `until` began (at or after `Until::Before`, or committed
    /// after `--stop-lsn`): every transaction before it was handed to the sink, none of it.
    CaughtUp,
}

/// A transaction whose commit is older than this when its `Begin` arrives is part of a
/// backlog: the stream is read in batches until a recent one arrives.
const BACKLOG_AGE_MS: i64 = 200;

/// How soon an acknowledged position is confirmed to the server. The status interval only
/// paces the updates that ask for a reply: a crash (or a kill) then replays only what was in
/// flight, not up to a whole interval of acknowledged changes, and a run that dies early still
/// leaves the slot where its acknowledgements got to.
const CONFIRM_WITHIN: Duration = Duration::from_millis(100);

/// The streaming loop; see the module docs for its priorities. Returns the stream (for the
/// final status update and a clean stop) and why it ended.
pub(super) async fn stream_changes(
    mut stream: ReplicationStream,
    mut builder: ChangeBuilder,
    tx: &SinkSender,
    mut acked_rx: watch::Receiver<Lsn>,
    stop: &mut watch::Receiver<bool>,
    Bounds {
        start,
        until,
        timers,
    }: Bounds,
) -> Result<(ReplicationStream, End), (Option<EndedStream>, Failure)> {
    let mut decoder = Decoder::new();
    let mut pending: VecDeque<SinkItem> = VecDeque::new();
    let mut scratch: Vec<SinkItem> = Vec::new();
    let mut queued_position = Lsn::INVALID;
    // Whether the current transaction is part of a backlog (see BACKLOG_AGE_MS).
    let mut backlog = false;
    let mut tick = tokio::time::interval(timers.status_interval);
    // Last time the server was heard from, or pgcdc stopped waiting for the sink.
    let mut heard = tokio::time::Instant::now();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One timer for the receive timeout, moved forward only when it fires early: re-arming a
    // timer per WAL message cost more than the rest of the loop.
    let silence = tokio::time::sleep_until(heard + timers.receive_timeout);
    tokio::pin!(silence);
    // The next prompt confirmation (armed when the sink acknowledges past what was reported).
    let confirm_within = CONFIRM_WITHIN.min(timers.status_interval);
    let mut reported = start;
    let mut last_report = tokio::time::Instant::now();
    let mut confirm_armed = false;
    let confirm_soon = tokio::time::sleep_until(last_report);
    tokio::pin!(confirm_soon);
    let reached = |acked: Lsn| match until {
        Until::StopLsn(Some(s)) => acked.is_valid() && acked >= s,
        _ => false,
    };
    let before = match until {
        Until::Before(l) => Some(l),
        Until::StopLsn(_) => None,
    };
    let past_until = |final_lsn: Lsn| match until {
        Until::Before(l) => final_lsn >= l,
        Until::StopLsn(s) => s.is_some_and(|s| final_lsn > s),
    };

    macro_rules! fail {
        ($failure:expr) => {
            return Err((Some(EndedStream { stream, start }), $failure))
        };
    }

    if reached(*acked_rx.borrow()) {
        return Ok((stream, End::Drained));
    }
    let metrics = crate::metrics::global();
    metrics.set_streaming(true);
    let end = loop {
        // The bytes the next item takes from the sink channel's budget: it waits for them
        // (reading no WAL meanwhile) as it waits for room in the channel.
        let front_bytes = pending.front().map_or(0, SinkItem::buffered_bytes);
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => {
                tracing::info!("stop requested: finishing in-flight events");
                break End::Stopped;
            }
            changed = acked_rx.changed() => {
                if changed.is_err() {
                    // The sink ended; `run` reports why.
                    break End::Stopped;
                }
                let acked = *acked_rx.borrow_and_update();
                metrics.confirmed(acked);
                if reached(acked) {
                    tracing::info!(%acked, "reached --stop-lsn");
                    break End::Drained;
                }
                if acked > reported && !confirm_armed {
                    confirm_soon.as_mut().reset(last_report + confirm_within);
                    confirm_armed = true;
                }
            }
            () = &mut confirm_soon, if confirm_armed => {
                confirm_armed = false;
                let confirm = confirmable(&acked_rx, start);
                if let Err(e) = stream.send_standby_status(confirm, confirm, confirm, false).await {
                    fail!(Failure::source(e));
                }
                reported = confirm;
                last_report = tokio::time::Instant::now();
            }
            _ = tick.tick() => {
                let confirm = confirmable(&acked_rx, start);
                if let Err(e) = stream.send_standby_status(confirm, confirm, confirm, true).await {
                    fail!(Failure::source(e));
                }
                reported = confirm;
                last_report = tokio::time::Instant::now();
            }
            permit = tx.reserve(front_bytes), if !pending.is_empty() => {
                match (permit, pending.pop_front()) {
                    (Ok(permit), Some(item)) => permit.send(item),
                    _ => break End::Stopped,
                }
                heard = tokio::time::Instant::now();
            }
            () = &mut silence, if pending.is_empty() && !timers.receive_timeout.is_zero() => {
                let due = heard + timers.receive_timeout;
                if tokio::time::Instant::now() < due {
                    silence.as_mut().reset(due);
                    continue;
                }
                fail!(Failure::source(ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "PostgreSQL sent nothing for {:?} (--receive-timeout): the connection is presumed lost",
                        timers.receive_timeout
                    ),
                ))));
            }
            msg = stream.next_message(), if pending.is_empty() => {
                heard = tokio::time::Instant::now();
                match msg {
                    Ok(Some(ReplicationMessage::XLogData { wal_start, wal_end, data, .. })) => {
                        metrics.server_message(wal_end);
                        let decoded = match decoder.decode(data) {
                            Ok(m) => m,
                            Err(e) => fail!(Failure::new(SourceFail, anyhow::Error::new(e).context("cannot decode a pgoutput message"))),
                        };
                        if let LogicalMessage::Commit(c) = &decoded {
                            metrics.commit_received(c.end_lsn, crate::source::pgoutput::pg_timestamp_to_unix_millis(c.commit_timestamp));
                        }
                        if let LogicalMessage::Begin(b) = &decoded {
                            // Publish none of it: records handed to the sink would go out
                            // although no checkpoint confirms them, and the next run would
                            // publish them again.
                            if past_until(b.final_lsn) {
                                break End::CaughtUp;
                            }
                            // A transaction committed a while ago: a backlog, read in batches.
                            let committed = crate::source::pgoutput::pg_timestamp_to_unix_millis(b.commit_timestamp);
                            backlog = crate::model::now_ms() - committed > BACKLOG_AGE_MS;
                        }
                        // Also after a batch that timed out (a no-op while batching).
                        stream.batch_reads(backlog);
                        // A new table or type: ask the catalog first (rare; awaited in order).
                        if let Err(e) = builder.prepare(&decoded).await {
                            fail!(Failure::source(e));
                        }
                        if let Err(e) = builder.handle(decoded, wal_start, &mut scratch) {
                            fail!(Failure::new(SourceFail, e));
                        }
                        pending.extend(scratch.drain(..));
                    }
                    Ok(Some(ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. })) => {
                        metrics.server_message(wal_end);
                        if !builder.in_transaction() {
                            if before.is_some_and(|l| wal_end >= l) {
                                break End::CaughtUp;
                            }
                            // Between transactions every change up to wal_end has been sent,
                            // so confirming it (once acknowledged) lets idle slots release WAL.
                            if wal_end > queued_position {
                                pending.push_back(SinkItem::Checkpoint(wal_end));
                                queued_position = wal_end;
                            }
                        }
                        if reply_requested {
                            let confirm = confirmable(&acked_rx, start);
                            if let Err(e) = stream.send_standby_status(confirm, confirm, confirm, false).await {
                                fail!(Failure::source(e));
                            }
                        }
                    }
                    Ok(None) => fail!(Failure::source(ReplicationError::ConnectionClosed)),
                    Err(e) => fail!(Failure::source(e)),
                }
            }
        }
    };
    if end == End::CaughtUp {
        // Everything queued belongs to transactions before `until`: it must go out.
        for item in pending.drain(..) {
            if tx.send(item).await.is_err() {
                fail!(sink_gone());
            }
        }
    }
    metrics.set_streaming(false);
    tracing::info!(events = builder.events, ?end, "stream ended");
    Ok((stream, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_position_follows_acknowledgements_but_never_goes_below_the_start() {
        let (tx, rx) = watch::channel(Lsn(0));
        // Before any acknowledgement: where the stream started (already confirmed).
        assert_eq!(confirmable(&rx, Lsn(500)), Lsn(500));
        // An acknowledgement below the start (a barrier of an older item): still the start.
        tx.send(Lsn(400)).unwrap();
        assert_eq!(confirmable(&rx, Lsn(500)), Lsn(500));
        tx.send(Lsn(900)).unwrap();
        assert_eq!(confirmable(&rx, Lsn(500)), Lsn(900));
    }

    #[test]
    fn the_clocks_come_from_the_flags() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "pgcdc",
            "run",
            "--source",
            "host=x",
            "--status-interval",
            "0.5",
            "--receive-timeout",
            "3",
        ])
        .expect("parses");
        let crate::cli::Command::Run(args) = cli.command else {
            panic!("not run");
        };
        let t = Timers::of(&args);
        assert_eq!(t.status_interval, Duration::from_millis(500));
        assert_eq!(t.receive_timeout, Duration::from_secs(3));
    }
}
