//! The server that mirrors mesh's reference test server, for protocol and load testing.
//!
//! Contract: `PORT` (default 8787); `REDIS_URL` selects the Redis backend (key prefix
//! `MESH_PREFIX`, default `mesh:`), and `REDIS_CLUSTER_URLS` (comma-separated seed URLs
//! of a Redis Cluster) the Redis backend on a Cluster; otherwise the in-memory backend
//! runs; `GET /health`
//! answers `200 ok` through the inner router, or `503` with the reason while the backend
//! is unreachable or has lost this instance (`Mesh::health`); mesh is mounted on `/`; command `echo`
//! replies with its payload; `broadcast-room {room, message}` pushes `room-message` with
//! `message` to every member of `room` and replies `{success: true}`; presence is tracked
//! in every room. Every channel (but the reserved `mesh:` ones), every record (writable by
//! clients) and every collection (a collection `C` holds the records whose id starts with
//! `C:`) is exposed, and the server writes them on request:
//! `write-channel {channel, message, history?}` (history default 50),
//! `write-record {recordId, value, strategy?}` and `delete-record {recordId}`, each
//! replying `{success: true}`. Optional `PING_INTERVAL_MS`, `LATENCY_INTERVAL_MS` and
//! `MAX_MISSED_PONGS` tune liveness for protocol tests. Ctrl-C or SIGTERM shuts it down
//! gracefully (every WebSocket gets 1001). It serves through `examples/common/serve.rs`: a
//! socket that has not sent a complete request head within `HEADER_READ_TIMEOUT_MS`
//! (default 30 000) is closed, and accept errors back off.
//!
//! `GET /metrics` answers the `mesh_*` metrics in Prometheus text
//! (`metrics-exporter-prometheus`); `METRICS=off` installs no recorder (and `/metrics`
//! answers 404), to measure what metrics cost.
//!
//! On Redis, channels whose names start with `ext:` are plain Redis channels, published on
//! their own name with the bare message text, so that another process can
//! `PUBLISH ext:news '{...}'` to their subscribers and read or `LPUSH` their history list
//! `{MESH_PREFIX}history:{ext:news}` (braces literal; newest first); every other channel
//! stays internal to the mesh, so both kinds can be tested side by side. On the in-memory backend `ext:`
//! channels are ordinary channels (nothing outside can publish). `MESH_PREFIX` must not be
//! empty then.
//!
//! A `rediss://` `REDIS_URL` connects over TLS (build with `--features redis-tls-rustls`);
//! `REDIS_CA_FILE` names a PEM file of the CA certificates to trust instead of the system's
//! (a private CA), and `REDIS_CLIENT_CERT_FILE` with `REDIS_CLIENT_KEY_FILE` a client
//! certificate chain and its key, for a Redis that verifies its clients.
//!
//! ```text
//! cargo run --example interop
//! REDIS_CLUSTER_URLS=redis://10.0.0.1:7000,redis://10.0.0.2:7000 cargo run --example interop
//! REDIS_URL=rediss://redis.internal:6380 REDIS_CA_FILE=ca.pem \
//!     cargo run --example interop --features redis-tls-rustls
//! ```

#[path = "../common/health.rs"]
mod health;
#[path = "../common/metrics.rs"]
mod metrics;
#[path = "../common/serve.rs"]
mod serve;
#[path = "../common/shutdown.rs"]
mod shutdown;

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_mesh::extract::Payload;
use tower_mesh::{Access, Collection, CommandError, MergeStrategy, Mesh, PresenceOptions, Regex};

use serve::{header_read_timeout, serve};
use shutdown::shutdown_signal;

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
    mesh.room(&request.room)
        .broadcast("room-message", &request.message)
        .await?;
    Ok(json!({ "success": true }))
}

#[derive(Deserialize)]
struct ChannelWrite {
    channel: String,
    message: Value,
    #[serde(default = "default_history")]
    history: usize,
}

fn default_history() -> usize {
    50
}

async fn write_channel(
    mesh: Mesh,
    Payload(write): Payload<ChannelWrite>,
) -> Result<Value, CommandError> {
    mesh.write_channel(&write.channel, &write.message, write.history)
        .await?;
    Ok(json!({ "success": true }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordWrite {
    record_id: String,
    value: Value,
    #[serde(default)]
    strategy: MergeStrategy,
}

async fn write_record(
    mesh: Mesh,
    Payload(write): Payload<RecordWrite>,
) -> Result<Value, CommandError> {
    mesh.write_record(&write.record_id, write.value, write.strategy)
        .await?;
    Ok(json!({ "success": true }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordDelete {
    record_id: String,
}

async fn delete_record(
    mesh: Mesh,
    Payload(delete): Payload<RecordDelete>,
) -> Result<Value, CommandError> {
    mesh.delete_record(&delete.record_id).await?;
    Ok(json!({ "success": true }))
}

/// The collection named `C` holds every record whose id starts with `C:`. It says so
/// (`holding_for`), so a write to any other record re-resolves nothing; only creations
/// and deletions change it (`membership_by_existence`), so updates of its members are
/// record updates alone; and its members depend on the collection id alone
/// (`resolved_by_id`), so one resolution per change serves every subscriber. The listing
/// reads only the `C:` range of the record index.
fn records_under_collection_id() -> Collection {
    Collection::resolved_by_id(|mesh, collection_id| async move {
        let prefix = format!("{collection_id}:");
        let ids = mesh
            .record_ids_matching(Regex::new(&format!("^{}", regex::escape(&prefix)))?)
            .await?;
        Ok(ids)
    })
    .holding_for(|collection_id, record_id| {
        record_id
            .strip_prefix(collection_id)
            .is_some_and(|rest| rest.starts_with(':'))
    })
    .membership_by_existence()
}

/// Which Redis the environment names: `REDIS_CLUSTER_URLS` (a Cluster's seeds), else
/// `REDIS_URL`; `None` for neither.
fn redis_target() -> Option<(&'static str, tower_mesh::RedisBackendBuilder)> {
    if let Ok(seeds) = std::env::var("REDIS_CLUSTER_URLS") {
        let seeds = seeds
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .map(str::to_owned);
        return Some((
            "REDIS_CLUSTER_URLS",
            tower_mesh::RedisBackend::cluster(seeds),
        ));
    }
    let url = std::env::var("REDIS_URL").ok()?;
    Some(("REDIS_URL", tower_mesh::RedisBackend::builder(url)))
}

/// The Redis backend `backend` configures, with the key prefix and TLS files the
/// environment names; `variable` names where its address came from.
fn redis_backend(
    variable: &str,
    backend: tower_mesh::RedisBackendBuilder,
) -> Result<tower_mesh::RedisBackend, String> {
    let prefix = std::env::var("MESH_PREFIX").unwrap_or_else(|_| "mesh:".into());
    let mut backend = backend
        .prefix(prefix)
        .plain_channels(Regex::new("^ext:").map_err(|err| err.to_string())?);
    let read = |name: &str| match std::env::var_os(name) {
        None => Ok(None),
        Some(path) => std::fs::read(&path)
            .map(Some)
            .map_err(|err| format!("{name} ({}): {err}", path.to_string_lossy())),
    };
    if let Some(pem) = read("REDIS_CA_FILE")? {
        backend = backend.tls_root_certificates(pem);
    }
    match (
        read("REDIS_CLIENT_CERT_FILE")?,
        read("REDIS_CLIENT_KEY_FILE")?,
    ) {
        (Some(chain), Some(key)) => backend = backend.tls_client_certificate(chain, key),
        (None, None) => {}
        _ => return Err("REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE go together".into()),
    }
    backend.build().map_err(|err| format!("{variable}: {err}"))
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

    // Before the mesh serves anyone: it registers its metrics' handles at first use.
    let prometheus = metrics::install();
    let every = || Regex::new("").expect("the empty regex is valid");
    let mut builder = Mesh::builder()
        .command("echo", echo)
        .command("broadcast-room", broadcast_room)
        .command("write-channel", write_channel)
        .command("write-record", write_record)
        .command("delete-record", delete_record)
        .track_presence(every(), PresenceOptions::new())
        .expose_channel(every(), Access::open())
        .expose_writable_record(every(), Access::open())
        .expose_collection(every(), records_under_collection_id());
    if let Some((variable, backend)) = redis_target() {
        match redis_backend(variable, backend) {
            Ok(backend) => builder = builder.redis_backend(backend),
            Err(err) => {
                eprintln!("{err}");
                std::process::exit(2);
            }
        }
        tracing::info!("using the Redis backend at {variable}");
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
        .route("/health", get(health::health))
        .route("/metrics", get(move || metrics::render(prometheus.clone())))
        .layer(mesh_layer);
    let listener = serve::bind("0.0.0.0", port).await?;
    tracing::info!("interop server on port {port}");
    serve(
        listener,
        app,
        mesh,
        header_read_timeout(),
        shutdown_signal(),
    )
    .await
}
