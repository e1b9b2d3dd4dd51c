//! What a run does first, end to end: the start-up decision (`src/run/start.rs`) against the
//! real server and broker, checked by consuming the topics.

mod common;

use common::pipeline::{assert_fails, assert_success, Event, Pipeline};

fn ops(events: &[Event]) -> Vec<&str> {
    events.iter().filter_map(|e| e.op()).collect()
}

fn count(events: &[Event], op: &str) -> usize {
    events.iter().filter(|e| e.op() == Some(op)).count()
}

/// Regression: a table added to the publication while pgcdc was stopped was never
/// snapshotted (the progress record's table list was not compared): its existing rows were
/// never published. Now exactly that table is snapshotted, consistently with the stream, and
/// the others are not read again.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_the_publication_while_stopped_is_snapshotted_alone() {
    let p = Pipeline::new(
        "CREATE TABLE public.a (id int PRIMARY KEY, v text);
         CREATE TABLE public.b (id int PRIMARY KEY, v text);
         INSERT INTO public.a SELECT g, 'a' || g FROM generate_series(1, 20) g;
         INSERT INTO public.b SELECT g, 'b' || g FROM generate_series(1, 30) g;",
    )
    .await;
    let client = p.db.client().await;
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE public.a WITH (publish_via_partition_root = true)",
            p.slot
        ))
        .await
        .unwrap();
    // Publication-driven: no --table.
    assert_success(&p.run(&["--stop-lsn", "now"]), "first run");
    assert_eq!(count(&p.events("a", None).await, "r"), 20);

    // While stopped: b joins the publication, and both tables change.
    client
        .batch_execute(&format!(
            "INSERT INTO public.a VALUES (21, 'new');
             ALTER PUBLICATION {} ADD TABLE public.b;
             INSERT INTO public.b VALUES (31, 'new');
             UPDATE public.b SET v = 'changed' WHERE id = 1;
             DELETE FROM public.b WHERE id = 2;",
            p.slot
        ))
        .await
        .unwrap();
    let out = p.run(&["--stop-lsn", "now"]);
    assert_success(&out, "second run");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("without a completed snapshot"), "{log}");

    let a = p.events("a", None).await;
    assert_eq!(count(&a, "r"), 20, "a is not read again: {:?}", ops(&a));
    assert_eq!(count(&a, "c"), 1);
    // b: its 30 rows as of the new snapshot (which already holds the changes made before it),
    // whatever the slot streamed of b before that point coming first.
    let b = p.events("b", None).await;
    let reads: Vec<&Event> = b.iter().filter(|e| e.op() == Some("r")).collect();
    assert_eq!(reads.len(), 30, "{:?}", ops(&b));
    let read_ids: Vec<i64> = reads
        .iter()
        .map(|e| e.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert!(
        read_ids.contains(&31) && !read_ids.contains(&2),
        "{read_ids:?}"
    );
    let one = reads
        .iter()
        .find(|e| e.key.as_ref().unwrap()["id"] == 1)
        .unwrap();
    assert_eq!(one.value.as_ref().unwrap()["after"]["v"], "changed");
    let first_read = b.iter().position(|e| e.op() == Some("r")).unwrap();
    assert!(
        b[first_read..]
            .iter()
            .all(|e| matches!(e.op(), Some("r" | "s"))),
        "nothing of b is streamed after its snapshot here: {:?}",
        ops(&b)
    );

    // A third run resumes: nothing read again.
    client
        .batch_execute("INSERT INTO public.b VALUES (32, 'x')")
        .await
        .unwrap();
    let out = p.run(&["--stop-lsn", "now"]);
    assert_success(&out, "third run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from the slot"));
    let b = p.events("b", None).await;
    assert_eq!(count(&b, "r"), 30);
    assert_eq!(b.last().unwrap().key.as_ref().unwrap()["id"], 32);
}

/// The same for a table named with a new `--table`: the run first says the publication
/// lacks it (and how to add it); once added, only that table is snapshotted.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_table_flag_snapshots_that_table_only() {
    let p = Pipeline::new(
        "CREATE TABLE public.a (id int PRIMARY KEY);
         CREATE TABLE public.\"B\" (id int PRIMARY KEY);
         INSERT INTO public.a SELECT generate_series(1, 5);
         INSERT INTO public.\"B\" SELECT generate_series(1, 7);",
    )
    .await;
    assert_success(
        &p.run(&["--table", "public.a", "--stop-lsn", "now"]),
        "first run",
    );
    let both = [
        "--table",
        "public.a",
        "--table",
        "public.\"B\"",
        "--stop-lsn",
        "now",
    ];
    assert_fails(&p.run(&both), 3, &["ALTER PUBLICATION", "ADD TABLE"]);
    p.db.client()
        .await
        .batch_execute(&format!(
            "ALTER PUBLICATION {} ADD TABLE public.\"B\"",
            p.slot
        ))
        .await
        .unwrap();
    assert_success(&p.run(&both), "second run");
    assert_eq!(count(&p.events("a", None).await, "r"), 5);
    let b = p.events_in(&format!("{}.public.B", p.prefix), None).await;
    assert_eq!(count(&b, "r"), 7);
}

/// Regression: when the slot disappeared while the progress record said the snapshot was
/// complete, pgcdc silently took a new snapshot; deletes made in the gap were never
/// published. Now it stops and says why; `--snapshot always` takes a new snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_stops_the_run_until_a_new_snapshot_is_asked_for() {
    let p = Pipeline::new(
        "CREATE TABLE public.items (id int PRIMARY KEY, v text);
         INSERT INTO public.items SELECT g, 'x' FROM generate_series(1, 10) g;",
    )
    .await;
    let args = ["--table", "public.items", "--stop-lsn", "now"];
    assert_success(&p.run(&args), "first run");
    let client = p.db.client().await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
    client
        .batch_execute("DELETE FROM public.items WHERE id <= 3")
        .await
        .unwrap();

    let out = p.run(&args);
    assert_fails(
        &out,
        3,
        &["does not exist", "--snapshot always", "pgcdc drop --slot"],
    );
    assert!(p.confirmed_flush().await.is_none(), "no slot was created");
    assert_eq!(
        p.events("items", None).await.len(),
        11,
        "nothing published: 10 rows and the snapshot marker"
    );

    let mut always = args.to_vec();
    always.extend(["--snapshot", "always"]);
    assert_success(&p.run(&always), "run with --snapshot always");
    let events = p.events("items", None).await;
    assert_eq!(count(&events, "r"), 17, "10 + a new snapshot of 7 rows");
    // From here on, a plain run resumes.
    let out = p.run(&args);
    assert_success(&out, "run after the new snapshot");
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from the slot"));
}
