//! The Redis backend: many instances behind a load balancer, one mesh.
//!
//! Commands share one multiplexed connection (`connection.rs`): every task's requests are
//! pipelined on it, so a publish or a script call is one round trip, with no checkout or
//! liveness check in front of it; it is replaced on the next use after it fails. Nothing
//! needs a connection of its own: read-modify-writes are compare-and-set scripts, not
//! `WATCH`. Each instance also keeps one dedicated pub/sub connection, re-established
//! with backoff whenever it drops.
//!
//! # Key and channel layout
//!
//! Every key and channel starts with the configurable prefix `P` (default `mesh:`), so
//! several apps, or parallel tests, share one Redis without colliding. The one exception
//! is a plain channel's pub/sub channel (see "Plain channels" below), which is the
//! channel's own name and never starts with `P`.
//!
//! Braces are literal: they are the hash tag that decides a key's Redis Cluster slot (the
//! text between the first `{` and the next `}`), and they are there on a single Redis too,
//! so that both run the same code on the same layout. Rooms, records and connections are
//! spread over 64 *buckets* each (bucket `N` = FNV-1a of the name or id, modulo 64): a
//! room's keys share a slot with the indexes of its bucket, which its scripts change in
//! the same atomic step, and reading many connections takes a pipeline per bucket.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{registry}:instances` | sorted set | instance id, scored by its liveness deadline (Redis server time, ms) |
//! | `P{registry}:dead-connections` | set | connections of instances past their deadline, not forgotten yet |
//! | `P{registry}:instance:IID` | set | the connection ids instance `IID` holds |
//! | `P{registry}:connections` | sorted set | every connection id, scored by registration time (for ordered listings) |
//! | `P{conns:N}:conn:CID` | hash | `instance`: the holder's id (routing) |
//! | `P{conns:N}:conn-meta:CID` | string | a connection's metadata JSON (written only while its `instance` field exists) |
//! | `P{conns:N}:conn-rooms:CID` | set | the rooms a connection noted joining (a superset of its rooms: reads check each against the room's members) |
//! | `P{rooms:N}:room:ROOM` | sorted set | a room's members, scored by join order (`P{rooms:N}:join-order` counts) |
//! | `P{rooms:N}:rooms` | set | the bucket's rooms with at least one member |
//! | `P{rooms:N}:room-meta:ROOM` | string | a room's metadata JSON |
//! | `P{rooms:N}:rooms-with-meta` | set | the bucket's rooms that have metadata |
//! | `P{rooms:N}:presence:ROOM` | sorted set | a tracked room's present connections, scored by presence deadline |
//! | `P{rooms:N}:presence-states:ROOM` | hash | connection id -> presence state JSON |
//! | `P{rooms:N}:presence-expiry` | sorted set | `"{cid}\n{room}"` for the bucket's presence entries, scored by deadline |
//! | `P{rooms:N}:state-expiry` | sorted set | `"{cid}\n{room}"` for the bucket's states with `expireAfter`, scored by deadline |
//! | `P history:{CHANNEL}` | list | a channel's kept messages, newest first (for a plain channel, other processes may read it and `LPUSH` to it) |
//! | `P history-bytes:{CHANNEL}` | string | the total size in bytes of a channel's kept messages (absent when none are kept) |
//! | `P history-length:{CHANNEL}` | string | plain channels only: the list's length as mesh's last write left it |
//! | `P history-position:{CHANNEL}` | hash | not for plain channels: `epoch` (made by the first write or read, so a Redis that lost it makes a new one), `offset` of the newest message published, `gap` the offset of the newest published without being kept; the kept messages after `gap` are `offset`, `offset - 1`, … in list order. While the channel keeps no message (and when a read made it) it expires a day after it was last written |
//! | `P{records:N}:record:ID` | hash | `value`: a record's JSON; `version`: its version; `token`: renewed by every write (the compare-and-set key) |
//! | `P{records:N}:record-ids` | sorted set, every score 0 | the bucket's record ids, in byte order: prefix listings read a range of each bucket (`ZRANGEBYLEX`) |
//!
//! Routing and metadata are separate keys, written by different commands, so setting
//! metadata can never redirect a connection's pushes (mesh's fault, docs/protocol.md §6).
//!
//! | channel | pub/sub on a Cluster | carries |
//! |---|---|---|
//! | `P instance:{IID}` | sharded | deliveries for connections held by that instance, and calls and answers between instances |
//! | `P broadcast` | classic | deliveries for every connection |
//! | `P{rooms:N}:topic:room:ROOM`, `P{rooms:N}:topic:presence:ROOM` | sharded | room broadcasts, presence updates |
//! | `P topic:channel:{CHANNEL}` | sharded | channel messages |
//! | `P{records:N}:topic:record:ID` | sharded | record updates |
//! | `P topic:collections:PATTERN` (single Redis), `P{records:N}:topic:collections:PATTERN` (Cluster: one per record bucket) | sharded | "a record that collections of this exposure may hold changed" |
//! | `CHANNEL` (no prefix) | classic | a plain channel's messages, as their bare text |
//!
//! Only instances with a local listener subscribe to a topic. A push to one connection is
//! one script call that looks up the holder and publishes on its channel: one round trip,
//! and only the holder receives it. A delivery is a short binary envelope (a tag, then
//! length-prefixed fields: ids, a push's command and its payload's JSON text verbatim)
//! parsed once per instance.
//!
//! # Redis Cluster
//!
//! [`RedisBackend::cluster`] connects through seed nodes and routes each command by its
//! first key's slot; every script names a key of the one slot it touches first. Commands
//! that read several slots (members' metadata, the buckets of a listing) go separately, 64
//! at a time, pipelined per node.
//!
//! **Sharded pub/sub.** A topic whose messages are published by the scripts of one slot
//! (presence by the room's, a record's updates by its own, a channel's messages by its
//! history's) travels on that slot's sharded channel (`SPUBLISH`/`SSUBSCRIBE`), and so do
//! room broadcasts, in the room's slot: a room's traffic stays on the shard that owns it,
//! and pub/sub load grows with the number of shards, not with the whole Cluster. An
//! instance's own channel is sharded too, in a slot of its own: pushes to its connections
//! stay on one shard, and a publish's count of receivers stays exact (a classic `PUBLISH`
//! counts only the receiving node's subscribers), which is how a push learns that its
//! connection's holder is gone. Classic pub/sub reaches every node over the cluster bus,
//! which is what broadcasts need (every instance listens), and what plain channels need,
//! so that an outside `PUBLISH` reaches their subscribers as on a single Redis. A
//! collections topic is announced by record writes, from each record's slot: it has one
//! sharded channel per record bucket, and its listeners subscribe to all 64. (A classic
//! `PUBLISH` reaches other nodes over the cluster bus after the write has answered, so a
//! collection subscribed just after a write could still hear of it; a sharded one is
//! delivered by the node that wrote.) On a single Redis every channel is classic (so
//! Redis 5 and 6 keep working there).
//!
//! **Recovery.** The redis crate's cluster connection follows `MOVED` and `ASK` for
//! commands and refreshes its slot map when a command meets a redirection. Subscriptions
//! it does not move by itself (a pub/sub connection sends no commands to be redirected):
//! each instance's subscriber probes `CLUSTER SLOTS` every second and, when a node's
//! connection drops or the masters change (a failover, a node restarted empty), makes a
//! new cluster connection and subscribes to everything again, with backoff, then reports
//! the outage to the engine so that records and collections catch up, as on a single
//! Redis. While a slot is unreachable its operations fail with `EUNAVAILABLE` after the
//! operation timeout.
//!
//! # Steps across slots
//!
//! A connection's keys and a room's keys are in different slots, so joining, leaving and
//! forgetting a connection (when it closes, or when the sweep finds its instance dead)
//! are steps, one script each, ordered so that whoever comes next completes or undoes an
//! interrupted change, and every announcement is made once:
//! - **Forget:** the connection stops being registered (its `instance` field goes, so
//!   joins and metadata writes fail from then on), its memberships of the rooms it noted
//!   go, then its keys, then its presence in those rooms (with the `leave`
//!   announcements, so that whoever sees one finds the connection gone everywhere), and
//!   only then does it leave the registry. Each step may be repeated: a sweep repeats all
//!   of it for a connection still in its instance's set.
//! - **Join:** the connection notes the room (only while registered), the room takes the
//!   member, and the connection is checked to be registered still; if it is not, a forget
//!   ran in between and may have read the notes before the member arrived, so the join
//!   leaves the room itself.
//! - **Leave:** the membership first, then the note, then the presence (announcing the
//!   `leave`), so that an interrupted leave leaves a note of a room the connection is not
//!   in (which a later forget leaves again, harmlessly) or a presence that lapses (and is
//!   announced by the sweep), never a member nobody knows of.
//! - **Announcements:** a `leave` is published by the script that removes the presence
//!   entry, and only when it removed one, so however many steps run twice, by whomever,
//!   each leave is announced exactly once.
//!
//! # Plain channels
//!
//! [`RedisBackendBuilder::plain_channels`] makes the channels its patterns match plain
//! Redis channels, as all of mesh's are: any process can `PUBLISH {channel} text` to
//! their subscribers, `SUBSCRIBE {channel}` to what the mesh writes, and read
//! `P history:{CHANNEL}` (newest first, braces literal) or `LPUSH` to it. A plain
//! channel's pub/sub messages are the message text (UTF-8) and nothing else: each instance
//! turns one into [`Delivery::ChannelMessage`], and the engine pushes it to the channel's
//! local subscribers unless it is over `max_channel_message_bytes` (then it is dropped,
//! logged, and counted in `MeshStats::dropped_channel_messages`). The mesh's own writes go
//! the same way, so outside subscribers see them too. On a Cluster, outside processes
//! publish with a plain `PUBLISH` as well (plain channels are classic pub/sub there), and
//! reach the history list through any Cluster-aware client (its slot is the channel
//! name's).
//!
//! The prefix stays closed: a name that starts with `P` is never plain, whatever pattern
//! matches it, so the pub/sub channel of a plain channel is never one of the engine's, a
//! mesh write to a plain channel never publishes under `P`, and the subscriber reads a
//! message as bare text only when it arrives on a name outside `P`. Text published on an
//! engine channel (`P broadcast`, `P instance:{IID}`, the topics) is parsed as an envelope
//! and dropped when it is not one, as before. (Publishing an envelope there takes what any
//! Redis client with access can do anyway: write the keys; plain channels open no new way.)
//! `build` refuses plain channels with an empty prefix, under which nothing could be told
//! apart.
//!
//! History sizes: mesh keeps `P history-bytes:{CHANNEL}` in step with what it pushes and
//! pops, in the `write_channel` script. Others' `LPUSH`es are not counted when they happen;
//! instead, for a plain channel the script also keeps `P history-length:{CHANNEL}`, the
//! list's length as it left it, and when it finds another length (someone else pushed,
//! trimmed or deleted) it counts the list's bytes again (one pass, in chunks) before it
//! pushes and trims. So after every mesh write the list holds at most the write's count
//! and `max_history_bytes`, whoever appended; only an outside `LPUSH` and a pop of the
//! same count between two mesh writes can leave the size off until the next recount. A
//! process that appends to a channel the mesh never writes must trim the list itself
//! (`LTRIM`). Reads are bounded whoever wrote: `read_history` walks the list in chunks
//! inside Redis, skips messages over `max_channel_message_bytes` (as live delivery
//! does), and stops at the request's count and after the reply's byte budget.
//!
//! # Liveness and expiry
//!
//! Each instance refreshes its deadline in `P{registry}:instances` every
//! `heartbeat_interval` (default 2 s) to now + `instance_ttl` (default 10 s), using
//! Redis's clock so that skewed hosts agree. An instance that finds itself missing from
//! the instances (Redis restarted empty, or it was swept during a long stall) has lost its
//! connections' rooms, presence and metadata: it closes them with 1012 so that their
//! clients reconnect and set them up again, and only then enters the instances again. The
//! heartbeat itself never adds the instance: a command can run although its reply is lost
//! (a stall queues it, the caller times out), and a heartbeat that put a swept instance
//! back that way would hide the loss.
//!
//! Everything that can lapse is a score in a sorted set: instance deadlines, presence
//! deadlines and state expiries (one set each per room bucket). Any instance may sweep at
//! any time, and each lapsed entry is removed and announced exactly once:
//! - A lapsed instance is claimed by one sweeper (`ZREM` succeeds once), and its
//!   connections are moved to `P{registry}:dead-connections` (so that, should the
//!   instance come back, its new connections are not taken for dead). They stay there
//!   until each has been forgotten (see "Steps across slots"), a bounded batch per sweep,
//!   handed to any sweeper that asks; two sweepers may forget one connection together,
//!   which announces each leave once all the same. A connection can register only while
//!   its instance is in the instances, so none is left in a set no sweep reads.
//! - In each room bucket, one script claims lapsed presence and states with `ZREM`, which
//!   succeeds for exactly one sweeper, removes what hangs on them and publishes each
//!   `leave` or cleared state from inside the script, in order with every other presence
//!   change of the room (all of which are published by the script that makes them).
//!
//! The sweep returns when the next entry lapses, so the engine sleeps until then. This is
//! the layout Centrifugo uses for presence; it needs no keyspace notifications, which
//! Redis Cluster and many managed services do not deliver reliably, and it still works
//! when the instance that owned a connection is gone. A dead instance's connections are
//! removed from `instance_ttl + heartbeat_interval` on, 256 per sweep (a sweep follows at
//! once while work is left).
//!
//! Scripts write after reading `TIME`, which needs Redis 5 or newer (script effects
//! replication); sharded pub/sub on a Cluster needs Redis 7.
//!
//! # Where the code lives
//!
//! This file holds the backend itself (its builder, shared state, helpers) and the
//! `Backend` implementation, whose every method hands over to one of:
//!
//! | file | concern |
//! |---|---|
//! | `client.rs` | the client every connection comes from: the URL, TLS (`rediss://`) |
//! | `connection.rs` | the shared multiplexed connection, replaced after it fails |
//! | `keys.rs` | every key and channel name |
//! | `liveness.rs` | attach and detach, connection registration, the heartbeat, the sweep |
//! | `publish.rs` | routing a delivery to its holder's channel or its topic's |
//! | `subscriber.rs` | the pub/sub connection, topic subscriptions |
//! | `metadata.rs` | connection and room metadata |
//! | `rooms.rs` | joining, leaving, member and room listings |
//! | `presence.rs` | presence and presence states |
//! | `channels.rs` | channel messages and their history |
//! | `records.rs` | records, their id index, compare-and-set writes |
//! | `scripts.rs` | the Lua scripts every multi-key change runs as |
//! | `envelope.rs` | the binary form deliveries travel in |

mod channels;
mod client;
mod connection;
mod envelope;
mod keys;
mod liveness;
mod metadata;
mod presence;
mod publish;
mod records;
mod rooms;
mod scripts;
mod subscriber;
mod topology;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::client::{Client, TlsSettings};
use self::connection::{Connection, SharedConnection};
use self::keys::{Keys, PubSub};
use self::scripts::Scripts;
use self::subscriber::Command;
use super::{
    Backend, BackendFuture, ChannelHistory, ChannelPosition, Delivery, HistoryRead, Inbox,
    MetadataKind, MetadataOf, MetadataWrite, PresenceRefresh, PresenceView, RecordRemover,
    RecordUpdater, StoredRecord, Topic,
};
use crate::access::Pattern;
use crate::error::{BackendError, MeshError};

/// Longest any single Redis operation may take before it counts as unavailable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// How many commands on different slots one operation has in flight at once.
const CROSS_SLOT_CONCURRENCY: usize = 64;
/// The longest pause between two attempts of a contended read-modify-write.
const MAX_CONFLICT_PAUSE: Duration = Duration::from_millis(8);

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
    commands: SharedConnection,
    client: Client,
    keys: Keys,
    heartbeat_interval: Duration,
    instance_ttl: Duration,
    scripts: Scripts,
    /// Which master serves which slots (on a Cluster), for reads of many keys; empty
    /// until first needed, and after a master answered with a redirection.
    masters: Mutex<Arc<Vec<topology::SlotOwner>>>,
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

fn unavailable(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> MeshError {
    MeshError::Unavailable(BackendError::caused_by("Redis is unreachable", err))
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
        MeshError::Corrupt(BackendError::caused_by("Redis answered unexpectedly", err))
    } else {
        MeshError::Unavailable(BackendError::caused_by("Redis request failed", err))
    }
}

/// Configures a [`RedisBackend`]: `RedisBackend::builder(url).prefix("app:").build()?`.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct RedisBackendBuilder {
    target: Target,
    prefix: String,
    heartbeat_interval: Duration,
    instance_ttl: Duration,
    tls: TlsSettings,
    plain_channels: Vec<Pattern>,
}

/// Where a backend connects.
#[derive(Debug, Clone)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisBackendBuilder {
    /// Prefix of every key and channel. Default `mesh:`. It may not hold `{` or `}`.
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

    /// Makes the channels `pattern` matches (an exact name or a [`Regex`](crate::Regex))
    /// plain Redis channels, which processes outside the mesh can publish to and read,
    /// as with mesh: the Redis channel is the channel's own name, the payload is the
    /// message text, and the history is the Redis list `P history:{CHANNEL}` (`P` the
    /// [`prefix`](Self::prefix), the braces literal: they keep the list in the
    /// channel's Cluster slot), newest first. Call it again to add patterns.
    ///
    /// ```text
    /// PUBLISH ext:orders '{"id":7}'              # reaches every subscriber of ext:orders
    /// LPUSH mesh:history:{ext:orders} '{"id":7}'  # and keeps it in the history (optional)
    /// ```
    ///
    /// On a [Cluster](RedisBackend::cluster) too, outside publishers use a plain
    /// `PUBLISH`.
    ///
    /// Names that start with the prefix are never plain, whatever matches them: the
    /// engine's own channels stay closed to outside text. Every instance of a mesh must
    /// have the same patterns. A message published from outside reaches clients only
    /// within [`max_channel_message_bytes`](crate::MeshBuilder::max_channel_message_bytes)
    /// (a longer one is dropped, logged and counted in
    /// [`MeshStats::dropped_channel_messages`](crate::MeshStats::dropped_channel_messages));
    /// history reads are bounded in bytes whoever wrote the list. Clients see a plain
    /// channel exactly as any other channel: expose it with
    /// [`expose_channel`](crate::MeshBuilder::expose_channel) as usual. The in-memory
    /// backend has no outside publishers, so it has no such setting: there every channel
    /// behaves as a plain one does here. The module docs of the Redis backend (in the
    /// README, "Plain channels") say how history sizes are counted when others append.
    ///
    /// [`build`](Self::build) fails with an empty prefix, under which plain channels
    /// could not be told apart from the engine's own.
    pub fn plain_channels(mut self, pattern: impl Into<Pattern>) -> Self {
        self.plain_channels.push(pattern.into());
        self
    }

    /// Trusts the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks) for a
    /// `rediss://` URL, instead of the system's root certificates: for a Redis whose
    /// certificate a private CA signed. The server's certificate must still name the URL's
    /// host.
    ///
    /// Needs the `redis-tls-rustls` feature: [`build`](Self::build) fails without it, with
    /// a `redis://` URL, or when `pem` holds no certificate.
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_certificates = Some(pem.into());
        self
    }

    /// Presents a client certificate over TLS, for a Redis that verifies its clients
    /// (`tls-auth-clients yes`, redis-server's default once TLS is on):
    /// `certificate_chain` is PEM, the client's certificate first; `private_key` is its
    /// PEM key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// Needs the `redis-tls-rustls` feature: [`build`](Self::build) fails without it, with
    /// a `redis://` URL, or when either does not parse.
    pub fn tls_client_certificate(
        mut self,
        certificate_chain: impl Into<Vec<u8>>,
        private_key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client_identity = Some((certificate_chain.into(), private_key.into()));
        self
    }

    /// Checks the URL and the TLS settings. Nothing connects until the mesh needs Redis.
    ///
    /// A `rediss://` URL connects over TLS (every connection: commands and pub/sub) and
    /// needs the `redis-tls-rustls` feature; without it, this fails.
    ///
    /// Fails too when [`plain_channels`](Self::plain_channels) were given with an empty
    /// prefix, or when the prefix holds `{` or `}` (hash-tag characters, which decide
    /// which keys share a Cluster slot).
    pub fn build(self) -> Result<RedisBackend, MeshError> {
        if self.prefix.contains(['{', '}']) {
            return Err(MeshError::Unavailable(BackendError::new(
                "the key prefix may not hold `{` or `}`: they decide which keys share a Redis Cluster slot",
            )));
        }
        if self.prefix.is_empty() && !self.plain_channels.is_empty() {
            return Err(MeshError::Unavailable(BackendError::new(
                "plain channels need a non-empty key prefix, to keep them apart from the mesh's own channels",
            )));
        }
        let (client, topics) = match self.target {
            Target::Single(url) => (client::open(&url, &self.tls)?, PubSub::Classic),
            Target::Cluster(seeds) => (client::open_cluster(seeds, &self.tls)?, PubSub::Sharded),
        };
        Ok(RedisBackend {
            shared: Arc::new(Shared {
                commands: SharedConnection::new(client.clone()),
                client,
                keys: Keys {
                    prefix: self.prefix,
                    plain_channels: self.plain_channels.into(),
                    sharded: topics == PubSub::Sharded,
                },
                heartbeat_interval: self.heartbeat_interval,
                instance_ttl: self.instance_ttl,
                scripts: Scripts::new(topics),
                masters: Mutex::new(Arc::new(Vec::new())),
                tasks: Mutex::new(HashMap::new()),
                subscribers: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl RedisBackend {
    /// A backend for the Redis at `url` (`redis://host:port/db`, or `rediss://` for TLS
    /// with the `redis-tls-rustls` feature) with the default settings.
    pub fn new(url: &str) -> Result<Self, MeshError> {
        Self::builder(url).build()
    }

    /// Starts configuring a backend for the Redis at `url`.
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        Self::builder_for(Target::Single(url.into()))
    }

    /// Starts configuring a backend for a Redis Cluster, found through `seeds` (the URLs
    /// of one or more of its nodes: `redis://host:port`, or all `rediss://` for TLS). The
    /// backend learns the rest of the Cluster from them, follows `MOVED` and `ASK`
    /// redirections, and finds the new primary after a failover. Topics travel on sharded
    /// pub/sub (Redis 7 or newer); the module docs explain the layout.
    pub fn cluster<I, S>(seeds: I) -> RedisBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder_for(Target::Cluster(seeds.into_iter().map(Into::into).collect()))
    }

    fn builder_for(target: Target) -> RedisBackendBuilder {
        RedisBackendBuilder {
            target,
            prefix: "mesh:".to_owned(),
            heartbeat_interval: Duration::from_secs(2),
            instance_ttl: Duration::from_secs(10),
            tls: TlsSettings::default(),
            plain_channels: Vec::new(),
        }
    }

    /// The key prefix in use.
    pub fn key_prefix(&self) -> &str {
        &self.shared.keys.prefix
    }

    async fn connection(&self) -> Result<Connection, MeshError> {
        self.shared.commands.get().await
    }

    /// Runs a script of `room`'s bucket that takes one connection in that room and
    /// answers whether it found what it changes (1 or 0).
    async fn connection_in_room(
        &self,
        script: &redis::Script,
        connection_id: &str,
        room: &str,
    ) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let found: i64 = script
            .key(self.shared.keys.room_base(room))
            .arg(connection_id)
            .arg(room)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(found == 1)
    }

    /// Runs one command.
    async fn query_one<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, MeshError> {
        let mut conn = self.connection().await?;
        command.query_async(&mut conn).await.map_err(redis_error)
    }

    /// Runs `commands`, which may be on different slots, and returns their replies in
    /// order: as one pipeline on a single Redis; on a Cluster (where a pipeline must stay
    /// on one slot) as one pipeline per slot, [`CROSS_SLOT_CONCURRENCY`] at a time.
    async fn query_each<T: redis::FromRedisValue + Send>(
        &self,
        commands: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, MeshError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.connection().await?;
        if !conn.is_cluster() {
            let mut pipe = redis::pipe();
            for command in commands {
                pipe.add_command(command);
            }
            return pipe.query_async(&mut conn).await.map_err(redis_error);
        }
        // By master: one pipeline each, sent to the master that serves every key in it
        // (a Cluster runs each command of a pipeline on its own; only a transaction must
        // stay in one slot). Commands the map does not place, or a master that answers
        // with a redirection, go again by slot, which follows redirections.
        let masters = self.masters(&mut conn).await;
        let count = commands.len();
        let mut by_master: HashMap<(String, u16), Vec<(usize, redis::Cmd)>> = HashMap::new();
        let mut unplaced = Vec::new();
        for (index, command) in commands.into_iter().enumerate() {
            match first_key(&command).and_then(|key| topology::owner_of(&masters, key)) {
                Some(owner) => by_master
                    .entry((owner.host.clone(), owner.port))
                    .or_default()
                    .push((index, command)),
                None => unplaced.push((index, command)),
            }
        }
        let mut runs = Vec::with_capacity(by_master.len());
        for group in by_master.into_values() {
            // Sent where the cluster connection's own map places the first key (never to
            // an address it may have dropped): a key served elsewhere answers with a
            // redirection, and the group goes again by slot.
            let slot = group
                .first()
                .and_then(|(_, command)| first_key(command))
                .map_or(0, topology::slot_of);
            let mut conn = conn.clone();
            runs.push(async move {
                let mut pipe = redis::pipe();
                for (_, command) in &group {
                    pipe.add_command(command.clone());
                }
                let Some(cluster) = conn.cluster() else {
                    return Err(group);
                };
                match cluster
                    .route_pipeline(
                        pipe,
                        0,
                        group.len(),
                        SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)),
                    )
                    .await
                {
                    Ok(values)
                        if values.len() == group.len()
                            && !values
                                .iter()
                                .any(|value| matches!(value, redis::Value::ServerError(_))) =>
                    {
                        Ok(group
                            .into_iter()
                            .map(|(index, _)| index)
                            .zip(values)
                            .collect::<Vec<_>>())
                    }
                    _ => Err(group),
                }
            });
        }
        let mut replies: Vec<Option<redis::Value>> = vec![None; count];
        for run in futures_util::future::join_all(runs).await {
            match run {
                Ok(answered) => {
                    for (index, value) in answered {
                        replies[index] = Some(value);
                    }
                }
                Err(group) => {
                    self.forget_masters();
                    unplaced.extend(group);
                }
            }
        }
        for (index, value) in self.query_by_slot(&conn, unplaced).await? {
            replies[index] = Some(value);
        }
        replies
            .into_iter()
            .map(|reply| {
                let reply = reply.ok_or_else(|| {
                    MeshError::Corrupt("Redis left a pipelined command unanswered".into())
                })?;
                T::from_redis_value(reply).map_err(|err| {
                    MeshError::Corrupt(BackendError::caused_by("Redis answered unexpectedly", err))
                })
            })
            .collect()
    }

    /// Runs `commands` (with their places in the caller's list) as one pipeline per
    /// slot, [`CROSS_SLOT_CONCURRENCY`] at a time.
    async fn query_by_slot(
        &self,
        conn: &Connection,
        commands: Vec<(usize, redis::Cmd)>,
    ) -> Result<Vec<(usize, redis::Value)>, MeshError> {
        let mut by_slot: HashMap<Vec<u8>, (Vec<usize>, redis::Pipeline)> = HashMap::new();
        for (index, command) in commands {
            let tag = first_key(&command)
                .map(keys::hash_tag)
                .unwrap_or_default()
                .to_vec();
            let (indexes, pipe) = by_slot
                .entry(tag)
                .or_insert_with(|| (Vec::new(), redis::pipe()));
            indexes.push(index);
            pipe.add_command(command);
        }
        let mut runs = Vec::with_capacity(by_slot.len());
        for (indexes, pipe) in by_slot.into_values() {
            let mut conn = conn.clone();
            runs.push(async move {
                let replies: Vec<redis::Value> =
                    pipe.query_async(&mut conn).await.map_err(redis_error)?;
                Ok::<_, MeshError>(indexes.into_iter().zip(replies))
            });
        }
        let mut answered = Vec::new();
        let mut slots = futures_util::stream::iter(runs).buffer_unordered(CROSS_SLOT_CONCURRENCY);
        while let Some(slot) = slots.next().await {
            answered.extend(slot?);
        }
        Ok(answered)
    }

    /// Which master serves which slots, as last read (read now when unknown; empty when
    /// it cannot be read, and then every read goes by slot).
    async fn masters(&self, conn: &mut Connection) -> Arc<Vec<topology::SlotOwner>> {
        if let Some(masters) = self
            .shared
            .masters
            .lock()
            .ok()
            .filter(|masters| !masters.is_empty())
            .map(|masters| Arc::clone(&masters))
        {
            return masters;
        }
        let read: Result<Vec<redis::Value>, _> =
            redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await;
        let masters = Arc::new(
            read.map(|reply| topology::from_cluster_slots(&reply))
                .unwrap_or_default(),
        );
        if let Ok(mut cached) = self.shared.masters.lock() {
            *cached = Arc::clone(&masters);
        }
        masters
    }

    /// Drops the map of masters: a master answered for slots it no longer serves.
    fn forget_masters(&self) {
        if let Ok(mut cached) = self.shared.masters.lock() {
            *cached = Arc::new(Vec::new());
        }
    }

    /// Runs script `invocations` (each on its own slot) concurrently and returns their
    /// replies in order.
    async fn invoke_each<T: redis::FromRedisValue + Send>(
        &self,
        invocations: Vec<redis::ScriptInvocation<'_>>,
    ) -> Result<Vec<T>, MeshError> {
        let conn = self.connection().await?;
        let mut runs: Vec<BoxFuture<'_, Result<T, MeshError>>> =
            Vec::with_capacity(invocations.len());
        for invocation in invocations {
            let mut conn = conn.clone();
            runs.push(Box::pin(async move {
                invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_error)
            }));
        }
        futures_util::stream::iter(runs)
            .buffered(CROSS_SLOT_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Runs one Redis operation under the operation timeout, recording its duration and
    /// failure under `name` (the `Backend` method's).
    async fn run<T, F>(&self, name: &'static str, operation: F) -> Result<T, MeshError>
    where
        F: std::future::Future<Output = Result<T, MeshError>>,
    {
        let started = crate::metrics::Stopwatch::start();
        let outcome = tokio::time::timeout(OPERATION_TIMEOUT, operation)
            .await
            .unwrap_or_else(|_| {
                self.shared.commands.operation_timed_out(OPERATION_TIMEOUT);
                Err(MeshError::Unavailable("Redis operation timed out".into()))
            });
        crate::metrics::backend_operation(name, started, outcome.is_ok());
        outcome
    }
}

impl Backend for RedisBackend {
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()> {
        Box::pin(self.attach_instance(instance_id, inbox))
    }

    fn detach<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, ()> {
        Box::pin(self.detach_instance(instance_id))
    }

    fn register_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        Box::pin(self.run(
            "register_connection",
            self.register(instance_id, connection_id),
        ))
    }

    fn unregister_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        Box::pin(self.run(
            "unregister_connection",
            self.unregister(instance_id, connection_id),
        ))
    }

    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, bool> {
        Box::pin(self.run("publish", self.publish_delivery(delivery)))
    }

    fn subscribe<'a>(&'a self, instance_id: &'a str, topic: &'a Topic) -> BackendFuture<'a, ()> {
        Box::pin(self.run("subscribe", self.subscribe_topic(instance_id, topic)))
    }

    fn unsubscribe(&self, instance_id: &str, topic: &Topic) {
        self.unsubscribe_topic(instance_id, topic);
    }

    fn join_room<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        presence_ttl: Option<Duration>,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run("join_room", self.join(connection_id, room, presence_ttl)))
    }

    fn leave_room<'a>(&'a self, connection_id: &'a str, room: &'a str) -> BackendFuture<'a, bool> {
        Box::pin(self.run("leave_room", self.leave(connection_id, room)))
    }

    fn room_members<'a>(&'a self, room: &'a str) -> BackendFuture<'a, Vec<String>> {
        Box::pin(self.run("room_members", self.members(room)))
    }

    fn room_members_with_metadata<'a>(
        &'a self,
        room: &'a str,
    ) -> BackendFuture<'a, Vec<(String, Value)>> {
        Box::pin(self.run(
            "room_members_with_metadata",
            self.members_with_metadata(room),
        ))
    }

    fn connection_rooms<'a>(&'a self, connection_id: &'a str) -> BackendFuture<'a, Vec<String>> {
        Box::pin(self.run("connection_rooms", self.rooms_of(connection_id)))
    }

    fn rooms(&self) -> BackendFuture<'_, Vec<String>> {
        Box::pin(self.run("rooms", self.list_rooms()))
    }

    fn share_a_room<'a>(&'a self, a: &'a str, b: &'a str) -> BackendFuture<'a, bool> {
        Box::pin(self.run("share_a_room", self.in_a_common_room(a, b)))
    }

    fn metadata<'a>(&'a self, of: MetadataOf<'a>) -> BackendFuture<'a, Option<Value>> {
        Box::pin(self.run("metadata", self.read_metadata(of)))
    }

    fn set_metadata<'a>(
        &'a self,
        of: MetadataOf<'a>,
        write: &'a MetadataWrite,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run("set_metadata", self.write_metadata(of, write)))
    }

    fn delete_room_metadata<'a>(&'a self, room: &'a str) -> BackendFuture<'a, ()> {
        Box::pin(self.run("delete_room_metadata", self.remove_room_metadata(room)))
    }

    fn all_metadata(&self, kind: MetadataKind) -> BackendFuture<'_, Vec<(String, Value)>> {
        Box::pin(self.run("all_metadata", self.list_metadata(kind)))
    }

    fn refresh_presence<'a>(&'a self, refreshes: &'a [PresenceRefresh]) -> BackendFuture<'a, ()> {
        Box::pin(self.run("refresh_presence", self.extend_presence(refreshes)))
    }

    fn presence<'a>(&'a self, room: &'a str) -> BackendFuture<'a, PresenceView> {
        Box::pin(self.run("presence", self.presence_view(room)))
    }

    fn set_presence_state<'a>(
        &'a self,
        connection_id: &'a str,
        room: &'a str,
        state: Option<&'a Value>,
        expire_after: Option<Duration>,
        silent: bool,
    ) -> BackendFuture<'a, bool> {
        Box::pin(self.run("set_presence_state", async move {
            match state {
                Some(state) => {
                    self.write_presence_state(connection_id, room, state, expire_after, silent)
                        .await
                }
                None => self.remove_presence_state(connection_id, room).await,
            }
        }))
    }

    fn sweep(&self) -> BackendFuture<'_, Duration> {
        Box::pin(self.run("sweep", self.sweep_expired()))
    }

    fn instance_registered<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, bool> {
        Box::pin(self.run("instance_registered", async move {
            let deadline: Option<f64> = self
                .query_one(
                    redis::cmd("ZSCORE")
                        .arg(self.shared.keys.instances())
                        .arg(instance_id),
                )
                .await?;
            Ok(deadline.is_some())
        }))
    }

    fn write_channel<'a>(
        &'a self,
        channel: &'a str,
        message: &'a str,
        history: usize,
        history_bytes: usize,
    ) -> BackendFuture<'a, Option<ChannelPosition>> {
        Box::pin(self.run(
            "write_channel",
            self.append_to_channel(channel, message, history, history_bytes),
        ))
    }

    fn channel_history<'a>(
        &'a self,
        channel: &'a str,
        read: HistoryRead<'a>,
    ) -> BackendFuture<'a, ChannelHistory> {
        Box::pin(self.run("channel_history", self.read_channel_history(channel, read)))
    }

    fn records<'a>(&'a self, ids: &'a [String]) -> BackendFuture<'a, Vec<Option<StoredRecord>>> {
        Box::pin(self.run("records", self.read_records(ids)))
    }

    fn record_ids<'a>(&'a self, prefix: &'a str) -> BackendFuture<'a, Vec<String>> {
        Box::pin(self.run("record_ids", self.list_record_ids(prefix)))
    }

    fn update_record<'a>(
        &'a self,
        id: &'a str,
        update: &'a RecordUpdater,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        Box::pin(self.run("update_record", self.write_record(id, update)))
    }

    fn delete_record<'a>(
        &'a self,
        id: &'a str,
        announce: &'a RecordRemover,
    ) -> BackendFuture<'a, Option<StoredRecord>> {
        Box::pin(self.run("delete_record", self.remove_record(id, announce)))
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

/// A command's key: its first argument after its name.
fn first_key(command: &redis::Cmd) -> Option<&[u8]> {
    match command.args_iter().nth(1) {
        Some(redis::Arg::Simple(key)) => Some(key),
        _ => None,
    }
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
    serde_json::from_str(raw).map_err(|err| {
        MeshError::Corrupt(BackendError::caused_by("stored JSON does not parse", err))
    })
}

fn parse_json_or_null(raw: Option<&str>) -> Result<Value, MeshError> {
    raw.map_or(Ok(Value::Null), parse_json)
}
