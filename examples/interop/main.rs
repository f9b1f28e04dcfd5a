//! The server that mirrors mesh's reference test server, for protocol and load testing.
//!
//! Contract: `PORT` (default 8787); `REDIS_URL` selects the Redis backend (key prefix
//! `MESH_PREFIX`, default `mesh:`), otherwise the in-memory backend runs; `GET /health`
//! answers `200 ok` through the inner router; mesh is mounted on `/`; command `echo`
//! replies with its payload; `broadcast-room {room, message}` pushes `room-message` with
//! `message` to every member of `room` and replies `{success: true}`; presence is tracked
//! in every room. Optional `PING_INTERVAL_MS`, `LATENCY_INTERVAL_MS` and
//! `MAX_MISSED_PONGS` tune liveness for protocol tests. Channels and records arrive with a
//! later issue; until then their commands answer `ENOTFOUND`.
//!
//! ```text
//! cargo run --example interop
//! ```

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_mesh::extract::Payload;
use tower_mesh::{CommandError, Mesh, PresenceOptions, Regex};

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

#[derive(Deserialize)]
struct RoomMessage {
    room: String,
    message: Value,
}

async fn broadcast_room(
    mesh: Mesh,
    Payload(request): Payload<RoomMessage>,
) -> Result<Value, CommandError> {
    mesh.broadcast_room(&request.room, "room-message", &request.message)
        .await?;
    Ok(json!({ "success": true }))
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

    let every_room = Regex::new("").expect("the empty regex is valid");
    let mut builder = Mesh::builder()
        .command("echo", echo)
        .command("broadcast-room", broadcast_room)
        .track_presence(every_room, PresenceOptions::new());
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
