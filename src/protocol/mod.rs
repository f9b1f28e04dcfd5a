//! The mesh wire protocol: frames in and out, as JSON, without I/O.
//!
//! Every frame is one JSON object in one WebSocket text frame (see `docs/protocol.md` in the repository):
//! commands `{"id":N,"command":"name","payload":...}`, replies that repeat `id` and
//! `command`, and pushes `{"command":"name","payload":...}` without an id. This module
//! turns client text into an [`Inbound`] frame and builds the exact JSON of every frame
//! the server sends; golden tests pin those bytes.
//!
//! Reading client frames is [`inbound`]'s part: see there for how frames JavaScript
//! clients write are read as `JSON.parse` reads them.

mod inbound;
mod json;

use serde::Serialize;
use serde_json::Value;

use crate::error::{CommandError, MeshError};

pub(crate) use inbound::Inbound;

/// One outbound text frame, shared: a broadcast serialises once and every recipient's
/// queue holds the same bytes.
pub(crate) type Frame = tokio_tungstenite::tungstenite::Utf8Bytes;

/// The push that tells a client its connection id.
pub(crate) const ASSIGN_ID: &str = "mesh/assign-id";
/// Liveness probe sent by the server; the client answers [`PONG`].
pub(crate) const PING: &str = "ping";
/// The client's answer to [`PING`]; never replied to.
pub(crate) const PONG: &str = "pong";
/// Latency probe sent by the server; the client answers [`LATENCY_RESPONSE`].
pub(crate) const LATENCY_REQUEST: &str = "latency:request";
/// The client's answer to [`LATENCY_REQUEST`]; never replied to.
pub(crate) const LATENCY_RESPONSE: &str = "latency:response";
/// The push that reports the last measured round trip in milliseconds.
pub(crate) const LATENCY: &str = "latency";
/// The push that tells presence subscribers who joined, left, or changed state.
pub(crate) const PRESENCE_UPDATE: &str = "mesh/presence-update";
/// The push that carries a channel message to its subscribers.
pub(crate) const SUBSCRIPTION_MESSAGE: &str = "mesh/subscription-message";
/// The push that carries a record's new version, whole or as a patch.
pub(crate) const RECORD_UPDATE: &str = "mesh/record-update";
/// The push that tells a record's subscribers it was deleted.
pub(crate) const RECORD_DELETED: &str = "mesh/record-deleted";
/// The push that tells a collection's subscriber which records joined or left it.
pub(crate) const COLLECTION_DIFF: &str = "mesh/collection-diff";

#[derive(Serialize)]
struct ReplyFrame<'a, C: Serialize + ?Sized, P: Serialize + ?Sized> {
    id: u64,
    command: &'a C,
    payload: &'a P,
}

#[derive(Serialize)]
struct PushFrame<'a, P: Serialize + ?Sized> {
    command: &'a str,
    payload: &'a P,
}

/// The JSON text of a reply to command `id`.
pub(crate) fn reply<C, P>(id: u64, command: &C, payload: &P) -> String
where
    C: Serialize + ?Sized,
    P: Serialize + ?Sized,
{
    to_json(&ReplyFrame {
        id,
        command,
        payload,
    })
}

/// The JSON text of a reply to command `id` whose payload is a JSON value: the same text
/// as [`reply`] writes, written faster (every successful command's reply is one).
///
/// It is written into a buffer the thread keeps, then copied into a string of exactly its
/// length: a frame made of a string with spare capacity costs a second allocation (the
/// `bytes` crate's shared header) and an atomic count on every drop.
pub(crate) fn value_reply(id: u64, command: &str, payload: &Value) -> String {
    /// Above this, a thread's buffer is given back after use rather than kept.
    const KEPT_BYTES: usize = 16 * 1024;
    thread_local! {
        static SCRATCH: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut out = scratch.take();
        out.clear();
        out.push_str(r#"{"id":"#);
        out.push_str(itoa::Buffer::new().format(id));
        out.push_str(r#","command":"#);
        json::write_str(&mut out, command);
        out.push_str(r#","payload":"#);
        json::write_value(&mut out, payload);
        out.push('}');
        let reply = String::from(out.as_str());
        if out.capacity() <= KEPT_BYTES {
            scratch.set(out);
        }
        reply
    })
}

/// The JSON text of an error reply: the error is the payload (`{error, code, name}`).
pub(crate) fn error_reply<C: Serialize + ?Sized>(
    id: u64,
    command: &C,
    error: &CommandError,
) -> String {
    reply(id, command, error)
}

/// The JSON text of a push (a frame without id).
pub(crate) fn push<P: Serialize + ?Sized>(command: &str, payload: &P) -> String {
    to_json(&PushFrame { command, payload })
}

/// A push's payload as JSON text, for a delivery to carry to other instances.
pub(crate) fn payload_json<P: Serialize + ?Sized>(payload: &P) -> Result<String, MeshError> {
    serde_json::to_string(payload).map_err(|err| MeshError::Encode(std::sync::Arc::new(err)))
}

/// The JSON text of a push whose payload is JSON text already (byte for byte what
/// [`push`] makes of the same payload).
pub(crate) fn push_with_json(command: &str, payload_json: &str) -> String {
    let command = to_json(&command);
    let mut out = String::with_capacity(24 + command.len() + payload_json.len());
    out.push_str(r#"{"command":"#);
    out.push_str(&command);
    out.push_str(r#","payload":"#);
    out.push_str(payload_json);
    out.push('}');
    out
}

/// The JSON text of a `mesh/presence-update` push. `kind` is `join`, `leave` or `state`;
/// a `state` update always carries `state` (JSON text; `null` when cleared or expired).
pub(crate) fn presence_update(
    kind: &str,
    connection_id: &str,
    room_name: &str,
    state: Option<&str>,
    timestamp: u64,
) -> String {
    let mut payload = String::with_capacity(96 + state.map_or(0, str::len));
    payload.push_str(r#"{"type":"#);
    payload.push_str(&to_json(&kind));
    payload.push_str(r#","connectionId":"#);
    payload.push_str(&to_json(&connection_id));
    payload.push_str(r#","roomName":"#);
    payload.push_str(&to_json(&room_name));
    if let Some(state) = state {
        payload.push_str(r#","state":"#);
        payload.push_str(state);
    }
    payload.push_str(r#","timestamp":"#);
    payload.push_str(&timestamp.to_string());
    payload.push('}');
    push_with_json(PRESENCE_UPDATE, &payload)
}

#[derive(Serialize)]
struct ChannelMessage<'a> {
    channel: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

/// The payload of a `mesh/subscription-message` push, as JSON text: with the message's
/// offset when its channel has positions.
pub(crate) fn subscription_message_payload(
    channel: &str,
    message: &str,
    offset: Option<u64>,
) -> String {
    to_json(&ChannelMessage {
        channel,
        message,
        offset,
    })
}

/// The JSON text of a `mesh/subscription-message` push.
#[cfg(test)]
fn subscription_message(channel: &str, message: &str, offset: Option<u64>) -> String {
    push_with_json(
        SUBSCRIPTION_MESSAGE,
        &subscription_message_payload(channel, message, offset),
    )
}

/// The JSON text of a `mesh/record-update` push, from JSON texts: the whole value, the
/// RFC 6902 patch, or both (at least one). Built from parts so that a write serialises
/// its value and patch once, whichever forms its subscribers need.
pub(crate) fn record_update(
    record_id: &str,
    full: Option<&str>,
    patch: Option<&str>,
    version: u64,
) -> String {
    let id = to_json(&record_id);
    let mut out =
        String::with_capacity(64 + id.len() + full.map_or(0, str::len) + patch.map_or(0, str::len));
    out.push_str(r#"{"command":""#);
    out.push_str(RECORD_UPDATE);
    out.push_str(r#"","payload":{"recordId":"#);
    out.push_str(&id);
    if let Some(full) = full {
        out.push_str(r#","full":"#);
        out.push_str(full);
    }
    if let Some(patch) = patch {
        out.push_str(r#","patch":"#);
        out.push_str(patch);
    }
    out.push_str(r#","version":"#);
    out.push_str(&version.to_string());
    out.push_str("}}");
    out
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RecordDeleted<'a> {
    record_id: &'a str,
    version: u64,
}

/// The JSON text of a `mesh/record-deleted` push.
pub(crate) fn record_deleted(record_id: &str, version: u64) -> String {
    push(RECORD_DELETED, &RecordDeleted { record_id, version })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CollectionDiff<'a> {
    collection_id: &'a str,
    added: &'a [Value],
    removed: &'a [Value],
    version: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

/// The JSON text of a `mesh/collection-diff` push: `added` as records carrying their `id`
/// (see `collections::member_as_added`), `removed` as `{id}`; `truncated: true` when
/// records that joined were left out for the frame limit (and no such field otherwise).
pub(crate) fn collection_diff(
    collection_id: &str,
    added: &[Value],
    removed: &[Value],
    version: u64,
    truncated: bool,
) -> String {
    push(
        COLLECTION_DIFF,
        &CollectionDiff {
            collection_id,
            added,
            removed,
            version,
            truncated,
        },
    )
}

/// Serialising our own frame types cannot fail: every map key is a string and every
/// payload is already a `serde_json::Value` or plain data. Should a user type's
/// `Serialize` impl fail anyway, the frame degrades to an error body rather than a panic.
fn to_json<T: Serialize>(frame: &T) -> String {
    serde_json::to_string(frame).unwrap_or_else(|err| {
        tracing::error!(%err, "a frame failed to serialise");
        r#"{"command":"mesh/error","payload":{"error":"frame serialisation failed","code":"ESERVER","name":"Error"}}"#
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn value_reply_is_reply() {
        for (id, command, payload) in [
            (
                65300001,
                "echo",
                json!({"x": 1, "text": "a \"quoted\" line\n"}),
            ),
            (0, "mesh/noop", Value::Null),
            (
                u64::MAX,
                "odd \"name\"\u{1}",
                json!([1.5, -2, "x".repeat(64)]),
            ),
        ] {
            assert_eq!(
                value_reply(id, command, &payload),
                reply(id, command, &payload)
            );
        }
    }

    #[test]
    fn golden_frames() {
        assert_eq!(
            reply(65300001, "echo", &json!({"x":1})),
            r#"{"id":65300001,"command":"echo","payload":{"x":1}}"#
        );
        assert_eq!(
            error_reply(65320003, "no-such", &CommandError::not_found("no-such")),
            r#"{"id":65320003,"command":"no-such","payload":{"error":"Command \"no-such\" not found","code":"ENOTFOUND","name":"CommandError"}}"#
        );
        assert_eq!(push(PING, &json!({})), r#"{"command":"ping","payload":{}}"#);
        assert_eq!(
            push(ASSIGN_ID, "conn-1"),
            r#"{"command":"mesh/assign-id","payload":"conn-1"}"#
        );
        assert_eq!(push(LATENCY, &3), r#"{"command":"latency","payload":3}"#);
        assert_eq!(
            push(LATENCY_REQUEST, &json!({})),
            r#"{"command":"latency:request","payload":{}}"#
        );
        assert_eq!(
            reply(1, "mesh/noop", &Value::Null),
            r#"{"id":1,"command":"mesh/noop","payload":null}"#
        );
        assert_eq!(
            presence_update("join", "c1", "smoke-room", None, 1795373456537),
            r#"{"command":"mesh/presence-update","payload":{"type":"join","connectionId":"c1","roomName":"smoke-room","timestamp":1795373456537}}"#
        );
        assert_eq!(
            presence_update("state", "c1", "r", Some(r#"{"status":"typing"}"#), 5),
            r#"{"command":"mesh/presence-update","payload":{"type":"state","connectionId":"c1","roomName":"r","state":{"status":"typing"},"timestamp":5}}"#
        );
        assert_eq!(
            subscription_message("smoke-channel", r#"{"text":"hello channel"}"#, Some(1)),
            r#"{"command":"mesh/subscription-message","payload":{"channel":"smoke-channel","message":"{\"text\":\"hello channel\"}","offset":1}}"#
        );
        // A Redis plain channel's message has no position.
        assert_eq!(
            subscription_message("ext:news", "hi", None),
            r#"{"command":"mesh/subscription-message","payload":{"channel":"ext:news","message":"hi"}}"#
        );
        assert_eq!(
            record_update("smoke-record", Some(r#"{"count":1}"#), None, 1),
            r#"{"command":"mesh/record-update","payload":{"recordId":"smoke-record","full":{"count":1},"version":1}}"#
        );
        assert_eq!(
            record_update("r\"q", Some("null"), None, 0),
            r#"{"command":"mesh/record-update","payload":{"recordId":"r\"q","full":null,"version":0}}"#
        );
        let patch = r#"[{"op":"replace","path":"/count","value":2}]"#;
        assert_eq!(
            record_update("smoke-record", None, Some(patch), 2),
            r#"{"command":"mesh/record-update","payload":{"recordId":"smoke-record","patch":[{"op":"replace","path":"/count","value":2}],"version":2}}"#
        );
        assert_eq!(
            record_update("r", Some(r#"{"count":2}"#), Some(patch), 2),
            r#"{"command":"mesh/record-update","payload":{"recordId":"r","full":{"count":2},"patch":[{"op":"replace","path":"/count","value":2}],"version":2}}"#
        );
        assert_eq!(
            record_deleted("r", 3),
            r#"{"command":"mesh/record-deleted","payload":{"recordId":"r","version":3}}"#
        );
        assert_eq!(
            collection_diff(
                "c",
                &[json!({"id": "t:1", "record": {"a": 1}})],
                &[json!({"id": "t:2"})],
                2,
                false
            ),
            r#"{"command":"mesh/collection-diff","payload":{"collectionId":"c","added":[{"id":"t:1","record":{"a":1}}],"removed":[{"id":"t:2"}],"version":2}}"#
        );
        assert_eq!(
            collection_diff("c", &[], &[], 3, true),
            r#"{"command":"mesh/collection-diff","payload":{"collectionId":"c","added":[],"removed":[],"version":3,"truncated":true}}"#
        );
        assert_eq!(
            presence_update("state", "c1", "r", Some("null"), 5),
            r#"{"command":"mesh/presence-update","payload":{"type":"state","connectionId":"c1","roomName":"r","state":null,"timestamp":5}}"#
        );
    }
}
