//! Collections (issue 5): snapshots, diffs when records join or leave, member updates as
//! record updates, resolvers that get the collection id and run only for records their
//! collections can hold, access guards and the record read rules, unsubscribing,
//! cleanup on disconnect, bad input and limits, on both backends and over real
//! WebSockets. Writers and subscribers sit on different instances of one mesh wherever
//! that applies.
//!
//! A collection re-resolves in a task of its own after a short debounce, so a broadcast
//! marker does not tell that it is done. "No diff" is shown with probes instead: every
//! subscriber also subscribes to the collection `probe`, and [`settle`] creates two probe
//! records one after the other, awaiting each one's diff. Re-resolutions of one
//! connection run one at a time, in the order their changes arrived, so by the second
//! probe's diff every re-resolution caused by an earlier write has run, and its diff (if
//! any) has arrived.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tower_mesh::{
    Access, BoxError, Collection, Connection, MergeStrategy, Mesh, MeshBuilder, PresenceOptions,
    Regex,
};

use crate::common::*;

conformance!(
    matching_collection_snapshot_and_diffs_across_instances,
    added_members_carry_their_id,
    member_updates_are_record_updates_without_diffs,
    resolver_gets_the_collection_id_and_runs_only_for_records_it_can_hold,
    value_changes_move_members_between_resolved_collections,
    access_guard_and_unexposed_collections_are_refused,
    members_pass_the_record_read_rules,
    unsubscribe_returns_true_then_false_and_stops_everything,
    patch_subscription_and_membership_on_one_connection,
    subscriptions_end_when_the_connection_closes,
    bad_collection_input_is_einvalid,
    collection_subscription_limit_answers_eoverloaded,
    resubscribing_while_another_instance_writes_a_member_never_goes_backwards,
    a_resolver_by_id_runs_once_per_change_for_every_local_subscriber,
    writes_to_records_a_collection_cannot_hold_resolve_nothing,
    a_snapshot_holds_the_leading_members_that_fit_and_the_rest_get_no_updates,
    a_diff_holds_the_leading_members_that_fit_and_the_rest_get_no_updates,
);

// ---------------------------------------------------------------------------------------
// Helpers.

const DIFF: &str = "mesh/collection-diff";
const UPDATE: &str = "mesh/record-update";
const DELETED: &str = "mesh/record-deleted";
const PROBE: &str = "probe";

async fn subscribe(client: &mut RawClient, id: u64, collection: &str) -> Value {
    call(
        client,
        id,
        "mesh/subscribe-collection",
        json!({ "collectionId": collection }),
    )
    .await
}

async fn unsubscribe(client: &mut RawClient, id: u64, collection: &str) -> Value {
    call(
        client,
        id,
        "mesh/unsubscribe-collection",
        json!({ "collectionId": collection }),
    )
    .await
}

/// Subscribes to the probe collection (used by [`settle`]); it holds nothing yet.
async fn subscribe_probe(client: &mut RawClient, id: u64) {
    let reply = subscribe(client, id, PROBE).await;
    assert_eq!(reply["success"], true, "{reply}");
}

fn is_diff_of(frame: &Value, collection: &str) -> bool {
    frame.get("id").is_none()
        && frame["command"] == DIFF
        && frame["payload"]["collectionId"] == collection
}

/// Reads until the next diff of `collection`; returns the frames before it (noise
/// dropped) and the diff exactly as the server wrote it.
async fn next_diff_text(client: &mut RawClient, collection: &str) -> (Vec<Value>, String) {
    within(&format!("a diff of {collection}"), async {
        let mut before = Vec::new();
        loop {
            let text = client.next_text().await;
            let frame: Value = serde_json::from_str(&text).expect("JSON");
            if is_diff_of(&frame, collection) {
                return (before, text);
            }
            if !is_noise(&frame) {
                before.push(frame);
            }
        }
    })
    .await
}

/// The next frame that is not noise.
async fn next_frame(client: &mut RawClient) -> Value {
    within("the next frame", async {
        loop {
            let frame: Value = serde_json::from_str(&client.next_text().await).expect("JSON");
            if !is_noise(&frame) {
                return frame;
            }
        }
    })
    .await
}

/// Like [`next_diff_text`], with the diff's payload.
async fn next_diff(client: &mut RawClient, collection: &str) -> (Vec<Value>, Value) {
    let (before, text) = next_diff_text(client, collection).await;
    let frame: Value = serde_json::from_str(&text).expect("JSON");
    (before, frame["payload"].clone())
}

/// Asserts that the next diff of `collection` is `expected` and that nothing else came
/// before it.
async fn expect_only_diff(client: &mut RawClient, collection: &str, expected: Value) {
    let (before, diff) = next_diff(client, collection).await;
    assert_eq!(diff, expected);
    assert!(before.is_empty(), "frames before the diff: {before:?}");
}

/// Asserts that the next diff of `collection` is `expected`, with nothing before it, and
/// that the update of the record it added, `record_id` at `version`, follows it: mesh
/// tells a record that joins a collection because it was written twice, in that order.
async fn expect_diff_then_update(
    client: &mut RawClient,
    collection: &str,
    expected: Value,
    (record_id, value, version): (&str, Value, u64),
) {
    expect_only_diff(client, collection, expected).await;
    assert_eq!(
        next_frame(client).await,
        full(record_id, value, version),
        "the update of the record that joined, after the diff"
    );
}

/// Creates two probe records one after the other and awaits each one's diff on every
/// client (all subscribed to [`PROBE`]); returns the other frames each client received
/// meanwhile. By the second probe's diff, every re-resolution caused by an earlier write
/// has run on each client's connection: they run one at a time, in order.
async fn settle(mesh: &Mesh, clients: &mut [&mut RawClient], tag: &str) -> Vec<Vec<Value>> {
    let mut others = vec![Vec::new(); clients.len()];
    for round in 1..=2 {
        let id = format!("probe:{tag}:{round}");
        mesh.write_record(&id, json!({ "round": round }), MergeStrategy::Replace)
            .await
            .expect("write probe");
        for (client, seen) in clients.iter_mut().zip(others.iter_mut()) {
            let (before, diff) = next_diff(client, PROBE).await;
            assert_eq!(
                diff["added"],
                json!([{ "id": id, "round": round }]),
                "probe diff: {diff}"
            );
            // As mesh does: a record that joins because it was written is followed by
            // its update, with the whole value.
            assert_eq!(
                next_frame(client).await,
                full(&id, json!({ "round": round }), 1),
                "the probe's update after its diff"
            );
            seen.extend(before);
        }
    }
    others
}

/// Asserts that [`settle`] saw nothing else arrive on any client.
async fn assert_settled_quietly(mesh: &Mesh, clients: &mut [&mut RawClient], tag: &str) {
    for frames in settle(mesh, clients, tag).await {
        assert!(frames.is_empty(), "unexpected frames: {frames:?}");
    }
}

async fn delete(mesh: &Mesh, record_id: &str) -> bool {
    mesh.delete_record(record_id).await.expect("delete_record")
}

fn regex(source: &str) -> Regex {
    Regex::new(source).expect("regex")
}

/// A builder with the probe collection (and its records) exposed.
fn with_probe(backend: &Backend) -> MeshBuilder {
    backend
        .builder()
        .expose_record(regex("^probe:"), Access::open())
        .expose_collection(PROBE, Collection::matching(regex("^probe:")))
}

/// [`with_probe`], the `tasks` collection of every `task:` record, and every `task:`
/// and `other:` record readable.
fn with_tasks(backend: &Backend) -> MeshBuilder {
    with_probe(backend)
        .expose_record(regex("^(task|other):"), Access::open())
        .expose_collection("tasks", Collection::matching(regex("^task:")))
}

fn diff(collection: &str, added: Value, removed: Value, version: u64) -> Value {
    json!({ "collectionId": collection, "added": added, "removed": removed, "version": version })
}

fn full(record_id: &str, value: Value, version: u64) -> Value {
    json!({ "command": UPDATE, "payload": { "recordId": record_id, "full": value, "version": version } })
}

fn refused() -> Value {
    json!({ "success": false, "ids": [], "records": [], "version": 0 })
}

// ---------------------------------------------------------------------------------------
// Matching collections.

async fn matching_collection_snapshot_and_diffs_across_instances(backend: Backend) {
    let a = serve(with_tasks(&backend)).await;
    let b = serve(with_tasks(&backend)).await;
    // Written out of order; ids come sorted.
    write_record(&b.mesh, "task:3", json!({"title": "three"})).await;
    write_record(&b.mesh, "task:1", json!({"title": "one"})).await;
    write_record(&b.mesh, "task:2", json!({"title": "two"})).await;
    write_record(&b.mesh, "other:1", json!({"title": "not a task"})).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;

    on_a.send_text(
        r#"{"id":1,"command":"mesh/subscribe-collection","payload":{"collectionId":"tasks"}}"#,
    )
    .await;
    assert_eq!(
        within("the subscribe reply", on_a.next_text()).await,
        r#"{"id":1,"command":"mesh/subscribe-collection","payload":{"success":true,"ids":["task:1","task:2","task:3"],"records":[{"id":"task:1","record":{"title":"one"}},{"id":"task:2","record":{"title":"two"}},{"id":"task:3","record":{"title":"three"}}],"version":1}}"#
    );
    assert_eq!(
        subscribe(&mut on_b, 1, "tasks").await,
        json!({"success": true, "ids": ["task:1", "task:2", "task:3"], "records": [
            {"id": "task:1", "record": {"title": "one"}},
            {"id": "task:2", "record": {"title": "two"}},
            {"id": "task:3", "record": {"title": "three"}},
        ], "version": 1})
    );
    for client in [&mut on_a, &mut on_b] {
        subscribe_probe(client, 2).await;
    }

    // A matching record is created (through A): on each instance one diff, its record
    // carrying its id first, then (as mesh sends it) the record's update with its whole
    // value and version. These two frames are the golden sequence of docs/protocol.md §4.6.
    write_record(&a.mesh, "task:4", json!({"title": "four", "done": false})).await;
    for client in [&mut on_a, &mut on_b] {
        let (before, text) = next_diff_text(client, "tasks").await;
        assert_eq!(
            text,
            r#"{"command":"mesh/collection-diff","payload":{"collectionId":"tasks","added":[{"id":"task:4","title":"four","done":false}],"removed":[],"version":2}}"#
        );
        assert!(before.is_empty(), "{before:?}");
        assert_eq!(
            within("the update after the diff", client.next_text()).await,
            r#"{"command":"mesh/record-update","payload":{"recordId":"task:4","full":{"title":"four","done":false},"version":1}}"#
        );
    }
    assert_settled_quietly(&b.mesh, &mut [&mut on_a, &mut on_b], "created").await;

    // A member is deleted (through B): a diff removing it, and no deletion notice (as
    // with mesh, which tells only the record's own subscribers).
    assert!(delete(&b.mesh, "task:2").await);
    for client in [&mut on_a, &mut on_b] {
        expect_only_diff(
            client,
            "tasks",
            diff("tasks", json!([]), json!([{"id": "task:2"}]), 3),
        )
        .await;
    }
    assert_settled_quietly(&a.mesh, &mut [&mut on_a, &mut on_b], "deleted").await;

    // Records the collection does not match change nothing.
    write_record(&a.mesh, "other:2", json!({"new": true})).await;
    write_record(&b.mesh, "other:1", json!({"title": "changed"})).await;
    assert!(delete(&a.mesh, "other:1").await);
    assert!(!delete(&b.mesh, "task:missing").await);
    assert_settled_quietly(&a.mesh, &mut [&mut on_a, &mut on_b], "others").await;

    // The removed member is no longer held: created again, it joins by a diff and its
    // update, from version 1.
    write_record(&b.mesh, "task:2", json!({"title": "two again"})).await;
    for client in [&mut on_a, &mut on_b] {
        expect_diff_then_update(
            client,
            "tasks",
            diff(
                "tasks",
                json!([{"id": "task:2", "title": "two again"}]),
                json!([]),
                4,
            ),
            ("task:2", json!({"title": "two again"}), 1),
        )
        .await;
    }
    // A fresh subscriber sees the current members at version 1.
    let mut fresh = RawClient::connect(&b.url()).await;
    let reply = subscribe(&mut fresh, 1, "tasks").await;
    assert_eq!(
        reply["ids"],
        json!(["task:1", "task:2", "task:3", "task:4"])
    );
    assert_eq!(reply["version"], 1);
    assert_eq!(
        reply["records"][1],
        json!({"id": "task:2", "record": {"title": "two again"}})
    );
}

async fn added_members_carry_their_id(backend: Backend) {
    let a = serve(with_tasks(&backend)).await;
    let b = serve(with_tasks(&backend)).await;
    let mut client = RawClient::connect(&a.url()).await;
    assert_eq!(
        subscribe(&mut client, 1, "tasks").await,
        json!({"success": true, "ids": [], "records": [], "version": 1})
    );
    // Values that are not objects come as {"id", "$value"} (README); an object's own
    // "id" field gives way to the record's id.
    let cases = [
        (
            "task:a",
            json!("text"),
            json!({"id": "task:a", "$value": "text"}),
        ),
        (
            "task:b",
            json!([1, 2]),
            json!({"id": "task:b", "$value": [1, 2]}),
        ),
        ("task:c", json!(7), json!({"id": "task:c", "$value": 7})),
        (
            "task:d",
            Value::Null,
            json!({"id": "task:d", "$value": null}),
        ),
        (
            "task:e",
            json!({"id": "custom", "x": 1}),
            json!({"id": "task:e", "x": 1}),
        ),
    ];
    for (n, (record_id, value, member)) in cases.into_iter().enumerate() {
        write_record(&b.mesh, record_id, value.clone()).await;
        // The update carries the value as stored (its own `id` too).
        expect_diff_then_update(
            &mut client,
            "tasks",
            diff("tasks", json!([member]), json!([]), n as u64 + 2),
            (record_id, value, 1),
        )
        .await;
    }
    // The snapshot lists the same records whole.
    let mut fresh = RawClient::connect(&b.url()).await;
    let reply = subscribe(&mut fresh, 1, "tasks").await;
    assert_eq!(
        reply["records"],
        json!([
            {"id": "task:a", "record": "text"},
            {"id": "task:b", "record": [1, 2]},
            {"id": "task:c", "record": 7},
            {"id": "task:d", "record": null},
            {"id": "task:e", "record": {"id": "custom", "x": 1}},
        ])
    );
}

async fn member_updates_are_record_updates_without_diffs(backend: Backend) {
    let a = serve(with_tasks(&backend)).await;
    let b = serve(with_tasks(&backend)).await;
    write_record(&a.mesh, "task:1", json!({"title": "one"})).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            subscribe(client, 1, "tasks").await["ids"],
            json!(["task:1"])
        );
        subscribe_probe(client, 2).await;
    }

    // Updated through B: each subscriber gets the whole new value, and no diff.
    write_record(&b.mesh, "task:1", json!({"title": "one", "done": true})).await;
    b.mesh
        .write_record("task:1", json!({"note": "n"}), MergeStrategy::Merge)
        .await
        .expect("merge");
    // A write that changes nothing sends nothing.
    write_record(
        &a.mesh,
        "task:1",
        json!({"title": "one", "done": true, "note": "n"}),
    )
    .await;
    for frames in settle(&a.mesh, &mut [&mut on_a, &mut on_b], "updated").await {
        assert_eq!(
            frames,
            [
                full("task:1", json!({"title": "one", "done": true}), 2),
                full(
                    "task:1",
                    json!({"title": "one", "done": true, "note": "n"}),
                    3
                ),
            ]
        );
    }
    // Membership changes still count on from version 1: no version was spent.
    write_record(&a.mesh, "task:2", json!({})).await;
    for client in [&mut on_a, &mut on_b] {
        expect_diff_then_update(
            client,
            "tasks",
            diff("tasks", json!([{"id": "task:2"}]), json!([]), 2),
            ("task:2", json!({}), 1),
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// Resolved collections.

/// Messages to each user: collection `inbox:<user>` holds the `message:` records whose
/// `to` is that user. Every resolver call is logged with its collection id.
fn with_inboxes(backend: &Backend, calls: &Arc<Mutex<Vec<String>>>) -> MeshBuilder {
    let calls = calls.clone();
    with_probe(backend)
        .expose_record(regex("^(message|note):"), Access::open())
        .expose_collection(
            regex("^inbox:"),
            Collection::resolved_by(move |mesh: Mesh, _connection: Connection, id: String| {
                let calls = calls.clone();
                async move {
                    calls.lock().unwrap().push(id.clone());
                    let user = id.trim_start_matches("inbox:").to_owned();
                    let mine = mesh
                        .list_records_matching(regex("^message:"))
                        .await?
                        .into_iter()
                        .filter(|(_, message)| message["to"] == user.as_str())
                        .map(|(id, _)| id)
                        .collect();
                    Ok::<Vec<String>, BoxError>(mine)
                }
            })
            .holding(regex("^message:")),
        )
}

fn taken(calls: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    std::mem::take(&mut *calls.lock().unwrap())
}

async fn resolver_gets_the_collection_id_and_runs_only_for_records_it_can_hold(backend: Backend) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let a = serve(with_inboxes(&backend, &calls)).await;
    let b = serve(with_inboxes(&backend, &calls)).await;
    write_record(&a.mesh, "message:1", json!({"to": "ann", "text": "hi ann"})).await;
    write_record(&a.mesh, "message:2", json!({"to": "bob", "text": "hi bob"})).await;
    write_record(&a.mesh, "message:3", json!({"to": "ann", "text": "again"})).await;
    let mut ann = RawClient::connect(&a.url()).await;
    let mut bob = RawClient::connect(&b.url()).await;

    // One exposure, two collection ids, two different sets.
    assert_eq!(
        subscribe(&mut ann, 1, "inbox:ann").await,
        json!({"success": true, "ids": ["message:1", "message:3"], "records": [
            {"id": "message:1", "record": {"to": "ann", "text": "hi ann"}},
            {"id": "message:3", "record": {"to": "ann", "text": "again"}},
        ], "version": 1})
    );
    assert_eq!(
        subscribe(&mut bob, 1, "inbox:bob").await,
        json!({"success": true, "ids": ["message:2"], "records": [
            {"id": "message:2", "record": {"to": "bob", "text": "hi bob"}},
        ], "version": 1})
    );
    assert_eq!(taken(&calls), ["inbox:ann", "inbox:bob"]);
    for client in [&mut ann, &mut bob] {
        subscribe_probe(client, 2).await;
    }

    // Writes to records outside `holding` (the probes included) never run the resolver.
    write_record(&a.mesh, "note:1", json!({"to": "ann"})).await;
    write_record(&b.mesh, "note:1", json!({"to": "bob"})).await;
    assert!(delete(&a.mesh, "note:1").await);
    assert_settled_quietly(&b.mesh, &mut [&mut ann, &mut bob], "outside").await;
    assert_eq!(taken(&calls), Vec::<String>::new());

    // A write inside `holding` re-resolves each subscription once; only bob's changed.
    write_record(&a.mesh, "message:4", json!({"to": "bob", "text": "new"})).await;
    expect_diff_then_update(
        &mut bob,
        "inbox:bob",
        diff(
            "inbox:bob",
            json!([{"id": "message:4", "to": "bob", "text": "new"}]),
            json!([]),
            2,
        ),
        ("message:4", json!({"to": "bob", "text": "new"}), 1),
    )
    .await;
    assert_settled_quietly(&a.mesh, &mut [&mut ann, &mut bob], "inside").await;
    assert_eq!(sorted(taken(&calls)), ["inbox:ann", "inbox:bob"]);

    // A deletion inside `holding` too.
    assert!(delete(&b.mesh, "message:3").await);
    expect_only_diff(
        &mut ann,
        "inbox:ann",
        diff("inbox:ann", json!([]), json!([{"id": "message:3"}]), 2),
    )
    .await;
    assert_settled_quietly(&a.mesh, &mut [&mut ann, &mut bob], "deleted").await;
    assert_eq!(sorted(taken(&calls)), ["inbox:ann", "inbox:bob"]);
}

async fn value_changes_move_members_between_resolved_collections(backend: Backend) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let a = serve(with_inboxes(&backend, &calls)).await;
    let b = serve(with_inboxes(&backend, &calls)).await;
    write_record(&a.mesh, "message:1", json!({"to": "ann", "text": "hi"})).await;
    let mut ann = RawClient::connect(&a.url()).await;
    let mut bob = RawClient::connect(&b.url()).await;
    assert_eq!(
        subscribe(&mut ann, 1, "inbox:ann").await["ids"],
        json!(["message:1"])
    );
    assert_eq!(subscribe(&mut bob, 1, "inbox:bob").await["ids"], json!([]));
    for client in [&mut ann, &mut bob] {
        subscribe_probe(client, 2).await;
    }

    // An update that keeps it in ann's inbox: a record update for ann, no diff for anyone.
    write_record(&b.mesh, "message:1", json!({"to": "ann", "text": "edited"})).await;
    let seen = settle(&b.mesh, &mut [&mut ann, &mut bob], "kept").await;
    assert_eq!(
        seen[0],
        [full("message:1", json!({"to": "ann", "text": "edited"}), 2)]
    );
    assert!(seen[1].is_empty(), "{:?}", seen[1]);

    // An update that readdresses it: it leaves ann's inbox and joins bob's.
    write_record(&b.mesh, "message:1", json!({"to": "bob", "text": "edited"})).await;
    let (before, left) = next_diff(&mut ann, "inbox:ann").await;
    assert_eq!(
        left,
        diff("inbox:ann", json!([]), json!([{"id": "message:1"}]), 2)
    );
    // Ann still held it when it changed, so she heard the change first.
    assert_eq!(
        before,
        [full("message:1", json!({"to": "bob", "text": "edited"}), 3)]
    );
    expect_diff_then_update(
        &mut bob,
        "inbox:bob",
        diff(
            "inbox:bob",
            json!([{"id": "message:1", "to": "bob", "text": "edited"}]),
            json!([]),
            2,
        ),
        ("message:1", json!({"to": "bob", "text": "edited"}), 3),
    )
    .await;
    // From now on its changes reach bob, not ann.
    write_record(&a.mesh, "message:1", json!({"to": "bob", "text": "final"})).await;
    let seen = settle(&a.mesh, &mut [&mut ann, &mut bob], "moved").await;
    assert!(seen[0].is_empty(), "{:?}", seen[0]);
    assert_eq!(
        seen[1],
        [full("message:1", json!({"to": "bob", "text": "final"}), 4)]
    );
}

// ---------------------------------------------------------------------------------------
// Access.

async fn access_guard_and_unexposed_collections_are_refused(backend: Backend) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let guard_seen = seen.clone();
    let builder = |backend: &Backend| {
        let guard_seen = guard_seen.clone();
        with_tasks(backend).expose_collection(
            regex("^team:"),
            Collection::matching(regex("^task:")).access(Access::guarded(
                move |connection: Connection, id: String| {
                    let seen = guard_seen.clone();
                    async move {
                        seen.lock().unwrap().push(id);
                        connection.headers().contains_key("x-member")
                    }
                },
            )),
        )
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    write_record(&b.mesh, "task:1", json!({"t": 1})).await;
    let mut member = RawClient::connect_request(ws_request(&a.url(), &[("x-member", "1")])).await;
    let mut outsider = RawClient::connect(&a.url()).await;

    assert_eq!(
        outsider
            .command_within(
                1,
                "mesh/subscribe-collection",
                json!({"collectionId": "team:red"})
            )
            .await,
        json!({"id": 1, "command": "mesh/subscribe-collection", "payload": refused()})
    );
    assert_eq!(
        subscribe(&mut member, 1, "team:red").await,
        json!({"success": true, "ids": ["task:1"],
               "records": [{"id": "task:1", "record": {"t": 1}}], "version": 1})
    );
    assert_eq!(*seen.lock().unwrap(), ["team:red", "team:red"]);
    // Not exposed at all: refused, whoever asks.
    for (n, id) in ["nope", "team", "tasks:1", "Tasks"].into_iter().enumerate() {
        assert_eq!(
            subscribe(&mut member, 10 + n as u64, id).await,
            refused(),
            "{id}"
        );
    }
    // A refused subscription hears nothing and has nothing to undo.
    for client in [&mut member, &mut outsider] {
        subscribe_probe(client, 20).await;
    }
    // (The member's update is published before the creation, so it arrives before the
    // creation's diff, which follows a debounce.)
    write_record(&b.mesh, "task:1", json!({"t": 11})).await;
    write_record(&b.mesh, "task:2", json!({"t": 2})).await;
    let (before, added) = next_diff(&mut member, "team:red").await;
    assert_eq!(
        added,
        diff("team:red", json!([{"id": "task:2", "t": 2}]), json!([]), 2)
    );
    assert_eq!(before, [full("task:1", json!({"t": 11}), 2)]);
    let seen_frames = settle(&b.mesh, &mut [&mut outsider, &mut member], "refused").await;
    assert!(seen_frames[0].is_empty(), "{:?}", seen_frames[0]);
    assert_eq!(unsubscribe(&mut outsider, 30, "team:red").await, false);
    assert_eq!(unsubscribe(&mut outsider, 31, "nope").await, false);
}

async fn members_pass_the_record_read_rules(backend: Backend) {
    let builder = |backend: &Backend| {
        with_probe(backend)
            .expose_record(regex("^task:"), Access::open())
            .expose_record(
                "task:secret",
                Access::guarded(|connection: Connection, _id: String| async move {
                    connection.headers().contains_key("x-cleared")
                }),
            )
            .expose_record(
                "task:sealed",
                Access::guarded(|_connection: Connection, _id: String| async { false }),
            )
            .expose_collection("tasks", Collection::matching(regex("^task:")))
            // Records it matches that are not exposed at all are left out too.
            .expose_collection("items", Collection::matching(regex("^item:")))
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    for id in ["task:1", "task:secret", "task:sealed", "item:1"] {
        write_record(&b.mesh, id, json!({"id": id})).await;
    }
    let mut plain = RawClient::connect(&a.url()).await;
    let mut cleared = RawClient::connect_request(ws_request(&a.url(), &[("x-cleared", "1")])).await;

    assert_eq!(
        subscribe(&mut plain, 1, "tasks").await,
        json!({"success": true, "ids": ["task:1"],
               "records": [{"id": "task:1", "record": {"id": "task:1"}}], "version": 1})
    );
    assert_eq!(
        subscribe(&mut cleared, 1, "tasks").await["ids"],
        json!(["task:1", "task:secret"])
    );
    assert_eq!(
        subscribe(&mut plain, 2, "items").await,
        json!({"success": true, "ids": [], "records": [], "version": 1})
    );
    for client in [&mut plain, &mut cleared] {
        subscribe_probe(client, 3).await;
    }
    // Changes to records a connection may not read never reach it.
    write_record(&b.mesh, "task:secret", json!({"changed": true})).await;
    write_record(&b.mesh, "task:sealed", json!({"changed": true})).await;
    write_record(&b.mesh, "item:2", json!({})).await;
    let seen = settle(&b.mesh, &mut [&mut plain, &mut cleared], "secret").await;
    assert!(seen[0].is_empty(), "{:?}", seen[0]);
    assert_eq!(seen[1], [full("task:secret", json!({"changed": true}), 2)]);
}

// ---------------------------------------------------------------------------------------
// Unsubscribing and connection-level behaviour.

async fn unsubscribe_returns_true_then_false_and_stops_everything(backend: Backend) {
    let a = serve(with_tasks(&backend)).await;
    let b = serve(with_tasks(&backend)).await;
    write_record(&b.mesh, "task:1", json!({"n": 1})).await;
    let mut leaver = RawClient::connect(&a.url()).await;
    let mut stayer = RawClient::connect(&a.url()).await;
    for client in [&mut leaver, &mut stayer] {
        assert_eq!(
            subscribe(client, 1, "tasks").await["ids"],
            json!(["task:1"])
        );
        subscribe_probe(client, 2).await;
    }

    assert_eq!(
        leaver
            .command_within(
                3,
                "mesh/unsubscribe-collection",
                json!({"collectionId": "tasks"})
            )
            .await,
        json!({"id": 3, "command": "mesh/unsubscribe-collection", "payload": true})
    );
    assert_eq!(unsubscribe(&mut leaver, 4, "tasks").await, false);
    assert_eq!(unsubscribe(&mut leaver, 5, "never").await, false);

    // Neither diffs nor member updates reach it any more; the other subscriber of the
    // same instance still hears both.
    write_record(&b.mesh, "task:1", json!({"n": 11})).await;
    write_record(&b.mesh, "task:2", json!({"n": 2})).await;
    let (before, added) = next_diff(&mut stayer, "tasks").await;
    assert_eq!(
        added,
        diff("tasks", json!([{"id": "task:2", "n": 2}]), json!([]), 2)
    );
    assert_eq!(before, [full("task:1", json!({"n": 11}), 2)]);
    assert_eq!(
        next_frame(&mut stayer).await,
        full("task:2", json!({"n": 2}), 1)
    );
    assert!(delete(&b.mesh, "task:1").await);
    expect_only_diff(
        &mut stayer,
        "tasks",
        diff("tasks", json!([]), json!([{"id": "task:1"}]), 3),
    )
    .await;
    let seen = settle(&b.mesh, &mut [&mut leaver, &mut stayer], "after").await;
    assert!(seen[0].is_empty(), "{:?}", seen[0]);
    assert!(seen[1].is_empty(), "{:?}", seen[1]);

    // Subscribing again starts over at version 1 with the current members.
    assert_eq!(
        subscribe(&mut leaver, 6, "tasks").await,
        json!({"success": true, "ids": ["task:2"],
               "records": [{"id": "task:2", "record": {"n": 2}}], "version": 1})
    );
    write_record(&a.mesh, "task:3", json!({})).await;
    expect_diff_then_update(
        &mut leaver,
        "tasks",
        diff("tasks", json!([{"id": "task:3"}]), json!([]), 2),
        ("task:3", json!({}), 1),
    )
    .await;
}

async fn patch_subscription_and_membership_on_one_connection(backend: Backend) {
    let a = serve(with_tasks(&backend)).await;
    let b = serve(with_tasks(&backend)).await;
    write_record(&b.mesh, "task:1", json!({"n": 1})).await;
    let mut both = RawClient::connect(&a.url()).await;
    let mut full_and_member = RawClient::connect(&a.url()).await;
    assert_eq!(
        call(
            &mut both,
            1,
            "mesh/subscribe-record",
            json!({"recordId": "task:1", "mode": "patch"}),
        )
        .await,
        json!({"success": true, "record": {"n": 1}, "version": 1})
    );
    assert_eq!(
        subscribe(&mut both, 2, "tasks").await["ids"],
        json!(["task:1"])
    );
    call(
        &mut full_and_member,
        1,
        "mesh/subscribe-record",
        json!({"recordId": "task:1"}),
    )
    .await;
    subscribe(&mut full_and_member, 2, "tasks").await;

    // One frame per write: the patch the direct subscription asked for, and the whole
    // value the collection needs.
    write_record(&b.mesh, "task:1", json!({"n": 2})).await;
    let before = frames_before_marker(
        &b.mesh,
        "marker-1",
        &mut [&mut both, &mut full_and_member],
        Noise::Dropped,
    )
    .await;
    assert_eq!(
        before[0],
        [json!({"command": UPDATE, "payload": {
            "recordId": "task:1",
            "full": {"n": 2},
            "patch": [{"op": "replace", "path": "/n", "value": 2}],
            "version": 2,
        }})]
    );
    assert_eq!(before[1], [full("task:1", json!({"n": 2}), 2)]);

    // Without the direct subscription, the collection's whole values remain.
    assert_eq!(
        call(
            &mut both,
            3,
            "mesh/unsubscribe-record",
            json!({"recordId": "task:1"}),
        )
        .await,
        true
    );
    write_record(&b.mesh, "task:1", json!({"n": 3})).await;
    let before = frames_before_marker(&b.mesh, "marker-2", &mut [&mut both], Noise::Dropped).await;
    assert_eq!(before[0], [full("task:1", json!({"n": 3}), 3)]);

    // Without the collection, the direct patch subscription alone.
    call(
        &mut both,
        4,
        "mesh/subscribe-record",
        json!({"recordId": "task:1", "mode": "patch"}),
    )
    .await;
    assert_eq!(unsubscribe(&mut both, 5, "tasks").await, true);
    write_record(&b.mesh, "task:1", json!({"n": 4})).await;
    let before = frames_before_marker(&b.mesh, "marker-3", &mut [&mut both], Noise::Dropped).await;
    assert_eq!(
        before[0],
        [json!({"command": UPDATE, "payload": {
            "recordId": "task:1",
            "patch": [{"op": "replace", "path": "/n", "value": 4}],
            "version": 4,
        }})]
    );

    // Neither: nothing.
    call(
        &mut both,
        6,
        "mesh/unsubscribe-record",
        json!({"recordId": "task:1"}),
    )
    .await;
    write_record(&b.mesh, "task:1", json!({"n": 5})).await;
    let before = frames_before_marker(&b.mesh, "marker-4", &mut [&mut both], Noise::Dropped).await;
    assert!(
        before[0].iter().all(is_noise),
        "unexpected frames: {:?}",
        before[0]
    );

    // A deletion: a direct subscriber is told, then its collection's diff says the record
    // left; a subscriber that only holds it through a collection gets the diff alone (as
    // with mesh, whose client would ignore the notice).
    let mut member_only = RawClient::connect(&a.url()).await;
    assert_eq!(
        subscribe(&mut member_only, 1, "tasks").await["ids"],
        json!(["task:1"])
    );
    assert!(delete(&b.mesh, "task:1").await);
    let removed = diff("tasks", json!([]), json!([{"id": "task:1"}]), 2);
    let (before, diff_payload) = next_diff(&mut full_and_member, "tasks").await;
    assert_eq!(diff_payload, removed);
    assert_eq!(
        before
            .into_iter()
            .filter(|frame| frame["command"] == DELETED || frame["command"] == DIFF)
            .collect::<Vec<_>>(),
        [json!({"command": DELETED, "payload": {"recordId": "task:1", "version": 5}})]
    );
    expect_only_diff(&mut member_only, "tasks", removed).await;
}

async fn subscriptions_end_when_the_connection_closes(backend: Backend) {
    let builder =
        |backend: &Backend| with_tasks(backend).track_presence("watched", PresenceOptions::new());
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    write_record(&b.mesh, "task:1", json!({"n": 1})).await;
    let mut goner = RawClient::connect(&a.url()).await;
    let mut stayer = RawClient::connect(&a.url()).await;
    let mut observer = RawClient::connect(&b.url()).await;
    let goner_id = goner.id.clone();
    assert_eq!(
        call(
            &mut observer,
            1,
            "mesh/subscribe-presence",
            json!({"roomName": "watched"})
        )
        .await["success"],
        true
    );
    assert_eq!(
        call(
            &mut goner,
            1,
            "mesh/join-room",
            json!({"roomName": "watched"})
        )
        .await["success"],
        true
    );
    for client in [&mut goner, &mut stayer] {
        assert_eq!(
            subscribe(client, 2, "tasks").await["ids"],
            json!(["task:1"])
        );
        subscribe_probe(client, 3).await;
    }
    // (Wait for the join, so the leave awaited below is the next presence update.)
    let join = observer.push_within("mesh/presence-update").await["payload"].clone();
    assert_eq!(
        (&join["type"], &join["connectionId"]),
        (&json!("join"), &json!(goner_id))
    );

    goner.close().await;
    // Its presence leave is announced after its subscriptions are forgotten.
    let leave = observer.push_within("mesh/presence-update").await["payload"].clone();
    assert_eq!(
        (&leave["type"], &leave["connectionId"]),
        (&json!("leave"), &json!(goner_id))
    );
    assert!(a.mesh.connection(&goner_id).is_none());

    // Changes after that are no trouble: the other subscriber hears them as usual.
    assert_eq!(
        write_record(&a.mesh, "task:1", json!({"n": 11})).await,
        Some(2)
    );
    assert_eq!(
        write_record(&b.mesh, "task:2", json!({"n": 2})).await,
        Some(1)
    );
    let (before, added) = next_diff(&mut stayer, "tasks").await;
    assert_eq!(
        added,
        diff("tasks", json!([{"id": "task:2", "n": 2}]), json!([]), 2)
    );
    assert_eq!(before, [full("task:1", json!({"n": 11}), 2)]);
    assert!(delete(&a.mesh, "task:2").await);
    let (_, removed) = next_diff(&mut stayer, "tasks").await;
    assert_eq!(
        removed,
        diff("tasks", json!([]), json!([{"id": "task:2"}]), 3)
    );
    // A fresh connection on the same instance starts clean.
    let mut fresh = RawClient::connect(&a.url()).await;
    assert_eq!(
        subscribe(&mut fresh, 1, "tasks").await,
        json!({"success": true, "ids": ["task:1"],
               "records": [{"id": "task:1", "record": {"n": 11}}], "version": 1})
    );
    assert_eq!(unsubscribe(&mut fresh, 2, "tasks").await, true);
    assert_eq!(
        a.mesh
            .connections()
            .iter()
            .filter(|connection| connection.id() == goner_id)
            .count(),
        0
    );
}

// ---------------------------------------------------------------------------------------
// Bad input and limits.

async fn bad_collection_input_is_einvalid(backend: Backend) {
    let a = serve(
        with_tasks(&backend).expose_collection(regex(".*"), Collection::matching(regex("^task:"))),
    )
    .await;
    let mut client = RawClient::connect(&a.url()).await;
    let too_long = "x".repeat(tower_mesh::MAX_NAME_BYTES + 1);
    let bad_payloads = [
        json!({}),
        json!({"collectionId": null}),
        json!({"collectionId": 5}),
        json!({"collectionId": ["tasks"]}),
        json!({"collectionId": {"id": "tasks"}}),
        json!({"collectionId": ""}),
        json!({"collectionId": too_long}),
        json!({"collection": "tasks"}),
        json!("tasks"),
        json!(null),
    ];
    let mut id = 0;
    for command in ["mesh/subscribe-collection", "mesh/unsubscribe-collection"] {
        for payload in &bad_payloads {
            id += 1;
            let reply = client.command_within(id, command, payload.clone()).await;
            assert_eq!(reply["id"], id);
            assert_eq!(reply["command"], command);
            assert_eq!(
                reply["payload"]["code"], "EINVALID",
                "{command} {payload}: {reply}"
            );
            assert_eq!(reply["payload"]["name"], "CommandError", "{reply}");
            assert!(reply["payload"]["error"].is_string(), "{reply}");
        }
    }
    // Nothing was subscribed.
    assert_eq!(unsubscribe(&mut client, 900, "tasks").await, false);
    // The connection keeps working, and an id of exactly the limit is fine.
    let longest = "z".repeat(tower_mesh::MAX_NAME_BYTES);
    assert_eq!(
        subscribe(&mut client, 901, &longest).await,
        json!({"success": true, "ids": [], "records": [], "version": 1})
    );
    assert_eq!(unsubscribe(&mut client, 902, &longest).await, true);
}

async fn collection_subscription_limit_answers_eoverloaded(backend: Backend) {
    let a = serve(
        with_tasks(&backend)
            .max_subscriptions_per_connection(2)
            .expose_collection("more", Collection::matching(regex("^task:")))
            .expose_channel("news", Access::open()),
    )
    .await;
    for n in 1..=3 {
        write_record(&a.mesh, &format!("task:{n}"), json!({"n": n})).await;
    }
    let mut client = RawClient::connect(&a.url()).await;
    // The records a collection holds are not subscriptions of their own.
    assert_eq!(
        subscribe(&mut client, 1, "tasks").await["ids"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    assert_eq!(
        call(
            &mut client,
            2,
            "mesh/subscribe-channel",
            json!({"channel": "news"})
        )
        .await["success"],
        true
    );
    for (id, command, payload) in [
        (
            3,
            "mesh/subscribe-collection",
            json!({"collectionId": "more"}),
        ),
        (4, "mesh/subscribe-record", json!({"recordId": "task:1"})),
    ] {
        let reply = client.command_within(id, command, payload).await;
        assert_eq!(
            reply["payload"]["code"], "EOVERLOADED",
            "{command}: {reply}"
        );
    }
    // The refused collection subscription stored nothing.
    assert_eq!(unsubscribe(&mut client, 5, "more").await, false);
    // Subscribing to one it holds is not one more.
    assert_eq!(subscribe(&mut client, 6, "tasks").await["success"], true);
    // Unsubscribing frees a slot.
    assert_eq!(unsubscribe(&mut client, 7, "tasks").await, true);
    assert_eq!(subscribe(&mut client, 8, "more").await["version"], 1);
    let reply = client
        .command_within(
            9,
            "mesh/subscribe-collection",
            json!({"collectionId": "tasks"}),
        )
        .await;
    assert_eq!(reply["payload"]["code"], "EOVERLOADED", "{reply}");
}

// ---------------------------------------------------------------------------------------
// Member streams under continuous writes, and how often resolvers run.

/// docs/protocol.md §7.2, for collection members: a writer on another instance writes a member
/// without pause while a reader subscribes to the collection, follows the member's
/// updates for a while, unsubscribes and subscribes again. After every snapshot the
/// member's updates continue at exactly the snapshot's version + 1, and none arrives
/// between an unsubscribe reply and the next subscribe reply.
async fn resubscribing_while_another_instance_writes_a_member_never_goes_backwards(
    backend: Backend,
) {
    let a = serve(
        backend
            .builder()
            .expose_record(regex("^busy:"), Access::open())
            .expose_collection("busy", Collection::matching(regex("^busy:"))),
    )
    .await;
    let b = serve(backend.builder()).await;
    let writer = ContinuousWriter::start(&b.mesh, "busy:1").await;
    let mut client = RawClient::connect(&a.url()).await;
    let mut id = 0;
    for cycle in 0..10 {
        id += 1;
        client
            .send_json(json!({"id": id, "command": "mesh/subscribe-collection",
                              "payload": {"collectionId": "busy"}}))
            .await;
        let reply = within("the subscribe reply", async {
            loop {
                let frame = client.next().await;
                if frame["id"] == json!(id) {
                    return frame;
                }
                assert_ne!(
                    frame["command"], UPDATE,
                    "cycle {cycle}: an update arrived while unsubscribed: {frame}"
                );
            }
        })
        .await;
        let payload = &reply["payload"];
        assert_eq!(payload["ids"], json!(["busy:1"]), "{reply}");
        let mut document = payload["records"][0]["record"].clone();
        let mut version = document["n"].as_u64().expect("the member's value");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(150);
        let (followed, _) = follow_consecutive_updates(
            &mut client,
            "busy:1",
            &mut document,
            &mut version,
            Some(deadline),
            None,
        )
        .await;
        assert!(followed > 0, "cycle {cycle}: no update in 150 ms");
        id += 1;
        client
            .send_json(json!({"id": id, "command": "mesh/unsubscribe-collection",
                              "payload": {"collectionId": "busy"}}))
            .await;
        let (_, reply) = follow_consecutive_updates(
            &mut client,
            "busy:1",
            &mut document,
            &mut version,
            None,
            Some(id),
        )
        .await;
        assert_eq!(reply.expect("the unsubscribe reply")["payload"], true);
    }
    assert!(writer.stop().await > 0);
}

/// `box:N` holds every record whose id starts with `N:`, resolved from the id alone, with
/// a count of its resolver's runs.
fn with_boxes(backend: &Backend, runs: &Arc<std::sync::atomic::AtomicUsize>) -> MeshBuilder {
    let runs = runs.clone();
    with_probe(backend)
        .expose_record(regex("^[a-z]+:"), Access::open())
        .expose_collection(
            regex("^box:"),
            Collection::resolved_by_id(move |mesh, collection_id| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let name = collection_id.trim_start_matches("box:").to_owned();
                    Ok(mesh
                        .record_ids_matching(Regex::new(&format!("^{name}:"))?)
                        .await?)
                }
            })
            .holding_for(|collection_id, record_id| {
                let name = collection_id.trim_start_matches("box:");
                record_id
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(':'))
            }),
        )
}

/// A resolver that depends only on the collection id runs once per change on an
/// instance, for all of that instance's subscribers of the collection, and each of them
/// gets the diff.
async fn a_resolver_by_id_runs_once_per_change_for_every_local_subscriber(backend: Backend) {
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = serve(with_boxes(&backend, &runs)).await;
    let b = serve(with_boxes(&backend, &Arc::new(Default::default()))).await;
    let mut clients = Vec::new();
    for n in 0..3 {
        let mut client = RawClient::connect(&a.url()).await;
        let reply = subscribe(&mut client, 1, "box:fruit").await;
        assert_eq!(reply["ids"], json!([]), "subscriber {n}: {reply}");
        clients.push(client);
    }
    let subscribed = runs.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(subscribed, 3, "one resolution per subscribe");
    write_record(&b.mesh, "fruit:apple", json!({"n": 1})).await;
    for client in &mut clients {
        let (_, diff) = next_diff(client, "box:fruit").await;
        assert_eq!(
            diff["added"],
            json!([{"id": "fruit:apple", "n": 1}]),
            "{diff}"
        );
    }
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        subscribed + 1,
        "one resolution for the change, shared by the three subscribers"
    );
}

/// A write to a record that no subscribed collection can hold (`holding_for`) resolves
/// nothing and sends nothing, while a write to one it can hold does.
async fn writes_to_records_a_collection_cannot_hold_resolve_nothing(backend: Backend) {
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = serve(with_boxes(&backend, &runs)).await;
    let b = serve(with_boxes(&backend, &Arc::new(Default::default()))).await;
    let mut client = RawClient::connect(&a.url()).await;
    subscribe_probe(&mut client, 1).await;
    let reply = subscribe(&mut client, 2, "box:fruit").await;
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    for n in 0..20 {
        write_record(&b.mesh, &format!("veg:{n}"), json!({"n": n})).await;
        write_record(&b.mesh, &format!("fruity:{n}"), json!({"n": n})).await;
    }
    assert_settled_quietly(&b.mesh, &mut [&mut client], "unrelated").await;
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no resolution for records the collection cannot hold"
    );
    write_record(&b.mesh, "fruit:pear", json!({"n": 1})).await;
    let (_, diff) = next_diff(&mut client, "box:fruit").await;
    assert_eq!(
        diff["added"],
        json!([{"id": "fruit:pear", "n": 1}]),
        "{diff}"
    );
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------
// Byte limits (issue 12 §1): snapshots and diffs hold the members that fit in a frame.

const FRAME: usize = 4096;

/// [`with_probe`] with a frame limit of [`FRAME`], the `big` collection of every `big:`
/// record and the `few` collection of every `few:` record.
fn with_big_members(backend: &Backend) -> MeshBuilder {
    with_probe(backend)
        .max_frame_size(FRAME)
        .expose_record(regex("^(big|few):"), Access::open())
        .expose_collection("big", Collection::matching(regex("^big:")))
        .expose_collection("few", Collection::matching(regex("^few:")))
}

/// A member of about 1,200 bytes: two fit in a reply within [`FRAME`], a third would not.
fn big_member(n: usize) -> Value {
    let mut value = object_of_size("pad", 1200);
    value["n"] = json!(n);
    value
}

fn snapshot_entry(id: &str, record: Value) -> Value {
    json!({ "id": id, "record": record })
}

/// The entry of a record that joined, as a diff lists it: its own object with its id.
fn added_entry(id: &str, record: Value) -> Value {
    let mut entry = serde_json::Map::new();
    entry.insert("id".to_owned(), json!(id));
    entry.extend(record.as_object().expect("an object").clone());
    Value::Object(entry)
}

async fn a_snapshot_holds_the_leading_members_that_fit_and_the_rest_get_no_updates(
    backend: Backend,
) {
    let a = serve(with_big_members(&backend)).await;
    let b = serve(with_big_members(&backend)).await;
    for n in 1..=5 {
        write_record(&b.mesh, &format!("big:{n}"), big_member(n)).await;
    }
    write_record(&b.mesh, "few:1", json!({"small": true})).await;
    let mut client = RawClient::connect(&a.url()).await;

    // The leading members (ids in order) that fit, and `truncated`.
    assert_eq!(
        call_within_frame(
            &mut client,
            1,
            "mesh/subscribe-collection",
            json!({"collectionId": "big"}),
            FRAME
        )
        .await,
        json!({"success": true, "ids": ["big:1", "big:2"], "records": [
            snapshot_entry("big:1", big_member(1)),
            snapshot_entry("big:2", big_member(2)),
        ], "version": 1, "truncated": true})
    );
    // A snapshot that holds every member has no `truncated` field at all.
    assert_eq!(
        call_within_frame(
            &mut client,
            2,
            "mesh/subscribe-collection",
            json!({"collectionId": "few"}),
            FRAME
        )
        .await,
        json!({"success": true, "ids": ["few:1"], "records": [
            snapshot_entry("few:1", json!({"small": true})),
        ], "version": 1})
    );
    subscribe_probe(&mut client, 3).await;

    // A member that was left out is not held: its updates are not sent; a held member's
    // are.
    let changed = |n: usize| json!({"n": n, "changed": true});
    for n in [4, 1, 3, 5] {
        write_record(&b.mesh, &format!("big:{n}"), changed(n)).await;
    }
    // Awaited rather than expected before the probe: on a Cluster the update and the
    // probe's diff travel on different shards, with no order between them.
    assert_eq!(client.next().await, full("big:1", changed(1), 2));
    assert_settled_quietly(&a.mesh, &mut [&mut client], "updated").await;
}

async fn a_diff_holds_the_leading_members_that_fit_and_the_rest_get_no_updates(backend: Backend) {
    let a = serve(with_big_members(&backend)).await;
    let b = serve(with_big_members(&backend)).await;
    for n in 1..=5 {
        write_record(&b.mesh, &format!("big:{n}"), big_member(n)).await;
    }
    let mut client = RawClient::connect(&a.url()).await;
    let snapshot = subscribe(&mut client, 1, "big").await;
    assert_eq!(
        (&snapshot["ids"], &snapshot["truncated"]),
        (&json!(["big:1", "big:2"]), &json!(true)),
        "{snapshot}"
    );
    subscribe_probe(&mut client, 2).await;

    // A new member re-resolves the collection: every member not held joins, and the diff
    // holds the leading ones that fit.
    write_record(&b.mesh, "big:6", json!({"n": 6})).await;
    let (before, text) = next_diff_text(&mut client, "big").await;
    assert!(before.is_empty(), "frames before the diff: {before:?}");
    assert!(text.len() <= FRAME, "{} bytes: {text}", text.len());
    let pushed: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(
        pushed["payload"],
        json!({"collectionId": "big", "added": [
            added_entry("big:3", big_member(3)),
            added_entry("big:4", big_member(4)),
        ], "removed": [], "version": 2, "truncated": true})
    );

    // The members the diff left out are not held; those it added are.
    let changed = |n: usize| json!({"n": n, "changed": true});
    for n in [5, 6, 3] {
        write_record(&b.mesh, &format!("big:{n}"), changed(n)).await;
    }
    assert_eq!(
        settle(&a.mesh, &mut [&mut client], "updated").await,
        [vec![full("big:3", changed(3), 2)]]
    );

    // The next re-resolution adds them; a diff that holds every change has no
    // `truncated` field at all.
    assert!(delete(&b.mesh, "big:1").await);
    // No deletion notice for big:1 (the client never subscribed to it), and no updates
    // for big:5 and big:6, which joined without being written in this burst.
    let (before, text) = next_diff_text(&mut client, "big").await;
    assert!(before.is_empty(), "frames before the diff: {before:?}");
    assert_eq!(
        text,
        json!({"command": DIFF, "payload": {"collectionId": "big", "added": [
            added_entry("big:5", changed(5)),
            added_entry("big:6", changed(6)),
        ], "removed": [{"id": "big:1"}], "version": 3}})
        .to_string()
    );
    write_record(&b.mesh, "big:5", json!({"n": 5, "final": true})).await;
    assert_eq!(
        settle(&a.mesh, &mut [&mut client], "held").await,
        [vec![full("big:5", json!({"n": 5, "final": true}), 3)]]
    );
}
