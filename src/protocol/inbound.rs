//! Client frames in: each text frame classified as a command, a liveness answer, an
//! invalid frame to answer with an error, or one to drop.
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
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::{LATENCY_RESPONSE, PONG};
use crate::error::CommandError;

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
        if let Some((id, command, payload)) =
            Inbound::read_as_written(text).or_else(|| Inbound::read_well_formed(text))
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

    /// The fastest way, for a frame exactly as mesh's client and `JSON.stringify` write
    /// it: `{"id":N,"command":"name","payload":...}`, in that order, with no whitespace
    /// around the first two fields and nothing to unescape in the name. Only the payload
    /// goes through a JSON parser; any frame that differs in the least goes on to
    /// [`Inbound::read_well_formed`], so what this accepts is read exactly as that would.
    fn read_as_written(text: &'a str) -> Option<(u64, Cow<'a, str>, Value)> {
        let rest = text.strip_prefix(r#"{"id":"#)?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        // JSON numbers have no leading zeros; `parse` refuses what overflows a u64.
        if digits == 0 || (digits > 1 && rest.starts_with('0')) {
            return None;
        }
        let id = rest[..digits].parse().ok()?;
        let rest = rest[digits..].strip_prefix(r#","command":""#)?;
        let name_end = rest
            .bytes()
            .position(|byte| byte == b'"' || byte == b'\\' || byte < 0x20)?;
        let (command, rest) = rest.split_at(name_end);
        let rest = rest.strip_prefix(r#"","payload":"#)?;
        let payload = rest
            .trim_end_matches([' ', '\t', '\n', '\r'])
            .strip_suffix('}')?;
        // Exactly one JSON value, or the frame is not this simple shape (a repeated
        // field after the payload, say).
        let payload = serde_json::from_str(payload).ok()?;
        Some((id, Cow::Borrowed(command), payload))
    }

    /// The fast way: any well-formed command frame, straight into its three fields.
    fn read_well_formed(text: &'a str) -> Option<(u64, Cow<'a, str>, Value)> {
        let WellFormed {
            id,
            command,
            payload,
        } = serde_json::from_str(text).ok()?;
        Some((id, command, payload))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_fastest_way_reads_what_the_fast_way_reads() {
        let frames = [
            r#"{"id":1,"command":"echo","payload":"x"}"#,
            r#"{"id":0,"command":"echo","payload":{"a":[1,2,{"b":null}]}}"#,
            "{\"id\":18446744073709551615,\"command\":\"é/ü\",\"payload\":[] \n}",
            r#"{"id":2,"command":"echo","payload":1,"payload":2}"#,
            r#"{"id":2,"command":"echo","payload":{"a":1}}}"#,
            r#"{"id":2,"command":"echo","payload":{"a":1},"id":3}"#,
            r#"{"id":2,"command":"echo","payload":}"#,
            r#"{"id":2,"command":"echo","payload":"\ud800"}"#,
            r#"{"id":02,"command":"echo","payload":1}"#,
            r#"{"id":18446744073709551616,"command":"echo","payload":1}"#,
            r#"{"id":1,"command":"ec\"ho","payload":1}"#,
            "{\"id\":1,\"command\":\"echo\",\"payload\":1}\u{a0}",
            "{\"id\":1,\"command\":\"ec\nho\",\"payload\":1}",
            r#"{"id":1.5,"command":"echo","payload":1}"#,
        ];
        let mut fastest = 0;
        for frame in frames {
            if let Some(read) = Inbound::read_as_written(frame) {
                fastest += 1;
                assert_eq!(Some(read), Inbound::read_well_formed(frame), "{frame}");
            }
        }
        assert_eq!(
            fastest, 3,
            "the first three frames are read the fastest way"
        );
    }

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
}
