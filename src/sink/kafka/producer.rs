//! The Kafka producer loop: records out, delivery reports back, checkpoints in order.
//!
//! One FIFO holds, in channel order, a pending delivery for every record handed to librdkafka
//! and a marker for every checkpoint and barrier. Only the front is ever completed:
//!
//! ```text
//!   front → [rec a] [rec b] [ckpt 0/10] [rec c] [barrier] [ckpt 0/20] ← back
//! ```
//!
//! `ckpt 0/10` is reported only when `a` and `b` have their successful delivery reports,
//! whatever order librdkafka produced the reports in (different partitions complete
//! independently). A failed delivery ends the run before anything behind it is reported.
//!
//! The loop has two sources of work, in this priority: (1) the front delivery completing,
//! (2) the next item from the channel, read only while fewer than `max_in_flight` deliveries
//! are pending. When librdkafka's own queue is full (`QueueFull`), the record is kept and the
//! loop waits for the front delivery before retrying it: backpressure, never a drop. When the
//! channel is closed, the loop drains the FIFO and returns.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    client_config, config_error, KafkaConfig, OffThreadDrop, Oversized, PgcdcContext, Role,
};
use crate::sink::{report, Record, SinkError, SinkItem, SinkSummary};
use crate::source::Lsn;

/// Warn when no delivery report has arrived for this long while records are in flight.
pub const STALL_WARNING_AFTER: Duration = Duration::from_secs(10);
/// Repeat the stall warning this often while the stall lasts.
const STALL_WARNING_EVERY: Duration = Duration::from_secs(30);
/// How long to wait before retrying after `QueueFull` when none of our deliveries is pending
/// (librdkafka's queue is then full of someone else's messages — not expected, but harmless).
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

/// Publishes records to Kafka and reports checkpoints once Kafka has acknowledged them.
pub struct KafkaSink {
    producer: OffThreadDrop<FutureProducer<PgcdcContext>>,
    bootstrap: String,
    max_in_flight: usize,
    oversized: Oversized,
}

impl KafkaSink {
    /// Creates the producer. Fails with [`SinkError::Config`] naming an invalid property.
    /// Connecting happens in the background; see [`super::wait_for_cluster`] to wait for it.
    pub fn new(cfg: KafkaConfig) -> Result<Self, SinkError> {
        let producer: FutureProducer<PgcdcContext> = client_config(&cfg, Role::Producer)
            .create_with_context(PgcdcContext::new(Role::Producer))
            .map_err(config_error)?;
        Ok(KafkaSink {
            producer: OffThreadDrop::new(producer),
            bootstrap: cfg.bootstrap,
            max_in_flight: cfg.max_in_flight.max(1),
            oversized: cfg.oversized,
        })
    }

    /// Runs until `rx` is closed and every record is acknowledged. See [`crate::sink::run`].
    ///
    /// Work that is ready is done without waiting first: delivery reports already in, then
    /// items already queued in the channel. Only then does the loop wait, so a burst of records
    /// costs one wake-up, not one per record.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<SinkItem>,
        acked: watch::Sender<Lsn>,
    ) -> Result<SinkSummary, SinkError> {
        let mut fifo = Fifo::new(&self.bootstrap, acked);
        let mut closed = false;
        loop {
            let mut completed = false;
            while let Some(res) = fifo.try_complete_front() {
                completed = true;
                if let Err(failed) = res {
                    self.skip_or_fail(failed, &mut fifo)?;
                }
            }
            if completed {
                // Once per batch of reports: the clock is read per batch, not per record.
                fifo.progress();
            }
            if closed && fifo.is_empty() {
                return Ok(fifo.summary);
            }
            let mut read_any = false;
            while !closed && fifo.deliveries < self.max_in_flight {
                match rx.try_recv() {
                    Ok(item) => {
                        self.handle(item, &mut fifo).await?;
                        read_any = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            if read_any || (closed && fifo.deliveries == 0) {
                continue;
            }
            // Invariant: at least one branch below is enabled. After `try_complete_front`, a
            // non-empty FIFO starts with a delivery (so `deliveries > 0`), and reading is
            // disabled only when the channel is closed or `deliveries` is at its bound (≥ 1).
            let can_read = !closed && fifo.deliveries < self.max_in_flight;
            tokio::select! {
                biased;
                res = fifo.complete_front(), if fifo.deliveries > 0 => {
                    if let Err(failed) = res {
                        self.skip_or_fail(failed, &mut fifo)?;
                    }
                }
                item = rx.recv(), if can_read => match item {
                    None => closed = true,
                    Some(item) => self.handle(item, &mut fifo).await?,
                },
            }
        }
    }

    async fn handle(&self, item: SinkItem, fifo: &mut Fifo) -> Result<(), SinkError> {
        match item {
            SinkItem::Record(record) => self.send(record, fifo).await?,
            SinkItem::Checkpoint(lsn) => fifo.push(Pending::Checkpoint(lsn)),
            SinkItem::Barrier(done) => fifo.push(Pending::Barrier(done)),
        }
        Ok(())
    }

    /// Hands `record` to librdkafka, waiting for deliveries while its queue is full.
    async fn send(&self, record: Record, fifo: &mut Fifo) -> Result<(), SinkError> {
        loop {
            let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic);
            if let Some(key) = &record.key {
                fr = fr.key(key.as_ref());
            }
            if let Some(value) = &record.value {
                fr = fr.payload(value.as_ref());
            }
            match self.producer.send_result(fr) {
                Ok(delivery) => {
                    fifo.push(Pending::Delivery {
                        delivery,
                        topic: record.topic.clone(),
                        bytes: record.payload_len(),
                        tombstone: record.value.is_none(),
                    });
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Keep the record; make room by waiting for the oldest delivery.
                    fifo.complete_markers();
                    if fifo.deliveries > 0 {
                        if let Err(failed) = fifo.complete_front().await {
                            self.skip_or_fail(failed, fifo)?;
                        }
                    } else {
                        tokio::time::sleep(QUEUE_FULL_RETRY).await;
                    }
                }
                Err((e, _)) => {
                    let failed = Failed {
                        error: e,
                        topic: record.topic.clone(),
                        bytes: record.payload_len(),
                    };
                    return self.skip_or_fail(failed, fifo);
                }
            }
        }
    }

    /// With `--oversized skip`, a record too large for Kafka is left out — loudly, and
    /// counted; every other failure (and that one by default) ends the run.
    fn skip_or_fail(&self, failed: Failed, fifo: &mut Fifo) -> Result<(), SinkError> {
        let too_large =
            failed.error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge);
        if !(too_large && self.oversized == Oversized::Skip) {
            return Err(self.classify(failed));
        }
        fifo.summary.oversized_skipped += 1;
        tracing::error!(
            topic = %failed.topic,
            bytes = failed.bytes,
            skipped = fifo.summary.oversized_skipped,
            "SKIPPED a record larger than Kafka accepts (--oversized skip): consumers will not see this change; raise message.max.bytes to keep such records"
        );
        Ok(())
    }

    /// Turns a librdkafka failure into the error that tells the operator what to do.
    fn classify(&self, failed: Failed) -> SinkError {
        let topic = failed.topic.to_string();
        match failed.error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => SinkError::MessageTooLarge {
                topic,
                bytes: failed.bytes,
            },
            Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
                SinkError::TopicAuthorization { topic }
            }
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition,
            ) => SinkError::UnknownTopic { topic },
            Some(RDKafkaErrorCode::Fatal) => {
                let reason = match self.producer.client().fatal_error() {
                    Some((code, msg)) => format!("{msg} ({code:?})"),
                    None => failed.error.to_string(),
                };
                SinkError::ProducerFatal { reason }
            }
            _ => SinkError::Delivery {
                topic,
                source: failed.error,
            },
        }
    }
}

/// What a delivery future resolves to.
type DeliveryOutcome = <DeliveryFuture as std::future::Future>::Output;

/// A record Kafka did not take.
struct Failed {
    error: KafkaError,
    topic: Arc<str>,
    bytes: usize,
}

enum Pending {
    Delivery {
        delivery: DeliveryFuture,
        topic: Arc<str>,
        bytes: usize,
        tombstone: bool,
    },
    Checkpoint(Lsn),
    Barrier(oneshot::Sender<()>),
}

/// The in-order queue of pending deliveries and markers.
struct Fifo {
    queue: VecDeque<Pending>,
    /// How many `Pending::Delivery` are in `queue`.
    deliveries: usize,
    summary: SinkSummary,
    acked: watch::Sender<Lsn>,
    bootstrap: String,
    /// Last time a delivery completed, or the window became non-empty.
    last_progress: Instant,
    /// When to warn again about a stall that was already reported.
    next_warning: Instant,
    warned: bool,
    /// Wakes the wait for the front delivery to check for a stall. One timer for the whole
    /// run, moved only when it fires: re-arming one per record cost more than the check.
    stall_timer: Pin<Box<tokio::time::Sleep>>,
}

impl Fifo {
    fn new(bootstrap: &str, acked: watch::Sender<Lsn>) -> Self {
        let now = Instant::now();
        Fifo {
            queue: VecDeque::new(),
            deliveries: 0,
            summary: SinkSummary::default(),
            acked,
            bootstrap: bootstrap.to_string(),
            last_progress: now,
            next_warning: now,
            warned: false,
            stall_timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                now + STALL_WARNING_AFTER,
            ))),
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn push(&mut self, p: Pending) {
        if matches!(p, Pending::Delivery { .. }) {
            if self.deliveries == 0 {
                self.progress();
            }
            self.deliveries += 1;
            crate::metrics::global()
                .sink_in_flight
                .store(self.deliveries as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.queue.push_back(p);
    }

    fn progress(&mut self) {
        let now = Instant::now();
        if self.warned {
            tracing::info!(
                "Kafka at {} acknowledges again after {}s",
                self.bootstrap,
                now.duration_since(self.last_progress).as_secs()
            );
            self.warned = false;
        }
        self.last_progress = now;
    }

    /// When the current stall (if the front stays pending) is to be reported.
    fn stall_due(&self) -> Instant {
        if self.warned {
            self.next_warning
        } else {
            self.last_progress + STALL_WARNING_AFTER
        }
    }

    /// The stall timer fired: warn if the stall is real, and set the timer to the next due time.
    fn on_stall_timer(&mut self) {
        if Instant::now() >= self.stall_due() {
            self.warn_stall();
        }
        let due = tokio::time::Instant::from_std(self.stall_due());
        self.stall_timer.as_mut().reset(due);
    }

    /// Reports the checkpoints and resolves the barriers at the front: everything before them
    /// is acknowledged.
    fn complete_markers(&mut self) {
        // Only the last of several consecutive checkpoints needs publishing.
        let mut checkpoint = None;
        loop {
            match self.queue.front() {
                Some(Pending::Checkpoint(lsn)) => {
                    checkpoint = Some(*lsn);
                    self.queue.pop_front();
                }
                Some(Pending::Barrier(_)) => {
                    if let Some(Pending::Barrier(done)) = self.queue.pop_front() {
                        // The waiter may have gone; nothing to do about it.
                        let _ = done.send(());
                    }
                }
                Some(Pending::Delivery { .. }) | None => break,
            }
        }
        if let Some(lsn) = checkpoint {
            report(&self.acked, lsn);
        }
    }

    /// Completes the markers at the front, then the front delivery if its report is in
    /// already. `None`: nothing more is ready.
    fn try_complete_front(&mut self) -> Option<Result<(), Failed>> {
        self.complete_markers();
        let Some(Pending::Delivery { delivery, .. }) = self.queue.front_mut() else {
            return None;
        };
        let outcome = (&mut *delivery).now_or_never()?;
        Some(self.finish_front(outcome))
    }

    /// Waits for the front delivery (the caller has completed the markers before it) and
    /// records it. Warns while it takes long. Cancel-safe: the entry is removed only once its
    /// report is in hand, with no await in between.
    async fn complete_front(&mut self) -> Result<(), Failed> {
        loop {
            let Some(Pending::Delivery { delivery, .. }) = self.queue.front_mut() else {
                return Ok(());
            };
            tokio::select! {
                biased;
                outcome = delivery => {
                    self.progress();
                    return self.finish_front(outcome);
                }
                () = self.stall_timer.as_mut() => self.on_stall_timer(),
            }
        }
    }

    /// Removes the front delivery, whose report is `outcome`, and accounts for it.
    fn finish_front(&mut self, outcome: DeliveryOutcome) -> Result<(), Failed> {
        let Some(Pending::Delivery {
            topic,
            bytes,
            tombstone,
            ..
        }) = self.queue.pop_front()
        else {
            return Ok(());
        };
        self.deliveries -= 1;
        crate::metrics::global()
            .sink_in_flight
            .store(self.deliveries as u64, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            Ok(Ok(_delivered)) => {
                self.summary.add(bytes, tombstone);
                Ok(())
            }
            Ok(Err((error, _message))) => Err(Failed {
                error,
                topic,
                bytes,
            }),
            // The producer went away under us; it lives as long as the sink, so this
            // would be a bug — report it rather than panic.
            Err(_canceled) => Err(Failed {
                error: KafkaError::Canceled,
                topic,
                bytes,
            }),
        }
    }

    fn warn_stall(&mut self) {
        let waited = self.last_progress.elapsed().as_secs();
        tracing::warn!(
            "no acknowledgement from Kafka at {} for {waited}s with {} records in flight; \
             pgcdc keeps retrying and has stopped reading from PostgreSQL until Kafka catches up",
            self.bootstrap,
            self.deliveries
        );
        self.warned = true;
        self.next_warning = Instant::now() + STALL_WARNING_EVERY;
    }
}
