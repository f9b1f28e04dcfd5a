//! Records (issue 5): subscriptions in full and patch mode, versions, merge strategies,
//! writes that change nothing, primitive values, client writes and their access rules,
//! deletion, hooks, bad input and limits, and many concurrent writers on two instances,
//! on both backends and over real WebSockets. Writers and subscribers sit on different
//! instances of one mesh wherever that applies.
//!
//! "Nothing arrived" is shown without sleeping: after the action, the server broadcasts a
//! marker, which every instance delivers after whatever was published before it; the
//! frames that came before the marker are checked.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_mesh::{Access, Connection, MergeStrategy, Mesh, RecordEvent, Regex};

use crate::common::*;

conformance!(
    subscribe_to_never_written_and_written_records,
    resubscribing_while_another_instance_writes_never_goes_backwards,
    unexposed_and_guarded_reads_are_refused,
    full_mode_updates_from_another_instance,
    patch_mode_updates_from_another_instance,
    mixed_modes_on_one_record,
    subscribing_again_switches_the_mode,
    merge_and_deep_merge_strategies,
    deep_merge_keeps_key_order,
    writes_that_change_nothing_store_and_push_nothing,
    primitive_values_in_both_modes,
    client_writes_reach_other_instances_and_fire_hooks_where_written,
    client_writer_that_is_subscribed_gets_its_own_update,
    writes_to_read_only_or_unexposed_records_are_forbidden,
    guarded_writable_records,
    read_guard_is_not_bypassed_by_a_writable_pattern,
    deletion_notifies_full_and_patch_subscribers_on_every_instance,
    deleting_a_missing_record_is_false_and_pushes_nothing,
    a_recreated_record_is_not_pushed_to_old_direct_subscribers,
    update_and_removal_hooks_all_run_and_a_panicking_one_stops_none,
    a_hook_hears_writes_in_order_and_hooks_start_in_the_order_added,
    hooks_are_not_awaited_by_the_write,
    unsubscribe_stops_record_delivery,
    a_reconnected_client_subscribes_again,
    bad_record_input_is_einvalid_and_stores_nothing,
    record_subscription_limit_answers_eoverloaded,
    a_record_over_max_record_bytes_is_refused_and_nothing_is_stored_or_sent,
    merges_growing_a_record_past_max_record_bytes_are_refused_and_the_record_stays,
    write_record_over_max_record_bytes_is_mesh_error_too_large,
    max_record_bytes_is_never_above_max_frame_size,
    concurrent_merges_from_two_instances_are_gap_free_and_lose_nothing,
);

// ---------------------------------------------------------------------------------------
// Helpers.

const UPDATE: &str = "mesh/record-update";
const DELETED: &str = "mesh/record-deleted";

async fn subscribe(client: &mut RawClient, id: u64, record_id: &str, mode: Option<&str>) -> Value {
    let payload = match mode {
        Some(mode) => json!({ "recordId": record_id, "mode": mode }),
        None => json!({ "recordId": record_id }),
    };
    call(client, id, "mesh/subscribe-record", payload).await
}

async fn unsubscribe(client: &mut RawClient, id: u64, record_id: &str) -> Value {
    call(
        client,
        id,
        "mesh/unsubscribe-record",
        json!({ "recordId": record_id }),
    )
    .await
}

async fn publish(
    client: &mut RawClient,
    id: u64,
    record_id: &str,
    value: Value,
    strategy: Option<&str>,
) -> Value {
    let payload = match strategy {
        Some(strategy) => json!({
            "recordId": record_id, "newValue": value, "options": { "strategy": strategy }
        }),
        None => json!({ "recordId": record_id, "newValue": value }),
    };
    call(client, id, "mesh/publish-record-update", payload).await
}

/// The next `mesh/record-update` payload.
async fn update(client: &mut RawClient) -> Value {
    client.push_within(UPDATE).await["payload"].clone()
}

fn full(record_id: &str, value: Value, version: u64) -> Value {
    json!({ "recordId": record_id, "full": value, "version": version })
}

fn patched(record_id: &str, patch: Value, version: u64) -> Value {
    json!({ "recordId": record_id, "patch": patch, "version": version })
}

fn subscribed(record: Value, version: u64) -> Value {
    json!({ "success": true, "record": record, "version": version })
}

fn refused() -> Value {
    json!({ "success": false, "record": null, "version": 0 })
}

fn forbidden(record_id: &str) -> Value {
    json!({
        "error": format!("Record \"{record_id}\" is not writable"),
        "code": "EFORBIDDEN",
        "name": "CommandError",
    })
}

/// Asserts that no record push (update or deletion) came before the marker, per client.
async fn assert_no_record_push(mesh: &Mesh, marker: &str, clients: &mut [&mut RawClient]) {
    for frames in frames_before_marker(mesh, marker, clients, Noise::Kept).await {
        assert!(
            pushes_named(&frames, UPDATE).is_empty() && pushes_named(&frames, DELETED).is_empty(),
            "unexpected record push: {frames:?}"
        );
    }
}

async fn stored(mesh: &Mesh, record_id: &str) -> Option<(Value, u64)> {
    mesh.record(record_id)
        .await
        .expect("record")
        .map(|record| (record.value, record.version))
}

type Events = mpsc::UnboundedReceiver<(String, Value, u64)>;

/// A hook that reports each event it hears on a channel.
fn reporter() -> (
    impl Fn(RecordEvent) -> std::future::Ready<()> + Send + Sync + 'static,
    Events,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let hook = move |event: RecordEvent| {
        let _ = tx.send((event.record_id, event.value, event.version));
        std::future::ready(())
    };
    (hook, rx)
}

fn event(record_id: &str, value: Value, version: u64) -> (String, Value, u64) {
    (record_id.to_owned(), value, version)
}

/// The next `n` events of a hook, sorted by record id and version (the order in which
/// hooks of different writes run is checked on its own, in
/// `a_hook_hears_writes_in_order_and_hooks_start_in_the_order_added`).
async fn events_sorted(events: &mut Events, n: usize) -> Vec<(String, Value, u64)> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(recv_within(events).await);
    }
    got.sort_by(|x, y| (&x.0, x.2).cmp(&(&y.0, y.2)));
    got
}

/// Applies an RFC 6902 patch (as sent on the wire) to `document`.
fn apply_patch(document: &mut Value, patch: &Value) {
    let patch: json_patch::Patch = serde_json::from_value(patch.clone()).expect("a JSON patch");
    json_patch::patch(document, &patch).expect("the patch applies");
}

/// A header that guards in these tests look for.
fn has_header(name: &'static str) -> Access {
    Access::guarded(
        move |connection: Connection, _record_id: String| async move {
            connection.headers().contains_key(name)
        },
    )
}

fn refuse_all() -> Access {
    Access::guarded(|_connection: Connection, _record_id: String| async { false })
}

// ---------------------------------------------------------------------------------------
// Subscribing.

/// docs/protocol.md §7.2: a record stream never goes backwards. A writer on another instance
/// writes without pause while a reader subscribes in patch mode, follows the updates for
/// a while, unsubscribes and subscribes again: after every reply the updates continue
/// at exactly the reply's version + 1 (never at or below it, never one twice), and none
/// arrives between an unsubscribe reply and the next subscribe reply.
async fn resubscribing_while_another_instance_writes_never_goes_backwards(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open()),
    )
    .await;
    let b = serve(backend.builder()).await;
    let writer = ContinuousWriter::start(&b.mesh, "busy").await;
    let mut client = RawClient::connect(&a.url()).await;
    let mut id = 0;
    for cycle in 0..10 {
        id += 1;
        client
            .send_json(json!({"id": id, "command": "mesh/subscribe-record",
                              "payload": {"recordId": "busy", "mode": "patch"}}))
            .await;
        // Between the unsubscribe reply and this reply, no update may arrive.
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
        assert_eq!(payload["success"], true, "{reply}");
        let mut version = payload["version"].as_u64().expect("a version");
        let mut document = payload["record"].clone();
        if version > 0 {
            assert_eq!(document, json!({ "n": version }), "cycle {cycle}: {reply}");
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(150);
        let (followed, _) = follow_consecutive_updates(
            &mut client,
            "busy",
            &mut document,
            &mut version,
            Some(deadline),
            None,
        )
        .await;
        assert!(followed > 0, "cycle {cycle}: no update in 150 ms");
        id += 1;
        client
            .send_json(json!({"id": id, "command": "mesh/unsubscribe-record",
                              "payload": {"recordId": "busy"}}))
            .await;
        // Updates queued before the unsubscribe reply still continue the stream.
        let (_, reply) = follow_consecutive_updates(
            &mut client,
            "busy",
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

async fn subscribe_to_never_written_and_written_records(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open()),
    )
    .await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;

    // Exact bytes on the wire: a record never written is null at version 0.
    client
        .send_text(
            r#"{"id":1,"command":"mesh/subscribe-record","payload":{"recordId":"smoke-record","mode":"full"}}"#,
        )
        .await;
    assert_eq!(
        within("the subscribe reply", client.next_text()).await,
        r#"{"id":1,"command":"mesh/subscribe-record","payload":{"success":true,"record":null,"version":0}}"#
    );
    // Written once (through another instance): its value at version 1, no push for it.
    assert_eq!(
        write_record(&b.mesh, "existing", json!({"name": "Alice", "n": 1})).await,
        Some(1)
    );
    assert_eq!(
        client
            .command_within(2, "mesh/subscribe-record", json!({"recordId": "existing"}))
            .await,
        json!({"id": 2, "command": "mesh/subscribe-record",
               "payload": subscribed(json!({"name": "Alice", "n": 1}), 1)})
    );
    let before = frames_before_marker(&b.mesh, "marker", &mut [&mut client], Noise::Kept).await;
    assert!(pushes_named(&before[0], UPDATE).is_empty(), "{before:?}");
    // Written twice: version 2; patch mode gets the whole value in the reply too.
    write_record(&b.mesh, "existing", json!({"name": "Bob"})).await;
    assert_eq!(
        subscribe(&mut client, 3, "existing", Some("patch")).await,
        subscribed(json!({"name": "Bob"}), 2)
    );
    // The first update after subscribing is the next version.
    write_record(&b.mesh, "smoke-record", json!({"count": 1})).await;
    assert_eq!(
        push_text(&mut client, UPDATE).await,
        r#"{"command":"mesh/record-update","payload":{"recordId":"smoke-record","full":{"count":1},"version":1}}"#
    );
}

async fn unexposed_and_guarded_reads_are_refused(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_record("public:1", Access::open())
            // Re-exposing a name replaces its access.
            .expose_record("guarded:record", Access::open())
            .expose_record("guarded:record", has_header("x-reader")),
    )
    .await;
    let b = serve(backend.builder()).await;
    let mut reader = RawClient::connect_request(ws_request(&a.url(), &[("x-reader", "1")])).await;
    let mut denied = RawClient::connect(&a.url()).await;

    // Unexposed: refused for everyone, whether it exists or not.
    write_record(&b.mesh, "hidden:1", json!({"secret": true})).await;
    for (n, id) in ["hidden:1", "hidden:2", "public:10"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            reader
                .command_within(
                    n as u64 + 1,
                    "mesh/subscribe-record",
                    json!({"recordId": id})
                )
                .await,
            json!({"id": n as u64 + 1, "command": "mesh/subscribe-record", "payload": refused()}),
            "{id}"
        );
    }
    // Guarded: the allowed client gets it (never written: null, 0), the other is refused.
    assert_eq!(
        subscribe(&mut reader, 10, "guarded:record", None).await,
        subscribed(Value::Null, 0)
    );
    assert_eq!(
        subscribe(&mut denied, 10, "guarded:record", Some("patch")).await,
        refused()
    );
    assert_eq!(
        subscribe(&mut denied, 11, "public:1", None).await,
        subscribed(Value::Null, 0)
    );

    // Refused subscriptions hear nothing; the allowed one hears every write.
    write_record(&b.mesh, "guarded:record", json!({"v": 1})).await;
    write_record(&b.mesh, "hidden:1", json!({"secret": false})).await;
    assert_eq!(
        update(&mut reader).await,
        full("guarded:record", json!({"v": 1}), 1)
    );
    assert_no_record_push(&b.mesh, "marker", &mut [&mut denied, &mut reader]).await;
    assert_eq!(unsubscribe(&mut denied, 12, "guarded:record").await, false);
}

// ---------------------------------------------------------------------------------------
// Updates.

async fn full_mode_updates_from_another_instance(backend: Backend) {
    let a = serve(backend.builder().expose_record("doc", Access::open())).await;
    let b = serve(backend.builder().expose_record("doc", Access::open())).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    assert_eq!(
        subscribe(&mut on_a, 1, "doc", Some("full")).await,
        subscribed(Value::Null, 0)
    );
    assert_eq!(
        subscribe(&mut on_b, 1, "doc", None).await,
        subscribed(Value::Null, 0)
    );

    assert_eq!(
        write_record(&b.mesh, "doc", json!({"data": 1})).await,
        Some(1)
    );
    assert_eq!(
        write_record(&b.mesh, "doc", json!({"data": 2})).await,
        Some(2)
    );
    // Key order is kept as written.
    assert_eq!(
        write_record(&a.mesh, "doc", json!({"z": 1, "a": {"y": 2, "b": 3}})).await,
        Some(3)
    );
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(update(client).await, full("doc", json!({"data": 1}), 1));
        assert_eq!(update(client).await, full("doc", json!({"data": 2}), 2));
        assert_eq!(
            push_text(client, UPDATE).await,
            r#"{"command":"mesh/record-update","payload":{"recordId":"doc","full":{"z":1,"a":{"y":2,"b":3}},"version":3}}"#
        );
    }
    assert_no_record_push(&a.mesh, "marker", &mut [&mut on_a, &mut on_b]).await;
    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            stored(mesh, "doc").await,
            Some((json!({"z": 1, "a": {"y": 2, "b": 3}}), 3))
        );
    }
}

async fn patch_mode_updates_from_another_instance(backend: Backend) {
    let a = serve(backend.builder().expose_record("doc", Access::open())).await;
    let b = serve(backend.builder().expose_record("doc", Access::open())).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            subscribe(client, 1, "doc", Some("patch")).await,
            subscribed(Value::Null, 0)
        );
    }

    write_record(&b.mesh, "doc", json!({"count": 1})).await;
    write_record(&b.mesh, "doc", json!({"count": 1, "name": "added"})).await;
    write_record(&b.mesh, "doc", json!({"name": "added"})).await;
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            push_text(client, UPDATE).await,
            r#"{"command":"mesh/record-update","payload":{"recordId":"doc","patch":[{"op":"add","path":"/count","value":1}],"version":1}}"#
        );
        assert_eq!(
            update(client).await,
            patched(
                "doc",
                json!([{"op": "add", "path": "/name", "value": "added"}]),
                2
            )
        );
        assert_eq!(
            update(client).await,
            patched("doc", json!([{"op": "remove", "path": "/count"}]), 3)
        );
    }
    // Nested changes and arrays patch too; applying the patches rebuilds the value.
    let mut rebuilt = json!({"name": "added"});
    let next = json!({"name": "added", "tags": ["a", "b"], "deep": {"x": {"y": 1}}});
    write_record(&a.mesh, "doc", next.clone()).await;
    let last = json!({"name": "renamed", "tags": ["a"], "deep": {"x": {"y": 2}}});
    write_record(&a.mesh, "doc", last.clone()).await;
    for (version, value) in [(4, next), (5, last)] {
        let pushed = update(&mut on_b).await;
        assert_eq!(pushed["version"], version, "{pushed}");
        assert!(pushed.get("full").is_none(), "{pushed}");
        apply_patch(&mut rebuilt, &pushed["patch"]);
        assert_eq!(rebuilt, value);
    }
    assert_no_record_push(&a.mesh, "marker", &mut [&mut on_b]).await;
}

async fn mixed_modes_on_one_record(backend: Backend) {
    let a = serve(backend.builder().expose_record("mixed", Access::open())).await;
    let b = serve(backend.builder().expose_record("mixed", Access::open())).await;
    let mut full_a = RawClient::connect(&a.url()).await;
    let mut patch_a = RawClient::connect(&a.url()).await;
    let mut full_b = RawClient::connect(&b.url()).await;
    let mut patch_b = RawClient::connect(&b.url()).await;
    subscribe(&mut full_a, 1, "mixed", Some("full")).await;
    subscribe(&mut patch_a, 1, "mixed", Some("patch")).await;
    subscribe(&mut full_b, 1, "mixed", None).await;
    subscribe(&mut patch_b, 1, "mixed", Some("patch")).await;

    write_record(&b.mesh, "mixed", json!({"value": "a"})).await;
    write_record(&a.mesh, "mixed", json!({"value": "b"})).await;
    for client in [&mut full_a, &mut full_b] {
        assert_eq!(
            update(client).await,
            full("mixed", json!({"value": "a"}), 1)
        );
        assert_eq!(
            update(client).await,
            full("mixed", json!({"value": "b"}), 2)
        );
    }
    for client in [&mut patch_a, &mut patch_b] {
        assert_eq!(
            update(client).await,
            patched(
                "mixed",
                json!([{"op": "add", "path": "/value", "value": "a"}]),
                1
            )
        );
        assert_eq!(
            update(client).await,
            patched(
                "mixed",
                json!([{"op": "replace", "path": "/value", "value": "b"}]),
                2
            )
        );
    }
    assert_no_record_push(
        &a.mesh,
        "marker",
        &mut [&mut full_a, &mut patch_a, &mut full_b, &mut patch_b],
    )
    .await;
}

async fn subscribing_again_switches_the_mode(backend: Backend) {
    let a = serve(backend.builder().expose_record("doc", Access::open())).await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;
    subscribe(&mut client, 1, "doc", Some("patch")).await;
    write_record(&b.mesh, "doc", json!({"n": 1})).await;
    assert_eq!(
        update(&mut client).await,
        patched("doc", json!([{"op": "add", "path": "/n", "value": 1}]), 1)
    );
    // The same connection subscribing again in full mode: one subscription, now full.
    assert_eq!(
        subscribe(&mut client, 2, "doc", Some("full")).await,
        subscribed(json!({"n": 1}), 1)
    );
    write_record(&b.mesh, "doc", json!({"n": 2})).await;
    assert_eq!(update(&mut client).await, full("doc", json!({"n": 2}), 2));
    assert_no_record_push(&b.mesh, "marker", &mut [&mut client]).await;
    // One unsubscribe ends it.
    assert_eq!(unsubscribe(&mut client, 3, "doc").await, true);
    assert_eq!(unsubscribe(&mut client, 4, "doc").await, false);
}

async fn merge_and_deep_merge_strategies(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_writable_record(everything(), Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_writable_record(everything(), Access::open()),
    )
    .await;
    let mut full_sub = RawClient::connect(&a.url()).await;
    let mut patch_sub = RawClient::connect(&a.url()).await;
    let mut writer = RawClient::connect(&b.url()).await;
    subscribe(&mut full_sub, 1, "doc", None).await;
    subscribe(&mut patch_sub, 1, "doc", Some("patch")).await;

    let mesh = &b.mesh;
    let steps: Vec<(MergeStrategy, Value, Value)> = vec![
        // Merging onto nothing stores the value.
        (
            MergeStrategy::Merge,
            json!({"a": {"x": 1, "y": 1}, "b": 1, "c": [1, 2]}),
            json!({"a": {"x": 1, "y": 1}, "b": 1, "c": [1, 2]}),
        ),
        // Merge: top-level keys overlay; nested objects are replaced whole.
        (
            MergeStrategy::Merge,
            json!({"a": {"x": 2}, "d": 4}),
            json!({"a": {"x": 2}, "b": 1, "c": [1, 2], "d": 4}),
        ),
        // DeepMerge: nested objects merge; arrays and scalars replace.
        (
            MergeStrategy::DeepMerge,
            json!({"a": {"y": 3, "z": {"deep": true}}, "c": [9], "b": null}),
            json!({"a": {"x": 2, "y": 3, "z": {"deep": true}}, "b": null, "c": [9], "d": 4}),
        ),
        (
            MergeStrategy::DeepMerge,
            json!({"a": {"z": {"more": 1}}}),
            json!({"a": {"x": 2, "y": 3, "z": {"deep": true, "more": 1}}, "b": null, "c": [9], "d": 4}),
        ),
        // Replace stores exactly the new value.
        (
            MergeStrategy::Replace,
            json!({"only": 1}),
            json!({"only": 1}),
        ),
        // Merging a non-object replaces.
        (MergeStrategy::Merge, json!([1, 2]), json!([1, 2])),
        (MergeStrategy::DeepMerge, json!({"o": 1}), json!({"o": 1})),
    ];
    let mut rebuilt = json!({});
    for (n, (strategy, value, expected)) in steps.into_iter().enumerate() {
        let version = n as u64 + 1;
        assert_eq!(
            mesh.write_record("doc", value, strategy)
                .await
                .expect("write"),
            Some(version)
        );
        assert_eq!(
            stored(&a.mesh, "doc").await,
            Some((expected.clone(), version))
        );
        assert_eq!(
            update(&mut full_sub).await,
            full("doc", expected.clone(), version)
        );
        let pushed = update(&mut patch_sub).await;
        assert_eq!(pushed["version"], version, "{pushed}");
        match pushed.get("patch") {
            Some(patch) => apply_patch(&mut rebuilt, patch),
            // A change of kind (object to array and back) cannot be patched.
            None => rebuilt = pushed["full"].clone(),
        }
        assert_eq!(rebuilt, expected, "step {version}: {pushed}");
    }

    // The same strategies over the wire.
    let wire_steps = [
        (
            json!({"base": {"k": 1}, "other": 1}),
            Some("replace"),
            json!({"base": {"k": 1}, "other": 1}),
        ),
        (
            json!({"base": {"j": 2}}),
            Some("merge"),
            json!({"base": {"j": 2}, "other": 1}),
        ),
        (
            json!({"base": {"k": 3}}),
            Some("deepMerge"),
            json!({"base": {"j": 2, "k": 3}, "other": 1}),
        ),
        (json!({"fresh": true}), None, json!({"fresh": true})),
    ];
    for (n, (value, strategy, expected)) in wire_steps.into_iter().enumerate() {
        assert_eq!(
            publish(&mut writer, n as u64 + 1, "wire", value, strategy).await,
            json!({"success": true})
        );
        assert_eq!(
            stored(&a.mesh, "wire").await,
            Some((expected, n as u64 + 1))
        );
    }
}

async fn deep_merge_keeps_key_order(backend: Backend) {
    // docs/protocol.md §6: key order in `full` values is preserved as written. Merging into
    // a record keeps its keys where they were and appends new ones, as in JavaScript.
    let a = serve(backend.builder().expose_record("doc", Access::open())).await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;
    subscribe(&mut client, 1, "doc", None).await;
    write_record(
        &b.mesh,
        "doc",
        json!({"a": {"x": 1}, "b": 1, "c": 2, "d": 3}),
    )
    .await;
    b.mesh
        .write_record("doc", json!({"a": {"y": 2}, "e": 5}), MergeStrategy::Merge)
        .await
        .expect("merge");
    b.mesh
        .write_record(
            "doc",
            json!({"a": {"x": 9}, "c": 7}),
            MergeStrategy::DeepMerge,
        )
        .await
        .expect("deep merge");
    let texts = [
        r#"{"command":"mesh/record-update","payload":{"recordId":"doc","full":{"a":{"x":1},"b":1,"c":2,"d":3},"version":1}}"#,
        r#"{"command":"mesh/record-update","payload":{"recordId":"doc","full":{"a":{"y":2},"b":1,"c":2,"d":3,"e":5},"version":2}}"#,
        r#"{"command":"mesh/record-update","payload":{"recordId":"doc","full":{"a":{"y":2,"x":9},"b":1,"c":7,"d":3,"e":5},"version":3}}"#,
    ];
    for text in texts {
        assert_eq!(push_text(&mut client, UPDATE).await, text);
    }
}

async fn writes_that_change_nothing_store_and_push_nothing(backend: Backend) {
    let (hook, mut events) = reporter();
    let a = serve(
        backend
            .builder()
            .expose_writable_record(everything(), Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_writable_record(everything(), Access::open())
            .on_record_update(hook),
    )
    .await;
    let mut full_sub = RawClient::connect(&a.url()).await;
    let mut patch_sub = RawClient::connect(&a.url()).await;
    let mut writer = RawClient::connect(&b.url()).await;
    subscribe(&mut full_sub, 1, "doc", None).await;
    subscribe(&mut patch_sub, 1, "doc", Some("patch")).await;
    subscribe(&mut full_sub, 2, "num", None).await;

    let mesh = &b.mesh;
    assert_eq!(
        write_record(
            mesh,
            "doc",
            json!({"n": 1, "list": [1, 2], "o": {"k": "v"}})
        )
        .await,
        Some(1)
    );
    assert_eq!(
        recv_within(&mut events).await,
        event("doc", json!({"n": 1, "list": [1, 2], "o": {"k": "v"}}), 1)
    );
    let unchanged = [
        (
            MergeStrategy::Replace,
            json!({"n": 1, "list": [1, 2], "o": {"k": "v"}}),
        ),
        // Numbers compare by value: 1.0 is 1.
        (
            MergeStrategy::Replace,
            json!({"n": 1.0, "list": [1.0, 2], "o": {"k": "v"}}),
        ),
        // Key order alone is no change either.
        (
            MergeStrategy::Replace,
            json!({"o": {"k": "v"}, "list": [1, 2], "n": 1}),
        ),
        (MergeStrategy::Merge, json!({"n": 1})),
        (MergeStrategy::Merge, json!({})),
        (MergeStrategy::DeepMerge, json!({"o": {"k": "v"}})),
        (MergeStrategy::DeepMerge, json!({})),
    ];
    for (strategy, value) in unchanged {
        assert_eq!(
            mesh.write_record("doc", value.clone(), strategy)
                .await
                .expect("write"),
            None,
            "{strategy:?} {value}"
        );
    }
    // Primitive records too.
    assert_eq!(write_record(mesh, "num", json!(1)).await, Some(1));
    assert_eq!(write_record(mesh, "num", json!(1.0)).await, None);
    assert_eq!(write_record(mesh, "num", json!(1)).await, None);
    // Over the wire: a success, but nothing changes.
    assert_eq!(
        publish(
            &mut writer,
            1,
            "doc",
            json!({"n": 1.0, "list": [1, 2], "o": {"k": "v"}}),
            None
        )
        .await,
        json!({"success": true})
    );
    assert_eq!(
        publish(&mut writer, 2, "num", json!(1.0), Some("merge")).await,
        json!({"success": true})
    );

    assert_eq!(
        stored(&a.mesh, "doc").await,
        Some((json!({"n": 1, "list": [1, 2], "o": {"k": "v"}}), 1))
    );
    assert_eq!(stored(&a.mesh, "num").await, Some((json!(1), 1)));
    // Only the first writes were pushed (each subscriber: the one version of each).
    let before = frames_before_marker(
        &b.mesh,
        "marker",
        &mut [&mut full_sub, &mut patch_sub],
        Noise::Kept,
    )
    .await;
    assert_eq!(
        pushes_named(&before[0], UPDATE)
            .into_iter()
            .map(|frame| frame["payload"].clone())
            .collect::<Vec<_>>(),
        vec![
            full("doc", json!({"n": 1, "list": [1, 2], "o": {"k": "v"}}), 1),
            full("num", json!(1), 1),
        ]
    );
    assert_eq!(pushes_named(&before[1], UPDATE).len(), 1, "{:?}", before[1]);
    // The next real change is the next version, and the next push.
    assert_eq!(write_record(mesh, "doc", json!({"n": 2})).await, Some(2));
    assert_eq!(update(&mut full_sub).await, full("doc", json!({"n": 2}), 2));
    assert_eq!(update(&mut patch_sub).await["version"], 2);
    // Writes that changed nothing fired no hook: the next events are the real changes.
    assert_eq!(
        events_sorted(&mut events, 2).await,
        [event("doc", json!({"n": 2}), 2), event("num", json!(1), 1)]
    );
}

async fn primitive_values_in_both_modes(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_writable_record("prim", Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_writable_record("prim", Access::open()),
    )
    .await;
    assert_eq!(
        write_record(&b.mesh, "prim", json!("initial value")).await,
        Some(1)
    );
    let mut full_a = RawClient::connect(&a.url()).await;
    let mut patch_b = RawClient::connect(&b.url()).await;
    let mut writer = RawClient::connect(&a.url()).await;
    assert_eq!(
        subscribe(&mut full_a, 1, "prim", Some("full")).await,
        subscribed(json!("initial value"), 1)
    );
    assert_eq!(
        subscribe(&mut patch_b, 1, "prim", Some("patch")).await,
        subscribed(json!("initial value"), 1)
    );
    assert_eq!(
        publish(&mut writer, 1, "prim", json!("updated value"), None).await,
        json!({"success": true})
    );
    for client in [&mut full_a, &mut patch_b] {
        assert_eq!(
            update(client).await,
            full("prim", json!("updated value"), 2)
        );
    }
    assert_eq!(
        stored(&b.mesh, "prim").await,
        Some((json!("updated value"), 2))
    );

    // A patch needs an object or array on both sides; otherwise patch mode gets `full`.
    // From null (or from nothing) to an object or array, the patch starts from an empty one.
    let steps: Vec<(Value, Option<Value>)> = vec![
        (json!(5), None),
        (json!(6.5), None),
        (json!(true), None),
        (json!(false), None),
        (Value::Null, None),
        (
            json!({"a": 1}),
            Some(json!([{"op": "add", "path": "/a", "value": 1}])),
        ),
        (json!([1]), None),
        (
            json!([1, 2]),
            Some(json!([{"op": "add", "path": "/1", "value": 2}])),
        ),
        (json!("text"), None),
        (json!({"b": 2}), None),
        (json!(0), None),
    ];
    for (n, (value, patch)) in steps.into_iter().enumerate() {
        let version = n as u64 + 3;
        assert_eq!(
            write_record(&a.mesh, "prim", value.clone()).await,
            Some(version)
        );
        assert_eq!(
            update(&mut full_a).await,
            full("prim", value.clone(), version)
        );
        let expected = match patch {
            Some(patch) => patched("prim", patch, version),
            None => full("prim", value.clone(), version),
        };
        assert_eq!(update(&mut patch_b).await, expected, "{value}");
    }
    assert_eq!(stored(&b.mesh, "prim").await, Some((json!(0), 13)));
    assert_no_record_push(&b.mesh, "marker", &mut [&mut full_a, &mut patch_b]).await;
}

// ---------------------------------------------------------------------------------------
// Client writes and access.

async fn client_writes_reach_other_instances_and_fire_hooks_where_written(backend: Backend) {
    let (hook_a, mut events_a) = reporter();
    let (hook_b, mut events_b) = reporter();
    let a = serve(
        backend
            .builder()
            .expose_writable_record("doc", Access::open())
            .on_record_update(hook_a),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_writable_record("doc", Access::open())
            .on_record_update(hook_b),
    )
    .await;
    let mut full_a = RawClient::connect(&a.url()).await;
    let mut patch_a = RawClient::connect(&a.url()).await;
    let mut full_b = RawClient::connect(&b.url()).await;
    let mut writer = RawClient::connect(&b.url()).await;
    subscribe(&mut full_a, 1, "doc", None).await;
    subscribe(&mut patch_a, 1, "doc", Some("patch")).await;
    subscribe(&mut full_b, 1, "doc", Some("full")).await;

    assert_eq!(
        writer
            .command_within(
                1,
                "mesh/publish-record-update",
                json!({"recordId": "doc", "newValue": {"count": 1}}),
            )
            .await,
        json!({"id": 1, "command": "mesh/publish-record-update", "payload": {"success": true}})
    );
    assert_eq!(
        publish(
            &mut writer,
            2,
            "doc",
            json!({"name": "added"}),
            Some("merge")
        )
        .await,
        json!({"success": true})
    );
    for client in [&mut full_a, &mut full_b] {
        assert_eq!(update(client).await, full("doc", json!({"count": 1}), 1));
        assert_eq!(
            update(client).await,
            full("doc", json!({"count": 1, "name": "added"}), 2)
        );
    }
    assert_eq!(
        update(&mut patch_a).await,
        patched(
            "doc",
            json!([{"op": "add", "path": "/count", "value": 1}]),
            1
        )
    );
    assert_eq!(
        update(&mut patch_a).await,
        patched(
            "doc",
            json!([{"op": "add", "path": "/name", "value": "added"}]),
            2
        )
    );
    assert_eq!(
        stored(&a.mesh, "doc").await,
        Some((json!({"count": 1, "name": "added"}), 2))
    );
    // The hooks of the writing instance hear the client's value (as stored).
    assert_eq!(
        events_sorted(&mut events_b, 2).await,
        [
            event("doc", json!({"count": 1}), 1),
            event("doc", json!({"count": 1, "name": "added"}), 2)
        ]
    );
    // The other instance's hooks did not run for those writes: the first they hear of is
    // a write through their own instance.
    write_record(&a.mesh, "doc", json!({"by": "a"})).await;
    assert_eq!(
        recv_within(&mut events_a).await,
        event("doc", json!({"by": "a"}), 3)
    );
    write_record(&b.mesh, "doc", json!({"by": "b"})).await;
    assert_eq!(
        recv_within(&mut events_b).await,
        event("doc", json!({"by": "b"}), 4)
    );
    // The writer did not subscribe, so it got no pushes.
    assert_no_record_push(&a.mesh, "marker", &mut [&mut writer]).await;
}

async fn client_writer_that_is_subscribed_gets_its_own_update(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_writable_record("doc", Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_writable_record("doc", Access::open()),
    )
    .await;
    let mut writer = RawClient::connect(&a.url()).await;
    let mut other = RawClient::connect(&b.url()).await;
    subscribe(&mut writer, 1, "doc", Some("patch")).await;
    subscribe(&mut other, 1, "doc", Some("patch")).await;

    // The update may reach the writer before or after its reply: collect both.
    writer
        .send_json(json!({"id": 2, "command": "mesh/publish-record-update",
                          "payload": {"recordId": "doc", "newValue": {"count": 1}}}))
        .await;
    let (reply, pushed) = within("the reply and the update", async {
        let (mut reply, mut pushed) = (None, None);
        while reply.is_none() || pushed.is_none() {
            let frame = writer.next().await;
            if frame["id"] == 2 {
                reply = Some(frame["payload"].clone());
            } else if frame.get("id").is_none() && frame["command"] == UPDATE {
                assert!(pushed.is_none(), "a second update: {frame}");
                pushed = Some(frame["payload"].clone());
            }
        }
        (reply.unwrap(), pushed.unwrap())
    })
    .await;
    assert_eq!(reply, json!({"success": true}));
    let expected = patched(
        "doc",
        json!([{"op": "add", "path": "/count", "value": 1}]),
        1,
    );
    assert_eq!(pushed, expected);
    assert_eq!(update(&mut other).await, expected);
    assert_no_record_push(&b.mesh, "marker", &mut [&mut writer, &mut other]).await;
}

async fn writes_to_read_only_or_unexposed_records_are_forbidden(backend: Backend) {
    let (hook, mut events) = reporter();
    let a = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open())
            .expose_writable_record("rw:1", Access::open())
            .on_record_update(hook),
    )
    .await;
    let b = serve(backend.builder().expose_record("ro:1", Access::open())).await;
    let mut writer = RawClient::connect(&a.url()).await;
    let mut watcher = RawClient::connect(&b.url()).await;
    let mut watcher_a = RawClient::connect(&a.url()).await;
    // An instance that exposes nothing: every client write is refused there.
    let bare = serve(backend.builder()).await;
    let mut bare_writer = RawClient::connect(&bare.url()).await;

    assert_eq!(
        write_record(&b.mesh, "ro:1", json!({"v": "server"})).await,
        Some(1)
    );
    subscribe(&mut watcher, 1, "ro:1", None).await;
    subscribe(&mut watcher_a, 1, "ro:1", Some("patch")).await;
    subscribe(&mut watcher_a, 2, "ro:2", None).await;

    let attempts = [
        (false, "ro:1"),
        (false, "ro:2"),
        (false, "hidden:1"),
        (true, "rw:1"),
    ];
    let mut id = 10;
    for (on_bare, record_id) in attempts {
        id += 1;
        let client = if on_bare {
            &mut bare_writer
        } else {
            &mut writer
        };
        assert_eq!(
            client
                .command_within(
                    id,
                    "mesh/publish-record-update",
                    json!({"recordId": record_id, "newValue": {"v": "client"},
                           "options": {"strategy": "merge"}}),
                )
                .await,
            json!({"id": id, "command": "mesh/publish-record-update",
                   "payload": forbidden(record_id)}),
            "{record_id}"
        );
    }
    // Nothing was stored, nothing pushed, no hook ran.
    assert_eq!(
        stored(&a.mesh, "ro:1").await,
        Some((json!({"v": "server"}), 1))
    );
    for id in ["ro:2", "hidden:1", "rw:1"] {
        assert_eq!(stored(&a.mesh, id).await, None, "{id}");
    }
    assert_no_record_push(&a.mesh, "marker", &mut [&mut watcher, &mut watcher_a]).await;
    assert_eq!(
        publish(&mut writer, 20, "rw:1", json!({"ok": true}), None).await,
        json!({"success": true})
    );
    assert_eq!(
        recv_within(&mut events).await,
        event("rw:1", json!({"ok": true}), 1)
    );
    // The server may write any record.
    assert_eq!(
        write_record(&a.mesh, "ro:1", json!({"v": "server 2"})).await,
        Some(2)
    );
    assert_eq!(
        update(&mut watcher).await,
        full("ro:1", json!({"v": "server 2"}), 2)
    );
    assert_eq!(
        update(&mut watcher_a).await,
        patched(
            "ro:1",
            json!([{"op": "replace", "path": "/v", "value": "server 2"}]),
            2
        )
    );
}

async fn guarded_writable_records(backend: Backend) {
    let a = serve(
        backend
            .builder()
            // Re-exposing the name replaces the open access with the guard.
            .expose_writable_record("guarded:record", Access::open())
            .expose_writable_record("guarded:record", has_header("x-writer"))
            // Readable by anyone, writable only by writers.
            .expose_record("guarded:public", Access::open())
            .expose_writable_record("guarded:public", has_header("x-writer")),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open()),
    )
    .await;
    let mut allowed = RawClient::connect_request(ws_request(&a.url(), &[("x-writer", "1")])).await;
    let mut denied = RawClient::connect(&a.url()).await;
    let mut watcher = RawClient::connect(&b.url()).await;
    subscribe(&mut watcher, 1, "guarded:record", None).await;

    assert_eq!(
        publish(
            &mut allowed,
            1,
            "guarded:record",
            json!({"by": "allowed"}),
            None
        )
        .await,
        json!({"success": true})
    );
    assert_eq!(
        update(&mut watcher).await,
        full("guarded:record", json!({"by": "allowed"}), 1)
    );
    assert_eq!(
        publish(
            &mut denied,
            1,
            "guarded:record",
            json!({"by": "denied"}),
            None
        )
        .await,
        forbidden("guarded:record")
    );
    assert_eq!(
        publish(
            &mut denied,
            2,
            "guarded:public",
            json!({"by": "denied"}),
            None
        )
        .await,
        forbidden("guarded:public")
    );
    assert_eq!(
        stored(&b.mesh, "guarded:record").await,
        Some((json!({"by": "allowed"}), 1))
    );
    assert_eq!(stored(&b.mesh, "guarded:public").await, None);
    assert_no_record_push(&b.mesh, "marker", &mut [&mut watcher]).await;

    // Where no read pattern matches, the writable guard decides who reads.
    assert_eq!(
        subscribe(&mut allowed, 3, "guarded:record", None).await,
        subscribed(json!({"by": "allowed"}), 1)
    );
    assert_eq!(
        subscribe(&mut denied, 3, "guarded:record", None).await,
        refused()
    );
    // A read pattern lets everyone read what only some may write.
    assert_eq!(
        subscribe(&mut denied, 4, "guarded:public", None).await,
        subscribed(Value::Null, 0)
    );
    assert_eq!(
        publish(&mut allowed, 5, "guarded:public", json!(1), None).await,
        json!({"success": true})
    );
    assert_eq!(
        update(&mut denied).await,
        full("guarded:public", json!(1), 1)
    );
}

async fn read_guard_is_not_bypassed_by_a_writable_pattern(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_record(Regex::new("^secret:").expect("regex"), refuse_all())
            .expose_writable_record(everything(), Access::open()),
    )
    .await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;

    assert_eq!(subscribe(&mut client, 1, "secret:1", None).await, refused());
    assert_eq!(
        subscribe(&mut client, 2, "secret:1", Some("patch")).await,
        refused()
    );
    // Writing is still allowed by the writable pattern, but it does not make it readable.
    assert_eq!(
        publish(&mut client, 3, "secret:1", json!({"x": 1}), None).await,
        json!({"success": true})
    );
    assert_eq!(
        stored(&b.mesh, "secret:1").await,
        Some((json!({"x": 1}), 1))
    );
    assert_eq!(subscribe(&mut client, 4, "secret:1", None).await, refused());
    write_record(&b.mesh, "secret:1", json!({"x": 2})).await;
    assert_no_record_push(&b.mesh, "marker", &mut [&mut client]).await;
    // Other records are readable through the writable pattern alone.
    assert_eq!(
        subscribe(&mut client, 5, "shared:1", None).await,
        subscribed(Value::Null, 0)
    );
}

// ---------------------------------------------------------------------------------------
// Deletion.

async fn deletion_notifies_full_and_patch_subscribers_on_every_instance(backend: Backend) {
    let (removed_hook, mut removed) = reporter();
    let a = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open())
            .on_record_removed(removed_hook),
    )
    .await;
    let mut full_a = RawClient::connect(&a.url()).await;
    let mut patch_a = RawClient::connect(&a.url()).await;
    let mut full_b = RawClient::connect(&b.url()).await;
    let mut patch_b = RawClient::connect(&b.url()).await;
    let mut other = RawClient::connect(&a.url()).await;
    for (client, mode) in [
        (&mut full_a, "full"),
        (&mut patch_a, "patch"),
        (&mut full_b, "full"),
        (&mut patch_b, "patch"),
    ] {
        subscribe(client, 1, "doomed", Some(mode)).await;
    }
    subscribe(&mut other, 1, "survivor", None).await;
    for n in 1..=3 {
        write_record(&a.mesh, "doomed", json!({"n": n})).await;
    }
    write_record(&a.mesh, "survivor", json!({"alive": true})).await;
    assert_eq!(
        update(&mut other).await,
        full("survivor", json!({"alive": true}), 1)
    );

    for client in [&mut full_a, &mut full_b] {
        for n in 1..=3 {
            assert_eq!(update(client).await, full("doomed", json!({"n": n}), n));
        }
    }
    for client in [&mut patch_a, &mut patch_b] {
        for n in 1..=3 {
            assert_eq!(update(client).await["version"], n);
        }
    }

    // Deleted through B: every subscriber, full or patch, on A or B, gets the exact
    // notice with the record's last version.
    assert!(b.mesh.delete_record("doomed").await.expect("delete"));
    for client in [&mut full_a, &mut patch_a, &mut full_b, &mut patch_b] {
        assert_eq!(
            push_text(client, DELETED).await,
            r#"{"command":"mesh/record-deleted","payload":{"recordId":"doomed","version":3}}"#
        );
    }
    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(stored(mesh, "doomed").await, None);
        assert_eq!(
            mesh.record_ids_matching("doomed").await.expect("ids"),
            Vec::<String>::new()
        );
    }
    // The removal hook of the deleting instance hears the old value and version.
    assert_eq!(
        recv_within(&mut removed).await,
        event("doomed", json!({"n": 3}), 3)
    );
    // Deleting one record does not notify another's subscribers; nothing else came.
    assert_no_record_push(
        &a.mesh,
        "marker",
        &mut [
            &mut full_a,
            &mut patch_a,
            &mut full_b,
            &mut patch_b,
            &mut other,
        ],
    )
    .await;
    // The server ended the direct subscriptions.
    for client in [&mut full_a, &mut patch_b] {
        assert_eq!(unsubscribe(client, 2, "doomed").await, false);
    }
    assert_eq!(unsubscribe(&mut other, 2, "survivor").await, true);
}

async fn deleting_a_missing_record_is_false_and_pushes_nothing(backend: Backend) {
    let (removed_hook, mut removed) = reporter();
    let a = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open()),
    )
    .await;
    let b = serve(backend.builder().on_record_removed(removed_hook)).await;
    let mut client = RawClient::connect(&a.url()).await;
    subscribe(&mut client, 1, "missing", None).await;

    assert!(!b.mesh.delete_record("missing").await.expect("delete"));
    assert!(!b.mesh.delete_record("never").await.expect("delete"));
    assert_no_record_push(&b.mesh, "marker-1", &mut [&mut client]).await;
    // The subscription is intact, and no removal hook ran.
    write_record(&b.mesh, "missing", json!(1)).await;
    assert_eq!(update(&mut client).await, full("missing", json!(1), 1));
    assert!(b.mesh.delete_record("missing").await.expect("delete"));
    assert_eq!(
        push_text(&mut client, DELETED).await,
        r#"{"command":"mesh/record-deleted","payload":{"recordId":"missing","version":1}}"#
    );
    assert_eq!(
        recv_within(&mut removed).await,
        event("missing", json!(1), 1)
    );
    // Deleting it again finds nothing.
    assert!(!a.mesh.delete_record("missing").await.expect("delete"));
    assert_no_record_push(&b.mesh, "marker-2", &mut [&mut client]).await;
}

async fn a_recreated_record_is_not_pushed_to_old_direct_subscribers(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_record(everything(), Access::open()),
    )
    .await;
    let mut old_a = RawClient::connect(&a.url()).await;
    let mut old_b = RawClient::connect(&b.url()).await;
    subscribe(&mut old_a, 1, "phoenix", Some("patch")).await;
    subscribe(&mut old_b, 1, "phoenix", None).await;
    write_record(&a.mesh, "phoenix", json!({"life": 1})).await;
    write_record(&a.mesh, "phoenix", json!({"life": 2})).await;
    assert!(a.mesh.delete_record("phoenix").await.expect("delete"));
    for client in [&mut old_a, &mut old_b] {
        assert_eq!(
            client.push_within(DELETED).await["payload"],
            json!({"recordId": "phoenix", "version": 2})
        );
    }

    // Created again: it starts over at version 1, and only new subscribers hear of it.
    assert_eq!(
        write_record(&b.mesh, "phoenix", json!({"life": 3})).await,
        Some(1)
    );
    assert_eq!(
        stored(&a.mesh, "phoenix").await,
        Some((json!({"life": 3}), 1))
    );
    assert_no_record_push(&b.mesh, "marker", &mut [&mut old_a, &mut old_b]).await;
    let mut fresh = RawClient::connect(&a.url()).await;
    assert_eq!(
        subscribe(&mut fresh, 1, "phoenix", None).await,
        subscribed(json!({"life": 3}), 1)
    );
    // Subscribing again after the notice works like any new subscription.
    assert_eq!(
        subscribe(&mut old_a, 2, "phoenix", Some("patch")).await,
        subscribed(json!({"life": 3}), 1)
    );
    write_record(&b.mesh, "phoenix", json!({"life": 4})).await;
    assert_eq!(
        update(&mut fresh).await,
        full("phoenix", json!({"life": 4}), 2)
    );
    assert_eq!(
        update(&mut old_a).await,
        patched(
            "phoenix",
            json!([{"op": "replace", "path": "/life", "value": 4}]),
            2
        )
    );
    assert_no_record_push(&b.mesh, "marker-2", &mut [&mut old_b]).await;
}

// ---------------------------------------------------------------------------------------
// Hooks.

async fn update_and_removal_hooks_all_run_and_a_panicking_one_stops_none(backend: Backend) {
    let (first, mut first_events) = reporter();
    let (second, mut second_events) = reporter();
    let (removed_first, mut removed_first_events) = reporter();
    let (removed_second, mut removed_second_events) = reporter();
    let builder = backend
        .builder()
        // Panics before its first await, and inside its future: neither stops the rest.
        .on_record_update(|_event: RecordEvent| -> std::future::Ready<()> {
            panic!("update hook panics at once")
        })
        .on_record_update(|_event: RecordEvent| async move {
            tokio::task::yield_now().await;
            panic!("update hook panics later")
        })
        .on_record_update(first)
        .on_record_update(second)
        .on_record_removed(|_event: RecordEvent| async move { panic!("removal hook panics") })
        .on_record_removed(removed_first)
        .on_record_removed(removed_second);
    let a = serve(builder).await;

    for n in 1..=2 {
        assert_eq!(
            write_record(&a.mesh, "hooked", json!({"n": n})).await,
            Some(n as u64)
        );
    }
    for events in [&mut first_events, &mut second_events] {
        assert_eq!(
            events_sorted(events, 2).await,
            [
                event("hooked", json!({"n": 1}), 1),
                event("hooked", json!({"n": 2}), 2)
            ]
        );
    }
    assert!(a.mesh.delete_record("hooked").await.expect("delete"));
    for events in [&mut removed_first_events, &mut removed_second_events] {
        assert_eq!(
            recv_within(events).await,
            event("hooked", json!({"n": 2}), 2)
        );
    }
    // A deletion is no update, and an update no deletion; the mesh still works.
    assert_eq!(
        write_record(&a.mesh, "hooked", json!("again")).await,
        Some(1)
    );
    for events in [&mut first_events, &mut second_events] {
        assert_eq!(
            recv_within(events).await,
            event("hooked", json!("again"), 1)
        );
    }
    assert!(a.mesh.delete_record("hooked").await.expect("delete"));
    for events in [&mut removed_first_events, &mut removed_second_events] {
        assert_eq!(
            recv_within(events).await,
            event("hooked", json!("again"), 1)
        );
    }
}

async fn a_hook_hears_writes_in_order_and_hooks_start_in_the_order_added(backend: Backend) {
    // mesh calls its record callbacks at each write, one after the other, in the order
    // they were added, and the builder documents "hooks run in the order added". A hook
    // that keeps the latest value somewhere (persistence, an audit log) must be called
    // for version 2 after its call for version 1 returned. The first hook's call for
    // version 1 does 30 ms of synchronous work, as a hook may.
    const WRITES: u64 = 10;
    let (tx, mut calls) = mpsc::unbounded_channel();
    let first = tx.clone();
    let a = serve(
        backend
            .builder()
            .on_record_update(move |event: RecordEvent| {
                if event.version == 1 {
                    std::thread::sleep(std::time::Duration::from_millis(30));
                }
                let _ = first.send((1, event.version));
                std::future::ready(())
            })
            .on_record_update(move |event: RecordEvent| {
                let _ = tx.send((2, event.version));
                std::future::ready(())
            }),
    )
    .await;
    for n in 1..=WRITES {
        assert_eq!(
            write_record(&a.mesh, "ordered", json!({ "n": n })).await,
            Some(n)
        );
    }
    let mut heard = Vec::new();
    while heard.len() < 2 * WRITES as usize {
        heard.push(recv_within(&mut calls).await);
    }
    for hook in [1, 2] {
        let versions: Vec<u64> = heard
            .iter()
            .filter(|(which, _)| *which == hook)
            .map(|(_, version)| *version)
            .collect();
        assert_eq!(
            versions,
            (1..=WRITES).collect::<Vec<_>>(),
            "hook {hook} heard the writes out of order: {heard:?}"
        );
    }
    for version in 1..=WRITES {
        let position = |hook: u8| heard.iter().position(|call| *call == (hook, version));
        assert!(
            position(1) < position(2),
            "for version {version}, the second hook ran before the first: {heard:?}"
        );
    }
}

async fn hooks_are_not_awaited_by_the_write(backend: Backend) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let hook_gate = gate.clone();
    let a = serve(
        backend
            .builder()
            .on_record_update(move |event: RecordEvent| {
                let gate = hook_gate.clone();
                let done = done_tx.clone();
                async move {
                    gate.notified().await;
                    let _ = done.send(event.version);
                }
            }),
    )
    .await;
    // The write returns while its hook is still waiting; a write that waited for it
    // would time out here.
    assert_eq!(
        within(
            "a write whose hook waits",
            write_record(&a.mesh, "slow", json!(1))
        )
        .await,
        Some(1)
    );
    assert!(
        done.try_recv().is_err(),
        "the hook finished before it was let go"
    );
    gate.notify_one();
    assert_eq!(recv_within(&mut done).await, 1);
}

// ---------------------------------------------------------------------------------------
// Unsubscribing.

async fn unsubscribe_stops_record_delivery(backend: Backend) {
    let a = serve(backend.builder().expose_record("doc", Access::open())).await;
    let b = serve(backend.builder()).await;
    let mut leaver = RawClient::connect(&a.url()).await;
    let mut stayer = RawClient::connect(&a.url()).await;
    subscribe(&mut leaver, 1, "doc", None).await;
    subscribe(&mut stayer, 1, "doc", Some("patch")).await;
    write_record(&b.mesh, "doc", json!({"n": 1})).await;
    assert_eq!(update(&mut leaver).await["version"], 1);
    assert_eq!(update(&mut stayer).await["version"], 1);

    assert_eq!(
        leaver
            .command_within(2, "mesh/unsubscribe-record", json!({"recordId": "doc"}))
            .await,
        json!({"id": 2, "command": "mesh/unsubscribe-record", "payload": true})
    );
    assert_eq!(unsubscribe(&mut leaver, 3, "doc").await, false);
    assert_eq!(unsubscribe(&mut leaver, 4, "never").await, false);
    write_record(&b.mesh, "doc", json!({"n": 2})).await;
    assert_eq!(
        update(&mut stayer).await,
        patched(
            "doc",
            json!([{"op": "replace", "path": "/n", "value": 2}]),
            2
        )
    );
    assert_no_record_push(&b.mesh, "marker-1", &mut [&mut leaver]).await;

    // The last local subscriber leaves: nothing reaches that instance's connections.
    assert_eq!(unsubscribe(&mut stayer, 2, "doc").await, true);
    write_record(&b.mesh, "doc", json!({"n": 3})).await;
    assert_no_record_push(&b.mesh, "marker-2", &mut [&mut leaver, &mut stayer]).await;
    // Subscribing again picks up the current version and what follows.
    assert_eq!(
        subscribe(&mut leaver, 5, "doc", Some("patch")).await,
        subscribed(json!({"n": 3}), 3)
    );
    write_record(&b.mesh, "doc", json!({"n": 4})).await;
    assert_eq!(
        update(&mut leaver).await,
        patched(
            "doc",
            json!([{"op": "replace", "path": "/n", "value": 4}]),
            4
        )
    );
}

async fn a_reconnected_client_subscribes_again(backend: Backend) {
    // resubscription.test.ts: after a reconnect the client is a new connection that runs
    // its subscriptions again; it gets the current state and then every change, and the
    // old connection's subscriptions trouble nobody.
    let builder = |backend: &Backend| {
        backend
            .builder()
            .expose_record("doc", Access::open())
            .expose_channel("news", Access::open())
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    let mut first = RawClient::connect(&a.url()).await;
    subscribe(&mut first, 1, "doc", Some("patch")).await;
    call(
        &mut first,
        2,
        "mesh/subscribe-channel",
        json!({"channel": "news"}),
    )
    .await;
    write_record(&b.mesh, "doc", json!({"n": 1})).await;
    b.mesh
        .write_channel("news", "before", 10)
        .await
        .expect("write");
    assert_eq!(update(&mut first).await["version"], 1);
    assert_eq!(
        first.push_within("mesh/subscription-message").await["payload"]["message"],
        "before"
    );
    first.close().await;

    let mut second = RawClient::connect(&a.url()).await;
    assert_ne!(second.id, first.id);
    assert_eq!(
        subscribe(&mut second, 1, "doc", Some("patch")).await,
        subscribed(json!({"n": 1}), 1)
    );
    assert_eq!(
        call(
            &mut second,
            2,
            "mesh/subscribe-channel",
            json!({"channel": "news", "historyLimit": 5}),
        )
        .await["history"],
        json!(["before"])
    );
    assert_eq!(write_record(&b.mesh, "doc", json!({"n": 2})).await, Some(2));
    b.mesh
        .write_channel("news", "after", 10)
        .await
        .expect("write");
    assert_eq!(
        update(&mut second).await,
        patched(
            "doc",
            json!([{"op": "replace", "path": "/n", "value": 2}]),
            2
        )
    );
    assert_eq!(
        second.push_within("mesh/subscription-message").await["payload"],
        json!({"channel": "news", "message": "after", "offset": 2})
    );
}

// ---------------------------------------------------------------------------------------
// Bad input and limits.

async fn bad_record_input_is_einvalid_and_stores_nothing(backend: Backend) {
    let (hook, mut events) = reporter();
    let a = serve(
        backend
            .builder()
            .expose_writable_record(everything(), Access::open())
            .on_record_update(hook),
    )
    .await;
    let mut client = RawClient::connect(&a.url()).await;
    let too_long = "x".repeat(tower_mesh::MAX_NAME_BYTES + 1);
    let bad_ids = [
        None,
        Some(Value::Null),
        Some(json!(5)),
        Some(json!(["r"])),
        Some(json!({"id": "r"})),
        Some(json!("")),
        Some(json!(too_long)),
    ];
    let mut payloads = Vec::new();
    for command in [
        "mesh/subscribe-record",
        "mesh/unsubscribe-record",
        "mesh/publish-record-update",
    ] {
        for id in &bad_ids {
            let mut payload = json!({"newValue": {"v": 1}});
            if let Some(id) = id {
                payload["recordId"] = id.clone();
            }
            payloads.push((command, payload));
        }
        payloads.push((command, json!("r")));
        payloads.push((command, Value::Null));
        payloads.push((command, json!({"record": "r", "newValue": 1})));
    }
    payloads.extend([
        (
            "mesh/subscribe-record",
            json!({"recordId": "r", "mode": "diff"}),
        ),
        (
            "mesh/subscribe-record",
            json!({"recordId": "r", "mode": "FULL"}),
        ),
        ("mesh/subscribe-record", json!({"recordId": "r", "mode": 5})),
        (
            "mesh/subscribe-record",
            json!({"recordId": "r", "mode": ""}),
        ),
        ("mesh/publish-record-update", json!({"recordId": "r"})),
        (
            "mesh/publish-record-update",
            json!({"recordId": "r", "newValue": 1, "options": {"strategy": "bogus"}}),
        ),
        (
            "mesh/publish-record-update",
            json!({"recordId": "r", "newValue": 1, "options": "merge"}),
        ),
    ]);
    for (n, (command, payload)) in payloads.into_iter().enumerate() {
        let id = n as u64 + 1;
        let reply = client.command_within(id, command, payload.clone()).await;
        assert_eq!(
            (reply["id"].clone(), reply["command"].clone()),
            (json!(id), json!(command))
        );
        assert_eq!(
            reply["payload"]["code"], "EINVALID",
            "{command} {payload}: {reply}"
        );
        assert_eq!(reply["payload"]["name"], "CommandError", "{reply}");
        assert!(reply["payload"]["error"].is_string(), "{reply}");
    }
    // Nothing was stored, and the client subscribed to nothing.
    assert_eq!(
        a.mesh.record_ids_matching(everything()).await.expect("ids"),
        Vec::<String>::new()
    );
    write_record(&a.mesh, "r", json!({"after": true})).await;
    assert_no_record_push(&a.mesh, "marker", &mut [&mut client]).await;
    assert_eq!(unsubscribe(&mut client, 900, "r").await, false);
    // The first hook call is for the server's write: no bad write reached the store.
    assert_eq!(
        recv_within(&mut events).await,
        event("r", json!({"after": true}), 1)
    );
    // The connection keeps working, and an id of exactly the limit is fine.
    let longest = "z".repeat(tower_mesh::MAX_NAME_BYTES);
    assert_eq!(
        subscribe(&mut client, 901, &longest, Some("patch")).await,
        subscribed(Value::Null, 0)
    );
    // (Written by another client: on the in-memory backend the writer's own update may
    // come before its reply.)
    let mut writer = RawClient::connect(&a.url()).await;
    assert_eq!(
        publish(&mut writer, 1, &longest, json!({"ok": 1}), None).await,
        json!({"success": true})
    );
    assert_eq!(
        update(&mut client).await,
        patched(
            &longest,
            json!([{"op": "add", "path": "/ok", "value": 1}]),
            1
        )
    );
}

async fn record_subscription_limit_answers_eoverloaded(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .max_subscriptions_per_connection(2)
            .expose_record(everything(), Access::open())
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;
    assert_eq!(subscribe(&mut client, 1, "r1", None).await["success"], true);
    assert_eq!(subscribe(&mut client, 2, "r2", None).await["success"], true);
    for (id, command, payload) in [
        (3, "mesh/subscribe-record", json!({"recordId": "r3"})),
        (4, "mesh/subscribe-channel", json!({"channel": "c1"})),
    ] {
        let reply = client.command_within(id, command, payload).await;
        assert_eq!(reply["payload"]["code"], "EOVERLOADED", "{reply}");
    }
    // The refused subscription stored nothing.
    write_record(&b.mesh, "r3", json!(3)).await;
    assert_no_record_push(&b.mesh, "marker-1", &mut [&mut client]).await;
    // Changing the mode of one it holds is not one more.
    assert_eq!(
        subscribe(&mut client, 5, "r1", Some("patch")).await["success"],
        true
    );
    // Unsubscribing frees a slot, and so does the deletion that ends a subscription.
    assert_eq!(unsubscribe(&mut client, 6, "r2").await, true);
    assert_eq!(
        subscribe(&mut client, 7, "r3", None).await,
        subscribed(json!(3), 1)
    );
    write_record(&b.mesh, "r1", json!({"x": 1})).await;
    assert!(b.mesh.delete_record("r1").await.expect("delete"));
    client.push_within(DELETED).await;
    assert_eq!(subscribe(&mut client, 8, "r4", None).await["success"], true);
    let reply = client
        .command_within(9, "mesh/subscribe-record", json!({"recordId": "r5"}))
        .await;
    assert_eq!(reply["payload"]["code"], "EOVERLOADED", "{reply}");
}

// ---------------------------------------------------------------------------------------
// Byte limits (issue 12 §1): a record's stored JSON text, after any merge.

const RECORD_LIMIT: usize = 200;

/// Instance A takes client writes, with `max_record_bytes` of [`RECORD_LIMIT`] (the writer's
/// instance is the one that enforces it); B only serves readers.
async fn record_limit_pair(backend: &Backend) -> (TestServer, TestServer, Events) {
    let (hook, events) = reporter();
    let a = serve(
        backend
            .builder()
            .max_record_bytes(RECORD_LIMIT)
            .expose_writable_record(everything(), Access::open())
            .on_record_update(hook),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .max_record_bytes(RECORD_LIMIT)
            .expose_record(everything(), Access::open()),
    )
    .await;
    (a, b, events)
}

async fn a_record_over_max_record_bytes_is_refused_and_nothing_is_stored_or_sent(backend: Backend) {
    let (a, b, mut events) = record_limit_pair(&backend).await;
    let mut writer = RawClient::connect(&a.url()).await;
    let mut full_b = RawClient::connect(&b.url()).await;
    let mut patch_b = RawClient::connect(&b.url()).await;
    subscribe(&mut full_b, 1, "doc", None).await;
    subscribe(&mut patch_b, 1, "doc", Some("patch")).await;
    let at_limit = object_of_size("pad", RECORD_LIMIT);
    let over = object_of_size("pad", RECORD_LIMIT + 1);

    // A record that does not exist yet: refused, and it still does not exist.
    let reply = writer
        .command_within(
            1,
            "mesh/publish-record-update",
            json!({"recordId": "doc", "newValue": over}),
        )
        .await;
    assert_eq!(reply["command"], "mesh/publish-record-update");
    assert_over_byte_limit(&reply["payload"], "max_record_bytes");
    assert_eq!(stored(&a.mesh, "doc").await, None);
    assert_eq!(stored(&b.mesh, "doc").await, None);
    assert_no_record_push(&b.mesh, "marker-1", &mut [&mut full_b, &mut patch_b]).await;

    // Exactly the limit is stored and sent.
    assert_eq!(
        publish(&mut writer, 2, "doc", at_limit.clone(), None).await,
        json!({"success": true})
    );
    assert_eq!(update(&mut full_b).await, full("doc", at_limit.clone(), 1));
    assert_eq!(update(&mut patch_b).await["version"], 1);

    // Over it on a record that exists: refused, the stored version stays.
    let reply = writer
        .command_within(
            3,
            "mesh/publish-record-update",
            json!({"recordId": "doc", "newValue": over}),
        )
        .await;
    assert_over_byte_limit(&reply["payload"], "max_record_bytes");
    assert_eq!(stored(&b.mesh, "doc").await, Some((at_limit.clone(), 1)));
    assert_no_record_push(&b.mesh, "marker-2", &mut [&mut full_b, &mut patch_b]).await;
    assert_eq!(
        subscribe(&mut full_b, 2, "doc", None).await,
        subscribed(at_limit.clone(), 1)
    );

    // The hooks heard only the stored write: the next event is the next version.
    write_record(&a.mesh, "doc", json!({"small": true})).await;
    assert_eq!(
        events_sorted(&mut events, 2).await,
        [
            event("doc", at_limit, 1),
            event("doc", json!({"small": true}), 2)
        ]
    );
}

async fn merges_growing_a_record_past_max_record_bytes_are_refused_and_the_record_stays(
    backend: Backend,
) {
    let (a, b, _events) = record_limit_pair(&backend).await;
    let mut writer = RawClient::connect(&a.url()).await;
    let mut full_b = RawClient::connect(&b.url()).await;
    let mut patch_b = RawClient::connect(&b.url()).await;
    subscribe(&mut full_b, 1, "doc", None).await;
    subscribe(&mut patch_b, 1, "doc", Some("patch")).await;

    let base = json!({"a": "x".repeat(100), "nested": {"keep": 1}});
    assert_eq!(
        publish(&mut writer, 1, "doc", base.clone(), None).await,
        json!({"success": true})
    );
    assert_eq!(update(&mut full_b).await, full("doc", base.clone(), 1));
    assert_eq!(update(&mut patch_b).await["version"], 1);

    // Each value fits on its own; merged into the stored one, it would not.
    let top_level = json!({"b": "y".repeat(80)});
    let nested = json!({"nested": {"more": "z".repeat(80)}});
    for (n, (value, strategy)) in [(&top_level, "merge"), (&nested, "deepMerge")]
        .into_iter()
        .enumerate()
    {
        assert!(value.to_string().len() <= RECORD_LIMIT);
        let mut merged = base.clone();
        if strategy == "merge" {
            merged["b"] = value["b"].clone();
        } else {
            merged["nested"]["more"] = value["nested"]["more"].clone();
        }
        assert!(merged.to_string().len() > RECORD_LIMIT, "{merged}");
        let reply = writer
            .command_within(
                10 + n as u64,
                "mesh/publish-record-update",
                json!({"recordId": "doc", "newValue": value,
                       "options": {"strategy": strategy}}),
            )
            .await;
        assert_over_byte_limit(&reply["payload"], "max_record_bytes");
        assert_eq!(stored(&b.mesh, "doc").await, Some((base.clone(), 1)));
    }

    // A merge that stays within the limit is stored as version 2, and it is the very next
    // update each subscriber gets: the refused merges sent nothing.
    let grown = json!({"a": "x".repeat(100), "nested": {"keep": 1, "more": 2}});
    assert_eq!(
        publish(
            &mut writer,
            20,
            "doc",
            json!({"nested": {"more": 2}}),
            Some("deepMerge")
        )
        .await,
        json!({"success": true})
    );
    assert_eq!(update(&mut full_b).await, full("doc", grown.clone(), 2));
    assert_eq!(
        update(&mut patch_b).await,
        patched(
            "doc",
            json!([{"op": "add", "path": "/nested/more", "value": 2}]),
            2
        )
    );
    assert_eq!(stored(&a.mesh, "doc").await, Some((grown, 2)));
}

async fn write_record_over_max_record_bytes_is_mesh_error_too_large(backend: Backend) {
    let (a, b, _events) = record_limit_pair(&backend).await;
    let mut reader = RawClient::connect(&b.url()).await;
    subscribe(&mut reader, 1, "doc", None).await;

    let over = object_of_size("pad", RECORD_LIMIT + 1);
    assert_too_large(
        a.mesh
            .write_record("doc", over, MergeStrategy::Replace)
            .await,
        "max_record_bytes",
        RECORD_LIMIT,
        RECORD_LIMIT + 1,
    );
    assert_eq!(stored(&b.mesh, "doc").await, None);

    let base = object_of_size("a", 150);
    assert_eq!(write_record(&a.mesh, "doc", base.clone()).await, Some(1));
    assert_eq!(update(&mut reader).await, full("doc", base.clone(), 1));
    // The size reported is the merged value's.
    let addition = json!({"b": "y".repeat(60)});
    let mut merged = base.clone();
    merged["b"] = addition["b"].clone();
    for strategy in [MergeStrategy::Merge, MergeStrategy::DeepMerge] {
        assert_too_large(
            a.mesh.write_record("doc", addition.clone(), strategy).await,
            "max_record_bytes",
            RECORD_LIMIT,
            merged.to_string().len(),
        );
    }
    assert_eq!(stored(&b.mesh, "doc").await, Some((base, 1)));
    assert_no_record_push(&a.mesh, "marker", &mut [&mut reader]).await;
}

/// A record is sent whole in a reply or a push, so `max_record_bytes` is lowered to the
/// frame limit: a record between the two sizes is refused.
async fn max_record_bytes_is_never_above_max_frame_size(backend: Backend) {
    const FRAME: usize = 4096;
    let a = serve(
        backend
            .builder()
            .max_frame_size(FRAME)
            .max_record_bytes(1024 * 1024)
            .expose_writable_record(everything(), Access::open()),
    )
    .await;
    // Without max_record_bytes, the default (1 MiB) is lowered the same way.
    let b = serve(
        backend
            .builder()
            .max_frame_size(FRAME)
            .expose_record(everything(), Access::open()),
    )
    .await;
    let mut reader = RawClient::connect(&b.url()).await;
    subscribe(&mut reader, 1, "doc", None).await;

    for mesh in [&a.mesh, &b.mesh] {
        assert_too_large(
            mesh.write_record(
                "doc",
                object_of_size("pad", FRAME + 1),
                MergeStrategy::Replace,
            )
            .await,
            "max_record_bytes",
            FRAME,
            FRAME + 1,
        );
    }
    assert_eq!(stored(&a.mesh, "doc").await, None);

    // A client cannot send such a record in one frame, but it can grow one by merging.
    let mut writer = RawClient::connect(&a.url()).await;
    let half = object_of_size("a", 3000);
    assert_eq!(
        publish(&mut writer, 1, "doc", half.clone(), None).await,
        json!({"success": true})
    );
    assert_eq!(update(&mut reader).await, full("doc", half.clone(), 1));
    let reply = writer
        .command_within(
            2,
            "mesh/publish-record-update",
            json!({"recordId": "doc", "newValue": object_of_size("b", 1500),
                   "options": {"strategy": "merge"}}),
        )
        .await;
    assert_over_byte_limit(&reply["payload"], "max_record_bytes");
    assert_eq!(stored(&b.mesh, "doc").await, Some((half, 1)));
    assert_no_record_push(&a.mesh, "marker", &mut [&mut reader]).await;

    // Exactly the frame limit is still a record.
    let at_frame = object_of_size("pad", FRAME);
    assert_eq!(
        write_record(&b.mesh, "doc", at_frame.clone()).await,
        Some(2)
    );
    assert_eq!(update(&mut reader).await, full("doc", at_frame, 2));
}

// ---------------------------------------------------------------------------------------
// Concurrency.

async fn concurrent_merges_from_two_instances_are_gap_free_and_lose_nothing(backend: Backend) {
    // Two instances (on Redis, two engines on one Redis) each merge 50 keys of their own
    // into one record, all at once. Every write is effective, so there are exactly 100
    // versions; subscribers on a third instance see each once, in order, and the values
    // only ever grow by the one key each write added.
    const PER_INSTANCE: usize = 50;
    const TOTAL: usize = 2 * PER_INSTANCE;
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let c = serve(backend.builder().expose_record("hot", Access::open())).await;
    let mut full_watcher = RawClient::connect(&c.url()).await;
    let mut patch_watcher = RawClient::connect(&c.url()).await;
    assert_eq!(
        subscribe(&mut full_watcher, 1, "hot", Some("full")).await,
        subscribed(Value::Null, 0)
    );
    assert_eq!(
        subscribe(&mut patch_watcher, 1, "hot", Some("patch")).await,
        subscribed(Value::Null, 0)
    );

    let writes: Vec<_> = (0..TOTAL)
        .map(|n| {
            let mesh = if n % 2 == 0 {
                a.mesh.clone()
            } else {
                b.mesh.clone()
            };
            tokio::spawn(async move {
                mesh.write_record("hot", json!({ format!("k{n}"): n }), MergeStrategy::Merge)
                    .await
            })
        })
        .collect();
    let fulls = within("every full update", async {
        let mut seen = Vec::new();
        while seen.len() < TOTAL {
            seen.push(full_watcher.push(UPDATE).await["payload"].clone());
        }
        seen
    })
    .await;
    let patches = within("every patch update", async {
        let mut seen = Vec::new();
        while seen.len() < TOTAL {
            seen.push(patch_watcher.push(UPDATE).await["payload"].clone());
        }
        seen
    })
    .await;
    let mut versions = Vec::new();
    for (n, result) in futures_util::future::join_all(writes)
        .await
        .into_iter()
        .enumerate()
    {
        let version = result
            .expect("task")
            .expect("write")
            .expect("every write changes the record");
        versions.push((n, version));
    }

    // Every write got its own version, 1 to 100.
    let distinct: BTreeSet<u64> = versions.iter().map(|(_, version)| *version).collect();
    assert_eq!(distinct, (1..=TOTAL as u64).collect::<BTreeSet<_>>());
    // Full updates: versions 1..=100 in order, each value the previous plus one key.
    let mut previous = serde_json::Map::new();
    for (i, pushed) in fulls.iter().enumerate() {
        assert_eq!(pushed["recordId"], "hot");
        assert_eq!(pushed["version"], i as u64 + 1, "update {i}: {pushed}");
        let value = pushed["full"].as_object().expect("an object");
        assert_eq!(value.len(), i + 1, "update {i}: {pushed}");
        for (key, old) in &previous {
            assert_eq!(value.get(key), Some(old), "a key was lost at {pushed}");
        }
        previous = value.clone();
    }
    // Each write's key first appears at the version its write returned.
    for (n, version) in &versions {
        let key = format!("k{n}");
        let at = &fulls[*version as usize - 1]["full"];
        assert_eq!(at[&key], json!(n), "write {n} at version {version}");
        if *version > 1 {
            assert!(
                fulls[*version as usize - 2]["full"].get(&key).is_none(),
                "write {n} seen before its version {version}"
            );
        }
    }
    // Patch updates: the same versions in order, and they rebuild the same value.
    let mut rebuilt = json!({});
    for (i, pushed) in patches.iter().enumerate() {
        assert_eq!(pushed["version"], i as u64 + 1, "patch {i}: {pushed}");
        apply_patch(&mut rebuilt, &pushed["patch"]);
        assert_eq!(rebuilt, fulls[i]["full"], "patch {i}");
    }
    // No write was lost: the final value has every key, at the last version.
    let expected: serde_json::Map<String, Value> =
        (0..TOTAL).map(|n| (format!("k{n}"), json!(n))).collect();
    for mesh in [&a.mesh, &b.mesh, &c.mesh] {
        let (value, version) = stored(mesh, "hot").await.expect("stored");
        assert_eq!(version, TOTAL as u64);
        assert_eq!(value, Value::Object(expected.clone()));
    }
    assert_no_record_push(
        &c.mesh,
        "marker",
        &mut [&mut full_watcher, &mut patch_watcher],
    )
    .await;
}
