//! `GET /health`, answered by hand before the WebSocket handshake, shared by the baseline
//! servers (`raw_echo`, `raw_fanout`) so a health probe never costs a handshake.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a request line may grow before the connection is treated as a WebSocket anyway.
const PEEK_LIMIT: usize = 1024;

/// Peeks the request line (without consuming it) and says whether it is `GET /health`.
pub async fn is_health_check(stream: &TcpStream) -> bool {
    let mut buf = [0u8; PEEK_LIMIT];
    loop {
        let Ok(n) = stream.peek(&mut buf).await else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let seen = &buf[..n];
        if let Some(end) = seen.windows(2).position(|w| w == b"\r\n") {
            let line = &seen[..end];
            return line.starts_with(b"GET /health ") || line == b"GET /health";
        }
        if n == PEEK_LIMIT || !b"GET /health".starts_with(&seen[..n.min(11)]) {
            // Not a health check (or an absurd request line): let the handshake decide.
            return false;
        }
        // Only part of the request line has arrived; wait for more.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Consumes the request head and writes a minimal `200 OK`.
pub async fn answer_health(stream: &mut TcpStream) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        .await;
    let _ = stream.shutdown().await;
}
