//! Channels: named streams of string messages with a kept history, and the built-in
//! commands `mesh/subscribe-channel`, `mesh/unsubscribe-channel` and
//! `mesh/get-channel-history`.
//!
//! A channel is exposed with [`MeshBuilder::expose_channel`](crate::MeshBuilder::expose_channel)
//! and written by the server ([`Mesh::write_channel`]); the message is kept and published
//! in one atomic step, so no message is in the history but missed live, or the reverse. A
//! subscriber listens before it reads the history, so a message written at that moment
//! may reach it twice: in the history and live.
//! Names starting with the reserved prefix (`mesh:` by default) are never open to clients
//! (docs/protocol.md §6), and stay apart from the engine's own channels in Redis anyway.
//!
//! On a Redis backend with plain channels, other processes publish and append to a
//! channel too: their messages arrive as [`Delivery::ChannelMessage`] and are checked
//! here against `max_channel_message_bytes` before any client gets them, and every
//! history read is bounded in bytes by the backend, whoever wrote the history.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::access::{valid_name, Access, Rules};
use crate::backend::{Delivery, Push, Topic};
use crate::connection::Connection;
use crate::error::{CommandError, MeshError};
use crate::extract::Payload;
use crate::mesh::Mesh;
use crate::protocol;
use crate::reply_budget;
use crate::topics::Form;

/// The most history messages one request returns.
pub const MAX_HISTORY_LIMIT: usize = 10_000;

/// The most messages a channel keeps; larger `history` values are lowered to it.
const MAX_KEPT_HISTORY: usize = 1_000_000;

/// How many messages `mesh/get-channel-history` returns without a `limit`.
const DEFAULT_HISTORY_LIMIT: usize = 50;

/// The channels of a mesh: which are exposed, and to whom.
#[derive(Default)]
pub(crate) struct Channels {
    /// Access by channel pattern.
    pub(crate) access: Rules<Access>,
}

impl Mesh {
    /// Publishes `message` on a channel to its subscribers on every instance, keeping the
    /// newest `history` messages for later subscribers (0 keeps none and leaves what is
    /// kept alone; at most a million are kept, and at most
    /// [`max_history_bytes`](crate::MeshBuilder::max_history_bytes) of them). A string is
    /// sent as it is; any other value as its JSON text. A message over
    /// [`max_channel_message_bytes`](crate::MeshBuilder::max_channel_message_bytes) is
    /// refused with [`MeshError::TooLarge`]: nothing is kept or sent.
    pub async fn write_channel<M: Serialize + ?Sized>(
        &self,
        channel: &str,
        message: &M,
        history: usize,
    ) -> Result<(), MeshError> {
        let message = match serde_json::to_value(message) {
            Ok(Value::String(text)) => text,
            Ok(other) => other.to_string(),
            Err(err) => return Err(MeshError::Encode(std::sync::Arc::new(err))),
        };
        let limits = self.config().bytes;
        if message.len() > limits.channel_message {
            return Err(MeshError::TooLarge {
                what: format!("a message on channel \"{channel}\""),
                setting: "max_channel_message_bytes",
                limit: limits.channel_message,
                size: message.len(),
            });
        }
        let announcement = Delivery::Topic {
            topic: Topic::Channel(Arc::from(channel)),
            push: Push {
                command: Arc::from(protocol::SUBSCRIPTION_MESSAGE),
                payload: Arc::from(protocol::subscription_message_payload(channel, &message)),
            },
            exclude: Arc::from([]),
        };
        self.ready().await?;
        self.inner()
            .backend
            .write_channel(
                channel,
                &message,
                history.min(MAX_KEPT_HISTORY),
                limits.history,
                announcement,
            )
            .await
    }

    /// The newest `limit` kept messages of a channel, newest first: at most
    /// [`max_history_bytes`](crate::MeshBuilder::max_history_bytes) of them, leaving out
    /// any over [`max_channel_message_bytes`](crate::MeshBuilder::max_channel_message_bytes)
    /// (which only another process, appending to a Redis plain channel's list, can keep).
    pub async fn channel_history(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<String>, MeshError> {
        let max_bytes = self.config().bytes.history;
        let mut history = self.read_history(channel, limit, max_bytes).await?;
        // The read returns the message that took it past the bound, as a mark.
        let mut total = 0usize;
        if let Some(within) = history.iter().position(|message| {
            total = total.saturating_add(message.len());
            total > max_bytes
        }) {
            history.truncate(within);
        }
        Ok(history)
    }

    /// The newest `limit` kept messages of a channel that fit in `max_bytes`, plus the
    /// one that does not (if any), leaving out those over the message limit: history
    /// written by other processes is bounded before it is read into memory.
    async fn read_history(
        &self,
        channel: &str,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<String>, MeshError> {
        self.ready().await?;
        let max_message_bytes = self.config().bytes.channel_message;
        self.inner()
            .backend
            .channel_history(channel, limit, max_message_bytes, max_bytes)
            .await
    }

    /// Hands a channel message that arrived from outside the mesh (a Redis plain
    /// channel's publisher) to the channel's local subscribers, unless it is over
    /// `max_channel_message_bytes`: the same bound [`Mesh::write_channel`] sets on the
    /// server's own messages.
    pub(crate) fn deliver_outside_channel_message(&self, channel: Arc<str>, message: &str) {
        let limit = self.config().bytes.channel_message;
        if message.len() > limit {
            self.inner()
                .stats
                .dropped_channel_messages
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                channel = &*channel,
                size = message.len(),
                limit,
                "dropped a channel message from outside the mesh: over max_channel_message_bytes"
            );
            return;
        }
        let push = Push {
            command: Arc::from(protocol::SUBSCRIPTION_MESSAGE),
            payload: Arc::from(protocol::subscription_message_payload(&channel, message)),
        };
        self.inner().topics.fan_out(
            &Topic::Channel(channel),
            &crate::mesh::render(&push),
            &[],
            self.registry(),
        );
    }

    /// Whether `connection` may read `channel`: it is exposed, not reserved, and its
    /// guard allows.
    async fn may_read_channel(&self, connection: &Connection, channel: &str) -> bool {
        if let Some(prefix) = &self.config().reserved_channel_prefix {
            if channel.starts_with(prefix.as_str()) {
                return false;
            }
        }
        match self.inner().channels.access.find(channel) {
            Some(access) => access.allows(connection, channel).await,
            None => false,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SubscribeChannel {
    channel: String,
    #[serde(default)]
    history_limit: Option<u64>,
}

fn limit(requested: Option<u64>, default: usize) -> usize {
    requested.map_or(default, |limit| {
        usize::try_from(limit)
            .unwrap_or(MAX_HISTORY_LIMIT)
            .min(MAX_HISTORY_LIMIT)
    })
}

/// `mesh/subscribe-channel {channel, historyLimit?}` -> `{success, history}`: the newest
/// `historyLimit` kept messages (none without it), newest first (only those that fit in a
/// frame, with `truncated: true` when older ones were left out). A channel that is not
/// exposed, is reserved, or whose guard refuses gives `{success: false, history: []}`.
/// (`since` is accepted and ignored: history is kept without timestamps.)
pub(crate) async fn subscribe_channel(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<SubscribeChannel>,
) -> Result<Value, CommandError> {
    let channel = valid_name("channel", &request.channel)?;
    let refused = json!({ "success": false, "history": [] });
    if !mesh.may_read_channel(&connection, channel).await {
        return Ok(refused);
    }
    let topic = Topic::Channel(Arc::from(channel));
    if mesh
        .subscribe(&connection, topic.clone(), Form::Full)
        .await?
        .is_none()
    {
        return Ok(refused);
    }
    let history = mesh
        .read_history(
            channel,
            limit(request.history_limit, 0),
            reply_budget::for_entries(&mesh),
        )
        .await;
    let history = mesh.unless_failed(&connection, &topic, history).await?;
    Ok(history_reply(&mesh, history))
}

#[derive(Deserialize)]
pub(crate) struct ChannelRequest {
    channel: String,
}

/// `mesh/unsubscribe-channel {channel}` -> whether the caller was subscribed.
pub(crate) async fn unsubscribe_channel(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<ChannelRequest>,
) -> Result<bool, CommandError> {
    let channel = valid_name("channel", &request.channel)?;
    let _membership = connection.lock_membership().await;
    Ok(mesh.stop_listening(connection.id(), &Topic::Channel(Arc::from(channel))))
}

#[derive(Deserialize)]
pub(crate) struct ChannelHistory {
    channel: String,
    #[serde(default)]
    limit: Option<u64>,
}

/// `mesh/get-channel-history {channel, limit?}` -> `{success, history}` (newest first, 50
/// without `limit`; only the newest that fit in a frame, with `truncated: true` when
/// older ones were left out), or `{success: false, history: []}` as for subscribing.
pub(crate) async fn get_channel_history(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<ChannelHistory>,
) -> Result<Value, CommandError> {
    let channel = valid_name("channel", &request.channel)?;
    if !mesh.may_read_channel(&connection, channel).await {
        return Ok(json!({ "success": false, "history": [] }));
    }
    let history = mesh
        .read_history(
            channel,
            limit(request.limit, DEFAULT_HISTORY_LIMIT),
            reply_budget::for_entries(&mesh),
        )
        .await?;
    Ok(history_reply(&mesh, history))
}

/// `{success: true, history}` with the newest messages that fit in a frame, and
/// `truncated: true` when older ones were left out.
fn history_reply(mesh: &Mesh, history: Vec<String>) -> Value {
    let (history, truncated) =
        reply_budget::leading_that_fit(history, reply_budget::for_entries(mesh), |message| {
            reply_budget::json_len(message.as_str())
        });
    reply_budget::mark(json!({ "success": true, "history": history }), truncated)
}
