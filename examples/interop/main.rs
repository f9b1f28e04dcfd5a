//! The server that mirrors mesh's reference test server, for protocol and load testing.
//!
//! Contract: `PORT` (default 8787); `REDIS_URL` selects the Redis backend (key prefix
//! `MESH_PREFIX`, default `mesh:`), otherwise the in-memory backend runs; `GET /health`
//! answers `200 ok` through the inner router; mesh is mounted on `/`; command `echo`
//! replies with its payload. Optional
//! `PING_INTERVAL_MS`, `LATENCY_INTERVAL_MS` and `MAX_MISSED_PONGS` tune liveness for
//! protocol tests. Rooms, channels, presence and records arrive with later issues; until
//! then their commands answer `ENOTFOUND`.
//!
//! ```text
//! cargo run --example interop
//! ```

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tower_mesh::extract::Payload;
use tower_mesh::Mesh;

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

async fn echo(Payload(payload): Payload<Value>) -> Value {
    payload
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
        .unwrap_or(8787);

    let mut builder = Mesh::builder().command("echo", echo);
    if let Ok(url) = std::env::var("REDIS_URL") {
        let prefix = std::env::var("MESH_PREFIX").unwrap_or_else(|_| "mesh:".into());
        match tower_mesh::RedisBackend::builder(url.as_str())
            .prefix(prefix)
            .build()
        {
            Ok(backend) => builder = builder.redis_backend(backend),
            Err(err) => {
                eprintln!("REDIS_URL: {err}");
                std::process::exit(2);
            }
        }
        tracing::info!("using the Redis backend at {url}");
    }
    if let Some(interval) = env_ms("PING_INTERVAL_MS") {
        builder = builder.ping_interval(interval);
    }
    if let Some(interval) = env_ms("LATENCY_INTERVAL_MS") {
        builder = builder.latency_interval(interval);
    }
    if let Some(missed) = std::env::var("MAX_MISSED_PONGS")
        .ok()
        .and_then(|m| m.parse().ok())
    {
        builder = builder.max_missed_pongs(missed);
    }
    let (mesh_layer, mesh) = builder.build();

    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .layer(mesh_layer);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    tracing::info!("interop server on port {port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            mesh.shutdown().await;
        })
        .await
}
