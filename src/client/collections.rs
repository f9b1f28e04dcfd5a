//! Collections on the client: the members of a collection and their values, kept current
//! by diffs and member updates, and renewed after a reconnect.
//!
//! After a reconnect (and when a second subscriber subscribes to a collection this client
//! already has) the server starts the subscription afresh, at version 1; the client then
//! hands every subscriber a [`CollectionChange::Snapshot`] to replace what it held. Diffs
//! follow from there.

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::sync::{fan_out, Subscriptions};
use super::{lock, ClientError, MeshClient};

pub(super) const COLLECTION_DIFF: &str = "mesh/collection-diff";

/// A collection's members with their values, and the collection's version.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct CollectionSnapshot {
    /// The members' record ids, in the server's order.
    pub ids: Vec<String>,
    /// Each member's id and value (`null` for a member not stored), in the same order.
    pub records: Vec<(String, Value)>,
    /// The collection's version: 1 when a subscription starts, plus one per diff.
    pub version: u64,
}

/// A change to a subscribed collection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CollectionChange {
    /// Records joined or left the collection.
    Diff {
        /// The records that joined, with their values.
        added: Vec<(String, Value)>,
        /// The ids of the records that left.
        removed: Vec<String>,
        /// The collection's new version.
        version: u64,
    },
    /// A member record has a new value. A record that joined because it was written
    /// also comes this way, right after the `Diff` that added it (the server tells it
    /// twice, as mesh does).
    RecordUpdated {
        /// The record's id.
        id: String,
        /// Its whole new value.
        value: Value,
        /// The record's version.
        version: u64,
    },
    /// The subscription started afresh (after a reconnect): replace everything held with
    /// this. Versions count from its version again.
    Snapshot(CollectionSnapshot),
}

/// A collection subscription: its members as of the last change taken from it, and the
/// changes that follow. See [`MeshClient::subscribe_collection`].
#[derive(Debug)]
pub struct CollectionSubscription {
    collection_id: String,
    current: CollectionSnapshot,
    changes: mpsc::UnboundedReceiver<CollectionChange>,
}

impl CollectionSubscription {
    /// The collection's id.
    pub fn collection_id(&self) -> &str {
        &self.collection_id
    }

    /// The members and their values as of the last change taken.
    pub fn snapshot(&self) -> &CollectionSnapshot {
        &self.current
    }

    /// The members' ids as of the last change taken.
    pub fn ids(&self) -> &[String] {
        &self.current.ids
    }

    /// The members' ids and values as of the last change taken.
    pub fn records(&self) -> &[(String, Value)] {
        &self.current.records
    }

    /// The version as of the last change taken.
    pub fn version(&self) -> u64 {
        self.current.version
    }

    /// The next change; `None` once [`MeshClient::unsubscribe_collection`] ended it.
    pub async fn next(&mut self) -> Option<CollectionChange> {
        let change = self.changes.recv().await?;
        self.take(&change);
        Some(change)
    }

    /// A change that has arrived already, without waiting.
    pub fn try_next(&mut self) -> Option<CollectionChange> {
        let change = self.changes.try_recv().ok()?;
        self.take(&change);
        Some(change)
    }

    fn take(&mut self, change: &CollectionChange) {
        let current = &mut self.current;
        match change {
            CollectionChange::Diff {
                added,
                removed,
                version,
            } => {
                current.ids.retain(|id| !removed.contains(id));
                current.records.retain(|(id, _)| !removed.contains(id));
                for (id, value) in added {
                    match current.records.iter_mut().find(|(held, _)| held == id) {
                        Some((_, held)) => held.clone_from(value),
                        None => {
                            current.ids.push(id.clone());
                            current.records.push((id.clone(), value.clone()));
                        }
                    }
                }
                current.version = *version;
            }
            CollectionChange::RecordUpdated { id, value, .. } => {
                if let Some((_, held)) = current.records.iter_mut().find(|(held, _)| held == id) {
                    held.clone_from(value);
                }
            }
            CollectionChange::Snapshot(snapshot) => current.clone_from(snapshot),
        }
    }
}

/// What arrived for a collection while its subscribe request was in flight.
#[derive(Debug, Clone)]
pub(super) enum CollectionPush {
    Diff {
        added: Vec<(String, Value)>,
        removed: Vec<String>,
        version: u64,
    },
    Member {
        id: String,
        value: Value,
        version: u64,
    },
}

/// One collection subscription of this client.
pub(super) struct CollectionState {
    ids: Vec<String>,
    version: u64,
    /// While a subscribe request is in flight: the pushes that arrived meanwhile.
    pending: Option<Vec<CollectionPush>>,
    epoch: u64,
    sinks: Vec<mpsc::UnboundedSender<CollectionChange>>,
}

impl CollectionState {
    /// Whether a subscriber still listens.
    pub(super) fn is_heard(&self) -> bool {
        self.sinks.iter().any(|sink| !sink.is_closed())
    }

    fn apply(&mut self, push: CollectionPush) {
        match push {
            CollectionPush::Diff {
                added,
                removed,
                version,
            } => {
                if version <= self.version {
                    return;
                }
                self.ids.retain(|id| !removed.contains(id));
                for (id, _) in &added {
                    if !self.ids.contains(id) {
                        self.ids.push(id.clone());
                    }
                }
                self.version = version;
                let diff = CollectionChange::Diff {
                    added,
                    removed,
                    version,
                };
                fan_out(&mut self.sinks, &diff);
            }
            CollectionPush::Member { id, value, version } => {
                if self.ids.contains(&id) {
                    let change = CollectionChange::RecordUpdated { id, value, version };
                    fan_out(&mut self.sinks, &change);
                }
            }
        }
    }

    fn push(&mut self, push: CollectionPush) {
        match self.pending.as_mut() {
            Some(buffer) => buffer.push(push),
            None => self.apply(push),
        }
    }
}

#[derive(Deserialize)]
struct Member {
    id: String,
    #[serde(default)]
    record: Value,
}

#[derive(Deserialize)]
struct Removed {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Diff {
    collection_id: String,
    /// Each is the record's object carrying its `id`, or `{"id", "$value"}` for a value
    /// that is not an object (what tower-mesh sends; mesh sends the objects alike).
    #[serde(default)]
    added: Vec<serde_json::Map<String, Value>>,
    #[serde(default)]
    removed: Vec<Removed>,
    version: u64,
}

#[derive(Deserialize)]
struct Subscribed {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    records: Vec<Member>,
    #[serde(default)]
    version: u64,
}

/// Splits a diff's added record into its id and value.
fn added_member(mut record: serde_json::Map<String, Value>) -> Option<(String, Value)> {
    let Some(Value::String(id)) = record.remove("id") else {
        tracing::debug!("ignored an added collection member without a string id");
        return None;
    };
    let value = match record.remove("$value") {
        Some(value) if record.is_empty() => value,
        Some(value) => {
            record.insert("$value".to_owned(), value);
            Value::Object(record)
        }
        None => Value::Object(record),
    };
    Some((id, value))
}

fn members(members: Vec<Member>) -> Vec<(String, Value)> {
    members
        .into_iter()
        .map(|member| (member.id, member.record))
        .collect()
}

/// Reads `{success, ids, records, version}`.
fn snapshot(collection_id: &str, reply: Value) -> Result<CollectionSnapshot, ClientError> {
    let reply =
        Subscribed::deserialize(reply).map_err(|err| ClientError::Decode(err.to_string()))?;
    if !reply.success {
        return Err(ClientError::Refused(format!(
            "subscribing to collection {collection_id}"
        )));
    }
    Ok(CollectionSnapshot {
        ids: reply.ids,
        records: members(reply.records),
        version: reply.version,
    })
}

impl Subscriptions {
    /// `mesh/collection-diff`: to the collection's subscribers (a diff not newer than
    /// the collection's version is ignored).
    pub(super) fn collection_diff(&mut self, payload: &Value) {
        let Ok(diff) = Diff::deserialize(payload) else {
            tracing::debug!("ignored a collection diff of unexpected shape");
            return;
        };
        if let Some(collection) = self.collections.get_mut(&diff.collection_id) {
            collection.push(CollectionPush::Diff {
                added: diff.added.into_iter().filter_map(added_member).collect(),
                removed: diff.removed.into_iter().map(|removed| removed.id).collect(),
                version: diff.version,
            });
        }
    }

    /// A record's new value, for the collections that hold it.
    pub(super) fn member_update(&mut self, record_id: &str, value: &Value, version: u64) {
        for collection in self.collections.values_mut() {
            if collection.pending.is_some() || collection.ids.iter().any(|id| id == record_id) {
                collection.push(CollectionPush::Member {
                    id: record_id.to_owned(),
                    value: value.clone(),
                    version,
                });
            }
        }
    }

    /// Marks a collection as awaiting a subscribe reply, creating its subscription if
    /// needed. Returns its epoch and whether it was created.
    fn begin_collection(&mut self, collection_id: &str) -> (u64, bool) {
        if let Some(collection) = self.collections.get_mut(collection_id) {
            collection.pending.get_or_insert_with(Vec::new);
            return (collection.epoch, false);
        }
        let epoch = self.epoch();
        self.collections.insert(
            collection_id.to_owned(),
            CollectionState {
                ids: Vec::new(),
                version: 0,
                pending: Some(Vec::new()),
                epoch,
                sinks: Vec::new(),
            },
        );
        (epoch, true)
    }

    /// Applies a subscribe reply (`None`: the request failed): the subscribers there were
    /// get it as a [`CollectionChange::Snapshot`]; then `sink` is added and what arrived
    /// meanwhile is replayed.
    fn settle_collection(
        &mut self,
        collection_id: &str,
        epoch: u64,
        reply: Option<&CollectionSnapshot>,
        sink: Option<mpsc::UnboundedSender<CollectionChange>>,
    ) {
        let Some(collection) = self
            .collections
            .get_mut(collection_id)
            .filter(|collection| collection.epoch == epoch)
        else {
            return;
        };
        let buffered = collection.pending.take().unwrap_or_default();
        if let Some(snapshot) = reply {
            collection.ids.clone_from(&snapshot.ids);
            collection.version = snapshot.version;
            fan_out(
                &mut collection.sinks,
                &CollectionChange::Snapshot(snapshot.clone()),
            );
        }
        collection.sinks.extend(sink);
        for push in buffered {
            collection.apply(push);
        }
    }
}

impl MeshClient {
    /// Subscribes to a collection: its members now, then a [`CollectionChange`] when
    /// records join or leave it and when a member changes. The subscription is renewed
    /// after every reconnect (see [`CollectionChange::Snapshot`]) until
    /// [`unsubscribe_collection`](Self::unsubscribe_collection), which ends the stream
    /// (dropping the subscription alone does not unsubscribe, but one nobody listens to
    /// is not renewed). A
    /// collection that is not exposed, or whose access refuses, is
    /// [`ClientError::Refused`].
    pub async fn subscribe_collection(
        &self,
        collection_id: &str,
    ) -> Result<CollectionSubscription, ClientError> {
        let (sink, changes) = mpsc::unbounded_channel();
        let current = self.subscribe_collection_sink(collection_id, sink).await?;
        Ok(CollectionSubscription {
            collection_id: collection_id.to_owned(),
            current,
            changes,
        })
    }

    /// Like [`subscribe_collection`](Self::subscribe_collection), with the changes handed
    /// to `callback`, in order, on a task of the client's. Returns the members now.
    pub async fn subscribe_collection_with(
        &self,
        collection_id: &str,
        callback: impl Fn(CollectionChange) + Send + 'static,
    ) -> Result<CollectionSnapshot, ClientError> {
        let (sink, mut changes) = mpsc::unbounded_channel();
        let current = self.subscribe_collection_sink(collection_id, sink).await?;
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                callback(change);
            }
        });
        Ok(current)
    }

    async fn subscribe_collection_sink(
        &self,
        collection_id: &str,
        sink: mpsc::UnboundedSender<CollectionChange>,
    ) -> Result<CollectionSnapshot, ClientError> {
        let sync = &self.inner().sync;
        let _turn = sync.requests.lock().await;
        let (epoch, created) = lock(&sync.subscriptions).begin_collection(collection_id);
        let reply = self
            .command(
                "mesh/subscribe-collection",
                json!({ "collectionId": collection_id }),
            )
            .await
            .and_then(|reply| snapshot(collection_id, reply));
        let mut subscriptions = lock(&sync.subscriptions);
        match &reply {
            Ok(current) => {
                subscriptions.settle_collection(collection_id, epoch, Some(current), Some(sink))
            }
            Err(_) if created => {
                subscriptions.collections.remove(collection_id);
            }
            Err(_) => subscriptions.settle_collection(collection_id, epoch, None, None),
        }
        reply
    }

    /// Ends the collection's subscription (every stream and callback of it); returns
    /// whether the server had one.
    pub async fn unsubscribe_collection(&self, collection_id: &str) -> Result<bool, ClientError> {
        let sync = &self.inner().sync;
        let _turn = sync.requests.lock().await;
        lock(&sync.subscriptions).collections.remove(collection_id);
        let reply = self
            .command(
                "mesh/unsubscribe-collection",
                json!({ "collectionId": collection_id }),
            )
            .await?;
        Ok(reply == Value::Bool(true))
    }
}

/// Subscribes a collection again on a new connection; its subscribers get a snapshot.
pub(super) async fn restore(client: &MeshClient, collection_id: &str) {
    let sync = &client.inner().sync;
    let Some(epoch) = lock(&sync.subscriptions)
        .collections
        .get_mut(collection_id)
        .map(|collection| {
            collection.pending.get_or_insert_with(Vec::new);
            collection.epoch
        })
    else {
        return;
    };
    let reply = client
        .command(
            "mesh/subscribe-collection",
            json!({ "collectionId": collection_id }),
        )
        .await
        .and_then(|reply| snapshot(collection_id, reply))
        .map_err(|err| {
            tracing::warn!(%err, collection_id, "could not subscribe to a collection again");
        })
        .ok();
    lock(&sync.subscriptions).settle_collection(collection_id, epoch, reply.as_ref(), None);
}
