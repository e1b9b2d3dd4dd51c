//! The channel from the pipeline to the sink: bounded in items, and in bytes.
//!
//! Items differ in size by six orders of magnitude — a checkpoint, a row of 200 bytes, a
//! snapshot batch of 16 rows, a row of 1 MB — so a bound in items alone bounds nothing: 1,024
//! rows of 1 MB fit in a channel of 1,024 items (a 400-row snapshot of such rows peaked at
//! 433 MB with a slow broker, 475 MB with a stopped one). Here every item that carries records
//! first takes its size from a byte budget ([`Budget`], a semaphore whose permits are bytes)
//! and enters the channel with that [`Charge`]; the sink gives the charge back once it has
//! handed the records on (to librdkafka, whose own queue `queue.buffering.max.kbytes` bounds,
//! or written to the output). A sender that finds the budget spent waits: backpressure, which
//! for the streaming loop means "stop reading WAL", never a dropped record.
//!
//! An item larger than the whole budget takes the whole budget: it waits until everything
//! before it was handed on, then passes alone. What waits between the pipeline and the sink is
//! therefore at most [`CHANNEL_BYTES`], or one item if that is larger.
//!
//! The charge travels with the item and is released when dropped, so nothing can leak it; the
//! receiver closes the budget when it goes away, so a sender waiting for budget learns that
//! the sink is gone, as one waiting for room in the channel does.
//!
//! Cost: one semaphore operation per item on each side (the snapshot sends batches), next to
//! the channel's own.

use std::sync::Arc;

use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::{Record, SinkItem};

/// Items the channel holds at most (checkpoints and barriers cost no bytes: this bounds them).
pub const CHANNEL_ITEMS: usize = 1024;

/// Bytes of records that may wait between the pipeline and the sink (see the module docs):
/// hundreds of snapshot batches of small rows, plenty to keep the sink busy (librdkafka's
/// 16 MB queue is what absorbs a slow broker), and part of the README's 64 MB figure.
pub const CHANNEL_BYTES: usize = 4 << 20;

/// What a record costs besides its key and value: the record itself, its slot in a batch,
/// and the allocator's rounding of two buffers.
pub const RECORD_OVERHEAD: usize = 128;

impl Record {
    /// Bytes this record holds while it waits for the sink: see [`RECORD_OVERHEAD`].
    pub fn buffered_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.name.to_bytes().len() + h.value.len() + 16)
            .sum();
        self.payload_len() + headers + RECORD_OVERHEAD
    }
}

impl SinkItem {
    /// Bytes the item holds while it waits for the sink (none for checkpoints and barriers).
    pub fn buffered_bytes(&self) -> usize {
        match self {
            SinkItem::Record(r) => r.buffered_bytes(),
            SinkItem::Records(rs) => rs.iter().map(Record::buffered_bytes).sum(),
            SinkItem::Checkpoint(_) | SinkItem::Barrier(_) => 0,
        }
    }
}

/// A channel to a sink holding at most `items` items and `bytes` bytes of records.
pub fn channel(items: usize, bytes: usize) -> (SinkSender, SinkReceiver) {
    let (tx, rx) = mpsc::channel(items);
    let budget = Budget::new(bytes);
    (
        SinkSender {
            tx,
            budget: budget.clone(),
        },
        SinkReceiver { rx, budget },
    )
}

/// The byte budget of a channel. Senders that prepare items elsewhere (the workers of a
/// parallel snapshot) charge their batches to it before handing them on.
#[derive(Clone, Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    /// The whole budget: the most one charge takes.
    total: u32,
}

/// The budget is closed: the sink is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl Budget {
    fn new(bytes: usize) -> Self {
        let total = bytes.clamp(1, u32::MAX as usize) as u32;
        Budget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// `bytes`, capped at the whole budget: a larger item passes alone.
    fn permits_for(&self, bytes: usize) -> u32 {
        bytes.min(self.total as usize) as u32
    }

    /// Takes `bytes` from the budget, waiting until they are free. Cancel-safe: a wait that
    /// is dropped takes nothing.
    pub async fn charge(&self, bytes: usize) -> Result<Charge, Closed> {
        let n = self.permits_for(bytes);
        if n == 0 {
            return Ok(Charge::none());
        }
        match Arc::clone(&self.permits).try_acquire_many_owned(n) {
            Ok(p) => Ok(Charge(Some(p))),
            Err(TryAcquireError::Closed) => Err(Closed),
            Err(TryAcquireError::NoPermits) => Arc::clone(&self.permits)
                .acquire_many_owned(n)
                .await
                .map(|p| Charge(Some(p)))
                .map_err(|_| Closed),
        }
    }

    /// Takes `bytes` from the budget if they are free now.
    pub fn try_charge(&self, bytes: usize) -> Result<Charge, TryAcquireError> {
        let n = self.permits_for(bytes);
        if n == 0 {
            return Ok(Charge::none());
        }
        Arc::clone(&self.permits)
            .try_acquire_many_owned(n)
            .map(|p| Charge(Some(p)))
    }

    /// Bytes free right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// Bytes taken from a [`Budget`] for one item, given back when dropped.
#[must_use = "a charge is given back when dropped"]
#[derive(Debug, Default)]
pub struct Charge(Option<OwnedSemaphorePermit>);

impl Charge {
    /// A charge of nothing.
    pub fn none() -> Self {
        Charge(None)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

/// The pipeline's end of the channel. Cloning it shares the channel and the budget.
#[derive(Clone, Debug)]
pub struct SinkSender {
    tx: mpsc::Sender<(SinkItem, Charge)>,
    budget: Budget,
}

impl SinkSender {
    /// The channel's byte budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Sends `item`, waiting for budget for its bytes, then for room in the channel.
    pub async fn send(&self, item: SinkItem) -> Result<(), SendError<SinkItem>> {
        match self.budget.charge(item.buffered_bytes()).await {
            Ok(charge) => self.send_charged(item, charge).await,
            Err(Closed) => Err(SendError(item)),
        }
    }

    /// Sends `item` with a charge taken for it before (see [`Budget::charge`]).
    pub async fn send_charged(
        &self,
        item: SinkItem,
        charge: Charge,
    ) -> Result<(), SendError<SinkItem>> {
        self.tx
            .send((item, charge))
            .await
            .map_err(|SendError((item, _))| SendError(item))
    }

    /// Sends `item` with its charge if the channel has room now; gives both back if not.
    // The error hands the item back (no allocation on this path); its size is the item's.
    #[allow(clippy::result_large_err)]
    pub fn try_send_charged(
        &self,
        item: SinkItem,
        charge: Charge,
    ) -> Result<(), TrySendError<(SinkItem, Charge)>> {
        self.tx.try_send((item, charge))
    }

    /// Sends `item` if both its bytes and a place in the channel are free now.
    pub fn try_send(&self, item: SinkItem) -> Result<(), TrySendError<SinkItem>> {
        let charge = match self.budget.try_charge(item.buffered_bytes()) {
            Ok(charge) => charge,
            Err(TryAcquireError::NoPermits) => return Err(TrySendError::Full(item)),
            Err(TryAcquireError::Closed) => return Err(TrySendError::Closed(item)),
        };
        self.tx.try_send((item, charge)).map_err(|e| match e {
            TrySendError::Full((item, _)) => TrySendError::Full(item),
            TrySendError::Closed((item, _)) => TrySendError::Closed(item),
        })
    }

    /// Waits for budget for `bytes` and a place in the channel, for an item sent with
    /// [`SinkPermit::send`]. Cancel-safe: a wait that is dropped takes nothing (what it had
    /// taken is given back), so it can be one branch of a `select!`.
    pub async fn reserve(&self, bytes: usize) -> Result<SinkPermit<'_>, Closed> {
        let charge = self.budget.charge(bytes).await?;
        let permit = self.tx.reserve().await.map_err(|_| Closed)?;
        Ok(SinkPermit { permit, charge })
    }
}

/// A place in the channel and the budget for one item (see [`SinkSender::reserve`]).
pub struct SinkPermit<'a> {
    permit: mpsc::Permit<'a, (SinkItem, Charge)>,
    charge: Charge,
}

impl SinkPermit<'_> {
    /// Sends `item`, which should need no more bytes than were reserved.
    pub fn send(self, item: SinkItem) {
        self.permit.send((item, self.charge));
    }
}

/// The sink's end of the channel. Each item comes with its [`Charge`]: drop it once the
/// item's records are handed on.
#[derive(Debug)]
pub struct SinkReceiver {
    rx: mpsc::Receiver<(SinkItem, Charge)>,
    budget: Budget,
}

impl SinkReceiver {
    pub async fn recv(&mut self) -> Option<(SinkItem, Charge)> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Result<(SinkItem, Charge), TryRecvError> {
        self.rx.try_recv()
    }
}

impl Drop for SinkReceiver {
    fn drop(&mut self) {
        // Senders waiting for budget learn that the sink is gone.
        self.budget.permits.close();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::model::Lsn;

    fn record(bytes: usize) -> SinkItem {
        SinkItem::Record(Record {
            topic: "t".into(),
            key: None,
            value: Some(Bytes::from(vec![b'x'; bytes])),
            partition: None,
            headers: Vec::new(),
        })
    }

    #[tokio::test]
    async fn the_budget_bounds_bytes_not_items() {
        let (tx, mut rx) = channel(100, 10_000);
        tx.try_send(record(4_000)).expect("fits");
        tx.try_send(record(4_000)).expect("fits");
        assert!(matches!(
            tx.try_send(record(4_000)),
            Err(TrySendError::Full(_))
        ));
        // Checkpoints take no bytes.
        tx.try_send(SinkItem::Checkpoint(Lsn(1)))
            .expect("a checkpoint fits");
        let (_, charge) = rx.try_recv().expect("an item");
        assert_eq!(charge.bytes(), 4_000 + RECORD_OVERHEAD);
        // Still held: the sink has not handed the record on.
        assert!(tx.try_send(record(4_000)).is_err());
        drop(charge);
        tx.try_send(record(4_000)).expect("room again");
    }

    #[tokio::test]
    async fn an_item_larger_than_the_budget_passes_alone() {
        let (tx, mut rx) = channel(100, 10_000);
        tx.send(record(100)).await.expect("sent");
        let big = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(record(50_000)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !big.is_finished(),
            "waits for the small one to be handed on"
        );
        let (_, small) = rx.recv().await.expect("the small one");
        drop(small);
        big.await.expect("join").expect("sent");
        let (_, charge) = rx.recv().await.expect("the big one");
        assert_eq!(charge.bytes(), 10_000, "the whole budget, no more");
        assert!(tx.try_send(record(1)).is_err(), "nothing else meanwhile");
    }

    #[tokio::test]
    async fn a_dropped_reservation_takes_nothing_and_a_gone_sink_wakes_senders() {
        let (tx, rx) = channel(100, 10_000);
        {
            let reserving = tx.reserve(10_000);
            tokio::pin!(reserving);
            assert!(
                tokio::time::timeout(Duration::from_millis(10), &mut reserving)
                    .await
                    .is_ok(),
                "free budget is reserved at once"
            );
        }
        assert_eq!(tx.budget().available(), 10_000);
        let charge = tx.budget().charge(10_000).await.expect("open");
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(record(10)).await.is_err() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        assert!(
            waiting.await.expect("join"),
            "the send fails: the sink is gone"
        );
        drop(charge);
    }
}
