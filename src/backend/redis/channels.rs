//! Channels: a message is kept in the channel's history and published in one Lua script
//! (`write_channel`), so history and live messages never disagree.
//!
//! A plain channel (`RedisBackendBuilder::plain_channels`) is published on its own name
//! with the message text as the payload, and its history list may be written by other
//! processes too: each write checks that the list's length is what the previous write
//! left, and recounts the list's bytes when it is not (see the module docs of `mod.rs`).
//! Every read is bounded in bytes inside Redis (`read_history`), whoever wrote the list.

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
        let plain = keys.plain_channel(channel);
        // A plain channel carries the bare text, for any subscriber to read; every
        // instance renders the push from it, as it does for an outside publisher's.
        let Some((pubsub_channel, pubsub)) = keys.channel_of(&announcement) else {
            return Err(MeshError::Corrupt(
                "a channel message must go to a topic".into(),
            ));
        };
        let payload = if plain {
            message.as_bytes().to_vec()
        } else {
            envelope::encode(&announcement)
        };
        let mut conn = self.connection().await?;
        self.shared
            .scripts
            .write_channel
            .key(keys.channel_history(channel))
            .key(keys.channel_history_bytes(channel))
            .key(keys.channel_history_length(channel))
            .arg(message)
            .arg(history)
            .arg(history_bytes)
            .arg(pubsub.publish_command())
            .arg(pubsub_channel)
            .arg(payload)
            .arg(if plain { "1" } else { "0" })
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    pub(super) async fn read_channel_history(
        &self,
        channel: &str,
        limit: usize,
        max_message_bytes: usize,
        max_bytes: usize,
    ) -> Result<Vec<String>, MeshError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.connection().await?;
        self.shared
            .scripts
            .read_history
            .key(self.shared.keys.channel_history(channel))
            .arg(limit)
            .arg(max_message_bytes)
            .arg(max_bytes)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)
    }
}
