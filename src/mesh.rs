//! `Mesh`: the cheap-to-clone handle with the server-side API.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{watch, OnceCell};

use crate::backend::{Backend, Delivery, Inbox};
use crate::builder::MeshBuilder;
use crate::command::CommandService;
use crate::config::MeshConfig;
use crate::connection::{CloseReason, Connection, Registry};
use crate::error::{CommandError, MeshError};
use crate::layer::MeshLayer;
use crate::metadata::MergeStrategy;
use crate::protocol::{self, Frame};

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
    pub(crate) instance_id: Arc<str>,
    pub(crate) config: MeshConfig,
    pub(crate) commands: HashMap<Arc<str>, CommandService>,
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
}

#[derive(Default)]
pub(crate) struct Counters {
    opened: AtomicU64,
    closed: AtomicU64,
    oversize_closes: AtomicU64,
    ping_timeout_closes: AtomicU64,
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
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("instance_id", &self.inner.instance_id)
            .finish_non_exhaustive()
    }
}

/// Decrements the live-connection count when a connection's task ends, however it ends.
pub(crate) struct LiveConnection {
    mesh: Mesh,
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.mesh.inner.stats.closed.fetch_add(1, Ordering::Relaxed);
        self.mesh
            .inner
            .live_connections
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Mesh {
    /// Starts configuring a mesh.
    pub fn builder() -> MeshBuilder {
        MeshBuilder::new()
    }

    pub(crate) fn from_inner(inner: MeshInner) -> Self {
        Mesh {
            inner: Arc::new(inner),
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

    pub(crate) fn command(&self, name: &str) -> Option<(&Arc<str>, &CommandService)> {
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
        let frame = Frame::from(protocol::push(command, payload));
        if let Some(connection) = self.inner.registry.get(connection_id) {
            let _ = self.inner.registry.send_frame(&connection, frame);
            return Ok(());
        }
        self.ready().await?;
        self.inner
            .backend
            .publish(Delivery::ToConnection {
                connection_id: Arc::from(connection_id),
                frame,
            })
            .await
    }

    /// Sends a push `{command, payload}` to every connection on every instance. The frame
    /// is serialised once and shared by every recipient.
    pub async fn broadcast<P: Serialize + ?Sized>(
        &self,
        command: &str,
        payload: &P,
    ) -> Result<(), MeshError> {
        let frame = Frame::from(protocol::push(command, payload));
        self.ready().await?;
        self.inner
            .backend
            .publish(Delivery::Broadcast { frame })
            .await
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
    /// when no such connection exists.
    pub async fn set_connection_metadata(
        &self,
        connection_id: &str,
        metadata: Value,
        strategy: MergeStrategy,
    ) -> Result<bool, MeshError> {
        self.ready().await?;
        self.inner
            .backend
            .set_connection_metadata(connection_id, metadata, strategy)
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
                let registry: Arc<dyn Inbox> = self.inner.registry.clone();
                let inbox: Weak<dyn Inbox> = Arc::downgrade(&registry);
                self.inner
                    .backend
                    .attach(self.inner.instance_id.clone(), inbox)
                    .await
            })
            .await?;
        if !self.inner.heartbeat_started.swap(true, Ordering::SeqCst) {
            crate::heartbeat::start(Arc::downgrade(&self.inner));
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

    pub(crate) async fn unregister(&self, connection: &Connection) {
        self.inner.registry.remove(connection.id());
        if let Err(err) = self
            .inner
            .backend
            .unregister_connection(&self.inner.instance_id, connection.id())
            .await
        {
            tracing::warn!(%err, "could not unregister connection from the backend");
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
}
