//! Connection and room metadata: JSON text at a key of its own (the connection's
//! `conn-meta` in its bucket, written only while its hash holds the `instance` routing
//! field; the room's `room-meta` in its bucket), merged in Rust and written back by
//! compare-and-set (`merge_json`, the `metadata_cas` Lua script).

use serde_json::Value;

use super::{conflict_pause, parse_json, redis_error, RedisBackend};
use crate::backend::{MetadataKind, MetadataOf, MetadataWrite};
use crate::error::MeshError;

impl RedisBackend {
    pub(super) async fn read_metadata(
        &self,
        of: MetadataOf<'_>,
    ) -> Result<Option<Value>, MeshError> {
        match of {
            MetadataOf::Connection(id) => self.read_connection_metadata(id).await,
            MetadataOf::Room(room) => self.read_room_metadata(room).await,
        }
    }

    pub(super) async fn write_metadata(
        &self,
        of: MetadataOf<'_>,
        write: &MetadataWrite,
    ) -> Result<bool, MeshError> {
        match of {
            MetadataOf::Connection(id) => self.write_connection_metadata(id, write).await,
            MetadataOf::Room(room) => self.write_room_metadata(room, write).await.map(|()| true),
        }
    }

    pub(super) async fn list_metadata(
        &self,
        kind: MetadataKind,
    ) -> Result<Vec<(String, Value)>, MeshError> {
        match kind {
            MetadataKind::Connection => self.list_connection_metadata().await,
            MetadataKind::Room => self.list_room_metadata().await,
        }
    }

    async fn read_connection_metadata(
        &self,
        connection_id: &str,
    ) -> Result<Option<Value>, MeshError> {
        self.read_json(&self.shared.keys.connection_metadata(connection_id))
            .await
    }

    async fn write_connection_metadata(
        &self,
        connection_id: &str,
        write: &MetadataWrite,
    ) -> Result<bool, MeshError> {
        let keys = &self.shared.keys;
        let holder = keys.connection(connection_id);
        // A connection's metadata may only be set while it is registered.
        self.merge_json(
            &keys.connection_metadata(connection_id),
            Some((&holder, "instance")),
            write,
            None,
        )
        .await
    }

    async fn list_connection_metadata(&self) -> Result<Vec<(String, Value)>, MeshError> {
        let ids: Vec<String> = self
            .query_one(
                redis::cmd("ZRANGE")
                    .arg(self.shared.keys.connections())
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        self.with_connection_metadata(ids).await
    }

    async fn read_room_metadata(&self, room: &str) -> Result<Option<Value>, MeshError> {
        self.read_json(&self.shared.keys.room_metadata(room)).await
    }

    async fn write_room_metadata(
        &self,
        room: &str,
        write: &MetadataWrite,
    ) -> Result<(), MeshError> {
        let keys = &self.shared.keys;
        let index = format!("{}rooms-with-meta", keys.room_base(room));
        self.merge_json(&keys.room_metadata(room), None, write, Some((&index, room)))
            .await
            .map(drop)
    }

    pub(super) async fn remove_room_metadata(&self, room: &str) -> Result<(), MeshError> {
        let mut conn = self.connection().await?;
        self.shared
            .scripts
            .delete_room_metadata
            .key(self.shared.keys.room_base(room))
            .arg(room)
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    /// Every room's metadata: one script per room bucket.
    async fn list_room_metadata(&self) -> Result<Vec<(String, Value)>, MeshError> {
        let buckets = self
            .shared
            .keys
            .room_buckets()
            .map(|bucket| {
                let mut list = self.shared.scripts.all_room_metadata.prepare_invoke();
                list.key(bucket);
                list
            })
            .collect();
        let buckets: Vec<Vec<(String, String)>> = self.invoke_each(buckets).await?;
        let mut all = buckets
            .into_iter()
            .flatten()
            .map(|(room, raw)| Ok((room, parse_json(&raw)?)))
            .collect::<Result<Vec<_>, MeshError>>()?;
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// The JSON at `key`; `None` when there is none.
    async fn read_json(&self, key: &str) -> Result<Option<Value>, MeshError> {
        let raw: Option<String> = self.query_one(redis::cmd("GET").arg(key)).await?;
        raw.map(|raw| parse_json(&raw)).transpose()
    }

    /// Read-modify-write of the JSON at `key`: read it, merge in Rust (deepMerge is not
    /// worth re-implementing in Lua), then write it back (and add `index`'s member to its
    /// set) only if no other writer got in, else merge again on what that writer stored.
    /// With `require` (a hash in the same slot and a field), the update happens only
    /// while that field exists (the answer is then whether it did). Retries end with the
    /// operation timeout.
    async fn merge_json(
        &self,
        key: &str,
        require: Option<(&str, &str)>,
        write: &MetadataWrite,
        index: Option<(&str, &str)>,
    ) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let (index_key, index_member) = index.unwrap_or(("", ""));
        let (holder, field) = require.unwrap_or((key, ""));
        let mut attempt = 0;
        loop {
            let stored: Option<String> = if require.is_some() {
                let (stored, required): (Option<String>, bool) = redis::pipe()
                    .cmd("GET")
                    .arg(key)
                    .cmd("HEXISTS")
                    .arg(holder)
                    .arg(field)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                if !required {
                    return Ok(false);
                }
                stored
            } else {
                redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?
            };
            let old = stored.as_deref().map(parse_json).transpose()?;
            let (_, merged) = write.apply(old)?;
            let written: i64 = self
                .shared
                .scripts
                .metadata_cas
                .key(key)
                .key(holder)
                .arg(if stored.is_some() { "1" } else { "0" })
                .arg(stored.as_deref().unwrap_or_default())
                .arg(field)
                .arg(merged)
                .arg(index_key)
                .arg(index_member)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            match written {
                1 => return Ok(true),
                -1 => return Ok(false),
                _ => {}
            }
            attempt += 1;
            conflict_pause(attempt).await;
        }
    }
}
