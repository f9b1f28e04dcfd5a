//! The physical limit for this stack: a bare tokio + tokio-tungstenite WebSocket server that
//! sends every text (or binary) frame straight back, unchanged. It is the baseline the mesh
//! benchmarks are measured against, so it is written to be as fast as the stack allows: a
//! multi-thread runtime, one task per connection, Nagle disabled, and replies written in
//! batches (each reply is `feed`ed and the socket is flushed only when no further frame is
//! immediately ready, so pipelined requests cost one write).
//!
//! It does not speak mesh (no `mesh/assign-id`, no pings): drive it with
//! `bench rpc --raw`, which matches the echoed frames by their `id`.
//!
//! Contract: `PORT` (default 8788); `GET /health` answers `200 OK` (handled by hand, before
//! the WebSocket handshake); any other request is upgraded to a WebSocket on any path.
//!
//! ```text
//! cargo run --release -p tower-mesh-bench --bin raw_echo
//! PORT=18788 cargo run --release -p tower-mesh-bench --bin raw_echo
//! ```

#[path = "../health.rs"]
mod health;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let listener = health::bind("raw_echo", 8788).await?;
    loop {
        let stream = health::accept(&listener).await;
        tokio::spawn(serve(stream));
    }
}

/// Answers a health check by hand, or upgrades and echoes.
async fn serve(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if health::is_health_check(&stream).await {
        health::answer_health(&mut stream).await;
        return;
    }
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    echo(ws).await;
}

/// Echo loop: read, `feed` the reply, and flush only when no further frame is ready now.
async fn echo(mut ws: tokio_tungstenite::WebSocketStream<TcpStream>) {
    while let Some(Ok(msg)) = ws.next().await {
        if !reply(&mut ws, msg).await {
            return;
        }
        // Drain whatever is already buffered or readable without waiting.
        loop {
            match ws.next().now_or_never() {
                None => break,
                Some(Some(Ok(msg))) => {
                    if !reply(&mut ws, msg).await {
                        return;
                    }
                }
                Some(_) => {
                    let _ = ws.flush().await;
                    return;
                }
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

/// Queues the echo of one frame; `false` when the connection is finished.
async fn reply(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, msg: Message) -> bool {
    match msg {
        Message::Text(_) | Message::Binary(_) => ws.feed(msg).await.is_ok(),
        // tungstenite answers pings and close frames itself; the next flush sends them.
        Message::Close(_) => true,
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => true,
    }
}
