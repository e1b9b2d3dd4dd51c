//! The outbox pattern end to end (`--outbox`): rows inserted into an outbox table become the
//! application's events, routed, keyed and valued as Debezium's outbox event router does.
//! The real binary, the private cluster, the real topics.

mod common;

use common::api::{topic_name, ConsumedRecord, TableName};
use common::pipeline::{assert_fails, assert_success, Pipeline};
use serde_json::{json, Value};

/// Debezium's outbox table, plus a column of the application's own (`tenant`), and an
/// ordinary table.
const SETUP: &str = "
    CREATE TABLE orders (id int PRIMARY KEY, total numeric);
    CREATE TABLE outbox (
        id uuid PRIMARY KEY,
        aggregatetype varchar(255) NOT NULL,
        aggregateid varchar(255) NOT NULL,
        type varchar(255) NOT NULL,
        payload jsonb,
        tenant text);
    -- There before pgcdc's first start: not published.
    INSERT INTO outbox VALUES ('00000000-0000-0000-0000-000000000001', 'Order', '0', 'Stale', '{}', NULL);";

fn header<'a>(r: &'a ConsumedRecord, name: &str) -> Option<&'a [u8]> {
    r.headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
}

fn text(b: Option<&[u8]>) -> Option<String> {
    b.map(|b| String::from_utf8(b.to_vec()).expect("UTF-8"))
}

fn names(r: &ConsumedRecord) -> Vec<&str> {
    r.headers.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_are_published_as_the_applications_events() {
    let p = Pipeline::new(SETUP).await;
    let args = [
        "--table",
        "public.orders",
        "--table",
        "public.outbox",
        "--outbox",
        "public.outbox",
        "--stop-lsn",
        "now",
    ];
    let first = p.run(&args);
    assert_success(&first, "snapshot");
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(
        log.contains("the outbox table holds rows") && log.contains("rows=1"),
        "{log}"
    );

    let big = "x".repeat(6000);
    let client = p.db.client().await;
    for sql in [
        // The usual pattern: the business change and its events in one transaction, the
        // outbox rows deleted again at once.
        "BEGIN;
         INSERT INTO orders VALUES (1, 19.90);
         INSERT INTO outbox VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'Order', '1', 'OrderCreated',
                                    '{\"id\": 1, \"total\": 19.90}', 'acme');
         INSERT INTO outbox VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', 'Customer', 'c-7', 'CustomerBilled',
                                    '{\"customer\": \"c-7\"}', NULL);
         DELETE FROM outbox WHERE id IN ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12');
         COMMIT;",
        // A later event of the same aggregate: a payload stored out of line, and an update
        // of an outbox row (publishes nothing).
        &format!(
            "BEGIN;
             INSERT INTO outbox VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a13', 'Order', '1', 'OrderNoted',
                                        jsonb_build_object('note', '{big}'), 'acme');
             UPDATE outbox SET type = 'Changed' WHERE id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a13';
             DELETE FROM outbox WHERE id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a13';
             COMMIT;"
        ),
        // A NULL payload: a record without value (a tombstone for the aggregate).
        "INSERT INTO outbox VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a14', 'Order', '1', 'OrderForgotten', NULL, NULL)",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let second = p.run(&args);
    assert_success(&second, "stream");
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(log.contains("an outbox row was updated"), "{log}");

    let orders = p
        .records(&format!("{}.outbox.Order", p.prefix), Some(3))
        .await;
    assert_eq!(orders.len(), 3, "{orders:?}");
    let customers = p
        .records(&format!("{}.outbox.Customer", p.prefix), Some(1))
        .await;
    assert_eq!(customers.len(), 1, "{customers:?}");

    // Keyed by aggregateid as is, the payload as the value, the id and type where Debezium
    // puts them, the event id, the other columns as headers.
    let created = &orders[0];
    assert_eq!(created.key.as_deref(), Some(&b"1"[..]));
    let value: Value = serde_json::from_slice(created.value.as_deref().unwrap()).unwrap();
    assert_eq!(value, json!({"id": 1, "total": 19.90}));
    assert_eq!(
        names(created),
        ["id", "pgcdc-event-id", "eventType", "tenant"]
    );
    let id = Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_string());
    assert_eq!(text(header(created, "id")), id);
    assert_eq!(text(header(created, "pgcdc-event-id")), id);
    assert_eq!(
        text(header(created, "eventType")).as_deref(),
        Some("OrderCreated")
    );
    assert_eq!(text(header(created, "tenant")).as_deref(), Some("acme"));

    let billed = &customers[0];
    assert_eq!(billed.key.as_deref(), Some(&b"c-7"[..]));
    assert_eq!(
        billed.value.as_deref(),
        Some(&br#"{"customer": "c-7"}"#[..]),
        "jsonb as PostgreSQL prints it"
    );
    // NULL columns are left out.
    assert_eq!(names(billed), ["id", "pgcdc-event-id", "eventType"]);

    // Same aggregate, same key: in commit order on one partition; the TOASTed payload whole.
    let noted = &orders[1];
    assert_eq!(noted.key.as_deref(), Some(&b"1"[..]));
    let value: Value = serde_json::from_slice(noted.value.as_deref().unwrap()).unwrap();
    assert_eq!(value["note"].as_str().map(str::len), Some(6000));
    assert_eq!(
        text(header(noted, "eventType")).as_deref(),
        Some("OrderNoted"),
        "the event as inserted, not as updated"
    );
    let forgotten = &orders[2];
    assert_eq!(forgotten.key.as_deref(), Some(&b"1"[..]));
    assert_eq!(forgotten.value, None);
    assert_eq!(
        text(header(forgotten, "eventType")).as_deref(),
        Some("OrderForgotten")
    );
    assert!(orders.iter().all(|r| r.partition == orders[0].partition));

    // The order's own row event; no row events of the outbox table, no stale row.
    let order_events = p.events("orders", Some(2)).await;
    let ops: Vec<Option<&str>> = order_events.iter().map(|e| e.op()).collect();
    assert_eq!(
        ops,
        [Some("s"), Some("c")],
        "marker of the empty snapshot, then the insert"
    );
    assert_eq!(p.count("outbox", true).await, 0);

    // verify skips the outbox table and says so.
    let verify = p
        .pgcdc("verify")
        .set("--table", "public.outbox")
        .set("--outbox", "public.outbox")
        .output();
    assert_success(&verify, "verify");
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(out.contains("an outbox table"), "{out}");
}

/// A hostile outbox: quoted mixed-case names with a space, a keyword column, another key
/// column, a bytea payload, route values Kafka would refuse, a NULL key, and a partitioned
/// table, followed through a publication of the test's (no --table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_outbox_tables_route_and_key_what_they_can() {
    let p = Pipeline::new(
        "CREATE SCHEMA \"My App\";
         CREATE TABLE \"My App\".\"Out Box\" (
             id bigint PRIMARY KEY, aggregatetype text, order_id text, type text,
             payload bytea, \"select\" int);
         CREATE TABLE \"My App\".events (
             id bigint, aggregatetype text NOT NULL, order_id text, type text,
             payload text, PRIMARY KEY (id, aggregatetype)) PARTITION BY LIST (aggregatetype);
         CREATE TABLE \"My App\".events_a PARTITION OF \"My App\".events FOR VALUES IN ('a');
         CREATE TABLE \"My App\".events_b PARTITION OF \"My App\".events DEFAULT;
         CREATE TABLE plain (id int PRIMARY KEY);",
    )
    .await
    .with_publication("app");
    p.sql(
        "CREATE PUBLICATION app FOR TABLE \"My App\".\"Out Box\", \"My App\".events, plain
         WITH (publish_via_partition_root = true)",
    )
    .await;
    let args = [
        "--outbox",
        "\"My App\".\"Out Box\"",
        "--outbox",
        "\"My App\".events",
        "--outbox-column",
        "aggregateid=order_id",
        "--stop-lsn",
        "now",
    ];
    assert_success(&p.run(&args), "snapshot");
    p.sql(
        "BEGIN;
         INSERT INTO \"My App\".\"Out Box\" VALUES (1, 'Order Line', 'k1', 'T', '\\x00ff41', 7);
         INSERT INTO \"My App\".\"Out Box\" VALUES (2, 'Order Line', NULL, 'T', '\\x', NULL);
         INSERT INTO plain VALUES (1);
         INSERT INTO \"My App\".events VALUES (1, 'a', 'x', 'T', 'plain text');
         INSERT INTO \"My App\".events VALUES (2, 'b', 'y', 'T', 'more');
         DELETE FROM \"My App\".\"Out Box\";
         COMMIT;",
    )
    .await;
    assert_success(&p.run(&args), "stream");

    // `Order Line` is not a Kafka name: `_` and a hash suffix, stable per value (the first
    // 8 hex digits of its SHA-256).
    let line_topic = format!("{}.outbox.Order_Line_87ce02e6", p.prefix);
    let lines = p.records(&line_topic, Some(2)).await;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(lines[0].value.as_deref(), Some(&b"\x00\xffA"[..]));
    assert_eq!(text(header(&lines[0], "select")).as_deref(), Some("7"));
    assert_eq!(text(header(&lines[0], "id")).as_deref(), Some("1"));
    assert_eq!(lines[1].key, None, "a NULL aggregateid: a keyless record");
    assert_eq!(lines[1].value.as_deref(), Some(&b""[..]));

    // The partitioned outbox: its rows arrive under the root, routed by their value.
    let a = p.records(&format!("{}.outbox.a", p.prefix), Some(1)).await;
    assert_eq!(a[0].value.as_deref(), Some(&b"plain text"[..]));
    let b = p.records(&format!("{}.outbox.b", p.prefix), Some(1)).await;
    assert_eq!(b[0].key.as_deref(), Some(&b"y"[..]));
    // No row events of outbox tables. (PostgreSQL also describes the partition a row went
    // to, which pgcdc takes for a table joining the publication: an empty topic is made.)
    for table in ["Out Box", "events", "events_a", "events_b"] {
        let topic = topic_name(&p.prefix, &TableName::new("My App", table));
        let n = common::topics::count(&common::kafka(), &topic, true).await;
        assert_eq!(n, 0, "row events of an outbox table on {topic}");
    }
    assert_eq!(p.events("plain", Some(2)).await.len(), 2);
}

/// A run refused at start left no slot and published nothing on the topics it would write
/// (read one by one: listing every topic of the shared broker times out under load).
async fn left_nothing(p: &Pipeline) {
    assert!(!p.slot_exists().await, "a refused run left its slot");
    for topic in [
        p.topic("orders"),
        p.topic("outbox"),
        format!("{}._progress", p.prefix),
    ] {
        let n = common::topics::count(&common::kafka(), &topic, true).await;
        assert_eq!(n, 0, "a refused run published on {topic}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_table_that_is_not_published_is_refused_at_start() {
    let p = Pipeline::new(SETUP).await;
    // pgcdc makes the publication for --table: the outbox table must be among them.
    let out = p.run(&["--table", "public.orders", "--outbox", "public.outbox"]);
    assert_fails(
        &out,
        2,
        &[
            "--outbox \"public\".\"outbox\" is not published",
            "add --table \"public\".\"outbox\"",
        ],
    );
    left_nothing(&p).await;

    // A publication of the user's that lacks it.
    let p = p.with_publication("mine");
    p.sql("CREATE PUBLICATION mine FOR TABLE orders").await;
    let out = p.run(&["--outbox", "public.outbox"]);
    assert_fails(
        &out,
        2,
        &["ALTER PUBLICATION \"mine\" ADD TABLE \"public\".\"outbox\";"],
    );
    left_nothing(&p).await;

    // Columns it lacks, and the stdout sink, which cannot carry outbox events.
    let out = p
        .pgcdc("run")
        .set("--publication", "other")
        .args([
            "--table",
            "public.orders",
            "--table",
            "public.outbox",
            "--outbox",
            "public.outbox",
            "--outbox-column",
            "aggregateid=order_id",
        ])
        .output();
    assert_fails(
        &out,
        2,
        &["no published column `order_id`", "--outbox-column"],
    );
    let out = p.run(&["--outbox", "public.outbox", "--sink", "stdout"]);
    assert_fails(&out, 2, &["--sink stdout"]);
    left_nothing(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_without_a_route_stops_pgcdc_naming_it() {
    let p = Pipeline::new(
        "CREATE TABLE outbox (id int PRIMARY KEY, aggregatetype text, aggregateid text,
                              type text, payload jsonb);",
    )
    .await;
    let args = [
        "--table",
        "public.outbox",
        "--outbox",
        "public.outbox",
        "--stop-lsn",
        "now",
    ];
    assert_success(&p.run(&args), "snapshot");
    p.sql("INSERT INTO outbox VALUES (41, 'Order', '1', 'T', '{}'), (42, NULL, '1', 'T', '{}')")
        .await;
    let out = p.run(&args);
    assert_fails(
        &out,
        3,
        &[
            "(id 42)",
            "`aggregatetype`",
            "NOT NULL",
            "pg_replication_slot_advance",
        ],
    );
    // Nothing of the transaction is confirmed: a run after the fix sees it again.
    let again = p.run(&args);
    assert_fails(&again, 3, &["(id 42)"]);
}
