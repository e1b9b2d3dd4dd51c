//! What `run` shows while it works: the metrics endpoint, table registration in the metrics
//! registry, and snapshot progress (a bar per table on a terminal, periodic log lines
//! otherwise). Kept apart from the data path: nothing here can slow or stop the pipeline.

use std::io::IsTerminal;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{oneshot, watch};

use crate::cli::{ProgressDisplay, RunArgs};
use crate::logging::LogFormat;
use crate::metrics::{self, TableMetrics};
use crate::model::failure::{Failure, FailureKind};
use crate::model::Lsn;
use crate::source::catalog::TableInfo;
use crate::source::topic::topic_name;

/// How often the log-line display reports.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often bars are refreshed from the counters.
const BAR_EVERY: Duration = Duration::from_millis(200);

/// Starts the metrics endpoint when `--metrics-addr` is set; its `/wait` answers with
/// `published` (see [`crate::metrics::wait`]) and ends on `stop`.
pub(super) async fn start_metrics(
    args: &RunArgs,
    published: watch::Receiver<Lsn>,
    stop: watch::Receiver<bool>,
) -> Result<(), Failure> {
    let Some(addr) = &args.ops.metrics_addr else {
        return Ok(());
    };
    let routes = metrics::http::Routes {
        metrics: Some(args.ops.unhealthy_after),
        wait: Some(Arc::new(metrics::wait::PublishedWaiter { published, stop })),
    };
    let bound = metrics::http::serve(addr, routes)
        .await
        .map_err(|e| Failure::new(FailureKind::Usage, anyhow!(e)))?;
    tracing::info!(addr = %bound, "serving metrics on http://{bound}/metrics, health on http://{bound}/health and read-your-writes on http://{bound}/wait?lsn=");
    Ok(())
}

/// Registers the captured tables, so their counters exist (at zero) from the start.
pub(super) fn register_tables(prefix: &str, tables: &[TableInfo]) -> Vec<Arc<TableMetrics>> {
    tables
        .iter()
        .map(|t| {
            let label = format!("{}.{}", t.name.schema, t.name.name);
            metrics::global().table(&topic_name(prefix, &t.name), &label)
        })
        .collect()
}

/// A running progress display; [`Display::finish`] ends it.
pub(super) struct Display {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Display {
    pub(super) async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Looks up row estimates and starts the display chosen by `--progress`.
pub(super) async fn snapshot_display(
    args: &RunArgs,
    log_format: LogFormat,
    client: &tokio_postgres::Client,
    tables: &[TableInfo],
) -> Display {
    let counters = register_tables(&args.kafka.topic_prefix, tables);
    for (info, c) in tables.iter().zip(&counters) {
        // reltuples is -1 for a table never vacuumed or analyzed (PostgreSQL 14+).
        let estimate = client
            .query_one(
                "SELECT reltuples::int8 FROM pg_class WHERE oid = $1",
                &[&info.oid],
            )
            .await
            .ok()
            .map_or(-1, |r| r.get::<_, i64>(0));
        c.snapshot_estimate.store(estimate, Relaxed);
    }
    let bar = match args.ops.progress {
        ProgressDisplay::Off => {
            return Display {
                stop: None,
                task: None,
            }
        }
        ProgressDisplay::Bar => true,
        ProgressDisplay::Log => false,
        ProgressDisplay::Auto => std::io::stderr().is_terminal() && log_format == LogFormat::Human,
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = if bar {
        tokio::spawn(bars(counters, stop_rx))
    } else {
        tokio::spawn(log_lines(counters, stop_rx))
    };
    Display {
        stop: Some(stop_tx),
        task: Some(task),
    }
}

/// Time left at the rate so far (rows read since the table's snapshot began, per second);
/// none when the rate or the rows left are unknown.
fn eta(rows: u64, estimate: i64, elapsed: Duration) -> Option<Duration> {
    let rate = rows as f64 / elapsed.as_secs_f64().max(0.001);
    (estimate > rows as i64 && rate > 0.0)
        .then(|| Duration::from_secs_f64((estimate as f64 - rows as f64) / rate))
}

/// A bar's `1,234 rows/s`: the same rate as the log lines and [`eta`] use. (indicatif's own
/// `{per_sec}` and `{eta}` weigh recent steps: a bar created just before a burst of rows
/// showed millions of rows a second, and a snapshot waiting for its sink `ETA 0s`.)
fn rate_text(rows: u64, elapsed: Duration) -> String {
    let rate = rows as f64 / elapsed.as_secs_f64().max(0.001);
    format!("{} rows/s", indicatif::HumanCount(rate.round() as u64))
}

/// A bar's time left: `4s`, `2m 30s`, or `?` while unknown.
fn eta_text(rows: u64, estimate: u64, elapsed: Duration) -> String {
    match eta(rows, i64::try_from(estimate).unwrap_or(i64::MAX), elapsed) {
        Some(d) => {
            let s = d.as_secs_f64().round() as u64;
            match (s / 3600, s / 60 % 60, s % 60) {
                (0, 0, s) => format!("{s}s"),
                (0, m, s) => format!("{m}m {s}s"),
                (h, m, _) => format!("{h}h {m}m"),
            }
        }
        None if estimate > 0 && rows >= estimate => "0s".to_string(),
        None => "?".to_string(),
    }
}

/// The bar of a table with a row estimate: rows of the estimate, rate, time left.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>24} [{bar:30}] {human_pos}/{human_len} rows, {rows_per_sec}, ETA {time_left}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key(
        "rows_per_sec",
        |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&rate_text(s.pos(), s.elapsed()));
        },
    )
    .with_key(
        "time_left",
        |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&eta_text(s.pos(), s.len().unwrap_or(0), s.elapsed()));
        },
    )
    .progress_chars("=> ")
}

async fn log_lines(counters: Vec<Arc<TableMetrics>>, mut stop: oneshot::Receiver<()>) {
    let mut started: Vec<Option<Instant>> = vec![None; counters.len()];
    let mut tick = tokio::time::interval(LOG_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        for (c, s) in counters.iter().zip(started.iter_mut()) {
            if !c.snapshot_running.load(Relaxed) {
                continue;
            }
            let t0 = *s.get_or_insert_with(Instant::now);
            let rows = c.snapshot_rows.load(Relaxed);
            let estimate = c.snapshot_estimate.load(Relaxed);
            let elapsed = t0.elapsed().max(LOG_EVERY);
            let rate = rows as f64 / elapsed.as_secs_f64();
            tracing::info!(
                table = %c.label,
                rows,
                estimated_rows = estimate,
                rows_per_sec = rate.round() as u64,
                eta_secs = eta(rows, estimate, elapsed).map(|d| d.as_secs()),
                "snapshot progress"
            );
        }
    }
}

async fn bars(counters: Vec<Arc<TableMetrics>>, mut stop: oneshot::Receiver<()>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    crate::logging::set_bars(multi.clone());
    let style = bar_style();
    let unknown =
        ProgressStyle::with_template("{prefix:>24} {spinner} {human_pos} rows, {rows_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .with_key(
                "rows_per_sec",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&rate_text(s.pos(), s.elapsed()));
                },
            );
    let mut shown: Vec<Option<ProgressBar>> = vec![None; counters.len()];
    let mut tick = tokio::time::interval(BAR_EVERY);
    let mut previous = Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = &mut stop => true,
            _ = tick.tick() => false,
        };
        // A table seen running for the first time began since the previous look: its bar's
        // clock starts then, so the rate counts the rows read meanwhile over that time.
        let since_previous = previous.elapsed().min(Duration::from_secs(1));
        previous = Instant::now();
        for (c, slot) in counters.iter().zip(shown.iter_mut()) {
            let running = c.snapshot_running.load(Relaxed);
            let done = c.snapshot_done.load(Relaxed);
            if slot.is_none() && (running || done) {
                let estimate = c.snapshot_estimate.load(Relaxed);
                let pb = if estimate > 0 {
                    ProgressBar::new(estimate as u64).with_style(style.clone())
                } else {
                    ProgressBar::new_spinner().with_style(unknown.clone())
                };
                *slot =
                    Some(multi.add(pb.with_prefix(c.label.clone()).with_elapsed(since_previous)));
            }
            if let Some(pb) = slot {
                let rows = c.snapshot_rows.load(Relaxed);
                if pb.length().is_some_and(|l| rows > l) {
                    pb.set_length(rows);
                }
                pb.set_position(rows);
                if done && !pb.is_finished() {
                    pb.set_length(rows);
                    pb.finish();
                }
            }
        }
        if stopping {
            break;
        }
    }
    crate::logging::clear_bars();
    let _ = multi.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_time_left_come_from_the_rows_since_the_start() {
        let ten = Duration::from_secs(10);
        assert_eq!(rate_text(25_000, ten), "2,500 rows/s");
        assert_eq!(eta_text(25_000, 100_000, ten), "30s");
        assert_eq!(eta_text(1_000, 100_000, ten), "16m 30s");
        assert_eq!(eta_text(1, 100_000, ten), "277h 46m");
        assert_eq!(eta_text(0, 100_000, ten), "?");
        assert_eq!(eta_text(100_000, 100_000, ten), "0s");
        assert_eq!(eta_text(5, 0, ten), "?");
        // A bar that appears just as a burst of rows arrives does not claim millions a second.
        assert_eq!(
            rate_text(4_446, Duration::from_millis(200)),
            "22,230 rows/s"
        );
    }
}
