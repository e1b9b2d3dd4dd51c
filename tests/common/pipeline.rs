//! One test's pgcdc pipeline: its own database, slot, publication and topic prefix; runs the
//! real binary and reads back the real topics.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use pgcdc::kafka::{read_topic, ConsumedRecord, KafkaConfig, ReadStop};
use serde_json::Value;

use super::TestDb;

pub fn kafka() -> String {
    std::env::var("PGCDC_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// One test's pgcdc setup: its own database, slot, publication and topic prefix.
pub struct Pipeline {
    pub db: TestDb,
    pub slot: String,
    pub prefix: String,
    pub dir: PathBuf,
}

/// A record read back from a topic, JSON-decoded.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: Option<Value>,
    pub value: Option<Value>,
}

impl Event {
    pub fn op(&self) -> Option<&str> {
        self.value.as_ref().and_then(|v| v["op"].as_str())
    }
    pub fn lsn_pair(&self) -> (u64, u64) {
        let s = &self.value.as_ref().expect("not a tombstone")["source"];
        (
            s["commit_lsn"].as_u64().expect("commit_lsn"),
            s["lsn"].as_u64().expect("lsn"),
        )
    }
    /// Where the event ranks among its key's events (pgcdc's one ordering rule).
    pub fn version(&self) -> pgcdc::event::order::Version {
        let (commit_lsn, lsn) = self.lsn_pair();
        pgcdc::event::order::Version::of_event(self.op().unwrap_or_default(), commit_lsn, lsn)
    }
    /// A snapshot marker (`op` `s`): the end of a table's snapshot, no row.
    pub fn is_marker(&self) -> bool {
        self.op() == Some("s")
    }
    /// `snapshot.rows` of a marker.
    pub fn marker_rows(&self) -> Option<u64> {
        self.value.as_ref()?["snapshot"]["rows"].as_u64()
    }
}

/// Whether a raw record is a snapshot marker (no key; `op` or, flat, `__op` `s`).
pub fn is_marker_record(r: &ConsumedRecord) -> bool {
    r.key.is_none()
        && r.value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<Value>(v).ok())
            .is_some_and(|v| v["op"] == "s" || v["__op"] == "s")
}

/// The events without the snapshot markers.
pub fn without_markers(events: Vec<Event>) -> Vec<Event> {
    events.into_iter().filter(|e| !e.is_marker()).collect()
}

impl Pipeline {
    pub async fn new(setup_sql: &str) -> Pipeline {
        Pipeline::new_in(super::env(), setup_sql).await
    }

    /// A pipeline on the cluster of `env` (another PostgreSQL version, see
    /// [`super::env_for_major`]).
    pub async fn new_in(env: super::TestEnv, setup_sql: &str) -> Pipeline {
        let db = TestDb::create_in(env).await;
        db.client()
            .await
            .batch_execute(setup_sql)
            .await
            .expect("test setup SQL");
        let slot = super::unique_name("slot");
        let prefix = super::unique_name("t");
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Pipeline {
            db,
            slot,
            prefix,
            dir,
        }
    }

    pub fn source(&self) -> String {
        format!(
            "host={} port={} user={} dbname={} sslmode=disable",
            self.db.env.host, self.db.env.port, self.db.env.superuser, self.db.name
        )
    }

    /// `pgcdc run` with this pipeline's settings plus `extra`.
    pub fn command(&self, extra: &[&str]) -> Command {
        self.command_with(&self.source(), &kafka(), extra)
    }

    /// `pgcdc run` with another source or broker.
    pub fn command_with(&self, source: &str, kafka: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pgcdc"));
        c.arg("run")
            .args(["--source", source])
            .args(["--kafka", kafka])
            .args(["--slot", &self.slot, "--publication", &self.slot])
            .args(["--topic-prefix", &self.prefix])
            .args(["--status-interval", "0.5"])
            .args(extra)
            .env_remove("PGCDC_LOG")
            .env("PGPASSFILE", "/nonexistent")
            .stdin(Stdio::null());
        c
    }

    /// Runs to completion; returns the output.
    pub fn run(&self, extra: &[&str]) -> Output {
        self.command(extra).output().expect("pgcdc runs")
    }

    /// Runs in the background, logging to a file in this test's directory.
    pub fn spawn(&self, extra: &[&str], log: &str) -> Child {
        let file = std::fs::File::create(self.dir.join(log)).expect("log file");
        self.command(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("pgcdc starts")
    }

    /// Waits (at most 30 s) until the background run's log says `needle`.
    pub async fn wait_for_log(&self, log: &str, needle: &str) {
        let found = super::poll_until(Duration::from_secs(30), || async {
            self.log(log).contains(needle).then_some(())
        })
        .await;
        assert!(
            found.is_some(),
            "{log} never said {needle:?}:\n{}",
            self.log(log)
        );
    }

    pub fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.join(log)).unwrap_or_default()
    }

    /// The topic of `public.<table>` (see `pgcdc::source::topic`).
    pub fn topic(&self, table: &str) -> String {
        pgcdc::source::topic::topic_name(
            &self.prefix,
            &pgcdc::source::catalog::TableName::new("public", table),
        )
    }

    /// Everything in a table's topic, in offset order (one partition by default), snapshot
    /// markers included: `expected` counts them (one per snapshot on a one-partition topic).
    pub async fn events(&self, table: &str, expected: Option<usize>) -> Vec<Event> {
        self.events_in(&self.topic(table), expected).await
    }

    /// Everything in `topic`, JSON-decoded, in offset order.
    pub async fn events_in(&self, topic: &str, expected: Option<usize>) -> Vec<Event> {
        self.records(topic, expected)
            .await
            .into_iter()
            .map(|r| Event {
                key: r
                    .key
                    .map(|k| serde_json::from_slice(&k).expect("key is JSON")),
                value: r
                    .value
                    .map(|v| serde_json::from_slice(&v).expect("value is JSON")),
            })
            .collect()
    }

    /// The raw records of `topic`: until `expected` arrived (at most 60 s), or without an
    /// expectation, until nothing new arrives for 3 s. Under load the first fetch can take
    /// longer than that, so an empty read is tried again before it counts.
    pub async fn records(&self, topic: &str, expected: Option<usize>) -> Vec<ConsumedRecord> {
        let quiet = match expected {
            Some(_) => Duration::from_secs(60),
            None => Duration::from_secs(3),
        };
        let mut records = Vec::new();
        for _ in 0..3 {
            let cfg = KafkaConfig::new(kafka());
            let topic = topic.to_string();
            records = tokio::task::spawn_blocking(move || {
                read_topic(
                    &cfg,
                    &topic,
                    ReadStop::Quiet {
                        expected,
                        quiet,
                        max_wait: Duration::from_secs(60),
                    },
                )
            })
            .await
            .expect("reader thread")
            .expect("topic is readable");
            if !records.is_empty() || expected.is_some() {
                break;
            }
        }
        records
    }

    /// The table as JSON objects by id, in the encoder's terms (id and n are numbers).
    pub async fn table_rows(&self, table: &str) -> BTreeMap<i64, Value> {
        let client = self.db.client().await;
        let rows = client
            .query(
                &format!("SELECT id::int8, to_jsonb(t)::text FROM public.{table} t"),
                &[],
            )
            .await
            .expect("read table");
        rows.iter()
            .map(|r| {
                let json: String = r.get(1);
                (
                    r.get::<_, i64>(0),
                    serde_json::from_str(&json).expect("row json"),
                )
            })
            .collect()
    }

    /// A run that failed at start published nothing and left no slot.
    pub async fn assert_left_nothing(&self) {
        super::assert_nothing_published(&kafka(), &self.prefix).await;
        super::assert_no_slot(&self.db.admin(), &self.slot).await;
    }

    pub async fn confirmed_flush(&self) -> Option<u64> {
        let client = self.db.client().await;
        let row = client
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .expect("query slot")?;
        row.get::<_, Option<i64>>(0).map(|v| v as u64)
    }

    pub async fn current_lsn(&self) -> u64 {
        let client = self.db.client().await;
        let row = client
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
            .await
            .expect("current lsn");
        row.get::<_, i64>(0) as u64
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs pgcdc expecting a failure: checks the exit code and that stderr names the fix.
pub fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}
