//! Edge cases on hand-built messages. Real server bytes are tested in
//! `tests/pgoutput_golden.rs`.

use super::*;

/// Builds a message field by field, big-endian.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn tag(t: u8) -> Self {
        Msg(vec![t])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    fn cstr(self, s: &str) -> Self {
        self.raw(s.as_bytes()).u8(0)
    }
    fn text(self, s: &str) -> Self {
        self.u8(b't').i32(s.len() as i32).raw(s.as_bytes())
    }
    fn bytes(&self) -> Bytes {
        Bytes::from(self.0.clone())
    }
}

fn ok(m: &Msg, in_stream: bool) -> LogicalMessage {
    match decode(m.bytes(), in_stream) {
        Ok(msg) => msg,
        Err(e) => panic!("decoding {:02x?} failed: {e}", m.0),
    }
}

fn err(m: &Msg, in_stream: bool) -> DecodeError {
    match decode(m.bytes(), in_stream) {
        Ok(msg) => panic!("decoding {:02x?} succeeded: {msg:?}", m.0),
        Err(e) => e,
    }
}

fn text(s: &str) -> ColumnValue {
    ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn begin_and_commit() {
    let b = Msg::tag(b'B').u64(0x1_0000_0010).u64(5).u32(0xFFFF_FFF0);
    assert_eq!(
        ok(&b, false),
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(0x1_0000_0010),
            commit_timestamp: 5,
            xid: 0xFFFF_FFF0,
        })
    );
    let c = Msg::tag(b'C').u8(0).u64(10).u64(20).u64(u64::MAX);
    assert_eq!(
        ok(&c, false),
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_timestamp: -1,
        })
    );
}

#[test]
fn origin() {
    let m = Msg::tag(b'O').u64(7).cstr("up");
    assert_eq!(
        ok(&m, false),
        LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(7),
            name: "up".into()
        })
    );
}

fn relation_msg(identity: u8) -> Msg {
    Msg::tag(b'R')
        .u32(16384)
        .cstr("")
        .cstr("t")
        .u8(identity)
        .i16(2)
        .u8(1)
        .cstr("id")
        .u32(23)
        .i32(-1)
        .u8(0xFE) // unknown flag bits besides bit 1 are ignored
        .cstr("v")
        .u32(1043)
        .i32(14)
}

#[test]
fn relation_and_replica_identities() {
    for (byte, identity) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let LogicalMessage::Relation(r) = ok(&relation_msg(byte), false) else {
            panic!("not a relation");
        };
        assert_eq!(r.replica_identity, identity);
        assert_eq!(
            (r.xid, r.oid, &*r.namespace, &*r.name),
            (None, 16384, "", "t")
        );
        assert_eq!(
            r.columns,
            [
                RelationColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1
                },
                RelationColumn {
                    is_key: false,
                    name: "v".into(),
                    type_oid: 1043,
                    type_modifier: 14
                },
            ]
        );
    }
    assert!(matches!(
        err(&relation_msg(b'x'), false),
        DecodeError::UnexpectedByte { found: b'x', .. }
    ));
}

#[test]
fn relation_with_bogus_column_count() {
    let negative = Msg::tag(b'R').u32(1).cstr("").cstr("t").u8(b'd').i16(-1);
    assert_eq!(
        err(&negative, false),
        DecodeError::InvalidValue {
            what: "Relation column count",
            value: -1
        }
    );
    let too_many = Msg::tag(b'R')
        .u32(1)
        .cstr("")
        .cstr("t")
        .u8(b'd')
        .i16(i16::MAX);
    assert!(matches!(
        err(&too_many, false),
        DecodeError::Truncated { .. }
    ));
}

#[test]
fn insert_with_every_column_kind() {
    let m = Msg::tag(b'I')
        .u32(42)
        .u8(b'N')
        .i16(5)
        .u8(b'n')
        .u8(b'u')
        .text("héllo ✓")
        .u8(b'b')
        .i32(4)
        .raw(&[0, 0, 0, 7])
        .text("");
    assert_eq!(
        ok(&m, false),
        LogicalMessage::Insert(Insert {
            xid: None,
            relation_oid: 42,
            new: TupleData(vec![
                ColumnValue::Null,
                ColumnValue::UnchangedToast,
                text("héllo ✓"),
                ColumnValue::Binary(Bytes::from_static(&[0, 0, 0, 7])),
                text(""),
            ]),
        })
    );
}

#[test]
fn column_values_are_slices_of_the_input() {
    let input = Msg::tag(b'I').u32(1).u8(b'N').i16(1).text("abc").bytes();
    let range = input.as_ptr() as usize..input.as_ptr() as usize + input.len();
    let Ok(LogicalMessage::Insert(i)) = decode(input.clone(), false) else {
        panic!("not an insert");
    };
    let [ColumnValue::Text(v)] = &i.new.0[..] else {
        panic!("not one text column");
    };
    assert_eq!(&v[..], b"abc");
    assert!(range.contains(&(v.as_ptr() as usize)));
}

#[test]
fn bad_tuples() {
    let kind = Msg::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x');
    assert_eq!(err(&kind, false), DecodeError::UnknownTupleKind(b'x'));
    let negative_len = Msg::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-1);
    assert_eq!(
        err(&negative_len, false),
        DecodeError::InvalidValue {
            what: "text column length",
            value: -1
        }
    );
    let huge_len = Msg::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'b').i32(i32::MAX);
    assert_eq!(
        err(&huge_len, false),
        DecodeError::Truncated {
            what: "binary column value",
            needed: i32::MAX as usize,
            remaining: 0
        }
    );
    let negative_count = Msg::tag(b'I').u32(1).u8(b'N').i16(i16::MIN);
    assert!(matches!(
        err(&negative_count, false),
        DecodeError::InvalidValue { value: -32768, .. }
    ));
    let marker = Msg::tag(b'I').u32(1).u8(b'K').i16(0);
    assert!(matches!(
        err(&marker, false),
        DecodeError::UnexpectedByte { found: b'K', .. }
    ));
}

#[test]
fn update_variants() {
    let new_only = Msg::tag(b'U').u32(9).u8(b'N').i16(1).text("a");
    let key = Msg::tag(b'U')
        .u32(9)
        .u8(b'K')
        .i16(2)
        .text("1")
        .u8(b'n')
        .u8(b'N')
        .i16(2)
        .text("2")
        .u8(b'u');
    let full = Msg::tag(b'U')
        .u32(9)
        .u8(b'O')
        .i16(1)
        .text("o")
        .u8(b'N')
        .i16(1)
        .text("n");
    let LogicalMessage::Update(u) = ok(&new_only, false) else {
        panic!()
    };
    assert_eq!((u.old, u.new), (None, TupleData(vec![text("a")])));
    let LogicalMessage::Update(u) = ok(&key, false) else {
        panic!()
    };
    assert_eq!(
        u.old,
        Some(OldTuple::Key(TupleData(vec![text("1"), ColumnValue::Null])))
    );
    assert_eq!(u.new.0, [text("2"), ColumnValue::UnchangedToast]);
    let LogicalMessage::Update(u) = ok(&full, false) else {
        panic!()
    };
    assert_eq!(u.old, Some(OldTuple::Full(TupleData(vec![text("o")]))));
    assert_eq!(u.old.as_ref().map(|o| o.tuple().0.len()), Some(1));

    let two_old = Msg::tag(b'U').u32(9).u8(b'K').i16(0).u8(b'O').i16(0);
    assert!(matches!(
        err(&two_old, false),
        DecodeError::UnexpectedByte { found: b'O', .. }
    ));
    let no_marker = Msg::tag(b'U').u32(9).u8(b'X');
    assert!(matches!(
        err(&no_marker, false),
        DecodeError::UnexpectedByte { found: b'X', .. }
    ));
}

#[test]
fn delete_variants() {
    let key = Msg::tag(b'D').u32(3).u8(b'K').i16(1).text("1");
    let full = Msg::tag(b'D').u32(3).u8(b'O').i16(0);
    assert_eq!(
        ok(&key, false),
        LogicalMessage::Delete(Delete {
            xid: None,
            relation_oid: 3,
            old: OldTuple::Key(TupleData(vec![text("1")]))
        })
    );
    assert!(matches!(
        ok(&full, false),
        LogicalMessage::Delete(Delete {
            old: OldTuple::Full(_),
            ..
        })
    ));
    let new = Msg::tag(b'D').u32(3).u8(b'N').i16(0);
    assert!(matches!(
        err(&new, false),
        DecodeError::UnexpectedByte { found: b'N', .. }
    ));
}

#[test]
fn truncate_options_and_counts() {
    for (options, cascade, restart_identity) in [
        (0, false, false),
        (1, true, false),
        (2, false, true),
        (3, true, true),
    ] {
        let m = Msg::tag(b'T').i32(2).u8(options).u32(10).u32(11);
        assert_eq!(
            ok(&m, false),
            LogicalMessage::Truncate(Truncate {
                xid: None,
                cascade,
                restart_identity,
                relation_oids: vec![10, 11],
            })
        );
    }
    let unknown_option = Msg::tag(b'T').i32(0).u8(4);
    assert!(matches!(
        err(&unknown_option, false),
        DecodeError::InvalidValue { value: 4, .. }
    ));
    let negative = Msg::tag(b'T').i32(-2).u8(0);
    assert!(matches!(
        err(&negative, false),
        DecodeError::InvalidValue { value: -2, .. }
    ));
    // A huge count must fail on the missing bytes, not try to reserve memory for them.
    let huge = Msg::tag(b'T').i32(i32::MAX).u8(0).u32(1);
    assert!(matches!(err(&huge, false), DecodeError::Truncated { .. }));
}

#[test]
fn messages() {
    let m = Msg::tag(b'M').u8(1).u64(99).cstr("p").i32(5).raw(b"hello");
    assert_eq!(
        ok(&m, false),
        LogicalMessage::Message(Message {
            xid: None,
            transactional: true,
            lsn: Lsn(99),
            prefix: "p".into(),
            content: Bytes::from_static(b"hello"),
        })
    );
    let empty = Msg::tag(b'M').u8(0).u64(1).cstr("").i32(0);
    assert!(matches!(
        ok(&empty, false),
        LogicalMessage::Message(Message { transactional: false, ref content, .. }) if content.is_empty()
    ));
    let bad_flags = Msg::tag(b'M').u8(2).u64(1).cstr("").i32(0);
    assert!(matches!(
        err(&bad_flags, false),
        DecodeError::InvalidValue {
            what: "Message flags",
            value: 2
        }
    ));
    let negative = Msg::tag(b'M').u8(0).u64(1).cstr("").i32(-1);
    assert!(matches!(
        err(&negative, false),
        DecodeError::InvalidValue { value: -1, .. }
    ));
}

#[test]
fn strings() {
    let no_nul = Msg::tag(b'O').u64(1).raw(b"abc");
    assert_eq!(
        err(&no_nul, false),
        DecodeError::MissingNul {
            what: "Origin name"
        }
    );
    let bad_utf8 = Msg::tag(b'O').u64(1).raw(&[0xC3, 0x28, 0]);
    assert_eq!(
        err(&bad_utf8, false),
        DecodeError::InvalidUtf8 {
            what: "Origin name"
        }
    );
}

#[test]
fn stream_framing() {
    let start = Msg::tag(b'S').u32(700).u8(1);
    assert_eq!(
        ok(&start, false),
        LogicalMessage::StreamStart(StreamStart {
            xid: 700,
            first_segment: true
        })
    );
    assert!(matches!(
        err(&Msg::tag(b'S').u32(700).u8(2), false),
        DecodeError::InvalidValue { value: 2, .. }
    ));
    assert_eq!(ok(&Msg::tag(b'E'), false), LogicalMessage::StreamStop);
    let commit = Msg::tag(b'c').u32(700).u8(0).u64(1).u64(2).u64(3);
    assert_eq!(
        ok(&commit, false),
        LogicalMessage::StreamCommit(StreamCommit {
            xid: 700,
            flags: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_timestamp: 3
        })
    );
}

#[test]
fn stream_abort_with_and_without_v4_fields() {
    let v2 = Msg::tag(b'A').u32(700).u32(701);
    assert_eq!(
        ok(&v2, false),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 700,
            subxid: 701,
            abort_lsn: None,
            abort_timestamp: None
        })
    );
    let v4 = Msg::tag(b'A').u32(700).u32(700).u64(0x20).u64(5);
    assert_eq!(
        ok(&v4, false),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 700,
            subxid: 700,
            abort_lsn: Some(Lsn(0x20)),
            abort_timestamp: Some(5)
        })
    );
    // Half of the optional fields is neither version.
    let half = Msg::tag(b'A').u32(700).u32(700).u64(0x20);
    assert!(matches!(
        err(&half, false),
        DecodeError::Truncated {
            what: "Stream Abort timestamp",
            ..
        }
    ));
}

#[test]
fn in_stream_messages_carry_an_xid() {
    const XID: u32 = 0xDEAD_BEEF;
    let streamed = [
        Msg::tag(b'R')
            .u32(XID)
            .u32(5)
            .cstr("s")
            .cstr("t")
            .u8(b'd')
            .i16(0),
        Msg::tag(b'Y').u32(XID).u32(5).cstr("s").cstr("t"),
        Msg::tag(b'I').u32(XID).u32(5).u8(b'N').i16(0),
        Msg::tag(b'U').u32(XID).u32(5).u8(b'N').i16(0),
        Msg::tag(b'D').u32(XID).u32(5).u8(b'K').i16(0),
        Msg::tag(b'T').u32(XID).i32(1).u8(0).u32(5),
        Msg::tag(b'M').u32(XID).u8(1).u64(5).cstr("").i32(0),
    ];
    for m in &streamed {
        let xid = match ok(m, true) {
            LogicalMessage::Relation(r) => r.xid,
            LogicalMessage::Type(t) => t.xid,
            LogicalMessage::Insert(i) => i.xid,
            LogicalMessage::Update(u) => u.xid,
            LogicalMessage::Delete(d) => d.xid,
            LogicalMessage::Truncate(t) => t.xid,
            LogicalMessage::Message(m) => m.xid,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(xid, Some(XID));
        // The same bytes outside a stream are misaligned: never silently accepted as is.
        assert!(decode(m.bytes(), false).map_or(true, |msg| msg != ok(m, true)));
    }
    // Messages without an in-stream form are the same inside a stream.
    let begin = Msg::tag(b'B').u64(1).u64(2).u32(3);
    assert_eq!(ok(&begin, true), ok(&begin, false));
}

#[test]
fn decoder_tracks_stream_state() {
    let mut d = Decoder::new();
    let insert = Msg::tag(b'I').u32(7).u32(5).u8(b'N').i16(0);
    assert!(d.decode(insert.bytes()).is_err());
    assert!(!d.in_stream());
    d.decode(Msg::tag(b'S').u32(7).u8(1).bytes()).unwrap();
    assert!(d.in_stream());
    // A failed decode does not change the state.
    assert!(d.decode(Msg::tag(b'E').u8(0).bytes()).is_err());
    assert!(d.in_stream());
    assert!(matches!(
        d.decode(insert.bytes()),
        Ok(LogicalMessage::Insert(Insert { xid: Some(7), .. }))
    ));
    assert_eq!(
        d.decode(Msg::tag(b'E').bytes()),
        Ok(LogicalMessage::StreamStop)
    );
    assert!(!d.in_stream());
}

#[test]
fn framing_errors() {
    assert_eq!(decode(Bytes::new(), false), Err(DecodeError::Empty));
    assert_eq!(err(&Msg::tag(b'Z'), false), DecodeError::UnknownTag(b'Z'));
    // Protocol v3 two-phase messages are not decoded (proto_version 2 never sends them).
    for tag in [b'b', b'P', b'K', b'r', b'p'] {
        assert_eq!(err(&Msg::tag(tag), false), DecodeError::UnknownTag(tag));
    }
    assert_eq!(
        err(&Msg::tag(b'E').u8(0).u8(0), false),
        DecodeError::TrailingBytes {
            tag: b'E',
            count: 2
        }
    );
    assert_eq!(
        err(&Msg::tag(b'B').u64(1), false),
        DecodeError::Truncated {
            what: "Begin commit timestamp",
            needed: 8,
            remaining: 0
        }
    );
}

#[test]
fn errors_read_as_sentences() {
    let cases = [
        (
            DecodeError::UnknownTag(b'Z'),
            "unknown pgoutput message type 'Z' (0x5A)",
        ),
        (
            DecodeError::UnknownTag(0),
            "unknown pgoutput message type 0x00",
        ),
        (
            DecodeError::Truncated {
                what: "Begin xid",
                needed: 4,
                remaining: 1,
            },
            "the pgoutput message ends early: the Begin xid needs 4 bytes but only 1 remain",
        ),
        (
            DecodeError::TrailingBytes {
                tag: b'C',
                count: 3,
            },
            "3 unexpected bytes follow a complete pgoutput message of type 'C' (0x43)",
        ),
        (
            DecodeError::UnexpectedByte {
                what: "Delete tuple marker",
                expected: "'K' or 'O'",
                found: b'N',
            },
            "invalid Delete tuple marker: expected 'K' or 'O', found 'N' (0x4E)",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(e.to_string(), text);
    }
}

#[test]
fn timestamps_to_unix_millis() {
    assert_eq!(pg_timestamp_to_unix_millis(0), 946_684_800_000);
    // 2024-01-02 03:04:05.123456 UTC
    assert_eq!(
        pg_timestamp_to_unix_millis(757_479_845_123_456),
        1_704_164_645_123
    );
    // Before 1970 rounds down, not toward zero.
    assert_eq!(pg_timestamp_to_unix_millis(-PG_EPOCH_UNIX_MICROS - 1), -1);
    assert_eq!(
        pg_timestamp_to_unix_millis(i64::MAX),
        9_223_372_036_854_775 + 946_684_800_000
    );
    assert_eq!(
        pg_timestamp_to_unix_millis(i64::MIN),
        i64::MIN / 1000 - 1 + 946_684_800_000
    );
    let begin = Begin {
        final_lsn: Lsn(1),
        commit_timestamp: 1_000,
        xid: 1,
    };
    assert_eq!(begin.commit_time_unix_millis(), 946_684_800_001);
}
