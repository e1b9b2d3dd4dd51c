//! A snapshot read by several connections at once (`--snapshot-workers N`).
//!
//! The caller's connection coordinates: inside its imported snapshot it holds an ACCESS SHARE
//! lock on every table (taken by [`super::run`], as for one connection: no rewrite may empty a
//! table under the snapshot), measures each in pages and cuts the big ones into page ranges.
//! The lock matters here too: page ranges are cut by row address (`ctid`), and only a table
//! rewrite (`VACUUM FULL`, `CLUSTER`, a rewriting `ALTER TABLE`) moves a row version to another
//! address; each needs an ACCESS EXCLUSIVE lock, so none can run between two workers' reads.
//! Pruning and plain `VACUUM` keep the addresses of the row versions a snapshot sees.
//!
//! The coordinator's lock has a trap: a session that asks for a conflicting lock meanwhile
//! (`ALTER TABLE`, say) waits for the coordinator, and a worker's `COPY` that asks for its own
//! `ACCESS SHARE` lock after that queues behind the waiting request. The coordinator waits for
//! the worker, the worker for that session, the session for the coordinator: a deadlock
//! PostgreSQL cannot see, since one of its edges is inside pgcdc. So a worker locks each table
//! with `NOWAIT` before reading it (as `pg_dump` does), and a refused lock fails the snapshot
//! with [`SnapshotError::LockQueued`]: the coordinator's transaction ends, the other session
//! proceeds, and the pipeline starts again with a new snapshot.
//!
//! Each worker is a thread with its own connection and single-threaded runtime. It imports the
//! same snapshot, then takes ranges (or whole tables) from a shared list until none is left, so
//! a worker whose ranges held fewer live rows takes over work instead of idling. Threads, not
//! tasks: parsing and encoding are the CPU-heavy part, and the rest of the pipeline keeps its
//! one thread. Workers charge their batches to the same byte budget as everything else sent
//! to the sink ([`crate::model::channel`]), so a slow sink stops all of them.
//!
//! A worker sends every row of a unit before it counts the unit done; the worker that
//! finishes a table's last unit then sends [`Piece::TableDone`] into the same channel. The
//! channel keeps the order of sends that happen one after the other — every other unit of the
//! table was counted done, hence sent, before — so the coordinator receives all rows of a
//! table before its `TableDone`, and sends the table's snapshot markers after them. The
//! coordinator holds back the latest row it forwards (see [`super::Reader`]), with the markers
//! that came after it, and marks the very last row `snapshot: "last"`, which is then the final
//! read event as with one connection.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    import, send, table_schema, Out, Reader, SnapshotCopy, SnapshotError, SnapshotOptions,
};
use super::{SnapshotStats, TableInfo};
use crate::event::{Encoder, Position, TableSchema};
use crate::model::{Budget, Charge, Record, SinkSender};
use crate::source::connect;
use crate::source::conninfo::ConnInfo;

/// The smallest page range worth a query of its own: 8 MB at the default page size.
const MIN_RANGE_PAGES: u64 = 1024;

/// Ranges per worker for a big table: more than one, so that workers finish together.
const RANGES_PER_WORKER: u64 = 4;

/// PostgreSQL 14 reads a `ctid` range with a TID range scan; older servers would scan the
/// whole table once per range.
const TID_RANGE_SCAN_VERSION: i32 = 140_000;

/// One piece of work: a whole table, or the pages `from..to` of one (`to: None`: to the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unit {
    table: usize,
    pages: Option<(u64, Option<u64>)>,
}

/// What the coordinator knows of a table's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size {
    pages: u64,
    /// Whether it may be cut into page ranges.
    splittable: bool,
}

/// Orders and cuts the work: biggest tables first (a partitioned table, whose size is not
/// measured, counts as biggest), each big splittable table into page ranges of at least
/// [`MIN_RANGE_PAGES`]. The last range of a table is open-ended: rows appended after the
/// measurement are invisible to the snapshot, but reading to the end costs nothing.
fn plan(sizes: &[Size], workers: usize) -> Vec<Unit> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| Reverse(sizes[i].pages));
    let mut units = Vec::new();
    for table in order {
        let Size { pages, splittable } = sizes[table];
        let ranges = (workers as u64 * RANGES_PER_WORKER).min(pages / MIN_RANGE_PAGES);
        if !splittable || workers < 2 || ranges < 2 {
            units.push(Unit { table, pages: None });
            continue;
        }
        let step = pages.div_ceil(ranges);
        let mut from = 0;
        while from + step < pages {
            units.push(Unit {
                table,
                pages: Some((from, Some(from + step))),
            });
            from += step;
        }
        units.push(Unit {
            table,
            pages: Some((from, None)),
        });
    }
    units
}

/// What the workers share.
struct Shared {
    snapshot_name: String,
    /// Carries the snapshot's start time too (`commit_ts_ms`).
    position: Position,
    tables: Vec<TableInfo>,
    schemas: Vec<Arc<TableSchema>>,
    units: Vec<Unit>,
    /// Index of the next unit to take.
    next: AtomicUsize,
    /// Per table: whether a worker has started it, its units not yet finished, rows read.
    started: Vec<AtomicBool>,
    left: Vec<AtomicUsize>,
    rows: Vec<AtomicU64>,
    /// `--snapshot-copy`.
    copy: SnapshotCopy,
}

/// What a worker reports: done, or why it stopped.
type Outcome = Result<(), SnapshotError>;

/// What a worker sends to the coordinator, in order.
pub(super) enum Piece {
    /// Read events, in the order read, with what they were charged to the sink channel's
    /// byte budget (see [`crate::model::channel`]).
    Rows(Vec<Record>, Charge),
    /// Every row of the table with this index was sent (by whichever worker): its snapshot
    /// markers may follow. `rows`: how many the table has.
    TableDone { table: usize, rows: u64 },
}

/// Reads the snapshot with `options.workers` connections; `client` is in a transaction that
/// imported the snapshot and locked the tables. See the module documentation.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    client: &tokio_postgres::Client,
    snapshot_name: &str,
    position: Position,
    tables: &[TableInfo],
    topic_prefix: &str,
    encoder: &Encoder,
    tx: &SinkSender,
    stop: &mut watch::Receiver<bool>,
    options: SnapshotOptions<'_>,
) -> Result<SnapshotStats, SnapshotError> {
    if tables.is_empty() {
        return Ok(SnapshotStats::default());
    }
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    let mut sizes = Vec::with_capacity(tables.len());
    for info in tables {
        let size = if info.partitioned {
            Size {
                pages: u64::MAX,
                splittable: false,
            }
        } else {
            let pages: i64 = client
                .query_one(
                    "SELECT pg_relation_size($1::oid::regclass) \
                     / current_setting('block_size')::int8",
                    &[&info.oid],
                )
                .await?
                .get(0);
            Size {
                pages: u64::try_from(pages).unwrap_or(0),
                splittable: version >= TID_RANGE_SCAN_VERSION,
            }
        };
        sizes.push(size);
    }
    let units = plan(&sizes, options.workers);
    let workers = options.workers.min(units.len());
    tracing::info!(
        workers,
        units = units.len(),
        "snapshot: reading with several connections"
    );
    let shared = Arc::new(Shared {
        snapshot_name: snapshot_name.to_string(),
        position,
        schemas: tables
            .iter()
            .map(|t| table_schema(topic_prefix, t, encoder.types()))
            .collect(),
        tables: tables.to_vec(),
        left: (0..tables.len())
            .map(|t| AtomicUsize::new(units.iter().filter(|u| u.table == t).count()))
            .collect(),
        started: tables.iter().map(|_| AtomicBool::new(false)).collect(),
        rows: tables.iter().map(|_| AtomicU64::new(0)).collect(),
        units,
        next: AtomicUsize::new(0),
        copy: options.copy,
    });

    // Set when one worker fails or a signal arrives: the others stop at their next row.
    let (halt_tx, halt_rx) = watch::channel(false);
    // Two batches per worker in flight at most, each charged to the sink channel's budget:
    // a slow sink stops the workers.
    let (batch_tx, mut batch_rx) = mpsc::channel::<Piece>(2 * workers);
    let mut error: Option<SnapshotError> = None;
    let mut pending = FuturesUnordered::new();
    for id in 0..workers {
        match spawn(
            id,
            shared.clone(),
            options.conninfo.clone(),
            encoder.clone(),
            (batch_tx.clone(), tx.budget().clone()),
            halt_rx.clone(),
        ) {
            Ok(done) => pending.push(done),
            Err(e) => {
                keep(&mut error, e);
                let _ = halt_tx.send(true);
                break;
            }
        }
    }
    // The batches channel closes when the last worker thread has ended.
    drop(batch_tx);
    // Forwards into the sink's channel, in its small batches (their size bounds its memory).
    let mut out = Reader::new(encoder, Out::sink(tx), stop.clone(), options.copy);
    let mut watching_stop = true;
    let mut signal = stop.clone();
    let mut batches_open = true;
    while batches_open || !pending.is_empty() {
        tokio::select! {
            r = signal.wait_for(|s| *s), if watching_stop => {
                watching_stop = false;
                // An error means the signal handler is gone: nothing to wait for.
                if r.is_ok() {
                    let _ = halt_tx.send(true);
                }
            }
            batch = batch_rx.recv(), if batches_open => match batch {
                None => batches_open = false,
                // After a failure, batches are drained (so no worker waits on a full
                // channel) but not published.
                Some(piece) if error.is_none() => {
                    let sent = match piece {
                        // The rows go on in the sink channel's batches, each charged there;
                        // the worker's charge for them ends once they are handed on.
                        Piece::Rows(rows, charge) => {
                            let sent = forward(&mut out, rows).await;
                            drop(charge);
                            sent
                        }
                        Piece::TableDone { table, rows } => {
                            let schema = &shared.schemas[table];
                            let markers =
                                options.markers.records(encoder, schema, position, rows);
                            out.table_done(markers).await
                        }
                    };
                    if let Err(e) = sent {
                        keep(&mut error, e);
                        let _ = halt_tx.send(true);
                    }
                }
                Some(_) => {}
            },
            done = pending.next(), if !pending.is_empty() => match done {
                None => {}
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    keep(&mut error, e);
                    let _ = halt_tx.send(true);
                }
                Some(Err(_)) => {
                    keep(
                        &mut error,
                        SnapshotError::Worker("a worker thread ended without a result".into()),
                    );
                    let _ = halt_tx.send(true);
                }
            }
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    let last = out.held.take();
    out.finish(last).await?;
    Ok(SnapshotStats {
        rows: shared.rows.iter().map(|r| r.load(Ordering::Relaxed)).sum(),
    })
}

/// Forwards a worker's rows, holding back the latest (see [`Reader::hold`]).
async fn forward(out: &mut Reader<'_>, rows: Vec<Record>) -> Result<(), SnapshotError> {
    for record in rows {
        if out.hold(record) {
            out.flush().await?;
        }
    }
    Ok(())
}

/// Keeps the error that explains the failure: a worker's own error rather than the
/// "interrupted" of the workers halted because of it.
fn keep(slot: &mut Option<SnapshotError>, e: SnapshotError) {
    if matches!(slot, None | Some(SnapshotError::Interrupted)) {
        *slot = Some(e);
    }
}

/// Starts worker `id` on a thread of its own; the receiver gets its outcome.
fn spawn(
    id: usize,
    shared: Arc<Shared>,
    conninfo: ConnInfo,
    encoder: Encoder,
    out: (mpsc::Sender<Piece>, Budget),
    halt: watch::Receiver<bool>,
) -> Result<oneshot::Receiver<Outcome>, SnapshotError> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("pgcdc-snapshot-{id}"))
        .spawn(move || {
            let outcome = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(work(&shared, &conninfo, &encoder, (&out.0, &out.1), halt)),
                Err(e) => Err(SnapshotError::Worker(format!(
                    "cannot start its runtime: {e}"
                ))),
            };
            let _ = done_tx.send(outcome);
        })
        .map_err(|e| SnapshotError::Worker(format!("cannot start a thread: {e}")))?;
    Ok(done_rx)
}

/// One worker: its own connection in the snapshot, then units until none is left.
async fn work(
    shared: &Shared,
    conninfo: &ConnInfo,
    encoder: &Encoder,
    (tx, budget): (&mpsc::Sender<Piece>, &Budget),
    halt: watch::Receiver<bool>,
) -> Outcome {
    let client = connect::connect(conninfo).await?;
    import(&client, &shared.snapshot_name).await?;
    let out = Out::Batches {
        tx,
        budget,
        batch: Vec::with_capacity(super::BATCH_EVENTS),
        bytes: 0,
    };
    let mut reader = Reader::new(encoder, out, halt, shared.copy);
    let mut locked = vec![false; shared.tables.len()];
    while let Some(unit) = shared
        .units
        .get(shared.next.fetch_add(1, Ordering::Relaxed))
    {
        if *reader.stop.borrow() {
            return Err(SnapshotError::Interrupted);
        }
        let t = unit.table;
        let info = &shared.tables[t];
        let table = &shared.schemas[t];
        let progress = crate::metrics::global().table(&table.topic, &table.qualified_name());
        if !shared.started[t].swap(true, Ordering::Relaxed) {
            let copy = super::copy_label(table, shared.copy);
            tracing::info!(table = %info.name, copy, "snapshot: reading table");
            progress.snapshot_started();
        }
        if !locked[t] {
            lock_nowait(&client, info).await?;
            locked[t] = true;
        }
        let tail = encoder.read_tail(table, shared.position, shared.position.commit_ts_ms);
        let rows = reader
            .copy(&client, info, unit.pages, table, &tail, &progress)
            .await?;
        shared.rows[t].fetch_add(rows, Ordering::Relaxed);
        // Every row of the unit is sent before the unit counts as done (see the module docs).
        reader.release();
        reader.flush().await?;
        if shared.left[t].fetch_sub(1, Ordering::AcqRel) == 1 {
            progress.snapshot_finished();
            let rows = shared.rows[t].load(Ordering::Relaxed);
            tracing::info!(table = %info.name, rows, "snapshot: table done");
            send(tx, &mut reader.stop, Piece::TableDone { table: t, rows }).await?;
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(())
}

/// Locks `info` `ACCESS SHARE` without queueing behind another session's request (see the
/// module documentation).
async fn lock_nowait(
    client: &tokio_postgres::Client,
    info: &TableInfo,
) -> Result<(), SnapshotError> {
    let sql = format!("LOCK TABLE {} IN ACCESS SHARE MODE NOWAIT", info.name);
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            Err(SnapshotError::LockQueued {
                table: info.name.to_string(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(pages: u64) -> Size {
        Size {
            pages,
            splittable: true,
        }
    }

    #[test]
    fn big_tables_are_cut_into_ranges_that_cover_every_page() {
        let units = plan(&[size(10 * MIN_RANGE_PAGES + 7)], 2);
        assert_eq!(units.len(), 8);
        let mut expected_from = 0;
        for (i, u) in units.iter().enumerate() {
            let (from, to) = u.pages.expect("a range");
            assert_eq!(from, expected_from);
            match to {
                Some(to) => {
                    assert!(to - from >= MIN_RANGE_PAGES);
                    expected_from = to;
                }
                None => assert_eq!(i, units.len() - 1, "only the last range is open"),
            }
        }
    }

    #[test]
    fn small_unsplittable_and_single_worker_tables_are_read_whole() {
        let unsplittable = Size {
            pages: 100 * MIN_RANGE_PAGES,
            splittable: false,
        };
        for (sizes, workers) in [
            (vec![size(MIN_RANGE_PAGES)], 4),
            (vec![unsplittable], 4),
            (vec![size(100 * MIN_RANGE_PAGES)], 1),
            (vec![size(0)], 4),
        ] {
            assert_eq!(
                plan(&sizes, workers),
                vec![Unit {
                    table: 0,
                    pages: None
                }]
            );
        }
    }

    #[test]
    fn biggest_tables_come_first_and_ranges_are_capped_per_worker() {
        let units = plan(&[size(3), size(1000 * MIN_RANGE_PAGES), size(50)], 3);
        assert_eq!(units.len(), 3 * RANGES_PER_WORKER as usize + 2);
        assert!(units[..12].iter().all(|u| u.table == 1));
        assert_eq!(
            units[12],
            Unit {
                table: 2,
                pages: None
            }
        );
        assert_eq!(
            units[13],
            Unit {
                table: 0,
                pages: None
            }
        );
    }
}
