//! PostgreSQL text values to JSON, written straight into a byte buffer.
//!
//! Every value is written according to its column's [`Kind`] (see [`super::kind`]). The
//! text forms are those of the pinned session settings (see `source::session`), so one
//! canonical form arrives from both `COPY` and pgoutput. A value that does not look like
//! what its kind promises is written as a JSON string of its text rather than as broken
//! JSON: the output is always valid JSON, and nothing is lost.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::kind::Kind;
use super::{nested, time, Datum};

pub use super::kind::oid;

/// Writes one value of kind `kind`.
pub fn write_value(out: &mut Vec<u8>, kind: &Kind, datum: Datum<'_>) {
    match datum {
        Datum::Null | Datum::Unchanged => out.extend_from_slice(b"null"),
        Datum::Text(t) => write_text(out, kind, t),
        Datum::Json(j) => out.extend_from_slice(j),
    }
}

/// Writes one value of a built-in type by OID, with the default `--decimal`/`--binary`.
pub fn write_datum(out: &mut Vec<u8>, type_oid: u32, datum: Datum<'_>) {
    let kind = super::kind::builtin(type_oid, Default::default(), Default::default())
        .unwrap_or(Kind::Text);
    write_value(out, &kind, datum);
}

/// Writes the non-NULL text form `text` of a value of kind `kind`.
pub fn write_text(out: &mut Vec<u8>, kind: &Kind, text: &[u8]) {
    let mark = out.len();
    let ok = match kind {
        Kind::Text | Kind::Numeric => {
            write_str(out, text);
            true
        }
        Kind::Bool => match text {
            b"t" => {
                out.extend_from_slice(b"true");
                true
            }
            b"f" => {
                out.extend_from_slice(b"false");
                true
            }
            _ => false,
        },
        Kind::Int | Kind::NumericNumber => write_number(out, text),
        Kind::Float => match text {
            // JSON has no such numbers.
            b"NaN" | b"Infinity" | b"-Infinity" => {
                write_str(out, text);
                true
            }
            _ => write_number(out, text),
        },
        Kind::Json => write_compact_json(out, text),
        Kind::BytesBase64 => write_bytea(out, text, false),
        Kind::BytesHex => write_bytea(out, text, true),
        Kind::Date => time::write_date(out, text),
        Kind::Timestamp => time::write_timestamp(out, text, false),
        Kind::TimestampTz => time::write_timestamp(out, text, true),
        Kind::TimeTz => time::write_timetz(out, text),
        Kind::Array(a) => nested::write_array(out, a, text),
        Kind::Composite(fields) => nested::write_record(out, fields, text),
        Kind::Range(sub) => nested::write_range(out, sub, text),
        Kind::Multirange(sub) => nested::write_multirange(out, sub, text),
        Kind::Hstore => nested::write_hstore(out, text),
    };
    if !ok {
        out.truncate(mark);
        write_str(out, text);
    }
}

/// A number in JSON's grammar as is; anything else (NaN, Infinity) is not written.
fn write_number(out: &mut Vec<u8>, text: &[u8]) -> bool {
    if is_json_number(text) {
        out.extend_from_slice(text);
        true
    } else if matches!(text, b"NaN" | b"Infinity" | b"-Infinity") {
        write_str(out, text);
        true
    } else {
        false
    }
}

/// Writes `s` as a JSON string. Invalid UTF-8 is replaced, never passed through.
pub fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    let mark = out.len();
    if !write_escaped(out, s, true) {
        // Rare: only now pay for the replacement (the result is valid UTF-8).
        out.truncate(mark);
        write_escaped(out, String::from_utf8_lossy(s).as_bytes(), false);
    }
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// A mask with the high bit set in the bytes of `w` that are zero. Only the lowest set bit
/// is exact (a borrow may also mark bytes above it), which is all a forward scan needs.
#[inline(always)]
fn zero_bytes(w: u64) -> u64 {
    w.wrapping_sub(LO) & !w & HI
}

/// Bytes of `w` that are `"`, `\` or below 0x20, plus those >= 0x80 if `high`; exact up to
/// the lowest set bit (see [`zero_bytes`]).
#[inline(always)]
fn special_bytes(w: u64, high: bool) -> u64 {
    let control = w.wrapping_sub(0x20 * LO) & !w & HI;
    let quote = zero_bytes(w ^ (b'"' as u64 * LO));
    let backslash = zero_bytes(w ^ (b'\\' as u64 * LO));
    let hi = if high { w & HI } else { 0 };
    control | quote | backslash | hi
}

/// Index of the first byte at or after `i` that is `"`, `\`, below 0x20, or (if `high`)
/// >= 0x80; `s.len()` if none. Eight bytes at a time.
#[inline]
fn next_special(s: &[u8], mut i: usize, high: bool) -> usize {
    while let Some(chunk) = s.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let m = special_bytes(u64::from_le_bytes(w), high);
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&b) = s.get(i) {
        if b < 0x20 || b == b'"' || b == b'\\' || (high && b >= 0x80) {
            return i;
        }
        i += 1;
    }
    s.len()
}

/// Writes `s` quoted and escaped. With `check`, returns false (having written part of it)
/// if `s` is not UTF-8; the first byte >= 0x80 triggers one validation of the rest.
fn write_escaped(out: &mut Vec<u8>, s: &[u8], check: bool) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut high = check;
    let mut start = 0;
    let mut i = 0;
    loop {
        i = next_special(s, i, high);
        let Some(&b) = s.get(i) else {
            break;
        };
        if b >= 0x80 {
            // Valid from here on: no need to stop at high bytes any more.
            if std::str::from_utf8(&s[i..]).is_err() {
                return false;
            }
            high = false;
            continue;
        }
        out.extend_from_slice(&s[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]),
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
    true
}

/// True when `s` is a number in JSON's grammar.
pub fn is_json_number(s: &[u8]) -> bool {
    let mut i = 0;
    let n = s.len();
    if i < n && s[i] == b'-' {
        i += 1;
    }
    let int_start = i;
    while i < n && s[i].is_ascii_digit() {
        i += 1;
    }
    let int_len = i - int_start;
    if int_len == 0 || (int_len > 1 && s[int_start] == b'0') {
        return false;
    }
    if i < n && s[i] == b'.' {
        i += 1;
        let f = i;
        while i < n && s[i].is_ascii_digit() {
            i += 1;
        }
        if i == f {
            return false;
        }
    }
    if i < n && (s[i] == b'e' || s[i] == b'E') {
        i += 1;
        if i < n && (s[i] == b'+' || s[i] == b'-') {
            i += 1;
        }
        let e = i;
        while i < n && s[i].is_ascii_digit() {
            i += 1;
        }
        if i == e {
            return false;
        }
    }
    i == n
}

/// Writes `bytes` as a JSON string in `binary` form (base64 or hex).
pub fn write_bytes(out: &mut Vec<u8>, bytes: &[u8], hex: bool) {
    out.reserve(bytes.len() * 2 + 2);
    out.push(b'"');
    if hex {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for &b in bytes {
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        }
    } else {
        push_base64(out, bytes);
    }
    out.push(b'"');
}

/// Appends standard padded base64 of `bytes` (the `base64` crate: about twice the speed of a
/// table loop, bench/PROFILE.md).
fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    // `encoded_len` is `None` only past `usize::MAX`, beyond any slice that exists.
    let len = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    out.resize(start + len, 0);
    let written = STANDARD.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
}

/// `bytea` in its hex text form (`\x0a1b…`, what `bytea_output = hex` prints).
fn write_bytea(out: &mut Vec<u8>, text: &[u8], hex: bool) -> bool {
    let Some(digits) = text.strip_prefix(b"\\x") else {
        return false;
    };
    if digits.len() % 2 != 0 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return false;
    }
    if hex {
        out.push(b'"');
        out.extend(digits.iter().map(u8::to_ascii_lowercase));
        out.push(b'"');
        return true;
    }
    // Decoded through a stack buffer whose size is a multiple of 3, so only the last piece
    // can end in padding and the pieces' base64 joins into that of the whole value.
    let mut buf = [0u8; 768];
    out.reserve(digits.len() * 2 / 3 + 4);
    out.push(b'"');
    for piece in digits.chunks(buf.len() * 2) {
        let n = piece.len() / 2;
        for (b, pair) in buf.iter_mut().zip(piece.chunks_exact(2)) {
            *b = hex_value(pair[0]) << 4 | hex_value(pair[1]);
        }
        push_base64(out, &buf[..n]);
    }
    out.push(b'"');
    true
}

/// One hexadecimal digit's value (the caller checked that it is one).
fn hex_value(d: u8) -> u8 {
    match d {
        b'0'..=b'9' => d - b'0',
        b'a'..=b'f' => d - b'a' + 10,
        b'A'..=b'F' => d - b'A' + 10,
        _ => 0,
    }
}

/// Embeds a JSON document without insignificant whitespace, validating it on the way. The
/// validation is grammar-only (numbers keep every digit, however large). PostgreSQL has
/// validated the document already; if it is not JSON after all, nothing is written and the
/// caller falls back to a string.
fn write_compact_json(out: &mut Vec<u8>, text: &[u8]) -> bool {
    let mark = out.len();
    out.reserve(text.len());
    match compact_json(out, text) {
        // Bytes >= 0x80 can only be inside strings; check them only if there were any.
        Some(non_ascii) if !non_ascii || std::str::from_utf8(text).is_ok() => true,
        _ => {
            out.truncate(mark);
            false
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Value,
    /// After `[`: a value or `]`.
    FirstItem,
    /// After `{`: a key or `}`.
    FirstKey,
    Key,
    Colon,
    /// After a value: `,`, the container's end, or the end of input.
    Next,
}

/// The open containers, innermost last: a bit per level (set for an object), spilling to
/// the heap only past 64 levels.
#[derive(Default)]
struct Nesting {
    bits: u64,
    depth: usize,
    deep: Vec<bool>,
}

impl Nesting {
    fn push(&mut self, object: bool) {
        if self.depth < 64 {
            self.bits = (self.bits & !(1 << self.depth)) | (u64::from(object) << self.depth);
        } else {
            self.deep.push(object);
        }
        self.depth += 1;
    }

    /// Whether the innermost container is an object; `None` at the top level.
    fn last(&self) -> Option<bool> {
        match self.depth {
            0 => None,
            d @ 1..=64 => Some((self.bits >> (d - 1)) & 1 == 1),
            _ => self.deep.last().copied(),
        }
    }

    fn pop(&mut self) {
        if self.depth > 64 {
            self.deep.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

/// Validates `s` and appends it without whitespace outside strings, copying the runs
/// between whitespace whole. Returns whether any string held bytes >= 0x80 (not yet
/// checked to be UTF-8), or `None` (with part of `s` written) if `s` is not JSON.
fn compact_json(out: &mut Vec<u8>, s: &[u8]) -> Option<bool> {
    let mut nesting = Nesting::default();
    let mut expect = Expect::Value;
    let mut non_ascii = false;
    // `s[run..i]` is validated but not yet copied.
    let mut run = 0;
    let mut i = 0;
    loop {
        if matches!(s.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            out.extend_from_slice(&s[run..i]);
            while i < s.len() && matches!(s[i], b' ' | b'\n' | b'\r' | b'\t') {
                i += 1;
            }
            run = i;
        }
        let Some(&c) = s.get(i) else {
            out.extend_from_slice(&s[run..]);
            return (expect == Expect::Next && nesting.depth == 0).then_some(non_ascii);
        };
        match expect {
            Expect::Next => match (c, nesting.last()) {
                (b',', Some(true)) => {
                    i += 1;
                    expect = Expect::Key;
                }
                (b',', Some(false)) => {
                    i += 1;
                    expect = Expect::Value;
                }
                (b'}', Some(true)) | (b']', Some(false)) => {
                    nesting.pop();
                    i += 1;
                }
                _ => return None,
            },
            Expect::Colon => {
                if c != b':' {
                    return None;
                }
                i += 1;
                expect = Expect::Value;
            }
            Expect::FirstKey | Expect::Key => {
                if c == b'}' && expect == Expect::FirstKey {
                    nesting.pop();
                    i += 1;
                    expect = Expect::Next;
                } else if c == b'"' {
                    i = json_string(s, i, &mut non_ascii)?;
                    expect = Expect::Colon;
                } else {
                    return None;
                }
            }
            Expect::Value | Expect::FirstItem => {
                if c == b']' && expect == Expect::FirstItem {
                    nesting.pop();
                    i += 1;
                    expect = Expect::Next;
                    continue;
                }
                match c {
                    b'{' | b'[' => {
                        nesting.push(c == b'{');
                        i += 1;
                        expect = if c == b'{' {
                            Expect::FirstKey
                        } else {
                            Expect::FirstItem
                        };
                        continue;
                    }
                    b'"' => i = json_string(s, i, &mut non_ascii)?,
                    b't' | b'f' | b'n' => {
                        let word: &[u8] = match c {
                            b't' => b"true",
                            b'f' => b"false",
                            _ => b"null",
                        };
                        if !s[i..].starts_with(word) {
                            return None;
                        }
                        i += word.len();
                    }
                    _ => {
                        let start = i;
                        while i < s.len()
                            && matches!(s[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                        {
                            i += 1;
                        }
                        if !is_json_number(&s[start..i]) {
                            return None;
                        }
                    }
                }
                expect = Expect::Next;
            }
        }
    }
}

/// Checks the string starting at `s[i] == '"'`; returns the index after its closing quote.
/// Sets `non_ascii` if the string holds bytes >= 0x80.
fn json_string(s: &[u8], mut i: usize, non_ascii: &mut bool) -> Option<usize> {
    i += 1;
    loop {
        // Skip to the next quote, backslash, control byte or (once) non-ASCII byte.
        i = next_special(s, i, !*non_ascii);
        match *s.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *s.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    let hex = s.get(i + 2..i + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            0..=0x1f => return None,
            _ => {
                *non_ascii = true;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::kind::{builtin, BinaryMode, DecimalMode};

    fn enc(type_oid: u32, text: &[u8]) -> String {
        let mut out = Vec::new();
        write_datum(&mut out, type_oid, Datum::Text(text));
        String::from_utf8(out).unwrap()
    }

    fn enc_kind(kind: &Kind, text: &[u8]) -> String {
        let mut out = Vec::new();
        write_text(&mut out, kind, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_and_specials() {
        assert_eq!(
            enc(oid::INT8, b"-9223372036854775808"),
            "-9223372036854775808"
        );
        assert_eq!(enc(oid::FLOAT8, b"1.5e+20"), "1.5e+20");
        assert_eq!(enc(oid::FLOAT8, b"NaN"), "\"NaN\"");
        assert_eq!(enc(oid::FLOAT4, b"-Infinity"), "\"-Infinity\"");
        assert_eq!(enc(oid::FLOAT4, b"1.5x"), "\"1.5x\"");
        assert_eq!(enc(oid::NUMERIC, b"12.3400"), "\"12.3400\"");
        assert_eq!(enc_kind(&Kind::NumericNumber, b"12.3400"), "12.3400");
        assert_eq!(enc_kind(&Kind::NumericNumber, b"NaN"), "\"NaN\"");
        assert_eq!(enc(oid::BOOL, b"t"), "true");
        assert_eq!(enc(oid::BOOL, b"yes"), "\"yes\"");
        assert_eq!(enc(oid::OID, b"4294967295"), "\"4294967295\"");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(
            enc(oid::TEXT, "é\u{1}\"\\\n".as_bytes()),
            "\"é\\u0001\\\"\\\\\\n\""
        );
        assert_eq!(enc(oid::TEXT, &[0xff, b'a']), "\"\u{fffd}a\"");
    }

    #[test]
    fn json_is_compacted_but_strings_kept() {
        assert_eq!(
            enc(
                oid::JSONB,
                br#"{"a b": [1, {"c": "x  y"}], "d": {}, "e": []}"#
            ),
            r#"{"a b":[1,{"c":"x  y"}],"d":{},"e":[]}"#
        );
        assert_eq!(enc(oid::JSON, br#"  "s\" t"  "#), r#""s\" t""#);
        assert_eq!(enc(oid::JSON, b"{\"a\":1"), r#""{\"a\":1""#);
        // Numbers keep every digit, however large.
        let big = format!("[1{}, -0.5e-400]", "0".repeat(500));
        assert_eq!(enc(oid::JSONB, big.as_bytes()), big.replace(' ', ""));
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "tru",
            "01",
            "[1]]",
            "\"\\x\"",
            "1 2",
        ] {
            assert_eq!(
                enc(oid::JSON, bad.as_bytes()),
                enc(oid::TEXT, bad.as_bytes()),
                "{bad}"
            );
        }
    }

    #[test]
    fn bytea_as_base64_or_hex() {
        let b64 = builtin(oid::BYTEA, DecimalMode::String, BinaryMode::Base64).unwrap();
        let hex = builtin(oid::BYTEA, DecimalMode::String, BinaryMode::Hex).unwrap();
        assert_eq!(enc_kind(&b64, b"\\x"), "\"\"");
        assert_eq!(enc_kind(&b64, b"\\x66"), "\"Zg==\"");
        assert_eq!(enc_kind(&b64, b"\\x666f"), "\"Zm8=\"");
        assert_eq!(enc_kind(&b64, b"\\x666f6f"), "\"Zm9v\"");
        assert_eq!(enc_kind(&b64, b"\\x00FFfe"), "\"AP/+\"");
        assert_eq!(enc_kind(&hex, b"\\x00FFfe"), "\"00fffe\"");
        assert_eq!(enc_kind(&b64, b"\\x0"), "\"\\\\x0\"");
        assert_eq!(enc_kind(&b64, b"abc"), "\"abc\"");
        // Longer than one decoding block.
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text: String =
            "\\x".to_string() + &bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut want = Vec::new();
        write_bytes(&mut want, &bytes, false);
        assert_eq!(enc_kind(&b64, text.as_bytes()).into_bytes(), want);
        // Both paths against base64 written out bit by bit, around the decoding block's edges.
        for len in [
            0, 1, 2, 3, 4, 766, 767, 768, 769, 770, 1535, 1536, 1537, 2000,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let want = format!("\"{}\"", reference_base64(&bytes));
            let mut got = Vec::new();
            write_bytes(&mut got, &bytes, false);
            assert_eq!(String::from_utf8(got).unwrap(), want, "{len}");
            let text: String =
                "\\x".to_string() + &bytes.iter().map(|b| format!("{b:02X}")).collect::<String>();
            assert_eq!(enc_kind(&b64, text.as_bytes()), want, "{len}");
        }
    }

    fn reference_base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bits: Vec<bool> = bytes
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1))
            .collect();
        let mut s: String = bits
            .chunks(6)
            .map(|c| {
                let v = (0..6).fold(0, |v, i| v << 1 | usize::from(c.get(i) == Some(&true)));
                ALPHABET[v] as char
            })
            .collect();
        while !s.len().is_multiple_of(4) {
            s.push('=');
        }
        s
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-0", "1.5", "1e5", "1E+5", "-12.5e-3"] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "-", "01", "1.", ".5", "1e", "NaN", "+1", "1 "] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }

    /// The compactor as first written (validate UTF-8, then push token by token), as a
    /// reference for the faster one.
    mod first_compactor {
        use super::super::is_json_number;

        pub fn write_compact_json(out: &mut Vec<u8>, text: &[u8]) -> bool {
            if std::str::from_utf8(text).is_err() {
                return false;
            }
            let mark = out.len();
            if compact_json(out, text).is_none() {
                out.truncate(mark);
                return false;
            }
            true
        }

        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Expect {
            Value,
            /// After `[`: a value or `]`.
            FirstItem,
            /// After `{`: a key or `}`.
            FirstKey,
            Key,
            Colon,
            /// After a value: `,`, the container's end, or the end of input.
            Next,
        }

        fn compact_json(out: &mut Vec<u8>, s: &[u8]) -> Option<()> {
            let mut stack: Vec<u8> = Vec::new();
            let mut expect = Expect::Value;
            let mut i = 0;
            loop {
                while i < s.len() && matches!(s[i], b' ' | b'\n' | b'\r' | b'\t') {
                    i += 1;
                }
                let Some(&c) = s.get(i) else {
                    return (expect == Expect::Next && stack.is_empty()).then_some(());
                };
                match expect {
                    Expect::Next => match (c, stack.last()) {
                        (b',', Some(b'{')) => {
                            out.push(c);
                            i += 1;
                            expect = Expect::Key;
                        }
                        (b',', Some(b'[')) => {
                            out.push(c);
                            i += 1;
                            expect = Expect::Value;
                        }
                        (b'}', Some(b'{')) | (b']', Some(b'[')) => {
                            out.push(c);
                            stack.pop();
                            i += 1;
                        }
                        _ => return None,
                    },
                    Expect::Colon => {
                        if c != b':' {
                            return None;
                        }
                        out.push(c);
                        i += 1;
                        expect = Expect::Value;
                    }
                    Expect::FirstKey | Expect::Key => {
                        if c == b'}' && expect == Expect::FirstKey {
                            out.push(c);
                            stack.pop();
                            i += 1;
                            expect = Expect::Next;
                        } else if c == b'"' {
                            i = json_string(out, s, i)?;
                            expect = Expect::Colon;
                        } else {
                            return None;
                        }
                    }
                    Expect::Value | Expect::FirstItem => {
                        if c == b']' && expect == Expect::FirstItem {
                            out.push(c);
                            stack.pop();
                            i += 1;
                            expect = Expect::Next;
                            continue;
                        }
                        match c {
                            b'{' | b'[' => {
                                out.push(c);
                                stack.push(c);
                                i += 1;
                                expect = if c == b'{' {
                                    Expect::FirstKey
                                } else {
                                    Expect::FirstItem
                                };
                                continue;
                            }
                            b'"' => i = json_string(out, s, i)?,
                            b't' | b'f' | b'n' => {
                                let word: &[u8] = match c {
                                    b't' => b"true",
                                    b'f' => b"false",
                                    _ => b"null",
                                };
                                if !s[i..].starts_with(word) {
                                    return None;
                                }
                                out.extend_from_slice(word);
                                i += word.len();
                            }
                            _ => {
                                let start = i;
                                while i < s.len()
                                    && matches!(
                                        s[i],
                                        b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                                    )
                                {
                                    i += 1;
                                }
                                if !is_json_number(&s[start..i]) {
                                    return None;
                                }
                                out.extend_from_slice(&s[start..i]);
                            }
                        }
                        expect = Expect::Next;
                    }
                }
            }
        }

        /// Copies the string starting at `s[i] == '"'`; returns the index after its closing quote.
        fn json_string(out: &mut Vec<u8>, s: &[u8], mut i: usize) -> Option<usize> {
            let start = i;
            i += 1;
            loop {
                match *s.get(i)? {
                    b'"' => {
                        i += 1;
                        break;
                    }
                    b'\\' => match *s.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                        b'u' => {
                            let hex = s.get(i + 2..i + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            i += 6;
                        }
                        _ => return None,
                    },
                    0..=0x1f => return None,
                    _ => i += 1,
                }
            }
            out.extend_from_slice(&s[start..i]);
            Some(i)
        }
    }

    fn compact_both(text: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let (mut a, mut b) = (b"x".to_vec(), b"x".to_vec());
        let a = write_compact_json(&mut a, text).then_some(a);
        let b = first_compactor::write_compact_json(&mut b, text).then_some(b);
        (a, b)
    }

    #[test]
    fn compactor_edges() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let mixed = |n: usize| "[{\"k\": ".repeat(n) + "1" + &"}]".repeat(n);
        for text in [
            deep(63),
            deep(64),
            deep(65),
            deep(200),
            mixed(70),
            mixed(70).replacen('}', "]", 1),
            deep(70) + "]",
            "{\"é\": \"ü\\u00e9\"}".to_string(),
            " [ 1 , 2 ] ".to_string(),
        ] {
            let (a, b) = compact_both(text.as_bytes());
            assert_eq!(a, b, "{text}");
        }
        let (a, b) = compact_both(b"[\"\xff\"]");
        assert_eq!((a, b), (None, None));
    }

    /// The escaper as first written: validate, then one byte at a time.
    fn reference_str(out: &mut Vec<u8>, s: &[u8]) {
        let s = String::from_utf8_lossy(s);
        out.push(b'"');
        for &b in s.as_bytes() {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                _ => out.push(b),
            }
        }
        out.push(b'"');
    }

    /// Bytes that exercise the escaper: mostly plain, with specials and UTF-8 pieces.
    fn tricky_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            4 => proptest::collection::vec(b'a'..=b'z', 1..12),
            1 => proptest::sample::select(vec![
                b"\"".to_vec(), b"\\".to_vec(), b"\n".to_vec(), b"\x01".to_vec(),
                b"\x1f".to_vec(), b" ".to_vec(), b"\x7f".to_vec(), b"\xc3\xa9".to_vec(),
                b"\xe2\x82\xac".to_vec(), b"\xf0\x9f\x98\x80".to_vec(), b"\xff".to_vec(),
                b"\xc3".to_vec(), b"\xed\xa0\x80".to_vec(), b"\x80".to_vec(),
            ]),
            1 => proptest::collection::vec(any::<u8>(), 1..4),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    #[test]
    fn escaper_edges() {
        for s in [
            &b""[..],
            b"abcdefgh",
            b"abcdefg\"",
            b"\"abcdefgh",
            b"abcdefgh\x1f",
            b"\x20\x21\x1f!\x20\x20\x20\x20\x20\x20\x1f",
            b"\xc3\xa9abcdefgh\xff",
            b"abcdefgh\xc3\xa9\"\\\x00",
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            write_str(&mut a, s);
            reference_str(&mut b, s);
            assert_eq!(a, b, "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn escaper_matches_reference(s in proptest::prop_oneof![tricky_bytes(), proptest::collection::vec(proptest::num::u8::ANY, 0..80)]) {
            let (mut a, mut b) = (b"x".to_vec(), b"x".to_vec());
            write_str(&mut a, &s);
            reference_str(&mut b, &s);
            proptest::prop_assert_eq!(a, b);
        }

        #[test]
        fn compactor_matches_reference(
            v in json_value(),
            edits in proptest::collection::vec((proptest::num::usize::ANY, proptest::sample::select(b" \t\n\"\\{}[],:0-.eE+tfnu\xc3\xa9\x01".to_vec()), proptest::bool::ANY), 0..3),
        ) {
            let mut text = serde_json::to_string_pretty(&v).unwrap().into_bytes();
            for (at, byte, insert) in edits {
                let at = at % (text.len() + 1);
                if insert {
                    text.insert(at, byte);
                } else if at < text.len() {
                    text.remove(at);
                }
            }
            let (a, b) = compact_both(&text);
            proptest::prop_assert_eq!(a, b);
        }

        #[test]
        fn compactor_matches_reference_on_bytes(text in proptest::collection::vec(proptest::sample::select(b" \t\"\\{}[],:0123-.eEtruefalsn\xc3\xa9\xff\x01".to_vec()), 0..40)) {
            let (a, b) = compact_both(&text);
            proptest::prop_assert_eq!(a, b);
        }

        #[test]
        fn always_valid_json(type_oid in proptest::sample::select(vec![16u32, 17, 20, 25, 114, 701, 1082, 1114, 1184, 1266, 1700, 3802]), text in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let mut out = Vec::new();
            write_datum(&mut out, type_oid, Datum::Text(&text));
            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "{:?}", String::from_utf8_lossy(&out));
        }

        #[test]
        fn valid_json_round_trips(v in json_value()) {
            let text = serde_json::to_string_pretty(&v).unwrap();
            let mut out = Vec::new();
            write_datum(&mut out, oid::JSONB, Datum::Text(text.as_bytes()));
            let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(back, v);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".*", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
