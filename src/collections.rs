//! Collections: the set of records a connection sees, kept current as records change, and
//! the built-in commands `mesh/subscribe-collection` and `mesh/unsubscribe-collection`.
//!
//! A subscriber gets the members (ids and values) at version 1, then a
//! `mesh/collection-diff` (version + 1) whenever records join or leave its collection,
//! and each member's changes as `mesh/record-update` pushes with the whole value.
//!
//! mesh re-runs every subscriber's resolver on every record write (PROTOCOL.md §8). Here a
//! write costs what it can change:
//! - An exposure declares which records its collections can hold
//!   ([`Collection::holding`]; a [`Collection::matching`] collection holds what it
//!   matches): a write to any other record is not even announced.
//! - A write to a record it can hold is published once, on the exposure's topic, to the
//!   instances that have subscribers of its collections. There, only the collections whose
//!   id can hold that record ([`Collection::holding_for`]) re-resolve: one check per
//!   subscribed collection id, whatever its size and however many subscribers it has.
//! - A collection re-resolves once per burst of writes (debounced), once per instance: a
//!   resolver that depends only on the collection id ([`Collection::resolved_by_id`],
//!   [`Collection::matching`]) runs once for all of the instance's subscribers of that
//!   collection; one that takes the connection ([`Collection::resolved_by`]) runs for
//!   each. Re-resolutions of an instance run one at a time, in the order they were due.
//! - Membership that depends only on which records exist
//!   ([`Collection::membership_by_existence`]) re-resolves only on creations and
//!   deletions; updates of members are record updates alone.
//! - Listings by pattern read an ordered index of record ids, only the range of the
//!   pattern's fixed start ([`Mesh::record_ids_matching`]).
//!
//! Members pass the record read rules, and a collection holds at most
//! [`max_collection_members`](crate::MeshBuilder::max_collection_members) records.
//!
//! A resolver runs while its connection's membership changes are held (so resolutions,
//! subscriptions and the connection's end are ordered): it must not change the rooms or
//! subscriptions of the connection it resolves for, which would wait on itself.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::access::{valid_name, Access, Pattern};
use crate::connection::{Connection, MembershipGuard};
use crate::error::{BoxError, CommandError};
use crate::extract::Payload;
use crate::mesh::{BoxFuture, Mesh};
use crate::protocol::{self, Frame};
use crate::record_stream::Snapshot;
use crate::reply_budget;
use crate::topics::{Form, Topic};

/// How long a subscription waits after a relevant change before re-resolving, so a burst
/// of writes costs one resolution.
const DEBOUNCE: Duration = Duration::from_millis(20);

type Resolver<A> =
    Arc<dyn Fn(Mesh, A, String) -> BoxFuture<Result<Vec<String>, BoxError>> + Send + Sync>;

/// How a collection's members are decided.
#[derive(Clone)]
enum Resolve {
    /// By the collection id and the subscribing connection: runs for each subscriber.
    PerConnection(Resolver<Connection>),
    /// By the collection id alone: runs once per burst of changes for all of an
    /// instance's subscribers of the collection.
    PerCollection(Resolver<()>),
}

type Holds = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// A collection exposure; give it to
/// [`MeshBuilder::expose_collection`](crate::MeshBuilder::expose_collection).
///
/// ```
/// use tower_mesh::{Access, Collection, Mesh, Regex};
///
/// let (layer, mesh) = Mesh::builder()
///     // every record whose id starts with "task:"
///     .expose_collection("tasks", Collection::matching(Regex::new("^task:").unwrap()))
///     // a resolver of your own: the records this connection sees
///     .expose_collection(
///         Regex::new("^inbox:").unwrap(),
///         Collection::resolved_by(|mesh, connection, collection_id| async move {
///             let owner = collection_id.trim_start_matches("inbox:").to_owned();
///             let mine = mesh
///                 .list_records_matching(Regex::new("^message:").unwrap())
///                 .await?
///                 .into_iter()
///                 .filter(|(_, message)| message["to"] == owner.as_str())
///                 .map(|(id, _)| id)
///                 .collect();
///             Ok(mine)
///         })
///         .holding(Regex::new("^message:").unwrap())
///         .access(Access::guarded(|connection, collection_id| async move {
///             connection.headers().get("x-user").and_then(|user| user.to_str().ok())
///                 == collection_id.strip_prefix("inbox:")
///         })),
///     )
///     .build();
/// ```
#[derive(Clone)]
#[must_use]
pub struct Collection {
    resolve: Resolve,
    holding: Option<Pattern>,
    holding_for: Option<Holds>,
    access: Access,
    /// Whether membership depends on which records exist only (not on their values), so
    /// that only creations and deletions can change it.
    by_existence: bool,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("holding", &self.holding)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl Collection {
    /// Every stored record whose id `records` matches; only the creation or deletion of
    /// such a record re-resolves it (updates reach subscribers as record updates). Give
    /// the pattern a fixed start (`^task:`): the ids are read from an ordered index, only
    /// that range.
    pub fn matching(records: impl Into<Pattern>) -> Self {
        let records = records.into();
        let pattern = records.clone();
        Collection::resolved_by_id(move |mesh, _collection_id| {
            let pattern = pattern.clone();
            async move { Ok(mesh.record_ids_matching(pattern).await?) }
        })
        .holding(records)
        .membership_by_existence()
    }

    /// Members decided by `resolver`, which gets the mesh, the subscribing connection and
    /// the collection id, and returns the ids of the records that connection sees. It
    /// runs for each subscriber; when the connection does not matter, prefer
    /// [`resolved_by_id`](Self::resolved_by_id). Without [`holding`](Self::holding) or
    /// [`holding_for`](Self::holding_for), a write to any record re-resolves it.
    pub fn resolved_by<F, Fut>(resolver: F) -> Self
    where
        F: Fn(Mesh, Connection, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<String>, BoxError>> + Send + 'static,
    {
        Collection::with(Resolve::PerConnection(Arc::new(
            move |mesh, connection, id| Box::pin(resolver(mesh, connection, id)),
        )))
    }

    /// Members decided by `resolver` from the collection id alone (every subscriber sees
    /// the same records, less those its record read rules refuse): after a change it runs
    /// once per instance for all of that instance's subscribers of the collection.
    pub fn resolved_by_id<F, Fut>(resolver: F) -> Self
    where
        F: Fn(Mesh, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<String>, BoxError>> + Send + 'static,
    {
        Collection::with(Resolve::PerCollection(Arc::new(move |mesh, (), id| {
            Box::pin(resolver(mesh, id))
        })))
    }

    fn with(resolve: Resolve) -> Self {
        Collection {
            resolve,
            holding: None,
            holding_for: None,
            access: Access::open(),
            by_existence: false,
        }
    }

    /// The records its collections can hold: writes to other records never re-resolve
    /// them, and cost nothing beyond this check on the writer.
    pub fn holding(mut self, records: impl Into<Pattern>) -> Self {
        self.holding = Some(records.into());
        self
    }

    /// Which records the collection with a given id can hold (`holds(collection_id,
    /// record_id)`; for example "records whose id starts with the collection id and a
    /// colon"): a write to a record re-resolves only the collections that can hold it.
    /// Combines with [`holding`](Self::holding).
    pub fn holding_for<F>(mut self, holds: F) -> Self
    where
        F: Fn(&str, &str) -> bool + Send + Sync + 'static,
    {
        self.holding_for = Some(Arc::new(holds));
        self
    }

    /// Says that membership depends only on which records exist, not on their values (as
    /// for [`matching`](Self::matching)): only creations and deletions re-resolve it;
    /// updates of members reach subscribers as record updates alone.
    pub fn membership_by_existence(mut self) -> Self {
        self.by_existence = true;
        self
    }

    /// Who may subscribe. Default: anyone.
    pub fn access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Whether the collection `collection_id` can hold `record_id`.
    fn can_hold(&self, collection_id: &str, record_id: &str) -> bool {
        self.holding
            .as_ref()
            .is_none_or(|records| records.matches(record_id))
            && self
                .holding_for
                .as_ref()
                .is_none_or(|holds| holds(collection_id, record_id))
    }
}

/// One exposed collection pattern: its settings and the key that names it everywhere.
pub(crate) struct CollectionExposure {
    pub(crate) key: Arc<str>,
    pub(crate) collection: Collection,
}

impl CollectionExposure {
    pub(crate) fn new(pattern: &Pattern, collection: Collection) -> Self {
        CollectionExposure {
            key: Arc::from(pattern.key()),
            collection,
        }
    }
}

/// One connection's subscription to one collection.
struct Subscription {
    exposure: Arc<CollectionExposure>,
    members: Vec<String>,
    version: u64,
}

/// The local subscribers of one collection: a change re-resolves them together.
struct Group {
    exposure: Arc<CollectionExposure>,
    subscribers: HashSet<Arc<str>>,
    /// A re-resolution is scheduled and has not started.
    pending: bool,
}

/// Every local collection subscription: by connection, then collection id; and the
/// subscribers of each collection, by exposure, then collection id.
#[derive(Default)]
struct Index {
    by_connection: HashMap<Arc<str>, HashMap<Arc<str>, Subscription>>,
    groups: HashMap<Arc<str>, HashMap<Arc<str>, Group>>,
}

impl Index {
    fn subscription(
        &mut self,
        connection_id: &str,
        collection_id: &str,
    ) -> Option<&mut Subscription> {
        self.by_connection
            .get_mut(connection_id)
            .and_then(|collections| collections.get_mut(collection_id))
    }

    fn subscribe(
        &mut self,
        connection_id: Arc<str>,
        collection_id: Arc<str>,
        subscription: Subscription,
    ) {
        let exposure = subscription.exposure.clone();
        self.by_connection
            .entry(connection_id.clone())
            .or_default()
            .insert(collection_id.clone(), subscription);
        self.groups
            .entry(exposure.key.clone())
            .or_default()
            .entry(collection_id)
            .or_insert_with(|| Group {
                exposure,
                subscribers: HashSet::new(),
                pending: false,
            })
            .subscribers
            .insert(connection_id);
    }

    /// Ends one subscription; returns it.
    fn unsubscribe(&mut self, connection_id: &str, collection_id: &str) -> Option<Subscription> {
        let collections = self.by_connection.get_mut(connection_id)?;
        let removed = collections.remove(collection_id)?;
        if collections.is_empty() {
            self.by_connection.remove(connection_id);
        }
        self.leave_group(&removed.exposure.key, collection_id, connection_id);
        Some(removed)
    }

    /// Ends every subscription of a connection.
    fn forget(&mut self, connection_id: &str) {
        for (collection_id, subscription) in
            self.by_connection.remove(connection_id).unwrap_or_default()
        {
            self.leave_group(&subscription.exposure.key, &collection_id, connection_id);
        }
    }

    fn leave_group(&mut self, exposure: &str, collection_id: &str, connection_id: &str) {
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
    index: Mutex<Index>,
    /// Re-resolutions run one at a time, in the order they were scheduled, by one task
    /// per instance: a connection's collections change in the order their changes
    /// arrived, and a burst of changes to many collections costs one resolution at a time.
    queue: std::sync::OnceLock<mpsc::UnboundedSender<Scheduled>>,
}

/// A re-resolution due at a time.
struct Scheduled {
    exposure: Arc<str>,
    collection_id: Arc<str>,
    due: tokio::time::Instant,
}

impl CollectionSubscriptions {
    fn lock(&self) -> MutexGuard<'_, Index> {
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
            .collection_exposures
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
        let due: Vec<Arc<str>> = {
            let mut index = self.inner().collection_subscriptions.lock();
            let Some(groups) = index.groups.get_mut(exposure) else {
                return;
            };
            groups
                .iter_mut()
                .filter(|(collection_id, group)| {
                    !group.pending && group.exposure.collection.can_hold(collection_id, record_id)
                })
                .map(|(collection_id, group)| {
                    group.pending = true;
                    collection_id.clone()
                })
                .collect()
        };
        for collection_id in due {
            self.schedule_resolution(Arc::from(exposure), collection_id);
        }
    }

    /// Queues a re-resolution of one collection's local subscribers, after the debounce.
    fn schedule_resolution(&self, exposure: Arc<str>, collection_id: Arc<str>) {
        let queue = self.inner().collection_subscriptions.queue.get_or_init(|| {
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
            let mut index = self.inner().collection_subscriptions.lock();
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
            .collection_subscriptions
            .lock()
            .forget(connection_id);
    }

    /// The ids the exposure's resolver gives for a collection (for a connection, when the
    /// resolver needs one).
    async fn resolved_ids(
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
    async fn resolve(
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
    async fn readable(
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
    async fn member_records(
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
    async fn hold_members(
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
    fn leave_out(&self, connection: &Connection, collection_id: &str, excess: &[String]) {
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
            .collection_subscriptions
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
        let (exposure, subscribers) = {
            let mut index = self.inner().collection_subscriptions.lock();
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
                    self.apply_resolution(&membership, &connection, collection_id, members)
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
    ) -> Result<(), CommandError> {
        let (joined, left) = {
            let mut index = self.inner().collection_subscriptions.lock();
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
            let mut index = self.inner().collection_subscriptions.lock();
            let Some(subscription) = index.subscription(connection.id(), collection_id) else {
                connection.release_reservation(reservation);
                return Ok(());
            };
            subscription.members = members;
            subscription.version += 1;
            subscription.version
        };
        let stored = match self.inner().backend.records(&joined).await {
            Ok(stored) => {
                for (snapshot, stored) in snapshots.into_iter().zip(&stored) {
                    snapshot.taken(stored.as_ref().map_or(0, |stored| stored.version));
                }
                stored
            }
            Err(err) => {
                // The members are held and the version counted: send the diff without
                // values rather than leave a gap the client would have to resync over.
                tracing::warn!(%err, "could not read the records that joined a collection");
                vec![None; joined.len()]
            }
        };
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

/// A record that joined a collection, as `mesh/collection-diff` lists it: the record's
/// own object with its `id` (what mesh sends, and what its client reads), or, for a value
/// that is not an object, `{"id", "$value"}` (`$value` is `null` for a record not stored;
/// mesh has no form for these).
fn member_as_added(id: &str, value: Option<Value>) -> Value {
    match value {
        Some(Value::Object(fields)) => {
            let mut member = serde_json::Map::with_capacity(fields.len() + 1);
            member.insert("id".to_owned(), Value::String(id.to_owned()));
            member.extend(fields.into_iter().filter(|(key, _)| key != "id"));
            Value::Object(member)
        }
        other => json!({ "id": id, SCALAR_MEMBER: other.unwrap_or(Value::Null) }),
    }
}

/// The key that carries a collection member's value when it is not an object.
pub(crate) const SCALAR_MEMBER: &str = "$value";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CollectionRequest {
    collection_id: String,
}

/// `mesh/subscribe-collection {collectionId}` -> `{success, ids, records: [{id, record}],
/// version: 1}`, or `{success: false, ids: [], records: [], version: 0}` when it is not
/// exposed or its access refuses.
pub(crate) async fn subscribe_collection(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<CollectionRequest>,
) -> Result<Value, CommandError> {
    let collection_id: Arc<str> = Arc::from(valid_name("collectionId", &request.collection_id)?);
    let refused = json!({ "success": false, "ids": [], "records": [], "version": 0 });
    let Some(exposure) = mesh.inner().collections.find(&collection_id).cloned() else {
        return Ok(refused);
    };
    if !exposure
        .collection
        .access
        .allows(&connection, &collection_id)
        .await
    {
        return Ok(refused);
    }
    let membership = connection.lock_membership().await;
    if connection.is_closed() {
        return Ok(refused);
    }
    let subscribed_already = mesh
        .inner()
        .collection_subscriptions
        .lock()
        .subscription(connection.id(), &collection_id)
        .map(|subscription| subscription.members.clone());
    let limit = mesh.config().max_subscriptions_per_connection;
    if subscribed_already.is_none() && mesh.subscription_count(connection.id()) >= limit {
        return Err(CommandError::limit(format!(
            "a connection may hold at most {limit} subscriptions"
        )));
    }
    // The subscription exists, and its exposure is heard, before resolving: a change
    // during the resolution schedules a re-resolution, which waits for this one.
    let topic = Topic::Collections(exposure.key.clone());
    crate::connection::reserve_reply_place(&connection);
    mesh.listen(&membership, &connection, topic, Form::Full)
        .await?;
    mesh.inner().collection_subscriptions.lock().subscribe(
        connection.shared_id(),
        collection_id.clone(),
        Subscription {
            exposure: exposure.clone(),
            // What it holds: the previous members when subscribing again.
            members: subscribed_already.clone().unwrap_or_default(),
            version: 1,
        },
    );
    let subscribed = async {
        let members = mesh.resolve(&exposure, &connection, &collection_id).await?;
        let previous = subscribed_already.unwrap_or_default();
        let snapshots = mesh.hold_members(&connection, &members, &previous).await?;
        if let Some(subscription) = mesh
            .inner()
            .collection_subscriptions
            .lock()
            .subscription(connection.id(), &collection_id)
        {
            subscription.members = members.clone();
        }
        Ok::<_, CommandError>((members, snapshots))
    };
    let read = match subscribed.await {
        Ok((members, snapshots)) => mesh
            .member_records(&members, snapshots)
            .await
            .map(|records| (members, records)),
        Err(err) => Err(err),
    };
    let (mut members, records) = match read {
        Ok(read) => read,
        Err(err) => {
            drop(membership);
            unsubscribe(&mesh, &connection, &collection_id).await;
            return Err(err);
        }
    };
    // Each member costs its entry in `records` and its id in `ids`.
    let (records, truncated) =
        reply_budget::leading_that_fit(records, reply_budget::for_entries(&mesh), |record| {
            reply_budget::json_len(record) + reply_budget::json_len(&record["id"]) + 1
        });
    if truncated {
        mesh.leave_out(&connection, &collection_id, &members[records.len()..]);
        members.truncate(records.len());
    }
    drop(membership);
    Ok(reply_budget::mark(
        json!({ "success": true, "ids": members, "records": records, "version": 1 }),
        truncated,
    ))
}

/// Ends a collection subscription; returns whether there was one.
async fn unsubscribe(mesh: &Mesh, connection: &Connection, collection_id: &str) -> bool {
    let _membership = connection.lock_membership().await;
    let (removed, exposure_still_heard) = {
        let mut index = mesh.inner().collection_subscriptions.lock();
        let Some(removed) = index.unsubscribe(connection.id(), collection_id) else {
            return false;
        };
        let still = index
            .by_connection
            .get(connection.id())
            .is_some_and(|collections| {
                collections
                    .values()
                    .any(|other| Arc::ptr_eq(&other.exposure, &removed.exposure))
            });
        (removed, still)
    };
    if let Err(err) = mesh.hold_members(connection, &[], &removed.members).await {
        tracing::warn!(
            error = err.message(),
            "could not release a collection's records"
        );
    }
    if !exposure_still_heard {
        mesh.stop_listening(
            connection.id(),
            &Topic::Collections(removed.exposure.key.clone()),
        );
    }
    true
}

/// `mesh/unsubscribe-collection {collectionId}` -> whether the caller was subscribed.
pub(crate) async fn unsubscribe_collection(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<CollectionRequest>,
) -> Result<bool, CommandError> {
    let collection_id = valid_name("collectionId", &request.collection_id)?;
    Ok(unsubscribe(&mesh, &connection, collection_id).await)
}
