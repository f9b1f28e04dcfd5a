//! Instances and the connections they hold: attaching and detaching, registering
//! connections, and the sweep that removes what lapsed (the connections of instances
//! whose inbox is gone, presence, presence states). An instance is alive while its inbox
//! is: there is no heartbeat in one process.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{ConnectionEntry, MemoryBackend, MemoryState};
use crate::backend::{Inbox, PresenceChange};

/// How often dead instances are looked for when nothing expires sooner.
const DEAD_INSTANCE_CHECK: Duration = Duration::from_secs(1);

impl MemoryBackend {
    pub(super) fn attach_instance(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) {
        self.lock().instances.insert(instance_id, inbox);
    }

    pub(super) fn detach_instance(&self, instance_id: &str) {
        let mut state = self.lock();
        state.remove_instance(instance_id);
        state.flush();
    }

    pub(super) fn register(&self, instance_id: &str, connection_id: &str) {
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
    }

    pub(super) fn unregister(&self, connection_id: &str) {
        let mut state = self.lock();
        state.remove_connection(connection_id);
        state.flush();
    }

    pub(super) fn sweep_expired(&self) -> Duration {
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
        next.min(DEAD_INSTANCE_CHECK)
    }
}

impl MemoryState {
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
}
