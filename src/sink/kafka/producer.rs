//! The Kafka producer loop: records out, delivery reports back, checkpoints in order.
//!
//! Every record handed to librdkafka gets the next sequence number. The producer's polling
//! thread ([`super::native::PolledProducer`]) calls [`SinkContext::delivery`] for each delivery
//! report, in whatever order the partitions complete; it marks that number done and moves the
//! **watermark**: the count of records acknowledged *without a gap*. A checkpoint or barrier
//! is queued with the number of records sent before it and completes once the watermark
//! reaches that number:
//!
//! ```text
//!   seq:      0   1   2   3 | 4   5          acked: 0 1 2 3 5  →  watermark 4
//!   markers:  [ckpt 0/10 @ 4] [ckpt 0/20 @ 6]   →  0/10 reported, 0/20 waits for seq 4
//! ```
//!
//! A failed delivery stops the watermark at that record: nothing behind it is ever reported,
//! and the run ends with the error (unless it is an oversized record under
//! `--oversized skip`, which counts as done, loudly).
//!
//! Why not a future per record: a delivery future costs an allocation, a oneshot channel and
//! a wake-up per record, and the FIFO of futures an entry per record. Here a record costs one
//! bit in a ring and, on the polling thread, one uncontended lock; the sink's task is woken
//! only when the watermark reaches what it waits for (the front checkpoint, room in the
//! window, or the drain).
//!
//! Backpressure: the loop reads the channel only while fewer than `max_in_flight` records lie
//! between the watermark and the next sequence number. A batch of records
//! ([`SinkItem::Records`]) is taken whole from the channel but sent one record at a time
//! under the same rule: the rest waits in the loop, and the channel is read again only once
//! the batch is sent. When librdkafka's own queue is full
//! (`QueueFull`), the record is kept and the loop waits for the watermark to move before
//! retrying it — never a drop. An item's bytes stay charged to the channel's budget
//! ([`crate::model::channel`]) until all its records are with librdkafka, so the pipeline reads
//! no more meanwhile. When the channel is closed, the loop waits until every record is
//! acknowledged and returns.
//!
//! Memory per record in flight on this side: a bit in the ring, and at most one marker per
//! record (consecutive checkpoints share one), whatever the records' size.
//!
//! A failed run purges the producer and waits for it to be destroyed before returning (see
//! `KafkaSink::discard`): the pipeline that starts again must not race the old producer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext, PurgeConfig};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{oneshot, watch, Notify};

use super::native::{PolledProducer, Topics};
use crate::kafka::{
    client_config, config_error, KafkaConfig, OffThreadDrop, Oversized, PgcdcContext, Role,
};
use crate::model::Lsn;
use crate::model::{Charge, Record, SinkItem, SinkReceiver};
use crate::sink::{report, SinkError, SinkSummary};

/// Warn when no delivery report has arrived for this long while records are in flight.
pub const STALL_WARNING_AFTER: Duration = Duration::from_secs(10);
/// Repeat the stall warning this often while the stall lasts.
const STALL_WARNING_EVERY: Duration = Duration::from_secs(30);
/// How often the loop looks for a stall while records are in flight: a stall is reported
/// between [`STALL_WARNING_AFTER`] and that plus this after the last acknowledgement.
const STALL_CHECK_EVERY: Duration = Duration::from_millis(2500);
/// Records stamped with one clock reading at most (see `Loop::timestamp`): a few hundred
/// microseconds of work, well inside a millisecond timestamp.
const CLOCK_EVERY: u32 = 256;
/// How long to wait before retrying after `QueueFull` when none of our records is in flight
/// (librdkafka's queue is then full of someone else's messages — not expected, but harmless).
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

/// Publishes records to Kafka and reports checkpoints once Kafka has acknowledged them.
pub struct KafkaSink {
    producer: OffThreadDrop<PolledProducer<SinkContext>>,
    acks: Arc<Acks>,
    bootstrap: String,
}

impl KafkaSink {
    /// Creates the producer. Fails with [`SinkError::Config`] naming an invalid property.
    /// Connecting happens in the background; see [`crate::kafka::wait_for_cluster`] to wait for it.
    pub fn new(cfg: KafkaConfig) -> Result<Self, SinkError> {
        super::native::keep_c_heap();
        let acks = Arc::new(Acks::new(cfg.max_in_flight.max(1), cfg.oversized));
        let context = SinkContext {
            base: PgcdcContext::new(Role::Producer),
            acks: Arc::clone(&acks),
        };
        let producer: BaseProducer<SinkContext> = client_config(&cfg, Role::Producer)
            .create_with_context(context)
            .map_err(config_error)?;
        let producer = PolledProducer::new(producer).map_err(|e| SinkError::ProducerFatal {
            reason: format!(
                "cannot start its polling thread: {e}; check the process's thread limit"
            ),
        })?;
        Ok(KafkaSink {
            producer: OffThreadDrop::new(producer),
            acks,
            bootstrap: cfg.bootstrap,
        })
    }

    /// Runs until `rx` is closed and every record is acknowledged. See [`crate::sink::run`].
    ///
    /// When it fails, the producer is emptied and destroyed before this returns (see
    /// [`KafkaSink::discard`]): the pipeline that starts again after a failure must not race
    /// records of this one.
    pub async fn run(
        self,
        rx: SinkReceiver,
        acked: watch::Sender<Lsn>,
    ) -> Result<SinkSummary, SinkError> {
        let result = self.deliver(rx, acked).await;
        if result.is_err() {
            self.discard().await;
        }
        result
    }

    /// Purges whatever the producer still holds — queued, waiting for a retry, or in flight —
    /// and waits until it is destroyed: its connections closed, nothing of it left to send.
    ///
    /// Why wait: after a failed delivery, `run` starts the pipeline again in this process from
    /// the last confirmed position, with a new producer publishing the same keys. Records the
    /// old producer still held (the failure of one record leaves the others queued or in
    /// retry) would otherwise go on being sent, and could land after the new producer's
    /// copies — a row's older event after its newer one. Destroying it in the background, as
    /// at a normal end, left that open for as long as a [`PolledProducer::send_now`] kept it
    /// alive (up to 10 s).
    async fn discard(self) {
        let purge = PurgeConfig::default().queue().inflight();
        self.producer
            .destroy(move |p| p.producer().purge(purge))
            .await;
    }

    /// The delivery loop of [`KafkaSink::run`].
    ///
    /// Work that is ready is done without waiting first: markers the watermark has passed,
    /// then items already queued in the channel. Only then does the loop wait, so a burst of
    /// records costs one wake-up, not one per record.
    async fn deliver(
        &self,
        mut rx: SinkReceiver,
        acked: watch::Sender<Lsn>,
    ) -> Result<SinkSummary, SinkError> {
        let mut st = Loop::new(&self.bootstrap, acked);
        let window = self.acks.window() as u64;
        let mut closed = false;
        let mut sent_now = false;
        loop {
            let watermark = self.acks.watermark();
            st.complete_markers(watermark);
            st.observe(watermark);
            crate::metrics::global()
                .sink_in_flight
                .store(st.sent - watermark, Ordering::Relaxed);
            if self.acks.failed.load(Ordering::Acquire) {
                return Err(self.failure());
            }
            if closed && st.markers.is_empty() && st.batch.is_none() && watermark == st.sent {
                return Ok(self.acks.summary());
            }
            if closed && !sent_now {
                // Nothing more comes: the last batches need not wait to fill.
                sent_now = true;
                if st.sent > watermark {
                    self.producer.send_now();
                }
            }
            let mut read_any = false;
            let was_closed = closed;
            while st.sent - self.acks.watermark() < window {
                // What is left of a batch goes first: it came before anything in the channel.
                if let Some(record) = st.next_of_batch() {
                    self.send(record, &mut st).await?;
                    if st.batch.is_none() {
                        // All of it is with librdkafka: its bytes are free for the pipeline.
                        st.batch_charge = Charge::none();
                    }
                    read_any = true;
                    continue;
                }
                if closed {
                    break;
                }
                match rx.try_recv() {
                    Ok((item, charge)) => {
                        self.handle(item, charge, &mut st).await?;
                        read_any = true;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => closed = true,
                }
            }
            // Just closed: the drain may be complete already; check before waiting for more.
            if read_any || closed != was_closed {
                continue;
            }
            // Nothing ready: wait for the watermark to reach what completes the next step,
            // for the channel (while the window has room), or for the stall check.
            let can_read = !closed && st.batch.is_none() && st.sent - watermark < window;
            let mut wanted = st.markers.front().map_or(u64::MAX, |m| m.after);
            if !can_read {
                // Window full, or draining: any progress may be what is needed.
                wanted = wanted.min(watermark + 1);
            }
            if st.warned {
                // Report the end of a stall as soon as it ends.
                wanted = wanted.min(watermark + 1);
            }
            if !self.acks.wait_for(wanted) {
                continue;
            }
            let pending = st.sent > watermark;
            tokio::select! {
                biased;
                () = self.acks.notify.notified() => {}
                item = rx.recv(), if can_read => match item {
                    None => closed = true,
                    Some((item, charge)) => self.handle(item, charge, &mut st).await?,
                },
                () = st.stall_timer.as_mut(), if pending => st.on_stall_timer(&self.acks),
            }
            // After a wait, what is left of a batch is stamped with the time it goes.
            st.read_clock();
        }
    }

    /// Takes one item from the channel. Its `charge` is dropped once its records are handed
    /// to librdkafka (whose queue holds them from then on).
    async fn handle(&self, item: SinkItem, charge: Charge, st: &mut Loop) -> Result<(), SinkError> {
        // The records of this item are stamped with the time it was taken.
        st.read_clock();
        match item {
            SinkItem::Record(record) => self.send(record, st).await?,
            // Sent by the loop, each when the window has room for it.
            SinkItem::Records(records) => {
                st.batch = Some(records.into_iter());
                st.batch_charge = charge;
            }
            SinkItem::Checkpoint(lsn) => st.push_marker(Marker::Checkpoint(lsn)),
            SinkItem::Barrier(done) => {
                st.push_marker(Marker::Barrier(done));
                // Its sender waits for it and sends nothing meanwhile: no batch will fill.
                if st.sent > self.acks.watermark() {
                    self.producer.send_now();
                }
            }
        }
        Ok(())
    }

    /// Hands `record` to librdkafka, waiting for acknowledgements while its queue is full.
    async fn send(&self, record: Record, st: &mut Loop) -> Result<(), SinkError> {
        loop {
            let seq = st.sent;
            let was_empty = seq == self.acks.watermark();
            // Counted before librdkafka has it, so that the watermark (which its report may
            // move at once, on another thread) never passes `sent`.
            st.sent = seq + 1;
            // The ring slot of `seq` is free: the loop reads only while the window has room.
            let timestamp = st.timestamp();
            let sent = st.topics.produce(
                self.producer.producer(),
                &record.topic,
                record.partition,
                record.key.as_deref(),
                record.value.as_deref(),
                &record.headers,
                seq as usize,
                timestamp,
            );
            if sent.is_err() {
                st.sent = seq;
            }
            match sent {
                Ok(()) => {
                    if was_empty {
                        // The window was empty: the stall clock starts now.
                        st.start_stall_clock(seq);
                    }
                    return Ok(());
                }
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    // Keep the record; make room by waiting for acknowledgements.
                    let watermark = self.acks.watermark();
                    st.complete_markers(watermark);
                    if self.acks.failed.load(Ordering::Acquire) {
                        return Err(self.failure());
                    }
                    if st.sent > watermark {
                        if self.acks.wait_for(watermark + 1) {
                            tokio::select! {
                                biased;
                                () = self.acks.notify.notified() => {}
                                () = st.stall_timer.as_mut() => st.on_stall_timer(&self.acks),
                            }
                        }
                        st.observe(self.acks.watermark());
                    } else {
                        tokio::time::sleep(QUEUE_FULL_RETRY).await;
                    }
                    // Stamped when it finally goes, not when it first tried.
                    st.read_clock();
                }
                Err(error) => {
                    // Refused before it was queued (e.g. larger than message.max.bytes): the
                    // same verdict as a failed delivery.
                    let failed = Failed {
                        error,
                        topic: record.topic.to_string(),
                        bytes: record.payload_len(),
                        keyless: record.key.is_none(),
                    };
                    if self.acks.skips(&failed) {
                        // Nothing was queued: no sequence number was used.
                        self.acks.lock().skip(&failed);
                        return Ok(());
                    }
                    return Err(self.classify(failed));
                }
            }
        }
    }

    /// The first failed delivery, as the error that tells the operator what to do.
    fn failure(&self) -> SinkError {
        match self.acks.lock().failure.take() {
            Some(failed) => self.classify(failed),
            // Taken already: only one caller ever sees `failed`, so this is not reached.
            None => SinkError::Delivery {
                topic: String::new(),
                source: KafkaError::Canceled,
            },
        }
    }

    /// Turns a librdkafka failure into the error that tells the operator what to do.
    fn classify(&self, failed: Failed) -> SinkError {
        if failed.is_refused() {
            return SinkError::Rejected {
                topic: failed.topic,
                keyless: failed.keyless,
                reason: failed.error.to_string(),
            };
        }
        let topic = failed.topic;
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
                let reason = match self.producer.producer().client().fatal_error() {
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

/// A record Kafka did not take.
struct Failed {
    error: KafkaError,
    topic: String,
    bytes: usize,
    /// Sent without a key (a compacted topic refuses those).
    keyless: bool,
}

impl Failed {
    /// The broker refuses this record as it is, so sending it again cannot help: invalid (a
    /// keyless record on a compacted topic), against a broker policy, or, from brokers before
    /// Kafka 2.4, a keyless record reported as corrupt.
    fn is_refused(&self) -> bool {
        match self.error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::InvalidRecord | RDKafkaErrorCode::PolicyViolation) => true,
            Some(RDKafkaErrorCode::InvalidMessage) => self.keyless,
            _ => false,
        }
    }
}

/// Delivery bookkeeping, shared by the sink's loop and the producer's polling thread.
struct Acks {
    state: Mutex<AckState>,
    /// Copy of `AckState::watermark`, readable without the lock.
    watermark: AtomicU64,
    /// The loop sleeps until the watermark reaches this (`u64::MAX`: only a failure wakes it).
    wanted: AtomicU64,
    /// Set once a delivery failed for good; the loop then ends the run.
    failed: AtomicBool,
    notify: Notify,
    oversized: Oversized,
}

struct AckState {
    /// `done[seq % len]`: whether record `seq` (at or above the watermark) is acknowledged.
    done: Vec<bool>,
    watermark: u64,
    summary: SinkSummary,
    failure: Option<Failed>,
}

impl Acks {
    fn new(window: usize, oversized: Oversized) -> Self {
        Acks {
            state: Mutex::new(AckState {
                done: vec![false; window],
                watermark: 0,
                summary: SinkSummary::default(),
                failure: None,
            }),
            watermark: AtomicU64::new(0),
            wanted: AtomicU64::new(u64::MAX),
            failed: AtomicBool::new(false),
            notify: Notify::new(),
            oversized,
        }
    }

    fn window(&self) -> usize {
        self.lock().done.len()
    }

    fn lock(&self) -> MutexGuard<'_, AckState> {
        // The state stays consistent at every unlock; a panic elsewhere cannot corrupt it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    fn summary(&self) -> SinkSummary {
        self.lock().summary
    }

    /// Asks to be woken when the watermark reaches `wanted`. `false`: it has already (or a
    /// failure is in), so there is nothing to wait for.
    fn wait_for(&self, wanted: u64) -> bool {
        self.wanted.store(wanted, Ordering::SeqCst);
        // Pairs with the polling thread's store-then-load in `record`: one side sees the other.
        self.watermark.load(Ordering::SeqCst) < wanted && !self.failed.load(Ordering::SeqCst)
    }

    /// Whether this failure is an oversized record that `--oversized skip` leaves out.
    fn skips(&self, failed: &Failed) -> bool {
        self.oversized == Oversized::Skip
            && failed.error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
    }

    /// One delivery report (polling thread).
    fn record(&self, seq: u64, outcome: Result<(usize, bool), Failed>) {
        let mut st = self.lock();
        let ok = match outcome {
            Ok((bytes, tombstone)) => {
                st.summary.add(bytes, tombstone);
                true
            }
            Err(failed) if self.skips(&failed) => {
                st.skip(&failed);
                true
            }
            Err(failed) => {
                if st.failure.is_none() {
                    st.failure = Some(failed);
                }
                false
            }
        };
        let len = st.done.len() as u64;
        if ok {
            st.done[(seq % len) as usize] = true;
        }
        let before = st.watermark;
        while st.done[(st.watermark % len) as usize] {
            let slot = (st.watermark % len) as usize;
            st.done[slot] = false;
            st.watermark += 1;
        }
        let watermark = st.watermark;
        let failed = !ok && st.failure.is_some();
        drop(st);
        if failed {
            self.failed.store(true, Ordering::SeqCst);
        }
        if watermark != before {
            self.watermark.store(watermark, Ordering::SeqCst);
        }
        if failed || (watermark != before && watermark >= self.wanted.load(Ordering::SeqCst)) {
            self.notify.notify_one();
        }
    }
}

impl AckState {
    /// With `--oversized skip`, a record too large for Kafka is left out — loudly, and
    /// counted.
    fn skip(&mut self, failed: &Failed) {
        self.summary.oversized_skipped += 1;
        tracing::error!(
            topic = %failed.topic,
            bytes = failed.bytes,
            skipped = self.summary.oversized_skipped,
            "SKIPPED a record larger than Kafka accepts (--oversized skip): consumers will not see this change; raise message.max.bytes to keep such records"
        );
    }
}

/// The producer's client context: pgcdc's logging, plus the delivery reports.
struct SinkContext {
    base: PgcdcContext,
    acks: Arc<Acks>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.base.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.base.error(error, reason);
    }
}

impl ProducerContext for SinkContext {
    /// The record's sequence number.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let size = |m: &dyn MessageSize| m.size();
        let outcome = match result {
            Ok(msg) => Ok((size(msg), msg.payload().is_none())),
            Err((error, msg)) => Err(Failed {
                error: error.clone(),
                topic: msg.topic().to_string(),
                bytes: size(msg),
                keyless: msg.key().is_none(),
            }),
        };
        self.acks.record(seq as u64, outcome);
    }
}

/// Key plus value bytes of a delivered message, as counted in [`SinkSummary`].
trait MessageSize {
    fn size(&self) -> usize;
}

impl<M: Message> MessageSize for M {
    fn size(&self) -> usize {
        self.key().map_or(0, <[u8]>::len) + self.payload().map_or(0, <[u8]>::len)
    }
}

/// A checkpoint or barrier, waiting for the records sent before it.
struct Pending {
    /// Records sent before the marker: it completes when the watermark reaches this.
    after: u64,
    marker: Marker,
}

enum Marker {
    Checkpoint(Lsn),
    Barrier(oneshot::Sender<()>),
}

/// The sink task's side: markers, the sequence counter, and the stall watch.
struct Loop {
    markers: VecDeque<Pending>,
    /// The records of a [`SinkItem::Records`] not sent yet; `None` once all are.
    batch: Option<std::vec::IntoIter<Record>>,
    /// The budget that batch holds, given back once all of it is sent.
    batch_charge: Charge,
    /// Records handed to librdkafka so far (the next sequence number).
    sent: u64,
    acked: watch::Sender<Lsn>,
    bootstrap: String,
    /// The watermark when progress was last seen, and when.
    seen: u64,
    last_progress: Instant,
    /// When to warn again about a stall that was already reported.
    next_warning: Instant,
    warned: bool,
    /// Wakes the loop to look for a stall while records are in flight. One timer for the
    /// whole run, moved only when it fires or when the window becomes non-empty.
    stall_timer: Pin<Box<tokio::time::Sleep>>,
    /// The records' timestamp (Unix ms), read for every item taken from the channel, after
    /// every wait for room, and every [`CLOCK_EVERY`] records; and the records stamped since.
    now_ms: i64,
    stamped: u32,
    /// librdkafka's handles of the topics written so far. Dropped with the loop, before the
    /// producer (`run` consumes the sink, which outlives its locals).
    topics: Topics,
}

impl Loop {
    fn new(bootstrap: &str, acked: watch::Sender<Lsn>) -> Self {
        let now = Instant::now();
        Loop {
            markers: VecDeque::new(),
            batch: None,
            batch_charge: Charge::none(),
            sent: 0,
            acked,
            bootstrap: bootstrap.to_string(),
            seen: 0,
            last_progress: now,
            next_warning: now,
            warned: false,
            stall_timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                now + STALL_CHECK_EVERY,
            ))),
            topics: Topics::default(),
            now_ms: crate::model::now_ms(),
            stamped: 0,
        }
    }

    fn read_clock(&mut self) {
        self.now_ms = crate::model::now_ms();
        self.stamped = 0;
    }

    /// The timestamp of the next record: the clock read when its item was taken (or after
    /// the last wait), read again when many records went out since.
    fn timestamp(&mut self) -> i64 {
        if self.stamped >= CLOCK_EVERY {
            self.read_clock();
        }
        self.stamped += 1;
        self.now_ms
    }

    /// The next record of the current batch, if any.
    fn next_of_batch(&mut self) -> Option<Record> {
        let batch = self.batch.as_mut()?;
        let next = batch.next();
        if batch.len() == 0 {
            self.batch = None;
        }
        next
    }

    fn push_marker(&mut self, marker: Marker) {
        // A checkpoint right after another, with no record between them, replaces it: only
        // the later one is ever reported (see `complete_markers`). So the queue holds at most
        // about one marker per record in flight, however many keepalives arrive meanwhile.
        if let (Marker::Checkpoint(lsn), Some(back)) = (&marker, self.markers.back_mut()) {
            if let (Marker::Checkpoint(prev), true) = (&mut back.marker, back.after == self.sent) {
                *prev = (*prev).max(*lsn);
                return;
            }
        }
        self.markers.push_back(Pending {
            after: self.sent,
            marker,
        });
    }

    /// Reports the checkpoints and resolves the barriers that every record before them has
    /// reached.
    fn complete_markers(&mut self, watermark: u64) {
        // Only the last of several completed checkpoints needs publishing.
        let mut checkpoint = None;
        while self.markers.front().is_some_and(|m| m.after <= watermark) {
            match self.markers.pop_front().map(|m| m.marker) {
                Some(Marker::Checkpoint(lsn)) => checkpoint = Some(lsn),
                // The waiter may have gone; nothing to do about it.
                Some(Marker::Barrier(done)) => drop(done.send(())),
                None => break,
            }
        }
        if let Some(lsn) = checkpoint {
            report(&self.acked, lsn);
        }
    }

    /// Ends a reported stall as soon as the watermark moves. (Progress without a stall is
    /// noted by the stall timer only: no clock read per loop turn.)
    fn observe(&mut self, watermark: u64) {
        if !self.warned || watermark == self.seen {
            return;
        }
        let now = Instant::now();
        tracing::info!(
            "Kafka at {} acknowledges again after {}s",
            self.bootstrap,
            now.duration_since(self.last_progress).as_secs()
        );
        self.warned = false;
        self.seen = watermark;
        self.last_progress = now;
    }

    /// The window was empty and record `seq` is the first in it.
    fn start_stall_clock(&mut self, seq: u64) {
        let now = Instant::now();
        self.seen = seq;
        self.last_progress = now;
        self.warned = false;
        self.stall_timer
            .as_mut()
            .reset(tokio::time::Instant::from_std(now + STALL_CHECK_EVERY));
    }

    /// The stall timer fired while records are in flight.
    fn on_stall_timer(&mut self, acks: &Acks) {
        let now = Instant::now();
        let watermark = acks.watermark();
        if watermark != self.seen {
            self.observe(watermark);
            self.seen = watermark;
            self.last_progress = now;
        } else if !self.warned && now.duration_since(self.last_progress) >= STALL_WARNING_AFTER
            || self.warned && now >= self.next_warning
        {
            self.warn_stall(watermark);
        }
        self.stall_timer
            .as_mut()
            .reset(tokio::time::Instant::from_std(now + STALL_CHECK_EVERY));
    }

    fn warn_stall(&mut self, watermark: u64) {
        let waited = self.last_progress.elapsed().as_secs();
        tracing::warn!(
            "no acknowledgement from Kafka at {} for {waited}s with {} records in flight; \
             pgcdc keeps retrying and has stopped reading from PostgreSQL until Kafka catches up",
            self.bootstrap,
            self.sent - watermark
        );
        self.warned = true;
        self.next_warning = Instant::now() + STALL_WARNING_EVERY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<(usize, bool), Failed> {
        Ok((10, false))
    }

    #[test]
    fn the_watermark_waits_for_the_gap() {
        let acks = Acks::new(4, Oversized::Fail);
        acks.record(1, ok());
        acks.record(2, ok());
        assert_eq!(acks.watermark(), 0);
        acks.record(0, ok());
        assert_eq!(acks.watermark(), 3);
        // The ring wraps: slots of 0..3 are free again.
        for seq in [4, 5, 6, 3] {
            acks.record(seq, ok());
        }
        assert_eq!(acks.watermark(), 7);
        assert_eq!(acks.summary().records, 7);
    }

    #[test]
    fn a_failure_stops_the_watermark_and_skips_count_as_done() {
        let too_large = |seq| Failed {
            error: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            topic: format!("t{seq}"),
            bytes: 1,
            keyless: false,
        };
        let acks = Acks::new(8, Oversized::Skip);
        acks.record(0, Err(too_large(0)));
        acks.record(1, ok());
        assert_eq!(acks.watermark(), 2);
        assert!(!acks.failed.load(Ordering::SeqCst));
        assert_eq!(acks.summary().oversized_skipped, 1);

        let acks = Acks::new(8, Oversized::Fail);
        acks.record(0, ok());
        acks.record(1, Err(too_large(1)));
        acks.record(2, ok());
        assert_eq!(acks.watermark(), 1);
        assert!(acks.failed.load(Ordering::SeqCst));
        assert!(!acks.wait_for(5), "a failure is never waited for");
    }

    #[test]
    fn records_the_broker_refuses_are_not_retried() {
        let failed = |code, keyless| Failed {
            error: KafkaError::MessageProduction(code),
            topic: "t".into(),
            bytes: 1,
            keyless,
        };
        assert!(failed(RDKafkaErrorCode::InvalidRecord, true).is_refused());
        assert!(failed(RDKafkaErrorCode::PolicyViolation, false).is_refused());
        assert!(failed(RDKafkaErrorCode::InvalidMessage, true).is_refused());
        // A corrupt keyed record is damage in transit: worth another try.
        assert!(!failed(RDKafkaErrorCode::InvalidMessage, false).is_refused());
        assert!(!failed(RDKafkaErrorCode::RequestTimedOut, true).is_refused());
    }

    #[tokio::test]
    async fn markers_complete_in_order_at_the_watermark() {
        let (tx, rx) = watch::channel(Lsn(0));
        let mut st = Loop::new("b", tx);
        st.sent = 2;
        st.push_marker(Marker::Checkpoint(Lsn(10)));
        st.sent = 5;
        st.push_marker(Marker::Checkpoint(Lsn(20)));
        st.push_marker(Marker::Checkpoint(Lsn(30)));
        st.complete_markers(1);
        assert_eq!(*rx.borrow(), Lsn(0));
        st.complete_markers(4);
        assert_eq!(*rx.borrow(), Lsn(10));
        st.complete_markers(5);
        assert_eq!(*rx.borrow(), Lsn(30));
        assert!(st.markers.is_empty());
    }

    #[tokio::test]
    async fn consecutive_checkpoints_share_a_marker() {
        let (tx, rx) = watch::channel(Lsn(0));
        let mut st = Loop::new("b", tx);
        st.sent = 3;
        for lsn in [10, 20, 30] {
            st.push_marker(Marker::Checkpoint(Lsn(lsn)));
        }
        assert_eq!(st.markers.len(), 1);
        let (done, _) = oneshot::channel();
        st.push_marker(Marker::Barrier(done));
        st.push_marker(Marker::Checkpoint(Lsn(40)));
        assert_eq!(
            st.markers.len(),
            3,
            "a barrier between them keeps them apart"
        );
        st.sent = 4;
        st.push_marker(Marker::Checkpoint(Lsn(50)));
        assert_eq!(st.markers.len(), 4, "a record between them too");
        st.complete_markers(3);
        assert_eq!(*rx.borrow(), Lsn(40));
        st.complete_markers(4);
        assert_eq!(*rx.borrow(), Lsn(50));
        assert!(st.markers.is_empty());
    }
}
