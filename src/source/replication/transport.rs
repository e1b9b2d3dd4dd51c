//! Opening the byte stream: TCP or Unix socket, then `SSLRequest` and the TLS
//! handshake according to `sslmode`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio_openssl::SslStream;

use super::error::ReplicationError;
use super::tls::{self, TlsError};
use crate::source::conninfo::{ConnInfo, SslMode};

/// What TLS reads from: the socket behind a buffer. The walsender sends one small TLS record
/// per replication message, and OpenSSL reads each record's header and body with separate
/// reads; the buffer turns those into one `recv` per [`TLS_READ_BUFFER`] bytes. (OpenSSL's
/// own read-ahead does the same but moves its buffered bytes to the front of its buffer at
/// every record, which costs more than the syscalls it saves.)
type TlsInner = BufReader<TcpStream>;

/// Size of [`TlsInner`]'s buffer: one maximum-size TLS record and its overhead.
const TLS_READ_BUFFER: usize = 17 * 1024;

/// Receive buffer asked for on a loopback connection (the kernel doubles it for its own
/// overhead). The walsender sends every replication message as it is decoded; while pgcdc
/// keeps its receive window open, each message leaves as a segment of its own, and on
/// loopback the receiving side of every segment (the TCP input path) runs on the *sender's*
/// CPU, in the walsender's softirq. The walsender is the bottleneck of a backlog, so that cost
/// is paid in throughput: a window this small fills between pgcdc's reads, the walsender's
/// messages then queue in its send buffer and leave as large segments. A 1M-row transaction
/// read over TLS on loopback: walsender system time 6.4–7.2 s → 4–6 s, wall −10 to −20%.
/// It costs nothing in reach: the window needed is bandwidth × round trip, and a loopback
/// round trip is microseconds. Remote connections keep the kernel's autotuned buffer.
pub(crate) const LOOPBACK_RECV_BUFFER: u32 = 32 * 1024;

/// The connection's byte stream.
#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<SslStream<TlsInner>>),
}

impl Socket {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Socket::Tls(_))
    }

    /// A TCP connection to this machine (its receive buffer is [`LOOPBACK_RECV_BUFFER`]).
    pub(crate) fn is_loopback(&self) -> bool {
        let tcp = match self {
            Socket::Tcp(s) => s,
            Socket::Tls(s) => s.get_ref().get_ref(),
            Socket::Unix(_) => return false,
        };
        tcp.peer_addr()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback())
    }

    /// Sets `SO_RCVLOWAT`: a TCP socket reports readable only once `bytes` are queued (or
    /// the value is lowered, which re-checks at once). Returns false where it does not apply:
    /// Unix sockets report readable regardless.
    pub(crate) fn set_recv_lowat(&self, bytes: usize) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Tls(s) => s.get_ref().get_ref().as_raw_fd(),
            Socket::Unix(_) => return Ok(false),
        };
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is an open socket that `self` owns for the whole call, and the option
        // value points to a live c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(true)
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connects to the server `info` names and negotiates TLS as its sslmode says.
pub(crate) async fn open(info: &ConnInfo) -> Result<Socket, ReplicationError> {
    let target = info.target();
    if let Some(path) = info.unix_socket_path() {
        if info.sslmode.requires_tls() {
            tracing::debug!(
                sslmode = %info.sslmode,
                "TLS is not used over Unix sockets (as in libpq)"
            );
        }
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| ReplicationError::Connect { target, source })?;
        return Ok(Socket::Unix(stream));
    }

    let mode = tls::effective_mode(info);
    if mode == SslMode::Disable {
        return Ok(Socket::Tcp(tcp_connect(info).await?));
    }
    // Build the TLS configuration first: a missing root certificate should fail
    // before any network traffic.
    let connector = tls::build_connector(info)?;
    let tcp = tcp_connect(info).await?;
    match start_tls(tcp, info, mode, &connector).await {
        Ok(socket) => Ok(socket),
        Err(ReplicationError::Tls(TlsError::Handshake { detail, .. })) if !mode.requires_tls() => {
            // libpq does the same for prefer/allow: retry without TLS.
            tracing::warn!(
                target_addr = %target,
                error = %detail,
                sslmode = %mode,
                "TLS handshake failed; reconnecting without TLS as sslmode allows"
            );
            Ok(Socket::Tcp(tcp_connect(info).await?))
        }
        Err(e) => Err(e),
    }
}

/// Sends SSLRequest and, if the server agrees, performs the TLS handshake.
async fn start_tls(
    mut tcp: TcpStream,
    info: &ConnInfo,
    mode: SslMode,
    connector: &openssl::ssl::SslConnector,
) -> Result<Socket, ReplicationError> {
    let target = info.target();
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    // Exactly one byte: anything the server sends after 'S' belongs to the TLS
    // handshake, and nothing may be buffered in between (CVE-2021-23222).
    let answer = tcp.read_u8().await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReplicationError::ConnectionClosed
        } else {
            ReplicationError::Io(e)
        }
    })?;
    match answer {
        b'S' => {}
        b'N' if mode.requires_tls() => {
            return Err(TlsError::NotOffered { target, mode }.into());
        }
        b'N' => {
            tracing::info!(target_addr = %target, "the server does not offer TLS; continuing unencrypted (sslmode={mode})");
            return Ok(Socket::Tcp(tcp));
        }
        byte => return Err(TlsError::BadAnswer { target, byte }.into()),
    }

    let mut config = connector.configure().map_err(TlsError::Setup)?;
    tls::configure(&mut config, mode);
    let server_name = info
        .tls_server_name()
        .unwrap_or_else(|| "localhost".to_string());
    let ssl = config.into_ssl(&server_name).map_err(TlsError::Setup)?;
    // Nothing is buffered yet: the server's answer byte was read from the socket itself.
    let tcp = BufReader::with_capacity(TLS_READ_BUFFER, tcp);
    let mut stream = SslStream::new(ssl, tcp).map_err(TlsError::Setup)?;
    if let Err(err) = Pin::new(&mut stream).connect().await {
        let verify = Some(stream.ssl().verify_result());
        return Err(TlsError::Handshake {
            target,
            detail: tls::describe_handshake_error(&err, verify),
        }
        .into());
    }
    tracing::debug!(
        target_addr = %target,
        version = stream.ssl().version_str(),
        "TLS established"
    );
    Ok(Socket::Tls(Box::new(stream)))
}

/// Opens a TCP connection with keepalives, trying each resolved address in turn.
async fn tcp_connect(info: &ConnInfo) -> Result<TcpStream, ReplicationError> {
    let target = info.target();
    let addrs: Vec<SocketAddr> = match (info.hostaddr, &info.host) {
        (Some(ip), _) => vec![SocketAddr::new(ip, info.port)],
        (None, Some(host)) => tokio::net::lookup_host((host.as_str(), info.port))
            .await
            .map_err(|source| ReplicationError::Connect {
                target: target.clone(),
                source,
            })?
            .collect(),
        (None, None) => vec![SocketAddr::from(([127, 0, 0, 1], info.port))],
    };
    let mut last_err = io::Error::new(
        io::ErrorKind::NotFound,
        "the host name resolved to no address",
    );
    for addr in addrs {
        match tcp_connect_one(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "TCP connect failed");
                last_err = e;
            }
        }
    }
    Err(ReplicationError::Connect {
        target,
        source: last_err,
    })
}

async fn tcp_connect_one(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_keepalive(true)?;
    // Before connecting: the window scale is agreed in the handshake.
    if addr.ip().to_canonical().is_loopback() {
        if let Err(e) = socket.set_recv_buffer_size(LOOPBACK_RECV_BUFFER) {
            tracing::debug!(error = %e, "cannot size the receive buffer; keeping the default");
        }
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
