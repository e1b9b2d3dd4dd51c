//! Binary `COPY ... TO STDOUT` rows, turned back into each value's text form.
//!
//! Why binary at all: with text `COPY` the server runs every value's output function, and for
//! timestamps and numerics that formatting is a large part of what a snapshot costs
//! PostgreSQL (the 1M-row bench table: 1.30 s of backend time in text, 1.10 s in binary).
//! Binary `COPY` sends values as stored, and the formatting moves to pgcdc, where it is
//! cheaper: a timestamp is one integer rather than text to print and parse again.
//!
//! Why back to *text*: a snapshot row must encode to exactly the JSON that the same row would
//! give when streamed, and pgoutput streams text. So this module reproduces the server's
//! output functions, byte for byte, under the settings every pgcdc session pins
//! (`DateStyle=ISO`, `TimeZone=UTC`, `bytea_output=hex`, see [`super::session`]), and hands
//! the encoder the very text it would have received. That is only done for the types listed
//! in [`Conv`], whose binary forms are fixed by PostgreSQL's wire protocol and whose output is
//! simple enough to reproduce exactly; a table with any other column type (floats, arrays,
//! enums, domains, ...) is read with text `COPY` as before. Tests compare this module's text
//! with the server's own for edge values of every listed type.
//!
//! The binary format: a header (signature, flags, extension), then per row a 16-bit field
//! count and per field a 32-bit length (-1 for NULL) and that many bytes, then a trailer
//! (a field count of -1). Everything is big-endian. Reads are checked: malformed input is a
//! [`CopyBinaryError`], never a panic.

use std::ops::Range;

use crate::event::kind::{oid, Kind};
use crate::event::Column;

/// What the server puts before the first row.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Signature, flags and the length of the header extension.
const HEADER_LEN: usize = 11 + 4 + 4;
/// Flag bit 16: every row carries its OID. pgcdc never asks for that.
const FLAG_OIDS: u32 = 1 << 16;

/// Microseconds per day, and days from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const USECS_PER_DAY: i64 = 86_400_000_000;
const PG_EPOCH_DAYS: i64 = 10_957;

/// Malformed binary COPY data. PostgreSQL does not produce it; a parser still must not panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyBinaryError {
    #[error("binary COPY data does not start with PostgreSQL's signature")]
    Signature,
    #[error("binary COPY data has rows with OIDs, which pgcdc does not ask for")]
    Oids,
    #[error("binary COPY row has {found} fields, expected {expected}")]
    FieldCount { expected: usize, found: i64 },
    #[error("binary COPY field has a negative length ({0})")]
    Length(i32),
    #[error("binary COPY row ends inside a field")]
    Truncated,
    #[error("binary COPY data continues after its end marker")]
    AfterEnd,
    #[error("binary COPY value of column `{column}` is malformed: {what}")]
    Value { column: String, what: &'static str },
}

/// How one column's binary value becomes its text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    /// Sent as its text already (`text`, `varchar`, `bpchar`, `name`, `json`).
    Raw,
    /// A version byte (1), then the text.
    Jsonb,
    Numeric,
    Date,
    Timestamp,
    TimestampTz,
    Uuid,
    /// `bytea`: raw bytes, printed as `\x` and hex digits.
    Bytea,
}

/// Type OIDs not in [`oid`] that are read here.
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const NAME: u32 = 19;
const UUID: u32 = 2950;

impl Conv {
    /// The conversion for a column of `type_oid`, or `None` when this module cannot
    /// reproduce that type's text form (the table is then read with text `COPY`).
    pub fn of(type_oid: u32) -> Option<Conv> {
        Some(match type_oid {
            oid::BOOL => Conv::Bool,
            oid::INT2 => Conv::Int2,
            oid::INT4 => Conv::Int4,
            oid::INT8 => Conv::Int8,
            oid::OID => Conv::Oid,
            oid::TEXT | VARCHAR | BPCHAR | NAME | oid::JSON => Conv::Raw,
            oid::JSONB => Conv::Jsonb,
            oid::NUMERIC => Conv::Numeric,
            oid::DATE => Conv::Date,
            oid::TIMESTAMP => Conv::Timestamp,
            oid::TIMESTAMPTZ => Conv::TimestampTz,
            UUID => Conv::Uuid,
            oid::BYTEA => Conv::Bytea,
            _ => return None,
        })
    }

    /// How a table's columns (in attribute order) are read: each one's conversion, and
    /// whether it writes the JSON directly ([`Conv::direct`]); `None` when any column's type
    /// is not handled here.
    pub fn plan(columns: &[Column]) -> Option<Vec<(Conv, bool)>> {
        columns
            .iter()
            .map(|c| Conv::of(c.type_oid).map(|conv| (conv, conv.direct(&c.kind))))
            .collect()
    }

    /// Whether [`to_json`] writes this column's JSON directly, for a column the encoder
    /// encodes as `kind`: integers, booleans, dates and timestamps, whose text the encoder
    /// would otherwise parse again. Other pairs go through [`to_text`].
    pub fn direct(self, kind: &Kind) -> bool {
        matches!(
            (self, kind),
            (Conv::Int2 | Conv::Int4 | Conv::Int8 | Conv::Oid, Kind::Int)
                | (Conv::Bool, Kind::Bool)
                | (Conv::Date, Kind::Date)
                | (Conv::Timestamp, Kind::Timestamp)
                | (Conv::TimestampTz, Kind::TimestampTz)
        )
    }
}

/// Reassembles whole rows from the server's COPY messages and strips the header and the
/// trailer. PostgreSQL sends one row per message (the header with the first), but nothing in
/// the protocol promises it, so a row split across messages is joined.
#[derive(Debug, Default)]
pub struct RowBuffer {
    partial: Vec<u8>,
    /// Bytes at the start of `partial` handed out already; dropped at the next call.
    consumed: usize,
    header_read: bool,
    ended: bool,
}

impl RowBuffer {
    /// The complete rows available after `chunk`, ready for [`next_row`]; empty while a row is
    /// still incomplete.
    pub fn complete<'a>(&'a mut self, chunk: &'a [u8]) -> Result<&'a [u8], CopyBinaryError> {
        if self.consumed > 0 {
            self.partial.drain(..self.consumed);
            self.consumed = 0;
        }
        if self.partial.is_empty() {
            let (rows, used) = self.scan(chunk)?;
            self.partial
                .extend_from_slice(chunk.get(used..).unwrap_or_default());
            return Ok(chunk.get(rows).unwrap_or_default());
        }
        self.partial.extend_from_slice(chunk);
        let mut partial = std::mem::take(&mut self.partial);
        let scanned = self.scan(&partial);
        let (rows, used) = match scanned {
            Ok(r) => r,
            Err(e) => {
                self.partial = partial;
                return Err(e);
            }
        };
        std::mem::swap(&mut self.partial, &mut partial);
        self.consumed = used;
        Ok(self.partial.get(rows).unwrap_or_default())
    }

    /// Whether the trailer arrived and nothing is left over: the data was complete.
    pub fn finished(&self) -> bool {
        self.ended && self.partial.len() == self.consumed
    }

    /// Reads the header if not read yet, then finds the complete rows of `data`: returns their
    /// range and how many bytes of `data` are used up (rows, header and trailer).
    fn scan(&mut self, data: &[u8]) -> Result<(Range<usize>, usize), CopyBinaryError> {
        let mut pos = 0;
        if !self.header_read {
            let Some(header) = data.get(..HEADER_LEN) else {
                return Ok((0..0, 0));
            };
            if header[..11] != SIGNATURE[..] {
                return Err(CopyBinaryError::Signature);
            }
            let flags = be_u32(&header[11..15]);
            if flags & FLAG_OIDS != 0 {
                return Err(CopyBinaryError::Oids);
            }
            let extension = be_u32(&header[15..19]) as usize;
            let Some(end) = HEADER_LEN
                .checked_add(extension)
                .filter(|&e| e <= data.len())
            else {
                return Ok((0..0, 0));
            };
            self.header_read = true;
            pos = end;
        }
        let start = pos;
        let mut rows_end = pos;
        while pos < data.len() {
            if self.ended {
                return Err(CopyBinaryError::AfterEnd);
            }
            match row_len(&data[pos..])? {
                RowLen::Incomplete => break,
                RowLen::Trailer => {
                    self.ended = true;
                    pos += 2;
                }
                RowLen::Row(len) => {
                    pos += len;
                    rows_end = pos;
                }
            }
        }
        Ok((start..rows_end, pos))
    }
}

enum RowLen {
    Row(usize),
    Trailer,
    Incomplete,
}

/// The length of the row at the start of `data` (which holds at least one byte).
fn row_len(data: &[u8]) -> Result<RowLen, CopyBinaryError> {
    let Some(count) = data.get(..2) else {
        return Ok(RowLen::Incomplete);
    };
    let count = i16::from_be_bytes([count[0], count[1]]);
    if count == -1 {
        return Ok(RowLen::Trailer);
    }
    if count < 0 {
        return Err(CopyBinaryError::FieldCount {
            expected: 0,
            found: i64::from(count),
        });
    }
    let mut pos = 2usize;
    for _ in 0..count {
        let Some(len) = data.get(pos..pos + 4) else {
            return Ok(RowLen::Incomplete);
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        pos += 4;
        match len {
            -1 => {}
            l if l < 0 => return Err(CopyBinaryError::Length(l)),
            l => {
                pos += l as usize;
                if pos > data.len() {
                    return Ok(RowLen::Incomplete);
                }
            }
        }
    }
    Ok(RowLen::Row(pos))
}

/// Reads the row at `*pos` of `rows` (complete rows from [`RowBuffer::complete`]) into `out`,
/// one raw value per field (`None` for NULL), and moves `*pos` past it. `Ok(false)` at the end.
pub fn next_row<'a>(
    rows: &'a [u8],
    pos: &mut usize,
    expected: usize,
    out: &mut Vec<Option<&'a [u8]>>,
) -> Result<bool, CopyBinaryError> {
    out.clear();
    let mut p = *pos;
    let Some(count) = rows.get(p..p + 2) else {
        return Ok(false);
    };
    let count = i16::from_be_bytes([count[0], count[1]]);
    if usize::try_from(count).ok() != Some(expected) {
        return Err(CopyBinaryError::FieldCount {
            expected,
            found: i64::from(count),
        });
    }
    p += 2;
    for _ in 0..expected {
        let len = rows.get(p..p + 4).ok_or(CopyBinaryError::Truncated)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        p += 4;
        if len == -1 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| CopyBinaryError::Length(len))?;
        let value = rows.get(p..p + len).ok_or(CopyBinaryError::Truncated)?;
        out.push(Some(value));
        p += len;
    }
    *pos = p;
    Ok(true)
}

/// A converted value: its text form — the raw bytes themselves, or a range of the scratch
/// buffer — or, from [`to_json`], the range of the scratch buffer holding its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text<'a> {
    Borrowed(&'a [u8]),
    Written(Range<usize>),
    Json(Range<usize>),
}

/// Writes to `scratch` the JSON that [`crate::event::json::write_text`] writes for the text
/// form of `raw`, for a pair [`Conv::direct`] accepts (tests hold the two paths equal).
pub fn to_json<'a>(
    conv: Conv,
    raw: &'a [u8],
    scratch: &mut Vec<u8>,
) -> Result<Text<'a>, &'static str> {
    let start = scratch.len();
    match conv {
        Conv::Bool => match raw {
            [0] => scratch.extend_from_slice(b"false"),
            [_] => scratch.extend_from_slice(b"true"),
            _ => return Err("bool is not one byte"),
        },
        Conv::Date => {
            let v = i32::from_be_bytes(fixed(raw, "date is not 4 bytes")?);
            match v {
                i32::MIN => scratch.extend_from_slice(b"\"-infinity\""),
                i32::MAX => scratch.extend_from_slice(b"\"infinity\""),
                _ => {
                    scratch.push(b'"');
                    push_iso_ymd(scratch, civil_from_days(i64::from(v) + PG_EPOCH_DAYS));
                    scratch.push(b'"');
                }
            }
        }
        Conv::Timestamp | Conv::TimestampTz => {
            let v = i64::from_be_bytes(fixed(raw, "timestamp is not 8 bytes")?);
            match v {
                i64::MIN => scratch.extend_from_slice(b"\"-infinity\""),
                i64::MAX => scratch.extend_from_slice(b"\"infinity\""),
                _ => {
                    scratch.push(b'"');
                    let days = v.div_euclid(USECS_PER_DAY);
                    push_iso_ymd(scratch, civil_from_days(days + PG_EPOCH_DAYS));
                    scratch.push(b'T');
                    push_clock(scratch, v.rem_euclid(USECS_PER_DAY));
                    if conv == Conv::TimestampTz {
                        scratch.push(b'Z');
                    }
                    scratch.push(b'"');
                }
            }
        }
        // Integers: the text is the JSON.
        _ => {
            return match to_text(conv, raw, scratch)? {
                Text::Written(r) => Ok(Text::Json(r)),
                other => Ok(other),
            }
        }
    }
    Ok(Text::Json(start..scratch.len()))
}

/// Writes the text form of `raw` (a value converted by `conv`) to `scratch`, or borrows it
/// when the binary form is the text. `Err` names what is wrong with the value.
pub fn to_text<'a>(
    conv: Conv,
    raw: &'a [u8],
    scratch: &mut Vec<u8>,
) -> Result<Text<'a>, &'static str> {
    let start = scratch.len();
    match conv {
        Conv::Raw => return Ok(Text::Borrowed(raw)),
        Conv::Jsonb => {
            return match raw.split_first() {
                Some((1, text)) => Ok(Text::Borrowed(text)),
                Some(_) => Err("unknown jsonb version"),
                None => Err("empty jsonb value"),
            };
        }
        Conv::Bool => match raw {
            [0] => scratch.push(b'f'),
            [_] => scratch.push(b't'),
            _ => return Err("bool is not one byte"),
        },
        Conv::Int2 => {
            let v = i16::from_be_bytes(fixed(raw, "int2 is not 2 bytes")?);
            push_int(scratch, v);
        }
        Conv::Int4 => {
            let v = i32::from_be_bytes(fixed(raw, "int4 is not 4 bytes")?);
            push_int(scratch, v);
        }
        Conv::Int8 => {
            let v = i64::from_be_bytes(fixed(raw, "int8 is not 8 bytes")?);
            push_int(scratch, v);
        }
        Conv::Oid => {
            let v = u32::from_be_bytes(fixed(raw, "oid is not 4 bytes")?);
            push_int(scratch, v);
        }
        Conv::Numeric => write_numeric(raw, scratch)?,
        Conv::Date => {
            let v = i32::from_be_bytes(fixed(raw, "date is not 4 bytes")?);
            write_date(v, scratch);
        }
        Conv::Timestamp | Conv::TimestampTz => {
            let v = i64::from_be_bytes(fixed(raw, "timestamp is not 8 bytes")?);
            write_timestamp(v, conv == Conv::TimestampTz, scratch);
        }
        Conv::Uuid => {
            let v: [u8; 16] = fixed(raw, "uuid is not 16 bytes")?;
            for (i, b) in v.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    scratch.push(b'-');
                }
                push_hex(scratch, *b);
            }
        }
        Conv::Bytea => {
            scratch.reserve(2 + 2 * raw.len());
            scratch.extend_from_slice(b"\\x");
            for b in raw {
                push_hex(scratch, *b);
            }
        }
    }
    Ok(Text::Written(start..scratch.len()))
}

fn fixed<const N: usize>(raw: &[u8], what: &'static str) -> Result<[u8; N], &'static str> {
    raw.try_into().map_err(|_| what)
}

fn push_int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn push_hex(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(HEX[usize::from(b >> 4)]);
    out.push(HEX[usize::from(b & 0xf)]);
}

/// `v` in decimal, zero-padded to `width` digits (more digits when it has them).
fn push_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let s = buf.format(v).as_bytes();
    out.resize(out.len() + width.saturating_sub(s.len()), b'0');
    out.extend_from_slice(s);
}

/// `numeric_out`: sign, the integer digits without leading zeros (at least "0"), and exactly
/// `dscale` fractional digits. The binary form is base-10000 digits with a weight (the
/// power of 10000 of the first digit), a sign word and the display scale.
fn write_numeric(raw: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    const POS: u16 = 0x0000;
    const NEG: u16 = 0x4000;
    const NAN: u16 = 0xC000;
    const PINF: u16 = 0xD000;
    const NINF: u16 = 0xF000;
    let header = raw.get(..8).ok_or("numeric header is truncated")?;
    let ndigits = i16::from_be_bytes([header[0], header[1]]);
    let weight = i32::from(i16::from_be_bytes([header[2], header[3]]));
    let sign = u16::from_be_bytes([header[4], header[5]]);
    let dscale = u16::from_be_bytes([header[6], header[7]]);
    let ndigits = usize::try_from(ndigits).map_err(|_| "numeric digit count is negative")?;
    let digits = &raw[8..];
    if digits.len() != 2 * ndigits {
        return Err("numeric digit count does not match its length");
    }
    match sign {
        NAN => {
            out.extend_from_slice(b"NaN");
            return Ok(());
        }
        PINF => {
            out.extend_from_slice(b"Infinity");
            return Ok(());
        }
        NINF => {
            out.extend_from_slice(b"-Infinity");
            return Ok(());
        }
        POS | NEG => {}
        _ => return Err("numeric sign is unknown"),
    }
    if dscale > 0x3FFF {
        return Err("numeric scale is out of range");
    }
    let digit = |d: i32| -> Result<u16, &'static str> {
        let Ok(i) = usize::try_from(d) else {
            return Ok(0);
        };
        match digits.get(2 * i..2 * i + 2) {
            None => Ok(0),
            Some(b) => {
                let v = u16::from_be_bytes([b[0], b[1]]);
                if v >= 10_000 {
                    Err("numeric digit is not below 10000")
                } else {
                    Ok(v)
                }
            }
        }
    };
    if sign == NEG {
        out.push(b'-');
    }
    let mut d: i32;
    if weight < 0 {
        d = weight + 1;
        out.push(b'0');
    } else {
        d = 0;
        while d <= weight {
            let v = digit(d)?;
            if d == 0 {
                push_int(out, v);
            } else {
                push_padded(out, u64::from(v), 4);
            }
            d += 1;
        }
    }
    if dscale > 0 {
        out.push(b'.');
        let end = out.len() + usize::from(dscale);
        while out.len() < end {
            push_padded(out, u64::from(digit(d)?), 4);
            d += 1;
        }
        out.truncate(end);
    }
    Ok(())
}

/// Proleptic Gregorian (year, month, day) of a count of days since 1970-01-01; year 0 is
/// 1 BC. (The civil-from-days algorithm: 400-year eras of 146097 days, from March 1.)
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD` as ISO 8601 writes it: astronomical years (1 BC is `0000`, 2 BC `-0001`).
fn push_iso_ymd(out: &mut Vec<u8>, (year, month, day): (i64, u32, u32)) {
    if year < 0 {
        out.push(b'-');
    }
    push_padded(out, year.unsigned_abs(), 4);
    out.push(b'-');
    push_padded(out, u64::from(month), 2);
    out.push(b'-');
    push_padded(out, u64::from(day), 2);
}

/// `HH:MM:SS[.ffffff]` of microseconds into a day, fractional digits without trailing zeros.
fn push_clock(out: &mut Vec<u8>, time: i64) {
    let secs = time / 1_000_000;
    let frac = time % 1_000_000;
    push_padded(out, (secs / 3600) as u64, 2);
    out.push(b':');
    push_padded(out, (secs / 60 % 60) as u64, 2);
    out.push(b':');
    push_padded(out, (secs % 60) as u64, 2);
    if frac != 0 {
        out.push(b'.');
        let at = out.len();
        push_padded(out, frac as u64, 6);
        while out.len() > at && out.last() == Some(&b'0') {
            out.pop();
        }
    }
}

/// `YYYY-MM-DD` as `DateStyle=ISO` prints it: years before 1 AD as their BC number (the
/// " BC" suffix is the caller's), at least four digits.
fn push_ymd(out: &mut Vec<u8>, (year, month, day): (i64, u32, u32)) {
    let shown = if year > 0 { year } else { 1 - year };
    push_padded(out, shown.unsigned_abs(), 4);
    out.push(b'-');
    push_padded(out, u64::from(month), 2);
    out.push(b'-');
    push_padded(out, u64::from(day), 2);
}

/// `date_out`: days since 2000-01-01; `i32::MIN` and `i32::MAX` are ∓infinity.
fn write_date(days: i32, out: &mut Vec<u8>) {
    match days {
        i32::MIN => out.extend_from_slice(b"-infinity"),
        i32::MAX => out.extend_from_slice(b"infinity"),
        _ => {
            let ymd = civil_from_days(i64::from(days) + PG_EPOCH_DAYS);
            push_ymd(out, ymd);
            if ymd.0 <= 0 {
                out.extend_from_slice(b" BC");
            }
        }
    }
}

/// `timestamp_out` / `timestamptz_out` at `TimeZone=UTC`: microseconds since 2000-01-01
/// 00:00 (UTC); `i64::MIN` and `i64::MAX` are ∓infinity. Fractional seconds are printed
/// without trailing zeros, and `timestamptz` gets the offset `+00`.
fn write_timestamp(us: i64, tz: bool, out: &mut Vec<u8>) {
    match us {
        i64::MIN => out.extend_from_slice(b"-infinity"),
        i64::MAX => out.extend_from_slice(b"infinity"),
        _ => {
            let days = us.div_euclid(USECS_PER_DAY);
            let time = us.rem_euclid(USECS_PER_DAY);
            let ymd = civil_from_days(days + PG_EPOCH_DAYS);
            push_ymd(out, ymd);
            out.push(b' ');
            push_clock(out, time);
            if tz {
                out.extend_from_slice(b"+00");
            }
            if ymd.0 <= 0 {
                out.extend_from_slice(b" BC");
            }
        }
    }
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(conv: Conv, raw: &[u8]) -> String {
        let mut scratch = b"junk".to_vec();
        match to_text(conv, raw, &mut scratch).unwrap() {
            Text::Borrowed(b) => String::from_utf8(b.to_vec()).unwrap(),
            Text::Written(r) | Text::Json(r) => String::from_utf8(scratch[r].to_vec()).unwrap(),
        }
    }

    fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ndigits.to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numerics_print_like_numeric_out() {
        assert_eq!(
            text(Conv::Numeric, &numeric(2, 0, 0, 2, &[8806, 3700])),
            "8806.37"
        );
        assert_eq!(text(Conv::Numeric, &numeric(0, 0, 0, 0, &[])), "0");
        assert_eq!(text(Conv::Numeric, &numeric(0, 0, 0, 3, &[])), "0.000");
        assert_eq!(
            text(Conv::Numeric, &numeric(1, -1, 0x4000, 5, &[1200])),
            "-0.12000"
        );
        assert_eq!(text(Conv::Numeric, &numeric(1, -2, 0, 6, &[5])), "0.000000");
        assert_eq!(
            text(Conv::Numeric, &numeric(1, -2, 0, 8, &[5])),
            "0.00000005"
        );
        assert_eq!(
            text(Conv::Numeric, &numeric(1, 2, 0, 0, &[12])),
            "1200000000"
        );
        assert_eq!(text(Conv::Numeric, &numeric(0, 0, 0xC000, 0, &[])), "NaN");
        assert_eq!(
            text(Conv::Numeric, &numeric(0, 0, 0xD000, 0, &[])),
            "Infinity"
        );
        assert_eq!(
            text(Conv::Numeric, &numeric(0, 0, 0xF000, 0, &[])),
            "-Infinity"
        );
    }

    #[test]
    fn times_print_like_iso_datestyle_in_utc() {
        let ts = |us: i64| text(Conv::TimestampTz, &us.to_be_bytes());
        assert_eq!(ts(0), "2000-01-01 00:00:00+00");
        assert_eq!(ts(-1), "1999-12-31 23:59:59.999999+00");
        assert_eq!(ts(1_500_000), "2000-01-01 00:00:01.5+00");
        assert_eq!(ts(i64::MAX), "infinity");
        assert_eq!(ts(i64::MIN), "-infinity");
        let days = |d: i32| text(Conv::Date, &d.to_be_bytes());
        assert_eq!(days(0), "2000-01-01");
        assert_eq!(days(-730_119), "0001-01-01");
        assert_eq!(days(-730_120), "0001-12-31 BC");
        assert_eq!(days(2_921_940), "10000-01-01");
        let plain = |us: i64| text(Conv::Timestamp, &us.to_be_bytes());
        assert_eq!(plain(-730_120 * USECS_PER_DAY), "0001-12-31 00:00:00 BC");
    }

    #[test]
    fn scalars() {
        assert_eq!(text(Conv::Bool, &[1]), "t");
        assert_eq!(text(Conv::Bool, &[0]), "f");
        assert_eq!(
            text(Conv::Int8, &i64::MIN.to_be_bytes()),
            i64::MIN.to_string()
        );
        assert_eq!(text(Conv::Int2, &(-7i16).to_be_bytes()), "-7");
        assert_eq!(text(Conv::Jsonb, b"\x01{\"a\": 1}"), "{\"a\": 1}");
        assert_eq!(text(Conv::Bytea, &[0, 0xab]), "\\x00ab");
        assert_eq!(
            text(Conv::Uuid, &(0..16).collect::<Vec<u8>>()),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        let mut s = Vec::new();
        assert!(to_text(Conv::Int4, &[1, 2], &mut s).is_err());
        assert!(to_text(Conv::Jsonb, &[2, b'1'], &mut s).is_err());
        assert!(to_text(Conv::Numeric, &numeric(2, 0, 0, 0, &[1]), &mut s).is_err());
        assert!(to_text(Conv::Numeric, &numeric(1, 0, 0, 0, &[10_000]), &mut s).is_err());
        assert!(to_text(Conv::Numeric, &numeric(-1, 0, 0, 0, &[]), &mut s).is_err());
    }

    fn copy_data(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        for row in rows {
            v.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for f in *row {
                match f {
                    None => v.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(b) => {
                        v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        v.extend_from_slice(b);
                    }
                }
            }
        }
        v.extend_from_slice(&(-1i16).to_be_bytes());
        v
    }

    /// Feeds `data` in chunks of `size` and returns every row's fields.
    fn read_all(
        data: &[u8],
        size: usize,
        n: usize,
    ) -> Result<Vec<Vec<Option<Vec<u8>>>>, CopyBinaryError> {
        let mut buf = RowBuffer::default();
        let mut rows = Vec::new();
        for chunk in data.chunks(size.max(1)) {
            let mut fields = Vec::new();
            let complete = buf.complete(chunk)?;
            let mut pos = 0;
            while next_row(complete, &mut pos, n, &mut fields)? {
                rows.push(fields.iter().map(|f| f.map(<[u8]>::to_vec)).collect());
            }
        }
        assert!(buf.finished());
        Ok(rows)
    }

    #[test]
    fn rows_are_joined_across_any_split() {
        let data = copy_data(&[&[Some(b"ab"), None], &[Some(b""), Some(b"xyz")]]);
        let want = vec![
            vec![Some(b"ab".to_vec()), None],
            vec![Some(Vec::new()), Some(b"xyz".to_vec())],
        ];
        for size in 1..=data.len() {
            assert_eq!(read_all(&data, size, 2).unwrap(), want, "chunks of {size}");
        }
    }

    #[test]
    fn bad_streams_are_errors() {
        let data = copy_data(&[&[Some(b"ab")]]);
        assert_eq!(
            read_all(&data, 100, 2),
            Err(CopyBinaryError::FieldCount {
                expected: 2,
                found: 1
            })
        );
        let mut bad = data.clone();
        bad[0] = b'X';
        assert_eq!(read_all(&bad, 100, 1), Err(CopyBinaryError::Signature));
        let mut extra = data.clone();
        extra.push(0);
        assert_eq!(read_all(&extra, 100, 1), Err(CopyBinaryError::AfterEnd));
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic, whatever the chunking and conversions.
        #[test]
        fn arbitrary_bytes_do_not_panic(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            size in 1usize..40,
            n in 0usize..4,
        ) {
            let mut data = copy_data(&[]);
            data.truncate(HEADER_LEN);
            data.extend_from_slice(&body);
            let mut buf = RowBuffer::default();
            let mut scratch = Vec::new();
            'outer: for chunk in data.chunks(size) {
                let mut fields = Vec::new();
                let Ok(complete) = buf.complete(chunk) else { break };
                let mut pos = 0;
                loop {
                    match next_row(complete, &mut pos, n, &mut fields) {
                        Ok(true) => {
                            for (f, conv) in fields.iter().flatten().zip([
                                Conv::Numeric, Conv::TimestampTz, Conv::Date, Conv::Jsonb,
                            ]) {
                                let _ = to_text(conv, f, &mut scratch);
                            }
                        }
                        Ok(false) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
        }

        #[test]
        fn any_numeric_value_does_not_panic(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let mut scratch = Vec::new();
            let _ = to_text(Conv::Numeric, &raw, &mut scratch);
        }

        /// The direct JSON of a value is what the encoder writes for its text form.
        #[test]
        fn direct_json_is_the_encoded_text(
            us in proptest::num::i64::ANY,
            near in -400_000_000_000_000_000i64..400_000_000_000_000_000,
            days in proptest::num::i32::ANY,
            near_days in -3_000_000i32..3_000_000,
            int in proptest::num::i64::ANY,
        ) {
            let cases = [
                (Conv::Timestamp, Kind::Timestamp, us.to_be_bytes().to_vec()),
                (Conv::TimestampTz, Kind::TimestampTz, us.to_be_bytes().to_vec()),
                (Conv::TimestampTz, Kind::TimestampTz, near.to_be_bytes().to_vec()),
                (Conv::Timestamp, Kind::Timestamp, near.to_be_bytes().to_vec()),
                (Conv::Date, Kind::Date, days.to_be_bytes().to_vec()),
                (Conv::Date, Kind::Date, near_days.to_be_bytes().to_vec()),
                (Conv::Int8, Kind::Int, int.to_be_bytes().to_vec()),
                (Conv::Int4, Kind::Int, (int as i32).to_be_bytes().to_vec()),
                (Conv::Int2, Kind::Int, (int as i16).to_be_bytes().to_vec()),
                (Conv::Oid, Kind::Int, (int as u32).to_be_bytes().to_vec()),
                (Conv::Bool, Kind::Bool, vec![int as u8]),
            ];
            for (conv, kind, raw) in cases {
                proptest::prop_assert!(conv.direct(&kind));
                let mut scratch = Vec::new();
                let Text::Json(r) = to_json(conv, &raw, &mut scratch).unwrap() else {
                    panic!("not JSON");
                };
                let direct = scratch[r].to_vec();
                let mut scratch = Vec::new();
                let Text::Written(r) = to_text(conv, &raw, &mut scratch).unwrap() else {
                    panic!("not written");
                };
                let mut encoded = Vec::new();
                crate::event::json::write_text(&mut encoded, &kind, &scratch[r]);
                proptest::prop_assert_eq!(
                    String::from_utf8_lossy(&direct),
                    String::from_utf8_lossy(&encoded)
                );
            }
        }

        #[test]
        fn any_timestamp_prints(us in proptest::num::i64::ANY, days in proptest::num::i32::ANY) {
            let mut scratch = Vec::new();
            write_timestamp(us, true, &mut scratch);
            write_date(days, &mut scratch);
        }
    }
}
