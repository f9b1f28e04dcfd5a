//! The signal the examples shut down on: Ctrl-C (SIGINT) or SIGTERM, which is what
//! orchestrators (systemd, Kubernetes, Docker) send. Either starts the same graceful
//! shutdown: stop accepting, close every WebSocket with 1001, detach from the backend.

/// Resolves on the first Ctrl-C or SIGTERM. A signal that cannot be listened for is
/// logged and never fires (the other still does).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
