//! The built-in commands `mesh/subscribe-collection` and `mesh/unsubscribe-collection`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::index::Subscription;
use crate::access::valid_name;
use crate::backend::Topic;
use crate::connection::Connection;
use crate::error::CommandError;
use crate::extract::Payload;
use crate::mesh::Mesh;
use crate::reply_budget;
use crate::topics::Form;

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
    let Some(exposure) = mesh
        .inner()
        .collections
        .by_pattern
        .find(&collection_id)
        .cloned()
    else {
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
        .collections
        .subscriptions
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
    mesh.inner().collections.subscriptions.lock().subscribe(
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
            .collections
            .subscriptions
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
        let mut index = mesh.inner().collections.subscriptions.lock();
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
