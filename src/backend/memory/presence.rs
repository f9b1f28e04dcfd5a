//! Presence in tracked rooms: deadlines and their expiry index, presence states, and
//! the operations that change them, each announcing its change under the lock. Lapsed
//! presence and states are removed by the sweep (`liveness.rs`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::{deadline, MemoryBackend, MemoryState};
use crate::backend::{PresenceChange, PresenceRefresh, PresenceView};

impl MemoryBackend {
    pub(super) fn extend_presence(&self, refreshes: &[PresenceRefresh]) {
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
    }

    pub(super) fn presence_view(&self, room: &str) -> PresenceView {
        let state = self.lock();
        let present = state.present(room, Instant::now());
        let states = present
            .iter()
            .filter_map(|id| {
                let (value, _) = state.states.get(room)?.get(id)?;
                Some((id.clone(), value.clone()))
            })
            .collect();
        PresenceView {
            present: state.with_metadata(present),
            states,
        }
    }

    pub(super) fn write_presence_state(
        &self,
        connection_id: &str,
        room: &str,
        value: &Value,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> bool {
        let mut state = self.lock();
        if !state.is_present(connection_id, room, Instant::now()) {
            return false;
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
        true
    }

    pub(super) fn remove_presence_state(&self, connection_id: &str, room: &str) -> bool {
        let mut state = self.lock();
        if !state.is_present(connection_id, room, Instant::now()) {
            return false;
        }
        if state.remove_state(connection_id, room) {
            state.announce(room, connection_id, PresenceChange::State(None));
        }
        state.flush();
        true
    }
}

impl MemoryState {
    fn is_present(&self, connection_id: &str, room: &str, now: Instant) -> bool {
        self.presence
            .get(room)
            .and_then(|present| present.get(connection_id))
            .is_some_and(|deadline| *deadline > now)
    }

    /// Sets a presence deadline; returns whether the connection was absent before.
    pub(super) fn make_present(
        &mut self,
        connection_id: &str,
        room: &str,
        deadline: Instant,
    ) -> bool {
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
    pub(super) fn remove_presence(&mut self, connection_id: &str, room: &str) -> bool {
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
    pub(super) fn remove_state(&mut self, connection_id: &str, room: &str) -> bool {
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

    /// A room's present connections in join order.
    fn present(&self, room: &str, now: Instant) -> Vec<String> {
        self.members(room)
            .into_iter()
            .filter(|id| self.is_present(id, room, now))
            .collect()
    }
}
