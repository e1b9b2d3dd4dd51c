//! PostgreSQL text values to JSON, written straight into a byte buffer.
//!
//! Numbers and booleans become JSON numbers and booleans, `json`/`jsonb` are embedded as JSON
//! (compacted, so an event is always one line), everything else is a JSON string of the text
//! form. A value that does not look like what its type promises is written as a string rather
//! than as broken JSON: the output is always valid JSON.

use super::Datum;

/// Type OIDs of the built-in types the encoder treats specially.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// Writes one value of type `type_oid`.
pub fn write_datum(out: &mut Vec<u8>, type_oid: u32, datum: Datum<'_>) {
    let text = match datum {
        Datum::Null | Datum::Unchanged => {
            out.extend_from_slice(b"null");
            return;
        }
        Datum::Text(t) => t,
    };
    match type_oid {
        oid::BOOL => match text {
            b"t" => out.extend_from_slice(b"true"),
            b"f" => out.extend_from_slice(b"false"),
            other => write_str(out, other),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID | oid::FLOAT4 | oid::FLOAT8 => {
            if is_json_number(text) {
                out.extend_from_slice(text);
            } else {
                // NaN, Infinity, -Infinity: JSON has no such numbers.
                write_str(out, text);
            }
        }
        oid::JSON | oid::JSONB => write_compact_json(out, text),
        // numeric keeps its exact digits as a string; other types use their text form.
        _ => write_str(out, text),
    }
}

/// Writes `s` as a JSON string. Invalid UTF-8 is replaced, never passed through.
pub fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    match std::str::from_utf8(s) {
        Ok(s) => write_utf8_str(out, s),
        Err(_) => write_utf8_str(out, &String::from_utf8_lossy(s)),
    }
}

fn write_utf8_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
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

/// Embeds a JSON document without insignificant whitespace. PostgreSQL has validated it; if it
/// is not JSON after all (it never should be), it is written as a string instead, so the event
/// stays valid JSON whatever arrives.
fn write_compact_json(out: &mut Vec<u8>, text: &[u8]) {
    let mark = out.len();
    let mut in_string = false;
    let mut escaped = false;
    let mut depth: i64 = 0;
    for &b in text {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b' ' | b'\n' | b'\r' | b'\t' => {}
            b'"' => {
                in_string = true;
                out.push(b);
            }
            b'{' | b'[' => {
                depth += 1;
                out.push(b);
            }
            b'}' | b']' => {
                depth -= 1;
                out.push(b);
            }
            _ => out.push(b),
        }
    }
    let valid = !in_string
        && depth == 0
        && serde_json::from_slice::<serde::de::IgnoredAny>(&out[mark..]).is_ok();
    if !valid {
        out.truncate(mark);
        write_str(out, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(type_oid: u32, text: &[u8]) -> String {
        let mut out = Vec::new();
        write_datum(&mut out, type_oid, Datum::Text(text));
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
        assert_eq!(enc(oid::NUMERIC, b"12.3400"), "\"12.3400\"");
        assert_eq!(enc(oid::BOOL, b"t"), "true");
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
            enc(oid::JSONB, br#"{"a b": [1, {"c": "x  y"}]}"#),
            r#"{"a b":[1,{"c":"x  y"}]}"#
        );
        assert_eq!(enc(oid::JSON, br#"  "s\" t"  "#), r#""s\" t""#);
        assert_eq!(enc(oid::JSON, b"{\"a\":1"), r#""{\"a\":1""#);
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

    proptest::proptest! {
        #[test]
        fn always_valid_json(type_oid in proptest::sample::select(vec![16u32, 20, 25, 114, 701, 1700, 3802]), text in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let mut out = Vec::new();
            write_datum(&mut out, type_oid, Datum::Text(&text));
            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "{:?}", String::from_utf8_lossy(&out));
        }
    }
}
