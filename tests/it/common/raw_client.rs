//! Raw WebSocket clients, for assertions on the frames themselves, and raw HTTP.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::WAIT;

/// A WebSocket client that speaks raw frames, for protocol-level assertions.
pub(crate) struct RawClient {
    pub(crate) socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub(crate) id: String,
}

impl RawClient {
    /// Connects and waits for `mesh/assign-id`.
    pub(crate) async fn connect(url: &str) -> RawClient {
        Self::connect_request(url).await
    }

    /// Connects with a request of your own (headers, query) and waits for `mesh/assign-id`.
    pub(crate) async fn connect_request(
        request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
    ) -> RawClient {
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connect");
        Self::assigned(socket).await
    }

    /// Waits for `mesh/assign-id` on a socket that has just been upgraded.
    pub(crate) async fn assigned(
        mut socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    ) -> RawClient {
        let first = next_json(&mut socket).await;
        assert_eq!(first["command"], "mesh/assign-id", "first frame: {first}");
        let id = first["payload"]
            .as_str()
            .expect("id is a string")
            .to_owned();
        RawClient { socket, id }
    }

    pub(crate) async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("send");
    }

    pub(crate) async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket
            .send(Message::binary(bytes))
            .await
            .expect("send");
    }

    /// The next text frame exactly as the server wrote it.
    pub(crate) async fn next_text(&mut self) -> String {
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
    pub(crate) async fn close(&mut self) {
        let _ = self.socket.close(None).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.socket.next()).await {}
    }

    pub(crate) async fn send_json(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a command and waits for the reply with that id, skipping pushes.
    pub(crate) async fn command(&mut self, id: u64, command: &str, payload: Value) -> Value {
        self.send_json(json!({"id": id, "command": command, "payload": payload}))
            .await;
        self.reply(id).await
    }

    /// The next `n` replies, by id (replies may arrive in any order; pushes are skipped).
    pub(crate) async fn replies(&mut self, n: usize) -> std::collections::HashMap<u64, Value> {
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
    pub(crate) async fn reply(&mut self, id: u64) -> Value {
        loop {
            let frame = self.next().await;
            if frame["id"] == json!(id) {
                return frame;
            }
        }
    }

    /// The reply with this id exactly as the server wrote it (pushes and other replies
    /// are skipped).
    pub(crate) async fn reply_text(&mut self, id: u64) -> String {
        loop {
            let text = self.next_text().await;
            let frame: Value = serde_json::from_str(&text).expect("JSON");
            if frame["id"] == json!(id) {
                return text;
            }
        }
    }

    /// The next frame, whatever it is; pings are answered so the connection stays up.
    pub(crate) async fn next(&mut self) -> Value {
        next_json(&mut self.socket).await
    }

    /// The next push named `command`, skipping everything else.
    pub(crate) async fn push(&mut self, command: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame.get("id").is_none() && frame["command"] == command {
                return frame;
            }
        }
    }

    /// Waits for the close frame and returns (code, reason).
    pub(crate) async fn closed(&mut self) -> (u16, String) {
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
pub(crate) async fn next_json(socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Value {
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
pub(crate) async fn first_close(
    socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
) -> (u16, String) {
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

/// Sends `echo` with id `id` and asserts that the very next frame is exactly its reply:
/// nothing else (no reply to an earlier frame, no push) came first.
pub(crate) async fn assert_echo_is_next(client: &mut RawClient, id: u64) {
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

/// The HTTP status an upgrade attempt got when the server refused it (anything but 101).
pub(crate) async fn refused_upgrade(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> u16 {
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => panic!("upgrade accepted: {response:?}"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("upgrade failed without an HTTP answer: {other}"),
    }
}

/// A ws:// request with extra headers.
pub(crate) fn ws_request(url: &str, headers: &[(&'static str, &str)]) -> http::Request<()> {
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
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

/// Writes `request` verbatim on a new TCP connection and reads one response (the body by
/// its `content-length`, or until the server closes).
pub(crate) async fn raw_http(addr: SocketAddr, request: &str) -> RawResponse {
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
