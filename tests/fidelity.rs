//! Event fidelity end to end: every type's JSON from the snapshot and from the stream, TOAST,
//! schema changes while streaming, truncate, messages, transaction metadata, the flat format
//! and column exclusion. The real binary, the private cluster, the real topics.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::api::ConsumedRecord;
use common::pipeline::{
    assert_fails, assert_success, is_marker_record, without_markers, Event, Pipeline,
};
use serde_json::{json, Value};

/// One column of the type matrix: name, SQL type, the SQL values of rows 1 and 3, and the
/// exact JSON expected for them. Row 2 is all NULL.
struct Col {
    name: &'static str,
    ty: &'static str,
    v1: &'static str,
    v3: &'static str,
    e1: &'static str,
    e3: &'static str,
}

const fn col(
    name: &'static str,
    ty: &'static str,
    v1: &'static str,
    v3: &'static str,
    e1: &'static str,
    e3: &'static str,
) -> Col {
    Col {
        name,
        ty,
        v1,
        v3,
        e1,
        e3,
    }
}

const MATRIX_TYPES: &str =
    "CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION ltree;
    CREATE TYPE mood AS ENUM ('sad', 'happy');
    CREATE DOMAIN posint AS int CHECK (VALUE > 0);
    CREATE TYPE pair AS (a int, b text, c numeric[], d mood);";

#[rustfmt::skip]
const MATRIX: &[Col] = &[
    col("i2", "smallint", "32767", "-32768", "32767", "-32768"),
    col("i4", "int", "2147483647", "-2147483648", "2147483647", "-2147483648"),
    col("i8", "bigint", "9223372036854775807", "-9223372036854775808", "9223372036854775807", "-9223372036854775808"),
    col("n", "numeric", "12.3400", "'NaN'", r#""12.3400""#, r#""NaN""#),
    col("nb", "numeric", "123456789012345678901234567890.123456789", "'-Infinity'",
        r#""123456789012345678901234567890.123456789""#, r#""-Infinity""#),
    col("f4", "real", "1.5", "'-Infinity'", "1.5", r#""-Infinity""#),
    col("f8", "double precision", "0.1", "'NaN'", "0.1", r#""NaN""#),
    col("f8x", "double precision", "1e308", "'Infinity'", "1e+308", r#""Infinity""#),
    col("mo", "money", "12345.67", "-92233720368547758.08", r#""$12,345.67""#, r#""-$92,233,720,368,547,758.08""#),
    col("bo", "boolean", "true", "false", "true", "false"),
    col("tx", "text", r#"E'h\u00e9llo "q" \\ tab\t'"#, "''", r#""héllo \"q\" \\ tab\t""#, r#""""#),
    col("vc", "varchar(10)", "'abc'", "'0123456789'", r#""abc""#, r#""0123456789""#),
    col("ch", "char(5)", "'ab'", "''", r#""ab   ""#, r#""     ""#),
    col("nm", "name", "'nm'", "'x'", r#""nm""#, r#""x""#),
    col("ci", "citext", "'MiXeD'", "'a'", r#""MiXeD""#, r#""a""#),
    col("by", "bytea", r"'\x00ff10'", r"'\x'", r#""AP8Q""#, r#""""#),
    col("uu", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "'00000000-0000-0000-0000-000000000000'",
        r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#, r#""00000000-0000-0000-0000-000000000000""#),
    col("js", "json", r#"'{"b": 1,  "a": [true, null]}'"#, r#"'"str"'"#, r#"{"b":1,"a":[true,null]}"#, r#""str""#),
    col("jb", "jsonb", r#"'{"big": 123456789012345678901234567890, "a": [1.50]}'"#, "'[]'",
        r#"{"a":[1.50],"big":123456789012345678901234567890}"#, "[]"),
    col("d", "date", "'2024-02-29'", "'4714-11-24 BC'", r#""2024-02-29""#, r#""-4713-11-24""#),
    col("dinf", "date", "'infinity'", "'-infinity'", r#""infinity""#, r#""-infinity""#),
    col("t", "time", "'23:59:59.999999'", "'24:00:00'", r#""23:59:59.999999""#, r#""24:00:00""#),
    col("ttz", "timetz", "'12:00:00+05:30'", "'00:00:00-14:59'", r#""12:00:00+05:30""#, r#""00:00:00-14:59""#),
    col("ts", "timestamp", "'2024-01-02 03:04:05.123456'", "'infinity'", r#""2024-01-02T03:04:05.123456""#, r#""infinity""#),
    col("tsb", "timestamp", "'0044-03-15 12:00:00 BC'", "'294276-12-31 23:59:59.999999'",
        r#""-0043-03-15T12:00:00""#, r#""294276-12-31T23:59:59.999999""#),
    col("tstz", "timestamptz", "'2024-01-02 03:04:05.5+02'", "'-infinity'", r#""2024-01-02T01:04:05.5Z""#, r#""-infinity""#),
    col("iv", "interval", "'1 year 2 mons -3 days 04:05:06.5'", "'0'", r#""P1Y2M-3DT4H5M6.5S""#, r#""PT0S""#),
    col("ip", "inet", "'192.168.0.1/24'", "'::1'", r#""192.168.0.1/24""#, r#""::1""#),
    col("cidr", "cidr", "'10.0.0.0/8'", "'2001:db8::/32'", r#""10.0.0.0/8""#, r#""2001:db8::/32""#),
    col("mac", "macaddr", "'08:00:2b:01:02:03'", "'ff:ff:ff:ff:ff:ff'", r#""08:00:2b:01:02:03""#, r#""ff:ff:ff:ff:ff:ff""#),
    col("mac8", "macaddr8", "'08:00:2b:01:02:03:04:05'", "'00:00:00:00:00:00:00:00'",
        r#""08:00:2b:01:02:03:04:05""#, r#""00:00:00:00:00:00:00:00""#),
    col("bt", "bit(4)", "B'1010'", "B'0000'", r#""1010""#, r#""0000""#),
    col("vb", "varbit", "B'1'", "B''", r#""1""#, r#""""#),
    col("tsv", "tsvector", "'a fat cat'", "''", r#""'a' 'cat' 'fat'""#, r#""""#),
    col("xm", "xml", "'<a>x &amp; y</a>'", "''", r#""<a>x &amp; y</a>""#, r#""""#),
    col("lsn", "pg_lsn", "'16/B374D848'", "'0/0'", r#""16/B374D848""#, r#""0/0""#),
    col("oi", "oid", "4294967295", "0", r#""4294967295""#, r#""0""#),
    col("pt", "point", "'(1.5,-2)'", "'(0,0)'", r#""(1.5,-2)""#, r#""(0,0)""#),
    col("ln", "line", "'{1,-1,0}'", "'{0,1,0}'", r#""{1,-1,0}""#, r#""{0,1,0}""#),
    col("ls", "lseg", "'[(0,0),(1,1)]'", "'[(0,0),(0,0)]'", r#""[(0,0),(1,1)]""#, r#""[(0,0),(0,0)]""#),
    col("bx", "box", "'(1,1),(0,0)'", "'(0,0),(0,0)'", r#""(1,1),(0,0)""#, r#""(0,0),(0,0)""#),
    col("pa", "path", "'[(0,0),(1,1)]'", "'((0,0))'", r#""[(0,0),(1,1)]""#, r#""((0,0))""#),
    col("pg", "polygon", "'((0,0),(1,1),(1,0))'", "'((0,0))'", r#""((0,0),(1,1),(1,0))""#, r#""((0,0))""#),
    col("cr", "circle", "'<(0,0),1>'", "'<(0,0),0>'", r#""<(0,0),1>""#, r#""<(0,0),0>""#),
    col("en", "mood", "'happy'", "'sad'", r#""happy""#, r#""sad""#),
    col("dm", "posint", "42", "2147483647", "42", "2147483647"),
    col("ia", "int[]", "'{1,NULL,3}'", "'{}'", "[1,null,3]", "[]"),
    col("ta", "text[]", r#"ARRAY['a b', NULL, 'NULL', 'q"\', '', 'é,{}']"#, "'{{a,b},{c,d}}'",
        r#"["a b",null,"NULL","q\"\\","","é,{}"]"#, r#"[["a","b"],["c","d"]]"#),
    col("ma", "int[]", "'{{1,2},{3,4}}'", "'[0:1]={5,6}'", "[[1,2],[3,4]]", "[5,6]"),
    col("ja", "jsonb[]", r#"ARRAY['{"a": 1}'::jsonb, '"s"']"#, "'{}'", r#"[{"a":1},"s"]"#, "[]"),
    col("na", "numeric[]", "'{1.10,NaN}'", "'{NULL}'", r#"["1.10","NaN"]"#, "[null]"),
    col("tza", "timestamptz[]", "ARRAY['2024-01-01 00:00+00'::timestamptz, 'infinity']", "'{}'",
        r#"["2024-01-01T00:00:00Z","infinity"]"#, "[]"),
    col("ba", "bytea[]", r"ARRAY['\x01'::bytea, '\x']", "'{}'", r#"["AQ==",""]"#, "[]"),
    col("bxa", "box[]", "'{(1,1),(0,0);(3,3),(2,2)}'", "'{}'", r#"["(1,1),(0,0)","(3,3),(2,2)"]"#, "[]"),
    col("ea", "mood[]", "'{sad,happy}'", "'{}'", r#"["sad","happy"]"#, "[]"),
    col("co", "pair", r#"ROW(1, 'x,y "q" \', '{1.5,NULL}', 'sad')"#, "ROW(NULL, '', NULL, NULL)",
        r#"{"a":1,"b":"x,y \"q\" \\","c":["1.5",null],"d":"sad"}"#, r#"{"a":null,"b":"","c":null,"d":null}"#),
    col("coa", "pair[]", "ARRAY[ROW(2, 'z', '{}', 'happy')::pair, NULL]", "'{}'",
        r#"[{"a":2,"b":"z","c":[],"d":"happy"},null]"#, "[]"),
    col("ir", "int4range", "'[1,5)'", "'empty'", r#"{"lower":1,"upper":5,"lower_inc":true,"upper_inc":false}"#, r#"{"empty":true}"#),
    col("tr", "tstzrange", "'[2020-01-01 00:00+00,)'", "'(,infinity]'",
        r#"{"lower":"2020-01-01T00:00:00Z","upper":null,"lower_inc":true,"upper_inc":false}"#,
        r#"{"lower":null,"upper":"infinity","lower_inc":false,"upper_inc":true}"#),
    col("dr", "daterange", "'[2020-01-01,2020-02-01]'", "'(,)'",
        r#"{"lower":"2020-01-01","upper":"2020-02-02","lower_inc":true,"upper_inc":false}"#,
        r#"{"lower":null,"upper":null,"lower_inc":false,"upper_inc":false}"#),
    col("nr", "numrange", "'(1.5,2.5]'", "'empty'", r#"{"lower":"1.5","upper":"2.5","lower_inc":false,"upper_inc":true}"#, r#"{"empty":true}"#),
    col("mr", "int4multirange", "'{[1,3),[5,7)}'", "'{}'",
        r#"[{"lower":1,"upper":3,"lower_inc":true,"upper_inc":false},{"lower":5,"upper":7,"lower_inc":true,"upper_inc":false}]"#, "[]"),
    col("hs", "hstore", r#"'a=>1, "b c"=>NULL, "q\"\\"=>""'"#, "''", r#"{"a":"1","b c":null,"q\"\\":""}"#, "{}"),
    col("lt", "ltree", "'a.b.c'", "''", r#""a.b.c""#, r#""""#),
];

/// The exact `after` expected for row `id` (1, 2 or 3) of the matrix, numbered `as_id`.
fn expected_after(row: usize, as_id: i64) -> String {
    let mut s = format!("{{\"id\":{as_id}");
    for c in MATRIX {
        let v = match row {
            1 => c.e1,
            3 => c.e3,
            _ => "null",
        };
        s.push_str(&format!(",\"{}\":{v}", c.name));
    }
    s.push('}');
    s
}

/// The raw bytes of an envelope's `after`, which the encoder writes right before `source`.
fn raw_after(r: &ConsumedRecord) -> String {
    let v = String::from_utf8(r.value.clone().expect("not a tombstone")).expect("UTF-8");
    let start = v.find("\"after\":").expect("after") + "\"after\":".len();
    let end = v.rfind(",\"source\":{\"connector\"").expect("source");
    v[start..end].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn type_matrix_snapshot_and_stream_are_byte_identical() {
    let columns: Vec<String> = MATRIX
        .iter()
        .map(|c| format!("{} {}", c.name, c.ty))
        .collect();
    let names: Vec<&str> = MATRIX.iter().map(|c| c.name).collect();
    let row = |id: i64, vals: Vec<&str>| format!("({id}, {})", vals.join(", "));
    let setup = format!(
        "{MATRIX_TYPES}
         CREATE TABLE public.matrix (id int PRIMARY KEY, {});
         INSERT INTO public.matrix (id, {}) VALUES {}, {}, {};",
        columns.join(", "),
        names.join(", "),
        row(1, MATRIX.iter().map(|c| c.v1).collect()),
        row(2, MATRIX.iter().map(|_| "NULL").collect()),
        row(3, MATRIX.iter().map(|c| c.v3).collect()),
    );
    let p = Pipeline::new(&setup).await;
    // The user's own session options must not change the output (pgcdc pins its own).
    let source = format!(
        "{} options='-c DateStyle=German -c TimeZone=America/New_York -c IntervalStyle=postgres_verbose -c extra_float_digits=0 -c bytea_output=escape'",
        p.source()
    );
    let kafka = common::pipeline::kafka();
    let args = ["--table", "public.matrix", "--stop-lsn", "now"];
    let out = p.command_with(&source, &kafka, &args).output().unwrap();
    assert_success(&out, "snapshot");

    p.db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO matrix (id, {0}) SELECT id + 100, {0} FROM matrix ORDER BY id",
            names.join(", ")
        ))
        .await
        .unwrap();
    let out = p.command_with(&source, &kafka, &args).output().unwrap();
    assert_success(&out, "stream");

    // The rows, the snapshot marker, the rows again as inserts.
    let mut records = p.records(&p.topic("matrix"), Some(7)).await;
    assert_eq!(records.len(), 7);
    assert!(is_marker_record(&records[3]));
    records.remove(3);
    for (i, r) in records.iter().enumerate() {
        let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        let (want_op, id) = if i < 3 { ("r", i + 1) } else { ("c", i - 2) };
        assert_eq!(v["op"], want_op);
        let as_id = if i < 3 { id as i64 } else { id as i64 + 100 };
        let want = expected_after(id, as_id);
        let got = raw_after(r);
        if got != want {
            // Name the first column that differs rather than dumping two long lines.
            let got_v: Value = serde_json::from_str(&got).expect("after is JSON");
            let want_v: Value = serde_json::from_str(&want).expect("expected is JSON");
            let diff: Vec<String> = MATRIX
                .iter()
                .filter(|c| got_v[c.name] != want_v[c.name])
                .map(|c| {
                    format!(
                        "{} ({}): got {} want {}",
                        c.name, c.ty, got_v[c.name], want_v[c.name]
                    )
                })
                .collect();
            panic!("row {id} ({want_op}): after differs: {diff:#?}\ngot  {got}\nwant {want}");
        }
    }
    // Byte-identical after for the same row, read and streamed (ids aside).
    for id in 1..=3 {
        let read = raw_after(&records[id - 1]);
        let streamed = raw_after(&records[id + 2]);
        assert_eq!(
            read.replacen(&format!("{{\"id\":{id},"), "{", 1),
            streamed.replacen(&format!("{{\"id\":{},", id + 100), "{", 1)
        );
    }
    // One shape, one schema id.
    let ids: HashSet<String> = records
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
            v["source"]["schema_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

/// A value big enough to be TOASTed out of line, uncompressed.
const BIG: &str = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g)";

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_is_filled_under_full_and_listed_otherwise() {
    let p = Pipeline::new(&format!(
        "CREATE TABLE public.full_t (id int PRIMARY KEY, big text, n int);
         CREATE TABLE public.def_t (id int PRIMARY KEY, big text, n int);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         ALTER TABLE full_t ALTER COLUMN big SET STORAGE EXTERNAL;
         ALTER TABLE def_t ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO full_t VALUES (1, {BIG}, 0);
         INSERT INTO def_t VALUES (1, {BIG}, 0);"
    ))
    .await;
    let args = [
        "--table",
        "public.full_t",
        "--table",
        "public.def_t",
        "--stop-lsn",
        "now",
    ];
    assert_success(&p.run(&args), "snapshot");
    p.db.client()
        .await
        .batch_execute("UPDATE full_t SET n = 1; UPDATE def_t SET n = 1;")
        .await
        .unwrap();
    assert_success(&p.run(&args), "stream");
    let big: String =
        p.db.client()
            .await
            .query_one(&format!("SELECT {BIG}"), &[])
            .await
            .unwrap()
            .get(0);
    assert!(big.len() > 8000);

    let full = without_markers(p.events("full_t", Some(3)).await);
    let u = full[1].value.as_ref().unwrap();
    assert_eq!(u["op"], "u");
    assert_eq!(u["after"], json!({"id": 1, "big": big, "n": 1}));
    assert_eq!(u["before"], json!({"id": 1, "big": big, "n": 0}));
    assert!(u.get("unchanged").is_none(), "{u}");

    let def = without_markers(p.events("def_t", Some(3)).await);
    let u = def[1].value.as_ref().unwrap();
    assert_eq!(u["op"], "u");
    assert_eq!(u["after"], json!({"id": 1, "n": 1}), "big is not invented");
    assert_eq!(u["unchanged"], json!(["big"]));
    assert_eq!(def[0].value.as_ref().unwrap()["after"]["big"], json!(big));
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_while_streaming_reflect_the_new_shape() {
    let p = Pipeline::new(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE public.a (id int PRIMARY KEY, v text, n int);
         INSERT INTO a VALUES (1, 'one', 1);",
    )
    .await;
    let client = p.db.client().await;
    client
        .batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE a", p.slot))
        .await
        .unwrap();
    // Publication-driven: no --table, so tables that join the publication are captured.
    let mut child = p.spawn(&[], "schema.log");
    let streaming = common::poll_until(Duration::from_secs(30), || async {
        p.log("schema.log")
            .contains("streaming changes")
            .then_some(())
    })
    .await;
    assert!(streaming.is_some(), "{}", p.log("schema.log"));
    client
        .batch_execute(
            "INSERT INTO a VALUES (2, 'two', 2);
             ALTER TABLE a ADD COLUMN c int;
             INSERT INTO a VALUES (3, 'three', 3, 33);
             ALTER TABLE a ADD COLUMN d text NOT NULL DEFAULT 'dflt';
             INSERT INTO a (id, v, n) VALUES (4, 'four', 4);
             UPDATE a SET n = 10 WHERE id = 1;
             ALTER TABLE a DROP COLUMN c;
             INSERT INTO a VALUES (5, 'five', 5, 'x');
             ALTER TABLE a ALTER COLUMN n TYPE numeric USING n::numeric;
             INSERT INTO a VALUES (6, 'six', 6.5, 'y');
             ALTER TABLE a RENAME COLUMN v TO w;
             INSERT INTO a VALUES (7, 'seven', 7, 'z');
             CREATE TYPE pt2 AS (x int, y int);
             ALTER TABLE a ADD COLUMN p pt2[], ADD COLUMN m mood;
             INSERT INTO a VALUES (8, 'eight', 8, 'w', '{\"(1,2)\"}', 'happy');
             ALTER TABLE a RENAME COLUMN id TO ident;
             INSERT INTO a VALUES (9, 'nine', 9, 'v', NULL, NULL);
             CREATE TABLE public.b (k text PRIMARY KEY, r int4range);
             ALTER PUBLICATION {slot} ADD TABLE b;
             INSERT INTO b VALUES ('k1', '[1,3)');"
                .replace("{slot}", &p.slot)
                .as_str(),
        )
        .await
        .unwrap();
    let caught_up = p.wait_caught_up(Duration::from_secs(30)).await;
    let log = p.log("schema.log");
    assert!(caught_up, "did not catch up:\n{log}");
    assert!(child.try_wait().unwrap().is_none(), "pgcdc exited:\n{log}");
    common::process::sigterm(&child);
    let _ = child.wait();

    let events = without_markers(p.events("a", Some(11)).await);
    let afters: Vec<&Value> = events
        .iter()
        .map(|e| &e.value.as_ref().unwrap()["after"])
        .collect();
    assert_eq!(afters.len(), 10, "{afters:#?}");
    let want = [
        json!({"id": 1, "v": "one", "n": 1}),
        json!({"id": 2, "v": "two", "n": 2}),
        json!({"id": 3, "v": "three", "n": 3, "c": 33}),
        json!({"id": 4, "v": "four", "n": 4, "c": null, "d": "dflt"}),
        json!({"id": 1, "v": "one", "n": 10, "c": null, "d": "dflt"}),
        json!({"id": 5, "v": "five", "n": 5, "d": "x"}),
        json!({"id": 6, "v": "six", "n": "6.5", "d": "y"}),
        json!({"id": 7, "w": "seven", "n": "7", "d": "z"}),
        json!({"id": 8, "w": "eight", "n": "8", "d": "w", "p": [{"x": 1, "y": 2}], "m": "happy"}),
        json!({"ident": 9, "w": "nine", "n": "9", "d": "v", "p": null, "m": null}),
    ];
    for (i, (got, want)) in afters.iter().zip(want.iter()).enumerate() {
        assert_eq!(*got, want, "event {i}\n{log}");
    }
    assert_eq!(
        events[9].key,
        Some(json!({"ident": 9})),
        "renamed key column"
    );
    // The schema id changes exactly when the shape does.
    let ids: Vec<&str> = events
        .iter()
        .map(|e| {
            e.value.as_ref().unwrap()["source"]["schema_id"]
                .as_str()
                .unwrap()
        })
        .collect();
    let same = [
        (0, 1, true),
        (1, 2, false),
        (2, 3, false),
        (3, 4, true),
        (4, 5, false),
        (5, 6, false),
        (6, 7, false),
        (7, 8, false),
        (8, 9, false),
    ];
    for (x, y, eq) in same {
        assert_eq!(
            ids[x] == ids[y],
            eq,
            "schema_id of events {x} and {y}: {ids:?}"
        );
    }

    let b = p.events("b", Some(1)).await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].key, Some(json!({"k": "k1"})));
    let v = b[0].value.as_ref().unwrap();
    assert_eq!(v["source"]["table"], "b");
    assert_eq!(
        v["after"],
        json!({"k": "k1", "r": {"lower": 1, "upper": 3, "lower_inc": true, "upper_inc": false}})
    );
}

/// The events of a topic that carry a transaction block, by transaction id.
fn by_transaction(events: &[Event]) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for v in events.iter().filter_map(|e| e.value.as_ref()) {
        if let Some(id) = v["transaction"]["id"].as_str() {
            out.entry(id.to_string())
                .or_default()
                .push(v["transaction"].clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_messages_and_transaction_metadata() {
    let p = Pipeline::new(
        "CREATE TABLE public.a (id int PRIMARY KEY, v text);
         CREATE TABLE public.b (id int PRIMARY KEY, v text);
         INSERT INTO a VALUES (1, 'x');",
    )
    .await;
    let args = [
        "--table",
        "public.a",
        "--table",
        "public.b",
        "--transaction-metadata",
        "--event-headers",
        "true",
        "--stop-lsn",
        "now",
    ];
    assert_success(&p.run(&args), "snapshot");
    let client = p.db.client().await;
    // One statement per call: statements sent together share one implicit transaction.
    for sql in [
        "BEGIN;
         INSERT INTO a VALUES (2, 'y'), (3, 'z');
         INSERT INTO b VALUES (1, 'p');
         UPDATE a SET v = 'w' WHERE id = 1;
         SELECT pg_logical_emit_message(true, 'outbox', '{\"order\": 1}');
         DELETE FROM b WHERE id = 1;
         COMMIT;",
        "SELECT pg_logical_emit_message(false, 'audit', '\\x00ff'::bytea)",
        "UPDATE a SET id = 10 WHERE id = 2",
        "TRUNCATE a, b",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    assert_success(&p.run(&args), "stream");

    // a: read, marker | 2 creates, update | delete + tombstone + create (key change) |
    // truncate. The marker has `transaction: null` like the read.
    let a = p.events("a", Some(9)).await;
    assert_eq!(a.len(), 9);
    assert!(a[1].is_marker());
    assert_eq!(a[1].value.as_ref().unwrap()["transaction"], Value::Null);
    let a = without_markers(a);
    let ops: Vec<Option<&str>> = a.iter().map(Event::op).collect();
    assert_eq!(
        ops,
        [
            Some("r"),
            Some("c"),
            Some("c"),
            Some("u"),
            Some("d"),
            None,
            Some("c"),
            Some("t")
        ]
    );
    // b: marker (an empty table's snapshot) | create, delete + tombstone | truncate.
    let b = p.events("b", Some(5)).await;
    assert_eq!(b[0].marker_rows(), Some(0));
    let b = without_markers(b);
    let ops: Vec<Option<&str>> = b.iter().map(Event::op).collect();
    assert_eq!(ops, [Some("c"), Some("d"), None, Some("t")]);
    let t = b[3].value.as_ref().unwrap();
    assert_eq!(b[3].key, None, "truncate events have no key");
    assert_eq!((&t["before"], &t["after"]), (&Value::Null, &Value::Null));
    assert_eq!(t["source"]["table"], "b");
    assert_eq!(a[0].value.as_ref().unwrap()["transaction"], Value::Null);

    // Transaction metadata: BEGIN and END per transaction, counts that match the events.
    let txns = p
        .events_in(&format!("{}.transaction", p.prefix), Some(6))
        .await;
    assert_eq!(txns.len(), 6);
    let mut data: BTreeMap<String, Vec<Value>> = by_transaction(&a);
    for (id, mut v) in by_transaction(&b) {
        data.entry(id).or_default().append(&mut v);
    }
    for pair in txns.chunks(2) {
        let (begin, end) = (
            pair[0].value.as_ref().unwrap(),
            pair[1].value.as_ref().unwrap(),
        );
        assert_eq!(
            (begin["status"].as_str(), end["status"].as_str()),
            (Some("BEGIN"), Some("END"))
        );
        let id = begin["id"].as_str().unwrap();
        assert_eq!(end["id"], id);
        assert_eq!(pair[0].key, Some(json!({"id": id})));
        let events = &data[id];
        assert_eq!(
            end["event_count"].as_u64(),
            Some(events.len() as u64),
            "{end}"
        );
        let mut orders: Vec<u64> = events
            .iter()
            .map(|t| t["total_order"].as_u64().unwrap())
            .collect();
        orders.sort();
        assert_eq!(orders, (1..=events.len() as u64).collect::<Vec<_>>());
        let per_table: u64 = end["data_collections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["event_count"].as_u64().unwrap())
            .sum();
        assert_eq!(per_table, events.len() as u64);
    }
    let first_end = txns[1].value.as_ref().unwrap();
    assert_eq!(
        first_end["data_collections"],
        json!([
            {"data_collection": "public.a", "event_count": 3},
            {"data_collection": "public.b", "event_count": 2}
        ])
    );
    let orders: Vec<(u64, u64)> = a[1..4]
        .iter()
        .map(|e| {
            let t = &e.value.as_ref().unwrap()["transaction"];
            (
                t["total_order"].as_u64().unwrap(),
                t["data_collection_order"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(orders, [(1, 1), (2, 2), (4, 3)]);

    // Messages, transactional (inside the first transaction) and not.
    let msgs = p.events_in(&format!("{}.message", p.prefix), Some(2)).await;
    assert_eq!(msgs.len(), 2);
    let outbox = msgs[0].value.as_ref().unwrap();
    assert_eq!(msgs[0].key, Some(json!({"prefix": "outbox"})));
    assert_eq!(
        outbox["message"],
        json!({"prefix": "outbox", "content": "eyJvcmRlciI6IDF9", "transactional": true})
    );
    let created = a[1].value.as_ref().unwrap();
    assert_eq!(outbox["source"]["txId"], created["source"]["txId"]);
    assert_eq!(
        outbox["source"]["commit_lsn"],
        created["source"]["commit_lsn"]
    );
    let audit = msgs[1].value.as_ref().unwrap();
    assert_eq!(
        audit["message"],
        json!({"prefix": "audit", "content": "AP8=", "transactional": false})
    );
    assert_eq!(audit["source"]["txId"], Value::Null);

    // Event ids: on every record, unique in their topic, built from positions (see `event::headers`).
    let a_all = p.events("a", Some(9)).await;
    let b_all = p.events("b", Some(5)).await;
    let id = |e: &Event| e.header("pgcdc-event-id").expect("event id").to_string();
    for topic in [&a_all, &b_all, &txns, &msgs] {
        let mut seen = std::collections::HashSet::new();
        for e in topic {
            assert!(seen.insert(id(e)), "event id used twice in a topic: {e:?}");
        }
    }
    let pos = |e: &Event| {
        let s = &e.value.as_ref().unwrap()["source"];
        format!(
            "{:016X}.{:016X}",
            s["commit_lsn"].as_u64().unwrap(),
            s["lsn"].as_u64().unwrap()
        )
    };
    let lsn_of = |e: &Event| e.value.as_ref().unwrap()["source"]["lsn"].as_u64().unwrap();
    // a: read, marker, c c u, d tombstone c, t.
    assert_eq!(
        id(&a_all[0]),
        format!("{:016X}.r.{{\"id\":1}}", lsn_of(&a_all[0]))
    );
    assert_eq!(
        id(&a_all[1]),
        format!("{:016X}.marker.0", lsn_of(&a_all[1]))
    );
    for e in &a_all[2..5] {
        assert_eq!(id(e), format!("{}.0", pos(e)), "{e:?}");
    }
    // The key change: a delete and a create at one LSN, ranked; the tombstone follows.
    assert_eq!(id(&a_all[5]), format!("{}.0", pos(&a_all[5])));
    assert_eq!(id(&a_all[6]), format!("{}.t", id(&a_all[5])));
    assert_eq!(id(&a_all[7]), format!("{}.1", pos(&a_all[7])));
    assert_eq!(pos(&a_all[5]), pos(&a_all[7]));
    // One TRUNCATE of two tables: one LSN, ranked in the message's order.
    assert_eq!(pos(&a_all[8]), pos(&b_all[4]));
    assert_eq!(id(&a_all[8]), format!("{}.0", pos(&a_all[8])));
    assert_eq!(id(&b_all[4]), format!("{}.1", pos(&b_all[4])));
    assert_eq!(id(&b_all[3]), format!("{}.t", id(&b_all[2])));
    // Transaction metadata: `C.begin`, `C.end`; messages like changes.
    let commit = |e: &Event| {
        let tid = e.value.as_ref().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let lsn: u64 = tid.split(':').nth(1).unwrap().parse().unwrap();
        format!("{lsn:016X}")
    };
    for pair in txns.chunks(2) {
        assert_eq!(id(&pair[0]), format!("{}.begin", commit(&pair[0])));
        assert_eq!(id(&pair[1]), format!("{}.end", commit(&pair[1])));
    }
    assert_eq!(id(&msgs[0]), format!("{}.0", pos(&msgs[0])));
    assert_eq!(id(&msgs[1]), format!("{}.0", pos(&msgs[1])));

    // --truncate false: a TRUNCATE is not published.
    client
        .batch_execute("INSERT INTO a VALUES (20, 'q')")
        .await
        .unwrap();
    client.batch_execute("TRUNCATE a").await.unwrap();
    let mut off = args.to_vec();
    off.extend(["--truncate", "false"]);
    assert_success(&p.run(&off), "stream without truncate");
    // Everything is published when the run ends: the read finds all there is.
    let a = without_markers(p.events("a", None).await);
    let ops: Vec<Option<&str>> = a[8..].iter().map(Event::op).collect();
    assert_eq!(ops, [Some("c")], "only the insert");
}

#[tokio::test(flavor = "multi_thread")]
async fn flat_format_with_excluded_column() {
    let p = Pipeline::new(
        "CREATE TABLE public.users (id int PRIMARY KEY, email text, name text, amount numeric, data bytea);
         INSERT INTO users VALUES (1, 'a@secret', 'A', 12.50, '\\x0102');",
    )
    .await;
    // Clear errors, before anything is created.
    assert_fails(
        &p.run(&["--table", "users", "--exclude-column", "public.users.id"]),
        2,
        &[r#""public"."users"."id""#, "cannot be excluded"],
    );
    assert_fails(
        &p.run(&["--table", "users", "--exclude-column", "users.emial"]),
        2,
        &["no such column"],
    );
    assert_fails(
        &p.run(&["--table", "users", "--exclude-column", "email"]),
        2,
        &["schema.table.column"],
    );
    let args = [
        "--table",
        "public.users",
        "--format",
        "flat",
        "--exclude-column",
        "public.users.email",
        "--decimal",
        "number",
        "--binary",
        "hex",
        "--stop-lsn",
        "now",
    ];
    assert_success(&p.run(&args), "snapshot");
    p.db.client()
        .await
        .batch_execute(
            "INSERT INTO users VALUES (2, 'b@secret', 'B', 'NaN', NULL);
             UPDATE users SET name = 'AA', email = 'new@secret' WHERE id = 1;
             DELETE FROM users WHERE id = 2;",
        )
        .await
        .unwrap();
    assert_success(&p.run(&args), "stream");

    let mut records = p.records(&p.topic("users"), Some(6)).await;
    assert_eq!(records.len(), 6);
    // The flat snapshot marker, after the read.
    let marker: Value = serde_json::from_slice(records[1].value.as_deref().unwrap()).unwrap();
    assert_eq!(
        marker,
        json!({"__op": "s", "__table": "public.users", "__lsn": marker["__lsn"],
               "__deleted": false, "__partition": 0, "__partitions": 1, "__rows": 1})
    );
    assert!(is_marker_record(&records.remove(1)));
    for r in &records {
        let raw = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default());
        assert!(!raw.contains("secret") && !raw.contains("email"), "{raw}");
    }
    let values: Vec<Value> = records
        .iter()
        .map(|r| match &r.value {
            Some(v) => {
                let mut v: Value = serde_json::from_slice(v).unwrap();
                assert!(v["__lsn"].as_u64().unwrap() > 0);
                v.as_object_mut().unwrap().remove("__lsn");
                v
            }
            None => Value::Null,
        })
        .collect();
    assert_eq!(
        values,
        [
            json!({"id": 1, "name": "A", "amount": 12.50, "data": "0102",
                   "__op": "r", "__table": "public.users", "__deleted": false}),
            json!({"id": 2, "name": "B", "amount": "NaN", "data": null,
                   "__op": "c", "__table": "public.users", "__deleted": false}),
            json!({"id": 1, "name": "AA", "amount": 12.50, "data": "0102",
                   "__op": "u", "__table": "public.users", "__deleted": false}),
            json!({"id": 2, "__op": "d", "__table": "public.users", "__deleted": true}),
            Value::Null,
        ]
    );
    // The exact digits of numeric, as a number.
    let raw = String::from_utf8(records[0].value.clone().unwrap()).unwrap();
    assert!(raw.contains("\"amount\":12.50,"), "{raw}");
}

/// Columns of a table the snapshot reads with binary `COPY` (every type is one pgcdc converts
/// itself), and rows of edge values: the read events must be byte-identical to the events
/// the same rows give when streamed (pgoutput's text), the reference for every value.
const BINARY_COLUMNS: &str =
    "b bool, i2 smallint, i4 int, i8 bigint, o oid, t text, vc varchar(10), \
     bc char(5), nm name, js json, jb jsonb, n numeric, n2 numeric(12,2), d date, ts timestamp, \
     tz timestamptz, u uuid, by bytea";

const BINARY_ROWS: &str = r#"
    (1, true, 32767, 2147483647, 9223372036854775807, 4294967295, E'tab\there "q" \\ é\n',
     'abc', 'ab', 'nm', '{"a": [1, 2.50, "x"]}', '{"b": {"c": null}, "a": 1.0}',
     123456789012345678901234567890.123456789, 0.5, '4714-11-24 BC', '0044-03-15 12:00:00.5 BC',
     '294276-12-31 23:59:59.999999+00', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '\x00ff10'),
    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL),
    (3, false, -32768, -2147483648, -9223372036854775808, 0, '', '', '', '', 'null', '[]', 'NaN',
     -0.01, 'infinity', '-infinity', 'infinity', '00000000-0000-0000-0000-000000000000', '\x'),
    (4, true, 0, 0, 0, 1, 'x', 'y', 'zzzzz', 'n', '"s"', '"\u00e9\\"', -0.000012300, 0,
     '-infinity', 'infinity', '-infinity', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '\x0a'),
    (5, true, 1, 1, 1, 1, 'x', 'y', 'z', 'n', '1', '1e3', 'Infinity', 9999999999.99,
     '0001-01-01', '0001-01-01 00:00:00 BC', '1999-12-31 23:59:59.000001+00',
     '12345678-1234-1234-1234-123456789abc', '\x01'),
    (6, false, -1, -1, -1, 2, 'x', 'y', 'z', 'n', '{}', '{}', '-Infinity', -9999999999.99,
     '5874897-12-31', '2000-01-01 00:00:00', '1970-01-01 00:00:00+00',
     '12345678-1234-1234-1234-123456789abc', '\x02'),
    (7, true, 7, 7, 7, 7, 'x', 'y', 'z', 'n', '[]', '[]', 10000, 100, '2000-02-29',
     '1900-02-28 23:59:59.99', '2024-02-29 12:34:56.7+00', '12345678-1234-1234-1234-123456789abc',
     '\x03')"#;

/// Generated rows: numerics of many scales and magnitudes, dates and times over ±4000 years.
const BINARY_SERIES: &str = "INSERT INTO public.bin (id, b, i2, i4, i8, o, t, vc, bc, nm, js, jb, n, n2, d, ts, tz, u, by)
     SELECT 100 + g, g % 2 = 0, (g * 331 % 65536 - 32768)::int2, g * 10007 - 2000000, g::int8 * 92233720368547 - 9000000000000000000,
            (g * 4294967)::int8::oid, repeat(chr(65 + g % 26), g % 7), left(md5(g::text), g % 11),
            repeat('c', g % 6), md5(g::text), json_build_object('g', g, 'h', g / 7.0),
            jsonb_build_object('g', g, 'l', repeat('é', g % 3)),
            round(((g * 7919 % 100003) - 50000)::numeric * 10::numeric ^ (g % 41 - 20), g % 25),
            round((g * 3.14159)::numeric, 2),
            '2000-01-01'::date + (g - 200) * 7307,
            '2000-01-01 00:00:00'::timestamp + (g - 200) * interval '7305 days 07:13:17.123457',
            '2000-01-01 00:00:00+00'::timestamptz + (g - 200) * interval '7300 days 23:59:59.999999',
            md5(g::text)::uuid, decode(md5(g::text), 'hex')
       FROM generate_series(1, 400) AS g";

#[tokio::test(flavor = "multi_thread")]
async fn binary_copy_snapshot_and_stream_are_byte_identical() {
    let setup = format!(
        "CREATE TABLE public.bin (id int PRIMARY KEY, {BINARY_COLUMNS});
         INSERT INTO public.bin VALUES {BINARY_ROWS};
         {BINARY_SERIES};"
    );
    let p = Pipeline::new(&setup).await;
    let kafka = common::pipeline::kafka();
    let args = ["--table", "public.bin", "--stop-lsn", "now"];
    let out = p.command_with(&p.source(), &kafka, &args).output().unwrap();
    assert_success(&out, "snapshot");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.lines()
            .any(|l| l.contains("snapshot: reading table") && l.contains("binary")),
        "the snapshot did not read with binary COPY:\n{log}"
    );

    let rows: i64 =
        p.db.client()
            .await
            .query_one("SELECT count(*) FROM bin", &[])
            .await
            .unwrap()
            .get(0);
    p.db.client()
        .await
        .batch_execute(
            "INSERT INTO bin SELECT id + 100000, b, i2, i4, i8, o, t, vc, bc, nm, js, jb, n, n2, d, ts, tz, u, by
               FROM bin ORDER BY id",
        )
        .await
        .unwrap();
    let out = p.command_with(&p.source(), &kafka, &args).output().unwrap();
    assert_success(&out, "stream");
    // The parallel snapshot's path (workers, page ranges, batches re-cut for the sink) reads
    // the original rows and their streamed copies into the same topic.
    let parallel = [
        "--table",
        "public.bin",
        "--snapshot-only",
        "--snapshot-workers",
        "2",
    ];
    let out = p
        .command_with(&p.source(), &kafka, &parallel)
        .output()
        .unwrap();
    assert_success(&out, "parallel snapshot");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("several connections")
            && log
                .lines()
                .any(|l| l.contains("snapshot: reading table") && l.contains("binary")),
        "the parallel snapshot did not read with binary COPY:\n{log}"
    );

    // Two snapshots, each with its marker.
    let n = 4 * rows as usize + 2;
    let mut records = p.records(&p.topic("bin"), Some(n)).await;
    assert_eq!(records.len(), n);
    records.retain(|r| !is_marker_record(r));
    let mut read = BTreeMap::new();
    let mut streamed = BTreeMap::new();
    let mut read_again = BTreeMap::new();
    for r in &records {
        let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        let id = v["after"]["id"].as_i64().unwrap();
        let after = raw_after(r);
        let body = after
            .strip_prefix(&format!("{{\"id\":{id},"))
            .expect("id first")
            .to_string();
        match (v["op"].as_str().unwrap(), id >= 100_000) {
            // Read by the parallel snapshot only.
            ("r", true) => read_again.insert(id - 100_000, body),
            // Read twice: by the first snapshot and by the parallel one.
            ("r", false) => match read.insert(id, body.clone()) {
                Some(first) => {
                    assert_eq!(first, body, "row {id}: read twice, differently");
                    None
                }
                None => None,
            },
            ("c", _) => streamed.insert(id - 100_000, body),
            (op, _) => panic!("unexpected op {op}"),
        };
    }
    assert_eq!(read.len(), rows as usize);
    assert_eq!(streamed.len(), rows as usize);
    assert_eq!(read_again.len(), rows as usize);
    for (id, r) in &read {
        assert_eq!(
            Some(r),
            streamed.get(id),
            "row {id}: read (left) vs streamed (right)"
        );
        assert_eq!(
            Some(r),
            read_again.get(id),
            "row {id}: read (left) vs its streamed copy read in parallel (right)"
        );
    }
}

/// `--tombstones false`: a delete is followed by no tombstone. `--messages false`:
/// `pg_logical_emit_message` output reaches no topic (transactional or not).
#[tokio::test(flavor = "multi_thread")]
async fn tombstones_and_messages_can_be_turned_off() {
    let p = Pipeline::new(
        "CREATE TABLE public.a (id int PRIMARY KEY, v text);
         INSERT INTO a VALUES (1, 'x'), (2, 'y');",
    )
    .await;
    let args = [
        "--table",
        "public.a",
        "--tombstones",
        "false",
        "--messages",
        "false",
        "--stop-lsn",
        "now",
    ];
    assert_success(&p.run(&args), "snapshot");
    let client = p.db.client().await;
    for sql in [
        "BEGIN;
         DELETE FROM a WHERE id = 1;
         SELECT pg_logical_emit_message(true, 'outbox', 'in a transaction');
         INSERT INTO a VALUES (3, 'z');
         COMMIT;",
        "SELECT pg_logical_emit_message(false, 'audit', 'not transactional')",
        "UPDATE a SET id = 20 WHERE id = 2",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    assert_success(&p.run(&args), "stream");
    // The run has ended: everything it published is there.
    let events = p.events("a", None).await;
    let ops: Vec<Option<&str>> = events.iter().map(Event::op).collect();
    // A key change is a delete and a create: no tombstone between them either.
    assert_eq!(
        ops,
        [
            Some("r"),
            Some("r"),
            Some("s"),
            Some("d"),
            Some("c"),
            Some("d"),
            Some("c")
        ],
        "{events:?}"
    );
    // `--event-headers false` (the test kit's default): no headers at all.
    assert!(events.iter().all(|e| e.headers.is_empty()), "{events:?}");
    let topics = common::topics::published(&common::pipeline::kafka(), &p.prefix).await;
    let messages = format!("{}.message", p.prefix);
    assert_eq!(
        topics.get(&messages).copied().unwrap_or(0),
        0,
        "messages were published: {topics:?}"
    );
}

/// `--exclude-column` works by name: a column dropped and added again under the excluded name
/// while pgcdc streams is excluded too, while another new column appears.
#[tokio::test(flavor = "multi_thread")]
async fn a_column_added_later_under_an_excluded_name_is_excluded_too() {
    let p = Pipeline::new(
        "CREATE TABLE public.users (id int PRIMARY KEY, name text, secret text);
         INSERT INTO users VALUES (1, 'A', 'first-secret');",
    )
    .await;
    let mut child = p.spawn(
        &[
            "--table",
            "public.users",
            "--exclude-column",
            "public.users.secret",
        ],
        "exclude.log",
    );
    p.wait_for_log("exclude.log", "streaming changes").await;
    let client = p.db.client().await;
    for sql in [
        "ALTER TABLE users DROP COLUMN secret",
        "INSERT INTO users VALUES (2, 'B')",
        "ALTER TABLE users ADD COLUMN secret text, ADD COLUMN extra int",
        "INSERT INTO users VALUES (3, 'C', 'second-secret', 3)",
        "UPDATE users SET secret = 'third-secret', name = 'AA' WHERE id = 1",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let caught_up = p.wait_caught_up(Duration::from_secs(30)).await;
    let log = p.log("exclude.log");
    assert!(caught_up, "did not catch up:\n{log}");
    common::process::sigterm(&child);
    let _ = child.wait();

    let records: Vec<_> = p
        .records(&p.topic("users"), Some(5))
        .await
        .into_iter()
        .filter(|r| !common::pipeline::is_marker_record(r))
        .collect();
    for r in &records {
        let raw = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default());
        assert!(!raw.contains("secret"), "{raw}\n{log}");
    }
    let afters: Vec<Value> = records
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(r.value.as_deref().unwrap()).unwrap()["after"].clone()
        })
        .collect();
    assert_eq!(
        afters,
        [
            json!({"id": 1, "name": "A"}),
            json!({"id": 2, "name": "B"}),
            json!({"id": 3, "name": "C", "extra": 3}),
            json!({"id": 1, "name": "AA", "extra": null}),
        ],
        "{log}"
    );
}

/// Names that SQL must quote: keywords, mixed case, spaces, quotes, unicode; an ordinary
/// table, a partitioned one (read through `COPY (SELECT …)`) and one big enough to be read
/// in page ranges by two workers (fillfactor 10 and 500-byte rows: a row per page, 2,600
/// pages, more than two ranges' minimum of 1,024).
const ODD_NAMES: &str = r#"
    CREATE SCHEMA "Odd ""Schema"" ü";
    CREATE TABLE "Odd ""Schema"" ü"."Order ""Table"" ✓" ("order" int PRIMARY KEY, "group" text,
        "user" text, "Mixed Case" int, "q""uote d" text, "ünï còdé" bool);
    INSERT INTO "Odd ""Schema"" ü"."Order ""Table"" ✓"
        SELECT g, 'g' || g, 'u' || g, g * 2, 'q"' || g, g % 2 = 0 FROM generate_series(1, 50) g;
    CREATE TABLE public."group" ("user" int PRIMARY KEY, "order" text, "Mixed Case" int)
        PARTITION BY RANGE ("user");
    CREATE TABLE public.group_low PARTITION OF public."group" FOR VALUES FROM (MINVALUE) TO (1000);
    CREATE TABLE public."Group High" PARTITION OF public."group" FOR VALUES FROM (1000) TO (MAXVALUE);
    INSERT INTO public."group" SELECT g, 'o' || g, -g FROM generate_series(1, 2000, 7) g;
    CREATE SCHEMA "Mixed Case";
    CREATE TABLE "Mixed Case"."user" ("user" int PRIMARY KEY, "select" text, "Mixed Case" int)
        WITH (fillfactor = 10);
    INSERT INTO "Mixed Case"."user" SELECT g, repeat('s', 500), g FROM generate_series(1, 2600) g;"#;

/// The tables of [`ODD_NAMES`]: SQL name (also the `--table` value), topic after the
/// prefix (names Kafka accepts: see `pgcdc::source::topic`), key column.
const ODD_TABLES: [(&str, &str, &str); 3] = [
    (
        r#""Odd ""Schema"" ü"."Order ""Table"" ✓""#,
        "Odd__Schema___.Order__Table____b0b03abf",
        "order",
    ),
    (r#"public."group""#, "public.group", "user"),
    (r#""Mixed Case"."user""#, "Mixed_Case.user_e526abd4", "user"),
];

/// Checks that replaying `lines` gives every table of [`ODD_TABLES`] as it is now.
async fn assert_odd_tables<'a>(
    p: &Pipeline,
    lines: impl IntoIterator<Item = &'a Value> + Clone,
    what: &str,
) {
    let client = p.db.client().await;
    for (table, topic, key) in ODD_TABLES {
        let topic = format!("{}.{topic}", p.prefix);
        let got = common::lines::replay(lines.clone(), &topic, &[key]);
        let want = common::lines::table_state(&client, table, "*", "true", &[key]).await;
        common::lines::assert_same(&got, &want, &format!("{what}: {table}"));
    }
}

/// Issue 17: on PostgreSQL 18 a publication may publish stored generated columns
/// (`publish_generated_columns = stored`, or naming them in its column list); the stream then
/// carried them and the snapshot did not, so rows not changed since the snapshot lacked them.
/// Now the snapshot reads exactly the published columns (through `COPY (SELECT …)`: `COPY t
/// (generated)` is refused on every version), with the same `schema_id` as the stream; before
/// 18 generated columns are in neither. Every cluster that is set up, 14 to 18.
#[tokio::test(flavor = "multi_thread")]
async fn generated_columns_are_in_snapshot_and_stream_exactly_when_published() {
    const TABLE: &str = "CREATE TABLE public.g (id int PRIMARY KEY, a int,
            b int GENERATED ALWAYS AS (a * 2) STORED, c text);
        INSERT INTO public.g (id, a, c) SELECT n, n, 'c' || n FROM generate_series(1, 3) n;";
    let mut ran = Vec::new();
    for major in [14, 15, 16, 17, 18] {
        let env = if major == 15 {
            common::env()
        } else {
            match common::env_for_major(major) {
                Some(env) => env,
                None => continue,
            }
        };
        // (how the publication is made, the columns published)
        let mut cases = vec![(None, vec!["id", "a", "c"])];
        if major >= 18 {
            cases.push((
                Some("FOR TABLE public.g WITH (publish_generated_columns = stored)"),
                vec!["id", "a", "b", "c"],
            ));
            cases.push((Some("FOR TABLE public.g (id, b)"), vec!["id", "b"]));
        }
        for (publication, columns) in cases {
            let p = Pipeline::new_in(env.clone(), TABLE).await;
            let mut args = vec!["--stop-lsn", "now"];
            match publication {
                Some(def) => {
                    p.db.client()
                        .await
                        .batch_execute(&format!("CREATE PUBLICATION {} {def}", p.slot))
                        .await
                        .unwrap()
                }
                None => args.extend(["--table", "public.g"]),
            }
            let what = format!("PostgreSQL {major}, publication {publication:?}");
            assert_success(&p.run(&args), &format!("{what}: snapshot"));
            p.db.client()
                .await
                .batch_execute(
                    "UPDATE public.g SET a = 10 WHERE id = 1;
                     INSERT INTO public.g (id, a, c) VALUES (4, 4, 'c4');",
                )
                .await
                .unwrap();
            assert_success(&p.run(&args), &format!("{what}: stream"));
            let events = without_markers(p.events("g", Some(6)).await);
            let ops: Vec<&str> = events.iter().filter_map(|e| e.op()).collect();
            assert_eq!(ops, ["r", "r", "r", "u", "c"], "{what}");
            for e in &events {
                let v = e.value.as_ref().expect("a value");
                let after = v["after"].as_object().expect("after");
                let names: Vec<&str> = after.keys().map(String::as_str).collect();
                let mut want = columns.clone();
                want.sort_unstable();
                let mut got = names.clone();
                got.sort_unstable();
                assert_eq!(got, want, "{what}: {v}");
                if after.contains_key("b") {
                    // a = id, but 10 once row 1 was updated: b = 2 * a.
                    let a = if v["op"] == "u" {
                        10
                    } else {
                        after["id"].as_i64().unwrap()
                    };
                    assert_eq!(after["b"], json!(2 * a), "{what}: {v}");
                }
            }
            let ids: HashSet<&Value> = events
                .iter()
                .map(|e| &e.value.as_ref().unwrap()["source"]["schema_id"])
                .collect();
            assert_eq!(ids.len(), 1, "{what}: one schema_id in snapshot and stream");
        }
        ran.push(major);
    }
    eprintln!("checked on PostgreSQL {ran:?}");
}

/// Issue 17: topics were `<prefix>.<schema>.<table>` as is: `"a.b".c` and `a."b.c"` shared the
/// topic `<prefix>.a.b.c` (their events merged under colliding keys), and names with spaces or
/// non-ASCII were topics Apache Kafka refuses. Now each table has a topic of its own, a legal
/// name, and legal names are kept as they were.
#[tokio::test(flavor = "multi_thread")]
async fn every_table_gets_a_topic_of_its_own_that_kafka_accepts() {
    let p = Pipeline::new(
        r#"CREATE SCHEMA "a.b"; CREATE SCHEMA a; CREATE SCHEMA "Sales";
           CREATE TABLE "a.b".c (id int PRIMARY KEY, v text);
           CREATE TABLE a."b.c" (id int PRIMARY KEY, v text);
           CREATE TABLE "Sales"."Order Lines" (id int PRIMARY KEY, v text);
           CREATE TABLE public.plain_one (id int PRIMARY KEY, v text);
           INSERT INTO "a.b".c SELECT g, 'ab.c' FROM generate_series(1, 3) g;
           INSERT INTO a."b.c" SELECT g, 'a.bc' FROM generate_series(1, 5) g;
           INSERT INTO "Sales"."Order Lines" SELECT g, 'ol' FROM generate_series(1, 2) g;
           INSERT INTO public.plain_one VALUES (1, 'p');"#,
    )
    .await;
    let tables = [
        (r#""a.b".c"#, "a_b.c_8b745bb4", 3, "ab.c"),
        (r#"a."b.c""#, "a.b_c_ad8a94ab", 5, "a.bc"),
        (
            r#""Sales"."Order Lines""#,
            "Sales.Order_Lines_c2765b86",
            2,
            "ol",
        ),
        ("public.plain_one", "public.plain_one", 1, "p"),
    ];
    let mut args = vec!["--stop-lsn", "now"];
    for (t, ..) in &tables {
        args.extend(["--table", t]);
    }
    let out = p.run(&args);
    assert_success(&out, "snapshot");
    p.db.client()
        .await
        .batch_execute(
            r#"INSERT INTO "a.b".c VALUES (10, 'ab.c'); INSERT INTO a."b.c" VALUES (10, 'a.bc');"#,
        )
        .await
        .unwrap();
    assert_success(&p.run(&args), "stream");
    for (table, topic, rows, v) in tables {
        let topic = format!("{}.{topic}", p.prefix);
        let streamed = usize::from(v.contains('.'));
        // The reads, the marker, and one insert for the dotted tables.
        let events = p.events_in(&topic, Some(rows + 1 + streamed)).await;
        let data = without_markers(events);
        assert_eq!(data.len(), rows + streamed, "{table} in {topic}: {data:?}");
        for e in &data {
            let value = e.value.as_ref().expect("a value");
            assert_eq!(value["after"]["v"], v, "{table} in {topic}: {e:?}");
        }
    }
    let published = common::topics::published(&common::pipeline::kafka(), &p.prefix).await;
    for topic in published.keys() {
        assert!(
            topic.len() <= 249
                && topic
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
            "Kafka would refuse the topic {topic:?}"
        );
    }
}

/// Issue 17: two tables whose topics Kafka would take for one (`.` and `_` are the same to
/// it) are refused at start, naming both tables and the fix; nothing is published.
#[tokio::test(flavor = "multi_thread")]
async fn tables_that_would_share_a_topic_are_refused_at_start() {
    let p = Pipeline::new(
        "CREATE SCHEMA a_b; CREATE SCHEMA a;
         CREATE TABLE a_b.c (id int PRIMARY KEY);
         CREATE TABLE a.b_c (id int PRIMARY KEY);
         INSERT INTO a_b.c VALUES (1); INSERT INTO a.b_c VALUES (1);",
    )
    .await;
    let out = p.run(&["--table", "a_b.c", "--table", "a.b_c", "--stop-lsn", "now"]);
    assert_fails(
        &out,
        2,
        &[
            r#""a_b"."c""#,
            r#""a"."b_c""#,
            "'.' versus '_'",
            "Fix: rename one",
        ],
    );
    common::assert_nothing_published(&common::pipeline::kafka(), &p.prefix).await;
}

/// Issue 17: a table that joins the publication while pgcdc streams, and whose topic would be
/// another captured table's, stops pgcdc with the message (exit 3) rather than merging the two
/// tables' events: `s."x y"` publishes to `<prefix>.s.x_y_<hash>`, and a table named exactly
/// that joins.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_joining_onto_another_tables_topic_stops_pgcdc() {
    // The table part of `s."x y"`'s topic: `x_y_` and the hash of its exact names.
    let joining = "x_y_2896a1b4";
    let p = Pipeline::new(r#"CREATE SCHEMA s; CREATE TABLE s."x y" (id int PRIMARY KEY);"#).await;
    let client = p.db.client().await;
    client
        .batch_execute(&format!(
            r#"CREATE PUBLICATION {} FOR TABLE s."x y" WITH (publish_via_partition_root = true);
               CREATE TABLE s.{joining} (id int PRIMARY KEY);"#,
            p.slot
        ))
        .await
        .unwrap();
    let mut child = p.spawn(&[], "run.log");
    p.wait_for_log("run.log", "streaming changes").await;
    client
        .batch_execute(&format!(
            r#"INSERT INTO s."x y" VALUES (1);
               ALTER PUBLICATION {} ADD TABLE s.{joining};
               INSERT INTO s.{joining} VALUES (2);"#,
            p.slot
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = p.log("run.log");
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{log}");
    assert!(
        log.contains(&format!(r#""s"."{joining}""#)) && log.contains(r#""s"."x y""#),
        "{log}"
    );
    // Nothing of the joining table reached the other's topic.
    let topic = format!("{}.s.{joining}", p.prefix);
    let events = p.events_in(&topic, None).await;
    assert!(
        events
            .iter()
            .all(|e| e.key.as_ref().is_none_or(|k| k["id"] != 2)),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn names_that_sql_must_quote_are_read_and_streamed() {
    use common::lines::run;
    let p = Pipeline::new(ODD_NAMES).await;
    let mut tables = Vec::new();
    for (table, _, _) in ODD_TABLES {
        tables.extend(["--table", table]);
    }
    let with = |extra: &[&'static str]| {
        let mut a = tables.clone();
        a.extend_from_slice(extra);
        a
    };

    let first = run(&p, &with(&["--stop-lsn", "now"]), "snapshot (binary COPY)");
    assert!(
        first.log.matches("copy=\"binary\"").count() == 3,
        "every table is read with binary COPY:\n{}",
        first.log
    );
    assert_odd_tables(&p, &first.lines, "snapshot").await;

    p.db.client()
        .await
        .batch_execute(
            r#"INSERT INTO "Odd ""Schema"" ü"."Order ""Table"" ✓" VALUES (100, 'new', 'x', 1, 'q', true);
               UPDATE "Odd ""Schema"" ü"."Order ""Table"" ✓" SET "group" = 'changed', "user" = 'changed' WHERE "order" = 1;
               UPDATE "Odd ""Schema"" ü"."Order ""Table"" ✓" SET "order" = 200 WHERE "order" = 2;
               DELETE FROM "Odd ""Schema"" ü"."Order ""Table"" ✓" WHERE "order" = 3;
               INSERT INTO public."group" VALUES (5000, 'new', 5);
               UPDATE public."group" SET "order" = 'changed' WHERE "user" = 1;
               UPDATE public."group" SET "user" = 1001 WHERE "user" = 8;
               DELETE FROM public."group" WHERE "user" = 15;
               UPDATE "Mixed Case"."user" SET "select" = 'changed' WHERE "user" % 100 = 0;
               DELETE FROM "Mixed Case"."user" WHERE "user" = 5;
               INSERT INTO "Mixed Case"."user" VALUES (40000, 'new', 1);"#,
        )
        .await
        .unwrap();
    let second = run(&p, &with(&["--stop-lsn", "now"]), "stream");
    assert!(second.lines.len() >= 40, "{} events", second.lines.len());
    let both: Vec<&Value> = first.lines.iter().chain(&second.lines).collect();
    assert_odd_tables(&p, both.iter().copied(), "snapshot and stream").await;
    for (_, topic, _) in ODD_TABLES {
        let topic = format!("{}.{topic}", p.prefix);
        let ids: HashSet<&Value> = both
            .iter()
            .filter(|l| l["topic"] == topic.as_str() && !l["value"].is_null())
            .map(|l| &l["value"]["source"]["schema_id"])
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "{topic}: one schema_id in snapshot and stream"
        );
    }

    let text = run(
        &p,
        &with(&["--snapshot-only", "--snapshot-copy", "text"]),
        "snapshot (text COPY)",
    );
    assert_eq!(text.log.matches("copy=\"text\"").count(), 3, "{}", text.log);
    assert_odd_tables(&p, &text.lines, "text COPY").await;

    for copy in ["auto", "text"] {
        let parallel = run(
            &p,
            &with(&[
                "--snapshot-only",
                "--snapshot-workers",
                "2",
                "--snapshot-copy",
                copy,
            ]),
            "parallel snapshot",
        );
        let units: usize = parallel
            .log
            .split("units=")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no unit count in the log:\n{}", parallel.log));
        assert!(
            units > 3,
            "no table was cut into page ranges:\n{}",
            parallel.log
        );
        assert_odd_tables(
            &p,
            &parallel.lines,
            &format!("page ranges, --snapshot-copy {copy}"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_key_stored_out_of_line_stays_the_key_of_every_event() {
    // 2,496 bytes of md5 text: incompressible, so PostgreSQL stores the key out of line and
    // an update that does not touch it sends it as "unchanged TOAST", plus an old key tuple.
    let key = |r: &str| {
        format!(
            "(SELECT {r} || string_agg(md5({r} || '-' || i), '') FROM generate_series(1, 78) i)"
        )
    };
    let p = Pipeline::new(&format!(
        "CREATE TABLE public.tk (k text PRIMARY KEY, v int);
         CREATE TABLE public.tk_full (k text PRIMARY KEY, v int);
         ALTER TABLE public.tk_full REPLICA IDENTITY FULL;
         INSERT INTO public.tk SELECT {}, r FROM generate_series(1, 3) r;
         INSERT INTO public.tk_full SELECT {}, r FROM generate_series(1, 3) r;",
        key("r::text"),
        key("r::text"),
    ))
    .await;
    let client = p.db.client().await;
    let stored: bool = client
        .query_one(
            "SELECT (SELECT bool_and(pg_column_size(k) >= octet_length(k)) FROM tk) \
                AND pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE relname = 'tk'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored, "the keys are stored out of line, uncompressed");
    let args = [
        "--table",
        "public.tk",
        "--table",
        "public.tk_full",
        "--stop-lsn",
        "now",
    ];
    let first = common::lines::run(&p, &args, "snapshot");
    client
        .batch_execute(
            "UPDATE tk SET v = v + 10; UPDATE tk_full SET v = v + 10;
             DELETE FROM tk WHERE v = 12; DELETE FROM tk_full WHERE v = 12;",
        )
        .await
        .unwrap();
    let second = common::lines::run(&p, &args, "stream");
    for table in ["tk", "tk_full"] {
        let topic = p.topic(table);
        let events = second.of(&topic);
        let ops: Vec<&str> = events
            .iter()
            .map(|l| l["value"]["op"].as_str().unwrap_or("tombstone"))
            .collect();
        assert_eq!(ops, ["u", "u", "u", "d", "tombstone"], "{table}");
        for l in &events[..3] {
            let after = &l["value"]["after"];
            assert_eq!(after.as_object().unwrap().len(), 2, "{table}: {after}");
            assert!(
                after["k"].as_str().unwrap().len() > 2400,
                "{table}: {after}"
            );
            assert_eq!(l["key"], json!({"k": after["k"]}), "{table}");
            assert!(l["value"].get("unchanged").is_none(), "{table}: {l}");
        }
        let both: Vec<&Value> = first.lines.iter().chain(&second.lines).collect();
        let got = common::lines::replay(both.iter().copied(), &topic, &["k"]);
        let want = common::lines::table_state(&client, table, "*", "true", &["k"]).await;
        common::lines::assert_same(&got, &want, table);
    }
}

/// Three tables each published with a column list and a row filter (PostgreSQL 15+): an
/// ordinary one keyed by a replica identity index that holds the filtered column, a
/// partitioned one, and one big enough for page ranges (a row per page, 2,600 pages).
const PUBLISHED_PARTS: &str = "
    CREATE TABLE public.users (id int PRIMARY KEY, name text, active bool NOT NULL, password_hash text);
    CREATE UNIQUE INDEX users_ident ON public.users (id, active);
    ALTER TABLE public.users REPLICA IDENTITY USING INDEX users_ident;
    INSERT INTO public.users SELECT g, 'u' || g, g % 3 <> 0, md5(g::text) FROM generate_series(1, 60) g;
    CREATE TABLE public.m (id int PRIMARY KEY, v text, secret text) PARTITION BY RANGE (id);
    CREATE TABLE public.m_low PARTITION OF public.m FOR VALUES FROM (MINVALUE) TO (1000);
    CREATE TABLE public.m_high PARTITION OF public.m FOR VALUES FROM (1000) TO (MAXVALUE);
    INSERT INTO public.m SELECT g, 'v' || g, 's' || g FROM generate_series(1, 2000, 3) g;
    CREATE TABLE public.big (id int PRIMARY KEY, v text, secret text) WITH (fillfactor = 10);
    INSERT INTO public.big SELECT g, repeat('b', 500), 's' || g FROM generate_series(1, 2600) g;";

/// Per table of [`PUBLISHED_PARTS`]: its published columns, its row filter, its key.
const PUBLISHED: [(&str, &str, &str, &[&str]); 3] = [
    ("users", "id, name, active", "active", &["id", "active"]),
    ("m", "id, v", "id % 2 = 0", &["id"]),
    ("big", "id, v", "id % 5 <> 0", &["id"]),
];

/// Checks that replaying `lines` gives exactly the published part of each table, with
/// `columns` instead of the published columns when given.
async fn assert_published(p: &Pipeline, lines: &[&Value], what: &str, columns: &[(&str, &str)]) {
    let client = p.db.client().await;
    for (table, published, filter, key) in PUBLISHED {
        let cols = columns
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(published, |(_, c)| *c);
        let got = common::lines::replay(lines.iter().copied(), &p.topic(table), key);
        let want = common::lines::table_state(&client, table, cols, filter, key).await;
        common::lines::assert_same(&got, &want, &format!("{what}: {table}"));
    }
    for l in lines {
        let text = l.to_string();
        assert!(
            !text.contains("\"password_hash\"") && !text.contains("\"secret\""),
            "{what}: an unpublished column: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_snapshot_reads_what_the_publication_publishes() {
    let p = Pipeline::new(PUBLISHED_PARTS).await;
    let client = p.db.client().await;
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE users (id, name, active) WHERE (active),
               m (id, v) WHERE (id % 2 = 0), big (id, v) WHERE (id % 5 <> 0)
             WITH (publish_via_partition_root = true)",
            p.slot
        ))
        .await
        .unwrap();
    let run = |extra: &[&str], what: &str| common::lines::run(&p, extra, what);

    let first = run(&["--stop-lsn", "now"], "snapshot");
    assert_eq!(
        first.log.matches("copy=\"binary\"").count(),
        3,
        "{}",
        first.log
    );
    let lines: Vec<&Value> = first.lines.iter().collect();
    assert_published(&p, &lines, "snapshot", &[]).await;

    client
        .batch_execute(
            "INSERT INTO users VALUES (100, 'new', true, 'h'), (101, 'hidden', false, 'h');
             UPDATE users SET active = false WHERE id = 1;
             UPDATE users SET active = true WHERE id = 3;
             UPDATE users SET name = 'renamed' WHERE id IN (2, 6);
             UPDATE users SET password_hash = 'other' WHERE id = 5;
             DELETE FROM users WHERE id IN (4, 9);
             UPDATE m SET id = 5 WHERE id = 4;
             UPDATE m SET id = 8 WHERE id = 7;
             INSERT INTO m VALUES (3001, 'odd', 's'), (3002, 'even', 's');
             UPDATE m SET v = 'changed' WHERE id IN (10, 13);
             DELETE FROM m WHERE id IN (16, 19);
             UPDATE big SET v = 'changed' WHERE id % 100 IN (0, 1);
             DELETE FROM big WHERE id IN (2, 10);
             UPDATE big SET id = 5000 WHERE id = 3;
             UPDATE big SET id = 5001 WHERE id = 5;",
        )
        .await
        .unwrap();
    let second = run(&["--stop-lsn", "now"], "stream");
    let lines: Vec<&Value> = first.lines.iter().chain(&second.lines).collect();
    assert_published(&p, &lines, "snapshot and stream", &[]).await;
    // Rows that leave or enter the filter are deleted or created (pgoutput's own rewriting).
    let users: Vec<(String, String)> = second
        .of(&p.topic("users"))
        .iter()
        .filter(|l| !l["value"].is_null())
        .map(|l| {
            (
                l["value"]["op"].as_str().unwrap().to_string(),
                l["key"].to_string(),
            )
        })
        .collect();
    let op = |o: &str, id: i32, active: bool| {
        (
            o.to_string(),
            json!({"id": id, "active": active}).to_string(),
        )
    };
    assert_eq!(
        users,
        [
            op("c", 100, true),
            op("d", 1, true),
            op("c", 3, true),
            op("u", 2, true),
            op("u", 5, true),
            op("d", 4, true),
        ]
    );
    for (table, _, _, _) in PUBLISHED {
        let ids: HashSet<&Value> = lines
            .iter()
            .filter(|l| l["topic"] == p.topic(table).as_str() && !l["value"].is_null())
            .map(|l| &l["value"]["source"]["schema_id"])
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "{table}: one schema_id in snapshot and stream"
        );
    }

    let text = run(&["--snapshot-only", "--snapshot-copy", "text"], "text COPY");
    assert_published(&p, &text.lines.iter().collect::<Vec<_>>(), "text COPY", &[]).await;
    for copy in ["auto", "text"] {
        let parallel = run(
            &[
                "--snapshot-only",
                "--snapshot-workers",
                "2",
                "--snapshot-copy",
                copy,
            ],
            "page ranges",
        );
        assert!(
            parallel.log.contains("units=4") || parallel.log.contains("units=5"),
            "big was not cut into page ranges:\n{}",
            parallel.log
        );
        let what = format!("page ranges, --snapshot-copy {copy}");
        assert_published(&p, &parallel.lines.iter().collect::<Vec<_>>(), &what, &[]).await;
    }

    // --exclude-column narrows the column list further; excluding a column the list leaves
    // out already is no error.
    let narrower = run(
        &[
            "--snapshot-only",
            "--exclude-column",
            "public.users.name",
            "--exclude-column",
            "public.big.secret",
        ],
        "excluded columns",
    );
    assert_published(
        &p,
        &narrower.lines.iter().collect::<Vec<_>>(),
        "excluded columns",
        &[("users", "id, active")],
    )
    .await;

    // A column list without the key: refused at start, naming the fix.
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {} SET TABLE users (name, active) WHERE (active), m, big",
            p.slot
        ))
        .await
        .unwrap();
    assert_fails(
        &p.run(&["--sink", "stdout", "--stop-lsn", "now"]),
        3,
        &["\"public\".\"users\"", "\"id\"", "ALTER PUBLICATION"],
    );
}

/// (id, op, annotations) of each row event of `table` (no markers, no tombstones).
async fn annotated(
    p: &Pipeline,
    table: &str,
    expected: usize,
    flat: bool,
) -> Vec<(i64, String, Option<Value>)> {
    p.events(table, Some(expected))
        .await
        .into_iter()
        .filter_map(|e| {
            // The annotations are a header too, the same object.
            let header = e
                .header("pgcdc-annotations")
                .map(|h| serde_json::from_str::<Value>(h).expect("annotations header is JSON"));
            assert!(e.header("pgcdc-event-id").is_some(), "no event id: {e:?}");
            let v = e.value?;
            let (op, annotations, id) = if flat {
                (&v["__op"], v.get("__annotations"), &v["id"])
            } else {
                let row = if v["after"].is_null() {
                    &v["before"]
                } else {
                    &v["after"]
                };
                (&v["op"], v["source"].get("annotations"), &row["id"])
            };
            assert_eq!(header.as_ref(), annotations, "header and {v}");
            let op = op.as_str().expect("op").to_string();
            (op != "s").then(|| (id.as_i64().expect("id"), op, annotations.cloned()))
        })
        .collect()
}

/// Annotations: a transaction's `pgcdc` messages annotate its events from the message on,
/// merged, in both formats; other prefixes are messages, and snapshot rows carry none.
async fn annotations_case(format: &str) {
    let flat = format == "flat";
    let p = Pipeline::new(
        "CREATE TABLE public.a (id int PRIMARY KEY, v text);
         CREATE TABLE public.b (id int PRIMARY KEY, v text);
         INSERT INTO a VALUES (0, 'snapshot');",
    )
    .await;
    let args = [
        "--table",
        "public.a",
        "--table",
        "public.b",
        "--format",
        format,
        "--event-headers",
        "true",
        "--stop-lsn",
        "now",
    ];
    assert_success(&p.run(&args), "snapshot");
    let client = p.db.client().await;
    let emit =
        |content: &str| format!("SELECT pg_logical_emit_message(true, 'pgcdc', '{content}');");
    // One statement per call: statements sent together share one implicit transaction.
    for sql in [
        // First: every event of both tables.
        format!(
            "BEGIN; {} INSERT INTO a VALUES (1, 'x'); INSERT INTO b VALUES (1, 'x');
             UPDATE a SET v = 'y' WHERE id = 1; COMMIT;",
            emit(r#"{"request_id": "first"}"#)
        ),
        // In the middle: the events after it.
        format!(
            "BEGIN; INSERT INTO a VALUES (2, 'x'); {} INSERT INTO b VALUES (2, 'x');
             DELETE FROM a WHERE id = 2; COMMIT;",
            emit(r#"{"request_id": "middle"}"#)
        ),
        // Two: merged, the later value wins.
        format!(
            "BEGIN; {} INSERT INTO a VALUES (3, 'x'); {} INSERT INTO b VALUES (3, 'x'); COMMIT;",
            emit(r#"{"request_id": "r3", "user": "u"}"#),
            emit(r#"{"request_id": "r3b"}"#)
        ),
        // Another prefix, a non-transactional one and one that is not an object: ignored as
        // annotations (the first is a message), never a failure.
        "BEGIN; SELECT pg_logical_emit_message(true, 'other', '{\"request_id\": \"o\"}');
         SELECT pg_logical_emit_message(false, 'pgcdc', '{\"request_id\": \"nt\"}');
         SELECT pg_logical_emit_message(true, 'pgcdc', '[1, 2]');
         INSERT INTO a VALUES (4, 'x'); COMMIT;"
            .to_string(),
        // No message at all.
        "INSERT INTO b VALUES (4, 'x')".to_string(),
    ] {
        client.batch_execute(&sql).await.unwrap();
    }
    let out = p.run(&args);
    assert_success(&out, "stream");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("annotation message ignored"), "{log}");

    let first = Some(json!({"request_id": "first"}));
    let middle = Some(json!({"request_id": "middle"}));
    let merged = Some(json!({"request_id": "r3b", "user": "u"}));
    let r3 = Some(json!({"request_id": "r3", "user": "u"}));
    let s = |x: &str| x.to_string();
    // a: read, marker | c u | c d (+ tombstone) | c | c
    let a = annotated(&p, "a", 9, flat).await;
    assert_eq!(
        a,
        [
            (0, s("r"), None),
            (1, s("c"), first.clone()),
            (1, s("u"), first.clone()),
            (2, s("c"), None),
            (2, s("d"), middle.clone()),
            (3, s("c"), r3),
            (4, s("c"), None),
        ]
    );
    // b: marker | c | c | c | c
    let b = annotated(&p, "b", 5, flat).await;
    assert_eq!(
        b,
        [
            (1, s("c"), first),
            (2, s("c"), middle),
            (3, s("c"), merged),
            (4, s("c"), None),
        ]
    );
    // Only the other prefix is published as a message.
    let messages = p.events_in(&format!("{}.message", p.prefix), Some(1)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].value.as_ref().unwrap()["message"]["prefix"],
        "other"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn annotations_envelope() {
    annotations_case("envelope").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn annotations_flat() {
    annotations_case("flat").await;
}
