//! What channels, records and collections share on the client: one table of
//! subscriptions, the routing of their pushes, and their restoration after a reconnect.
//!
//! Pushes are handled on the connection's task, in wire order, under one lock; every
//! change is *queued* to the subscribers' channels under that lock (so each subscriber
//! sees changes in order) and user callbacks run on tasks of their own, never under it.
//! Requests that (re)subscribe take turns (`requests`), so their replies are applied in
//! the order they were asked, and a push that arrives while a subscription's request is
//! in flight waits in that subscription's buffer until the reply has been applied.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;

use super::channels::ChannelState;
use super::collections::CollectionState;
use super::records::RecordState;
use super::{channels, collections, lock, records, Inner, MeshClient};

/// The client's channel, record and collection subscriptions.
#[derive(Default)]
pub(super) struct State {
    pub(super) subscriptions: Mutex<Subscriptions>,
    /// Held while a subscribe or unsubscribe request of these kinds is in flight.
    pub(super) requests: tokio::sync::Mutex<()>,
}

/// Every live subscription, by name.
#[derive(Default)]
pub(super) struct Subscriptions {
    pub(super) channels: BTreeMap<String, ChannelState>,
    pub(super) records: BTreeMap<String, RecordState>,
    pub(super) collections: BTreeMap<String, CollectionState>,
    /// Tells apart successive subscriptions to one name.
    next_epoch: u64,
}

impl Subscriptions {
    pub(super) fn epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }
}

/// Work a push or a reply leaves to do once the lock is released.
#[derive(Debug)]
pub(super) enum Followup {
    /// A patch-mode record missed an update: subscribe to it again.
    Resync { record_id: String, epoch: u64 },
    /// A record was deleted and its local subscription dropped: release it on the server.
    Release { record_id: String },
}

/// Queues `item` to every subscriber, forgetting those that dropped their receiver.
pub(super) fn fan_out<T: Clone>(sinks: &mut Vec<mpsc::UnboundedSender<T>>, item: &T) {
    sinks.retain(|sink| sink.send(item.clone()).is_ok());
}

/// Routes a push of one of the sync kinds; others are left alone.
pub(super) fn dispatch(inner: &Arc<Inner>, command: &str, payload: &Value) {
    let handle: fn(&mut Subscriptions, &Value, &mut Vec<Followup>) = match command {
        channels::SUBSCRIPTION_MESSAGE => |subscriptions, payload, _| {
            subscriptions.channel_message(payload);
        },
        records::RECORD_UPDATE => Subscriptions::record_update,
        records::RECORD_DELETED => Subscriptions::record_deleted,
        collections::COLLECTION_DIFF => |subscriptions, payload, _| {
            subscriptions.collection_diff(payload);
        },
        _ => return,
    };
    let mut followups = Vec::new();
    handle(
        &mut lock(&inner.sync.subscriptions),
        payload,
        &mut followups,
    );
    run_followups(inner, followups);
}

/// Starts what pushes and replies left to do, each on a task of its own (they send
/// commands, and replies arrive on the connection's task).
pub(super) fn run_followups(inner: &Arc<Inner>, followups: Vec<Followup>) {
    for followup in followups {
        let client = MeshClient::observer(inner);
        match followup {
            Followup::Resync { record_id, epoch } => {
                tokio::spawn(async move { records::resync(&client, &record_id, epoch).await });
            }
            Followup::Release { record_id } => {
                tokio::spawn(async move { records::release(&client, &record_id).await });
            }
        }
    }
}

/// Subscribes a new connection (which holds nothing) to every channel, record and
/// collection again, except those whose every stream was dropped (they are forgotten).
/// Channels recover what they missed where the server can (see `channels.rs`).
/// Records whose value changed meanwhile announce it; collections announce a fresh
/// snapshot. Failures are logged: the next reconnect tries again.
pub(super) async fn restore(client: &MeshClient) {
    let sync = &client.inner().sync;
    let _turn = sync.requests.lock().await;
    let (channels, records, collections) = {
        let mut subscriptions = lock(&sync.subscriptions);
        subscriptions
            .channels
            .retain(|_, channel| channel.is_heard());
        subscriptions.records.retain(|_, record| record.is_heard());
        subscriptions
            .collections
            .retain(|_, collection| collection.is_heard());
        (
            subscriptions.channels.keys().cloned().collect::<Vec<_>>(),
            subscriptions.records.keys().cloned().collect::<Vec<_>>(),
            subscriptions
                .collections
                .keys()
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    for channel in channels {
        channels::restore(client, &channel).await;
    }
    for record_id in records {
        records::restore(client, &record_id).await;
    }
    for collection_id in collections {
        collections::restore(client, &collection_id).await;
    }
}
