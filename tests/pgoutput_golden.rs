//! The pgoutput decoder on bytes captured from a real PostgreSQL 15 server
//! (`tests/fixtures/pgoutput/`, written by `scripts/capture-pgoutput.sh`).
//!
//! Assertions find messages by content, not by position or OID, so they survive a
//! recapture; see the fixtures' README for the workload they come from.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;
use common::api::pgoutput::{
    decode, pg_timestamp_to_unix_millis, ColumnValue, DecodeError, Decoder, LogicalMessage,
    OldTuple, Relation, ReplicaIdentity, TupleData,
};
use common::api::Lsn;
use proptest::prelude::*;

const TEXT: &str = include_str!("fixtures/pgoutput/text.txt");
const BINARY: &str = include_str!("fixtures/pgoutput/binary.txt");
const STREAMING: &str = include_str!("fixtures/pgoutput/streaming.txt");

/// 2024-01-02 03:04:05 UTC, the origin commit time set by the capture workload.
const ORIGIN_TIME_UNIX_MILLIS: i64 = 1_704_164_645_000;
/// 2024-01-01 UTC: every real commit in the fixtures is later.
const Y2024_UNIX_MILLIS: i64 = 1_704_067_200_000;

/// One captured message and what it decodes to.
struct Captured {
    line: usize,
    lsn: Lsn,
    data: Bytes,
    in_stream: bool,
    msg: LogicalMessage,
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// Parses `<lsn> <hex>` lines and decodes them in order with one [`Decoder`], as a
/// replication connection would.
fn load(name: &str, text: &str) -> Vec<Captured> {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (lsn, data) = line.split_once(' ').expect("`<lsn> <hex>`");
        let lsn: Lsn = lsn.parse().expect("lsn");
        let data = Bytes::from(hex(data.trim()));
        let in_stream = decoder.in_stream();
        let msg = decoder
            .decode(data.clone())
            .unwrap_or_else(|e| panic!("{name}:{line_no} ({lsn}) does not decode: {e}"));
        out.push(Captured {
            line: line_no,
            lsn,
            data,
            in_stream,
            msg,
        });
    }
    assert!(!out.is_empty(), "{name} has no messages");
    out
}

fn text_set() -> &'static [Captured] {
    static SET: OnceLock<Vec<Captured>> = OnceLock::new();
    SET.get_or_init(|| load("text.txt", TEXT))
}

fn binary_set() -> &'static [Captured] {
    static SET: OnceLock<Vec<Captured>> = OnceLock::new();
    SET.get_or_init(|| load("binary.txt", BINARY))
}

fn streaming_set() -> &'static [Captured] {
    static SET: OnceLock<Vec<Captured>> = OnceLock::new();
    SET.get_or_init(|| load("streaming.txt", STREAMING))
}

fn all_sets() -> [(&'static str, &'static [Captured]); 3] {
    [
        ("text.txt", text_set()),
        ("binary.txt", binary_set()),
        ("streaming.txt", streaming_set()),
    ]
}

fn t(s: &str) -> ColumnValue {
    ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn b(v: &[u8]) -> ColumnValue {
    ColumnValue::Binary(Bytes::copy_from_slice(v))
}

const N: ColumnValue = ColumnValue::Null;

/// The Relation messages of a set, by table name, in arrival order.
fn relations(set: &[Captured]) -> HashMap<String, Vec<Relation>> {
    let mut map: HashMap<String, Vec<Relation>> = HashMap::new();
    for c in set {
        if let LogicalMessage::Relation(r) = &c.msg {
            map.entry(r.name.clone()).or_default().push(r.clone());
        }
    }
    map
}

fn oid_of(set: &[Captured], table: &str) -> u32 {
    relations(set)[table][0].oid
}

fn inserts(set: &[Captured], relation_oid: u32) -> Vec<&TupleData> {
    set.iter()
        .filter_map(|c| match &c.msg {
            LogicalMessage::Insert(i) if i.relation_oid == relation_oid => Some(&i.new),
            _ => None,
        })
        .collect()
}

fn updates(set: &[Captured], relation_oid: u32) -> Vec<(Option<&OldTuple>, &TupleData)> {
    set.iter()
        .filter_map(|c| match &c.msg {
            LogicalMessage::Update(u) if u.relation_oid == relation_oid => {
                Some((u.old.as_ref(), &u.new))
            }
            _ => None,
        })
        .collect()
}

fn deletes(set: &[Captured], relation_oid: u32) -> Vec<&OldTuple> {
    set.iter()
        .filter_map(|c| match &c.msg {
            LogicalMessage::Delete(d) if d.relation_oid == relation_oid => Some(&d.old),
            _ => None,
        })
        .collect()
}

fn tag_sequence(set: &[Captured]) -> Vec<u8> {
    set.iter().map(|c| c.data[0]).collect()
}

#[test]
fn every_captured_message_decodes_statelessly_too() {
    for (name, set) in all_sets() {
        for c in set {
            assert_eq!(
                decode(c.data.clone(), c.in_stream).as_ref(),
                Ok(&c.msg),
                "{name}:{}",
                c.line
            );
        }
    }
}

#[test]
fn transactions_are_framed_consistently() {
    for (name, set) in all_sets() {
        let mut open: Option<Lsn> = None;
        for c in set {
            match &c.msg {
                LogicalMessage::Begin(b) => {
                    assert_eq!(open, None, "{name}:{} nested Begin", c.line);
                    assert_ne!(b.xid, 0);
                    open = Some(b.final_lsn);
                }
                LogicalMessage::Commit(commit) => {
                    // Begin announces the commit LSN that Commit then confirms.
                    assert_eq!(open.take(), Some(commit.commit_lsn), "{name}:{}", c.line);
                    assert!(commit.end_lsn > commit.commit_lsn);
                    // The peek's lsn column for a commit is where the next read resumes.
                    assert_eq!(commit.end_lsn, c.lsn, "{name}:{}", c.line);
                    assert_eq!(commit.flags, 0);
                }
                LogicalMessage::Message(m) => {
                    assert_eq!(m.transactional, (open.is_some() || c.in_stream));
                    assert_eq!(m.lsn, c.lsn);
                }
                _ => {}
            }
        }
        assert_eq!(open, None, "{name} ends inside a transaction");
    }
}

#[test]
fn begin_carries_xid_lsn_and_commit_time() {
    let set = text_set();
    let LogicalMessage::Begin(begin) = &set[0].msg else {
        panic!("the first message is not Begin: {:?}", set[0].msg);
    };
    let commit = set
        .iter()
        .find_map(|c| match &c.msg {
            LogicalMessage::Commit(commit) => Some(commit),
            _ => None,
        })
        .expect("a Commit");
    assert!(begin.xid > 2, "normal xids start at 3");
    assert!(begin.final_lsn.is_valid());
    assert_eq!(begin.final_lsn, commit.commit_lsn);
    assert_eq!(begin.commit_timestamp, commit.commit_timestamp);
    assert!(begin.commit_time_unix_millis() > Y2024_UNIX_MILLIS);
    assert_eq!(
        commit.commit_time_unix_millis(),
        pg_timestamp_to_unix_millis(commit.commit_timestamp)
    );
}

#[test]
fn relations_types_and_replica_identities() {
    let set = text_set();
    let rels = relations(set);
    let mood = set
        .iter()
        .find_map(|c| match &c.msg {
            LogicalMessage::Type(t) => Some(t),
            _ => None,
        })
        .expect("a Type message for the enum");
    assert_eq!(
        (mood.xid, &*mood.namespace, &*mood.name),
        (None, "public", "mood")
    );

    let shape = |r: &Relation| -> Vec<(String, bool, u32, i32)> {
        r.columns
            .iter()
            .map(|c| (c.name.clone(), c.is_key, c.type_oid, c.type_modifier))
            .collect()
    };
    let col = |n: &str, key, oid, typmod| (n.to_string(), key, oid, typmod);
    let accounts = &rels["accounts"];
    assert_eq!(accounts.len(), 2, "ALTER TABLE sends the relation again");
    assert_eq!(accounts[0].namespace, "public");
    assert_eq!(accounts[0].xid, None);
    assert_eq!(accounts[0].replica_identity, ReplicaIdentity::Default);
    let mut expected = vec![
        col("id", true, 23, -1),
        col("name", false, 25, -1),
        // numeric(12,2): (precision << 16 | scale) + VARHDRSZ
        col("balance", false, 1700, (12 << 16 | 2) + 4),
        col("note", false, 25, -1),
        col("feeling", false, mood.oid, -1),
    ];
    assert_eq!(shape(&accounts[0]), expected);
    expected.push(col("extra", false, 23, -1));
    assert_eq!(shape(&accounts[1]), expected);
    assert_eq!(accounts[1].oid, accounts[0].oid);

    let audit = &rels["audit"][0];
    assert_eq!(audit.replica_identity, ReplicaIdentity::Full);
    assert_eq!(
        shape(audit),
        [
            col("id", true, 20, -1),
            col("event", true, 25, -1),
            col("at", true, 1184, -1)
        ],
        "with REPLICA IDENTITY FULL every column is a key column"
    );
    let docs = &rels["docs"][0];
    assert_eq!(docs.replica_identity, ReplicaIdentity::Default);
    assert_eq!(
        shape(docs),
        [
            col("id", true, 23, -1),
            col("title", false, 25, -1),
            col("body", false, 25, -1)
        ]
    );
    let tags = &rels["tags"][0];
    assert_eq!(tags.replica_identity, ReplicaIdentity::Index);
    assert_eq!(
        shape(tags),
        [col("id", false, 23, -1), col("code", true, 25, -1)]
    );
}

#[test]
fn inserts_with_null_and_non_ascii_text() {
    let set = text_set();
    let accounts = oid_of(set, "accounts");
    let rows = inserts(set, accounts);
    assert_eq!(rows[0].0, [t("1"), t("alice"), t("10.50"), N, t("happy")]);
    assert_eq!(
        rows[1].0,
        [t("2"), t("bob"), t("-3.25"), t("héllo ✓"), t("ok")]
    );
    let ColumnValue::Text(note) = &rows[1].0[3] else {
        panic!("note is not text");
    };
    assert_eq!(std::str::from_utf8(note), Ok("héllo ✓"));
    assert_eq!(note.len(), "héllo ✓".len(), "sent as UTF-8, 10 bytes");
    // After ADD COLUMN the row has the new column.
    assert_eq!(
        rows.last().unwrap().0,
        [
            t("5"),
            t("eve"),
            t("1.50"),
            t("after alter"),
            t("ok"),
            t("42")
        ]
    );
    let docs = inserts(set, oid_of(set, "docs"));
    assert_eq!(docs[0].0[2], t(&"0123456789".repeat(250)));
}

#[test]
fn updates_with_old_tuples_and_unchanged_toast() {
    let set = text_set();
    let accounts = updates(set, oid_of(set, "accounts"));
    // Non-key change: no old tuple.
    assert_eq!(accounts[0].0, None);
    assert_eq!(accounts[0].1 .0[..3], [t("1"), t("alice"), t("20.00")]);
    // Primary key change: the old key, other columns sent as 'n'.
    assert_eq!(
        accounts[1].0,
        Some(&OldTuple::Key(TupleData(vec![t("2"), N, N, N, N])))
    );
    assert_eq!(accounts[1].1 .0[..2], [t("20"), t("bob")]);

    let audit = updates(set, oid_of(set, "audit"));
    let at = t("2024-01-02 03:04:05.123456+00");
    assert_eq!(
        audit[0].0,
        Some(&OldTuple::Full(TupleData(vec![
            t("1"),
            t("created"),
            at.clone()
        ])))
    );
    assert_eq!(audit[0].1 .0, [t("1"), t("changed"), at]);

    // The TOASTed body was not touched: not sent.
    let docs = updates(set, oid_of(set, "docs"));
    assert_eq!(
        docs,
        [(
            None,
            &TupleData(vec![t("1"), t("second title"), ColumnValue::UnchangedToast])
        )]
    );

    // Replica identity index: the old key holds only the index column.
    let tags = updates(set, oid_of(set, "tags"));
    assert_eq!(
        tags,
        [(
            Some(&OldTuple::Key(TupleData(vec![N, t("B")]))),
            &TupleData(vec![t("2"), t("C")])
        )]
    );
}

#[test]
fn deletes_with_key_and_full_old_tuples() {
    let set = text_set();
    assert_eq!(
        deletes(set, oid_of(set, "accounts")),
        [&OldTuple::Key(TupleData(vec![t("3"), N, N, N, N]))]
    );
    assert_eq!(
        deletes(set, oid_of(set, "audit")),
        [&OldTuple::Full(TupleData(vec![
            t("2"),
            t("to be deleted"),
            t("2024-01-02 03:04:05+00")
        ]))]
    );
    assert_eq!(
        deletes(set, oid_of(set, "tags")),
        [&OldTuple::Key(TupleData(vec![N, t("A")]))]
    );
}

#[test]
fn truncate_of_two_tables_with_both_options() {
    let set = text_set();
    let truncates: Vec<_> = set
        .iter()
        .filter_map(|c| match &c.msg {
            LogicalMessage::Truncate(tr) => Some(tr),
            _ => None,
        })
        .collect();
    assert_eq!(truncates.len(), 1);
    let tr = truncates[0];
    assert_eq!(tr.xid, None);
    assert!(tr.cascade && tr.restart_identity);
    assert_eq!(
        tr.relation_oids,
        [oid_of(set, "docs"), oid_of(set, "audit")]
    );
}

#[test]
fn logical_messages_transactional_and_not() {
    let set = text_set();
    let msgs: Vec<_> = set
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match &c.msg {
            LogicalMessage::Message(m) => Some((i, m)),
            _ => None,
        })
        .collect();
    assert_eq!(msgs.len(), 2);
    let (i, m) = msgs[0];
    assert!(m.transactional);
    assert_eq!(
        (m.xid, &*m.prefix, &m.content[..]),
        (None, "p", &b"hello"[..])
    );
    assert!(matches!(set[i - 1].msg, LogicalMessage::Begin(_)));
    let (i, m) = msgs[1];
    assert!(!m.transactional);
    assert_eq!((&*m.prefix, &m.content[..]), ("p2", &b"x"[..]));
    // Sent on its own, outside any transaction.
    assert!(matches!(set[i - 1].msg, LogicalMessage::Commit(_)));
    assert!(matches!(set[i + 1].msg, LogicalMessage::Begin(_)));
}

#[test]
fn origin_follows_begin() {
    let set = text_set();
    let i = set
        .iter()
        .position(|c| matches!(c.msg, LogicalMessage::Origin(_)))
        .expect("an Origin message");
    let LogicalMessage::Origin(origin) = &set[i].msg else {
        unreachable!()
    };
    assert_eq!(origin.name, "cap_origin");
    assert_eq!(origin.commit_lsn, "1/23456789".parse().unwrap());
    let LogicalMessage::Begin(begin) = &set[i - 1].msg else {
        panic!("Origin does not follow Begin");
    };
    // The transaction reports the origin's commit time, not the local one.
    assert_eq!(begin.commit_time_unix_millis(), ORIGIN_TIME_UNIX_MILLIS);
}

#[test]
fn binary_tuples() {
    let set = binary_set();
    assert_eq!(tag_sequence(set), tag_sequence(text_set()));
    let accounts = inserts(set, oid_of(set, "accounts"));
    // numeric 10.50: ndigits 2, weight 0, sign +, dscale 2, base-10000 digits 10 and 5000.
    let numeric = [0, 2, 0, 0, 0, 0, 0, 2, 0, 10, 0x13, 0x88];
    assert_eq!(
        accounts[0].0,
        [b(&[0, 0, 0, 1]), b(b"alice"), b(&numeric), N, b(b"happy")]
    );
    assert_eq!(accounts[1].0[3], b("héllo ✓".as_bytes()));
    let audit = inserts(set, oid_of(set, "audit"));
    // timestamptz: microseconds since 2000-01-01, 2024-01-02 03:04:05.123456 UTC.
    let micros = 757_479_845_123_456_i64;
    assert_eq!(audit[0].0[2], b(&micros.to_be_bytes()));
    assert_eq!(
        pg_timestamp_to_unix_millis(micros),
        ORIGIN_TIME_UNIX_MILLIS + 123
    );
    let docs = updates(set, oid_of(set, "docs"));
    assert_eq!(docs[0].1 .0[2], ColumnValue::UnchangedToast);
}

#[test]
fn streaming_set_starts_with_the_same_bytes_as_the_text_set() {
    // Both were peeked from one slot; small transactions are not streamed.
    let text = text_set();
    let streaming = streaming_set();
    assert!(streaming.len() > text.len());
    for (a, b) in text.iter().zip(streaming) {
        assert_eq!((a.lsn, &a.data), (b.lsn, &b.data), "line {}", a.line);
    }
}

#[test]
fn streamed_transactions() {
    let set = streaming_set();
    let mut stream_xid: Option<u32> = None;
    let (mut starts, mut later_segments, mut stops) = (0, 0, 0);
    let mut subxact_xids = 0;
    let mut in_stream_kinds = Vec::new();
    let mut commits = Vec::new();
    let mut aborts = Vec::new();
    for c in set {
        let inner_xid = match &c.msg {
            LogicalMessage::StreamStart(s) => {
                assert_eq!(stream_xid, None, "line {}: nested Stream Start", c.line);
                stream_xid = Some(s.xid);
                starts += usize::from(s.first_segment);
                later_segments += usize::from(!s.first_segment);
                continue;
            }
            LogicalMessage::StreamStop => {
                assert!(stream_xid.take().is_some(), "line {}", c.line);
                stops += 1;
                continue;
            }
            LogicalMessage::StreamCommit(sc) => {
                assert_eq!(stream_xid, None);
                assert_eq!(sc.end_lsn, c.lsn);
                assert!(sc.commit_lsn < sc.end_lsn);
                assert!(sc.commit_time_unix_millis() > Y2024_UNIX_MILLIS);
                commits.push(sc.xid);
                continue;
            }
            LogicalMessage::StreamAbort(sa) => {
                assert_eq!(stream_xid, None);
                assert_eq!(
                    (sa.abort_lsn, sa.abort_timestamp),
                    (None, None),
                    "protocol 2"
                );
                aborts.push((sa.xid, sa.subxid));
                continue;
            }
            LogicalMessage::Relation(r) => r.xid,
            LogicalMessage::Type(t) => t.xid,
            LogicalMessage::Insert(i) => i.xid,
            LogicalMessage::Update(u) => u.xid,
            LogicalMessage::Delete(d) => d.xid,
            LogicalMessage::Truncate(t) => t.xid,
            LogicalMessage::Message(m) => m.xid,
            _ => {
                assert_eq!(stream_xid, None, "line {}", c.line);
                continue;
            }
        };
        assert_eq!(c.in_stream, stream_xid.is_some());
        match (stream_xid, inner_xid) {
            (None, None) => {}
            (Some(top), Some(xid)) => {
                // The xid is the (sub)transaction the change belongs to: a subtransaction
                // started after the top-level one has a larger xid.
                assert!(xid >= top, "line {}: xid {xid} in stream {top}", c.line);
                subxact_xids += usize::from(xid != top);
                in_stream_kinds.push(c.data[0]);
            }
            other => panic!(
                "line {}: stream and message xid disagree: {other:?}",
                c.line
            ),
        }
    }
    assert_eq!(stream_xid, None, "ends inside a stream");
    assert_eq!(starts, 3, "three large transactions");
    assert!(
        later_segments >= 1,
        "a transaction is sent in several segments"
    );
    assert_eq!(stops, starts + later_segments);
    assert_eq!(commits.len(), 2);
    assert_eq!(aborts.len(), 2);
    // A whole transaction rolled back, and a subtransaction of a committed one.
    assert!(aborts.iter().any(|&(x, s)| x == s && !commits.contains(&x)));
    assert!(aborts.iter().any(|&(x, s)| x != s && commits.contains(&x)));
    assert!(subxact_xids > 0);
    for kind in b"RYIUDTM" {
        assert!(
            in_stream_kinds.contains(kind),
            "no in-stream {:?}",
            char::from(*kind)
        );
    }

    let streamed_message = set.iter().find_map(|c| match &c.msg {
        LogicalMessage::Message(m) if m.xid.is_some() => Some(m),
        _ => None,
    });
    let m = streamed_message.expect("a streamed Message");
    assert!(m.transactional);
    assert_eq!((&*m.prefix, &m.content[..]), ("big", &b"in stream"[..]));
    let big = oid_of(set, "big");
    let tr = set.iter().find_map(|c| match &c.msg {
        LogicalMessage::Truncate(tr) if tr.xid.is_some() => Some(tr),
        _ => None,
    });
    let tr = tr.expect("a streamed Truncate");
    assert_eq!(tr.relation_oids, [big]);
    assert!(!tr.cascade && !tr.restart_identity);
}

#[test]
fn every_proper_prefix_is_an_error() {
    for (name, set) in all_sets() {
        for c in set {
            for len in 0..c.data.len() {
                let r = decode(c.data.slice(..len), c.in_stream);
                assert!(r.is_err(), "{name}:{} prefix {len} decoded: {r:?}", c.line);
                if len == 0 {
                    assert_eq!(r, Err(DecodeError::Empty));
                }
            }
        }
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    for (name, set) in all_sets() {
        for c in set {
            let mut longer = c.data.to_vec();
            longer.push(0);
            let r = decode(longer.into(), c.in_stream);
            // Stream Abort may legitimately grow by the protocol-4 fields, but not by one byte.
            assert!(r.is_err(), "{name}:{} with a trailing byte: {r:?}", c.line);
        }
    }
}

#[test]
fn column_values_point_into_the_message() {
    for (_, set) in all_sets() {
        for c in set {
            let range = c.data.as_ptr() as usize..c.data.as_ptr() as usize + c.data.len();
            let tuples: Vec<&TupleData> = match &c.msg {
                LogicalMessage::Insert(i) => vec![&i.new],
                LogicalMessage::Update(u) => {
                    u.old.iter().map(|o| o.tuple()).chain([&u.new]).collect()
                }
                LogicalMessage::Delete(d) => vec![d.old.tuple()],
                _ => continue,
            };
            for v in tuples.iter().flat_map(|t| &t.0) {
                if let ColumnValue::Text(v) | ColumnValue::Binary(v) = v {
                    if !v.is_empty() {
                        assert!(range.contains(&(v.as_ptr() as usize)), "line {}", c.line);
                    }
                }
            }
        }
    }
}

/// Every captured message, each with the stream flag it was decoded with.
fn corpus() -> &'static [(Bytes, bool)] {
    static CORPUS: OnceLock<Vec<(Bytes, bool)>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        all_sets()
            .iter()
            .flat_map(|(_, set)| set.iter().map(|c| (c.data.clone(), c.in_stream)))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..64), in_stream: bool) {
        let _ = decode(Bytes::from(data), in_stream);
    }

    /// Valid tags followed by noise reach deeper into the decoder than uniform bytes.
    #[test]
    fn arbitrary_bodies_never_panic(
        tag in prop::sample::select(b"BCORYIUDTMSEcAZ".to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..64),
        in_stream: bool,
    ) {
        let mut data = vec![tag];
        data.extend(body);
        let _ = decode(Bytes::from(data), in_stream);
    }

    #[test]
    fn mutated_captures_never_panic(
        pick: prop::sample::Index,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut: Option<prop::sample::Index>,
        tail in prop::collection::vec(any::<u8>(), 0..24),
        flip_stream: bool,
    ) {
        let (data, in_stream) = pick.get(corpus());
        let mut data = data.to_vec();
        for (at, byte) in edits {
            let i = at.index(data.len());
            data[i] = byte;
        }
        if let Some(cut) = cut {
            data.truncate(cut.index(data.len() + 1));
        }
        data.extend(tail);
        let _ = decode(Bytes::from(data.clone()), *in_stream);
        let _ = decode(Bytes::from(data), *in_stream != flip_stream);
    }
}
