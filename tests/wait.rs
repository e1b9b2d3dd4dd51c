//! Read-your-writes end to end: an application writes, takes `pg_current_wal_insert_lsn()`,
//! waits (`GET /wait` on `--metrics-addr`, `pgcdc wait --url`, `pgcdc wait` on the slot), and
//! then finds its write in the topic — read up to the high watermark the broker reports at
//! that moment (the durable broker's watermarks are right), so "readable" means readable now,
//! not eventually. Waits that cannot succeed end cleanly: a far position times out (504, exit
//! 6), a bad one is refused (400), a stopping pgcdc ends every wait (503), and with pgcdc
//! stopped the command says so.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::api::{read_topic, KafkaConfig, ReadStop};
use common::cmd::{signal, PgcdcCmd};
use common::pipeline::{kafka, Pipeline};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, n int);
                     INSERT INTO items SELECT g, g FROM generate_series(1, 5) g;
                     CREATE TABLE other (id int);";

/// A GET that may take `within` (a long poll): (status code, JSON body).
fn get(addr: &str, path: &str, within: Duration) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics endpoint answers");
    s.set_read_timeout(Some(within)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("an answer in time");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1);
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
    (code, json)
}

/// `pgcdc wait` for this test's slot (no Kafka flags: it takes none).
fn wait_cmd(p: &Pipeline, lsn: &str, extra: &[&str]) -> PgcdcCmd {
    p.pgcdc("wait")
        .unset("--kafka")
        .unset("--topic-prefix")
        .set("--lsn", lsn)
        .args(extra)
}

/// Inserts row `id` and returns `pg_current_wal_insert_lsn()` taken right after the commit,
/// and when the commit returned. With `then_unpublished`, a transaction on a table pgcdc does
/// not capture commits in between: its WAL lies below the LSN, and only PostgreSQL's
/// keepalives (no event, no commit pgcdc sees) can carry the published position past it.
async fn write_row(
    client: &tokio_postgres::Client,
    id: i32,
    then_unpublished: bool,
) -> (String, Instant) {
    client
        .execute("INSERT INTO items VALUES ($1, $1)", &[&id])
        .await
        .expect("insert");
    let committed = Instant::now();
    if then_unpublished {
        client
            .execute("INSERT INTO other VALUES ($1)", &[&id])
            .await
            .expect("insert");
    }
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("insert lsn");
    (row.get(0), committed)
}

/// Whether row `id`'s insert is in the topic now: read up to the current high watermarks.
async fn readable_now(p: &Pipeline, id: i64) -> bool {
    let cfg = KafkaConfig::new(kafka());
    let topic = p.topic("items");
    let records = tokio::task::spawn_blocking(move || {
        read_topic(&cfg, &topic, ReadStop::HighWatermark).expect("topic readable")
    })
    .await
    .unwrap();
    records.iter().any(|r| {
        let v: serde_json::Value = r
            .value
            .as_deref()
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default();
        v["op"] == "c" && v["after"]["id"] == id
    })
}

/// The address `--metrics-addr 127.0.0.1:0` bound, from the log.
fn bound_addr(log: &str) -> String {
    log.split("serving metrics on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("the bound address is logged")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_returns_once_the_write_is_readable_and_ends_cleanly_otherwise() {
    let p = Pipeline::new(ITEMS).await;
    let mut child = p.spawn(
        &["--table", "public.items", "--metrics-addr", "127.0.0.1:0"],
        "run.log",
    );
    p.wait_for_log("run.log", "streaming changes").await;
    let addr = bound_addr(&p.log("run.log"));
    let client = p.db.client().await;
    let mut timings = Vec::new();

    // 1. The long poll itself, asked at once after the commit; nothing is written after it
    // (or only WAL pgcdc publishes nothing for).
    for (id, then_unpublished) in [(100, false), (101, false), (102, true), (103, true)] {
        let (lsn, committed) = write_row(&client, id, then_unpublished).await;
        let (code, body) = get(
            &addr,
            &format!("/wait?lsn={lsn}&timeout=20s"),
            Duration::from_secs(30),
        );
        let took = committed.elapsed();
        assert_eq!(code, 200, "{body}\n{}", p.log("run.log"));
        assert_eq!(body["reached"], true, "{body}");
        assert_eq!(body["lsn"], lsn.as_str(), "{body}");
        let published: common::api::Lsn = body["published"].as_str().unwrap().parse().unwrap();
        assert!(published >= lsn.parse().unwrap(), "{body}");
        assert!(
            readable_now(&p, id.into()).await,
            "row {id} is not in the topic after /wait said {body}"
        );
        timings.push((
            if then_unpublished {
                "GET /wait (past unpublished WAL)"
            } else {
                "GET /wait"
            },
            took,
        ));
    }

    // 2. `pgcdc wait --url`, and 3. `pgcdc wait` on the slot.
    for (id, via_url) in [(200, true), (201, false)] {
        let (lsn, committed) = write_row(&client, id, false).await;
        let url = format!("http://{addr}");
        let extra: &[&str] = if via_url {
            &["--url", &url, "--timeout", "20"]
        } else {
            &["--timeout", "20"]
        };
        let out = wait_cmd(&p, &lsn, extra).output();
        let took = committed.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        let published: common::api::Lsn = stdout.trim().parse().expect("prints the position");
        assert!(published >= lsn.parse().unwrap(), "{stdout}");
        assert!(
            readable_now(&p, id.into()).await,
            "row {id} is not in the topic after pgcdc wait said {stdout}"
        );
        timings.push((
            if via_url {
                "pgcdc wait --url"
            } else {
                "pgcdc wait (slot)"
            },
            took,
        ));
    }

    // A position far ahead: 504 with the published position, exit 6 from the command.
    let (code, body) = get(
        &addr,
        "/wait?lsn=FFFF/0&timeout=500ms",
        Duration::from_secs(10),
    );
    assert_eq!(code, 504, "{body}");
    assert_eq!(body["reached"], false, "{body}");
    assert_eq!(body["lsn"], "FFFF/0", "{body}");
    assert!(body["published"].as_str().is_some(), "{body}");
    let url = format!("http://{addr}");
    let out = wait_cmd(&p, "FFFF/0", &["--url", &url, "--timeout", "1"]).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("has not published that far"), "{stderr}");

    // Bad requests say what a valid one looks like.
    for bad in [
        "/wait?lsn=banana",
        "/wait",
        "/wait?lsn=0/1&timeout=1h",
        "/wait?lsn=0/1&timeout=301",
    ] {
        let (code, body) = get(&addr, bad, Duration::from_secs(5));
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("e.g.")
                || e.contains("lsn is missing")
                || e.contains("at most 300s")),
            "{bad}: {body}"
        );
    }
    let out = wait_cmd(&p, "banana", &["--url", &url]).output();
    assert_eq!(out.status.code(), Some(2));

    // A stop ends a wait in progress (503), long before its timeout.
    let waiting = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let t = Instant::now();
            let r = get(
                &addr,
                "/wait?lsn=FFFF/0&timeout=120s",
                Duration::from_secs(60),
            );
            (r, t.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(child.id(), "-TERM");
    let ((code, body), took) = waiting.join().unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopping")),
        "{body}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{}", p.log("run.log"));

    // pgcdc stopped: both ways time out with exit 6 and say why.
    let out = wait_cmd(&p, "0/1", &["--url", &url, "--timeout", "1"]).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("cannot reach pgcdc"), "{stderr}");
    let out = wait_cmd(&p, "0/1", &["--timeout", "1"]).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("inactive: no pgcdc is running"), "{stderr}");
    // A slot that does not exist.
    let out = wait_cmd(&p, "0/1", &["--timeout", "0.2"])
        .set("--slot", "no_such_slot")
        .output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    let line = timings
        .iter()
        .map(|(what, t)| format!("{what} {} ms", t.as_millis()))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("commit → wait returned: {line}");
    common::append_summary("wait-latency.txt", &line);
}

/// During the snapshot nothing is published until the whole snapshot is acknowledged — even
/// though the slot already stands at the snapshot's point, past every row the snapshot holds.
/// The sink here is stdout into a pipe nobody reads yet: the snapshot cannot be acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_claimed_before_the_snapshot_is_acknowledged() {
    let p = Pipeline::new(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, repeat('z', 2000) FROM generate_series(1, 5000) g;",
    )
    .await;
    let client = p.db.client().await;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let file = p.dir.join("progress.json");
    let cmd = p
        .pgcdc("run")
        .unset("--kafka")
        .args([
            "--sink",
            "stdout",
            "--progress-file",
            file.to_str().unwrap(),
            "--table",
            "public.items",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .command();
    let (mut child, stdout) = common::process::spawn_piped(cmd, &p.dir.join("run.log"));
    p.wait_for_log("run.log", "snapshot exported").await;
    let addr = bound_addr(&p.log("run.log"));
    // The run's slot exists (copied from the snapshot's) and stands past the rows.
    let slot_at = common::poll_until(Duration::from_secs(20), || p.confirmed_flush()).await;
    let lsn_value: common::api::Lsn = lsn.parse().unwrap();
    assert!(
        slot_at.is_some_and(|c| c >= lsn_value.0),
        "slot at {slot_at:?}\n{}",
        p.log("run.log")
    );

    let (code, body) = get(
        &addr,
        &format!("/wait?lsn={lsn}&timeout=1s"),
        Duration::from_secs(10),
    );
    assert_eq!(code, 503, "{body}\n{}", p.log("run.log"));
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing is published yet")),
        "{body}"
    );
    let out = wait_cmd(&p, &lsn, &["--timeout", "1"]).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("a pgcdc runs for it"), "{stderr}");

    // Reading the output lets the snapshot be acknowledged; then the wait succeeds.
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().count()
    });
    let (code, body) = get(
        &addr,
        &format!("/wait?lsn={lsn}&timeout=60s"),
        Duration::from_secs(90),
    );
    assert_eq!(code, 200, "{body}\n{}", p.log("run.log"));
    let out = wait_cmd(&p, &lsn, &["--timeout", "20"]).output();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    signal(child.id(), "-TERM");
    assert!(child.wait().unwrap().success(), "{}", p.log("run.log"));
    assert!(reader.join().unwrap() >= 5000);
}

/// The indexer's `/wait`: once it answers, the write is in the index (here `--target
/// stdout`, whose lines are written and flushed per batch) — also an UPDATE after which
/// nothing is written — and `/status` tells the highest commit LSN applied per index.
#[tokio::test(flavor = "multi_thread")]
async fn the_indexer_answers_once_the_write_is_in_the_index() {
    let p = Pipeline::new(ITEMS).await;
    let mut run = p.spawn(
        &["--table", "public.items", "--metrics-addr", "127.0.0.1:0"],
        "run.log",
    );
    p.wait_for_log("run.log", "streaming changes").await;
    let pgcdc_addr = bound_addr(&p.log("run.log"));
    let out_path = p.dir.join("indexer.jsonl");
    let log_path = p.dir.join("indexer.log");
    let mut indexer = std::process::Command::new(env!("CARGO_BIN_EXE_pgcdc-indexer"))
        .args(["--kafka", &kafka(), "--topic", &p.topic("items")])
        .args(["--target", "stdout", "--http-addr", "127.0.0.1:0"])
        .args(["--pgcdc-url", &format!("http://{pgcdc_addr}")])
        .env_remove("PGCDC_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("pgcdc-indexer starts");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let addr = common::poll_until(Duration::from_secs(30), || async {
        log()
            .split("serving read-your-writes on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .map(str::to_string)
    })
    .await
    .unwrap_or_else(|| panic!("no address logged:\n{}", log()));
    let client = p.db.client().await;
    let upserted = |id: i64, n: i64| {
        std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["action"] == "upsert" && v["doc"]["id"] == id && v["doc"]["n"] == n)
    };
    let mut timings = Vec::new();
    for (sql, id, n) in [
        ("INSERT INTO items VALUES (300, 1)", 300, 1),
        ("UPDATE items SET n = 2 WHERE id = 300", 300, 2),
        ("UPDATE items SET n = 3 WHERE id = 300", 300, 3),
    ] {
        client.execute(sql, &[]).await.unwrap();
        let committed = Instant::now();
        let lsn: String = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let (code, body) = get(
            &addr,
            &format!("/wait?lsn={lsn}&timeout=30s"),
            Duration::from_secs(40),
        );
        timings.push(committed.elapsed());
        assert_eq!(code, 200, "{body}\n{}", log());
        assert_eq!(body["reached"], true, "{body}");
        assert!(
            upserted(id, n),
            "{sql}: not in the index after {body}\n{}",
            log()
        );
    }
    let (code, status) = get(&addr, "/status", Duration::from_secs(5));
    assert_eq!(code, 200, "{status}");
    let applied: common::api::Lsn = status["indexes"]["items"]["applied_lsn"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}"))
        .parse()
        .unwrap();
    assert!(applied.is_valid(), "{status}");
    // Far ahead: 504 with the position known to be indexed.
    let (code, body) = get(
        &addr,
        "/wait?lsn=FFFF/0&timeout=1s",
        Duration::from_secs(10),
    );
    assert_eq!(code, 504, "{body}");
    assert!(body["published"].as_str().is_some(), "{body}");

    signal(indexer.id(), "-TERM");
    let _ = indexer.wait();
    signal(run.id(), "-TERM");
    let _ = run.wait();
    let line = timings
        .iter()
        .map(|t| format!("{} ms", t.as_millis()))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("commit → indexer /wait returned: {line}");
    common::append_summary("wait-latency.txt", &format!("indexer: {line}"));
}
