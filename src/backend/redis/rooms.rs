//! Rooms: joining (which also makes a connection present in a tracked room) and leaving,
//! both Lua scripts, and the listings of members and rooms.

use std::time::Duration;

use serde_json::Value;

use super::{millis, parse_json_or_null, redis_error, RedisBackend};
use crate::error::MeshError;

impl RedisBackend {
    pub(super) async fn join(
        &self,
        connection_id: &str,
        room: &str,
        presence_ttl: Option<Duration>,
    ) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let registered: i64 = self
            .shared
            .scripts
            .join
            .arg(&self.shared.keys.prefix)
            .arg(connection_id)
            .arg(room)
            .arg(presence_ttl.map_or(0, millis))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(registered == 1)
    }

    pub(super) async fn leave(&self, connection_id: &str, room: &str) -> Result<bool, MeshError> {
        self.connection_in_room(&self.shared.scripts.leave, connection_id, room)
            .await
    }

    pub(super) async fn members(&self, room: &str) -> Result<Vec<String>, MeshError> {
        let mut conn = self.connection().await?;
        redis::cmd("ZRANGE")
            .arg(self.shared.keys.room(room))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)
    }

    pub(super) async fn members_with_metadata(
        &self,
        room: &str,
    ) -> Result<Vec<(String, Value)>, MeshError> {
        let mut conn = self.connection().await?;
        let pairs: Vec<(String, Option<String>)> = self
            .shared
            .scripts
            .members_with_metadata
            .arg(&self.shared.keys.prefix)
            .arg(room)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        pairs
            .into_iter()
            .map(|(id, raw)| Ok((id, parse_json_or_null(raw.as_deref())?)))
            .collect()
    }

    pub(super) async fn rooms_of(&self, connection_id: &str) -> Result<Vec<String>, MeshError> {
        let mut conn = self.connection().await?;
        let mut rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.shared.keys.connection_rooms(connection_id))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        rooms.sort_unstable();
        Ok(rooms)
    }

    pub(super) async fn list_rooms(&self) -> Result<Vec<String>, MeshError> {
        let mut conn = self.connection().await?;
        let mut rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.shared.keys.rooms())
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        rooms.sort_unstable();
        Ok(rooms)
    }

    pub(super) async fn in_a_common_room(&self, a: &str, b: &str) -> Result<bool, MeshError> {
        let keys = &self.shared.keys;
        let mut conn = self.connection().await?;
        let common: Vec<String> = redis::cmd("SINTER")
            .arg(keys.connection_rooms(a))
            .arg(keys.connection_rooms(b))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(!common.is_empty())
    }
}
