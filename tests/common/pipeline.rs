//! One test's pgcdc setup: its own database, slot, publication, topic prefix and directory;
//! `pgcdc` commands against them ([`Pipeline::pgcdc`]), and the real topics read back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

use super::api::{topic_name, ConsumedRecord, TableName};
use super::cmd::PgcdcCmd;
use super::TestDb;
use serde_json::Value;

pub use super::assert::{assert_fails, assert_success};
pub use super::kafka;
pub use super::topics::{is_marker_record, without_markers, Event};

/// One test's pgcdc setup: its own database, slot, publication and topic prefix.
pub struct Pipeline {
    pub db: TestDb,
    pub slot: String,
    /// The publication (the slot's name unless [`Pipeline::with_publication`]).
    pub publication: String,
    pub prefix: String,
    pub dir: PathBuf,
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
        Pipeline::on(db)
    }

    /// A pipeline on an existing test database.
    pub fn on(db: TestDb) -> Pipeline {
        let slot = super::unique_name("slot");
        let prefix = super::unique_name("t");
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Pipeline {
            db,
            publication: slot.clone(),
            slot,
            prefix,
            dir,
        }
    }

    /// Uses publication `name` rather than one named like the slot.
    pub fn with_publication(mut self, name: &str) -> Pipeline {
        self.publication = name.to_string();
        self
    }

    /// The superuser's conninfo for `--source`.
    pub fn source(&self) -> String {
        self.db.source()
    }

    /// `pgcdc <command>` against this test: `--source` (the superuser), `--kafka` (the
    /// shared durable broker), `--slot`, `--topic-prefix`; `--publication` for the commands
    /// that take one (`run`, `drop`, `verify`); `--status-interval 0.5` for `run`. Each can
    /// be overridden ([`PgcdcCmd::set`]) or removed ([`PgcdcCmd::unset`]).
    pub fn pgcdc(&self, command: &str) -> PgcdcCmd {
        let mut c = PgcdcCmd::new(command)
            .set("--source", &self.source())
            .set("--kafka", &kafka())
            .set("--slot", &self.slot);
        if matches!(command, "run" | "drop" | "verify") {
            c = c.set("--publication", &self.publication);
        }
        c = c.set("--topic-prefix", &self.prefix);
        if command == "run" {
            c = c.set("--status-interval", "0.5");
        }
        c
    }

    /// `pgcdc run` with this pipeline's settings plus `extra`.
    pub fn command(&self, extra: &[&str]) -> Command {
        self.pgcdc("run").args(extra).command()
    }

    /// `pgcdc run` with another source or broker.
    pub fn command_with(&self, source: &str, kafka: &str, extra: &[&str]) -> Command {
        self.pgcdc("run")
            .set("--source", source)
            .set("--kafka", kafka)
            .args(extra)
            .command()
    }

    /// Runs to completion; returns the output.
    pub fn run(&self, extra: &[&str]) -> Output {
        self.pgcdc("run").args(extra).output()
    }

    /// Runs in the background, logging to a file in this test's directory.
    pub fn spawn(&self, extra: &[&str], log: &str) -> Child {
        self.pgcdc("run")
            .args(extra)
            .spawn_logging(&self.dir.join(log))
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

    /// Runs `sql` on this test's database as the superuser.
    pub async fn sql(&self, sql: &str) {
        self.db.sql(sql).await
    }

    /// Whether this test's slot exists.
    pub async fn slot_exists(&self) -> bool {
        self.db.slot_exists(&self.slot).await
    }

    /// The topic of `public.<table>` (see `pgcdc::source::topic`).
    pub fn topic(&self, table: &str) -> String {
        topic_name(&self.prefix, &TableName::new("public", table))
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
            .map(Event::of)
            .collect()
    }

    /// The raw records of `topic` (see [`super::topics::records`]).
    pub async fn records(&self, topic: &str, expected: Option<usize>) -> Vec<ConsumedRecord> {
        super::topics::records(&kafka(), topic, expected).await
    }

    /// Records on a table's topic, snapshot markers counted or not (0 without the topic).
    pub async fn count(&self, table: &str, markers: bool) -> usize {
        super::topics::count(&kafka(), &self.topic(table), markers).await
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

    /// Waits (at most `timeout`) until the slot confirmed everything written so far:
    /// whether it did.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let target = self.current_lsn().await;
        super::poll_until(timeout, || async {
            self.confirmed_flush().await.filter(|c| *c >= target)
        })
        .await
        .is_some()
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
