//! Golden frames of the wire protocol (docs/protocol.md §1-§3), pinned byte for byte where
//! docs/protocol.md gives them, on every backend.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tower_mesh::{BoxError, CommandError, MeshBuilder};

use crate::common::*;

conformance!(
    assign_id_is_the_first_frame,
    connection_ids_are_unique_across_instances,
    reply_repeats_id_and_command,
    unknown_command_is_enotfound,
    handler_error_without_code_is_eserver,
    handler_chosen_code_is_kept,
    noop_replies_true,
    unit_handler_replies_null,
    ping_frame_and_unanswered_pong,
    latency_request_response_and_report,
);

fn with_commands(builder: MeshBuilder) -> MeshBuilder {
    builder
        .command("echo", echo)
        .command("nothing", || async {})
        .command("fail", || async {
            Err::<Value, BoxError>("This is a test error".into())
        })
        .command("fail-io", || async {
            Err::<Value, _>(std::io::Error::other("disk on fire"))
        })
        .command("fail-coded", || async {
            Err::<Value, _>(CommandError::new("EMINE", "mine, all mine"))
        })
}

async fn assign_id_is_the_first_frame(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .expect("upgrade");
    let first = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("a first frame")
        .expect("socket open")
        .expect("no socket error");
    let Message::Text(text) = first else {
        panic!("first frame is not text: {first:?}");
    };
    let frame: Value = serde_json::from_str(&text).expect("JSON");
    let id = frame["payload"].as_str().expect("the id is a string");
    assert!(!id.is_empty());
    // Exact bytes: no id field, command then payload.
    assert_eq!(
        text.as_str(),
        format!(r#"{{"command":"mesh/assign-id","payload":"{id}"}}"#)
    );
    // The id is the one the server lists.
    let listed: Vec<String> = server
        .mesh
        .connections()
        .iter()
        .map(|c| c.id().to_owned())
        .collect();
    assert_eq!(listed, vec![id.to_owned()]);
}

async fn connection_ids_are_unique_across_instances(backend: Backend) {
    let a = serve(with_commands(backend.builder())).await;
    let b = serve(with_commands(backend.builder())).await;
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for server in [&a, &b, &a, &b] {
        let client = RawClient::connect(&server.url()).await;
        ids.push(client.id.clone());
        clients.push(client);
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "duplicate ids: {ids:?}");
}

async fn reply_repeats_id_and_command(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":65300001,"command":"echo","payload":{"text":"hi","n":[1,2.5,null]}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":65300001,"command":"echo","payload":{"text":"hi","n":[1,2.5,null]}}"#
    );
    // Id 0 is a usable id, and payload key order is preserved.
    client
        .send_text(r#"{"id":0,"command":"echo","payload":{"z":1,"a":2}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":0,"command":"echo","payload":{"z":1,"a":2}}"#
    );
    // A scalar payload is echoed as is.
    client
        .send_text(r#"{"id":99999999,"command":"echo","payload":"plain"}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":99999999,"command":"echo","payload":"plain"}"#
    );
}

async fn unknown_command_is_enotfound(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":65320003,"command":"no-such","payload":{}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":65320003,"command":"no-such","payload":{"error":"Command \"no-such\" not found","code":"ENOTFOUND","name":"CommandError"}}"#
    );
    assert_echo_is_next(&mut client, 1).await;
}

async fn handler_error_without_code_is_eserver(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":5,"command":"fail","payload":{}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":5,"command":"fail","payload":{"error":"This is a test error","code":"ESERVER","name":"Error"}}"#
    );
    // Any std error type keeps its message too.
    assert_eq!(
        client.command(6, "fail-io", json!({})).await,
        json!({"id": 6, "command": "fail-io", "payload": {
            "error": "disk on fire", "code": "ESERVER", "name": "Error"}})
    );
    assert_echo_is_next(&mut client, 7).await;
}

async fn handler_chosen_code_is_kept(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":8,"command":"fail-coded","payload":{}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":8,"command":"fail-coded","payload":{"error":"mine, all mine","code":"EMINE","name":"Error"}}"#
    );
    assert_echo_is_next(&mut client, 9).await;
}

async fn noop_replies_true(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":3,"command":"mesh/noop","payload":{}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":3,"command":"mesh/noop","payload":true}"#
    );
    // The payload is ignored.
    client
        .send_text(r#"{"id":4,"command":"mesh/noop","payload":[1,"x"]}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":4,"command":"mesh/noop","payload":true}"#
    );
}

async fn unit_handler_replies_null(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":12,"command":"nothing","payload":{"ignored":true}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":12,"command":"nothing","payload":null}"#
    );
}

async fn ping_frame_and_unanswered_pong(backend: Backend) {
    let server = serve(
        with_commands(backend.builder())
            .ping_interval(Duration::from_millis(50))
            .max_missed_pongs(1),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    // The first frame after mesh/assign-id of an idle client is a ping, exactly this.
    assert_eq!(
        client.next_text().await,
        r#"{"command":"ping","payload":{}}"#
    );
    client
        .send_text(r#"{"id":77,"command":"pong","payload":{}}"#)
        .await;
    // No reply to the pong: the next frame with an id is the echo's (pings have no id
    // and may arrive in between).
    client
        .send_json(json!({"id": 78, "command": "echo", "payload": "after pong"}))
        .await;
    let frame = loop {
        let frame = client.next().await;
        if frame.get("id").is_some() {
            break frame;
        }
        assert_eq!(frame, json!({"command": "ping", "payload": {}}));
    };
    assert_eq!(
        frame,
        json!({"id": 78, "command": "echo", "payload": "after pong"})
    );
}

async fn latency_request_response_and_report(backend: Backend) {
    let server =
        serve(with_commands(backend.builder()).latency_interval(Duration::from_millis(50))).await;
    let mut client = RawClient::connect(&server.url()).await;
    // Nothing is measured yet, so the first latency frame is the request.
    assert_eq!(
        client.next_text().await,
        r#"{"command":"latency:request","payload":{}}"#
    );
    client
        .send_text(r#"{"id":41,"command":"latency:response","payload":{}}"#)
        .await;
    // A later probe starts with the report of the last round trip (a request may come
    // first if the response raced the next tick).
    let report = loop {
        let text = client.next_text().await;
        if text != r#"{"command":"latency:request","payload":{}}"# {
            break text;
        }
    };
    let parsed: Value = serde_json::from_str(&report).expect("JSON");
    let ms = parsed["payload"].as_u64().expect("latency is a number");
    assert_eq!(report, format!(r#"{{"command":"latency","payload":{ms}}}"#));
    assert!(ms < WAIT.as_millis() as u64, "{ms}");
    // The report is followed by the next request.
    assert_eq!(
        client.next_text().await,
        r#"{"command":"latency:request","payload":{}}"#
    );
    // latency:response got no reply: the next frame with an id is the echo's.
    client
        .send_json(json!({"id": 42, "command": "echo", "payload": 1}))
        .await;
    let frame = loop {
        let frame = client.next().await;
        if frame.get("id").is_some() {
            break frame;
        }
        assert!(
            frame["command"] == "latency" || frame["command"] == "latency:request",
            "{frame}"
        );
    };
    assert_eq!(frame, json!({"id": 42, "command": "echo", "payload": 1}));
    let latency = server
        .mesh
        .connection(&client.id)
        .expect("local connection")
        .latency();
    assert!(latency.is_some());
}
