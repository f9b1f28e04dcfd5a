//! Channels: a message is kept in the channel's history, given its offset and published
//! in one Lua script (`write_channel`), so history, positions and live messages never
//! disagree.
//!
//! A plain channel (`RedisBackendBuilder::plain_channels`) is published on its own name
//! with the message text as the payload, and its history list may be written by other
//! processes too: each write checks that the list's length is what the previous write
//! left, and recounts the list's bytes when it is not (see the module docs of `mod.rs`).
//! Other processes' writes carry no offset, so a plain channel has no positions at all.
//! Every read is bounded in bytes inside Redis (`read_history`), whoever wrote the list.

use std::sync::Arc;

use super::{redis_error, RedisBackend};
use crate::backend::{ChannelHistory, ChannelPosition, Delivery, HistoryRead};
use crate::error::MeshError;

/// An epoch as a script returns it: empty for a channel without positions.
fn position(epoch: String, offset: u64) -> Option<ChannelPosition> {
    (!epoch.is_empty()).then(|| ChannelPosition {
        epoch: Arc::from(epoch),
        offset,
    })
}

impl RedisBackend {
    pub(super) async fn append_to_channel(
        &self,
        channel: &str,
        message: &str,
        history: usize,
        history_bytes: usize,
    ) -> Result<Option<ChannelPosition>, MeshError> {
        let keys = &self.shared.keys;
        let plain = keys.plain_channel(channel);
        let announcement = Delivery::ChannelMessage {
            channel: Arc::from(channel),
            message: Arc::from(""),
            position: None,
        };
        let Some((pubsub_channel, pubsub)) = keys.channel_of(&announcement) else {
            return Err(MeshError::Corrupt(
                "a channel message must go to a topic".into(),
            ));
        };
        let mut conn = self.connection().await?;
        let (epoch, offset): (String, u64) = self
            .shared
            .scripts
            .write_channel
            .key(keys.channel_history(channel))
            .key(keys.channel_history_bytes(channel))
            .key(keys.channel_history_length(channel))
            .key(keys.channel_position(channel))
            .arg(message)
            .arg(history)
            .arg(history_bytes)
            .arg(pubsub.publish_command())
            .arg(pubsub_channel)
            .arg(channel)
            .arg(if plain { "1" } else { "0" })
            .arg(crate::backend::new_epoch())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(position(epoch, offset))
    }

    pub(super) async fn read_channel_history(
        &self,
        channel: &str,
        read: HistoryRead<'_>,
    ) -> Result<ChannelHistory, MeshError> {
        let keys = &self.shared.keys;
        let mut conn = self.connection().await?;
        let since = read.since;
        let (epoch, offset, recovered, messages): (String, u64, u8, Vec<String>) = self
            .shared
            .scripts
            .read_history
            .key(keys.channel_history(channel))
            .key(keys.channel_position(channel))
            .arg(read.limit)
            .arg(read.max_message_bytes)
            .arg(read.max_bytes)
            .arg(
                since
                    .map(|since| since.offset.to_string())
                    .unwrap_or_default(),
            )
            .arg(
                since
                    .and_then(|since| since.epoch)
                    .map(|epoch| format!("={epoch}"))
                    .unwrap_or_default(),
            )
            .arg(since.map_or(0, |since| since.at_most))
            .arg(crate::backend::new_epoch())
            .arg(if keys.plain_channel(channel) {
                "1"
            } else {
                "0"
            })
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(ChannelHistory {
            messages,
            position: position(epoch, offset),
            recovered: recovered == 1,
        })
    }
}
