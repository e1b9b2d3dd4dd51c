//! The oracle: replays each captured table's topic like a consumer and compares the result
//! with what the publication publishes of the table.
//!
//! **The topic side.** Per key, the last event by position (see `common::topics`: reads
//! rank below changes of the same `commit_lsn`), exact replays dropped; a delete or
//! tombstone removes the row, a truncate (`op:"t"`) clears the table, an update that lists
//! `unchanged` columns keeps their previous values (for a key change: those of the old key's
//! row, deleted at the same position). Records whose `op` is not one of r/c/u/d/t (such as a
//! snapshot-complete marker) are skipped. Along the way: no key of a keyed table is null or
//! lacks a key column, per key the position never goes backwards except for exact replays,
//! and a tombstone follows a delete. Tables without a key (REPLICA IDENTITY FULL, no primary
//! key) are folded as a multiset of rows (an update or delete removes its `before` row).
//!
//! **The table side.** `SELECT <published columns> FROM [ONLY] t WHERE <row filter>`, with
//! the columns and filter read from the catalog (`pg_publication_tables` on PostgreSQL 15+,
//! generated columns left out before 18), each row encoded by pgcdc's own [`Encoder`] as a
//! snapshot read: the comparison is in the encoder's JSON terms. The Kafka key is the
//! replica identity index under REPLICA IDENTITY USING INDEX, else the primary key.
//!
//! DDL: a key whose last event predates a schema change carries the old shape. Such a row is
//! compared on the columns both sides have, and the others must be explained by the table's
//! DDL log (columns added, dropped or renamed).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::common::api::event::{
    BinaryMode, Change, Column, Datum, DecimalMode, Encoder, EventOptions, Format, Op, Position,
    SnapshotMarker, TableSchema, TypeRegistry,
};
use crate::common::api::{event::copy_text, Lsn};
use futures_util::StreamExt;
use serde_json::{Map, Value};

use crate::common::topics::{self, KeyOrder, Seen};
use crate::gen::{q, shorten, DdlLog};

/// A record read back, JSON-decoded.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<Value>,
    pub value: Option<Value>,
}

/// The counts of one table's check.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub events: usize,
    pub replays: usize,
    pub skipped: usize,
    pub rows: usize,
}

/// What the publication publishes of one table, encoded.
pub struct Expected {
    /// Kafka key columns (empty: no key).
    pub key_cols: Vec<String>,
    pub filter: Option<String>,
    /// (canonical key or `None`, `after`)
    pub rows: Vec<(Option<String>, Value)>,
}

/// Reads the table as the publication publishes it.
pub async fn expected(
    client: &tokio_postgres::Client,
    major: u32,
    publication: &str,
    schema: &str,
    name: &str,
    prefix: &str,
) -> Result<Expected, String> {
    let err = |what: &str, e: tokio_postgres::Error| format!("{what}: {e}");
    let row = client
        .query_one(
            "SELECT c.oid, c.relkind::text, c.relreplident::text, current_database()::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await
        .map_err(|e| err("table lookup", e))?;
    let oid: u32 = row.get(0);
    let relkind: String = row.get(1);
    let replident: String = row.get(2);
    let db: String = row.get(3);
    let attrs: Vec<(String, u32, bool)> = client
        .query(
            "SELECT attname::text, atttypid, attgenerated <> '' FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|e| err("columns", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let (mut listed, filter): (Option<Vec<String>>, Option<String>) = if major >= 15 {
        match client
            .query_opt(
                "SELECT attnames::text[], rowfilter FROM pg_publication_tables \
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &schema, &name],
            )
            .await
            .map_err(|e| err("publication", e))?
        {
            Some(r) => (Some(r.get(0)), r.get(1)),
            None => (None, None),
        }
    } else {
        (None, None)
    };
    if major < 18 {
        // Generated columns are listed, but pgoutput sends them only from 18 on.
        if let Some(l) = listed.as_mut() {
            l.retain(|c| attrs.iter().any(|(n, _, gen)| n == c && !gen));
        }
    }
    let published: Vec<(String, u32)> = match &listed {
        Some(l) => attrs
            .iter()
            .filter(|(n, _, _)| l.contains(n))
            .map(|(n, t, _)| (n.clone(), *t))
            .collect(),
        None => attrs
            .iter()
            .filter(|(_, _, gen)| !gen)
            .map(|(n, t, _)| (n.clone(), *t))
            .collect(),
    };
    // The key: the replica identity index under USING INDEX, else the primary key.
    let key_cols: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND CASE WHEN $2 = 'i' THEN i.indisreplident ELSE i.indisprimary END \
             ORDER BY k.ord",
            &[&oid, &replident],
        )
        .await
        .map_err(|e| err("key", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();

    let mut types = TypeRegistry::new(DecimalMode::default(), BinaryMode::default());
    crate::common::api::event::load_types(client, &mut types, published.iter().map(|(_, t)| *t))
        .await
        .map_err(|e| err("types", e))?;
    let columns: Vec<Column> = published
        .iter()
        .map(|(n, t)| Column::with_kind(n.clone(), *t, types.kind(*t)))
        .collect();
    let encoder = Encoder::with_options(
        prefix,
        &db,
        EventOptions {
            format: Format::Envelope,
            transaction_metadata: false,
            ..EventOptions::default()
        },
        types,
    );
    let table = TableSchema::new(schema, name, "t".into(), columns, &key_cols);
    let only = if relkind == "p" { "" } else { "ONLY " };
    let cols = published
        .iter()
        .map(|(n, _)| q(n))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "COPY (SELECT {cols} FROM {only}{}.{}{}) TO STDOUT",
        q(schema),
        q(name),
        filter
            .as_ref()
            .map_or(String::new(), |f| format!(" WHERE {f}"))
    );
    let stream = client.copy_out(&sql).await.map_err(|e| err(&sql, e))?;
    futures_util::pin_mut!(stream);
    let position = Position {
        lsn: Lsn(1),
        commit_lsn: Lsn(1),
        xid: None,
        commit_ts_ms: 0,
        snapshot: SnapshotMarker::True,
    };
    let mut rows = Vec::new();
    let mut buffer = copy_text::RowBuffer::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| err("COPY", e))?;
        let mut fields = Vec::new();
        let Some(data) = buffer.complete(&chunk) else {
            continue;
        };
        for line in copy_text::lines(data) {
            copy_text::parse_row(line, published.len(), &mut fields)
                .map_err(|e| format!("COPY row: {e}"))?;
            let datums: Vec<Datum<'_>> = fields
                .iter()
                .map(|f| match f {
                    None => Datum::Null,
                    Some(v) => Datum::Text(v),
                })
                .collect();
            let key = encoder
                .key(&table, &datums)
                .map(|k| canonical(&serde_json::from_slice(&k).expect("key JSON")));
            let value = encoder.value(
                &table,
                &Change {
                    op: Op::Read,
                    before: None,
                    after: Some(&datums),
                    position,
                    transaction: None,
                    annotations: None,
                },
                0,
            );
            let v: Value = serde_json::from_slice(&value).expect("value JSON");
            rows.push((key, v["after"].clone()));
        }
    }
    Ok(Expected {
        key_cols,
        filter,
        rows,
    })
}

/// A value as one canonical string (object keys sorted).
pub fn canonical(v: &Value) -> String {
    serde_json::to_string(v).expect("JSON")
}

#[derive(Default)]
struct KeyState {
    order: KeyOrder,
    row: Option<Map<String, Value>>,
    last_op: String,
}

/// Replays one table's records and compares with `expected`; returns the problems found
/// (empty: equal) and the counts.
pub fn check(
    table: &str,
    records: &[Record],
    expected: &Expected,
    ddl: &DdlLog,
) -> (Vec<String>, Stats) {
    let mut problems = Vec::new();
    let mut stats = Stats {
        rows: expected.rows.len(),
        ..Stats::default()
    };
    let keyed = !expected.key_cols.is_empty();
    let mut keys: HashMap<String, KeyState> = HashMap::new();
    let mut truncates = KeyOrder::default();
    let mut last_deleted: Option<(topics::Position, Map<String, Value>)> = None;
    // Keyless tables: the rows as a multiset, and every event seen (to drop replays).
    let mut bag: HashMap<String, usize> = HashMap::new();
    let mut seen_keyless: HashSet<String> = HashSet::new();
    let mut snapshot_point: Option<u64> = None;
    let mut bad_keys = 0usize;
    let note = |problems: &mut Vec<String>, p: String| {
        if problems.len() < 40 {
            problems.push(p);
        }
    };

    for (offset, r) in records.iter().enumerate() {
        let key_problem = if keyed {
            key_problem(r.key.as_ref(), &expected.key_cols)
        } else {
            None
        };
        let Some(v) = &r.value else {
            // A tombstone follows a delete of its key.
            if !keyed {
                continue;
            }
            if let Some(p) = key_problem {
                bad_keys += 1;
                note(
                    &mut problems,
                    format!("{table}: tombstone at offset {offset}: {p}"),
                );
                continue;
            }
            let k = keys.entry(canonical(r.key.as_ref().unwrap())).or_default();
            if k.last_op != "d" {
                note(
                    &mut problems,
                    format!("{table}: tombstone at offset {offset} does not follow a delete"),
                );
            }
            k.row = None;
            continue;
        };
        let op = v["op"].as_str().unwrap_or("").to_string();
        if !["r", "c", "u", "d", "t"].contains(&op.as_str()) {
            stats.skipped += 1;
            continue;
        }
        stats.events += 1;
        let Some(pos) = topics::position(v) else {
            note(
                &mut problems,
                format!("{table}: event at offset {offset} has no source.commit_lsn/lsn"),
            );
            continue;
        };
        let content = topics::content(v);
        if op == "t" {
            match truncates.observe(pos, &op, content) {
                Seen::New => {
                    for k in keys.values_mut() {
                        k.row = None;
                    }
                    bag.clear();
                }
                _ => stats.replays += 1,
            }
            continue;
        }
        if !keyed {
            // Reads of equal rows are equal events; a snapshot is never replayed as such
            // (a new one has a new position), so only changes can be replays.
            if op != "r" && !seen_keyless.insert(format!("{pos:?}{op}{}", canonical(&content))) {
                stats.replays += 1;
                continue;
            }
            if r.key.as_ref().is_some_and(|k| !k.is_null()) {
                note(
                    &mut problems,
                    format!(
                        "{table}: a table without a key has an event with key {}",
                        r.key.as_ref().unwrap()
                    ),
                );
            }
            if op == "r" && snapshot_point != Some(pos.commit_lsn) {
                // The first read of a snapshot: it holds the whole table at its point, and
                // supersedes what came before (a run that retakes an interrupted snapshot
                // first publishes the slot's changes, which may delete rows the interrupted
                // snapshot never published).
                bag.clear();
                snapshot_point = Some(pos.commit_lsn);
            }
            if op == "u" || op == "d" {
                // A row the topic does not hold (see above) is not a problem by itself: the
                // end state is compared below.
                if let Some(n) = bag.get_mut(&canonical(&v["before"])) {
                    *n = n.saturating_sub(1);
                }
            }
            if op != "d" {
                *bag.entry(canonical(&v["after"])).or_default() += 1;
            }
            continue;
        }
        if let Some(p) = key_problem {
            bad_keys += 1;
            note(
                &mut problems,
                format!(
                    "{table}: {op} at offset {offset} (position {pos:?}): {p}; event {}",
                    shorten(&v.to_string(), 300)
                ),
            );
            continue;
        }
        let key = canonical(r.key.as_ref().unwrap());
        let k = keys.entry(key.clone()).or_default();
        match k.order.observe(pos, &op, content) {
            Seen::New => {}
            Seen::Replay => {
                stats.replays += 1;
                k.last_op = op;
                continue;
            }
            Seen::ConflictingReplay { earlier } => {
                note(
                    &mut problems,
                    format!(
                        "{table}: key {} at {pos:?} ({op}) published twice with different content:\n  {}\n  {}",
                        shorten(&key, 80),
                        shorten(&earlier.to_string(), 300),
                        shorten(&v.to_string(), 300)
                    ),
                );
                continue;
            }
            Seen::Backwards { high } => {
                note(
                    &mut problems,
                    format!(
                        "{table}: key {} goes backwards: {op} at {pos:?} (offset {offset}) after {high:?}, not a replay",
                        shorten(&key, 80)
                    ),
                );
                continue;
            }
        }
        k.last_op = op.clone();
        match op.as_str() {
            "d" => {
                if let Some(row) = k.row.take() {
                    last_deleted = Some((pos, row));
                }
            }
            _ => {
                let Some(mut after) = v["after"].as_object().cloned() else {
                    note(
                        &mut problems,
                        format!("{table}: {op} at offset {offset} has no after"),
                    );
                    continue;
                };
                if let Some(unchanged) = v["unchanged"].as_array() {
                    let previous = match (&last_deleted, op.as_str()) {
                        (Some((p, row)), "c") if *p == pos => Some(row),
                        _ => k.row.as_ref(),
                    };
                    for c in unchanged.iter().filter_map(Value::as_str) {
                        if let Some(val) = previous.and_then(|p| p.get(c)) {
                            after.insert(c.to_string(), val.clone());
                        }
                    }
                }
                k.row = Some(after);
            }
        }
    }
    if bad_keys > 0 {
        problems.insert(
            0,
            format!("{table}: {bad_keys} records with a null key or a key lacking a key column"),
        );
    }

    // The end state against the table.
    if keyed {
        let mut expected_rows: BTreeMap<&str, &Value> = BTreeMap::new();
        for (k, v) in &expected.rows {
            if let Some(k) = k {
                expected_rows.insert(k, v);
            }
        }
        let mut missing = Vec::new();
        let mut differing = Vec::new();
        for (k, want) in &expected_rows {
            match keys.get(*k).and_then(|s| s.row.as_ref()) {
                None => missing.push(shorten(k, 80)),
                Some(got) => {
                    if let Some(d) = row_difference(got, want, ddl) {
                        differing.push(format!("{}: {d}", shorten(k, 80)));
                    }
                }
            }
        }
        let extra: Vec<String> = keys
            .iter()
            .filter(|(k, s)| s.row.is_some() && !expected_rows.contains_key(k.as_str()))
            .map(|(k, s)| {
                format!(
                    "{} = {}",
                    shorten(k, 80),
                    shorten(&Value::Object(s.row.clone().unwrap()).to_string(), 160)
                )
            })
            .collect();
        if !missing.is_empty() || !extra.is_empty() || !differing.is_empty() {
            // The topic's history of a few of those keys.
            let wanted: Vec<&str> = expected_rows
                .keys()
                .filter(|k| {
                    keys.get(**k)
                        .and_then(|s| s.row.as_ref())
                        .is_none_or(|got| row_difference(got, expected_rows[**k], ddl).is_some())
                })
                .take(2)
                .copied()
                .collect();
            for k in wanted {
                let history: Vec<String> = records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.key.as_ref().map(canonical).as_deref() == Some(k))
                    .map(|(i, r)| match &r.value {
                        None => format!("{i}: tombstone"),
                        Some(v) => format!(
                            "{i}: {} {:?}",
                            v["op"].as_str().unwrap_or("?"),
                            topics::position(v)
                        ),
                    })
                    .collect();
                problems.push(format!(
                    "{table}: events of key {}: {}",
                    shorten(k, 80),
                    if history.is_empty() {
                        "none".to_string()
                    } else {
                        history.join(", ")
                    }
                ));
            }
            problems.push(format!(
                "{table}: topic != table{}: {} rows missing (e.g. {:?}), {} extra (e.g. {:?}), {} differ (e.g. {:?})",
                expected
                    .filter
                    .as_ref()
                    .map_or(String::new(), |f| format!(" (row filter {f})")),
                missing.len(),
                &missing[..missing.len().min(3)],
                extra.len(),
                &extra[..extra.len().min(3)],
                differing.len(),
                &differing[..differing.len().min(3)],
            ));
        }
    } else {
        let mut want: HashMap<String, usize> = HashMap::new();
        for (_, v) in &expected.rows {
            *want.entry(canonical(v)).or_default() += 1;
        }
        bag.retain(|_, n| *n > 0);
        if want != bag {
            let missing: Vec<String> = want
                .iter()
                .filter(|(r, n)| bag.get(*r).copied().unwrap_or(0) < **n)
                .map(|(r, _)| shorten(r, 160))
                .take(3)
                .collect();
            let extra: Vec<String> = bag
                .iter()
                .filter(|(r, n)| want.get(*r).copied().unwrap_or(0) < **n)
                .map(|(r, _)| shorten(r, 160))
                .take(3)
                .collect();
            problems.push(format!(
                "{table} (no key, rows as a multiset): topic has {} rows, table {}: missing e.g. {missing:?}, extra e.g. {extra:?}",
                bag.values().sum::<usize>(),
                want.values().sum::<usize>()
            ));
        }
    }
    (problems, stats)
}

/// Why a record's key is not a full key of `key_cols` (`None`: it is).
fn key_problem(key: Option<&Value>, key_cols: &[String]) -> Option<String> {
    let Some(Value::Object(m)) = key else {
        return Some(format!(
            "key is {}",
            key.map_or("absent".into(), |k| k.to_string())
        ));
    };
    for c in key_cols {
        match m.get(c) {
            None => {
                return Some(format!(
                    "key {} lacks column {c:?}",
                    Value::Object(m.clone())
                ))
            }
            Some(Value::Null) => return Some(format!("key column {c:?} is null")),
            Some(_) => {}
        }
    }
    if m.len() != key_cols.len() {
        return Some(format!(
            "key {} has other columns than {key_cols:?}",
            shorten(&Value::Object(m.clone()).to_string(), 200)
        ));
    }
    None
}

/// How a consumer's row differs from the table's, allowing for DDL after its last event.
fn row_difference(got: &Map<String, Value>, want: &Value, ddl: &DdlLog) -> Option<String> {
    let want = want.as_object()?;
    let mut diffs = Vec::new();
    for (c, w) in want {
        match got.get(c) {
            Some(g) if g == w => {}
            Some(g) => diffs.push(format!(
                "{c}: topic {} table {}",
                shorten(&g.to_string(), 60),
                shorten(&w.to_string(), 60)
            )),
            None => {
                let explained = ddl.added.contains(c) || ddl.renamed.iter().any(|(_, to)| to == c);
                if !explained {
                    diffs.push(format!("{c}: absent from the topic"));
                }
            }
        }
    }
    for c in got.keys().filter(|c| !want.contains_key(*c)) {
        let explained = ddl.dropped.contains(c) || ddl.renamed.iter().any(|(from, _)| from == c);
        if !explained {
            diffs.push(format!("{c}: in the topic, not published by the table"));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join(", "))
}
