//! `bench-wait-latency`: the read-your-writes probe of `bench/run.sh`'s latency measurement.
//!
//! While the steady load runs, it does what an application that reads its own writes does,
//! `<per-second>` times a second on a PostgreSQL connection of its own: update one row of
//! `bench_lat` in a transaction, `COMMIT`, take `pg_current_wal_insert_lsn()`, and ask the
//! running pgcdc's `GET /wait?lsn=…` (its `--metrics-addr`) — a long poll that answers 200 once
//! everything committed at or below the LSN is acknowledged by the sink. The figure is
//! **commit → wait returns**: from `COMMIT` returning to the 200 answer, so it includes the
//! LSN query, the HTTP connection (one per wait, as `curl` or `pgcdc wait` make) and the time
//! pgcdc takes to decode, produce and have Kafka acknowledge the write.
//!
//! With `<pgcdc-binary>` and `<slot>`, every `CLI_EVERY`-th probe runs the command-line client
//! instead, process start included, alternating `pgcdc wait --url` and `pgcdc wait` on the
//! slot (which sees a position only once pgcdc confirmed it to PostgreSQL, up to ~100 ms
//! after the acknowledgement).
//!
//! ```text
//! bench-wait-latency <conninfo> <metrics-url> <seconds> <per-second> <rows> [<pgcdc-binary> <slot>]
//! ```
//!
//! The probe's writes are events like the load's: it prints how many it committed
//! (`writes=`) so that the bench expects them on the topic too. Output: `key=value` lines
//! (see `stats::print_stats`); `wait_failed` counts waits that did not answer 200 (the first
//! failure is described on stderr). A probe that overruns its slot delays the next one rather
//! than running two at once.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use pgcdc::metrics::wait::{WaitClient, WaitReply};
use pgcdc::model::Lsn;
use pgcdc::source::conninfo::ConnInfo;

#[path = "stats.rs"]
mod stats;
use stats::print_stats;

/// Every this many probes, the command-line client instead of the HTTP request.
const CLI_EVERY: u64 = 25;
/// How long one wait may take before it counts as failed.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    conninfo: String,
    url: String,
    seconds: u64,
    per_second: u64,
    rows: i64,
    cli: Option<(String, String)>,
}

fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: bench-wait-latency <conninfo> <metrics-url> <seconds> <per-second> <rows> \
                 [<pgcdc-binary> <slot>]";
    if a.len() != 6 && a.len() != 8 {
        eprintln!("{usage}");
        return ExitCode::from(2);
    }
    let number = |i: usize| a[i].parse::<u64>().ok().filter(|&n| n > 0);
    let (Some(seconds), Some(per_second), Some(rows)) = (number(3), number(4), number(5)) else {
        eprintln!(
            "bench-wait-latency: <seconds>, <per-second> and <rows> are positive whole numbers"
        );
        return ExitCode::from(2);
    };
    let args = Args {
        conninfo: a[1].clone(),
        url: a[2].clone(),
        seconds,
        per_second,
        rows: rows as i64,
        cli: (a.len() == 8).then(|| (a[6].clone(), a[7].clone())),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-wait-latency: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-wait-latency: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Which client a probe used.
#[derive(Clone, Copy)]
enum Via {
    Http,
    CliUrl,
    CliSlot,
}

async fn run(args: Args) -> Result<(), String> {
    let info = ConnInfo::parse(&args.conninfo).map_err(|e| format!("bad conninfo: {e}"))?;
    let mut client = pgcdc::source::connect::connect(&info)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    let update = client
        .prepare("UPDATE bench_lat SET n = n + 1 WHERE id = $1")
        .await
        .map_err(|e| format!("cannot prepare the update: {e}"))?;
    let waiter = WaitClient::new(&args.url)?;

    let mut http_ms = Vec::new();
    let mut cli_url_ms = Vec::new();
    let mut cli_slot_ms = Vec::new();
    let mut lsn_query_ms = Vec::new();
    let mut failed = 0u64;
    let mut writes = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / args.per_second as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut k: u64 = 0;
    while Instant::now() < end {
        tick.tick().await;
        k += 1;
        // Rows spread over the table, not one hot row the load would contend with.
        let id = ((k as i64).wrapping_mul(7919) % args.rows) + 1;
        let tx = client
            .transaction()
            .await
            .map_err(|e| format!("BEGIN: {e}"))?;
        tx.execute(&update, &[&id])
            .await
            .map_err(|e| format!("UPDATE: {e}"))?;
        tx.commit().await.map_err(|e| format!("COMMIT: {e}"))?;
        let committed = Instant::now();
        writes += 1;
        let lsn: Lsn = client
            .query_one("SELECT pg_current_wal_insert_lsn()", &[])
            .await
            .map_err(|e| format!("cannot read the insert LSN: {e}"))?
            .get(0);
        lsn_query_ms.push(ms(committed.elapsed()));

        let via = match &args.cli {
            Some(_) if k.is_multiple_of(CLI_EVERY) && !(k / CLI_EVERY).is_multiple_of(2) => {
                Via::CliUrl
            }
            Some(_) if k.is_multiple_of(CLI_EVERY) => Via::CliSlot,
            _ => Via::Http,
        };
        let outcome = match (via, &args.cli) {
            (Via::Http, _) | (_, None) => match waiter.wait(lsn, WAIT_TIMEOUT).await {
                Ok(WaitReply::Reached { .. }) => Ok(()),
                Ok(other) => Err(format!("/wait answered {other:?}")),
                Err(e) => Err(format!("/wait: {e}")),
            },
            (Via::CliUrl | Via::CliSlot, Some((bin, slot))) => {
                let mut cmd = std::process::Command::new(bin);
                cmd.args(["wait", "--lsn", &lsn.to_string(), "--timeout", "10"]);
                match via {
                    Via::CliUrl => cmd.args(["--url", &args.url]),
                    _ => cmd.args(["--source", &args.conninfo, "--slot", slot]),
                };
                cmd.stdout(std::process::Stdio::null());
                cmd.stderr(std::process::Stdio::piped());
                match tokio::task::spawn_blocking(move || cmd.output()).await {
                    Ok(Ok(out)) if out.status.success() => Ok(()),
                    Ok(Ok(out)) => Err(format!(
                        "pgcdc wait: {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Ok(Err(e)) => Err(format!("cannot run pgcdc wait: {e}")),
                    Err(e) => Err(format!("pgcdc wait: {e}")),
                }
            }
        };
        let took = ms(committed.elapsed());
        match outcome {
            Ok(()) => match via {
                Via::Http => http_ms.push(took),
                Via::CliUrl => cli_url_ms.push(took),
                Via::CliSlot => cli_slot_ms.push(took),
            },
            Err(e) => {
                if failed == 0 {
                    eprintln!("bench-wait-latency: a wait for {lsn} failed: {e}");
                }
                failed += 1;
            }
        }
    }

    println!("writes={writes}");
    println!("wait_failed={failed}");
    print_stats("wait", &mut http_ms);
    print_stats("wait_cli_url", &mut cli_url_ms);
    print_stats("wait_cli_slot", &mut cli_slot_ms);
    print_stats("lsn_query", &mut lsn_query_ms);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
