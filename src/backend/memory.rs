//! The in-memory backend: zero setup, one process.
//!
//! Several [`Mesh`](crate::Mesh) instances built with clones of one `MemoryBackend` form one
//! mesh inside a process, exactly as instances sharing a Redis do; the conformance suite
//! uses that to run its multi-instance tests on both backends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::Value;

use super::{Backend, BackendFuture, Delivery, Inbox};
use crate::metadata::MergeStrategy;

/// Shared state kept in this process. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<MemoryState>>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct MemoryState {
    instances: HashMap<Arc<str>, Weak<dyn Inbox>>,
    connections: HashMap<String, ConnectionEntry>,
    next_sequence: u64,
}

struct ConnectionEntry {
    instance_id: Arc<str>,
    metadata: Option<Value>,
    sequence: u64,
}

impl MemoryBackend {
    /// A new, empty in-memory mesh.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // A poisoned lock only means another thread panicked mid-update of plain maps;
        // the maps themselves are still consistent enough to keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BackendFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl Backend for MemoryBackend {
    fn attach(&self, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) -> BackendFuture<'_, ()> {
        self.lock().instances.insert(instance_id, inbox);
        ready(())
    }

    fn detach<'a>(&'a self, instance_id: &'a str) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        state.instances.remove(instance_id);
        state
            .connections
            .retain(|_, entry| &*entry.instance_id != instance_id);
        ready(())
    }

    fn register_connection<'a>(
        &'a self,
        instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        let mut state = self.lock();
        let instance_id = state
            .instances
            .get_key_value(instance_id)
            .map(|(key, _)| key.clone())
            .unwrap_or_else(|| Arc::from(instance_id));
        state.next_sequence += 1;
        let sequence = state.next_sequence;
        state.connections.insert(
            connection_id.to_owned(),
            ConnectionEntry {
                instance_id,
                metadata: None,
                sequence,
            },
        );
        ready(())
    }

    fn unregister_connection<'a>(
        &'a self,
        _instance_id: &'a str,
        connection_id: &'a str,
    ) -> BackendFuture<'a, ()> {
        self.lock().connections.remove(connection_id);
        ready(())
    }

    fn connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
    ) -> BackendFuture<'a, Option<Value>> {
        let metadata = self
            .lock()
            .connections
            .get(connection_id)
            .and_then(|entry| entry.metadata.clone());
        ready(metadata)
    }

    fn set_connection_metadata<'a>(
        &'a self,
        connection_id: &'a str,
        metadata: Value,
        strategy: MergeStrategy,
    ) -> BackendFuture<'a, bool> {
        let mut state = self.lock();
        let known = match state.connections.get_mut(connection_id) {
            Some(entry) => {
                entry.metadata = Some(strategy.apply(entry.metadata.take(), metadata));
                true
            }
            None => false,
        };
        ready(known)
    }

    fn all_connection_metadata(&self) -> BackendFuture<'_, Vec<(String, Value)>> {
        let state = self.lock();
        let mut all: Vec<_> = state
            .connections
            .iter()
            .map(|(id, entry)| {
                (
                    entry.sequence,
                    id.clone(),
                    entry.metadata.clone().unwrap_or(Value::Null),
                )
            })
            .collect();
        all.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        ready(
            all.into_iter()
                .map(|(_, id, metadata)| (id, metadata))
                .collect(),
        )
    }

    fn publish(&self, delivery: Delivery) -> BackendFuture<'_, ()> {
        let targets: Vec<Arc<dyn Inbox>> = {
            let state = self.lock();
            match &delivery {
                Delivery::ToConnection { connection_id, .. }
                | Delivery::Close { connection_id, .. } => state
                    .connections
                    .get(&**connection_id)
                    .and_then(|entry| state.instances.get(&entry.instance_id))
                    .and_then(Weak::upgrade)
                    .into_iter()
                    .collect(),
                Delivery::Broadcast { .. } => {
                    state.instances.values().filter_map(Weak::upgrade).collect()
                }
            }
        };
        // Delivered outside the lock: an inbox only enqueues, but it must never be able
        // to deadlock against a backend call made from a connection task.
        for inbox in targets {
            inbox.deliver(delivery.clone());
        }
        ready(())
    }
}
