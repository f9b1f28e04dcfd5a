//! Connection metadata: the rule for who may read it, and its commands. Merge strategies
//! are in `merge.rs`; room metadata is with rooms.

use serde_json::Value;

use crate::connection::Connection;
use crate::error::MeshError;
use crate::mesh::Mesh;

/// Whose connection metadata a reply is about to show.
pub(crate) enum MetadataOwners<'a> {
    /// One connection, asked for by id (`mesh/get-connection-metadata`).
    Connection(&'a str),
    /// The members of a room, listed together (the `present` of `mesh/join-room` and
    /// `mesh/subscribe-presence`).
    RoomMembers(&'a str),
}

/// What one reply may show of connections' metadata, as [`Mesh::metadata_visibility`]
/// decided it.
pub(crate) struct MetadataVisibility<'a> {
    viewer: &'a str,
    others: bool,
}

impl MetadataVisibility<'_> {
    /// Whether the viewer may see the metadata of `owner`.
    pub(crate) fn shows(&self, owner: &str) -> bool {
        self.others || owner == self.viewer
    }

    /// The metadata of `owner` as the viewer may see it: as it is, or `null`.
    pub(crate) fn redact(&self, owner: &str, metadata: Value) -> Value {
        if self.shows(owner) {
            metadata
        } else {
            Value::Null
        }
    }
}

impl Mesh {
    /// The rule for reading other connections' metadata (docs/protocol.md §6). It is decided
    /// here only: every path metadata leaves the server by asks this function.
    ///
    /// A connection always sees its own metadata, and with
    /// [`open_connection_metadata`](crate::MeshBuilder::open_connection_metadata) it sees
    /// everyone's. Otherwise it sees another connection's metadata while they share a
    /// room; in a list of a room's members, while it is itself a member of that room
    /// (outside it, the ids stay visible, as the presence guard allows, with
    /// `metadata: null`). Membership is read from the backend as the reply is made, so a
    /// reply reflects the caller's rooms at that moment; presence updates carry no
    /// metadata, so a later join or leave changes only later replies.
    pub(crate) async fn metadata_visibility<'a>(
        &self,
        viewer: &'a Connection,
        owners: MetadataOwners<'_>,
    ) -> Result<MetadataVisibility<'a>, MeshError> {
        let others = self.config().open_connection_metadata
            || match owners {
                MetadataOwners::Connection(owner) => {
                    owner == viewer.id() || self.share_a_room(viewer.id(), owner).await?
                }
                MetadataOwners::RoomMembers(room) => self.room(room).contains(viewer.id()).await?,
            };
        Ok(MetadataVisibility {
            viewer: viewer.id(),
            others,
        })
    }
}

mod commands {
    use serde::Deserialize;
    use serde_json::{json, Value};

    use super::MetadataOwners;
    use crate::connection::Connection;
    use crate::error::CommandError;
    use crate::extract::Payload;
    use crate::merge::MergeStrategy;
    use crate::mesh::Mesh;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(crate) struct GetConnectionMetadata {
        connection_id: String,
    }

    /// `mesh/get-connection-metadata {connectionId}` -> `{metadata}`.
    ///
    /// Another connection's metadata reads as `null` where [`Mesh::metadata_visibility`]
    /// hides it.
    pub(crate) async fn get_connection_metadata(
        mesh: Mesh,
        connection: Connection,
        Payload(request): Payload<GetConnectionMetadata>,
    ) -> Result<Value, CommandError> {
        let visibility = mesh
            .metadata_visibility(
                &connection,
                MetadataOwners::Connection(&request.connection_id),
            )
            .await?;
        let metadata = if visibility.shows(&request.connection_id) {
            mesh.connection_metadata(&request.connection_id).await?
        } else {
            None
        };
        Ok(json!({ "metadata": metadata }))
    }

    /// `mesh/get-my-connection-metadata` -> `{metadata}`.
    pub(crate) async fn get_my_connection_metadata(
        mesh: Mesh,
        connection: Connection,
    ) -> Result<Value, CommandError> {
        let metadata = mesh.connection_metadata(connection.id()).await?;
        Ok(json!({ "metadata": metadata }))
    }

    #[derive(Deserialize)]
    pub(crate) struct SetMetadata {
        metadata: Value,
        #[serde(default)]
        options: Option<SetOptions>,
    }

    #[derive(Deserialize, Default)]
    struct SetOptions {
        #[serde(default)]
        strategy: MergeStrategy,
    }

    /// `mesh/set-my-connection-metadata {metadata, options?:{strategy}}` -> `{success}`.
    pub(crate) async fn set_my_connection_metadata(
        mesh: Mesh,
        connection: Connection,
        Payload(request): Payload<SetMetadata>,
    ) -> Result<Value, CommandError> {
        let strategy = request.options.unwrap_or_default().strategy;
        let success = mesh
            .set_connection_metadata(connection.id(), request.metadata, strategy)
            .await?;
        Ok(json!({ "success": success }))
    }
}

pub(crate) use commands::{
    get_connection_metadata, get_my_connection_metadata, set_my_connection_metadata,
};
