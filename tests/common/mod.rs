//! The test kit: every integration test binary declares `mod common;` and takes from here
//! what it needs to run pgcdc against the private test cluster started by
//! `scripts/test-env.sh` (which prints the `PGCDC_TEST_*` settings read here).
//!
//! - [`api`]: every item of pgcdc's library the tests use, re-exported from one place;
//! - [`db`]: the cluster's settings and a fresh database per test ([`TestDb`]);
//! - [`cmd`]: the one builder of a `pgcdc <command>` process ([`cmd::PgcdcCmd`]);
//! - [`pipeline`]: one test's database, slot, publication, topic prefix and directory, and
//!   `pgcdc` commands against them;
//! - [`process`]: a `pgcdc run` supervised run after run (started, killed, stopped);
//! - [`topics`]: reading topics back, and the per-key order rules a consumer relies on;
//! - [`lines`]: `--sink stdout` runs, and replaying their lines into per-key state;
//! - [`servers`], [`proxy`]: a PostgreSQL or broker of a test's own, a network cut;
//! - [`sinks`]: a sink driven in-process;
//! - [`assert`]: the checks many tests make on a finished run;
//! - [`rng`]: a seeded PRNG.
//!
//! Every test works in its own freshly created database, with its own slot, publication and
//! topic prefix, so tests run in parallel without seeing each other.
#![allow(dead_code, unused_imports)]

pub mod api;
pub mod assert;
pub mod cmd;
pub mod db;
pub mod lines;
pub mod pipeline;
pub mod process;
pub mod proxy;
pub mod rng;
pub mod servers;
pub mod sinks;
pub mod topics;

use std::time::Duration;

pub use assert::{assert_fails, assert_no_slot, assert_nothing_published, assert_success};
pub use db::{
    client, env, env_for_major, kv_quote, other_ca_pem, parse, unique_name, wait_for_count, Login,
    TestDb, TestEnv,
};

/// The shared durable broker (`PGCDC_TEST_KAFKA`).
pub fn kafka() -> String {
    std::env::var("PGCDC_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// Prints why a test does nothing (the test still passes).
pub fn skip(test: &str, why: &str) {
    eprintln!("note: {test}: skipped: {why}");
}

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Appends `line` to `file` in Cargo's target tmp directory (a suite's summary lines, kept
/// across runs).
pub fn append_summary(file: &str, line: &str) {
    use std::io::Write;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// A GET of `path` on `addr` (`host:port`, e.g. pgcdc's `--metrics-addr`): the status code and
/// the body; `None` if nothing answered.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    Some((code, body))
}
