//! What the baseline servers (`raw_echo`, `raw_fanout`) share: binding and accepting, and
//! `GET /health` answered by hand before the WebSocket handshake, so a health probe never
//! costs a handshake.

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

/// Binds the baseline server `name` on `PORT` (default `default_port`), after raising the
/// soft open-file limit so that many connections do not run into it.
pub async fn bind(name: &str, default_port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default_port);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("{name} listening on 0.0.0.0:{port}");
    Ok(listener)
}

/// The next accepted socket; accept errors (EMFILE and friends) back off briefly instead
/// of spinning.
pub async fn accept(listener: &tokio::net::TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(err) => {
                eprintln!("accept: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
