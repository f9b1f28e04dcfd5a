//! Channels on the client: subscriptions as streams or callbacks, history, and their
//! recovery after a reconnect.
//!
//! Each subscription remembers the position of the newest message it was given (the
//! subscribe reply's `epoch` and `offset`, then each message's `offset`). A reconnect
//! subscribes again with `since` that position: when the server still holds every message
//! published meanwhile, they reach the streams first, in order, and the live ones follow
//! without gap or repeat. Whether that worked is told to the application as
//! [`ClientEvent::ChannelRestored`]. A message
//! whose offset is not the next one (a loss on the way, or a stream that was reset)
//! makes the position unknown, so the next reconnect reports the channel as not
//! recovered instead of claiming a gapless stream.

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::sync::{fan_out, Subscriptions};
use super::{lock, ClientError, ClientEvent, MeshClient};

pub(super) const SUBSCRIPTION_MESSAGE: &str = "mesh/subscription-message";

/// One channel's subscription on the client.
#[derive(Default)]
pub(super) struct ChannelState {
    /// Its subscribers' queues.
    pub(super) sinks: Vec<mpsc::UnboundedSender<String>>,
    /// Where the messages given to the subscribers stand: `(epoch, offset)`. `None`
    /// while unknown (a channel without positions, or after a gap).
    position: Option<(String, u64)>,
    /// While a (re)subscribe is in flight: the messages that arrived, with their
    /// offsets, to follow its reply.
    pending: Option<Vec<(String, Option<u64>)>>,
}

impl ChannelState {
    /// Whether a subscriber still listens.
    pub(super) fn is_heard(&self) -> bool {
        self.sinks.iter().any(|sink| !sink.is_closed())
    }

    /// Hands a message to the subscribers, moving the position along. A message whose
    /// offset is not the next one (a loss on the way, or a stream that was reset and
    /// started again) leaves the position unknown: the server drops repeats itself, so
    /// none is dropped here.
    fn deliver(&mut self, message: &str, offset: Option<u64>) {
        self.position = match (self.position.take(), offset) {
            (Some((epoch, last)), Some(offset)) if Some(offset) == last.checked_add(1) => {
                Some((epoch, offset))
            }
            _ => None,
        };
        fan_out(&mut self.sinks, &message.to_owned());
    }
}

impl Subscriptions {
    /// `mesh/subscription-message {channel, message, offset?}`: to the channel's
    /// subscribers, or held while its subscription's reply is awaited.
    pub(super) fn channel_message(&mut self, payload: &Value) {
        let (Some(channel), Some(message)) = (
            payload.get("channel").and_then(Value::as_str),
            payload.get("message").and_then(Value::as_str),
        ) else {
            tracing::debug!("ignored a channel message of unexpected shape");
            return;
        };
        let offset = payload.get("offset").and_then(Value::as_u64);
        if let Some(state) = self.channels.get_mut(channel) {
            match state.pending.as_mut() {
                Some(held) => held.push((message.to_owned(), offset)),
                None => state.deliver(message, offset),
            }
        }
    }
}

/// A subscribe reply, read: `{success, history, epoch?, offset?, recovered?}`.
struct Subscribed {
    history: Vec<String>,
    position: Option<(String, u64)>,
    recovered: bool,
}

/// Reads `{success, history, …}`.
fn history(reply: &Value, what: impl FnOnce() -> String) -> Result<Vec<String>, ClientError> {
    if reply.get("success") != Some(&Value::Bool(true)) {
        return Err(ClientError::Refused(what()));
    }
    serde_json::from_value(reply.get("history").cloned().unwrap_or(json!([])))
        .map_err(|err| ClientError::Decode(err.to_string()))
}

fn subscribed(reply: &Value, channel: &str) -> Result<Subscribed, ClientError> {
    let history = history(reply, || format!("subscribing to channel {channel}"))?;
    let position = match (
        reply.get("epoch").and_then(Value::as_str),
        reply.get("offset").and_then(Value::as_u64),
    ) {
        (Some(epoch), Some(offset)) => Some((epoch.to_owned(), offset)),
        _ => None,
    };
    Ok(Subscribed {
        history,
        position,
        recovered: reply.get("recovered") == Some(&Value::Bool(true)),
    })
}

impl MeshClient {
    /// Subscribes to a channel. Returns the newest `history_limit` kept messages, newest
    /// first, as the server sends them (none without a limit), and a stream of the
    /// messages published from now on. The subscription is renewed after every reconnect
    /// until [`unsubscribe_channel`](Self::unsubscribe_channel), which ends the stream;
    /// dropping the stream alone does not unsubscribe (but one nobody listens to is not
    /// renewed). On a tower-mesh server the messages published while disconnected reach
    /// the stream first, in order, when its history still holds them all; each renewal
    /// says whether that was so with
    /// [`ClientEvent::ChannelRestored`]. A channel
    /// that is not exposed, or whose guard refuses, is [`ClientError::Refused`].
    pub async fn subscribe_channel(
        &self,
        channel: &str,
        history_limit: Option<usize>,
    ) -> Result<(Vec<String>, mpsc::UnboundedReceiver<String>), ClientError> {
        let (sink, messages) = mpsc::unbounded_channel();
        let history = self
            .subscribe_channel_sink(channel, history_limit, sink)
            .await?;
        Ok((history, messages))
    }

    /// Like [`subscribe_channel`](Self::subscribe_channel), with the messages handed to
    /// `callback`, in order, on a task of the client's.
    pub async fn subscribe_channel_with(
        &self,
        channel: &str,
        history_limit: Option<usize>,
        callback: impl Fn(String) + Send + 'static,
    ) -> Result<Vec<String>, ClientError> {
        let (sink, mut messages) = mpsc::unbounded_channel();
        let history = self
            .subscribe_channel_sink(channel, history_limit, sink)
            .await?;
        tokio::spawn(async move {
            while let Some(message) = messages.recv().await {
                callback(message);
            }
        });
        Ok(history)
    }

    async fn subscribe_channel_sink(
        &self,
        channel: &str,
        history_limit: Option<usize>,
        sink: mpsc::UnboundedSender<String>,
    ) -> Result<Vec<String>, ClientError> {
        let sync = &self.inner().sync;
        let _turn = sync.requests.lock().await;
        // In place before the server may send the first message. A channel already
        // subscribed keeps its stream (and position) as it is; a new one holds its
        // messages until the reply's position is known.
        let new = {
            let mut subscriptions = lock(&sync.subscriptions);
            let state = subscriptions
                .channels
                .entry(channel.to_owned())
                .or_default();
            state.sinks.push(sink.clone());
            let new = state.sinks.len() == 1;
            if new {
                state.position = None;
                state.pending = Some(Vec::new());
            }
            new
        };
        let reply = self.request_channel(channel, history_limit, None).await;
        let mut subscriptions = lock(&sync.subscriptions);
        let Some(state) = subscriptions.channels.get_mut(channel) else {
            return reply.map(|subscribed| subscribed.history);
        };
        match reply {
            Ok(subscribed) => {
                if new {
                    state.position = subscribed.position;
                    release(state);
                }
                Ok(subscribed.history)
            }
            Err(err) => {
                state.sinks.retain(|kept| !kept.same_channel(&sink));
                if state.sinks.is_empty() {
                    subscriptions.channels.remove(channel);
                }
                Err(err)
            }
        }
    }

    async fn request_channel(
        &self,
        channel: &str,
        history_limit: Option<usize>,
        since: Option<&(String, u64)>,
    ) -> Result<Subscribed, ClientError> {
        let mut payload = json!({ "channel": channel });
        if let Some(limit) = history_limit {
            payload["historyLimit"] = json!(limit);
        }
        if let Some((epoch, offset)) = since {
            payload["since"] = json!({ "epoch": epoch, "offset": offset });
        }
        let reply = self.command("mesh/subscribe-channel", payload).await?;
        subscribed(&reply, channel)
    }

    /// Ends the channel's subscription (every stream and callback of it); returns whether
    /// the server had one.
    pub async fn unsubscribe_channel(&self, channel: &str) -> Result<bool, ClientError> {
        let sync = &self.inner().sync;
        let _turn = sync.requests.lock().await;
        lock(&sync.subscriptions).channels.remove(channel);
        let reply = self
            .command("mesh/unsubscribe-channel", json!({ "channel": channel }))
            .await?;
        Ok(reply == Value::Bool(true))
    }

    /// The newest `limit` kept messages of a channel (50 without a limit), newest first,
    /// without subscribing. [`ClientError::Refused`] where subscribing would be.
    pub async fn channel_history(
        &self,
        channel: &str,
        limit: Option<usize>,
    ) -> Result<Vec<String>, ClientError> {
        let mut payload = json!({ "channel": channel });
        if let Some(limit) = limit {
            payload["limit"] = json!(limit);
        }
        let reply = self.command("mesh/get-channel-history", payload).await?;
        history(&reply, || {
            format!("reading the history of channel {channel}")
        })
    }
}

/// Sends what arrived while the reply was awaited, and lets messages through again.
fn release(state: &mut ChannelState) {
    for (message, offset) in state.pending.take().unwrap_or_default() {
        state.deliver(&message, offset);
    }
}

/// Subscribes a new connection to a channel again, from the position its subscribers
/// reached: the messages they missed (when the server still has them all) go to them
/// first, oldest first. Says whether that worked with `ClientEvent::ChannelRestored`.
/// The caller holds the requests' turn.
pub(super) async fn restore(client: &MeshClient, channel: &str) {
    let sync = &client.inner().sync;
    let since = {
        let mut subscriptions = lock(&sync.subscriptions);
        let Some(state) = subscriptions.channels.get_mut(channel) else {
            return;
        };
        state.pending = Some(Vec::new());
        state.position.clone()
    };
    let reply = client.request_channel(channel, None, since.as_ref()).await;
    let recovered = {
        let mut subscriptions = lock(&sync.subscriptions);
        let Some(state) = subscriptions.channels.get_mut(channel) else {
            return;
        };
        match reply {
            Ok(subscribed) => {
                let recovered = since.is_some() && subscribed.recovered;
                if recovered {
                    for message in subscribed.history.iter().rev() {
                        fan_out(&mut state.sinks, message);
                    }
                }
                state.position = subscribed.position;
                release(state);
                Some(recovered)
            }
            Err(err) => {
                tracing::warn!(%err, channel, "could not subscribe to a channel again");
                release(state);
                None
            }
        }
    };
    if let Some(recovered) = recovered {
        let _ = client.inner().events.send(ClientEvent::ChannelRestored {
            channel: channel.to_owned(),
            recovered,
        });
    }
}
