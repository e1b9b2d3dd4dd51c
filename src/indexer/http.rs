//! The indexer's HTTP client for a JSON API: one `reqwest` client per target, so connections
//! are kept alive between requests and `https://` URLs work.
//!
//! TLS goes through `native-tls`, which on Linux is the OpenSSL that pgcdc links already (for
//! PostgreSQL and librdkafka): no second TLS stack in the binary, and the system's CA store
//! decides trust, plus an optional CA file for a private CA. Redirects are not followed (an
//! API that redirects is misconfigured, and a redirect must not carry the key elsewhere).
//!
//! A certificate OpenSSL refuses is a configuration error (not retried); a server that cannot
//! be reached is transient.
//!
//! The API key is a sensitive header value and is never part of an error or `Debug` output.

use std::path::Path;
use std::time::Duration;

use crate::model::failure::{Recoverable, Recovery};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Url};

/// Responses larger than this are refused (the indexer only reads small JSON answers).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// A kept-alive connection idle this long is closed by us, before a server with the common
/// 5-second keep-alive closes it under a request being sent.
const POOL_IDLE: Duration = Duration::from_secs(4);

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("`{0}` is not an http:// or https:// URL (e.g. http://meilisearch:7700)")]
    BadUrl(String),
    #[error("the API key cannot be sent as an HTTP header (it holds control characters)")]
    BadKey,
    #[error("CA file {path}: {detail}")]
    BadCa { path: String, detail: String },
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error(
        "{addr} presented a certificate that is not trusted: {detail} (--meili-ca-file adds a CA)"
    )]
    Untrusted { addr: String, detail: String },
    #[error("{method} {path}: {detail}")]
    Io {
        method: &'static str,
        path: String,
        detail: String,
    },
    #[error("{method} {path}: no complete answer within {secs} s")]
    Timeout {
        method: &'static str,
        path: String,
        secs: u64,
    },
    #[error("{method} {path}: {detail}")]
    Malformed {
        method: &'static str,
        path: String,
        detail: String,
    },
}

impl Recoverable for HttpError {
    /// The server may answer if asked again (down, restarting, slow); the rest stops.
    fn recovery(&self) -> Recovery {
        match self {
            HttpError::Connect { .. } | HttpError::Io { .. } | HttpError::Timeout { .. } => {
                Recovery::Reconnect
            }
            _ => Recovery::Stop,
        }
    }
}

/// A response: status and body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A client for one `http[s]://host[:port][/base]`. `Debug` shows no key.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    /// The URL without a trailing `/`; request paths are appended to it.
    base: String,
    /// `host:port`, for messages.
    authority: String,
    timeout: Duration,
}

impl HttpClient {
    /// `url`: `http[s]://host[:port][/base/path]`; `bearer`: sent as `Authorization: Bearer …`.
    pub fn new(url: &str, bearer: Option<String>, timeout: Duration) -> Result<Self, HttpError> {
        Self::with_ca_file(url, bearer, timeout, None)
    }

    /// As [`HttpClient::new`], trusting the certificates in the PEM file `ca_file` as well as
    /// the system's.
    pub fn with_ca_file(
        url: &str,
        bearer: Option<String>,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, HttpError> {
        let bad = || HttpError::BadUrl(url.to_string());
        let parsed = Url::parse(url).map_err(|_| bad())?;
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => return Err(bad()),
        };
        if !matches!(parsed.scheme(), "http" | "https")
            || parsed.query().is_some()
            || parsed.fragment().is_some()
            || !parsed.username().is_empty()
            || parsed.password().is_some()
        {
            return Err(bad());
        }
        let port = parsed.port_or_known_default().ok_or_else(bad)?;
        let authority = format!("{host}:{port}");

        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(key) = bearer {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| HttpError::BadKey)?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(POOL_IDLE)
            // Straight to the URL given, as before: no HTTP(S)_PROXY from the environment (a
            // proxy would see the API key).
            .no_proxy()
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        if let Some(path) = ca_file {
            let bad_ca = |detail: String| HttpError::BadCa {
                path: path.display().to_string(),
                detail,
            };
            let pem = std::fs::read(path).map_err(|e| bad_ca(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad_ca(error_chain(&e)))?;
            if certs.is_empty() {
                return Err(bad_ca("no PEM certificate in it".into()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| HttpError::Setup(error_chain(&e)))?;
        Ok(HttpClient {
            client,
            base: url.trim_end_matches('/').to_string(),
            authority,
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
        let secs = self.timeout.as_secs();
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout {
                method,
                path: path.to_string(),
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
        let io = |detail: String| HttpError::Io {
            method,
            path: path.to_string(),
            detail,
        };
        let malformed = |detail: String| HttpError::Malformed {
            method,
            path: path.to_string(),
            detail,
        };
        let verb = Method::from_bytes(method.as_bytes()).map_err(|e| malformed(e.to_string()))?;
        let url = format!("{}{path}", self.base);
        let mut req = self.client.request(verb, &url);
        let body = body.unwrap_or_default();
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            req = req
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        let mut resp = req.send().await.map_err(|e| {
            if certificate_refused(&e) {
                HttpError::Untrusted {
                    addr: self.authority.clone(),
                    detail: error_chain(&e),
                }
            } else if e.is_connect() {
                HttpError::Connect {
                    addr: self.authority.clone(),
                    detail: error_chain(&e),
                }
            } else if e.is_builder() || not_http(&e) {
                malformed(error_chain(&e))
            } else {
                io(error_chain(&e))
            }
        })?;
        let status = resp.status().as_u16();
        let too_large = || malformed(format!("answer larger than {MAX_RESPONSE_BYTES} bytes"));
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| io(error_chain(&e)))? {
            if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Response { status, body: out })
    }
}

/// OpenSSL refused the server's certificate (unknown CA, wrong name, expired). Other TLS
/// failures (a connection cut during the handshake) stay transient.
fn certificate_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(stack) = s.downcast_ref::<openssl::error::ErrorStack>() {
            if stack
                .errors()
                .iter()
                .any(|e| e.reason() == Some("certificate verify failed"))
            {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// An error and its causes on one line (`reqwest` puts the useful part in the sources).
/// The server answered something that is not HTTP (a wrong `--meili-url`): asking again
/// cannot help. A connection cut in the middle of an answer is not this; it is retried.
fn not_http(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() {
                return true;
            }
        }
        source = s.source();
    }
    false
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers something other than HTTP (a `--meili-url` naming the wrong
    /// service) stops the indexer, as the hand-written client did; a connection that closes
    /// before answering is retried. Neither goes through a proxy named by the environment.
    #[tokio::test]
    async fn a_non_http_answer_stops_and_a_closed_connection_is_retried() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn serve(answer: &'static [u8]) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut sock, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let _ = sock.write_all(answer).await;
                }
            });
            format!("http://{addr}")
        }
        let t = Duration::from_secs(5);
        let ssh = HttpClient::new(&serve(b"SSH-2.0-OpenSSH_9.6\r\n").await, None, t).unwrap();
        let err = ssh.request("GET", "/health", None).await.unwrap_err();
        assert!(matches!(err, HttpError::Malformed { .. }), "{err:?}");
        assert_eq!(err.recovery(), Recovery::Stop);
        let closed = HttpClient::new(&serve(b"").await, None, t).unwrap();
        let err = closed.request("GET", "/health", None).await.unwrap_err();
        assert_eq!(err.recovery(), Recovery::Reconnect, "{err:?}");
    }

    #[test]
    fn urls() {
        let t = Duration::from_secs(1);
        let c = HttpClient::new("http://meilisearch:7700", Some("k".into()), t).unwrap();
        assert_eq!(
            (c.base.as_str(), c.authority.as_str()),
            ("http://meilisearch:7700", "meilisearch:7700")
        );
        let c = HttpClient::new("http://127.0.0.1/search/", None, t).unwrap();
        assert_eq!(
            (c.base.as_str(), c.authority.as_str()),
            ("http://127.0.0.1/search", "127.0.0.1:80")
        );
        let c = HttpClient::new("https://search.example", None, t).unwrap();
        assert_eq!(c.authority, "search.example:443");
        let c = HttpClient::new("http://[::1]:7700/x", None, t).unwrap();
        assert_eq!(c.authority, "[::1]:7700");
        for bad in [
            "ftp://x",
            "x:7700",
            "http://",
            "http://h:port",
            "http://[::1",
            "http://user:pw@h:7700",
            "http://h:7700/?q=1",
        ] {
            assert!(HttpClient::new(bad, None, t).is_err(), "{bad}");
        }
        assert!(matches!(
            HttpClient::new("http://h", Some("a\nb".into()), t),
            Err(HttpError::BadKey)
        ));
    }

    #[test]
    fn the_key_is_not_in_debug_output() {
        let c = HttpClient::new(
            "http://h:7700",
            Some("s3cret-key".into()),
            Duration::from_secs(1),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret-key"), "{shown}");
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let t = Duration::from_secs(1);
        let dir = std::env::temp_dir().join(format!("pgcdc-http-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, b"not a certificate\n").unwrap();
        for path in [empty.as_path(), dir.join("missing.pem").as_path()] {
            let err = HttpClient::with_ca_file("https://h", None, t, Some(path)).unwrap_err();
            assert!(matches!(err, HttpError::BadCa { .. }), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
