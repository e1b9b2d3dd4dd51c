//! A minimal HTTP/1.1 responder for `/metrics`, `/health` and the read-your-writes long poll
//! `/wait` (see [`super::wait`]): one request per connection, answered and closed. Scrapers,
//! probes and waiting applications need nothing more, and this keeps a web framework out of
//! the binary. `pgcdc-indexer` serves its own `/wait` and `/status` with it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::global;
use super::wait::{self, WaitRequest, Waiter};

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that has not sent its request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source} (choose another --metrics-addr)")]
pub struct BindError {
    addr: String,
    source: std::io::Error,
}

/// What an endpoint serves.
#[derive(Clone, Default)]
pub struct Routes {
    /// `/metrics` and `/health` of the process-wide registry, with `--unhealthy-after`.
    pub metrics: Option<Duration>,
    /// `/wait` (and `/status` when the waiter has one).
    pub wait: Option<Arc<dyn Waiter>>,
}

/// Binds `addr` and serves `routes` until the process ends. Returns the bound address
/// (useful with port 0).
pub async fn serve(addr: &str, routes: Routes) -> Result<SocketAddr, BindError> {
    let err = |source| BindError {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let routes = routes.clone();
                    tokio::spawn(async move {
                        let _ = respond(stream, &routes).await;
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

/// Reads the request head (at most [`MAX_REQUEST`] bytes); `None` when it is too large.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
    Ok(Some(buf))
}

async fn respond(mut stream: TcpStream, routes: &Routes) -> std::io::Result<()> {
    // Only reading the request is timed: a `/wait` answer takes as long as it asked for.
    let buf = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(buf))) => buf,
        Ok(Ok(None)) => {
            return write(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" && method != "HEAD" {
        return write(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    const JSON: &str = "application/json";
    let (status, ctype, body) = match (path, routes.metrics, &routes.wait) {
        ("/metrics", Some(stall), _) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            global().render(stall),
        ),
        ("/health" | "/healthz", Some(stall), _) => match global().health(stall) {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("unhealthy: {why}\n"),
            ),
        },
        ("/wait", _, Some(waiter)) => {
            let (status, body) = match WaitRequest::parse(query) {
                Ok(req) => wait::answer(req.lsn, waiter.wait(req.lsn, req.timeout).await),
                Err(why) => wait::bad_request(&why),
            };
            (status, JSON, body)
        }
        ("/status", _, Some(waiter)) => match waiter.status() {
            Some(v) => ("200 OK", JSON, v.to_string()),
            None => ("404 Not Found", "text/plain", routes.list()),
        },
        _ => ("404 Not Found", "text/plain", routes.list()),
    };
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    write(&mut stream, status, ctype, &body).await
}

impl Routes {
    /// What a client that asked for something else is told.
    fn list(&self) -> String {
        let mut paths = Vec::new();
        if self.metrics.is_some() {
            paths.extend(["/metrics", "/health"]);
        }
        if let Some(w) = &self.wait {
            paths.push("/wait?lsn=<X/Y>&timeout=30s");
            if w.status().is_some() {
                paths.push("/status");
            }
        }
        format!("try {}\n", paths.join(" or "))
    }
}

async fn write(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
