//! Topics: what local connections listen to (rooms they are in, presence they watch,
//! channels, records and collections they subscribe to), and fan-out of a topic's
//! deliveries to them.
//!
//! Each instance keeps this index for its own connections only. A delivery for a topic
//! reaches every instance that has a listener (on Redis: the instances subscribed to the
//! topic's channel), and each instance fans it out to its local listeners. The index also
//! remembers each connection's topics, so a connection that ends leaves all of them.
//!
//! A connection listens to a topic directly (it joined, it subscribed), or because a
//! collection it subscribes to holds a record: both may be true at once, and the listen
//! lasts while either is.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{ChannelPosition, Topic};
use crate::channel_stream::{ChannelSnapshot, ChannelStream};

use crate::connection::{Connection, Registry};
use crate::metrics::{self, FanOutKind, SubscriptionKind};
use crate::protocol::Frame;
use crate::record_stream::{RecordStream, Snapshot};

/// How a listener wants record updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Form {
    /// The whole value (and everything that is not a record update).
    #[default]
    Full,
    /// RFC 6902 patches, where the update has one.
    Patch,
}

/// One listener of a topic.
#[derive(Clone)]
pub(crate) struct Listener {
    pub(crate) connection: Connection,
    pub(crate) form: Form,
    /// It joined or subscribed itself.
    direct: bool,
    /// How many of its collections hold this record.
    via_collections: u32,
    /// For a record topic: where its stream of updates stands.
    stream: Option<Arc<RecordStream>>,
    /// For a channel topic: where its stream of messages stands.
    channel: Option<Arc<ChannelStream>>,
}

impl Listener {
    /// Whether it listens (also) because a collection holds the record: a collection
    /// needs whole values.
    pub(crate) fn held_by_collection(&self) -> bool {
        self.via_collections > 0
    }

    /// Whether it joined or subscribed itself.
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Ends its streams: a delivery that raced with the end of the listen is dropped.
    fn end(&self) {
        if let Some(stream) = &self.stream {
            stream.end();
        }
        if let Some(stream) = &self.channel {
            stream.end();
        }
    }

    /// For a record topic: its stream of updates, which never goes backwards.
    pub(crate) fn record_stream(&self) -> Option<&RecordStream> {
        self.stream.as_deref()
    }
}

/// A listen that started (or was already there), and for a record or channel topic the
/// snapshot the caller must now read and report (see [`crate::record_stream`] and
/// [`crate::channel_stream`]).
pub(crate) struct Listen {
    /// The connection was not listening before.
    pub(crate) new: bool,
    pub(crate) snapshot: Option<Snapshot>,
    pub(crate) channel_snapshot: Option<ChannelSnapshot>,
}

/// Local listeners by topic, and topics by connection.
#[derive(Default)]
pub(crate) struct LocalTopics {
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    listeners: HashMap<Topic, HashMap<Arc<str>, Listener>>,
    by_connection: HashMap<Arc<str>, HashSet<Topic>>,
}

impl Index {
    /// Adds to or creates a listener. A record listener's stream holds its updates until
    /// the snapshot begun here, in the same step, is taken.
    fn upsert(
        &mut self,
        topic: Topic,
        connection: &Connection,
        change: impl FnOnce(&mut Listener),
    ) -> Listen {
        let id = connection.shared_id();
        let is_record = matches!(topic, Topic::Record(_));
        let is_channel = matches!(topic, Topic::Channel(_));
        if !self.listeners.contains_key(&topic) && matches!(topic, Topic::Room(_)) {
            metrics::rooms_changed(1);
        }
        let members = self.listeners.entry(topic.clone()).or_default();
        let new = !members.contains_key(&id);
        let listener = members.entry(id.clone()).or_insert_with(|| Listener {
            connection: connection.clone(),
            form: Form::Full,
            direct: false,
            via_collections: 0,
            stream: is_record.then(Default::default),
            channel: is_channel.then(Default::default),
        });
        let was_direct = listener.direct;
        change(listener);
        direct_changed(&topic, was_direct, listener.direct);
        let snapshot = listener
            .stream
            .as_ref()
            .map(|stream| stream.begin_snapshot(connection));
        let channel_snapshot = listener
            .channel
            .as_ref()
            .map(|stream| stream.begin_snapshot(connection));
        self.by_connection.entry(id).or_default().insert(topic);
        Listen {
            new,
            snapshot,
            channel_snapshot,
        }
    }

    /// Applies `change` to a listener and drops it when nothing holds it any more.
    /// Returns `(was_listening, topic_now_has_no_listener)`.
    fn release(
        &mut self,
        topic: &Topic,
        connection_id: &str,
        change: impl FnOnce(&mut Listener),
    ) -> (bool, bool) {
        let Some(members) = self.listeners.get_mut(topic) else {
            return (false, false);
        };
        let Some(listener) = members.get_mut(connection_id) else {
            return (false, false);
        };
        let was_direct = listener.direct;
        change(listener);
        direct_changed(topic, was_direct, listener.direct);
        if listener.direct || listener.via_collections > 0 {
            return (true, false);
        }
        if let Some(gone) = members.remove(connection_id) {
            gone.end();
        }
        let emptied = members.is_empty();
        if emptied {
            self.listeners.remove(topic);
            if matches!(topic, Topic::Room(_)) {
                metrics::rooms_changed(-1);
            }
        }
        if let Some(topics) = self.by_connection.get_mut(connection_id) {
            topics.remove(topic);
            if topics.is_empty() {
                self.by_connection.remove(connection_id);
            }
        }
        (true, emptied)
    }
}

/// Counts a subscription that began or ended: a listener that became direct, or stopped
/// being (joining a room is membership, not a subscription; collections count their own).
fn direct_changed(topic: &Topic, was_direct: bool, is_direct: bool) {
    if was_direct == is_direct {
        return;
    }
    let kind = match topic {
        Topic::Channel(_) => SubscriptionKind::Channel,
        Topic::Record(_) => SubscriptionKind::Record,
        Topic::Presence(_) => SubscriptionKind::Presence,
        Topic::Room(_) | Topic::Collections(_) => return,
    };
    metrics::subscriptions_changed(kind, if is_direct { 1 } else { -1 });
}

impl LocalTopics {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Listens directly in `form`.
    pub(crate) fn add_with_form(
        &self,
        topic: Topic,
        connection: &Connection,
        form: Form,
    ) -> Listen {
        self.lock().upsert(topic, connection, |listener| {
            listener.direct = true;
            listener.form = form;
        })
    }

    /// Listens because a collection holds the record; the form of a direct listen wins.
    pub(crate) fn add_for_collection(&self, topic: Topic, connection: &Connection) -> Listen {
        self.lock()
            .upsert(topic, connection, |listener| listener.via_collections += 1)
    }

    /// Stops listening directly. Returns `(was_listening_directly, topic_now_has_no_listener)`.
    pub(crate) fn remove(&self, topic: &Topic, connection_id: &str) -> (bool, bool) {
        let mut direct = false;
        let (_, emptied) = self.lock().release(topic, connection_id, |listener| {
            direct = std::mem::take(&mut listener.direct);
            listener.form = Form::Full;
        });
        (direct, emptied)
    }

    /// One collection no longer holds the record. Returns whether the topic now has no
    /// listener.
    pub(crate) fn remove_for_collection(&self, topic: &Topic, connection_id: &str) -> bool {
        self.lock()
            .release(topic, connection_id, |listener| {
                listener.via_collections = listener.via_collections.saturating_sub(1);
            })
            .1
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
                        if let Some(gone) = members.remove(connection_id) {
                            direct_changed(&topic, gone.direct, false);
                            gone.end();
                        }
                        members.is_empty()
                    }
                    None => true,
                };
                if emptied && listeners.remove(&topic).is_some() && matches!(topic, Topic::Room(_))
                {
                    metrics::rooms_changed(-1);
                }
                (topic, emptied)
            })
            .collect()
    }

    /// The local listeners of a topic, as a snapshot: fan-out runs outside the lock.
    pub(crate) fn listeners(&self, topic: &Topic) -> Vec<Listener> {
        self.lock()
            .listeners
            .get(topic)
            .map(|members| members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Sends `frame` to every local listener of `topic` but those in `exclude`.
    pub(crate) fn fan_out(
        &self,
        topic: &Topic,
        frame: &Frame,
        exclude: &[Arc<str>],
        registry: &Registry,
    ) {
        let mut recipients = 0;
        for listener in self.listeners(topic) {
            let connection = &listener.connection;
            if !exclude.iter().any(|id| **id == *connection.id()) {
                let _ = registry.send_frame(connection, frame.clone());
                recipients += 1;
            }
        }
        let kind = match topic {
            Topic::Room(_) => FanOutKind::Room,
            Topic::Presence(_) => FanOutKind::Presence,
            Topic::Channel(_) => FanOutKind::Channel,
            Topic::Record(_) => FanOutKind::Record,
            // Re-resolution notices never reach a client.
            Topic::Collections(_) => return,
        };
        metrics::fanned_out(kind, recipients);
    }

    /// Sends a channel message's `frame` to every local listener of `channel` through its
    /// stream, which drops what the listener has already.
    pub(crate) fn fan_out_channel(
        &self,
        channel: &Topic,
        position: Option<&ChannelPosition>,
        frame: &Frame,
        registry: &Registry,
    ) {
        let listeners = self.listeners(channel);
        for listener in &listeners {
            match &listener.channel {
                Some(stream) => stream.offer(&listener.connection, position, frame.clone()),
                None => {
                    let _ = registry.send_frame(&listener.connection, frame.clone());
                }
            }
        }
        metrics::fanned_out(FanOutKind::Channel, listeners.len());
    }

    /// Whether any local connection listens to `topic`.
    pub(crate) fn has_listeners(&self, topic: &Topic) -> bool {
        self.lock().listeners.contains_key(topic)
    }

    /// Whether `connection_id` listens to `topic` directly.
    pub(crate) fn is_listening(&self, topic: &Topic, connection_id: &str) -> bool {
        self.lock()
            .listeners
            .get(topic)
            .and_then(|members| members.get(connection_id))
            .is_some_and(|listener| listener.direct)
    }

    /// The topics a connection listens to directly that `select` picks, mapped by it.
    pub(crate) fn topics_of<T>(
        &self,
        connection_id: &str,
        select: impl Fn(&Topic) -> Option<T>,
    ) -> Vec<T> {
        let index = self.lock();
        let Some(topics) = index.by_connection.get(connection_id) else {
            return Vec::new();
        };
        topics
            .iter()
            .filter(|topic| {
                index
                    .listeners
                    .get(*topic)
                    .and_then(|members| members.get(connection_id))
                    .is_some_and(|listener| listener.direct)
            })
            .filter_map(select)
            .collect()
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
            Topic::Channel(Arc::from("c")),
            Topic::Record(Arc::from("r:1")),
            Topic::Collections(Arc::from("^task:")),
        ] {
            assert_eq!(Topic::from_key(&topic.key()), Some(topic));
        }
        assert_eq!(Topic::from_key("nope"), None);
        assert_eq!(Topic::from_key("other:x"), None);
    }
}
