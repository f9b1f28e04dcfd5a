//! `MeshBuilder`: commands, layers, hooks and settings, turned into a `(MeshLayer, Mesh)` pair.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{watch, OnceCell};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::access::{self, Access, Guard, Pattern, Rules};
use crate::backend::{Backend, MemoryBackend};
use crate::channels::Channels;
use crate::collections::{Collection, CollectionExposure, Collections};
use crate::command::{CommandRequest, CommandService, Handler, RegisteredCommand, Route};
use crate::config::MeshConfig;
use crate::connection::{Connection, Registry};
use crate::error::{BoxError, CommandError};
use crate::layer::MeshLayer;
use crate::mesh::{Mesh, MeshInner, OnConnect, OnDisconnect};
use crate::presence::Presence;
use crate::presence::PresenceOptions;
use crate::records::{RecordEvent, Records};
use crate::rooms::Rooms;

type BoxLayer = Arc<dyn Fn(CommandService) -> CommandService + Send + Sync>;

/// Configures a mesh. Start with [`Mesh::builder`], finish with [`MeshBuilder::build`].
///
/// Middleware order: global layers ([`layer`](Self::layer)) run first, in the order they
/// were added, then the command's own layers ([`command_layer`](Self::command_layer)), then
/// the handler. Global layers wrap the built-in `mesh/*` commands too; unknown commands
/// are answered `ENOTFOUND` before any layer runs.
#[must_use = "a builder does nothing until build() is called"]
pub struct MeshBuilder {
    config: MeshConfig,
    commands: HashMap<String, Route>,
    command_layers: HashMap<String, Vec<BoxLayer>>,
    global_layers: Vec<BoxLayer>,
    on_connect: Option<OnConnect>,
    on_disconnect: Option<OnDisconnect>,
    state: http::Extensions,
    backend: Option<Arc<dyn Backend>>,
    presence: Vec<(Pattern, PresenceOptions)>,
    room_guards: Rules<Guard>,
    channels: Rules<Access>,
    records: Records,
    collections: Vec<(Pattern, Collection)>,
}

impl Default for MeshBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MeshBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshBuilder")
            .field("config", &self.config)
            .field("commands", &self.commands.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn box_layer<L>(layer: L) -> BoxLayer
where
    L: Layer<CommandService> + Send + Sync + 'static,
    L::Service: Service<CommandRequest, Response = Value> + Clone + Send + Sync + 'static,
    <L::Service as Service<CommandRequest>>::Error: Into<BoxError>,
    <L::Service as Service<CommandRequest>>::Future: Send + 'static,
{
    Arc::new(move |inner| BoxCloneSyncService::new(layer.layer(inner).map_err(Into::into)))
}

impl MeshBuilder {
    /// A builder with the defaults: in-memory backend, path `/`, mesh's timing defaults.
    pub fn new() -> Self {
        MeshBuilder {
            config: MeshConfig::default(),
            commands: HashMap::new(),
            command_layers: HashMap::new(),
            global_layers: Vec::new(),
            on_connect: None,
            on_disconnect: None,
            state: http::Extensions::new(),
            backend: None,
            presence: Vec::new(),
            room_guards: Rules::default(),
            channels: Rules::default(),
            records: Records::default(),
            collections: Vec::new(),
        }
    }

    /// Registers an async function as the handler of `name`. Its arguments, up to 16,
    /// are extractors ([`Connection`], [`Mesh`], [`Extension`](crate::extract::Extension),
    /// [`State`](crate::extract::State), and last, if at all,
    /// [`Payload`](crate::extract::Payload): see [`Handler`](crate::command::Handler) for
    /// the rule); it returns a [`serde_json::Value`], `()`, or a `Result` of something
    /// serialisable.
    pub fn command<H, T>(mut self, name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<T>,
        T: 'static,
    {
        self.commands.insert(name.into(), Route::handler(handler));
        self
    }

    /// Registers any tower service as the handler of `name`. A later registration of the
    /// same name replaces the earlier one, built-in `mesh/*` commands included.
    pub fn command_service<S>(mut self, name: impl Into<String>, service: S) -> Self
    where
        S: Service<CommandRequest, Response = Value> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.commands.insert(name.into(), Route::service(service));
        self
    }

    /// Adds a global middleware layer: it wraps every command, built-ins included.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<CommandService> + Send + Sync + 'static,
        L::Service: Service<CommandRequest, Response = Value> + Clone + Send + Sync + 'static,
        <L::Service as Service<CommandRequest>>::Error: Into<BoxError>,
        <L::Service as Service<CommandRequest>>::Future: Send + 'static,
    {
        self.global_layers.push(box_layer(layer));
        self
    }

    /// Adds a layer around one command (registered or built-in), inside the global layers.
    pub fn command_layer<L>(mut self, name: impl Into<String>, layer: L) -> Self
    where
        L: Layer<CommandService> + Send + Sync + 'static,
        L::Service: Service<CommandRequest, Response = Value> + Clone + Send + Sync + 'static,
        <L::Service as Service<CommandRequest>>::Error: Into<BoxError>,
        <L::Service as Service<CommandRequest>>::Future: Send + 'static,
    {
        self.command_layers
            .entry(name.into())
            .or_default()
            .push(box_layer(layer));
        self
    }

    /// Shared state for the [`State`](crate::extract::State) extractor, one value per type.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, state: T) -> Self {
        self.state.insert(state);
        self
    }

    /// Runs when a connection is registered, before any of its frames is written or read:
    /// it sees the upgrade request through the [`Connection`] and may set its metadata
    /// ([`Connection::set_metadata`]) or send it pushes (they follow `mesh/assign-id`).
    /// An `Err` refuses the connection: it is closed with code 1008 and the error's
    /// message as reason before it ever gets an id, and `on_disconnect` does not run.
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Connection) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), CommandError>> + Send + 'static,
    {
        self.on_connect = Some(Arc::new(move |connection| Box::pin(hook(connection))));
        self
    }

    /// Runs once for every accepted connection when it ends, whatever ended it (the
    /// client, the network, a missed pong, a slow-consumer close, shutdown). The
    /// connection is still registered while it runs, so its metadata can be read.
    pub fn on_disconnect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Connection) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_disconnect = Some(Arc::new(move |connection| Box::pin(hook(connection))));
        self
    }

    /// Uses this in-memory backend; clones of one `MemoryBackend` given to several
    /// builders make their meshes one. Default: a private in-memory backend.
    pub fn memory_backend(mut self, backend: MemoryBackend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// Uses Redis as the backend: instances built on one Redis (and one key prefix) form
    /// one mesh. See [`RedisBackend`](crate::RedisBackend) for its settings and key layout.
    #[cfg(feature = "redis")]
    pub fn redis_backend(mut self, backend: crate::RedisBackend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// Uses a backend of your own: any [`Backend`](crate::backend::Backend) that passes
    /// [`backend::conformance`](crate::backend::conformance). Unstable: see the
    /// `unstable-backend` feature.
    #[cfg(feature = "unstable-backend")]
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// Uses the Redis at `url` with default settings (key prefix `mesh:`). Fails only on
    /// a malformed URL; nothing connects until the mesh needs Redis.
    #[cfg(feature = "redis")]
    pub fn redis(self, url: &str) -> Result<Self, crate::MeshError> {
        Ok(self.redis_backend(crate::RedisBackend::new(url)?))
    }

    /// The path the WebSocket endpoint answers on. Default `/`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.config.path = path.into();
        self
    }

    /// Interval between pings. Default 30 s. Each connection is pinged once per interval;
    /// the pings go out in ten slices of it, a tenth of the connections at a time.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.config.ping_interval = interval;
        self
    }

    /// Consecutive unanswered pings tolerated; one more closes the connection. Default 1.
    pub fn max_missed_pongs(mut self, missed: u32) -> Self {
        self.config.max_missed_pongs = missed;
        self
    }

    /// Interval between latency probes. Default 5 s. Like pings, they go out in ten slices
    /// of the interval.
    pub fn latency_interval(mut self, interval: Duration) -> Self {
        self.config.latency_interval = interval;
        self
    }

    /// Largest inbound frame in bytes; a larger one closes the connection with code 1009.
    /// Default 1 MiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.max_frame_bytes = bytes;
        self
    }

    /// Outbound queue budget per connection in bytes, for pushes and for replies apart. A
    /// connection that lets more pushes pile up is closed with code 1008 (slow consumer);
    /// while more replies are queued, its frames are not read (replies are back-pressure,
    /// never a reason to close). Default 1 MiB.
    pub fn max_outbound_bytes(mut self, bytes: usize) -> Self {
        self.config.max_outbound_bytes = bytes;
        self
    }

    /// Commands of one connection that may run at once; beyond it the connection is not
    /// read until one finishes. Default 64.
    pub fn max_in_flight(mut self, commands: usize) -> Self {
        self.config.max_in_flight = commands.max(1);
        self
    }

    /// Socket read buffer per connection in bytes: a read takes at most this much from the
    /// socket. Default 2 KiB.
    ///
    /// A connection holds it only while its data is arriving: it is freed each time the
    /// socket has nothing more to read, so an idle connection holds none. Frames are
    /// assembled in a smaller buffer (512 bytes, or this size if smaller) that each
    /// connection keeps for its whole life; a larger frame grows that one to the frame's
    /// size (at most `max_frame_size`).
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.config.read_buffer_bytes = bytes;
        self
    }

    /// Bytes gathered before a socket write, per connection. Default 16 KiB.
    pub fn write_buffer_size(mut self, bytes: usize) -> Self {
        self.config.write_buffer_bytes = bytes;
        self
    }

    /// Longest [`Mesh::shutdown`] waits for connections to finish. Default 10 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Tracks presence in the rooms `pattern` matches (an exact name, or a
    /// [`Regex`](crate::Regex)): members are present while they answer pings, and
    /// subscribers get `mesh/presence-update` pushes. Tracking the same pattern again
    /// replaces its options. See [`PresenceOptions`] for the TTL and the guard.
    pub fn track_presence(mut self, pattern: impl Into<Pattern>, options: PresenceOptions) -> Self {
        self.presence.push((pattern.into(), options));
        self
    }

    /// Decides who may join the rooms `pattern` matches with `mesh/join-room`; a refusal
    /// answers `{success: false, present: []}`. Joining is open where no guard matches.
    /// Server-side [`Room::add`](crate::Room::add) is not guarded. Global layers can refuse joins
    /// too: a layer sees the `mesh/join-room` command and its payload.
    pub fn room_guard<F, Fut>(mut self, pattern: impl Into<Pattern>, guard: F) -> Self
    where
        F: Fn(Connection, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        self.room_guards
            .insert(pattern.into(), access::guard(guard));
        self
    }

    /// Lets clients subscribe to the channels `pattern` matches (an exact name or a
    /// [`Regex`](crate::Regex)), as `access` allows; the server writes them with
    /// [`Mesh::write_channel`]. Exposing the same pattern again replaces its access.
    pub fn expose_channel(mut self, pattern: impl Into<Pattern>, access: Access) -> Self {
        self.channels.insert(pattern.into(), access);
        self
    }

    /// Channel names clients may never use, even where an exposed pattern matches them.
    /// Default `Some("mesh:")` (docs/protocol.md §6); `None` opens every name to exposure.
    pub fn reserved_channel_prefix(mut self, prefix: Option<&str>) -> Self {
        self.config.reserved_channel_prefix = prefix.map(str::to_owned);
        self
    }

    /// Lets clients read (subscribe to) the records `pattern` matches, as `access`
    /// allows. Where a read pattern matches, it alone decides who may read.
    pub fn expose_record(mut self, pattern: impl Into<Pattern>, access: Access) -> Self {
        self.records.readable.insert(pattern.into(), access);
        self
    }

    /// Lets clients write (`mesh/publish-record-update`) the records `pattern` matches, as
    /// `access` allows; where no read pattern matches, the same access lets them read.
    pub fn expose_writable_record(mut self, pattern: impl Into<Pattern>, access: Access) -> Self {
        self.records.writable.insert(pattern.into(), access);
        self
    }

    /// Lets clients subscribe to the collections `pattern` matches; see [`Collection`].
    /// Exposing the same pattern again replaces it.
    pub fn expose_collection(
        mut self,
        pattern: impl Into<Pattern>,
        collection: Collection,
    ) -> Self {
        let pattern = pattern.into();
        let key = pattern.key();
        self.collections
            .retain(|(existing, _)| existing.key() != key);
        self.collections.push((pattern, collection));
        self
    }

    /// Runs after every effective record write made through this instance (by
    /// [`Mesh::write_record`] or a client's `mesh/publish-record-update`), without being
    /// awaited by the write. Hooks hear changes one at a time, in the order this instance
    /// made them, each change's hooks in the order added (so a slow hook delays the
    /// others); one that panics stops none of the others.
    pub fn on_record_update<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(RecordEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.records
            .hooks
            .on_update
            .push(Arc::new(move |event| Box::pin(hook(event))));
        self
    }

    /// Runs after every record deletion made through this instance, with the value and
    /// version the record had; like [`on_record_update`](Self::on_record_update).
    pub fn on_record_removed<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(RecordEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.records
            .hooks
            .on_removed
            .push(Arc::new(move |event| Box::pin(hook(event))));
        self
    }

    /// Rooms one connection may be in through `mesh/join-room`; one more is an
    /// `EOVERLOADED` error. Default 1024.
    pub fn max_rooms_per_connection(mut self, rooms: usize) -> Self {
        self.config.max_rooms_per_connection = rooms;
        self
    }

    /// Subscriptions (presence now; channels, records and collections later) one
    /// connection may hold; one more is an `EOVERLOADED` error. Default 1024.
    pub fn max_subscriptions_per_connection(mut self, subscriptions: usize) -> Self {
        self.config.max_subscriptions_per_connection = subscriptions;
        self
    }

    /// Records one collection subscription may hold; a resolver's further ids are left
    /// out (and logged). Default 10 000.
    pub fn max_collection_members(mut self, records: usize) -> Self {
        self.config.max_collection_members = records;
        self
    }

    /// Largest stored record, in bytes of JSON text, after any merge or patch: a write that
    /// would make it larger is refused (`EINVALID` naming `max_record_bytes`; nothing is
    /// stored or sent). Default 1 MiB; never above [`max_frame_size`](Self::max_frame_size).
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.config.bytes.record = bytes;
        self
    }

    /// Largest channel message, in bytes: [`Mesh::write_channel`] refuses a larger one
    /// (nothing is kept or sent). Default 64 KiB.
    pub fn max_channel_message_bytes(mut self, bytes: usize) -> Self {
        self.config.bytes.channel_message = bytes;
        self
    }

    /// Bytes of history one channel keeps, besides the count `write_channel` asks for:
    /// the oldest messages go first. Default 8 MiB.
    pub fn max_history_bytes(mut self, bytes: usize) -> Self {
        self.config.bytes.history = bytes;
        self
    }

    /// Largest presence state, in bytes of JSON text: a larger one is refused
    /// (`EINVALID` naming `max_presence_state_bytes`). Default 16 KiB.
    pub fn max_presence_state_bytes(mut self, bytes: usize) -> Self {
        self.config.bytes.presence_state = bytes;
        self
    }

    /// Largest connection or room metadata, in bytes of JSON text, after any merge: a
    /// write that would make it larger is refused (`EINVALID` naming
    /// `max_metadata_bytes`; nothing is stored). Default 16 KiB.
    pub fn max_metadata_bytes(mut self, bytes: usize) -> Self {
        self.config.bytes.metadata = bytes;
        self
    }

    /// Lets any connection read any other's metadata, as mesh does: with
    /// `mesh/get-connection-metadata` and in the `present` lists of `mesh/join-room` and
    /// `mesh/subscribe-presence`. Default `false`: a connection reads its own and that of
    /// connections sharing a room with it, and a room's member list shows metadata only
    /// to members of that room (docs/protocol.md §6).
    pub fn open_connection_metadata(mut self, open: bool) -> Self {
        self.config.open_connection_metadata = open;
        self
    }

    // Connection limits (issue 12).

    /// Bytes of upgrade-request headers a connection keeps for its whole life, for
    /// [`Connection::headers`] and [`Connection::request_parts`]; each header counts its
    /// name's and its value's length. Default 16 KiB.
    ///
    /// Headers are kept in the order of the request; one that would take the total over
    /// the budget is left out, and the ones after it are still kept if they fit. So a
    /// huge header costs nothing for the connection's life, and the small headers sent
    /// with it (a user, a token, a trace id) are all there. Layers outside the mesh layer
    /// (auth, for example) always see every header; the URI and the request's extensions
    /// (the app's own values, such as the user an auth layer stored) are kept whole.
    /// The handshake is never refused for its headers' size: hyper's own limit on the
    /// request head (about 400 KB by default) applies before this.
    pub fn max_kept_header_bytes(mut self, bytes: usize) -> Self {
        self.config.max_kept_header_bytes = bytes;
        self
    }

    /// WebSocket connections this instance holds at once. An upgrade beyond it is
    /// answered `503 Service Unavailable` with `Retry-After: 5` (seconds) before any
    /// WebSocket exists, and counted in [`MeshStats::refused_connections`](crate::MeshStats::refused_connections).
    /// Default 100 000; `usize::MAX` lifts it.
    ///
    /// A place is taken when an upgrade is accepted (before its `101`) and given back once
    /// the connection's task has ended (after its `on_disconnect` hook and its cleanup),
    /// so the count never exceeds the limit however many clients upgrade at once. Set it
    /// below the process's file-descriptor limit (each connection holds one socket), so
    /// that clients over capacity get a `503` they can retry elsewhere rather than a
    /// connection the server cannot accept.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.config.max_connections = connections;
        self
    }

    /// Builds the mesh: the layer to mount and the handle for the server-side API.
    ///
    /// Nothing is started until the first connection arrives or the handle is first used,
    /// so this may run outside a Tokio runtime.
    ///
    /// # Panics
    ///
    /// When a presence TTL is shorter than the ping interval: pongs extend presence, so
    /// such a TTL would lapse between two of them.
    pub fn build(self) -> (MeshLayer, Mesh) {
        let MeshBuilder {
            mut config,
            commands: user_commands,
            mut command_layers,
            global_layers,
            on_connect,
            on_disconnect,
            state,
            backend,
            presence: tracked,
            room_guards,
            channels,
            records,
            collections: exposed_collections,
        } = self;
        // A record is sent whole in a reply or push: it must fit in a frame.
        config.bytes.record = config.bytes.record.min(config.max_frame_bytes);
        let mut collections = Collections::default();
        for (pattern, collection) in exposed_collections {
            let exposure = Arc::new(CollectionExposure::new(&pattern, collection));
            collections.exposures.push(exposure.clone());
            collections.by_pattern.insert(pattern, exposure);
        }
        let mut presence = Rules::default();
        for (pattern, options) in tracked {
            presence.insert(
                pattern,
                options.into_rule(config.ping_interval, config.max_missed_pongs),
            );
        }
        let mut commands: HashMap<String, Route> = crate::builtin::commands();
        commands.extend(user_commands);
        let commands = commands
            .into_iter()
            .map(|(name, route)| {
                let own_layers = command_layers.remove(&name).unwrap_or_default();
                let name = Arc::<str>::from(name);
                if own_layers.is_empty() && global_layers.is_empty() {
                    let command = RegisteredCommand::new(Arc::clone(&name), route);
                    return (name, Arc::new(command));
                }
                let mut service = route.into_service();
                // First-added layers end up outermost, so they run first.
                for layer in own_layers.iter().rev() {
                    service = layer(service);
                }
                for layer in global_layers.iter().rev() {
                    service = layer(service);
                }
                let command = RegisteredCommand::new(Arc::clone(&name), Route::Service(service));
                (name, Arc::new(command))
            })
            .collect();
        for name in command_layers.keys() {
            tracing::warn!(command = %name, "a command layer was added for a command that does not exist");
        }
        let instance_id: Arc<str> = Arc::from(uuid::Uuid::new_v4().simple().to_string());
        let mesh = Mesh::new_cyclic(|this| MeshInner {
            this,
            instance_id,
            config,
            commands,
            backend: backend.unwrap_or_else(|| Arc::new(MemoryBackend::new())),
            registry: Arc::new(Registry::default()),
            on_connect,
            on_disconnect,
            state,
            attached: OnceCell::new(),
            heartbeat_started: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            live_connections: watch::channel(0).0,
            next_connection: AtomicU64::new(1),
            stats: Default::default(),
            metrics: Default::default(),
            topics: Default::default(),
            rooms: Rooms {
                guards: room_guards,
            },
            presence: Presence {
                rules: presence,
                sweeps: Default::default(),
            },
            calls: Default::default(),
            unregister_later: Default::default(),
            channels: Channels { access: channels },
            records,
            collections,
            connection_slots: Default::default(),
        });
        (MeshLayer::new(mesh.clone()), mesh)
    }
}
