//! Run-time metrics: a registry of atomics that the pipeline bumps as it goes, served by
//! [`http`] on `--metrics-addr` in Prometheus' text format (written by `prometheus_client` from
//! the values read at scrape time), and the health verdict of `/health`.
//!
//! The registry is process-global ([`global`]) so that the pipeline needs one line per
//! counting point rather than a handle threaded through every function; everything in it is
//! lock-free on the hot paths (per-table counters are looked up once per table, or by topic
//! name under a read lock).
//!
//! # What "stuck" means
//!
//! The stream is healthy while its confirmed position keeps up with the server: either
//! nothing is waiting (confirmed = the server's end of WAL as last reported), or the
//! confirmed position moved recently. It is stuck when WAL is waiting and the confirmed
//! position has not moved for `--unhealthy-after` — a sink that stopped acknowledging, a
//! transaction too large to finish, a decoder that hangs — or when the server has not said
//! anything for that long while streaming (pgcdc asks for a reply at every status interval,
//! so a live connection always answers). During the snapshot, progress means rows read.
//!
//! Replication lag in milliseconds is the age of the oldest transaction received from
//! PostgreSQL but not yet acknowledged by the sink (0 when everything is acknowledged),
//! measured against its commit time on the server's clock.

pub mod http;
pub mod wait;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::model::Lsn;
use crate::model::Op;

/// Bound on the commits remembered for the lag in milliseconds.
const MAX_TRACKED_COMMITS: usize = 65_536;

/// Upper bounds (ms) of the commit → acknowledgement histogram's buckets.
pub const ACK_BUCKETS_MS: [i64; 22] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10_000,
    30_000, 60_000,
];

/// Time from a transaction's commit (server clock) to the sink's acknowledgement of all of it
/// (pgcdc's clock), as a Prometheus histogram.
#[derive(Debug, Default)]
pub struct AckHistogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; ACK_BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
    count: AtomicU64,
}

impl AckHistogram {
    pub fn observe(&self, ms: i64) {
        let ms = ms.max(0);
        let i = ACK_BUCKETS_MS.partition_point(|&b| b < ms);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ms.fetch_add(ms as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// (upper bound, count) per bucket, not cumulative, without +Inf; the sum; the count.
    fn read(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut buckets: Vec<(f64, u64)> = ACK_BUCKETS_MS
            .iter()
            .zip(&self.buckets)
            .map(|(&le, n)| (le as f64, n.load(Relaxed)))
            .collect();
        buckets.push((
            f64::INFINITY,
            self.buckets[ACK_BUCKETS_MS.len()].load(Relaxed),
        ));
        (
            buckets,
            self.sum_ms.load(Relaxed) as f64,
            self.count.load(Relaxed),
        )
    }
}

/// Counters of one captured table.
#[derive(Debug, Default)]
pub struct TableMetrics {
    /// `schema.table`, the `table` label.
    pub label: String,
    /// Events by op: read, create, update, delete, truncate, other.
    events: [AtomicU64; 6],
    pub snapshot_rows: AtomicU64,
    /// `pg_class.reltuples` when the snapshot started; -1 when unknown.
    pub snapshot_estimate: AtomicI64,
    pub snapshot_running: AtomicBool,
    pub snapshot_done: AtomicBool,
}

impl TableMetrics {
    /// `n` rows read by the snapshot (counted in small batches: two atomic additions per
    /// row were 1% of the snapshot's samples).
    pub fn snapshot_rows(&self, n: u64) {
        if n == 0 {
            return;
        }
        let rows = self.snapshot_rows.fetch_add(n, Relaxed);
        self.events[0].fetch_add(n, Relaxed);
        // The health check's progress clock, read once per 64 rows rather than per row
        // (a clock read was 1.4% of the snapshot's samples); stalls are judged in seconds.
        if rows / 64 != (rows + n) / 64 || rows == 0 {
            global().touch_snapshot();
        }
    }

    /// One streamed event of this table.
    pub fn count(&self, op: Op) {
        self.events[op_index(op)].fetch_add(1, Relaxed);
    }

    pub fn snapshot_started(&self) {
        self.snapshot_running.store(true, Relaxed);
        global().touch_snapshot();
    }

    pub fn snapshot_finished(&self) {
        self.snapshot_running.store(false, Relaxed);
        self.snapshot_done.store(true, Relaxed);
    }

    pub fn events(&self, op: Op) -> u64 {
        self.events[op_index(op)].load(Relaxed)
    }

    fn events_by_code(&self, code: &str) -> u64 {
        self.events[code_index(code)].load(Relaxed)
    }
}

/// By the op's one-letter code, so ops added later land in "other" rather than break this.
fn op_index(op: Op) -> usize {
    code_index(op.code())
}

fn code_index(code: &str) -> usize {
    OPS.iter().position(|c| *c == code).unwrap_or(OPS.len())
}

/// The `op` labels, in `events` order; index `OPS.len()` counts any other op.
const OPS: [&str; 5] = ["r", "c", "u", "d", "t"];

/// The registry.
#[derive(Debug)]
pub struct Metrics {
    start: std::time::Instant,
    /// Topic → table counters.
    tables: RwLock<HashMap<Arc<str>, Arc<TableMetrics>>>,
    pub confirmed_lsn: AtomicU64,
    /// The server's end of WAL, as it last reported it.
    pub server_wal_lsn: AtomicU64,
    /// Records handed to the sink and not yet acknowledged (Kafka: awaiting delivery;
    /// stdout: written, not flushed).
    pub sink_in_flight: AtomicU64,
    pub reconnects: AtomicU64,
    pub replication_errors: AtomicU64,
    pub kafka_errors: AtomicU64,
    pub streaming: AtomicBool,
    /// Milliseconds since `start` of the last confirmed-position move.
    last_confirmed_move: AtomicI64,
    /// Milliseconds since `start` of the last message from the server while streaming.
    last_server_message: AtomicI64,
    /// Milliseconds since `start` of the last snapshot progress.
    last_snapshot_progress: AtomicI64,
    /// Milliseconds since `start` when the stream was lost, -1 while not reconnecting.
    reconnecting_since: AtomicI64,
    /// (end LSN, commit time ms) of received, not yet acknowledged transactions.
    unacked: Mutex<VecDeque<(u64, i64)>>,
    /// Commit → acknowledgement of streamed transactions.
    pub commit_to_ack: AckHistogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            start: std::time::Instant::now(),
            tables: RwLock::new(HashMap::new()),
            confirmed_lsn: AtomicU64::new(0),
            server_wal_lsn: AtomicU64::new(0),
            sink_in_flight: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            replication_errors: AtomicU64::new(0),
            kafka_errors: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            last_confirmed_move: AtomicI64::new(0),
            last_server_message: AtomicI64::new(0),
            last_snapshot_progress: AtomicI64::new(0),
            reconnecting_since: AtomicI64::new(-1),
            unacked: Mutex::new(VecDeque::new()),
            commit_to_ack: AckHistogram::default(),
        }
    }
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::default)
}

impl Metrics {
    fn now(&self) -> i64 {
        self.start.elapsed().as_millis() as i64
    }

    /// The counters of the table published to `topic`, created on first use.
    pub fn table(&self, topic: &str, label: &str) -> Arc<TableMetrics> {
        if let Some(t) = self.tables.read().ok().and_then(|m| m.get(topic).cloned()) {
            return t;
        }
        let Ok(mut map) = self.tables.write() else {
            return Arc::new(TableMetrics::default());
        };
        map.entry(Arc::from(topic))
            .or_insert_with(|| {
                Arc::new(TableMetrics {
                    label: label.to_string(),
                    snapshot_estimate: AtomicI64::new(-1),
                    ..TableMetrics::default()
                })
            })
            .clone()
    }

    /// One event for the table of `topic` (registered by [`Metrics::table`]).
    pub fn count_event(&self, topic: &str, op: Op) {
        if let Some(t) = self.existing_table(topic) {
            t.count(op);
        }
    }

    /// The counters of the table published to `topic`, if it has any yet.
    pub fn existing_table(&self, topic: &str) -> Option<Arc<TableMetrics>> {
        self.tables.read().ok().and_then(|m| m.get(topic).cloned())
    }

    fn touch_snapshot(&self) {
        self.last_snapshot_progress.store(self.now(), Relaxed);
    }

    /// The server spoke (XLogData or keepalive) and reported its end of WAL.
    pub fn server_message(&self, wal_end: Lsn) {
        self.last_server_message.store(self.now(), Relaxed);
        self.server_wal_lsn.fetch_max(wal_end.0, Relaxed);
    }

    /// The stream was lost; pgcdc reconnects (counted, and unhealthy if it lasts).
    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Relaxed);
        self.replication_errors.fetch_add(1, Relaxed);
        let _ = self
            .reconnecting_since
            .compare_exchange(-1, self.now(), Relaxed, Relaxed);
    }

    /// Streaming started or ended.
    pub fn set_streaming(&self, on: bool) {
        if on {
            self.reconnecting_since.store(-1, Relaxed);
            let now = self.now();
            self.last_server_message.store(now, Relaxed);
            self.last_confirmed_move.store(now, Relaxed);
        }
        self.streaming.store(on, Relaxed);
    }

    /// A transaction ending at `end_lsn`, committed at `commit_ts_ms`, was received.
    pub fn commit_received(&self, end_lsn: Lsn, commit_ts_ms: i64) {
        if let Ok(mut q) = self.unacked.lock() {
            if q.len() < MAX_TRACKED_COMMITS {
                q.push_back((end_lsn.0, commit_ts_ms));
            }
        }
    }

    /// The sink acknowledged everything up to `lsn` (the position confirmed to PostgreSQL).
    pub fn confirmed(&self, lsn: Lsn) {
        let before = self.confirmed_lsn.fetch_max(lsn.0, Relaxed);
        if lsn.0 > before {
            self.last_confirmed_move.store(self.now(), Relaxed);
        }
        if let Ok(mut q) = self.unacked.lock() {
            let now = crate::model::now_ms();
            while let Some(&(end, commit_ms)) = q.front() {
                if end > lsn.0 {
                    break;
                }
                q.pop_front();
                self.commit_to_ack.observe(now - commit_ms);
            }
        }
    }

    pub fn lag_bytes(&self) -> u64 {
        let server = self.server_wal_lsn.load(Relaxed);
        let confirmed = self.confirmed_lsn.load(Relaxed);
        if confirmed == 0 {
            return 0;
        }
        server.saturating_sub(confirmed)
    }

    pub fn lag_ms(&self) -> i64 {
        let oldest = self
            .unacked
            .lock()
            .ok()
            .and_then(|q| q.front().map(|e| e.1));
        oldest.map_or(0, |ts| (crate::model::now_ms() - ts).max(0))
    }

    /// `Ok` when healthy, else why not (see the module docs).
    pub fn health(&self, stall: Duration) -> Result<(), String> {
        let now = self.now();
        let limit = stall.as_millis() as i64;
        let since = |at: &AtomicI64| now - at.load(Relaxed);
        let snapshot_running = self
            .tables
            .read()
            .map(|m| m.values().any(|t| t.snapshot_running.load(Relaxed)))
            .unwrap_or(false);
        if snapshot_running && since(&self.last_snapshot_progress) > limit {
            return Err(format!(
                "the snapshot has read no row for {}s",
                since(&self.last_snapshot_progress) / 1000
            ));
        }
        let lost = self.reconnecting_since.load(Relaxed);
        if lost >= 0 && now - lost > limit {
            return Err(format!(
                "the replication stream was lost {}s ago and is not back (see the log)",
                (now - lost) / 1000
            ));
        }
        if !self.streaming.load(Relaxed) {
            return Ok(());
        }
        if since(&self.last_server_message) > limit {
            return Err(format!(
                "no message from PostgreSQL for {}s",
                since(&self.last_server_message) / 1000
            ));
        }
        let lag = self.lag_bytes();
        if lag > 0 && since(&self.last_confirmed_move) > limit {
            return Err(format!(
                "the confirmed position {} has not moved for {}s while {lag} bytes of WAL wait \
                 (is the sink acknowledging?)",
                Lsn(self.confirmed_lsn.load(Relaxed)),
                since(&self.last_confirmed_move) / 1000
            ));
        }
        Ok(())
    }

    /// Prometheus text exposition format 0.0.4, written by `prometheus_client` from what the
    /// atomics hold at this moment (see [`Scrape`]).
    pub fn render(&self, stall: Duration) -> String {
        let mut tables: Vec<TableScrape> = self
            .tables
            .read()
            .map(|m| {
                m.values()
                    .map(|t| TableScrape {
                        label: t.label.clone(),
                        events: OPS.map(|code| t.events_by_code(code)),
                        snapshot_rows: t.snapshot_rows.load(Relaxed),
                        snapshot_estimate: t.snapshot_estimate.load(Relaxed),
                        snapshot_done: t.snapshot_done.load(Relaxed),
                    })
                    .collect()
            })
            .unwrap_or_default();
        tables.sort_by(|a, b| a.label.cmp(&b.label));
        let gauge = |v: u64| Sample::Gauge(i64::try_from(v).unwrap_or(i64::MAX));
        let scalars = vec![
            ("pgcdc_confirmed_lsn", "The WAL position confirmed to PostgreSQL (everything before it is acknowledged by the sink).", gauge(self.confirmed_lsn.load(Relaxed))),
            ("pgcdc_server_wal_lsn", "The server's end of WAL as it last reported it.", gauge(self.server_wal_lsn.load(Relaxed))),
            ("pgcdc_replication_lag_bytes", "Server end of WAL minus the confirmed position.", gauge(self.lag_bytes())),
            ("pgcdc_replication_lag_milliseconds", "Age of the oldest received transaction the sink has not acknowledged (0 when none).", Sample::Gauge(self.lag_ms())),
            ("pgcdc_sink_in_flight", "Records handed to the sink and not yet acknowledged (the producer queue).", gauge(self.sink_in_flight.load(Relaxed))),
            ("pgcdc_reconnects", "Reconnections of the replication stream after transient failures.", Sample::Counter(self.reconnects.load(Relaxed))),
            ("pgcdc_replication_errors", "Transient replication failures (each followed by a reconnect).", Sample::Counter(self.replication_errors.load(Relaxed))),
            ("pgcdc_kafka_errors", "Error events reported by the Kafka client (it retries them itself).", Sample::Counter(self.kafka_errors.load(Relaxed))),
            ("pgcdc_streaming", "1 while the replication stream is open.", Sample::Gauge(i64::from(self.streaming.load(Relaxed)))),
            ("pgcdc_healthy", "1 when /health answers 200.", Sample::Gauge(i64::from(self.health(stall).is_ok()))),
        ];
        let scrape = Scrape {
            tables,
            scalars,
            commit_to_ack: self.commit_to_ack.read(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape));
        let mut o = String::with_capacity(4096);
        // Writing to a String fails only if an encoder reports an error, which ours do not.
        let _ = prometheus_text::encode(&mut o, &registry);
        o
    }
}

/// One table's counters as read for a scrape.
#[derive(Debug)]
struct TableScrape {
    label: String,
    /// By `OPS`.
    events: [u64; OPS.len()],
    snapshot_rows: u64,
    snapshot_estimate: i64,
    snapshot_done: bool,
}

/// A value without labels.
#[derive(Debug, Clone, Copy)]
enum Sample {
    /// The encoder appends `_total` to a counter's name.
    Counter(u64),
    Gauge(i64),
}

/// Everything one scrape shows, read from the atomics first so that the encoding holds no
/// lock and the counting paths stay plain atomic additions.
#[derive(Debug)]
struct Scrape {
    tables: Vec<TableScrape>,
    /// (name, help, value).
    scalars: Vec<(&'static str, &'static str, Sample)>,
    /// See [`AckHistogram::read`].
    commit_to_ack: (Vec<(f64, u64)>, f64, u64),
}

impl Scrape {
    /// One gauge per table.
    fn per_table(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&TableScrape) -> i64,
    ) -> fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for t in &self.tables {
            let labels = [("table", t.label.as_str())];
            m.encode_family(&labels)?.encode_gauge(&value(t))?;
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        {
            let mut m = enc.encode_descriptor(
                "pgcdc_events",
                "Events handed to the sink, by table and operation (r snapshot read, c insert, u update, d delete, t truncate).",
                None,
                MetricType::Counter,
            )?;
            for t in &self.tables {
                for (code, n) in OPS.iter().zip(t.events) {
                    let labels = [("table", t.label.as_str()), ("op", code)];
                    m.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        self.per_table(
            &mut enc,
            "pgcdc_snapshot_rows",
            "Rows read by the snapshot so far, by table.",
            |t| i64::try_from(t.snapshot_rows).unwrap_or(i64::MAX),
        )?;
        self.per_table(
            &mut enc,
            "pgcdc_snapshot_rows_estimated",
            "Rows the snapshot expects (pg_class.reltuples; -1 unknown), by table.",
            |t| t.snapshot_estimate,
        )?;
        self.per_table(
            &mut enc,
            "pgcdc_snapshot_done",
            "1 once this run's snapshot of the table finished.",
            |t| i64::from(t.snapshot_done),
        )?;
        for &(name, help, value) in &self.scalars {
            match value {
                Sample::Counter(n) => enc
                    .encode_descriptor(name, help, None, MetricType::Counter)?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?,
                Sample::Gauge(n) => enc
                    .encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_gauge(&n)?,
            }
        }
        let (buckets, sum, count) = &self.commit_to_ack;
        enc.encode_descriptor(
            "pgcdc_commit_to_ack_milliseconds",
            "Streamed transactions: commit time (server clock) to the sink's acknowledgement of all of their events.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_tables_and_lag() {
        let m = Metrics::default();
        let t = m.table("p.public.items", "public.items");
        m.count_event("p.public.items", Op::Create);
        m.count_event("p.public.items", Op::Create);
        t.snapshot_rows(1);
        m.server_message(Lsn(1000));
        m.confirmed(Lsn(400));
        m.commit_received(Lsn(900), crate::model::now_ms() - 4000);
        let text = m.render(Duration::from_secs(60));
        assert!(
            text.contains("pgcdc_events_total{table=\"public.items\",op=\"c\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pgcdc_events_total{table=\"public.items\",op=\"r\"} 1"),
            "{text}"
        );
        assert!(text.contains("pgcdc_replication_lag_bytes 600"), "{text}");
        assert!(m.lag_ms() >= 4000);
        m.confirmed(Lsn(1000));
        assert_eq!(m.lag_ms(), 0);
        // The transaction committed 4 s (plus the test's own time, well under
        // a second) before its acknowledgement: it lands in the 5000 bucket.
        let text = m.render(Duration::from_secs(60));
        let name = "pgcdc_commit_to_ack_milliseconds";
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"2000\"}} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"5000\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 1")),
            "{text}"
        );
        assert!(text.contains(&format!("{name}_count 1")), "{text}");
    }

    /// Every line of the exposition without its value: HELP and TYPE lines whole, samples as
    /// name and labels. Written from the hand-made renderer's output, so the names, types,
    /// labels, escaping and HELP texts stay as they were.
    #[test]
    fn exposition_keeps_names_types_labels_and_help() {
        let m = Metrics::default();
        m.table("p.public.items", "public.items");
        m.table("p.public.odd", "public.\"Odd\\Name\"");
        m.commit_received(Lsn(10), crate::model::now_ms());
        m.confirmed(Lsn(10));
        let text = m.render(Duration::from_secs(60));
        let shape: Vec<&str> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                if l.starts_with('#') {
                    l
                } else {
                    l.rsplit_once(' ').map_or(l, |(series, _)| series)
                }
            })
            .collect();
        let tables = [r#"public.\"Odd\\Name\""#, "public.items"];
        let mut want: Vec<String> = vec![
            "# HELP pgcdc_events_total Events handed to the sink, by table and operation (r snapshot read, c insert, u update, d delete, t truncate).".into(),
            "# TYPE pgcdc_events_total counter".into(),
        ];
        for t in tables {
            for op in ["r", "c", "u", "d", "t"] {
                want.push(format!("pgcdc_events_total{{table=\"{t}\",op=\"{op}\"}}"));
            }
        }
        for (name, help) in [
            (
                "pgcdc_snapshot_rows",
                "Rows read by the snapshot so far, by table.",
            ),
            (
                "pgcdc_snapshot_rows_estimated",
                "Rows the snapshot expects (pg_class.reltuples; -1 unknown), by table.",
            ),
            (
                "pgcdc_snapshot_done",
                "1 once this run's snapshot of the table finished.",
            ),
        ] {
            want.push(format!("# HELP {name} {help}"));
            want.push(format!("# TYPE {name} gauge"));
            for t in tables {
                want.push(format!("{name}{{table=\"{t}\"}}"));
            }
        }
        for (name, kind, help) in [
            ("pgcdc_confirmed_lsn", "gauge", "The WAL position confirmed to PostgreSQL (everything before it is acknowledged by the sink)."),
            ("pgcdc_server_wal_lsn", "gauge", "The server's end of WAL as it last reported it."),
            ("pgcdc_replication_lag_bytes", "gauge", "Server end of WAL minus the confirmed position."),
            ("pgcdc_replication_lag_milliseconds", "gauge", "Age of the oldest received transaction the sink has not acknowledged (0 when none)."),
            ("pgcdc_sink_in_flight", "gauge", "Records handed to the sink and not yet acknowledged (the producer queue)."),
            ("pgcdc_reconnects_total", "counter", "Reconnections of the replication stream after transient failures."),
            ("pgcdc_replication_errors_total", "counter", "Transient replication failures (each followed by a reconnect)."),
            ("pgcdc_kafka_errors_total", "counter", "Error events reported by the Kafka client (it retries them itself)."),
            ("pgcdc_streaming", "gauge", "1 while the replication stream is open."),
            ("pgcdc_healthy", "gauge", "1 when /health answers 200."),
        ] {
            want.push(format!("# HELP {name} {help}"));
            want.push(format!("# TYPE {name} {kind}"));
            want.push(name.into());
        }
        let name = "pgcdc_commit_to_ack_milliseconds";
        want.push(format!("# HELP {name} Streamed transactions: commit time (server clock) to the sink's acknowledgement of all of their events."));
        want.push(format!("# TYPE {name} histogram"));
        for le in ACK_BUCKETS_MS {
            want.push(format!("{name}_bucket{{le=\"{le}\"}}"));
        }
        want.push(format!("{name}_bucket{{le=\"+Inf\"}}"));
        want.push(format!("{name}_sum"));
        want.push(format!("{name}_count"));
        assert_eq!(shape, want, "{text}");
    }

    #[test]
    fn stuck_when_confirmed_stops_while_wal_waits() {
        let m = Metrics::default();
        m.set_streaming(true);
        m.server_message(Lsn(100));
        m.confirmed(Lsn(50));
        assert!(m.health(Duration::from_secs(60)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        m.server_message(Lsn(200));
        let e = m.health(Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("has not moved"), "{e}");
        m.confirmed(Lsn(200));
        assert!(m.health(Duration::from_millis(10)).is_ok());

        // A lost stream that does not come back.
        m.set_streaming(false);
        m.reconnecting();
        assert!(m.health(Duration::from_secs(60)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        let e = m.health(Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("was lost"), "{e}");
        m.set_streaming(true);
        assert!(m.health(Duration::from_millis(10)).is_ok());
        assert_eq!(m.reconnects.load(Relaxed), 1);
    }
}
