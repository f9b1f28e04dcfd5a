//! tower-mesh on a bare hyper 1 server: no axum, no router.
//!
//! What it shows:
//! - the inner HTTP service is a plain `tower::service_fn` (`GET /health` answers `ok`,
//!   everything else `404`);
//! - `MeshLayer` wraps it (mesh on `/`), and `hyper_util::service::TowerToHyperService`
//!   turns the tower service into a hyper one;
//! - the accept loop serves each connection **with upgrades enabled**
//!   (`serve_connection_with_upgrades`): without them hyper never hands over the socket and
//!   the WebSocket handshake cannot complete;
//! - commands `echo` (reply = payload) and `time` (reply = Unix time in milliseconds);
//! - graceful shutdown on Ctrl-C or SIGTERM: stop accepting, let open HTTP connections finish, and
//!   close every WebSocket with a going-away frame through `Mesh::shutdown`.
//!
//! ```text
//! cargo run --example hyper
//! curl http://127.0.0.1:3001/health
//! # any mesh client on ws://127.0.0.1:3001/
//! ```
//!
//! `PORT` sets the port (default 3001); `RUST_LOG` the log filter (default `info`).

#[path = "../common/shutdown.rs"]
mod shutdown;

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::{service_fn, Layer};
use tower_mesh::extract::Payload;
use tower_mesh::Mesh;

use shutdown::shutdown_signal;

/// How long open HTTP connections get to finish once shutdown starts.
const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// `echo`: replies with the payload it was sent.
async fn echo(Payload(payload): Payload<Value>) -> Value {
    payload
}

/// `time`: the server's clock, in milliseconds since the Unix epoch.
async fn time() -> Value {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis())
        .unwrap_or_default();
    Value::from(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// The application's own HTTP routes: everything that is not a mesh WebSocket.
async fn routes(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/health") => (StatusCode::OK, "ok"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    Ok(response)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3001);

    let (mesh_layer, mesh) = Mesh::builder()
        .command("echo", echo)
        .command("time", time)
        .build();
    // Mesh on `/`; every other request reaches `routes`.
    let service = mesh_layer.layer(service_fn(routes));

    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!("mesh on ws://127.0.0.1:{port}/, health on http://127.0.0.1:{port}/health");

    // Tells every HTTP connection task to finish its current request and stop.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);

    loop {
        let (stream, peer) = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Mesh frames are small: send each at once rather than wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        // Forget connection tasks that have already finished.
        while connections.try_join_next().is_some() {}

        let service = TowerToHyperService::new(service.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            // Upgrades must be enabled, or the WebSocket handshake cannot happen.
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
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
    tracing::info!("shutting down");
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
