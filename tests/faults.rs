//! Fault scenarios for `pgcdc run`: the real binary, a workload writing while faults are
//! injected, and a checker that reads every topic and table at the end (see `faults/check.rs`
//! for what it proves).
//!
//! | scenario | servers | faults |
//! |---|---|---|
//! | `kill_9_during_snapshot_and_streaming` | shared | `kill -9` of pgcdc, ≥ 20 times, then restart |
//! | `postgres_restarts_while_streaming` | private PostgreSQL | fast and immediate restarts |
//! | `broker_paused_and_restarted` | private broker | SIGSTOP longer than the producer timeouts, restarts |
//! | `network_cut_to_postgres_and_broker` | shared PostgreSQL, private broker, proxies | links cut and restored, a silent partition |
//! | `sigterm_during_a_large_transaction` | shared | SIGTERM in the middle of a large transaction |
//!
//! Scenarios that restart or pause a server use their own (`common::servers`), so parallel
//! tests are not disturbed. Each prints one summary line (also appended to
//! `fault-summary.txt` in Cargo's target tmp dir). `PGCDC_SOAK=1` runs longer, with more
//! faults and the producer's default timeouts; `PGCDC_FAULT_SEED` replays a run's choices.

mod common;

/// The parts in `tests/faults/`.
mod faults {
    pub mod check;
    pub mod workload;
}
use faults::{check, workload};

use std::time::{Duration, Instant};

use check::{Summary, WORKLOAD_TABLES};
use common::cmd::PgcdcCmd;
use common::process::Pgcdc;
use common::servers::{self, PrivateBroker, PrivatePg, Shutdown};
use common::{kafka as shared_kafka, proxy};
use workload::{Pace, Rng, Workload};

fn soak() -> bool {
    std::env::var("PGCDC_SOAK").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where a scenario's database lives.
enum Db {
    Shared(Box<common::TestDb>),
    Private(PrivatePg, String),
}

/// One scenario: a database with the workload's tables, a pgcdc configuration, and the
/// counters for the summary line.
struct Scenario {
    name: &'static str,
    db: Db,
    /// The broker the checker reads (pgcdc may reach it through a proxy).
    kafka: String,
    slot: String,
    prefix: String,
    orders: i64,
    docs: i64,
    pgcdc: Pgcdc,
    rng: Rng,
    seed: u64,
    started: Instant,
    kills: usize,
    outages: usize,
    first_fault_ms: Option<i64>,
    /// Transactions committed by the test itself, besides the workload's.
    extra_txns: Vec<workload::Txn>,
}

impl Scenario {
    /// Creates the tables and fills them; pgcdc gets `source` and `kafka` plus `extra`.
    async fn new(
        name: &'static str,
        db: Db,
        source: Option<String>,
        kafka: &str,
        checker_kafka: &str,
        (orders, docs): (i64, i64),
        extra: &[&str],
    ) -> Scenario {
        let seed = workload::seed(name);
        let slot = common::unique_name("fslot");
        let prefix = common::unique_name("f");
        let direct = Self::direct_conninfo(&db);
        let source = source.unwrap_or_else(|| direct.clone());
        let cmd = PgcdcCmd::new("run")
            .set("--source", &source)
            .set("--kafka", kafka)
            .set("--slot", &slot)
            .set("--publication", &slot)
            .set("--topic-prefix", &prefix)
            .set("--status-interval", "0.5")
            .args(
                workload::TABLES
                    .iter()
                    .flat_map(|t| ["--table".to_string(), format!("public.{t}")]),
            )
            .args(extra);
        let dir = std::env::temp_dir().join(&prefix);
        let s = Scenario {
            name,
            db,
            kafka: checker_kafka.to_string(),
            slot,
            prefix,
            orders,
            docs,
            pgcdc: Pgcdc::new(cmd, dir),
            rng: Rng::new(seed),
            seed,
            started: Instant::now(),
            kills: 0,
            outages: 0,
            first_fault_ms: None,
            extra_txns: Vec::new(),
        };
        let client = s.client().await;
        client
            .batch_execute(workload::SCHEMA)
            .await
            .expect("create the workload's tables");
        client
            .batch_execute(&workload::prefill_sql(orders, docs))
            .await
            .expect("prefill");
        s
    }

    fn direct_conninfo(db: &Db) -> String {
        match db {
            Db::Shared(t) => format!(
                "host={} port={} user={} dbname={} sslmode=disable",
                t.env.host, t.env.port, t.env.superuser, t.name
            ),
            Db::Private(pg, name) => pg.conninfo(name),
        }
    }

    /// A connection that bypasses any proxy.
    async fn client(&self) -> tokio_postgres::Client {
        common::client(&common::parse(&Self::direct_conninfo(&self.db))).await
    }

    /// `kills` times `kill -9` and a new pgcdc: while streaming, and now and then (every
    /// fourth) during start-up.
    async fn kill_while_streaming(&mut self, kills: usize) {
        for i in 0..kills {
            if i % 4 == 3 {
                tokio::time::sleep(ms(self.rng.range(0, 700))).await;
            } else {
                self.expect_log("streaming changes", Duration::from_secs(90))
                    .await;
                tokio::time::sleep(ms(self.rng.range(50, 1500))).await;
            }
            self.fault();
            self.pgcdc.kill9();
            self.kills += 1;
            self.pgcdc.spawn();
        }
    }

    /// Starts pgcdc, then (once its slot exists) the workload at `pace`.
    async fn start(&mut self, pace: Pace) -> Workload {
        self.pgcdc.spawn();
        self.wait_for_slot().await;
        self.start_workload(pace)
    }

    /// [`Scenario::start`], then waits (at most 60 s) until pgcdc streams.
    async fn start_streaming(&mut self, pace: Pace) -> Workload {
        let w = self.start(pace).await;
        self.expect_log("streaming changes", Duration::from_secs(60))
            .await;
        w
    }

    fn start_workload(&self, pace: Pace) -> Workload {
        Workload::start(
            Self::direct_conninfo(&self.db),
            self.seed,
            self.orders,
            self.docs,
            pace,
        )
    }

    fn fault(&mut self) {
        self.first_fault_ms.get_or_insert_with(now_ms);
    }

    /// Waits until the slot exists: transactions that start afterwards commit after its
    /// consistent point, so they must all appear as changes.
    async fn wait_for_slot(&mut self) {
        let client = self.client().await;
        let slot = self.slot.clone();
        let found = common::poll_until(Duration::from_secs(60), || {
            let client = &client;
            let slot = &slot;
            async move {
                client
                    .query_opt(
                        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                        &[slot],
                    )
                    .await
                    .ok()
                    .flatten()
                    .map(|_| ())
            }
        })
        .await;
        assert!(
            found.is_some(),
            "the slot was never created:\n{}",
            self.pgcdc.log()
        );
    }

    /// Waits (bounded) until the current run logs `needle`; fails with the log otherwise.
    async fn expect_log(&mut self, needle: &str, timeout: Duration) {
        if !self.pgcdc.wait_for_log(needle, timeout).await {
            panic!(
                "{}: run {} never logged {needle:?} within {timeout:?}:\n{}",
                self.name,
                self.pgcdc.runs,
                self.pgcdc.log()
            );
        }
    }

    /// Waits until the current run has (re)started streaming `n` times.
    async fn wait_streaming(&mut self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pgcdc.log().matches("streaming changes").count() >= n {
                return true;
            }
            if Instant::now() >= deadline || !self.pgcdc.running() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the workload, waits for pgcdc to confirm everything and for the slot's retained
    /// WAL to shrink, stops pgcdc with SIGTERM, then checks the topics and tables and prints
    /// the summary line.
    async fn finish(mut self, workload: Workload, outage_note: &str) -> Summary {
        let mut report = workload.stop().await;
        report.committed.append(&mut self.extra_txns);
        let client = self.client().await;
        if !self.pgcdc.running() {
            self.pgcdc.spawn();
        }
        // Everything the workload committed is confirmed once the slot reaches this.
        let target = check::current_lsn(&client).await;
        let caught_up =
            check::wait_confirmed(&client, &self.slot, target, Duration::from_secs(120)).await;
        assert!(
            caught_up,
            "{}: pgcdc did not catch up (confirmed {:?} < {target}):\n{}",
            self.name,
            check::confirmed_flush(&client, &self.slot).await,
            self.pgcdc.log()
        );
        // (4) The slot releases WAL once caught up: idle keepalives are confirmed too.
        let retention =
            check::wait_retention_below(&client, &self.slot, 16 << 20, Duration::from_secs(60))
                .await
                .unwrap_or_else(|last| {
                    panic!(
                        "{}: the slot still retains WAL (confirmed, restart lag): {last:?}",
                        self.name
                    )
                });
        let status = self
            .pgcdc
            .sigterm(Duration::from_secs(30))
            .expect("pgcdc exits after SIGTERM");
        assert!(status.success(), "{status:?}\n{}", self.pgcdc.log());

        let summary = check::check(
            &self.kafka,
            &self.prefix,
            WORKLOAD_TABLES,
            &client,
            &report.committed,
            self.first_fault_ms,
        )
        .await;
        let line = format!(
            "{}: {} kills survived, {} outages survived{outage_note}; {} pgcdc runs; \
             workload {} transactions ({} in doubt resolved, {} reconnects); {summary}; \
             slot retains {} KiB after catch-up; {:.0}s (seed {})",
            self.name,
            self.kills,
            self.outages,
            self.pgcdc.runs,
            report.committed.len(),
            report.in_doubt,
            report.reconnects.saturating_sub(1),
            retention.0 / 1024,
            self.started.elapsed().as_secs_f64(),
            self.seed
        );
        record(&line);
        assert_eq!(summary.changes, report.changes());
        summary
    }
}

/// Prints a summary line and appends it to `fault-summary.txt`.
fn record(line: &str) {
    eprintln!("SUMMARY {line}");
    common::append_summary("fault-summary.txt", line);
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_snapshot_and_streaming() {
    let (snapshot_kills, stream_kills) = if soak() { (15, 60) } else { (6, 16) };
    let kafka = shared_kafka();
    let db = Db::Shared(Box::new(common::TestDb::create().await));
    let mut s = Scenario::new("kill -9", db, None, &kafka, &kafka, (30_000, 400), &[]).await;
    let mut w = s.start(Pace::default()).await;

    // During the snapshot: each restart finds a slot without a completed snapshot, publishes
    // what the slot holds, and takes the snapshot again.
    let (mut in_snapshot, mut attempted) = (0, 0);
    for _ in 0..snapshot_kills {
        // A run snapshots unless the one before completed its snapshot just before its kill:
        // then it streams, and the kills go on in the streaming phase below.
        let phase = common::poll_until(Duration::from_secs(60), || {
            let log = s.pgcdc.log();
            async move {
                if log.contains("snapshot: reading table") {
                    Some(true)
                } else if log.contains("streaming changes") {
                    Some(false)
                } else {
                    None
                }
            }
        })
        .await;
        match phase {
            Some(true) => {}
            Some(false) => break,
            None => panic!(
                "kill -9: run {} neither snapshotted nor streamed within 60s:\n{}",
                s.pgcdc.runs,
                s.pgcdc.log()
            ),
        }
        // Within the snapshot: it takes ~1 s here after its first table starts (debug build).
        tokio::time::sleep(ms(s.rng.range(0, 600))).await;
        let done = s.pgcdc.log().contains("snapshot published");
        s.fault();
        s.pgcdc.kill9();
        s.kills += 1;
        in_snapshot += usize::from(!done);
        attempted += 1;
        s.pgcdc.spawn();
    }
    assert!(
        in_snapshot >= (attempted / 2).max(1),
        "only {in_snapshot} of {attempted} kills landed in a snapshot; make the tables bigger"
    );
    s.kill_while_streaming(stream_kills).await;
    w.wait_for(1).await;
    eprintln!("kill -9: {in_snapshot} kills during a snapshot");
    s.finish(w, "").await;
}

/// Event ids under `kill -9`: every event published again has the id it had the first time,
/// and no id names two events (the checker's id rules), on smaller tables than the scenario
/// above (tansu reads records with headers slowly).
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_replays_keep_their_event_ids() {
    // A broker of its own: tansu reads records with headers slowly, and holds up every other
    // client of its storage meanwhile (the shared broker's other tests timed out).
    let broker = PrivateBroker::start();
    let kafka = broker.bootstrap();
    let db = Db::Shared(Box::new(common::TestDb::create().await));
    let extra = ["--event-headers", "true"];
    let mut s = Scenario::new(
        "kill -9 ids",
        db,
        None,
        &kafka,
        &kafka,
        (2_000, 100),
        &extra,
    )
    .await;
    let mut w = s.start(Pace::default()).await;
    s.kill_while_streaming(6).await;
    w.wait_for(1).await;
    let summary = s.finish(w, "").await;
    assert_eq!(summary.ids, summary.records, "{summary}");
    assert!(summary.duplicates > 0, "no replay to check: {summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarts_while_streaming() {
    let restarts = if soak() { 12 } else { 4 };
    let pg = PrivatePg::start(&[]);
    let name = common::unique_name("fdb");
    pg.create_database(&name).await;
    let kafka = shared_kafka();
    let mut s = Scenario::new(
        "PostgreSQL restart",
        Db::Private(pg, name),
        None,
        &kafka,
        &kafka,
        (3_000, 50),
        &[],
    )
    .await;
    let mut w = s.start_streaming(Pace::default()).await;
    let mut slowest = Duration::ZERO;
    for i in 0..restarts {
        w.wait_for(w.committed() + 50).await;
        tokio::time::sleep(ms(s.rng.range(0, 1000))).await;
        let mode = if i % 2 == 0 {
            Shutdown::Fast
        } else {
            Shutdown::Immediate
        };
        let Db::Private(pg, _) = &s.db else {
            unreachable!()
        };
        s.first_fault_ms.get_or_insert_with(now_ms);
        pg.stop(mode);
        tokio::time::sleep(ms(s.rng.range(200, 2000))).await;
        pg.start_again();
        let up = Instant::now();
        s.outages += 1;
        // pgcdc reconnects by itself: no restart of the process, and no long wait.
        let streaming = s.wait_streaming(i + 2, Duration::from_secs(30)).await;
        assert!(
            streaming,
            "pgcdc did not resume streaming after the {mode:?} restart #{}:\n{}",
            i + 1,
            s.pgcdc.log()
        );
        slowest = slowest.max(up.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(12),
        "pgcdc took {slowest:?} to resume after PostgreSQL was back:\n{}",
        s.pgcdc.log()
    );
    let log = s.pgcdc.log();
    assert!(log.contains("reconnecting"), "{log}");
    assert_eq!(s.pgcdc.runs, 1, "pgcdc was restarted");
    let note = format!(" (PostgreSQL fast and immediate shutdowns; resumed within {slowest:.1?})");
    s.finish(w, &note).await;
}

/// Regression: the reconnect delay doubled with every lost stream and never started over,
/// so after a few outages pgcdc waited 8 s, 16 s, then 30 s before reconnecting to a server
/// that was long back.
#[tokio::test(flavor = "multi_thread")]
async fn reconnect_backoff_starts_over_after_each_recovered_outage() {
    let kafka = shared_kafka();
    let db = Db::Shared(Box::new(common::TestDb::create().await));
    let mut s = Scenario::new(
        "walsender terminated",
        db,
        None,
        &kafka,
        &kafka,
        (100, 5),
        &[],
    )
    .await;
    let w = s
        .start_streaming(Pace {
            pause: ms(20),
            ..Pace::default()
        })
        .await;
    let client = s.client().await;
    for i in 0..6 {
        s.fault();
        // What a network cut or server restart looks like from pgcdc's side.
        client
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.slot],
            )
            .await
            .expect("terminate the walsender");
        let lost = Instant::now();
        s.outages += 1;
        let resumed = s.wait_streaming(i + 2, Duration::from_secs(60)).await;
        let took = lost.elapsed();
        assert!(
            resumed && took < Duration::from_secs(6),
            "outage {}: streaming resumed after {took:?}:\n{}",
            i + 1,
            s.pgcdc.log()
        );
    }
    s.finish(w, " (walsender terminated)").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_paused_and_restarted() {
    // The producer's request and socket timeouts are shortened so that a short pause
    // outlasts them; the soak run keeps librdkafka's defaults and pauses longer.
    let (rounds, pause, extra): (usize, u64, &[&str]) = if soak() {
        (4, 70_000, &[])
    } else {
        (
            2,
            6_000,
            &[
                "-X",
                "request.timeout.ms=2000",
                "-X",
                "socket.timeout.ms=2000",
            ],
        )
    };
    let mut broker = PrivateBroker::start();
    let kafka = broker.bootstrap();
    let db = Db::Shared(Box::new(common::TestDb::create().await));
    let mut s = Scenario::new(
        "broker pause/restart",
        db,
        None,
        &kafka,
        &kafka,
        (3_000, 50),
        extra,
    )
    .await;
    let mut w = s.start_streaming(Pace::default()).await;
    let mut exits = 0;
    for _ in 0..rounds {
        w.wait_for(w.committed() + 100).await;
        s.fault();
        broker.pause();
        tokio::time::sleep(ms(pause)).await;
        broker.resume();
        s.outages += 1;
        w.wait_for(w.committed() + 100).await;
        tokio::time::sleep(ms(s.rng.range(0, 1000))).await;
        broker.stop();
        tokio::time::sleep(ms(s.rng.range(500, 3000))).await;
        broker.start_again();
        s.outages += 1;
        if let Some(status) = s.pgcdc.exited() {
            exits += 1;
            eprintln!("pgcdc exited with {status:?}:\n{}", s.pgcdc.log());
            s.pgcdc.spawn();
        }
    }
    // pgcdc rides the outages out: records are retried until the broker is back.
    assert_eq!(exits, 0, "pgcdc exited during broker outages");
    let restarts = s
        .pgcdc
        .log()
        .matches("starting again from the last confirmed")
        .count();
    let note = format!(
        " ({rounds} pauses of {}s, {rounds} broker restarts; {restarts} in-process pipeline restarts after failed deliveries)",
        pause / 1000
    );
    s.finish(w, &note).await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread")]
async fn network_cut_to_postgres_and_broker() {
    let rounds = if soak() { 6 } else { 2 };
    let pg_port = common::env().port;
    let pg_proxy = proxy::Proxy::start(pg_port);
    // The broker advertises the proxy's address, so every connection to it goes through.
    let kafka_port = servers::free_port();
    let broker = PrivateBroker::start_advertising(Some(kafka_port));
    let kafka_proxy = proxy::Proxy::start_on(kafka_port, broker.port);
    let kafka = broker.bootstrap();
    let test_db = common::TestDb::create().await;
    let source = format!(
        "host=127.0.0.1 port={} user={} dbname={} sslmode=disable connect_timeout=5",
        pg_proxy.port, test_db.env.superuser, test_db.name
    );
    let mut s = Scenario::new(
        "network cut",
        Db::Shared(Box::new(test_db)),
        Some(source),
        &kafka,
        &kafka,
        (3_000, 50),
        &["--receive-timeout", "3"],
    )
    .await;
    let mut w = s.start_streaming(Pace::default()).await;
    let mut streams = 1;
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        // pgcdc ↔ PostgreSQL: connections dropped, new ones refused for a while.
        w.wait_for(w.committed() + 50).await;
        s.fault();
        pg_proxy.cut();
        tokio::time::sleep(ms(s.rng.range(500, 3000))).await;
        pg_proxy.restore();
        let back = Instant::now();
        s.outages += 1;
        streams += 1;
        assert!(
            s.wait_streaming(streams, Duration::from_secs(30)).await,
            "pgcdc did not resume after the cut to PostgreSQL:\n{}",
            s.pgcdc.log()
        );
        slowest = slowest.max(back.elapsed());

        // pgcdc ↔ broker.
        w.wait_for(w.committed() + 50).await;
        kafka_proxy.cut();
        tokio::time::sleep(ms(s.rng.range(1000, 4000))).await;
        kafka_proxy.restore();
        s.outages += 1;

        // Both at once.
        w.wait_for(w.committed() + 50).await;
        pg_proxy.cut();
        kafka_proxy.cut();
        tokio::time::sleep(ms(s.rng.range(500, 3000))).await;
        pg_proxy.restore();
        kafka_proxy.restore();
        s.outages += 1;
        streams += 1;
        assert!(
            s.wait_streaming(streams, Duration::from_secs(30)).await,
            "pgcdc did not resume after the cut to both:\n{}",
            s.pgcdc.log()
        );
    }
    // A silent partition: the connection stays open but nothing passes, ever again. Only
    // pgcdc's own receive timeout can notice.
    w.wait_for(w.committed() + 50).await;
    pg_proxy.silence();
    tokio::time::sleep(ms(1000)).await;
    pg_proxy.restore();
    s.outages += 1;
    streams += 1;
    assert!(
        s.wait_streaming(streams, Duration::from_secs(40)).await,
        "pgcdc did not notice the silent connection:\n{}",
        s.pgcdc.log()
    );
    let log = s.pgcdc.log();
    assert!(log.contains("reconnecting"), "{log}");
    assert_eq!(s.pgcdc.runs, 1, "pgcdc was restarted");
    let restarts = log
        .matches("starting again from the last confirmed")
        .count();
    let note = format!(
        " ({rounds}× PostgreSQL link, {rounds}× broker link, {rounds}× both, 1 silent partition; resumed within {slowest:.1?} of a restored link; {restarts} in-process pipeline restarts after failed deliveries)"
    );
    s.finish(w, &note).await;
    drop(kafka_proxy);
    drop(broker);
    drop(pg_proxy);
}

/// Regression: a connection to PostgreSQL that went silent (a partition that neither
/// delivers nor resets) left pgcdc waiting forever; it now gives up after --receive-timeout
/// and reconnects.
#[tokio::test(flavor = "multi_thread")]
async fn silent_replication_connection_is_detected_and_replaced() {
    let pg_proxy = proxy::Proxy::start(common::env().port);
    let kafka = shared_kafka();
    let test_db = common::TestDb::create().await;
    let source = format!(
        "host=127.0.0.1 port={} user={} dbname={} sslmode=disable connect_timeout=5",
        pg_proxy.port, test_db.env.superuser, test_db.name
    );
    let mut s = Scenario::new(
        "silent connection",
        Db::Shared(Box::new(test_db)),
        Some(source),
        &kafka,
        &kafka,
        (100, 5),
        &["--receive-timeout", "2"],
    )
    .await;
    let mut w = s
        .start_streaming(Pace {
            pause: ms(20),
            ..Pace::default()
        })
        .await;
    w.wait_for(w.committed() + 20).await;
    s.fault();
    pg_proxy.silence();
    tokio::time::sleep(ms(500)).await;
    pg_proxy.restore();
    s.outages += 1;
    assert!(
        s.wait_streaming(2, Duration::from_secs(40)).await,
        "pgcdc did not notice the silent connection:\n{}",
        s.pgcdc.log()
    );
    assert!(s.pgcdc.log().contains("presumed lost"), "{}", s.pgcdc.log());
    s.finish(w, " (silent partition)").await;
    drop(pg_proxy);
}

/// Commits one transaction inserting `rows` orders from `first_id`, marked `marker`.
async fn large_transaction(
    client: &tokio_postgres::Client,
    first_id: i64,
    rows: i64,
    marker: &str,
) -> workload::Txn {
    let last = first_id + rows - 1;
    let tx = client.simple_query("BEGIN; SELECT txid_current()").await;
    let xid: i64 = tx
        .ok()
        .and_then(|m| {
            m.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
        })
        .and_then(|x| x.parse().ok())
        .expect("xid");
    client
        .batch_execute(&format!(
            "INSERT INTO orders SELECT g, 1, g, 'bulk', '{marker}' \
             FROM generate_series({first_id}, {last}) g; COMMIT"
        ))
        .await
        .expect("large transaction");
    workload::Txn {
        xid: (xid & 0xFFFF_FFFF) as u32,
        marker: marker.to_string(),
        expects: (first_id..=last)
            .map(|id| workload::Expect::Upsert {
                table: "orders",
                key: serde_json::json!({ "id": id }),
            })
            .collect(),
    }
}

/// How many events of the transaction marked `marker` the orders topic holds, and their
/// commit LSN.
async fn published_of(kafka: &str, topic: &str, marker: &str) -> (usize, Option<u64>) {
    let (kafka, topic) = (kafka.to_string(), topic.to_string());
    let records = tokio::task::spawn_blocking(move || check::read_all(&kafka, &topic))
        .await
        .expect("reader");
    let mut n = 0;
    let mut commit = None;
    for r in records {
        let Some(v) = r.value else { continue };
        let v: serde_json::Value = serde_json::from_slice(&v).expect("JSON");
        if v["after"]["marker"] == marker {
            n += 1;
            commit = v["source"]["commit_lsn"].as_u64();
        }
    }
    (n, commit)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_transaction() {
    // Big enough, and the pause short enough, that a stop lands while pgcdc is publishing
    // the transaction: pgcdc takes well under a second for it.
    const ROWS: i64 = 50_000;
    let kafka = shared_kafka();
    let db = Db::Shared(Box::new(common::TestDb::create().await));
    let mut s = Scenario::new("SIGTERM", db, None, &kafka, &kafka, (1_000, 20), &[]).await;
    let w = s
        .start(Pace {
            pause: ms(20),
            ..Pace::default()
        })
        .await;
    let client = s.client().await;
    let topic = format!("{}.public.orders", s.prefix);
    let mut mid_transaction = 0;
    let mut stops = 0;
    for attempt in 0..4 {
        s.expect_log("streaming changes", Duration::from_secs(60))
            .await;
        // Start from a caught-up pgcdc, so that the stop lands in the new transaction.
        let now = check::current_lsn(&client).await;
        check::wait_confirmed(&client, &s.slot, now, Duration::from_secs(60)).await;
        let marker = format!("big{attempt}");
        let txn = large_transaction(&client, 10_000_000 * (attempt + 1), ROWS, &marker).await;
        s.extra_txns.push(txn);
        // Let pgcdc get into the transaction, then ask it to stop.
        tokio::time::sleep(ms(s.rng.range(20, 400))).await;
        s.fault();
        let stopped = Instant::now();
        let status = s.pgcdc.sigterm(Duration::from_secs(30));
        let took = stopped.elapsed();
        stops += 1;
        s.outages += 1;
        let status =
            status.unwrap_or_else(|| panic!("no exit 30s after SIGTERM:\n{}", s.pgcdc.log()));
        assert!(status.success(), "{status:?}:\n{}", s.pgcdc.log());
        let (published, commit_lsn) = published_of(&kafka, &topic, &marker).await;
        let confirmed = check::confirmed_flush(&client, &s.slot)
            .await
            .expect("the slot");
        eprintln!(
            "SIGTERM #{}: exited 0 after {took:.1?}; {published} of {ROWS} rows of the large transaction published",
            attempt + 1
        );
        if published > 0 && (published as i64) < ROWS {
            mid_transaction += 1;
            // Nothing of a transaction that was not entirely acknowledged is confirmed.
            let commit_lsn = commit_lsn.expect("commit_lsn");
            assert!(
                confirmed <= commit_lsn,
                "confirmed {confirmed} past the unfinished transaction committing at {commit_lsn}"
            );
        }
        s.pgcdc.spawn();
        if mid_transaction >= 2 {
            break;
        }
    }
    assert!(
        mid_transaction >= 1,
        "no SIGTERM landed in the middle of the large transaction"
    );
    let note =
        format!(" ({stops} SIGTERMs, {mid_transaction} in the middle of a {ROWS}-row transaction)");
    s.finish(w, &note).await;
}

/// Regression: taking the snapshot again over an existing slot dropped the old slot and then
/// copied the new one to its name. A crash between the two left no slot at all, and the next
/// run started from a fresh snapshot: the deletes committed in between were never published.
/// The slot must exist at every moment of a re-snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn resnapshot_never_leaves_the_slot_missing() {
    let kafka = shared_kafka();
    let db = Db::Shared(Box::new(common::TestDb::create().await));
    let mut s = Scenario::new("re-snapshot", db, None, &kafka, &kafka, (200, 5), &[]).await;
    let (status, log) = s.pgcdc.run_to_end(&["--stop-lsn", "now"]);
    assert!(status.success(), "{log}");
    // Watch the slot as closely as we can while snapshots are taken again.
    let watcher = s.client().await;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let slot = s.slot.clone();
    let watch = tokio::spawn(async move {
        let q = watcher
            .prepare("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
            .await
            .expect("prepare");
        let (mut polls, mut missing) = (0u64, 0u64);
        while !*stop_rx.borrow_and_update() {
            let n: i64 = watcher.query_one(&q, &[&slot]).await.expect("poll").get(0);
            polls += 1;
            missing += u64::from(n == 0);
        }
        (polls, missing)
    });
    let client = s.client().await;
    for i in 0..5 {
        let id = i + 1;
        let msgs = client
            .simple_query(&format!(
                "BEGIN; SELECT txid_current(); DELETE FROM orders WHERE id = {id}; COMMIT"
            ))
            .await
            .expect("delete");
        let xid: i64 = msgs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .expect("xid");
        s.extra_txns.push(workload::Txn {
            xid: (xid & 0xFFFF_FFFF) as u32,
            marker: String::new(),
            expects: vec![workload::Expect::Delete {
                table: "orders",
                key: serde_json::json!({ "id": id }),
            }],
        });
        let (status, log) = s
            .pgcdc
            .run_to_end(&["--snapshot", "always", "--stop-lsn", "now"]);
        assert!(status.success(), "{log}");
    }
    let _ = stop_tx.send(true);
    let (polls, missing) = watch.await.expect("watcher");
    assert_eq!(
        missing, 0,
        "the slot was missing in {missing} of {polls} polls during re-snapshots"
    );
    let w = s.start_workload(Pace::default());
    s.finish(w, " (5 re-snapshots)").await;
}
