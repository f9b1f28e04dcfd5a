//! The seam between the engine and where shared state lives.
//!
//! The engine never knows which backend it runs on. Everything that must be seen by every
//! instance (which instance holds a connection, connection metadata) and every message
//! that must reach connections held elsewhere goes through [`Backend`]. Each instance
//! attaches an [`Inbox`]; the backend calls it with the [`Delivery`]s addressed to that
//! instance, already parsed, once per instance (never once per connection).
//!
//! Every operation is async and fallible: an in-memory backend never fails, a networked
//! one may be unreachable for a while, and the engine turns that into `EUNAVAILABLE`.

mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::Value;

use crate::error::MeshError;
use crate::metadata::MetadataWrite;
use crate::topics::Topic;

#[cfg(feature = "redis")]
pub use self::redis::{RedisBackend, RedisBackendBuilder};
pub use memory::MemoryBackend;

/// The future every backend operation returns.
pub(crate) type BackendFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, MeshError>> + Send + 'a>>;

/// A push as deliveries carry it: its command and its payload as JSON text. The backends
/// never build or read frames: each receiving instance renders a push once, and every
/// local recipient shares those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Push {
    pub(crate) command: Arc<str>,
    pub(crate) payload: Arc<str>,
}

impl Push {
    /// Its size in bytes (command and payload).
    pub(crate) fn len(&self) -> usize {
        self.command.len() + self.payload.len()
    }
}

/// A presence change, as deliveries carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PresenceChange {
    Join,
    Leave,
    /// A new state (JSON text), or `None` when it was cleared or expired.
    State(Option<Arc<str>>),
}

/// Milliseconds since the Unix epoch: the clock events are stamped with.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// A message for connections that some instance holds, or for an instance itself.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Delivery {
    /// A push for one connection.
    ToConnection { connection_id: Arc<str>, push: Push },
    /// A push for every connection of every instance.
    Broadcast { push: Push },
    /// Close one connection with a normal close frame and this reason.
    Close {
        connection_id: Arc<str>,
        reason: String,
    },
    /// A push for every listener of a topic, on every instance, except `exclude`.
    Topic {
        topic: Topic,
        push: Push,
        exclude: Arc<[Arc<str>]>,
    },
    /// A presence change in a room, for the listeners of its presence on every instance,
    /// stamped (milliseconds since the epoch) where it was made.
    Presence {
        room: Arc<str>,
        connection_id: Arc<str>,
        change: PresenceChange,
        timestamp: u64,
    },
    /// A record's new version for its listeners on every instance, as JSON texts: each
    /// instance builds the frames its listeners need (whole values, patches when the
    /// change has one, or both for a patch listener whose collection needs the value).
    Record {
        record_id: Arc<str>,
        version: u64,
        value: Arc<str>,
        patch: Option<Arc<str>>,
    },
    /// A record was deleted at `version`: its listeners are told, and its direct
    /// subscriptions end (as mesh's client drops them on the notice).
    RecordDeleted { record_id: Arc<str>, version: u64 },
    /// Records that the collections of one exposure may hold changed: instances with
    /// subscribers of those collections re-resolve them.
    RecordsChanged {
        exposure: Arc<str>,
        /// The record that changed: only collections that can hold it re-resolve.
        record_id: Arc<str>,
    },
    /// An operation on a connection, for the instance that holds it to run; it answers
    /// with [`Delivery::Answer`] to instance `from`.
    Call {
        connection_id: Arc<str>,
        from: Arc<str>,
        call_id: u64,
        op: ConnectionOp,
    },
    /// The outcome of a [`Delivery::Call`], for the instance that made it: `None` when
    /// the operation failed.
    Answer {
        to: Arc<str>,
        call_id: u64,
        outcome: Option<bool>,
    },
}

/// What one instance can ask the holder of a connection to do: membership changes run on
/// the connection's own instance, which keeps its topic index in step with the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnectionOp {
    JoinRoom(Arc<str>),
    LeaveRoom(Arc<str>),
    LeaveAllRooms,
}

/// The receiving end of an instance: it hands deliveries to local connections.
pub(crate) trait Inbox: Send + Sync + 'static {
    /// Delivers to local connections. Must not block: it only enqueues or spawns.
    fn deliver(&self, delivery: Delivery);

    /// Topic deliveries may have been lost (the pub/sub connection was re-established):
    /// catch up what can be caught up from stored state.
    fn resubscribed(&self);

    /// The backend lost this instance's registration (a restarted Redis, or a stall long
    /// enough to be swept as dead): its connections' rooms, presence and metadata are
    /// gone, so it closes them, and their clients reconnect and set everything up again.
    fn registration_lost(&self);

    /// Whether a local connection listens to `topic` (a subscription to it is still needed).
    fn has_listeners(&self, topic: &Topic) -> bool;

    /// Every topic a local connection listens to (to subscribe again after a reconnect).
    fn topics(&self) -> Vec<Topic>;
}

/// A local connection's tracked rooms, each with its presence TTL: what one presence
/// refresh extends.
pub(crate) type PresenceRefresh = (Arc<str>, Vec<(Arc<str>, Duration)>);

/// A record as stored: its value and version (1 for the first write).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredRecord {
    pub(crate) value: Value,
    pub(crate) version: u64,
}

/// What a record update stores, and the deliveries that announce it (built for the
/// stored version + 1, published atomically with the write).
#[derive(Debug, Clone)]
pub(crate) struct RecordWrite {
    pub(crate) value: Value,
    /// `value` as JSON text, as it is stored and sent.
    pub(crate) json: Arc<str>,
    pub(crate) announcements: Vec<Delivery>,
}

/// Computes a record's next value from the stored one (`None` when there is none), or
/// `None` when the write changes nothing.
/// An update may also refuse the write (a limit), which then stores nothing.
pub(crate) type RecordUpdater =
    dyn Fn(Option<&StoredRecord>) -> Result<Option<RecordWrite>, MeshError> + Send + Sync;

/// Builds the deliveries that announce a record's deletion from what was stored.
pub(crate) type RecordRemover = dyn Fn(&StoredRecord) -> Vec<Delivery> + Send + Sync;

/// A room's presence as subscribers see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PresenceView {
    /// Present connections in join order, with their metadata (`null` when none).
    pub(crate) present: Vec<(String, Value)>,
    /// Present connections' states.
    pub(crate) states: Vec<(String, Value)>,
}

/// Shared state and cross-instance delivery.
///
/// Room and presence operations take connection ids; they are called by the instance
/// that holds the connection (see [`ConnectionOp`]), except the read-only ones.
///
/// Every operation that changes presence announces the change itself, as part of the
/// same atomic step (a Redis script publishes from inside; the memory backend delivers
/// under its lock). So announcements are exactly as ordered as the changes, whichever
/// instances make them, and a change whose reply is lost is still announced.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Joins the mesh as `instance_id`; from now on deliveries for it reach `inbox`.
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()>;

    /// Leaves the mesh: forgets the instance and every connection it still holds.
    fn detach<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, ()>;

    /// Records that `instance_id` holds `connection_id`.
    fn register_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()>;

    /// Forgets a connection and everything stored for it (metadata, rooms, presence),
    /// announcing a presence `leave` in every room where it was present.
    fn unregister_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()>;

    /// A connection's metadata; `None` when it has none or is unknown.
    fn connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
    ) -> BackendFuture<'a, Option<Value>>;

    /// Applies `write` to a live connection's metadata; `false` when the connection is
    /// unknown. A write that `apply` refuses stores nothing.
    fn set_connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, bool>;

    /// Every live connection with its metadata (`null` when none), in registration order.
    fn all_connection_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>>;

    /// Routes a delivery to the instance(s) that hold its connections. Returns `false`
    /// when it names a connection or instance nobody holds.
    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, bool>;

    /// Makes sure topic deliveries reach `instance_id`; resolves once they do.
    fn subscribe<'a>(&'a self, instance_id: &'a str, topic: &'a Topic) -> BackendFuture<'a, ()>;

    /// Stops topic deliveries to `instance_id` unless its inbox still has listeners
    /// (checked when the change is applied, so a racing subscribe wins).
    fn unsubscribe(&self, instance_id: &str, topic: &Topic);

    // Rooms.

    /// Adds a registered connection to a room; with `presence_ttl`, also makes it present
    /// until now + ttl, announcing `join` if it was not present. `false` when the
    /// connection is not registered.
    fn join_room<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        presence_ttl: Option<Duration>,
    ) -> BackendFuture<'a, bool>;

    /// Removes a connection from a room, with its presence and presence state there
    /// (announcing `leave` if it was present). Returns whether it was a member.
    fn leave_room<'a>(&'a self, connection_id: &'a str, room: &'a str) -> BackendFuture<'a, bool>;

    /// The members of a room, in join order.
    fn room_members<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Vec<String>>;

    /// The members of a room in join order, with their metadata (`null` when none).
    fn room_members_with_metadata<'a>(
        &'a self,
        room: &'a str,
    ) -> BackendFuture<'a, Vec<(String, Value)>>;

    /// The rooms a connection is in.
    fn connection_rooms<'a>(&'a self, connection_id: &'a str) -> BackendFuture<'a, Vec<String>>;

    /// Every room with at least one member, sorted by name.
    fn rooms(&self) -> BackendFuture<'_, Vec<String>>;

    /// Whether two connections are members of at least one common room.
    fn share_a_room<'a>(&'a self, a: &'a str, b: &'a str) -> BackendFuture<'a, bool>;

    /// A room's metadata; `None` when it has none.
    fn room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Option<Value>>;

    /// Applies `write` to a room's metadata. A write that `apply` refuses stores nothing.
    fn set_room_metadata<'a>(
        &'a self,
        room: &'a str,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, ()>;

    /// Removes a room's metadata.
    fn delete_room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, ()>;

    /// Every room that has metadata, with it, sorted by room name.
    fn all_room_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>>;

    // Presence.

    /// Extends the presence of each connection in each of its `(room, ttl)` where it is
    /// still a member; one whose presence had lapsed is present (and announced) again.
    fn refresh_presence<'a>(&'a self, refreshes: &'a [PresenceRefresh]) -> BackendFuture<'a, ()>;

    /// The present connections of a room with their metadata, and their states.
    fn presence<'a>(&'a self, room: &'a str) -> BackendFuture<'a, PresenceView>;

    /// Stores a present connection's state in a room, replacing the previous one, until
    /// `expire_after` (if any), and announces it unless `silent`. `false` when the
    /// connection is not present there.
    fn set_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        state: &'a Value,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> BackendFuture<'a, bool>;

    /// Removes a present connection's state, announcing `state: null` if it had one.
    /// `false` when the connection is not present there.
    fn clear_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
    ) -> BackendFuture<'a, bool>;

    /// Removes what expired: the connections of dead instances (with their rooms and
    /// presence; a bounded batch per run), presence whose TTL lapsed, and states whose
    /// `expireAfter` lapsed, announcing each `leave` and `state: null`. Every instance may
    /// run it at any time; each entry is removed, and announced, exactly once. Returns how
    /// long until the next sweep is due.
    fn sweep(&self) -> BackendFuture<'_, Duration>;

    // Channels.

    /// Keeps `message` as the channel's newest (with at most `history` messages and
    /// `history_bytes` bytes kept, the oldest going first; nothing is kept when `history`
    /// is 0) and publishes `announcement`, in one atomic step.
    fn write_channel<'a>(
        &'a self,
        channel: &'a str,
        message: &'a str,
        history: usize,
        history_bytes: usize,
        announcement: Delivery,
    ) -> BackendFuture<'a, ()>;

    /// The newest `limit` messages of a channel, newest first.
    fn channel_history<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BackendFuture<'a, Vec<String>>;

    // Records.

    /// The stored records with these ids, in the same order (`None` for a missing one).
    fn records<'a>(&'a self, ids: &'a [String]) -> BackendFuture<'a, Vec<Option<StoredRecord>>>;

    /// The ids of the stored records that start with `prefix` (every one for `""`), in
    /// byte order: read from an ordered index, so a narrow prefix costs what it lists.
    fn record_ids<'a>(&'a self, prefix: &'a str) -> BackendFuture<'a, Vec<String>>;

    /// Replaces a record with what `update` computes from the stored one, as version + 1,
    /// publishing the write's announcements atomically with it. Concurrent writers, on
    /// any instance, are serialised: `update` runs again on the newer record when another
    /// write got in first, so no version is used twice and no write is lost. Returns what
    /// was stored, or `None` when `update` found nothing to change.
    fn update_record<'a>(
        &'a self,
        id: &'a str,
        update: &'a RecordUpdater,
    ) -> BackendFuture<'a, Option<StoredRecord>>;

    /// Deletes a record, publishing what `announce` builds from it atomically with the
    /// deletion. Returns what was stored (`None` when nothing was).
    fn delete_record<'a>(
        &'a self,
        id: &'a str,
        announce: &'a RecordRemover,
    ) -> BackendFuture<'a, Option<StoredRecord>>;
}
