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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use tokio::sync::{mpsc, oneshot};

use super::client::{cluster_builder, Client, TlsSettings};
use super::keys::{Keys, PubSub};
use super::topology::{self, SlotOwner};
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
    let client = match client {
        Client::Single(client) => client,
        Client::Cluster(cluster) => {
            return run_on_cluster(
                &cluster.seeds,
                &cluster.tls,
                keys,
                instance_id,
                inbox,
                commands,
                first,
            )
            .await
        }
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
        if !pause(&mut commands, &mut waiting, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The subscriber on a Cluster: one cluster connection (RESP3, its pushes sent to this
/// task), `SSUBSCRIBE` for the instance's own channel and the topics, classic `SUBSCRIBE`
/// for broadcasts and plain channels, re-established as a whole, with backoff, whenever a
/// node's connection drops or the Cluster's topology changes (a failover, a node
/// restarted empty, slots moved), which a probe notices within [`TOPOLOGY_CHECK`]. The
/// redis crate moves subscriptions only when a command of its own meets a redirection,
/// and this connection sends none; subscribing again by hand on top of it could deliver
/// twice. As on a single Redis, the inbox hears of every re-established subscription.
async fn run_on_cluster(
    seeds: &[String],
    tls: &TlsSettings,
    keys: Keys,
    instance_id: Arc<str>,
    inbox: Weak<dyn Inbox>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    first: oneshot::Sender<Result<(), MeshError>>,
) {
    let mut first = Some(first);
    let mut backoff = FIRST_BACKOFF;
    // Subscribes that arrived while disconnected: the next connection subscribes their
    // topics (their listeners are in place), and they are answered then.
    let mut waiting: Vec<Done> = Vec::new();
    loop {
        let (pushes_to, mut pushes) = mpsc::unbounded_channel::<redis::PushInfo>();
        let connected =
            ClusterSubscriptions::connect(seeds, tls, &keys, &instance_id, &inbox, pushes_to);
        match tokio::time::timeout(OPERATION_TIMEOUT, connected).await {
            Ok(Ok(mut subscriptions)) => {
                for done in waiting.drain(..) {
                    let _ = done.send(Ok(()));
                }
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                } else {
                    tracing::info!("Redis Cluster pub/sub subscriptions re-established");
                    if let Some(inbox) = inbox.upgrade() {
                        inbox.resubscribed();
                    }
                }
                backoff = FIRST_BACKOFF;
                let mut check = tokio::time::interval(TOPOLOGY_CHECK);
                check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                check.tick().await;
                loop {
                    tokio::select! {
                        push = pushes.recv() => {
                            let Some(push) = push else { break };
                            let Some(local) = inbox.upgrade() else { return };
                            match push.kind {
                                redis::PushKind::Message | redis::PushKind::SMessage => {
                                    match read_push(&keys, push.data) {
                                        Some(delivery) => local.deliver(delivery),
                                        None => tracing::warn!("dropped a pub/sub message that does not parse"),
                                    }
                                }
                                redis::PushKind::Disconnection => {
                                    tracing::warn!("Redis Cluster pub/sub connection lost; subscribing again");
                                    break;
                                }
                                _ => {}
                            }
                        }
                        _ = check.tick() => {
                            if subscriptions.must_resubscribe().await {
                                tracing::warn!("the Redis Cluster's masters changed; subscribing again");
                                break;
                            }
                        }
                        command = commands.recv() => {
                            let Some(command) = command else { return };
                            subscriptions.apply(command, &keys, &inbox).await;
                        }
                    }
                }
            }
            Ok(Err(err)) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(err));
                    return;
                }
                tracing::debug!(%err, "Redis Cluster pub/sub reconnect failed");
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
        if inbox.strong_count() == 0 {
            return;
        }
        if !pause(&mut commands, &mut waiting, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Waits out `backoff` before the next connection attempt (less while a subscribe waits
/// for it), collecting subscribes meanwhile. `false` when the backend is gone.
async fn pause(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    waiting: &mut Vec<Done>,
    backoff: Duration,
) -> bool {
    waiting.retain(|done| !done.is_closed());
    let paused_at = tokio::time::Instant::now();
    let mut resume_at = paused_at + backoff;
    loop {
        if !waiting.is_empty() {
            resume_at = resume_at.min(paused_at + FIRST_BACKOFF);
        }
        tokio::select! {
            () = tokio::time::sleep_until(resume_at) => return true,
            command = commands.recv() => match command {
                None => return false,
                Some(Command::Subscribe(_, done)) => waiting.push(done),
                // The next connection subscribes only what local listeners want.
                Some(Command::Unsubscribe(_)) => {}
            },
        }
    }
}

/// How often a Cluster subscriber checks that the Cluster's masters are those it
/// subscribed on.
const TOPOLOGY_CHECK: Duration = Duration::from_secs(1);

/// An instance's subscriptions on a Cluster.
struct ClusterSubscriptions {
    connection: redis::cluster_async::ClusterConnection,
    /// The channels subscribed to, and the pub/sub each is on.
    channels: HashMap<String, PubSub>,
    /// Which master (address and node id) served each slot range when they were made.
    topology: Vec<SlotOwner>,
    /// Another topology read once: it counts when the next reading agrees.
    unconfirmed: Option<Vec<SlotOwner>>,
}

impl ClusterSubscriptions {
    /// A new cluster connection, subscribed to the instance's fixed channels and to
    /// every topic a local connection listens to.
    async fn connect(
        seeds: &[String],
        tls: &TlsSettings,
        keys: &Keys,
        instance_id: &str,
        inbox: &Weak<dyn Inbox>,
        pushes_to: mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<Self, MeshError> {
        let client = cluster_builder(seeds, tls)?
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes_to)
            .build()
            .map_err(unavailable)?;
        let mut subscriptions = ClusterSubscriptions {
            connection: client.get_async_connection().await.map_err(unavailable)?,
            channels: HashMap::new(),
            topology: Vec::new(),
            unconfirmed: None,
        };
        subscriptions.topology = subscriptions.read_topology().await?;
        // A Cluster still forming (or restarted and not yet whole) routes some slots
        // nowhere or to masters it is about to drop: subscriptions made now would have to
        // be made again, losing what is published in between. Wait for a whole one.
        if !topology::covers_every_slot(&subscriptions.topology) {
            return Err(MeshError::Unavailable(
                "the Redis Cluster does not serve every slot yet".into(),
            ));
        }
        let mut channels: Vec<(String, PubSub)> = vec![
            (keys.instance_channel(instance_id), keys.instance_pubsub()),
            (keys.broadcast_channel(), PubSub::Classic),
        ];
        if let Some(local) = inbox.upgrade() {
            channels.extend(
                local
                    .topics()
                    .iter()
                    .flat_map(|topic| keys.topic_channels(topic)),
            );
        }
        // Side by side (an instance may listen to thousands of channels, each subscribed
        // on its own slot's node), within the caller's timeout.
        let mut subscribes = Vec::with_capacity(channels.len());
        for (channel, pubsub) in &channels {
            let mut connection = subscriptions.connection.clone();
            subscribes.push(async move { subscribe_on(&mut connection, channel, *pubsub).await });
        }
        let mut subscribed = futures_util::stream::iter(subscribes).buffer_unordered(64);
        while let Some(outcome) = subscribed.next().await {
            outcome.map_err(unavailable)?;
        }
        drop(subscribed);
        subscriptions.channels.extend(channels);
        Ok(subscriptions)
    }

    /// The masters and their slots, as a node of the Cluster sees them.
    async fn read_topology(&mut self) -> Result<Vec<SlotOwner>, MeshError> {
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.connection)
            .await
            .map_err(unavailable)?;
        Ok(topology::from_cluster_slots(&slots))
    }

    /// Whether the subscriptions must be made again: a node reports other masters than
    /// those they were made on, and the sharded ones are not where the new masters
    /// would deliver them. A node that does not answer says nothing (it may be the one
    /// that failed: a dropped connection is reported apart).
    async fn must_resubscribe(&mut self) -> bool {
        // Slots and node ids only: nodes may name one master by different addresses.
        let owners = |topology: &[SlotOwner]| -> Vec<(u16, u16, String)> {
            topology
                .iter()
                .map(|owner| (owner.first, owner.last, owner.node_id.clone()))
                .collect()
        };
        let Ok(Ok(topology)) = tokio::time::timeout(OPERATION_TIMEOUT, self.read_topology()).await
        else {
            return false;
        };
        if owners(&topology) == owners(&self.topology) {
            self.unconfirmed = None;
            return false;
        }
        // While a Cluster forms or fails over, its nodes disagree for a while, and each
        // reading asks any of them: a view that leaves slots without a master, or that
        // the next reading does not confirm, says nothing yet. (Acting on it would make
        // the subscriptions again, and lose what is published meanwhile, for nothing.)
        let confirmed = self
            .unconfirmed
            .take()
            .is_some_and(|earlier| owners(&earlier) == owners(&topology));
        if !topology::covers_every_slot(&topology) || !confirmed {
            self.unconfirmed = Some(topology);
            return false;
        }
        let in_place = tokio::time::timeout(OPERATION_TIMEOUT, self.in_place_on(&topology))
            .await
            .unwrap_or(false);
        if in_place {
            // Typically a replica promoted after its master failed: the subscriptions
            // made again when the master's connection dropped went to the replica, and
            // deliver. Making them once more would drop what is published meanwhile.
            tracing::info!(
                "the Redis Cluster's masters changed; the subscriptions are already on them"
            );
            self.topology = topology;
        }
        !in_place
    }

    /// Whether every master of `topology` holds exactly the sharded subscriptions of
    /// this connection whose slots it serves (`ssub` of `CLIENT INFO`, asked on this
    /// connection's own link to that master). Classic subscriptions are heard on any
    /// node, so only a dropped node moves them.
    async fn in_place_on(&mut self, topology: &[SlotOwner]) -> bool {
        let mut expected: HashMap<(&str, u16), usize> = topology
            .iter()
            .map(|owner| ((owner.host.as_str(), owner.port), 0))
            .collect();
        for (channel, pubsub) in &self.channels {
            if *pubsub != PubSub::Sharded {
                continue;
            }
            let Some(owner) = topology::owner_of(topology, channel.as_bytes()) else {
                return false;
            };
            *expected
                .entry((owner.host.as_str(), owner.port))
                .or_default() += 1;
        }
        for ((host, port), count) in expected {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.to_owned(),
                port,
            });
            let info = self
                .connection
                .route_command(redis::cmd("CLIENT").arg("INFO").clone(), routing)
                .await;
            let subscribed = match info {
                Ok(redis::Value::BulkString(text)) => shard_subscriptions(&text),
                Ok(redis::Value::VerbatimString { text, .. }) => {
                    shard_subscriptions(text.as_bytes())
                }
                _ => None,
            };
            if subscribed != Some(count) {
                return false;
            }
        }
        true
    }

    /// Subscribes to `channel`. It counts as subscribed from the start, so that a
    /// subscribe cut short by a timeout is still undone by the next unsubscribe.
    async fn subscribe(&mut self, channel: String, pubsub: PubSub) -> Result<(), MeshError> {
        self.channels.insert(channel.clone(), pubsub);
        let subscribed = subscribe_on(&mut self.connection, &channel, pubsub).await;
        if subscribed.is_err() {
            self.channels.remove(&channel);
        }
        subscribed.map_err(unavailable)
    }

    /// Applies one subscription change. A failed subscribe is answered with its error:
    /// the connection stays as it is until a drop or a topology change renews it.
    async fn apply(&mut self, command: Command, keys: &Keys, inbox: &Weak<dyn Inbox>) {
        match command {
            Command::Subscribe(topic, done) => {
                let subscribe = async {
                    for (channel, pubsub) in keys.topic_channels(&topic) {
                        if !self.channels.contains_key(&channel) {
                            self.subscribe(channel, pubsub).await?;
                        }
                    }
                    Ok(())
                };
                let subscribed = tokio::time::timeout(OPERATION_TIMEOUT, subscribe)
                    .await
                    .unwrap_or_else(|_| {
                        Err(MeshError::Unavailable("Redis subscribe timed out".into()))
                    });
                let _ = done.send(subscribed);
            }
            Command::Unsubscribe(topic) => {
                if still_wanted(&topic, inbox) {
                    return;
                }
                for (channel, pubsub) in keys.topic_channels(&topic) {
                    if self.channels.remove(&channel).is_none() {
                        continue;
                    }
                    let unsubscribe = async {
                        match pubsub {
                            PubSub::Classic => self.connection.unsubscribe(&channel).await,
                            PubSub::Sharded => self.connection.sunsubscribe(&channel).await,
                        }
                    };
                    if !matches!(
                        tokio::time::timeout(OPERATION_TIMEOUT, unsubscribe).await,
                        Ok(Ok(()))
                    ) {
                        tracing::debug!(channel, "Redis unsubscribe failed");
                    }
                }
            }
        }
    }
}

/// The `ssub` count of a `CLIENT INFO` reply: the connection's sharded subscriptions.
fn shard_subscriptions(info: &[u8]) -> Option<usize> {
    std::str::from_utf8(info)
        .ok()?
        .split_ascii_whitespace()
        .find_map(|field| field.strip_prefix("ssub="))?
        .parse()
        .ok()
}

/// Subscribes a cluster connection to `channel` on the pub/sub it is on.
async fn subscribe_on(
    connection: &mut redis::cluster_async::ClusterConnection,
    channel: &str,
    pubsub: PubSub,
) -> redis::RedisResult<()> {
    match pubsub {
        PubSub::Classic => connection.subscribe(channel).await,
        PubSub::Sharded => connection.ssubscribe(channel).await,
    }
}

/// Whether a local connection listens to `topic` again: an unsubscribe that raced a new
/// listener is skipped.
fn still_wanted(topic: &Topic, inbox: &Weak<dyn Inbox>) -> bool {
    inbox
        .upgrade()
        .is_some_and(|inbox| inbox.has_listeners(topic))
}

/// The delivery of a RESP3 message push: `[channel, payload]`.
fn read_push(keys: &Keys, data: Vec<redis::Value>) -> Option<Delivery> {
    let mut data = data.into_iter();
    let (Some(redis::Value::BulkString(channel)), Some(redis::Value::BulkString(payload))) =
        (data.next(), data.next())
    else {
        return None;
    };
    read_message(keys, std::str::from_utf8(&channel).ok()?, &payload)
}

/// The delivery a pub/sub message carries: a plain channel's is its bare text (which
/// must be UTF-8), any other channel's an envelope. Plain channels' names never start
/// with the prefix and the engine's always do, so the name alone tells them apart, and
/// text published on an engine channel is never taken for a message.
fn read(keys: &Keys, message: &redis::Msg) -> Option<Delivery> {
    read_message(
        keys,
        message.get_channel_name(),
        message.get_payload_bytes(),
    )
}

fn read_message(keys: &Keys, channel: &str, payload: &[u8]) -> Option<Delivery> {
    if keys.plain_channel(channel) {
        let text = std::str::from_utf8(payload).ok()?;
        return Some(Delivery::ChannelMessage {
            channel: Arc::from(channel),
            message: Arc::from(text),
            position: None,
        });
    }
    envelope::decode(payload)
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
            let channel = keys.topic_channel(&topic);
            if still_wanted(&topic, inbox) || !channels.remove(&channel) {
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

#[cfg(test)]
mod tests {
    use super::shard_subscriptions;

    #[test]
    fn shard_subscriptions_are_read_from_client_info() {
        let info =
            b"id=5 addr=127.0.0.1:43178 fd=8 name= db=0 sub=2 psub=0 ssub=17 multi=-1 resp=3\n";
        assert_eq!(shard_subscriptions(info), Some(17));
        assert_eq!(shard_subscriptions(b"id=5 sub=2 psub=0"), None);
        assert_eq!(shard_subscriptions(b"ssub=x"), None);
    }
}
