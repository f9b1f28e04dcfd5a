//! The pub/sub envelope: a tag byte, then length-prefixed fields (a little-endian `u32`
//! length, then the bytes). Deliveries travel as events (a push's command and payload
//! text, a presence change), never as frames: an instance parses a delivery once, renders
//! it once, and every local recipient shares the same bytes. The Lua scripts publish
//! presence changes in this same layout (see `scripts.rs`).

use std::sync::Arc;

use crate::backend::{ChannelPosition, ConnectionOp, Delivery, PresenceChange, Push, Topic};

const TO_CONNECTION: u8 = b'c';
const BROADCAST: u8 = b'b';
const CLOSE: u8 = b'x';
const TOPIC: u8 = b't';
/// A channel message: channel, text, then its epoch and offset (a plain channel carries
/// the bare text instead, without any envelope). Written by the `write_channel` script.
const CHANNEL_MESSAGE: u8 = b'h';
const CALL: u8 = b'k';
const ANSWER: u8 = b'a';
const RECORD: u8 = b'r';
const RECORDS_CHANGED: u8 = b'm';
const RECORD_DELETED: u8 = b'd';
/// Written by the Lua scripts too: room, connection id, kind (`join`, `leave`, `state`),
/// state JSON text (empty: `null`), timestamp in milliseconds.
const PRESENCE: u8 = b'p';

const JOIN_ROOM: &str = "join";
const LEAVE_ROOM: &str = "leave";
const LEAVE_ALL_ROOMS: &str = "leave-all";

struct Writer(Vec<u8>);

impl Writer {
    fn new(tag: u8, capacity: usize) -> Self {
        let mut out = Vec::with_capacity(1 + capacity);
        out.push(tag);
        Writer(out)
    }

    fn field(mut self, bytes: &[u8]) -> Self {
        // Fields are payloads (bounded by the frame and byte limits) and ids: far below
        // 4 GiB.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    fn push(self, push: &Push) -> Self {
        self.field(push.command.as_bytes())
            .field(push.payload.as_bytes())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (field, rest) = rest.split_at(len);
        self.0 = rest;
        Some(field)
    }

    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn id(&mut self) -> Option<Arc<str>> {
        self.text().map(Arc::from)
    }

    fn push(&mut self) -> Option<Push> {
        Some(Push {
            command: self.id()?,
            payload: self.id()?,
        })
    }

    fn number(&mut self) -> Option<u64> {
        self.text()?.parse().ok()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub(super) fn encode(delivery: &Delivery) -> Vec<u8> {
    match delivery {
        Delivery::ToConnection {
            connection_id,
            push,
        } => Writer::new(TO_CONNECTION, 12 + connection_id.len() + push.len())
            .field(connection_id.as_bytes())
            .push(push),
        Delivery::Broadcast { push } => Writer::new(BROADCAST, 8 + push.len()).push(push),
        Delivery::Close {
            connection_id,
            reason,
        } => Writer::new(CLOSE, 8 + connection_id.len() + reason.len())
            .field(connection_id.as_bytes())
            .field(reason.as_bytes()),
        Delivery::Topic {
            topic,
            push,
            exclude,
        } => {
            let key = topic.key();
            let excluded: usize = exclude.iter().map(|id| 4 + id.len()).sum();
            let mut writer = Writer::new(TOPIC, 12 + key.len() + push.len() + excluded)
                .field(key.as_bytes())
                .push(push);
            for id in exclude.iter() {
                writer = writer.field(id.as_bytes());
            }
            writer
        }
        Delivery::ChannelMessage {
            channel,
            message,
            position,
        } => {
            let writer = Writer::new(CHANNEL_MESSAGE, 32 + channel.len() + message.len())
                .field(channel.as_bytes())
                .field(message.as_bytes());
            match position {
                Some(position) => writer
                    .field(position.epoch.as_bytes())
                    .field(position.offset.to_string().as_bytes()),
                None => writer,
            }
        }
        Delivery::Presence {
            room,
            connection_id,
            change,
            timestamp,
        } => {
            let (kind, state): (&[u8], &[u8]) = match change {
                PresenceChange::Join => (b"join", b""),
                PresenceChange::Leave => (b"leave", b""),
                PresenceChange::State(state) => {
                    (b"state", state.as_deref().map_or(&[][..], str::as_bytes))
                }
            };
            Writer::new(
                PRESENCE,
                64 + room.len() + connection_id.len() + state.len(),
            )
            .field(room.as_bytes())
            .field(connection_id.as_bytes())
            .field(kind)
            .field(state)
            .field(timestamp.to_string().as_bytes())
        }
        Delivery::Record {
            record_id,
            version,
            value,
            patch,
        } => {
            let patch = patch.as_ref().map_or(&[][..], |patch| patch.as_bytes());
            Writer::new(RECORD, 40 + record_id.len() + value.len() + patch.len())
                .field(record_id.as_bytes())
                .field(version.to_string().as_bytes())
                .field(value.as_bytes())
                .field(patch)
        }
        Delivery::RecordDeleted { record_id, version } => {
            Writer::new(RECORD_DELETED, 32 + record_id.len())
                .field(record_id.as_bytes())
                .field(version.to_string().as_bytes())
        }
        Delivery::RecordsChanged {
            exposure,
            record_id,
        } => Writer::new(RECORDS_CHANGED, 8 + exposure.len() + record_id.len())
            .field(exposure.as_bytes())
            .field(record_id.as_bytes()),
        Delivery::Call {
            connection_id,
            from,
            call_id,
            op,
        } => {
            let (name, argument) = match op {
                ConnectionOp::JoinRoom(room) => (JOIN_ROOM, &**room),
                ConnectionOp::LeaveRoom(room) => (LEAVE_ROOM, &**room),
                ConnectionOp::LeaveAllRooms => (LEAVE_ALL_ROOMS, ""),
            };
            Writer::new(CALL, 64 + connection_id.len() + from.len() + argument.len())
                .field(connection_id.as_bytes())
                .field(from.as_bytes())
                .field(call_id.to_string().as_bytes())
                .field(name.as_bytes())
                .field(argument.as_bytes())
        }
        Delivery::Answer {
            to,
            call_id,
            outcome,
        } => {
            let outcome: &[u8] = match outcome {
                Some(true) => b"1",
                Some(false) => b"0",
                None => b"-",
            };
            Writer::new(ANSWER, 32 + to.len())
                .field(to.as_bytes())
                .field(call_id.to_string().as_bytes())
                .field(outcome)
        }
    }
    .0
}

pub(super) fn decode(bytes: &[u8]) -> Option<Delivery> {
    let (&tag, rest) = bytes.split_first()?;
    let mut fields = Reader(rest);
    let delivery = match tag {
        TO_CONNECTION => Delivery::ToConnection {
            connection_id: fields.id()?,
            push: fields.push()?,
        },
        BROADCAST => Delivery::Broadcast {
            push: fields.push()?,
        },
        CLOSE => Delivery::Close {
            connection_id: fields.id()?,
            reason: fields.text()?.to_owned(),
        },
        TOPIC => {
            let topic = Topic::from_key(fields.text()?)?;
            let push = fields.push()?;
            let mut exclude = Vec::new();
            while !fields.is_empty() {
                exclude.push(fields.id()?);
            }
            Delivery::Topic {
                topic,
                push,
                exclude: exclude.into(),
            }
        }
        CHANNEL_MESSAGE => Delivery::ChannelMessage {
            channel: fields.id()?,
            message: fields.id()?,
            position: if fields.is_empty() {
                None
            } else {
                Some(ChannelPosition {
                    epoch: fields.id()?,
                    offset: fields.number()?,
                })
            },
        },
        PRESENCE => {
            let room = fields.id()?;
            let connection_id = fields.id()?;
            let change = match (fields.text()?, fields.text()?) {
                ("join", "") => PresenceChange::Join,
                ("leave", "") => PresenceChange::Leave,
                ("state", "") => PresenceChange::State(None),
                ("state", state) => PresenceChange::State(Some(Arc::from(state))),
                _ => return None,
            };
            Delivery::Presence {
                room,
                connection_id,
                change,
                timestamp: fields.number()?,
            }
        }
        RECORD => Delivery::Record {
            record_id: fields.id()?,
            version: fields.number()?,
            value: fields.id()?,
            // An empty field: the change has no patch form.
            patch: Some(fields.id()?).filter(|patch| !patch.is_empty()),
        },
        RECORD_DELETED => Delivery::RecordDeleted {
            record_id: fields.id()?,
            version: fields.number()?,
        },
        RECORDS_CHANGED => Delivery::RecordsChanged {
            exposure: fields.id()?,
            record_id: fields.id()?,
        },
        CALL => {
            let connection_id = fields.id()?;
            let from = fields.id()?;
            let call_id = fields.number()?;
            let op = match (fields.text()?, fields.id()?) {
                (JOIN_ROOM, room) => ConnectionOp::JoinRoom(room),
                (LEAVE_ROOM, room) => ConnectionOp::LeaveRoom(room),
                (LEAVE_ALL_ROOMS, _) => ConnectionOp::LeaveAllRooms,
                _ => return None,
            };
            Delivery::Call {
                connection_id,
                from,
                call_id,
                op,
            }
        }
        ANSWER => Delivery::Answer {
            to: fields.id()?,
            call_id: fields.number()?,
            outcome: match fields.bytes()? {
                b"1" => Some(true),
                b"0" => Some(false),
                b"-" => None,
                _ => return None,
            },
        },
        _ => return None,
    };
    fields.is_empty().then_some(delivery)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(delivery: Delivery) -> Delivery {
        decode(&encode(&delivery)).unwrap_or_else(|| panic!("did not decode: {delivery:?}"))
    }

    #[test]
    fn every_kind_round_trips() {
        let push = Push {
            command: Arc::from("x"),
            payload: Arc::from(r#""a\nb""#),
        };
        for delivery in [
            Delivery::ToConnection {
                connection_id: Arc::from("abc-1"),
                push: push.clone(),
            },
            Delivery::Broadcast { push: push.clone() },
            Delivery::Close {
                connection_id: Arc::from("abc-1"),
                reason: "bye".to_owned(),
            },
            Delivery::Topic {
                topic: Topic::Room(Arc::from("a\nroom")),
                push,
                exclude: vec![Arc::from("x"), Arc::from("")].into(),
            },
            Delivery::ChannelMessage {
                channel: Arc::from("ext:news"),
                message: Arc::from("{\"a\":1}"),
                position: None,
            },
            Delivery::ChannelMessage {
                channel: Arc::from("news"),
                message: Arc::from("hi"),
                position: Some(ChannelPosition {
                    epoch: Arc::from("e1"),
                    offset: 9_007_199_254_740_993,
                }),
            },
            Delivery::Presence {
                room: Arc::from("lobby"),
                connection_id: Arc::from("c"),
                change: PresenceChange::Join,
                timestamp: 1_795_373_456_537,
            },
            Delivery::Presence {
                room: Arc::from("lobby"),
                connection_id: Arc::from("c"),
                change: PresenceChange::State(Some(Arc::from(r#"{"s":1}"#))),
                timestamp: 5,
            },
            Delivery::Presence {
                room: Arc::from("lobby"),
                connection_id: Arc::from("c"),
                change: PresenceChange::State(None),
                timestamp: 5,
            },
            Delivery::Call {
                connection_id: Arc::from("c"),
                from: Arc::from("i"),
                call_id: 42,
                op: ConnectionOp::JoinRoom(Arc::from("r")),
            },
            Delivery::Record {
                record_id: Arc::from("r"),
                version: 9,
                value: Arc::from(r#"{"a":1}"#),
                patch: None,
            },
            Delivery::RecordDeleted {
                record_id: Arc::from("r"),
                version: 3,
            },
            Delivery::RecordsChanged {
                exposure: Arc::from("^task:"),
                record_id: Arc::from("task:1"),
            },
            Delivery::Answer {
                to: Arc::from("i"),
                call_id: 7,
                outcome: None,
            },
        ] {
            assert_eq!(round_trip(delivery.clone()), delivery);
        }
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(decode(b"").is_none());
        assert!(decode(b"z").is_none());
        assert!(decode(b"c\x05\x00\x00\x00ab").is_none());
        let mut trailing = encode(&Delivery::Broadcast {
            push: Push {
                command: Arc::from("x"),
                payload: Arc::from("{}"),
            },
        });
        trailing.push(0);
        assert!(decode(&trailing).is_none());
    }
}
