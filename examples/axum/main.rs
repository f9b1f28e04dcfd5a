//! A small chat app: tower-mesh mounted on an axum `Router`, behind an HTTP auth layer.
//!
//! What it shows:
//! - mesh served as a tower `Layer` on `/ws`, next to ordinary routes (`/` serves a chat
//!   page, `/favicon.ico` its icon, `GET /health` answers `ok`, or `503` with the reason
//!   while Redis is unreachable: `Mesh::health`);
//! - HTTP auth reused for WebSockets: an `axum::middleware::from_fn` layer in front of the
//!   mesh layer requires `?token=...` on `/ws` and answers `401` before any upgrade; a good
//!   token puts a `User` in the request extensions, which every command then reads with the
//!   `Extension<User>` extractor;
//! - a `lobby` room with presence: the page joins it, watches who comes and goes
//!   (`mesh/presence-update`), and reads newcomers' names from their connection metadata
//!   (members of a room may read each other's);
//! - commands `say {text}` (pushed to the lobby as `chat`) and `whoami`;
//! - an `on_connect` hook that stores `{"name": user}` as the connection's metadata;
//! - tower layers as command middleware (`TimeoutLayer` around every command);
//! - serving hardened for the open internet (`examples/common/serve.rs`, shared with the
//!   other examples): hyper with a time limit on request heads, so slowloris and idle sockets
//!   are dropped, `TCP_NODELAY`, and an accept loop that backs off when the process runs out
//!   of file descriptors;
//! - graceful shutdown on Ctrl-C or SIGTERM: stop accepting, mesh closes every WebSocket with
//!   a going-away frame, HTTP requests in flight finish.
//!
//! The page speaks the mesh wire protocol with the browser's own `WebSocket`, no library.
//! It keeps an "online" list from presence (a snapshot when it subscribes, then every join
//! and leave), remembers names by connection id (a leave carries only the id), and tells a
//! rejected token from an unavailable server: a browser cannot see the `401` that refused
//! its upgrade, so after a failed connection the page asks `GET /ws?token=...` without the
//! upgrade headers (the auth layer answers `401` to a bad token; with a good one the request
//! passes through mesh, being no upgrade, and the router answers `404`) and `GET /health`.
//! A `1001` close (the server shutting down) and a `1013` (Redis unreachable) are shown as
//! such; the page then reconnects with a growing delay.
//!
//! ```text
//! cargo run --example axum
//! # then open http://127.0.0.1:3000/?token=alice-token
//! # and, in another window, http://127.0.0.1:3000/?token=bob-token
//! ```
//!
//! `PORT` sets the port (default 3000); `RUST_LOG` the log filter (default `info`);
//! `REDIS_URL` switches to the Redis backend, so several instances serve one chat;
//! `HEADER_READ_TIMEOUT_MS` the time a client has to send a request head (default 30 000);
//! `METRICS=off` turns off `GET /metrics` (the `mesh_*` metrics in Prometheus text).

#[path = "../common/health.rs"]
mod health;
#[path = "../common/metrics.rs"]
mod metrics;
#[path = "../common/serve.rs"]
mod serve;
#[path = "../common/shutdown.rs"]
mod shutdown;

use std::time::Duration;

use axum::extract::{Query, Request};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tower::timeout::TimeoutLayer;
use tower_mesh::extract::{Extension, Payload};
use tower_mesh::{CommandError, Connection, MergeStrategy, Mesh, PresenceOptions};

use serve::{header_read_timeout, serve};
use shutdown::shutdown_signal;

/// The chat page: plain HTML and JavaScript, no external scripts.
const INDEX_HTML: &str = include_str!("index.html");

/// The page's icon, an SVG (browsers accept one at `/favicon.ico` given its content type).
const FAVICON_SVG: &str = include_str!("favicon.svg");

/// The room everyone chats in.
const LOBBY: &str = "lobby";

/// Longest chat message, in characters.
const MAX_TEXT_CHARS: usize = 500;

/// The demo's users, by token. A real app would look the token up in a session store.
const TOKENS: &[(&str, &str)] = &[("alice-token", "alice"), ("bob-token", "bob")];

/// Who is connected: put in the upgrade request's extensions by [`auth`].
#[derive(Clone, Debug)]
struct User {
    name: String,
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// HTTP auth for the WebSocket endpoint: runs before the mesh layer, so a request without
/// a valid token never becomes a WebSocket.
async fn auth(mut request: Request, next: Next) -> Response {
    if request.uri().path() != "/ws" {
        return next.run(request).await;
    }
    let token = Query::<TokenQuery>::try_from_uri(request.uri())
        .ok()
        .and_then(|Query(query)| query.token);
    let user = token.and_then(|token| {
        TOKENS
            .iter()
            .find(|(known, _)| *known == token)
            .map(|(_, name)| User {
                name: (*name).to_owned(),
            })
    });
    match user {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => (StatusCode::UNAUTHORIZED, "missing or invalid token\n").into_response(),
    }
}

#[derive(Deserialize)]
struct Say {
    text: String,
}

/// `say {text}`: pushes `{"command":"chat","payload":{"from","text"}}` to the lobby.
async fn say(
    mesh: Mesh,
    Extension(user): Extension<User>,
    Payload(say): Payload<Say>,
) -> Result<Value, CommandError> {
    if say.text.trim().is_empty() {
        return Err(CommandError::invalid("text must not be empty"));
    }
    if say.text.chars().count() > MAX_TEXT_CHARS {
        return Err(CommandError::invalid(format!(
            "text must be at most {MAX_TEXT_CHARS} characters"
        )));
    }
    mesh.room(LOBBY)
        .broadcast("chat", &json!({ "from": user.name, "text": say.text }))
        .await?;
    Ok(json!({ "success": true }))
}

/// `whoami`: the user the auth layer found for this connection.
async fn whoami(Extension(user): Extension<User>) -> Value {
    json!({ "name": user.name })
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
        .unwrap_or(3000);

    let prometheus = metrics::install();
    // In-memory by default; with REDIS_URL set, every instance on that Redis is one mesh.
    let mut builder = Mesh::builder();
    if let Ok(url) = std::env::var("REDIS_URL") {
        builder = builder.redis(&url).map_err(std::io::Error::other)?;
        tracing::info!("using the Redis backend at {url}");
    }
    let (mesh_layer, mesh) = builder
        .path("/ws")
        .command("say", say)
        .command("whoami", whoami)
        .track_presence(LOBBY, PresenceOptions::new())
        // Any tower layer works as command middleware; this one wraps every command,
        // the built-in `mesh/*` ones included, and answers `ETIMEOUT` after 5 s.
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .on_connect(|connection: Connection| async move {
            let user = connection
                .extensions()
                .get::<User>()
                .cloned()
                .ok_or_else(|| CommandError::forbidden("no user on the upgrade request"))?;
            connection
                .set_metadata(json!({ "name": user.name }), MergeStrategy::Replace)
                .await?;
            tracing::info!(user = %user.name, "joined");
            Ok(())
        })
        .on_disconnect(|connection: Connection| async move {
            if let Some(user) = connection.extensions().get::<User>() {
                tracing::info!(user = %user.name, "left");
            }
        })
        .build();

    let app = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/favicon.ico",
            get(|| async { ([(header::CONTENT_TYPE, "image/svg+xml")], FAVICON_SVG) }),
        )
        .route("/health", get(health::health))
        .route("/metrics", get(move || metrics::render(prometheus.clone())))
        // Layers added later run first: `auth` sees every request before the mesh layer.
        .layer(mesh_layer)
        .layer(middleware::from_fn(auth));

    let listener = serve::bind("127.0.0.1", port).await?;
    tracing::info!("chat on http://127.0.0.1:{port}/?token=alice-token (or bob-token)");
    serve(
        listener,
        app,
        mesh,
        header_read_timeout(),
        shutdown_signal(),
    )
    .await
}
