//! Presence in tracked rooms: refreshing deadlines, the present connections with their
//! states, and setting or clearing a state. Each change is one Lua script that also
//! publishes the presence change it makes (`announce` in `scripts.rs`); lapsed presence
//! and states are removed by the sweep (`liveness.rs`).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::{millis, parse_json, redis_error, RedisBackend};
use crate::backend::{PresenceRefresh, PresenceView};
use crate::error::MeshError;

impl RedisBackend {
    /// Extends presence with one script per room bucket the refreshes touch.
    pub(super) async fn extend_presence(
        &self,
        refreshes: &[PresenceRefresh],
    ) -> Result<(), MeshError> {
        let keys = &self.shared.keys;
        let mut by_bucket: HashMap<String, redis::ScriptInvocation<'_>> = HashMap::new();
        for (connection_id, rooms) in refreshes {
            for (room, ttl) in rooms {
                by_bucket
                    .entry(keys.room_base(room))
                    .or_insert_with_key(|bucket| {
                        let mut refresh = self.shared.scripts.refresh_presence.prepare_invoke();
                        refresh.key(bucket.as_str());
                        refresh
                    })
                    .arg(&**connection_id)
                    .arg(&**room)
                    .arg(millis(*ttl));
            }
        }
        self.invoke_each::<()>(by_bucket.into_values().collect())
            .await
            .map(drop)
    }

    /// The present connections and their states (one script in the room's bucket), then
    /// their metadata (in each connection's slot).
    pub(super) async fn presence_view(&self, room: &str) -> Result<PresenceView, MeshError> {
        let mut conn = self.connection().await?;
        let entries: Vec<(String, Option<String>)> = self
            .shared
            .scripts
            .presence
            .key(self.shared.keys.room_base(room))
            .arg(room)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut view = PresenceView::default();
        let mut present = Vec::with_capacity(entries.len());
        for (id, state) in entries {
            if let Some(state) = state {
                view.states.push((id.clone(), parse_json(&state)?));
            }
            present.push(id);
        }
        view.present = self.with_connection_metadata(present).await?;
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
            .key(self.shared.keys.room_base(room))
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
