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
//!
//! Routing and metadata are two fields of one hash, written by different commands, so
//! setting metadata can never redirect a connection's pushes (mesh's fault, PROTOCOL.md §8).
//!
//! | channel | carries |
//! |---|---|
//! | `P instance:{iid}` | deliveries for connections held by that instance |
//! | `P broadcast` | deliveries for every connection |
//!
//! A push to one connection is one script call that looks up the holder and publishes on
//! its channel: one round trip, and only the holder receives it. A delivery is a short
//! binary envelope (a tag, the connection id, the frame's JSON text verbatim) parsed once
//! per instance.
//!
//! # Liveness
//!
//! Each instance refreshes its deadline in `P instances` every `heartbeat_interval`
//! (default 2 s) to now + `instance_ttl` (default 10 s), using Redis's clock so that skewed
//! hosts agree. On the same tick it runs a sweep script that claims instances whose
//! deadline passed (`ZREM` succeeds for exactly one sweeper) and removes their connections
//! and metadata. A dead instance is therefore gone within `instance_ttl + heartbeat_interval`.
//! An instance that finds itself missing from `P instances` (Redis restarted empty, or it
//! was swept during a long stall) registers its live connections again.
//!
//! Scripts touch keys they compute from the prefix, so this layout targets a single Redis
//! (or a primary with replicas), not Redis Cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_redis::{Pool, Runtime};
use futures_util::StreamExt;
use redis::Script;
use serde_json::Value;
use tokio::task::JoinHandle;

use super::{Backend, BackendFuture, Delivery, Inbox};
use crate::error::MeshError;
use crate::metadata::MergeStrategy;
use crate::protocol::Frame;

/// Longest any single Redis operation may take before it counts as unavailable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts of an optimistic (`WATCH`) read-modify-write before giving up.
const MAX_WATCH_RETRIES: usize = 16;

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
}

struct Scripts {
    heartbeat: Script,
    sweep: Script,
    route: Script,
    detach: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            // KEYS[1] instances; ARGV[1] instance id; ARGV[2] ttl ms. Returns 1 when the
            // instance was missing (new, or swept while alive).
            heartbeat: Script::new(
                r"
                local t = redis.call('TIME')
                local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
                ",
            ),
            // KEYS[1] instances, KEYS[2] connections; ARGV[1] prefix; ARGV[2] max instances.
            // Returns the ids of the connections removed.
            sweep: Script::new(
                r"
                local t = redis.call('TIME')
                local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
                local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
                local removed = {}
                for _, iid in ipairs(dead) do
                  if redis.call('ZREM', KEYS[1], iid) == 1 then
                    local set = ARGV[1] .. 'instance:' .. iid .. ':connections'
                    for _, cid in ipairs(redis.call('SMEMBERS', set)) do
                      redis.call('DEL', ARGV[1] .. 'conn:' .. cid)
                      redis.call('ZREM', KEYS[2], cid)
                      removed[#removed + 1] = cid
                    end
                    redis.call('DEL', set)
                  end
                end
                return removed
                ",
            ),
            // KEYS[1] conn hash; ARGV[1] prefix; ARGV[2] envelope. Publishes on the
            // holder's channel; returns 0 when the connection is unknown.
            route: Script::new(
                r"
                local iid = redis.call('HGET', KEYS[1], 'instance')
                if not iid then return 0 end
                redis.call('PUBLISH', ARGV[1] .. 'instance:' .. iid, ARGV[2])
                return 1
                ",
            ),
            // KEYS[1] instances, KEYS[2] instance connections, KEYS[3] connections;
            // ARGV[1] prefix; ARGV[2] instance id.
            detach: Script::new(
                r"
                for _, cid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
                  redis.call('DEL', ARGV[1] .. 'conn:' .. cid)
                  redis.call('ZREM', KEYS[3], cid)
                end
                redis.call('DEL', KEYS[2])
                redis.call('ZREM', KEYS[1], ARGV[2])
                return 1
                ",
            ),
        }
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
        let mut config = deadpool_redis::Config::from_url(self.url);
        let mut pool_config = deadpool_redis::PoolConfig::default();
        pool_config.timeouts.wait = Some(OPERATION_TIMEOUT);
        pool_config.timeouts.create = Some(OPERATION_TIMEOUT);
        pool_config.timeouts.recycle = Some(OPERATION_TIMEOUT);
        config.pool = Some(pool_config);
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
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

    async fn heartbeat(&self, instance_id: &str) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let ttl_ms = u64::try_from(self.shared.instance_ttl.as_millis()).unwrap_or(u64::MAX);
        let added: i64 = self
            .shared
            .scripts
            .heartbeat
            .key(self.shared.keys.instances())
            .arg(instance_id)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(added == 1)
    }

    async fn sweep(&self) -> Result<Vec<String>, MeshError> {
        let mut conn = self.connection().await?;
        self.shared
            .scripts
            .sweep
            .key(self.shared.keys.instances())
            .key(self.shared.keys.connections())
            .arg(&self.shared.keys.prefix)
            .arg(16)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)
    }

    async fn register(
        &self,
        instance_id: &str,
        connection_ids: &[Arc<str>],
    ) -> Result<(), MeshError> {
        if connection_ids.is_empty() {
            return Ok(());
        }
        let keys = &self.shared.keys;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as f64)
            .unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for connection_id in connection_ids {
            let connection_id: &str = connection_id;
            pipe.cmd("HSET")
                .arg(keys.connection(connection_id))
                .arg("instance")
                .arg(instance_id)
                .ignore()
                .cmd("SADD")
                .arg(keys.instance_connections(instance_id))
                .arg(connection_id)
                .ignore()
                .cmd("ZADD")
                .arg(keys.connections())
                .arg(now)
                .arg(connection_id)
                .ignore();
        }
        let mut conn = self.connection().await?;
        pipe.query_async::<()>(&mut conn).await.map_err(redis_error)
    }

    fn spawn(&self, instance_id: &Arc<str>, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.shared.tasks.lock() {
            tasks.entry(instance_id.clone()).or_default().push(task);
        }
    }
}

/// The pub/sub envelope: a tag byte, then for targeted kinds the connection id and a
/// newline, then the frame text or close reason verbatim.
mod envelope {
    use super::*;

    const TO_CONNECTION: u8 = b'c';
    const BROADCAST: u8 = b'b';
    const CLOSE: u8 = b'x';

    pub(super) fn encode(delivery: &Delivery) -> Vec<u8> {
        let (tag, target, body): (u8, &str, &str) = match delivery {
            Delivery::ToConnection {
                connection_id,
                frame,
            } => (TO_CONNECTION, connection_id, frame.as_str()),
            Delivery::Broadcast { frame } => (BROADCAST, "", frame.as_str()),
            Delivery::Close {
                connection_id,
                reason,
            } => (CLOSE, connection_id, reason),
        };
        let mut out = Vec::with_capacity(2 + target.len() + body.len());
        out.push(tag);
        out.extend_from_slice(target.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(body.as_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Delivery> {
        let (&tag, rest) = bytes.split_first()?;
        let split = rest.iter().position(|&b| b == b'\n')?;
        let target = std::str::from_utf8(&rest[..split]).ok()?;
        let body = bytes::Bytes::copy_from_slice(&rest[split + 1..]);
        match tag {
            TO_CONNECTION => Some(Delivery::ToConnection {
                connection_id: Arc::from(target),
                frame: Frame::try_from(body).ok()?,
            }),
            BROADCAST => Some(Delivery::Broadcast {
                frame: Frame::try_from(body).ok()?,
            }),
            CLOSE => Some(Delivery::Close {
                connection_id: Arc::from(target),
                reason: String::from_utf8(body.to_vec()).ok()?,
            }),
            _ => None,
        }
    }
}

/// Keeps the instance's pub/sub subscription alive and hands what arrives to the inbox.
async fn run_subscriber(
    backend: WeakBackend,
    instance_id: Arc<str>,
    inbox: Weak<dyn Inbox>,
    first: tokio::sync::oneshot::Sender<Result<(), MeshError>>,
) {
    let Some((client, channels)) = backend.upgrade().map(|backend| {
        let keys = &backend.shared.keys;
        (
            backend.shared.client.clone(),
            [
                keys.instance_channel(&instance_id),
                keys.broadcast_channel(),
            ],
        )
    }) else {
        return;
    };
    let mut first = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await.map_err(unavailable)?;
            for channel in &channels {
                pubsub.subscribe(channel).await.map_err(unavailable)?;
            }
            Ok::<_, MeshError>(pubsub)
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, subscribed).await {
            Ok(Ok(pubsub)) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                } else {
                    tracing::info!("Redis pub/sub subscription re-established");
                }
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Some(inbox) = inbox.upgrade() else { return };
                    match envelope::decode(message.get_payload_bytes()) {
                        Some(delivery) => inbox.deliver(delivery),
                        None => tracing::warn!(
                            channel = message.get_channel_name(),
                            "dropped a pub/sub message that does not parse"
                        ),
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
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Proves this instance alive and sweeps dead ones, forever.
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
            Ok(true) => {
                let ids = local.local_connection_ids();
                if !ids.is_empty() {
                    tracing::warn!(
                        connections = ids.len(),
                        "instance was missing from Redis; registering its connections again"
                    );
                }
                if let Err(err) = backend.run(backend.register(&instance_id, &ids)).await {
                    tracing::warn!(%err, "could not register connections again");
                }
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(%err, "Redis heartbeat failed");
                continue;
            }
        }
        match backend.run(backend.sweep()).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(
                    connections = removed.len(),
                    "removed the connections of dead instances"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "Redis sweep failed"),
        }
    }
}

impl Backend for RedisBackend {
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.run(self.heartbeat(&instance_id)).await?;
            let (first, subscribed) = tokio::sync::oneshot::channel();
            let subscriber = tokio::spawn(run_subscriber(
                self.downgrade(),
                instance_id.clone(),
                inbox.clone(),
                first,
            ));
            match subscribed.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err),
                Err(_) => return Err(MeshError::Unavailable("Redis subscriber stopped".into())),
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
            let keys = &self.shared.keys;
            self.run(async {
                let mut conn = self.connection().await?;
                self.shared
                    .scripts
                    .detach
                    .key(keys.instances())
                    .key(keys.instance_connections(instance_id))
                    .key(keys.connections())
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
            self.run(self.register(instance_id, &[Arc::from(connection_id)]))
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
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(keys.connection(connection_id))
                .ignore()
                .cmd("SREM")
                .arg(keys.instance_connections(instance_id))
                .arg(connection_id)
                .ignore()
                .cmd("ZREM")
                .arg(keys.connections())
                .arg(connection_id)
                .ignore()
                .query_async::<()>(&mut conn)
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
        metadata: Value,
        strategy: MergeStrategy,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run(async move {
            let key = self.shared.keys.connection(connection_id);
            let mut conn = self.connection().await?;
            // Optimistic read-modify-write: WATCH the hash, merge in Rust (deepMerge is not
            // worth re-implementing in Lua), and retry if another writer got in between.
            for _ in 0..MAX_WATCH_RETRIES {
                redis::cmd("WATCH")
                    .arg(&key)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(redis_error)?;
                let (instance, stored): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(&key)
                    .arg("instance")
                    .arg("meta")
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                if instance.is_none() {
                    redis::cmd("UNWATCH")
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(redis_error)?;
                    return Ok(false);
                }
                let old = stored.map(|raw| parse_json(&raw)).transpose()?;
                let merged = strategy.apply(old, metadata.clone());
                let committed: Option<()> = redis::pipe()
                    .atomic()
                    .cmd("HSET")
                    .arg(&key)
                    .arg("meta")
                    .arg(merged.to_string())
                    .ignore()
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                if committed.is_some() {
                    return Ok(true);
                }
            }
            Err(MeshError::Unavailable(
                "metadata update kept conflicting".into(),
            ))
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
                .map(|(id, raw)| {
                    Ok((
                        id,
                        raw.map(|raw| parse_json(&raw))
                            .transpose()?
                            .unwrap_or(Value::Null),
                    ))
                })
                .collect()
        }))
    }

    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, ()> {
        Box::pin(self.run(async move {
            let keys = &self.shared.keys;
            let envelope = envelope::encode(&delivery);
            let mut conn = self.connection().await?;
            match &delivery {
                Delivery::Broadcast { .. } => redis::cmd("PUBLISH")
                    .arg(keys.broadcast_channel())
                    .arg(envelope)
                    .query_async::<i64>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(redis_error),
                Delivery::ToConnection { connection_id, .. }
                | Delivery::Close { connection_id, .. } => self
                    .shared
                    .scripts
                    .route
                    .key(keys.connection(connection_id))
                    .arg(&keys.prefix)
                    .arg(envelope)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(redis_error),
            }
        }))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let delivery = Delivery::ToConnection {
            connection_id: Arc::from("abc-1"),
            frame: Frame::from(r#"{"command":"x","payload":"a\nb"}"#),
        };
        match envelope::decode(&envelope::encode(&delivery)) {
            Some(Delivery::ToConnection {
                connection_id,
                frame,
            }) => {
                assert_eq!(&*connection_id, "abc-1");
                assert_eq!(frame.as_str(), r#"{"command":"x","payload":"a\nb"}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(envelope::decode(b"").is_none());
        assert!(envelope::decode(b"zfoo\nbar").is_none());
        assert!(envelope::decode(b"c-no-newline").is_none());
    }
}
