//! `pgcdc run` end to end: the real binary against the private cluster and the real broker,
//! checked by consuming the topics it wrote.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::api::Version;
use common::api::{KafkaConfig, ReadStop};
use common::pipeline::{assert_fails, assert_success, kafka, Event, Pipeline};
use serde_json::{json, Value};

/// Compares replayed topic state with the table, reporting a few differences, not dumps.
fn assert_same_state(topic: &BTreeMap<i64, Value>, table: &BTreeMap<i64, Value>) {
    common::assert::assert_same(topic, table, "topic != table");
}

/// The state each key ends in, replaying the topic like a consumer would; also checks that
/// per key the version (`(commit_lsn, lsn)`, a read below a change at its `commit_lsn`)
/// never goes backwards except for exact replays of seen events. Snapshot markers are
/// skipped. Returns the final states and the number of replayed (duplicate) events.
fn replay(events: &[Event]) -> (BTreeMap<i64, Value>, usize) {
    let mut state: BTreeMap<i64, Value> = BTreeMap::new();
    let mut seen: HashSet<(i64, u64, u64, String)> = HashSet::new();
    let mut high: BTreeMap<i64, Version> = BTreeMap::new();
    let mut duplicates = 0;
    for e in events {
        if e.is_marker() {
            assert_eq!(e.key, None, "a snapshot marker has no key");
            continue;
        }
        let id = e
            .key
            .as_ref()
            .and_then(|k| k["id"].as_i64())
            .expect("key has an id");
        let Some(v) = &e.value else {
            // A tombstone: the key is gone for a compacted topic.
            assert!(!state.contains_key(&id) || seen.iter().any(|s| s.0 == id));
            continue;
        };
        let (commit_lsn, lsn) = e.lsn_pair();
        let pos = e.version();
        let op = e.op().unwrap_or_default().to_string();
        let fresh = seen.insert((id, commit_lsn, lsn, op.clone()));
        let h = high.entry(id).or_insert(Version::new(0, 0));
        if pos < *h {
            assert!(
                !fresh,
                "key {id}: event at {pos:?} after {h:?} is not a replay: {v}"
            );
            duplicates += 1;
        } else if !fresh {
            duplicates += 1;
        }
        *h = (*h).max(pos);
        match op.as_str() {
            "d" => {
                state.remove(&id);
            }
            _ => {
                state.insert(id, v["after"].clone());
            }
        }
    }
    (state, duplicates)
}

const ITEMS: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text, n int);
     INSERT INTO public.items SELECT g, 'row ' || g, g FROM generate_series(1, 50) g;";

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_changes_exactly_once_and_resume_without_new_snapshot() {
    let p = Pipeline::new(ITEMS).await;
    let out = p.run(&["--table", "public.items", "--stop-lsn", "now"]);
    assert_success(&out, "first run");

    let mut events = p.events("items", Some(51)).await;
    assert_eq!(
        events.len(),
        51,
        "one read event per row, then the snapshot marker"
    );
    let marker = events.pop().expect("the marker");
    assert!(marker.is_marker() && marker.key.is_none(), "{marker:?}");
    assert_eq!(marker.marker_rows(), Some(50));
    assert_eq!(marker.lsn_pair(), events[0].lsn_pair());
    assert!(events.iter().all(|e| e.op() == Some("r")));
    let markers: Vec<&str> = events
        .iter()
        .map(|e| {
            e.value.as_ref().unwrap()["source"]["snapshot"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(markers.iter().filter(|m| **m == "last").count(), 1);
    assert_eq!(markers.last(), Some(&"last"));
    assert_eq!(events[0].key, Some(serde_json::json!({"id": 1})));
    let first = events[0].value.as_ref().unwrap();
    assert_eq!(
        first["after"],
        serde_json::json!({"id": 1, "v": "row 1", "n": 1})
    );
    assert_eq!(first["source"]["table"], "items");
    assert_eq!(first["source"]["connector"], "pgcdc");

    let client = p.db.client().await;
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO items VALUES (51, 'new', 51), (52, 'new', 52);
             UPDATE items SET v = 'changed' WHERE id = 1;
             DELETE FROM items WHERE id = 2;
             COMMIT;
             UPDATE items SET id = 100 WHERE id = 3;
             UPDATE items SET n = n + 1 WHERE id = 4;
             UPDATE items SET n = n + 1 WHERE id = 4;
             UPDATE items SET n = n + 1 WHERE id = 4;
             DELETE FROM items WHERE id = 5;",
        )
        .await
        .unwrap();
    let out = p.run(&["--table", "public.items", "--stop-lsn", "now"]);
    assert_success(&out, "second run");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("resuming from the slot"),
        "second run must resume:\n{log}"
    );

    // 2 inserts, 1 update, delete+tombstone, key change = delete+tombstone+create,
    // 3 updates, delete+tombstone.
    let all = p.events("items", Some(51 + 13)).await;
    assert_eq!(all.len(), 64, "{:#?}", &all[51..]);
    assert_eq!(
        all.iter().filter(|e| e.op() == Some("r")).count(),
        50,
        "no second snapshot"
    );
    assert_eq!(all.iter().filter(|e| e.is_marker()).count(), 1);
    let changes: Vec<(Option<&str>, Value)> = all[51..]
        .iter()
        .map(|e| (e.op(), e.key.clone().unwrap()))
        .collect();
    use serde_json::json;
    assert_eq!(
        changes,
        vec![
            (Some("c"), json!({"id": 51})),
            (Some("c"), json!({"id": 52})),
            (Some("u"), json!({"id": 1})),
            (Some("d"), json!({"id": 2})),
            (None, json!({"id": 2})),
            (Some("d"), json!({"id": 3})),
            (None, json!({"id": 3})),
            (Some("c"), json!({"id": 100})),
            (Some("u"), json!({"id": 4})),
            (Some("u"), json!({"id": 4})),
            (Some("u"), json!({"id": 4})),
            (Some("d"), json!({"id": 5})),
            (None, json!({"id": 5})),
        ]
    );
    // One transaction: one commit_lsn and txId for its four changes.
    let txn: HashSet<String> = all[51..55]
        .iter()
        .filter_map(|e| e.value.as_ref())
        .map(|v| format!("{}/{}", v["source"]["commit_lsn"], v["source"]["txId"]))
        .collect();
    assert_eq!(txn.len(), 1);
    let (state, duplicates) = replay(&all);
    assert_eq!(duplicates, 0);
    assert_same_state(&state, &p.table_rows("items").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_streaming_loses_nothing() {
    let p = Pipeline::new(
        "CREATE TABLE public.hot (id int PRIMARY KEY, c int NOT NULL);
         INSERT INTO public.hot SELECT g, 0 FROM generate_series(1, 10) g;",
    )
    .await;
    let args = ["--table", "public.hot"];
    let mut child = p.spawn(&args, "run0.log");
    let writer = {
        let client = p.db.client().await;
        tokio::spawn(async move {
            for i in 0..400 {
                let sql = if i % 10 == 0 {
                    // A multi-row transaction now and then.
                    "BEGIN; UPDATE hot SET c = c + 1 WHERE id <= 3; UPDATE hot SET c = c + 1 WHERE id = 10; COMMIT;"
                        .to_string()
                } else {
                    format!("UPDATE hot SET c = c + 1 WHERE id = {}", i % 10 + 1)
                };
                client.batch_execute(&sql).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for k in 1..=3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        child.kill().expect("kill -9");
        let _ = child.wait();
        child = p.spawn(&args, &format!("run{k}.log"));
    }
    writer.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    let out = p.run(&["--table", "public.hot", "--stop-lsn", "now"]);
    assert_success(&out, "final run");

    let events = p.events("hot", None).await;
    let (state, duplicates) = replay(&events);
    let table = p.table_rows("hot").await;
    assert_same_state(&state, &table);
    // No loss: from its snapshot value on, every value each counter went through was
    // published (the snapshot may start after the writer's first updates).
    for (id, row) in &table {
        let last = row["c"].as_i64().unwrap();
        let seen: HashSet<i64> = events
            .iter()
            .filter(|e| e.key.as_ref().and_then(|k| k["id"].as_i64()) == Some(*id))
            .filter_map(|e| e.value.as_ref()?["after"]["c"].as_i64())
            .collect();
        let first = seen.iter().copied().min().expect("key has events");
        for c in first..=last {
            assert!(seen.contains(&c), "key {id}: value {c} was never published");
        }
    }
    eprintln!(
        "kill -9 x4: {} events, {duplicates} replayed duplicates",
        events.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_snapshot_then_restart_publishes_everything() {
    let p = Pipeline::new(
        "CREATE TABLE public.big (id int PRIMARY KEY, v text, n int);
         INSERT INTO public.big SELECT g, repeat('x', 300), g FROM generate_series(1, 40000) g;",
    )
    .await;
    let args = ["--table", "public.big"];
    let mut child = p.spawn(&args, "snap.log");
    // Wait until the snapshot is under way, then kill: well before its end even on a fast
    // machine (20,000 of these rows took ~0.5 s in a debug build on a 2-core VM).
    p.wait_for_log("snap.log", "snapshot: reading table").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    let interrupted = !p.log("snap.log").contains("snapshot published");
    assert!(
        interrupted,
        "the kill came after the snapshot finished; make the table bigger"
    );

    p.db.client()
        .await
        .batch_execute("UPDATE big SET n = -n WHERE id % 1000 = 0; DELETE FROM big WHERE id = 7;")
        .await
        .unwrap();
    let out = p.run(&["--table", "public.big", "--stop-lsn", "now"]);
    assert_success(&out, "restart");
    let log = String::from_utf8_lossy(&out.stderr);
    if interrupted {
        assert!(
            log.contains("without a completed snapshot") || log.contains("no snapshot is recorded"),
            "must redo the snapshot:\n{log}"
        );
    }
    let events = p.events("big", None).await;
    let (state, _) = replay(&events);
    assert_same_state(&state, &p.table_rows("big").await);
}

/// PostgreSQL ends the snapshot's connection (`pg_terminate_backend`, as at a restart or a
/// failover): the run starts again with a new snapshot instead of ending with an error.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_connection_lost_starts_again_and_publishes_everything() {
    let p = Pipeline::new(
        "CREATE TABLE public.big (id int PRIMARY KEY, v text, n int);
         INSERT INTO public.big SELECT g, repeat('x', 300), g FROM generate_series(1, 100000) g;",
    )
    .await;
    let mut child = p.spawn(&["--table", "public.big", "--snapshot-only"], "snap.log");
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
        p.log("snap.log")
    );
    let exited = common::poll_until(Duration::from_secs(60), || {
        let r = child.try_wait().ok().flatten();
        async move { r }
    })
    .await
    .expect("pgcdc finishes the snapshot");
    let log = p.log("snap.log");
    assert!(exited.success(), "exit {exited:?}\n{log}");
    assert!(
        log.contains("starting again with a new snapshot"),
        "the run must start again:\n{log}"
    );
    // Both runs' records: the first run's part of the snapshot, then all of it again.
    let published: usize = log
        .lines()
        .filter_map(|l| l.split("SinkSummary { records: ").nth(1)?.split(',').next())
        .map(|n| n.parse::<usize>().expect("record count"))
        .sum();
    let events = p.events("big", Some(published)).await;
    assert_eq!(events.len(), published, "{log}");
    let (state, _) = replay(&events);
    assert_same_state(&state, &p.table_rows("big").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_tables_do_not_pin_wal_and_sigterm_stops_cleanly() {
    let p = Pipeline::new(ITEMS).await;
    let mut child = p.spawn(&["--table", "public.items"], "idle.log");
    p.wait_for_log("idle.log", "streaming changes").await;
    // WAL written elsewhere, not in the publication.
    p.db.client()
        .await
        .batch_execute(
            "CREATE TABLE other (x int); INSERT INTO other SELECT generate_series(1, 10000);",
        )
        .await
        .unwrap();
    let target = p.current_lsn().await;
    let advanced = p.wait_caught_up(Duration::from_secs(30)).await;
    assert!(
        advanced,
        "confirmed_flush_lsn stayed at {:?} < {target}\n{}",
        p.confirmed_flush().await,
        p.log("idle.log")
    );

    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exited = common::poll_until(Duration::from_secs(20), || {
        let r = child.try_wait().ok().flatten();
        async move { r }
    })
    .await
    .expect("pgcdc exits after SIGTERM");
    assert!(exited.success(), "exit {exited:?}\n{}", p.log("idle.log"));
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_sink_writes_json_lines() {
    let p = Pipeline::new(ITEMS).await;
    let progress = p.dir.join("progress.json");
    let progress = progress.to_str().unwrap();
    let args = [
        "--table",
        "public.items",
        "--sink",
        "stdout",
        "--progress-file",
        progress,
        "--stop-lsn",
        "now",
    ];
    let out = p.run(&args);
    assert_success(&out, "snapshot to stdout");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 51);
    assert_eq!(lines[0]["topic"], p.topic("items"));
    assert_eq!(lines[0]["key"], serde_json::json!({"id": 1}));
    assert_eq!(lines[0]["value"]["op"], "r");
    assert_eq!(lines[49]["value"]["source"]["snapshot"], "last");
    // One snapshot marker on stdout: partition 0 of 1.
    assert_eq!(lines[50]["topic"], p.topic("items"));
    assert_eq!(lines[50]["key"], Value::Null);
    assert_eq!(lines[50]["value"]["op"], "s");
    assert_eq!(
        lines[50]["value"]["snapshot"],
        serde_json::json!({"partition": 0, "partitions": 1, "rows": 50})
    );

    p.db.client()
        .await
        .batch_execute("DELETE FROM items WHERE id = 9")
        .await
        .unwrap();
    let out = p.run(&args);
    assert_success(&out, "stream to stdout");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["value"]["op"], "d");
    assert_eq!(lines[0]["value"]["before"]["id"], 9);
    assert_eq!(lines[1]["key"], serde_json::json!({"id": 9}));
    assert_eq!(lines[1]["value"], Value::Null, "tombstone");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_only_leaves_no_slot() {
    let p = Pipeline::new(ITEMS).await;
    let out = p.run(&["--table", "public.items", "--snapshot-only"]);
    assert_success(&out, "snapshot only");
    assert_eq!(p.events("items", Some(51)).await.len(), 51);
    // PGCDC_SNAPSHOT_MARKERS=false (--snapshot-markers false): the rows only.
    let out = p
        .command(&[
            "--table",
            "public.items",
            "--snapshot-only",
            "--sink",
            "stdout",
        ])
        .env("PGCDC_SNAPSHOT_MARKERS", "false")
        .output()
        .unwrap();
    assert_success(&out, "snapshot only, without markers");
    let lines = String::from_utf8(out.stdout).unwrap();
    assert_eq!(lines.lines().count(), 50);
    assert!(!lines.contains(r#""op":"s""#), "{lines}");
    let client = p.db.client().await;
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_fix() {
    let p = Pipeline::new(
        "CREATE TABLE public.items (id int PRIMARY KEY, v text);
         INSERT INTO public.items VALUES (1, 'a'), (2, 'b');
         CREATE TABLE public.nokey (v text);",
    )
    .await;
    // Each mistake stops pgcdc before it publishes anything or creates its slot.
    assert_fails(
        &p.run(&["--table", "public.missing"]),
        3,
        &[r#""public"."missing" does not exist"#],
    );
    p.assert_left_nothing().await;
    assert_fails(
        &p.run(&["--table", "public.nokey"]),
        3,
        &["no primary key", "REPLICA IDENTITY FULL"],
    );
    p.assert_left_nothing().await;
    assert_fails(&p.run(&["--table", "bad name!"]), 2, &["schema.table"]);
    p.assert_left_nothing().await;
    assert_fails(
        &p.run(&["--table", "items", "--stop-lsn", "x/y"]),
        2,
        &["LSN"],
    );
    p.assert_left_nothing().await;
    assert_fails(
        &p.run(&["--table", "items", "-X", "novalue"]),
        2,
        &["key=value"],
    );
    p.assert_left_nothing().await;

    let bad_source = p.command_with("host=127.0.0.1 nonsense", &kafka(), &["--table", "items"]);
    assert_fails(&{ bad_source }.output().unwrap(), 2, &["--source"]);
    p.assert_left_nothing().await;

    let no_kafka = p.command_with(
        &p.source(),
        "127.0.0.1:9",
        &["--table", "items", "--kafka-timeout", "2"],
    );
    assert_fails(&{ no_kafka }.output().unwrap(), 4, &["127.0.0.1:9"]);
    p.assert_left_nothing().await;

    // The slot in use by another pgcdc (which holds the slot's lock: see tests/sessions.rs).
    let mut first = p.spawn(&["--table", "items"], "first.log");
    p.wait_for_log("first.log", "streaming changes").await;
    let before = common::topics::published(&kafka(), &p.prefix).await;
    // Two rows and the snapshot marker.
    assert_eq!(before.get(&p.topic("items")), Some(&3), "{before:?}");
    assert_fails(
        &p.run(&["--table", "items"]),
        3,
        &["another pgcdc is running for slot", "--slot"],
    );
    let mut after = common::topics::published(&kafka(), &p.prefix).await;
    // The running pgcdc writes its progress record again if it restarted its pipeline
    // meanwhile (a delivery the broker failed under load): that record is not the refused
    // run's, which stops before it touches anything.
    let progress = format!("{}._progress", p.prefix);
    if p.log("first.log").contains("starting again") {
        after.insert(progress.clone(), before[&progress]);
    }
    assert_eq!(after, before, "{}", p.log("first.log"));
    let _ = first.kill();
    let _ = first.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_privileges_name_the_grant() {
    let p = Pipeline::new(ITEMS).await;
    let client = p.db.client().await;
    let norepl = common::unique_name("norepl");
    let noselect = common::unique_name("noselect");
    client
        .batch_execute(&format!(
            "CREATE ROLE {norepl} LOGIN; CREATE ROLE {noselect} LOGIN REPLICATION;
             CREATE PUBLICATION {} FOR TABLE items;",
            p.slot
        ))
        .await
        .unwrap();
    let as_role = |role: &str| {
        let source = format!(
            "host={} port={} user={role} dbname={} sslmode=disable",
            p.db.env.host, p.db.env.port, p.db.name
        );
        p.command_with(&source, &kafka(), &["--table", "items"])
            .output()
            .unwrap()
    };
    assert_fails(&as_role(&norepl), 3, &["REPLICATION"]);
    p.assert_left_nothing().await;
    assert_fails(&as_role(&noselect), 3, &["GRANT SELECT"]);
    p.assert_left_nothing().await;
    let _ = client
        .batch_execute(&format!("DROP ROLE {norepl}; DROP ROLE {noselect};"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_larger_than_the_message_limit_fails_without_confirming() {
    let p = Pipeline::new(ITEMS).await;
    let out = p.run(&["--table", "items", "--stop-lsn", "now"]);
    assert_success(&out, "snapshot");
    p.db.client()
        .await
        .batch_execute("UPDATE items SET v = repeat('y', 5000) WHERE id = 1")
        .await
        .unwrap();
    let after_update = p.current_lsn().await;
    let before = common::topics::published(&kafka(), &p.prefix).await;
    let out = p.run(&[
        "--table",
        "items",
        "--stop-lsn",
        "now",
        "-X",
        "message.max.bytes=2000",
    ]);
    assert_fails(&out, 4, &["message.max.bytes"]);
    let confirmed = p.confirmed_flush().await.expect("slot exists");
    assert!(
        confirmed < after_update,
        "the failed transaction must not be confirmed"
    );
    assert_eq!(
        common::topics::published(&kafka(), &p.prefix).await,
        before,
        "nothing of the refused transaction is published"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_replication_connection_reconnects_and_loses_nothing() {
    let p = Pipeline::new(
        "CREATE TABLE public.hot (id int PRIMARY KEY, c int NOT NULL);
         INSERT INTO public.hot SELECT g, 0 FROM generate_series(1, 5) g;",
    )
    .await;
    let mut child = p.spawn(&["--table", "public.hot"], "reconnect.log");
    p.wait_for_log("reconnect.log", "streaming changes").await;
    let client = p.db.client().await;
    for round in 0..3 {
        for i in 0..50 {
            client
                .batch_execute(&format!(
                    "UPDATE hot SET c = c + 1 WHERE id = {}",
                    i % 5 + 1
                ))
                .await
                .unwrap();
        }
        if round < 2 {
            // What a server restart or a network cut looks like to pgcdc.
            client
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}'",
                    p.slot
                ))
                .await
                .unwrap();
        }
    }
    let advanced = p.wait_caught_up(Duration::from_secs(60)).await;
    let log = p.log("reconnect.log");
    assert!(advanced, "did not catch up after reconnecting:\n{log}");
    assert!(log.contains("reconnecting"), "{log}");
    assert!(child.try_wait().unwrap().is_none(), "pgcdc exited:\n{log}");
    common::process::sigterm(&child);
    let _ = child.wait();

    let events = p.events("hot", None).await;
    let (state, duplicates) = replay(&events);
    assert_same_state(&state, &p.table_rows("hot").await);
    let updates = events.iter().filter(|e| e.op() == Some("u")).count();
    assert_eq!(
        updates - duplicates,
        150,
        "every update exactly once, plus {duplicates} replays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_table_flags_every_table_of_the_publication_is_captured() {
    let p = Pipeline::new(
        "CREATE TABLE public.a (id int PRIMARY KEY, v text);
         CREATE TABLE public.b (id int PRIMARY KEY, v text);
         CREATE TABLE public.c (id int PRIMARY KEY, v text);
         INSERT INTO a VALUES (1, 'a'); INSERT INTO b VALUES (1, 'b'), (2, 'b');
         INSERT INTO c VALUES (1, 'not published');",
    )
    .await;
    p.db.client()
        .await
        .batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE a, b", p.slot))
        .await
        .unwrap();
    // A publication that lacks a named table is an error naming the fix.
    assert_fails(
        &p.run(&["--table", "public.c", "--stop-lsn", "now"]),
        3,
        &["does not include", "ALTER PUBLICATION"],
    );
    p.assert_left_nothing().await;
    assert_success(&p.run(&["--stop-lsn", "now"]), "run from the publication");
    // The rows, then the snapshot marker.
    assert_eq!(p.events("a", Some(2)).await.len(), 2);
    assert_eq!(p.events("b", Some(3)).await.len(), 3);
    let cfg = KafkaConfig::new(kafka());
    let topic_c = p.topic("c");
    let c_exists = tokio::task::spawn_blocking(move || {
        crate::common::api::TopicReader::open_if_exists(&cfg, &topic_c, ReadStop::HighWatermark)
            .map(|r| r.is_some())
    })
    .await
    .unwrap()
    .unwrap();
    assert!(!c_exists, "a table outside the publication gets no topic");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_never_streams_only_new_changes() {
    let p = Pipeline::new(ITEMS).await;
    assert_success(
        &p.run(&[
            "--table",
            "items",
            "--snapshot",
            "never",
            "--stop-lsn",
            "now",
        ]),
        "create the slot without snapshot",
    );
    p.db.client()
        .await
        .batch_execute("UPDATE items SET v = 'later' WHERE id = 10")
        .await
        .unwrap();
    assert_success(
        &p.run(&[
            "--table",
            "items",
            "--snapshot",
            "never",
            "--stop-lsn",
            "now",
        ]),
        "stream",
    );
    let events = p.events("items", Some(1)).await;
    assert_eq!(
        events.len(),
        1,
        "only the change, no read events: {events:?}"
    );
    assert_eq!(events[0].op(), Some("u"));
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_stdout_pipe_ends_cleanly_without_confirming_unwritten_events() {
    let p = Pipeline::new(
        "CREATE TABLE public.items (id int PRIMARY KEY, v text);
         INSERT INTO public.items SELECT g, repeat('z', 200) FROM generate_series(1, 20000) g;",
    )
    .await;
    let progress = p.dir.join("progress.json");
    let mut child = p
        .command(&[
            "--table",
            "items",
            "--sink",
            "stdout",
            "--progress-file",
            progress.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().expect("a line").expect("readable");
        assert!(first.starts_with("{\"topic\":"), "{first}");
        // Dropping the reader closes the pipe, like `pgcdc run | head -1`.
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{err}", out.status);
    assert!(err.contains("output closed"), "{err}");
    // The snapshot was not completed, so it is not recorded as such.
    let progress = std::fs::read_to_string(&progress).unwrap_or_default();
    assert!(!progress.contains("\"completed\""), "{progress}");
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_table_is_captured_under_its_own_name() {
    let p = Pipeline::new(
        "CREATE TABLE public.m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE public.m_low PARTITION OF public.m FOR VALUES FROM (0) TO (100);
         CREATE TABLE public.m_high PARTITION OF public.m FOR VALUES FROM (100) TO (1000);
         INSERT INTO m VALUES (1, 'low'), (150, 'high');",
    )
    .await;
    assert_success(
        &p.run(&["--table", "public.m", "--stop-lsn", "now"]),
        "snapshot",
    );
    p.db.client()
        .await
        .batch_execute("INSERT INTO m VALUES (2, 'low2'), (250, 'high2'); UPDATE m SET v = 'moved' WHERE id = 150;")
        .await
        .unwrap();
    assert_success(
        &p.run(&["--table", "public.m", "--stop-lsn", "now"]),
        "stream",
    );
    let events = p.events("m", Some(6)).await;
    let ops: Vec<&str> = events.iter().filter_map(|e| e.op()).collect();
    assert_eq!(ops, ["r", "r", "s", "c", "c", "u"], "{events:?}");
    let (state, _) = replay(&events);
    assert_same_state(&state, &p.table_rows("m").await);

    // A publication that publishes the partitions under their own names is refused.
    let client = p.db.client().await;
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {} SET (publish_via_partition_root = false)",
            p.slot
        ))
        .await
        .unwrap();
    assert_fails(
        &p.run(&["--table", "public.m", "--stop-lsn", "now"]),
        3,
        &["publish_via_partition_root = true"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_snapshot_reads_each_row_once_and_meets_the_stream() {
    // fillfactor 10 spreads 30k rows over ~4k pages: enough for several page ranges.
    let p = Pipeline::new(
        "CREATE TABLE public.big (id int PRIMARY KEY, v text, n int) WITH (fillfactor = 10);
         INSERT INTO public.big SELECT g, repeat('x', 60), g FROM generate_series(1, 30000) g;
         UPDATE public.big SET n = -n WHERE id % 7 = 0;
         DELETE FROM public.big WHERE id % 11 = 0;
         CREATE TABLE public.small (id int PRIMARY KEY, v text);
         INSERT INTO public.small SELECT g, 's' || g FROM generate_series(1, 20) g;",
    )
    .await;
    let live = 30000 - 30000 / 11;
    let args = [
        "--table",
        "public.big",
        "--table",
        "public.small",
        "--snapshot-workers",
        "3",
        "--stop-lsn",
        "now",
    ];
    let mut child = p.spawn(&args, "snap.log");
    p.wait_for_log("snap.log", "reading with several connections")
        .await;
    // Changes after the export: in the stream (next run), never in the snapshot.
    let client = p.db.client().await;
    client
        .batch_execute(
            "UPDATE big SET v = 'later' WHERE id % 1000 = 1;
             DELETE FROM big WHERE id = 2;
             INSERT INTO big VALUES (40001, 'new', 1);",
        )
        .await
        .unwrap();
    let status = child.wait().expect("pgcdc exits");
    let log = p.log("snap.log");
    assert!(status.success(), "first run failed:\n{log}");
    let units: usize = log
        .split("units=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no unit count in the log:\n{log}"));
    assert!(
        units >= 4,
        "big was not cut into ranges ({units} units):\n{log}"
    );

    let mut big = p.events("big", Some(live + 1)).await;
    let mut small = p.events("small", Some(21)).await;
    assert_eq!(
        big.len(),
        live + 1,
        "one read event per live row, then the marker"
    );
    assert_eq!(small.len(), 21);
    // The marker of each table comes after all its rows.
    for (events, rows) in [(&mut big, live), (&mut small, 20)] {
        let marker = events.pop().expect("marker");
        assert!(marker.is_marker(), "{marker:?}");
        assert_eq!(marker.marker_rows(), Some(rows as u64));
    }
    let mut ids = HashSet::new();
    for e in &big {
        let v = e.value.as_ref().expect("a value");
        assert_eq!(e.op(), Some("r"));
        let id = v["after"]["id"].as_i64().expect("id");
        assert!(ids.insert(id), "key {id} read twice");
        assert_ne!(
            v["after"]["v"], "later",
            "a change after the export in the snapshot"
        );
        let n = v["after"]["n"].as_i64().expect("n");
        assert_eq!(n, if id % 7 == 0 { -id } else { id }, "key {id}");
    }
    assert!(ids.iter().all(|id| id % 11 != 0), "a deleted row was read");
    let last = big
        .iter()
        .chain(&small)
        .filter(|e| e.value.as_ref().unwrap()["source"]["snapshot"] == "last")
        .count();
    assert_eq!(last, 1, "exactly one event marked last");

    let out = p.run(&[
        "--table",
        "public.big",
        "--table",
        "public.small",
        "--stop-lsn",
        "now",
    ]);
    assert_success(&out, "second run");
    // The updates of live rows, the delete and its tombstone, the insert.
    let updated = (0..30)
        .map(|k| 1 + 1000 * k)
        .filter(|id| id % 11 != 0)
        .count();
    let events = p.events("big", Some(live + 1 + updated + 2 + 1)).await;
    assert_eq!(events.len(), live + 1 + updated + 3);
    let (state, duplicates) = replay(&events);
    assert_eq!(duplicates, 0);
    assert_same_state(&state, &p.table_rows("big").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_lsn_publishes_no_part_of_a_later_transaction() {
    let p = Pipeline::new("CREATE TABLE public.t (id int PRIMARY KEY, v text);").await;
    let only_t = ["--table", "public.t"];
    // Creates the slot; there is nothing to publish yet.
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
    client
        .batch_execute("INSERT INTO t SELECT g, 'first' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let stop: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // Many small transactions right after the stop: they arrive while the first one's
    // acknowledgement is on its way, and none of them may be published by this run.
    client
        .batch_execute(
            "DO $$ BEGIN
               FOR i IN 11..2010 LOOP
                 INSERT INTO t VALUES (i, 'later');
                 COMMIT;
               END LOOP;
             END $$",
        )
        .await
        .unwrap();
    assert_success(
        &p.run(&[only_t[0], only_t[1], "--stop-lsn", &stop]),
        "run up to the stop",
    );
    let first = p.events("t", None).await;
    assert_eq!(
        first.len(),
        10,
        "only the transaction committed up to --stop-lsn is published"
    );

    assert_success(
        &p.run(&[only_t[0], only_t[1], "--stop-lsn", "now"]),
        "run for the rest",
    );
    let all = p.events("t", Some(2010)).await;
    assert_eq!(all.len(), 2010);
    let (state, duplicates) = replay(&all);
    assert_eq!(duplicates, 0, "a later transaction published twice");
    assert_same_state(&state, &p.table_rows("t").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn inheritance_parent_read_in_page_ranges_publishes_only_its_own_rows() {
    // fillfactor 10 and 500-byte rows: a row per page, 2,600 pages, cut into ranges. The
    // child's few pages have row addresses inside the parent's first range.
    let p = Pipeline::new(
        "CREATE TABLE public.parent (id int PRIMARY KEY, v text) WITH (fillfactor = 10);
         CREATE TABLE public.child (extra int) INHERITS (public.parent);
         ALTER TABLE public.child ADD PRIMARY KEY (id);
         INSERT INTO public.parent SELECT g, repeat('p', 500) FROM generate_series(1, 2600) g;
         INSERT INTO public.child SELECT g, 'c', g FROM generate_series(100001, 100300) g;",
    )
    .await;
    let client = p.db.client().await;
    // A publication of the parent holds its children too, as tables of their own.
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE public.parent WITH (publish_via_partition_root = true)",
            p.slot
        ))
        .await
        .unwrap();
    let args = ["--snapshot-workers", "2", "--stop-lsn", "now"];
    let first = common::lines::run(&p, &args, "parallel snapshot");
    assert!(
        first.log.contains("units=3") || first.log.contains("units=4"),
        "the parent was not cut into page ranges:\n{}",
        first.log
    );
    own_rows_only(&p, &first.lines.iter().collect::<Vec<_>>(), "snapshot").await;
    assert_eq!(
        first
            .of(&p.topic("parent"))
            .into_iter()
            .filter(|l| l["value"]["op"] != "s")
            .count(),
        2600,
        "one event per parent row"
    );

    client
        .batch_execute(
            "INSERT INTO parent VALUES (5000, 'new');
             INSERT INTO child VALUES (100500, 'new', 1);
             UPDATE parent SET v = 'changed' WHERE id % 100 = 0;
             UPDATE child SET v = 'changed' WHERE id % 100 = 0;
             DELETE FROM parent WHERE id = 7;",
        )
        .await
        .unwrap();
    let second = common::lines::run(&p, &["--stop-lsn", "now"], "stream");
    let both: Vec<&Value> = first.lines.iter().chain(&second.lines).collect();
    own_rows_only(&p, &both, "snapshot and stream").await;
}

/// Replaying `lines` gives the parent's own rows on its topic and the child's on its own.
async fn own_rows_only(p: &Pipeline, lines: &[&Value], what: &str) {
    let client = p.db.client().await;
    for (table, sql) in [("parent", "ONLY public.parent"), ("child", "public.child")] {
        let got = common::lines::replay(lines.iter().copied(), &p.topic(table), &["id"]);
        let want = common::lines::table_state(&client, sql, "*", "true", &["id"]).await;
        common::lines::assert_same(&got, &want, &format!("{what}: {table}"));
    }
}

/// The stdout events of a background run that streamed until `p`'s slot confirmed the
/// server's position at the time of the call; stopped with SIGTERM.
async fn stream_in_background_until_caught_up(
    p: &Pipeline,
    mut child: std::process::Child,
    log: &str,
    out: &std::path::Path,
) -> common::lines::Run {
    let caught_up = p.wait_caught_up(Duration::from_secs(30)).await;
    assert!(caught_up, "did not catch up:\n{}", p.log(log));
    assert!(
        child.try_wait().unwrap().is_none(),
        "pgcdc exited:\n{}",
        p.log(log)
    );
    common::process::sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", p.log(log));
    let stdout = std::fs::read(out).unwrap();
    let lines = String::from_utf8(stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    common::lines::Run {
        lines,
        log: p.log(log),
    }
}

const REPLICA_IDENTITIES: &str = "
    CREATE TABLE public.ri_index (id int PRIMARY KEY, code text NOT NULL, v text);
    CREATE UNIQUE INDEX ri_index_code ON public.ri_index (code);
    ALTER TABLE public.ri_index REPLICA IDENTITY USING INDEX ri_index_code;
    CREATE TABLE public.ri_full (id int PRIMARY KEY, v text);
    ALTER TABLE public.ri_full REPLICA IDENTITY FULL;
    CREATE TABLE public.ri_nokey (v text, n int);
    ALTER TABLE public.ri_nokey REPLICA IDENTITY FULL;
    INSERT INTO public.ri_index SELECT g, 'c' || g, 'v' || g FROM generate_series(1, 5) g;
    INSERT INTO public.ri_full SELECT g, 'v' || g FROM generate_series(1, 5) g;
    INSERT INTO public.ri_nokey SELECT 'v' || g, g FROM generate_series(1, 5) g;";

#[tokio::test(flavor = "multi_thread")]
async fn the_key_is_the_replica_identity_index_else_the_primary_key() {
    let p = Pipeline::new(REPLICA_IDENTITIES).await;
    let client = p.db.client().await;
    let args = [
        "--table",
        "public.ri_index",
        "--table",
        "public.ri_full",
        "--table",
        "public.ri_nokey",
        "--stop-lsn",
        "now",
    ];
    let first = common::lines::run(&p, &args, "snapshot");
    assert!(
        first.log.contains("null Kafka key"),
        "a table without a key is warned about:\n{}",
        first.log
    );
    client
        .batch_execute(
            "INSERT INTO ri_index VALUES (10, 'c10', 'new');
             UPDATE ri_index SET v = 'changed' WHERE id = 1;
             UPDATE ri_index SET code = 'c20' WHERE id = 2;
             UPDATE ri_index SET id = 30 WHERE id = 3;
             DELETE FROM ri_index WHERE id = 4;
             UPDATE ri_full SET v = 'changed' WHERE id = 1;
             UPDATE ri_full SET id = 20 WHERE id = 2;
             DELETE FROM ri_full WHERE id = 4;
             INSERT INTO ri_nokey VALUES ('new', 10);
             DELETE FROM ri_nokey WHERE n = 4;",
        )
        .await
        .unwrap();
    let second = common::lines::run(&p, &args, "stream");
    let both: Vec<&Value> = first.lines.iter().chain(&second.lines).collect();
    for (table, key) in [("ri_index", "code"), ("ri_full", "id")] {
        let got = common::lines::replay(both.iter().copied(), &p.topic(table), &[key]);
        let want = common::lines::table_state(&client, table, "*", "true", &[key]).await;
        common::lines::assert_same(&got, &want, table);
    }
    let deletes: Vec<&Value> = second
        .of(&p.topic("ri_index"))
        .into_iter()
        .filter(|l| l["value"]["op"] == "d")
        .collect();
    // The delete of id 4, and the delete half of the code change of id 2.
    assert_eq!(deletes.len(), 2, "{deletes:?}");
    assert_eq!(deletes[0]["key"], json!({"code": "c2"}));
    assert_eq!(deletes[1]["key"], json!({"code": "c4"}));
    let nokey: Vec<&Value> = both
        .iter()
        .copied()
        .filter(|l| l["topic"] == p.topic("ri_nokey").as_str() && l["value"]["op"] != "s")
        .collect();
    assert_eq!(nokey.len(), 5 + 2, "no tombstone without a key");
    assert!(nokey.iter().all(|l| l["key"].is_null()), "{nokey:?}");

    // Tables that join the publication while streaming follow the same rule.
    let out = p.dir.join("joined.out");
    let child = p
        .command(&[
            "--sink",
            "stdout",
            "--progress-file",
            p.dir.join("progress.json").to_str().unwrap(),
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(p.dir.join("joined.log")).unwrap())
        .spawn()
        .unwrap();
    p.wait_for_log("joined.log", "streaming changes").await;
    client
        .batch_execute(&format!(
            "CREATE TABLE public.j_index (id int PRIMARY KEY, code text NOT NULL, v text);
             CREATE UNIQUE INDEX j_index_code ON public.j_index (code);
             ALTER TABLE public.j_index REPLICA IDENTITY USING INDEX j_index_code;
             CREATE TABLE public.j_full (id int PRIMARY KEY, v text);
             ALTER TABLE public.j_full REPLICA IDENTITY FULL;
             ALTER PUBLICATION {} ADD TABLE j_index, j_full;
             INSERT INTO j_index SELECT g, 'c' || g, 'v' || g FROM generate_series(1, 5) g;
             INSERT INTO j_full SELECT g, 'v' || g FROM generate_series(1, 5) g;
             UPDATE j_index SET v = 'changed' WHERE id = 1;
             UPDATE j_index SET code = 'c20' WHERE id = 2;
             DELETE FROM j_index WHERE id = 4;
             UPDATE j_full SET id = 20 WHERE id = 2;
             DELETE FROM j_full WHERE id = 4;",
            p.slot
        ))
        .await
        .unwrap();
    let joined = stream_in_background_until_caught_up(&p, child, "joined.log", &out).await;
    assert!(
        joined.log.contains("a table joined the publication"),
        "{}",
        joined.log
    );
    for (table, key) in [("j_index", "code"), ("j_full", "id")] {
        let got = common::lines::replay(&joined.lines, &p.topic(table), &[key]);
        let want = common::lines::table_state(&client, table, "*", "true", &[key]).await;
        common::lines::assert_same(&got, &want, &format!("joined: {table}"));
    }
}

/// Regression (issue 19, at-least-once part): acknowledged changes were confirmed to the
/// server only at the next status update (every `--status-interval`), so a run killed before
/// it confirmed nothing and the next run replayed everything it had published. Now an
/// acknowledged position is confirmed within moments, whatever the status interval.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_changes_are_confirmed_without_waiting_for_the_status_interval() {
    let p = Pipeline::new(ITEMS).await;
    // No keepalive asking for a reply either (it comes at half of wal_sender_timeout).
    let db = &p.db.name;
    p.db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET wal_sender_timeout = '10min'"
        ))
        .await
        .unwrap();
    let mut child = p
        .pgcdc("run")
        .set("--status-interval", "120")
        .args(["--table", "public.items"])
        .spawn_logging(&p.dir.join("prompt.log"));
    p.wait_for_log("prompt.log", "streaming changes").await;
    p.db.client()
        .await
        .batch_execute("INSERT INTO public.items SELECT g, 'new', g FROM generate_series(51, 60) g")
        .await
        .unwrap();
    let events = p.events("items", Some(61)).await;
    let (commit, _) = events.last().expect("events").lsn_pair();
    // Published and acknowledged: confirmed well before the next status update (2 minutes)
    // or keepalive (5 minutes).
    let confirmed = common::poll_until(Duration::from_secs(20), || async {
        p.confirmed_flush().await.filter(|c| *c >= commit)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        confirmed.is_some(),
        "confirmed_flush_lsn stayed at {:?} < {commit}\n{}",
        p.confirmed_flush().await,
        p.log("prompt.log")
    );
}
