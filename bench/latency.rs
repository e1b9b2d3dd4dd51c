//! `bench-latency`: the consumer side of `bench/run.sh`'s latency measurement.
//!
//! It reads one topic that pgcdc is writing while a steady load runs against PostgreSQL and, for
//! every event, compares the commit time PostgreSQL recorded (`source.ts_ms`) with two clocks
//! of this machine:
//!
//! - the record's Kafka timestamp: with the default `CreateTime` this is when pgcdc handed the
//!   record to librdkafka (`produce()`), so `timestamp - ts_ms` is a *lower bound* of
//!   commit → acknowledgement;
//! - the moment this consumer received the record: the broker serves a record only once it is
//!   written, which is when it acknowledges it, so `received - ts_ms` is an *upper bound* of
//!   commit → acknowledgement (it adds the consumer's fetch delay).
//!
//! Everything runs on one machine, so the clocks agree. Both ends are whole milliseconds
//! (PostgreSQL's commit time is truncated to them by pgcdc, the Kafka timestamp by librdkafka),
//! so each figure is exact to about ±1 ms.
//!
//! ```text
//! bench-latency <bootstrap> <topic> <ready-file> <expected-file> <timeout-seconds>
//! ```
//!
//! It starts reading at the beginning of the topic (which must be fresh). The first record is
//! a warm-up: the bench makes one transaction before the load, because the first record pgcdc
//! produces to a new topic waits for librdkafka to look the topic up, which is start-up, not
//! steady state. When that record has arrived this tool creates `<ready-file>` and the bench
//! starts the load; the warm-up record is not counted. It stops once it has
//! read the number of records written into `<expected-file>` (the bench writes it when the load
//! has finished), when nothing new arrived for 15 s after that file appeared, or after
//! `<timeout-seconds>`. It prints `key=value` lines on stdout for the script to parse.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, Timestamp};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

#[path = "stats.rs"]
mod stats;
use stats::print_stats;

/// After the expected count is known, give up when nothing arrives for this long.
const QUIET_AFTER_EXPECTED: Duration = Duration::from_secs(15);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!(
            "usage: bench-latency <bootstrap> <topic> <ready-file> <expected-file> <timeout-seconds>"
        );
        return ExitCode::from(2);
    }
    let timeout = match args[5].parse::<u64>() {
        Ok(s) => Duration::from_secs(s),
        Err(_) => {
            eprintln!("bench-latency: <timeout-seconds> must be a whole number");
            return ExitCode::from(2);
        }
    };
    match run(&args[1], &args[2], &args[3], &args[4], timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-latency: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    bootstrap: &str,
    topic: &str,
    ready_file: &str,
    expected_file: &str,
    timeout: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let group = format!("bench-latency-{}", std::process::id());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        // Ask the broker to answer a fetch as soon as one byte is there, and not to hold an
        // empty fetch long: this consumer's delay is part of the upper bound it reports.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.min.bytes", "1")
        .create()
        .map_err(|e| format!("cannot create the consumer: {e}"))?;

    // pgcdc creates its topics at start; the bench starts us after that, but wait a little.
    let partitions = loop {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|e| format!("cannot read metadata: {e}"))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !parts.is_empty() {
            break parts;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("topic `{topic}` did not appear within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;

    let mut create_ms: Vec<i64> = Vec::new();
    let mut received_ms: Vec<f64> = Vec::new();
    let mut log_append = 0usize;
    let mut no_commit_time = 0usize;
    let mut expected: Option<usize> = None;
    let mut last_record = Instant::now();
    let mut count = 0usize;
    let mut warmed_up = false;
    loop {
        if expected.is_none() {
            expected = std::fs::read_to_string(expected_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if expected.is_some() {
                last_record = Instant::now();
            }
        }
        if expected.is_some_and(|n| count >= n) {
            break;
        }
        if expected.is_some() && last_record.elapsed() > QUIET_AFTER_EXPECTED {
            eprintln!("bench-latency: nothing new for {QUIET_AFTER_EXPECTED:?}; stopping early");
            break;
        }
        if started.elapsed() > timeout {
            eprintln!("bench-latency: timeout after {timeout:?}; stopping");
            break;
        }
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let now_ms = unix_ms_f64();
        let msg = match polled {
            Ok(msg) => msg,
            Err(KafkaError::PartitionEOF(_)) => continue,
            Err(e) => return Err(format!("consume error: {e}")),
        };
        if !warmed_up {
            warmed_up = true;
            std::fs::write(ready_file, b"ready\n")
                .map_err(|e| format!("cannot write {ready_file}: {e}"))?;
            continue;
        }
        last_record = Instant::now();
        let Some(value) = msg.payload() else {
            // A tombstone carries no commit time (the bench's load makes none).
            continue;
        };
        count += 1;
        let Some(commit) = commit_ts_ms(value) else {
            no_commit_time += 1;
            continue;
        };
        received_ms.push(now_ms - commit as f64);
        match msg.timestamp() {
            Timestamp::CreateTime(t) => create_ms.push(t - commit),
            Timestamp::LogAppendTime(t) => {
                log_append += 1;
                create_ms.push(t - commit);
            }
            Timestamp::NotAvailable => {}
        }
    }

    println!("records={count}");
    println!("expected={}", expected.map_or(-1, |n| n as i64));
    println!("no_commit_time={no_commit_time}");
    println!("log_append_time={log_append}");
    let mut create: Vec<f64> = create_ms.iter().map(|&v| v as f64).collect();
    print_stats("create", &mut create);
    print_stats("received", &mut received_ms);
    Ok(())
}

/// `source.ts_ms` of a pgcdc event.
fn commit_ts_ms(value: &[u8]) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    v.get("source")?.get("ts_ms")?.as_i64()
}

fn unix_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}
