//! Topics: what local connections listen to (rooms they are in, rooms whose presence they
//! watch), and fan-out of a topic's deliveries to them.
//!
//! Each instance keeps this index for its own connections only. A delivery for a topic
//! reaches every instance that has a listener (on Redis: the instances subscribed to the
//! topic's channel), and each instance fans it out to its local listeners. The index also
//! remembers each connection's topics, so a connection that ends leaves all of them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::connection::Connection;

/// Something connections listen to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Topic {
    /// The members of a room (room broadcasts).
    Room(Arc<str>),
    /// The presence updates of a room (`mesh/presence-update`).
    Presence(Arc<str>),
}

impl Topic {
    /// A stable text form, used for Redis channel names and envelopes.
    pub(crate) fn key(&self) -> String {
        match self {
            Topic::Room(name) => format!("room:{name}"),
            Topic::Presence(name) => format!("presence:{name}"),
        }
    }

    /// The inverse of [`Topic::key`].
    pub(crate) fn from_key(key: &str) -> Option<Topic> {
        let (kind, name) = key.split_once(':')?;
        let name = Arc::from(name);
        match kind {
            "room" => Some(Topic::Room(name)),
            "presence" => Some(Topic::Presence(name)),
            _ => None,
        }
    }
}

/// Local listeners by topic, and topics by connection.
#[derive(Default)]
pub(crate) struct LocalTopics {
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    listeners: HashMap<Topic, HashMap<Arc<str>, Connection>>,
    by_connection: HashMap<Arc<str>, HashSet<Topic>>,
}

impl LocalTopics {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a listener; returns whether it was new.
    pub(crate) fn add(&self, topic: Topic, connection: &Connection) -> bool {
        let mut index = self.lock();
        let id = connection.shared_id();
        let added = index
            .listeners
            .entry(topic.clone())
            .or_default()
            .insert(id.clone(), connection.clone())
            .is_none();
        index.by_connection.entry(id).or_default().insert(topic);
        added
    }

    /// Removes a listener. Returns `(was_listening, topic_now_has_no_listener)`.
    pub(crate) fn remove(&self, topic: &Topic, connection_id: &str) -> (bool, bool) {
        let mut index = self.lock();
        let Index {
            listeners,
            by_connection,
        } = &mut *index;
        let Some(members) = listeners.get_mut(topic) else {
            return (false, false);
        };
        let removed = members.remove(connection_id).is_some();
        let emptied = members.is_empty();
        if emptied {
            listeners.remove(topic);
        }
        if let Some(topics) = by_connection.get_mut(connection_id) {
            topics.remove(topic);
            if topics.is_empty() {
                by_connection.remove(connection_id);
            }
        }
        (removed, emptied)
    }

    /// Removes a connection from every topic; returns the topics it was in, each with
    /// whether that topic now has no listener.
    pub(crate) fn remove_connection(&self, connection_id: &str) -> Vec<(Topic, bool)> {
        let mut index = self.lock();
        let Index {
            listeners,
            by_connection,
        } = &mut *index;
        let Some(topics) = by_connection.remove(connection_id) else {
            return Vec::new();
        };
        topics
            .into_iter()
            .map(|topic| {
                let emptied = match listeners.get_mut(&topic) {
                    Some(members) => {
                        members.remove(connection_id);
                        members.is_empty()
                    }
                    None => true,
                };
                if emptied {
                    listeners.remove(&topic);
                }
                (topic, emptied)
            })
            .collect()
    }

    /// The local listeners of a topic, as a snapshot: fan-out runs outside the lock.
    pub(crate) fn listeners(&self, topic: &Topic) -> Vec<Connection> {
        self.lock()
            .listeners
            .get(topic)
            .map(|members| members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether any local connection listens to `topic`.
    pub(crate) fn has_listeners(&self, topic: &Topic) -> bool {
        self.lock().listeners.contains_key(topic)
    }

    /// Whether `connection_id` listens to `topic`.
    pub(crate) fn is_listening(&self, topic: &Topic, connection_id: &str) -> bool {
        self.lock()
            .by_connection
            .get(connection_id)
            .is_some_and(|topics| topics.contains(topic))
    }

    /// The topics a connection listens to that `select` picks, mapped by it.
    pub(crate) fn topics_of<T>(
        &self,
        connection_id: &str,
        select: impl Fn(&Topic) -> Option<T>,
    ) -> Vec<T> {
        self.lock()
            .by_connection
            .get(connection_id)
            .map(|topics| topics.iter().filter_map(select).collect())
            .unwrap_or_default()
    }

    /// Every topic with at least one local listener (to subscribe again after a reconnect).
    pub(crate) fn all_topics(&self) -> Vec<Topic> {
        self.lock().listeners.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for topic in [
            Topic::Room(Arc::from("a:b")),
            Topic::Presence(Arc::from("")),
        ] {
            assert_eq!(Topic::from_key(&topic.key()), Some(topic));
        }
        assert_eq!(Topic::from_key("nope"), None);
        assert_eq!(Topic::from_key("other:x"), None);
    }
}
