//! Read-your-writes: `GET /wait?lsn=<X/Y>&timeout=<duration>` on the metrics address, a long
//! poll that answers as soon as a *published position* reaches the LSN an application took
//! after its commit (`pg_current_wal_insert_lsn()`).
//!
//! What "published" means is the caller's: for `pgcdc run` it is the position the sink
//! acknowledged while streaming (everything committed at or below it is in Kafka, or written
//! to stdout), the same position pgcdc confirms to PostgreSQL; for `pgcdc-indexer` it is the
//! position whose every change is applied to the index. Both hand this module a [`Waiter`];
//! [`PublishedWaiter`] is the one over a `watch` of the position, where each waiter is one
//! receiver asleep until the position moves (no polling, so many waiters cost little).
//!
//! The answers (the contract clients such as `pgcdc wait --url` and the indexer rely on):
//!
//! | status | body | when |
//! |---|---|---|
//! | 200 | `{"reached":true,"lsn":"X/Y","published":"A/B"}` | as soon as published ≥ lsn ([`reaches`]) |
//! | 504 | `{"reached":false,"lsn":"X/Y","published":"A/B"}` | the timeout ended first |
//! | 400 | `{"error":"…"}` | a bad `lsn` or `timeout` |
//! | 503 | `{"error":"…"}` | nothing published yet when the timeout ended, or stopping (or, for the indexer, pgcdc or Kafka cannot be asked) |
//!
//! Before anything is published (the snapshot is not acknowledged yet) a wait does not fail at
//! once: it waits like any other, since the snapshot's end publishes everything committed
//! before it, and answers 503 only if its timeout ends first. Every wait ends on the stop
//! signal (503).

use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::model::{BoxFuture, Lsn};

/// The timeout of a wait that gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest timeout a wait may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether `published` covers `lsn`: `published ≥ lsn`, or only a WAL page header lies
/// between them.
///
/// `pg_current_wal_insert_lsn()` taken when the last record ended exactly at the end of a WAL
/// page points past the next page's header (24 bytes, 40 at the start of a segment), while
/// the position PostgreSQL reports for the end of that record (a commit's end, a keepalive's
/// WAL end) is the page boundary itself. Without this, such a wait would last until some
/// other WAL is written. Assumes PostgreSQL's default 8 kB pages and a 16 MB-multiple segment
/// boundary for the long header: on other page sizes a boundary this does not recognise only
/// waits for the next WAL record, and nothing that fits in the bytes it skips is a change — a
/// record there is at most 24 bytes, with no data, or ends inside a 40-byte long header only
/// where that is a page's.
pub fn reaches(published: Lsn, lsn: Lsn) -> bool {
    const PAGE: u64 = 8192;
    const SEGMENT: u64 = 16 << 20;
    if !published.is_valid() {
        return false;
    }
    if published >= lsn {
        return true;
    }
    let header = match published.0.is_multiple_of(PAGE) {
        false => return false,
        true if published.0.is_multiple_of(SEGMENT) => 40,
        true => 24,
    };
    lsn.0 <= published.0 + header
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// `published` ≥ the LSN waited for.
    Reached { published: Lsn },
    /// The timeout ended with `published` below the LSN.
    TimedOut { published: Lsn },
    /// The timeout ended before any position was published (the snapshot is running).
    NothingPublished,
    /// The process is stopping.
    Stopping,
    /// The position cannot be known (503 with this reason; the indexer's wait, when pgcdc or
    /// Kafka cannot be asked).
    Unavailable(String),
}

/// What `/wait` asks: wait until everything at or below `lsn` is published, at most `timeout`.
pub trait Waiter: Send + Sync + 'static {
    fn wait(&self, lsn: Lsn, timeout: Duration) -> BoxFuture<'_, WaitOutcome>;

    /// A JSON object for `GET /status` (`None`: no such route).
    fn status(&self) -> Option<serde_json::Value> {
        None
    }
}

/// A [`Waiter`] over a watch of the published position (`Lsn::INVALID`: nothing yet) that
/// only moves forward, ended by `stop` turning true.
#[derive(Debug, Clone)]
pub struct PublishedWaiter {
    pub published: watch::Receiver<Lsn>,
    pub stop: watch::Receiver<bool>,
}

impl Waiter for PublishedWaiter {
    fn wait(&self, lsn: Lsn, timeout: Duration) -> BoxFuture<'_, WaitOutcome> {
        let published = self.published.clone();
        let stop = self.stop.clone();
        Box::pin(wait_on(published, stop, lsn, timeout))
    }
}

/// Waits until `published` reaches `lsn`, `timeout` ends or `stop` turns true (or either
/// watch's sender is gone: the process is ending).
pub async fn wait_on(
    mut published: watch::Receiver<Lsn>,
    mut stop: watch::Receiver<bool>,
    lsn: Lsn,
    timeout: Duration,
) -> WaitOutcome {
    let last = published.clone();
    tokio::select! {
        // A stop wins over a position reached at the same moment.
        biased;
        _ = stop.wait_for(|s| *s) => WaitOutcome::Stopping,
        r = published.wait_for(|p| reaches(*p, lsn)) => match r {
            Ok(p) => WaitOutcome::Reached { published: *p },
            Err(_) => WaitOutcome::Stopping,
        },
        () = tokio::time::sleep(timeout) => {
            let now = *last.borrow();
            match now.is_valid() {
                true => WaitOutcome::TimedOut { published: now },
                false => WaitOutcome::NothingPublished,
            }
        }
    }
}

/// A `/wait` request's parameters, from the query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitRequest {
    pub lsn: Lsn,
    pub timeout: Duration,
}

impl WaitRequest {
    /// Parses `lsn=…&timeout=…` (percent-encoded or not); the error says what a valid one
    /// looks like.
    pub fn parse(query: &str) -> Result<WaitRequest, String> {
        let mut lsn = None;
        let mut timeout = DEFAULT_TIMEOUT;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "lsn" => {
                    lsn = Some(v.parse::<Lsn>().map_err(|_| {
                        format!(
                            "lsn `{v}` is not an LSN: give it as PostgreSQL prints one, e.g. \
                             lsn=16/B374D848 (from SELECT pg_current_wal_insert_lsn())"
                        )
                    })?)
                }
                "timeout" => timeout = parse_timeout(&v)?,
                _ => {}
            }
        }
        let lsn = lsn.ok_or_else(|| {
            "lsn is missing: /wait?lsn=16/B374D848[&timeout=30s], the LSN from SELECT \
             pg_current_wal_insert_lsn() after the commit"
                .to_string()
        })?;
        Ok(WaitRequest { lsn, timeout })
    }
}

/// A timeout: a number with an optional unit `ms`, `s` (the default) or `m`, at most
/// [`MAX_TIMEOUT`].
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "timeout `{s}` is not a duration: a number of seconds, or with a unit such as 500ms, \
             30s or 2m, at most {}s",
            MAX_TIMEOUT.as_secs()
        )
    };
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * scale;
    if !secs.is_finite() || secs < 0.0 || secs > MAX_TIMEOUT.as_secs_f64() {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `%XX` escapes decoded (and `+` as a space); a malformed escape is kept as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The HTTP status line and JSON body of a wait's outcome.
pub fn answer(lsn: Lsn, outcome: WaitOutcome) -> (&'static str, String) {
    match outcome {
        WaitOutcome::Reached { published } => (
            "200 OK",
            json!({"reached": true, "lsn": lsn.to_string(), "published": published.to_string()})
                .to_string(),
        ),
        WaitOutcome::TimedOut { published } => (
            "504 Gateway Timeout",
            json!({"reached": false, "lsn": lsn.to_string(), "published": published.to_string()})
                .to_string(),
        ),
        WaitOutcome::NothingPublished => (
            "503 Service Unavailable",
            json!({"error": "nothing is published yet: the snapshot is not acknowledged yet \
                             (wait again; everything committed before the snapshot is \
                             published when it ends)"})
            .to_string(),
        ),
        WaitOutcome::Stopping => (
            "503 Service Unavailable",
            json!({"error": "stopping: the process received a stop signal"}).to_string(),
        ),
        WaitOutcome::Unavailable(why) => (
            "503 Service Unavailable",
            json!({ "error": why }).to_string(),
        ),
    }
}

/// The 400 answer for a bad request.
pub fn bad_request(why: &str) -> (&'static str, String) {
    ("400 Bad Request", json!({ "error": why }).to_string())
}

/// A client of another process's `/wait` (`pgcdc wait --url`, the indexer's `--pgcdc-url`):
/// plain HTTP/1.1 over TCP, as the responder speaks it — no TLS stack to set up for an
/// address that never has one.
#[derive(Debug, Clone)]
pub struct WaitClient {
    /// `host:port`.
    authority: String,
    /// What the user gave, for messages.
    pub url: String,
}

/// A `/wait` answer as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReply {
    Reached {
        published: Lsn,
    },
    TimedOut {
        published: Lsn,
    },
    /// 503: nothing published yet, or stopping (the server's words).
    Unavailable(String),
    /// 400, or an answer that is not the contract's (the server's words, or what came).
    Refused(String),
}

impl WaitClient {
    /// `http://host:port[/…]` or `host:port`; the path is replaced by `/wait`.
    pub fn new(url: &str) -> Result<WaitClient, String> {
        let bad = || {
            format!(
                "`{url}` is not an http:// address: give pgcdc's --metrics-addr, e.g. \
                 http://127.0.0.1:9187"
            )
        };
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(_) => return Err(bad()),
            None => url,
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(WaitClient {
            authority: authority.to_string(),
            url: format!("http://{authority}/wait"),
        })
    }

    /// One long poll of at most `timeout` (capped at [`MAX_TIMEOUT`]); `Err` when the server
    /// could not be reached or did not answer in time (a few seconds more than `timeout`).
    pub async fn wait(&self, lsn: Lsn, timeout: Duration) -> std::io::Result<WaitReply> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = timeout.min(MAX_TIMEOUT);
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&self.authority).await?;
            let req = format!(
                "GET /wait?lsn={lsn}&timeout={}ms HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                timeout.as_millis(),
                self.authority
            );
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            s.take(1 << 20).read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let buf = tokio::time::timeout(timeout + Duration::from_secs(5), exchange)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time")
            })??;
        Ok(parse_reply(&buf))
    }
}

/// Reads an HTTP answer of `/wait` (see the module docs for the contract).
fn parse_reply(buf: &[u8]) -> WaitReply {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .unwrap_or((&text, ""));
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let published = json
        .get("published")
        .and_then(|v| v.as_str()?.parse::<Lsn>().ok());
    let error = json
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("")
        .to_string();
    match (code, published) {
        (200, Some(published)) => WaitReply::Reached { published },
        (504, Some(published)) => WaitReply::TimedOut { published },
        (503, _) => WaitReply::Unavailable(error),
        (400, _) => WaitReply::Refused(error),
        _ => WaitReply::Refused(format!(
            "an answer that is not pgcdc's /wait (HTTP {code}): is the address a pgcdc \
             --metrics-addr?"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_what_a_valid_one_looks_like() {
        let r = WaitRequest::parse("lsn=16/B374D848&timeout=2s").unwrap();
        assert_eq!(r.lsn, Lsn(0x16_B374_D848));
        assert_eq!(r.timeout, Duration::from_secs(2));
        let r = WaitRequest::parse("lsn=0%2F10").unwrap();
        assert_eq!(r.lsn, Lsn(0x10));
        assert_eq!(r.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            WaitRequest::parse("timeout=500ms&lsn=0/1").unwrap().timeout,
            Duration::from_millis(500)
        );
        assert_eq!(
            WaitRequest::parse("lsn=0/1&timeout=2m").unwrap().timeout,
            Duration::from_secs(120)
        );
        let e = WaitRequest::parse("lsn=banana").unwrap_err();
        assert!(e.contains("16/B374D848"), "{e}");
        let e = WaitRequest::parse("timeout=3s").unwrap_err();
        assert!(e.contains("lsn is missing"), "{e}");
        for t in ["301s", "6m", "-1", "x", "1e400", ""] {
            let e = WaitRequest::parse(&format!("lsn=0/1&timeout={t}")).unwrap_err();
            assert!(e.contains("at most 300s"), "{t}: {e}");
        }
        // A malformed escape does not panic.
        assert!(WaitRequest::parse("lsn=%").is_err());
        assert!(WaitRequest::parse("lsn=0/1%").is_err());
        assert!(WaitRequest::parse("lsn=%zz").is_err());
    }

    #[test]
    fn a_position_covers_an_lsn_past_the_next_page_header_only() {
        assert!(reaches(Lsn(100), Lsn(100)));
        assert!(reaches(Lsn(100), Lsn(99)));
        assert!(!reaches(Lsn(100), Lsn(101)));
        assert!(!reaches(Lsn::INVALID, Lsn(0)));
        // At a page boundary: the short header's 24 bytes.
        let page = Lsn(0x1_0000_2000);
        assert!(reaches(page, Lsn(page.0 + 24)));
        assert!(!reaches(page, Lsn(page.0 + 32)));
        // At a segment boundary: the long header's 40.
        let segment = Lsn(0x1_0100_0000);
        assert!(reaches(segment, Lsn(segment.0 + 40)));
        assert!(!reaches(segment, Lsn(segment.0 + 48)));
        // Not a boundary: nothing is skipped.
        assert!(!reaches(Lsn(page.0 + 8), Lsn(page.0 + 16)));
    }

    #[test]
    fn a_client_reads_the_contract_and_takes_only_http_addresses() {
        let c = WaitClient::new("http://127.0.0.1:9187/metrics").unwrap();
        assert_eq!(c.url, "http://127.0.0.1:9187/wait");
        assert_eq!(WaitClient::new("h:1").unwrap().authority, "h:1");
        for bad in ["https://h:1", "h", "http://:1", "http://h:x", ""] {
            assert!(WaitClient::new(bad).unwrap_err().contains("e.g."), "{bad}");
        }
        let (status, body) = answer(Lsn(16), WaitOutcome::Reached { published: Lsn(32) });
        let reply = parse_reply(format!("HTTP/1.1 {status}\r\n\r\n{body}").as_bytes());
        assert_eq!(reply, WaitReply::Reached { published: Lsn(32) });
        let (status, body) = answer(Lsn(16), WaitOutcome::TimedOut { published: Lsn(8) });
        let reply = parse_reply(format!("HTTP/1.1 {status}\r\n\r\n{body}").as_bytes());
        assert_eq!(reply, WaitReply::TimedOut { published: Lsn(8) });
        let (status, body) = answer(Lsn(16), WaitOutcome::Stopping);
        let reply = parse_reply(format!("HTTP/1.1 {status}\r\n\r\n{body}").as_bytes());
        assert!(matches!(reply, WaitReply::Unavailable(e) if e.contains("stopping")));
        assert!(matches!(parse_reply(b"garbage"), WaitReply::Refused(_)));
        assert!(matches!(
            parse_reply(b"HTTP/1.1 200 OK\r\n\r\n{}"),
            WaitReply::Refused(_)
        ));
    }

    #[tokio::test]
    async fn a_wait_returns_when_the_position_reaches_the_lsn_times_out_or_stops() {
        let (tx, rx) = watch::channel(Lsn::INVALID);
        let (stop_tx, stop) = watch::channel(false);
        let w = PublishedWaiter {
            published: rx,
            stop,
        };
        // Nothing published: the timeout ends with no position.
        let out = w.wait(Lsn(10), Duration::from_millis(20)).await;
        assert_eq!(out, WaitOutcome::NothingPublished);
        tx.send(Lsn(5)).unwrap();
        let out = w.wait(Lsn(10), Duration::from_millis(20)).await;
        assert_eq!(out, WaitOutcome::TimedOut { published: Lsn(5) });
        // Reached while waiting.
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.wait(Lsn(10), Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send(Lsn(9)).unwrap();
        tx.send(Lsn(12)).unwrap();
        let out = waiting.await.unwrap();
        assert_eq!(out, WaitOutcome::Reached { published: Lsn(12) });
        // Already reached.
        let out = w.wait(Lsn(12), Duration::ZERO).await;
        assert_eq!(out, WaitOutcome::Reached { published: Lsn(12) });
        // A stop ends every wait.
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.wait(Lsn(100), Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop_tx.send(true).unwrap();
        assert_eq!(waiting.await.unwrap(), WaitOutcome::Stopping);
    }
}
