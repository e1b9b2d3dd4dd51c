//! The order of a row's events, written once: every consumer in this crate (`verify`, the
//! indexer) ranks events with [`Version`].
//!
//! Every event carries `source.commit_lsn`, the LSN of its transaction's commit record, and
//! `source.lsn`, the change's own WAL position; a snapshot read carries the snapshot's
//! consistent point `C` in both. Events rank by `commit_lsn` first — commit order is the order
//! in which PostgreSQL made changes visible — and, within one transaction, by `lsn`.
//!
//! One case needs a rule of its own: a snapshot read and a streamed change with the **same**
//! `commit_lsn`. The snapshot at `C` sees exactly the transactions that committed before `C`,
//! and decoding from the slot starts at `C`, so a transaction whose commit record lies exactly
//! at `C` is not in the snapshot: it is streamed, as `(commit_lsn = C, lsn = L)` with `L < C`.
//! Compared as plain pairs, the read's `(C, C)` would rank above the change's `(C, L)` and a
//! consumer would drop the change as older than the row it replaced. Hence the rule:
//!
//! > **a snapshot read ranks below any change with the same `commit_lsn`; otherwise
//! > `(commit_lsn, lsn)`.**
//!
//! [`Version`] encodes it as a pair that compares lexicographically: a read's second
//! component is 0, a change's is its `lsn`. A change's `lsn` is a WAL position and never 0
//! (0 is PostgreSQL's invalid LSN); [`Version::change`] takes a malformed 0 as 1, so a read
//! stays strictly below every change of its `commit_lsn` whatever the input.
//!
//! The same rule says which events make up the state a snapshot at `C` sees:
//! [`Version::visible_at`].

use std::fmt;

/// Where an event sits in its row's history; see the module docs for the rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub commit_lsn: u64,
    /// The change's `lsn`; 0 for a snapshot read.
    pub lsn: u64,
}

impl Version {
    /// A version from its two components as they are (decoding, tests).
    pub const fn new(commit_lsn: u64, lsn: u64) -> Self {
        Version { commit_lsn, lsn }
    }

    /// A row read by the snapshot taken at `point` (its `commit_lsn`): below every change
    /// committed at `point` or later, above every change committed before.
    pub const fn snapshot_read(point: u64) -> Self {
        Version {
            commit_lsn: point,
            lsn: 0,
        }
    }

    /// A streamed change (insert, update, delete, truncate).
    pub fn change(commit_lsn: u64, lsn: u64) -> Self {
        Version {
            commit_lsn,
            lsn: lsn.max(1),
        }
    }

    /// The version of an event with `op` (`r` and the snapshot marker `s` are snapshot
    /// reads, any other op a change) and its `source.commit_lsn` and `source.lsn`.
    pub fn of_event(op: &str, commit_lsn: u64, lsn: u64) -> Self {
        match op {
            "r" | "s" => Version::snapshot_read(commit_lsn),
            _ => Version::change(commit_lsn, lsn),
        }
    }

    /// Whether the event is part of the state a snapshot taken at `point` sees: a change
    /// committed before `point`, or a read of a snapshot taken at or before it.
    pub fn visible_at(self, point: u64) -> bool {
        self <= Version::snapshot_read(point)
    }

    /// Fixed-width hex, `CCCCCCCCCCCCCCCC.LLLLLLLLLLLLLLLL`: exact (no float rounding in a
    /// search engine), and string order equals version order.
    pub fn encode(self) -> String {
        format!("{:016X}.{:016X}", self.commit_lsn, self.lsn)
    }

    /// The inverse of [`encode`](Self::encode); `None` for anything else.
    pub fn decode(s: &str) -> Option<Version> {
        let (c, l) = s.split_once('.')?;
        if c.len() != 16 || l.len() != 16 {
            return None;
        }
        Some(Version {
            commit_lsn: u64::from_str_radix(c, 16).ok()?,
            lsn: u64::from_str_radix(l, 16).ok()?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_committed_at_the_snapshot_point_ranks_above_the_read() {
        // The transaction whose commit record lies at the consistent point 100.
        let read = Version::of_event("r", 100, 100);
        let change = Version::of_event("u", 100, 40);
        assert!(change > read);
        assert!(change.encode() > read.encode());
        // Otherwise commit order, then lsn.
        assert!(read > Version::of_event("u", 99, 99));
        assert!(Version::of_event("u", 100, 41) > change);
        assert!(Version::of_event("r", 101, 101) > Version::of_event("d", 100, u64::MAX));
        // A malformed change at lsn 0 still ranks above the read.
        assert!(Version::change(100, 0) > read);
        // The marker of a snapshot is a read of it.
        assert_eq!(Version::of_event("s", 100, 100), read);
    }

    #[test]
    fn visible_at_is_what_a_snapshot_sees() {
        assert!(Version::of_event("r", 100, 100).visible_at(100));
        assert!(Version::of_event("r", 90, 90).visible_at(100));
        assert!(!Version::of_event("r", 110, 110).visible_at(100));
        assert!(Version::of_event("c", 99, 50).visible_at(100));
        assert!(!Version::of_event("c", 100, 50).visible_at(100));
    }

    #[test]
    fn encoding_is_exact_and_ordered() {
        let a = Version::new(0x16_B374_D848, 0x16_B374_D800);
        assert_eq!(a.encode(), "00000016B374D848.00000016B374D800");
        assert_eq!(Version::decode(&a.encode()), Some(a));
        let max = Version::new(u64::MAX, u64::MAX);
        assert_eq!(Version::decode(&max.encode()), Some(max));
        let b = Version::new(0x16_B374_D848, 0x16_B374_D801);
        assert!(a < b && a.encode() < b.encode());
        assert!(Version::new(1, 99) < Version::new(2, 0));
        assert_eq!(
            Version::snapshot_read(0x10).encode(),
            "0000000000000010.0000000000000000"
        );
        for bad in [
            "",
            "1.2",
            "00000016B374D848",
            "00000016B374D848.0000000000000G00",
        ] {
            assert_eq!(Version::decode(bad), None, "{bad}");
        }
    }
}
