//! SIGINT/SIGTERM: the first asks for a graceful stop (finish in-flight events, confirm what
//! was acknowledged), the second exits at once — which is still safe, only less tidy: nothing
//! unacknowledged was ever confirmed.

use tokio::sync::watch;

/// Returns a receiver that turns `true` on the first SIGINT or SIGTERM.
pub fn stop_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            wait_for_signal().await;
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

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
