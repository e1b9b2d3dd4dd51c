//! The stdout sink: one JSON object per line, for piping into other tools and for trying pgcdc
//! without a broker.
//!
//! Each record becomes `{"topic":"…","key":<key>,"value":<value>}` followed by `\n`. Key and
//! value arrive as JSON already (see [`Record`]); they are embedded byte for byte, never parsed
//! again on this path, and a missing key or a tombstone is written as `null`. Only the topic is
//! escaped here, once per distinct topic in a row.
//!
//! Acknowledgement means *written and flushed*: output goes through a 1 MiB buffer, and a
//! [`SinkItem::Checkpoint`] is reported only after a flush that covers every line before it.
//! Checkpoints mark ends of transactions; a checkpoint is flushed within [`FLUSH_DELAY`]
//! (2 ms), and consecutive checkpoints share that flush (at most
//! [`MAX_CHECKPOINTS_PER_FLUSH`] of them), which keeps one `write(2)` per transaction from
//! becoming the bottleneck. A [`SinkItem::Barrier`] always flushes at once.
//!
//! When the reader goes away (`pgcdc … | head`), the write fails with `EPIPE` (Rust ignores
//! `SIGPIPE`), and the run ends with [`SinkError::OutputClosed`]: a clean end for the caller,
//! which must not confirm anything not reported — and nothing after the last successful flush
//! is. Writes block when the reader is slow, and then the sink stops reading its channel:
//! backpressure all the way to the WAL.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::watch;

use super::{report, SinkError, SinkSummary};
use crate::model::Lsn;
use crate::model::{Record, SinkItem, SinkReceiver};

/// Size of the output buffer. Each write of it is a hand-off to tokio's blocking pool (and
/// back): at 64 KiB those hand-offs were most of pgcdc's system time on a large transaction
/// (1M rows: 1 MiB cut its CPU by ~20%, wall by ~6%).
pub const BUFFER_BYTES: usize = 1024 * 1024;

/// How many checkpoints may wait for one flush.
pub const MAX_CHECKPOINTS_PER_FLUSH: usize = 64;

/// How long a checkpoint may wait for its flush. Flushing at every transaction's end cost a
/// thread hand-off per transaction (stdout writes run on tokio's blocking pool): 40% of
/// pgcdc's CPU on a stream of 10-row transactions.
pub const FLUSH_DELAY: Duration = Duration::from_millis(2);

type Output = Box<dyn AsyncWrite + Send + Unpin>;

/// Writes records as JSON lines to standard output, or to any writer (tests).
pub struct StdoutSink {
    out: BufWriter<Output>,
    /// The last topic seen and its JSON-escaped form (`"name"` with quotes).
    topic_cache: Option<(Arc<str>, Vec<u8>)>,
    line: Vec<u8>,
}

impl StdoutSink {
    /// A sink writing to the process's standard output.
    pub fn stdout() -> Self {
        Self::new(tokio::io::stdout())
    }

    /// A sink writing to `writer`.
    pub fn new<W: AsyncWrite + Send + Unpin + 'static>(writer: W) -> Self {
        StdoutSink {
            out: BufWriter::with_capacity(BUFFER_BYTES, Box::new(writer) as Output),
            topic_cache: None,
            line: Vec::with_capacity(1024),
        }
    }

    /// Runs until `rx` is closed and the last line is flushed. See [`super::run`].
    pub async fn run(
        mut self,
        mut rx: SinkReceiver,
        acked: watch::Sender<Lsn>,
    ) -> Result<SinkSummary, SinkError> {
        let mut summary = SinkSummary::default();
        // Written but not yet flushed: counted into `summary` at the next flush.
        let mut unflushed = SinkSummary::default();
        let mut pending_checkpoint: Option<Lsn> = None;
        let mut pending_checkpoints = 0usize;
        // Armed at the first checkpoint after a flush; one timer for the whole run.
        let flush_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(flush_timer);
        let mut flush_armed = false;

        macro_rules! flush_and_report {
            () => {{
                self.flush().await?;
                merge(&mut summary, &mut unflushed);
                if let Some(lsn) = pending_checkpoint.take() {
                    report(&acked, lsn);
                }
                pending_checkpoints = 0;
                flush_armed = false;
            }};
        }

        loop {
            let item = tokio::select! {
                biased;
                () = &mut flush_timer, if flush_armed => {
                    flush_and_report!();
                    continue;
                }
                item = rx.recv() => item,
            };
            // The charge is given back once the item's records are in the output buffer.
            let Some((item, _charge)) = item else { break };
            match item {
                SinkItem::Record(record) => {
                    self.write_record(&record).await?;
                    unflushed.add(record.payload_len(), record.value.is_none());
                    crate::metrics::global()
                        .sink_in_flight
                        .store(unflushed.records, std::sync::atomic::Ordering::Relaxed);
                }
                SinkItem::Records(records) => {
                    for record in &records {
                        self.write_record(record).await?;
                        unflushed.add(record.payload_len(), record.value.is_none());
                    }
                    crate::metrics::global()
                        .sink_in_flight
                        .store(unflushed.records, std::sync::atomic::Ordering::Relaxed);
                }
                SinkItem::Checkpoint(lsn) => {
                    pending_checkpoint = Some(lsn);
                    pending_checkpoints += 1;
                    if pending_checkpoints >= MAX_CHECKPOINTS_PER_FLUSH {
                        flush_and_report!();
                    } else if !flush_armed {
                        flush_timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + FLUSH_DELAY);
                        flush_armed = true;
                    }
                }
                SinkItem::Barrier(done) => {
                    flush_and_report!();
                    // The waiter may have given up; that is its business.
                    let _ = done.send(());
                }
            }
        }

        self.flush().await?;
        merge(&mut summary, &mut unflushed);
        if let Some(lsn) = pending_checkpoint {
            report(&acked, lsn);
        }
        Ok(summary)
    }

    async fn write_record(&mut self, record: &Record) -> Result<(), SinkError> {
        let topic = match &self.topic_cache {
            Some((name, escaped))
                if Arc::ptr_eq(name, &record.topic) || **name == *record.topic =>
            {
                escaped
            }
            _ => {
                let escaped = json_string(&record.topic);
                &self.topic_cache.insert((record.topic.clone(), escaped)).1
            }
        };
        let line = &mut self.line;
        line.clear();
        line.extend_from_slice(b"{\"topic\":");
        line.extend_from_slice(topic);
        line.extend_from_slice(b",\"key\":");
        line.extend_from_slice(record.key.as_deref().unwrap_or(b"null"));
        line.extend_from_slice(b",\"value\":");
        line.extend_from_slice(record.value.as_deref().unwrap_or(b"null"));
        line.extend_from_slice(b"}\n");
        self.out.write_all(&self.line).await.map_err(io_error)
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().await.map_err(io_error)
    }
}

fn merge(summary: &mut SinkSummary, unflushed: &mut SinkSummary) {
    crate::metrics::global()
        .sink_in_flight
        .store(0, std::sync::atomic::Ordering::Relaxed);
    summary.records += unflushed.records;
    summary.bytes += unflushed.bytes;
    summary.tombstones += unflushed.tombstones;
    *unflushed = SinkSummary::default();
}

/// `s` as a JSON string literal, quotes included.
fn json_string(s: &str) -> Vec<u8> {
    // Serializing a `str` cannot fail; the fallback keeps this free of panics regardless.
    serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec())
}

fn io_error(e: io::Error) -> SinkError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        SinkError::OutputClosed
    } else {
        SinkError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_escaping_round_trips() {
        for s in [
            "plain",
            "with \"quotes\"",
            "back\\slash",
            "ctl\u{1}\n\t",
            "ünïcødé 🚀",
            "",
        ] {
            let ours = json_string(s);
            assert_eq!(
                serde_json::from_slice::<String>(&ours).expect("valid JSON"),
                s,
                "{s:?}"
            );
        }
    }
}
