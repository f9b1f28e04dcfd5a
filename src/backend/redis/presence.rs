//! Presence in tracked rooms: refreshing deadlines, the present connections with their
//! states, and setting or clearing a state. Each change is one Lua script that also
//! publishes the presence change it makes (`announce` in `scripts.rs`); lapsed presence
//! and states are removed by the sweep (`liveness.rs`).

use std::time::Duration;

use serde_json::Value;

use super::{millis, parse_json, parse_json_or_null, redis_error, RedisBackend};
use crate::backend::{PresenceRefresh, PresenceView};
use crate::error::MeshError;

impl RedisBackend {
    pub(super) async fn extend_presence(
        &self,
        refreshes: &[PresenceRefresh],
    ) -> Result<(), MeshError> {
        let mut conn = self.connection().await?;
        let mut invocation = self.shared.scripts.refresh_presence.prepare_invoke();
        invocation.arg(&self.shared.keys.prefix);
        for (connection_id, rooms) in refreshes {
            invocation.arg(&**connection_id).arg(rooms.len());
            for (room, ttl) in rooms {
                invocation.arg(&**room).arg(millis(*ttl));
            }
        }
        invocation
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    pub(super) async fn presence_view(&self, room: &str) -> Result<PresenceView, MeshError> {
        let mut conn = self.connection().await?;
        let entries: Vec<(String, Option<String>, Option<String>)> = self
            .shared
            .scripts
            .presence
            .arg(&self.shared.keys.prefix)
            .arg(room)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut view = PresenceView::default();
        for (id, metadata, state) in entries {
            if let Some(state) = state {
                view.states.push((id.clone(), parse_json(&state)?));
            }
            view.present
                .push((id, parse_json_or_null(metadata.as_deref())?));
        }
        Ok(view)
    }

    pub(super) async fn write_presence_state(
        &self,
        connection_id: &str,
        room: &str,
        state: &Value,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let stored: i64 = self
            .shared
            .scripts
            .set_state
            .arg(&self.shared.keys.prefix)
            .arg(connection_id)
            .arg(room)
            .arg(state.to_string())
            .arg(expire_after.map_or(0, millis))
            .arg(if silent { 0 } else { 1 })
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(stored == 1)
    }

    pub(super) async fn remove_presence_state(
        &self,
        connection_id: &str,
        room: &str,
    ) -> Result<bool, MeshError> {
        self.connection_in_room(&self.shared.scripts.clear_state, connection_id, room)
            .await
    }
}
