//! What travels between instances: deliveries (events, never wire frames: each receiving
//! instance renders them), the topics they are addressed to, and the inbox that receives
//! them.

use std::sync::Arc;

/// A push as deliveries carry it: its command and its payload as JSON text. The backends
/// never build or read frames: each receiving instance renders a push once, and every
/// local recipient shares those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The push's command, for example `room-message`.
    pub command: Arc<str>,
    /// Its payload, as JSON text.
    pub payload: Arc<str>,
}

impl Push {
    /// Its size in bytes (command and payload).
    pub(crate) fn len(&self) -> usize {
        self.command.len() + self.payload.len()
    }
}

/// A presence change, as deliveries carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceChange {
    /// The connection became present.
    Join,
    /// The connection is no longer present (it left, disconnected, or its TTL lapsed).
    Leave,
    /// A new state (JSON text), or `None` when it was cleared or expired.
    State(Option<Arc<str>>),
}

/// A message for connections that some instance holds, or for an instance itself.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Delivery {
    /// A push for one connection.
    #[allow(missing_docs)] // the field names say it
    ToConnection { connection_id: Arc<str>, push: Push },
    /// A push for every connection of every instance.
    #[allow(missing_docs)]
    Broadcast { push: Push },
    /// Close one connection with a normal close frame and this reason.
    #[allow(missing_docs)]
    Close {
        connection_id: Arc<str>,
        reason: String,
    },
    /// A push for every listener of a topic, on every instance, except `exclude`.
    Topic {
        /// Whose listeners receive it.
        topic: Topic,
        /// What they receive.
        push: Push,
        /// Connection ids that must not receive it.
        exclude: Arc<[Arc<str>]>,
    },
    /// A presence change in a room, for the listeners of its presence on every instance,
    /// stamped (milliseconds since the epoch) where it was made.
    #[allow(missing_docs)]
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
        /// The record's id.
        record_id: Arc<str>,
        /// The version the write stored.
        version: u64,
        /// The whole new value, as JSON text.
        value: Arc<str>,
        /// The RFC 6902 patch from the previous version, as JSON text, when there is one.
        patch: Option<Arc<str>>,
    },
    /// A record was deleted at `version`: its listeners are told, and its direct
    /// subscriptions end (as mesh's client drops them on the notice).
    #[allow(missing_docs)]
    RecordDeleted { record_id: Arc<str>, version: u64 },
    /// Records that the collections of one exposure may hold changed: instances with
    /// subscribers of those collections re-resolve them.
    RecordsChanged {
        /// The pattern of the exposure, as registered.
        exposure: Arc<str>,
        /// The record that changed: only collections that can hold it re-resolve.
        record_id: Arc<str>,
    },
    /// A channel message, for the channel's listeners on every instance: what
    /// [`Backend::write_channel`](super::Backend::write_channel) announces, and what a
    /// store that carries channel messages unwrapped hands over (the Redis backend's
    /// plain channels, which processes outside the mesh publish to). The receiving
    /// instance checks it against its own limits (a message over
    /// `max_channel_message_bytes` reaches nobody) and renders the push itself.
    ChannelMessage {
        /// The channel's name, as clients know it.
        channel: Arc<str>,
        /// The message text.
        message: Arc<str>,
        /// Its place in the channel's stream; `None` on a channel without positions (a
        /// Redis plain channel).
        position: Option<super::ChannelPosition>,
    },
    /// An operation on a connection, for the instance that holds it to run; it answers
    /// with [`Delivery::Answer`] to instance `from`.
    Call {
        /// The connection to run it on.
        connection_id: Arc<str>,
        /// The instance that asks, and waits for the answer.
        from: Arc<str>,
        /// Matches the answer to the call, on the asking instance.
        call_id: u64,
        /// What to run.
        op: ConnectionOp,
    },
    /// The outcome of a [`Delivery::Call`], for the instance that made it: `None` when
    /// the operation failed.
    Answer {
        /// The instance that made the call.
        to: Arc<str>,
        /// The call's id.
        call_id: u64,
        /// What the operation returned.
        outcome: Option<bool>,
    },
}

/// What one instance can ask the holder of a connection to do: membership changes run on
/// the connection's own instance, which keeps its topic index in step with the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionOp {
    /// Join this room.
    JoinRoom(Arc<str>),
    /// Leave this room.
    LeaveRoom(Arc<str>),
    /// Leave every room.
    LeaveAllRooms,
}

/// The receiving end of an instance: it hands deliveries to local connections.
pub trait Inbox: Send + Sync + 'static {
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

/// Something connections listen to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// The members of a room (room broadcasts).
    Room(Arc<str>),
    /// The presence changes of a room.
    Presence(Arc<str>),
    /// A channel's messages.
    Channel(Arc<str>),
    /// A record's new versions and its deletion.
    Record(Arc<str>),
    /// Changes to the records that the collections of one exposure (named by its
    /// pattern) may hold: their subscribers re-resolve. Never seen by clients.
    Collections(Arc<str>),
}

impl Topic {
    /// A stable text form, used for Redis channel names and envelopes.
    pub fn key(&self) -> String {
        let (kind, name) = self.parts();
        format!("{kind}:{name}")
    }

    fn parts(&self) -> (&'static str, &str) {
        match self {
            Topic::Room(name) => ("room", name),
            Topic::Presence(name) => ("presence", name),
            Topic::Channel(name) => ("channel", name),
            Topic::Record(name) => ("record", name),
            Topic::Collections(name) => ("collections", name),
        }
    }

    /// The inverse of [`Topic::key`].
    pub fn from_key(key: &str) -> Option<Topic> {
        let (kind, name) = key.split_once(':')?;
        let name = Arc::from(name);
        match kind {
            "room" => Some(Topic::Room(name)),
            "presence" => Some(Topic::Presence(name)),
            "channel" => Some(Topic::Channel(name)),
            "record" => Some(Topic::Record(name)),
            "collections" => Some(Topic::Collections(name)),
            _ => None,
        }
    }
}
