//! The one multiplexed connection every command of an instance shares: requests from
//! all tasks are pipelined on it, so an operation costs its own round trips and nothing
//! else (no checkout, no liveness check per use). When it fails for good (dropped,
//! refused, timed out), the next use connects afresh, so commands fail with
//! `EUNAVAILABLE` while Redis is down and succeed again once it is back.
//!
//! On a Cluster it is the redis crate's cluster connection: one multiplexed connection per
//! node, each command routed by its first key's slot, following `MOVED` and `ASK`
//! redirections. After a failover its requests to the master that is gone fail or time
//! out; either retires it, and the next connection reads the topology from the seeds.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::Mutex;

use super::client::Client;
use super::unavailable;
use crate::error::MeshError;

/// The shared connection, made on first use and replaced after it fails.
pub(super) struct SharedConnection {
    client: Client,
    current: Arc<Mutex<Option<Current>>>,
}

struct Current {
    generation: u64,
    connection: Link,
    /// When it was made: only a connection older than a timed-out operation is blamed.
    made: tokio::time::Instant,
}

/// A connection to a single Redis or to a Cluster.
#[derive(Clone)]
enum Link {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl SharedConnection {
    pub(super) fn new(client: Client) -> Self {
        SharedConnection {
            client,
            current: Arc::new(Mutex::new(None)),
        }
    }

    /// Called when an operation ran out of time: a cluster connection is replaced (its
    /// slot map may name a master that is gone, and only a new connection reads the
    /// topology again); a single Redis's is kept, its own failures retire it. Only a
    /// connection made before the operation started is blamed: one made meanwhile (by
    /// another caller, after an earlier timeout) did not fail it, and retiring it would
    /// make every caller wait for yet another connection, and time out in turn.
    pub(super) fn operation_timed_out(&self, timeout: Duration) {
        if let Ok(mut current) = self.current.try_lock() {
            if current.as_ref().is_some_and(|current| {
                matches!(current.connection, Link::Cluster(_)) && current.made.elapsed() >= timeout
            }) {
                *current = None;
            }
        }
    }

    /// A handle on the shared connection, connecting first when there is none. Callers
    /// that arrive while a connection is being made wait for it instead of making their
    /// own.
    pub(super) async fn get(&self) -> Result<Connection, MeshError> {
        let mut current = self.current.lock().await;
        if let Some(current) = current.as_ref() {
            return Ok(Connection {
                generation: current.generation,
                connection: current.connection.clone(),
                slot: Arc::clone(&self.current),
            });
        }
        let connection = match &self.client {
            Client::Single(client) => Link::Single(
                client
                    .get_multiplexed_async_connection_with_config(&super::client::config())
                    .await
                    .map_err(unavailable)?,
            ),
            Client::Cluster(cluster) => Link::Cluster(
                cluster
                    .commands
                    .get_async_connection()
                    .await
                    .map_err(unavailable)?,
            ),
        };
        let generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *current = Some(Current {
            generation,
            connection: connection.clone(),
            made: tokio::time::Instant::now(),
        });
        Ok(Connection {
            generation,
            connection,
            slot: Arc::clone(&self.current),
        })
    }
}

/// Tells connections apart, so that a failure retires only the connection it happened on.
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A handle on the shared connection. A failure that leaves the connection unusable
/// retires it, so the next [`SharedConnection::get`] connects again.
#[derive(Clone)]
pub(super) struct Connection {
    generation: u64,
    connection: Link,
    slot: Arc<Mutex<Option<Current>>>,
}

impl Connection {
    /// Whether commands on different slots must go separately (no pipeline spans them).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.connection, Link::Cluster(_))
    }

    /// The cluster connection, on a Cluster.
    pub(super) fn cluster(&mut self) -> Option<&mut ClusterConnection> {
        match &mut self.connection {
            Link::Cluster(connection) => Some(connection),
            Link::Single(_) => None,
        }
    }

    /// A failure blocks on nothing: when the slot is busy (another caller connecting or
    /// taking a handle), a later failure on the same connection retires it.
    fn retire_after(&self, err: &RedisError) {
        // A cluster connection too: the redis crate reconnects a node it lost only to
        // the same address, and refreshes its slot map only on a redirection, so after a
        // failover or a Cluster restarted anew only a new connection (which reads the
        // topology from the seeds) finds the masters again.
        // On a Cluster a timeout counts too: after a failover the crate's requests go on
        // timing out against the node that is gone.
        let cluster_timeout = self.is_cluster() && err.is_timeout();
        if !(err.is_unrecoverable_error()
            || err.is_io_error()
            || err.is_connection_dropped()
            || cluster_timeout)
        {
            return;
        }
        if let Ok(mut current) = self.slot.try_lock() {
            if current
                .as_ref()
                .is_some_and(|current| current.generation == self.generation)
            {
                *current = None;
            }
        }
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let reply = match &mut self.connection {
                Link::Single(connection) => connection.req_packed_command(cmd).await,
                Link::Cluster(connection) => connection.req_packed_command(cmd).await,
            };
            if let Err(err) = &reply {
                self.retire_after(err);
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let replies = match &mut self.connection {
                Link::Single(connection) => {
                    connection
                        .req_packed_commands(pipeline, offset, count)
                        .await
                }
                Link::Cluster(connection) => {
                    connection
                        .req_packed_commands(pipeline, offset, count)
                        .await
                }
            };
            if let Err(err) = &replies {
                self.retire_after(err);
            }
            replies
        })
    }

    fn get_db(&self) -> i64 {
        match &self.connection {
            Link::Single(connection) => connection.get_db(),
            Link::Cluster(_) => 0,
        }
    }
}
