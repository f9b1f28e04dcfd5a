//! Shared test harness: servers on real sockets, raw WebSocket clients, backends.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower_mesh::{MemoryBackend, Mesh, MeshBuilder};

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(5);

/// A mesh served by axum on 127.0.0.1 with a free port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub mesh: Mesh,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// `ws://` URL of the mesh endpoint at `path`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn url(&self) -> String {
        self.ws_url("/")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `builder` at `/` beside `GET /health`, on a free port.
pub async fn serve(builder: MeshBuilder) -> TestServer {
    serve_router(builder, Router::new()).await
}

/// Serves `builder` layered on `router` (which gets `GET /health` added).
pub async fn serve_router(builder: MeshBuilder, router: Router) -> TestServer {
    serve_wrapped(builder, |mesh_layer| {
        router
            .route("/health", get(|| async { "ok" }))
            .layer(mesh_layer)
    })
    .await
}

/// Serves the app `make_app` builds around the mesh layer (so HTTP layers can go outside it).
pub async fn serve_wrapped(
    builder: MeshBuilder,
    make_app: impl FnOnce(tower_mesh::MeshLayer) -> Router,
) -> TestServer {
    let (layer, mesh) = builder.build();
    serve_app(mesh, make_app(layer)).await
}

/// Which backend a conformance test runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    Memory(MemoryBackend),
    /// The Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`), under a key prefix of
    /// this test's own so that parallel tests never collide.
    Redis {
        url: String,
        prefix: String,
    },
}

impl Backend {
    pub fn memory() -> Self {
        Backend::Memory(MemoryBackend::new())
    }

    pub fn redis() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Backend::Redis {
            url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            prefix: format!("mesh-test:{}:{nanos:x}:{n}:", std::process::id()),
        }
    }

    /// A builder on this backend; builders from one `Backend` value form one mesh (each
    /// is a separate instance).
    pub fn builder(&self) -> MeshBuilder {
        match self {
            Backend::Memory(backend) => Mesh::builder().memory_backend(backend.clone()),
            Backend::Redis { url, prefix } => Mesh::builder().redis_backend(
                tower_mesh::RedisBackend::builder(url.as_str())
                    .prefix(prefix.as_str())
                    .build()
                    .expect("Redis backend"),
            ),
        }
    }
}

/// Instantiates `async fn name(backend: Backend)` tests once per backend:
/// `conformance!(a, b);` makes `memory::a`, `redis::a`, `memory::b`, `redis::b`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::memory()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::redis()).await
                }
            )*
        }
    };
}

pub(crate) use conformance;

/// A WebSocket client that speaks raw frames, for protocol-level assertions.
pub struct RawClient {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub id: String,
}

impl RawClient {
    /// Connects and waits for `mesh/assign-id`.
    pub async fn connect(url: &str) -> RawClient {
        Self::connect_request(url).await
    }

    /// Connects with a request of your own (headers, query) and waits for `mesh/assign-id`.
    pub async fn connect_request(
        request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
    ) -> RawClient {
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connect");
        let first = next_json(&mut socket).await;
        assert_eq!(first["command"], "mesh/assign-id", "first frame: {first}");
        let id = first["payload"]
            .as_str()
            .expect("id is a string")
            .to_owned();
        RawClient { socket, id }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket
            .send(Message::binary(bytes))
            .await
            .expect("send");
    }

    /// The next text frame exactly as the server wrote it.
    pub async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("socket ended")
                .expect("socket error");
            if let Message::Text(text) = message {
                return text.to_string();
            }
        }
    }

    /// Closes from the client side (code 1000) and waits for the server's answer.
    pub async fn close(&mut self) {
        let _ = self.socket.close(None).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.socket.next()).await {}
    }

    pub async fn send_json(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a command and waits for the reply with that id, skipping pushes.
    pub async fn command(&mut self, id: u64, command: &str, payload: Value) -> Value {
        self.send_json(json!({"id": id, "command": command, "payload": payload}))
            .await;
        self.reply(id).await
    }

    /// The next `n` replies, by id (replies may arrive in any order; pushes are skipped).
    pub async fn replies(&mut self, n: usize) -> std::collections::HashMap<u64, Value> {
        let mut replies = std::collections::HashMap::new();
        while replies.len() < n {
            let frame = self.next().await;
            if let Some(id) = frame["id"].as_u64() {
                replies.insert(id, frame);
            }
        }
        replies
    }

    /// The next frame whose id is `id` (pushes and other replies are skipped).
    pub async fn reply(&mut self, id: u64) -> Value {
        loop {
            let frame = self.next().await;
            if frame["id"] == json!(id) {
                return frame;
            }
        }
    }

    /// The next frame, whatever it is; pings are answered so the connection stays up.
    pub async fn next(&mut self) -> Value {
        next_json(&mut self.socket).await
    }

    /// The next push named `command`, skipping everything else.
    pub async fn push(&mut self, command: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame.get("id").is_none() && frame["command"] == command {
                return frame;
            }
        }
    }

    /// Waits for the close frame and returns (code, reason).
    pub async fn closed(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("timed out waiting for close");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frame.code.into(), frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(err)) => panic!("socket error before close frame: {err}"),
                None => panic!("socket ended without close frame"),
            }
        }
    }
}

/// Reads the next text frame as JSON, within [`WAIT`].
pub async fn next_json(socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match message {
            Message::Text(text) => {
                return serde_json::from_str(&text).expect("server sent invalid JSON")
            }
            Message::Close(frame) => panic!("closed while waiting for a frame: {frame:?}"),
            _ => continue,
        }
    }
}

/// The first frame on a raw socket must be a close frame: returns (code, reason).
pub async fn first_close(socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> (u16, String) {
    let message = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("timed out waiting for close")
        .expect("socket ended")
        .expect("socket error");
    match message {
        Message::Close(Some(frame)) => (frame.code.into(), frame.reason.to_string()),
        other => panic!("expected a close frame first, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for the themed suites (protocol, bad_input, middleware, http, lifecycle,
// registry, limits).

/// Serves a fully assembled axum app (for example one with HTTP middleware *outside* the
/// mesh layer) on a free port. `mesh` is the handle from the same `build()`.
pub async fn serve_app(mesh: Mesh, app: Router) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    TestServer { addr, mesh, task }
}

/// `echo`: replies with its payload. Most suites register it under the name `echo`.
pub async fn echo(
    tower_mesh::extract::Payload(payload): tower_mesh::extract::Payload<Value>,
) -> Value {
    payload
}

/// Sends `echo` with id `id` and asserts that the very next frame is exactly its reply:
/// nothing else (no reply to an earlier frame, no push) came first.
pub async fn assert_echo_is_next(client: &mut RawClient, id: u64) {
    let payload = json!({ "probe": id });
    client
        .send_json(json!({"id": id, "command": "echo", "payload": payload}))
        .await;
    assert_eq!(
        client.next().await,
        json!({"id": id, "command": "echo", "payload": payload}),
        "the next frame after the probe must be the probe's own reply"
    );
}

/// The next message from a hook channel, within [`WAIT`].
pub async fn recv_within<T>(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, receiver.recv())
        .await
        .expect("timed out waiting for a hook")
        .expect("hook channel closed")
}

/// Asserts that nothing more arrives on a hook channel during a short window.
pub async fn assert_no_more<T: std::fmt::Debug>(
    receiver: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
) {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(200), receiver.recv()).await
    {
        panic!("unexpected extra hook call: {extra:?}");
    }
}

/// The HTTP status an upgrade attempt got when the server refused it (anything but 101).
pub async fn refused_upgrade(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> u16 {
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => panic!("upgrade accepted: {response:?}"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("upgrade failed without an HTTP answer: {other}"),
    }
}

/// A ws:// request with extra headers.
pub fn ws_request(url: &str, headers: &[(&'static str, &str)]) -> http::Request<()> {
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    request
}

/// A raw HTTP/1.1 answer: status code, header block, body.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Writes `request` verbatim on a new TCP connection and reads one response (the body by
/// its `content-length`, or until the server closes).
pub async fn raw_http(addr: SocketAddr, request: &str) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let length = head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                });
                if let Some(length) = length {
                    if buf.len() >= end + 4 + length {
                        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                        return parse_head(head, body.to_string());
                    }
                } else if head.starts_with("HTTP/1.1 101") {
                    // Switching protocols: no body; the socket now speaks WebSocket.
                    return parse_head(head, String::new());
                }
            }
            let n = stream.read(&mut chunk).await.expect("read response");
            if n == 0 {
                let end = buf
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("a complete response head");
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let body = String::from_utf8_lossy(&buf[end + 4..]).to_string();
                return parse_head(head, body);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("timed out waiting for an HTTP response")
}

fn parse_head(head: String, body: String) -> RawResponse {
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    RawResponse { status, head, body }
}

// ---------------------------------------------------------------------------------------
// Shared by the rooms, presence, channels, records and collections suites.

/// A mesh instance on a runtime of its own, killed at once with `shutdown_background`:
/// every task is dropped without cleanup, as when its process is SIGKILLed. No `Mesh`
/// handle of it outlives the runtime.
pub struct DoomedInstance {
    runtime: Option<tokio::runtime::Runtime>,
    pub url: String,
}

impl DoomedInstance {
    pub async fn start(builder: MeshBuilder) -> DoomedInstance {
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let url = runtime.block_on(async {
                let (layer, _mesh) = builder.build();
                let app = Router::new().layer(layer);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
                format!("ws://{addr}/")
            });
            DoomedInstance {
                runtime: Some(runtime),
                url,
            }
        })
        .await
        .expect("doomed instance")
    }

    pub async fn kill(mut self) {
        let runtime = self.runtime.take();
        tokio::task::spawn_blocking(move || {
            if let Some(runtime) = runtime {
                runtime.shutdown_background();
            }
        })
        .await
        .expect("kill");
    }
}

/// Every wait has an overall deadline of [`WAIT`]. `RawClient`'s own timeout is per
/// frame, and the latency probe every 5 s would keep it from ever firing, so a missing
/// event would stall a test until the ping timeout instead of failing it.
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ---------------------------------------------------------------------------------------
// Record streams under continuous writes (records and collections suites).

/// Writes `{"n": k}` to a record without pause (k = 1, 2, ...; so version k holds
/// `{"n": k}`), on `mesh`, until dropped.
pub struct ContinuousWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<u64>>,
}

impl ContinuousWriter {
    /// Starts once the first write (version 1) is stored.
    pub async fn start(mesh: &Mesh, record_id: &str) -> ContinuousWriter {
        mesh.write_record(record_id, json!({ "n": 1 }), Default::default())
            .await
            .expect("write_record");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mesh, record_id, stopped) = (mesh.clone(), record_id.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 1;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                mesh.write_record(&record_id, json!({ "n": n }), Default::default())
                    .await
                    .expect("write_record");
                tokio::task::yield_now().await;
            }
            n
        });
        ContinuousWriter {
            stop,
            task: Some(task),
        }
    }

    /// Stops writing; returns how many writes were made.
    pub async fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let task = self.task.take().expect("running");
        within("the writer to stop", task).await.expect("writer")
    }
}

impl Drop for ContinuousWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Follows the `mesh/record-update` pushes of `record_id` on `client` until `deadline` or
/// until the reply `until_reply` arrives (whichever the caller asks for), asserting that
/// each one is exactly the next version after `version` and holds `{"n": version}`
/// (patches are applied to `document`). Returns how many updates arrived and the reply,
/// if one was awaited.
pub async fn follow_consecutive_updates(
    client: &mut RawClient,
    record_id: &str,
    document: &mut Value,
    version: &mut u64,
    deadline: Option<tokio::time::Instant>,
    until_reply: Option<u64>,
) -> (usize, Option<Value>) {
    let mut updates = 0;
    loop {
        let frame = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, client.next()).await {
                Ok(frame) => frame,
                Err(_) => return (updates, None),
            },
            None => within("a reply", client.next()).await,
        };
        if until_reply.is_some() && frame["id"].as_u64() == until_reply {
            return (updates, Some(frame));
        }
        if frame.get("id").is_some() || frame["command"] != "mesh/record-update" {
            continue;
        }
        let update = &frame["payload"];
        if update["recordId"] != record_id {
            continue;
        }
        let got = update["version"].as_u64().expect("a version");
        assert_eq!(
            got,
            *version + 1,
            "after version {version}, the next update must be version {}: {update}",
            *version + 1
        );
        if let Some(patch) = update.get("patch") {
            let patch: json_patch::Patch =
                serde_json::from_value(patch.clone()).expect("a JSON patch");
            json_patch::patch(document, &patch).expect("the patch applies");
        } else {
            *document = update["full"].clone();
        }
        assert_eq!(*document, json!({ "n": got }), "the value at version {got}");
        *version = got;
        updates += 1;
    }
}

// ---------------------------------------------------------------------------------------
// Byte limits (records, channels, presence, rooms, registry and collections suites).

/// A JSON object `{key: "xx…x"}` whose text is exactly `bytes` long.
pub fn object_of_size(key: &str, bytes: usize) -> Value {
    let overhead = json!({ key: "" }).to_string().len();
    let value = json!({ key: "x".repeat(bytes - overhead) });
    assert_eq!(value.to_string().len(), bytes);
    value
}

/// Asserts that a reply's `payload` refuses a write over a byte limit: `EINVALID`, with a
/// message naming the builder `setting` that sets the limit.
pub fn assert_over_byte_limit(payload: &Value, setting: &str) {
    assert_eq!(payload["code"], "EINVALID", "{payload}");
    assert_eq!(payload["name"], "CommandError", "{payload}");
    let message = payload["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {payload}"));
    assert!(
        message.contains(setting),
        "the message must name {setting}: {payload}"
    );
}

/// Asserts that `result` is [`tower_mesh::MeshError::TooLarge`] for `setting`, with
/// `limit` and the refused value's `size`, and that its message names the setting.
pub fn assert_too_large<T: std::fmt::Debug>(
    result: Result<T, tower_mesh::MeshError>,
    setting: &str,
    limit: usize,
    size: usize,
) {
    match result {
        Err(
            err @ tower_mesh::MeshError::TooLarge {
                setting: refused_by,
                limit: refused_over,
                size: refused_size,
                ..
            },
        ) => {
            assert_eq!(
                (refused_by, refused_over, refused_size),
                (setting, limit, size),
                "{err}"
            );
            assert!(err.to_string().contains(setting), "{err}");
        }
        other => panic!("expected TooLarge ({setting}), got {other:?}"),
    }
}
