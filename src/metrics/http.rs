//! A minimal HTTP/1.1 responder for `/metrics` and `/health`: one request per connection,
//! answered and closed. Scrapers and probes need nothing more, and this keeps a web
//! framework out of the binary.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::global;

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

/// Binds `addr` and serves until the process ends. Returns the bound address (useful with
/// port 0).
pub async fn serve(addr: &str, stall: Duration) -> Result<SocketAddr, BindError> {
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
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(READ_TIMEOUT, respond(stream, stall)).await;
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

async fn respond(mut stream: TcpStream, stall: Duration) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return write(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    if method != "GET" && method != "HEAD" {
        return write(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    let (status, ctype, body) = match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            global().render(stall),
        ),
        "/health" | "/healthz" => match global().health(stall) {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("unhealthy: {why}\n"),
            ),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".to_string(),
        ),
    };
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    write(&mut stream, status, ctype, &body).await
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
