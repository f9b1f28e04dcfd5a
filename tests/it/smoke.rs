use serde_json::json;
use tower_mesh::extract::Payload;

use crate::common::*;

#[tokio::test]
async fn echo_round_trip() {
    let server = serve(Backend::memory().builder().command(
        "echo",
        |Payload(p): Payload<serde_json::Value>| async move { p },
    ))
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    let reply = client.command(5, "echo", json!({"a": 1})).await;
    assert_eq!(reply, json!({"id":5,"command":"echo","payload":{"a":1}}));
    let health = reqwest_like_get(server.addr).await;
    assert!(health.contains("200"), "{health}");
}

async fn reqwest_like_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}
