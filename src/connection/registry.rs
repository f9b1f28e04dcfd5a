//! The connections this instance holds, and delivery to them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{CloseReason, Connection, SendError};
use crate::backend::Delivery;
use crate::protocol::Frame;

/// Local connections by id. Deliveries from the backend land here.
#[derive(Default)]
pub(crate) struct Registry {
    connections: RwLock<HashMap<Arc<str>, Connection>>,
    slow_consumer_closes: std::sync::atomic::AtomicU64,
}

impl Registry {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<Arc<str>, Connection>> {
        self.connections
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<Arc<str>, Connection>> {
        self.connections
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn insert(&self, connection: &Connection) {
        self.write()
            .insert(connection.shared_id(), connection.clone());
    }

    /// Forgets a connection; returns whether it was here.
    pub(crate) fn remove(&self, id: &str) -> bool {
        self.write().remove(id).is_some()
    }

    pub(crate) fn get(&self, id: &str) -> Option<Connection> {
        self.read().get(id).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Connection> {
        self.read().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.read().len()
    }

    /// Queues a frame for one local connection, counting a slow-consumer close.
    pub(crate) fn send_frame(
        &self,
        connection: &Connection,
        frame: Frame,
    ) -> Result<(), SendError> {
        self.counted(connection, connection.push_frame(frame))
    }

    /// Passes on how queueing a push for `connection` went, counting (and logging) a
    /// slow-consumer close.
    pub(crate) fn counted(
        &self,
        connection: &Connection,
        sent: Result<(), SendError>,
    ) -> Result<(), SendError> {
        if sent == Err(SendError::QueueFull) {
            self.slow_consumer_closes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                connection = connection.id(),
                "closing a slow consumer: outbound queue full"
            );
        }
        sent
    }

    pub(crate) fn slow_consumer_closes(&self) -> u64 {
        self.slow_consumer_closes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls `f` for every local connection without holding the lock while it runs, so a
    /// connection that registers or leaves meanwhile never waits on a fan-out.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Connection)) {
        for connection in self.all() {
            f(&connection);
        }
    }
}

impl Registry {
    /// Hands a delivery for local connections to them. Only the kinds addressed to
    /// connections directly; topics and calls are the mesh's.
    pub(crate) fn deliver(&self, delivery: Delivery) {
        match delivery {
            Delivery::ToConnection {
                connection_id,
                push,
            } => {
                if let Some(connection) = self.get(&connection_id) {
                    let _ = self.send_frame(&connection, crate::mesh::render(&push));
                }
            }
            Delivery::Broadcast { push } => {
                let frame = crate::mesh::render(&push);
                let mut recipients = 0;
                self.for_each(|connection| {
                    let _ = self.send_frame(connection, frame.clone());
                    recipients += 1;
                });
                crate::metrics::fanned_out(crate::metrics::FanOutKind::Broadcast, recipients);
            }
            Delivery::Close {
                connection_id,
                reason,
            } => {
                if let Some(connection) = self.get(&connection_id) {
                    connection.close_with(CloseReason::Normal(reason));
                }
            }
            Delivery::Topic { .. }
            | Delivery::ChannelMessage { .. }
            | Delivery::Presence { .. }
            | Delivery::Record { .. }
            | Delivery::RecordDeleted { .. }
            | Delivery::RecordsChanged { .. }
            | Delivery::Call { .. }
            | Delivery::Answer { .. } => {
                tracing::error!("a mesh-level delivery reached the registry");
            }
        }
    }
}
