//! Dates and times from PostgreSQL's ISO text forms to ISO 8601.
//!
//! pgcdc pins `DateStyle=ISO` and `TimeZone=UTC` on its sessions, so values arrive as
//! `2024-01-02 03:04:05.5+00`. ISO 8601 wants a `T` between date and time and `Z` (or
//! `±HH:MM`) for the offset. Years before 1 AD, which PostgreSQL writes with a ` BC`
//! suffix, become astronomical years (1 BC is year `0000`, 2 BC is `-0001`), as ISO 8601
//! counts them. `infinity` and `-infinity` are kept as they are. Anything else that does not
//! look as expected is returned as unparsed (`false`), and the caller writes the text.

use super::json::write_str;

fn is_infinity(text: &[u8]) -> bool {
    matches!(text, b"infinity" | b"-infinity")
}

/// Splits a trailing ` BC`.
fn split_era(text: &[u8]) -> (&[u8], bool) {
    match text.strip_suffix(b" BC") {
        Some(t) => (t, true),
        None => (text, false),
    }
}

/// Writes `YYYY-MM-DD` (more year digits allowed), converting a BC year.
fn push_date(out: &mut Vec<u8>, date: &[u8], bc: bool) -> bool {
    let Some(dash) = date.iter().position(|&b| b == b'-') else {
        return false;
    };
    let (year, rest) = date.split_at(dash);
    let shape_ok = year.len() >= 4
        && year.iter().all(u8::is_ascii_digit)
        && rest.len() == 6
        && rest[3] == b'-'
        && [1, 2, 4, 5].iter().all(|&i| rest[i].is_ascii_digit());
    if !shape_ok {
        return false;
    }
    if bc {
        let Some(y) = std::str::from_utf8(year)
            .ok()
            .and_then(|y| y.parse::<u64>().ok())
            .filter(|y| *y >= 1)
        else {
            return false;
        };
        let astronomical = y - 1;
        if astronomical == 0 {
            out.extend_from_slice(b"0000");
        } else {
            out.extend_from_slice(format!("-{astronomical:04}").as_bytes());
        }
    } else {
        out.extend_from_slice(year);
    }
    out.extend_from_slice(rest);
    true
}

/// `HH:MM:SS[.ffffff]`: digits, colons and one dot.
fn is_clock(t: &[u8]) -> bool {
    t.len() >= 8
        && t[2] == b':'
        && t[5] == b':'
        && t.iter()
            .enumerate()
            .all(|(i, &b)| b.is_ascii_digit() || (i == 2 || i == 5) || (i == 8 && b == b'.'))
        && (t.len() == 8 || (t.len() > 9 && t[8] == b'.'))
}

/// Splits `03:04:05.5+05:30` into the clock and the offset (with its sign).
fn split_offset(t: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = t.iter().position(|&b| b == b'+' || b == b'-')?;
    Some(t.split_at(at))
}

/// Writes an offset `±HH[:MM[:SS]]` as `Z` (when zero and `z` is allowed) or `±HH:MM[:SS]`.
fn push_offset(out: &mut Vec<u8>, off: &[u8], z: bool) -> bool {
    let valid = matches!(off.len(), 3 | 6 | 9)
        && off[1..].iter().enumerate().all(|(i, &b)| {
            if i % 3 == 2 {
                b == b':'
            } else {
                b.is_ascii_digit()
            }
        });
    if !valid {
        return false;
    }
    if z && off[1..].iter().all(|&b| b == b'0' || b == b':') {
        out.push(b'Z');
        return true;
    }
    out.extend_from_slice(off);
    if off.len() == 3 {
        out.extend_from_slice(b":00");
    }
    true
}

/// `date`: `2024-01-02` (or a BC date, or ±infinity).
pub fn write_date(out: &mut Vec<u8>, text: &[u8]) -> bool {
    if is_infinity(text) {
        write_str(out, text);
        return true;
    }
    let (date, bc) = split_era(text);
    out.push(b'"');
    if !push_date(out, date, bc) {
        return false;
    }
    out.push(b'"');
    true
}

/// `timestamp` (`tz = false`) and `timestamptz` (`tz = true`, `Z` when in UTC).
pub fn write_timestamp(out: &mut Vec<u8>, text: &[u8], tz: bool) -> bool {
    if is_infinity(text) {
        write_str(out, text);
        return true;
    }
    let (body, bc) = split_era(text);
    let Some(space) = body.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (date, time) = (&body[..space], &body[space + 1..]);
    out.push(b'"');
    if !push_date(out, date, bc) {
        return false;
    }
    out.push(b'T');
    if tz {
        let Some((clock, off)) = split_offset(time) else {
            return false;
        };
        if !is_clock(clock) {
            return false;
        }
        out.extend_from_slice(clock);
        if !push_offset(out, off, true) {
            return false;
        }
    } else {
        if !is_clock(time) {
            return false;
        }
        out.extend_from_slice(time);
    }
    out.push(b'"');
    true
}

/// `timetz`: `03:04:05+02` becomes `03:04:05+02:00`; the offset is kept (it is data).
pub fn write_timetz(out: &mut Vec<u8>, text: &[u8]) -> bool {
    let Some((clock, off)) = split_offset(text) else {
        return false;
    };
    if !is_clock(clock) {
        return false;
    }
    out.push(b'"');
    out.extend_from_slice(clock);
    if !push_offset(out, off, false) {
        return false;
    }
    out.push(b'"');
    true
}

#[cfg(test)]
mod tests {
    use crate::event::json::write_text;
    use crate::event::kind::Kind;

    fn enc(kind: Kind, text: &str) -> String {
        let mut out = Vec::new();
        write_text(&mut out, &kind, text.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn dates() {
        assert_eq!(enc(Kind::Date, "2024-01-02"), "\"2024-01-02\"");
        assert_eq!(enc(Kind::Date, "0001-01-01 BC"), "\"0000-01-01\"");
        assert_eq!(enc(Kind::Date, "4714-11-24 BC"), "\"-4713-11-24\"");
        assert_eq!(enc(Kind::Date, "5874897-12-31"), "\"5874897-12-31\"");
        assert_eq!(enc(Kind::Date, "-infinity"), "\"-infinity\"");
        assert_eq!(enc(Kind::Date, "01/02/2024"), "\"01/02/2024\"");
        assert_eq!(enc(Kind::Date, "0000-01-01 BC"), "\"0000-01-01 BC\"");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            enc(Kind::Timestamp, "2024-01-02 03:04:05.123456"),
            "\"2024-01-02T03:04:05.123456\""
        );
        assert_eq!(
            enc(Kind::TimestampTz, "2024-01-02 03:04:05+00"),
            "\"2024-01-02T03:04:05Z\""
        );
        assert_eq!(
            enc(Kind::TimestampTz, "0044-03-15 12:00:00.5+00 BC"),
            "\"-0043-03-15T12:00:00.5Z\""
        );
        // Not in UTC (the session setting was overridden): the offset is kept.
        assert_eq!(
            enc(Kind::TimestampTz, "2024-01-02 03:04:05-03:30"),
            "\"2024-01-02T03:04:05-03:30\""
        );
        assert_eq!(enc(Kind::TimestampTz, "infinity"), "\"infinity\"");
        assert_eq!(
            enc(Kind::Timestamp, "Tue Jan 02 03:04:05 2024"),
            "\"Tue Jan 02 03:04:05 2024\""
        );
        assert_eq!(
            enc(Kind::Timestamp, "2024-01-02 03:04:05+00"),
            "\"2024-01-02 03:04:05+00\""
        );
    }

    #[test]
    fn times_with_zone() {
        assert_eq!(enc(Kind::TimeTz, "12:00:00+05:30"), "\"12:00:00+05:30\"");
        assert_eq!(enc(Kind::TimeTz, "12:00:00.25-02"), "\"12:00:00.25-02:00\"");
        assert_eq!(enc(Kind::TimeTz, "12:00:00+00"), "\"12:00:00+00:00\"");
        assert_eq!(
            enc(Kind::TimeTz, "12:00:00-00:00:15"),
            "\"12:00:00-00:00:15\""
        );
        assert_eq!(enc(Kind::TimeTz, "12:00:00"), "\"12:00:00\"");
    }
}
