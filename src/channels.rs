//! Channels: named streams of string messages with a kept history, and the built-in
//! commands `mesh/subscribe-channel`, `mesh/unsubscribe-channel` and
//! `mesh/get-channel-history`.
//!
//! A channel is exposed with [`MeshBuilder::expose_channel`](crate::MeshBuilder::expose_channel)
//! and written by the server ([`Mesh::write_channel`]); the message is kept, given the
//! next offset of the channel's stream and published in one atomic step, so no message
//! is in the history but missed live, or the reverse. A subscriber listens before it
//! reads the history (with the newest message's position), and its stream
//! ([`crate::channel_stream`]) then drops what the read covered: a message written at
//! that moment reaches it once. With `since`, the read returns exactly the messages after
//! the client's position when the history still holds them all: recovery after a
//! reconnect (docs/protocol.md §7.3).
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
use crate::backend::{ChannelHistory, ChannelPosition, HistoryRead, Push, Since, Topic};
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
        self.ready().await?;
        self.inner()
            .backend
            .write_channel(
                channel,
                &message,
                history.min(MAX_KEPT_HISTORY),
                limits.history,
            )
            .await
            .map(drop)
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
        if limit == 0 {
            return Ok(Vec::new());
        }
        let max_bytes = self.config().bytes.history;
        let mut history = self
            .read_history(channel, limit, None, max_bytes)
            .await?
            .messages;
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
    /// one that does not (if any), leaving out those over the message limit (history
    /// written by other processes is bounded before it is read into memory); or with
    /// `since`, exactly the messages after it when they are all kept and fit.
    async fn read_history(
        &self,
        channel: &str,
        limit: usize,
        since: Option<Since<'_>>,
        max_bytes: usize,
    ) -> Result<ChannelHistory, MeshError> {
        self.ready().await?;
        let max_message_bytes = self.config().bytes.channel_message;
        self.inner()
            .backend
            .channel_history(
                channel,
                HistoryRead {
                    limit,
                    since,
                    max_message_bytes,
                    max_bytes,
                },
            )
            .await
    }

    /// Hands a channel message to the channel's local subscribers, unless it is over
    /// `max_channel_message_bytes`: the bound [`Mesh::write_channel`] sets, which a
    /// message from outside the mesh (a Redis plain channel's publisher) or from an
    /// instance with a larger limit may not have met.
    pub(crate) fn deliver_channel_message(
        &self,
        channel: Arc<str>,
        message: &str,
        position: Option<&ChannelPosition>,
    ) {
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
                "dropped a channel message: over max_channel_message_bytes"
            );
            return;
        }
        let push = Push {
            command: Arc::from(protocol::SUBSCRIPTION_MESSAGE),
            payload: Arc::from(protocol::subscription_message_payload(
                &channel,
                message,
                position.map(|position| position.offset),
            )),
        };
        self.inner().topics.fan_out_channel(
            &Topic::Channel(channel),
            position,
            &crate::mesh::render(&push),
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
    /// tower-mesh's recovery: `{epoch, offset}`. Anything else is mesh's, and ignored.
    #[serde(default)]
    since: Option<Value>,
}

fn limit(requested: Option<u64>, default: usize) -> usize {
    requested.map_or(default, |limit| {
        usize::try_from(limit)
            .unwrap_or(MAX_HISTORY_LIMIT)
            .min(MAX_HISTORY_LIMIT)
    })
}

/// A position a client holds: `{"epoch": "<text>", "offset": <integer ≥ 0>}`, or with
/// `bare_offset` also a bare integer (an offset in the current epoch). `None` for
/// anything else, which is mesh's own `since` and stays ignored.
fn since(value: Option<&Value>, bare_offset: bool) -> Option<Since<'_>> {
    let value = value?;
    let (epoch, offset) = match value {
        Value::Number(offset) if bare_offset => (None, offset.as_u64()?),
        Value::Object(fields) => (
            Some(fields.get("epoch")?.as_str()?),
            fields.get("offset")?.as_u64()?,
        ),
        _ => return None,
    };
    Some(Since {
        epoch,
        offset,
        at_most: MAX_HISTORY_LIMIT,
    })
}

/// `mesh/subscribe-channel {channel, historyLimit?, since?}` -> `{success, history, epoch,
/// offset, recovered?}`: the newest `historyLimit` kept messages (none without it),
/// newest first (only those that fit in a frame, with `truncated: true` when older ones
/// were left out), and the position of the newest message published (docs/protocol.md
/// §7.3). With `since: {epoch, offset}`, when every message after it is still kept,
/// `history` is exactly those and `recovered: true`; otherwise `recovered: false`. A
/// channel that is not exposed, is reserved, or whose guard refuses gives
/// `{success: false, history: []}`. A `since` of another shape is mesh's, and ignored.
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
    let Some(listen) = mesh
        .subscribe(&connection, topic.clone(), Form::Full)
        .await?
    else {
        return Ok(refused);
    };
    let since = since(request.since.as_ref(), false);
    let limit = limit(request.history_limit, 0);
    let history = mesh
        .read_history(channel, limit, since, reply_budget::for_entries(&mesh))
        .await;
    let history = mesh.unless_failed(&connection, &topic, history).await?;
    // Only messages after the read's position follow the reply; `exact` is false when
    // some were sent before the position was known (and may repeat the history). A
    // connection that was subscribed already keeps its stream whole: what it holds
    // follows as it is, and the reply recovers nothing.
    let exact = match listen.channel_snapshot {
        Some(snapshot) if listen.new => snapshot.taken(history.position.clone()),
        Some(snapshot) => {
            drop(snapshot);
            false
        }
        None => true,
    };
    Ok(history_reply(&mesh, history, since.is_some(), limit, exact))
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
pub(crate) struct ChannelHistoryRequest {
    channel: String,
    #[serde(default)]
    limit: Option<u64>,
    /// tower-mesh's recovery: an offset, or `{epoch, offset}`. Anything else is mesh's,
    /// and ignored.
    #[serde(default)]
    since: Option<Value>,
}

/// `mesh/get-channel-history {channel, limit?, since?}` -> `{success, history}` (newest
/// first, 50 without `limit`; only the newest that fit in a frame, with `truncated: true`
/// when older ones were left out), or `{success: false, history: []}` as for subscribing.
/// With `since` (an offset, or `{epoch, offset}`) the reply also carries the position
/// and `recovered`, as a subscription's does.
pub(crate) async fn get_channel_history(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<ChannelHistoryRequest>,
) -> Result<Value, CommandError> {
    let channel = valid_name("channel", &request.channel)?;
    if !mesh.may_read_channel(&connection, channel).await {
        return Ok(json!({ "success": false, "history": [] }));
    }
    let since = since(request.since.as_ref(), true);
    let limit = limit(request.limit, DEFAULT_HISTORY_LIMIT);
    let history = mesh
        .read_history(channel, limit, since, reply_budget::for_entries(&mesh))
        .await?;
    let reply = history_reply(&mesh, history, since.is_some(), limit, true);
    Ok(if since.is_some() {
        reply
    } else {
        without_position(reply)
    })
}

/// `{success: true, history, epoch, offset, recovered?}` with the newest messages that fit
/// in a frame, and `truncated: true` when older ones were left out. A recovery that does
/// not fit, or that is not `exact`, is not one: the reply then holds the newest `limit`
/// messages that fit, with `recovered: false`. A channel without positions has no
/// `epoch` and `offset`.
fn history_reply(
    mesh: &Mesh,
    history: ChannelHistory,
    asked_to_recover: bool,
    limit: usize,
    exact: bool,
) -> Value {
    let ChannelHistory {
        mut messages,
        position,
        recovered,
    } = history;
    let budget = reply_budget::for_entries(mesh);
    let fits = |messages: &[String]| {
        messages
            .iter()
            .map(|message| reply_budget::json_len(message.as_str()) + 1)
            .sum::<usize>()
            <= budget
    };
    let recovered = recovered && exact && fits(&messages);
    if asked_to_recover && !recovered {
        messages.truncate(limit);
    }
    let (messages, truncated) = reply_budget::leading_that_fit(messages, budget, |message| {
        reply_budget::json_len(message.as_str())
    });
    let mut reply = json!({ "success": true, "history": messages });
    if let (Some(position), Some(fields)) = (position, reply.as_object_mut()) {
        fields.insert("epoch".to_owned(), Value::from(&*position.epoch));
        fields.insert("offset".to_owned(), Value::from(position.offset));
    }
    if asked_to_recover {
        if let Some(fields) = reply.as_object_mut() {
            fields.insert("recovered".to_owned(), Value::Bool(recovered));
        }
    }
    reply_budget::mark(reply, truncated)
}

/// A reply as mesh's, without the position fields it did not ask for.
fn without_position(mut reply: Value) -> Value {
    if let Some(fields) = reply.as_object_mut() {
        fields.remove("epoch");
        fields.remove("offset");
    }
    reply
}
