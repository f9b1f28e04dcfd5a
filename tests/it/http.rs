//! HTTP wiring: the mesh layer beside an app's own routes, on axum and on bare hyper;
//! malformed upgrades; HTTP auth in front of the upgrade; the mount path. These are about
//! the HTTP side only, so they run on the default (in-memory) backend.

use std::convert::Infallible;

use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tower::Layer;
use tower_mesh::Mesh;

use crate::common::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(method: &str, path: &str, extra_headers: &[&str]) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for header in extra_headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

#[tokio::test]
async fn health_answers_beside_the_mesh() {
    let server = serve(Backend::memory().builder().command("echo", echo)).await;
    let response = raw_http(
        server.addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((response.status, response.body.as_str()), (200, "ok"));
    // The same server upgrades on its mesh path.
    let mut client = RawClient::connect(&server.url()).await;
    assert_echo_is_next(&mut client, 1).await;
    // And HTTP still works while a WebSocket is open.
    let response = raw_http(
        server.addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((response.status, response.body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn plain_get_on_the_mesh_path_reaches_the_router() {
    let router = Router::new().route("/", get(|| async { "page" }));
    let server = serve_router(Backend::memory().builder().command("echo", echo), router).await;
    let response = raw_http(
        server.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((response.status, response.body.as_str()), (200, "page"));
    let missing = raw_http(
        server.addr,
        "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(missing.status, 404);
    // An upgrade on the same path is mesh's.
    let mut client = RawClient::connect(&server.url()).await;
    assert_echo_is_next(&mut client, 1).await;
    assert_eq!(server.mesh.stats().connections_opened, 1);
}

async fn assert_bad_upgrade(request: &str, reason_mentions: &str) {
    let server = serve(Backend::memory().builder()).await;
    let response = raw_http(server.addr, request).await;
    assert_eq!(response.status, 400, "{response:?}");
    assert!(
        response.body.contains(reason_mentions),
        "the body gives the reason: {response:?}"
    );
    assert_eq!(server.mesh.stats().connections_opened, 0);
    // The server is fine afterwards.
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "mesh/noop", json!({})).await["payload"],
        true
    );
}

#[tokio::test]
async fn wrong_websocket_version_is_400() {
    assert_bad_upgrade(
        &upgrade_request(
            "GET",
            "/",
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 8",
                &format!("Sec-WebSocket-Key: {KEY}"),
            ],
        ),
        "Sec-WebSocket-Version",
    )
    .await;
}

#[tokio::test]
async fn missing_websocket_version_is_400() {
    assert_bad_upgrade(
        &upgrade_request(
            "GET",
            "/",
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                &format!("Sec-WebSocket-Key: {KEY}"),
            ],
        ),
        "Sec-WebSocket-Version",
    )
    .await;
}

#[tokio::test]
async fn missing_websocket_key_is_400() {
    assert_bad_upgrade(
        &upgrade_request(
            "GET",
            "/",
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
            ],
        ),
        "Sec-WebSocket-Key",
    )
    .await;
}

#[tokio::test]
async fn post_with_upgrade_headers_is_400() {
    assert_bad_upgrade(
        &upgrade_request(
            "POST",
            "/",
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Key: {KEY}"),
                "Content-Length: 0",
            ],
        ),
        "GET",
    )
    .await;
}

#[tokio::test]
async fn upgrade_without_connection_upgrade_is_400() {
    assert_bad_upgrade(
        &upgrade_request(
            "GET",
            "/",
            &[
                "Connection: keep-alive",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Key: {KEY}"),
            ],
        ),
        "Connection",
    )
    .await;
}

#[tokio::test]
async fn malformed_upgrade_elsewhere_is_the_routers_business() {
    let server = serve(Backend::memory().builder()).await;
    let response = raw_http(
        server.addr,
        &upgrade_request(
            "GET",
            "/health",
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 8",
            ],
        ),
    )
    .await;
    assert_eq!((response.status, response.body.as_str()), (200, "ok"));
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn require_token(
    Query(query): Query<TokenQuery>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if query.token.as_deref() != Some("secret") {
        return (StatusCode::UNAUTHORIZED, "token required").into_response();
    }
    next.run(request).await
}

/// The same, for `/ws` only: the app's pages stay public.
async fn require_token_on_ws(
    query: Query<TokenQuery>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.uri().path() != "/ws" {
        return next.run(request).await;
    }
    require_token(query, request, next).await
}

#[tokio::test]
async fn auth_layer_refuses_the_upgrade_with_401() {
    let (mesh_layer, mesh) = Backend::memory()
        .builder()
        .command("echo", echo)
        .path("/ws")
        .build();
    let app = Router::new()
        .route("/", get(|| async { "page" }))
        .layer(mesh_layer)
        .layer(axum::middleware::from_fn(require_token_on_ws));
    let server = serve_app(mesh, app).await;
    assert_eq!(refused_upgrade(server.ws_url("/ws")).await, 401);
    let page = raw_http(
        server.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((page.status, page.body.as_str()), (200, "page"));
    assert_eq!(refused_upgrade(server.ws_url("/ws?token=wrong")).await, 401);
    // No WebSocket ever existed for the refused attempts.
    assert_eq!(server.mesh.stats().connections_opened, 0);
    let mut client = RawClient::connect(&server.ws_url("/ws?token=secret")).await;
    assert_echo_is_next(&mut client, 1).await;
    assert_eq!(server.mesh.stats().connections_opened, 1);
}

#[tokio::test]
async fn auth_layer_outside_the_mesh_layer_guards_every_upgrade() {
    // The auth middleware wraps the mesh layer itself, so it sees every upgrade first.
    let (mesh_layer, mesh) = Backend::memory().builder().command("echo", echo).build();
    let app = Router::new()
        .layer(mesh_layer)
        .layer(axum::middleware::from_fn(require_token));
    let server = serve_app(mesh, app).await;
    assert_eq!(refused_upgrade(server.url()).await, 401);
    let mut client = RawClient::connect(&server.ws_url("/?token=secret")).await;
    assert_echo_is_next(&mut client, 1).await;
    assert_eq!(server.mesh.stats().connections_opened, 1);
}

#[tokio::test]
async fn custom_path_mounts_mesh_there_and_leaves_root_to_the_router() {
    let router = Router::new().route("/", get(|| async { "page" }));
    let server = serve_router(
        Backend::memory()
            .builder()
            .command("echo", echo)
            .path("/ws"),
        router,
    )
    .await;
    let mut client = RawClient::connect(&server.ws_url("/ws")).await;
    assert_echo_is_next(&mut client, 1).await;
    let page = raw_http(
        server.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((page.status, page.body.as_str()), (200, "page"));
    // An upgrade on `/` is not mesh's: the router's page answers it, not a 101.
    assert_eq!(refused_upgrade(server.url()).await, 200);
    // A plain GET on /ws is not an upgrade: the router answers (it has no such route).
    let plain = raw_http(
        server.addr,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(plain.status, 404);
    assert_eq!(server.mesh.stats().connections_opened, 1);
}

#[tokio::test]
async fn bare_hyper_server() {
    let (mesh_layer, mesh) = Mesh::builder().command("echo", echo).build();
    let inner = tower::service_fn(|request: http::Request<Incoming>| async move {
        let body = match request.uri().path() {
            "/health" => "ok",
            _ => "inner",
        };
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
            body.as_bytes(),
        ))))
    });
    let service = mesh_layer.layer(inner);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let mut client = RawClient::connect(&format!("ws://{addr}/")).await;
    assert_echo_is_next(&mut client, 1).await;
    let health = raw_http(
        addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    let root = raw_http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((root.status, root.body.as_str()), (200, "inner"));
    let bad = raw_http(
        addr,
        &upgrade_request(
            "GET",
            "/",
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 8",
                &format!("Sec-WebSocket-Key: {KEY}"),
            ],
        ),
    )
    .await;
    assert_eq!(bad.status, 400);
    mesh.send(&client.id, "over-hyper", &json!(1))
        .await
        .expect("send");
    assert_eq!(
        client.next().await,
        json!({"command": "over-hyper", "payload": 1})
    );
    accept.abort();
}

#[tokio::test]
async fn browser_style_handshake_headers_are_accepted() {
    // Firefox sends `Connection: keep-alive, Upgrade`; header values are case-insensitive.
    let server = serve(Backend::memory().builder()).await;
    let response = raw_http(
        server.addr,
        &upgrade_request(
            "GET",
            "/",
            &[
                "Connection: keep-alive, Upgrade",
                "Upgrade: WebSocket",
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Key: {KEY}"),
            ],
        ),
    )
    .await;
    assert_eq!(response.status, 101, "{response:?}");
    // RFC 6455's sample key and its accept value.
    assert!(
        response
            .head
            .to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{response:?}"
    );
}
