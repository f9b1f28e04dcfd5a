//! The smallest round trip: `echo` over a WebSocket, and `GET /health` beside the mesh.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn echo_round_trip() {
    let server = serve(Backend::memory().builder().command("echo", echo)).await;
    let mut client = RawClient::connect(&server.url()).await;
    let reply = client.command(5, "echo", json!({"a": 1})).await;
    assert_eq!(reply, json!({"id":5,"command":"echo","payload":{"a":1}}));
    let health = raw_http(
        server.addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(health.status, 200, "{health:?}");
}
