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

#[path = "faults/servers.rs"]
mod servers;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::pipeline::is_marker_record;
use common::TestDb;
use pgcdc::kafka::{KafkaConfig, ReadStop, TopicReader};

fn kafka() -> String {
    std::env::var("PGCDC_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

const TABLE: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text);
    INSERT INTO public.items SELECT g, 'row ' || g FROM generate_series(1, 20) g;";

/// A test database with `items`, and names for pgcdc's slot and topics.
struct Case {
    db: TestDb,
    slot: String,
    prefix: String,
}

impl Case {
    async fn new(setup: &str) -> Case {
        let db = TestDb::create().await;
        db.client().await.batch_execute(setup).await.expect("setup");
        Case {
            db,
            slot: common::unique_name("bslot"),
            prefix: common::unique_name("b"),
        }
    }

    fn source(&self, user: &str, extra: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={} sslmode=disable connect_timeout=5 {extra}",
            self.db.env.host, self.db.env.port, self.db.name
        )
    }

    fn superuser_source(&self) -> String {
        self.source(&self.db.env.superuser, "")
    }

    /// `pgcdc run` for `items` with `source`, to completion.
    fn run(&self, source: &str, extra: &[&str]) -> Output {
        self.command(source, extra).output().expect("pgcdc runs")
    }

    fn command(&self, source: &str, extra: &[&str]) -> Command {
        self.command_with(source, &kafka(), extra)
    }

    fn command_with(&self, source: &str, kafka: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pgcdc"));
        c.arg("run")
            .args(["--source", source, "--kafka", kafka])
            .args(["--slot", &self.slot, "--publication", &self.slot])
            .args(["--topic-prefix", &self.prefix, "--table", "public.items"])
            .args(["--stop-lsn", "now", "--status-interval", "0.5"])
            .args(extra)
            .env_remove("PGCDC_LOG")
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/nonexistent")
            .stdin(Stdio::null());
        c
    }

    /// Records published on `<prefix>.public.items`, snapshot markers aside (0 when the
    /// topic does not exist).
    async fn published(&self) -> usize {
        self.count(false).await
    }

    /// A run that failed at start published nothing and left no slot.
    async fn assert_left_nothing(&self) {
        common::assert_nothing_published(&kafka(), &self.prefix).await;
        common::assert_no_slot(&self.db.admin(), &self.slot).await;
    }

    /// Records on the table's topic, snapshot markers included or not.
    async fn count(&self, markers: bool) -> usize {
        let cfg = KafkaConfig::new(kafka());
        let topic = format!("{}.public.items", self.prefix);
        tokio::task::spawn_blocking(move || {
            match TopicReader::open_if_exists(
                &cfg,
                &topic,
                ReadStop::Quiet {
                    expected: None,
                    quiet: Duration::from_secs(2),
                    max_wait: Duration::from_secs(30),
                },
            )
            .expect("the topic is readable")
            {
                None => 0,
                Some(r) => r
                    .filter(|r| markers || !r.as_ref().is_ok_and(is_marker_record))
                    .count(),
            }
        })
        .await
        .expect("reader thread")
    }
}

/// Checks the exit code and that stderr names the fix.
fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_names_the_fix() {
    let c = Case::new(TABLE).await;
    let Some(scram) = c.db.env.scram.clone() else {
        return common::skip("wrong_password", "PGCDC_TEST_SCRAM_USER is not set");
    };
    let out = c.run(&c.source(&scram.user, "password=not-the-password"), &[]);
    assert_fails(
        &out,
        3,
        &["password authentication failed", "Fix:", "PGPASSWORD"],
    );
    c.assert_left_nothing().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_host_names_the_fix() {
    let c = Case::new(TABLE).await;
    // The `!` makes the resolver reject the name without asking a DNS server, so no test
    // traffic leaves this machine.
    let source = format!(
        "host=pgcdc-unknown-host! port=5432 user=postgres dbname={}",
        c.db.name
    );
    let out = c.run(&source, &[]);
    assert_fails(
        &out,
        3,
        &["pgcdc-unknown-host!", "does not resolve", "host="],
    );
    c.assert_left_nothing().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_database_names_the_fix() {
    let c = Case::new(TABLE).await;
    let source = format!(
        "host={} port={} user={} dbname=pgcdc_no_such_db sslmode=disable",
        c.db.env.host, c.db.env.port, c.db.env.superuser
    );
    let out = c.run(&source, &[]);
    assert_fails(&out, 3, &["\"pgcdc_no_such_db\" does not exist", "dbname="]);
    c.assert_left_nothing().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_listening_names_the_fix() {
    let c = Case::new(TABLE).await;
    let port = servers::free_port();
    let source = format!("host=127.0.0.1 port={port} user=postgres dbname=x sslmode=disable");
    let out = c.run(&source, &[]);
    assert_fails(&out, 3, &["Connection refused", "listens"]);
    c.assert_left_nothing().await;
}

/// PostgreSQL and Kafka are reached at the same time at start-up: a PostgreSQL mistake is
/// reported at once, not after the wait for an unreachable broker (which has no deadline
/// without --kafka-timeout).
#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_mistake_is_reported_while_kafka_is_unreachable() {
    let c = Case::new(TABLE).await;
    let nowhere = format!("127.0.0.1:{}", servers::free_port());
    let started = std::time::Instant::now();
    let out = c
        .command_with(&c.superuser_source(), &nowhere, &["--table", "public.nope"])
        .output()
        .expect("pgcdc runs");
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
    let out = Command::new(env!("CARGO_BIN_EXE_pgcdc"))
        .arg("run")
        .args(["--source", &pg.conninfo(&name), "--kafka", &kafka()])
        .args(["--topic-prefix", &prefix, "--table", "public.items"])
        .env_remove("PGCDC_LOG")
        .output()
        .expect("pgcdc runs");
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
    let c = Case::new(TABLE).await;
    c.db.client()
        .await
        .query_one(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')::text",
            &[&c.slot],
        )
        .await
        .expect("create a test_decoding slot");
    let out = c.run(&c.superuser_source(), &[]);
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
    let c = Case::new(TABLE).await;
    c.db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE public.other (id int PRIMARY KEY); CREATE PUBLICATION {} FOR TABLE other",
            c.slot
        ))
        .await
        .expect("a publication of another table");
    let out = c.run(&c.superuser_source(), &[]);
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
    let c = Case::new(TABLE).await;
    let mock = MockCluster::new(1).expect("a mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let source = c.superuser_source();
    let out = tokio::task::spawn_blocking({
        let mut cmd = c.command_with(&source, &bootstrap, &["--kafka-timeout", "10"]);
        move || cmd.output().expect("pgcdc runs")
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
    let c = Case::new(TABLE).await;
    let source = c.superuser_source();
    let out = c.run(&source, &[]);
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
    let out = c.run(
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
    assert_eq!(c.published().await, 21);
}

/// The password never appears: not in logs at any level, not in errors, not in `--help`.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_appear_in_output() {
    let c = Case::new(TABLE).await;
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
    let kv = c.source(&scram.user, &format!("password={}", scram.password));
    let kafka_secret = "kafka-secret-9f3a";
    let sasl = format!("sasl.password={kafka_secret}");
    let typo = format!("sasl.password.typo={kafka_secret}");
    let runs: Vec<(String, Vec<&str>, Option<&str>)> = vec![
        // Successful runs, every log level on: password in the URL, in key=value, and
        // from PGPASSWORD; a Kafka password in -X.
        (url.clone(), vec!["-X", &sasl], None),
        (kv.clone(), vec![], None),
        (
            c.source(&scram.user, ""),
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
        let mut cmd = c.command_with(source, &kafka, extra);
        cmd.env("PGCDC_LOG", "trace");
        if let Some(p) = pgpassword {
            cmd.env("PGPASSWORD", p);
        }
        outputs.push(cmd.output().expect("pgcdc runs"));
    }
    assert!(
        outputs[0].status.success(),
        "{}",
        String::from_utf8_lossy(&outputs[0].stderr)
    );
    assert!(outputs[2].status.success(), "PGPASSWORD is used");
    // --help with the source in the environment.
    outputs.push(
        Command::new(env!("CARGO_BIN_EXE_pgcdc"))
            .args(["run", "--help"])
            .env("PGCDC_SOURCE", &url)
            .env(
                "PGCDC_KAFKA_PROPERTIES",
                format!("sasl.password={kafka_secret}"),
            )
            .output()
            .expect("help"),
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
    let c = Case::new(TABLE).await;
    let secret_dir = common::unique_name("no_such_ca_dir");
    let ca = std::env::temp_dir().join(&secret_dir).join("ca.pem");
    let ca = format!("ssl.ca.location={}", ca.display());
    let mut cmd = c.command(
        &c.superuser_source(),
        &[
            "-X",
            "security.protocol=SSL",
            "-X",
            &ca,
            "--kafka-timeout",
            "5",
        ],
    );
    cmd.env("PGCDC_LOG", "trace");
    let out = cmd.output().expect("pgcdc runs");
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
    let c = Case::new(TABLE).await;
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
    let out = c.run(&format!("{base} sslmode=disable"), &[]);
    assert_fails(&out, 3, &["pg_hba.conf"]);
    let out = c.run(&format!("{base} sslmode=require"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.published().await, 20);
    c.db.client()
        .await
        .batch_execute("UPDATE items SET v = 'over TLS' WHERE id = 3")
        .await
        .expect("update");
    let verify = format!("{base} sslmode=verify-full sslrootcert={}", ca.display());
    let out = c.run(&verify, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from the slot"), "{err}");
    assert_eq!(c.published().await, 21);
}
