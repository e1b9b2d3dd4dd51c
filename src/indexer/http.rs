//! Just enough HTTP/1.1 for a JSON API on a trusted network: one request per connection
//! (`Connection: close`), plain TCP, JSON bodies.
//!
//! Why not a client crate: the indexer makes a handful of requests per batch to one host, and
//! every piece needed — URL, request, response with `Content-Length` or chunked body — fits in
//! this file with tests, without a second TLS stack or HTTP framework in the build. TLS is
//! deliberately absent: put the search engine on a private network (as the compose file does)
//! or behind a local TLS-terminating proxy.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Responses larger than this are refused (the indexer only reads small JSON answers).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "`{0}` is not an http:// URL (the indexer speaks plain HTTP, e.g. http://meilisearch:7700)"
    )]
    BadUrl(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("{method} {path}: {source}")]
    Io {
        method: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("{method} {path}: no complete answer within {secs} s")]
    Timeout {
        method: &'static str,
        path: String,
        secs: u64,
    },
    #[error("{method} {path}: malformed HTTP response: {detail}")]
    Malformed {
        method: &'static str,
        path: String,
        detail: String,
    },
}

impl HttpError {
    /// The server may answer if asked again (down, restarting, slow).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HttpError::Connect { .. } | HttpError::Io { .. } | HttpError::Timeout { .. }
        )
    }
}

/// A response: status and body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A client for one `http://host:port[/base]`.
#[derive(Debug, Clone)]
pub struct HttpClient {
    host: String,
    port: u16,
    /// `host:port` as sent in `Host:`.
    authority: String,
    base_path: String,
    bearer: Option<String>,
    timeout: Duration,
}

impl HttpClient {
    /// `url`: `http://host[:port][/base/path]`; `bearer`: sent as `Authorization: Bearer …`.
    pub fn new(url: &str, bearer: Option<String>, timeout: Duration) -> Result<Self, HttpError> {
        let bad = || HttpError::BadUrl(url.to_string());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => 80,
                None => return Err(bad()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(HttpClient {
            host,
            port,
            authority: authority.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
            bearer,
            timeout,
        })
    }

    /// Sends one request (`path` starts with `/`); a JSON `body` is sent with its type.
    pub async fn request(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let full_path = format!("{}{}", self.base_path, path);
        let secs = self.timeout.as_secs();
        match tokio::time::timeout(self.timeout, self.exchange(method, &full_path, body)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                method,
                path: full_path,
                secs,
            }),
        }
    }

    async fn exchange(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| HttpError::Connect {
                addr: self.authority.clone(),
                source,
            })?;
        let io_err = |source| HttpError::Io {
            method,
            path: path.to_string(),
            source,
        };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.authority
        );
        if let Some(key) = &self.bearer {
            req.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        stream.write_all(&bytes).await.map_err(io_err)?;

        let mut raw = Vec::with_capacity(4096);
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut chunk).await.map_err(io_err)?;
            if n == 0 {
                break;
            }
            if raw.len() + n > MAX_RESPONSE_BYTES {
                return Err(HttpError::Malformed {
                    method,
                    path: path.to_string(),
                    detail: format!("larger than {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        parse_response(&raw).map_err(|detail| HttpError::Malformed {
            method,
            path: path.to_string(),
            detail,
        })
    }
}

/// Parses a complete HTTP/1.1 response (the connection was closed after it).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line `{status_line}`"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header `{line}`"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length `{value}`"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = content_length {
        rest.get(..n)
            .ok_or_else(|| format!("body has {} of {n} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("truncated chunk size")?;
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size `{size_hex}`"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let data = rest.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(data);
        rest = rest
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .ok_or("chunk not followed by CRLF")?;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Duration::from_secs(1);
        let c = HttpClient::new("http://meilisearch:7700", None, t).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base_path.as_str()),
            ("meilisearch", 7700, "")
        );
        let c = HttpClient::new("http://127.0.0.1/search/", None, t).unwrap();
        assert_eq!((c.port, c.base_path.as_str()), (80, "/search"));
        let c = HttpClient::new("http://[::1]:7700/x", None, t).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.authority.as_str()),
            ("::1", 7700, "[::1]:7700")
        );
        for bad in [
            "https://x",
            "x:7700",
            "http://",
            "http://h:port",
            "http://[::1",
        ] {
            assert!(HttpClient::new(bad, None, t).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses() {
        let r =
            parse_response(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (202, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"[1,2]");
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"SPDY 200\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_response(&raw);
        }
    }
}
