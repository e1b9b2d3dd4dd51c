//! `pgcdc wait`: read-your-writes from the command line.
//!
//! An application commits, takes `pg_current_wal_insert_lsn()`, and waits until everything
//! committed at or below it is published before it reads a view pgcdc feeds. Two ways to know:
//!
//! - `--url`: a running pgcdc's `--metrics-addr` answers `/wait` (see
//!   [`crate::metrics::wait`]) the moment its sink acknowledges the position. Long polls are
//!   repeated until `--timeout`; a pgcdc that cannot be reached, or that has published
//!   nothing yet, is asked again every [`RETRY_EVERY`] (it may be starting).
//! - Otherwise the slot: pgcdc confirms to PostgreSQL only positions its sink acknowledged
//!   (within ~100 ms, `CONFIRM_WITHIN` in `run::stream`), so the slot's
//!   `confirmed_flush_lsn` is a published position — **while a pgcdc streams the slot**. During
//!   a snapshot the slot already stands at the snapshot's consistent point but nobody reads
//!   it and the snapshot's rows are not all published yet, so an inactive slot's position is
//!   never taken as reached; the wait goes on and, at its timeout, says whether a pgcdc runs
//!   for the slot at all (it holds the slot's lock, see [`crate::source::slot_lock`]).
//!
//! Either way the wait ends on a stop signal (Ctrl-C), and a position not reached is exit
//! code [`EXIT_NOT_REACHED`] with a message that says what may be wrong.

use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cli::WaitArgs;
use crate::config;
use crate::metrics::wait::{WaitClient, WaitReply};
use crate::model::failure::{Classify, Failure, FailureKind};
use crate::model::Lsn;
use crate::signals;
use crate::source::connect;
use crate::source::slot_lock;

/// Exit code: the position was not published within `--timeout`, or the wait was interrupted.
pub const EXIT_NOT_REACHED: u8 = 6;

/// How often the slot's position is read.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How soon a pgcdc that could not answer is asked again.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// How a wait ended (other than by an error).
#[derive(Debug)]
enum Waited {
    Reached(Lsn),
    /// Not reached: the last published position seen, if any, and what may be wrong.
    NotReached {
        published: Option<Lsn>,
        why: String,
    },
}

pub async fn run(args: WaitArgs, stop: watch::Receiver<bool>) -> Result<u8, Failure> {
    let started = std::time::Instant::now();
    let mut interrupted = stop.clone();
    let waited = tokio::select! {
        r = async {
            match &args.url {
                Some(url) => over_http(url, &args).await,
                None => over_slot(&args).await,
            }
        } => r?,
        () = signals::requested(&mut interrupted) => Waited::NotReached {
            published: None,
            why: "interrupted".to_string(),
        },
    };
    let waited_ms = started.elapsed().as_millis() as u64;
    match waited {
        Waited::Reached(published) => {
            println!("{published}");
            tracing::info!(lsn = %args.lsn, %published, waited_ms, "published");
            Ok(0)
        }
        Waited::NotReached { published, why } => {
            if let Some(p) = published {
                println!("{p}");
            }
            let at = published.map_or("nothing".to_string(), |p| p.to_string());
            tracing::warn!(
                lsn = %args.lsn,
                waited_ms,
                "{} is not published after {:?} (published: {at}): {why}",
                args.lsn,
                args.timeout
            );
            Ok(EXIT_NOT_REACHED)
        }
    }
}

/// Long-polls a pgcdc's `/wait` until reached or `--timeout`.
async fn over_http(url: &str, args: &WaitArgs) -> Result<Waited, Failure> {
    let client =
        WaitClient::new(url).map_err(|e| Failure::new(FailureKind::Usage, anyhow!("--url {e}")))?;
    let deadline = Instant::now() + args.timeout;
    let mut published = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let why = match client.wait(args.lsn, left).await {
            Ok(WaitReply::Reached { published }) => return Ok(Waited::Reached(published)),
            Ok(WaitReply::TimedOut { published: p }) => {
                published = Some(p);
                "pgcdc runs but has not published that far yet (is it behind? see its /metrics \
                 lag; is the LSN from this server?)"
                    .to_string()
            }
            Ok(WaitReply::Unavailable(e)) => format!("pgcdc answered: {e}"),
            Ok(WaitReply::Refused(e)) => {
                return Err(Failure::new(
                    FailureKind::Usage,
                    anyhow!("{} refused the wait: {e}", client.url),
                ))
            }
            Err(e) => format!(
                "cannot reach pgcdc at {}: {e} (is pgcdc running with --metrics-addr at that \
                 address?)",
                client.url
            ),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Waited::NotReached { published, why });
        }
        tokio::time::sleep(left.min(RETRY_EVERY)).await;
    }
}

/// Polls the slot's `confirmed_flush_lsn` until reached (while a pgcdc streams it) or
/// `--timeout`.
async fn over_slot(args: &WaitArgs) -> Result<Waited, Failure> {
    let info = config::postgres(&args.pg)?;
    let client = connect::connect(&info)
        .await
        .context("cannot connect to PostgreSQL (check --source and that the server is up; or give --url, a running pgcdc's --metrics-addr)")
        .or_fail(FailureKind::Source)?;
    let slot = args.pg.slot.as_str();
    let deadline = Instant::now() + args.timeout;
    loop {
        let row = client
            .query_opt(
                "SELECT active, confirmed_flush_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1 AND database = current_database()",
                &[&slot],
            )
            .await
            .context("cannot read the slot's position")
            .or_fail(FailureKind::Source)?;
        let state = match &row {
            None => None,
            Some(r) => {
                let active: bool = r.get(0);
                let confirmed: Option<Lsn> = r.try_get(1).or_fail(FailureKind::Source)?;
                Some((active, confirmed))
            }
        };
        if let Some((true, Some(c))) = state {
            if crate::metrics::wait::reaches(c, args.lsn) {
                return Ok(Waited::Reached(c));
            }
        }
        if Instant::now() >= deadline {
            let (published, why) = match state {
                None => (
                    None,
                    format!(
                        "slot `{slot}` does not exist in this database (check --slot and \
                         --source; pgcdc creates it when it first runs)"
                    ),
                ),
                Some((true, c)) => (
                    c,
                    "pgcdc streams the slot but has not confirmed that far yet (is it behind? \
                     see `pgcdc status`; is the LSN from this server?)"
                        .to_string(),
                ),
                Some((false, _)) => {
                    let running = slot_lock::held(&client, slot).await.unwrap_or(false);
                    let why = if running {
                        format!(
                            "slot `{slot}` is inactive, but a pgcdc runs for it (it holds the \
                             slot's lock): it is taking a snapshot, starting or reconnecting"
                        )
                    } else {
                        format!(
                            "slot `{slot}` is inactive: no pgcdc is running for it (start \
                             `pgcdc run`; an inactive slot's position is not taken as published)"
                        )
                    };
                    (None, why)
                }
            };
            return Ok(Waited::NotReached { published, why });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(POLL_EVERY)).await;
    }
}
