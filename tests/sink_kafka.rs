//! The Kafka sink and Kafka utilities.
//!
//! Broker tests run against the tansu brokers prepared by `scripts/test-env.sh`
//! (`PGCDC_TEST_KAFKA`: durable sqlite storage, correct watermarks; `PGCDC_TEST_KAFKA_MEM`:
//! memory storage, unreliable watermarks) and are skipped with a note when the variables are
//! not set. Failure injection (outages, refused writes) uses librdkafka's mock cluster.
//! Every test uses its own topics.

mod common;

use common::sinks::{self, record, wait_acked, Running};

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::api::Lsn;
use common::api::{
    ensure_topics, read_last_value, read_topic, wait_for_cluster, ConsumedRecord, KafkaConfig,
    ReadStop, TopicSpec,
};
use common::api::{Header, KafkaSink, Record, Sink, SinkError, SinkItem, SinkSender};
use common::api::{Recoverable, Recovery};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;
use tokio::sync::{mpsc, oneshot, watch};

// ---------------------------------------------------------------------------------------
// helpers

fn durable_broker() -> Option<String> {
    broker("PGCDC_TEST_KAFKA")
}

fn memory_broker() -> Option<String> {
    broker("PGCDC_TEST_KAFKA_MEM")
}

fn broker(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("skipping: {var} is not set (eval \"$(bash scripts/test-env.sh)\")");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn start(cfg: KafkaConfig, capacity: usize) -> (SinkSender, watch::Receiver<Lsn>, Running) {
    let sink = KafkaSink::new(cfg).expect("producer created");
    sinks::start(Sink::Kafka(sink), capacity)
}

/// librdkafka's mock cluster (one broker, in this process) with a topic named after `prefix`
/// of `partitions` partitions.
fn mock_topic(
    prefix: &str,
    partitions: i32,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique(prefix);
    mock.create_topic(&topic, partitions, 1)
        .expect("mock topic");
    (mock, topic)
}

async fn create(cfg: &KafkaConfig, name: &str, partitions: i32, compacted: bool) {
    ensure_topics(
        cfg,
        &[TopicSpec {
            name: name.to_string(),
            partitions,
            replication: 1,
            compacted,
        }],
    )
    .await
    .expect("topic created");
}

/// The durable broker's config and a new topic on it (`None`: no broker, the test is skipped).
async fn durable_topic(
    name: &str,
    partitions: i32,
    compacted: bool,
) -> Option<(KafkaConfig, String)> {
    let cfg = KafkaConfig::new(durable_broker()?);
    wait_for_cluster(&cfg, Some(Duration::from_secs(30)))
        .await
        .expect("broker up");
    let topic = unique(name);
    create(&cfg, &topic, partitions, compacted).await;
    Some((cfg, topic))
}

async fn read_back(cfg: &KafkaConfig, topic: &str, stop: ReadStop) -> Vec<ConsumedRecord> {
    let cfg = cfg.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_topic(&cfg, &topic, stop))
        .await
        .expect("join")
        .expect("topic read")
}

fn quiet(expected: usize) -> ReadStop {
    ReadStop::Quiet {
        expected: Some(expected),
        quiet: Duration::from_secs(10),
        max_wait: Duration::from_secs(60),
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), seed 0x9747b28c.
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The Java client's partition for a non-null key.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[test]
fn murmur2_matches_the_java_client() {
    // Values from Kafka's UtilsTest.testMurmur2.
    let cases: &[(&[u8], i32)] = &[
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
        (b"abc", 479470107),
    ];
    for (input, expected) in cases {
        assert_eq!(
            murmur2(input),
            *expected,
            "{}",
            String::from_utf8_lossy(input)
        );
    }
}

/// Captures everything logged at warning level or above, process-wide, so tests can check
/// that librdkafka's complaints (from its own threads) and our own warnings surface.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer_buf = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer_buf.clone()))
            .finish();
        // Another test may have installed it first; either way logs are captured.
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(b);
        }
        let _ = std::io::stderr().write_all(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().expect("log lock")).into_owned()
}

// ---------------------------------------------------------------------------------------
// configuration (no broker needed: nothing connects at creation)

#[test]
fn an_unknown_property_is_a_config_error_naming_it() {
    let cfg = KafkaConfig::new("127.0.0.1:9").property("no.such.property", "1");
    let err = KafkaSink::new(cfg).err().expect("must fail");
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("no.such.property"), "{err}");
    assert_eq!(err.recovery(), Recovery::Stop);
}

#[test]
fn an_invalid_value_is_a_config_error_naming_the_property_not_the_value() {
    let cfg = KafkaConfig::new("127.0.0.1:9").property("compression.type", "snappier");
    let err = KafkaSink::new(cfg).err().expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
    // Any value may be a secret: none is repeated.
    assert!(
        msg.contains("compression.type") && !msg.contains("snappier"),
        "{msg}"
    );
}

#[test]
fn a_property_conflicting_with_idempotence_is_a_config_error() {
    let cfg = KafkaConfig::new("127.0.0.1:9").property("acks", "1");
    let err = KafkaSink::new(cfg).err().expect("must fail");
    assert!(matches!(err, SinkError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("acks"), "{err}");
    // Turning idempotence off explicitly is the user's call, and allowed.
    let cfg = KafkaConfig::new("127.0.0.1:9")
        .property("enable.idempotence", "false")
        .property("acks", "1");
    assert!(KafkaSink::new(cfg).is_ok());
}

#[tokio::test]
async fn wait_for_cluster_gives_up_with_a_clear_message() {
    let logs = captured_logs();
    // A port nobody listens on: bind, learn it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let cfg = KafkaConfig::new(format!("127.0.0.1:{port}"));
    let started = Instant::now();
    let err = wait_for_cluster(&cfg, Some(Duration::from_secs(2)))
        .await
        .expect_err("nothing listens there");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "gave up too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "gave up too late: {elapsed:?}"
    );
    assert!(matches!(err, SinkError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("unreachable"), "{msg}");
    let text = logs_text(&logs);
    let warning = format!("Kafka at 127.0.0.1:{port} is unreachable (");
    assert!(text.contains(&warning), "no retry warning in logs:\n{text}");
    assert!(text.contains("retrying in"), "{text}");
}

#[tokio::test]
async fn ensure_topics_rejects_impossible_specs_before_asking_the_broker() {
    let cfg = KafkaConfig::new("127.0.0.1:9");
    for (partitions, replication) in [(0, 1), (-2, 1), (1, 0), (3, -5)] {
        let spec = TopicSpec {
            name: "t".into(),
            partitions,
            replication,
            compacted: false,
        };
        let err = ensure_topics(&cfg, &[spec])
            .await
            .expect_err("invalid spec");
        assert!(matches!(err, SinkError::Config(_)), "{err:?}");
        assert!(err.to_string().contains("`t`"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------
// failure injection with librdkafka's mock cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_stalls_with_warnings_and_resumes_without_loss() {
    let logs = captured_logs();
    let (mock, topic) = mock_topic("outage", 2);
    let cfg = KafkaConfig::new(mock.bootstrap_servers())
        .property("reconnect.backoff.max.ms", "200")
        .property("linger.ms", "0");

    let (tx, mut acked, handle) = start(cfg, 16);
    tx.send(record(&topic, Some("1"), Some("\"before\"")))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(20)).await;

    mock.broker_down(1).expect("broker down");
    for i in 0..50 {
        tx.send(record(&topic, Some(&i.to_string()), Some("\"during\"")))
            .await
            .expect("alive");
    }
    tx.send(SinkItem::Checkpoint(Lsn(2))).await.expect("alive");
    // Longer than the stall warning threshold, far longer than a delivery normally takes.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        *acked.borrow(),
        Lsn(1),
        "checkpoint reported during the outage"
    );
    assert!(
        !handle.is_finished(),
        "an outage must stall the sink, not fail it"
    );

    mock.broker_up(1).expect("broker up");
    wait_acked(&mut acked, Lsn(2), Duration::from_secs(30)).await;
    drop(tx);
    let summary = handle.await.expect("join").expect("run ok");
    assert_eq!(summary.records, 51);

    let text = logs_text(&logs);
    assert!(
        text.contains("no acknowledgement from Kafka"),
        "stall warning missing from logs:\n{text}"
    );
    assert!(
        text.contains("librdkafka") && text.contains(" WARN "),
        "librdkafka's outage reports missing from warnings:\n{text}"
    );
}

#[tokio::test]
async fn a_refused_write_fails_with_the_authorization_error() {
    let (mock, topic) = mock_topic("denied", 1);
    let cfg = KafkaConfig::new(mock.bootstrap_servers());
    let (tx, acked, handle) = start(cfg, 16);
    // Make the broker refuse produce requests from now on (enough errors for every retry).
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 10],
    );
    tx.send(record(&topic, Some("1"), Some("1")))
        .await
        .expect("alive");
    let _ = tx.send(SinkItem::Checkpoint(Lsn(9))).await;
    drop(tx);
    let err = sinks::finished(handle, Duration::from_secs(30))
        .await
        .expect_err("write refused");
    assert!(
        matches!(err, SinkError::TopicAuthorization { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&topic), "{err}");
    assert_eq!(*acked.borrow(), Lsn(0));
}

/// After a failed delivery, `pgcdc run` starts its pipeline again with a new producer, which
/// publishes the unconfirmed rows again. The old producer must be gone by then: records it
/// still held (queued while the broker was away) must never go out after the sink returned,
/// where they could land after the new producer's copies of the same rows — a row's older
/// event after its newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sink_leaves_nothing_of_its_producer_behind() {
    let (mock, topic) = mock_topic("restart", 1);
    let cfg = KafkaConfig::new(mock.bootstrap_servers())
        .property("message.max.bytes", "10000")
        .property("reconnect.backoff.max.ms", "200");

    // The broker is away: the old producer holds five records.
    mock.broker_down(1).expect("broker down");
    let (tx, _, old) = start(cfg.clone(), 16);
    for i in 0..5 {
        tx.send(record(&topic, Some(&i.to_string()), Some("\"old\"")))
            .await
            .expect("alive");
    }
    // A barrier has the sink send at once, on a thread that holds the producer meanwhile.
    let (barrier, _) = oneshot::channel();
    tx.send(SinkItem::Barrier(barrier)).await.expect("alive");
    // Then a record librdkafka refuses outright: the sink fails.
    let huge = format!("\"{}\"", "x".repeat(20_000));
    let _ = tx.send(record(&topic, Some("5"), Some(&huge))).await;
    let err = tokio::time::timeout(Duration::from_secs(30), old)
        .await
        .expect("fails in time")
        .expect("join")
        .expect_err("the record is too large");
    assert!(matches!(err, SinkError::MessageTooLarge { .. }), "{err:?}");

    // The broker is back, and the next pipeline's producer publishes the same rows.
    mock.broker_up(1).expect("broker up");
    let (tx, mut acked, new) = start(cfg.clone(), 16);
    for i in 0..5 {
        tx.send(record(&topic, Some(&i.to_string()), Some("\"new\"")))
            .await
            .expect("alive");
    }
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(30)).await;
    drop(tx);
    new.await.expect("join").expect("run ok");
    // Time for an old producer, were it still alive, to reconnect and deliver.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let records = read_back(
        &cfg,
        &topic,
        ReadStop::Quiet {
            expected: None,
            quiet: Duration::from_secs(3),
            max_wait: Duration::from_secs(30),
        },
    )
    .await;
    let values: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(
        values,
        vec!["\"new\""; 5],
        "the old producer's records went out"
    );
}

#[tokio::test]
async fn queue_full_is_backpressure_not_loss() {
    let (mock, topic) = mock_topic("queuefull", 3);
    // librdkafka's queue holds 5 messages; the sink's own window is larger, so QueueFull
    // happens constantly.
    let mut cfg =
        KafkaConfig::new(mock.bootstrap_servers()).property("queue.buffering.max.messages", "5");
    cfg.max_in_flight = 1000;
    let (tx, mut acked, handle) = start(cfg, 8);
    let n = 2_000u64;
    let topic2 = topic.clone();
    let feeder = tokio::spawn(async move {
        for i in 1..=n {
            tx.send(record(&topic2, Some(&i.to_string()), Some("{}")))
                .await
                .expect("alive");
            if i % 100 == 0 {
                tx.send(SinkItem::Checkpoint(Lsn(i))).await.expect("alive");
            }
        }
    });
    wait_acked(&mut acked, Lsn(n), Duration::from_secs(60)).await;
    feeder.await.expect("feeder");
    let summary = handle.await.expect("join").expect("run ok");
    assert_eq!(summary.records, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_returns_as_soon_as_the_channel_closes_after_the_last_ack() {
    // Regression: the sink saw the channel close in its non-blocking read, after its check
    // for "drained", and then waited for an acknowledgement that would never come.
    let (mock, topic) = mock_topic("close", 2);
    let cfg = KafkaConfig::new(mock.bootstrap_servers()).property("linger.ms", "0");
    for round in 1..=30u64 {
        let (tx, mut acked, handle) = start(cfg.clone(), 16);
        tx.send(record(&topic, Some("k"), Some("1")))
            .await
            .expect("alive");
        tx.send(SinkItem::Checkpoint(Lsn(round)))
            .await
            .expect("alive");
        wait_acked(&mut acked, Lsn(round), Duration::from_secs(20)).await;
        drop(tx);
        let summary = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the sink did not return"))
            .expect("join")
            .expect("run ok");
        assert_eq!(summary.records, 1);
    }
}

#[tokio::test]
async fn a_small_in_flight_window_stops_reading_the_channel() {
    let (mock, topic) = mock_topic("window", 1);
    let mut cfg = KafkaConfig::new(mock.bootstrap_servers());
    cfg.max_in_flight = 3;
    mock.broker_down(1).expect("broker down");
    let (tx, acked, handle) = start(cfg, 1);
    // 3 in flight + 1 in the channel; the 5th send must wait.
    for i in 0..4 {
        tx.send(record(&topic, Some(&i.to_string()), Some("{}")))
            .await
            .expect("alive");
    }
    // Give the sink time to take what it may.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fifth = tx.try_send(record(&topic, Some("4"), Some("{}")));
    assert!(
        matches!(fifth, Err(mpsc::error::TrySendError::Full(_))),
        "the sink kept reading beyond its in-flight window"
    );
    mock.broker_up(1).expect("broker up");
    tx.send(record(&topic, Some("4"), Some("{}")))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(5))).await.expect("alive");
    drop(tx);
    let summary = sinks::finished(handle, Duration::from_secs(30))
        .await
        .expect("run ok");
    assert_eq!(summary.records, 5);
    assert_eq!(*acked.borrow(), Lsn(5));
}

#[tokio::test]
async fn a_batch_larger_than_the_window_is_sent_within_it() {
    let (mock, topic) = mock_topic("batch-window", 1);
    let mut cfg = KafkaConfig::new(mock.bootstrap_servers());
    cfg.max_in_flight = 3;
    mock.broker_down(1).expect("broker down");
    let (tx, acked, handle) = start(cfg, 1);
    let batch = (0..10)
        .map(|i| Record {
            topic: topic.as_str().into(),
            key: Some(Bytes::from(i.to_string())),
            value: Some(Bytes::from_static(b"{}")),
            partition: None,
            headers: Vec::new(),
        })
        .collect();
    tx.send(SinkItem::Records(batch)).await.expect("alive");
    // The sink holds the batch (3 of it in flight) and must not read on: this one waits in
    // the channel, and the next finds it full.
    tx.send(record(&topic, Some("10"), Some("{}")))
        .await
        .expect("alive");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = tx.try_send(record(&topic, Some("11"), Some("{}")));
    assert!(
        matches!(next, Err(mpsc::error::TrySendError::Full(_))),
        "the sink read the channel before its batch was sent"
    );
    mock.broker_up(1).expect("broker up");
    tx.send(record(&topic, Some("11"), Some("{}")))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(12))).await.expect("alive");
    drop(tx);
    let summary = sinks::finished(handle, Duration::from_secs(30))
        .await
        .expect("run ok");
    assert_eq!(summary.records, 12);
    assert_eq!(*acked.borrow(), Lsn(12));
}

// ---------------------------------------------------------------------------------------
// against tansu

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_stamped_when_they_are_sent_not_before() {
    let Some((cfg, topic)) = durable_topic("stamp", 1, false).await else {
        return;
    };
    let (tx, mut acked, handle) = start(cfg.clone(), 8);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    // The sink idles between the items: a clock read before the wait would stamp the
    // second and third records a second early.
    let mut sent_at = Vec::new();
    for (i, item) in [
        record(&topic, Some("a"), Some("{}")),
        record(&topic, Some("b"), Some("{}")),
        SinkItem::Records(vec![Record {
            topic: topic.as_str().into(),
            key: Some(Bytes::from_static(b"c")),
            value: Some(Bytes::from_static(b"{}")),
            partition: None,
            headers: Vec::new(),
        }]),
    ]
    .into_iter()
    .enumerate()
    {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        sent_at.push(now_ms());
        tx.send(item).await.expect("alive");
        tx.send(SinkItem::Checkpoint(Lsn(i as u64 + 1)))
            .await
            .expect("alive");
        wait_acked(&mut acked, Lsn(i as u64 + 1), Duration::from_secs(30)).await;
    }
    drop(tx);
    handle.await.expect("join").expect("run ok");
    let records = read_back(&cfg, &topic, quiet(3)).await;
    assert_eq!(records.len(), 3);
    for (r, at) in records.iter().zip(&sent_at) {
        let ts = r.timestamp.expect("a timestamp");
        assert!(
            ts >= at - 5 && ts <= at + 2_000,
            "record stamped {ts}, sent at {at}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_reach_the_topic_in_order_and_a_record_without_has_none() {
    let Some((cfg, topic)) = durable_topic("headers", 1, false).await else {
        return;
    };
    let (tx, mut acked, handle) = start(cfg.clone(), 8);
    let name = |n: &str| Arc::from(std::ffi::CString::new(n).expect("no NUL").as_c_str());
    let headers = vec![
        Header {
            name: name("b-second-by-name"),
            value: Bytes::from_static(b"1"),
        },
        Header {
            name: name("a"),
            value: Bytes::from_static(b"{\"x\":\"\xc3\xa9\"}"),
        },
        Header {
            name: name("empty"),
            value: Bytes::new(),
        },
    ];
    let with = Record {
        topic: topic.as_str().into(),
        key: Some(Bytes::from_static(b"k")),
        value: None,
        partition: None,
        headers: headers.clone(),
    };
    tx.send(SinkItem::Record(with)).await.expect("alive");
    tx.send(record(&topic, Some("k"), Some("{}")))
        .await
        .expect("alive");
    // Many, in batches: every record's headers survive the broker's batching.
    for i in 0..300u32 {
        let id = Header {
            name: name("pgcdc-event-id"),
            value: Bytes::from(format!("id-{i}")),
        };
        let r = Record {
            topic: topic.as_str().into(),
            key: Some(Bytes::from(format!("{}", i % 17))),
            value: Some(Bytes::from_static(b"{\"v\":1}")),
            partition: None,
            headers: vec![id],
        };
        tx.send(SinkItem::Record(r)).await.expect("alive");
    }
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(30)).await;
    drop(tx);
    handle.await.expect("join").expect("run ok");

    let got = read_back(&cfg, &topic, ReadStop::HighWatermark).await;
    assert_eq!(got.len(), 302);
    for (i, r) in got[2..].iter().enumerate() {
        let want = vec![(
            "pgcdc-event-id".to_string(),
            Some(format!("id-{i}").into_bytes()),
        )];
        assert_eq!(r.headers, want, "record {i}");
    }
    let expected: Vec<(String, Option<Vec<u8>>)> = headers
        .iter()
        .map(|h| {
            (
                h.name.to_str().expect("utf-8").to_string(),
                Some(h.value.to_vec()),
            )
        })
        .collect();
    assert_eq!(got[0].headers, expected, "a tombstone keeps its headers");
    assert_eq!(got[0].value, None);
    assert!(got[1].headers.is_empty(), "{:?}", got[1].headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_in_order_and_checkpoints_follow_acknowledgements() {
    let Some((cfg, topic)) = durable_topic("order", 3, false).await else {
        return;
    };

    let (tx, mut acked, handle) = start(cfg.clone(), 64);
    // 12 keys, 1200 records, a checkpoint every 50, every 7th record a tombstone.
    let mut sent: Vec<(String, Option<String>)> = Vec::new();
    let mut checkpoints = Vec::new();
    for i in 0..1_200u64 {
        let key = format!("{{\"id\":{}}}", i % 12);
        let value = (i % 7 != 3).then(|| format!("{{\"seq\":{i}}}"));
        tx.send(record(&topic, Some(&key), value.as_deref()))
            .await
            .expect("alive");
        sent.push((key, value));
        if (i + 1) % 50 == 0 {
            let lsn = Lsn(0x1000 + i);
            tx.send(SinkItem::Checkpoint(lsn)).await.expect("alive");
            checkpoints.push((lsn, sent.len()));
        }
        if i == 599 {
            // Everything before an acknowledged checkpoint is readable at that moment.
            let (lsn, count) = *checkpoints.last().expect("a checkpoint");
            wait_acked(&mut acked, lsn, Duration::from_secs(30)).await;
            let records = read_back(&cfg, &topic, ReadStop::HighWatermark).await;
            assert!(
                records.len() >= count,
                "{} < {count} readable at {lsn}",
                records.len()
            );
        }
    }
    let (barrier_tx, barrier_rx) = oneshot::channel();
    tx.send(SinkItem::Barrier(barrier_tx)).await.expect("alive");
    tokio::time::timeout(Duration::from_secs(30), barrier_rx)
        .await
        .expect("barrier in time")
        .expect("barrier resolved");
    drop(tx);
    let summary = handle.await.expect("join").expect("run ok");
    let last = checkpoints.last().expect("checkpoints").0;
    assert_eq!(*acked.borrow(), last);
    assert_eq!(summary.records, 1_200);
    let tombstones = sent.iter().filter(|(_, v)| v.is_none()).count() as u64;
    assert_eq!(summary.tombstones, tombstones);

    let records = read_back(&cfg, &topic, ReadStop::HighWatermark).await;
    assert_eq!(records.len(), sent.len());
    // Per key, the records come back in the order they were sent, each key in one partition.
    for k in 0..12 {
        let key = format!("{{\"id\":{k}}}");
        let want: Vec<Option<String>> = sent
            .iter()
            .filter(|(sk, _)| *sk == key)
            .map(|(_, v)| v.clone())
            .collect();
        let got: Vec<&ConsumedRecord> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_bytes()))
            .collect();
        let got_values: Vec<Option<String>> = got
            .iter()
            .map(|r| {
                r.value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .collect();
        assert_eq!(got_values, want, "key {key}");
        let partitions: std::collections::BTreeSet<i32> = got.iter().map(|r| r.partition).collect();
        assert_eq!(partitions.len(), 1, "key {key} spread over {partitions:?}");
        let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "offsets out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_the_java_clients_partition() {
    let Some(bootstrap) = durable_broker() else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap);
    let topic = unique("murmur2");
    create(&cfg, &topic, 4, false).await;
    // Keys chosen to land on different partitions.
    let keys = [
        r#"{"id":1}"#,
        r#"{"id":2}"#,
        r#"{"id":3}"#,
        r#"{"id":42}"#,
        r#"{"sku":"x-9"}"#,
    ];
    let distinct: std::collections::BTreeSet<i32> = keys
        .iter()
        .map(|k| java_partition(k.as_bytes(), 4))
        .collect();
    assert!(distinct.len() >= 2, "pick keys spanning partitions");

    let (tx, mut acked, handle) = start(cfg.clone(), 16);
    for round in 0..3 {
        for k in keys {
            tx.send(record(&topic, Some(k), Some(&format!("{round}"))))
                .await
                .expect("alive");
        }
    }
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(30)).await;
    drop(tx);
    handle.await.expect("join").expect("run ok");

    let records = read_back(&cfg, &topic, ReadStop::HighWatermark).await;
    assert_eq!(records.len(), keys.len() * 3);
    for r in &records {
        let key = r.key.as_deref().expect("keyed");
        assert_eq!(
            r.partition,
            java_partition(key, 4),
            "key {} not on the Java client's partition",
            String::from_utf8_lossy(key)
        );
    }
}

/// Snapshot markers name their partition: the record goes there, in order after the keyed
/// records sent before it to that partition, whatever the key hashing would say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_an_explicit_partition_goes_there() {
    let Some(bootstrap) = durable_broker() else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap);
    let topic = unique("explicit");
    create(&cfg, &topic, 3, false).await;
    let (tx, mut acked, handle) = start(cfg.clone(), 16);
    let keys = [r#"{"id":1}"#, r#"{"id":2}"#, r#"{"id":3}"#, r#"{"id":42}"#];
    for k in keys {
        tx.send(record(&topic, Some(k), Some("{}")))
            .await
            .expect("alive");
    }
    let markers = (0..3)
        .map(|p| Record {
            topic: topic.as_str().into(),
            key: None,
            value: Some(Bytes::from(format!("{{\"marker\":{p}}}"))),
            partition: Some(p),
            headers: Vec::new(),
        })
        .collect();
    tx.send(SinkItem::Records(markers)).await.expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(30)).await;
    drop(tx);
    handle.await.expect("join").expect("run ok");

    let records = read_back(&cfg, &topic, ReadStop::HighWatermark).await;
    assert_eq!(records.len(), keys.len() + 3);
    for p in 0..3 {
        let in_p: Vec<&ConsumedRecord> = records.iter().filter(|r| r.partition == p).collect();
        let last = in_p.last().expect("the marker at least");
        assert_eq!(
            last.value.as_deref(),
            Some(format!("{{\"marker\":{p}}}").as_bytes()),
            "partition {p} ends with its marker"
        );
        assert!(in_p[..in_p.len() - 1]
            .iter()
            .all(|r| java_partition(r.key.as_deref().expect("keyed"), 3) == p));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_last_value_returns_the_latest_value_of_a_key() {
    let Some(bootstrap) = durable_broker() else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap);
    let topic = unique("progress");
    create(&cfg, &topic, 1, true).await;

    assert_eq!(
        read_last_value(&cfg, &topic, b"slot-a")
            .await
            .expect("read"),
        None,
        "empty topic"
    );
    let (tx, mut acked, handle) = start(cfg.clone(), 16);
    for (k, v) in [
        ("slot-a", "1"),
        ("slot-b", "10"),
        ("slot-a", "2"),
        ("slot-a", "3"),
        ("slot-b", "11"),
    ] {
        tx.send(record(&topic, Some(k), Some(v)))
            .await
            .expect("alive");
    }
    tx.send(record(&topic, Some("slot-c"), Some("5")))
        .await
        .expect("alive");
    tx.send(record(&topic, Some("slot-c"), None))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(30)).await;
    drop(tx);
    handle.await.expect("join").expect("run ok");

    let last = |k: &'static str| {
        let cfg = cfg.clone();
        let topic = topic.clone();
        async move {
            read_last_value(&cfg, &topic, k.as_bytes())
                .await
                .expect("read")
        }
    };
    assert_eq!(last("slot-a").await.as_deref(), Some(&b"3"[..]));
    assert_eq!(last("slot-b").await.as_deref(), Some(&b"11"[..]));
    assert_eq!(last("slot-c").await, None, "latest is a tombstone");
    assert_eq!(last("slot-z").await, None, "never written");
    let missing = unique("no-such-topic");
    assert_eq!(
        read_last_value(&cfg, &missing, b"slot-a")
            .await
            .expect("missing topic is not an error"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topics_creates_missing_topics_and_is_idempotent() {
    let Some(bootstrap) = durable_broker() else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap);
    let specs = [
        TopicSpec {
            name: unique("ensure-plain"),
            partitions: 3,
            replication: 1,
            compacted: false,
        },
        TopicSpec {
            name: unique("ensure-compact"),
            partitions: 1,
            replication: 1,
            compacted: true,
        },
    ];
    // Both calls report every topic's partition count, created or found.
    let counts = |specs: &[TopicSpec]| -> std::collections::HashMap<String, i32> {
        specs
            .iter()
            .map(|s| (s.name.clone(), s.partitions))
            .collect()
    };
    let created = ensure_topics(&cfg, &specs)
        .await
        .expect("first call creates");
    assert_eq!(created, counts(&specs));
    let found = ensure_topics(&cfg, &specs)
        .await
        .expect("second call is a no-op");
    assert_eq!(found, counts(&specs));
    ensure_topics(&cfg, &specs[..1]).await.expect("subset");

    // The compacted one is compacted.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.bootstrap)
        .create()
        .expect("admin client");
    let described = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(&specs[1].name)],
            &AdminOptions::new(),
        )
        .await
        .expect("describe configs");
    let config = described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("topic described");
    assert_eq!(
        config
            .get("cleanup.policy")
            .and_then(|e| e.value.as_deref()),
        Some("compact")
    );

    // Both exist, with their partitions.
    for spec in &specs {
        let cfg2 = cfg.clone();
        let name = spec.name.clone();
        let reader = tokio::task::spawn_blocking(move || {
            crate::common::api::TopicReader::open(&cfg2, &name, ReadStop::HighWatermark)
                .map(|r| r.partitions().len())
        })
        .await
        .expect("join")
        .expect("topic exists");
        assert_eq!(reader, spec.partitions as usize, "{}", spec.name);
    }
}

/// Regression: the latest record of a key was chosen by timestamp, which is only what the
/// producer's clock said; a clock stepping back made an older progress record win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_last_value_goes_by_offset_not_by_timestamp() {
    let Some(bootstrap) = durable_broker() else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap.clone());
    let topic = unique("progress-clock");
    create(&cfg, &topic, 1, true).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    // Written in this order (offsets 0 and 1), stamped the other way round.
    for (value, timestamp) in [("older", now), ("newer", now - 60_000)] {
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("slot")
                    .payload(value)
                    .timestamp(timestamp),
                Duration::from_secs(30),
            )
            .await
            .expect("delivered");
    }
    let records = read_back(&cfg, &topic, quiet(2)).await;
    assert_eq!(records.len(), 2);
    assert!(
        records[0].timestamp > records[1].timestamp,
        "the broker kept the producer's timestamps: {records:?}"
    );
    let last = read_last_value(&cfg, &topic, b"slot").await.expect("read");
    assert_eq!(last.as_deref(), Some(&b"newer"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_above_message_max_bytes_is_message_too_large() {
    let Some(bootstrap) = durable_broker() else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap).property("message.max.bytes", "2000");
    let topic = unique("too-large");
    create(&cfg, &topic, 1, false).await;
    let (tx, mut acked, handle) = start(cfg, 16);
    tx.send(record(&topic, Some("1"), Some("\"small\"")))
        .await
        .expect("alive");
    tx.send(SinkItem::Checkpoint(Lsn(1))).await.expect("alive");
    wait_acked(&mut acked, Lsn(1), Duration::from_secs(30)).await;

    let big = format!("\"{}\"", "x".repeat(4998));
    assert_eq!(big.len(), 5000);
    tx.send(record(&topic, Some("2"), Some(&big)))
        .await
        .expect("alive");
    let _ = tx.send(SinkItem::Checkpoint(Lsn(2))).await;
    drop(tx);
    let err = handle.await.expect("join").expect_err("too large");
    match &err {
        SinkError::MessageTooLarge { topic: t, bytes } => {
            assert_eq!(t, &topic);
            assert_eq!(*bytes, 5001);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("message.max.bytes"), "{msg}");
    assert_eq!(err.recovery(), Recovery::Stop);
    assert_eq!(*acked.borrow(), Lsn(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_stop_reads_everything_written() {
    // Made for tansu's memory storage, whose watermarks are wrong; it works on any broker.
    let Some(bootstrap) = memory_broker().or_else(durable_broker) else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap);
    let topic = unique("mem");
    create(&cfg, &topic, 2, false).await;
    let (tx, mut acked, handle) = start(cfg.clone(), 64);
    for i in 0..500u64 {
        tx.send(record(
            &topic,
            Some(&format!("{}", i % 5)),
            Some(&i.to_string()),
        ))
        .await
        .expect("alive");
    }
    tx.send(SinkItem::Checkpoint(Lsn(500)))
        .await
        .expect("alive");
    wait_acked(&mut acked, Lsn(500), Duration::from_secs(30)).await;
    drop(tx);
    handle.await.expect("join").expect("run ok");
    let records = read_back(&cfg, &topic, quiet(500)).await;
    assert_eq!(records.len(), 500);
    for k in 0..5u64 {
        let values: Vec<u64> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(k.to_string().as_bytes()))
            .map(|r| {
                String::from_utf8_lossy(r.value.as_deref().expect("value"))
                    .parse()
                    .expect("number")
            })
            .collect();
        let want: Vec<u64> = (0..500).filter(|i| i % 5 == k).collect();
        assert_eq!(values, want, "key {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producing_to_a_missing_topic_is_unknown_topic() {
    let Some(bootstrap) = durable_broker() else {
        return;
    };
    // tansu does not create topics on produce; librdkafka gives up on a topic that does not
    // appear within topic.metadata.propagation.max.ms (30 s by default).
    let cfg = KafkaConfig::new(bootstrap).property("topic.metadata.propagation.max.ms", "1000");
    let topic = unique("missing");
    let (tx, acked, handle) = start(cfg, 4);
    tx.send(record(&topic, Some("1"), Some("1")))
        .await
        .expect("alive");
    let _ = tx.send(SinkItem::Checkpoint(Lsn(1))).await;
    drop(tx);
    let err = sinks::finished(handle, Duration::from_secs(30))
        .await
        .expect_err("no such topic");
    match &err {
        SinkError::UnknownTopic { topic: t } => assert_eq!(t, &topic),
        other => panic!("expected UnknownTopic, got {other:?}"),
    }
    assert!(err.to_string().contains("create it"), "{err}");
    assert_eq!(*acked.borrow(), Lsn(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_stop_ends_on_an_empty_topic_after_the_quiet_interval() {
    let Some(bootstrap) = memory_broker().or_else(durable_broker) else {
        return;
    };
    let cfg = KafkaConfig::new(bootstrap);
    let topic = unique("empty");
    create(&cfg, &topic, 2, false).await;
    let started = Instant::now();
    let records = read_back(
        &cfg,
        &topic,
        ReadStop::Quiet {
            expected: None,
            quiet: Duration::from_millis(500),
            max_wait: Duration::from_secs(20),
        },
    )
    .await;
    assert!(records.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // And the product's stop: an empty topic has nothing below its watermarks.
    assert!(read_back(&cfg, &topic, ReadStop::HighWatermark)
        .await
        .is_empty());
}
