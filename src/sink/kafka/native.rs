//! Where pgcdc talks to librdkafka's C API directly: the producer's polling thread, records
//! handed over through a topic handle kept for the whole run, and the C heap librdkafka
//! allocates its messages from.
//!
//! The polling thread serves delivery reports (and librdkafka's log lines). rust-rdkafka's
//! `ThreadedProducer` polls in 100 ms rounds and checks for shutdown between them, so dropping
//! it (at every exit) waited 50 ms on average; [`PolledProducer`] polls in 10 ms rounds.
//!
//! rust-rdkafka's `send` names the topic by string: each record costs a `CString` and, inside
//! librdkafka, a look-up of the topic by name under the client's write lock (the lock its
//! broker threads take to read topic state), then a release of the handle it found. A
//! snapshot publishes millions of records to a handful of topics, so the sink asks librdkafka
//! for each topic's handle once and passes it with every record (`rd_kafka_produceva` with
//! `RD_KAFKA_VTYPE_RKT`). Everything else is what `send` does: the key and value are copied
//! (`RD_KAFKA_MSG_F_COPY`), the partition is the partitioner's choice (unless the record
//! names one: the snapshot markers, see [`crate::model::Record::partition`]), and the record's
//! sequence number travels as the delivery opaque, so delivery reports reach
//! [`super::producer`]'s context exactly as before. The record's timestamp (Kafka's
//! `CreateTime`) is given too, from a clock the sink reads once per batch of records: left
//! out, librdkafka reads the wall clock for every record.
//!
//! librdkafka allocates every message with `malloc` on the thread that produces it and frees
//! it on its polling thread once delivered. glibc hands the top of its heap back to the
//! kernel whenever more than 128 KB of it is free, which on a steady stream of records
//! happens after nearly every acknowledged batch, so the next records fault fresh pages in,
//! each zeroed by the kernel: 36k page faults per million records, ~18% of the producing
//! thread's samples in a snapshot to Kafka (bench/PROFILE.md). [`keep_c_heap`] raises those
//! thresholds once per process: 6k faults.

use std::ffi::{c_void, CString};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::model::Header;

use rdkafka::bindings as rd;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

/// How long one poll lasts. rust-rdkafka's `poll` serves events until this much time has
/// passed (it does not return at the first one), so this is also the longest a shutdown
/// waits for the poller; 100 wake-ups a second cost nothing measurable.
const POLL_WAIT: Duration = Duration::from_millis(10);

/// The longest a [`PolledProducer::send_now`] keeps librdkafka's "flushing" state on. It ends
/// earlier, as soon as nothing is in flight; if the broker is slower than this, the remaining
/// batches simply wait for `linger.ms` again.
const SEND_NOW_FOR_MS: i32 = 10_000;

/// A producer with a thread of its own serving its delivery reports.
pub(super) struct PolledProducer<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    stop: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
    /// A [`PolledProducer::send_now`] is in progress.
    sending_now: Arc<AtomicBool>,
    /// The thread of the latest `send_now`: it holds the producer while it lasts, so it is
    /// joined before the producer is dropped (the producer must be gone when the drop ends).
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl<C: ProducerContext + 'static> PolledProducer<C> {
    pub(super) fn new(producer: BaseProducer<C>) -> std::io::Result<Self> {
        let producer = Arc::new(producer);
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let producer = Arc::clone(&producer);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("pgcdc-kafka-poll".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        producer.poll(POLL_WAIT);
                    }
                })?
        };
        Ok(PolledProducer {
            producer,
            stop,
            poller: Some(poller),
            sending_now: Arc::new(AtomicBool::new(false)),
            flusher: Mutex::new(None),
        })
    }

    /// Has librdkafka send the records it holds now rather than after `linger.ms`. For when
    /// nothing more will come until they are acknowledged (a barrier, the end of the run):
    /// the last partial batches of a `--snapshot-only` run otherwise sat out the whole 25 ms.
    /// librdkafka ignores linger while an `rd_kafka_flush` call lasts, and with delivery
    /// reports served as events that call only waits until nothing is in flight (the polling
    /// thread serves the reports meanwhile), so it runs on a short-lived thread of its own.
    pub(super) fn send_now(&self) {
        if self.sending_now.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut flusher = self.flusher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(done) = flusher.take() {
            // Its flush is over (`sending_now` was clear): the thread is ending, if not gone.
            let _ = done.join();
        }
        let producer = Arc::clone(&self.producer);
        let sending_now = Arc::clone(&self.sending_now);
        let spawned = std::thread::Builder::new()
            .name("pgcdc-kafka-flush".into())
            .spawn(move || {
                // SAFETY: the client stays alive while `producer` is held, and rd_kafka_flush
                // may be called from any thread. Its result (timed out or not) changes
                // nothing: what is still in flight is delivered as usual.
                unsafe { rd::rd_kafka_flush(producer.client().native_ptr(), SEND_NOW_FOR_MS) };
                sending_now.store(false, Ordering::Release);
            });
        match spawned {
            Ok(thread) => *flusher = Some(thread),
            Err(e) => {
                // Only a latency of linger.ms is at stake.
                tracing::debug!(error = %e, "cannot start a thread to send the last batches at once");
                self.sending_now.store(false, Ordering::Release);
            }
        }
    }

    pub(super) fn producer(&self) -> &BaseProducer<C> {
        &self.producer
    }
}

impl<C: ProducerContext + 'static> Drop for PolledProducer<C> {
    fn drop(&mut self) {
        // First the flush thread, while the poller still serves the delivery reports its
        // flush waits for: then this drop holds the last reference, and the producer is
        // destroyed (its connections closed) when the drop returns.
        let flusher = self.flusher.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(thread) = flusher.take() {
            let _ = thread.join();
        }
        self.stop.store(true, Ordering::Release);
        if let Some(poller) = self.poller.take() {
            // A panic in a delivery callback has been reported already; nothing to add.
            let _ = poller.join();
        }
    }
}

/// librdkafka's `RD_KAFKA_PARTITION_UA`: no partition named, the partitioner chooses.
const PARTITION_UNASSIGNED: i32 = -1;

/// One topic's librdkafka handle; released when dropped.
struct Topic(NonNull<rd::rd_kafka_topic_t>);

// SAFETY: librdkafka's topic handles may be used and released from any thread (its API is
// thread-safe and the handle reference-counted); the sink task may move between threads.
unsafe impl Send for Topic {}

impl Drop for Topic {
    fn drop(&mut self) {
        // SAFETY: the handle came from rd_kafka_topic_new and is released once, here.
        unsafe { rd::rd_kafka_topic_destroy(self.0.as_ptr()) }
    }
}

/// Entries of a produce call besides the headers.
const BASE_VUS: usize = 7;
/// Headers passed without allocating (more are passed too, through a `Vec`).
const INLINE_HEADERS: usize = 4;

/// Topic handles of one producer, one per table (a handful). Must be dropped before the
/// producer: librdkafka wants every topic handle released before its client is destroyed.
#[derive(Default)]
pub(super) struct Topics {
    handles: Vec<(Arc<str>, Topic)>,
    /// Index of the previous record's topic: consecutive records nearly always share it (and
    /// the same `Arc`), which spares comparing names.
    last: usize,
}

impl Topics {
    /// Hands one record to librdkafka, to `partition` or (`None`) where the partitioner puts
    /// its key. `Err` is librdkafka's refusal (`QueueFull`, a record above
    /// `message.max.bytes`, ...): nothing was queued and the record's opaque is unused.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn produce<C: ProducerContext<DeliveryOpaque = usize>>(
        &mut self,
        producer: &BaseProducer<C>,
        topic: &Arc<str>,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
        seq: usize,
        timestamp_ms: i64,
    ) -> Result<(), KafkaError> {
        let rk = producer.client().native_ptr();
        let rkt = self.handle(rk, topic)?;
        let mem = |bytes: Option<&[u8]>| match bytes {
            // librdkafka copies the bytes (F_COPY) and never writes through this pointer.
            Some(b) => rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                ptr: b.as_ptr() as *mut c_void,
                size: b.len(),
            },
            None => rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                ptr: ptr::null_mut(),
                size: 0,
            },
        };
        let base: [rd::rd_kafka_vu_t; BASE_VUS] = [
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_RKT, |u| {
                u.rkt = rkt.as_ptr()
            }),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_MSGFLAGS, |u| {
                u.i = rd::RD_KAFKA_MSG_F_COPY
            }),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE, |u| {
                u.mem = mem(value)
            }),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_KEY, |u| {
                u.mem = mem(key)
            }),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_OPAQUE, |u| {
                u.ptr = seq as *mut c_void
            }),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TIMESTAMP, |u| {
                u.i64_ = timestamp_ms
            }),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_PARTITION, |u| {
                u.i32_ = partition.unwrap_or(PARTITION_UNASSIGNED)
            }),
        ];
        // Up to INLINE_HEADERS headers (every event has one or two) go in a list on the
        // stack: no allocation per record here.
        let header = |h: &Header| {
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER, |u| {
                u.header = rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                    name: h.name.as_ptr(),
                    val: h.value.as_ptr() as *const c_void,
                    size: h.value.len() as isize,
                }
            })
        };
        let mut inline = [base[0]; BASE_VUS + INLINE_HEADERS];
        let many: Vec<rd::rd_kafka_vu_t>;
        let vus: &[rd::rd_kafka_vu_t] = if headers.len() <= INLINE_HEADERS {
            inline[..BASE_VUS].copy_from_slice(&base);
            for (slot, h) in inline[BASE_VUS..].iter_mut().zip(headers) {
                *slot = header(h);
            }
            &inline[..BASE_VUS + headers.len()]
        } else {
            many = base
                .iter()
                .copied()
                .chain(headers.iter().map(header))
                .collect();
            &many
        };
        // SAFETY: `rk` is the live producer's client, `rkt` a handle of that client (kept
        // alive by `self`), and every pointer in `vus` outlives the call, which copies what
        // it needs (header names are NUL-terminated).
        let error = unsafe { rd::rd_kafka_produceva(rk, vus.as_ptr(), vus.len()) };
        if error.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null result is an error object we own and release once.
        let code = unsafe {
            let code = rd::rd_kafka_error_code(error);
            rd::rd_kafka_error_destroy(error);
            code
        };
        Err(KafkaError::MessageProduction(RDKafkaErrorCode::from(code)))
    }

    /// The handle of `topic`, created at its first record.
    fn handle(
        &mut self,
        rk: *mut rd::rd_kafka_t,
        topic: &Arc<str>,
    ) -> Result<NonNull<rd::rd_kafka_topic_t>, KafkaError> {
        if let Some((name, t)) = self.handles.get(self.last) {
            if Arc::ptr_eq(name, topic) {
                return Ok(t.0);
            }
        }
        if let Some(i) = self.handles.iter().position(|(name, _)| **name == **topic) {
            self.last = i;
            return Ok(self.handles[i].1 .0);
        }
        let name = CString::new(topic.as_bytes())
            .map_err(|_| KafkaError::MessageProduction(RDKafkaErrorCode::InvalidTopic))?;
        // SAFETY: `rk` is a live client and `name` a NUL-terminated string; a null
        // configuration means the client's defaults.
        let rkt = unsafe { rd::rd_kafka_topic_new(rk, name.as_ptr(), ptr::null_mut()) };
        let rkt = NonNull::new(rkt).ok_or(KafkaError::MessageProduction(
            RDKafkaErrorCode::InvalidTopic,
        ))?;
        self.handles.push((Arc::clone(topic), Topic(rkt)));
        self.last = self.handles.len() - 1;
        Ok(rkt)
    }
}

/// One `rd_kafka_vu_t` entry: its type, and `set` filling the matching union field.
fn vu(
    vtype: rd::rd_kafka_vtype_t,
    set: impl FnOnce(&mut rd::rd_kafka_vu_s__bindgen_ty_1),
) -> rd::rd_kafka_vu_t {
    let mut u = rd::rd_kafka_vu_s__bindgen_ty_1 { _pad: [0; 64] };
    set(&mut u);
    rd::rd_kafka_vu_t { vtype, u }
}

/// Stops glibc from returning the top of its heap to the kernel after every delivered batch
/// (see the module docs). The memory it keeps is at most the peak that librdkafka's own
/// bounded queue reached, which peak RSS already counts. Left alone when the operator set
/// glibc's malloc tunables, and a no-op on other C libraries.
pub(super) fn keep_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let tuned = std::env::vars_os().any(|(name, value)| {
                let name = name.to_string_lossy();
                name.starts_with("MALLOC_")
                    || (name == "GLIBC_TUNABLES" && value.to_string_lossy().contains("malloc"))
            });
            if tuned {
                return;
            }
            // SAFETY: mallopt only sets allocator parameters, which glibc allows changing at
            // any time; called once.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
                libc::mallopt(libc::M_TOP_PAD, 16 << 20);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
        });
    }
}
