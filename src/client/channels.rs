//! Channels on the client: subscriptions as streams or callbacks, history, and their
//! renewal after a reconnect.

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::sync::{fan_out, Subscriptions};
use super::{lock, ClientError, MeshClient};

pub(super) const SUBSCRIPTION_MESSAGE: &str = "mesh/subscription-message";

impl Subscriptions {
    /// `mesh/subscription-message {channel, message}`: to the channel's subscribers.
    pub(super) fn channel_message(&mut self, payload: &Value) {
        let (Some(channel), Some(message)) = (
            payload.get("channel").and_then(Value::as_str),
            payload.get("message").and_then(Value::as_str),
        ) else {
            tracing::debug!("ignored a channel message of unexpected shape");
            return;
        };
        if let Some(sinks) = self.channels.get_mut(channel) {
            fan_out(sinks, &message.to_owned());
        }
    }
}

/// Reads `{success, history}`.
fn history(reply: &Value, what: impl FnOnce() -> String) -> Result<Vec<String>, ClientError> {
    if reply.get("success") != Some(&Value::Bool(true)) {
        return Err(ClientError::Refused(what()));
    }
    serde_json::from_value(reply.get("history").cloned().unwrap_or(json!([])))
        .map_err(|err| ClientError::Decode(err.to_string()))
}

impl MeshClient {
    /// Subscribes to a channel. Returns the newest `history_limit` kept messages, newest
    /// first, as the server sends them (none without a limit), and a stream of the
    /// messages published from now on. The subscription is renewed after every reconnect
    /// (messages published while disconnected are not replayed) until
    /// [`unsubscribe_channel`](Self::unsubscribe_channel), which ends the stream; dropping
    /// the stream alone does not unsubscribe (but one nobody listens to is not renewed). A
    /// channel that is not exposed, or whose
    /// guard refuses, is [`ClientError::Refused`].
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
        // In place before the server may send the first message.
        lock(&sync.subscriptions)
            .channels
            .entry(channel.to_owned())
            .or_default()
            .push(sink.clone());
        let subscribed = self.request_channel(channel, history_limit).await;
        if subscribed.is_err() {
            let mut subscriptions = lock(&sync.subscriptions);
            if let Some(sinks) = subscriptions.channels.get_mut(channel) {
                sinks.retain(|kept| !kept.same_channel(&sink));
                if sinks.is_empty() {
                    subscriptions.channels.remove(channel);
                }
            }
        }
        subscribed
    }

    pub(super) async fn request_channel(
        &self,
        channel: &str,
        history_limit: Option<usize>,
    ) -> Result<Vec<String>, ClientError> {
        let mut payload = json!({ "channel": channel });
        if let Some(limit) = history_limit {
            payload["historyLimit"] = json!(limit);
        }
        let reply = self.command("mesh/subscribe-channel", payload).await?;
        history(&reply, || format!("subscribing to channel {channel}"))
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
