//! The seam between the engine and where shared state lives.
//!
//! The engine never knows which backend it runs on. Everything that must be seen by every
//! instance (which instance holds a connection, rooms, presence, metadata, channel
//! history, records) and every message that must reach connections held elsewhere goes
//! through [`Backend`]. Each instance attaches an [`Inbox`]; the backend calls it with the
//! [`Delivery`]s addressed to that instance, already parsed, once per instance (never once
//! per connection). Deliveries are events, not wire frames: the receiving instance renders
//! them, so a backend never needs to know mesh's protocol.
//!
//! Every operation is async and fallible: an in-memory backend never fails, a networked
//! one may be unreachable for a while, and the engine turns that into `EUNAVAILABLE`.
//!
//! Two backends ship: [`MemoryBackend`] (one process) and `RedisBackend` (many instances on
//! one Redis). With the `unstable-backend` feature the trait is public, so another store
//! (NATS, Postgres, a Redis Cluster variant) can be plugged in with
//! [`MeshBuilder::backend`](crate::MeshBuilder::backend); [`conformance`] is the suite such
//! a backend must pass, and both of ours run it. The trait may change in any release
//! while the feature is called unstable.

mod delivery;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod stored;

#[cfg(feature = "unstable-backend")]
pub mod conformance;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::Value;

use crate::error::MeshError;

pub use self::delivery::{ConnectionOp, Delivery, Inbox, PresenceChange, Push, Topic};
#[cfg(feature = "redis")]
pub use self::redis::{RedisBackend, RedisBackendBuilder};
pub use self::stored::{
    ChannelHistory, ChannelPosition, HistoryRead, MetadataKind, MetadataOf, MetadataWrite,
    PresenceRefresh, PresenceView, RecordRemover, RecordUpdater, RecordWrite, Since, StoredRecord,
};
pub use memory::MemoryBackend;

/// The future every backend operation returns.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, MeshError>> + Send + 'a>>;

/// A ready [`BackendFuture`], for operations that complete without waiting.
fn ready<'a, T: Send + 'a>(value: T) -> BackendFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

/// A fresh channel epoch: random, so that no two streams (processes, lifetimes of a
/// Redis) share one.
pub(crate) fn new_epoch() -> String {
    format!("{:016x}", uuid::Uuid::new_v4().as_u128() as u64)
}

/// Milliseconds since the Unix epoch: the clock events are stamped with.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
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
///
/// The announcements the engine hands to record writes are always addressed
/// to topics ([`Delivery::Record`], [`Delivery::RecordDeleted`],
/// [`Delivery::RecordsChanged`]), never to one connection or instance; a backend may
/// refuse anything else.
///
/// The provided methods are correct for any backend; override them where the store can
/// answer more cheaply.
pub trait Backend: Send + Sync + 'static {
    // Instances and connections.

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

    /// Removes what expired: the connections of dead instances (with their rooms and
    /// presence; a bounded batch per run), presence whose TTL lapsed, and states whose
    /// `expireAfter` lapsed, announcing each `leave` and `state: null`. Every instance may
    /// run it at any time; each entry is removed, and announced, exactly once. Returns how
    /// long until the next sweep is due.
    fn sweep(&self) -> BackendFuture<'_, Duration>;

    /// Whether the store answers, and whether it still knows `instance_id` as a live
    /// instance (`false`: it lost the instance, which is about to register again). A cheap
    /// check, for health endpoints. The default answers `true`: a store in the process is
    /// always reachable and never forgets an instance.
    fn instance_registered<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, bool> {
        let _ = instance_id;
        Box::pin(std::future::ready(Ok(true)))
    }

    // Delivery.

    /// Routes a delivery to the instance(s) that hold its connections, or that listen to
    /// its topic. Returns `false` when it names a connection or instance nobody holds.
    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, bool>;

    /// Makes sure topic deliveries reach `instance_id`; resolves once they do.
    ///
    /// By default nothing is needed: a backend that hands every topic delivery to every
    /// instance (each filters by its own listeners) keeps the default.
    fn subscribe<'a>(&'a self, instance_id: &'a str, topic: &'a Topic) -> BackendFuture<'a, ()> {
        let _ = (instance_id, topic);
        ready(())
    }

    /// Stops topic deliveries to `instance_id` unless its inbox still has listeners
    /// (checked when the change is applied, so a racing subscribe wins). By default
    /// nothing, as for [`subscribe`](Backend::subscribe).
    fn unsubscribe(&self, instance_id: &str, topic: &Topic) {
        let _ = (instance_id, topic);
    }

    // Metadata.

    /// The metadata of a connection or room; `None` when it has none or is unknown.
    fn metadata<'a>(&'a self, of: MetadataOf<'a>) -> BackendFuture<'a, Option<Value>>;

    /// Applies `write` to the metadata of a live connection or of a room; `false` when the
    /// connection is unknown (a room always takes it). A write that
    /// [`apply`](MetadataWrite::apply) refuses stores nothing.
    fn set_metadata<'a>(
        &'a self,
        of: MetadataOf<'a>,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, bool>;

    /// Removes a room's metadata (a connection's goes with the connection).
    fn delete_room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, ()>;

    /// Every metadata of one kind, with its owner (see [`MetadataKind`] for the order).
    fn all_metadata(&self, kind: MetadataKind) -> BackendFuture<'_, Vec<(String, Value)>>;

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

    /// The members of a room in join order, with their metadata (`null` when none).
    fn room_members_with_metadata<'a>(
        &'a self,
        room: &'a str,
    ) -> BackendFuture<'a, Vec<(String, Value)>>;

    /// The members of a room, in join order.
    fn room_members<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Vec<String>> {
        Box::pin(async move {
            let members = self.room_members_with_metadata(room).await?;
            Ok(members.into_iter().map(|(id, _)| id).collect())
        })
    }

    /// The rooms a connection is in.
    fn connection_rooms<'a>(&'a self, connection_id: &'a str) -> BackendFuture<'a, Vec<String>>;

    /// Every room with at least one member, sorted by name.
    fn rooms(&self) -> BackendFuture<'_, Vec<String>>;

    /// Whether two connections are members of at least one common room.
    fn share_a_room<'a>(&'a self, a: &'a str, b: &'a str) -> BackendFuture<'a, bool> {
        Box::pin(async move {
            let rooms_of_a = self.connection_rooms(a).await?;
            if rooms_of_a.is_empty() {
                return Ok(false);
            }
            let rooms_of_b = self.connection_rooms(b).await?;
            Ok(rooms_of_a.iter().any(|room| rooms_of_b.contains(room)))
        })
    }

    // Presence.

    /// Extends the presence of each connection in each of its `(room, ttl)` where it is
    /// still a member; one whose presence had lapsed is present (and announced) again.
    fn refresh_presence<'a>(&'a self, refreshes: &'a [PresenceRefresh]) -> BackendFuture<'a, ()>;

    /// The present connections of a room with their metadata, and their states.
    fn presence<'a>(&'a self, room: &'a str) -> BackendFuture<'a, PresenceView>;

    /// Stores a present connection's state in a room, replacing the previous one, until
    /// `expire_after` (if any), and announces it unless `silent`; with `state: None`,
    /// removes it, announcing `state: null` if there was one (never silently). `false`
    /// when the connection is not present there.
    fn set_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        state: Option<&'a Value>,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> BackendFuture<'a, bool>;

    // Channels.

    /// Keeps `message` as the channel's newest (with at most `history` messages and
    /// `history_bytes` bytes kept, the oldest going first; nothing is kept when `history`
    /// is 0) and announces it to the channel's listeners as [`Delivery::ChannelMessage`],
    /// in one atomic step. The message takes the next offset of the channel's stream,
    /// which the announcement carries; that position is returned. A channel without
    /// positions (a Redis plain channel) announces and returns none.
    fn write_channel<'a>(
        &'a self,
        channel: &'a str,
        message: &'a str,
        history: usize,
        history_bytes: usize,
    ) -> BackendFuture<'a, Option<ChannelPosition>>;

    /// Reads a channel's kept messages, newest first, with the position of the newest
    /// message published (in one atomic step, so the position is exactly the newest
    /// message's that the read could see).
    ///
    /// With [`since`](HistoryRead::since) in the current epoch, when every message after
    /// its offset is still kept (none was published with `history` 0, none was trimmed),
    /// there are at most `at_most` of them and they fit in the bounds, exactly those are
    /// returned, with `recovered`. Otherwise, and without `since`, the newest `limit`:
    /// a message longer than `max_message_bytes` is left out (only a writer other than
    /// the mesh, such as another process appending to a Redis backend's plain channel,
    /// can keep one), and the read stops after the message that takes the total past
    /// `max_bytes` (that one is returned, so the caller can tell that older ones were
    /// left out). A channel never written still has an epoch, kept from then on.
    fn channel_history<'a>(
        &'a self,
        channel: &'a str,
        read: HistoryRead<'a>,
    ) -> BackendFuture<'a, ChannelHistory>;

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
