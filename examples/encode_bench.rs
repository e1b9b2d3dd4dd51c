//! Encoder throughput on rows shaped like bench/datasets.sql's `bench_narrow`, through the
//! snapshot's path (`copy_text::parse_row`, `Encoder::key`, `Encoder::value`).
//!
//! `cargo run --release --example encode_bench [rows] [runs]` prints the best ns/row and a
//! hash of every byte encoded, so two builds can be checked for identical output.
//! `... encode_bench corpus` instead hashes the encoding of generated odd inputs of every
//! built-in kind (escapes, invalid UTF-8, broken JSON, ...).

use std::sync::Arc;
use std::time::Instant;

use pgcdc::event::json::{oid, write_datum};
use pgcdc::event::{Change, Column, Datum, Encoder, Op, Position, SnapshotMarker, TableSchema};
use pgcdc::model::Lsn;
use pgcdc::source::copy_text;

/// splitmix64: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn hex32(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }
}

struct Hash(u64);

impl Hash {
    fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 ^= 0xff;
    }
}

/// COPY text rows like bench_narrow's.
fn narrow_rows(n: u64) -> Vec<u8> {
    let mut rng = Rng(42);
    let mut data = Vec::new();
    for i in 1..=n {
        let cents = rng.next() % 1_000_000;
        let (h, m, s) = ((i / 3600) % 24, (i / 60) % 60, i % 60);
        let day = 1 + (i / 86_400) % 28;
        let row = format!(
            "{i}\t{}\tcustomer-{}\t{}.{:02}\t{}{}\t2024-01-{day:02} {h:02}:{m:02}:{s:02}+00\t\
             {{\"qty\": {}, \"sku\": \"SKU-{}\", \"gift\": {}, \"tags\": [\"red\", \"blue\"]}}\n",
            i % 1000,
            rng.hex32(),
            cents / 100,
            cents % 100,
            rng.hex32(),
            rng.hex32(),
            i % 7,
            i % 5000,
            i % 2 == 0,
        );
        data.extend_from_slice(row.as_bytes());
    }
    data
}

fn narrow_table() -> TableSchema {
    TableSchema::new(
        "public",
        "bench_narrow",
        Arc::from("pgcdc.public.bench_narrow"),
        vec![
            Column::new("id", oid::INT8),
            Column::new("n", oid::INT4),
            Column::new("name", oid::TEXT),
            Column::new("amount", oid::NUMERIC),
            Column::new("note", oid::TEXT),
            Column::new("created", oid::TIMESTAMPTZ),
            Column::new("doc", oid::JSONB),
        ],
        &["id".to_string()],
    )
}

/// One pass over `data` as snapshot.rs does it. Returns the hash of all keys and values if
/// `hash`, else their total length (hashing costs more than encoding).
#[inline(never)]
fn encode_all(data: &[u8], table: &TableSchema, encoder: &Encoder, hash: bool) -> u64 {
    let position = Position {
        lsn: Lsn(0x1_6B37_4D48),
        commit_lsn: Lsn(0x1_6B37_4D48),
        xid: None,
        commit_ts_ms: 1_718_000_000_123,
        snapshot: SnapshotMarker::True,
    };
    let mut h = Hash(0xcbf2_9ce4_8422_2325);
    let mut len = 0;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let mut fields = Vec::with_capacity(table.columns.len());
        if copy_text::parse_row(line, table.columns.len(), &mut fields).is_err() {
            panic!("bad generated row");
        }
        let row: Vec<Datum<'_>> = fields
            .iter()
            .map(|f| match f {
                None => Datum::Null,
                Some(v) => Datum::Text(v),
            })
            .collect();
        let key = encoder.key(table, &row);
        let change = Change {
            op: Op::Read,
            before: None,
            after: Some(&row),
            position,
            transaction: None,
            annotations: None,
        };
        let value = encoder.value(table, &change, 1_718_000_000_456).to_vec();
        let key = key.as_deref().unwrap_or_default();
        len += (key.len() + value.len()) as u64;
        if hash {
            h.eat(key);
            h.eat(&value);
        }
    }
    if hash {
        h.0
    } else {
        len
    }
}

/// Odd inputs for every built-in kind, hashed after encoding.
fn corpus() -> u64 {
    let oids = [
        16u32, 17, 20, 21, 23, 25, 26, 114, 700, 701, 1042, 1043, 1082, 1083, 1114, 1184, 1266,
        1700, 3802, 1007, 1009, 3904, 2950, 9999,
    ];
    let pieces: &[&[u8]] = &[
        b"\"",
        b"\\",
        b"\n",
        b"\t",
        b"\x01",
        b"\x1f",
        b"\x7f",
        b"\x08",
        b"\x0c",
        b"\r",
        b"a",
        b"abcdefghijklmnop",
        b"\xc3\xa9",
        b"\xe2\x82\xac",
        b"\xf0\x9f\x98\x80",
        b"\xff",
        b"\xc3",
        b"\xed\xa0\x80",
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b" ",
        b"1",
        b"-",
        b".",
        b"e",
        b"0",
        b"true",
        b"null",
        b"\"k\": ",
        b", ",
        b"{\"a\": [1, 2]}",
        b"\\u00e9",
        b"\\x",
        b"NaN",
        b"2024-01-02 03:04:05.5+00",
        b" BC",
        b"t",
        b"f",
        b"=>",
        b"(",
        b")",
    ];
    let mut rng = Rng(7);
    let mut hash = Hash(0xcbf2_9ce4_8422_2325);
    let mut text = Vec::new();
    let mut out = Vec::new();
    for _ in 0..400_000 {
        text.clear();
        let n = rng.next() % 12;
        for _ in 0..n {
            text.extend_from_slice(pieces[(rng.next() % pieces.len() as u64) as usize]);
        }
        for &o in &oids {
            out.clear();
            write_datum(&mut out, o, Datum::Text(&text));
            hash.eat(&out);
        }
    }
    hash.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("corpus") {
        println!("corpus hash {:016x}", corpus());
        return;
    }
    let rows: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let runs: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let data = narrow_rows(rows);
    let table = narrow_table();
    let encoder = Encoder::new("pgcdc", "bench");
    let mut best = f64::MAX;
    let mut out_len = 0;
    for _ in 0..runs {
        let t = Instant::now();
        out_len = encode_all(&data, &table, &encoder, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let hash = if std::env::var_os("NO_HASH").is_some() {
        0
    } else {
        encode_all(&data, &table, &encoder, true)
    };
    println!(
        "{rows} rows, {} input / {} output bytes/row: best of {runs} {:.1} ns/row, hash {hash:016x}",
        data.len() as u64 / rows,
        out_len / rows,
        best * 1e9 / rows as f64
    );
}
