//! Parsing of `COPY ... TO STDOUT` text format rows.
//!
//! Text COPY prints each value with its type's output function — the same text pgoutput
//! sends for a streamed row — so a snapshot row and a streamed row encode to the same JSON.
//! Rows end with `\n`, fields are separated by `\t`, `\N` is NULL, and backslash escapes
//! (`\t`, `\n`, `\\`, octal, `\x` hex, ...) stand for bytes that would be ambiguous.

use std::borrow::Cow;

/// A malformed COPY row. PostgreSQL does not produce these; a parser still must not panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyTextError {
    #[error("COPY row has {found} fields, expected {expected}")]
    FieldCount { expected: usize, found: usize },
    #[error("COPY row ends inside a backslash escape")]
    DanglingEscape,
}

/// One field of a row: `None` for NULL, the unescaped bytes otherwise.
pub type Field<'a> = Option<Cow<'a, [u8]>>;

/// Splits one row (without its trailing newline) into `out`, unescaping where needed.
/// Fields without backslashes borrow from `row`.
pub fn parse_row<'a>(
    row: &'a [u8],
    expected: usize,
    out: &mut Vec<Field<'a>>,
) -> Result<(), CopyTextError> {
    out.clear();
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let mut start = 0;
    // One scan per field finds its end or its first backslash; only fields with escapes
    // (rare) are looked at twice. An empty row is one empty field: a one-column row of ''.
    loop {
        let rest = &row[start..];
        let (end, escaped) = match memchr::memchr2(b'\t', b'\\', rest) {
            Some(k) if rest[k] == b'\\' => {
                let end = memchr::memchr(b'\t', &rest[k..]).map_or(row.len(), |e| start + k + e);
                (end, true)
            }
            Some(k) => (start + k, false),
            None => (row.len(), false),
        };
        let raw = &row[start..end];
        out.push(if escaped {
            unescape_field(raw)?
        } else {
            Some(Cow::Borrowed(raw))
        });
        if end == row.len() {
            break;
        }
        start = end + 1;
    }
    if out.len() != expected {
        return Err(CopyTextError::FieldCount {
            expected,
            found: out.len(),
        });
    }
    Ok(())
}

/// A field holding at least one backslash: `\N`, or a value to unescape.
fn unescape_field(raw: &[u8]) -> Result<Field<'_>, CopyTextError> {
    if raw == b"\\N" {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&e) = raw.get(i + 1) else {
            return Err(CopyTextError::DanglingEscape);
        };
        i += 2;
        match e {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v: u32 = u32::from(e - b'0');
                let mut k = 0;
                while k < 2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                            k += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let mut v: u32 = 0;
                let mut k = 0;
                while k < 2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            k += 1;
                        }
                        None => break,
                    }
                }
                if k == 0 {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    Ok(Some(Cow::Owned(out)))
}

/// Reassembles whole rows from the server's COPY messages. PostgreSQL sends one row per
/// message, but nothing in the protocol promises it, so a row split across messages is joined.
#[derive(Debug, Default)]
pub struct RowBuffer {
    partial: Vec<u8>,
    /// `partial` was handed out whole and is cleared on the next call.
    consumed: bool,
}

/// The rows of `data`, each with its trailing newline (a final row without one included).
pub fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', data)
        .map(|i| i + 1)
        .chain(std::iter::once(data.len()))
        .filter_map(move |end| {
            let line = data.get(start..end).filter(|l| !l.is_empty());
            start = end;
            line
        })
}

impl RowBuffer {
    /// The complete rows available after `chunk` (newline-terminated, ready for [`lines`]),
    /// or `None` while a row is still incomplete.
    pub fn complete<'a>(&'a mut self, chunk: &'a [u8]) -> Option<&'a [u8]> {
        if self.consumed {
            self.partial.clear();
            self.consumed = false;
        }
        if self.partial.is_empty() && chunk.ends_with(b"\n") {
            return Some(chunk);
        }
        self.partial.extend_from_slice(chunk);
        if !self.partial.ends_with(b"\n") {
            return None;
        }
        self.consumed = true;
        Some(&self.partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(row: &[u8], n: usize) -> Vec<Option<Vec<u8>>> {
        let mut out = Vec::new();
        parse_row(row, n, &mut out).unwrap();
        out.into_iter().map(|f| f.map(|c| c.into_owned())).collect()
    }

    #[test]
    fn lines_match_split_inclusive() {
        for data in [&b""[..], b"\n", b"a\n", b"a\nbc\n", b"a\nb", b"\n\nx\n"] {
            let ours: Vec<&[u8]> = lines(data).collect();
            let std: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
            assert_eq!(ours, std, "{data:?}");
        }
    }

    #[test]
    fn plain_null_and_escapes() {
        assert_eq!(
            parse(b"1\t\\N\ta\\tb\\nc\\\\\n", 3),
            vec![Some(b"1".to_vec()), None, Some(b"a\tb\nc\\".to_vec())]
        );
        assert_eq!(parse(b"\\101\\x41\\q", 1), vec![Some(b"AAq".to_vec())]);
        assert_eq!(parse(b"", 1), vec![Some(Vec::new())]);
        assert_eq!(parse(b"\t", 2), vec![Some(Vec::new()), Some(Vec::new())]);
    }

    #[test]
    fn errors_instead_of_panics() {
        let mut out = Vec::new();
        assert_eq!(
            parse_row(b"a\\", 1, &mut out),
            Err(CopyTextError::DanglingEscape)
        );
        assert!(matches!(
            parse_row(b"a\tb", 1, &mut out),
            Err(CopyTextError::FieldCount { .. })
        ));
    }

    #[test]
    fn rows_split_across_messages_are_joined() {
        let mut buf = RowBuffer::default();
        assert_eq!(buf.complete(b"1\ta\n2\tb\n"), Some(&b"1\ta\n2\tb\n"[..]));
        assert_eq!(buf.complete(b"3\t"), None);
        assert_eq!(buf.complete(b"c\n4"), None);
        assert_eq!(buf.complete(b"\td\n"), Some(&b"3\tc\n4\td\n"[..]));
        assert_eq!(buf.complete(b"5\te\n"), Some(&b"5\te\n"[..]));
    }

    /// The parser as first written: split on tabs, then unescape each field.
    fn reference_parse(row: &[u8], expected: usize) -> Result<Vec<Field<'_>>, CopyTextError> {
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        let mut out = Vec::new();
        for raw in row.split(|&b| b == b'\t') {
            out.push(if raw.contains(&b'\\') {
                unescape_field(raw)?
            } else {
                Some(Cow::Borrowed(raw))
            });
        }
        if out.len() != expected {
            return Err(CopyTextError::FieldCount {
                expected,
                found: out.len(),
            });
        }
        Ok(out)
    }

    proptest::proptest! {
        #[test]
        fn matches_reference(
            row in proptest::collection::vec(
                proptest::sample::select(b"\t\\Nnx0719aF\n ".to_vec()), 0..40),
            n in 0usize..6,
        ) {
            let mut out = Vec::new();
            let got = parse_row(&row, n, &mut out).map(|()| out);
            proptest::prop_assert_eq!(got, reference_parse(&row, n));
        }

        #[test]
        fn never_panics(row in proptest::collection::vec(proptest::num::u8::ANY, 0..64), n in 0usize..5) {
            let mut out = Vec::new();
            let _ = parse_row(&row, n, &mut out);
        }
    }
}
