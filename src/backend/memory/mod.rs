//! The in-memory backend: zero setup, one process.
//!
//! Several [`Mesh`](crate::Mesh) instances built with clones of one `MemoryBackend` form one
//! mesh inside a process, exactly as instances sharing a Redis do; the conformance suite
//! uses that to run its multi-instance tests on both backends.
//!
//! All state sits behind one lock. An operation that changes presence (or writes a
//! channel message or a record) queues its announcements and delivers them before it
//! releases the lock, so they are ordered exactly as the changes.
//!
//! This file holds the state and the `Backend` implementation, whose every method hands
//! over to a file named for its concern, as in the Redis backend: `liveness.rs` (attach
//! and detach, connection registration, the sweep), `publish.rs`, `metadata.rs`,
//! `rooms.rs`, `presence.rs`, `channels.rs`, `records.rs`.

mod channels;
mod liveness;
mod metadata;
mod presence;
mod publish;
mod records;
mod rooms;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::Value;

use self::channels::{Epoch, History};
use super::{
    now_ms, Backend, BackendFuture, ChannelHistory, ChannelPosition, Delivery, HistoryRead, Inbox,
    MetadataKind, MetadataOf, MetadataWrite, PresenceChange, PresenceRefresh, PresenceView,
    RecordRemover, RecordUpdater, StoredRecord,
};
use crate::error::MeshError;

/// Shared state kept in this process. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<MemoryState>>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct MemoryState {
    /// An instance is alive while its inbox is: a mesh dropped without `shutdown` (its
    /// runtime killed) is swept like a dead Redis instance.
    instances: HashMap<Arc<str>, Weak<dyn Inbox>>,
    connections: HashMap<String, ConnectionEntry>,
    next_sequence: u64,
    /// Room -> member -> join sequence.
    rooms: HashMap<String, HashMap<String, u64>>,
    room_metadata: BTreeMap<String, Value>,
    /// Room -> present connection -> presence deadline.
    presence: HashMap<String, HashMap<String, Instant>>,
    presence_expiry: BTreeSet<(Instant, String, String)>,
    /// Room -> connection -> (state, expiry).
    states: HashMap<String, HashMap<String, (Value, Option<Instant>)>>,
    state_expiry: BTreeSet<(Instant, String, String)>,
    /// Every channel's epoch.
    epoch: Epoch,
    /// Channel -> its stream: kept messages, newest first, and offsets.
    channel_history: HashMap<String, History>,
    records: BTreeMap<String, StoredRecord>,
    /// Announcements of the operation in progress, delivered before its lock is released
    /// so that they are ordered exactly as the changes.
    announcements: Vec<Delivery>,
}

/// A registered connection: its holder, metadata, registration order and rooms.
struct ConnectionEntry {
    instance_id: Arc<str>,
    metadata: Option<Value>,
    sequence: u64,
    rooms: BTreeSet<String>,
}

impl MemoryState {
    fn sequence(&mut self) -> u64 {
        self.next_sequence += 1;
        self.next_sequence
    }

    fn announce(&mut self, room: &str, connection_id: &str, change: PresenceChange) {
        self.announcements.push(Delivery::Presence {
            room: Arc::from(room),
            connection_id: Arc::from(connection_id),
            change,
            timestamp: now_ms(),
        });
    }

    /// Delivers the pending announcements to every live instance.
    fn flush(&mut self) {
        if self.announcements.is_empty() {
            return;
        }
        let inboxes: Vec<Arc<dyn Inbox>> =
            self.instances.values().filter_map(Weak::upgrade).collect();
        for announcement in self.announcements.drain(..) {
            for inbox in &inboxes {
                inbox.deliver(announcement.clone());
            }
        }
    }
}

impl MemoryBackend {
    /// A new, empty in-memory mesh.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // A poisoned lock only means another thread panicked mid-update of plain maps;
        // the maps themselves are still consistent enough to keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BackendFuture<'a, T> {
    settled(Ok(value))
}

fn settled<'a, T: Send + 'a>(result: Result<T, MeshError>) -> BackendFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

/// `now + after`, saturating far in the future instead of overflowing.
fn deadline(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Backend for MemoryBackend {
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()> {
        self.attach_instance(instance_id, inbox);
        ready(())
    }

    fn detach<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, ()> {
        self.detach_instance(instance_id);
        ready(())
    }

    fn register_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        self.register(instance_id, connection_id);
        ready(())
    }

    fn unregister_connection<'a>(
        &'a self,
        _instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        self.unregister(connection_id);
        ready(())
    }

    fn sweep(&self) -> BackendFuture<'_, Duration> {
        ready(self.sweep_expired())
    }

    // Topic deliveries reach every instance in-process, and each filters by its own
    // listeners: the default (no) subscriptions are right.
    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, bool> {
        ready(self.publish_delivery(delivery))
    }

    fn metadata<'a>(&'a self, of: MetadataOf<'a>) -> BackendFuture<'a, Option<Value>> {
        ready(self.read_metadata(of))
    }

    fn set_metadata<'a>(
        &'a self,
        of: MetadataOf<'a>,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, bool> {
        settled(self.write_metadata(of, write))
    }

    fn delete_room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, ()> {
        self.remove_room_metadata(room);
        ready(())
    }

    fn all_metadata(&self, kind: MetadataKind) -> BackendFuture<'_, Vec<(String, Value)>> {
        ready(self.list_metadata(kind))
    }

    fn join_room<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        presence_ttl: Option<Duration>,
    ) -> BackendFuture<'a, bool> {
        ready(self.join(connection_id, room, presence_ttl))
    }

    fn leave_room<'a>(&'a self, connection_id: &'a str, room: &'a str) -> BackendFuture<'a, bool> {
        ready(self.leave(connection_id, room))
    }

    fn room_members<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Vec<String>> {
        ready(self.members(room))
    }

    fn room_members_with_metadata<'a>(
        &'a self,
        room: &'a str,
    ) -> BackendFuture<'a, Vec<(String, Value)>> {
        ready(self.members_with_metadata(room))
    }

    fn connection_rooms<'a>(&'a self, connection_id: &'a str) -> BackendFuture<'a, Vec<String>> {
        ready(self.rooms_of(connection_id))
    }

    fn rooms(&self) -> BackendFuture<'_, Vec<String>> {
        ready(self.list_rooms())
    }

    fn share_a_room<'a>(&'a self, a: &'a str, b: &'a str) -> BackendFuture<'a, bool> {
        ready(self.in_a_common_room(a, b))
    }

    fn refresh_presence<'a>(&'a self, refreshes: &'a [PresenceRefresh]) -> BackendFuture<'a, ()> {
        self.extend_presence(refreshes);
        ready(())
    }

    fn presence<'a>(&'a self, room: &'a str) -> BackendFuture<'a, PresenceView> {
        ready(self.presence_view(room))
    }

    fn set_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        state: Option<&'a Value>,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> BackendFuture<'a, bool> {
        ready(match state {
            Some(state) => {
                self.write_presence_state(connection_id, room, state, expire_after, silent)
            }
            None => self.remove_presence_state(connection_id, room),
        })
    }

    fn write_channel<'a>(
        &'a self,
        channel: &'a str,
        message: &'a str,
        history: usize,
        history_bytes: usize,
    ) -> BackendFuture<'a, Option<ChannelPosition>> {
        ready(Some(self.append_to_channel(
            channel,
            message,
            history,
            history_bytes,
        )))
    }

    fn channel_history<'a>(
        &'a self,
        channel: &'a str,
        read: HistoryRead<'a>,
    ) -> BackendFuture<'a, ChannelHistory> {
        ready(self.read_channel_history(channel, read))
    }

    fn records<'a>(&'a self, ids: &'a [String]) -> BackendFuture<'a, Vec<Option<StoredRecord>>> {
        ready(self.read_records(ids))
    }

    fn record_ids<'a>(&'a self, prefix: &'a str) -> BackendFuture<'a, Vec<String>> {
        ready(self.list_record_ids(prefix))
    }

    fn update_record<'a>(
        &'a self,
        id: &'a str,
        update: &'a RecordUpdater,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        settled(self.write_record(id, update))
    }

    fn delete_record<'a>(
        &'a self,
        id: &'a str,
        announce: &'a RecordRemover,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        ready(self.remove_record(id, announce))
    }
}
