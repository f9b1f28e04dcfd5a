//! The Redis backend: many instances behind a load balancer, one mesh.
//!
//! Commands go through a `deadpool-redis` pool; each instance also keeps one dedicated
//! pub/sub connection, re-established with backoff whenever it drops.
//!
//! # Key and channel layout
//!
//! Every key and channel starts with the configurable prefix `P` (default `mesh:`), so
//! several apps, or parallel tests, share one Redis without colliding.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P instances` | sorted set | instance id, scored by its liveness deadline (Redis server time, ms) |
//! | `P instance:{iid}:connections` | set | the connection ids an instance holds |
//! | `P connections` | sorted set | every connection id, scored by registration time (for ordered listings) |
//! | `P conn:{cid}` | hash | `instance`: the holder's id (routing); `meta`: the metadata JSON |
//! | `P conn:{cid}:rooms` | set | the rooms a connection is in |
//! | `P room:{room}` | sorted set | a room's members, scored by join order (`P join-order` counts) |
//! | `P rooms` | set | every room with at least one member |
//! | `P room-meta:{room}` | hash | `meta`: a room's metadata JSON |
//! | `P rooms-with-meta` | set | every room that has metadata |
//! | `P presence:{room}` | sorted set | a tracked room's present connections, scored by presence deadline |
//! | `P presence-states:{room}` | hash | connection id -> presence state JSON |
//! | `P presence-expiry` | sorted set | `"{cid}\n{room}"` for every presence entry, scored by its deadline |
//! | `P state-expiry` | sorted set | `"{cid}\n{room}"` for every state with `expireAfter`, scored by its deadline |
//! | `P dead-connections` | set | connections of dead instances not forgotten yet |
//! | `P history:{channel}` | list | a channel's kept messages, newest first |
//! | `P record:{id}` | hash | `value`: a record's JSON; `version`: its version; `token`: renewed by every write (the compare-and-set key) |
//! | `P record-ids` | sorted set, every score 0 | every stored record id, in byte order: prefix listings read a range (`ZRANGEBYLEX`) |
//!
//! Routing and metadata are two fields of one hash, written by different commands, so
//! setting metadata can never redirect a connection's pushes (mesh's fault, docs/protocol.md §6).
//!
//! | channel | carries |
//! |---|---|
//! | `P instance:{iid}` | deliveries for connections held by that instance, and calls and answers between instances |
//! | `P broadcast` | deliveries for every connection |
//! | `P topic:room:{room}`, `P topic:presence:{room}`, `P topic:channel:{channel}`, `P topic:record:{id}` | room broadcasts, presence updates, channel messages, record updates; only instances with a local listener subscribe |
//! | `P topic:collections:{pattern}` | "a record that collections of this exposure may hold changed" |
//!
//! A push to one connection is one script call that looks up the holder and publishes on
//! its channel: one round trip, and only the holder receives it. A delivery is a short
//! binary envelope (a tag, then length-prefixed fields, the frame's JSON text verbatim)
//! parsed once per instance.
//!
//! # Liveness and expiry
//!
//! Each instance refreshes its deadline in `P instances` every `heartbeat_interval`
//! (default 2 s) to now + `instance_ttl` (default 10 s), using Redis's clock so that skewed
//! hosts agree. An instance that finds itself missing from `P instances` (Redis restarted
//! empty, or it was swept during a long stall) has lost its connections' rooms, presence
//! and metadata: it closes them with 1012 so that their clients reconnect and set them up
//! again, and only then enters `P instances` again. The heartbeat itself never adds the
//! instance: a command can run although its reply is lost (a stall queues it, the caller
//! times out), and a heartbeat that put a swept instance back that way would hide the loss.
//!
//! Everything that can lapse is a score in a sorted set: instance deadlines, presence
//! deadlines (`P presence-expiry`), state expiries (`P state-expiry`). One sweep script,
//! which any instance may run at any time, claims lapsed entries with `ZREM` (which
//! succeeds for exactly one sweeper), removes what hangs on them, and publishes each
//! `leave` or cleared state from inside the script, so each is announced exactly once and
//! in order with every other presence change (all of which are published by the script
//! that makes them). It returns when the next entry lapses, so the engine sleeps until
//! then. A dead instance's connections are moved to `P dead-connections` and forgotten a
//! bounded batch per sweep, so no script runs long. This is the
//! layout Centrifugo uses for presence; it needs no keyspace notifications, which Redis
//! Cluster and many managed services do not deliver reliably, and it still works when
//! the instance that owned a connection is gone. A dead instance's connections are
//! removed within `instance_ttl + heartbeat_interval`.
//!
//! Scripts touch keys they compute from the prefix, so this layout targets a single Redis
//! (or a primary with replicas), not Redis Cluster. They write after reading `TIME`,
//! which needs Redis 5 or newer (script effects replication).

mod envelope;
mod scripts;
mod subscriber;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use self::scripts::Scripts;
use self::subscriber::Command;
use super::{
    Backend, BackendFuture, Delivery, Inbox, PresenceRefresh, PresenceView, RecordRemover,
    RecordUpdater, StoredRecord,
};
use crate::error::MeshError;
use crate::metadata::MetadataWrite;
use crate::topics::Topic;

/// Longest any single Redis operation may take before it counts as unavailable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest pause between two attempts of a contended read-modify-write.
const MAX_CONFLICT_PAUSE: Duration = Duration::from_millis(8);
/// Most entries of each kind one sweep removes; more are left for an immediate next sweep.
const SWEEP_BATCH: usize = 256;

/// A Redis-backed mesh. Cheap to clone.
#[derive(Clone)]
pub struct RedisBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.shared.keys.prefix)
            .finish_non_exhaustive()
    }
}

struct Shared {
    pool: Pool,
    client: redis::Client,
    keys: Keys,
    heartbeat_interval: Duration,
    instance_ttl: Duration,
    scripts: Scripts,
    /// Background tasks by instance: one backend value may serve several meshes.
    tasks: Mutex<HashMap<Arc<str>, Vec<JoinHandle<()>>>>,
    /// Each attached instance's subscriber, which applies subscription changes in order.
    subscribers: Mutex<HashMap<Arc<str>, mpsc::UnboundedSender<Command>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            for task in tasks.drain().flat_map(|(_, tasks)| tasks) {
                task.abort();
            }
        }
    }
}

#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn instances(&self) -> String {
        format!("{}instances", self.prefix)
    }
    fn instance_connections(&self, instance_id: &str) -> String {
        format!("{}instance:{instance_id}:connections", self.prefix)
    }
    fn connections(&self) -> String {
        format!("{}connections", self.prefix)
    }
    fn connection(&self, connection_id: &str) -> String {
        format!("{}conn:{connection_id}", self.prefix)
    }
    fn instance_channel(&self, instance_id: &str) -> String {
        format!("{}instance:{instance_id}", self.prefix)
    }
    fn broadcast_channel(&self) -> String {
        format!("{}broadcast", self.prefix)
    }
    fn topic_channel(&self, topic: &Topic) -> String {
        format!("{}topic:{}", self.prefix, topic.key())
    }
    fn connection_rooms(&self, connection_id: &str) -> String {
        format!("{}conn:{connection_id}:rooms", self.prefix)
    }
    fn room(&self, room: &str) -> String {
        format!("{}room:{room}", self.prefix)
    }
    fn rooms(&self) -> String {
        format!("{}rooms", self.prefix)
    }
    fn room_metadata(&self, room: &str) -> String {
        format!("{}room-meta:{room}", self.prefix)
    }
    fn rooms_with_metadata(&self) -> String {
        format!("{}rooms-with-meta", self.prefix)
    }
    fn channel_history(&self, channel: &str) -> String {
        format!("{}history:{channel}", self.prefix)
    }
    /// The total size of a channel's kept messages, kept beside them by `write_channel`.
    fn channel_history_bytes(&self, channel: &str) -> String {
        format!("{}history-bytes:{channel}", self.prefix)
    }
    fn record(&self, id: &str) -> String {
        format!("{}record:{id}", self.prefix)
    }
    fn record_ids(&self) -> String {
        format!("{}record-ids", self.prefix)
    }
    /// The pub/sub channel of a delivery that is not routed to one connection's holder.
    fn channel_of(&self, delivery: &Delivery) -> Option<String> {
        Some(match delivery {
            Delivery::Broadcast { .. } => self.broadcast_channel(),
            Delivery::Topic { topic, .. } => self.topic_channel(topic),
            Delivery::Presence { room, .. } => self.topic_channel(&Topic::Presence(room.clone())),
            Delivery::Record { record_id, .. } | Delivery::RecordDeleted { record_id, .. } => {
                self.topic_channel(&Topic::Record(record_id.clone()))
            }
            Delivery::RecordsChanged { exposure, .. } => {
                self.topic_channel(&Topic::Collections(exposure.clone()))
            }
            Delivery::Answer { to, .. } => self.instance_channel(to),
            Delivery::ToConnection { .. } | Delivery::Close { .. } | Delivery::Call { .. } => {
                return None
            }
        })
    }
}

fn unavailable(err: impl std::fmt::Display) -> MeshError {
    MeshError::Unavailable(err.to_string())
}

/// Sorts a Redis failure: a reply of the wrong shape (a key overwritten with another type,
/// an unexpected value) is corrupt data; anything else (refused, dropped, timed out,
/// loading, read-only) means Redis is not usable right now.
fn redis_error(err: redis::RedisError) -> MeshError {
    use redis::ErrorKind;
    let corrupt = matches!(
        err.kind(),
        ErrorKind::UnexpectedReturnType | ErrorKind::Parse | ErrorKind::Extension
    ) || matches!(err.code(), Some("WRONGTYPE" | "ERR"));
    if corrupt {
        MeshError::Corrupt(err.to_string())
    } else {
        MeshError::Unavailable(err.to_string())
    }
}

/// Configures a [`RedisBackend`]: `RedisBackend::builder(url).prefix("app:").build()?`.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct RedisBackendBuilder {
    url: String,
    prefix: String,
    heartbeat_interval: Duration,
    instance_ttl: Duration,
}

impl RedisBackendBuilder {
    /// Prefix of every key and channel. Default `mesh:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How often the instance proves it is alive (default 2 s), and how long after its
    /// last proof the others declare it dead and remove its connections (default 10 s;
    /// raised to at least twice the interval).
    pub fn liveness(mut self, heartbeat_interval: Duration, instance_ttl: Duration) -> Self {
        self.heartbeat_interval = heartbeat_interval;
        self.instance_ttl = instance_ttl.max(heartbeat_interval * 2);
        self
    }

    /// Checks the URL and makes the pool. Nothing connects until the mesh needs Redis.
    pub fn build(self) -> Result<RedisBackend, MeshError> {
        let client = redis::Client::open(self.url.as_str())
            .map_err(|err| MeshError::Unavailable(format!("invalid Redis URL: {err}")))?;
        // The operation timeout bounds every command; the redis crate's own default
        // response timeout (500 ms) would otherwise fail commands that a busy machine
        // answers a little late, well within what the backend promises to wait.
        let connection_config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(OPERATION_TIMEOUT))
            .set_response_timeout(Some(OPERATION_TIMEOUT));
        let manager =
            deadpool_redis::Manager::new_with_config(self.url.as_str(), connection_config)
                .map_err(|err| MeshError::Unavailable(format!("invalid Redis URL: {err}")))?;
        let mut pool_config = deadpool_redis::PoolConfig::default();
        pool_config.timeouts.wait = Some(OPERATION_TIMEOUT);
        pool_config.timeouts.create = Some(OPERATION_TIMEOUT);
        pool_config.timeouts.recycle = Some(OPERATION_TIMEOUT);
        let pool = Pool::builder(manager)
            .config(pool_config)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| MeshError::Unavailable(format!("invalid Redis configuration: {err}")))?;
        Ok(RedisBackend {
            shared: Arc::new(Shared {
                pool,
                client,
                keys: Keys {
                    prefix: self.prefix,
                },
                heartbeat_interval: self.heartbeat_interval,
                instance_ttl: self.instance_ttl,
                scripts: Scripts::new(),
                tasks: Mutex::new(HashMap::new()),
                subscribers: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl RedisBackend {
    /// A backend for the Redis at `url` (`redis://host:port/db`) with the default settings.
    pub fn new(url: &str) -> Result<Self, MeshError> {
        Self::builder(url).build()
    }

    /// Starts configuring a backend for the Redis at `url`.
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackendBuilder {
            url: url.into(),
            prefix: "mesh:".to_owned(),
            heartbeat_interval: Duration::from_secs(2),
            instance_ttl: Duration::from_secs(10),
        }
    }

    /// The key prefix in use.
    pub fn key_prefix(&self) -> &str {
        &self.shared.keys.prefix
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, MeshError> {
        self.shared.pool.get().await.map_err(unavailable)
    }

    /// Runs one Redis operation under the operation timeout.
    async fn run<T, F>(&self, operation: F) -> Result<T, MeshError>
    where
        F: std::future::Future<Output = Result<T, MeshError>>,
    {
        tokio::time::timeout(OPERATION_TIMEOUT, operation)
            .await
            .unwrap_or_else(|_| Err(MeshError::Unavailable("Redis operation timed out".into())))
    }

    /// Extends the instance's deadline; `false` when it is no longer registered.
    async fn heartbeat(&self, instance_id: &str) -> Result<bool, MeshError> {
        self.liveness(&self.shared.scripts.heartbeat, instance_id)
            .await
    }

    /// Registers the instance (again), with a fresh deadline.
    async fn enter(&self, instance_id: &str) -> Result<(), MeshError> {
        self.liveness(&self.shared.scripts.enter, instance_id)
            .await
            .map(drop)
    }

    async fn liveness(&self, script: &redis::Script, instance_id: &str) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let ttl_ms = u64::try_from(self.shared.instance_ttl.as_millis()).unwrap_or(u64::MAX);
        let registered: i64 = script
            .key(self.shared.keys.instances())
            .arg(instance_id)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(registered == 1)
    }

    fn spawn(&self, instance_id: &Arc<str>, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.shared.tasks.lock() {
            tasks.entry(instance_id.clone()).or_default().push(task);
        }
    }
}

/// Proves this instance alive, forever; the engine's sweeper removes dead ones.
async fn run_heartbeat(backend: WeakBackend, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) {
    let Some(interval) = backend
        .upgrade()
        .map(|backend| backend.shared.heartbeat_interval)
    else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(local), Some(backend)) = (inbox.upgrade(), backend.upgrade()) else {
            return;
        };
        match backend.run(backend.heartbeat(&instance_id)).await {
            Ok(true) => {}
            Ok(false) => {
                // Its connections were forgotten with it: they are closed first, and
                // only then does the instance enter again. Were the heartbeat to add it
                // back, a heartbeat that ran late, after a sweep, and whose reply was
                // lost would leave them open with nothing stored for them.
                local.registration_lost();
                if let Err(err) = backend.run(backend.enter(&instance_id)).await {
                    tracing::warn!(%err, "could not register the instance again; will retry");
                }
            }
            Err(err) => tracing::warn!(%err, "Redis heartbeat failed"),
        }
    }
}

impl Backend for RedisBackend {
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.run(self.enter(&instance_id)).await?;
            let (first, subscribed) = oneshot::channel();
            let (commands, receiver) = mpsc::unbounded_channel();
            let subscriber = tokio::spawn(subscriber::run(
                self.downgrade(),
                instance_id.clone(),
                inbox.clone(),
                receiver,
                first,
            ));
            match subscribed.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err),
                Err(_) => return Err(MeshError::Unavailable("Redis subscriber stopped".into())),
            }
            if let Ok(mut subscribers) = self.shared.subscribers.lock() {
                subscribers.insert(instance_id.clone(), commands);
            }
            let heartbeat =
                tokio::spawn(run_heartbeat(self.downgrade(), instance_id.clone(), inbox));
            self.spawn(&instance_id, subscriber);
            self.spawn(&instance_id, heartbeat);
            Ok(())
        })
    }

    fn detach<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            let stopped = self
                .shared
                .tasks
                .lock()
                .ok()
                .and_then(|mut tasks| tasks.remove(instance_id));
            for task in stopped.into_iter().flatten() {
                task.abort();
            }
            if let Ok(mut subscribers) = self.shared.subscribers.lock() {
                subscribers.remove(instance_id);
            }
            let keys = &self.shared.keys;
            self.run(async {
                let mut conn = self.connection().await?;
                self.shared
                    .scripts
                    .detach
                    .key(keys.instances())
                    .key(keys.instance_connections(instance_id))
                    .arg(&keys.prefix)
                    .arg(instance_id)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(redis_error)?;
                Ok(())
            })
            .await
        })
    }

    fn register_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            self.run(async {
                let mut conn = self.connection().await?;
                self.shared
                    .scripts
                    .register
                    .arg(&self.shared.keys.prefix)
                    .arg(instance_id)
                    .arg(connection_id)
                    .invoke_async::<()>(&mut conn)
                    .await
                    .map_err(redis_error)
            })
            .await
        })
    }

    fn unregister_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        Box::pin(self.run(async move {
            let keys = &self.shared.keys;
            let mut conn = self.connection().await?;
            self.shared
                .scripts
                .unregister
                .key(keys.instance_connections(instance_id))
                .arg(&keys.prefix)
                .arg(connection_id)
                .invoke_async::<()>(&mut conn)
                .await
                .map_err(redis_error)
        }))
    }

    fn connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
    ) -> BackendFuture<'a, Option<Value>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let raw: Option<String> = redis::cmd("HGET")
                .arg(self.shared.keys.connection(connection_id))
                .arg("meta")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            raw.map(|raw| parse_json(&raw)).transpose()
        }))
    }

    fn set_connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run(async move {
            let key = self.shared.keys.connection(connection_id);
            // A connection's metadata may only be set while it is registered.
            self.merge_json(&key, Some("instance"), write, |_| {}).await
        }))
    }

    fn all_connection_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>> {
        Box::pin(self.run(async move {
            let keys = &self.shared.keys;
            let mut conn = self.connection().await?;
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(keys.connections())
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGET").arg(keys.connection(id)).arg("meta");
            }
            let metadata: Vec<Option<String>> =
                pipe.query_async(&mut conn).await.map_err(redis_error)?;
            ids.into_iter()
                .zip(metadata)
                .map(|(id, raw)| Ok((id, parse_json_or_null(raw.as_deref())?)))
                .collect()
        }))
    }

    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, bool> {
        Box::pin(self.run(async move {
            let keys = &self.shared.keys;
            let envelope = envelope::encode(&delivery);
            let channel = match (keys.channel_of(&delivery), &delivery) {
                (Some(channel), _) => channel,
                (
                    None,
                    Delivery::ToConnection { connection_id, .. }
                    | Delivery::Close { connection_id, .. }
                    | Delivery::Call { connection_id, .. },
                ) => {
                    let mut conn = self.connection().await?;
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
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(envelope)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(true)
        }))
    }

    fn subscribe<'a>(&'a self, instance_id: &'a str, topic: &'a Topic) -> BackendFuture<'a, ()> {
        Box::pin(async move {
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
        })
    }

    fn unsubscribe(&self, instance_id: &str, topic: &Topic) {
        // A stopped subscriber has no subscriptions left to drop.
        let _ = self.subscriber_command(instance_id, Command::Unsubscribe(topic.clone()));
    }

    fn join_room<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        presence_ttl: Option<Duration>,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let registered: i64 = self
                .shared
                .scripts
                .join
                .arg(&self.shared.keys.prefix)
                .arg(connection_id)
                .arg(room)
                .arg(presence_ttl.map_or(0, millis))
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(registered == 1)
        }))
    }

    fn leave_room<'a>(&'a self, connection_id: &'a str, room: &'a str) -> BackendFuture<'a, bool> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let was_member: i64 = self
                .shared
                .scripts
                .leave
                .arg(&self.shared.keys.prefix)
                .arg(connection_id)
                .arg(room)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(was_member == 1)
        }))
    }

    fn room_members<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Vec<String>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            redis::cmd("ZRANGE")
                .arg(self.shared.keys.room(room))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        }))
    }

    fn room_members_with_metadata<'a>(
        &'a self,
        room: &'a str,
    ) -> BackendFuture<'a, Vec<(String, Value)>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let pairs: Vec<(String, Option<String>)> = self
                .shared
                .scripts
                .members_with_metadata
                .arg(&self.shared.keys.prefix)
                .arg(room)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            pairs
                .into_iter()
                .map(|(id, raw)| Ok((id, parse_json_or_null(raw.as_deref())?)))
                .collect()
        }))
    }

    fn connection_rooms<'a>(&'a self, connection_id: &'a str) -> BackendFuture<'a, Vec<String>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let mut rooms: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.shared.keys.connection_rooms(connection_id))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            rooms.sort_unstable();
            Ok(rooms)
        }))
    }

    fn rooms(&self) -> BackendFuture<'_, Vec<String>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let mut rooms: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.shared.keys.rooms())
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            rooms.sort_unstable();
            Ok(rooms)
        }))
    }

    fn share_a_room<'a>(&'a self, a: &'a str, b: &'a str) -> BackendFuture<'a, bool> {
        Box::pin(self.run(async move {
            let keys = &self.shared.keys;
            let mut conn = self.connection().await?;
            let common: Vec<String> = redis::cmd("SINTER")
                .arg(keys.connection_rooms(a))
                .arg(keys.connection_rooms(b))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(!common.is_empty())
        }))
    }

    fn room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Option<Value>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let raw: Option<String> = redis::cmd("HGET")
                .arg(self.shared.keys.room_metadata(room))
                .arg("meta")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            raw.map(|raw| parse_json(&raw)).transpose()
        }))
    }

    fn set_room_metadata<'a>(
        &'a self,
        room: &'a str,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, ()> {
        Box::pin(self.run(async move {
            let keys = &self.shared.keys;
            let index = keys.rooms_with_metadata();
            self.merge_json(&keys.room_metadata(room), None, write, |pipe| {
                pipe.cmd("SADD").arg(&index).arg(room).ignore();
            })
            .await
            .map(drop)
        }))
    }

    fn delete_room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, ()> {
        Box::pin(self.run(async move {
            let keys = &self.shared.keys;
            let mut conn = self.connection().await?;
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(keys.room_metadata(room))
                .ignore()
                .cmd("SREM")
                .arg(keys.rooms_with_metadata())
                .arg(room)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(redis_error)
        }))
    }

    fn all_room_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let pairs: Vec<(String, String)> = self
                .shared
                .scripts
                .all_room_metadata
                .arg(&self.shared.keys.prefix)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let mut all = pairs
                .into_iter()
                .map(|(room, raw)| Ok((room, parse_json(&raw)?)))
                .collect::<Result<Vec<_>, MeshError>>()?;
            all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            Ok(all)
        }))
    }

    fn refresh_presence<'a>(&'a self, refreshes: &'a [PresenceRefresh]) -> BackendFuture<'a, ()> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let mut invocation = self.shared.scripts.refresh_presence.prepare_invoke();
            invocation.arg(&self.shared.keys.prefix);
            for (connection_id, rooms) in refreshes {
                invocation.arg(&**connection_id).arg(rooms.len());
                for (room, ttl) in rooms {
                    invocation.arg(&**room).arg(millis(*ttl));
                }
            }
            invocation
                .invoke_async::<()>(&mut conn)
                .await
                .map_err(redis_error)
        }))
    }

    fn presence<'a>(&'a self, room: &'a str) -> BackendFuture<'a, PresenceView> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let entries: Vec<(String, Option<String>, Option<String>)> = self
                .shared
                .scripts
                .presence
                .arg(&self.shared.keys.prefix)
                .arg(room)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let mut view = PresenceView::default();
            for (id, metadata, state) in entries {
                if let Some(state) = state {
                    view.states.push((id.clone(), parse_json(&state)?));
                }
                view.present
                    .push((id, parse_json_or_null(metadata.as_deref())?));
            }
            Ok(view)
        }))
    }

    fn set_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        state: &'a Value,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let stored: i64 = self
                .shared
                .scripts
                .set_state
                .arg(&self.shared.keys.prefix)
                .arg(connection_id)
                .arg(room)
                .arg(state.to_string())
                .arg(expire_after.map_or(0, millis))
                .arg(if silent { 0 } else { 1 })
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(stored == 1)
        }))
    }

    fn clear_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let present: i64 = self
                .shared
                .scripts
                .clear_state
                .arg(&self.shared.keys.prefix)
                .arg(connection_id)
                .arg(room)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(present == 1)
        }))
    }

    fn sweep(&self) -> BackendFuture<'_, Duration> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let next_due: i64 = self
                .shared
                .scripts
                .sweep
                .arg(&self.shared.keys.prefix)
                .arg(SWEEP_BATCH)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            // Entries made by other instances after this sweep are caught by their own
            // sweepers, or by this one within a heartbeat interval if they die.
            Ok(u64::try_from(next_due)
                .map(Duration::from_millis)
                .unwrap_or(self.shared.heartbeat_interval)
                .min(self.shared.heartbeat_interval))
        }))
    }

    fn write_channel<'a>(
        &'a self,
        channel: &'a str,
        message: &'a str,
        history: usize,
        history_bytes: usize,
        announcement: Delivery,
    ) -> BackendFuture<'a, ()> {
        Box::pin(self.run(async move {
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
        }))
    }

    fn channel_history<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
    ) -> BackendFuture<'a, Vec<String>> {
        Box::pin(self.run(async move {
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
        }))
    }

    fn records<'a>(&'a self, ids: &'a [String]) -> BackendFuture<'a, Vec<Option<StoredRecord>>> {
        Box::pin(self.run(async move {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.cmd("HMGET")
                    .arg(self.shared.keys.record(id))
                    .arg("value")
                    .arg("version");
            }
            let mut conn = self.connection().await?;
            let stored: Vec<(Option<String>, Option<u64>)> =
                pipe.query_async(&mut conn).await.map_err(redis_error)?;
            stored.into_iter().map(stored_record).collect()
        }))
    }

    fn record_ids<'a>(&'a self, prefix: &'a str) -> BackendFuture<'a, Vec<String>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let mut listing = redis::cmd("ZRANGEBYLEX");
            listing.arg(self.shared.keys.record_ids());
            if prefix.is_empty() {
                listing.arg("-").arg("+");
            } else {
                // No UTF-8 text holds the byte 0xff: every id with the prefix sorts
                // between the prefix itself and the prefix followed by it.
                let mut upper = Vec::with_capacity(prefix.len() + 2);
                upper.push(b'[');
                upper.extend_from_slice(prefix.as_bytes());
                upper.push(0xff);
                listing.arg(format!("[{prefix}")).arg(upper);
            }
            listing.query_async(&mut conn).await.map_err(redis_error)
        }))
    }

    fn update_record<'a>(
        &'a self,
        id: &'a str,
        update: &'a RecordUpdater,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            // Compare-and-set: read, compute in Rust (merges and diffs keep key order,
            // which Lua's cjson would not), then write only if no other writer got in,
            // else compute again on what that writer stored. The check is on a token
            // that every write renews, not on the version, which a deletion resets: a
            // record deleted and created again never passes for the one read.
            let mut attempt = 0;
            loop {
                let (current, token) = self.read_record(&mut conn, id).await?;
                let version = current.as_ref().map_or(0, |record| record.version);
                let Some(write) = update(current.as_ref())? else {
                    return Ok(None);
                };
                let stored = StoredRecord {
                    value: write.value,
                    version: version + 1,
                };
                let written = self
                    .record_cas(
                        &mut conn,
                        id,
                        &token,
                        Some((&write.json, stored.version)),
                        &write.announcements,
                    )
                    .await?;
                if written {
                    return Ok(Some(stored));
                }
                attempt += 1;
                conflict_pause(attempt).await;
            }
        }))
    }

    fn delete_record<'a>(
        &'a self,
        id: &'a str,
        announce: &'a RecordRemover,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        Box::pin(self.run(async move {
            let mut conn = self.connection().await?;
            let mut attempt = 0;
            loop {
                let (Some(current), token) = self.read_record(&mut conn, id).await? else {
                    return Ok(None);
                };
                let announcements = announce(&current);
                if self
                    .record_cas(&mut conn, id, &token, None, &announcements)
                    .await?
                {
                    return Ok(Some(current));
                }
                attempt += 1;
                conflict_pause(attempt).await;
            }
        }))
    }
}

impl RedisBackend {
    /// A record and its write token (empty when there is no record).
    async fn read_record(
        &self,
        conn: &mut deadpool_redis::Connection,
        id: &str,
    ) -> Result<(Option<StoredRecord>, String), MeshError> {
        let (value, version, token): (Option<String>, Option<u64>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.shared.keys.record(id))
                .arg("value")
                .arg("version")
                .arg("token")
                .query_async(conn)
                .await
                .map_err(redis_error)?;
        Ok((stored_record((value, version))?, token.unwrap_or_default()))
    }

    /// Writes `(value, version)` (or, with `None`, deletes) a record if its token is still
    /// `expected`, publishing `announcements` with it. Returns whether it did.
    async fn record_cas(
        &self,
        conn: &mut deadpool_redis::Connection,
        id: &str,
        expected: &str,
        write: Option<(&str, u64)>,
        announcements: &[Delivery],
    ) -> Result<bool, MeshError> {
        let keys = &self.shared.keys;
        let (value, version) = write.unwrap_or(("", 0));
        let mut invocation = self.shared.scripts.record_cas.prepare_invoke();
        invocation
            .arg(&keys.prefix)
            .arg(id)
            .arg(expected)
            .arg(value)
            .arg(version)
            .arg(uuid::Uuid::new_v4().simple().to_string());
        for announcement in announcements {
            let Some(channel) = keys.channel_of(announcement) else {
                return Err(MeshError::Corrupt(
                    "a record announcement must go to a topic".into(),
                ));
            };
            invocation.arg(channel).arg(envelope::encode(announcement));
        }
        let written: i64 = invocation.invoke_async(conn).await.map_err(redis_error)?;
        Ok(written == 1)
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

    /// Optimistic read-modify-write of the JSON in field `meta` of hash `key`: `WATCH`
    /// the hash, merge in Rust (deepMerge is not worth re-implementing in Lua), write it
    /// back in `MULTI` with whatever `also` adds, and retry if another writer got in
    /// between. With `require`, the update happens only while that field exists (the
    /// answer is then whether it did). Retries end with the operation timeout.
    async fn merge_json(
        &self,
        key: &str,
        require: Option<&str>,
        write: &MetadataWrite,
        also: impl Fn(&mut redis::Pipeline),
    ) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let mut attempt = 0;
        loop {
            redis::cmd("WATCH")
                .arg(key)
                .query_async::<()>(&mut conn)
                .await
                .map_err(redis_error)?;
            let (required, stored): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(key)
                .arg(require.unwrap_or("meta"))
                .arg("meta")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if require.is_some() && required.is_none() {
                redis::cmd("UNWATCH")
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(redis_error)?;
                return Ok(false);
            }
            let old = stored.map(|raw| parse_json(&raw)).transpose()?;
            let merged = match write.apply(old) {
                Ok((_, json)) => json,
                Err(refused) => {
                    redis::cmd("UNWATCH")
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(redis_error)?;
                    return Err(refused);
                }
            };
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HSET")
                .arg(key)
                .arg("meta")
                .arg(merged)
                .ignore();
            also(&mut pipe);
            let committed: Option<()> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
            if committed.is_some() {
                return Ok(true);
            }
            attempt += 1;
            conflict_pause(attempt).await;
        }
    }
}

/// A short random pause before retrying a read-modify-write that lost a race, growing
/// with the attempts, so that writers contending for one key spread out instead of
/// colliding again. Retries end with the operation timeout.
async fn conflict_pause(attempt: u32) {
    let ceiling =
        (Duration::from_micros(100) * 2u32.saturating_pow(attempt.min(8))).min(MAX_CONFLICT_PAUSE);
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(1).max(1);
    tokio::time::sleep(Duration::from_micros(random % micros)).await;
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What background tasks hold: the backend without keeping it alive, so that dropping
/// the last handle (`Shared::drop`) aborts them.
#[derive(Clone)]
struct WeakBackend(Weak<Shared>);

impl WeakBackend {
    fn upgrade(&self) -> Option<RedisBackend> {
        self.0.upgrade().map(|shared| RedisBackend { shared })
    }
}

impl RedisBackend {
    fn downgrade(&self) -> WeakBackend {
        WeakBackend(Arc::downgrade(&self.shared))
    }
}

fn parse_json(raw: &str) -> Result<Value, MeshError> {
    serde_json::from_str(raw)
        .map_err(|err| MeshError::Corrupt(format!("stored JSON does not parse: {err}")))
}

fn stored_record(
    (value, version): (Option<String>, Option<u64>),
) -> Result<Option<StoredRecord>, MeshError> {
    match (value, version) {
        (Some(value), Some(version)) => Ok(Some(StoredRecord {
            value: parse_json(&value)?,
            version,
        })),
        (None, None) => Ok(None),
        _ => Err(MeshError::Corrupt(
            "a record hash lacks its value or version".into(),
        )),
    }
}

fn parse_json_or_null(raw: Option<&str>) -> Result<Value, MeshError> {
    raw.map_or(Ok(Value::Null), parse_json)
}
