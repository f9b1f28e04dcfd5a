//! Resolving collections: what a write can change, re-resolving once per burst for all
//! local subscribers, and turning a new membership into a diff.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::index::{Scheduled, Written};
use super::{member_as_added, CollectionExposure, Resolve, DEBOUNCE};
use crate::backend::Topic;
use crate::connection::{Connection, MembershipGuard};
use crate::error::CommandError;
use crate::mesh::Mesh;
use crate::protocol::{self, Frame};
use crate::record_stream::Snapshot;
use crate::reply_budget;

impl Mesh {
    /// The keys of the exposures whose collections can hold `record_id` and must
    /// re-resolve when it changes: on its creation or deletion (`existence_changed`), all
    /// of them; on an update, those whose membership depends on values.
    pub(crate) fn collections_holding(
        &self,
        record_id: &str,
        existence_changed: bool,
    ) -> Vec<Arc<str>> {
        self.inner()
            .collections
            .exposures
            .iter()
            .filter(|exposure| existence_changed || !exposure.collection.by_existence)
            .filter(|exposure| {
                exposure
                    .collection
                    .holding
                    .as_ref()
                    .is_none_or(|records| records.matches(record_id))
            })
            .map(|exposure| exposure.key.clone())
            .collect()
    }

    /// `record_id` changed, and collections of `exposure` may hold it: every local
    /// collection of that exposure that can hold it re-resolves once the burst is over,
    /// once for all its local subscribers. Collections that cannot hold it cost one check
    /// each, whatever their size.
    pub(crate) fn collections_changed(&self, exposure: &str, record_id: &str) {
        let cap = self.config().max_collection_members;
        let due: Vec<Arc<str>> = {
            let mut index = self.inner().collections.subscriptions.lock();
            let Some(groups) = index.groups.get_mut(exposure) else {
                return;
            };
            groups
                .iter_mut()
                .filter(|(collection_id, group)| {
                    group.exposure.collection.can_hold(collection_id, record_id)
                })
                .filter_map(|(collection_id, group)| {
                    group.written.note(record_id, cap);
                    (!std::mem::replace(&mut group.pending, true)).then(|| collection_id.clone())
                })
                .collect()
        };
        for collection_id in due {
            self.schedule_resolution(Arc::from(exposure), collection_id);
        }
    }

    /// Queues a re-resolution of one collection's local subscribers, after the debounce.
    fn schedule_resolution(&self, exposure: Arc<str>, collection_id: Arc<str>) {
        let queue = self
            .inner()
            .collections
            .subscriptions
            .queue
            .get_or_init(|| {
                let (queue, mut scheduled) = mpsc::unbounded_channel::<Scheduled>();
                let mesh = self.downgrade();
                // Ends when the mesh (which holds the sender) is gone.
                tokio::spawn(async move {
                    while let Some(run) = scheduled.recv().await {
                        tokio::time::sleep_until(run.due).await;
                        let Some(mesh) = Mesh::from_weak(&mesh) else {
                            return;
                        };
                        mesh.re_resolve(&run.exposure, &run.collection_id).await;
                    }
                });
                queue
            });
        // Every run waits the same debounce, so the queue is in order of due times.
        let _ = queue.send(Scheduled {
            exposure,
            collection_id,
            due: tokio::time::Instant::now() + DEBOUNCE,
        });
    }

    /// Re-resolves every local collection subscription (after changes may have been
    /// missed).
    pub(crate) fn re_resolve_all_collections(&self) {
        let due: Vec<(Arc<str>, Arc<str>)> = {
            let mut index = self.inner().collections.subscriptions.lock();
            index
                .groups
                .iter_mut()
                .flat_map(|(exposure, groups)| {
                    groups.iter_mut().filter(|(_, group)| !group.pending).map(
                        move |(collection_id, group)| {
                            group.pending = true;
                            (exposure.clone(), collection_id.clone())
                        },
                    )
                })
                .collect()
        };
        for (exposure, collection_id) in due {
            self.schedule_resolution(exposure, collection_id);
        }
    }

    /// Forgets a connection's collection subscriptions (its listens go with its topics).
    pub(crate) fn forget_collections(&self, connection_id: &str) {
        self.inner()
            .collections
            .subscriptions
            .lock()
            .forget(connection_id);
    }

    /// The ids the exposure's resolver gives for a collection (for a connection, when the
    /// resolver needs one).
    pub(super) async fn resolved_ids(
        &self,
        exposure: &CollectionExposure,
        connection: &Connection,
        collection_id: &str,
    ) -> Result<Vec<String>, CommandError> {
        let resolved = match &exposure.collection.resolve {
            Resolve::PerConnection(resolver) => {
                resolver(self.clone(), connection.clone(), collection_id.to_owned()).await
            }
            Resolve::PerCollection(resolver) => {
                resolver(self.clone(), (), collection_id.to_owned()).await
            }
        };
        resolved.map_err(CommandError::from_box)
    }

    /// The readable members of a collection for a connection, in the resolver's order.
    pub(super) async fn resolve(
        &self,
        exposure: &CollectionExposure,
        connection: &Connection,
        collection_id: &str,
    ) -> Result<Vec<String>, CommandError> {
        let resolved = self
            .resolved_ids(exposure, connection, collection_id)
            .await?;
        Ok(self.readable(connection, collection_id, resolved).await)
    }

    /// The ids a connection may see of those resolved: each once, those its record read
    /// rules allow, at most the member cap.
    pub(super) async fn readable(
        &self,
        connection: &Connection,
        collection_id: &str,
        resolved: Vec<String>,
    ) -> Vec<String> {
        let cap = self.config().max_collection_members;
        let mut seen = HashSet::new();
        let mut members = Vec::with_capacity(resolved.len().min(cap));
        for id in resolved {
            if members.len() == cap {
                tracing::warn!(
                    collection = collection_id,
                    cap,
                    "a collection resolved to more members than allowed; the rest are left out"
                );
                break;
            }
            if seen.insert(id.clone()) && self.may_read_record(connection, &id).await {
                members.push(id);
            }
        }
        members
    }

    /// `{id, record}` for each id (`record` is `null` for one not stored), read as the
    /// snapshots of the members' record streams (one per id, in order).
    pub(super) async fn member_records(
        &self,
        ids: &[String],
        snapshots: Vec<Snapshot>,
    ) -> Result<Vec<Value>, CommandError> {
        let stored = self.inner().backend.records(ids).await?;
        Ok(ids
            .iter()
            .zip(stored)
            .zip(snapshots)
            .map(|((id, stored), snapshot)| {
                snapshot.taken(stored.as_ref().map_or(0, |stored| stored.version));
                json!({ "id": id, "record": stored.map_or(Value::Null, |stored| stored.value) })
            })
            .collect())
    }

    /// Listens to the records that joined a collection, then releases those that left.
    /// Returns the snapshots of the joined records' streams (in order), for the caller to
    /// read and report. On failure nothing changed: the joined records are released again.
    pub(super) async fn hold_members(
        &self,
        connection: &Connection,
        joined: &[String],
        left: &[String],
    ) -> Result<Vec<Snapshot>, CommandError> {
        let topics = &self.inner().topics;
        let joined: Vec<Topic> = joined
            .iter()
            .map(|id| Topic::Record(Arc::from(id.as_str())))
            .collect();
        let snapshots: Vec<Snapshot> = joined
            .iter()
            .filter_map(|topic| {
                topics
                    .add_for_collection(topic.clone(), connection)
                    .snapshot
            })
            .collect();
        for topic in &joined {
            if let Err(err) = self
                .inner()
                .backend
                .subscribe(self.instance_id(), topic)
                .await
            {
                for topic in &joined {
                    self.release_member(connection, topic);
                }
                return Err(err.into());
            }
        }
        for id in left {
            self.release_member(connection, &Topic::Record(Arc::from(id.as_str())));
        }
        Ok(snapshots)
    }

    /// Leaves members that did not fit in a reply out of a subscription: they are no
    /// longer held, so the next resolution that finds them adds them again. The caller
    /// holds the connection's membership lock.
    pub(super) fn leave_out(
        &self,
        connection: &Connection,
        collection_id: &str,
        excess: &[String],
    ) {
        tracing::warn!(
            collection = collection_id,
            left_out = excess.len(),
            "collection members left out of a reply over the frame limit"
        );
        for id in excess {
            self.release_member(connection, &Topic::Record(Arc::from(id.as_str())));
        }
        if let Some(subscription) = self
            .inner()
            .collections
            .subscriptions
            .lock()
            .subscription(connection.id(), collection_id)
        {
            let excess: HashSet<&String> = excess.iter().collect();
            subscription.members.retain(|id| !excess.contains(id));
        }
    }

    fn release_member(&self, connection: &Connection, topic: &Topic) {
        if self
            .inner()
            .topics
            .remove_for_collection(topic, connection.id())
        {
            self.inner().backend.unsubscribe(self.instance_id(), topic);
        }
    }

    /// Resolves a collection again for its local subscribers, and sends each the
    /// difference, if any, as its next version. A resolver that depends only on the
    /// collection id runs once for all of them. Each subscriber's change runs under its
    /// connection's membership lock, so it is ordered with the subscription's start and
    /// end and with other re-resolutions.
    async fn re_resolve(&self, exposure_key: &str, collection_id: &Arc<str>) {
        let (exposure, subscribers, written) = {
            let mut index = self.inner().collections.subscriptions.lock();
            let Some(group) = index
                .groups
                .get_mut(exposure_key)
                .and_then(|groups| groups.get_mut(collection_id))
            else {
                return;
            };
            // A change from now on schedules another run.
            group.pending = false;
            (
                group.exposure.clone(),
                group.subscribers.iter().cloned().collect::<Vec<_>>(),
                std::mem::take(&mut group.written),
            )
        };
        let shared = match &exposure.collection.resolve {
            Resolve::PerCollection(resolver) => {
                match resolver(self.clone(), (), collection_id.to_string()).await {
                    Ok(ids) => Some(ids),
                    Err(err) => {
                        tracing::warn!(collection = %collection_id, error = %err, "could not re-resolve a collection");
                        return;
                    }
                }
            }
            Resolve::PerConnection(_) => None,
        };
        for connection_id in subscribers {
            let Some(connection) = self.connection(&connection_id) else {
                continue;
            };
            let membership = connection.lock_membership().await;
            if connection.is_closed() {
                continue;
            }
            let resolved = match &shared {
                Some(ids) => Ok(self.readable(&connection, collection_id, ids.clone()).await),
                None => self.resolve(&exposure, &connection, collection_id).await,
            };
            let applied = match resolved {
                Ok(members) => {
                    self.apply_resolution(
                        &membership,
                        &connection,
                        collection_id,
                        members,
                        &written,
                    )
                    .await
                }
                Err(err) => Err(err),
            };
            if let Err(err) = applied {
                tracing::warn!(collection = %collection_id, error = err.message(), "could not re-resolve a collection");
            }
        }
    }

    /// Makes `members` a subscription's membership, sending the difference as its next
    /// version. The caller holds the connection's membership lock.
    async fn apply_resolution(
        &self,
        _membership: &MembershipGuard<'_>,
        connection: &Connection,
        collection_id: &Arc<str>,
        members: Vec<String>,
        written: &Written,
    ) -> Result<(), CommandError> {
        let (joined, left) = {
            let mut index = self.inner().collections.subscriptions.lock();
            let Some(subscription) = index.subscription(connection.id(), collection_id) else {
                return Ok(());
            };
            let before: HashSet<&String> = subscription.members.iter().collect();
            let after: HashSet<&String> = members.iter().collect();
            let joined: Vec<String> = members
                .iter()
                .filter(|id| !before.contains(id))
                .cloned()
                .collect();
            let left: Vec<String> = subscription
                .members
                .iter()
                .filter(|id| !after.contains(id))
                .cloned()
                .collect();
            (joined, left)
        };
        if joined.is_empty() && left.is_empty() {
            return Ok(());
        }
        // The diff's place is taken before the new members are heard, so an update of one
        // of them, published after the diff's snapshot, cannot reach the client first.
        let reservation = connection.reserve_reply();
        let snapshots = match self.hold_members(connection, &joined, &left).await {
            Ok(snapshots) => snapshots,
            Err(err) => {
                connection.release_reservation(reservation);
                return Err(err);
            }
        };
        // Only now the new membership counts: a failure above leaves the old one whole.
        // (The membership lock keeps every other change of this subscription out.)
        let version = {
            let mut index = self.inner().collections.subscriptions.lock();
            let Some(subscription) = index.subscription(connection.id(), collection_id) else {
                connection.release_reservation(reservation);
                return Ok(());
            };
            subscription.members = members;
            subscription.version += 1;
            subscription.version
        };
        let stored = match self.inner().backend.records(&joined).await {
            Ok(stored) => stored,
            Err(err) => {
                // The members are held and the version counted: send the diff without
                // values rather than leave a gap the client would have to resync over.
                // (The snapshots are taken at version 0: what they held follows as it is.)
                tracing::warn!(%err, "could not read the records that joined a collection");
                vec![None; joined.len()]
            }
        };
        let versions: Vec<u64> = stored
            .iter()
            .map(|stored| stored.as_ref().map_or(0, |stored| stored.version))
            .collect();
        // The whole value of each record that joined because it was written.
        let written_values: Vec<Option<String>> = joined
            .iter()
            .zip(&stored)
            .map(|(id, stored)| match stored {
                Some(stored) if written.contains(id) => Some(stored.value.to_string()),
                _ => None,
            })
            .collect();
        let added: Vec<Value> = joined
            .iter()
            .zip(stored)
            .map(|(id, stored)| member_as_added(id, stored.map(|stored| stored.value)))
            .collect();
        let removed: Vec<Value> = left.iter().map(|id| json!({ "id": id })).collect();
        let budget =
            reply_budget::for_entries(self).saturating_sub(reply_budget::json_len(&removed));
        let (added, truncated) =
            reply_budget::leading_that_fit(added, budget, reply_budget::json_len);
        // Each member's stream takes its snapshot's version; a record that joined because
        // it was written is then told as mesh tells it, a `mesh/record-update` with the
        // whole value, after the diff (whose place in the queue is reserved) and before
        // any newer update.
        for (index, ((id, snapshot), (version, value))) in joined
            .iter()
            .zip(snapshots)
            .zip(versions.into_iter().zip(written_values))
            .enumerate()
        {
            match value {
                // Only members the diff carries: the rest are left out below.
                Some(value) if index < added.len() => {
                    let update = protocol::record_update(id, Some(&value), None, version);
                    snapshot.taken_with_update(version, Frame::from(update));
                }
                _ => snapshot.taken(version),
            }
        }
        if truncated {
            // What does not fit in the diff is not held: a later resolution adds it.
            self.leave_out(connection, collection_id, &joined[added.len()..]);
        }
        let diff = protocol::collection_diff(collection_id, &added, &removed, version, truncated);
        // Unasked for: it counts against the push budget, like the updates it precedes.
        let pushed = connection.push_in_reserved_place(reservation, Frame::from(diff));
        let _ = self.registry().counted(connection, pushed);
        Ok(())
    }
}
