//! Channels: a message is kept in the channel's history and published in one Lua script
//! (`write_channel`), so history and live messages never disagree.

use super::{envelope, redis_error, RedisBackend};
use crate::backend::Delivery;
use crate::error::MeshError;

impl RedisBackend {
    pub(super) async fn append_to_channel(
        &self,
        channel: &str,
        message: &str,
        history: usize,
        history_bytes: usize,
        announcement: Delivery,
    ) -> Result<(), MeshError> {
        let keys = &self.shared.keys;
        let Some(pubsub_channel) = keys.channel_of(&announcement) else {
            return Err(MeshError::Corrupt(
                "a channel message must go to a topic".into(),
            ));
        };
        let mut conn = self.connection().await?;
        self.shared
            .scripts
            .write_channel
            .arg(keys.channel_history(channel))
            .arg(message)
            .arg(history)
            .arg(pubsub_channel)
            .arg(envelope::encode(&announcement))
            .arg(keys.channel_history_bytes(channel))
            .arg(history_bytes)
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    pub(super) async fn read_channel_history(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<String>, MeshError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.connection().await?;
        redis::cmd("LRANGE")
            .arg(self.shared.keys.channel_history(channel))
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)
    }
}
