//! Publishing a delivery: to the instance that holds its connection, to the instance it
//! answers, or to every live instance (each filters by its own listeners).

use std::sync::{Arc, Weak};

use super::MemoryBackend;
use crate::backend::{Delivery, Inbox};

impl MemoryBackend {
    pub(super) fn publish_delivery(&self, delivery: Delivery) -> bool {
        let targets: Vec<Arc<dyn Inbox>> = {
            let state = self.lock();
            let holder = |connection_id: &str| {
                state
                    .connections
                    .get(connection_id)
                    .and_then(|entry| state.instances.get(&entry.instance_id))
                    .and_then(Weak::upgrade)
            };
            match &delivery {
                Delivery::ToConnection { connection_id, .. }
                | Delivery::Close { connection_id, .. }
                | Delivery::Call { connection_id, .. } => {
                    holder(connection_id).into_iter().collect()
                }
                Delivery::Answer { to, .. } => state
                    .instances
                    .get(to)
                    .and_then(Weak::upgrade)
                    .into_iter()
                    .collect(),
                Delivery::Broadcast { .. }
                | Delivery::Topic { .. }
                | Delivery::ChannelMessage { .. }
                | Delivery::Presence { .. }
                | Delivery::Record { .. }
                | Delivery::RecordDeleted { .. }
                | Delivery::RecordsChanged { .. } => {
                    state.instances.values().filter_map(Weak::upgrade).collect()
                }
            }
        };
        let delivered = !targets.is_empty()
            || matches!(
                delivery,
                Delivery::Broadcast { .. }
                    | Delivery::Topic { .. }
                    | Delivery::ChannelMessage { .. }
            );
        // Delivered outside the lock: an inbox only enqueues, but it must never be able
        // to deadlock against a backend call made from a connection task.
        for inbox in targets {
            inbox.deliver(delivery.clone());
        }
        delivered
    }
}
