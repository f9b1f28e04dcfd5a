//! Publishing a delivery: one for a connection goes to its holder's instance channel
//! (on a single Redis the `route` Lua script looks the holder up and publishes, in one
//! round trip; on a Cluster the holder's channel is in another slot than the connection's
//! hash, so the lookup and the publish are two), any other to its channel
//! (`Keys::channel_of`). A plain channel carries bare message text, never an envelope.

use super::{envelope, redis_error, RedisBackend};
use crate::backend::{Delivery, Topic};
use crate::error::MeshError;

impl RedisBackend {
    pub(super) async fn publish_delivery(&self, delivery: Delivery) -> Result<bool, MeshError> {
        let keys = &self.shared.keys;
        let envelope = match &delivery {
            Delivery::ChannelMessage {
                channel, message, ..
            } if keys.plain_channel(channel) => message.as_bytes().to_vec(),
            Delivery::Topic {
                topic: Topic::Channel(channel),
                ..
            } if keys.plain_channel(channel) => {
                // Its subscribers, inside the mesh and out, read bare text: a rendered
                // push has none to give them.
                return Err(MeshError::Corrupt(
                    "a plain channel carries channel messages, not pushes".into(),
                ));
            }
            _ => envelope::encode(&delivery),
        };
        let (channel, pubsub) = match (keys.channel_of(&delivery), &delivery) {
            (Some(channel), _) => channel,
            (
                None,
                Delivery::ToConnection { connection_id, .. }
                | Delivery::Close { connection_id, .. }
                | Delivery::Call { connection_id, .. },
            ) => {
                let mut conn = self.connection().await?;
                if conn.is_cluster() {
                    let holder: Option<String> = redis::cmd("HGET")
                        .arg(keys.connection(connection_id))
                        .arg("instance")
                        .query_async(&mut conn)
                        .await
                        .map_err(redis_error)?;
                    let Some(holder) = holder else {
                        return Ok(false);
                    };
                    let routed: i64 = redis::cmd(keys.instance_pubsub().publish_command())
                        .arg(keys.instance_channel(&holder))
                        .arg(envelope)
                        .query_async(&mut conn)
                        .await
                        .map_err(redis_error)?;
                    return Ok(routed > 0);
                }
                let routed: i64 = self
                    .shared
                    .scripts
                    .route
                    .key(keys.connection(connection_id))
                    .arg(&keys.prefix)
                    .arg(envelope)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                return Ok(routed > 0);
            }
            (None, _) => return Ok(false),
        };
        let mut conn = self.connection().await?;
        let received: i64 = redis::cmd(pubsub.publish_command())
            .arg(channel)
            .arg(envelope)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        // An answer names one instance: when nobody listens on its channel, nobody holds
        // it. Any other delivery here goes to whoever listens, which may be nobody.
        Ok(received > 0 || !matches!(delivery, Delivery::Answer { .. }))
    }
}
