//! The checks many tests make on a finished `pgcdc` process.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::process::Output;

use super::api::ConnInfo;

/// The process succeeded; else fails with its stderr.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The process failed with exit code `code`, and stderr names the fix (says every needle).
pub fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

/// A run that failed published nothing: no topic of its prefix holds a record (topics it
/// created may exist, empty).
pub async fn assert_nothing_published(kafka: &str, prefix: &str) {
    let records = super::topics::published(kafka, prefix).await;
    assert!(
        records.values().all(|n| *n == 0),
        "a failed run published records: {records:?}"
    );
}

/// A run that failed at start left no replication slot `slot` behind.
pub async fn assert_no_slot(info: &ConnInfo, slot: &str) {
    let n: i64 = super::client(info)
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query slots")
        .get(0);
    assert_eq!(n, 0, "a failed run left slot {slot} behind");
}

/// Fails with a short account of how `got` differs from `want` (keys missing, extra, and the
/// first few differing values), not with dumps of both.
pub fn assert_same<K: Ord + Debug, V: PartialEq + Debug>(
    got: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    what: &str,
) {
    let missing: Vec<&K> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&K> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differing: Vec<(&K, &V, &V)> = want
        .iter()
        .filter_map(|(k, v)| got.get(k).filter(|g| *g != v).map(|g| (k, g, v)))
        .take(3)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differing.is_empty(),
        "{what}: {} of {} keys missing (first {:?}), {} extra (first {:?}), differing (got, want): {:?}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        &extra[..extra.len().min(5)],
        differing
    );
}
