//! How the examples serve HTTP: one accept loop, hardened for the open internet.
//!
//! - **A bounded time to send a request head** (`header_read_timeout`, 30 s unless
//!   `HEADER_READ_TIMEOUT_MS` says otherwise): a socket that never completes a request, be it
//!   idle from the start, trickling its headers (slowloris) or idle between two keep-alive
//!   requests, is closed when it runs out, instead of holding a file descriptor for ever.
//!   `axum::serve` sets no timer, so hyper's own 30 s default never applies there.
//! - **Accept errors back off.** When the process runs out of file descriptors (`EMFILE`)
//!   accepting fails until some are freed; the loop logs the error once per burst and
//!   waits a little longer after each failure (10 ms doubling up to 1 s) instead of
//!   spinning.
//! - `TCP_NODELAY` on every connection (mesh frames are small; Nagle's algorithm would hold
//!   a reply back until the previous one is acknowledged), and HTTP upgrades enabled (or
//!   the WebSocket handshake cannot complete).
//! - **Graceful shutdown** when `signal` resolves: stop accepting, `Mesh::shutdown` (every
//!   WebSocket gets a 1001 close, `on_disconnect` hooks run), then let HTTP requests in
//!   flight finish, for at most 5 s.
//!
//! Connections are served as HTTP/1.1, which is all a WebSocket upgrade speaks. (hyper-util's
//! `auto::Builder` would also take HTTP/2, but with upgrades enabled it first waits, with no
//! time limit, for the bytes that tell the two apart: a socket that sends nothing would never
//! reach the HTTP/1 header timeout.)

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower_mesh::Mesh;

/// How long a client may take to send a request head unless `HEADER_READ_TIMEOUT_MS` says
/// otherwise.
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long open HTTP connections get to finish once shutdown starts.
const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The first wait after an accept error, doubled after each further one up to the second.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

type BoxError = Box<dyn StdError + Send + Sync>;

/// How long a client may take to send a request head: `HEADER_READ_TIMEOUT_MS`
/// (milliseconds), 30 s by default.
pub(crate) fn header_read_timeout() -> Duration {
    std::env::var("HEADER_READ_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(DEFAULT_HEADER_READ_TIMEOUT, Duration::from_millis)
}

/// Listens on `host:port`, or ends the process with a message a person can act on when
/// the port is taken (rather than `Error: Os { code: 98, .. }`).
pub(crate) async fn bind(host: &str, port: u16) -> io::Result<TcpListener> {
    match TcpListener::bind((host, port)).await {
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            eprintln!(
                "error: port {port} is already in use (is another copy of this example \
                 running?). Stop it, or pick another port: PORT={} cargo run --example ...",
                port.wrapping_add(1)
            );
            std::process::exit(2);
        }
        bound => bound,
    }
}

/// Serves `service` (an axum `Router`, or any tower HTTP service with the mesh layer in
/// it) on `listener` until `signal` resolves, then shuts down gracefully (see the module's
/// documentation).
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    mesh: Mesh,
    header_read_timeout: Duration,
    signal: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Tells every HTTP connection task to finish its current request and stop.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(signal);

    loop {
        let accepted = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            // The peer gave up before we accepted: nothing to wait for.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                let delay = backoff.failed(&err);
                tokio::select! {
                    () = &mut signal => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        // Forget connection tasks that have already finished.
        while connections.try_join_next().is_some() {}

        let service = TowerToHyperService::new(service.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let stopping = async move {
                // Dropped sender or `true`: stop either way.
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, %err, "http connection ended with an error");
            }
        });
    }

    // Stop accepting (the listener goes away), close every WebSocket (1001 going away,
    // `on_disconnect` hooks run), then let in-flight HTTP requests finish.
    drop(listener);
    if !mesh.shutdown().await {
        tracing::warn!("some WebSocket connections did not close in time");
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(HTTP_DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some HTTP connections did not finish in time");
        connections.shutdown().await;
    }
    Ok(())
}

/// Errors that concern one connection only (its peer reset it while it waited to be
/// accepted); any other error (out of file descriptors, of memory) concerns every accept.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Waits between failing accepts: a burst of them is logged once, when it starts.
struct AcceptBackoff {
    failures: u64,
    delay: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            failures: 0,
            delay: ACCEPT_BACKOFF.0,
        }
    }
}

impl AcceptBackoff {
    /// Counts a failed accept; returns how long to wait before the next.
    fn failed(&mut self, err: &io::Error) -> Duration {
        if self.failures == 0 {
            tracing::error!(
                "accept error: {err}; retrying with backoff (is the file-descriptor limit, \
                 `ulimit -n`, too low?)"
            );
        }
        self.failures += 1;
        let delay = self.delay;
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF.1);
        delay
    }

    /// An accept succeeded: the burst of failures, if any, is over.
    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
            *self = AcceptBackoff::default();
        }
    }
}
