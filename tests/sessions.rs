//! pgcdc's sessions and processes: the locks its snapshot takes, the server timeouts it pins,
//! one process per slot, the metrics endpoint and `--stop-lsn now` across an in-process
//! restart, and stop signals during waits. The real binary against the real servers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::pipeline::{assert_success, Pipeline};
use common::process::{sigterm, sigterm_timed, wait_exit};
use common::{proxy, servers};
use serde_json::Value;

/// The run logging to `run.log` exited 0 within 3 s of its SIGTERM.
fn assert_exited_0_at_once(p: &Pipeline, status: Option<ExitStatus>, took: Duration) {
    let log = p.log("run.log");
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    assert!(took < Duration::from_secs(3), "took {took:?}\n{log}");
}

/// Starts `cmd` with stderr to `log` in the pipeline's directory and stdout to `out` there
/// (or nowhere).
fn spawn_logged(p: &Pipeline, mut cmd: Command, log: &str, out: Option<&str>) -> Child {
    let err = std::fs::File::create(p.dir.join(log)).expect("log file");
    let stdout = match out {
        Some(name) => Stdio::from(std::fs::File::create(p.dir.join(name)).expect("out file")),
        None => Stdio::null(),
    };
    cmd.stdout(stdout)
        .stderr(err)
        .spawn()
        .expect("pgcdc starts")
}

/// The stdout sink's lines: topic → keys' `id`s of read events.
fn read_ids(stdout: &str) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        let topic = v["topic"].as_str().expect("topic").to_string();
        if let Some(id) = v["key"]["id"].as_i64() {
            out.entry(topic).or_default().push(id);
        }
    }
    out
}

/// Tables `a` (10 rows) and `b` (100 rows), and `c` for a backlog.
const THREE_TABLES: &str = "CREATE TABLE public.a (id int PRIMARY KEY, x int);
     CREATE TABLE public.b (id int PRIMARY KEY, x int);
     CREATE TABLE public.c (id int PRIMARY KEY, v text);
     INSERT INTO a SELECT g, g FROM generate_series(1, 10) g;
     INSERT INTO b SELECT g, g FROM generate_series(1, 100) g;";

const ABC: [&str; 6] = [
    "--table", "public.a", "--table", "public.b", "--table", "public.c",
];

/// A pgcdc stopped between its snapshot's consistent point and the snapshot itself: it was
/// started with `--snapshot always` on a slot that holds a backlog, so it first publishes the
/// backlog up to the consistent point, to a stdout pipe nobody reads yet. Returns the process
/// (its log is `run.log`) and its stdout; `extra` is added to its flags.
async fn held_before_the_snapshot(
    p: &Pipeline,
    extra: &[&str],
) -> (Child, std::process::ChildStdout) {
    let progress = p.dir.join("progress.json");
    let progress = progress.to_str().unwrap();
    let stdout_sink = ["--sink", "stdout", "--progress-file", progress];
    let mut first = p.command(&ABC);
    first
        .args(stdout_sink)
        .args(["--snapshot", "never", "--stop-lsn", "now"]);
    assert_success(
        &output_within(first, "slot creation").await,
        "slot creation",
    );
    p.db.client()
        .await
        .batch_execute("INSERT INTO c SELECT g, repeat('c', 300) FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    let mut cmd = p.command(&ABC);
    cmd.args(stdout_sink)
        .args(["--snapshot", "always", "--stop-lsn", "now"])
        .args(extra);
    let (child, stdout) = common::process::spawn_piped(cmd, &p.dir.join("run.log"));
    p.wait_for_log("run.log", "snapshot exported").await;
    (child, stdout)
}

/// Reads `stdout` to its end on a thread of its own.
fn read_all(mut stdout: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    })
}

/// Reads the held run's output until it ends (at most 90 s): its exit status (None: killed
/// after the wait), its stdout and its log.
async fn run_to_the_end(
    p: &Pipeline,
    child: &mut Child,
    stdout: ChildStdout,
) -> (Option<ExitStatus>, String, String) {
    let reader = read_all(stdout);
    let status = wait_exit(child, Duration::from_secs(90)).await;
    let out = reader.join().unwrap();
    (status, out, p.log("run.log"))
}

/// Issue 17, item 8: a table rewritten (here `ALTER COLUMN … TYPE`) after the snapshot's
/// consistent point looks empty to the exported snapshot, and the rewrite is not decoded as
/// row changes. `b` is rewritten while pgcdc still publishes a backlog, after its consistent
/// point and before its snapshot. Every row of `b` must still be published, with one
/// connection and with several.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_rewritten_after_the_consistent_point_is_snapshotted_again() {
    for workers in ["1", "2"] {
        let p = Pipeline::new(THREE_TABLES).await;
        let (mut child, stdout) =
            held_before_the_snapshot(&p, &["--snapshot-workers", workers]).await;
        p.db.client()
            .await
            .batch_execute("ALTER TABLE b ALTER COLUMN x TYPE bigint")
            .await
            .unwrap();
        let (status, out, log) = run_to_the_end(&p, &mut child, stdout).await;
        let status = status.unwrap_or_else(|| panic!("pgcdc did not finish:\n{log}"));
        assert!(status.success(), "exit {status:?}\n{log}");
        let ids = read_ids(&out);
        let set = |t: &str| -> BTreeSet<i64> {
            ids.get(&p.topic(t))
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect()
        };
        assert_eq!(
            set("b"),
            (1..=100).collect::<BTreeSet<i64>>(),
            "workers {workers}: every row of b must be published\n{log}"
        );
        assert_eq!(
            set("a"),
            (1..=10).collect::<BTreeSet<i64>>(),
            "workers {workers}\n{log}"
        );
        assert_eq!(set("c").len(), 5000, "workers {workers}\n{log}");
        assert!(
            log.contains("rewritten"),
            "workers {workers}: the log must say why the snapshot started again:\n{log}"
        );
    }
}

/// The stdout sink's read events: topic → `after` of each.
fn reads(stdout: &str) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        if v["value"]["op"] == "r" {
            let topic = v["topic"].as_str().expect("topic").to_string();
            out.entry(topic)
                .or_default()
                .push(v["value"]["after"].clone());
        }
    }
    out
}

/// The sorted column names of `after` objects.
fn column_names(rows: &[Value]) -> BTreeSet<Vec<String>> {
    rows.iter()
        .map(|r| {
            let mut names: Vec<String> =
                r.as_object().expect("an object").keys().cloned().collect();
            names.sort();
            names
        })
        .collect()
}

/// Issue 17 (the generator's `DdlDuringSnapshot`): columns renamed or dropped after the
/// snapshot's consistent point but before its lock made its `COPY` fail ("column … does not
/// exist", exit 3): pgcdc read the columns at start. Now the snapshot starts again and reads
/// the table as it is. A column added then is simply not read (rows as of the consistent
/// point did not have it), without a restart: `a_column_added_after_the_consistent_point_…`.
#[tokio::test(flavor = "multi_thread")]
async fn columns_renamed_or_dropped_before_the_snapshot_lock_start_it_again() {
    for workers in ["1", "2"] {
        let p = Pipeline::new(THREE_TABLES).await;
        let (mut child, stdout) =
            held_before_the_snapshot(&p, &["--snapshot-workers", workers]).await;
        p.db.client()
            .await
            .batch_execute("ALTER TABLE b RENAME COLUMN x TO y; ALTER TABLE a DROP COLUMN x")
            .await
            .unwrap();
        let (status, out, log) = run_to_the_end(&p, &mut child, stdout).await;
        let status = status.unwrap_or_else(|| panic!("pgcdc did not finish:\n{log}"));
        assert!(
            status.success(),
            "workers {workers}: exit {status:?}\n{log}"
        );
        let reads = reads(&out);
        let of = |t: &str| reads.get(&p.topic(t)).cloned().unwrap_or_default();
        let want = |names: &[&str]| -> BTreeSet<Vec<String>> {
            [names.iter().map(|n| n.to_string()).collect()].into()
        };
        assert_eq!(of("b").len(), 100, "workers {workers}\n{log}");
        assert_eq!(
            column_names(&of("b")),
            want(&["id", "y"]),
            "workers {workers}"
        );
        assert_eq!(of("a").len(), 10, "workers {workers}\n{log}");
        assert_eq!(column_names(&of("a")), want(&["id"]), "workers {workers}");
        assert!(
            log.contains("dropped or renamed after the snapshot's consistent point")
                && log.contains("starting again"),
            "workers {workers}: the log must say which table and why:\n{log}"
        );
    }
}

/// A column added after the snapshot's consistent point, before its lock: the snapshot reads
/// the rows as of that point, without it and without starting again; the stream then brings the
/// new shape, with the column's value, for the rows that change.
#[tokio::test(flavor = "multi_thread")]
async fn a_column_added_after_the_consistent_point_is_not_read_and_streamed_after() {
    let p = Pipeline::new(THREE_TABLES).await;
    let (mut child, stdout) = held_before_the_snapshot(&p, &[]).await;
    let client = p.db.client().await;
    client
        .batch_execute("ALTER TABLE a ADD COLUMN w int DEFAULT 7")
        .await
        .unwrap();
    let (status, out, log) = run_to_the_end(&p, &mut child, stdout).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    assert!(!log.contains("starting again"), "{log}");
    let a = reads(&out).remove(&p.topic("a")).unwrap_or_default();
    assert_eq!(a.len(), 10, "{log}");
    assert_eq!(
        column_names(&a),
        [vec!["id".to_string(), "x".to_string()]].into(),
        "rows as of the consistent point"
    );
    // The stream: the new shape.
    client
        .batch_execute("UPDATE a SET x = -1 WHERE id = 1")
        .await
        .unwrap();
    let progress = p.dir.join("progress.json");
    let mut cmd = p.command(&ABC);
    cmd.args([
        "--sink",
        "stdout",
        "--progress-file",
        progress.to_str().unwrap(),
    ])
    .args(["--stop-lsn", "now"]);
    let out = output_within(cmd, "stream").await;
    assert_success(&out, "stream");
    let update = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["value"]["op"] == "u")
        .expect("the update");
    assert_eq!(
        update["value"]["after"],
        serde_json::json!({"id": 1, "x": -1, "w": 7})
    );
}

/// Issue 17 (the generator's `DdlDuringSnapshot`): pgcdc reads the catalog, then creates its
/// slot, whose consistent point waits here for a transaction that was already running. A
/// column dropped or added, or a publication's column list changed, in between: the
/// snapshot would have read the columns of before (a `COPY` that fails, a column missing from
/// every read, or an unpublished column published). Now it starts again with the catalog as
/// it is at its consistent point.
#[tokio::test(flavor = "multi_thread")]
async fn the_catalog_changed_before_the_consistent_point_starts_the_snapshot_again() {
    let cases = [
        (
            "ALTER TABLE b DROP COLUMN x",
            "b",
            vec!["id"],
            "was dropped or renamed",
        ),
        (
            "ALTER TABLE b ADD COLUMN z int DEFAULT 5",
            "b",
            vec!["id", "x", "z"],
            "was added",
        ),
        (
            "ALTER PUBLICATION {pub} SET TABLE a (id), b",
            "a",
            vec!["id"],
            "publication",
        ),
    ];
    for (ddl, table, columns, why) in cases {
        let p = Pipeline::new(THREE_TABLES).await;
        let admin = p.db.client().await;
        admin
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE a (id, x), b WITH (publish_via_partition_root = true)",
                p.slot
            ))
            .await
            .unwrap();
        let blocker = p.db.client().await;
        blocker
            .batch_execute("BEGIN; SELECT txid_current();")
            .await
            .unwrap();
        let mut cmd = p.command(&["--sink", "stdout", "--snapshot-only"]);
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(p.dir.join("run.log")).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = read_all(stdout);
        let waiting = common::wait_for_count(
            &admin,
            "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND query LIKE 'CREATE_REPLICATION_SLOT%'
                       AND wait_event_type = 'Lock'",
        )
        .await;
        assert!(
            waiting,
            "{ddl}: slot creation never waited:\n{}",
            p.log("run.log")
        );
        admin
            .batch_execute(&ddl.replace("{pub}", &p.slot))
            .await
            .unwrap();
        blocker.batch_execute("COMMIT").await.unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(60)).await;
        let out = reader.join().unwrap();
        let log = p.log("run.log");
        assert!(
            status.is_some_and(|s| s.success()),
            "{ddl}: {status:?}\n{log}"
        );
        let rows = reads(&out).remove(&p.topic(table)).unwrap_or_default();
        assert_eq!(
            rows.len(),
            if table == "a" { 10 } else { 100 },
            "{ddl}\n{log}"
        );
        let want: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        assert_eq!(column_names(&rows), [want].into(), "{ddl}\n{log}");
        assert!(
            log.contains(why) && log.contains("starting again"),
            "{ddl}:\n{log}"
        );
    }
}

/// Issue 17, item 8 (the parallel path): a session that asks for a conflicting lock while
/// the coordinator holds the tables (here `ALTER TABLE c`) waits for the coordinator; a worker
/// that then starts on `c` queued behind it, and the coordinator waited for that worker: a
/// deadlock PostgreSQL cannot detect. The snapshot must give way and start again instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_request_during_a_parallel_snapshot_does_not_deadlock_it() {
    let p = Pipeline::new(
        "CREATE TABLE public.big1 (id int PRIMARY KEY, v text);
         CREATE TABLE public.big2 (id int PRIMARY KEY, v text);
         CREATE TABLE public.c (id int PRIMARY KEY, x int);
         INSERT INTO big1 SELECT g, repeat('x', 200) FROM generate_series(1, 30000) g;
         INSERT INTO big2 SELECT g, repeat('y', 200) FROM generate_series(1, 30000) g;
         INSERT INTO c SELECT g, g FROM generate_series(1, 10) g;",
    )
    .await;
    let admin = p.db.client().await;
    let (mut child, stdout) = common::process::spawn_piped(
        p.command(&[
            "--table",
            "public.big1",
            "--table",
            "public.big2",
            "--table",
            "public.c",
            "--sink",
            "stdout",
            "--snapshot-only",
            "--snapshot-workers",
            "2",
        ]),
        &p.dir.join("run.log"),
    );
    // Both workers read a big table, and wait for their output to be read.
    for t in ["big1", "big2"] {
        p.wait_for_log(
            "run.log",
            &format!("snapshot: reading table table=\"public\".\"{t}\""),
        )
        .await;
    }
    let alter = p.db.client().await;
    let altered = tokio::spawn(async move {
        alter
            .batch_execute("ALTER TABLE c ADD COLUMN z int")
            .await
            .map_err(|e| e.to_string())
    });
    let waiting = common::wait_for_count(&admin, "SELECT count(*) FROM pg_locks
                 WHERE relation = 'public.c'::regclass AND mode = 'AccessExclusiveLock' AND NOT granted").await;
    assert!(waiting, "the ALTER never waited:\n{}", p.log("run.log"));
    let reader = read_all(stdout);
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    // Ends the ALTER's wait in any case (if pgcdc was killed above).
    altered.await.unwrap().expect("the ALTER ran");
    let out = reader.join().unwrap();
    let log = p.log("run.log");
    let status = status.unwrap_or_else(|| panic!("pgcdc never finished (a deadlock):\n{log}"));
    assert!(status.success(), "exit {status:?}\n{log}");
    let ids = read_ids(&out);
    for (t, n) in [("big1", 30000), ("big2", 30000), ("c", 10)] {
        let set: BTreeSet<i64> = ids
            .get(&p.topic(t))
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(set.len(), n, "{t}\n{log}");
    }
    assert!(log.contains("gives way"), "{log}");
}

/// Issue 17, item 9: a database's `statement_timeout` and `idle_in_transaction_session_timeout`
/// shorter than the snapshot must not end it. The output is not read for a while, so the
/// snapshot's COPY lasts longer than the timeouts, and with two workers the coordinator sits
/// idle in its transaction meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn database_timeouts_shorter_than_the_snapshot_do_not_end_it() {
    let p = Pipeline::new(
        "CREATE TABLE public.big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 60000) g;",
    )
    .await;
    p.db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET statement_timeout = '300ms';
             ALTER DATABASE {db} SET idle_in_transaction_session_timeout = '300ms';
             ALTER DATABASE {db} SET lock_timeout = '300ms';",
            db = p.db.name
        ))
        .await
        .unwrap();
    for workers in ["1", "2"] {
        let (mut child, mut stdout) = common::process::spawn_piped(
            p.command(&[
                "--table",
                "public.big",
                "--sink",
                "stdout",
                "--snapshot-only",
                "--snapshot-workers",
                workers,
            ]),
            &p.dir.join("run.log"),
        );
        // Not reading: the snapshot stalls on a full pipe for longer than the timeouts.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let status = wait_exit(&mut child, Duration::from_secs(90)).await;
        let out = reader.join().unwrap();
        let log = p.log("run.log");
        let status = status.unwrap_or_else(|| panic!("workers {workers}: never finished:\n{log}"));
        assert!(
            status.success(),
            "workers {workers}: exit {status:?}\n{log}"
        );
        let ids: BTreeSet<i64> = read_ids(&out)
            .remove(&p.topic("big"))
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(ids.len(), 60000, "workers {workers}\n{log}");
        assert!(
            !log.contains("starting again"),
            "workers {workers}: the snapshot was ended by a timeout:\n{log}"
        );
    }
}

/// `pgcdc drop` for this pipeline.
fn drop_command(p: &Pipeline, progress_file: &str) -> Command {
    p.pgcdc("drop")
        .unset("--kafka")
        .set("--progress-file", progress_file)
        .args(["--yes"])
        .command()
}

/// Runs `cmd` for at most 60 s.
async fn output_within(mut cmd: Command, what: &str) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let status = status.unwrap_or_else(|| {
        panic!(
            "{what} did not end within 60 s:\n{}",
            String::from_utf8_lossy(&stderr)
        )
    });
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Issue 17, item 10: while the first pgcdc takes its snapshot only a temporary slot is held,
/// so nothing stopped a second `pgcdc run` on the same `--slot`, nor `pgcdc drop`. Both must be
/// refused (exit 3, naming the holder) while the first runs — here its snapshot waits for its
/// output to be read — and a new run may start once it ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_the_same_slot_is_refused() {
    let p = Pipeline::new(
        "CREATE TABLE public.big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 30000) g;",
    )
    .await;
    let progress = p.dir.join("progress.json");
    let progress = progress.to_str().unwrap();
    let args = [
        "--table",
        "public.big",
        "--sink",
        "stdout",
        "--progress-file",
        progress,
    ];
    let (mut first, stdout) =
        common::process::spawn_piped(p.command(&args), &p.dir.join("first.log"));
    p.wait_for_log("first.log", "snapshot: reading table").await;

    let second = output_within(p.command(&args), "the second pgcdc").await;
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(3), "stderr:\n{err}");
    let quoted = format!("`{}`", p.slot);
    for needle in [quoted.as_str(), "another pgcdc", "backend pid"] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    assert!(
        second.stdout.is_empty(),
        "the second pgcdc published:\n{err}"
    );
    assert!(
        !err.contains("snapshot exported"),
        "the second pgcdc must not start a snapshot:\n{err}"
    );

    let dropped = output_within(drop_command(&p, progress), "pgcdc drop").await;
    let err = String::from_utf8_lossy(&dropped.stderr);
    assert_eq!(dropped.status.code(), Some(3), "stderr:\n{err}");
    assert!(err.contains("another pgcdc"), "stderr:\n{err}");

    let reader = read_all(stdout);
    p.wait_for_log("first.log", "streaming changes").await;
    sigterm(&first);
    let status = wait_exit(&mut first, Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "first: {status:?}\n{}",
        p.log("first.log")
    );
    let out = reader.join().unwrap();
    let ids: BTreeSet<i64> = read_ids(&out)
        .remove(&p.topic("big"))
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(ids.len(), 30000, "{}", p.log("first.log"));
    // Once the first one ended, the next may start.
    let mut third = p.command(&args);
    third.args(["--stop-lsn", "now"]);
    assert_success(
        &output_within(third, "the third pgcdc").await,
        "a run after the first ended",
    );
}

/// Issue 17, items 9 and 10: with `idle_session_timeout` (PostgreSQL 14+) on the database,
/// pgcdc's idle connections are not ended, so the lock that keeps a second process away
/// stays held while pgcdc streams an idle database.
#[tokio::test(flavor = "multi_thread")]
async fn idle_session_timeout_does_not_release_the_slot() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY, v text);").await;
    let admin = p.db.client().await;
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .unwrap()
        .get(0);
    if version < 140000 {
        common::skip("idle_session_timeout", "PostgreSQL 14+ only");
        return;
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET idle_session_timeout = '500ms'",
            p.db.name
        ))
        .await
        .unwrap();
    let table = ["--table", "public.t"];
    let mut first = spawn_logged(&p, p.command(&table), "first.log", None);
    p.wait_for_log("first.log", "streaming changes").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = output_within(p.command(&table), "the second pgcdc").await;
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(3), "stderr:\n{err}");
    assert!(err.contains("another pgcdc"), "stderr:\n{err}");
    admin
        .batch_execute("INSERT INTO t VALUES (1, 'after the idle time')")
        .await
        .unwrap();
    assert_eq!(p.events("t", Some(1)).await.len(), 1);
    sigterm(&first);
    let status = wait_exit(&mut first, Duration::from_secs(30)).await;
    let log = p.log("first.log");
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    assert!(
        !log.contains("idle-session timeout") && !log.contains("connection failed"),
        "a connection of pgcdc was ended:\n{log}"
    );
}

/// Issue 17, item 10: the slot's lock goes with its connection. After PostgreSQL ended every
/// session of pgcdc, it takes the lock again before it streams again, and a second process is
/// still refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_slot_lock_is_taken_again_after_its_connection_was_lost() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY, v text);").await;
    let admin = p.db.client().await;
    let table = ["--table", "public.t"];
    let mut first = spawn_logged(&p, p.command(&table), "first.log", None);
    p.wait_for_log("first.log", "streaming changes").await;
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
    p.wait_for_log("first.log", "taking the lock again").await;
    let again = common::poll_until(Duration::from_secs(30), || async {
        (p.log("first.log").matches("streaming changes").count() >= 2).then_some(())
    })
    .await;
    assert!(
        again.is_some(),
        "never streamed again:\n{}",
        p.log("first.log")
    );
    let second = output_within(p.command(&table), "the second pgcdc").await;
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(3), "stderr:\n{err}");
    assert!(err.contains("another pgcdc"), "stderr:\n{err}");
    admin
        .batch_execute("INSERT INTO t VALUES (1, 'after the reconnect')")
        .await
        .unwrap();
    assert_eq!(p.events("t", Some(1)).await.len(), 1);
    sigterm(&first);
    let status = wait_exit(&mut first, Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        p.log("first.log")
    );
}

/// Terminates the backend running the snapshot's COPY, once one runs.
async fn terminate_snapshot_copy(p: &Pipeline, log: &str) {
    let admin = p.db.client().await;
    let terminated = common::wait_for_count(
        &admin,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND state = 'active' AND query ILIKE 'COPY%'",
    )
    .await;
    assert!(
        terminated,
        "no snapshot COPY was seen running:\n{}",
        p.log(log)
    );
}

/// Issue 17, item 11: an in-process restart of the pipeline (here: the snapshot's backend is
/// terminated) must not bind `--metrics-addr` again — which failed with exit 2 — and the
/// endpoint keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_survives_an_in_process_restart() {
    let p = Pipeline::new(
        "CREATE TABLE public.big (id int PRIMARY KEY, v text, n int);
         INSERT INTO public.big SELECT g, repeat('x', 300), g FROM generate_series(1, 100000) g;",
    )
    .await;
    let port = servers::free_port();
    let addr = format!("127.0.0.1:{port}");
    let cmd = p.command(&["--table", "public.big", "--metrics-addr", &addr]);
    let mut child = spawn_logged(&p, cmd, "run.log", None);
    terminate_snapshot_copy(&p, "run.log").await;
    p.wait_for_log("run.log", "starting again with a new snapshot")
        .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !p.log("run.log").contains("streaming changes") {
        let log = p.log("run.log");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pgcdc ended after the restart ({status:?}):\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "never streamed after the restart:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = p.log("run.log");
    let (code, metrics) = common::http_get(&addr, "/metrics").unwrap_or_default();
    assert!(
        code == 200 && metrics.contains("pgcdc_snapshot_rows"),
        "{code} {metrics}\n{log}"
    );
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        p.log("run.log")
    );
}

/// Issue 17, item 11: `--stop-lsn now` is the position when the process started, also after
/// the pipeline started again inside the process (here: Kafka failed a delivery while the
/// link to the broker was silent). A transaction committed after the start is not published.
#[tokio::test(flavor = "multi_thread")]
async fn stop_lsn_now_is_the_process_start_also_after_a_restart() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY, v text);").await;
    let proxy_port = servers::free_port();
    let broker = servers::PrivateBroker::start_advertising(Some(proxy_port));
    let proxy = proxy::Proxy::start_on(proxy_port, broker.port);
    let bootstrap = broker.bootstrap();
    let args = [
        "--table",
        "public.t",
        "--snapshot",
        "never",
        "--stop-lsn",
        "now",
    ];
    let out = output_within(
        p.command_with(&p.source(), &bootstrap, &args),
        "slot creation",
    )
    .await;
    assert_success(&out, "slot creation");
    let client = p.db.client().await;
    client
        .batch_execute("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    // Records wait 3 s in the producer before they go, and fail 5 s after they were produced.
    let mut cmd = p.command_with(&p.source(), &bootstrap, &args);
    cmd.args(["-X", "linger.ms=3000", "-X", "message.timeout.ms=5000"]);
    let mut child = spawn_logged(&p, cmd, "run.log", None);
    p.wait_for_log("run.log", "streaming changes").await;
    proxy.silence();
    client
        .batch_execute("INSERT INTO t VALUES (11, 'after the start')")
        .await
        .unwrap();
    p.wait_for_log("run.log", "starting again from the last confirmed position")
        .await;
    proxy.restore();
    let status = wait_exit(&mut child, Duration::from_secs(90)).await;
    let log = p.log("run.log");
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    let records = tokio::task::spawn_blocking({
        let topic = p.topic("t");
        move || {
            crate::common::api::read_topic(
                &crate::common::api::KafkaConfig::new(bootstrap),
                &topic,
                crate::common::api::ReadStop::Quiet {
                    expected: None,
                    quiet: Duration::from_secs(3),
                    max_wait: Duration::from_secs(60),
                },
            )
        }
    })
    .await
    .unwrap()
    .unwrap();
    let ids: BTreeSet<i64> = records
        .iter()
        .filter_map(|r| {
            let key: Value = serde_json::from_slice(r.key.as_ref()?).ok()?;
            key["id"].as_i64()
        })
        .collect();
    assert_eq!(
        ids,
        (1..=10).collect::<BTreeSet<i64>>(),
        "only what committed before the start may be published\n{log}"
    );
}

/// Issue 17, item 13: with Kafka unreachable at start-up, SIGTERM ends pgcdc at once (it was
/// logged and ignored until SIGKILL).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_kafka_is_unreachable_at_start_exits_0() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY);").await;
    let closed = format!("127.0.0.1:{}", servers::free_port());
    let cmd = p.command_with(&p.source(), &closed, &["--table", "public.t"]);
    let mut child = spawn_logged(&p, cmd, "run.log", None);
    p.wait_for_log("run.log", "is unreachable").await;
    let (status, took) = sigterm_timed(&mut child, Duration::from_secs(20)).await;
    assert_exited_0_at_once(&p, status, took);
}

/// Issue 17, item 13: SIGTERM while the snapshot waits for a table that another session holds
/// locked ends pgcdc at once with exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_the_snapshot_waits_for_a_lock_exits_0() {
    let p = Pipeline::new(THREE_TABLES).await;
    let admin = p.db.client().await;
    let (mut child, stdout) = held_before_the_snapshot(&p, &[]).await;
    // Taken after the slot was created: an ACCESS EXCLUSIVE lock is written to WAL, so it
    // gives its transaction an id, which slot creation would wait for.
    let locker = p.db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE public.a IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let _reader = read_all(stdout);
    let waiting = common::wait_for_count(
        &admin,
        "SELECT count(*) FROM pg_locks WHERE relation = 'public.a'::regclass AND NOT granted",
    )
    .await;
    assert!(waiting, "pgcdc never waited for a:\n{}", p.log("run.log"));
    // Its transaction has an id, which every slot creation in the cluster waits for.
    let (status, took) = sigterm_timed(&mut child, Duration::from_secs(5)).await;
    locker.batch_execute("COMMIT").await.unwrap();
    assert_exited_0_at_once(&p, status, took);
}

/// Issue 17, item 13: SIGTERM while creating the slot waits for a transaction that was running
/// before (as every slot creation does) ends pgcdc at once with exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_slot_creation_waits_for_a_transaction_exits_0() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY);").await;
    let admin = p.db.client().await;
    let open = p.db.client().await;
    open.batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let mut child = spawn_logged(&p, p.command(&["--table", "public.t"]), "run.log", None);
    let waiting = common::wait_for_count(
        &admin,
        "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND query LIKE 'CREATE_REPLICATION_SLOT%'
                   AND wait_event_type = 'Lock'",
    )
    .await;
    assert!(waiting, "slot creation never waited:\n{}", p.log("run.log"));
    // Every slot creation in the cluster waits for this transaction: not long.
    let (status, took) = sigterm_timed(&mut child, Duration::from_secs(5)).await;
    open.batch_execute("COMMIT").await.unwrap();
    assert_exited_0_at_once(&p, status, took);
}

/// Formats a WAL position as PostgreSQL does.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Issue 17, item 16d: a transaction whose commit LSN (its events' `source.commit_lsn`) is
/// exactly `--stop-lsn` is published once, pgcdc stops after it, and the next run does not
/// publish it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_committed_at_the_stop_lsn_is_published_once() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY, v text);").await;
    let only_t = ["--table", "public.t"];
    assert_success(
        &p.run(&[
            only_t[0],
            only_t[1],
            "--snapshot",
            "never",
            "--stop-lsn",
            "now",
        ]),
        "slot creation",
    );
    let client = p.db.client().await;
    // A second slot, only to learn the commit LSN of the next transaction (its BEGIN message
    // carries it) without consuming pgcdc's slot.
    let aux = format!("{}_aux", p.slot);
    client
        .query_one(
            "SELECT 1 FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&aux],
        )
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO t SELECT g, 'at the stop' FROM generate_series(1, 5) g")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO t SELECT g, 'later' FROM generate_series(6, 8) g")
        .await
        .unwrap();
    let commit_lsn: i64 = client
        .query_one(
            "SELECT ('x' || encode(substring(data from 2 for 8), 'hex'))::bit(64)::int8
             FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                  'proto_version', '1', 'publication_names', $2)
             WHERE get_byte(data, 0) = 66 LIMIT 1",
            &[&aux, &p.slot],
        )
        .await
        .unwrap()
        .get(0);
    client
        .query_one("SELECT 1 FROM pg_drop_replication_slot($1)", &[&aux])
        .await
        .unwrap();
    let stop = lsn_text(commit_lsn as u64);
    let out = output_within(
        {
            let mut c = p.command(&only_t);
            c.args(["--stop-lsn", &stop]);
            c
        },
        "run to the stop",
    )
    .await;
    assert_success(&out, "run to the stop");
    let events = p.events("t", None).await;
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.value.is_some())
        .map(|e| e.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![1, 2, 3, 4, 5],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for e in &events {
        assert_eq!(e.lsn_pair().0, commit_lsn as u64, "commit_lsn of {e:?}");
    }
    assert_success(
        &p.run(&[only_t[0], only_t[1], "--stop-lsn", "now"]),
        "run for the rest",
    );
    let all = p.events("t", Some(8)).await;
    let ids: Vec<i64> = all
        .iter()
        .map(|e| e.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=8).collect::<Vec<i64>>(), "published once each");
}

/// A SIGTERM at any moment after the process started is a graceful stop (exit 0): the
/// signal handlers are installed before pgcdc logs or connects.
///
/// Between `exec` and `main` (the dynamic loader) no program can handle a signal, so a SIGTERM
/// sent the instant `spawn` returns is started with SIGTERM blocked ([`common::cmd::block_sigterm_until_handled`]):
/// pgcdc unblocks it once its handlers are installed. Then, unblocked, a SIGTERM the moment
/// the first log line appears, and a little after.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_right_after_start_exits_0() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY);").await;
    let term = |child: &Child| {
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        // SAFETY: kill(2) of a child not yet waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    };
    for i in 0..5 {
        let log = format!("blocked{i}.log");
        let cmd = p
            .pgcdc("run")
            .args(["--table", "public.t"])
            .block_sigterm()
            .command();
        let mut child = spawn_logged(&p, cmd, &log, None);
        term(&child);
        let status = wait_exit(&mut child, Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "try {i}: SIGTERM at once: {status:?}\n{}",
            p.log(&log)
        );
    }
    for (i, delay_ms) in [0, 0, 0, 1, 5, 20].into_iter().enumerate() {
        let log = format!("run{i}.log");
        let mut child = spawn_logged(&p, p.command(&["--table", "public.t"]), &log, None);
        let logged = common::poll_until(Duration::from_secs(20), || async {
            std::fs::metadata(p.dir.join(&log))
                .is_ok_and(|m| m.len() > 0)
                .then_some(())
        })
        .await;
        assert!(logged.is_some(), "try {i}: nothing logged");
        std::thread::sleep(Duration::from_millis(delay_ms));
        term(&child);
        let status = wait_exit(&mut child, Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "try {i}: SIGTERM {delay_ms} ms after the first log line: {status:?}\n{}",
            p.log(&log)
        );
    }
}
