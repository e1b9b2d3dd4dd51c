//! Read-your-writes for the index: `GET /wait?lsn=<X/Y>` on the indexer's `--http-addr`
//! answers once every change committed at or below the LSN is in the index, with the same
//! contract as pgcdc's own `/wait` ([`crate::metrics::wait`]); `GET /status` tells, per
//! index, the highest commit LSN applied.
//!
//! The highest LSN applied alone cannot answer the question: the application's LSN
//! (`pg_current_wal_insert_lsn()` after its commit) lies past its commit's LSN, and nothing may
//! follow — an index that applied the commit has no way to know that nothing else below the
//! LSN is still on its way. So a wait takes three steps:
//!
//! 1. ask pgcdc's `/wait?lsn=L` (`--pgcdc-url`) until it is reached: every event at or below
//!    `L` is then acknowledged by Kafka, so it lies below each partition's current high
//!    watermark;
//! 2. read those high watermarks, for every partition of the indexer's topics;
//! 3. wait until the indexer has applied every record below them (written, and for
//!    Meilisearch its task succeeded) — [`Applied`] is updated after each batch, and waiters
//!    sleep on its watch.
//!
//! The answer's `published` is pgcdc's published position from step 1: everything at or
//! below it is in the index. Step 3 assumes offsets without gaps the indexer never sees
//! (pgcdc's topics, written without transactions and with `cleanup.policy=delete`); it trusts
//! the broker's watermarks (tansu's memory storage reports them wrong; its SQLite storage and
//! Kafka do not).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::source::SourceRecord;
use crate::kafka::{KafkaConfig, Watermarks};
use crate::metrics::wait::{WaitClient, WaitOutcome, WaitReply, Waiter};
use crate::model::{BoxFuture, Lsn};

/// How soon pgcdc is asked again after it could not answer.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// What the indexer has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// `(topic, partition)` → the offset after the last record applied: every record below it
    /// is in the index (or was skipped as not indexable).
    pub next: HashMap<(String, i32), i64>,
    /// Index → the highest commit LSN among the events applied to it.
    pub lsn: BTreeMap<String, Lsn>,
}

impl Applied {
    /// Notes a batch applied: its records, and per index the highest commit LSN of its events.
    pub(super) fn record(
        &mut self,
        records: &[SourceRecord],
        routes: &HashMap<String, String>,
        lsns: &HashMap<String, u64>,
    ) {
        for r in records {
            if !routes.contains_key(&r.topic) {
                continue;
            }
            let next = self.next.entry((r.topic.clone(), r.partition)).or_default();
            *next = (*next).max(r.offset + 1);
        }
        for (index, &l) in lsns {
            let top = self.lsn.entry(index.clone()).or_insert(Lsn(0));
            *top = (*top).max(Lsn(l));
        }
    }

    /// Whether every record below `high` is applied (an empty partition needs nothing).
    pub fn covers(&self, high: &HashMap<(String, i32), i64>) -> bool {
        high.iter()
            .all(|(tp, &h)| h <= 0 || self.next.get(tp).is_some_and(|&n| n >= h))
    }
}

/// The indexer's [`Waiter`] (see the module docs).
pub struct IndexWaiter {
    applied: watch::Receiver<Applied>,
    stop: watch::Receiver<bool>,
    /// pgcdc's `--metrics-addr`; without it, `/wait` cannot be answered.
    pgcdc: Option<WaitClient>,
    topics: Vec<String>,
    kafka: KafkaConfig,
    /// Opened at the first wait, then kept.
    watermarks: Arc<Mutex<Option<Watermarks>>>,
    /// The highest position a wait found in the index (for a 504's `published`).
    indexed: Mutex<Lsn>,
}

impl IndexWaiter {
    pub fn new(
        applied: watch::Receiver<Applied>,
        stop: watch::Receiver<bool>,
        pgcdc: Option<WaitClient>,
        topics: Vec<String>,
        kafka: KafkaConfig,
    ) -> Self {
        IndexWaiter {
            applied,
            stop,
            pgcdc,
            topics,
            kafka,
            watermarks: Arc::new(Mutex::new(None)),
            indexed: Mutex::new(Lsn::INVALID),
        }
    }

    fn indexed(&self) -> Lsn {
        self.indexed.lock().map(|l| *l).unwrap_or(Lsn::INVALID)
    }

    /// The outcome of a wait whose time ran out: the highest position known to be indexed,
    /// or, with none, why.
    fn timed_out(&self, why: &str) -> WaitOutcome {
        match self.indexed() {
            l if l.is_valid() => WaitOutcome::TimedOut { published: l },
            _ => WaitOutcome::Unavailable(format!("not reached within the timeout: {why}")),
        }
    }

    /// Step 2: the high watermarks of the indexer's topics.
    async fn high_watermarks(&self) -> Result<HashMap<(String, i32), i64>, String> {
        let cell = self.watermarks.clone();
        let cfg = self.kafka.clone();
        let topics = self.topics.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = cell
                .lock()
                .map_err(|_| "internal: lock poisoned".to_string())?;
            if guard.is_none() {
                *guard = Some(Watermarks::new(&cfg).map_err(|e| e.to_string())?);
            }
            match guard.as_ref() {
                Some(w) => w.high(&topics).map_err(|e| e.to_string()),
                None => Err("internal: no Kafka reader".to_string()),
            }
        })
        .await
        .map_err(|e| format!("internal: {e}"))?
    }

    async fn wait_for(&self, lsn: Lsn, timeout: Duration) -> WaitOutcome {
        let Some(pgcdc) = &self.pgcdc else {
            return WaitOutcome::Unavailable(
                "the indexer cannot tell what pgcdc published: start it with --pgcdc-url \
                 (pgcdc's --metrics-addr)"
                    .to_string(),
            );
        };
        let deadline = Instant::now() + timeout;
        // Step 1: pgcdc has published everything up to `lsn`.
        let published = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let why = match pgcdc.wait(lsn, left).await {
                Ok(WaitReply::Reached { published }) => break published,
                Ok(WaitReply::TimedOut { published }) => {
                    format!("pgcdc has published only up to {published}")
                }
                Ok(WaitReply::Unavailable(e)) => format!("pgcdc answered: {e}"),
                Ok(WaitReply::Refused(e)) => {
                    return WaitOutcome::Unavailable(format!("pgcdc refused the wait: {e}"))
                }
                Err(e) => format!("cannot reach pgcdc at {}: {e}", pgcdc.url),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.timed_out(&why);
            }
            tokio::time::sleep(left.min(RETRY_EVERY)).await;
        };
        if self.indexed() >= published {
            return WaitOutcome::Reached {
                published: self.indexed(),
            };
        }
        // Step 2.
        let high = match self.high_watermarks().await {
            Ok(h) => h,
            Err(e) => {
                return WaitOutcome::Unavailable(format!("cannot read the topics' offsets: {e}"))
            }
        };
        // Step 3: everything below them applied (the stop is watched by `wait`).
        let mut applied = self.applied.clone();
        let covered = tokio::time::timeout_at(deadline, applied.wait_for(|a| a.covers(&high)))
            .await
            .map(|r| r.is_ok());
        match covered {
            Ok(true) => {
                if let Ok(mut l) = self.indexed.lock() {
                    *l = (*l).max(published);
                }
                WaitOutcome::Reached { published }
            }
            Ok(false) => WaitOutcome::Stopping,
            Err(_) => self.timed_out(&format!(
                "pgcdc published up to {published}, but the indexer has not applied the records \
                 up to the topics' offsets yet (is it behind, or is the search engine slow?)"
            )),
        }
    }
}

impl Waiter for IndexWaiter {
    fn wait(&self, lsn: Lsn, timeout: Duration) -> BoxFuture<'_, WaitOutcome> {
        Box::pin(async move {
            let mut stop = self.stop.clone();
            tokio::select! {
                outcome = self.wait_for(lsn, timeout) => outcome,
                _ = stop.wait_for(|s| *s) => WaitOutcome::Stopping,
            }
        })
    }

    fn status(&self) -> Option<serde_json::Value> {
        let applied = self.applied.borrow();
        let indexes: serde_json::Map<String, serde_json::Value> = applied
            .lsn
            .iter()
            .map(|(index, l)| (index.clone(), json!({ "applied_lsn": l.to_string() })))
            .collect();
        let indexed = self.indexed();
        Some(json!({
            "indexes": indexes,
            "indexed": indexed.is_valid().then(|| indexed.to_string()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: &str, partition: i32, offset: i64) -> SourceRecord {
        SourceRecord {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            value: None,
        }
    }

    #[test]
    fn applied_covers_the_watermarks_only_once_every_record_below_them_is_applied() {
        let routes: HashMap<String, String> = [("t.a".to_string(), "a".to_string())].into();
        let mut a = Applied::default();
        let high: HashMap<(String, i32), i64> =
            [(("t.a".into(), 0), 3), (("t.a".into(), 1), 0)].into();
        assert!(!a.covers(&high));
        a.record(
            &[rec("t.a", 0, 0), rec("t.a", 0, 1), rec("other", 0, 9)],
            &routes,
            &[("a".to_string(), 40)].into(),
        );
        assert!(!a.covers(&high));
        assert_eq!(a.lsn["a"], Lsn(40));
        a.record(
            &[rec("t.a", 0, 2)],
            &routes,
            &[("a".to_string(), 30)].into(),
        );
        assert!(a.covers(&high));
        // The highest LSN never goes back.
        assert_eq!(a.lsn["a"], Lsn(40));
        assert!(!a.next.contains_key(&("other".to_string(), 0)));
    }
}
