//! The stdout sink, driven through `sink::run` with injected writers.

mod common;

use common::sinks::{self, record, wait_acked, Running};

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::api::Lsn;
use common::api::{Sink, SinkError, SinkItem, SinkSender, StdoutSink};
use tokio::io::AsyncWrite;
use tokio::sync::{oneshot, watch};

/// A writer whose state the test can inspect and control.
#[derive(Clone, Default)]
struct Probe(Arc<Mutex<ProbeState>>);

#[derive(Default)]
struct ProbeState {
    written: Vec<u8>,
    /// Length of `written` at the last completed flush.
    flushed: usize,
    flushes: usize,
    /// While set, flushes wait.
    hold_flush: bool,
    flush_waker: Option<Waker>,
    /// While set, writes and flushes fail with a broken pipe.
    broken: bool,
}

impl Probe {
    fn state(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        self.0.lock().expect("probe lock")
    }
    fn hold_flushes(&self, hold: bool) {
        let mut s = self.state();
        s.hold_flush = hold;
        if !hold {
            if let Some(w) = s.flush_waker.take() {
                w.wake();
            }
        }
    }
    fn break_pipe(&self) {
        self.state().broken = true;
    }
    fn flushed_text(&self) -> String {
        let s = self.state();
        String::from_utf8(s.written[..s.flushed].to_vec()).expect("utf-8 output")
    }
}

impl AsyncWrite for Probe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.state();
        if s.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        s.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.state();
        if s.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.hold_flush {
            s.flush_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        s.flushed = s.written.len();
        s.flushes += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

fn start(probe: &Probe) -> (SinkSender, watch::Receiver<Lsn>, Running) {
    sinks::start(Sink::Stdout(StdoutSink::new(probe.clone())), 16)
}

#[tokio::test]
async fn writes_one_json_object_per_line_with_raw_key_and_value() {
    let probe = Probe::default();
    let (tx, mut acked, handle) = start(&probe);
    let items = vec![
        record(
            "shop.public.orders",
            Some(r#"{"id":1}"#),
            Some(r#"{"op":"c","after":{"id":1,"note":"a \"quoted\" ü"}}"#),
        ),
        record("shop.public.orders", Some(r#"{"id":1}"#), None),
        record("we\"ird\\topic", None, Some(r#"{"op":"c"}"#)),
        // Raw bytes are embedded as they are, not reformatted.
        record("t", Some(r#"{ "id" : 2 }"#), Some("[1, 2.50, \"x\"]")),
        SinkItem::Checkpoint(Lsn(0x10)),
    ];
    for item in items {
        tx.send(item).await.expect("sink alive");
    }
    wait_acked(&mut acked, Lsn(0x10), Duration::from_secs(5)).await;
    drop(tx);
    let summary = handle.await.expect("join").expect("run ok");

    let expected = concat!(
        r#"{"topic":"shop.public.orders","key":{"id":1},"value":{"op":"c","after":{"id":1,"note":"a \"quoted\" ü"}}}"#,
        "\n",
        r#"{"topic":"shop.public.orders","key":{"id":1},"value":null}"#,
        "\n",
        r#"{"topic":"we\"ird\\topic","key":null,"value":{"op":"c"}}"#,
        "\n",
        r#"{"topic":"t","key":{ "id" : 2 },"value":[1, 2.50, "x"]}"#,
        "\n",
    );
    assert_eq!(probe.flushed_text(), expected);
    for line in expected.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
        assert!(v.get("topic").is_some_and(|t| t.is_string()));
    }
    assert_eq!(summary.records, 4);
    assert_eq!(summary.tombstones, 1);
    let payload: usize = [
        r#"{"id":1}"#.len() + r#"{"op":"c","after":{"id":1,"note":"a \"quoted\" ü"}}"#.len(),
        r#"{"id":1}"#.len(),
        r#"{"op":"c"}"#.len(),
        r#"{ "id" : 2 }"#.len() + "[1, 2.50, \"x\"]".len(),
    ]
    .iter()
    .sum();
    assert_eq!(summary.bytes, payload as u64);
}

#[tokio::test]
async fn checkpoint_is_reported_only_after_the_flush() {
    let probe = Probe::default();
    probe.hold_flushes(true);
    let (tx, mut acked, handle) = start(&probe);
    tx.send(record("t", Some("1"), Some("\"a\"")))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(100)))
        .await
        .expect("alive");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *acked.borrow(),
        Lsn(0),
        "reported before the flush completed"
    );
    assert_eq!(probe.state().flushes, 0);

    probe.hold_flushes(false);
    wait_acked(&mut acked, Lsn(100), Duration::from_secs(5)).await;
    assert_eq!(
        probe.flushed_text(),
        "{\"topic\":\"t\",\"key\":1,\"value\":\"a\"}\n"
    );

    // A barrier flushes too, and resolves only after it.
    probe.hold_flushes(true);
    tx.send(record("t", Some("2"), Some("\"b\"")))
        .await
        .expect("alive");
    let (done_tx, mut done_rx) = oneshot::channel();
    tx.send(SinkItem::Barrier(done_tx)).await.expect("alive");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        done_rx.try_recv().is_err(),
        "barrier resolved before the flush"
    );
    probe.hold_flushes(false);
    tokio::time::timeout(Duration::from_secs(5), done_rx)
        .await
        .expect("barrier in time")
        .expect("barrier resolved");
    assert!(probe
        .flushed_text()
        .ends_with("{\"topic\":\"t\",\"key\":2,\"value\":\"b\"}\n"));

    drop(tx);
    let summary = handle.await.expect("join").expect("run ok");
    assert_eq!(summary.records, 2);
}

#[tokio::test]
async fn broken_pipe_ends_cleanly_without_confirming_unwritten_records() {
    let probe = Probe::default();
    let (tx, mut acked, handle) = start(&probe);
    tx.send(record("t", Some("1"), Some("1")))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(5)).await;

    probe.break_pipe();
    tx.send(record("t", Some("2"), Some("2")))
        .await
        .expect("alive");
    // The sink may already have failed; later sends are allowed to fail.
    let _ = tx.send(SinkItem::Checkpoint(Lsn(2))).await;
    let _ = tx.send(record("t", Some("3"), Some("3"))).await;
    let _ = tx.send(SinkItem::Checkpoint(Lsn(3))).await;
    drop(tx);

    let err = handle
        .await
        .expect("join")
        .expect_err("broken pipe must end the run");
    assert!(matches!(err, SinkError::OutputClosed), "{err:?}");
    assert!(err.is_output_closed());
    assert_eq!(
        *acked.borrow(),
        Lsn(1),
        "confirmed a checkpoint that was not written"
    );
}

#[tokio::test]
async fn a_failing_flush_reports_nothing() {
    // The lines fit the buffer, so the write succeeds and the flush is what fails.
    let probe = Probe::default();
    probe.hold_flushes(true);
    let (tx, acked, handle) = start(&probe);
    tx.send(record("t", Some("1"), Some("1")))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(7))).await.expect("alive");
    tokio::time::sleep(Duration::from_millis(100)).await;
    probe.break_pipe();
    probe.hold_flushes(false);
    drop(tx);
    let err = handle.await.expect("join").expect_err("must fail");
    assert!(matches!(err, SinkError::OutputClosed), "{err:?}");
    assert_eq!(*acked.borrow(), Lsn(0));
}

#[tokio::test]
async fn other_write_errors_are_io_errors() {
    struct Failing;
    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::other("disk on fire")))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::other("disk on fire")))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    let (tx, acked, handle) = sinks::start(Sink::Stdout(StdoutSink::new(Failing)), 4);
    tx.send(record("t", None, Some("1"))).await.expect("alive");
    let _ = tx.send(SinkItem::Checkpoint(Lsn(1))).await;
    drop(tx);
    let err = handle.await.expect("join").expect_err("must fail");
    assert!(matches!(err, SinkError::Io(_)), "{err:?}");
    assert!(!err.is_output_closed());
    assert_eq!(*acked.borrow(), Lsn(0));
}

#[tokio::test]
async fn many_small_transactions_all_arrive_and_the_last_checkpoint_is_reported() {
    let probe = Probe::default();
    let (tx, mut acked, handle) = start(&probe);
    let producer = tokio::spawn(async move {
        for i in 1..=5_000u64 {
            tx.send(record("t", Some(&i.to_string()), Some("{}")))
                .await
                .expect("alive");
            tx.send(SinkItem::Checkpoint(Lsn(i))).await.expect("alive");
        }
    });
    wait_acked(&mut acked, Lsn(5_000), Duration::from_secs(5)).await;
    producer.await.expect("producer");
    let summary = handle.await.expect("join").expect("run ok");
    assert_eq!(summary.records, 5_000);
    let text = probe.flushed_text();
    let keys: Vec<u64> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            v["key"].as_u64().expect("numeric key")
        })
        .collect();
    assert_eq!(
        keys,
        (1..=5_000).collect::<Vec<_>>(),
        "lines out of order or missing"
    );
    // Consecutive checkpoints may share a flush, but not without bound.
    assert!(probe.state().flushes >= 5_000 / 64);
}
