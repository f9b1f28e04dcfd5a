//! Commands over a [`RawClient`], for the suites that share them.

use serde_json::{json, Value};

use super::{reply_text, RawClient, Within};

/// Sends a command and returns its reply's payload.
pub(crate) async fn call(client: &mut RawClient, id: u64, command: &str, payload: Value) -> Value {
    client.command_within(id, command, payload).await["payload"].clone()
}

/// Sends a command and returns its reply's payload, checking that the reply (as the
/// server wrote it) fits in `max_frame_size` bytes.
pub(crate) async fn call_within_frame(
    client: &mut RawClient,
    id: u64,
    command: &str,
    payload: Value,
    max_frame_size: usize,
) -> Value {
    client
        .send_json(json!({"id": id, "command": command, "payload": payload}))
        .await;
    let text = reply_text(client, id).await;
    assert!(text.len() <= max_frame_size, "{} bytes: {text}", text.len());
    let reply: Value = serde_json::from_str(&text).expect("JSON");
    reply["payload"].clone()
}

pub(crate) async fn join(client: &mut RawClient, id: u64, room: &str) -> Value {
    call(client, id, "mesh/join-room", json!({ "roomName": room })).await
}

pub(crate) async fn leave(client: &mut RawClient, id: u64, room: &str) -> Value {
    call(client, id, "mesh/leave-room", json!({ "roomName": room })).await
}

pub(crate) async fn subscribe_presence(client: &mut RawClient, id: u64, room: &str) -> Value {
    call(
        client,
        id,
        "mesh/subscribe-presence",
        json!({ "roomName": room }),
    )
    .await
}

/// The next `mesh/presence-update` payload (other frames are skipped).
pub(crate) async fn presence_update(client: &mut RawClient) -> Value {
    client.push_within("mesh/presence-update").await["payload"].clone()
}

/// A channel reply or push payload without its stream position (tower-mesh's recovery
/// extension: `epoch` and `offset` on subscribe replies, `offset` on messages), checking
/// that what it carries has the right types: for suites about everything else.
pub(crate) fn without_position(mut payload: Value) -> Value {
    if let Some(fields) = payload.as_object_mut() {
        if let Some(epoch) = fields.remove("epoch") {
            assert!(epoch.is_string(), "epoch {epoch}");
        }
        if let Some(offset) = fields.remove("offset") {
            assert!(offset.is_u64(), "offset {offset}");
        }
    }
    payload
}
