//! `pgcdc run --sink stdout` for tests that read events as JSON lines, and the state its lines
//! and a table end in, keyed like the events.

use std::collections::BTreeMap;
use std::process::Output;

use serde_json::{Map, Value};

use super::assert::assert_success;
use super::pipeline::Pipeline;

/// One stdout run's events and its log.
pub struct Run {
    pub lines: Vec<Value>,
    pub log: String,
}

impl Run {
    /// The events of `topic`, in output order.
    pub fn of(&self, topic: &str) -> Vec<&Value> {
        self.lines.iter().filter(|l| l["topic"] == topic).collect()
    }
}

/// `pgcdc run --sink stdout` with this pipeline's settings plus `extra`; must succeed.
pub fn run(p: &Pipeline, extra: &[&str], what: &str) -> Run {
    let progress = p.dir.join("progress.json");
    let mut args = vec![
        "--sink",
        "stdout",
        "--progress-file",
        progress.to_str().expect("UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    let out = p.run(&args);
    assert_success(&out, what);
    parse(&out)
}

/// The JSON lines and log of a finished run.
pub fn parse(out: &Output) -> Run {
    let lines = String::from_utf8(out.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    Run {
        lines,
        log: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// State per key (the key's JSON text) of `topic`, replaying `lines` like a consumer.
/// Checks every event's key against the row it carries: the key columns of `after` (or, for
/// deletes, of `before`), never null. Snapshot markers are skipped.
pub fn replay<'a>(
    lines: impl IntoIterator<Item = &'a Value>,
    topic: &str,
    key: &[&str],
) -> BTreeMap<String, Value> {
    let mut state = BTreeMap::new();
    for l in lines.into_iter().filter(|l| l["topic"] == topic) {
        if l["value"]["op"] == "s" {
            continue; // a snapshot marker: no row
        }
        let k = &l["key"];
        for c in key {
            assert!(!k[c].is_null(), "key column {c} is missing or null in {l}");
        }
        let v = &l["value"];
        if v.is_null() {
            continue; // a tombstone
        }
        let row = match v["op"].as_str() {
            Some("d") => &v["before"],
            _ => &v["after"],
        };
        assert_eq!(
            *k,
            key_of(row, key),
            "the key is not the row's key columns: {l}"
        );
        match v["op"].as_str() {
            Some("d") => state.remove(&k.to_string()),
            _ => state.insert(k.to_string(), row.clone()),
        };
    }
    state
}

/// `{"c1":…,"c2":…}` of `row`'s key columns, in key order.
pub fn key_of(row: &Value, key: &[&str]) -> Value {
    let mut m = Map::new();
    for c in key {
        m.insert((*c).to_string(), row[c].clone());
    }
    Value::Object(m)
}

/// The rows of `table` (an SQL name, quoted as needed) by key, as `to_jsonb` writes them
/// (the same JSON as pgcdc's for integers, text and booleans), restricted to `where_`.
pub async fn table_state(
    client: &tokio_postgres::Client,
    table: &str,
    columns: &str,
    where_: &str,
    key: &[&str],
) -> BTreeMap<String, Value> {
    let sql =
        format!("SELECT to_jsonb(t)::text FROM (SELECT {columns} FROM {table} WHERE {where_}) t");
    client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| {
            let row: Value = serde_json::from_str(r.get::<_, &str>(0)).expect("row JSON");
            (key_of(&row, key).to_string(), row)
        })
        .collect()
}

pub use super::assert::assert_same;
