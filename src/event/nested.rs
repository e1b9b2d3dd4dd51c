//! Text forms with structure — arrays, composites (records), ranges, multiranges and
//! `hstore` — parsed into JSON arrays and objects.
//!
//! These are the forms PostgreSQL's output functions print (`array_out`, `record_out`,
//! `range_out`, `multirange_out`, `hstore_out`). Each element or field is itself a text form
//! and is written with its own kind, so an array of `jsonb` holds documents, a composite's
//! `numeric` field a string, and so on down. The parsers are cursor-based and never panic:
//! every access is checked, and any input that does not follow the grammar makes the
//! function return `false`; the caller then writes the whole value as a JSON string. Element
//! text without escapes is borrowed, so the common case allocates nothing.
//!
//! Quoting rules, as the output functions apply them:
//! - arrays: elements that are empty, `NULL`, or contain the delimiter, braces, quotes,
//!   backslashes or white space are double-quoted, with `"` and `\` backslash-escaped; an
//!   unquoted `NULL` is SQL NULL. Non-default lower bounds are printed as a `[1:2]=` prefix.
//! - records and range bounds: values with special characters are double-quoted, with `"`
//!   and `\` doubled; an empty unquoted field (or bound) is NULL (or unbounded).
//! - hstore: keys and values are always quoted, with `"` and `\` backslash-escaped; an
//!   unquoted `NULL` value is SQL NULL.

use std::borrow::Cow;

use super::json::{write_str, write_text};
use super::kind::{ArrayKind, Field, Kind};

/// Deeper nesting than this is not parsed (PostgreSQL allows 6 array dimensions).
const MAX_DEPTH: usize = 32;

struct Cur<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn new(s: &'a [u8]) -> Self {
        Cur { s, i: 0 }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
}

/// A value that is SQL NULL (`None`) or text.
type Item<'a> = Option<Cow<'a, [u8]>>;

fn write_item(out: &mut Vec<u8>, kind: &Kind, item: &Item<'_>) {
    match item {
        None => out.extend_from_slice(b"null"),
        Some(t) => write_text(out, kind, t),
    }
}

// ---------------------------------------------------------------------------------- arrays

/// `{1,2}`, `{{1,NULL},{3,4}}`, `[0:1]={a,b}` → nested JSON arrays.
pub fn write_array(out: &mut Vec<u8>, kind: &ArrayKind, text: &[u8]) -> bool {
    let mut c = Cur::new(text);
    if c.peek() == Some(b'[') {
        // Dimension decoration for lower bounds other than 1: the elements keep their
        // order, the bounds are not carried (see the README).
        let Some(eq) = text.iter().position(|&b| b == b'=') else {
            return false;
        };
        if !text[..eq]
            .iter()
            .all(|&b| b.is_ascii_digit() || matches!(b, b'[' | b']' | b':' | b'-'))
        {
            return false;
        }
        c.i = eq + 1;
    }
    if array_level(out, kind, &mut c, 0).is_none() {
        return false;
    }
    c.skip_ws();
    c.done()
}

fn array_level(out: &mut Vec<u8>, kind: &ArrayKind, c: &mut Cur<'_>, depth: usize) -> Option<()> {
    if depth > MAX_DEPTH || !c.eat(b'{') {
        return None;
    }
    out.push(b'[');
    c.skip_ws();
    if c.eat(b'}') {
        out.push(b']');
        return Some(());
    }
    loop {
        c.skip_ws();
        if c.peek() == Some(b'{') {
            array_level(out, kind, c, depth + 1)?;
        } else {
            let item = array_item(c, kind.delim)?;
            write_item(out, &kind.elem, &item);
        }
        c.skip_ws();
        match c.peek()? {
            b'}' => {
                c.i += 1;
                out.push(b']');
                return Some(());
            }
            d if d == kind.delim => {
                c.i += 1;
                out.push(b',');
            }
            _ => return None,
        }
    }
}

fn array_item<'a>(c: &mut Cur<'a>, delim: u8) -> Option<Item<'a>> {
    if c.eat(b'"') {
        return quoted_backslash(c).map(Some);
    }
    let start = c.i;
    let mut owned: Option<Vec<u8>> = None;
    while let Some(b) = c.peek() {
        if b == delim || b == b'}' {
            break;
        }
        if matches!(b, b'{' | b'"') {
            return None;
        }
        c.i += 1;
        if b == b'\\' {
            let next = c.peek()?;
            c.i += 1;
            owned
                .get_or_insert_with(|| c.s[start..c.i - 2].to_vec())
                .push(next);
        } else if let Some(o) = owned.as_mut() {
            o.push(b);
        }
    }
    match owned {
        Some(o) => Some(Some(Cow::Owned(o))),
        None => {
            let raw = c.s[start..c.i].trim_ascii_end();
            if raw.is_empty() {
                None
            } else if raw.eq_ignore_ascii_case(b"NULL") {
                Some(None)
            } else {
                Some(Some(Cow::Borrowed(raw)))
            }
        }
    }
}

/// The rest of a double-quoted string whose `\` escapes the next byte (the opening quote
/// is consumed).
fn quoted_backslash<'a>(c: &mut Cur<'a>) -> Option<Cow<'a, [u8]>> {
    let start = c.i;
    let mut owned: Option<Vec<u8>> = None;
    loop {
        let b = c.peek()?;
        c.i += 1;
        match b {
            b'"' => {
                return Some(match owned {
                    Some(o) => Cow::Owned(o),
                    None => Cow::Borrowed(&c.s[start..c.i - 1]),
                })
            }
            b'\\' => {
                let next = c.peek()?;
                c.i += 1;
                owned
                    .get_or_insert_with(|| c.s[start..c.i - 2].to_vec())
                    .push(next);
            }
            _ => {
                if let Some(o) = owned.as_mut() {
                    o.push(b);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- records and range bounds

/// A record field or range bound, up to (not including) an unquoted byte of `ends`.
/// `None` when it is empty and unquoted (NULL, or an unbounded side of a range).
fn field<'a>(c: &mut Cur<'a>, ends: &[u8]) -> Option<Item<'a>> {
    let start = c.i;
    // Fast path: no quotes or backslashes before the end.
    let mut j = start;
    loop {
        let b = *c.s.get(j)?;
        if ends.contains(&b) {
            c.i = j;
            return Some((j > start).then(|| Cow::Borrowed(&c.s[start..j])));
        }
        if b == b'"' || b == b'\\' {
            break;
        }
        j += 1;
    }
    let mut buf = Vec::with_capacity(j - start + 8);
    let mut in_quotes = false;
    loop {
        let b = c.peek()?;
        if !in_quotes && ends.contains(&b) {
            return Some(Some(Cow::Owned(buf)));
        }
        c.i += 1;
        match b {
            b'\\' => {
                buf.push(c.peek()?);
                c.i += 1;
            }
            b'"' if !in_quotes => in_quotes = true,
            b'"' if c.peek() == Some(b'"') => {
                buf.push(b'"');
                c.i += 1;
            }
            b'"' => in_quotes = false,
            _ => buf.push(b),
        }
    }
}

/// `(1,"a b",,"x""y")` → an object with the composite's attribute names.
pub fn write_record(out: &mut Vec<u8>, fields: &[Field], text: &[u8]) -> bool {
    let mut c = Cur::new(text);
    if !c.eat(b'(') {
        return false;
    }
    out.push(b'{');
    for (n, f) in fields.iter().enumerate() {
        if n > 0 {
            if !c.eat(b',') {
                return false;
            }
            out.push(b',');
        }
        let Some(item) = field(&mut c, b",)") else {
            return false;
        };
        out.extend_from_slice(&f.label);
        write_item(out, &f.kind, &item);
    }
    // A composite without attributes prints as `()`.
    if !c.eat(b')') || !c.done() {
        return false;
    }
    out.push(b'}');
    true
}

// ----------------------------------------------------------------------------------- ranges

/// `[1,5)`, `(,"2020-01-01 00:00:00+00"]`, `empty` → `{"lower":…,"upper":…,"lower_inc":…,
/// "upper_inc":…}` (a null bound is unbounded), or `{"empty":true}`.
pub fn write_range(out: &mut Vec<u8>, sub: &Kind, text: &[u8]) -> bool {
    let mut c = Cur::new(text);
    range_at(out, sub, &mut c).is_some() && c.done()
}

fn range_at(out: &mut Vec<u8>, sub: &Kind, c: &mut Cur<'_>) -> Option<()> {
    let rest = &c.s[c.i..];
    if rest.len() >= 5 && rest[..5].eq_ignore_ascii_case(b"empty") {
        c.i += 5;
        out.extend_from_slice(b"{\"empty\":true}");
        return Some(());
    }
    let lower_inc = match c.peek()? {
        b'[' => true,
        b'(' => false,
        _ => return None,
    };
    c.i += 1;
    let lower = field(c, b",")?;
    if !c.eat(b',') {
        return None;
    }
    let upper = field(c, b"])")?;
    let upper_inc = c.peek()? == b']';
    c.i += 1;
    out.extend_from_slice(b"{\"lower\":");
    write_item(out, sub, &lower);
    out.extend_from_slice(b",\"upper\":");
    write_item(out, sub, &upper);
    out.extend_from_slice(if lower_inc {
        b",\"lower_inc\":true"
    } else {
        b",\"lower_inc\":false"
    });
    out.extend_from_slice(if upper_inc {
        b",\"upper_inc\":true}"
    } else {
        b",\"upper_inc\":false}"
    });
    Some(())
}

/// `{[1,3),[5,7)}` → an array of range objects.
pub fn write_multirange(out: &mut Vec<u8>, sub: &Kind, text: &[u8]) -> bool {
    let mut c = Cur::new(text);
    let parsed = (|| {
        if !c.eat(b'{') {
            return None;
        }
        out.push(b'[');
        c.skip_ws();
        if c.eat(b'}') {
            out.push(b']');
            return Some(());
        }
        loop {
            c.skip_ws();
            range_at(out, sub, &mut c)?;
            c.skip_ws();
            match c.peek()? {
                b',' => out.push(b','),
                b'}' => {
                    c.i += 1;
                    out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
            c.i += 1;
        }
    })();
    parsed.is_some() && c.done()
}

// ----------------------------------------------------------------------------------- hstore

/// `"a"=>"1", "b"=>NULL` → `{"a":"1","b":null}`.
pub fn write_hstore(out: &mut Vec<u8>, text: &[u8]) -> bool {
    let mut c = Cur::new(text);
    let parsed = (|| {
        out.push(b'{');
        c.skip_ws();
        let mut first = true;
        while !c.done() {
            if !first {
                if !c.eat(b',') {
                    return None;
                }
                c.skip_ws();
                out.push(b',');
            }
            first = false;
            let key = hstore_token(&mut c)??;
            c.skip_ws();
            if !(c.eat(b'=') && c.eat(b'>')) {
                return None;
            }
            c.skip_ws();
            let value = hstore_token(&mut c)?;
            write_str(out, &key);
            out.push(b':');
            match value {
                None => out.extend_from_slice(b"null"),
                Some(v) => write_str(out, &v),
            }
            c.skip_ws();
        }
        out.push(b'}');
        Some(())
    })();
    parsed.is_some()
}

fn hstore_token<'a>(c: &mut Cur<'a>) -> Option<Item<'a>> {
    if c.eat(b'"') {
        return quoted_backslash(c).map(Some);
    }
    let start = c.i;
    while let Some(b) = c.peek() {
        if b.is_ascii_whitespace() || matches!(b, b',' | b'=' | b'"' | b'\\') {
            break;
        }
        c.i += 1;
    }
    let raw = &c.s[start..c.i];
    if raw.is_empty() {
        None
    } else if raw.eq_ignore_ascii_case(b"NULL") {
        Some(None)
    } else {
        Some(Some(Cow::Borrowed(raw)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::kind::Kind;

    fn enc(kind: &Kind, text: &str) -> String {
        let mut out = Vec::new();
        write_text(&mut out, kind, text.as_bytes());
        String::from_utf8(out).unwrap()
    }

    fn array(elem: Kind) -> Kind {
        Kind::Array(Arc::new(ArrayKind { elem, delim: b',' }))
    }

    #[test]
    fn arrays() {
        let ints = array(Kind::Int);
        assert_eq!(enc(&ints, "{}"), "[]");
        assert_eq!(enc(&ints, "{1,-2,NULL}"), "[1,-2,null]");
        assert_eq!(enc(&ints, "{{1,2},{NULL,4}}"), "[[1,2],[null,4]]");
        assert_eq!(enc(&ints, "[0:1]={7,8}"), "[7,8]");
        let texts = array(Kind::Text);
        assert_eq!(
            enc(
                &texts,
                r#"{"a b","NULL",NULL,"x\"y","",plain,"back\\slash"}"#
            ),
            r#"["a b","NULL",null,"x\"y","","plain","back\\slash"]"#
        );
        assert_eq!(enc(&texts, "{é,ü}"), r#"["é","ü"]"#);
        let jsons = array(Kind::Json);
        assert_eq!(
            enc(&jsons, r#"{"{\"a\": 1}","[1, 2]",NULL}"#),
            r#"[{"a":1},[1,2],null]"#
        );
        let boxes = Kind::Array(Arc::new(ArrayKind {
            elem: Kind::Text,
            delim: b';',
        }));
        assert_eq!(
            enc(&boxes, "{(1,1),(0,0);(3,3),(2,2)}"),
            r#"["(1,1),(0,0)","(3,3),(2,2)"]"#
        );
        // Malformed: the whole text as a string.
        for bad in [
            "{1,2",
            "{1,,2}",
            "1,2",
            "{1}}",
            "{\"a}",
            "{{1},2",
            "[1:2]{1,2}",
            "{1,2}x",
        ] {
            assert_eq!(enc(&ints, bad), enc(&Kind::Text, bad), "{bad}");
        }
    }

    #[test]
    fn records() {
        let fields: Arc<[Field]> = vec![
            Field::new("id", Kind::Int),
            Field::new("name", Kind::Text),
            Field::new("missing", Kind::Text),
            Field::new("empty", Kind::Text),
            Field::new("quote", Kind::Text),
            Field::new("tags", array(Kind::Text)),
        ]
        .into();
        let rec = Kind::Composite(fields);
        assert_eq!(
            enc(&rec, r#"(1,"a b",,"","x""y\\","{a,""b c""}")"#),
            r#"{"id":1,"name":"a b","missing":null,"empty":"","quote":"x\"y\\","tags":["a","b c"]}"#
        );
        assert_eq!(
            enc(&rec, "(1,a)"),
            r#""(1,a)""#,
            "too few fields is malformed"
        );
        assert_eq!(enc(&rec, "(1,a,b,c,d,{},e)"), r#""(1,a,b,c,d,{},e)""#);
        let empty = Kind::Composite(Vec::new().into());
        assert_eq!(enc(&empty, "()"), "{}");
    }

    #[test]
    fn ranges_and_multiranges() {
        let r = Kind::Range(Arc::new(Kind::Int));
        assert_eq!(
            enc(&r, "[1,5)"),
            r#"{"lower":1,"upper":5,"lower_inc":true,"upper_inc":false}"#
        );
        assert_eq!(
            enc(&r, "(,5]"),
            r#"{"lower":null,"upper":5,"lower_inc":false,"upper_inc":true}"#
        );
        assert_eq!(enc(&r, "empty"), r#"{"empty":true}"#);
        let tr = Kind::Range(Arc::new(Kind::TimestampTz));
        assert_eq!(
            enc(
                &tr,
                r#"["2020-01-01 00:00:00+00","2020-02-01 00:00:00+00")"#
            ),
            r#"{"lower":"2020-01-01T00:00:00Z","upper":"2020-02-01T00:00:00Z","lower_inc":true,"upper_inc":false}"#
        );
        let m = Kind::Multirange(Arc::new(Kind::Int));
        assert_eq!(enc(&m, "{}"), "[]");
        assert_eq!(
            enc(&m, "{[1,3), [5,7)}"),
            r#"[{"lower":1,"upper":3,"lower_inc":true,"upper_inc":false},{"lower":5,"upper":7,"lower_inc":true,"upper_inc":false}]"#
        );
        for bad in ["[1,5", "1,5)", "[1;5)", "[1,5)x", "emptyx"] {
            assert_eq!(enc(&r, bad), enc(&Kind::Text, bad), "{bad}");
        }
    }

    #[test]
    fn hstore() {
        assert_eq!(enc(&Kind::Hstore, ""), "{}");
        assert_eq!(
            enc(&Kind::Hstore, r#""a"=>"1", "b c"=>NULL, "q\"\\"=>"NULL""#),
            r#"{"a":"1","b c":null,"q\"\\":"NULL"}"#
        );
        assert_eq!(enc(&Kind::Hstore, "a=>b"), r#"{"a":"b"}"#);
        for bad in [r#""a"=>"#, r#""a"=>"b" "c"=>"d""#, r#""a""#, r#"NULL=>"b""#] {
            assert_eq!(enc(&Kind::Hstore, bad), enc(&Kind::Text, bad), "{bad}");
        }
    }

    fn kinds() -> Vec<Kind> {
        let rec = Kind::Composite(
            vec![
                Field::new("a", Kind::Int),
                Field::new("b", array(Kind::Range(Arc::new(Kind::Date)))),
            ]
            .into(),
        );
        vec![
            array(Kind::Int),
            array(array(Kind::Json)),
            array(rec.clone()),
            rec,
            Kind::Range(Arc::new(Kind::Timestamp)),
            Kind::Multirange(Arc::new(Kind::Numeric)),
            Kind::Hstore,
        ]
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_always_valid_json(
            k in 0usize..7,
            text in proptest::collection::vec(proptest::sample::select(b"{}[]()\",\\;:=> NULempty01ax-".to_vec()), 0..48),
        ) {
            let kind = &kinds()[k];
            let mut out = Vec::new();
            write_text(&mut out, kind, &text);
            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "{}", String::from_utf8_lossy(&out));
        }

        #[test]
        fn arbitrary_bytes_never_panic(k in 0usize..7, text in proptest::collection::vec(proptest::num::u8::ANY, 0..48)) {
            let mut out = Vec::new();
            write_text(&mut out, &kinds()[k], &text);
            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        }

        #[test]
        fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of(".{0,6}"), 0..6)) {
            // Quote every element the way array_out does for the hard cases.
            let body: Vec<String> = items.iter().map(|i| match i {
                None => "NULL".to_string(),
                Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            }).collect();
            let text = format!("{{{}}}", body.join(","));
            let out = enc(&array(Kind::Text), &text);
            let back: Vec<Option<String>> = serde_json::from_str(&out).unwrap();
            proptest::prop_assert_eq!(back, items);
        }
    }
}
