//! SIGINT/SIGTERM: the first asks for a graceful stop (finish in-flight events, confirm what
//! was acknowledged), the second exits at once — which is still safe, only less tidy: nothing
//! unacknowledged was ever confirmed.
//!
//! The handlers are installed by [`stop_on_signals`] itself, synchronously, and `pgcdc` calls
//! it first thing (before it logs or connects): until a process has replaced the default
//! action of SIGTERM, the signal kills it on the spot, without a flush or an exit code, so a
//! supervisor that stops pgcdc the moment it started must find the handlers in place already.
//! (Between `exec` and `main` — the dynamic loader — no program can handle a signal; a parent
//! that must not lose that window blocks SIGTERM across `exec`, and pgcdc unblocks it once
//! its handlers are installed, see [`unblock`].)

use tokio::sync::watch;

/// Installs the SIGINT and SIGTERM handlers now and returns a receiver that turns `true` on
/// the first of them (a second one exits at once, with 130). Needs a runtime's context
/// (`Runtime::enter`, or inside one); a signal that arrives before the runtime runs is kept
/// and delivered once it does.
pub fn stop_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let mut signals = Signals::install();
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            signals.next().await;
            count += 1;
            if count == 1 {
                tracing::info!(
                    "signal received: stopping gracefully (send it again to exit at once)"
                );
                let _ = tx.send(true);
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    rx
}

/// Completes once `stop` is true: the end of every wait that can last. Never completes if no
/// stop can be requested any more (the signal handler is gone).
pub async fn requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The signal streams, registered with the operating system when created.
#[cfg(unix)]
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

#[cfg(unix)]
impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(int), Ok(term)) => {
                unblock();
                Signals(Some((int, term)))
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("warning: cannot install the SIGINT/SIGTERM handlers ({e}): a signal stops pgcdc without a graceful stop");
                Signals(None)
            }
        }
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) {
        match &mut self.0 {
            Some((int, term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Unblocks SIGINT and SIGTERM in this thread (and so in every thread it starts later), as
/// PostgreSQL's processes do once their handlers are in place: a parent may have blocked
/// them across `exec` so that a signal sent the moment the process started waits for its
/// handlers instead of killing it by the default action (nothing can handle a signal while
/// the dynamic loader runs); it is delivered now, as a graceful stop.
#[cfg(unix)]
fn unblock() {
    // SAFETY: plain libc calls on a signal set owned by this frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Signals {
        Signals
    }

    async fn next(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
