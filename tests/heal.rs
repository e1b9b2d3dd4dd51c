//! A new snapshot heals derived views, end to end: pgcdc against the private cluster and the
//! real broker, `pgcdc-indexer` (stdout target) reading the real topics.
//!
//! The replication slot is dropped by hand while pgcdc is stopped, after rows were deleted:
//! those deletes are never published. `pgcdc run --snapshot always` takes a new snapshot, and
//! its snapshot markers let the indexer delete the rows the new snapshot no longer holds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pipeline::{assert_success, kafka, Event, Pipeline};
use serde_json::Value;

const SETUP: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text, n int);
     INSERT INTO public.items SELECT g, 'row ' || g, g FROM generate_series(1, 60) g;
     CREATE TABLE public.empty (id int PRIMARY KEY, v text);";

/// pgcdc up to now (`--stop-lsn now`), on both tables, with `extra`.
fn run(p: &Pipeline, extra: &[&str], what: &str) {
    let mut args = vec![
        "--table",
        "public.items",
        "--table",
        "public.empty",
        "--stop-lsn",
        "now",
    ];
    args.extend_from_slice(extra);
    assert_success(&p.run(&args), what);
}

/// The lost slot: deletes while pgcdc is stopped, then the slot is dropped, then a new
/// snapshot. Returns the events of both topics.
async fn lose_the_slot_and_snapshot_again(p: &Pipeline, extra: &[&str]) {
    run(p, extra, "first run: the snapshot");
    let client = p.db.client().await;
    // Streamed normally: an update, and rows for the table that was empty at the snapshot.
    client
        .batch_execute(
            "UPDATE items SET v = 'changed' WHERE id = 1;
             INSERT INTO empty VALUES (1, 'a'), (2, 'b');",
        )
        .await
        .unwrap();
    run(p, extra, "second run: streaming");
    // pgcdc is stopped. Rows are deleted (and one inserted), then the slot is dropped by
    // hand: those changes are never published.
    client
        .batch_execute(
            "DELETE FROM items WHERE id BETWEEN 3 AND 17;
             DELETE FROM empty;
             INSERT INTO items VALUES (100, 'new', 100);",
        )
        .await
        .unwrap();
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .expect("drop the slot");
    let mut again = vec!["--snapshot", "always"];
    again.extend_from_slice(extra);
    run(p, &again, "third run: a new snapshot");
}

/// Runs `pgcdc-indexer --target stdout` on the pipeline's topics until it has healed after
/// `snapshots` completed table snapshots, stops it, and returns its final documents per index
/// (by `_id`, without the indexer's fields) and its log.
fn index(p: &Pipeline, snapshots: usize) -> (BTreeMap<String, BTreeMap<String, Value>>, String) {
    let out_path = p.dir.join("indexer.jsonl");
    let log_path = p.dir.join("indexer.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgcdc-indexer"))
        .args(["--kafka", &kafka()])
        .args(["--topic", &p.topic("items"), "--topic", &p.topic("empty")])
        .args(["--target", "stdout", "--max-batch", "7"])
        .env_remove("PGCDC_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("pgcdc-indexer starts");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while log().matches("is complete in every partition").count() < snapshots {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "the indexer did not complete {snapshots} snapshots:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = child.wait().unwrap();
    assert!(exited.success(), "{exited:?}\n{}", log());
    let mut docs: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    docs.insert("items".into(), BTreeMap::new());
    docs.insert("empty".into(), BTreeMap::new());
    for line in std::fs::read_to_string(&out_path).unwrap().lines() {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        if v["action"] != "document" {
            continue;
        }
        let mut doc = v["doc"].as_object().unwrap().clone();
        let id = doc["_id"].as_str().unwrap().to_string();
        doc.retain(|k, _| !k.starts_with('_'));
        docs.entry(v["index"].as_str().unwrap().to_string())
            .or_default()
            .insert(id, Value::Object(doc));
    }
    (docs, log())
}

/// The table's rows by id, as the indexer's documents hold them.
async fn table(p: &Pipeline, name: &str) -> BTreeMap<String, Value> {
    p.table_rows(name)
        .await
        .into_iter()
        .map(|(id, row)| (id.to_string(), row))
        .collect()
}

/// In every partition, each snapshot's marker comes after all of that snapshot's reads;
/// returns the markers' `(point, partition, rows)`.
fn markers_follow_their_reads(events: &[(i32, Event)]) -> BTreeSet<(u64, i64, u64)> {
    let mut markers = BTreeSet::new();
    let mut done: BTreeSet<(i32, u64)> = BTreeSet::new();
    for (partition, e) in events {
        let Some(v) = &e.value else { continue };
        let point = e.lsn_pair().0;
        if e.is_marker() {
            assert_eq!(e.key, None);
            assert_eq!(v["snapshot"]["partition"], *partition, "{v}");
            markers.insert((
                point,
                v["snapshot"]["partition"].as_i64().unwrap(),
                v["snapshot"]["rows"].as_u64().unwrap(),
            ));
            done.insert((*partition, point));
        } else if e.op() == Some("r") {
            assert!(
                !done.contains(&(*partition, point)),
                "a read after its snapshot's marker in partition {partition}: {v}"
            );
        }
    }
    markers
}

/// Every record of `table`'s topic with its partition.
async fn partitioned_events(p: &Pipeline, table: &str, expected: usize) -> Vec<(i32, Event)> {
    p.records(&p.topic(table), Some(expected))
        .await
        .into_iter()
        .map(|r| (r.partition, Event::of(r)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_snapshot_after_a_lost_slot_heals_the_index() {
    let p = Pipeline::new(SETUP).await;
    lose_the_slot_and_snapshot_again(&p, &[]).await;

    // items: 60 reads + marker | update | 46 reads + marker. empty: marker (0 rows) | two
    // inserts | marker (0 rows again: its rows were deleted unseen).
    let items = partitioned_events(&p, "items", 60 + 1 + 1 + 46 + 1).await;
    let markers = markers_follow_their_reads(&items);
    let rows: Vec<u64> = markers.iter().map(|m| m.2).collect();
    assert_eq!(rows, [60, 46], "{markers:?}");
    let empty = partitioned_events(&p, "empty", 4).await;
    let ops: Vec<Option<&str>> = empty.iter().map(|(_, e)| e.op()).collect();
    assert_eq!(ops, [Some("s"), Some("c"), Some("c"), Some("s")]);
    let markers = markers_follow_their_reads(&empty);
    assert!(markers.iter().all(|m| m.2 == 0), "{markers:?}");

    // Two snapshots of two tables.
    let (docs, log) = index(&p, 4);
    assert_eq!(docs["items"], table(&p, "items").await, "{log}");
    assert_eq!(docs["empty"], BTreeMap::new(), "{log}");
    assert!(
        log.contains("17 documents healed"),
        "15 items and 2 rows of the emptied table:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn healing_works_with_three_partitions_and_parallel_snapshots() {
    let p = Pipeline::new(SETUP).await;
    let extra = ["--topic-partitions", "3", "--snapshot-workers", "2"];
    lose_the_slot_and_snapshot_again(&p, &extra).await;

    // A marker per partition per snapshot: 3 + 3 on each topic.
    let items = partitioned_events(&p, "items", 60 + 3 + 1 + 46 + 3).await;
    let partitions: BTreeSet<i32> = items.iter().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 3, "the rows spread over the partitions");
    let markers = markers_follow_their_reads(&items);
    assert_eq!(markers.len(), 6, "{markers:?}");
    let points: BTreeSet<u64> = markers.iter().map(|m| m.0).collect();
    assert_eq!(points.len(), 2);
    for point in points {
        let of: Vec<(i64, u64)> = markers
            .iter()
            .filter(|m| m.0 == point)
            .map(|m| (m.1, m.2))
            .collect();
        assert!(
            of == [(0, 60), (1, 60), (2, 60)] || of == [(0, 46), (1, 46), (2, 46)],
            "{of:?}"
        );
    }
    let empty = partitioned_events(&p, "empty", 3 + 2 + 3).await;
    assert_eq!(markers_follow_their_reads(&empty).len(), 6);

    let (docs, log) = index(&p, 4);
    assert_eq!(docs["items"], table(&p, "items").await, "{log}");
    assert_eq!(docs["empty"], BTreeMap::new(), "{log}");
    assert!(log.contains("17 documents healed"), "{log}");
}
