//! The payloads of `CopyData` messages during streaming replication: pure encoding
//! and decoding, no I/O.
//!
//! Server to client:
//!
//! * `w` XLogData: `Int64` start of the data in the WAL, `Int64` current end of WAL on
//!   the server, `Int64` server clock, then the data (for logical replication, one
//!   pgoutput message).
//! * `k` primary keepalive: `Int64` current end of WAL, `Int64` server clock, `Byte1`
//!   1 if the server wants a status update right away.
//!
//! Client to server:
//!
//! * `r` standby status update: `Int64` written, flushed and applied positions,
//!   `Int64` client clock, `Byte1` 1 to ask the server for a keepalive reply.
//!
//! Clocks are microseconds since 2000-01-01 00:00:00 UTC; all integers big-endian.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes};

use crate::model::Lsn;

/// Microseconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

const XLOG_DATA_TAG: u8 = b'w';
const KEEPALIVE_TAG: u8 = b'k';
const STANDBY_STATUS_TAG: u8 = b'r';

/// Length of the `w` header before the data: tag + 3 × Int64.
pub const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// Length of a `k` message: tag + 2 × Int64 + Byte1.
pub const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// Length of an `r` message: tag + 4 × Int64 + Byte1.
pub const STANDBY_STATUS_LEN: usize = 1 + 8 * 4 + 1;

/// A message from the server during logical replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: for logical replication, one output-plugin message in `data`.
    XLogData {
        /// Where this message starts in the WAL (0/0 for some pgoutput messages).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock when sending, µs since 2000-01-01 UTC.
        server_time_us: i64,
        data: Bytes,
    },
    /// A heartbeat. When `reply_requested`, the server wants a standby status update
    /// soon, or it will end the connection after `wal_sender_timeout`.
    PrimaryKeepalive {
        wal_end: Lsn,
        server_time_us: i64,
        reply_requested: bool,
    },
}

/// A decoded standby status update (the client's `r` message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatus {
    pub written: Lsn,
    pub flushed: Lsn,
    pub applied: Lsn,
    pub client_time_us: i64,
    pub reply_requested: bool,
}

/// Why a CopyData payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty CopyData message")]
    Empty,
    #[error("{what} message is {got} bytes long, at least {needed} expected")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("unknown CopyData message type {tag:?} (0x{byte:02x}); expected 'w' (XLogData) or 'k' (keepalive)", tag = char::from(*.byte))]
    UnknownTag { byte: u8 },
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn be_i64(b: &[u8], at: usize) -> Option<i64> {
    be_u64(b, at).map(|v| v as i64)
}

/// Decodes a server-to-client CopyData payload (`w` or `k`). The XLogData `data`
/// shares `payload`'s buffer: no copy.
pub fn decode(payload: Bytes) -> Result<ReplicationMessage, WireError> {
    let tag = *payload.first().ok_or(WireError::Empty)?;
    match tag {
        XLOG_DATA_TAG => {
            let truncated = || WireError::Truncated {
                what: "XLogData",
                needed: XLOG_DATA_HEADER_LEN,
                got: payload.len(),
            };
            if payload.len() < XLOG_DATA_HEADER_LEN {
                return Err(truncated());
            }
            let wal_start = be_u64(&payload, 1).ok_or_else(truncated)?;
            let wal_end = be_u64(&payload, 9).ok_or_else(truncated)?;
            let server_time_us = be_i64(&payload, 17).ok_or_else(truncated)?;
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(wal_start),
                wal_end: Lsn(wal_end),
                server_time_us,
                data: payload.slice(XLOG_DATA_HEADER_LEN..),
            })
        }
        KEEPALIVE_TAG => {
            let truncated = || WireError::Truncated {
                what: "primary keepalive",
                needed: KEEPALIVE_LEN,
                got: payload.len(),
            };
            let wal_end = be_u64(&payload, 1).ok_or_else(truncated)?;
            let server_time_us = be_i64(&payload, 9).ok_or_else(truncated)?;
            let reply = *payload.get(17).ok_or_else(truncated)?;
            Ok(ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(wal_end),
                server_time_us,
                reply_requested: reply != 0,
            })
        }
        byte => Err(WireError::UnknownTag { byte }),
    }
}

/// Encodes a standby status update (`r`) payload, to be wrapped in CopyData.
pub fn encode_standby_status(status: &StandbyStatus) -> [u8; STANDBY_STATUS_LEN] {
    let mut out = [0u8; STANDBY_STATUS_LEN];
    let mut buf = &mut out[..];
    buf.put_u8(STANDBY_STATUS_TAG);
    buf.put_u64(status.written.0);
    buf.put_u64(status.flushed.0);
    buf.put_u64(status.applied.0);
    buf.put_i64(status.client_time_us);
    buf.put_u8(u8::from(status.reply_requested));
    out
}

/// Decodes a standby status update payload (what a server would read); used in tests
/// and for symmetry.
pub fn decode_standby_status(payload: &[u8]) -> Result<StandbyStatus, WireError> {
    match payload.first() {
        None => return Err(WireError::Empty),
        Some(&STANDBY_STATUS_TAG) => {}
        Some(&byte) => return Err(WireError::UnknownTag { byte }),
    }
    let truncated = || WireError::Truncated {
        what: "standby status update",
        needed: STANDBY_STATUS_LEN,
        got: payload.len(),
    };
    Ok(StandbyStatus {
        written: Lsn(be_u64(payload, 1).ok_or_else(truncated)?),
        flushed: Lsn(be_u64(payload, 9).ok_or_else(truncated)?),
        applied: Lsn(be_u64(payload, 17).ok_or_else(truncated)?),
        client_time_us: be_i64(payload, 25).ok_or_else(truncated)?,
        reply_requested: *payload.get(33).ok_or_else(truncated)? != 0,
    })
}

/// A wall-clock time as µs since 2000-01-01 UTC (negative before it).
pub fn pg_time_us(t: SystemTime) -> i64 {
    let unix_us = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    };
    unix_us.saturating_sub(PG_EPOCH_OFFSET_US)
}

/// The current time as µs since 2000-01-01 UTC.
pub fn pg_now_us() -> i64 {
    pg_time_us(SystemTime::now())
}

/// A PostgreSQL timestamp (µs since 2000-01-01 UTC) as a `SystemTime`.
pub fn system_time_from_pg_us(us: i64) -> SystemTime {
    let unix_us = us.saturating_add(PG_EPOCH_OFFSET_US);
    if unix_us >= 0 {
        UNIX_EPOCH + Duration::from_micros(unix_us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(unix_us.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xlog(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
        let mut v = vec![b'w'];
        v.extend_from_slice(&start.to_be_bytes());
        v.extend_from_slice(&end.to_be_bytes());
        v.extend_from_slice(&time.to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn decodes_xlog_data() {
        let bytes = xlog(0x16_B374_D848, 0x16_B374_D900, 123_456, b"B\x00\x01");
        let msg = decode(Bytes::from(bytes)).unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::XLogData {
                wal_start: "16/B374D848".parse().unwrap(),
                wal_end: "16/B374D900".parse().unwrap(),
                server_time_us: 123_456,
                data: Bytes::from_static(b"B\x00\x01"),
            }
        );
        // Empty data is fine.
        let msg = decode(Bytes::from(xlog(1, 2, -5, b""))).unwrap();
        assert!(
            matches!(msg, ReplicationMessage::XLogData { data, server_time_us: -5, .. } if data.is_empty())
        );
    }

    #[test]
    fn decodes_keepalive() {
        let mut v = vec![b'k'];
        v.extend_from_slice(&0x0000_0001_0000_0010u64.to_be_bytes());
        v.extend_from_slice(&42i64.to_be_bytes());
        v.push(1);
        assert_eq!(
            decode(Bytes::from(v.clone())).unwrap(),
            ReplicationMessage::PrimaryKeepalive {
                wal_end: "1/10".parse().unwrap(),
                server_time_us: 42,
                reply_requested: true,
            }
        );
        v[17] = 0;
        assert!(matches!(
            decode(Bytes::from(v)).unwrap(),
            ReplicationMessage::PrimaryKeepalive {
                reply_requested: false,
                ..
            }
        ));
    }

    #[test]
    fn truncated_input_is_a_typed_error() {
        let full = xlog(1, 2, 3, b"");
        for len in 1..XLOG_DATA_HEADER_LEN {
            let err = decode(Bytes::copy_from_slice(&full[..len])).unwrap_err();
            assert_eq!(
                err,
                WireError::Truncated {
                    what: "XLogData",
                    needed: XLOG_DATA_HEADER_LEN,
                    got: len
                }
            );
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&[0; 17]);
        for len in 1..KEEPALIVE_LEN {
            assert!(matches!(
                decode(Bytes::copy_from_slice(&k[..len])),
                Err(WireError::Truncated {
                    what: "primary keepalive",
                    ..
                })
            ));
        }
        assert_eq!(decode(Bytes::new()), Err(WireError::Empty));
        let err = decode(Bytes::from_static(b"zzz")).unwrap_err();
        assert_eq!(err, WireError::UnknownTag { byte: b'z' });
        assert!(err.to_string().contains("'z'"), "{err}");
    }

    #[test]
    fn encodes_standby_status() {
        let status = StandbyStatus {
            written: Lsn(0x0102_0304_0506_0708),
            flushed: Lsn(0x10),
            applied: Lsn(0x20),
            client_time_us: 0x0A0B_0C0D,
            reply_requested: true,
        };
        let bytes = encode_standby_status(&status);
        assert_eq!(bytes.len(), 34);
        assert_eq!(bytes[0], b'r');
        assert_eq!(&bytes[1..9], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[9..17], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(&bytes[17..25], &[0, 0, 0, 0, 0, 0, 0, 0x20]);
        assert_eq!(&bytes[25..33], &[0, 0, 0, 0, 0x0A, 0x0B, 0x0C, 0x0D]);
        assert_eq!(bytes[33], 1);
        assert_eq!(decode_standby_status(&bytes).unwrap(), status);
        assert!(matches!(
            decode_standby_status(&bytes[..33]),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn clock_conversion() {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(pg_time_us(pg_epoch), 0);
        assert_eq!(pg_time_us(pg_epoch + Duration::from_micros(7)), 7);
        assert_eq!(
            system_time_from_pg_us(7),
            pg_epoch + Duration::from_micros(7)
        );
        assert_eq!(pg_time_us(UNIX_EPOCH), -PG_EPOCH_OFFSET_US);
        assert_eq!(
            system_time_from_pg_us(-PG_EPOCH_OFFSET_US - 1),
            UNIX_EPOCH - Duration::from_micros(1)
        );
        assert!(pg_now_us() > 0);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(Bytes::from(bytes.clone()));
            let _ = decode_standby_status(&bytes);
        }

        #[test]
        fn xlog_round_trip(start: u64, end: u64, time: i64, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let msg = decode(Bytes::from(xlog(start, end, time, &data))).unwrap();
            prop_assert_eq!(msg, ReplicationMessage::XLogData {
                wal_start: Lsn(start), wal_end: Lsn(end), server_time_us: time, data: Bytes::from(data),
            });
        }

        #[test]
        fn standby_round_trip(w: u64, f: u64, a: u64, t: i64, r: bool) {
            let s = StandbyStatus { written: Lsn(w), flushed: Lsn(f), applied: Lsn(a), client_time_us: t, reply_requested: r };
            prop_assert_eq!(decode_standby_status(&encode_standby_status(&s)).unwrap(), s);
        }
    }
}
