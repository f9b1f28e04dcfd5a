//! tower-mesh on a bare hyper 1 server: no axum, no router.
//!
//! What it shows:
//! - the inner HTTP service is a plain `tower::service_fn` (`GET /health` answers `ok`,
//!   everything else `404`);
//! - `MeshLayer` wraps it (mesh on `/`), and the accept loop of `examples/common/serve.rs`
//!   (shared with the other examples) serves it with hyper's HTTP/1 connection builder:
//!   `hyper_util::service::TowerToHyperService` turns the tower service into a hyper one,
//!   each connection is served **with upgrades enabled** (`.with_upgrades()`: without them
//!   hyper never hands over the socket and the WebSocket handshake cannot complete), with a
//!   time limit on request heads (`header_read_timeout`, so slowloris and idle sockets are
//!   dropped) and `TCP_NODELAY`; accept errors back off;
//! - commands `echo` (reply = payload) and `time` (reply = Unix time in milliseconds);
//! - graceful shutdown on Ctrl-C or SIGTERM: stop accepting, close every WebSocket with a
//!   going-away frame through `Mesh::shutdown`, and let open HTTP connections finish.
//!
//! ```text
//! cargo run --example hyper
//! curl http://127.0.0.1:3001/health
//! # any mesh client on ws://127.0.0.1:3001/
//! ```
//!
//! `PORT` sets the port (default 3001); `RUST_LOG` the log filter (default `info`);
//! `HEADER_READ_TIMEOUT_MS` the time a client has to send a request head (default 30 000).

#[path = "../common/serve.rs"]
mod serve;
#[path = "../common/shutdown.rs"]
mod shutdown;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use serde_json::Value;
use tower::{service_fn, Layer};
use tower_mesh::extract::Payload;
use tower_mesh::Mesh;

use serve::{header_read_timeout, serve};
use shutdown::shutdown_signal;

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

    let listener = serve::bind("127.0.0.1", port).await?;
    tracing::info!("mesh on ws://127.0.0.1:{port}/, health on http://127.0.0.1:{port}/health");

    serve(
        listener,
        service,
        mesh,
        header_read_timeout(),
        shutdown_signal(),
    )
    .await
}
