//! Peak memory of `pgcdc run` with rows of ~1 MB and a stopped broker (README, Guarantees:
//! bounded memory).
//!
//! The broker is a tansu of the test's own (`common::servers`; memory storage, which takes
//! 400 MB quickly once it answers again), paused with SIGSTOP while pgcdc publishes: from then
//! on everything pgcdc reads can only pile up in its buffers, until they are full and pgcdc
//! stops reading. Then the broker resumes, pgcdc delivers everything as fast as it can, and
//! every row must arrive, once. The peak over both stretches comes from the kernel (`VmHWM` in
//! `/proc/<pid>/status`, sampled until the process ends) and must stay under the documented
//! figure plus its allowance for large rows. Before the buffers were bounded in bytes, the
//! snapshot peaked at 475 MB and the stream at 433 MB.
//!
//! One database serves both phases (filling it is the slow part): a `--snapshot-only` run of
//! 400 rows of ~960 KB, then a streaming run that receives one transaction updating all of
//! them. The values are hex digits without repeats, which neither TOAST nor lz4 can shrink.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::api::{KafkaConfig, ReadStop, TopicReader};
use common::cmd::PgcdcCmd;
use common::servers::{self, PrivateBroker};

/// The documented bound on pgcdc's peak memory (README, Guarantees), in MB...
const DOCUMENTED_PEAK_MB: u64 = 64;
/// ...plus, for large rows, about this many times the largest row: the copies of the rows in
/// hand while they are read, encoded, held back and compressed.
const ROWS_ALLOWED: u64 = 10;

const ROWS: i64 = 400;
/// Pieces of 960 hex digits per row: 1000 of them make a row of 960,000 bytes.
const PIECES: i64 = 1000;
const ROW_BYTES: usize = 960 * PIECES as usize;

/// How long the broker stays paused once pgcdc has stalled: time for any buffer that is
/// not bounded to keep filling.
const STALLED_FOR: Duration = Duration::from_secs(4);

/// The table: 400 rows, each the 1000 pieces of a shared pool in an order of its own (no
/// piece twice in a row, so nothing repeats within 64 KB). `STORAGE EXTERNAL`: PostgreSQL
/// would spend most of the set-up trying to compress them.
fn setup_sql() -> String {
    format!(
        "CREATE TABLE big (id int PRIMARY KEY, doc text);
         ALTER TABLE big ALTER doc SET STORAGE EXTERNAL;
         CREATE TEMP TABLE pool AS
             SELECT p, (SELECT string_agg(md5(p::text || ':' || g::text), '')
                        FROM generate_series(1, 30) g) AS s
             FROM generate_series(0, {last}) p;
         INSERT INTO big
             SELECT i, (SELECT string_agg(s, '' ORDER BY (p * 7 + i) % {PIECES}) FROM pool)
             FROM generate_series(1, {ROWS}) i;",
        last = PIECES - 1
    )
}

/// The highest `VmHWM` seen for `pid` until the process is gone, sampled on a thread.
struct PeakWatch {
    handle: std::thread::JoinHandle<u64>,
}

impl PeakWatch {
    fn start(pid: u32) -> PeakWatch {
        let handle = std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            let mut peak_kb = 0;
            // A zombie's status has no VmHWM line: the process has ended.
            while let Some(kb) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| status_kb(&s, "VmHWM:"))
            {
                peak_kb = peak_kb.max(kb);
                std::thread::sleep(Duration::from_millis(50));
            }
            peak_kb
        });
        PeakWatch { handle }
    }

    /// The peak in kB, once the process has ended.
    fn peak_kb(self) -> u64 {
        self.handle.join().expect("peak watcher")
    }
}

/// The value of `field` (in kB) in a `/proc/<pid>/status` text.
fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn rss_mb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| status_kb(&s, "VmRSS:"))
        .unwrap_or(0)
        / 1024
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `log` contains `needle`; panics after `timeout` or if the child ended.
fn wait_for_log(child: &mut Child, log: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !log_of(log).contains(needle) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "pgcdc ended ({status}) before logging {needle:?}:\n{}",
                log_of(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "pgcdc never logged {needle:?}:\n{}",
            log_of(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With the broker paused, waits until pgcdc has stalled: it warns that Kafka acknowledges
/// nothing (10 s after the first record it sent into the pause), and its resident memory has
/// not grown for [`STALLED_FOR`]. Returns the RSS then.
fn wait_until_stalled(child: &mut Child, log: &Path) -> u64 {
    wait_for_log(
        child,
        log,
        "no acknowledgement from Kafka",
        Duration::from_secs(180),
    );
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = rss_mb(pid);
    let mut steady_since = Instant::now();
    while steady_since.elapsed() < STALLED_FOR {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "pgcdc ended ({status}) with the broker paused:\n{}",
                log_of(log)
            );
        }
        assert!(Instant::now() < deadline, "pgcdc's memory kept growing");
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_mb(pid);
        if now > last {
            last = now;
            steady_since = Instant::now();
        }
    }
    last
}

/// Reads `topic` from `broker` until `expected` records arrived; returns, per key, the
/// sizes of the values read, in order.
async fn read_sizes(broker: &str, topic: &str, expected: usize) -> BTreeMap<i64, Vec<usize>> {
    let cfg = KafkaConfig::new(broker);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let reader = TopicReader::open(
            &cfg,
            &topic,
            ReadStop::Quiet {
                expected: Some(expected),
                quiet: Duration::from_secs(60),
                max_wait: Duration::from_secs(300),
            },
        )
        .expect("open the topic");
        let mut sizes: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for record in reader {
            let record = record.expect("read a record");
            let key: serde_json::Value =
                serde_json::from_slice(&record.key.expect("a key")).expect("key is JSON");
            let id = key["id"].as_i64().expect("id");
            sizes
                .entry(id)
                .or_default()
                .push(record.value.map_or(0, |v| v.len()));
        }
        sizes
    })
    .await
    .expect("reader thread")
}

/// Every row arrived exactly once, whole.
fn assert_every_row_once(sizes: &BTreeMap<i64, Vec<usize>>, what: &str) {
    assert_eq!(sizes.len(), ROWS as usize, "{what}: rows read back");
    for (id, seen) in sizes {
        assert_eq!(seen.len(), 1, "{what}: row {id} read {} times", seen.len());
        assert!(
            seen[0] > ROW_BYTES,
            "{what}: row {id}'s event has {} bytes",
            seen[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_and_a_paused_broker_stay_within_the_memory_bound() {
    let db = common::TestDb::create().await;
    let client = db.client().await;
    let started = Instant::now();
    client
        .batch_execute(&setup_sql())
        .await
        .expect("fill the table");
    eprintln!("table filled in {:?}", started.elapsed());
    let mut broker = PrivateBroker::start_in_memory();
    let bootstrap = broker.bootstrap();
    let source = db.source();
    let dir = servers::temp_dir("pgcdc_memory");
    let limit_kb = DOCUMENTED_PEAK_MB * 1024 + ROWS_ALLOWED * ROW_BYTES as u64 / 1024;
    let mb = |kb: u64| kb as f64 / 1024.0;
    let pgcdc = |slot: &str, prefix: &str, extra: &[&str], log: &Path| {
        PgcdcCmd::new("run")
            .set("--source", &source)
            .set("--kafka", &bootstrap)
            .set("--slot", slot)
            .set("--publication", slot)
            .set("--topic-prefix", prefix)
            .set("--status-interval", "0.5")
            .args(["--table", "public.big"])
            // Room for a row's event, which the broker must accept too.
            .args(["-X", "message.max.bytes=2000000"])
            .args(extra)
            .spawn_logging(log)
    };

    // Phase 1: the snapshot. The broker stops answering once the first row is read.
    let slot = common::unique_name("mslot");
    let prefix = common::unique_name("m");
    let log = dir.join("snapshot.log");
    let mut child = pgcdc(&slot, &prefix, &["--snapshot-only"], &log);
    let peak = PeakWatch::start(child.id());
    wait_for_log(
        &mut child,
        &log,
        "snapshot: reading table",
        Duration::from_secs(60),
    );
    broker.pause();
    let stalled_rss = wait_until_stalled(&mut child, &log);
    broker.resume();
    eprintln!("snapshot: broker resumed after {:?}", started.elapsed());
    let status = wait_for_exit(&mut child, Duration::from_secs(300));
    let snapshot_peak = peak.peak_kb();
    eprintln!(
        "snapshot: RSS {stalled_rss} MB while stalled, peak {:.1} MB (limit {:.1} MB) after {:?}",
        mb(snapshot_peak),
        mb(limit_kb),
        started.elapsed()
    );
    assert!(status.success(), "snapshot run failed:\n{}", log_of(&log));
    let sizes = read_sizes(
        &broker.bootstrap(),
        &format!("{prefix}.public.big"),
        ROWS as usize,
    )
    .await;
    assert_every_row_once(&sizes, "snapshot");
    eprintln!("snapshot: read back after {:?}", started.elapsed());

    // Phase 2: streaming. One transaction rewrites every row while the broker is paused.
    let slot = common::unique_name("mslot");
    let prefix = common::unique_name("m");
    let log = dir.join("stream.log");
    let mut child = pgcdc(&slot, &prefix, &["--snapshot", "never"], &log);
    let peak = PeakWatch::start(child.id());
    wait_for_log(
        &mut child,
        &log,
        "streaming changes",
        Duration::from_secs(60),
    );
    broker.pause();
    client
        .batch_execute("UPDATE big SET doc = upper(doc)")
        .await
        .expect("update every row");
    let stalled_rss = wait_until_stalled(&mut child, &log);
    broker.resume();
    eprintln!("stream: broker resumed after {:?}", started.elapsed());
    let sizes = read_sizes(
        &broker.bootstrap(),
        &format!("{prefix}.public.big"),
        ROWS as usize,
    )
    .await;
    servers::signal(child.id(), "-TERM");
    let status = wait_for_exit(&mut child, Duration::from_secs(60));
    let stream_peak = peak.peak_kb();
    eprintln!(
        "stream: RSS {stalled_rss} MB while stalled, peak {:.1} MB (limit {:.1} MB) after {:?}",
        mb(stream_peak),
        mb(limit_kb),
        started.elapsed()
    );
    assert!(status.success(), "streaming run failed:\n{}", log_of(&log));
    assert_every_row_once(&sizes, "stream");

    assert!(
        snapshot_peak <= limit_kb && stream_peak <= limit_kb,
        "peak RSS above {:.1} MB: snapshot {:.1} MB, stream {:.1} MB",
        mb(limit_kb),
        mb(snapshot_peak),
        mb(stream_peak)
    );
    broker.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("pgcdc did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
