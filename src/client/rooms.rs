//! Rooms and presence on the client: join and leave, presence subscriptions as callbacks
//! or streams, presence states (kept alive on request), and their restoration after a
//! reconnect, which is a new connection with a new id that is in no room yet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{lock, ClientError, Inner, MeshClient};

pub(super) const PRESENCE_UPDATE: &str = "mesh/presence-update";

/// A room member as `mesh/join-room` and `mesh/subscribe-presence` list it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Member {
    /// The member's connection id.
    pub id: String,
    /// Its connection metadata (`null` when none).
    #[serde(default)]
    pub metadata: Value,
}

/// Who is present in a room, and their states, when a presence subscription started.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PresenceSnapshot {
    /// The present connections, in join order.
    #[serde(default)]
    pub present: Vec<Member>,
    /// The present connections' states, by connection id.
    #[serde(default)]
    pub states: HashMap<String, Value>,
}

/// What a presence update reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    /// A connection became present.
    Join,
    /// A connection is no longer present.
    Leave,
    /// A connection's state changed (or was cleared, or expired).
    State,
}

/// One `mesh/presence-update` push.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceUpdate {
    /// Join, leave or state.
    #[serde(rename = "type")]
    pub kind: PresenceKind,
    /// The connection it is about.
    pub connection_id: String,
    /// The room.
    pub room_name: String,
    /// For [`PresenceKind::State`]: the new state, `None` when cleared or expired.
    #[serde(default)]
    pub state: Option<Value>,
    /// When it happened, in milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// Options of [`MeshClient::publish_presence_state`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StateOptions {
    /// The state is cleared (and subscribers told) this long after publishing.
    pub expire_after: Option<Duration>,
    /// Store the state without telling subscribers.
    pub silent: bool,
}

impl StateOptions {
    /// No expiry, announced.
    pub fn new() -> Self {
        Self::default()
    }

    /// Clears the state this long after publishing.
    pub fn expire_after(mut self, after: Duration) -> Self {
        self.expire_after = Some(after);
        self
    }

    /// Stores without telling subscribers.
    pub fn silent(mut self, silent: bool) -> Self {
        self.silent = silent;
        self
    }
}

type PresenceCallback = Arc<dyn Fn(PresenceUpdate) + Send + Sync>;

/// What the client has joined and published, to restore on a new connection.
#[derive(Default)]
pub(super) struct Memberships {
    rooms: BTreeSet<String>,
    presence: BTreeMap<String, Vec<PresenceCallback>>,
    /// Room -> the last published state and when it expires.
    states: BTreeMap<String, (Value, Option<Instant>)>,
}

/// Hands a presence push to the callbacks of its room.
pub(super) fn dispatch_presence(inner: &Inner, payload: &Value) {
    let Ok(update) = PresenceUpdate::deserialize(payload) else {
        tracing::debug!("ignored a presence update of unexpected shape");
        return;
    };
    let callbacks = lock(&inner.memberships)
        .presence
        .get(&update.room_name)
        .cloned()
        .unwrap_or_default();
    for callback in callbacks {
        callback(update.clone());
    }
}

/// Re-joins rooms, renews presence subscriptions and re-publishes unexpired states on a
/// new connection. Failures are logged: the next reconnect tries again.
pub(super) async fn restore(client: &MeshClient) {
    let (rooms, presence, states) = {
        let memberships = lock(&client.inner().memberships);
        let now = Instant::now();
        (
            memberships.rooms.iter().cloned().collect::<Vec<_>>(),
            memberships.presence.keys().cloned().collect::<Vec<_>>(),
            memberships
                .states
                .iter()
                .filter_map(|(room, (state, expires))| match expires {
                    None => Some((room.clone(), state.clone(), None)),
                    Some(at) if *at > now => Some((room.clone(), state.clone(), Some(*at - now))),
                    Some(_) => None,
                })
                .collect::<Vec<_>>(),
        )
    };
    for room in rooms {
        if let Err(err) = client.request_join(&room).await {
            tracing::warn!(%err, room, "could not re-join a room after reconnecting");
        }
    }
    for room in presence {
        if let Err(err) = client.request_presence(&room).await {
            tracing::warn!(%err, room, "could not renew a presence subscription");
        }
    }
    for (room, state, expire_after) in states {
        let options = StateOptions {
            expire_after,
            silent: false,
        };
        if let Err(err) = client.request_state(&room, &state, options).await {
            tracing::warn!(%err, room, "could not re-publish a presence state");
        }
    }
}

fn success(reply: &Value) -> bool {
    reply["success"] == Value::Bool(true)
}

fn decode<T: for<'de> Deserialize<'de>>(reply: Value) -> Result<T, ClientError> {
    serde_json::from_value(reply).map_err(|err| ClientError::Decode(err.to_string()))
}

impl MeshClient {
    /// Joins a room; returns its members (the caller included). The room is joined
    /// again after every reconnect until [`leave_room`](Self::leave_room).
    pub async fn join_room(&self, room: &str) -> Result<Vec<Member>, ClientError> {
        let members = self.request_join(room).await?;
        lock(&self.inner().memberships)
            .rooms
            .insert(room.to_owned());
        Ok(members)
    }

    async fn request_join(&self, room: &str) -> Result<Vec<Member>, ClientError> {
        let reply = self
            .command("mesh/join-room", json!({ "roomName": room }))
            .await?;
        if !success(&reply) {
            return Err(ClientError::Refused(format!("joining room {room}")));
        }
        decode(reply["present"].clone())
    }

    /// Leaves a room (and forgets its presence state here).
    pub async fn leave_room(&self, room: &str) -> Result<(), ClientError> {
        {
            let mut memberships = lock(&self.inner().memberships);
            memberships.rooms.remove(room);
            memberships.states.remove(room);
        }
        self.command("mesh/leave-room", json!({ "roomName": room }))
            .await
            .map(drop)
    }

    /// A room's metadata (`None` when it has none).
    pub async fn room_metadata(&self, room: &str) -> Result<Option<Value>, ClientError> {
        let reply = self
            .command("mesh/get-room-metadata", json!({ "roomName": room }))
            .await?;
        Ok(Some(reply["metadata"].clone()).filter(|metadata| !metadata.is_null()))
    }

    /// Subscribes to a tracked room's presence: `callback` gets every update from now
    /// on; the returned snapshot says who is present and their states. The subscription
    /// is renewed after every reconnect until
    /// [`unsubscribe_presence`](Self::unsubscribe_presence).
    pub async fn subscribe_presence_with(
        &self,
        room: &str,
        callback: impl Fn(PresenceUpdate) + Send + Sync + 'static,
    ) -> Result<PresenceSnapshot, ClientError> {
        // The callback is in place before the server may send the first update.
        let callback: PresenceCallback = Arc::new(callback);
        lock(&self.inner().memberships)
            .presence
            .entry(room.to_owned())
            .or_default()
            .push(callback.clone());
        match self.request_presence(room).await {
            Ok(snapshot) => Ok(snapshot),
            Err(err) => {
                let mut memberships = lock(&self.inner().memberships);
                if let Some(callbacks) = memberships.presence.get_mut(room) {
                    callbacks.retain(|kept| !Arc::ptr_eq(kept, &callback));
                    if callbacks.is_empty() {
                        memberships.presence.remove(room);
                    }
                }
                Err(err)
            }
        }
    }

    /// Like [`subscribe_presence_with`](Self::subscribe_presence_with), with the updates
    /// as a stream: receive them from the returned channel.
    pub async fn subscribe_presence(
        &self,
        room: &str,
    ) -> Result<(PresenceSnapshot, mpsc::UnboundedReceiver<PresenceUpdate>), ClientError> {
        let (updates, receiver) = mpsc::unbounded_channel();
        let snapshot = self
            .subscribe_presence_with(room, move |update| {
                let _ = updates.send(update);
            })
            .await?;
        Ok((snapshot, receiver))
    }

    async fn request_presence(&self, room: &str) -> Result<PresenceSnapshot, ClientError> {
        let reply = self
            .command("mesh/subscribe-presence", json!({ "roomName": room }))
            .await?;
        if !success(&reply) {
            return Err(ClientError::Refused(format!(
                "subscribing to the presence of room {room}"
            )));
        }
        decode(reply)
    }

    /// Ends a presence subscription (every callback and stream of the room); returns
    /// whether the server had one.
    pub async fn unsubscribe_presence(&self, room: &str) -> Result<bool, ClientError> {
        lock(&self.inner().memberships).presence.remove(room);
        let reply = self
            .command("mesh/unsubscribe-presence", json!({ "roomName": room }))
            .await?;
        Ok(reply == Value::Bool(true))
    }

    /// Publishes this connection's presence state in a tracked room it is in. Returns
    /// `false` when the server did not store it (room not tracked, not present). A stored
    /// state is published again after a reconnect, until it expires.
    pub async fn publish_presence_state(
        &self,
        room: &str,
        state: Value,
        options: StateOptions,
    ) -> Result<bool, ClientError> {
        let stored = self.request_state(room, &state, options).await?;
        if stored {
            let expires = options.expire_after.map(|after| Instant::now() + after);
            lock(&self.inner().memberships)
                .states
                .insert(room.to_owned(), (state, expires));
        }
        Ok(stored)
    }

    async fn request_state(
        &self,
        room: &str,
        state: &Value,
        options: StateOptions,
    ) -> Result<bool, ClientError> {
        let mut payload = json!({ "roomName": room, "state": state, "silent": options.silent });
        if let Some(after) = options.expire_after {
            payload["expireAfter"] = json!(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        }
        let reply = self.command("mesh/publish-presence-state", payload).await?;
        Ok(reply == Value::Bool(true))
    }

    /// Clears this connection's presence state in a room.
    pub async fn clear_presence_state(&self, room: &str) -> Result<bool, ClientError> {
        lock(&self.inner().memberships).states.remove(room);
        let reply = self
            .command("mesh/clear-presence-state", json!({ "roomName": room }))
            .await?;
        Ok(reply == Value::Bool(true))
    }

    /// Who is present in a tracked room and their states, without subscribing (member
    /// metadata is `null` here: the server lists ids only).
    pub async fn presence_state(&self, room: &str) -> Result<PresenceSnapshot, ClientError> {
        let reply = self
            .command("mesh/get-presence-state", json!({ "roomName": room }))
            .await?;
        if !success(&reply) {
            return Err(ClientError::Refused(format!(
                "reading the presence of room {room}"
            )));
        }
        let present: Vec<String> = decode(reply["present"].clone())?;
        Ok(PresenceSnapshot {
            present: present
                .into_iter()
                .map(|id| Member {
                    id,
                    metadata: Value::Null,
                })
                .collect(),
            states: decode(reply["states"].clone())?,
        })
    }

    /// Keeps a presence state alive for as long as the returned keeper lives: it is
    /// published now with an expiry of twice `refresh_every`, then silently published
    /// again every `refresh_every`. If this client dies, its state expires on its own
    /// (subscribers see `state: null`) instead of lingering; dropping the keeper stops
    /// the refreshes and lets it expire.
    pub async fn keep_presence_state(
        &self,
        room: &str,
        state: Value,
        refresh_every: Duration,
    ) -> Result<StateKeeper, ClientError> {
        let expiry = refresh_every.saturating_mul(2);
        let options = StateOptions::new().expire_after(expiry);
        if !self
            .publish_presence_state(room, state.clone(), options)
            .await?
        {
            return Err(ClientError::Refused(format!(
                "publishing a presence state in room {room}"
            )));
        }
        let weak: Weak<Inner> = Arc::downgrade(self.inner());
        let room = room.to_owned();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let client = MeshClient::observer(&inner);
                let refreshed = client
                    .publish_presence_state(&room, state.clone(), options.silent(true))
                    .await;
                if let Err(err) = refreshed {
                    tracing::debug!(%err, room, "presence state refresh failed");
                }
            }
        });
        Ok(StateKeeper { task })
    }
}

/// Keeps a presence state alive; see [`MeshClient::keep_presence_state`]. Dropping it
/// stops the refreshes.
#[derive(Debug)]
pub struct StateKeeper {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StateKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
