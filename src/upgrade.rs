//! The WebSocket handshake over hyper's upgrade, keeping the request's parts.

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::FutureExt;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::connection;
use crate::mesh::Mesh;
use crate::read_on_demand::{ReadOnDemand, FRAME_BUFFER_BYTES};

/// `Retry-After` of an upgrade refused for `max_connections`, in seconds: long enough for
/// a few connections to end, short enough that a client does not give up on the instance.
const RETRY_AFTER_SECONDS: u32 = 5;

/// What a request to the mesh path asks for.
pub(crate) enum Upgrade {
    /// No WebSocket upgrade: the inner service answers.
    NotRequested,
    /// An upgrade to WebSocket that cannot be honoured, with the reason.
    Malformed(&'static str),
    /// A valid upgrade; the value is the `Sec-WebSocket-Accept` header to answer with.
    Valid { accept_key: String },
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .map(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
            .unwrap_or(false)
    })
}

pub(crate) fn classify<B>(request: &Request<B>) -> Upgrade {
    let headers = request.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Upgrade::NotRequested;
    }
    if request.method() != Method::GET {
        return Upgrade::Malformed("WebSocket upgrade requires GET");
    }
    if request.version() != http::Version::HTTP_11 {
        return Upgrade::Malformed("WebSocket upgrade requires HTTP/1.1");
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Upgrade::Malformed("missing \"Connection: upgrade\"");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Upgrade::Malformed("\"Sec-WebSocket-Version\" must be 13");
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if !key.is_empty() => Upgrade::Valid {
            accept_key: derive_accept_key(key.as_bytes()),
        },
        _ => Upgrade::Malformed("missing \"Sec-WebSocket-Key\""),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(crate) fn bad_request(reason: &'static str) -> Response<Full<Bytes>> {
    plain(StatusCode::BAD_REQUEST, reason)
}

pub(crate) fn server_error(reason: &'static str) -> Response<Full<Bytes>> {
    plain(StatusCode::INTERNAL_SERVER_ERROR, reason)
}

/// Answers `101` and spawns the connection once hyper hands over the socket.
pub(crate) fn accept<B>(
    mesh: &Mesh,
    mut request: Request<B>,
    accept_key: String,
) -> Response<Full<Bytes>> {
    if mesh.is_shutting_down() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
    }
    let Some(slot) = mesh.take_connection_slot() else {
        tracing::debug!(
            max_connections = mesh.config().max_connections,
            "upgrade refused: too many connections"
        );
        let mut response = plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections, retry later",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        return response;
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return plain(
            StatusCode::UPGRADE_REQUIRED,
            "this server cannot upgrade the connection (is hyper serving with upgrades?)",
        );
    };
    let (mut parts, _body) = request.into_parts();
    detach_from_read_buffer(&mut parts, mesh.config().max_kept_header_bytes);
    // The task below holds what it captures for the connection's whole life: boxed, the
    // parts take a pointer's room there instead of their own (a few hundred bytes), and
    // `serve` frees the box when it moves them into the connection.
    let parts = Box::new(parts);
    let config = websocket_config(mesh);
    let read_size = mesh.config().read_buffer_bytes;
    let mesh = mesh.clone();
    let upgrade = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    ReadOnDemand::new(TokioIo::new(upgraded), read_size),
                    Role::Server,
                    Some(config),
                )
                .await;
                slot.hand_over();
                Some((mesh, socket, parts))
            }
            // The slot is dropped with this future: the place is given back.
            Err(err) => {
                tracing::debug!(%err, "upgrade failed");
                None
            }
        }
    };
    // Chained rather than awaited inside the block: the task then holds either the
    // upgrade or the connection, as an enum of the two. Awaiting the connection in the
    // block would keep room for the upgrade's state (the socket being built) beside it
    // for the connection's whole life.
    let task = upgrade.then(|upgraded| match upgraded {
        Some((mesh, socket, parts)) => Either::Left(connection::serve(mesh, socket, parts)),
        None => Either::Right(std::future::ready(())),
    });
    tokio::spawn(task.in_current_span());
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept_key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Copies the header values and URI out of the buffer hyper read the request into,
/// keeping at most `max_header_bytes` of header names and values: in request order, each
/// header that would not fit left out (see `MeshBuilder::max_kept_header_bytes`).
///
/// hyper parses them without copying, as slices of its (8 to 16 KiB, or as large as the
/// request head) read buffer, so keeping the request's parts for the connection's whole
/// life would keep that buffer too: most of an idle connection's memory. The copies take
/// a few hundred bytes, and never more than the budget.
fn detach_from_read_buffer(parts: &mut http::request::Parts, max_header_bytes: usize) {
    let shared = std::mem::take(&mut parts.headers);
    let mut kept = Vec::with_capacity(shared.len());
    let mut budget = max_header_bytes;
    let mut left_out = 0usize;
    for (name, value) in &shared {
        let size = name.as_str().len() + value.len();
        if size > budget {
            left_out += 1;
            continue;
        }
        budget -= size;
        kept.push((name, value));
    }
    // Every kept value is a slice of one copy: one allocation rather than one per value.
    let mut values =
        bytes::BytesMut::with_capacity(kept.iter().map(|(_, value)| value.len()).sum());
    for (_, value) in &kept {
        values.extend_from_slice(value.as_bytes());
    }
    let mut values = values.freeze();
    let mut headers = HeaderMap::with_capacity(kept.len());
    for (name, value) in kept {
        let copy = values.split_to(value.len());
        let value = match HeaderValue::from_maybe_shared(copy) {
            Ok(mut copied) => {
                copied.set_sensitive(value.is_sensitive());
                copied
            }
            Err(_) => value.clone(),
        };
        headers.append(name.clone(), value);
    }
    if left_out > 0 {
        tracing::debug!(
            left_out,
            max_header_bytes,
            "upgrade request headers over max_kept_header_bytes are not kept"
        );
    }
    parts.headers = headers;
    if let Ok(uri) = parts.uri.to_string().parse() {
        parts.uri = uri;
    }
    if parts.extensions.is_empty() {
        // Its table was allocated for the upgrade handle, taken out since.
        parts.extensions = http::Extensions::new();
    }
}

fn websocket_config(mesh: &Mesh) -> WebSocketConfig {
    let config = mesh.config();
    WebSocketConfig::default()
        // tungstenite keeps this buffer for the connection's whole life; the socket is read
        // `read_buffer_bytes` at a time through `ReadOnDemand`, which holds its buffer only
        // while data arrives.
        .read_buffer_size(FRAME_BUFFER_BYTES.min(config.read_buffer_bytes))
        .write_buffer_size(config.write_buffer_bytes)
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes))
}
