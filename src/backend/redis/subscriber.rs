//! One instance's pub/sub connection: its fixed channels (its own, broadcasts) plus one
//! channel per topic a local connection listens to, re-established with backoff.
//!
//! Subscription changes arrive as [`Command`]s and are applied one at a time, in order,
//! by the task that owns the connection. So a subscribe is acknowledged only once Redis
//! confirmed it (or an earlier subscribe to the same channel was), and an unsubscribe that
//! raced a new listener is skipped: it checks the inbox's listeners when it is applied.
//!
//! A subscribe that arrives while the connection is being re-established waits for it
//! (its caller gives up after the operation timeout) and brings the next attempt forward:
//! after Redis comes back, the instance closes its connections so that their clients set
//! themselves up again, and their joins must not fail merely because this task was still
//! sleeping off its backoff.
//!
//! `Backend::subscribe` and `Backend::unsubscribe` hand their changes to this task (at the
//! end of this file).

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::keys::Keys;
use super::{envelope, unavailable, RedisBackend, WeakBackend, OPERATION_TIMEOUT};
use crate::backend::{Delivery, Inbox, Topic};
use crate::error::MeshError;

/// A change to an instance's subscriptions.
pub(super) enum Command {
    /// Subscribe to a topic's channel; answered once deliveries on it reach the instance.
    Subscribe(Topic, Done),
    /// Unsubscribe from a topic's channel, unless a local connection listens to it again.
    Unsubscribe(Topic),
}

type Sink = redis::aio::PubSubSink;

/// How often an idle pub/sub connection is probed.
const HEALTH_CHECK: Duration = Duration::from_secs(5);
/// The first pause before reconnecting, and the longest a waiting subscribe defers the
/// next attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between two reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Whoever waits for a subscribe to be applied.
type Done = oneshot::Sender<Result<(), MeshError>>;

/// Keeps the instance's subscriptions alive and hands what arrives to the inbox. `first`
/// learns whether the first connection and subscription succeeded.
pub(super) async fn run(
    backend: WeakBackend,
    instance_id: Arc<str>,
    inbox: Weak<dyn Inbox>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    first: oneshot::Sender<Result<(), MeshError>>,
) {
    let Some((client, keys)) = backend
        .upgrade()
        .map(|backend| (backend.shared.client.clone(), backend.shared.keys.clone()))
    else {
        return;
    };
    let fixed = [
        keys.instance_channel(&instance_id),
        keys.broadcast_channel(),
    ];
    let mut first = Some(first);
    let mut backoff = FIRST_BACKOFF;
    // Subscribes that arrived while disconnected. Their topics have local listeners
    // (listeners are added before subscribing), so the next connection subscribes them.
    let mut waiting: Vec<Done> = Vec::new();
    loop {
        // The inbox is the truth about which topics are wanted, after any reconnect.
        let Some(local) = inbox.upgrade() else { return };
        let mut channels: HashSet<String> = fixed.iter().cloned().collect();
        channels.extend(local.topics().iter().map(|topic| keys.topic_channel(topic)));
        drop(local);
        let connected = async {
            let (mut sink, stream) = client
                .get_async_pubsub()
                .await
                .map_err(unavailable)?
                .split();
            let all: Vec<&String> = channels.iter().collect();
            sink.subscribe(all).await.map_err(unavailable)?;
            Ok::<_, MeshError>((sink, stream))
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, connected).await {
            Ok(Ok((mut sink, mut stream))) => {
                for done in waiting.drain(..) {
                    let _ = done.send(Ok(()));
                }
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                } else {
                    tracing::info!("Redis pub/sub subscription re-established");
                    if let Some(inbox) = inbox.upgrade() {
                        inbox.resubscribed();
                    }
                }
                backoff = FIRST_BACKOFF;
                // A half-open connection delivers nothing and reports nothing: probe it.
                let mut health = tokio::time::interval(HEALTH_CHECK);
                health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                health.tick().await;
                loop {
                    tokio::select! {
                        _ = health.tick() => {
                            let probe = sink.ping::<redis::Value>();
                            if !matches!(tokio::time::timeout(OPERATION_TIMEOUT, probe).await, Ok(Ok(_))) {
                                break;
                            }
                        }
                        message = stream.next() => {
                            let Some(message) = message else { break };
                            let Some(inbox) = inbox.upgrade() else { return };
                            match read(&keys, &message) {
                                Some(delivery) => inbox.deliver(delivery),
                                None => tracing::warn!(
                                    channel = message.get_channel_name(),
                                    "dropped a pub/sub message that does not parse"
                                ),
                            }
                        }
                        command = commands.recv() => {
                            let Some(command) = command else { return };
                            if !apply(command, &keys, &inbox, &mut channels, &mut sink, &mut waiting).await {
                                break;
                            }
                        }
                    }
                }
                tracing::warn!("Redis pub/sub connection lost; reconnecting");
            }
            Ok(Err(err)) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(err));
                    return;
                }
                tracing::debug!(%err, "Redis pub/sub reconnect failed");
            }
            Err(_) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(MeshError::Unavailable(
                        "Redis subscribe timed out".into(),
                    )));
                    return;
                }
            }
        }
        if inbox.strong_count() == 0 || backend.0.strong_count() == 0 {
            return;
        }
        // While reconnecting, subscribes wait for the next connection, which they bring
        // forward.
        waiting.retain(|done| !done.is_closed());
        let paused_at = tokio::time::Instant::now();
        let mut resume_at = paused_at + backoff;
        loop {
            if !waiting.is_empty() {
                resume_at = resume_at.min(paused_at + FIRST_BACKOFF);
            }
            tokio::select! {
                () = tokio::time::sleep_until(resume_at) => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(_, done)) => waiting.push(done),
                    // The next connection subscribes only what local listeners want.
                    Some(Command::Unsubscribe(_)) => {}
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The delivery a pub/sub message carries: a plain channel's is its bare text (which
/// must be UTF-8), any other channel's an envelope. Plain channels' names never start
/// with the prefix and the engine's always do, so the name alone tells them apart, and
/// text published on an engine channel is never taken for a message.
fn read(keys: &Keys, message: &redis::Msg) -> Option<Delivery> {
    let channel = message.get_channel_name();
    if keys.plain_channel(channel) {
        let text = std::str::from_utf8(message.get_payload_bytes()).ok()?;
        return Some(Delivery::ChannelMessage {
            channel: Arc::from(channel),
            message: Arc::from(text),
        });
    }
    envelope::decode(message.get_payload_bytes())
}

/// Applies one subscription change on a live connection. Returns `false` when the
/// connection failed and must be re-established; a subscribe it was applying then waits
/// for the next connection.
async fn apply(
    command: Command,
    keys: &Keys,
    inbox: &Weak<dyn Inbox>,
    channels: &mut HashSet<String>,
    sink: &mut Sink,
    waiting: &mut Vec<Done>,
) -> bool {
    match command {
        Command::Subscribe(topic, done) => {
            let channel = keys.topic_channel(&topic);
            if channels.contains(&channel) {
                let _ = done.send(Ok(()));
                return true;
            }
            match tokio::time::timeout(OPERATION_TIMEOUT, sink.subscribe(&channel)).await {
                Ok(Ok(())) => {
                    channels.insert(channel);
                    let _ = done.send(Ok(()));
                    true
                }
                Ok(Err(err)) => {
                    tracing::debug!(%err, "Redis subscribe failed");
                    waiting.push(done);
                    false
                }
                Err(_) => {
                    waiting.push(done);
                    false
                }
            }
        }
        Command::Unsubscribe(topic) => {
            let wanted = inbox
                .upgrade()
                .is_some_and(|inbox| inbox.has_listeners(&topic));
            let channel = keys.topic_channel(&topic);
            if wanted || !channels.remove(&channel) {
                return true;
            }
            matches!(
                tokio::time::timeout(OPERATION_TIMEOUT, sink.unsubscribe(&channel)).await,
                Ok(Ok(()))
            )
        }
    }
}

impl RedisBackend {
    pub(super) async fn subscribe_topic(
        &self,
        instance_id: &str,
        topic: &Topic,
    ) -> Result<(), MeshError> {
        let (done, subscribed) = oneshot::channel();
        self.subscriber_command(instance_id, Command::Subscribe(topic.clone(), done))?;
        // While the pub/sub connection is re-established, the subscribe waits for it.
        match tokio::time::timeout(OPERATION_TIMEOUT, subscribed).await {
            Ok(Ok(subscribed)) => subscribed,
            Ok(Err(_)) => Err(MeshError::Unavailable("Redis subscriber stopped".into())),
            Err(_) => Err(MeshError::Unavailable(
                "Redis pub/sub is reconnecting".into(),
            )),
        }
    }

    pub(super) fn unsubscribe_topic(&self, instance_id: &str, topic: &Topic) {
        // A stopped subscriber has no subscriptions left to drop.
        let _ = self.subscriber_command(instance_id, Command::Unsubscribe(topic.clone()));
    }

    fn subscriber_command(&self, instance_id: &str, command: Command) -> Result<(), MeshError> {
        let sent = self
            .shared
            .subscribers
            .lock()
            .ok()
            .and_then(|subscribers| subscribers.get(instance_id).map(|s| s.send(command)));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(MeshError::Unavailable("Redis subscriber stopped".into())),
        }
    }
}
