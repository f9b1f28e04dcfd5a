//! Who subscribes to what: every local collection subscription by connection, the
//! subscribers of each collection (a change re-resolves them together), and the queue of
//! re-resolutions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::CollectionExposure;
use crate::metrics::{self, SubscriptionKind};

/// One connection's subscription to one collection.
pub(super) struct Subscription {
    pub(super) exposure: Arc<CollectionExposure>,
    pub(super) members: Vec<String>,
    pub(super) version: u64,
}

/// The local subscribers of one collection: a change re-resolves them together.
pub(super) struct Group {
    pub(super) exposure: Arc<CollectionExposure>,
    pub(super) subscribers: HashSet<Arc<str>>,
    /// A re-resolution is scheduled and has not started.
    pub(super) pending: bool,
    /// The records written since the last re-resolution started.
    pub(super) written: Written,
}

/// The records written during a burst. A record that joins a collection because it was
/// written is followed by its `mesh/record-update`, as mesh does; one that joins for any
/// other reason (a resolver's own logic, a catch-up) is not.
#[derive(Default)]
pub(super) struct Written {
    ids: HashSet<Arc<str>>,
    /// More distinct records were written in one burst than a collection may hold: treat
    /// every record as written (at worst, a client is told a value it already has).
    overflowed: bool,
}

impl Written {
    pub(super) fn note(&mut self, record_id: &str, cap: usize) {
        if self.overflowed || self.ids.contains(record_id) {
            return;
        }
        if self.ids.len() >= cap {
            self.ids = HashSet::new();
            self.overflowed = true;
        } else {
            self.ids.insert(Arc::from(record_id));
        }
    }

    pub(super) fn contains(&self, record_id: &str) -> bool {
        self.overflowed || self.ids.contains(record_id)
    }
}

/// Every local collection subscription: by connection, then collection id; and the
/// subscribers of each collection, by exposure, then collection id.
#[derive(Default)]
pub(super) struct Index {
    pub(super) by_connection: HashMap<Arc<str>, HashMap<Arc<str>, Subscription>>,
    pub(super) groups: HashMap<Arc<str>, HashMap<Arc<str>, Group>>,
}

impl Index {
    pub(super) fn subscription(
        &mut self,
        connection_id: &str,
        collection_id: &str,
    ) -> Option<&mut Subscription> {
        self.by_connection
            .get_mut(connection_id)
            .and_then(|collections| collections.get_mut(collection_id))
    }

    pub(super) fn subscribe(
        &mut self,
        connection_id: Arc<str>,
        collection_id: Arc<str>,
        subscription: Subscription,
    ) {
        let exposure = subscription.exposure.clone();
        let replaced = self
            .by_connection
            .entry(connection_id.clone())
            .or_default()
            .insert(collection_id.clone(), subscription);
        if replaced.is_none() {
            metrics::subscriptions_changed(SubscriptionKind::Collection, 1);
        }
        self.groups
            .entry(exposure.key.clone())
            .or_default()
            .entry(collection_id)
            .or_insert_with(|| Group {
                exposure,
                subscribers: HashSet::new(),
                pending: false,
                written: Written::default(),
            })
            .subscribers
            .insert(connection_id);
    }

    /// Ends one subscription; returns it.
    pub(super) fn unsubscribe(
        &mut self,
        connection_id: &str,
        collection_id: &str,
    ) -> Option<Subscription> {
        let collections = self.by_connection.get_mut(connection_id)?;
        let removed = collections.remove(collection_id)?;
        metrics::subscriptions_changed(SubscriptionKind::Collection, -1);
        if collections.is_empty() {
            self.by_connection.remove(connection_id);
        }
        self.leave_group(&removed.exposure.key, collection_id, connection_id);
        Some(removed)
    }

    /// Ends every subscription of a connection.
    pub(super) fn forget(&mut self, connection_id: &str) {
        for (collection_id, subscription) in
            self.by_connection.remove(connection_id).unwrap_or_default()
        {
            metrics::subscriptions_changed(SubscriptionKind::Collection, -1);
            self.leave_group(&subscription.exposure.key, &collection_id, connection_id);
        }
    }

    pub(super) fn leave_group(&mut self, exposure: &str, collection_id: &str, connection_id: &str) {
        let Some(groups) = self.groups.get_mut(exposure) else {
            return;
        };
        if let Some(group) = groups.get_mut(collection_id) {
            group.subscribers.remove(connection_id);
            if group.subscribers.is_empty() {
                groups.remove(collection_id);
            }
        }
        if groups.is_empty() {
            self.groups.remove(exposure);
        }
    }
}

/// Every local collection subscription (see [`Index`]), and the queue of their
/// re-resolutions.
#[derive(Default)]
pub(crate) struct CollectionSubscriptions {
    pub(super) index: Mutex<Index>,
    /// Re-resolutions run one at a time, in the order they were scheduled, by one task
    /// per instance: a connection's collections change in the order their changes
    /// arrived, and a burst of changes to many collections costs one resolution at a time.
    pub(super) queue: std::sync::OnceLock<mpsc::UnboundedSender<Scheduled>>,
}

/// A re-resolution due at a time.
pub(super) struct Scheduled {
    pub(super) exposure: Arc<str>,
    pub(super) collection_id: Arc<str>,
    pub(super) due: tokio::time::Instant,
}

impl CollectionSubscriptions {
    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn count(&self, connection_id: &str) -> usize {
        self.lock()
            .by_connection
            .get(connection_id)
            .map_or(0, HashMap::len)
    }
}
