//! The seam between the engine and where shared state lives.
//!
//! The engine never knows which backend it runs on. Everything that must be seen by every
//! instance (which instance holds a connection, connection metadata) and every message
//! that must reach connections held elsewhere goes through [`Backend`]. Each instance
//! attaches an [`Inbox`]; the backend calls it with the [`Delivery`]s addressed to that
//! instance, already parsed, once per instance (never once per connection).
//!
//! Every operation is async and fallible: an in-memory backend never fails, a networked
//! one may be unreachable for a while, and the engine turns that into `EUNAVAILABLE`.

mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use serde_json::Value;

use crate::error::MeshError;
use crate::metadata::MergeStrategy;
use crate::protocol::Frame;

#[cfg(feature = "redis")]
pub use self::redis::{RedisBackend, RedisBackendBuilder};
pub use memory::MemoryBackend;

/// The future every backend operation returns.
pub(crate) type BackendFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, MeshError>> + Send + 'a>>;

/// A message for connections that some instance holds.
#[derive(Debug, Clone)]
pub(crate) enum Delivery {
    /// One frame for one connection.
    ToConnection {
        connection_id: Arc<str>,
        frame: Frame,
    },
    /// One frame for every connection of every instance.
    Broadcast { frame: Frame },
    /// Close one connection with a normal close frame and this reason.
    Close {
        connection_id: Arc<str>,
        reason: String,
    },
}

/// The receiving end of an instance: it hands deliveries to local connections.
pub(crate) trait Inbox: Send + Sync + 'static {
    /// Delivers to local connections. Must not block: it only enqueues.
    fn deliver(&self, delivery: Delivery);

    /// The ids of the connections this instance holds, to register them again after the
    /// backend lost them (a restarted Redis).
    fn local_connection_ids(&self) -> Vec<Arc<str>>;
}

/// Shared state and cross-instance delivery.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Joins the mesh as `instance_id`; from now on deliveries for it reach `inbox`.
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()>;

    /// Leaves the mesh: forgets the instance and every connection it still holds.
    fn detach<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, ()>;

    /// Records that `instance_id` holds `connection_id`.
    fn register_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()>;

    /// Forgets a connection and everything stored for it.
    fn unregister_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()>;

    /// A connection's metadata; `None` when it has none or is unknown.
    fn connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
    ) -> BackendFuture<'a, Option<Value>>;

    /// Combines `metadata` into a live connection's metadata; `false` when the connection is unknown.
    fn set_connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
        metadata: Value,
        strategy: MergeStrategy,
    ) -> BackendFuture<'a, bool>;

    /// Every live connection with its metadata (`null` when none), in registration order.
    fn all_connection_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>>;

    /// Routes a delivery to the instance(s) that hold its connections.
    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, ()>;
}
