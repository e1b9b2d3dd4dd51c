//! TLS for the ordinary (tokio-postgres) connections: catalog queries and the snapshot.
//!
//! The snapshot's `COPY` brings the whole table through one of these connections, as
//! maximum-size (16 KB) TLS records. OpenSSL reads each record's header and body separately,
//! so what sits under it decides how many `recv` calls a table costs: through an 8 KB
//! buffer (what the postgres-openssl crate uses) every record took two or three, and `recv`
//! was a tenth of pgcdc's time in a snapshot. Here TLS reads through [`READ_BUFFER`], which
//! holds several records per `recv`.
//!
//! Certificates are checked as the replication connection checks them ([`super::replication`]'s
//! `tls` rules for each `sslmode`), and SCRAM's channel binding gets the `tls-server-end-point`
//! value of RFC 5929: a hash of the server's certificate, with the hash of the certificate's
//! signature algorithm, SHA-256 when that is MD5 or SHA-1.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{ConnectConfiguration, SslConnector, SslRef};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio_openssl::SslStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use super::replication::tls;
use crate::source::conninfo::SslMode;

/// Bytes read from the socket at once, at most: four maximum-size TLS records.
const READ_BUFFER: usize = 64 * 1024;

/// Makes a TLS connector per connection, as tokio-postgres asks for one.
pub struct MakeTls {
    connector: SslConnector,
    mode: SslMode,
}

impl MakeTls {
    pub fn new(connector: SslConnector, mode: SslMode) -> Self {
        MakeTls { connector, mode }
    }
}

impl<S> MakeTlsConnect<S> for MakeTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = Connect;
    type Error = ErrorStack;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, ErrorStack> {
        let mut config = self.connector.configure()?;
        tls::configure(&mut config, self.mode);
        Ok(Connect {
            config,
            domain: domain.to_string(),
        })
    }
}

/// The handshake of one connection.
pub struct Connect {
    config: ConnectConfiguration,
    domain: String,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, Self::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let ssl = self.config.into_ssl(&self.domain)?;
            let mut stream = SslStream::new(ssl, BufReader::with_capacity(READ_BUFFER, stream))?;
            if let Err(e) = Pin::new(&mut stream).connect().await {
                let verify = Some(stream.ssl().verify_result());
                return Err(tls::describe_handshake_error(&e, verify).into());
            }
            Ok(TlsStream(stream))
        })
    }
}

/// An established TLS connection.
pub struct TlsStream<S>(SslStream<BufReader<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match server_end_point(self.0.ssl()) {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929's `tls-server-end-point`: the server certificate hashed with its signature's
/// hash function (SHA-256 in place of MD5 and SHA-1). `None` when that cannot be told.
fn server_end_point(ssl: &SslRef) -> Option<Vec<u8>> {
    let cert = ssl.peer_certificate()?;
    let algorithms = cert
        .signature_algorithm()
        .object()
        .nid()
        .signature_algorithms()?;
    let digest = match algorithms.digest {
        Nid::MD5 | Nid::SHA1 => MessageDigest::sha256(),
        nid => MessageDigest::from_nid(nid)?,
    };
    cert.digest(digest).ok().map(|d| d.to_vec())
}
