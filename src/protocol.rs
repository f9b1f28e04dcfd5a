//! The mesh wire protocol: frames in and out, as JSON, without I/O.
//!
//! Every frame is one JSON object in one WebSocket text frame (see `PROTOCOL.md`):
//! commands `{"id":N,"command":"name","payload":...}`, replies that repeat `id` and
//! `command`, and pushes `{"command":"name","payload":...}` without an id. This module
//! turns client text into an [`Inbound`] frame and builds the exact JSON of every frame
//! the server sends; golden tests pin those bytes.
//!
//! A frame is read the fast way first, straight into its three fields; one that does not
//! fit goes the slow way, which reads any object and says exactly what is wrong (an error
//! reply when the frame has a usable id, a logged drop otherwise). Two kinds of frames that
//! JavaScript clients write, and that serde_json alone would refuse, are read as
//! JavaScript's `JSON.parse` reads them, so that the client's call is answered rather than
//! left waiting forever:
//! - **Lone surrogates.** `JSON.stringify` writes a string holding half of a surrogate pair
//!   as a lone `\uD800`-style escape, and `JSON.parse` accepts it; serde_json refuses it (a
//!   Rust string cannot hold one). Such a frame runs normally, with every lone surrogate
//!   escape, leading or trailing, anywhere in the frame (payload, keys, command name), read
//!   as U+FFFD; well-formed pairs stay as they are. Only a frame that failed to parse is
//!   scanned for them, so other frames pay nothing.
//! - **Duplicate keys.** The last value of a repeated key wins, for `id`, `command` and
//!   `payload` as inside the payload (where a repeated key keeps its first position, as in
//!   JavaScript). A frame whose fields repeat misses the fast path and takes the slow one.

use std::borrow::Cow;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::{CommandError, MeshError};

/// One outbound text frame, shared: a broadcast serialises once and every recipient's
/// queue holds the same bytes.
pub(crate) type Frame = tokio_tungstenite::tungstenite::Utf8Bytes;

/// The push that tells a client its connection id.
pub const ASSIGN_ID: &str = "mesh/assign-id";
/// Liveness probe sent by the server; the client answers [`PONG`].
pub const PING: &str = "ping";
/// The client's answer to [`PING`]; never replied to.
pub const PONG: &str = "pong";
/// Latency probe sent by the server; the client answers [`LATENCY_RESPONSE`].
pub const LATENCY_REQUEST: &str = "latency:request";
/// The client's answer to [`LATENCY_REQUEST`]; never replied to.
pub const LATENCY_RESPONSE: &str = "latency:response";
/// The push that reports the last measured round trip in milliseconds.
pub const LATENCY: &str = "latency";
/// The push that tells presence subscribers who joined, left, or changed state.
pub const PRESENCE_UPDATE: &str = "mesh/presence-update";
/// The push that carries a channel message to its subscribers.
pub const SUBSCRIPTION_MESSAGE: &str = "mesh/subscription-message";
/// The push that carries a record's new version, whole or as a patch.
pub const RECORD_UPDATE: &str = "mesh/record-update";
/// The push that tells a record's subscribers it was deleted.
pub const RECORD_DELETED: &str = "mesh/record-deleted";
/// The push that tells a collection's subscriber which records joined or left it.
pub const COLLECTION_DIFF: &str = "mesh/collection-diff";

/// A frame received from a client, classified. A command's name borrows from the frame.
#[derive(Debug, PartialEq)]
pub(crate) enum Inbound<'a> {
    /// A well-formed command to run.
    Command {
        id: u64,
        command: Cow<'a, str>,
        payload: Value,
    },
    /// The client's answer to a ping.
    Pong,
    /// The client's answer to a latency request.
    LatencyResponse,
    /// A frame with a usable id that cannot run; it gets this error as its reply.
    Invalid {
        id: u64,
        command: Value,
        error: CommandError,
    },
    /// A frame without a usable id: logged and dropped, never answered.
    Unanswerable { reason: &'static str },
}

/// A well-formed command frame, read without building values for its id and name. Any
/// frame it does not fit goes the slow way, through [`RawFrame`], which says what is wrong.
#[derive(Deserialize)]
struct WellFormed<'a> {
    id: u64,
    #[serde(borrow)]
    command: Cow<'a, str>,
    payload: Value,
}

/// The raw shape of a client frame: its three fields, each `None` when missing (an
/// explicit `null` is `Some(Value::Null)`). A repeated field keeps its last value, as in
/// JavaScript's `JSON.parse`.
struct RawFrame {
    id: Option<Value>,
    command: Option<Value>,
    payload: Option<Value>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum RawField {
    Id,
    Command,
    Payload,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for RawFrame {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct RawFrameVisitor;

        impl<'de> Visitor<'de> for RawFrameVisitor {
            type Value = RawFrame;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFrame, A::Error> {
                let mut frame = RawFrame {
                    id: None,
                    command: None,
                    payload: None,
                };
                while let Some(field) = map.next_key()? {
                    match field {
                        RawField::Id => frame.id = Some(map.next_value()?),
                        RawField::Command => frame.command = Some(map.next_value()?),
                        RawField::Payload => frame.payload = Some(map.next_value()?),
                        RawField::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(frame)
            }
        }

        de.deserialize_map(RawFrameVisitor)
    }
}

impl<'a> Inbound<'a> {
    /// Classifies one text frame from a client.
    pub(crate) fn parse(text: &'a str) -> Inbound<'a> {
        // serde would also read a struct from a JSON array; only an object is a frame.
        if !text.trim_start().starts_with('{') {
            return Inbound::Unanswerable {
                reason: "frame is not a JSON object",
            };
        }
        if let Ok(WellFormed {
            id,
            command,
            payload,
        }) = serde_json::from_str(text)
        {
            return match &*command {
                PONG => Inbound::Pong,
                LATENCY_RESPONSE => Inbound::LatencyResponse,
                _ => Inbound::Command {
                    id,
                    command,
                    payload,
                },
            };
        }
        match Inbound::classify(text) {
            Err(err) if err.is_syntax() => match replace_lone_surrogates(text) {
                Some(repaired) => match Inbound::classify(&repaired) {
                    Ok(inbound) => inbound.into_owned(),
                    Err(_) => Inbound::Unanswerable {
                        reason: "frame is not valid JSON",
                    },
                },
                None => Inbound::Unanswerable {
                    reason: "frame is not valid JSON",
                },
            },
            Err(err) if err.is_data() => Inbound::Unanswerable {
                reason: "frame is not a JSON object",
            },
            Err(_) => Inbound::Unanswerable {
                reason: "frame is not valid JSON",
            },
            Ok(inbound) => inbound,
        }
    }

    /// The slow way: reads any JSON object and says what is wrong with it.
    fn classify(text: &str) -> Result<Inbound<'static>, serde_json::Error> {
        let raw: RawFrame = serde_json::from_str(text)?;
        let id = match raw.id.as_ref().and_then(Value::as_u64) {
            Some(id) => id,
            None => {
                return Ok(Inbound::Unanswerable {
                    reason: "frame has no usable id (a non-negative integer)",
                })
            }
        };
        let command = match raw.command {
            Some(Value::String(command)) => command,
            other => {
                return Ok(Inbound::Invalid {
                    id,
                    command: other.unwrap_or(Value::Null),
                    error: CommandError::invalid("frame has no string \"command\""),
                })
            }
        };
        match command.as_str() {
            PONG => return Ok(Inbound::Pong),
            LATENCY_RESPONSE => return Ok(Inbound::LatencyResponse),
            _ => {}
        }
        Ok(match raw.payload {
            Some(payload) => Inbound::Command {
                id,
                command: Cow::Owned(command),
                payload,
            },
            None => Inbound::Invalid {
                id,
                command: Value::String(command),
                error: CommandError::invalid("frame has no \"payload\""),
            },
        })
    }

    fn into_owned(self) -> Inbound<'static> {
        match self {
            Inbound::Command {
                id,
                command,
                payload,
            } => Inbound::Command {
                id,
                command: Cow::Owned(command.into_owned()),
                payload,
            },
            Inbound::Pong => Inbound::Pong,
            Inbound::LatencyResponse => Inbound::LatencyResponse,
            Inbound::Invalid { id, command, error } => Inbound::Invalid { id, command, error },
            Inbound::Unanswerable { reason } => Inbound::Unanswerable { reason },
        }
    }
}

/// `text` with every lone surrogate escape inside a JSON string (`\uD800`-`\uDFFF` not part
/// of a leading-trailing pair) replaced by `\uFFFD`; `None` when there is none. Both
/// escapes are six ASCII bytes, so the text keeps its length and stays UTF-8. Escaped
/// backslashes and quotes are skipped as escapes, so `"\\ud800"` (a backslash, then the
/// text `ud800`) is left alone.
fn replace_lone_surrogates(text: &str) -> Option<String> {
    const REPLACEMENT: &[u8; 6] = b"\\ufffd";
    let bytes = text.as_bytes();
    let mut repaired: Option<Vec<u8>> = None;
    let mut in_string = false;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'"' => {
                in_string = !in_string;
                at += 1;
            }
            b'\\' if in_string => {
                let Some(unit) = unicode_escape(bytes, at) else {
                    // Any other escape is two bytes (`\\`, `\"`, `\n`, ...).
                    at += 2;
                    continue;
                };
                let paired = (0xD800..=0xDBFF).contains(&unit)
                    && unicode_escape(bytes, at + 6)
                        .is_some_and(|next| (0xDC00..=0xDFFF).contains(&next));
                if paired {
                    at += 12;
                } else {
                    if (0xD800..=0xDFFF).contains(&unit) {
                        repaired.get_or_insert_with(|| bytes.to_vec())[at..at + 6]
                            .copy_from_slice(REPLACEMENT);
                    }
                    at += 6;
                }
            }
            _ => at += 1,
        }
    }
    String::from_utf8(repaired?).ok()
}

/// The UTF-16 unit of the `\uXXXX` escape at `at`, if there is one.
fn unicode_escape(bytes: &[u8], at: usize) -> Option<u16> {
    let escape = bytes.get(at..at + 6)?;
    if escape[..2] != *b"\\u" {
        return None;
    }
    if !escape[2..].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let hex = std::str::from_utf8(&escape[2..]).ok()?;
    u16::from_str_radix(hex, 16).ok()
}

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
    serde_json::to_string(payload).map_err(|err| MeshError::Encode(err.to_string()))
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
}

/// The payload of a `mesh/subscription-message` push, as JSON text.
pub(crate) fn subscription_message_payload(channel: &str, message: &str) -> String {
    to_json(&ChannelMessage { channel, message })
}

/// The JSON text of a `mesh/subscription-message` push.
#[cfg(test)]
fn subscription_message(channel: &str, message: &str) -> String {
    push_with_json(
        SUBSCRIPTION_MESSAGE,
        &subscription_message_payload(channel, message),
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
    fn parses_a_command() {
        assert_eq!(
            Inbound::parse(r#"{"id":7,"command":"echo","payload":{"a":1}}"#),
            Inbound::Command {
                id: 7,
                command: "echo".into(),
                payload: json!({"a":1})
            }
        );
    }

    #[test]
    fn an_escaped_command_name_reads_the_same() {
        assert_eq!(
            Inbound::parse(r#"{"id":7,"command":"ec\u0068o","payload":1}"#),
            Inbound::Command {
                id: 7,
                command: "echo".into(),
                payload: json!(1)
            }
        );
    }

    #[test]
    fn a_duplicated_field_keeps_its_last_value() {
        assert_eq!(
            Inbound::parse(r#"{"id":7,"command":"echo","payload":1,"command":"other"}"#),
            Inbound::Command {
                id: 7,
                command: "other".into(),
                payload: json!(1)
            }
        );
        assert_eq!(
            Inbound::parse(r#"{"id":7,"command":"echo","id":8,"payload":1,"payload":2}"#),
            Inbound::Command {
                id: 8,
                command: "echo".into(),
                payload: json!(2)
            }
        );
        assert!(matches!(
            Inbound::parse(r#"{"id":7,"command":"echo","payload":1,"id":null}"#),
            Inbound::Unanswerable { .. }
        ));
    }

    #[test]
    fn lone_surrogate_escapes_read_as_u_fffd() {
        assert_eq!(
            Inbound::parse(r#"{"id":7,"command":"echo","payload":["\ud800","\uDFFF"]}"#),
            Inbound::Command {
                id: 7,
                command: "echo".into(),
                payload: json!(["\u{fffd}", "\u{fffd}"])
            }
        );
        // Found in the classifying path too: here the payload is missing.
        assert!(matches!(
            Inbound::parse(r#"{"id":7,"command":"ec\ud800"}"#),
            Inbound::Invalid { id: 7, command, .. } if command == json!("ec\u{fffd}")
        ));
    }

    #[test]
    fn the_surrogate_scanner_touches_only_lone_surrogate_escapes() {
        for (text, expected) in [
            (r#""\ud800""#, Some(r#""\ufffd""#)),
            (r#""\udc00\ud800""#, Some(r#""\ufffd\ufffd""#)),
            (r#""\ud800\ud83d\ude00""#, Some(r#""\ufffd\ud83d\ude00""#)),
            (r#""\ud83d\ude00""#, None),
            (r#""\\ud800""#, None),
            (r#""\"\ud800""#, Some(r#""\"\ufffd""#)),
            (r#"{"a":"x"} \ud800"#, None),
            (r#""\ud80""#, None),
            (r#""\u+800""#, None),
            (r#""é\ud800é""#, Some(r#""é\ufffdé""#)),
        ] {
            assert_eq!(replace_lone_surrogates(text).as_deref(), expected, "{text}");
        }
    }

    #[test]
    fn null_payload_is_a_payload() {
        assert!(matches!(
            Inbound::parse(r#"{"id":1,"command":"echo","payload":null}"#),
            Inbound::Command {
                payload: Value::Null,
                ..
            }
        ));
    }

    #[test]
    fn frames_without_usable_id_are_unanswerable() {
        for text in [
            "not json",
            "[1,2]",
            "42",
            r#"{"command":"echo","payload":{}}"#,
            r#"{"id":"7","command":"echo","payload":{}}"#,
            r#"{"id":-1,"command":"echo","payload":{}}"#,
            r#"{"id":1.5,"command":"echo","payload":{}}"#,
        ] {
            assert!(
                matches!(Inbound::parse(text), Inbound::Unanswerable { .. }),
                "{text}"
            );
        }
    }

    #[test]
    fn frames_with_id_but_bad_shape_are_invalid() {
        for text in [
            r#"{"id":3,"payload":{}}"#,
            r#"{"id":3,"command":5,"payload":{}}"#,
            r#"{"id":3,"command":"echo"}"#,
        ] {
            match Inbound::parse(text) {
                Inbound::Invalid { id, error, .. } => {
                    assert_eq!(id, 3);
                    assert_eq!(error.code(), "EINVALID");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn pong_and_latency_response_are_recognised() {
        assert_eq!(
            Inbound::parse(r#"{"id":9,"command":"pong","payload":{}}"#),
            Inbound::Pong
        );
        assert_eq!(
            Inbound::parse(r#"{"id":9,"command":"latency:response","payload":{}}"#),
            Inbound::LatencyResponse
        );
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
            subscription_message("smoke-channel", r#"{"text":"hello channel"}"#),
            r#"{"command":"mesh/subscription-message","payload":{"channel":"smoke-channel","message":"{\"text\":\"hello channel\"}"}}"#
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
