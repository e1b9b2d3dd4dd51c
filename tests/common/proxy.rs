//! A loopback TCP proxy that cuts the network on command, between pgcdc and PostgreSQL or
//! between pgcdc and the broker.
//!
//! Three states:
//! - **open**: every connection is forwarded both ways;
//! - **cut**: every connection is closed and the listening socket is gone, so new connections
//!   are refused — a link that is down and says so;
//! - **silent**: nothing is forwarded and nothing is closed; connections made during the
//!   partition hang as well. Connections that were silenced stay silent even after
//!   [`Proxy::restore`], like a connection whose state a middlebox lost: only a peer's own
//!   timeout can notice. New connections after the restore work.
//!
//! The proxy runs on its own thread and runtime, so a test that blocks its own runtime does
//! not stall the network; it stops when dropped.
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Cut,
    Silent,
}

/// A proxy from a free loopback port to `127.0.0.1:<upstream>`.
pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// Closing this ends the proxy thread.
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding a free port to `upstream`.
    pub fn start(upstream: u16) -> Proxy {
        Self::start_on(super::servers::free_port(), upstream)
    }

    /// Starts forwarding `port` to `upstream`.
    pub fn start_on(port: u16, upstream: u16) -> Proxy {
        let (mode, mode_rx) = watch::channel(Mode::Open);
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                tokio::select! {
                    _ = serve(port, upstream, mode_rx, ready_tx) => {}
                    _ = shutdown_rx => {}
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the proxy listens");
        Proxy {
            port,
            mode,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Closes every connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Forwards nothing and closes nothing until [`restore`](Self::restore); the connections
    /// silenced stay silent after it.
    pub fn silence(&self) {
        self.mode.send_replace(Mode::Silent);
    }

    /// Accepts and forwards new connections again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(([127, 0, 0, 1], port).into())?;
    socket.listen(128)
}

async fn serve(
    port: u16,
    upstream: u16,
    mut mode: watch::Receiver<Mode>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        // Listen only while open or silent: a cut link refuses connections.
        while *mode.borrow_and_update() == Mode::Cut {
            if mode.changed().await.is_err() {
                return;
            }
        }
        let listener = loop {
            match bind(port) {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        loop {
            tokio::select! {
                changed = mode.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *mode.borrow_and_update() == Mode::Cut {
                        break;
                    }
                }
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        tokio::spawn(forward(client, upstream, mode.clone()));
                    }
                }
            }
        }
        drop(listener);
    }
}

/// Forwards one connection until either side closes or the link is cut or silenced.
async fn forward(mut client: TcpStream, upstream: u16, mut mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    if *mode.borrow_and_update() == Mode::Silent {
        hold(mode).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let outcome = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => None,
        m = mode.wait_for(|m| *m != Mode::Open) => m.ok().map(|m| *m),
    };
    if outcome == Some(Mode::Silent) {
        // Bytes in flight are lost, as in a partition; the sockets stay open.
        hold(mode).await;
    }
}

/// Keeps the caller's sockets open and silent until the link is cut or the proxy stops.
async fn hold(mut mode: watch::Receiver<Mode>) {
    loop {
        if *mode.borrow_and_update() == Mode::Cut {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}
