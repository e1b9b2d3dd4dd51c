//! The workload that runs while faults are injected: several tables, multi-row transactions,
//! hot keys updated again and again, deletes, primary-key changes, rows large enough to be
//! TOASTed, and now and then a large transaction.
//!
//! Every transaction writes its own marker (`m<seq>`) into every row it inserts or updates,
//! and records what it expects to see in the topics: for each row it wrote, the key, the
//! operation and the marker, under the transaction's xid. The checker looks for each of
//! these in the topics, so a transaction that lost a single change is found.
//!
//! The writer survives server restarts: it reconnects, and a transaction whose COMMIT got
//! no answer is resolved with `txid_status` — only transactions known to be committed are
//! expected in the topics.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_postgres::SimpleQueryMessage;

/// The captured tables.
pub const TABLES: &[&str] = &["accounts", "orders", "docs", "ledger"];

/// Hot keys: few accounts, updated by most transactions.
const ACCOUNTS: i64 = 12;

pub const SCHEMA: &str = "
CREATE TABLE public.accounts (id int PRIMARY KEY, balance bigint NOT NULL, marker text NOT NULL);
CREATE TABLE public.orders (id bigint PRIMARY KEY, account int NOT NULL, amount bigint,
                            note text, marker text NOT NULL);
CREATE TABLE public.docs (id int PRIMARY KEY, title text NOT NULL, body text, marker text NOT NULL);
CREATE TABLE public.ledger (account int, seq int, delta bigint NOT NULL, marker text NOT NULL,
                            PRIMARY KEY (account, seq));
";

/// Rows present before pgcdc starts: enough orders and large docs that a snapshot takes a
/// moment (so that it can be interrupted).
pub fn prefill_sql(orders: i64, docs: i64) -> String {
    format!(
        "INSERT INTO accounts SELECT g, 1000, 'prefill' FROM generate_series(1, {ACCOUNTS}) g;
         INSERT INTO orders SELECT g, g % {ACCOUNTS} + 1, g * 10, 'order ' || g, 'prefill'
           FROM generate_series(1, {orders}) g;
         INSERT INTO docs SELECT g, 'doc ' || g,
           (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 100) i),
           'prefill' FROM generate_series(1, {docs}) g;"
    )
}

pub use crate::common::rng::Rng;

/// A seed from `PGCDC_FAULT_SEED`, or the clock; printed so that a failure can be replayed.
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("PGCDC_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{scenario}: seed {seed} (PGCDC_FAULT_SEED={seed} replays it)");
    seed
}

/// What one row change of a committed transaction must have produced.
#[derive(Debug, Clone)]
pub enum Expect {
    /// An insert or update event (op `c`, `u`) of `key` whose row carries the marker.
    Upsert { table: &'static str, key: Value },
    /// A delete event of `key`.
    Delete { table: &'static str, key: Value },
}

/// A committed transaction.
#[derive(Debug, Clone)]
pub struct Txn {
    /// The 32-bit xid, as events carry it in `source.txId`.
    pub xid: u32,
    pub marker: String,
    pub expects: Vec<Expect>,
}

/// What the writer did.
#[derive(Debug, Default)]
pub struct Report {
    pub committed: Vec<Txn>,
    /// Transactions that failed (connection lost before COMMIT, or resolved as aborted).
    pub aborted: usize,
    /// COMMITs without an answer, resolved with txid_status.
    pub in_doubt: usize,
    pub reconnects: usize,
}

impl Report {
    pub fn changes(&self) -> usize {
        self.committed.iter().map(|t| t.expects.len()).sum()
    }
}

/// The writer's view of which rows exist; updated only by committed transactions.
#[derive(Debug, Clone)]
struct State {
    orders: Vec<i64>,
    next_order: i64,
    docs: Vec<i64>,
    next_doc: i64,
    ledger: Vec<(i64, i64)>,
    next_seq: BTreeMap<i64, i64>,
}

/// One planned transaction: its statements (with the row counts they must report) and the
/// state after it commits.
struct Plan {
    statements: Vec<(String, u64)>,
    expects: Vec<Expect>,
    after: State,
}

/// A running writer; [`Workload::stop`] ends it and returns its report.
pub struct Workload {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Report>,
    /// Transactions committed so far.
    pub progress: watch::Receiver<usize>,
}

/// How hard the writer works.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Pause between transactions.
    pub pause: Duration,
    /// Percent of transactions that insert `big_rows` rows at once.
    pub big_percent: u64,
    pub big_rows: i64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            pause: Duration::from_millis(4),
            big_percent: 1,
            big_rows: 400,
        }
    }
}

impl Workload {
    /// Starts writing to the database of `conninfo`, whose tables were filled by
    /// [`prefill_sql`] with `orders` orders and `docs` docs.
    pub fn start(conninfo: String, seed: u64, orders: i64, docs: i64, pace: Pace) -> Workload {
        let (stop, stop_rx) = watch::channel(false);
        let (progress_tx, progress) = watch::channel(0);
        let state = State {
            orders: (1..=orders).collect(),
            next_order: orders + 1,
            docs: (1..=docs).collect(),
            next_doc: docs + 1,
            ledger: Vec::new(),
            next_seq: BTreeMap::new(),
        };
        let handle = tokio::spawn(write(conninfo, seed, state, pace, stop_rx, progress_tx));
        Workload {
            stop,
            handle,
            progress,
        }
    }

    /// Waits until at least `n` transactions committed; panics if the writer is stuck.
    pub async fn wait_for(&mut self, n: usize) {
        let waited =
            tokio::time::timeout(Duration::from_secs(90), self.progress.wait_for(|c| *c >= n))
                .await
                .is_ok();
        assert!(
            waited,
            "the workload is stuck at {} transactions",
            self.committed()
        );
    }

    pub fn committed(&self) -> usize {
        *self.progress.borrow()
    }

    pub async fn stop(self) -> Report {
        let _ = self.stop.send(true);
        self.handle.await.expect("the workload task")
    }
}

async fn connect(conninfo: &str) -> Option<tokio_postgres::Client> {
    let info = crate::common::parse(conninfo);
    crate::common::api::connect(&info).await.ok()
}

async fn write(
    conninfo: String,
    seed: u64,
    mut state: State,
    pace: Pace,
    stop: watch::Receiver<bool>,
    progress: watch::Sender<usize>,
) -> Report {
    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut report = Report::default();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut seq = 0u64;
    // A transaction whose COMMIT got no answer: resolved after reconnecting.
    let mut in_doubt: Option<(i64, Txn, State)> = None;
    loop {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                client = connect(&conninfo).await;
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                report.reconnects += 1;
                continue;
            }
        };
        if let Some((xid64, txn, after)) = in_doubt.take() {
            match c
                .query_one("SELECT txid_status($1)", &[&xid64])
                .await
                .map(|r| r.get::<_, Option<String>>(0))
            {
                Ok(Some(s)) if s == "committed" => {
                    report.committed.push(txn);
                    state = after;
                    progress.send_replace(report.committed.len());
                }
                Ok(Some(s)) if s == "aborted" => report.aborted += 1,
                Ok(other) => {
                    // Still in progress (or unknown): ask again shortly.
                    assert_ne!(other, None, "txid_status of {xid64} is unknown");
                    in_doubt = Some((xid64, txn, after));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // "transaction ID … is in the future": the server crashed before the
                // transaction wrote any WAL, so it never existed.
                Err(e)
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) =>
                {
                    report.aborted += 1;
                }
                Err(_) => {
                    in_doubt = Some((xid64, txn, after));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        }
        if *stop.borrow() {
            break;
        }
        seq += 1;
        let marker = format!("m{seq}");
        let plan = plan(&mut rng, &state, &marker, pace);
        // First round trip: start the transaction and learn its xid.
        let xid64: i64 = match c
            .simple_query("BEGIN; SELECT txid_current()")
            .await
            .ok()
            .and_then(|msgs| first_value(&msgs))
            .and_then(|v| v.parse().ok())
        {
            Some(x) => x,
            None => {
                report.aborted += 1;
                let _ = c.batch_execute("ROLLBACK").await;
                continue;
            }
        };
        let txn = Txn {
            xid: (xid64 & 0xFFFF_FFFF) as u32,
            marker,
            expects: plan.expects,
        };
        // Second round trip: the changes and COMMIT.
        let mut sql = String::new();
        for (s, _) in &plan.statements {
            sql.push_str(s);
            sql.push_str(";\n");
        }
        sql.push_str("COMMIT");
        match c.simple_query(&sql).await {
            Ok(msgs) => {
                let counts: Vec<u64> = msgs
                    .iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::CommandComplete(n) => Some(*n),
                        _ => None,
                    })
                    .collect();
                let wanted: Vec<u64> = plan.statements.iter().map(|(_, n)| *n).collect();
                assert_eq!(
                    &counts[..wanted.len().min(counts.len())],
                    &wanted[..],
                    "the workload's view of the tables is wrong:\n{sql}"
                );
                report.committed.push(txn);
                state = plan.after;
                progress.send_replace(report.committed.len());
            }
            Err(e) if !c.is_closed() && e.code().is_some_and(|c| !connection_lost(c.code())) => {
                panic!("workload statement failed: {e}\n{sql}");
            }
            Err(_) => {
                report.in_doubt += 1;
                in_doubt = Some((xid64, txn, plan.after));
                continue;
            }
        }
        if !pace.pause.is_zero() {
            tokio::time::sleep(pace.pause).await;
        }
    }
    report
}

/// SQLSTATEs of a server that goes away: shutdown, crash, connection failure.
fn connection_lost(code: &str) -> bool {
    code.starts_with("57P") || code.starts_with("08")
}

fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

fn order_key(id: i64) -> Value {
    json!({ "id": id })
}

/// Chooses the next transaction.
fn plan(rng: &mut Rng, state: &State, marker: &str, pace: Pace) -> Plan {
    let mut s = state.clone();
    let mut statements: Vec<(String, u64)> = Vec::new();
    let mut expects = Vec::new();
    let up = |table: &'static str, key: Value| Expect::Upsert { table, key };
    let del = |table: &'static str, key: Value| Expect::Delete { table, key };

    if rng.chance(pace.big_percent) {
        // A large transaction: many rows at once.
        let first = s.next_order;
        let last = first + pace.big_rows - 1;
        s.next_order = last + 1;
        statements.push((
            format!(
                "INSERT INTO orders SELECT g, g % {ACCOUNTS} + 1, g, 'bulk', '{marker}' \
                 FROM generate_series({first}, {last}) g"
            ),
            pace.big_rows as u64,
        ));
        for id in first..=last {
            s.orders.push(id);
            expects.push(up("orders", order_key(id)));
        }
        return Plan {
            statements,
            expects,
            after: s,
        };
    }

    // Most transactions touch a hot account and its ledger.
    let steps = rng.range(1, 4);
    for _ in 0..steps {
        match rng.range(0, 100) {
            0..=29 => {
                let a = rng.range(1, ACCOUNTS as u64 + 1) as i64;
                let b = rng.range(1, ACCOUNTS as u64 + 1) as i64;
                let delta = rng.range(1, 100) as i64;
                statements.push((
                    format!(
                        "UPDATE accounts SET balance = balance - {delta}, marker = '{marker}' WHERE id = {a}"
                    ),
                    1,
                ));
                statements.push((
                    format!(
                        "UPDATE accounts SET balance = balance + {delta}, marker = '{marker}' WHERE id = {b}"
                    ),
                    1,
                ));
                expects.push(up("accounts", json!({ "id": a })));
                expects.push(up("accounts", json!({ "id": b })));
                for (acc, d) in [(a, -delta), (b, delta)] {
                    let seq = s.next_seq.entry(acc).or_insert(1);
                    statements.push((
                        format!("INSERT INTO ledger VALUES ({acc}, {seq}, {d}, '{marker}')"),
                        1,
                    ));
                    expects.push(up("ledger", json!({ "account": acc, "seq": *seq })));
                    s.ledger.push((acc, *seq));
                    *seq += 1;
                }
            }
            30..=49 => {
                let n = rng.range(1, 5) as i64;
                for _ in 0..n {
                    let id = s.next_order;
                    s.next_order += 1;
                    let note = if rng.chance(20) {
                        "NULL".to_string()
                    } else {
                        format!("'new {id}'")
                    };
                    statements.push((
                        format!(
                            "INSERT INTO orders VALUES ({id}, {}, {}, {note}, '{marker}')",
                            rng.range(1, ACCOUNTS as u64 + 1),
                            rng.range(1, 100_000)
                        ),
                        1,
                    ));
                    s.orders.push(id);
                    expects.push(up("orders", order_key(id)));
                }
            }
            50..=64 => {
                if let Some(id) = rng.choose(&s.orders) {
                    statements.push((
                        format!(
                            "UPDATE orders SET note = 'updated {}', amount = amount + 1, marker = '{marker}' WHERE id = {id}",
                            rng.range(0, 1000)
                        ),
                        1,
                    ));
                    expects.push(up("orders", order_key(id)));
                }
            }
            65..=74 => {
                if let Some(id) = rng.choose(&s.orders) {
                    statements.push((format!("DELETE FROM orders WHERE id = {id}"), 1));
                    s.orders.retain(|o| *o != id);
                    expects.push(del("orders", order_key(id)));
                }
            }
            75..=79 => {
                // A primary-key change: a delete of the old key and a create of the new one.
                if let Some(id) = rng.choose(&s.orders) {
                    let new = s.next_order;
                    s.next_order += 1;
                    statements.push((
                        format!(
                            "UPDATE orders SET id = {new}, marker = '{marker}' WHERE id = {id}"
                        ),
                        1,
                    ));
                    s.orders.retain(|o| *o != id);
                    s.orders.push(new);
                    expects.push(del("orders", order_key(id)));
                    expects.push(up("orders", order_key(new)));
                }
            }
            80..=86 => {
                let id = s.next_doc;
                s.next_doc += 1;
                let len = rng.range(2500, 7000) as usize;
                statements.push((
                    format!(
                        "INSERT INTO docs VALUES ({id}, 'doc {id}', '{}', '{marker}')",
                        rng.text(len)
                    ),
                    1,
                ));
                s.docs.push(id);
                expects.push(up("docs", json!({ "id": id })));
            }
            87..=91 => {
                // The TOASTed body is unchanged: PostgreSQL does not send it again.
                if let Some(id) = rng.choose(&s.docs) {
                    statements.push((
                        format!(
                            "UPDATE docs SET title = 'retitled {}', marker = '{marker}' WHERE id = {id}",
                            rng.range(0, 1000)
                        ),
                        1,
                    ));
                    expects.push(up("docs", json!({ "id": id })));
                }
            }
            92..=94 => {
                if let Some(id) = rng.choose(&s.docs) {
                    let len = rng.range(2500, 7000) as usize;
                    statements.push((
                        format!(
                            "UPDATE docs SET body = '{}', marker = '{marker}' WHERE id = {id}",
                            rng.text(len)
                        ),
                        1,
                    ));
                    expects.push(up("docs", json!({ "id": id })));
                }
            }
            95..=96 => {
                if let Some(id) = rng.choose(&s.docs) {
                    statements.push((format!("DELETE FROM docs WHERE id = {id}"), 1));
                    s.docs.retain(|d| *d != id);
                    expects.push(del("docs", json!({ "id": id })));
                }
            }
            _ => {
                if let Some((acc, seq)) = rng.choose(&s.ledger) {
                    statements.push((
                        format!("DELETE FROM ledger WHERE account = {acc} AND seq = {seq}"),
                        1,
                    ));
                    s.ledger.retain(|l| *l != (acc, seq));
                    expects.push(del("ledger", json!({ "account": acc, "seq": seq })));
                }
            }
        }
    }
    if statements.is_empty() {
        let a = rng.range(1, ACCOUNTS as u64 + 1) as i64;
        statements.push((
            format!(
                "UPDATE accounts SET balance = balance + 1, marker = '{marker}' WHERE id = {a}"
            ),
            1,
        ));
        expects.push(up("accounts", json!({ "id": a })));
    }
    Plan {
        statements,
        expects,
        after: s,
    }
}
