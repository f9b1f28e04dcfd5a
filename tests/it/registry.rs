//! The connection registry and connection metadata (issue 2, item 8), on one instance and
//! across two instances of one mesh, on every backend.

use serde::Serialize;
use serde_json::{json, Value};
use tower_mesh::MergeStrategy;

use crate::common::*;

conformance!(
    connections_lists_the_local_connections,
    send_reaches_only_its_target,
    broadcast_reaches_every_connection,
    metadata_strategies_as_the_reference,
    server_set_metadata_is_read_by_the_client,
    other_connections_metadata_is_null_by_default,
    other_connections_metadata_when_opened,
    all_connection_metadata_in_connection_order,
    two_instances_send_to_a_connection_on_the_other,
    two_instances_broadcast_reaches_both,
    two_instances_share_metadata,
    two_instances_close_a_connection_on_the_other,
    connection_metadata_over_max_metadata_bytes_is_refused_and_the_old_value_stays,
);

async fn connections_lists_the_local_connections(backend: Backend) {
    let server = serve(backend.builder().command("echo", echo)).await;
    assert!(server.mesh.connections().is_empty());
    let a = RawClient::connect(&server.url()).await;
    let b = RawClient::connect(&server.url()).await;
    let c = RawClient::connect(&server.url()).await;
    assert_eq!(
        server.connection_ids(),
        sorted(vec![a.id.clone(), b.id.clone(), c.id.clone()])
    );
    assert_eq!(server.mesh.stats().connections, 3);
    assert_eq!(server.mesh.stats().connections_opened, 3);
    let handle = server.mesh.connection(&b.id).expect("listed");
    assert_eq!(handle.id(), b.id);
    assert!(!handle.is_closed());
    assert!(server.mesh.connection("no-such-connection").is_none());
}

#[derive(Serialize)]
struct Greeting {
    text: &'static str,
    n: u8,
}

async fn send_reaches_only_its_target(backend: Backend) {
    let server = serve(backend.builder().command("echo", echo)).await;
    let mut a = RawClient::connect(&server.url()).await;
    let mut b = RawClient::connect(&server.url()).await;
    server
        .mesh
        .send(&b.id, "hello", &json!({"to": "b", "list": [1, 2]}))
        .await
        .expect("send");
    // A push has no id: exactly {"command","payload"}.
    assert_eq!(
        b.next_text().await,
        r#"{"command":"hello","payload":{"to":"b","list":[1,2]}}"#
    );
    // Any serialisable payload.
    server
        .mesh
        .send(&b.id, "typed", &Greeting { text: "hi", n: 2 })
        .await
        .expect("send");
    assert_eq!(
        b.next_text().await,
        r#"{"command":"typed","payload":{"text":"hi","n":2}}"#
    );
    // `a` got nothing: its next frame is its own echo.
    assert_echo_is_next(&mut a, 1).await;
    assert_echo_is_next(&mut b, 2).await;
    // A connection that does not exist is not an error; the push goes nowhere.
    server
        .mesh
        .send("no-such-connection", "lost", &json!(0))
        .await
        .expect("send to nobody");
    assert_echo_is_next(&mut a, 3).await;
    assert_echo_is_next(&mut b, 4).await;
}

async fn broadcast_reaches_every_connection(backend: Backend) {
    let server = serve(backend.builder().command("echo", echo)).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(RawClient::connect(&server.url()).await);
    }
    server
        .mesh
        .broadcast("everyone", &json!({"n": 1}))
        .await
        .expect("broadcast");
    for (n, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            client.next_text().await,
            r#"{"command":"everyone","payload":{"n":1}}"#
        );
        // Exactly once.
        assert_echo_is_next(client, n as u64).await;
    }
}

async fn set_mine(client: &mut RawClient, id: u64, payload: Value) -> Value {
    client
        .command(id, "mesh/set-my-connection-metadata", payload)
        .await
}

async fn get_mine(client: &mut RawClient, id: u64) -> Value {
    let reply = client
        .command(id, "mesh/get-my-connection-metadata", json!({}))
        .await;
    assert_eq!(reply["command"], "mesh/get-my-connection-metadata");
    assert_eq!(reply["payload"].as_object().map(|o| o.len()), Some(1));
    reply["payload"]["metadata"].clone()
}

/// The steps of REFERENCE-BEHAVIOURS.md (client.test.ts), in order.
async fn metadata_strategies_as_the_reference(backend: Backend) {
    let server = serve(backend.builder()).await;
    let mut c = RawClient::connect(&server.url()).await;
    let success = |id: u64| json!({"id": id, "command": "mesh/set-my-connection-metadata", "payload": {"success": true}});
    assert_eq!(get_mine(&mut c, 1).await, Value::Null);

    // Set, read back.
    let first = json!({"name": "Alice", "role": "admin"});
    assert_eq!(
        set_mine(&mut c, 2, json!({"metadata": first})).await,
        success(2)
    );
    assert_eq!(get_mine(&mut c, 3).await, first);
    // A second set replaces the first.
    let second = json!({"name": "Bob"});
    assert_eq!(
        set_mine(&mut c, 4, json!({"metadata": second})).await,
        success(4)
    );
    assert_eq!(get_mine(&mut c, 5).await, second);
    // null.
    assert_eq!(
        set_mine(&mut c, 6, json!({"metadata": null})).await,
        success(6)
    );
    assert_eq!(get_mine(&mut c, 7).await, Value::Null);
    // {}.
    assert_eq!(
        set_mine(&mut c, 8, json!({"metadata": {}})).await,
        success(8)
    );
    assert_eq!(get_mine(&mut c, 9).await, json!({}));
    // Explicit replace.
    let base = json!({
        "name": "Alice",
        "preferences": {"theme": "dark", "notifications": {"email": true}},
    });
    set_mine(&mut c, 10, json!({"metadata": base})).await;
    assert_eq!(
        set_mine(
            &mut c,
            11,
            json!({"metadata": {"status": "away"}, "options": {"strategy": "replace"}})
        )
        .await,
        success(11)
    );
    assert_eq!(get_mine(&mut c, 12).await, json!({"status": "away"}));
    // merge: top level only; a nested object is replaced, not merged.
    set_mine(&mut c, 13, json!({"metadata": base})).await;
    assert_eq!(
        set_mine(
            &mut c,
            14,
            json!({"metadata": {"preferences": {"notifications": {"push": false}}, "status": "online"},
                   "options": {"strategy": "merge"}})
        )
        .await,
        success(14)
    );
    assert_eq!(
        get_mine(&mut c, 15).await,
        json!({"name": "Alice", "preferences": {"notifications": {"push": false}}, "status": "online"})
    );
    // deepMerge: nested objects merge recursively.
    set_mine(&mut c, 16, json!({"metadata": base})).await;
    assert_eq!(
        set_mine(
            &mut c,
            17,
            json!({"metadata": {"preferences": {"notifications": {"push": false}}},
                   "options": {"strategy": "deepMerge"}})
        )
        .await,
        success(17)
    );
    assert_eq!(
        get_mine(&mut c, 18).await,
        json!({"name": "Alice", "preferences": {"theme": "dark", "notifications": {"email": true, "push": false}}})
    );
    // deepMerge: arrays and scalars replace.
    set_mine(
        &mut c,
        19,
        json!({"metadata": {"tags": ["a", "b"], "n": 1}}),
    )
    .await;
    set_mine(
        &mut c,
        20,
        json!({"metadata": {"tags": ["c"], "n": {"x": 1}}, "options": {"strategy": "deepMerge"}}),
    )
    .await;
    assert_eq!(
        get_mine(&mut c, 21).await,
        json!({"tags": ["c"], "n": {"x": 1}})
    );
    // merge over a non-object gives the new object.
    set_mine(&mut c, 22, json!({"metadata": "initial-string"})).await;
    assert_eq!(get_mine(&mut c, 23).await, json!("initial-string"));
    assert_eq!(
        set_mine(
            &mut c,
            24,
            json!({"metadata": {"a": 1}, "options": {"strategy": "merge"}})
        )
        .await,
        success(24)
    );
    assert_eq!(get_mine(&mut c, 25).await, json!({"a": 1}));
    // Options without a strategy (or null options) replace.
    set_mine(&mut c, 26, json!({"metadata": {"b": 2}, "options": {}})).await;
    assert_eq!(get_mine(&mut c, 27).await, json!({"b": 2}));
    set_mine(&mut c, 28, json!({"metadata": {"c": 3}, "options": null})).await;
    assert_eq!(get_mine(&mut c, 29).await, json!({"c": 3}));
    // The server sees what the client stored.
    assert_eq!(
        server.mesh.connection_metadata(&c.id).await.expect("read"),
        Some(json!({"c": 3}))
    );
}

async fn server_set_metadata_is_read_by_the_client(backend: Backend) {
    let server = serve(backend.builder()).await;
    let mut c = RawClient::connect(&server.url()).await;
    assert!(server
        .mesh
        .set_connection_metadata(&c.id, json!({"plan": "pro"}), MergeStrategy::Replace)
        .await
        .expect("set"));
    assert!(server
        .mesh
        .set_connection_metadata(&c.id, json!({"seats": 3}), MergeStrategy::Merge)
        .await
        .expect("merge"));
    let expected = json!({"plan": "pro", "seats": 3});
    assert_eq!(get_mine(&mut c, 1).await, expected);
    assert_eq!(
        c.command(
            2,
            "mesh/get-connection-metadata",
            json!({"connectionId": c.id})
        )
        .await,
        json!({"id": 2, "command": "mesh/get-connection-metadata", "payload": {"metadata": expected}})
    );
    // A connection that does not exist: nothing stored, `false`.
    assert!(!server
        .mesh
        .set_connection_metadata("no-such-connection", json!(1), MergeStrategy::Replace)
        .await
        .expect("set"));
    assert_eq!(
        server
            .mesh
            .connection_metadata("no-such-connection")
            .await
            .expect("read"),
        None
    );
}

async fn other_connections_metadata_is_null_by_default(backend: Backend) {
    let server = serve(backend.builder()).await;
    let mut a = RawClient::connect(&server.url()).await;
    let mut b = RawClient::connect(&server.url()).await;
    set_mine(&mut b, 1, json!({"metadata": {"secret": "b's"}})).await;
    assert_eq!(
        a.command(
            2,
            "mesh/get-connection-metadata",
            json!({"connectionId": b.id})
        )
        .await,
        json!({"id": 2, "command": "mesh/get-connection-metadata", "payload": {"metadata": null}})
    );
    assert_eq!(
        b.command(
            3,
            "mesh/get-connection-metadata",
            json!({"connectionId": b.id})
        )
        .await["payload"],
        json!({"metadata": {"secret": "b's"}})
    );
    assert_eq!(
        a.command(
            4,
            "mesh/get-connection-metadata",
            json!({"connectionId": "no-such-connection"})
        )
        .await["payload"],
        json!({"metadata": null})
    );
}

async fn other_connections_metadata_when_opened(backend: Backend) {
    let server = serve(backend.builder().open_connection_metadata(true)).await;
    let mut a = RawClient::connect(&server.url()).await;
    let mut b = RawClient::connect(&server.url()).await;
    set_mine(&mut b, 1, json!({"metadata": {"public": "b's"}})).await;
    assert_eq!(
        a.command(
            2,
            "mesh/get-connection-metadata",
            json!({"connectionId": b.id})
        )
        .await,
        json!({"id": 2, "command": "mesh/get-connection-metadata", "payload": {"metadata": {"public": "b's"}}})
    );
    assert_eq!(
        a.command(
            3,
            "mesh/get-connection-metadata",
            json!({"connectionId": "no-such-connection"})
        )
        .await["payload"],
        json!({"metadata": null})
    );
}

async fn all_connection_metadata_in_connection_order(backend: Backend) {
    let server = serve(backend.builder()).await;
    assert_eq!(
        server.mesh.all_connection_metadata().await.expect("all"),
        vec![]
    );
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(RawClient::connect(&server.url()).await);
    }
    // Set out of order: the listing still follows connection order.
    set_mine(&mut clients[3], 1, json!({"metadata": {"n": 3}})).await;
    server
        .mesh
        .set_connection_metadata(&clients[0].id, json!({"n": 0}), MergeStrategy::Replace)
        .await
        .expect("set");
    set_mine(&mut clients[2], 2, json!({"metadata": [2]})).await;
    assert_eq!(
        server.mesh.all_connection_metadata().await.expect("all"),
        vec![
            (clients[0].id.clone(), json!({"n": 0})),
            (clients[1].id.clone(), Value::Null),
            (clients[2].id.clone(), json!([2])),
            (clients[3].id.clone(), json!({"n": 3})),
        ]
    );
}

async fn two_instances_send_to_a_connection_on_the_other(backend: Backend) {
    let a = serve(backend.builder().command("echo", echo)).await;
    let b = serve(backend.builder().command("echo", echo)).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    assert_eq!(a.connection_ids(), vec![on_a.id.clone()]);
    assert_eq!(b.connection_ids(), vec![on_b.id.clone()]);
    a.mesh
        .send(&on_b.id, "cross", &json!({"from": "a"}))
        .await
        .expect("send");
    assert_eq!(
        on_b.next_text().await,
        r#"{"command":"cross","payload":{"from":"a"}}"#
    );
    assert_echo_is_next(&mut on_a, 1).await;
    assert_echo_is_next(&mut on_b, 2).await;
}

async fn two_instances_broadcast_reaches_both(backend: Backend) {
    let a = serve(backend.builder().command("echo", echo)).await;
    let b = serve(backend.builder().command("echo", echo)).await;
    let mut clients = [
        RawClient::connect(&a.url()).await,
        RawClient::connect(&b.url()).await,
        RawClient::connect(&b.url()).await,
    ];
    a.mesh
        .broadcast("hello", &"Hello!")
        .await
        .expect("broadcast");
    for (n, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            client.next_text().await,
            r#"{"command":"hello","payload":"Hello!"}"#
        );
        assert_echo_is_next(client, n as u64).await;
    }
}

async fn two_instances_share_metadata(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    set_mine(&mut on_b, 1, json!({"metadata": {"where": "b"}})).await;
    assert_eq!(
        a.mesh.connection_metadata(&on_b.id).await.expect("read"),
        Some(json!({"where": "b"}))
    );
    // A writes metadata of a connection B holds; B's client reads it.
    assert!(a
        .mesh
        .set_connection_metadata(&on_b.id, json!({"by": "a"}), MergeStrategy::Merge)
        .await
        .expect("set"));
    assert_eq!(
        get_mine(&mut on_b, 2).await,
        json!({"where": "b", "by": "a"})
    );
    // Every instance lists every connection of the mesh, in connection order.
    let expected = vec![
        (on_a.id.clone(), Value::Null),
        (on_b.id.clone(), json!({"where": "b", "by": "a"})),
    ];
    assert_eq!(
        a.mesh.all_connection_metadata().await.expect("all"),
        expected
    );
    assert_eq!(
        b.mesh.all_connection_metadata().await.expect("all"),
        expected
    );
    // Routing survives the metadata writes (docs/protocol.md §6).
    a.mesh
        .send(&on_b.id, "still-routed", &json!(true))
        .await
        .expect("send");
    assert_eq!(
        on_b.next_text().await,
        r#"{"command":"still-routed","payload":true}"#
    );
}

async fn two_instances_close_a_connection_on_the_other(backend: Backend) {
    let a = serve(backend.builder().command("echo", echo)).await;
    let b = serve(backend.builder().command("echo", echo)).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    let mut also_b = RawClient::connect(&b.url()).await;
    a.mesh
        .close_connection(&on_b.id, "moved")
        .await
        .expect("close");
    assert_eq!(on_b.closed().await, (1000, "moved".to_owned()));
    assert_echo_is_next(&mut also_b, 1).await;
}

// ---------------------------------------------------------------------------------------
// Byte limits (issue 12 §1).

async fn connection_metadata_over_max_metadata_bytes_is_refused_and_the_old_value_stays(
    backend: Backend,
) {
    const LIMIT: usize = 200;
    let a = serve(backend.builder().max_metadata_bytes(LIMIT)).await;
    let b = serve(backend.builder().max_metadata_bytes(LIMIT)).await;
    let mut c = RawClient::connect(&a.url()).await;
    let success = |id: u64| json!({"id": id, "command": "mesh/set-my-connection-metadata", "payload": {"success": true}});

    // Over the limit with nothing stored: refused, still nothing.
    let over = json!({"metadata": object_of_size("pad", LIMIT + 1)});
    let reply = set_mine(&mut c, 1, over.clone()).await;
    assert_eq!(reply["command"], "mesh/set-my-connection-metadata");
    assert_over_byte_limit(&reply["payload"], "max_metadata_bytes");
    assert_eq!(get_mine(&mut c, 2).await, Value::Null);
    assert_eq!(b.mesh.connection_metadata(&c.id).await.expect("read"), None);

    // Exactly the limit is stored; one byte more does not replace it.
    let at_limit = object_of_size("pad", LIMIT);
    assert_eq!(
        set_mine(&mut c, 3, json!({"metadata": at_limit})).await,
        success(3)
    );
    let reply = set_mine(&mut c, 4, over).await;
    assert_over_byte_limit(&reply["payload"], "max_metadata_bytes");
    assert_eq!(get_mine(&mut c, 5).await, at_limit);

    // Values that fit on their own, merged into what is stored, would not: refused, and
    // the stored metadata stays, on every instance.
    let base = json!({"name": "x".repeat(100), "preferences": {"theme": "dark"}});
    assert_eq!(
        set_mine(&mut c, 6, json!({"metadata": base})).await,
        success(6)
    );
    let top_level = json!({"status": "y".repeat(80)});
    let nested = json!({"preferences": {"motto": "z".repeat(80)}});
    let mut merged = base.clone();
    merged["status"] = top_level["status"].clone();
    let mut deep_merged = base.clone();
    deep_merged["preferences"]["motto"] = nested["preferences"]["motto"].clone();
    for (n, (value, strategy)) in [(&top_level, "merge"), (&nested, "deepMerge")]
        .into_iter()
        .enumerate()
    {
        assert!(value.to_string().len() <= LIMIT);
        let reply = set_mine(
            &mut c,
            10 + n as u64,
            json!({"metadata": value, "options": {"strategy": strategy}}),
        )
        .await;
        assert_over_byte_limit(&reply["payload"], "max_metadata_bytes");
    }
    assert_eq!(get_mine(&mut c, 12).await, base);

    // The server API refuses the same writes with MeshError::TooLarge, on any instance and
    // through the connection's own handle.
    assert_too_large(
        b.mesh
            .set_connection_metadata(&c.id, top_level.clone(), MergeStrategy::Merge)
            .await,
        "max_metadata_bytes",
        LIMIT,
        merged.to_string().len(),
    );
    let handle = a.mesh.connection(&c.id).expect("a connection of A");
    assert_too_large(
        handle
            .set_metadata(nested.clone(), MergeStrategy::DeepMerge)
            .await,
        "max_metadata_bytes",
        LIMIT,
        deep_merged.to_string().len(),
    );
    assert_too_large(
        handle
            .set_metadata(object_of_size("pad", LIMIT + 1), MergeStrategy::Replace)
            .await,
        "max_metadata_bytes",
        LIMIT,
        LIMIT + 1,
    );
    for server in [&a, &b] {
        assert_eq!(
            server.mesh.connection_metadata(&c.id).await.expect("read"),
            Some(base.clone())
        );
    }
    assert_eq!(handle.metadata().await.expect("read"), Some(base.clone()));
    // A merge that stays within the limit is stored.
    handle
        .set_metadata(json!({"status": "away"}), MergeStrategy::Merge)
        .await
        .expect("merge");
    assert_eq!(
        get_mine(&mut c, 13).await,
        json!({"name": "x".repeat(100), "preferences": {"theme": "dark"}, "status": "away"})
    );
}
