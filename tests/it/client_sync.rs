//! The Rust client's channels, records and collections: subscriptions as streams and
//! callbacks, full and patch records that agree, resynchronisation after a missed update,
//! deletion, refused writes, collection diffs and member updates, and everything restored
//! after a reconnect, on both backends.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_mesh::client::{
    ClientError, ClientEvent, CollectionChange, CollectionSubscription, RecordChange, RecordMode,
    RecordSubscription,
};
use tower_mesh::{Access, Collection, MergeStrategy, MeshBuilder, Regex};

use crate::common::*;

conformance!(
    channels_history_live_messages_and_unsubscribe,
    full_and_patch_subscribers_see_the_same_values,
    a_missed_patch_is_resynchronised,
    a_patch_that_does_not_apply_is_resynchronised,
    deletion_ends_the_subscription,
    writes_are_refused_where_not_writable,
    collections_snapshot_diffs_and_member_updates,
    malformed_pushes_are_ignored,
    everything_is_restored_after_a_reconnect,
);

fn exposed(builder: MeshBuilder) -> MeshBuilder {
    builder
        .expose_channel("news", Access::open())
        .expose_channel("sports", Access::open())
        .expose_channel("secret", Access::guarded(|_, _| async { false }))
        .expose_record(Regex::new("^doc:").expect("regex"), Access::open())
        // Collection members pass the record read rules.
        .expose_record(Regex::new("^task:").expect("regex"), Access::open())
        .expose_writable_record(Regex::new("^note:").expect("regex"), Access::open())
        .expose_collection(
            "tasks",
            Collection::matching(Regex::new("^task:").expect("regex")),
        )
}

async fn change(subscription: &mut RecordSubscription) -> RecordChange {
    within("a record change", subscription.next())
        .await
        .expect("subscription open")
}

fn updated(value: Value, version: u64) -> RecordChange {
    RecordChange::Updated { value, version }
}

/// The next collection change that is not a member update.
async fn diff(subscription: &mut CollectionSubscription) -> CollectionChange {
    loop {
        let change = within("a collection change", subscription.next())
            .await
            .expect("subscription open");
        if !matches!(change, CollectionChange::RecordUpdated { .. }) {
            return change;
        }
    }
}

async fn collection_change(subscription: &mut CollectionSubscription) -> CollectionChange {
    within("a collection change", subscription.next())
        .await
        .expect("subscription open")
}

async fn channels_history_live_messages_and_unsubscribe(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let alice = client(&server.url()).await;
    let bob = client(&server.url()).await;
    for n in 1..=5 {
        server
            .mesh
            .write_channel("news", &format!("m{n}"), 10)
            .await
            .expect("write");
    }
    let (history, mut news) = alice
        .subscribe_channel("news", Some(3))
        .await
        .expect("subscribe");
    assert_eq!(history, ["m5", "m4", "m3"], "newest first");
    let (seen, mut by_callback) = mpsc::unbounded_channel();
    let history = alice
        .subscribe_channel_with("news", None, move |message| {
            let _ = seen.send(message);
        })
        .await
        .expect("a second subscriber on the same client");
    assert!(history.is_empty(), "no history without a limit");
    let (_, mut bobs_news) = bob.subscribe_channel("news", None).await.expect("sub");
    let (_, mut sports) = alice.subscribe_channel("sports", None).await.expect("sub");

    server
        .mesh
        .write_channel("news", "live", 10)
        .await
        .expect("write");
    server
        .mesh
        .write_channel("sports", "goal", 0)
        .await
        .expect("write");
    assert_eq!(recv_within(&mut news).await, "live");
    assert_eq!(recv_within(&mut by_callback).await, "live");
    assert_eq!(recv_within(&mut bobs_news).await, "live");
    assert_eq!(
        recv_within(&mut sports).await,
        "goal",
        "only its own channel's"
    );
    assert_eq!(
        alice.channel_history("news", None).await.expect("history"),
        ["live", "m5", "m4", "m3", "m2", "m1"]
    );
    assert_eq!(
        alice.channel_history("news", Some(2)).await,
        Ok(vec!["live".to_owned(), "m5".to_owned()])
    );

    assert_eq!(alice.unsubscribe_channel("news").await, Ok(true));
    assert_eq!(alice.unsubscribe_channel("news").await, Ok(false));
    // Both of alice's subscribers end with the subscription.
    assert_eq!(within("the end", news.recv()).await, None);
    assert_eq!(within("the end", by_callback.recv()).await, None);
    // The server stopped sending: the next message alice gets is on sports.
    let mut pushes = alice.pushes();
    server
        .mesh
        .write_channel("news", "unheard", 10)
        .await
        .expect("write");
    assert_eq!(recv_within(&mut bobs_news).await, "unheard");
    server
        .mesh
        .write_channel("sports", "second goal", 0)
        .await
        .expect("write");
    assert_eq!(recv_within(&mut sports).await, "second goal");
    let push = within("a push", pushes.recv()).await.expect("push");
    assert_eq!(
        push.payload,
        json!({"channel": "sports", "message": "second goal"})
    );

    for channel in ["unexposed", "secret", "mesh:internal"] {
        assert!(
            matches!(
                alice.subscribe_channel(channel, Some(5)).await,
                Err(ClientError::Refused(_))
            ),
            "{channel}"
        );
        assert!(matches!(
            alice.channel_history(channel, None).await,
            Err(ClientError::Refused(_))
        ));
    }
}

async fn full_and_patch_subscribers_see_the_same_values(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let writer = client(&server.url()).await;
    let full_client = client(&server.url()).await;
    let patch_client = client(&server.url()).await;
    let id = "note:shared";
    let mut full = full_client
        .subscribe_record(id, RecordMode::Full)
        .await
        .expect("sub");
    let mut patched = patch_client
        .subscribe_record(id, RecordMode::Patch)
        .await
        .expect("sub");
    for subscription in [&full, &patched] {
        assert_eq!(
            (subscription.value(), subscription.version()),
            (&Value::Null, 0)
        );
    }
    let (seen, mut by_callback) = mpsc::unbounded_channel();
    let (value, version) = full_client
        .subscribe_record_with(id, RecordMode::Full, move |change| {
            let _ = seen.send(change);
        })
        .await
        .expect("a second subscriber on the same client");
    assert_eq!((value, version), (Value::Null, 0));

    let writes = [
        (
            json!({"title": "a", "tags": ["x"], "meta": {"n": 1, "m": {"deep": true}}}),
            MergeStrategy::Replace,
        ),
        (json!({"done": false}), MergeStrategy::Merge),
        (
            json!({"meta": {"m": {"other": 2}}}),
            MergeStrategy::DeepMerge,
        ),
        // Drops `done` and `meta.m`.
        (
            json!({"title": "a", "tags": ["x", "y"], "meta": {"n": 2}}),
            MergeStrategy::Replace,
        ),
        (json!([1, 2, 3]), MergeStrategy::Replace),
        (json!([1, 3, {"k": "v"}]), MergeStrategy::Replace),
        (json!("plain text"), MergeStrategy::Replace),
        (json!({"back": {"to": "an object"}}), MergeStrategy::Merge),
        (json!({"back": {"and": 1}}), MergeStrategy::DeepMerge),
    ];
    for (n, (value, strategy)) in writes.into_iter().enumerate() {
        if n % 2 == 0 {
            writer
                .write_record(id, value, strategy)
                .await
                .expect("client write");
        } else {
            server
                .mesh
                .write_record(id, value, strategy)
                .await
                .expect("server write");
        }
        let stored = server.mesh.record(id).await.expect("read").expect("stored");
        let expected = updated(stored.value.clone(), stored.version);
        assert_eq!(stored.version, n as u64 + 1);
        assert_eq!(change(&mut full).await, expected, "full, write {n}");
        assert_eq!(change(&mut patched).await, expected, "patch, write {n}");
        assert_eq!(recv_within(&mut by_callback).await, expected, "callback");
        assert_eq!(patched.value(), &stored.value);
        assert_eq!(patched.version(), stored.version);
    }
    // A write that changes nothing announces nothing; the next one does.
    writer
        .write_record(id, json!({"back": {"and": 1}}), MergeStrategy::DeepMerge)
        .await
        .expect("write");
    writer
        .write_record(id, json!({"last": true}), MergeStrategy::Replace)
        .await
        .expect("write");
    assert_eq!(
        change(&mut patched).await,
        updated(json!({"last": true}), 10)
    );
    assert_eq!(change(&mut full).await, updated(json!({"last": true}), 10));

    assert_eq!(patch_client.unsubscribe_record(id).await, Ok(true));
    assert_eq!(patch_client.unsubscribe_record(id).await, Ok(false));
    assert_eq!(within("the end", patched.next()).await, None);
}

async fn a_missed_patch_is_resynchronised(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let alice = client(&server.url()).await;
    let id = "note:gap";
    let mut record = alice
        .subscribe_record(id, RecordMode::Patch)
        .await
        .expect("sub");
    let write = |value: Value| {
        let mesh = server.mesh.clone();
        async move {
            mesh.write_record(id, value, MergeStrategy::Replace)
                .await
                .expect("write")
        }
    };
    write(json!({"count": 1})).await;
    assert_eq!(change(&mut record).await, updated(json!({"count": 1}), 1));
    // Behind the client's back: the server stops sending, two writes are missed, and
    // the server sends again.
    assert_eq!(
        alice
            .command("mesh/unsubscribe-record", json!({ "recordId": id }))
            .await,
        Ok(json!(true))
    );
    write(json!({"count": 2})).await;
    write(json!({"count": 3, "seen": ["a"]})).await;
    let reply = alice
        .command(
            "mesh/subscribe-record",
            json!({ "recordId": id, "mode": "patch" }),
        )
        .await
        .expect("raw subscribe");
    assert_eq!(reply["version"], 3);
    // Version 4 comes as a patch against version 3, which the client never had.
    write(json!({"count": 4, "seen": ["a", "b"]})).await;
    assert_eq!(
        change(&mut record).await,
        updated(json!({"count": 4, "seen": ["a", "b"]}), 4),
        "caught up from the resubscription, nothing in between"
    );
    // And patches apply again from there.
    write(json!({"count": 5, "seen": ["b"]})).await;
    assert_eq!(
        change(&mut record).await,
        updated(json!({"count": 5, "seen": ["b"]}), 5)
    );
}

async fn a_patch_that_does_not_apply_is_resynchronised(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let alice = client(&server.url()).await;
    let id = "note:broken";
    server
        .mesh
        .write_record(id, json!({"a": 1}), MergeStrategy::Replace)
        .await
        .expect("write");
    let mut record = alice
        .subscribe_record(id, RecordMode::Patch)
        .await
        .expect("sub");
    assert_eq!((record.value(), record.version()), (&json!({"a": 1}), 1));
    // The client misses version 2 (the server stops sending, writes, and sends again)...
    alice
        .command("mesh/unsubscribe-record", json!({ "recordId": id }))
        .await
        .expect("raw unsubscribe");
    server
        .mesh
        .write_record(id, json!({"a": 2, "b": [1]}), MergeStrategy::Replace)
        .await
        .expect("write");
    alice
        .command(
            "mesh/subscribe-record",
            json!({ "recordId": id, "mode": "patch" }),
        )
        .await
        .expect("raw subscribe");
    // ...and then gets a version 2 (no gap) whose patch does not apply to what it holds:
    // only a resubscription can bring it the value the server has.
    server
        .mesh
        .send(
            &alice.connection_id(),
            "mesh/record-update",
            &json!({"recordId": id, "patch": [{"op": "remove", "path": "/missing"}], "version": 2}),
        )
        .await
        .expect("send");
    assert_eq!(
        change(&mut record).await,
        updated(json!({"a": 2, "b": [1]}), 2)
    );
    server
        .mesh
        .write_record(id, json!({"b": [1, 2]}), MergeStrategy::Merge)
        .await
        .expect("write");
    assert_eq!(
        change(&mut record).await,
        updated(json!({"a": 2, "b": [1, 2]}), 3)
    );
}

async fn deletion_ends_the_subscription(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let alice = client(&server.url()).await;
    let bob = client(&server.url()).await;
    let id = "doc:1";
    server
        .mesh
        .write_record(id, json!({"v": 1}), MergeStrategy::Replace)
        .await
        .expect("write");
    let mut full = alice
        .subscribe_record(id, RecordMode::Full)
        .await
        .expect("sub");
    let mut patched = bob
        .subscribe_record(id, RecordMode::Patch)
        .await
        .expect("sub");
    let (seen, mut by_callback) = mpsc::unbounded_channel();
    let (value, version) = alice
        .subscribe_record_with("doc:2", RecordMode::Patch, move |change| {
            let _ = seen.send(change);
        })
        .await
        .expect("sub");
    assert_eq!((value, version), (Value::Null, 0));
    server
        .mesh
        .write_record("doc:2", json!({"other": true}), MergeStrategy::Replace)
        .await
        .expect("write");
    assert_eq!(
        recv_within(&mut by_callback).await,
        updated(json!({"other": true}), 1)
    );

    assert!(server.mesh.delete_record(id).await.unwrap());
    assert!(!server.mesh.delete_record("doc:missing").await.unwrap());
    for subscription in [&mut full, &mut patched] {
        assert_eq!(
            change(subscription).await,
            RecordChange::Deleted { version: 1 }
        );
        assert!(subscription.is_deleted());
        assert_eq!(subscription.value(), &Value::Null);
        assert_eq!(within("the end", subscription.next()).await, None);
    }
    // The other record's subscriber heard nothing of it, and is still subscribed.
    server
        .mesh
        .write_record("doc:2", json!({"other": false}), MergeStrategy::Replace)
        .await
        .expect("write");
    assert_eq!(
        recv_within(&mut by_callback).await,
        updated(json!({"other": false}), 2)
    );
    assert!(server.mesh.delete_record("doc:2").await.unwrap());
    assert_eq!(
        recv_within(&mut by_callback).await,
        RecordChange::Deleted { version: 2 }
    );
    // The callback was dropped with the subscription.
    assert_eq!(within("the end", by_callback.recv()).await, None);

    // Subscribing again starts from a record that does not exist.
    let mut again = alice
        .subscribe_record(id, RecordMode::Patch)
        .await
        .expect("sub");
    assert_eq!((again.value(), again.version()), (&Value::Null, 0));
    server
        .mesh
        .write_record(id, json!({"reborn": true}), MergeStrategy::Replace)
        .await
        .expect("write");
    assert_eq!(
        change(&mut again).await,
        updated(json!({"reborn": true}), 1)
    );
}

async fn writes_are_refused_where_not_writable(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let alice = client(&server.url()).await;
    for id in ["doc:read-only", "unexposed"] {
        match alice
            .write_record(id, json!({"x": 1}), MergeStrategy::Replace)
            .await
        {
            Err(ClientError::Command(failure)) => {
                assert_eq!(failure.code, "EFORBIDDEN", "{id}");
                assert!(failure.error.contains(id), "{}", failure.error);
            }
            other => panic!("{id}: {other:?}"),
        }
        assert_eq!(
            server.mesh.record(id).await.unwrap(),
            None,
            "{id}: nothing stored"
        );
    }
    assert!(matches!(
        alice.subscribe_record("unexposed", RecordMode::Full).await,
        Err(ClientError::Refused(_))
    ));
    assert!(matches!(
        alice.subscribe_collection("unexposed").await,
        Err(ClientError::Refused(_))
    ));
    // A writable record is readable: the client's write reaches its own subscription.
    let mut note = alice
        .subscribe_record("note:mine", RecordMode::Patch)
        .await
        .expect("sub");
    alice
        .write_record("note:mine", json!({"x": 1}), MergeStrategy::Merge)
        .await
        .expect("write");
    assert_eq!(change(&mut note).await, updated(json!({"x": 1}), 1));
}

async fn collections_snapshot_diffs_and_member_updates(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let alice = client(&server.url()).await;
    let write = |id: &'static str, value: Value| {
        let mesh = server.mesh.clone();
        async move {
            mesh.write_record(id, value, MergeStrategy::Replace)
                .await
                .expect("write")
        }
    };
    write("task:1", json!({"n": 1})).await;
    write("task:2", json!({"n": 2})).await;
    write("note:outside", json!({"n": 0})).await;
    let mut tasks = alice.subscribe_collection("tasks").await.expect("sub");
    assert_eq!(tasks.collection_id(), "tasks");
    assert_eq!(tasks.ids(), ["task:1", "task:2"]);
    assert_eq!(
        tasks.records(),
        [
            ("task:1".to_owned(), json!({"n": 1})),
            ("task:2".to_owned(), json!({"n": 2}))
        ]
    );
    assert_eq!(tasks.version(), 1);
    let bob = client(&server.url()).await;
    let (seen, mut by_callback) = mpsc::unbounded_channel();
    let snapshot = bob
        .subscribe_collection_with("tasks", move |change| {
            let _ = seen.send(change);
        })
        .await
        .expect("sub");
    assert_eq!(snapshot.ids, ["task:1", "task:2"]);

    write("task:3", json!({"n": 3})).await;
    let added = CollectionChange::Diff {
        added: vec![("task:3".to_owned(), json!({"n": 3}))],
        removed: vec![],
        version: 2,
    };
    assert_eq!(diff(&mut tasks).await, added);
    assert_eq!(
        within("a diff", async {
            loop {
                let change = recv_within(&mut by_callback).await;
                if matches!(change, CollectionChange::Diff { .. }) {
                    return change;
                }
            }
        })
        .await,
        added
    );
    // As with mesh's client: a record that joined because it was written then comes as
    // an update too.
    let joined_update = CollectionChange::RecordUpdated {
        id: "task:3".to_owned(),
        value: json!({"n": 3}),
        version: 1,
    };
    assert_eq!(collection_change(&mut tasks).await, joined_update);
    assert_eq!(recv_within(&mut by_callback).await, joined_update);

    write("task:1", json!({"n": 10})).await;
    assert_eq!(
        collection_change(&mut tasks).await,
        CollectionChange::RecordUpdated {
            id: "task:1".to_owned(),
            value: json!({"n": 10}),
            version: 2
        }
    );
    assert!(server.mesh.delete_record("task:2").await.unwrap());
    assert_eq!(
        diff(&mut tasks).await,
        CollectionChange::Diff {
            added: vec![],
            removed: vec!["task:2".to_owned()],
            version: 3
        }
    );
    assert_eq!(tasks.ids(), ["task:1", "task:3"]);
    assert_eq!(
        tasks.records(),
        [
            ("task:1".to_owned(), json!({"n": 10})),
            ("task:3".to_owned(), json!({"n": 3}))
        ]
    );
    assert_eq!(tasks.version(), 3);

    // A member this client also follows in patch mode: the collection still gets whole
    // values. A record outside the collection is not announced.
    let mut direct = alice
        .subscribe_record("task:3", RecordMode::Patch)
        .await
        .expect("sub");
    write("note:outside", json!({"n": 1})).await;
    write("task:3", json!({"n": 3, "done": true})).await;
    assert_eq!(
        change(&mut direct).await,
        updated(json!({"n": 3, "done": true}), 2)
    );
    assert_eq!(
        collection_change(&mut tasks).await,
        CollectionChange::RecordUpdated {
            id: "task:3".to_owned(),
            value: json!({"n": 3, "done": true}),
            version: 2
        }
    );

    assert_eq!(alice.unsubscribe_collection("tasks").await, Ok(true));
    assert_eq!(alice.unsubscribe_collection("tasks").await, Ok(false));
    assert_eq!(within("the end", tasks.next()).await, None);
}

async fn malformed_pushes_are_ignored(backend: Backend) {
    let server = serve(exposed(backend.builder())).await;
    let alice = client(&server.url()).await;
    let (_, mut news) = alice.subscribe_channel("news", None).await.expect("sub");
    let mut note = alice
        .subscribe_record("note:m", RecordMode::Patch)
        .await
        .expect("sub");
    let mut tasks = alice.subscribe_collection("tasks").await.expect("sub");
    let id = alice.connection_id();
    let garbage = [
        (
            "mesh/subscription-message",
            json!({"channel": "news", "message": 42}),
        ),
        ("mesh/subscription-message", json!("news")),
        (
            "mesh/record-update",
            json!({"recordId": "note:m", "version": "1", "full": 1}),
        ),
        (
            "mesh/record-update",
            json!({"recordId": "note:m", "version": 1}),
        ),
        (
            "mesh/record-update",
            json!({"recordId": "note:m", "version": 1, "patch": {"op": 1}}),
        ),
        ("mesh/record-update", json!([1, 2])),
        ("mesh/record-deleted", json!({"recordId": "note:m"})),
        // Well-formed, but about a record this subscription never saw exist.
        (
            "mesh/record-deleted",
            json!({"recordId": "note:m", "version": 7}),
        ),
        (
            "mesh/collection-diff",
            json!({"collectionId": "tasks", "added": "x", "version": 2}),
        ),
        ("mesh/collection-diff", json!({"collectionId": "tasks"})),
        ("mesh/collection-diff", Value::Null),
    ];
    for (command, payload) in &garbage {
        server.mesh.send(&id, command, payload).await.expect("send");
    }
    server
        .mesh
        .write_channel("news", "still here", 0)
        .await
        .expect("write");
    server
        .mesh
        .write_record("note:m", json!({"ok": 1}), MergeStrategy::Replace)
        .await
        .expect("write");
    server
        .mesh
        .write_record("task:m", json!({"ok": 1}), MergeStrategy::Replace)
        .await
        .expect("write");
    assert_eq!(recv_within(&mut news).await, "still here");
    assert_eq!(change(&mut note).await, updated(json!({"ok": 1}), 1));
    assert_eq!(
        diff(&mut tasks).await,
        CollectionChange::Diff {
            added: vec![("task:m".to_owned(), json!({"ok": 1}))],
            removed: vec![],
            version: 2
        }
    );
    assert!(alice.is_connected());
}

async fn everything_is_restored_after_a_reconnect(backend: Backend) {
    // The client stays on the second instance; the first one writes.
    let first = serve(exposed(backend.builder())).await;
    let second = serve(exposed(backend.builder())).await;
    // A backoff long enough to write while it is away.
    let alice = client_with_backoff(&second.url(), Duration::from_millis(300)).await;
    let write = |id: &'static str, value: Value| {
        let mesh = first.mesh.clone();
        async move {
            mesh.write_record(id, value, MergeStrategy::Replace)
                .await
                .expect("write")
        }
    };
    write("note:r", json!({"step": 1})).await;
    write("note:same", json!({"still": true})).await;
    write("task:1", json!({"n": 1})).await;
    let (_, mut news) = alice.subscribe_channel("news", None).await.expect("sub");
    let mut record = alice
        .subscribe_record("note:r", RecordMode::Patch)
        .await
        .expect("sub");
    let mut same = alice
        .subscribe_record("note:same", RecordMode::Full)
        .await
        .expect("sub");
    let mut tasks = alice.subscribe_collection("tasks").await.expect("sub");
    assert_eq!(record.version(), 1);

    let old_id = alice.connection_id();
    let mut events = alice.events();
    alice.force_reconnect().await;
    loop {
        let event = within("the disconnect", events.recv())
            .await
            .expect("events");
        if event == ClientEvent::Disconnected {
            break;
        }
    }
    // Written while the client is away.
    write("note:r", json!({"step": 2, "away": true})).await;
    let new_id = wait_reconnected(&mut events).await;
    assert_ne!(new_id, old_id);
    assert_eq!(alice.connection_id(), new_id);

    // Caught up before the reconnect was announced: the record that changed says so,
    // the one that did not says nothing, and the collection starts afresh.
    assert_eq!(
        record.try_next(),
        Some(updated(json!({"step": 2, "away": true}), 2))
    );
    assert_eq!(same.try_next(), None);
    let snapshot = match tasks.try_next() {
        Some(CollectionChange::Snapshot(snapshot)) => snapshot,
        other => panic!("a snapshot after the reconnect, got {other:?}"),
    };
    assert_eq!(snapshot.ids, ["task:1"]);
    assert_eq!(snapshot.records, [("task:1".to_owned(), json!({"n": 1}))]);
    assert_eq!(snapshot.version, 1);

    // And everything is live on the new connection.
    first
        .mesh
        .write_channel("news", "after", 0)
        .await
        .expect("write");
    assert_eq!(recv_within(&mut news).await, "after");
    write("note:r", json!({"step": 3})).await;
    assert_eq!(change(&mut record).await, updated(json!({"step": 3}), 3));
    write("task:2", json!({"n": 2})).await;
    assert_eq!(
        diff(&mut tasks).await,
        CollectionChange::Diff {
            added: vec![("task:2".to_owned(), json!({"n": 2}))],
            removed: vec![],
            version: 2
        }
    );
    assert_eq!(
        collection_change(&mut tasks).await,
        CollectionChange::RecordUpdated {
            id: "task:2".to_owned(),
            value: json!({"n": 2}),
            version: 1
        }
    );
    write("task:1", json!({"n": 11})).await;
    assert_eq!(
        collection_change(&mut tasks).await,
        CollectionChange::RecordUpdated {
            id: "task:1".to_owned(),
            value: json!({"n": 11}),
            version: 2
        }
    );
    // A second reconnect works the same way.
    reconnect(&alice).await;
    write("note:r", json!({"step": 4})).await;
    assert_eq!(change(&mut record).await, updated(json!({"step": 4}), 4));
}
