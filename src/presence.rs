//! Presence: who is in a tracked room right now, with an optional state each, announced
//! to subscribers as `mesh/presence-update` pushes.
//!
//! A room is tracked when a [`track_presence`](crate::MeshBuilder::track_presence) pattern
//! matches it. Joining a tracked room makes a connection present until now + TTL; at
//! every ping tick, the connections that answered the previous ping are extended, in one
//! backend call per batch (so a flood of pongs costs nothing). Presence ends, with exactly
//! one `leave` announced across the mesh, when the connection leaves the room, ends, is
//! swept with its dead instance, or lets its TTL lapse. States set with `expireAfter` end
//! with a `state` update whose state is `null`.
//!
//! The backend announces every change in the same atomic step that makes it, so
//! subscribers see changes in the order they happened, whichever instances made them.
//! Lapses are found by a sweeper each instance runs (see the backend's `sweep`): it sleeps
//! until the backend's next deadline, or until this instance schedules an earlier one.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::access::{self, Guard, Rules};
use crate::backend::{PresenceChange, PresenceRefresh, Topic};
use crate::connection::Connection;
use crate::error::{CommandError, MeshError};
use crate::extract::Payload;
use crate::mesh::{Mesh, MeshInner};
use crate::metadata::MetadataOwners;
use crate::protocol::{self, Frame};
use crate::reply_budget;
use crate::rooms::{members_json, valid_room_name, RoomRequest};
use crate::topics::Form;

/// The longest `expireAfter` a presence state may ask for: one day.
pub const MAX_STATE_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest presence TTL; longer settings are shortened to it.
const MAX_PRESENCE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest pause between two sweeps, so a backlog is drained without spinning.
const MIN_SWEEP_PAUSE: Duration = Duration::from_millis(10);

/// How a tracked room's presence behaves; give it to
/// [`MeshBuilder::track_presence`](crate::MeshBuilder::track_presence).
///
/// ```
/// use std::time::Duration;
/// use tower_mesh::{Mesh, PresenceOptions};
///
/// let (layer, mesh) = Mesh::builder()
///     .track_presence("lobby", PresenceOptions::new())
///     .track_presence(
///         tower_mesh::Regex::new("^team:").unwrap(),
///         PresenceOptions::new()
///             .ttl(Duration::from_secs(90))
///             .guard(|connection, room| async move {
///                 // for example: only members of the team may watch it
///                 connection.headers().contains_key("x-team")
///             }),
///     )
///     .build();
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct PresenceOptions {
    ttl: Option<Duration>,
    guard: Option<Guard>,
}

impl std::fmt::Debug for PresenceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceOptions")
            .field("ttl", &self.ttl)
            .field("guard", &self.guard.is_some())
            .finish()
    }
}

impl PresenceOptions {
    /// Presence with the default TTL and no guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a member stays present without answering a ping. Default:
    /// `ping_interval × (max_missed_pongs + 2)`, about when a silent connection is closed
    /// anyway; at most a day. It must be longer than the ping interval
    /// ([`MeshBuilder::build`](crate::MeshBuilder::build) panics otherwise): presence is
    /// extended once per ping, for connections that answered the previous one, so leave
    /// a margin for the round trip.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Decides who may watch the room's presence (`mesh/subscribe-presence`,
    /// `mesh/get-presence-state`, and the `present` list of `mesh/join-room`). It gets
    /// the connection and the room name; `false` refuses with `{success: false}`.
    pub fn guard<F, Fut>(mut self, guard: F) -> Self
    where
        F: Fn(Connection, String) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        self.guard = Some(access::guard(guard));
        self
    }

    /// The rule these options make, with the TTL resolved against the liveness settings.
    pub(crate) fn into_rule(self, ping_interval: Duration, max_missed_pongs: u32) -> PresenceRule {
        let default_ttl = ping_interval.saturating_mul(max_missed_pongs.saturating_add(2));
        let ttl = self.ttl.unwrap_or(default_ttl).min(MAX_PRESENCE_TTL);
        assert!(
            ttl > ping_interval,
            "a presence TTL ({ttl:?}) must be longer than the ping interval \
             ({ping_interval:?}): presence is extended once per ping"
        );
        PresenceRule {
            ttl,
            guard: self.guard,
        }
    }
}

/// Presence in a mesh: the tracked rooms, and when lapsed entries are next swept.
pub(crate) struct Presence {
    /// Tracked rooms, by pattern.
    pub(crate) rules: Rules<PresenceRule>,
    pub(crate) sweeps: Arc<SweepSchedule>,
}

/// A tracked room pattern's settings.
pub(crate) struct PresenceRule {
    pub(crate) ttl: Duration,
    pub(crate) guard: Option<Guard>,
}

/// The `mesh/presence-update` frame of a presence change (rendered once per instance).
pub(crate) fn update_frame(
    room: &str,
    connection_id: &str,
    change: &PresenceChange,
    timestamp: u64,
) -> Frame {
    let (kind, state) = match change {
        PresenceChange::Join => ("join", None),
        PresenceChange::Leave => ("leave", None),
        PresenceChange::State(state) => ("state", Some(state.as_deref().unwrap_or("null"))),
    };
    Frame::from(protocol::presence_update(
        kind,
        connection_id,
        room,
        state,
        timestamp,
    ))
}

/// How many connections one presence refresh call carries, so no single script runs long.
const REFRESH_BATCH: usize = 256;

impl Mesh {
    /// The presence TTL of `room`, or `None` when it is not tracked.
    pub(crate) fn presence_ttl(&self, room: &str) -> Option<Duration> {
        self.inner().presence.rules.find(room).map(|rule| rule.ttl)
    }

    /// Whether `connection` may see who is present in `room`: always for an untracked
    /// room, else as the room's presence guard says.
    pub(crate) async fn may_watch_presence(&self, connection: &Connection, room: &str) -> bool {
        match self.inner().presence.rules.find(room) {
            Some(rule) => access::allows(rule.guard.as_ref(), connection, room).await,
            None => true,
        }
    }

    /// Extends the presence of `connections` (those that answered the last ping) in their
    /// tracked rooms, in batches; a connection whose presence had lapsed is present, and
    /// announced, again. Runs once per ping tick, so pongs cost nothing on their own.
    pub(crate) fn refresh_presence(&self, connections: &[Connection]) {
        let refreshes: Vec<PresenceRefresh> = connections
            .iter()
            .filter_map(|connection| {
                let rooms = self
                    .inner()
                    .topics
                    .topics_of(connection.id(), |topic| match topic {
                        Topic::Room(room) => self.presence_ttl(room).map(|ttl| (room.clone(), ttl)),
                        _ => None,
                    });
                (!rooms.is_empty()).then(|| (connection.shared_id(), rooms))
            })
            .collect();
        let Some(shortest) = refreshes
            .iter()
            .flat_map(|(_, rooms)| rooms.iter().map(|(_, ttl)| *ttl))
            .min()
        else {
            return;
        };
        let mesh = self.clone();
        tokio::spawn(async move {
            for batch in refreshes.chunks(REFRESH_BATCH) {
                if let Err(err) = mesh.inner().backend.refresh_presence(batch).await {
                    tracing::warn!(%err, "could not refresh presence");
                }
            }
            mesh.inner().presence.sweeps.due_within(shortest);
        });
    }
}

/// When this instance's sweeper runs next.
pub(crate) struct SweepSchedule {
    next: Mutex<Instant>,
    wake: Notify,
}

impl Default for SweepSchedule {
    fn default() -> Self {
        SweepSchedule {
            next: Mutex::new(Instant::now()),
            wake: Notify::new(),
        }
    }
}

impl SweepSchedule {
    fn lock(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.next
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes the next sweep happen no later than `after` from now.
    pub(crate) fn due_within(&self, after: Duration) {
        let Some(at) = Instant::now().checked_add(after) else {
            return;
        };
        let mut next = self.lock();
        if at < *next {
            *next = at;
            drop(next);
            self.wake.notify_one();
        }
    }

    async fn wait(&self) {
        loop {
            let at = *self.lock();
            tokio::select! {
                () = tokio::time::sleep_until(at) => return,
                () = self.wake.notified() => {}
            }
        }
    }
}

/// Runs the sweeper of one instance until the mesh is dropped or shut down.
pub(crate) fn start_sweeper(inner: Weak<MeshInner>) {
    let Some(schedule) = Mesh::from_weak(&inner).map(|mesh| mesh.inner().presence.sweeps.clone())
    else {
        return;
    };
    tokio::spawn(async move {
        loop {
            // Holds the mesh only while sweeping, so a dropped mesh ends the task.
            let Some(mesh) = Mesh::from_weak(&inner) else {
                return;
            };
            if mesh.is_shutting_down() {
                return;
            }
            *schedule.lock() = Instant::now() + Duration::from_secs(3600);
            mesh.retry_unregistrations().await;
            let due = mesh.inner().backend.sweep().await.unwrap_or_else(|err| {
                tracing::warn!(%err, "presence sweep failed");
                Duration::from_secs(1)
            });
            drop(mesh);
            schedule.due_within(due.max(MIN_SWEEP_PAUSE));
            schedule.wait().await;
        }
    });
}

/// `mesh/subscribe-presence {roomName}` -> `{success, present: [{id, metadata}], states}`,
/// or `{success: false, present: []}` when the room is not tracked or the guard refuses.
/// The metadata is shown as [`Mesh::metadata_visibility`] decides: to a caller in the
/// room when the reply is made.
pub(crate) async fn subscribe_presence(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<RoomRequest>,
) -> Result<Value, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    let refused = json!({ "success": false, "present": [] });
    if mesh.presence_ttl(room).is_none() || !mesh.may_watch_presence(&connection, room).await {
        return Ok(refused);
    }
    // Listening starts before the snapshot is read, so no change falls between them.
    let topic = Topic::Presence(Arc::from(room));
    if mesh
        .subscribe(&connection, topic.clone(), Form::Full)
        .await?
        .is_none()
    {
        return Ok(refused);
    }
    let snapshot = futures_util::future::try_join(
        mesh.metadata_visibility(&connection, MetadataOwners::RoomMembers(room)),
        mesh.inner().backend.presence(room),
    )
    .await;
    let (visibility, view) = mesh.unless_failed(&connection, &topic, snapshot).await?;
    let budget = reply_budget::for_entries(&mesh);
    let (present, truncated) = members_json(view.present, &visibility, budget);
    let left = budget.saturating_sub(reply_budget::json_len(&present));
    let (states, states_truncated) = states_of(&present, view.states, left);
    Ok(reply_budget::mark(
        json!({ "success": true, "present": present, "states": states }),
        truncated || states_truncated,
    ))
}

/// `mesh/unsubscribe-presence {roomName}` -> whether the caller was subscribed.
pub(crate) async fn unsubscribe_presence(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<RoomRequest>,
) -> Result<bool, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    let _membership = connection.lock_membership().await;
    Ok(mesh.stop_listening(connection.id(), &Topic::Presence(Arc::from(room))))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PublishState {
    room_name: String,
    #[serde(default)]
    state: Option<Value>,
    #[serde(default)]
    expire_after: Option<u64>,
    #[serde(default)]
    silent: Option<bool>,
}

/// `mesh/publish-presence-state {roomName, state, expireAfter?, silent?}` -> `true`, or
/// `false` when the room is not tracked, the caller is not present in it, or `state` is
/// missing. A state that is not an object or is over
/// [`max_presence_state_bytes`](crate::MeshBuilder::max_presence_state_bytes), or an
/// `expireAfter` that is not a whole number of milliseconds between 1 and a day, is an
/// `EINVALID` error. Nothing is stored then.
pub(crate) async fn publish_presence_state(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<PublishState>,
) -> Result<bool, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    let state = match request.state {
        None | Some(Value::Null) => return Ok(false),
        Some(state @ Value::Object(_)) => state,
        Some(_) => return Err(CommandError::invalid("state must be a JSON object")),
    };
    let limit = mesh.config().bytes.presence_state;
    let size = state.to_string().len();
    if size > limit {
        return Err(MeshError::TooLarge {
            what: format!("a presence state in room \"{room}\""),
            setting: "max_presence_state_bytes",
            limit,
            size,
        }
        .into());
    }
    let expire_after = match request.expire_after {
        None => None,
        Some(ms) if (1..=MAX_STATE_EXPIRY.as_millis()).contains(&u128::from(ms)) => {
            Some(Duration::from_millis(ms))
        }
        Some(_) => {
            return Err(CommandError::invalid(format!(
                "expireAfter must be between 1 and {} milliseconds",
                MAX_STATE_EXPIRY.as_millis()
            )))
        }
    };
    if mesh.presence_ttl(room).is_none() {
        return Ok(false);
    }
    let silent = request.silent.unwrap_or(false);
    let stored = mesh
        .inner()
        .backend
        .set_presence_state(connection.id(), room, Some(&state), expire_after, silent)
        .await?;
    if let (true, Some(after)) = (stored, expire_after) {
        mesh.inner().presence.sweeps.due_within(after);
    }
    Ok(stored)
}

/// `mesh/clear-presence-state {roomName}` -> `true` when the caller is present in the
/// tracked room (a `state: null` update is announced if it had a state), else `false`.
pub(crate) async fn clear_presence_state(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<RoomRequest>,
) -> Result<bool, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    if mesh.presence_ttl(room).is_none() {
        return Ok(false);
    }
    Ok(mesh
        .inner()
        .backend
        .set_presence_state(connection.id(), room, None, None, false)
        .await?)
}

/// `mesh/get-presence-state {roomName}` -> `{success, present: [ids], states}` (ids only:
/// no metadata, so nothing here for [`Mesh::metadata_visibility`] to hide), or
/// `{success: false, present: [], states: {}}` when the room is not tracked or the guard
/// refuses.
pub(crate) async fn get_presence_state(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<RoomRequest>,
) -> Result<Value, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    if mesh.presence_ttl(room).is_none() || !mesh.may_watch_presence(&connection, room).await {
        return Ok(json!({ "success": false, "present": [], "states": {} }));
    }
    let view = mesh.inner().backend.presence(room).await?;
    let budget = reply_budget::for_entries(&mesh);
    let ids: Vec<Value> = view
        .present
        .into_iter()
        .map(|(id, _)| Value::String(id))
        .collect();
    let (present, truncated) = reply_budget::leading_that_fit(ids, budget, reply_budget::json_len);
    let left = budget.saturating_sub(reply_budget::json_len(&present));
    let (states, states_truncated) = states_of(&present, view.states, left);
    Ok(reply_budget::mark(
        json!({ "success": true, "present": present, "states": states }),
        truncated || states_truncated,
    ))
}

/// The states of the members a reply lists (`present` holds ids, or `{id, ..}` objects),
/// as `{id: state}`: those that fit in `budget` bytes, and whether any were left out.
fn states_of(present: &[Value], states: Vec<(String, Value)>, budget: usize) -> (Value, bool) {
    let listed: std::collections::HashSet<&str> = present
        .iter()
        .filter_map(|member| member.get("id").unwrap_or(member).as_str())
        .collect();
    let listed_states: Vec<(String, Value)> = states
        .into_iter()
        .filter(|(id, _)| listed.contains(id.as_str()))
        .collect();
    let (states, truncated) =
        reply_budget::leading_that_fit(listed_states, budget, |(id, state)| {
            reply_budget::json_len(id.as_str()) + 1 + reply_budget::json_len(state)
        });
    (
        Value::Object(states.into_iter().collect::<Map<String, Value>>()),
        truncated,
    )
}
