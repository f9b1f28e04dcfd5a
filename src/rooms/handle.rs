//! [`Room`]: the server-side API of one room, from [`Mesh::room`].

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::backend::{ConnectionOp, MetadataOf, MetadataWrite, Topic};
use crate::error::MeshError;
use crate::merge::MergeStrategy;
use crate::mesh::Mesh;

/// One room of a mesh: its members, broadcasts, metadata and presence. Made by
/// [`Mesh::room`]; it borrows the mesh and reads nothing until a method is called.
///
/// Every method works across instances: a member held by another instance is added,
/// removed and reached like a local one. Server-side calls are trusted: room guards and
/// the per-connection room limit only apply to the `mesh/join-room` command.
///
/// ```no_run
/// # async fn demo(mesh: tower_mesh::Mesh, sender: &str) -> Result<(), tower_mesh::MeshError> {
/// let lobby = mesh.room("lobby");
/// lobby.broadcast("announcement", "doors open").await?;
/// lobby.except(sender).broadcast("typing", &sender).await?;
/// let members = lobby.members().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Room<'m> {
    pub(super) mesh: &'m Mesh,
    pub(super) name: &'m str,
}

impl<'m> Room<'m> {
    /// The room's name.
    pub fn name(&self) -> &'m str {
        self.name
    }

    /// A broadcast to this room that skips `connection_id` (for example the sender); chain
    /// [`RoomBroadcast::except`] to skip more.
    pub fn except(self, connection_id: &'m str) -> RoomBroadcast<'m> {
        RoomBroadcast {
            room: self,
            except: vec![connection_id],
        }
    }

    /// Sends a push `{command, payload}` to every member, on every instance. The frame is
    /// serialised once and shared by every recipient.
    pub async fn broadcast<P: Serialize + ?Sized>(
        &self,
        command: &str,
        payload: &P,
    ) -> Result<(), MeshError> {
        self.broadcast_except(command, payload, &[]).await
    }

    async fn broadcast_except<P: Serialize + ?Sized>(
        &self,
        command: &str,
        payload: &P,
        except: &[&str],
    ) -> Result<(), MeshError> {
        let push = crate::mesh::push_of(command, payload)?;
        let exclude: Arc<[Arc<str>]> = except.iter().map(|id| Arc::from(*id)).collect();
        self.mesh
            .publish_topic(Topic::Room(Arc::from(self.name)), push, exclude)
            .await
    }

    /// Adds a connection (held by any instance). Returns `false` when no instance holds
    /// it. A tracked room announces its presence `join`.
    pub async fn add(&self, connection_id: &str) -> Result<bool, MeshError> {
        self.mesh
            .on_holder(connection_id, ConnectionOp::JoinRoom(Arc::from(self.name)))
            .await
    }

    /// Removes a connection (held by any instance). Returns whether it was a member. A
    /// tracked room announces its presence `leave`.
    pub async fn remove(&self, connection_id: &str) -> Result<bool, MeshError> {
        self.mesh
            .on_holder(connection_id, ConnectionOp::LeaveRoom(Arc::from(self.name)))
            .await
    }

    /// Whether a connection is a member.
    pub async fn contains(&self, connection_id: &str) -> Result<bool, MeshError> {
        Ok(self
            .mesh
            .connection_rooms(connection_id)
            .await?
            .iter()
            .any(|joined| joined == self.name))
    }

    /// The members, in the order they joined.
    pub async fn members(&self) -> Result<Vec<String>, MeshError> {
        self.mesh.ready().await?;
        self.mesh.inner().backend.room_members(self.name).await
    }

    /// The members in join order, each with its metadata (`null` when none).
    pub async fn members_with_metadata(&self) -> Result<Vec<(String, Value)>, MeshError> {
        self.mesh.ready().await?;
        self.mesh
            .inner()
            .backend
            .room_members_with_metadata(self.name)
            .await
    }

    /// Removes every member (announcing presence `leave`s) and deletes the room's
    /// metadata.
    pub async fn clear(&self) -> Result<(), MeshError> {
        self.mesh.ready().await?;
        let backend = &self.mesh.inner().backend;
        let members = backend.room_members(self.name).await?;
        let removals = members.iter().map(|member| async move {
            match self.remove(member).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(MeshError::Unavailable("no instance holds it".into())),
                Err(err) => Err(err),
            }
        });
        let mut failure = None;
        for (member, removed) in members
            .iter()
            .zip(futures_util::future::join_all(removals).await)
        {
            if removed.is_ok() {
                continue;
            }
            // Its instance did not answer, or holds no such connection any more (a dead
            // instance not swept yet, an unregistration that failed): remove the entry
            // directly, so a cleared room is empty whatever its members' instances do.
            tracing::warn!(connection = %member, "removing a member its instance did not remove");
            if let Err(err) = backend.leave_room(member, self.name).await {
                failure = Some(err);
            }
        }
        backend.delete_room_metadata(self.name).await?;
        failure.map_or(Ok(()), Err)
    }

    /// The room's metadata; `None` when it has none.
    pub async fn metadata(&self) -> Result<Option<Value>, MeshError> {
        self.mesh.ready().await?;
        self.mesh
            .inner()
            .backend
            .metadata(MetadataOf::Room(self.name))
            .await
    }

    /// Combines `metadata` into the room's metadata with `strategy`. A room need not have
    /// members to have metadata. A result over
    /// [`max_metadata_bytes`](crate::MeshBuilder::max_metadata_bytes) is refused with
    /// [`MeshError::TooLarge`], and nothing is stored.
    pub async fn set_metadata(
        &self,
        metadata: Value,
        strategy: MergeStrategy,
    ) -> Result<(), MeshError> {
        self.mesh.ready().await?;
        let write = MetadataWrite::new(
            metadata,
            strategy,
            self.mesh.config().bytes.metadata,
            format!("the metadata of room \"{}\"", self.name),
        );
        self.mesh
            .inner()
            .backend
            .set_metadata(MetadataOf::Room(self.name), &write)
            .await
            .map(|_| ())
    }

    /// Shallow-merges `metadata` into the room's metadata ([`MergeStrategy::Merge`]).
    pub async fn update_metadata(&self, metadata: Value) -> Result<(), MeshError> {
        self.set_metadata(metadata, MergeStrategy::Merge).await
    }

    /// The connections present (in a tracked room), in the order they joined.
    pub async fn present(&self) -> Result<Vec<String>, MeshError> {
        self.mesh.ready().await?;
        let view = self.mesh.inner().backend.presence(self.name).await?;
        Ok(view.present.into_iter().map(|(id, _)| id).collect())
    }

    /// The presence states (in a tracked room), by connection id.
    pub async fn presence_states(&self) -> Result<Vec<(String, Value)>, MeshError> {
        self.mesh.ready().await?;
        Ok(self.mesh.inner().backend.presence(self.name).await?.states)
    }
}

/// A room broadcast that skips some connections: `mesh.room("lobby").except(id)`.
#[derive(Debug, Clone)]
#[must_use = "nothing is sent until broadcast is called"]
pub struct RoomBroadcast<'m> {
    room: Room<'m>,
    except: Vec<&'m str>,
}

impl<'m> RoomBroadcast<'m> {
    /// Skips one more connection.
    pub fn except(mut self, connection_id: &'m str) -> Self {
        self.except.push(connection_id);
        self
    }

    /// Sends a push `{command, payload}` to every member but the skipped ones, on every
    /// instance.
    pub async fn broadcast<P: Serialize + ?Sized>(
        &self,
        command: &str,
        payload: &P,
    ) -> Result<(), MeshError> {
        self.room
            .broadcast_except(command, payload, &self.except)
            .await
    }
}
