//! Records on the client: subscriptions in full or patch mode that always hand out the
//! whole current value, resynchronisation after a missed update, deletion, writes, and
//! renewal after a reconnect.
//!
//! In patch mode the client applies each RFC 6902 patch to the value it holds. Versions
//! rise by exactly one per write, so a patch whose version is not the next one, or that
//! does not apply, means an update was missed: the client then subscribes again
//! (`mesh/unsubscribe-record`, `mesh/subscribe-record`, as mesh's client does) and
//! carries on from the reply. Updates it already has (version not above its own) are
//! ignored. A full value is complete, so it is taken whatever the gap.

use json_patch::PatchOperation;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::sync::{fan_out, run_followups, Followup, Subscriptions};
use super::{lock, ClientError, MeshClient};
use crate::MergeStrategy;

pub(super) const RECORD_UPDATE: &str = "mesh/record-update";
pub(super) const RECORD_DELETED: &str = "mesh/record-deleted";

/// How the server sends a record's updates; the client hands out whole values either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    /// The whole value with every update.
    #[default]
    Full,
    /// RFC 6902 patches (for object and array values; other values come whole), applied
    /// here: less traffic for large values that change a little at a time.
    Patch,
}

/// A change to a subscribed record.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RecordChange {
    /// The record has a new value (after a write, or when the client caught up after
    /// missing updates or reconnecting).
    Updated {
        /// The whole current value, patches already applied.
        value: Value,
        /// Its version.
        version: u64,
    },
    /// The record was deleted; the subscription ends with this change.
    Deleted {
        /// The last version it had.
        version: u64,
    },
}

/// A record subscription: its value as of the last change taken from it, and the
/// changes that follow. See [`MeshClient::subscribe_record`].
#[derive(Debug)]
pub struct RecordSubscription {
    record_id: String,
    value: Value,
    version: u64,
    deleted: bool,
    changes: mpsc::UnboundedReceiver<RecordChange>,
}

impl RecordSubscription {
    /// The record's id.
    pub fn record_id(&self) -> &str {
        &self.record_id
    }

    /// The value as of the last change taken (`null` for a record that does not exist, or
    /// was deleted).
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The version as of the last change taken (0 for a record never written).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the record was deleted (the last change taken was
    /// [`RecordChange::Deleted`]).
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// The next change; `None` once the subscription has ended (after a deletion, or
    /// [`MeshClient::unsubscribe_record`]).
    pub async fn next(&mut self) -> Option<RecordChange> {
        let change = self.changes.recv().await?;
        self.take(&change);
        Some(change)
    }

    /// A change that has arrived already, without waiting.
    pub fn try_next(&mut self) -> Option<RecordChange> {
        let change = self.changes.try_recv().ok()?;
        self.take(&change);
        Some(change)
    }

    fn take(&mut self, change: &RecordChange) {
        match change {
            RecordChange::Updated { value, version } => {
                self.value = value.clone();
                self.version = *version;
            }
            RecordChange::Deleted { version } => {
                self.value = Value::Null;
                self.version = *version;
                self.deleted = true;
            }
        }
    }
}

/// An update as pushed.
#[derive(Debug, Clone)]
pub(super) enum RecordPush {
    Update { version: u64, body: Body },
    Deleted { version: u64 },
}

#[derive(Debug, Clone)]
pub(super) enum Body {
    Full(Value),
    Patch(Vec<PatchOperation>),
}

/// One record subscription of this client (one per record, whatever the number of
/// subscribers).
pub(super) struct RecordState {
    pub(super) mode: RecordMode,
    value: Value,
    version: u64,
    /// While a subscribe request is in flight or due: the pushes that arrived meanwhile.
    pending: Option<Vec<RecordPush>>,
    /// A resync task is spawned and has not started its request.
    resync_scheduled: bool,
    epoch: u64,
    sinks: Vec<mpsc::UnboundedSender<RecordChange>>,
}

impl RecordState {
    /// Whether a subscriber still listens.
    pub(super) fn is_heard(&self) -> bool {
        self.sinks.iter().any(|sink| !sink.is_closed())
    }
}

/// `{recordId, full | patch, version}`.
fn parse_update(payload: &Value) -> Option<(String, RecordPush)> {
    let record_id = payload.get("recordId")?.as_str()?.to_owned();
    let version = payload.get("version")?.as_u64()?;
    let body = if let Some(patch) = payload.get("patch") {
        Body::Patch(serde_json::from_value(patch.clone()).ok()?)
    } else {
        Body::Full(payload.get("full")?.clone())
    };
    Some((record_id, RecordPush::Update { version, body }))
}

/// `base` with `patch` applied; `None` when it does not apply. The server diffs a record
/// that had no document against an empty one of the new value's kind; which kind is not
/// said, so a patch that fits only one of `{}` and `[]` is applied to it, and anything
/// else counts as not applying (the caller resubscribes for the whole value).
fn patched(base: &Value, patch: &[PatchOperation]) -> Option<Value> {
    let apply = |mut document: Value| {
        json_patch::patch(&mut document, patch)
            .ok()
            .map(|()| document)
    };
    if base.is_null() {
        return match (apply(json!({})), apply(json!([]))) {
            (Some(document), None) | (None, Some(document)) => Some(document),
            _ => None,
        };
    }
    apply(base.clone())
}

/// Reads `{success, record, version}`.
fn snapshot(record_id: &str, reply: &Value) -> Result<(Value, u64), ClientError> {
    if reply.get("success") != Some(&Value::Bool(true)) {
        return Err(ClientError::Refused(format!(
            "subscribing to record {record_id}"
        )));
    }
    let version = reply
        .get("version")
        .and_then(Value::as_u64)
        .ok_or_else(|| ClientError::Decode("a record reply without a version".into()))?;
    Ok((reply.get("record").cloned().unwrap_or(Value::Null), version))
}

impl Subscriptions {
    /// `mesh/record-update`: to the record's subscription and to the collections that
    /// hold the record. A patch-mode subscription tells collections its applied values;
    /// otherwise they take the pushed value (always whole for collection members).
    pub(super) fn record_update(&mut self, payload: &Value, followups: &mut Vec<Followup>) {
        let Some((record_id, push)) = parse_update(payload) else {
            tracing::debug!("ignored a record update of unexpected shape");
            return;
        };
        let patched_here = self
            .records
            .get(&record_id)
            .is_some_and(|record| record.mode == RecordMode::Patch);
        if let (
            false,
            RecordPush::Update {
                version,
                body: Body::Full(value),
            },
        ) = (patched_here, &push)
        {
            self.member_update(&record_id, value, *version);
        }
        self.record_push(&record_id, push, followups);
    }

    /// `mesh/record-deleted {recordId, version}`.
    pub(super) fn record_deleted(&mut self, payload: &Value, followups: &mut Vec<Followup>) {
        let (Some(record_id), Some(version)) = (
            payload.get("recordId").and_then(Value::as_str),
            payload.get("version").and_then(Value::as_u64),
        ) else {
            tracing::debug!("ignored a record deletion of unexpected shape");
            return;
        };
        self.record_push(record_id, RecordPush::Deleted { version }, followups);
    }

    /// Applies a push now, or keeps it while a request for the record is in flight.
    fn record_push(&mut self, record_id: &str, push: RecordPush, followups: &mut Vec<Followup>) {
        let Some(record) = self.records.get_mut(record_id) else {
            return;
        };
        if let Some(buffer) = record.pending.as_mut() {
            buffer.push(push);
            return;
        }
        match push {
            RecordPush::Deleted { version } => {
                // Stale: about a record this subscription never saw, or an older one.
                if record.version == 0 || version < record.version {
                    return;
                }
                fan_out(&mut record.sinks, &RecordChange::Deleted { version });
                self.records.remove(record_id);
                followups.push(Followup::Release {
                    record_id: record_id.to_owned(),
                });
            }
            RecordPush::Update { version, body } => {
                if version <= record.version {
                    return;
                }
                let next = match body {
                    Body::Full(value) => Some(value),
                    Body::Patch(patch) if version == record.version + 1 => {
                        patched(&record.value, &patch)
                    }
                    Body::Patch(_) => None,
                };
                match next {
                    Some(value) => self.record_changed(record_id, value, version, true),
                    None => {
                        tracing::debug!(
                            record_id,
                            version,
                            "missed a record update; resubscribing"
                        );
                        record.pending = Some(Vec::new());
                        if !record.resync_scheduled {
                            record.resync_scheduled = true;
                            followups.push(Followup::Resync {
                                record_id: record_id.to_owned(),
                                epoch: record.epoch,
                            });
                        }
                    }
                }
            }
        }
    }

    /// Stores and announces a record's new value (to the collections that hold it too,
    /// with `members`, when this subscription is in patch mode: they get no value of
    /// their own then).
    fn record_changed(&mut self, record_id: &str, value: Value, version: u64, members: bool) {
        let Some(record) = self.records.get_mut(record_id) else {
            return;
        };
        record.value = value.clone();
        record.version = version;
        let change = RecordChange::Updated { value, version };
        fan_out(&mut record.sinks, &change);
        if members && record.mode == RecordMode::Patch {
            if let RecordChange::Updated { value, version } = &change {
                self.member_update(record_id, value, *version);
            }
        }
    }

    /// Marks a record as awaiting a subscribe reply, creating its subscription if needed.
    /// Returns its epoch and whether it was created.
    fn begin_record(&mut self, record_id: &str, mode: RecordMode) -> (u64, bool) {
        if let Some(record) = self.records.get_mut(record_id) {
            record.mode = mode;
            record.pending.get_or_insert_with(Vec::new);
            return (record.epoch, false);
        }
        let epoch = self.epoch();
        self.records.insert(
            record_id.to_owned(),
            RecordState {
                mode,
                value: Value::Null,
                version: 0,
                pending: Some(Vec::new()),
                resync_scheduled: false,
                epoch,
                sinks: Vec::new(),
            },
        );
        (epoch, true)
    }

    /// Applies a subscribe reply (`None`: the request failed), announcing a value that
    /// differs from the one held to the subscribers there were (and, with `members`, to
    /// the collections holding the record: after a missed patch), then adds `sink` and
    /// replays what arrived meanwhile.
    fn settle_record(
        &mut self,
        record_id: &str,
        epoch: u64,
        reply: Option<(Value, u64)>,
        members: bool,
        sink: Option<mpsc::UnboundedSender<RecordChange>>,
        followups: &mut Vec<Followup>,
    ) {
        let Some(record) = self
            .records
            .get_mut(record_id)
            .filter(|record| record.epoch == epoch)
        else {
            return;
        };
        let buffered = record.pending.take().unwrap_or_default();
        if let Some((value, version)) = reply {
            if value != record.value || version != record.version {
                self.record_changed(record_id, value, version, members);
            }
        }
        if let (Some(sink), Some(record)) = (sink, self.records.get_mut(record_id)) {
            record.sinks.push(sink);
        }
        for push in buffered {
            self.record_push(record_id, push, followups);
        }
    }
}

impl MeshClient {
    /// Subscribes to a record: its current value and version (`null` and 0 for one never
    /// written), then a [`RecordChange`] per change, always with the whole value (in
    /// [`RecordMode::Patch`] the client applies the patches; after a missed update it
    /// subscribes again and carries on from the server's value). The subscription ends at
    /// the record's deletion or [`unsubscribe_record`](Self::unsubscribe_record), and is
    /// renewed after every reconnect, with an [`RecordChange::Updated`] when the value
    /// changed meanwhile (dropping the subscription alone does not unsubscribe, but one
    /// nobody listens to is not renewed). A client holds one subscription per record:
    /// subscribing again adds a stream and sets the mode for all. A record that is not
    /// readable is [`ClientError::Refused`].
    pub async fn subscribe_record(
        &self,
        record_id: &str,
        mode: RecordMode,
    ) -> Result<RecordSubscription, ClientError> {
        let (sink, changes) = mpsc::unbounded_channel();
        let (value, version) = self.subscribe_record_sink(record_id, mode, sink).await?;
        Ok(RecordSubscription {
            record_id: record_id.to_owned(),
            value,
            version,
            deleted: false,
            changes,
        })
    }

    /// Like [`subscribe_record`](Self::subscribe_record), with the changes handed to
    /// `callback`, in order, on a task of the client's. Returns the current value and
    /// version.
    pub async fn subscribe_record_with(
        &self,
        record_id: &str,
        mode: RecordMode,
        callback: impl Fn(RecordChange) + Send + 'static,
    ) -> Result<(Value, u64), ClientError> {
        let (sink, mut changes) = mpsc::unbounded_channel();
        let current = self.subscribe_record_sink(record_id, mode, sink).await?;
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                callback(change);
            }
        });
        Ok(current)
    }

    async fn subscribe_record_sink(
        &self,
        record_id: &str,
        mode: RecordMode,
        sink: mpsc::UnboundedSender<RecordChange>,
    ) -> Result<(Value, u64), ClientError> {
        let sync = &self.inner().sync;
        let _turn = sync.requests.lock().await;
        let (epoch, created) = lock(&sync.subscriptions).begin_record(record_id, mode);
        let reply = self
            .command(
                "mesh/subscribe-record",
                json!({ "recordId": record_id, "mode": mode }),
            )
            .await
            .and_then(|reply| snapshot(record_id, &reply));
        let mut followups = Vec::new();
        {
            let mut subscriptions = lock(&sync.subscriptions);
            match &reply {
                Ok(current) => subscriptions.settle_record(
                    record_id,
                    epoch,
                    Some(current.clone()),
                    false,
                    Some(sink),
                    &mut followups,
                ),
                Err(_) if created => {
                    subscriptions.records.remove(record_id);
                }
                Err(_) => {
                    subscriptions.settle_record(record_id, epoch, None, false, None, &mut followups)
                }
            }
        }
        run_followups(self.inner(), followups);
        reply
    }

    /// Ends the record's subscription (every stream and callback of it); returns whether
    /// the server had one.
    pub async fn unsubscribe_record(&self, record_id: &str) -> Result<bool, ClientError> {
        let sync = &self.inner().sync;
        let _turn = sync.requests.lock().await;
        lock(&sync.subscriptions).records.remove(record_id);
        let reply = self
            .command("mesh/unsubscribe-record", json!({ "recordId": record_id }))
            .await?;
        Ok(reply == Value::Bool(true))
    }

    /// Writes a record (it must be exposed as writable to this connection), combining
    /// `value` with the stored one by `strategy`. A refusal is an error reply
    /// ([`ClientError::Command`], code `EFORBIDDEN` on tower-mesh).
    pub async fn write_record(
        &self,
        record_id: &str,
        value: Value,
        strategy: MergeStrategy,
    ) -> Result<(), ClientError> {
        let reply = self
            .command(
                "mesh/publish-record-update",
                json!({ "recordId": record_id, "newValue": value, "options": { "strategy": strategy } }),
            )
            .await?;
        if reply.get("success") == Some(&Value::Bool(true)) {
            Ok(())
        } else {
            Err(ClientError::Refused(format!("writing record {record_id}")))
        }
    }
}

/// Subscribes to a record again after it missed an update (when it is still the
/// subscription that did), and carries on from the reply.
pub(super) async fn resync(client: &MeshClient, record_id: &str, epoch: u64) {
    let sync = &client.inner().sync;
    let _turn = sync.requests.lock().await;
    let mode = {
        let mut subscriptions = lock(&sync.subscriptions);
        let Some(record) = subscriptions
            .records
            .get_mut(record_id)
            .filter(|record| record.epoch == epoch)
        else {
            return;
        };
        record.resync_scheduled = false;
        record.pending.get_or_insert_with(Vec::new);
        record.mode
    };
    if let Err(err) = client
        .command("mesh/unsubscribe-record", json!({ "recordId": record_id }))
        .await
    {
        tracing::debug!(%err, record_id, "could not unsubscribe before resubscribing");
    }
    resubscribe(client, record_id, epoch, mode, true).await;
}

/// Subscribes a record again on a new connection.
pub(super) async fn restore(client: &MeshClient, record_id: &str) {
    let begun = {
        let mut subscriptions = lock(&client.inner().sync.subscriptions);
        subscriptions.records.get_mut(record_id).map(|record| {
            record.pending.get_or_insert_with(Vec::new);
            (record.epoch, record.mode)
        })
    };
    if let Some((epoch, mode)) = begun {
        resubscribe(client, record_id, epoch, mode, false).await;
    }
}

/// Sends `mesh/subscribe-record` for a subscription marked pending, and applies the reply
/// (telling the collections holding the record with `members`).
async fn resubscribe(
    client: &MeshClient,
    record_id: &str,
    epoch: u64,
    mode: RecordMode,
    members: bool,
) {
    let reply = client
        .command(
            "mesh/subscribe-record",
            json!({ "recordId": record_id, "mode": mode }),
        )
        .await
        .and_then(|reply| snapshot(record_id, &reply));
    let reply = reply
        .map_err(|err| tracing::warn!(%err, record_id, "could not subscribe to a record again"))
        .ok();
    let mut followups = Vec::new();
    lock(&client.inner().sync.subscriptions).settle_record(
        record_id,
        epoch,
        reply,
        members,
        None,
        &mut followups,
    );
    run_followups(client.inner(), followups);
}

/// After a deletion dropped the local subscription: ends the server's, unless the record
/// was subscribed to again meanwhile.
pub(super) async fn release(client: &MeshClient, record_id: &str) {
    let sync = &client.inner().sync;
    let _turn = sync.requests.lock().await;
    if lock(&sync.subscriptions).records.contains_key(record_id) {
        return;
    }
    if let Err(err) = client
        .command("mesh/unsubscribe-record", json!({ "recordId": record_id }))
        .await
    {
        tracing::debug!(%err, record_id, "could not release a deleted record");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(patch: Value) -> Vec<PatchOperation> {
        serde_json::from_value(patch).expect("a patch")
    }

    #[test]
    fn patches_apply_to_the_value_held() {
        assert_eq!(
            patched(
                &json!({"a": 1, "b": 2}),
                &ops(json!([{"op": "remove", "path": "/a"}]))
            ),
            Some(json!({"b": 2}))
        );
        assert_eq!(
            patched(
                &json!({"a": 1}),
                &ops(json!([{"op": "remove", "path": "/x"}]))
            ),
            None
        );
    }

    #[test]
    fn a_first_document_is_built_only_when_its_kind_is_clear() {
        assert_eq!(
            patched(
                &Value::Null,
                &ops(json!([{"op": "add", "path": "/count", "value": 1}]))
            ),
            Some(json!({"count": 1}))
        );
        // `/0` fits an object and an array alike; an empty patch fits both too.
        assert_eq!(
            patched(
                &Value::Null,
                &ops(json!([{"op": "add", "path": "/0", "value": 1}]))
            ),
            None
        );
        assert_eq!(patched(&Value::Null, &[]), None);
    }

    #[test]
    fn updates_parse_or_are_refused() {
        assert!(matches!(
            parse_update(&json!({"recordId": "r", "full": null, "version": 0})),
            Some((
                _,
                RecordPush::Update {
                    version: 0,
                    body: Body::Full(Value::Null)
                }
            ))
        ));
        assert!(parse_update(&json!({"recordId": "r", "version": 1})).is_none());
        assert!(
            parse_update(&json!({"recordId": "r", "patch": [{"op": "nope"}], "version": 1}))
                .is_none()
        );
        assert!(parse_update(&json!({"recordId": 3, "full": 1, "version": 1})).is_none());
        assert!(parse_update(&json!("garbage")).is_none());
    }
}
