//! Rooms: joining (which also makes a connection present in a tracked room) and leaving,
//! and the listings of members and rooms.

use std::time::Duration;

use serde_json::Value;

use super::{deadline, MemoryBackend, MemoryState};
use crate::backend::PresenceChange;

impl MemoryBackend {
    pub(super) fn join(
        &self,
        connection_id: &str,
        room: &str,
        presence_ttl: Option<Duration>,
    ) -> bool {
        let mut state = self.lock();
        if !state.connections.contains_key(connection_id) {
            return false;
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
        true
    }

    pub(super) fn leave(&self, connection_id: &str, room: &str) -> bool {
        let mut state = self.lock();
        let was_member = state.leave(connection_id, room);
        state.flush();
        was_member
    }

    pub(super) fn members(&self, room: &str) -> Vec<String> {
        self.lock().members(room)
    }

    pub(super) fn members_with_metadata(&self, room: &str) -> Vec<(String, Value)> {
        let state = self.lock();
        state.with_metadata(state.members(room))
    }

    pub(super) fn rooms_of(&self, connection_id: &str) -> Vec<String> {
        self.lock()
            .connections
            .get(connection_id)
            .map(|entry| entry.rooms.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(super) fn list_rooms(&self) -> Vec<String> {
        let mut rooms: Vec<String> = self.lock().rooms.keys().cloned().collect();
        rooms.sort_unstable();
        rooms
    }

    pub(super) fn in_a_common_room(&self, a: &str, b: &str) -> bool {
        let state = self.lock();
        match (state.connections.get(a), state.connections.get(b)) {
            (Some(a), Some(b)) => a.rooms.intersection(&b.rooms).next().is_some(),
            _ => false,
        }
    }
}

impl MemoryState {
    pub(super) fn is_member(&self, connection_id: &str, room: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|members| members.contains_key(connection_id))
    }

    /// Removes a connection from a room (and its presence there, announcing `leave`);
    /// returns whether it was a member.
    pub(super) fn leave(&mut self, connection_id: &str, room: &str) -> bool {
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

    /// The given connections, each with its metadata (`null` when none).
    pub(super) fn with_metadata(&self, members: Vec<String>) -> Vec<(String, Value)> {
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

    /// A room's members in join order.
    pub(super) fn members(&self, room: &str) -> Vec<String> {
        let Some(members) = self.rooms.get(room) else {
            return Vec::new();
        };
        let mut members: Vec<_> = members.iter().collect();
        members.sort_unstable_by_key(|(_, sequence)| **sequence);
        members.into_iter().map(|(id, _)| id.clone()).collect()
    }
}
