//! `Mesh`: the cheap-to-clone handle with the server-side API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{watch, OnceCell};

use crate::backend::{
    Backend, Delivery, Inbox, MetadataKind, MetadataOf, MetadataWrite, Push, Topic,
};
use crate::builder::MeshBuilder;
use crate::calls::Calls;
use crate::channels::Channels;
use crate::collections::Collections;
use crate::command::RegisteredCommand;
use crate::config::MeshConfig;
use crate::connection::{CloseReason, Connection, Registry};
use crate::error::{CommandError, MeshError};
use crate::layer::MeshLayer;
use crate::merge::MergeStrategy;
use crate::presence::Presence;
use crate::protocol::{self, Frame};
use crate::records::Records;
use crate::rooms::Rooms;
use crate::topics::{Form, Listen, LocalTopics};

pub(crate) type OnConnect =
    Arc<dyn Fn(Connection) -> BoxFuture<'static, Result<(), CommandError>> + Send + Sync>;
pub(crate) type OnDisconnect = Arc<dyn Fn(Connection) -> BoxFuture<'static, ()> + Send + Sync>;

/// The handle to a running mesh: every server-side operation (pushes, broadcasts,
/// metadata, shutdown). Cheap to clone; all clones share one engine.
///
/// Build one with [`Mesh::builder`]; the builder also returns the [`MeshLayer`] to mount.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<MeshInner>,
}

pub(crate) struct MeshInner {
    /// This instance itself, for the inbox to run calls with.
    pub(crate) this: Weak<MeshInner>,
    pub(crate) instance_id: Arc<str>,
    pub(crate) config: MeshConfig,
    // Looked up once per frame by a client-chosen name: a fast hash (still seeded per
    // process) instead of SipHash, which cost a tenth of a command's parsing.
    pub(crate) commands: HashMap<Arc<str>, Arc<RegisteredCommand>, foldhash::fast::RandomState>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) on_connect: Option<OnConnect>,
    pub(crate) on_disconnect: Option<OnDisconnect>,
    pub(crate) state: http::Extensions,
    pub(crate) attached: OnceCell<()>,
    pub(crate) heartbeat_started: AtomicBool,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) live_connections: watch::Sender<usize>,
    pub(crate) next_connection: AtomicU64,
    pub(crate) stats: Counters,
    /// The handles of the metrics every frame records.
    pub(crate) metrics: crate::metrics::MeshMetrics,
    /// What local connections listen to.
    pub(crate) topics: LocalTopics,
    /// Who may join which rooms.
    pub(crate) rooms: Rooms,
    /// Rooms with presence, and the sweeps of what lapsed.
    pub(crate) presence: Presence,
    /// Calls to other instances awaiting their answer.
    pub(crate) calls: Calls,
    /// Connections that ended but whose unregistration failed, for the sweeper to retry.
    pub(crate) unregister_later: Mutex<Vec<Arc<str>>>,
    /// Who may subscribe to which channels.
    pub(crate) channels: Channels,
    /// Who may read and write which records, and the record hooks.
    pub(crate) records: Records,
    /// Collection exposures by pattern, and all of them (to find those a write concerns).
    pub(crate) collections: Collections,

    // Connection limits (issue 12).
    /// Places taken of the `max_connections` this instance may hold: one per upgrade
    /// answered and not yet ended.
    pub(crate) connection_slots: AtomicUsize,
}

#[derive(Default)]
pub(crate) struct Counters {
    opened: AtomicU64,
    closed: AtomicU64,
    oversize_closes: AtomicU64,
    ping_timeout_closes: AtomicU64,
    refused: AtomicU64,
    pub(crate) dropped_channel_messages: AtomicU64,
}

/// Counters of one instance, for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeshStats {
    /// Connections currently open on this instance.
    pub connections: usize,
    /// Connections accepted since start.
    pub connections_opened: u64,
    /// Connections ended since start, whatever ended them.
    pub connections_closed: u64,
    /// Connections closed because they did not drain their outbound queue.
    pub slow_consumer_closes: u64,
    /// Connections closed for sending a frame over the size limit.
    pub oversize_closes: u64,
    /// Connections closed for missing pongs.
    pub ping_timeout_closes: u64,
    /// Upgrades answered `503` because the instance held
    /// [`max_connections`](crate::MeshBuilder::max_connections) already.
    pub refused_connections: u64,
    /// Channel messages that arrived from outside the mesh (on a Redis backend's plain
    /// channel) over [`max_channel_message_bytes`](crate::MeshBuilder::max_channel_message_bytes),
    /// and so reached no client.
    pub dropped_channel_messages: u64,
}

/// What [`Mesh::health`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Whether the backend answered (always, in memory).
    pub backend_reachable: bool,
    /// Whether the backend knows this instance as a live one. `false` after Redis
    /// restarted empty or swept the instance during a stall: the instance closes its
    /// connections (1012) and registers again within a heartbeat interval.
    pub registered: bool,
    /// What is wrong, for a log line or a health endpoint's body; `None` when healthy.
    pub problem: Option<String>,
}

impl Health {
    /// Whether the instance can serve: the backend answers and knows it.
    pub fn is_healthy(&self) -> bool {
        self.backend_reachable && self.registered
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("instance_id", &self.inner.instance_id)
            .finish_non_exhaustive()
    }
}

/// Decrements the live-connection count when a connection's task ends, however it ends,
/// and gives back the place its upgrade took (see [`ConnectionSlot::hand_over`]).
pub(crate) struct LiveConnection {
    mesh: Mesh,
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        // Before the close is counted: whoever sees the count may connect again at once.
        self.mesh.release_connection_slot();
        self.mesh.inner.stats.closed.fetch_add(1, Ordering::Relaxed);
        self.mesh
            .inner
            .live_connections
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// One of the places of [`MeshBuilder::max_connections`], taken by an upgrade. Dropped, it
/// gives the place back (the upgrade failed); handed over, the connection holds it.
pub(crate) struct ConnectionSlot {
    mesh: Mesh,
    handed_over: bool,
}

impl ConnectionSlot {
    /// The upgrade became a connection: the place is now the connection's, given back by
    /// its [`LiveConnection`] when it ends. Call it just before serving the connection,
    /// which takes its `LiveConnection` before its first await.
    pub(crate) fn hand_over(mut self) {
        self.handed_over = true;
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if !self.handed_over {
            self.mesh.release_connection_slot();
        }
    }
}

impl Mesh {
    /// Starts configuring a mesh.
    pub fn builder() -> MeshBuilder {
        MeshBuilder::new()
    }

    pub(crate) fn new_cyclic(inner: impl FnOnce(Weak<MeshInner>) -> MeshInner) -> Self {
        Mesh {
            inner: Arc::new_cyclic(|this| inner(this.clone())),
        }
    }

    /// This instance's id, unique across the mesh.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// A layer serving this mesh, to mount on another router or service.
    pub fn layer(&self) -> MeshLayer {
        MeshLayer::new(self.clone())
    }

    pub(crate) fn config(&self) -> &MeshConfig {
        &self.inner.config
    }

    pub(crate) fn command(&self, name: &str) -> Option<&Arc<RegisteredCommand>> {
        self.inner.commands.get(name)
    }

    /// A value registered with [`MeshBuilder::state`].
    pub fn state<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.inner.state.get::<T>().cloned()
    }

    /// The connections this instance holds.
    pub fn connections(&self) -> Vec<Connection> {
        self.inner.registry.all()
    }

    /// One connection held by this instance.
    pub fn connection(&self, id: &str) -> Option<Connection> {
        self.inner.registry.get(id)
    }

    /// A cheap health check, for a health endpoint: is the backend reachable, and does it
    /// know this instance? One round trip on Redis (bounded by its operation timeout);
    /// immediate in memory.
    ///
    /// ```no_run
    /// # async fn handler(mesh: tower_mesh::Mesh) -> (u16, String) {
    /// let health = mesh.health().await;
    /// match health.problem {
    ///     None => (200, "ok".to_owned()),
    ///     Some(problem) => (503, problem),
    /// }
    /// # }
    /// ```
    ///
    /// An instance joins its backend on first use; a health check is a use, so a fresh
    /// instance behind a load balancer joins before its first client arrives.
    pub async fn health(&self) -> Health {
        let registered = match self.ready().await {
            Ok(()) => {
                self.inner
                    .backend
                    .instance_registered(&self.inner.instance_id)
                    .await
            }
            Err(err) => Err(err),
        };
        match registered {
            Ok(true) => Health {
                backend_reachable: true,
                registered: true,
                problem: None,
            },
            Ok(false) => Health {
                backend_reachable: true,
                registered: false,
                problem: Some(
                    "the backend lost this instance's registration; it is registering again"
                        .to_owned(),
                ),
            },
            Err(err) => Health {
                backend_reachable: false,
                registered: false,
                problem: Some(format!("the backend is unreachable: {err}")),
            },
        }
    }

    /// Counters of this instance.
    pub fn stats(&self) -> MeshStats {
        let stats = &self.inner.stats;
        MeshStats {
            connections: self.inner.registry.len(),
            connections_opened: stats.opened.load(Ordering::Relaxed),
            connections_closed: stats.closed.load(Ordering::Relaxed),
            slow_consumer_closes: self.inner.registry.slow_consumer_closes(),
            oversize_closes: stats.oversize_closes.load(Ordering::Relaxed),
            ping_timeout_closes: stats.ping_timeout_closes.load(Ordering::Relaxed),
            refused_connections: stats.refused.load(Ordering::Relaxed),
            dropped_channel_messages: stats.dropped_channel_messages.load(Ordering::Relaxed),
        }
    }

    /// Sends a push `{command, payload}` to one connection, on whichever instance holds it.
    /// A connection that does not exist is not an error: the push goes nowhere.
    pub async fn send<P: Serialize + ?Sized>(
        &self,
        connection_id: &str,
        command: &str,
        payload: &P,
    ) -> Result<(), MeshError> {
        let push = push_of(command, payload)?;
        if let Some(connection) = self.inner.registry.get(connection_id) {
            let _ = self.inner.registry.send_frame(&connection, render(&push));
            return Ok(());
        }
        self.ready().await?;
        self.inner
            .backend
            .publish(Delivery::ToConnection {
                connection_id: Arc::from(connection_id),
                push,
            })
            .await
            .map(drop)
    }

    /// Sends a push `{command, payload}` to every connection on every instance. The frame
    /// is serialised once and shared by every recipient.
    pub async fn broadcast<P: Serialize + ?Sized>(
        &self,
        command: &str,
        payload: &P,
    ) -> Result<(), MeshError> {
        let push = push_of(command, payload)?;
        self.ready().await?;
        self.inner
            .backend
            .publish(Delivery::Broadcast { push })
            .await
            .map(drop)
    }

    /// Closes one connection (close code 1000 with `reason`), on whichever instance holds it.
    pub async fn close_connection(
        &self,
        connection_id: &str,
        reason: &str,
    ) -> Result<(), MeshError> {
        if let Some(connection) = self.inner.registry.get(connection_id) {
            connection.close(reason);
            return Ok(());
        }
        self.ready().await?;
        self.inner
            .backend
            .publish(Delivery::Close {
                connection_id: Arc::from(connection_id),
                reason: reason.to_owned(),
            })
            .await
            .map(drop)
    }

    /// A connection's metadata (any instance); `None` when it has none or does not exist.
    pub async fn connection_metadata(
        &self,
        connection_id: &str,
    ) -> Result<Option<Value>, MeshError> {
        self.ready().await?;
        self.inner
            .backend
            .metadata(MetadataOf::Connection(connection_id))
            .await
    }

    /// Combines `metadata` into a connection's metadata with `strategy`. Returns `false`
    /// when no such connection exists. A result over
    /// [`max_metadata_bytes`](crate::MeshBuilder::max_metadata_bytes) is refused with
    /// [`MeshError::TooLarge`], and nothing is stored.
    pub async fn set_connection_metadata(
        &self,
        connection_id: &str,
        metadata: Value,
        strategy: MergeStrategy,
    ) -> Result<bool, MeshError> {
        self.ready().await?;
        let write = MetadataWrite::new(
            metadata,
            strategy,
            self.config().bytes.metadata,
            format!("the metadata of connection \"{connection_id}\""),
        );
        self.inner
            .backend
            .set_metadata(MetadataOf::Connection(connection_id), &write)
            .await
    }

    /// Every connection of the mesh with its metadata (`null` when none), in the order
    /// they connected.
    pub async fn all_connection_metadata(&self) -> Result<Vec<(String, Value)>, MeshError> {
        self.ready().await?;
        self.inner
            .backend
            .all_metadata(MetadataKind::Connection)
            .await
    }

    /// Stops accepting connections, closes every local connection with a going-away close
    /// frame (1001), waits for each to finish (its `on_disconnect` included) up to the
    /// configured shutdown timeout, then leaves the backend. Returns whether every
    /// connection finished in time.
    ///
    /// With axum, call it from the graceful-shutdown signal:
    /// `axum::serve(..).with_graceful_shutdown(async move { signal.await; mesh.shutdown().await; })`.
    pub async fn shutdown(&self) -> bool {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.registry.for_each(|connection| {
            connection.close_with(CloseReason::GoingAway);
        });
        let mut live = self.inner.live_connections.subscribe();
        let finished = tokio::time::timeout(
            self.inner.config.shutdown_timeout,
            live.wait_for(|n| *n == 0),
        )
        .await
        .is_ok();
        if !finished {
            tracing::warn!("shutdown timed out with connections still open");
        }
        if self.inner.attached.initialized() {
            if let Err(err) = self.inner.backend.detach(&self.inner.instance_id).await {
                tracing::warn!(%err, "could not leave the backend cleanly");
            }
        }
        finished
    }

    /// Whether [`Mesh::shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Joins the backend once (retrying on the next call after a failure) and starts the
    /// heartbeat.
    pub(crate) async fn ready(&self) -> Result<(), MeshError> {
        self.inner
            .attached
            .get_or_try_init(|| async {
                let inbox: Weak<dyn Inbox> = self.inner.this.clone();
                self.inner
                    .backend
                    .attach(self.inner.instance_id.clone(), inbox)
                    .await
            })
            .await?;
        if !self.inner.heartbeat_started.swap(true, Ordering::SeqCst) {
            crate::heartbeat::start(Arc::downgrade(&self.inner));
            crate::presence::start_sweeper(Arc::downgrade(&self.inner));
        }
        Ok(())
    }

    pub(crate) fn downgrade(&self) -> Weak<MeshInner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn from_weak(inner: &Weak<MeshInner>) -> Option<Mesh> {
        inner.upgrade().map(|inner| Mesh { inner })
    }

    pub(crate) fn next_connection_id(&self) -> Arc<str> {
        let n = self.inner.next_connection.fetch_add(1, Ordering::Relaxed);
        Arc::from(format!("{}-{n:x}", self.inner.instance_id))
    }

    /// Takes one of the instance's `max_connections` places; `None` (counted as refused)
    /// when every place is taken.
    pub(crate) fn take_connection_slot(&self) -> Option<ConnectionSlot> {
        let limit = self.inner.config.max_connections;
        let taken = self
            .inner
            .connection_slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < limit).then_some(taken + 1)
            })
            .is_ok();
        if !taken {
            self.inner.stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot {
            mesh: self.clone(),
            handed_over: false,
        })
    }

    fn release_connection_slot(&self) {
        let _ = self.inner.connection_slots.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |taken| taken.checked_sub(1),
        );
    }

    /// Counts a connection as live until the returned guard drops. The connection holds
    /// the place its upgrade took ([`ConnectionSlot::hand_over`]); the guard gives it back.
    pub(crate) fn connection_started(&self) -> LiveConnection {
        self.inner.stats.opened.fetch_add(1, Ordering::Relaxed);
        self.inner.live_connections.send_modify(|n| *n += 1);
        LiveConnection { mesh: self.clone() }
    }

    pub(crate) async fn register(&self, connection: &Connection) -> Result<(), MeshError> {
        if self.is_shutting_down() {
            return Err(MeshError::ShuttingDown);
        }
        self.ready().await?;
        self.inner
            .backend
            .register_connection(&self.inner.instance_id, connection.id())
            .await?;
        self.inner.registry.insert(connection);
        crate::metrics::connections_changed(1);
        Ok(())
    }

    /// Forgets a connection that ended: locally, then in the backend, announcing a
    /// presence `leave` for every room where it was present. The connection is already
    /// closed, and the membership lock makes any change still running finish first.
    pub(crate) async fn unregister(&self, connection: &Connection) {
        let _membership = connection.lock_membership().await;
        if self.inner.registry.remove(connection.id()) {
            crate::metrics::connections_changed(-1);
        }
        self.forget_collections(connection.id());
        for (topic, unheard) in self.inner.topics.remove_connection(connection.id()) {
            if unheard {
                self.inner
                    .backend
                    .unsubscribe(&self.inner.instance_id, &topic);
            }
        }
        if let Err(err) = self
            .inner
            .backend
            .unregister_connection(&self.inner.instance_id, connection.id())
            .await
        {
            // Retried by the sweeper: a connection left registered would linger in rooms,
            // presence and listings until its instance dies.
            tracing::warn!(
                connection = connection.id(),
                %err,
                "could not unregister connection from the backend; will retry"
            );
            lock(&self.inner.unregister_later).push(connection.shared_id());
            self.inner
                .presence
                .sweeps
                .due_within(std::time::Duration::from_secs(1));
        }
    }

    /// Starts listening to `topic` (subscribing this instance to it if needed). For a
    /// record topic, the caller then reads the snapshot and reports it. The caller holds
    /// the connection's membership lock and has checked that it is not closed.
    pub(crate) async fn listen(
        &self,
        _membership: &crate::connection::MembershipGuard<'_>,
        connection: &Connection,
        topic: Topic,
        form: Form,
    ) -> Result<Listen, MeshError> {
        let listen = self
            .inner
            .topics
            .add_with_form(topic.clone(), connection, form);
        if let Err(err) = self
            .inner
            .backend
            .subscribe(&self.inner.instance_id, &topic)
            .await
        {
            if listen.new {
                self.stop_listening(connection.id(), &topic);
            }
            return Err(err);
        }
        Ok(listen)
    }

    /// Subscribes a connection to `topic` in `form`, as a subscribe command does: under
    /// its membership lock, within its subscription limit. `None` when the connection is
    /// closing (nothing was stored).
    pub(crate) async fn subscribe(
        &self,
        connection: &Connection,
        topic: Topic,
        form: Form,
    ) -> Result<Option<Listen>, CommandError> {
        let membership = connection.lock_membership().await;
        if connection.is_closed() {
            return Ok(None);
        }
        let limit = self.config().max_subscriptions_per_connection;
        if !self.inner.topics.is_listening(&topic, connection.id())
            && self.subscription_count(connection.id()) >= limit
        {
            return Err(CommandError::limit(format!(
                "a connection may hold at most {limit} subscriptions"
            )));
        }
        crate::connection::reserve_reply_place(connection);
        Ok(Some(
            self.listen(&membership, connection, topic, form).await?,
        ))
    }

    /// Passes a subscription's snapshot through; when reading it failed, the subscription
    /// ends again, so the client's failed subscribe leaves nothing behind.
    pub(crate) async fn unless_failed<T>(
        &self,
        connection: &Connection,
        topic: &Topic,
        snapshot: Result<T, MeshError>,
    ) -> Result<T, MeshError> {
        if snapshot.is_err() {
            let _membership = connection.lock_membership().await;
            self.stop_listening(connection.id(), topic);
        }
        snapshot
    }

    /// How many subscriptions a connection holds: presence, channels and records it
    /// subscribed to, and collections (not the records they hold).
    pub(crate) fn subscription_count(&self, connection_id: &str) -> usize {
        let topics = self.inner.topics.topics_of(connection_id, |topic| {
            (!matches!(topic, Topic::Room(_) | Topic::Collections(_))).then_some(())
        });
        topics.len() + self.inner.collections.subscriptions.count(connection_id)
    }

    /// Stops a connection listening to `topic`; returns whether it was.
    pub(crate) fn stop_listening(&self, connection_id: &str, topic: &Topic) -> bool {
        let (was_listening, unheard) = self.inner.topics.remove(topic, connection_id);
        if unheard {
            self.inner
                .backend
                .unsubscribe(&self.inner.instance_id, topic);
        }
        was_listening
    }

    /// Sends a push to every listener of a topic on every instance, except `exclude`.
    pub(crate) async fn publish_topic(
        &self,
        topic: Topic,
        push: Push,
        exclude: Arc<[Arc<str>]>,
    ) -> Result<(), MeshError> {
        self.ready().await?;
        self.inner
            .backend
            .publish(Delivery::Topic {
                topic,
                push,
                exclude,
            })
            .await
            .map(drop)
    }

    /// Runs `on_connect`; an error (or a panic) refuses the connection with its message.
    pub(crate) async fn run_on_connect(&self, connection: &Connection) -> Result<(), String> {
        use futures_util::FutureExt;
        let Some(hook) = &self.inner.on_connect else {
            return Ok(());
        };
        let run = std::panic::AssertUnwindSafe(hook(connection.clone())).catch_unwind();
        match run.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.message().to_owned()),
            Err(_) => {
                tracing::error!(connection = connection.id(), "on_connect panicked");
                Err("connection refused".to_owned())
            }
        }
    }

    pub(crate) async fn run_on_disconnect(&self, connection: &Connection) {
        if let Some(hook) = &self.inner.on_disconnect {
            use futures_util::FutureExt;
            let run = std::panic::AssertUnwindSafe(hook(connection.clone())).catch_unwind();
            if run.await.is_err() {
                tracing::error!(connection = connection.id(), "on_disconnect panicked");
            }
        }
    }

    pub(crate) fn pong_received(&self, connection: &Connection) {
        connection.pong_received();
    }

    /// Retries the unregistrations that failed; called by the sweeper.
    pub(crate) async fn retry_unregistrations(&self) {
        let pending = std::mem::take(&mut *lock(&self.inner.unregister_later));
        for connection_id in pending {
            if let Err(err) = self
                .inner
                .backend
                .unregister_connection(&self.inner.instance_id, &connection_id)
                .await
            {
                tracing::debug!(%err, "unregistration retry failed");
                lock(&self.inner.unregister_later).push(connection_id);
            }
        }
    }

    pub(crate) fn stats_record_oversize(&self) {
        self.inner
            .stats
            .oversize_closes
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats_record_ping_timeout(&self) {
        self.inner
            .stats
            .ping_timeout_closes
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    pub(crate) fn inner(&self) -> &MeshInner {
        &self.inner
    }
}

/// A push for a delivery to carry: its payload serialised once, here.
pub(crate) fn push_of<P: Serialize + ?Sized>(
    command: &str,
    payload: &P,
) -> Result<Push, MeshError> {
    Ok(Push {
        command: Arc::from(command),
        payload: Arc::from(protocol::payload_json(payload)?),
    })
}

/// The frame of a push, rendered once per instance and shared by every local recipient.
pub(crate) fn render(push: &Push) -> Frame {
    Frame::from(protocol::push_with_json(&push.command, &push.payload))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
