//! The in-memory backend: zero setup, one process.
//!
//! Several [`Mesh`](crate::Mesh) instances built with clones of one `MemoryBackend` form one
//! mesh inside a process, exactly as instances sharing a Redis do; the conformance suite
//! uses that to run its multi-instance tests on both backends.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::Value;

use super::{
    now_ms, Backend, BackendFuture, Delivery, Inbox, PresenceChange, PresenceRefresh, PresenceView,
    RecordRemover, RecordUpdater, StoredRecord,
};
use crate::metadata::MetadataWrite;
use crate::topics::Topic;

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

/// How often dead instances are looked for when nothing expires sooner.
const DEAD_INSTANCE_CHECK: Duration = Duration::from_secs(1);

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
    /// Channel -> its kept messages, newest first.
    channel_history: HashMap<String, History>,
    records: BTreeMap<String, StoredRecord>,
    /// Announcements of the operation in progress, delivered before its lock is released
    /// so that they are ordered exactly as the changes.
    announcements: Vec<Delivery>,
}

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

    fn is_member(&self, connection_id: &str, room: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|members| members.contains_key(connection_id))
    }

    fn is_present(&self, connection_id: &str, room: &str, now: Instant) -> bool {
        self.presence
            .get(room)
            .and_then(|present| present.get(connection_id))
            .is_some_and(|deadline| *deadline > now)
    }

    /// Sets a presence deadline; returns whether the connection was absent before.
    fn make_present(&mut self, connection_id: &str, room: &str, deadline: Instant) -> bool {
        let previous = self
            .presence
            .entry(room.to_owned())
            .or_default()
            .insert(connection_id.to_owned(), deadline);
        if let Some(previous) = previous {
            self.presence_expiry
                .remove(&(previous, room.to_owned(), connection_id.to_owned()));
        }
        self.presence_expiry
            .insert((deadline, room.to_owned(), connection_id.to_owned()));
        previous.is_none()
    }

    /// Removes a presence entry and its state; returns whether there was one.
    fn remove_presence(&mut self, connection_id: &str, room: &str) -> bool {
        self.remove_state(connection_id, room);
        let Some(present) = self.presence.get_mut(room) else {
            return false;
        };
        let Some(deadline) = present.remove(connection_id) else {
            return false;
        };
        if present.is_empty() {
            self.presence.remove(room);
        }
        self.presence_expiry
            .remove(&(deadline, room.to_owned(), connection_id.to_owned()));
        true
    }

    /// Removes a presence state; returns whether there was one.
    fn remove_state(&mut self, connection_id: &str, room: &str) -> bool {
        let Some(states) = self.states.get_mut(room) else {
            return false;
        };
        let Some((_, expiry)) = states.remove(connection_id) else {
            return false;
        };
        if states.is_empty() {
            self.states.remove(room);
        }
        if let Some(expiry) = expiry {
            self.state_expiry
                .remove(&(expiry, room.to_owned(), connection_id.to_owned()));
        }
        true
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

    /// Removes a connection from a room (and its presence there, announcing `leave`);
    /// returns whether it was a member.
    fn leave(&mut self, connection_id: &str, room: &str) -> bool {
        let was_member = match self.rooms.get_mut(room) {
            Some(members) => {
                let removed = members.remove(connection_id).is_some();
                if members.is_empty() {
                    self.rooms.remove(room);
                }
                removed
            }
            None => false,
        };
        if let Some(entry) = self.connections.get_mut(connection_id) {
            entry.rooms.remove(room);
        }
        if self.remove_presence(connection_id, room) {
            self.announce(room, connection_id, PresenceChange::Leave);
        }
        was_member
    }

    /// Forgets a connection entirely, announcing its presence `leave`s.
    fn remove_connection(&mut self, connection_id: &str) {
        let Some(entry) = self.connections.remove(connection_id) else {
            return;
        };
        for room in entry.rooms {
            self.leave(connection_id, &room);
        }
    }

    /// Forgets every connection an instance holds.
    fn remove_instance(&mut self, instance_id: &str) {
        self.instances.remove(instance_id);
        let held: Vec<String> = self
            .connections
            .iter()
            .filter(|(_, entry)| &*entry.instance_id == instance_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in held {
            self.remove_connection(&id);
        }
    }

    fn members_with_metadata(&self, members: Vec<String>) -> Vec<(String, Value)> {
        members
            .into_iter()
            .map(|id| {
                let metadata = self
                    .connections
                    .get(&id)
                    .and_then(|entry| entry.metadata.clone())
                    .unwrap_or(Value::Null);
                (id, metadata)
            })
            .collect()
    }

    fn members(&self, room: &str) -> Vec<String> {
        let Some(members) = self.rooms.get(room) else {
            return Vec::new();
        };
        let mut members: Vec<_> = members.iter().collect();
        members.sort_unstable_by_key(|(_, sequence)| **sequence);
        members.into_iter().map(|(id, _)| id.clone()).collect()
    }

    fn present(&self, room: &str, now: Instant) -> Vec<String> {
        self.members(room)
            .into_iter()
            .filter(|id| self.is_present(id, room, now))
            .collect()
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

/// One channel's kept messages, newest first, and their size in bytes.
#[derive(Default)]
struct History {
    messages: VecDeque<String>,
    bytes: usize,
}

impl History {
    /// Keeps `message` as the newest, then drops the oldest until at most `count`
    /// messages and `max_bytes` bytes remain.
    fn push(&mut self, message: &str, count: usize, max_bytes: usize) {
        self.messages.push_front(message.to_owned());
        self.bytes += message.len();
        while self.messages.len() > count || self.bytes > max_bytes {
            match self.messages.pop_back() {
                Some(oldest) => self.bytes -= oldest.len(),
                None => break,
            }
        }
        if self.messages.capacity() > 2 * self.messages.len() + 16 {
            self.messages.shrink_to_fit();
        }
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BackendFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl Backend for MemoryBackend {
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()> {
        self.lock().instances.insert(instance_id, inbox);
        ready(())
    }

    fn detach<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        state.remove_instance(instance_id);
        state.flush();
        ready(())
    }

    fn register_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        let instance_id = state
            .instances
            .get_key_value(instance_id)
            .map(|(key, _)| key.clone())
            .unwrap_or_else(|| Arc::from(instance_id));
        let sequence = state.sequence();
        state.connections.insert(
            connection_id.to_owned(),
            ConnectionEntry {
                instance_id,
                metadata: None,
                sequence,
                rooms: BTreeSet::new(),
            },
        );
        ready(())
    }

    fn unregister_connection<'a>(
        &'a self,
        _instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        state.remove_connection(connection_id);
        state.flush();
        ready(())
    }

    fn connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
    ) -> BackendFuture<'a, Option<Value>> {
        let metadata = self
            .lock()
            .connections
            .get(connection_id)
            .and_then(|entry| entry.metadata.clone());
        ready(metadata)
    }

    fn set_connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, bool> {
        let mut state = self.lock();
        let Some(entry) = state.connections.get_mut(connection_id) else {
            return ready(false);
        };
        match write.apply(entry.metadata.clone()) {
            Ok((merged, _)) => {
                entry.metadata = Some(merged);
                ready(true)
            }
            Err(err) => Box::pin(std::future::ready(Err(err))),
        }
    }

    fn all_connection_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>> {
        let state = self.lock();
        let mut all: Vec<_> = state
            .connections
            .iter()
            .map(|(id, entry)| {
                (
                    entry.sequence,
                    id.clone(),
                    entry.metadata.clone().unwrap_or(Value::Null),
                )
            })
            .collect();
        all.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        ready(
            all.into_iter()
                .map(|(_, id, metadata)| (id, metadata))
                .collect(),
        )
    }

    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, bool> {
        let targets: Vec<Arc<dyn Inbox>> = {
            let state = self.lock();
            let holder = |connection_id: &str| {
                state
                    .connections
                    .get(connection_id)
                    .and_then(|entry| state.instances.get(&entry.instance_id))
                    .and_then(Weak::upgrade)
            };
            match &delivery {
                Delivery::ToConnection { connection_id, .. }
                | Delivery::Close { connection_id, .. }
                | Delivery::Call { connection_id, .. } => {
                    holder(connection_id).into_iter().collect()
                }
                Delivery::Answer { to, .. } => state
                    .instances
                    .get(to)
                    .and_then(Weak::upgrade)
                    .into_iter()
                    .collect(),
                Delivery::Broadcast { .. }
                | Delivery::Topic { .. }
                | Delivery::Presence { .. }
                | Delivery::Record { .. }
                | Delivery::RecordDeleted { .. }
                | Delivery::RecordsChanged { .. } => {
                    state.instances.values().filter_map(Weak::upgrade).collect()
                }
            }
        };
        let delivered = !targets.is_empty()
            || matches!(
                delivery,
                Delivery::Broadcast { .. } | Delivery::Topic { .. }
            );
        // Delivered outside the lock: an inbox only enqueues, but it must never be able
        // to deadlock against a backend call made from a connection task.
        for inbox in targets {
            inbox.deliver(delivery.clone());
        }
        ready(delivered)
    }

    fn subscribe<'a>(&'a self, _instance_id: &'a str, _topic: &'a Topic) -> BackendFuture<'a, ()> {
        // Topic deliveries reach every instance in-process; each filters by its listeners.
        ready(())
    }

    fn unsubscribe(&self, _instance_id: &str, _topic: &Topic) {}

    fn join_room<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        presence_ttl: Option<Duration>,
    ) -> BackendFuture<'a, bool> {
        let mut state = self.lock();
        if !state.connections.contains_key(connection_id) {
            return ready(false);
        }
        let sequence = state.sequence();
        state
            .rooms
            .entry(room.to_owned())
            .or_default()
            .entry(connection_id.to_owned())
            .or_insert(sequence);
        if let Some(entry) = state.connections.get_mut(connection_id) {
            entry.rooms.insert(room.to_owned());
        }
        if let Some(ttl) = presence_ttl {
            if state.make_present(connection_id, room, deadline(ttl)) {
                state.announce(room, connection_id, PresenceChange::Join);
            }
        }
        state.flush();
        ready(true)
    }

    fn leave_room<'a>(&'a self, connection_id: &'a str, room: &'a str) -> BackendFuture<'a, bool> {
        let mut state = self.lock();
        let was_member = state.leave(connection_id, room);
        state.flush();
        ready(was_member)
    }

    fn room_members<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Vec<String>> {
        ready(self.lock().members(room))
    }

    fn room_members_with_metadata<'a>(
        &'a self,
        room: &'a str,
    ) -> BackendFuture<'a, Vec<(String, Value)>> {
        let state = self.lock();
        ready(state.members_with_metadata(state.members(room)))
    }

    fn connection_rooms<'a>(&'a self, connection_id: &'a str) -> BackendFuture<'a, Vec<String>> {
        let rooms = self
            .lock()
            .connections
            .get(connection_id)
            .map(|entry| entry.rooms.iter().cloned().collect())
            .unwrap_or_default();
        ready(rooms)
    }

    fn rooms(&self) -> BackendFuture<'_, Vec<String>> {
        let mut rooms: Vec<String> = self.lock().rooms.keys().cloned().collect();
        rooms.sort_unstable();
        ready(rooms)
    }

    fn share_a_room<'a>(&'a self, a: &'a str, b: &'a str) -> BackendFuture<'a, bool> {
        let state = self.lock();
        let shared = match (state.connections.get(a), state.connections.get(b)) {
            (Some(a), Some(b)) => a.rooms.intersection(&b.rooms).next().is_some(),
            _ => false,
        };
        ready(shared)
    }

    fn room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Option<Value>> {
        ready(self.lock().room_metadata.get(room).cloned())
    }

    fn set_room_metadata<'a>(
        &'a self,
        room: &'a str,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        match write.apply(state.room_metadata.get(room).cloned()) {
            Ok((merged, _)) => {
                state.room_metadata.insert(room.to_owned(), merged);
                ready(())
            }
            Err(err) => Box::pin(std::future::ready(Err(err))),
        }
    }

    fn delete_room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, ()> {
        self.lock().room_metadata.remove(room);
        ready(())
    }

    fn all_room_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>> {
        let all = self
            .lock()
            .room_metadata
            .iter()
            .map(|(room, metadata)| (room.clone(), metadata.clone()))
            .collect();
        ready(all)
    }

    fn refresh_presence<'a>(&'a self, refreshes: &'a [PresenceRefresh]) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        for (connection_id, rooms) in refreshes {
            for (room, ttl) in rooms {
                if state.is_member(connection_id, room)
                    && state.make_present(connection_id, room, deadline(*ttl))
                {
                    state.announce(room, connection_id, PresenceChange::Join);
                }
            }
        }
        state.flush();
        ready(())
    }

    fn presence<'a>(&'a self, room: &'a str) -> BackendFuture<'a, PresenceView> {
        let state = self.lock();
        let present = state.present(room, Instant::now());
        let states = present
            .iter()
            .filter_map(|id| {
                let (value, _) = state.states.get(room)?.get(id)?;
                Some((id.clone(), value.clone()))
            })
            .collect();
        ready(PresenceView {
            present: state.members_with_metadata(present),
            states,
        })
    }

    fn set_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        value: &'a Value,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> BackendFuture<'a, bool> {
        let mut state = self.lock();
        if !state.is_present(connection_id, room, Instant::now()) {
            return ready(false);
        }
        state.remove_state(connection_id, room);
        let expiry = expire_after.map(deadline);
        if let Some(expiry) = expiry {
            state
                .state_expiry
                .insert((expiry, room.to_owned(), connection_id.to_owned()));
        }
        state
            .states
            .entry(room.to_owned())
            .or_default()
            .insert(connection_id.to_owned(), (value.clone(), expiry));
        if !silent {
            state.announce(
                room,
                connection_id,
                PresenceChange::State(Some(Arc::from(value.to_string()))),
            );
        }
        state.flush();
        ready(true)
    }

    fn clear_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
    ) -> BackendFuture<'a, bool> {
        let mut state = self.lock();
        if !state.is_present(connection_id, room, Instant::now()) {
            return ready(false);
        }
        if state.remove_state(connection_id, room) {
            state.announce(room, connection_id, PresenceChange::State(None));
        }
        state.flush();
        ready(true)
    }

    fn sweep(&self) -> BackendFuture<'_, Duration> {
        let mut state = self.lock();
        let now = Instant::now();
        let dead: Vec<Arc<str>> = state
            .instances
            .iter()
            .filter(|(_, inbox)| inbox.strong_count() == 0)
            .map(|(id, _)| id.clone())
            .collect();
        for instance_id in dead {
            state.remove_instance(&instance_id);
        }
        while let Some((deadline, room, connection_id)) = state.presence_expiry.first().cloned() {
            if deadline > now {
                break;
            }
            state.remove_presence(&connection_id, &room);
            state.announce(&room, &connection_id, PresenceChange::Leave);
        }
        while let Some((deadline, room, connection_id)) = state.state_expiry.first().cloned() {
            if deadline > now {
                break;
            }
            state.remove_state(&connection_id, &room);
            state.announce(&room, &connection_id, PresenceChange::State(None));
        }
        state.flush();
        let next = [state.presence_expiry.first(), state.state_expiry.first()]
            .into_iter()
            .flatten()
            .map(|(deadline, _, _)| deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(DEAD_INSTANCE_CHECK);
        ready(next.min(DEAD_INSTANCE_CHECK))
    }

    fn write_channel<'a>(
        &'a self,
        channel: &'a str,
        message: &'a str,
        history: usize,
        history_bytes: usize,
        announcement: Delivery,
    ) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        if history > 0 {
            let kept = state.channel_history.entry(channel.to_owned()).or_default();
            kept.push(message, history, history_bytes);
        }
        state.announcements.push(announcement);
        state.flush();
        ready(())
    }

    fn channel_history<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BackendFuture<'a, Vec<String>> {
        let history = self
            .lock()
            .channel_history
            .get(channel)
            .map(|kept| kept.messages.iter().take(limit).cloned().collect())
            .unwrap_or_default();
        ready(history)
    }

    fn records<'a>(&'a self, ids: &'a [String]) -> BackendFuture<'a, Vec<Option<StoredRecord>>> {
        let state = self.lock();
        ready(
            ids.iter()
                .map(|id| state.records.get(id).cloned())
                .collect(),
        )
    }

    fn record_ids<'a>(&'a self, prefix: &'a str) -> BackendFuture<'a, Vec<String>> {
        let ids = self
            .lock()
            .records
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .map(|(id, _)| id)
            .take_while(|id| id.starts_with(prefix))
            .cloned()
            .collect();
        ready(ids)
    }

    fn update_record<'a>(
        &'a self,
        id: &'a str,
        update: &'a RecordUpdater,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        let mut state = self.lock();
        let current = state.records.get(id);
        let version = current.map_or(0, |record| record.version);
        let write = match update(current) {
            Ok(Some(write)) => write,
            Ok(None) => return ready(None),
            Err(err) => return Box::pin(std::future::ready(Err(err))),
        };
        let stored = StoredRecord {
            value: write.value,
            version: version + 1,
        };
        state.records.insert(id.to_owned(), stored.clone());
        state.announcements.extend(write.announcements);
        state.flush();
        ready(Some(stored))
    }

    fn delete_record<'a>(
        &'a self,
        id: &'a str,
        announce: &'a RecordRemover,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        let mut state = self.lock();
        let Some(removed) = state.records.remove(id) else {
            return ready(None);
        };
        let announcements = announce(&removed);
        state.announcements.extend(announcements);
        state.flush();
        ready(Some(removed))
    }
}

/// `now + after`, saturating far in the future instead of overflowing.
fn deadline(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
