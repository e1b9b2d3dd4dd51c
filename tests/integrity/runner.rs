//! Runs one generated [`Case`] end to end: its own database, the real `pgcdc run` binary
//! (restarted, stopped and `kill -9`ed as the workload says), the real broker or stdout, and
//! then the oracle on every captured table.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::common::api::topic_name;
use crate::common::api::TableName;
use serde_json::Value;

use crate::common::cmd::PgcdcCmd;
use crate::common::process::Pgcdc;
use crate::common::topics::Event;
use crate::common::{self, TestDb, TestEnv};
use crate::gen::{Bug, Case, Config, PubMode, Sink, Step, StopKind};
use crate::oracle::{self, Record};

/// The `pgcdc run` process of a case, run after run (the fault suite's supervisor), with
/// counts of how it was stopped.
struct Proc {
    p: Pgcdc,
    kills: usize,
    terms: usize,
}

impl Proc {
    fn spawn(&mut self) {
        self.p.spawn();
    }

    fn running(&self) -> bool {
        self.p.running()
    }

    fn runs(&self) -> usize {
        self.p.runs
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.p.exited()
    }

    fn stop(&mut self, kind: StopKind) -> Result<(), String> {
        if let Some(status) = self.p.exited() {
            return Err(self.died(status));
        }
        match kind {
            StopKind::Kill => {
                self.p.kill9();
                self.kills += 1;
                Ok(())
            }
            StopKind::Term => {
                self.terms += 1;
                match self.p.sigterm(Duration::from_secs(30)) {
                    Some(s) if s.success() => Ok(()),
                    Some(s) => Err(self.died(s)),
                    None => Err(format!(
                        "run {} did not exit within 30 s of SIGTERM\n{}",
                        self.p.runs,
                        self.tail(self.p.runs)
                    )),
                }
            }
        }
    }

    /// Waits until the current run streams (its snapshot, if any, is done); an error if it
    /// ends first or takes longer than `timeout`.
    async fn wait_streaming(&mut self, timeout: Duration) -> Result<(), String> {
        if self.p.wait_for_log("streaming changes", timeout).await {
            return Ok(());
        }
        Err(match self.p.exited() {
            Some(status) => self.died(status),
            None if !self.p.running() => format!(
                "run {} ended before streaming:\n{}",
                self.p.runs,
                self.tail(self.p.runs)
            ),
            None => format!(
                "run {} did not start streaming within {timeout:?}:\n{}",
                self.p.runs,
                self.tail(self.p.runs)
            ),
        })
    }

    fn died(&self, status: ExitStatus) -> String {
        format!(
            "pgcdc run {} exited on its own with {status}:\n{}",
            self.p.runs,
            self.tail(self.p.runs)
        )
    }

    /// The last lines of a run's log.
    fn tail(&self, run: usize) -> String {
        let log = self.p.log_of(run);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Every stdout line of every run, in order, by topic.
    fn stdout_records(&self) -> Vec<(String, Record)> {
        let mut out = Vec::new();
        for run in 1..=self.p.runs {
            for line in self.p.stdout_of(run).lines() {
                // A run killed mid-line leaves a partial last line.
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                let topic = v["topic"].as_str().unwrap_or_default().to_string();
                let key = Some(v["key"].clone()).filter(|k| !k.is_null());
                let value = Some(v["value"].clone()).filter(|k| !k.is_null());
                out.push((topic, Record { key, value }));
            }
        }
        out
    }
}

/// What a passing case counted.
#[derive(Debug, Default)]
pub struct Outcome {
    pub tables: usize,
    pub events: usize,
    pub replays: usize,
    pub rows: usize,
    pub runs: usize,
    pub kills: usize,
    pub terms: usize,
}

/// Runs `case` against the cluster of `env`; `Err` holds everything a failure report needs
/// besides the case itself (problems found, logs).
pub async fn run_case(
    case: &Case,
    cfg: &Config,
    env: &TestEnv,
    kafka: &str,
) -> Result<Outcome, String> {
    let db = TestDb::create_in(env.clone()).await;
    let client = db.client().await;
    // A workload statement that waits this long for a lock is blocked by pgcdc.
    client
        .batch_execute("SET lock_timeout = '20s'")
        .await
        .map_err(|e| e.to_string())?;
    for s in &case.setup {
        client
            .batch_execute(s)
            .await
            .map_err(|e| format!("setup statement failed (a generator bug): {e:?}\n{s}"))?;
    }
    let slot = common::unique_name("islot");
    let prefix = common::unique_name("i");
    let publication = match case.pub_mode {
        PubMode::Tables => slot.clone(),
        _ => "pub".to_string(),
    };
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cmd = PgcdcCmd::new("run")
        .set("--source", &db.source())
        .set("--slot", &slot)
        .set("--publication", &publication)
        .set("--topic-prefix", &prefix)
        .set("--status-interval", "0.5")
        .set("--progress", "log");
    cmd = match case.sink {
        Sink::Kafka => cmd.set("--kafka", kafka),
        Sink::Stdout => cmd.set("--sink", "stdout").set(
            "--progress-file",
            &dir.join("progress.json").display().to_string(),
        ),
    };
    cmd = cmd.args(
        case.table_flags()
            .into_iter()
            .flat_map(|t| ["--table".to_string(), t]),
    );
    if case.snapshot_workers > 1 {
        cmd = cmd.set("--snapshot-workers", &case.snapshot_workers.to_string());
    }
    let mut p = Proc {
        p: Pgcdc::new(cmd, dir),
        kills: 0,
        terms: 0,
    };
    if case.sink == Sink::Stdout {
        p.p.capture_stdout();
    }
    p.spawn();
    // The workload starts once the slot exists (as an application would be running anyway):
    // its changes then reach pgcdc through the snapshot, the stream, or both.
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exists = client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .ok()
                .flatten()
                .is_some();
            if exists {
                break;
            }
            if let Some(status) = p.exited() {
                return Err(format!("before the slot existed: {}", p.died(status)));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the slot did not appear within 60 s:\n{}\n{}",
                    activity(&client).await,
                    p.tail(p.runs())
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    if let Some(ddl) = &case.right_after_slot {
        client
            .batch_execute(ddl)
            .await
            .map_err(|e| format!("DDL after the slot failed: {e:?}\n{ddl}"))?;
    }

    for (i, step) in case.steps.iter().enumerate() {
        if let Some(status) = p.exited() {
            return Err(format!("before step {i}: {}", p.died(status)));
        }
        match step {
            Step::Sql {
                sql,
                what,
                ddl,
                settle,
            } => {
                let held = *ddl && !cfg.allows(Bug::DdlDuringSnapshot);
                if (held || *settle) && p.running() {
                    p.wait_streaming(Duration::from_secs(60))
                        .await
                        .map_err(|e| format!("before step {i} ({what}): {e}"))?;
                }
                let txn = format!("BEGIN;\n{};\nCOMMIT;", sql.join(";\n"));
                if let Err(e) = client.batch_execute(&txn).await {
                    let _ = client.batch_execute("ROLLBACK").await;
                    let locked =
                        e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
                    return Err(if locked {
                        format!(
                            "step {i} ({what}) waited 20 s for a lock that pgcdc holds:\n{}\n{}",
                            activity(&client).await,
                            p.tail(p.runs())
                        )
                    } else {
                        format!(
                            "step {i} ({what}) failed (a generator bug): {e:?}\n{}",
                            crate::gen::shorten(&txn, 2000)
                        )
                    });
                }
            }
            Step::Stop(kind) => p.stop(*kind).map_err(|e| format!("step {i}: {e}"))?,
            Step::Start => p.spawn(),
            Step::Restart(kind) => {
                p.stop(*kind).map_err(|e| format!("step {i}: {e}"))?;
                p.spawn();
            }
            Step::Pause(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
    }

    // Everything the workload committed is published once the slot confirmed this.
    if !p.running() {
        p.spawn();
    }
    let target: u64 = client
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .map_err(|e| e.to_string())?
        .try_get::<_, crate::common::api::Lsn>(0)
        .map_err(|e| e.to_string())?
        .0;
    p.wait_streaming(Duration::from_secs(120))
        .await
        .map_err(|e| format!("while catching up: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = p.exited() {
            return Err(format!("while catching up: {}", p.died(status)));
        }
        let confirmed: Option<crate::common::api::Lsn> = client
            .query_opt(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get(0));
        if confirmed.is_some_and(|c| c.0 >= target) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "pgcdc did not catch up within 120 s (confirmed {confirmed:?} < {target}):\n{}",
                p.tail(p.runs())
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.stop(StopKind::Term)
        .map_err(|e| format!("final stop: {e}"))?;

    // The topics.
    let captured = case.captured();
    let topics: Vec<String> = captured
        .iter()
        .map(|&i| {
            let t = &case.tables[i];
            topic_name(&prefix, &TableName::new(t.schema.clone(), t.name.clone()))
        })
        .collect();
    let mut per_topic: Vec<Vec<Record>> = Vec::new();
    match case.sink {
        Sink::Kafka => {
            let handles: Vec<_> = topics
                .iter()
                .map(|topic| {
                    let kafka = kafka.to_string();
                    let topic = topic.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::common::topics::read_all_if_exists(&kafka, &topic)
                            .unwrap_or_default()
                    })
                })
                .collect();
            for h in handles {
                let records = h.await.map_err(|e| format!("topic reader: {e}"))?;
                per_topic.push(
                    records
                        .into_iter()
                        .map(|r| {
                            let e = Event::of(r);
                            Record {
                                key: e.key,
                                value: e.value,
                            }
                        })
                        .collect(),
                );
            }
        }
        Sink::Stdout => {
            let all = p.stdout_records();
            for topic in &topics {
                per_topic.push(
                    all.iter()
                        .filter(|(t, _)| t == topic)
                        .map(|(_, r)| r.clone())
                        .collect(),
                );
            }
        }
    }

    // The oracle. Topics first: each a name Apache Kafka accepts (tansu accepts anything),
    // one per table (shared, the oracle would find two tables' rows in it).
    let mut problems = Vec::new();
    let legal = |t: &str| {
        t.len() <= 249
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    };
    for (topic, &ti) in topics.iter().zip(&captured) {
        if !legal(topic) {
            let t = &case.tables[ti];
            problems.push(format!(
                "{}.{}: its topic {topic:?} is a name Apache Kafka refuses",
                t.schema, t.name
            ));
        }
    }
    let mut outcome = Outcome {
        tables: captured.len(),
        runs: p.runs(),
        kills: p.kills,
        terms: p.terms,
        ..Outcome::default()
    };
    for (n, &ti) in captured.iter().enumerate() {
        let t = &case.tables[ti];
        let label = format!("{}.{}", t.schema, t.name);
        let expected = oracle::expected(
            &client,
            case.major,
            &publication,
            &t.schema,
            &t.name,
            &prefix,
        )
        .await
        .map_err(|e| format!("{label}: reading the table: {e}"))?;
        let (found, stats) = oracle::check(&label, &per_topic[n], &expected, &t.ddl);
        problems.extend(found);
        outcome.events += stats.events;
        outcome.replays += stats.replays;
        outcome.rows += stats.rows;
    }
    if problems.is_empty() {
        Ok(outcome)
    } else {
        let logs: String = (1..=p.runs())
            .map(|r| format!("--- pgcdc run {r} (last lines)\n{}\n", p.tail(r)))
            .collect();
        Err(format!(
            "{} problems:\n{}\n{logs}",
            problems.len(),
            problems.join("\n")
        ))
    }
}

/// The sessions of the case's database, for a report about a hang.
async fn activity(client: &tokio_postgres::Client) -> String {
    let rows = client
        .query(
            "SELECT pid, state, coalesce(wait_event_type || ':' || wait_event, ''), \
                    left(query, 120) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| {
            format!(
                "  pid {} {:?} waits {:?}: {}",
                r.get::<_, i32>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
