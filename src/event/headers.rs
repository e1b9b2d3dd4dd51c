//! The Kafka headers pgcdc puts on its records, and the event id's format.
//!
//! Header names are NUL-terminated (librdkafka takes C strings) and shared: a builder makes
//! each [`Arc`] once and clones it per record.
//!
//! An event id is unique within its topic and the same whenever the event is published again
//! (after a crash, the server resends everything past the confirmed position, and the same
//! WAL decodes to the same events), so a consumer deduplicates replays by it. It is built from
//! positions only, never from a counter of the run or an option, as fixed-width hex LSNs
//! (the indexer's `_version` form) joined by dots:
//! - a streamed change: `C.L.n` — its transaction's commit LSN, its own LSN, and its rank
//!   among the changes of that transaction with the same LSN (a multi-row insert, an update
//!   that changes the key and is published as a delete and a create, a TRUNCATE of several
//!   tables: `0`, `1`, …); a logical message the same way; a non-transactional one `L.L.0`;
//! - the tombstone after a delete: the delete's id and `.t`;
//! - the transaction metadata events: `C.begin` and `C.end`;
//! - a snapshot read: `S.r.` and the key's JSON (`S` the snapshot's consistent point; the key
//!   is unique in a table). Rows of tables without a key carry no id: nothing tells them
//!   apart;
//! - a snapshot marker: `S.marker.p` (`p` its partition).

use std::ffi::CStr;
use std::sync::Arc;

use bytes::Bytes;

use crate::event::EventHeaders;
use crate::model::{Header, Lsn};

/// The stable id of an event (see the module doc): consumers deduplicate replays by it.
pub const EVENT_ID: &CStr = c"pgcdc-event-id";

/// The transaction's annotations, the JSON object also found in `source.annotations`.
pub const ANNOTATIONS: &CStr = c"pgcdc-annotations";

/// A shared header name.
pub fn name(n: &CStr) -> Arc<CStr> {
    Arc::from(n)
}

/// `C.L.n`: a streamed change or message.
pub fn change_id(commit_lsn: Lsn, lsn: Lsn, rank: u32) -> Vec<u8> {
    let mut id = Vec::with_capacity(44);
    hex16(&mut id, commit_lsn.0);
    id.push(b'.');
    hex16(&mut id, lsn.0);
    id.push(b'.');
    id.extend_from_slice(itoa::Buffer::new().format(rank).as_bytes());
    id
}

/// `C.begin` or `C.end`: a transaction metadata event.
pub fn transaction_id(commit_lsn: Lsn, end: bool) -> Vec<u8> {
    let mut id = Vec::with_capacity(22);
    hex16(&mut id, commit_lsn.0);
    id.extend_from_slice(if end { b".end" } else { b".begin" });
    id
}

/// `S.r.<key>`: a snapshot read of the row with JSON key `key`.
pub fn read_id(snapshot_lsn: Lsn, key: &[u8]) -> Vec<u8> {
    let mut id = Vec::with_capacity(19 + key.len());
    hex16(&mut id, snapshot_lsn.0);
    id.extend_from_slice(b".r.");
    id.extend_from_slice(key);
    id
}

/// `S.marker.p`: the snapshot marker on partition `partition`.
pub fn marker_id(snapshot_lsn: Lsn, partition: i32) -> Vec<u8> {
    let mut id = Vec::with_capacity(32);
    hex16(&mut id, snapshot_lsn.0);
    id.extend_from_slice(b".marker.");
    id.extend_from_slice(itoa::Buffer::new().format(partition).as_bytes());
    id
}

/// Appends `v` as 16 upper-case hex digits (every snapshot row gets one: no formatter).
fn hex16(out: &mut Vec<u8>, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    out.extend(
        (0..16)
            .rev()
            .map(|i| DIGITS[((v >> (i * 4)) & 0xF) as usize]),
    );
}

/// The header names a builder clones per record, and whether it puts headers on records
/// at all (`--event-headers`).
#[derive(Debug, Clone)]
pub struct Names {
    pub event_id: Arc<CStr>,
    pub annotations: Arc<CStr>,
    on: bool,
}

impl Names {
    pub fn new(headers: EventHeaders) -> Self {
        Names {
            event_id: name(EVENT_ID),
            annotations: name(ANNOTATIONS),
            on: headers == EventHeaders::On,
        }
    }

    /// Whether records get headers.
    pub fn on(&self) -> bool {
        self.on
    }

    /// The headers of a record whose only header is its event id: `id()`'s, or none when
    /// headers are off.
    pub fn only_id(&self, id: impl FnOnce() -> Vec<u8>) -> Vec<Header> {
        if self.on {
            vec![self.id(id())]
        } else {
            Vec::new()
        }
    }

    /// The event-id header with value `id`.
    pub fn id(&self, id: Vec<u8>) -> Header {
        Header {
            name: self.event_id.clone(),
            value: Bytes::from(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_form() {
        let s = |v: Vec<u8>| String::from_utf8(v).unwrap();
        assert_eq!(
            s(change_id(Lsn(0x16B3748), Lsn(0x16B3700), 2)),
            "00000000016B3748.00000000016B3700.2"
        );
        assert_eq!(s(transaction_id(Lsn(1), false)), "0000000000000001.begin");
        assert_eq!(s(transaction_id(Lsn(1), true)), "0000000000000001.end");
        assert_eq!(
            s(read_id(Lsn(0xAB), br#"{"id":7}"#)),
            r#"00000000000000AB.r.{"id":7}"#
        );
        assert_eq!(s(marker_id(Lsn(0xAB), 3)), "00000000000000AB.marker.3");
    }
}
