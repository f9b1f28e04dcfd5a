//! Every key and channel name, each built from the configured prefix. The layout they
//! make is tabled in the module docs of `redis/mod.rs`.
//!
//! Every name carries a hash tag (the text between its first `{` and the next `}`), which
//! decides its Redis Cluster slot: each Lua script touches the keys of one slot only, and
//! a sharded topic channel lives in the slot of the keys whose script publishes on it. A
//! room, or a record, shares a slot with the other rooms (records) of its *bucket*, so that
//! the indexes a script keeps beside it (the rooms with members, the presence deadlines,
//! the record ids) can be per bucket and still change in the same atomic step; connections
//! are in buckets too, so that reading many of them takes one pipeline per bucket. On a
//! single Redis the tags are only characters.

/// The hash tag of a key (what decides its Cluster slot): the text between its first `{`
/// and the next `}` when that is not empty, else the whole key.
pub(super) fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&byte| byte == b'{') {
        if let Some(length) = key[open + 1..].iter().position(|&byte| byte == b'}') {
            if length > 0 {
                return &key[open + 1..open + 1 + length];
            }
        }
    }
    key
}

use std::sync::Arc;

use crate::access::Pattern;
use crate::backend::{Delivery, Topic};

/// How many buckets rooms (and records) are spread over. Part of the key layout: the
/// bucket of a name is `fnv1a32(name) % BUCKETS`, and changing it moves every room.
pub(super) const BUCKETS: u32 = 64;

/// Which pub/sub a channel is on: classic channels reach subscribers on any node of a
/// Cluster; sharded ones (`SPUBLISH`/`SSUBSCRIBE`) stay on the shard of their slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PubSub {
    Classic,
    Sharded,
}

impl PubSub {
    /// The command that publishes on a channel of this kind.
    pub(super) fn publish_command(self) -> &'static str {
        match self {
            PubSub::Classic => "PUBLISH",
            PubSub::Sharded => "SPUBLISH",
        }
    }
}

#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// The channels that are plain Redis channels (see `plain_channel`).
    pub(super) plain_channels: Arc<[Pattern]>,
    /// Whether topics travel on sharded pub/sub (on Redis Cluster).
    pub(super) sharded: bool,
}

/// FNV-1a (32 bits): stable across builds and platforms, as the layout must be.
fn bucket_of(name: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % BUCKETS
}

impl Keys {
    /// Whether mesh channel `channel` is a plain Redis channel: one a pattern given to
    /// `RedisBackendBuilder::plain_channels` matches, and whose name does not start with
    /// the prefix. So a plain channel's Redis name is never one of the engine's own
    /// channels, and a message published on one of those is never read as plain text:
    /// the prefix stays closed to this door. (`build` refuses plain channels with an
    /// empty prefix, under which no name could be told apart.)
    pub(super) fn plain_channel(&self, channel: &str) -> bool {
        !channel.starts_with(&self.prefix)
            && self
                .plain_channels
                .iter()
                .any(|pattern| pattern.matches(channel))
    }

    // The registry: instances and the connections they hold, one slot.

    /// `P{registry}:`, the start of every registry key.
    pub(super) fn registry(&self) -> String {
        format!("{}{{registry}}:", self.prefix)
    }
    pub(super) fn instances(&self) -> String {
        format!("{}instances", self.registry())
    }
    /// Connections of instances past their deadline, not forgotten yet.
    pub(super) fn dead_connections(&self) -> String {
        format!("{}dead-connections", self.registry())
    }
    pub(super) fn instance_connections(&self, instance_id: &str) -> String {
        format!("{}instance:{instance_id}", self.registry())
    }
    pub(super) fn connections(&self) -> String {
        format!("{}connections", self.registry())
    }

    // Connections, by bucket: `P{conns:N}:`. A connection's keys need no index beside
    // them, but reads of many connections at once (members' metadata) then take one
    // pipeline per bucket on a Cluster, not one command each.

    pub(super) fn connection(&self, connection_id: &str) -> String {
        format!(
            "{}{{conns:{}}}:conn:{connection_id}",
            self.prefix,
            bucket_of(connection_id)
        )
    }
    /// The bucket of a connection's keys.
    pub(super) fn connection_bucket(&self, connection_id: &str) -> u32 {
        bucket_of(connection_id)
    }
    /// A connection's metadata (JSON text): a key of its own, so that the metadata of
    /// many connections is one `MGET` per bucket.
    pub(super) fn connection_metadata(&self, connection_id: &str) -> String {
        format!(
            "{}{{conns:{}}}:conn-meta:{connection_id}",
            self.prefix,
            bucket_of(connection_id)
        )
    }
    pub(super) fn connection_rooms(&self, connection_id: &str) -> String {
        format!(
            "{}{{conns:{}}}:conn-rooms:{connection_id}",
            self.prefix,
            bucket_of(connection_id)
        )
    }

    // Rooms, by bucket: `P{rooms:N}:` starts every key of the rooms in bucket N.

    pub(super) fn room_bucket(&self, bucket: u32) -> String {
        format!("{}{{rooms:{bucket}}}:", self.prefix)
    }
    /// The start of every key of `room`'s bucket (the scripts add the rest).
    pub(super) fn room_base(&self, room: &str) -> String {
        self.room_bucket(bucket_of(room))
    }
    pub(super) fn room(&self, room: &str) -> String {
        format!("{}room:{room}", self.room_base(room))
    }
    pub(super) fn room_metadata(&self, room: &str) -> String {
        format!("{}room-meta:{room}", self.room_base(room))
    }
    /// Every room bucket's base.
    pub(super) fn room_buckets(&self) -> impl Iterator<Item = String> + '_ {
        (0..BUCKETS).map(|bucket| self.room_bucket(bucket))
    }

    // Records, by bucket: `P{records:N}:`.

    pub(super) fn record_bucket(&self, bucket: u32) -> String {
        format!("{}{{records:{bucket}}}:", self.prefix)
    }
    fn record_base(&self, id: &str) -> String {
        self.record_bucket(bucket_of(id))
    }
    pub(super) fn record(&self, id: &str) -> String {
        format!("{}record:{id}", self.record_base(id))
    }
    /// The id index of `id`'s bucket.
    pub(super) fn record_ids_of(&self, id: &str) -> String {
        format!("{}record-ids", self.record_base(id))
    }
    /// Every record bucket's id index.
    pub(super) fn record_id_indexes(&self) -> impl Iterator<Item = String> + '_ {
        (0..BUCKETS).map(|bucket| format!("{}record-ids", self.record_bucket(bucket)))
    }

    // Channels: a channel's history keys and its topic share the slot of its name.

    pub(super) fn channel_history(&self, channel: &str) -> String {
        format!("{}history:{{{channel}}}", self.prefix)
    }
    /// The total size of a channel's kept messages, kept beside them by `write_channel`.
    pub(super) fn channel_history_bytes(&self, channel: &str) -> String {
        format!("{}history-bytes:{{{channel}}}", self.prefix)
    }
    /// A plain channel's kept-message count as mesh's last write left it: a different
    /// length tells the next write that another process changed the list.
    pub(super) fn channel_history_length(&self, channel: &str) -> String {
        format!("{}history-length:{{{channel}}}", self.prefix)
    }

    /// Where a channel's stream stands (not for plain channels): its `epoch`, the
    /// `offset` of the newest message published, and `gap`, the offset of the newest one
    /// published without being kept.
    pub(super) fn channel_position(&self, channel: &str) -> String {
        format!("{}history-position:{{{channel}}}", self.prefix)
    }

    // Pub/sub channels.

    /// An instance's own channel: deliveries for the connections it holds, and calls
    /// and answers between instances.
    pub(super) fn instance_channel(&self, instance_id: &str) -> String {
        format!("{}instance:{{{instance_id}}}", self.prefix)
    }
    /// Which pub/sub instance channels are on: sharded on a Cluster, so that each
    /// instance's traffic stays on one shard, and a publish's count of receivers (which
    /// tells whether the holder still listens) is exact; classic `PUBLISH` counts only the
    /// receiving node's subscribers.
    pub(super) fn instance_pubsub(&self) -> PubSub {
        if self.sharded {
            PubSub::Sharded
        } else {
            PubSub::Classic
        }
    }
    pub(super) fn broadcast_channel(&self) -> String {
        format!("{}broadcast", self.prefix)
    }
    /// The pub/sub channel a topic's deliveries travel on: a plain channel's own name,
    /// else the topic's name in the slot of the keys whose scripts publish on it (room
    /// and presence topics in the room's bucket, a record's in its bucket, a channel's
    /// with its history). The scripts build the same names.
    pub(super) fn topic_channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Channel(channel) if self.plain_channel(channel) => channel.to_string(),
            Topic::Room(room) => format!("{}topic:room:{room}", self.room_base(room)),
            Topic::Presence(room) => format!("{}topic:presence:{room}", self.room_base(room)),
            Topic::Record(id) => format!("{}topic:record:{id}", self.record_base(id)),
            Topic::Channel(channel) => format!("{}topic:channel:{{{channel}}}", self.prefix),
            // On a Cluster its listeners subscribe in every record bucket (see
            // `topic_channels`): any one of them reaches them all.
            Topic::Collections(pattern) if self.sharded => {
                format!("{}topic:collections:{pattern}", self.record_base(pattern))
            }
            Topic::Collections(pattern) => format!("{}topic:collections:{pattern}", self.prefix),
        }
    }
    /// Which pub/sub a topic's channel is on. On a single Redis, classic for all. On a
    /// Cluster, sharded, except for plain channels (classic, so that an outside
    /// `PUBLISH` reaches them, as on a single Redis).
    pub(super) fn topic_pubsub(&self, topic: &Topic) -> PubSub {
        let sharded = self.sharded
            && match topic {
                Topic::Channel(channel) => !self.plain_channel(channel),
                Topic::Collections(_) | Topic::Room(_) | Topic::Presence(_) | Topic::Record(_) => {
                    true
                }
            };
        if sharded {
            PubSub::Sharded
        } else {
            PubSub::Classic
        }
    }
    /// Every channel a listener of `topic` subscribes to. One, but for a collections
    /// topic on a Cluster: a record write announces it from the record's slot, on the
    /// topic's channel in the record's bucket, so its listeners subscribe to that
    /// channel in every bucket. (Announced on one classic channel instead, it would reach
    /// other nodes over the cluster bus after the write's reply, and a collection
    /// subscribed just after a write could still hear of it.)
    pub(super) fn topic_channels(&self, topic: &Topic) -> Vec<(String, PubSub)> {
        match topic {
            Topic::Collections(exposure) if self.sharded => (0..BUCKETS)
                .map(|bucket| {
                    (
                        format!("{}topic:collections:{exposure}", self.record_bucket(bucket)),
                        PubSub::Sharded,
                    )
                })
                .collect(),
            _ => vec![(self.topic_channel(topic), self.topic_pubsub(topic))],
        }
    }
    /// The pub/sub channel of a delivery that is not routed to one connection's holder,
    /// and which pub/sub it is on.
    pub(super) fn channel_of(&self, delivery: &Delivery) -> Option<(String, PubSub)> {
        let topic = match delivery {
            Delivery::Broadcast { .. } => return Some((self.broadcast_channel(), PubSub::Classic)),
            Delivery::Answer { to, .. } => {
                return Some((self.instance_channel(to), self.instance_pubsub()))
            }
            Delivery::Topic { topic, .. } => topic.clone(),
            Delivery::ChannelMessage { channel, .. } => Topic::Channel(channel.clone()),
            Delivery::Presence { room, .. } => Topic::Presence(room.clone()),
            Delivery::Record { record_id, .. } | Delivery::RecordDeleted { record_id, .. } => {
                Topic::Record(record_id.clone())
            }
            Delivery::RecordsChanged {
                exposure,
                record_id,
            } if self.sharded => {
                return Some((
                    format!(
                        "{}topic:collections:{exposure}",
                        self.record_base(record_id)
                    ),
                    PubSub::Sharded,
                ))
            }
            Delivery::RecordsChanged { exposure, .. } => Topic::Collections(exposure.clone()),
            Delivery::ToConnection { .. } | Delivery::Close { .. } | Delivery::Call { .. } => {
                return None
            }
        };
        Some((self.topic_channel(&topic), self.topic_pubsub(&topic)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            prefix: "mesh:".into(),
            plain_channels: Arc::from(Vec::new()),
            sharded: true,
        }
    }

    fn tag(key: &str) -> &[u8] {
        hash_tag(key.as_bytes())
    }

    #[test]
    fn hash_tags_are_read_as_redis_reads_them() {
        assert_eq!(hash_tag(b"a{b}c"), b"b");
        assert_eq!(hash_tag(b"a{b}c{d}"), b"b");
        assert_eq!(hash_tag(b"a{}b{c}"), b"a{}b{c}");
        assert_eq!(hash_tag(b"a{b"), b"a{b");
        assert_eq!(hash_tag(b"{a}}"), b"a");
    }

    #[test]
    fn the_keys_one_script_touches_share_a_tag() {
        let keys = keys();
        let room = "lobby";
        let base = keys.room_base(room);
        assert_eq!(tag(&keys.room(room)), tag(&base));
        assert_eq!(tag(&keys.room_metadata(room)), tag(&base));
        assert_eq!(
            tag(&keys.topic_channel(&Topic::Presence(room.into()))),
            tag(&base)
        );
        let id = "task:1";
        assert_eq!(tag(&keys.record(id)), tag(&keys.record_ids_of(id)));
        assert_eq!(
            tag(&keys.topic_channel(&Topic::Record(id.into()))),
            tag(&keys.record(id))
        );
        let cid = "abc";
        assert_eq!(tag(&keys.connection(cid)), tag(&keys.connection_rooms(cid)));
        assert_eq!(
            tag(&keys.connection(cid)),
            tag(&keys.connection_metadata(cid))
        );
        assert_eq!(tag(&keys.instances()), tag(&keys.instance_connections("i")));
        assert_eq!(tag(&keys.instances()), tag(&keys.connections()));
        assert_eq!(tag(&keys.instances()), tag(&keys.dead_connections()));
        // A channel whose name holds braces still keeps its keys in one slot.
        let channel = "a}b{c";
        let history = keys.channel_history(channel);
        assert_eq!(tag(&history), tag(&keys.channel_history_bytes(channel)));
        assert_eq!(tag(&history), tag(&keys.channel_history_length(channel)));
        assert_eq!(tag(&history), tag(&keys.channel_position(channel)));
        assert_eq!(
            tag(&history),
            tag(&keys.topic_channel(&Topic::Channel(channel.into())))
        );
    }

    #[test]
    fn buckets_are_stable() {
        // The layout depends on these values: a change moves every room and record.
        assert_eq!(bucket_of(""), 0x811c_9dc5 % BUCKETS);
        assert_eq!(bucket_of("lobby"), bucket_of("lobby"));
        assert!((0..BUCKETS).contains(&bucket_of("any room")));
    }
}
