//! Bad input and security: each mistake a user can make ends `pgcdc run` with the documented
//! exit code, a message that names the fix, nothing published and no slot left
//! (`common::assert_nothing_published`, `common::assert_no_slot`); passwords appear nowhere;
//! TLS to PostgreSQL works end to end.
//!
//! The mistakes already covered in `tests/run.rs` (missing table, table without key, invalid
//! `--table`/`--stop-lsn`/`-X`, bad conninfo, Kafka unreachable with `--kafka-timeout`, slot
//! in use, no REPLICATION, no SELECT, a row over the message limit, closed stdout pipe) are
//! not repeated here.

mod common;

use std::process::Output;
use std::time::Duration;

use common::cmd::PgcdcCmd;
use common::pipeline::Pipeline;
use common::servers;
use common::{assert_fails, kafka};

const TABLE: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text);
    INSERT INTO public.items SELECT g, 'row ' || g FROM generate_series(1, 20) g;";

/// A conninfo for this test's database as `user`; `extra` is appended.
fn source(c: &Pipeline, user: &str, extra: &str) -> String {
    c.db.source_as(user, &format!("connect_timeout=5 {extra}"))
}

fn superuser_source(c: &Pipeline) -> String {
    source(c, &c.db.env.superuser, "")
}

/// `pgcdc run` of `items` up to now, from `source`.
fn items(c: &Pipeline, source: &str) -> PgcdcCmd {
    c.pgcdc("run")
        .set("--source", source)
        .args(["--table", "public.items", "--stop-lsn", "now"])
}

/// [`items`] plus `extra`, to completion.
fn run(c: &Pipeline, source: &str, extra: &[&str]) -> Output {
    items(c, source).args(extra).output()
}

/// The source of a test that expects pgcdc to fail at start: `None` skips the test.
type BadSource = fn(&Pipeline) -> Result<String, &'static str>;

/// `pgcdc run` from a bad `source` ends with exit 3, stderr says every needle, and the run
/// left nothing behind.
async fn fails_at_start(test: &str, source: BadSource, needles: &[&str]) {
    let c = Pipeline::new(TABLE).await;
    let source = match source(&c) {
        Ok(s) => s,
        Err(why) => return common::skip(test, why),
    };
    let out = run(&c, &source, &[]);
    assert_fails(&out, 3, needles);
    c.assert_left_nothing().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_names_the_fix() {
    fails_at_start(
        "wrong_password",
        |c| match &c.db.env.scram {
            Some(scram) => Ok(source(c, &scram.user, "password=not-the-password")),
            None => Err("PGCDC_TEST_SCRAM_USER is not set"),
        },
        &["password authentication failed", "Fix:", "PGPASSWORD"],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_host_names_the_fix() {
    // The `!` makes the resolver reject the name without asking a DNS server, so no test
    // traffic leaves this machine.
    fails_at_start(
        "unknown_host",
        |c| {
            Ok(format!(
                "host=pgcdc-unknown-host! port=5432 user=postgres dbname={}",
                c.db.name
            ))
        },
        &["pgcdc-unknown-host!", "does not resolve", "host="],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_database_names_the_fix() {
    fails_at_start(
        "missing_database",
        |c| {
            Ok(format!(
                "host={} port={} user={} dbname=pgcdc_no_such_db sslmode=disable",
                c.db.env.host, c.db.env.port, c.db.env.superuser
            ))
        },
        &["\"pgcdc_no_such_db\" does not exist", "dbname="],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_listening_names_the_fix() {
    fails_at_start(
        "nothing_listening",
        |_| {
            let port = servers::free_port();
            Ok(format!(
                "host=127.0.0.1 port={port} user=postgres dbname=x sslmode=disable"
            ))
        },
        &["Connection refused", "listens"],
    )
    .await
}

/// PostgreSQL and Kafka are reached at the same time at start-up: a PostgreSQL mistake is
/// reported at once, not after the wait for an unreachable broker (which has no deadline
/// without --kafka-timeout).
#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_mistake_is_reported_while_kafka_is_unreachable() {
    let c = Pipeline::new(TABLE).await;
    let nowhere = format!("127.0.0.1:{}", servers::free_port());
    let started = std::time::Instant::now();
    let out = items(&c, &superuser_source(&c))
        .set("--kafka", &nowhere)
        .args(["--table", "public.nope"])
        .output();
    assert_fails(&out, 3, &[r#""public"."nope""#]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    c.assert_left_nothing().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_level_not_logical_names_the_fix() {
    // A cluster of its own: changing wal_level needs a restart.
    let pg = servers::PrivatePg::start(&["wal_level = replica"]);
    let name = common::unique_name("bwal");
    pg.create_database(&name).await;
    let client = common::client(&common::parse(&pg.conninfo(&name))).await;
    client.batch_execute(TABLE).await.expect("setup");
    let prefix = common::unique_name("b");
    let out = PgcdcCmd::new("run")
        .set("--source", &pg.conninfo(&name))
        .set("--kafka", &kafka())
        .set("--topic-prefix", &prefix)
        .args(["--table", "public.items"])
        .output();
    assert_fails(
        &out,
        3,
        &[
            "wal_level is `replica`",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    );
    common::assert_nothing_published(&kafka(), &prefix).await;
    // (A `replica` server cannot hold a logical slot at all.)
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_of_another_plugin_names_the_fix() {
    let c = Pipeline::new(TABLE).await;
    c.db.client()
        .await
        .query_one(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')::text",
            &[&c.slot],
        )
        .await
        .expect("create a test_decoding slot");
    let out = run(&c, &superuser_source(&c), &[]);
    assert_fails(
        &out,
        3,
        &["test_decoding", "not pgoutput", "pg_drop_replication_slot"],
    );
    common::assert_nothing_published(&kafka(), &c.prefix).await;
    // The user's slot is left as it was.
    let plugin: String =
        c.db.client()
            .await
            .query_one(
                "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&c.slot],
            )
            .await
            .expect("the slot is still there")
            .get(0);
    assert_eq!(plugin, "test_decoding");
}

#[tokio::test(flavor = "multi_thread")]
async fn publication_with_other_tables_names_the_fix() {
    let c = Pipeline::new(TABLE).await;
    c.db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE public.other (id int PRIMARY KEY); CREATE PUBLICATION {} FOR TABLE other",
            c.slot
        ))
        .await
        .expect("a publication of another table");
    let out = run(&c, &superuser_source(&c), &[]);
    assert_fails(
        &out,
        3,
        &[r#"does not include "public"."items""#, "ALTER PUBLICATION"],
    );
    c.assert_left_nothing().await;
}

/// tansu creates any topic it is asked for, so this runs against librdkafka's mock cluster
/// (in this process, on loopback), which answers metadata but does not implement CreateTopics:
/// topic creation fails as on a broker that refuses it, after the admin timeout (30 s).
#[tokio::test(flavor = "multi_thread")]
async fn topic_creation_refused_names_the_fix() {
    use rdkafka::mocking::MockCluster;
    let c = Pipeline::new(TABLE).await;
    let mock = MockCluster::new(1).expect("a mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let source = superuser_source(&c);
    let out = tokio::task::spawn_blocking({
        let cmd = items(&c, &source)
            .set("--kafka", &bootstrap)
            .args(["--kafka-timeout", "10"]);
        move || cmd.output()
    })
    .await
    .expect("runner");
    assert_fails(
        &out,
        4,
        &[
            "refused to create Kafka topic",
            "create it yourself",
            "CREATE",
        ],
    );
    // The slot is created only after the topics: nothing was captured.
    let slots: i64 =
        c.db.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&c.slot],
            )
            .await
            .expect("slots")
            .get(0);
    assert_eq!(slots, 0);
}

/// `--oversized skip`: the record is left out with a loud log line and a count, the rest is
/// published and confirmed. (The default, fail, is tested in `tests/run.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn oversized_row_is_skipped_loudly_when_asked() {
    let c = Pipeline::new(TABLE).await;
    let source = superuser_source(&c);
    let out = run(&c, &source, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.db.client()
        .await
        .batch_execute(
            "UPDATE items SET v = repeat('y', 5000) WHERE id = 1;
             UPDATE items SET v = 'small' WHERE id = 2;",
        )
        .await
        .expect("updates");
    let out = run(
        &c,
        &source,
        &["-X", "message.max.bytes=2000", "--oversized", "skip"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("SKIPPED a record larger than Kafka accepts"),
        "{err}"
    );
    assert!(err.contains("oversized_skipped: 1"), "{err}");
    // 20 snapshot rows and the small update; the large one is not there.
    assert_eq!(c.count("items", false).await, 21);
}

/// The password never appears: not in logs at any level, not in errors, not in `--help`.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_appear_in_output() {
    let c = Pipeline::new(TABLE).await;
    let Some(scram) = c.db.env.scram.clone() else {
        return common::skip("passwords", "PGCDC_TEST_SCRAM_USER is not set");
    };
    c.db.client()
        .await
        .batch_execute(&format!(
            "GRANT SELECT ON items TO {0}; CREATE PUBLICATION {1} FOR TABLE items;",
            scram.user, c.slot
        ))
        .await
        .expect("grants");
    let url = format!(
        "postgres://{}:{}@{}:{}/{}?sslmode=disable",
        scram.user, scram.password, c.db.env.host, c.db.env.port, c.db.name
    );
    let kv = source(&c, &scram.user, &format!("password={}", scram.password));
    let kafka_secret = "kafka-secret-9f3a";
    let sasl = format!("sasl.password={kafka_secret}");
    let typo = format!("sasl.password.typo={kafka_secret}");
    let runs: Vec<(String, Vec<&str>, Option<&str>)> = vec![
        // Successful runs, every log level on: password in the URL, in key=value, and
        // from PGPASSWORD; a Kafka password in -X.
        (url.clone(), vec!["-X", &sasl], None),
        (kv.clone(), vec![], None),
        (
            source(&c, &scram.user, ""),
            vec![],
            Some(scram.password.as_str()),
        ),
        // Failures: a wrong database, Kafka unreachable, an invalid -X.
        (url.replace(&c.db.name, "pgcdc_no_such_db"), vec![], None),
        (url.clone(), vec!["--kafka-timeout", "1"], None),
        (url.clone(), vec!["-X", &typo], None),
    ];
    let mut outputs = Vec::new();
    for (i, (source, extra, pgpassword)) in runs.iter().enumerate() {
        let kafka = if i == 4 {
            "127.0.0.1:9".to_string()
        } else {
            kafka()
        };
        let mut cmd = items(&c, source)
            .set("--kafka", &kafka)
            .args(extra)
            .env("PGCDC_LOG", "trace");
        if let Some(p) = pgpassword {
            cmd = cmd.env("PGPASSWORD", p);
        }
        outputs.push(cmd.output());
    }
    assert!(
        outputs[0].status.success(),
        "{}",
        String::from_utf8_lossy(&outputs[0].stderr)
    );
    assert!(outputs[2].status.success(), "PGPASSWORD is used");
    // --help with the source in the environment.
    outputs.push(
        PgcdcCmd::new("run")
            .args(["--help"])
            .env("PGCDC_SOURCE", &url)
            .env(
                "PGCDC_KAFKA_PROPERTIES",
                &format!("sasl.password={kafka_secret}"),
            )
            .output(),
    );
    for (i, out) in outputs.iter().enumerate() {
        for stream in [&out.stdout, &out.stderr] {
            let text = String::from_utf8_lossy(stream);
            assert!(
                !text.contains(&scram.password) && !text.contains(kafka_secret),
                "output {i} shows a password:\n{text}"
            );
        }
    }
}

/// The test broker has no TLS listener, so TLS to Kafka is not tested end to end. What can
/// be: a TLS setting librdkafka rejects (a CA file that does not exist) stops pgcdc at start
/// with a message naming the property — not its value — and nothing published.
#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_tls_setting_librdkafka_rejects_names_the_property() {
    let c = Pipeline::new(TABLE).await;
    let secret_dir = common::unique_name("no_such_ca_dir");
    let ca = std::env::temp_dir().join(&secret_dir).join("ca.pem");
    let ca = format!("ssl.ca.location={}", ca.display());
    let out = items(&c, &superuser_source(&c))
        .args([
            "-X",
            "security.protocol=SSL",
            "-X",
            &ca,
            "--kafka-timeout",
            "5",
        ])
        .env("PGCDC_LOG", "trace")
        .output();
    assert_fails(&out, 4, &["-X ssl.ca.location", "exist"]);
    for stream in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(stream);
        assert!(!text.contains(&secret_dir), "the value is shown:\n{text}");
    }
    c.assert_left_nothing().await;
}

/// A whole run over TLS, with the TLS-only role, for `require` and `verify-full`.
#[tokio::test(flavor = "multi_thread")]
async fn run_over_tls_require_and_verify_full() {
    let c = Pipeline::new(TABLE).await;
    let (Some(tls), Some(ca)) = (c.db.env.tls.clone(), c.db.env.sslrootcert.clone()) else {
        return common::skip(
            "tls",
            "PGCDC_TEST_TLS_USER or PGCDC_TEST_SSLROOTCERT is not set",
        );
    };
    c.db.client()
        .await
        .batch_execute(&format!(
            "GRANT SELECT ON items TO {0}; CREATE PUBLICATION {1} FOR TABLE items;",
            tls.user, c.slot
        ))
        .await
        .expect("grants");
    let base = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        c.db.env.port, tls.user, tls.password, c.db.name
    );
    // The role may not log in without TLS at all.
    let out = run(&c, &format!("{base} sslmode=disable"), &[]);
    assert_fails(&out, 3, &["pg_hba.conf"]);
    let out = run(&c, &format!("{base} sslmode=require"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.count("items", false).await, 20);
    c.db.client()
        .await
        .batch_execute("UPDATE items SET v = 'over TLS' WHERE id = 3")
        .await
        .expect("update");
    let verify = format!("{base} sslmode=verify-full sslrootcert={}", ca.display());
    let out = run(&c, &verify, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from the slot"), "{err}");
    assert_eq!(c.count("items", false).await, 21);
}
