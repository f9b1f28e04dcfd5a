//! Records: versioned JSON values that clients subscribe to, whole or as RFC 6902 patches,
//! and the built-in commands `mesh/subscribe-record`, `mesh/unsubscribe-record` and
//! `mesh/publish-record-update`.
//!
//! Every effective write raises the version by exactly one; a write that changes nothing
//! (numbers compare by value: `1` equals `1.0`; an object with the same keys and values in
//! another order is the same object) stores nothing and announces nothing. The
//! patch is computed once per write, here, and the same bytes go to every patch-mode
//! subscriber. The backend makes the read-modify-write atomic across instances (a
//! compare-and-set on the version on Redis) and publishes the update with the write.
//!
//! Access (docs/protocol.md §6): a connection may read a record when a read pattern
//! ([`expose_record`](crate::MeshBuilder::expose_record)) matches and its guard allows, or
//! when no read pattern matches and a writable pattern
//! ([`expose_writable_record`](crate::MeshBuilder::expose_writable_record)) does and its
//! guard allows. It may write only through a writable pattern. A refusing read guard is
//! never bypassed by a writable pattern.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::access::{valid_name, Access, Pattern, Rules};
use crate::backend::{Delivery, RecordWrite, StoredRecord, Topic};
use crate::connection::Connection;
use crate::error::{CommandError, MeshError};
use crate::extract::Payload;
use crate::merge::MergeStrategy;
use crate::mesh::Mesh;
use crate::protocol::{self, Frame};
use crate::topics::{Form, LocalTopics};

/// A record's value and version.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Record {
    /// The value.
    pub value: Value,
    /// How many effective writes made it (1 for the first).
    pub version: u64,
}

/// What a record hook hears: which record, and its value and version (for a removal, the
/// last ones).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RecordEvent {
    /// The record's id.
    pub record_id: String,
    /// Its new value (for a removal: the value it had).
    pub value: Value,
    /// Its new version (for a removal: the version it had).
    pub version: u64,
}

pub(crate) type RecordHook = Arc<dyn Fn(RecordEvent) -> BoxFuture<'static, ()> + Send + Sync>;

/// Who may read and write which records, and who hears of changes.
#[derive(Default)]
pub(crate) struct Records {
    pub(crate) readable: Rules<Access>,
    pub(crate) writable: Rules<Access>,
    pub(crate) hooks: RecordHooks,
}

impl Mesh {
    /// Writes a record: combines `value` into the stored one with `strategy` and, when
    /// that changes it, stores it as the next version and sends it to the record's
    /// subscribers on every instance. Returns the new version, or `None` when nothing
    /// changed. Concurrent writers on any instance never share a version or lose a write.
    pub async fn write_record(
        &self,
        record_id: &str,
        value: Value,
        strategy: MergeStrategy,
    ) -> Result<Option<u64>, MeshError> {
        self.ready().await?;
        let id: Arc<str> = Arc::from(record_id);
        let on_any_write = self.collections_holding(record_id, false);
        let on_creation = self.collections_holding(record_id, true);
        let value = canonical(value);
        let limit = self.config().bytes.record;
        let update = move |current: Option<&StoredRecord>| {
            let old = current.map(|record| &record.value);
            // Both sides are canonical already: what is stored was canonicalised on its way in.
            let next = strategy.apply(old.cloned(), value.clone());
            if old == Some(&next) {
                return Ok(None);
            }
            let json: Arc<str> = Arc::from(next.to_string());
            if json.len() > limit {
                return Err(MeshError::TooLarge {
                    what: format!("record \"{id}\""),
                    setting: "max_record_bytes",
                    limit,
                    size: json.len(),
                });
            }
            let patch = patch_between(old, &next).map(|patch| Arc::from(to_json(&patch)));
            let mut announcements = vec![Delivery::Record {
                record_id: id.clone(),
                version: current.map_or(0, |record| record.version) + 1,
                value: json.clone(),
                patch,
            }];
            // A new record may join collections whose membership only creations and
            // deletions change; any write may change what a resolver decides.
            let changed = if current.is_none() {
                &on_creation
            } else {
                &on_any_write
            };
            announcements.extend(changed.iter().cloned().map(|exposure| {
                Delivery::RecordsChanged {
                    exposure,
                    record_id: id.clone(),
                }
            }));
            Ok(Some(RecordWrite {
                value: next,
                json,
                announcements,
            }))
        };
        let stored = self
            .inner()
            .backend
            .update_record(record_id, &update)
            .await?;
        Ok(stored.map(|stored| {
            let version = stored.version;
            self.run_record_hooks(false, record_id, stored);
            version
        }))
    }

    /// A record's value and version; `None` when it does not exist.
    pub async fn record(&self, record_id: &str) -> Result<Option<Record>, MeshError> {
        self.ready().await?;
        let ids = [record_id.to_owned()];
        let mut stored = self.inner().backend.records(&ids).await?;
        Ok(stored.pop().flatten().map(|stored| Record {
            value: stored.value,
            version: stored.version,
        }))
    }

    /// Deletes a record; its subscribers get `mesh/record-deleted` with its last version.
    /// Returns whether it existed.
    pub async fn delete_record(&self, record_id: &str) -> Result<bool, MeshError> {
        self.ready().await?;
        let id: Arc<str> = Arc::from(record_id);
        let changed = self.collections_holding(record_id, true);
        let announce = move |stored: &StoredRecord| {
            let mut announcements = vec![Delivery::RecordDeleted {
                record_id: id.clone(),
                version: stored.version,
            }];
            announcements.extend(changed.iter().cloned().map(|exposure| {
                Delivery::RecordsChanged {
                    exposure,
                    record_id: id.clone(),
                }
            }));
            announcements
        };
        let removed = self
            .inner()
            .backend
            .delete_record(record_id, &announce)
            .await?;
        Ok(removed
            .map(|stored| self.run_record_hooks(true, record_id, stored))
            .is_some())
    }

    /// The ids of every stored record `pattern` matches, sorted by bytes. The ids are read
    /// from an ordered index, only the range of the pattern's literal prefix (`task:` for
    /// `^task:`; an exact name is its own prefix): a pattern anchored with `^` and a fixed
    /// start costs what it lists, one without reads every id.
    pub async fn record_ids_matching(
        &self,
        pattern: impl Into<Pattern>,
    ) -> Result<Vec<String>, MeshError> {
        self.ready().await?;
        let pattern = pattern.into();
        let prefix = pattern.literal_prefix();
        let mut ids = self.inner().backend.record_ids(&prefix).await?;
        ids.retain(|id| pattern.matches(id));
        Ok(ids)
    }

    /// Every stored record whose id `pattern` matches, sorted by id (for collection
    /// resolvers). Listed as [`Mesh::record_ids_matching`] does: give the pattern a fixed
    /// start (`^task:`) so it reads only that range.
    pub async fn list_records_matching(
        &self,
        pattern: impl Into<Pattern>,
    ) -> Result<Vec<(String, Value)>, MeshError> {
        let ids = self.record_ids_matching(pattern).await?;
        let stored = self.inner().backend.records(&ids).await?;
        Ok(ids
            .into_iter()
            .zip(stored)
            .filter_map(|(id, stored)| stored.map(|stored| (id, stored.value)))
            .collect())
    }

    /// Whether `connection` may read `record_id` (see the module docs).
    pub(crate) async fn may_read_record(&self, connection: &Connection, record_id: &str) -> bool {
        let rules = &self.inner().records;
        match (
            rules.readable.find(record_id),
            rules.writable.find(record_id),
        ) {
            (Some(read), _) => read.allows(connection, record_id).await,
            (None, Some(write)) => write.allows(connection, record_id).await,
            (None, None) => false,
        }
    }

    async fn may_write_record(&self, connection: &Connection, record_id: &str) -> bool {
        match self.inner().records.writable.find(record_id) {
            Some(write) => write.allows(connection, record_id).await,
            None => false,
        }
    }

    /// Hands a change to the hooks without waiting for them (see [`RecordHooks`]).
    fn run_record_hooks(&self, removed: bool, record_id: &str, stored: StoredRecord) {
        self.inner().records.hooks.call(
            removed,
            RecordEvent {
                record_id: record_id.to_owned(),
                value: stored.value,
                version: stored.version,
            },
        );
    }
}

/// Hands a record's new version to its local listeners' streams, each in the form it
/// needs; each form is built once, and only if some listener here needs it.
pub(crate) fn deliver_update(
    topics: &LocalTopics,
    record_id: &Arc<str>,
    version: u64,
    value: &str,
    patch: Option<&str>,
) {
    let build = |full: bool, with_patch: bool| {
        Frame::from(protocol::record_update(
            record_id,
            full.then_some(value),
            patch.filter(|_| with_patch),
            version,
        ))
    };
    let (mut full, mut patched, mut both) = (None, None, None);
    let listeners = topics.listeners(&Topic::Record(record_id.clone()));
    crate::metrics::fanned_out(crate::metrics::FanOutKind::Record, listeners.len());
    for listener in listeners {
        let frame = match (
            listener.form,
            patch.is_some(),
            listener.held_by_collection(),
        ) {
            (Form::Patch, true, false) => patched.get_or_insert_with(|| build(false, true)),
            (Form::Patch, true, true) => both.get_or_insert_with(|| build(true, true)),
            _ => full.get_or_insert_with(|| build(true, false)),
        };
        if let Some(stream) = listener.record_stream() {
            stream.offer_update(&listener.connection, version, frame.clone());
        }
    }
}

/// Tells a deleted record's direct subscribers, and ends their subscriptions (the client
/// drops its subscription on the notice; what the connection's collections hold stays).
/// A listener only collections hold is not told, as with mesh: its collections' diffs
/// say the record left. Returns the topic when no local listener is left, to unsubscribe
/// from.
pub(crate) fn deliver_deletion(
    topics: &LocalTopics,
    record_id: &Arc<str>,
    version: u64,
) -> Option<Topic> {
    let topic = Topic::Record(record_id.clone());
    let frame = Frame::from(protocol::record_deleted(record_id, version));
    let mut emptied = false;
    for listener in topics.listeners(&topic) {
        if let Some(stream) = listener.record_stream() {
            let notice = listener.is_direct().then(|| frame.clone());
            stream.offer_deleted(&listener.connection, notice);
        }
        if listener.is_direct() {
            emptied |= topics.remove(&topic, listener.connection.id()).1;
        }
    }
    emptied.then_some(topic)
}

impl Mesh {
    /// Sends every local record listener the record's current value, after deliveries may
    /// have been lost; the streams drop what a listener already has.
    pub(crate) async fn catch_up_records(&self) {
        let ids: Vec<String> = self
            .inner()
            .topics
            .all_topics()
            .into_iter()
            .filter_map(|topic| match topic {
                Topic::Record(id) => Some(id.to_string()),
                _ => None,
            })
            .collect();
        for batch in ids.chunks(256) {
            match self.backend().records(batch).await {
                Ok(stored) => {
                    for (id, stored) in batch.iter().zip(stored) {
                        let Some(stored) = stored else { continue };
                        deliver_update(
                            &self.inner().topics,
                            &Arc::from(id.as_str()),
                            stored.version,
                            &stored.value.to_string(),
                            None,
                        );
                    }
                }
                Err(err) => tracing::warn!(%err, "could not catch records up after a reconnect"),
            }
        }
    }
}

/// The record hooks of one instance, and the task that runs them: one change at a time,
/// in the order this instance made them, each change's hooks in the order they were
/// added. Writes never wait for it; a hook that panics is logged and stops no other.
#[derive(Default)]
pub(crate) struct RecordHooks {
    pub(crate) on_update: Vec<RecordHook>,
    pub(crate) on_removed: Vec<RecordHook>,
    queue: std::sync::OnceLock<mpsc::UnboundedSender<(bool, RecordEvent)>>,
}

impl RecordHooks {
    fn call(&self, removed: bool, event: RecordEvent) {
        let hooks = if removed {
            &self.on_removed
        } else {
            &self.on_update
        };
        if hooks.is_empty() {
            return;
        }
        let queue = self.queue.get_or_init(|| {
            let (queue, mut calls) = mpsc::unbounded_channel::<(bool, RecordEvent)>();
            let (on_update, on_removed) = (self.on_update.clone(), self.on_removed.clone());
            // Ends when the mesh (which holds the sender) is gone.
            tokio::spawn(async move {
                use futures_util::FutureExt;
                while let Some((removed, event)) = calls.recv().await {
                    let hooks = if removed { &on_removed } else { &on_update };
                    for hook in hooks {
                        let hook = hook.clone();
                        let event = event.clone();
                        let run = std::panic::AssertUnwindSafe(async move { hook(event).await });
                        if run.catch_unwind().await.is_err() {
                            tracing::error!("a record hook panicked");
                        }
                    }
                }
            });
            queue
        });
        let _ = queue.send((removed, event));
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|err| {
        // A patch of JSON values always serialises; keep serving if that ever changes.
        tracing::error!(%err, "a record patch failed to serialise");
        "[]".to_owned()
    })
}

/// Numbers compare by value, as in JavaScript: a float with an integral value within the
/// exactly representable range becomes an integer, so `1.0` and `1` are the same value.
fn canonical(value: Value) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match value {
        Value::Number(number) if !number.is_i64() && !number.is_u64() => {
            match number.as_f64() {
                Some(float) if float.fract() == 0.0 && float.abs() <= EXACT => {
                    // Exact: an integral float within ±2^53 converts without loss.
                    if float < 0.0 {
                        Value::from(float as i64)
                    } else {
                        Value::from(float as u64)
                    }
                }
                _ => Value::Number(number),
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        Value::Object(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(key, value)| (key, canonical(value)))
                .collect(),
        ),
        other => other,
    }
}

/// The RFC 6902 patch from `old` to `new`, when `new` is an object or array and `old` is
/// of the same kind or absent (`null`): patch mode needs a document to patch. Otherwise
/// patch-mode subscribers get the whole value.
fn patch_between(old: Option<&Value>, new: &Value) -> Option<json_patch::Patch> {
    let empty;
    let base = match (old, new) {
        (Some(old @ Value::Object(_)), Value::Object(_))
        | (Some(old @ Value::Array(_)), Value::Array(_)) => old,
        (None | Some(Value::Null), Value::Object(_)) => {
            empty = json!({});
            &empty
        }
        (None | Some(Value::Null), Value::Array(_)) => {
            empty = json!([]);
            &empty
        }
        _ => return None,
    };
    Some(json_patch::diff(base, new))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SubscribeRecord {
    record_id: String,
    #[serde(default)]
    mode: Option<RecordMode>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RecordMode {
    Full,
    Patch,
}

/// `mesh/subscribe-record {recordId, mode?}` -> `{success, record, version}` (`null` and 0
/// for a record never written), or `{success: false, record: null, version: 0}` when it is
/// not readable. Updates follow as `mesh/record-update` in the asked mode.
pub(crate) async fn subscribe_record(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<SubscribeRecord>,
) -> Result<Value, CommandError> {
    let record_id = valid_name("recordId", &request.record_id)?;
    let refused = json!({ "success": false, "record": null, "version": 0 });
    if !mesh.may_read_record(&connection, record_id).await {
        return Ok(refused);
    }
    let form = match request.mode {
        Some(RecordMode::Patch) => Form::Patch,
        Some(RecordMode::Full) | None => Form::Full,
    };
    let topic = Topic::Record(Arc::from(record_id));
    let Some(listen) = mesh.subscribe(&connection, topic.clone(), form).await? else {
        return Ok(refused);
    };
    let read = mesh.record(record_id).await;
    let (record, version) = match mesh.unless_failed(&connection, &topic, read).await? {
        Some(record) => (record.value, record.version),
        None => (Value::Null, 0),
    };
    if let Some(snapshot) = listen.snapshot {
        snapshot.taken(version);
    }
    Ok(json!({ "success": true, "record": record, "version": version }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RecordRequest {
    record_id: String,
}

/// `mesh/unsubscribe-record {recordId}` -> whether the caller was subscribed.
pub(crate) async fn unsubscribe_record(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<RecordRequest>,
) -> Result<bool, CommandError> {
    let record_id = valid_name("recordId", &request.record_id)?;
    let _membership = connection.lock_membership().await;
    Ok(mesh.stop_listening(connection.id(), &Topic::Record(Arc::from(record_id))))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PublishRecord {
    record_id: String,
    new_value: Value,
    #[serde(default)]
    options: Option<WriteOptions>,
}

#[derive(Deserialize, Default)]
struct WriteOptions {
    #[serde(default)]
    strategy: MergeStrategy,
}

/// `mesh/publish-record-update {recordId, newValue, options?: {strategy}}` ->
/// `{success: true}`; a record the caller may not write is an `EFORBIDDEN` error naming
/// it, and nothing is stored or sent.
pub(crate) async fn publish_record_update(
    mesh: Mesh,
    connection: Connection,
    Payload(request): Payload<PublishRecord>,
) -> Result<Value, CommandError> {
    let record_id = valid_name("recordId", &request.record_id)?;
    if !mesh.may_write_record(&connection, record_id).await {
        return Err(CommandError::forbidden(format!(
            "Record \"{record_id}\" is not writable"
        )));
    }
    let strategy = request.options.unwrap_or_default().strategy;
    mesh.write_record(record_id, request.new_value, strategy)
        .await?;
    Ok(json!({ "success": true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(
            canonical(json!({"a": [1.0, 2.5, -3.0]})),
            json!({"a": [1, 2.5, -3]})
        );
        assert_eq!(canonical(json!(1e300)), json!(1e300));
    }

    #[test]
    fn patches_need_a_document() {
        let patch = |old: Option<Value>, new: Value| {
            patch_between(old.as_ref(), &new).map(|patch| serde_json::to_value(patch).unwrap())
        };
        assert_eq!(
            patch(None, json!({"count": 1})),
            Some(json!([{"op": "add", "path": "/count", "value": 1}]))
        );
        assert_eq!(
            patch(Some(json!({"count": 1, "name": "a"})), json!({"name": "a"})),
            Some(json!([{"op": "remove", "path": "/count"}]))
        );
        assert_eq!(patch(Some(json!({"a": 1})), json!([1])), None);
        assert_eq!(patch(Some(json!("x")), json!("y")), None);
    }
}
