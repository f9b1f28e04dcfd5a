//! `Mesh`: the cheap-to-clone handle with the server-side API.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{oneshot, watch, OnceCell};

use crate::access::{Access, Guard, Rules};
use crate::backend::{Backend, ConnectionOp, Delivery, Inbox, Push};
use crate::builder::MeshBuilder;
use crate::collections::{CollectionExposure, CollectionSubscriptions};
use crate::command::Route;
use crate::config::MeshConfig;
use crate::connection::{CloseReason, Connection, Registry};
use crate::error::{CommandError, MeshError};
use crate::layer::MeshLayer;
use crate::metadata::{MergeStrategy, MetadataWrite};
use crate::presence::{PresenceRule, SweepSchedule};
use crate::protocol::{self, Frame};
use crate::records::RecordRules;
use crate::topics::{Form, Listen, LocalTopics, Topic};

/// Longest an instance waits for the holder of a connection to apply a change to it: above
/// the holder's worst case (its membership lock, then a subscribe and a script, each
/// bounded by the backend's 3 s operation timeout).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(crate) type OnConnect =
    Arc<dyn Fn(Connection) -> BoxFuture<Result<(), CommandError>> + Send + Sync>;
pub(crate) type OnDisconnect = Arc<dyn Fn(Connection) -> BoxFuture<()> + Send + Sync>;

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
    pub(crate) commands: HashMap<Arc<str>, Route>,
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
    /// What local connections listen to.
    pub(crate) topics: LocalTopics,
    /// Rooms with presence, by pattern.
    pub(crate) presence: Rules<PresenceRule>,
    /// Who may join which rooms with `mesh/join-room`.
    pub(crate) room_guards: Rules<Guard>,
    /// Calls to other instances awaiting their answer.
    pub(crate) calls: Calls,
    pub(crate) next_call: AtomicU64,
    pub(crate) sweeps: Arc<SweepSchedule>,
    /// Connections that ended but whose unregistration failed, for the sweeper to retry.
    pub(crate) unregister_later: Mutex<Vec<Arc<str>>>,
    /// Who may subscribe to which channels.
    pub(crate) channels: Rules<Access>,
    /// Who may read and write which records, and the record hooks.
    pub(crate) records: RecordRules,
    /// Collection exposures by pattern, and all of them (to find those a write concerns).
    pub(crate) collections: Rules<Arc<CollectionExposure>>,
    pub(crate) collection_exposures: Vec<Arc<CollectionExposure>>,
    pub(crate) collection_subscriptions: CollectionSubscriptions,

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

    pub(crate) fn command(&self, name: &str) -> Option<(&Arc<str>, &Route)> {
        self.inner.commands.get_key_value(name)
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
        self.inner.backend.connection_metadata(connection_id).await
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
        let write = MetadataWrite {
            value: metadata,
            strategy,
            max_bytes: self.config().bytes.metadata,
            owner: format!("the metadata of connection \"{connection_id}\""),
        };
        self.inner
            .backend
            .set_connection_metadata(connection_id, &write)
            .await
    }

    /// Every connection of the mesh with its metadata (`null` when none), in the order
    /// they connected.
    pub async fn all_connection_metadata(&self) -> Result<Vec<(String, Value)>, MeshError> {
        self.ready().await?;
        self.inner.backend.all_connection_metadata().await
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
        Ok(())
    }

    /// Forgets a connection that ended: locally, then in the backend, announcing a
    /// presence `leave` for every room where it was present. The connection is already
    /// closed, and the membership lock makes any change still running finish first.
    pub(crate) async fn unregister(&self, connection: &Connection) {
        let _membership = connection.lock_membership().await;
        self.inner.registry.remove(connection.id());
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
            tracing::warn!(%err, "could not unregister connection from the backend; will retry");
            lock(&self.inner.unregister_later).push(connection.shared_id());
            self.inner
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
        topics.len() + self.inner.collection_subscriptions.count(connection_id)
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

    /// Runs a membership change on the instance that holds the connection: here, or by
    /// a call to its instance, answered once the change is done. `Ok(false)` when no
    /// instance holds it.
    pub(crate) async fn on_holder(
        &self,
        connection_id: &str,
        op: ConnectionOp,
    ) -> Result<bool, MeshError> {
        self.ready().await?;
        if let Some(connection) = self.connection(connection_id) {
            return self.apply(&connection, op).await;
        }
        let call_id = self.inner.next_call.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        lock(&self.inner.calls).insert(call_id, answer);
        // Forgets the call however this future ends (answered, timed out, or dropped).
        let _pending = PendingCall {
            calls: &self.inner.calls,
            call_id,
        };
        let routed = self
            .inner
            .backend
            .publish(Delivery::Call {
                connection_id: Arc::from(connection_id),
                from: self.inner.instance_id.clone(),
                call_id,
                op,
            })
            .await;
        let outcome = match routed {
            Ok(true) => match tokio::time::timeout(CALL_TIMEOUT, answered).await {
                Ok(Ok(Some(done))) => Ok(done),
                Ok(Ok(None)) => Err(MeshError::Unavailable(
                    "the instance holding the connection could not apply the change".into(),
                )),
                _ => Err(MeshError::Unavailable(
                    "the instance holding the connection did not answer".into(),
                )),
            },
            Ok(false) => Ok(false),
            Err(err) => Err(err),
        };
        outcome
    }

    /// Runs a membership change on a local connection.
    async fn apply(&self, connection: &Connection, op: ConnectionOp) -> Result<bool, MeshError> {
        match op {
            ConnectionOp::JoinRoom(room) => Ok(matches!(
                self.join_local(connection, &room, None).await?,
                crate::rooms::JoinOutcome::Joined
            )),
            ConnectionOp::LeaveRoom(room) => self.leave_local(connection, &room).await,
            ConnectionOp::LeaveAllRooms => self.leave_all_local(connection).await.map(|()| true),
        }
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
                tracing::error!("on_connect panicked");
                Err("connection refused".to_owned())
            }
        }
    }

    pub(crate) async fn run_on_disconnect(&self, connection: &Connection) {
        if let Some(hook) = &self.inner.on_disconnect {
            use futures_util::FutureExt;
            let run = std::panic::AssertUnwindSafe(hook(connection.clone())).catch_unwind();
            if run.await.is_err() {
                tracing::error!("on_disconnect panicked");
            }
        }
    }

    pub(crate) fn pong_received(&self, connection: &Connection) {
        connection.pong_received();
    }

    /// Sends every local record listener the record's current value, and re-resolves
    /// every local collection subscription, after deliveries may have been lost.
    async fn catch_up(&self) {
        let ids: Vec<String> = self
            .inner
            .topics
            .all_topics()
            .into_iter()
            .filter_map(|topic| match topic {
                Topic::Record(id) => Some(id.to_string()),
                _ => None,
            })
            .collect();
        for batch in ids.chunks(256) {
            match self.inner.backend.records(batch).await {
                Ok(stored) => {
                    for (id, stored) in batch.iter().zip(stored) {
                        let Some(stored) = stored else { continue };
                        self.inner.deliver(Delivery::Record {
                            record_id: Arc::from(id.as_str()),
                            version: stored.version,
                            value: Arc::from(stored.value.to_string()),
                            patch: None,
                        });
                    }
                }
                Err(err) => tracing::warn!(%err, "could not catch records up after a reconnect"),
            }
        }
        self.re_resolve_all_collections();
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

type Calls = Mutex<HashMap<u64, oneshot::Sender<Option<bool>>>>;

struct PendingCall<'a> {
    calls: &'a Calls,
    call_id: u64,
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        lock(self.calls).remove(&self.call_id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The mesh is its instance's inbox: connection deliveries go to the registry, topic
/// deliveries to the topic's local listeners, calls run on their connection.
impl Inbox for MeshInner {
    fn deliver(&self, delivery: Delivery) {
        match delivery {
            Delivery::Topic {
                topic,
                push,
                exclude,
            } => {
                let frame = render(&push);
                for listener in self.topics.listeners(&topic) {
                    let connection = &listener.connection;
                    if !exclude.iter().any(|id| **id == *connection.id()) {
                        let _ = self.registry.send_frame(connection, frame.clone());
                    }
                }
            }
            Delivery::Presence {
                room,
                connection_id,
                change,
                timestamp,
            } => {
                let frame =
                    crate::presence::update_frame(&room, &connection_id, &change, timestamp);
                for listener in self.topics.listeners(&Topic::Presence(room)) {
                    let _ = self
                        .registry
                        .send_frame(&listener.connection, frame.clone());
                }
            }
            Delivery::Record {
                record_id,
                version,
                value,
                patch,
            } => {
                // Each form is built once, and only if some listener here needs it.
                let build = |full: bool, with_patch: bool| {
                    Frame::from(protocol::record_update(
                        &record_id,
                        full.then_some(&*value),
                        patch.as_deref().filter(|_| with_patch),
                        version,
                    ))
                };
                let (mut full, mut patched, mut both) = (None, None, None);
                for listener in self.topics.listeners(&Topic::Record(record_id.clone())) {
                    let frame = match (
                        listener.form,
                        patch.is_some(),
                        listener.held_by_collection(),
                    ) {
                        (Form::Patch, true, false) => {
                            patched.get_or_insert_with(|| build(false, true))
                        }
                        (Form::Patch, true, true) => both.get_or_insert_with(|| build(true, true)),
                        _ => full.get_or_insert_with(|| build(true, false)),
                    };
                    match listener.record_stream() {
                        Some(stream) => {
                            stream.offer_update(&listener.connection, version, frame.clone())
                        }
                        None => {
                            let _ = self
                                .registry
                                .send_frame(&listener.connection, frame.clone());
                        }
                    }
                }
            }
            Delivery::RecordDeleted { record_id, version } => {
                let topic = Topic::Record(record_id.clone());
                let frame = Frame::from(protocol::record_deleted(&record_id, version));
                for listener in self.topics.listeners(&topic) {
                    match listener.record_stream() {
                        Some(stream) => stream.offer_deleted(&listener.connection, frame.clone()),
                        None => {
                            let _ = self
                                .registry
                                .send_frame(&listener.connection, frame.clone());
                        }
                    }
                    // The client drops its subscription on the notice; so does the server,
                    // keeping only what the connection's collections hold.
                    if listener.is_direct() {
                        let (_, unheard) = self.topics.remove(&topic, listener.connection.id());
                        if unheard {
                            self.backend.unsubscribe(&self.instance_id, &topic);
                        }
                    }
                }
            }
            Delivery::RecordsChanged {
                exposure,
                record_id,
            } => {
                if let Some(mesh) = Mesh::from_weak(&self.this) {
                    mesh.collections_changed(&exposure, &record_id);
                }
            }
            Delivery::Call {
                connection_id,
                from,
                call_id,
                op,
            } => {
                let Some(mesh) = Mesh::from_weak(&self.this) else {
                    return;
                };
                tokio::spawn(async move {
                    let outcome = match mesh.connection(&connection_id) {
                        Some(connection) => match mesh.apply(&connection, op).await {
                            Ok(done) => Some(done),
                            Err(err) => {
                                tracing::warn!(%err, "could not apply a change asked by another instance");
                                None
                            }
                        },
                        None => Some(false),
                    };
                    let answer = Delivery::Answer {
                        to: from,
                        call_id,
                        outcome,
                    };
                    if let Err(err) = mesh.inner.backend.publish(answer).await {
                        tracing::warn!(%err, "could not answer another instance");
                    }
                });
            }
            Delivery::Answer {
                call_id, outcome, ..
            } => {
                if let Some(waiter) = lock(&self.calls).remove(&call_id) {
                    let _ = waiter.send(outcome);
                }
            }
            other => self.registry.deliver(other),
        }
    }

    fn resubscribed(&self) {
        // Pub/sub delivers at most once: what was published while the subscription was
        // down is lost. Records and collections can be caught up, from what is stored.
        let Some(mesh) = Mesh::from_weak(&self.this) else {
            return;
        };
        tokio::spawn(async move { mesh.catch_up().await });
    }

    fn registration_lost(&self) {
        let connections = self.registry.all();
        if !connections.is_empty() {
            tracing::warn!(
                connections = connections.len(),
                "the backend lost this instance's connections; closing them so their clients reconnect"
            );
        }
        for connection in connections {
            connection.close_with(CloseReason::StateLost);
        }
    }

    fn has_listeners(&self, topic: &Topic) -> bool {
        self.topics.has_listeners(topic)
    }

    fn topics(&self) -> Vec<Topic> {
        self.topics.all_topics()
    }
}
