//! Rooms: membership, room broadcasts and room metadata, and the built-in commands
//! `mesh/join-room`, `mesh/leave-room` and `mesh/get-room-metadata`.
//!
//! Membership lives in the backend, where every instance sees it. A connection's own
//! instance also keeps it in its topic index, which is how a room broadcast reaches the
//! members: it goes to every instance with a member, and each hands it to its own. So
//! every change to a connection's rooms runs on the instance that holds the connection;
//! a change asked for elsewhere is forwarded there ([`Room::add`] on a connection of
//! another instance returns once that instance has applied it).
//!
//! The server-side API of one room is [`Room`] (`handle.rs`), from [`Mesh::room`].

mod handle;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::access::{Guard, Rules};
use crate::backend::{ConnectionOp, MetadataKind, Topic};
use crate::connection::{Connection, MembershipGuard};
use crate::error::{CommandError, MeshError};
use crate::extract::Payload;
use crate::mesh::Mesh;
use crate::metadata::{MetadataOwners, MetadataVisibility};
use crate::reply_budget;
use crate::topics::Form;
pub use handle::{Room, RoomBroadcast};

/// What a local join did.
pub(crate) enum JoinOutcome {
    Joined,
    /// The connection is closing (or gone from the backend): nothing was stored.
    Closed,
    /// The connection is already in as many rooms as it may be.
    OverLimit,
}

/// The rooms of a mesh: who may join which (besides global layers).
#[derive(Default)]
pub(crate) struct Rooms {
    /// Join guards, by room pattern.
    pub(crate) guards: Rules<Guard>,
}

impl Mesh {
    /// One room, to read or change it: `mesh.room("lobby").broadcast("news", &payload)`,
    /// `mesh.room("lobby").except(sender).broadcast(..)`, `mesh.room("lobby").members()`.
    /// Cheap: nothing is read until a method is called.
    pub fn room<'m>(&'m self, name: &'m str) -> Room<'m> {
        Room { mesh: self, name }
    }

    /// Removes a connection (held by any instance) from every room it is in. Returns
    /// `false` when no instance holds that connection.
    pub async fn remove_from_all_rooms(&self, connection_id: &str) -> Result<bool, MeshError> {
        self.on_holder(connection_id, ConnectionOp::LeaveAllRooms)
            .await
    }

    /// Whether two connections are members of at least one common room.
    pub async fn share_a_room(&self, a: &str, b: &str) -> Result<bool, MeshError> {
        self.ready().await?;
        self.inner().backend.share_a_room(a, b).await
    }

    /// The rooms a connection is in, sorted by name.
    pub async fn connection_rooms(&self, connection_id: &str) -> Result<Vec<String>, MeshError> {
        self.ready().await?;
        self.inner().backend.connection_rooms(connection_id).await
    }

    /// Every room with at least one member, sorted by name. A room exists while it has
    /// members; its metadata outlives it until [`Room::clear`](crate::Room::clear).
    pub async fn rooms(&self) -> Result<Vec<String>, MeshError> {
        self.ready().await?;
        self.inner().backend.rooms().await
    }

    /// Every room that has metadata, with it, sorted by room name. Filter it with
    /// ordinary iterator adapters.
    pub async fn all_room_metadata(&self) -> Result<Vec<(String, Value)>, MeshError> {
        self.ready().await?;
        self.inner().backend.all_metadata(MetadataKind::Room).await
    }
}

impl Mesh {
    /// Joins a local connection to a room: its topic index first (so the instance hears
    /// the room before the join is visible), then the backend. `limit` caps the rooms of
    /// the connection.
    pub(crate) async fn join_local(
        &self,
        connection: &Connection,
        room: &str,
        limit: Option<usize>,
    ) -> Result<JoinOutcome, MeshError> {
        let membership = connection.lock_membership().await;
        if connection.is_closed() {
            return Ok(JoinOutcome::Closed);
        }
        let topic = Topic::Room(Arc::from(room));
        if let Some(limit) = limit {
            let inside = self.inner().topics.topics_of(connection.id(), |topic| {
                matches!(topic, Topic::Room(_)).then_some(())
            });
            if inside.len() >= limit && !self.inner().topics.is_listening(&topic, connection.id()) {
                return Ok(JoinOutcome::OverLimit);
            }
        }
        crate::connection::reserve_reply_place(connection);
        let new_listener = self
            .listen(&membership, connection, topic.clone(), Form::Full)
            .await?
            .new;
        let ttl = self.presence_ttl(room);
        let joined = self
            .inner()
            .backend
            .join_room(connection.id(), room, ttl)
            .await;
        if !matches!(joined, Ok(true)) && new_listener {
            self.stop_listening(connection.id(), &topic);
        }
        if !joined? {
            return Ok(JoinOutcome::Closed);
        }
        if let Some(ttl) = ttl {
            self.inner().presence.sweeps.due_within(ttl);
        }
        Ok(JoinOutcome::Joined)
    }

    /// Removes a local connection from a room; returns whether it was a member.
    pub(crate) async fn leave_local(
        &self,
        connection: &Connection,
        room: &str,
    ) -> Result<bool, MeshError> {
        let membership = connection.lock_membership().await;
        self.leave_locked(&membership, connection, room).await
    }

    /// Removes a local connection from every room it is in.
    pub(crate) async fn leave_all_local(&self, connection: &Connection) -> Result<(), MeshError> {
        let membership = connection.lock_membership().await;
        let rooms = self
            .inner()
            .topics
            .topics_of(connection.id(), |topic| match topic {
                Topic::Room(room) => Some(room.clone()),
                _ => None,
            });
        for room in rooms {
            self.leave_locked(&membership, connection, &room).await?;
        }
        Ok(())
    }

    async fn leave_locked(
        &self,
        _membership: &MembershipGuard<'_>,
        connection: &Connection,
        room: &str,
    ) -> Result<bool, MeshError> {
        // The backend first: if it fails, the connection stays a member everywhere.
        let was_member = self
            .inner()
            .backend
            .leave_room(connection.id(), room)
            .await?;
        self.stop_listening(connection.id(), &Topic::Room(Arc::from(room)));
        Ok(was_member)
    }
}

/// The payload of every room and presence command: `{roomName}` (other fields ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RoomRequest {
    pub(crate) room_name: String,
}

/// Refuses an empty or oversized room name before anything is stored under it.
pub(crate) fn valid_room_name(name: &str) -> Result<&str, CommandError> {
    crate::access::valid_name("roomName", name)
}

/// `{id, metadata}` as `mesh/join-room` and `mesh/subscribe-presence` list members, with
/// the metadata `visibility` hides as `null`: the leading members (in join order) whose
/// entries fit in `budget` bytes, and whether any were left out.
pub(crate) fn members_json(
    members: Vec<(String, Value)>,
    visibility: &MetadataVisibility<'_>,
    budget: usize,
) -> (Vec<Value>, bool) {
    let entries = members
        .into_iter()
        .map(|(id, metadata)| {
            let metadata = visibility.redact(&id, metadata);
            json!({ "id": id, "metadata": metadata })
        })
        .collect();
    reply_budget::leading_that_fit(entries, budget, reply_budget::json_len)
}

/// `mesh/join-room {roomName}` -> `{success, present: [{id, metadata}]}`. A room guard
/// that refuses gives `{success: false, present: []}`; `present` is empty too when the
/// room is tracked and its presence guard refuses the caller (docs/protocol.md §6). The
/// metadata is shown as [`Mesh::metadata_visibility`] decides: to a caller still in the
/// room when the reply is made.
pub(crate) async fn join_room(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<RoomRequest>,
) -> Result<Value, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    let refused = json!({ "success": false, "present": [] });
    let guard = mesh.inner().rooms.guards.find(room);
    if !crate::access::allows(guard, &connection, room).await {
        return Ok(refused);
    }
    let limit = mesh.config().max_rooms_per_connection;
    match mesh.join_local(&connection, room, Some(limit)).await? {
        JoinOutcome::Joined => {}
        JoinOutcome::Closed => return Ok(refused),
        JoinOutcome::OverLimit => {
            return Err(CommandError::limit(format!(
                "a connection may be in at most {limit} rooms"
            )))
        }
    }
    let present = if mesh.may_watch_presence(&connection, room).await {
        let (visibility, members) = futures_util::future::try_join(
            mesh.metadata_visibility(&connection, MetadataOwners::RoomMembers(room)),
            mesh.room(room).members_with_metadata(),
        )
        .await?;
        members_json(members, &visibility, reply_budget::for_entries(&mesh))
    } else {
        (Vec::new(), false)
    };
    let (present, truncated) = present;
    Ok(reply_budget::mark(
        json!({ "success": true, "present": present }),
        truncated,
    ))
}

/// `mesh/leave-room {roomName}` -> `{success: true}`.
pub(crate) async fn leave_room(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<RoomRequest>,
) -> Result<Value, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    mesh.leave_local(&connection, room).await?;
    Ok(json!({ "success": true }))
}

/// `mesh/get-room-metadata {roomName}` -> `{metadata}` (`null` when none).
pub(crate) async fn get_room_metadata(
    mesh: Mesh,
    Payload(request): Payload<RoomRequest>,
) -> Result<Value, CommandError> {
    let room = valid_room_name(&request.room_name)?;
    Ok(json!({ "metadata": mesh.room(room).metadata().await? }))
}
