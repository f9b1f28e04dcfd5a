//! Collections: the set of records a connection sees, kept current as records change, and
//! the built-in commands `mesh/subscribe-collection` and `mesh/unsubscribe-collection`.
//!
//! A subscriber gets the members (ids and values) at version 1, then a
//! `mesh/collection-diff` (version + 1) whenever records join or leave its collection,
//! and each member's changes as `mesh/record-update` pushes with the whole value.
//!
//! mesh re-runs every subscriber's resolver on every record write (docs/protocol.md §6). Here a
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

mod commands;
mod index;
mod resolution;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{json, Value};

use crate::access::{Access, Pattern, Rules};
use crate::connection::Connection;
use crate::error::BoxError;
use crate::mesh::Mesh;

pub(crate) use commands::{subscribe_collection, unsubscribe_collection};
pub(crate) use index::CollectionSubscriptions;

/// The collection exposures of a mesh, and its local subscriptions.
#[derive(Default)]
pub(crate) struct Collections {
    /// Exposures by collection id pattern (who may subscribe to what).
    pub(crate) by_pattern: Rules<Arc<CollectionExposure>>,
    /// Every exposure, to find those a record write concerns.
    pub(crate) exposures: Vec<Arc<CollectionExposure>>,
    pub(crate) subscriptions: CollectionSubscriptions,
}

/// How long a subscription waits after a relevant change before re-resolving, so a burst
/// of writes costs one resolution.
const DEBOUNCE: Duration = Duration::from_millis(20);

type Resolver<A> =
    Arc<dyn Fn(Mesh, A, String) -> BoxFuture<'static, Result<Vec<String>, BoxError>> + Send + Sync>;

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
