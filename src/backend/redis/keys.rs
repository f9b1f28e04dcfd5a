//! Every key and channel name, each built from the configured prefix. The layout they
//! make is tabled in the module docs of `redis/mod.rs`; the Lua scripts (`scripts.rs`)
//! build the same names from the prefix themselves.

use std::sync::Arc;

use crate::access::Pattern;
use crate::backend::{Delivery, Topic};

#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// The channels that are plain Redis channels (see `plain_channel`).
    pub(super) plain_channels: Arc<[Pattern]>,
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

    pub(super) fn instances(&self) -> String {
        format!("{}instances", self.prefix)
    }
    pub(super) fn instance_connections(&self, instance_id: &str) -> String {
        format!("{}instance:{instance_id}:connections", self.prefix)
    }
    pub(super) fn connections(&self) -> String {
        format!("{}connections", self.prefix)
    }
    pub(super) fn connection(&self, connection_id: &str) -> String {
        format!("{}conn:{connection_id}", self.prefix)
    }
    pub(super) fn instance_channel(&self, instance_id: &str) -> String {
        format!("{}instance:{instance_id}", self.prefix)
    }
    pub(super) fn broadcast_channel(&self) -> String {
        format!("{}broadcast", self.prefix)
    }
    /// The pub/sub channel a topic's deliveries travel on: a plain channel's own name,
    /// else the topic's name under the prefix.
    pub(super) fn topic_channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Channel(channel) if self.plain_channel(channel) => channel.to_string(),
            _ => format!("{}topic:{}", self.prefix, topic.key()),
        }
    }
    pub(super) fn connection_rooms(&self, connection_id: &str) -> String {
        format!("{}conn:{connection_id}:rooms", self.prefix)
    }
    pub(super) fn room(&self, room: &str) -> String {
        format!("{}room:{room}", self.prefix)
    }
    pub(super) fn rooms(&self) -> String {
        format!("{}rooms", self.prefix)
    }
    pub(super) fn room_metadata(&self, room: &str) -> String {
        format!("{}room-meta:{room}", self.prefix)
    }
    pub(super) fn rooms_with_metadata(&self) -> String {
        format!("{}rooms-with-meta", self.prefix)
    }
    pub(super) fn channel_history(&self, channel: &str) -> String {
        format!("{}history:{channel}", self.prefix)
    }
    /// The total size of a channel's kept messages, kept beside them by `write_channel`.
    pub(super) fn channel_history_bytes(&self, channel: &str) -> String {
        format!("{}history-bytes:{channel}", self.prefix)
    }
    /// A plain channel's kept-message count as mesh's last write left it: a different
    /// length tells the next write that another process changed the list.
    pub(super) fn channel_history_length(&self, channel: &str) -> String {
        format!("{}history-length:{channel}", self.prefix)
    }
    pub(super) fn record(&self, id: &str) -> String {
        format!("{}record:{id}", self.prefix)
    }
    pub(super) fn record_ids(&self) -> String {
        format!("{}record-ids", self.prefix)
    }
    /// The pub/sub channel of a delivery that is not routed to one connection's holder.
    pub(super) fn channel_of(&self, delivery: &Delivery) -> Option<String> {
        Some(match delivery {
            Delivery::Broadcast { .. } => self.broadcast_channel(),
            Delivery::Topic { topic, .. } => self.topic_channel(topic),
            Delivery::ChannelMessage { channel, .. } => {
                self.topic_channel(&Topic::Channel(channel.clone()))
            }
            Delivery::Presence { room, .. } => self.topic_channel(&Topic::Presence(room.clone())),
            Delivery::Record { record_id, .. } | Delivery::RecordDeleted { record_id, .. } => {
                self.topic_channel(&Topic::Record(record_id.clone()))
            }
            Delivery::RecordsChanged { exposure, .. } => {
                self.topic_channel(&Topic::Collections(exposure.clone()))
            }
            Delivery::Answer { to, .. } => self.instance_channel(to),
            Delivery::ToConnection { .. } | Delivery::Close { .. } | Delivery::Call { .. } => {
                return None
            }
        })
    }
}
