//! What the backends store and read: records, presence views, metadata writes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Delivery;
use crate::error::MeshError;
use crate::merge::MergeStrategy;

/// A local connection's tracked rooms, each with its presence TTL: what one presence
/// refresh extends.
pub type PresenceRefresh = (Arc<str>, Vec<(Arc<str>, Duration)>);

/// A record as stored: its value and version (1 for the first write).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// The record's value.
    pub value: Value,
    /// Its version: 1 for the first write, one more for each write after it.
    pub version: u64,
}

/// What a record update stores, and the deliveries that announce it (built for the
/// stored version + 1, published atomically with the write).
#[derive(Debug, Clone)]
pub struct RecordWrite {
    /// The value to store.
    pub value: Value,
    /// `value` as JSON text, as it is stored and sent.
    pub json: Arc<str>,
    /// What to publish with the write, atomically.
    pub announcements: Vec<Delivery>,
}

/// Computes a record's next value from the stored one (`None` when there is none), or
/// `None` when the write changes nothing.
/// An update may also refuse the write (a limit), which then stores nothing.
pub type RecordUpdater =
    dyn Fn(Option<&StoredRecord>) -> Result<Option<RecordWrite>, MeshError> + Send + Sync;

/// Builds the deliveries that announce a record's deletion from what was stored.
pub type RecordRemover = dyn Fn(&StoredRecord) -> Vec<Delivery> + Send + Sync;

/// A room's presence as subscribers see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PresenceView {
    /// Present connections in join order, with their metadata (`null` when none).
    pub present: Vec<(String, Value)>,
    /// Present connections' states.
    pub states: Vec<(String, Value)>,
}

/// Whose metadata an operation reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetadataOf<'a> {
    /// A registered connection's (it goes when the connection is unregistered).
    Connection(&'a str),
    /// A room's (it stays until deleted, whether or not the room has members).
    Room(&'a str),
}

/// The owners [`Backend::all_metadata`](super::Backend::all_metadata) lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetadataKind {
    /// Every live connection, with `null` for one without metadata, in registration order.
    Connection,
    /// Every room that has metadata, sorted by room name.
    Room,
}

/// A metadata write as a backend applies it: what to combine into the stored value, and
/// how large the result may be. Backends call [`apply`](MetadataWrite::apply) on the stored
/// value inside their atomic step.
#[derive(Debug, Clone)]
pub struct MetadataWrite {
    value: Value,
    strategy: MergeStrategy,
    /// At most this many bytes of JSON text after the merge.
    max_bytes: usize,
    /// Whose metadata, for the error (for example `the metadata of room "lobby"`).
    owner: String,
}

impl MetadataWrite {
    /// A write of `value`, combined with the stored metadata by `strategy`, refused when
    /// the result's JSON text would be over `max_bytes` bytes; `owner` names whose
    /// metadata it is in that refusal (for example `the metadata of room "lobby"`).
    ///
    /// The engine builds these from clients' and the server's writes; a backend only
    /// [`apply`](MetadataWrite::apply)s them. Building one directly is for tests of a
    /// backend, such as the conformance suite (`backend::conformance`).
    pub fn new(value: Value, strategy: MergeStrategy, max_bytes: usize, owner: String) -> Self {
        MetadataWrite {
            value,
            strategy,
            max_bytes,
            owner,
        }
    }

    /// Combines the write into `old`: the new value and its JSON text, or
    /// [`MeshError::TooLarge`] when the result would be over the limit (then nothing may
    /// be stored).
    pub fn apply(&self, old: Option<Value>) -> Result<(Value, String), MeshError> {
        let merged = self.strategy.apply(old, self.value.clone());
        let json = merged.to_string();
        if json.len() > self.max_bytes {
            return Err(MeshError::TooLarge {
                what: self.owner.clone(),
                setting: "max_metadata_bytes",
                limit: self.max_bytes,
                size: json.len(),
            });
        }
        Ok((merged, json))
    }
}

/// Where a channel's stream stands: its `epoch` (which changes whenever the stored stream
/// is reset or lost, so positions of another epoch mean nothing) and the `offset` of a
/// message in it (1 for the first, one more for each message published after it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelPosition {
    /// The stream's identity.
    pub epoch: Arc<str>,
    /// A message's place in the stream; 0 is the place before the first.
    pub offset: u64,
}

/// A channel history read: the newest `limit` messages, or with `since` every message
/// after a position, bounded in bytes (see [`Backend::channel_history`]).
///
/// [`Backend::channel_history`]: super::Backend::channel_history
#[derive(Debug, Clone, Copy)]
pub struct HistoryRead<'a> {
    /// How many of the newest messages to return when there is no `since`, or when the
    /// messages after it cannot all be returned.
    pub limit: usize,
    /// The position the reader holds: when every message after it is kept, exactly those
    /// are returned.
    pub since: Option<Since<'a>>,
    /// Longer messages are left out (only a writer other than the mesh can keep one);
    /// a recovery that would leave one out fails.
    pub max_message_bytes: usize,
    /// The read stops after the message that takes the total past this; a recovery whose
    /// messages add up to more fails.
    pub max_bytes: usize,
}

/// The position a reader holds, for [`HistoryRead::since`].
#[derive(Debug, Clone, Copy)]
pub struct Since<'a> {
    /// The epoch the offset belongs to; `None` takes the offset as the current epoch's.
    pub epoch: Option<&'a str>,
    /// The offset of the newest message the reader has (0: none).
    pub offset: u64,
    /// A recovery of more messages than this fails.
    pub at_most: usize,
}

/// What a channel history read found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelHistory {
    /// The messages, newest first.
    pub messages: Vec<String>,
    /// The position of the newest message published on the channel (offset 0 when there
    /// is none), read with the messages; `None` for a channel without positions (a Redis
    /// plain channel, which other processes publish to).
    pub position: Option<ChannelPosition>,
    /// `messages` are exactly every message after [`HistoryRead::since`].
    pub recovered: bool,
}
