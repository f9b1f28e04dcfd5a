//! Bad input, one test each (issue 2, "Bad input"): a frame without a usable id is
//! dropped without a reply, one with an id gets an error reply, an oversize frame closes
//! the connection with a reason. After each, the same connection still answers `echo`
//! and a second connection saw nothing.
//!
//! "No reply" is proved without sleeping: right after the bad frame the client sends an
//! `echo`, and the very next frame it receives must be that echo's reply.

use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tower_mesh::extract::Payload;
use tower_mesh::MeshBuilder;

use crate::common::*;

conformance!(
    malformed_json_is_dropped,
    json_array_is_dropped,
    json_number_is_dropped,
    other_non_object_values_are_dropped,
    missing_command_gets_einvalid,
    non_string_command_gets_einvalid,
    non_numeric_id_is_dropped,
    unusable_numeric_id_is_dropped,
    missing_id_is_dropped,
    missing_payload_gets_einvalid,
    null_payload_is_a_payload,
    binary_frame_with_a_command_is_answered,
    binary_frame_with_invalid_utf8_closes_with_1007,
    text_frame_with_invalid_utf8_closes_with_1007,
    close_frame_with_an_invalid_code_gets_1002_back,
    a_client_close_is_answered_with_a_close_frame,
    lone_surrogate_escapes_are_read_as_u_fffd,
    duplicate_keys_take_the_last_value,
    oversize_frame_closes_with_1009,
    unknown_command_gets_enotfound,
    wrong_payload_type_gets_einvalid,
    missing_payload_field_gets_einvalid,
    builtin_property_names_are_unknown_commands,
);

#[derive(Deserialize)]
struct Sum {
    a: i64,
    b: i64,
}

fn with_commands(builder: MeshBuilder) -> MeshBuilder {
    builder
        .command("echo", echo)
        .command("sum", |Payload(Sum { a, b }): Payload<Sum>| async move {
            json!(a + b)
        })
}

/// A server with `echo`, a client to misbehave and a neighbour that must not notice.
struct Scene {
    server: TestServer,
    client: RawClient,
    neighbour: RawClient,
}

async fn scene(builder: MeshBuilder) -> Scene {
    let server = serve(with_commands(builder)).await;
    let client = RawClient::connect(&server.url()).await;
    let neighbour = RawClient::connect(&server.url()).await;
    Scene {
        server,
        client,
        neighbour,
    }
}

impl Scene {
    /// The misbehaving connection still answers, and the neighbour's next frame is the
    /// reply to its own echo: it received nothing because of the other's bad input.
    async fn both_still_serve(&mut self) {
        assert_echo_is_next(&mut self.client, 1_000).await;
        assert_echo_is_next(&mut self.neighbour, 2_000).await;
        assert_eq!(self.server.mesh.connections().len(), 2);
    }

    /// Sends `text`, then proves it got no reply.
    async fn dropped(&mut self, text: &str) {
        self.client.send_text(text).await;
        assert_echo_is_next(&mut self.client, 500).await;
    }
}

fn einvalid(reply: &Value) {
    assert_eq!(reply["payload"]["code"], "EINVALID", "{reply}");
    assert_eq!(reply["payload"]["name"], "CommandError", "{reply}");
    let message = reply["payload"]["error"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{reply}");
}

async fn malformed_json_is_dropped(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.dropped("{not json").await;
    s.dropped(r#"{"id":1,"command":"echo","payload":{}"#).await;
    s.dropped("").await;
    s.both_still_serve().await;
}

async fn json_array_is_dropped(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.dropped("[1,2,3]").await;
    // Not even an array that wraps a well-formed command runs.
    s.dropped(r#"[{"id":3,"command":"echo","payload":{}}]"#)
        .await;
    s.dropped(r#"[3,"echo",{}]"#).await;
    s.both_still_serve().await;
}

async fn json_number_is_dropped(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.dropped("42").await;
    s.dropped("-1.5e3").await;
    s.both_still_serve().await;
}

async fn other_non_object_values_are_dropped(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    for text in [r#""a string""#, "null", "true"] {
        s.dropped(text).await;
    }
    s.both_still_serve().await;
}

async fn missing_command_gets_einvalid(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.client.send_text(r#"{"id":5,"payload":{}}"#).await;
    let reply = s.client.next().await;
    assert_eq!(reply["id"], 5, "{reply}");
    einvalid(&reply);
    s.both_still_serve().await;
}

async fn non_string_command_gets_einvalid(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    for (id, command) in [
        (6, json!(5)),
        (7, json!(null)),
        (8, json!(["echo"])),
        (9, json!({"name": "echo"})),
    ] {
        s.client
            .send_json(json!({"id": id, "command": command, "payload": {}}))
            .await;
        let reply = s.client.next().await;
        assert_eq!(reply["id"], id, "{reply}");
        einvalid(&reply);
    }
    s.both_still_serve().await;
}

async fn non_numeric_id_is_dropped(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    for id in [
        json!("7"),
        json!(null),
        json!(true),
        json!([7]),
        json!({"id": 7}),
    ] {
        s.dropped(&json!({"id": id, "command": "echo", "payload": {}}).to_string())
            .await;
    }
    s.both_still_serve().await;
}

async fn unusable_numeric_id_is_dropped(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    for text in [
        r#"{"id":-1,"command":"echo","payload":{}}"#,
        r#"{"id":1.5,"command":"echo","payload":{}}"#,
    ] {
        s.dropped(text).await;
    }
    s.both_still_serve().await;
}

async fn missing_id_is_dropped(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    // A well-formed command without an id never runs (the reference ignores it too).
    s.dropped(r#"{"command":"echo","payload":{"x":1}}"#).await;
    s.dropped(r#"{"command":"no-such","payload":{}}"#).await;
    s.both_still_serve().await;
}

async fn missing_payload_gets_einvalid(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.client.send_text(r#"{"id":9,"command":"echo"}"#).await;
    let reply = s.client.next().await;
    assert_eq!(reply["id"], 9, "{reply}");
    assert_eq!(reply["command"], "echo", "{reply}");
    einvalid(&reply);
    s.both_still_serve().await;
}

async fn null_payload_is_a_payload(backend: Backend) {
    // An explicit `null` is present, unlike a missing payload.
    let mut s = scene(backend.builder()).await;
    s.client
        .send_text(r#"{"id":10,"command":"echo","payload":null}"#)
        .await;
    assert_eq!(
        s.client.next_text().await,
        r#"{"id":10,"command":"echo","payload":null}"#
    );
    s.both_still_serve().await;
}

async fn binary_frame_with_a_command_is_answered(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.client
        .send_binary(br#"{"id":12,"command":"echo","payload":{"via":"binary"}}"#.to_vec())
        .await;
    // Answered like text, as a text frame.
    assert_eq!(
        s.client.next_text().await,
        r#"{"id":12,"command":"echo","payload":{"via":"binary"}}"#
    );
    s.both_still_serve().await;
}

/// Bytes that are not UTF-8, inside what would otherwise be a well-formed `echo`.
fn echo_with_invalid_utf8(id: u64) -> Vec<u8> {
    let mut bytes = format!(r#"{{"id":{id},"command":"echo","payload":""#).into_bytes();
    bytes.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    bytes.extend_from_slice(br#""}"#);
    bytes
}

/// The client's next message is the server's close frame with `code` (RFC 6455: no
/// dropped socket, no reply first), and the neighbour noticed nothing.
async fn closes_with(s: &mut Scene, code: u16) {
    let (got, reason) = first_close(&mut s.client.socket).await;
    assert_eq!(got, code, "{reason}");
    assert!(!reason.is_empty(), "the close frame carries a reason");
    assert_echo_is_next(&mut s.neighbour, 2_000).await;
    assert!(s.server.mesh.connection(&s.neighbour.id).is_some());
}

async fn binary_frame_with_invalid_utf8_closes_with_1007(backend: Backend) {
    // Binary frames are read as UTF-8 text (docs/protocol.md §1): bytes that are not UTF-8
    // are the same bad input as in a text frame.
    let mut s = scene(backend.builder()).await;
    s.client.send_binary(echo_with_invalid_utf8(13)).await;
    closes_with(&mut s, 1007).await;
}

async fn text_frame_with_invalid_utf8_closes_with_1007(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    let frame = Frame::message(echo_with_invalid_utf8(14), OpCode::Data(Data::Text), true);
    s.client
        .socket
        .send(Message::Frame(frame))
        .await
        .expect("send");
    closes_with(&mut s, 1007).await;
}

async fn close_frame_with_an_invalid_code_gets_1002_back(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    // 999 is below the range a close frame may carry (RFC 6455 §7.4).
    let frame = Frame::close(Some(CloseFrame {
        code: CloseCode::from(999),
        reason: "bad code".into(),
    }));
    s.client
        .socket
        .send(Message::Frame(frame))
        .await
        .expect("send");
    closes_with(&mut s, 1002).await;
}

async fn a_client_close_is_answered_with_a_close_frame(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.client
        .socket
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "leaving".into(),
        })))
        .await
        .expect("send");
    // The server echoes the code (RFC 6455 §5.5.1) before it drops the socket.
    let (code, _) = first_close(&mut s.client.socket).await;
    assert_eq!(code, 1001);
    assert_echo_is_next(&mut s.neighbour, 2_000).await;
}

async fn lone_surrogate_escapes_are_read_as_u_fffd(backend: Backend) {
    // JavaScript's JSON.stringify writes a string with a broken surrogate pair as a lone
    // `\uD8xx` escape, and JSON.parse accepts it: the command runs, the lone surrogate
    // reads as U+FFFD, and well-formed pairs and escaped backslashes are left alone.
    let mut s = scene(backend.builder()).await;
    for (id, payload, expected) in [
        (40, r#""a\ud800b""#, json!("a\u{fffd}b")),
        (41, r#""\uDC00""#, json!("\u{fffd}")),
        (42, r#""\ud83d\ude00 \ud83d""#, json!("\u{1f600} \u{fffd}")),
        (43, r#""\ud800\ud83d\ude00""#, json!("\u{fffd}\u{1f600}")),
        (44, r#""\\ud800 \ud800\n""#, json!("\\ud800 \u{fffd}\n")),
        (
            45,
            r#"{"k\udbff":["\udfff",1]}"#,
            json!({"k\u{fffd}": ["\u{fffd}", 1]}),
        ),
    ] {
        s.client
            .send_text(&format!(
                r#"{{"id":{id},"command":"echo","payload":{payload}}}"#
            ))
            .await;
        assert_eq!(
            s.client.next().await,
            json!({"id": id, "command": "echo", "payload": expected}),
            "{payload}"
        );
    }
    // In the command name too: the name is then one no command has.
    s.client
        .send_text(r#"{"id":46,"command":"ech\ud800","payload":{}}"#)
        .await;
    let reply = s.client.next().await;
    assert_eq!(reply["id"], 46, "{reply}");
    assert_eq!(reply["command"], "ech\u{fffd}", "{reply}");
    assert_eq!(reply["payload"]["code"], "ENOTFOUND", "{reply}");
    s.both_still_serve().await;
}

async fn duplicate_keys_take_the_last_value(backend: Backend) {
    // As JavaScript's JSON.parse reads them: the last value of a repeated key wins.
    let mut s = scene(backend.builder()).await;
    s.client
        .send_text(r#"{"id":50,"command":"nope","payload":1,"command":"echo"}"#)
        .await;
    assert_eq!(
        s.client.next_text().await,
        r#"{"id":50,"command":"echo","payload":1}"#
    );
    s.client
        .send_text(r#"{"id":50,"id":51,"command":"echo","payload":1,"payload":{"a":1,"a":2}}"#)
        .await;
    assert_eq!(
        s.client.next_text().await,
        r#"{"id":51,"command":"echo","payload":{"a":2}}"#
    );
    // A repeated id whose last value is not usable leaves the frame without an id.
    s.dropped(r#"{"id":52,"command":"echo","payload":1,"id":"52"}"#)
        .await;
    s.both_still_serve().await;
}

async fn oversize_frame_closes_with_1009(backend: Backend) {
    let mut s = scene(backend.builder().max_frame_size(1024)).await;
    // Just under the limit is fine.
    let fits = "x".repeat(900);
    assert_eq!(
        s.client.command(15, "echo", json!(fits)).await["payload"],
        json!(fits)
    );
    let too_big = json!({"id": 16, "command": "echo", "payload": "y".repeat(2048)}).to_string();
    assert!(too_big.len() > 2048);
    s.client.send_text(&too_big).await;
    let (code, reason) = s.client.closed().await;
    assert_eq!(code, 1009);
    assert!(!reason.is_empty(), "the close frame carries a reason");
    assert_eq!(s.server.mesh.stats().oversize_closes, 1);
    // The other client noticed nothing and still works.
    assert_echo_is_next(&mut s.neighbour, 17).await;
    assert!(s.server.mesh.connection(&s.neighbour.id).is_some());
}

async fn unknown_command_gets_enotfound(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    s.client
        .send_text(r#"{"id":18,"command":"does-not-exist","payload":{}}"#)
        .await;
    assert_eq!(
        s.client.next_text().await,
        r#"{"id":18,"command":"does-not-exist","payload":{"error":"Command \"does-not-exist\" not found","code":"ENOTFOUND","name":"CommandError"}}"#
    );
    s.both_still_serve().await;
}

async fn wrong_payload_type_gets_einvalid(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    let reply = s
        .client
        .command(19, "sum", json!({"a": "one", "b": 2}))
        .await;
    assert_eq!(reply["command"], "sum");
    einvalid(&reply);
    let message = reply["payload"]["error"].as_str().unwrap_or_default();
    assert!(message.contains("invalid type"), "{message}");
    assert!(
        message.contains("one"),
        "names the offending value: {message}"
    );
    let reply = s.client.command(20, "sum", json!([1, 2, 3])).await;
    einvalid(&reply);
    // The same command with a good payload works.
    assert_eq!(
        s.client.command(21, "sum", json!({"a": 40, "b": 2})).await,
        json!({"id": 21, "command": "sum", "payload": 42})
    );
    s.both_still_serve().await;
}

async fn missing_payload_field_gets_einvalid(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    let reply = s.client.command(22, "sum", json!({"a": 1})).await;
    einvalid(&reply);
    let message = reply["payload"]["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("missing field") && message.contains('b'),
        "{message}"
    );
    s.both_still_serve().await;
}

async fn builtin_property_names_are_unknown_commands(backend: Backend) {
    let mut s = scene(backend.builder()).await;
    for (id, name) in [
        (23, "toString"),
        (24, "__proto__"),
        (25, "constructor"),
        (26, "hasOwnProperty"),
        (27, "valueOf"),
        (28, ""),
    ] {
        assert_eq!(
            s.client.command(id, name, json!({})).await,
            json!({"id": id, "command": name, "payload": {
                "error": format!("Command \"{name}\" not found"),
                "code": "ENOTFOUND",
                "name": "CommandError"}})
        );
    }
    s.both_still_serve().await;
}
