//! Presence (issue 4, items 2 and 4): tracked rooms, subscriptions, join/leave/state
//! updates with their exact fields, states with expiry, TTL lapses and dead instances,
//! on both backends and over real WebSockets. Multi-instance tests put subscribers and
//! members on different instances of one mesh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tower_mesh::client::MeshClient;
use tower_mesh::{Connection, MergeStrategy, Mesh, MeshBuilder, PresenceOptions, Regex};

use crate::common::*;

conformance!(
    subscribe_to_untracked_and_empty_tracked_rooms,
    join_and_leave_updates_cross_instances_with_exact_fields,
    one_join_per_membership,
    server_side_changes_announce_presence,
    unsubscribe_stops_updates,
    presence_guard_refuses_watching,
    regex_patterns_track_presence,
    states_publish_and_clear,
    silent_state_is_stored_without_an_update,
    state_expiry_announces_null,
    states_with_different_expiries_expire_independently,
    replacing_a_state_drops_its_expiry,
    states_are_isolated_per_room,
    leaving_removes_the_state,
    bad_state_input_stores_nothing,
    caller_not_present_cannot_publish_or_clear,
    presence_commands_refuse_bad_room_names,
    presence_subscription_limit_answers_eoverloaded,
    lapsed_presence_leaves_once_and_returns_with_a_pong,
    killed_instance_members_leave_once,
    presence_lapses_on_the_survivors_when_its_instance_is_gone,
    disconnect_announces_leave_on_other_instances,
    late_subscriber_sees_members_and_states_of_every_instance,
    presence_replies_show_metadata_only_to_members_of_the_room,
    open_connection_metadata_shows_it_in_presence_replies_to_anyone,
    a_state_over_max_presence_state_bytes_is_refused_and_nothing_is_stored_or_sent,
    presence_replies_hold_the_states_that_fit_in_a_frame,
    presence_replies_hold_the_leading_members_that_fit_in_a_frame,
);

/// docs/protocol.md §6: pongs extend presence, so a TTL shorter than the ping interval is
/// refused when the mesh is built.
#[test]
#[should_panic(expected = "ping interval")]
fn a_ttl_shorter_than_the_ping_interval_is_refused() {
    let _ = Mesh::builder()
        .ping_interval(Duration::from_millis(500))
        .track_presence(
            "room",
            PresenceOptions::new().ttl(Duration::from_millis(499)),
        )
        .build();
}

// ---------------------------------------------------------------------------------------
// Helpers.

const UPDATE: &str = "mesh/presence-update";

async fn publish(client: &mut RawClient, id: u64, room: &str, state: Value) -> Value {
    call(
        client,
        id,
        "mesh/publish-presence-state",
        json!({ "roomName": room, "state": state }),
    )
    .await
}

async fn publish_expiring(
    client: &mut RawClient,
    id: u64,
    room: &str,
    state: Value,
    expire_after: u64,
) -> Value {
    call(
        client,
        id,
        "mesh/publish-presence-state",
        json!({ "roomName": room, "state": state, "expireAfter": expire_after }),
    )
    .await
}

async fn presence_state(client: &mut RawClient, id: u64, room: &str) -> Value {
    call(
        client,
        id,
        "mesh/get-presence-state",
        json!({ "roomName": room }),
    )
    .await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Checks a presence update against the expected one: exactly these fields, plus a
/// `timestamp` in milliseconds since the epoch, close to now.
fn assert_update(update: &Value, expected: Value) {
    let mut fields = update.as_object().expect("update is an object").clone();
    let timestamp = fields
        .remove("timestamp")
        .and_then(|t| t.as_u64())
        .unwrap_or_else(|| panic!("no integer timestamp in {update}"));
    let now = now_ms();
    assert!(
        timestamp <= now + 1000 && timestamp + 10_000 >= now,
        "timestamp {timestamp} is not close to now ({now}): {update}"
    );
    assert_eq!(Value::Object(fields), expected, "presence update");
}

fn membership_update(kind: &str, connection: &str, room: &str) -> Value {
    json!({"type": kind, "connectionId": connection, "roomName": room})
}

fn state_update(connection: &str, room: &str, state: Value) -> Value {
    json!({"type": "state", "connectionId": connection, "roomName": room, "state": state})
}

/// Asserts that the next presence update is exactly `expected` (plus a timestamp).
async fn expect_update(client: &mut RawClient, expected: Value) {
    let update = presence_update(client).await;
    assert_update(&update, expected);
}

/// The presence updates among `frames`.
fn updates_in(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|frame| frame.get("id").is_none() && frame["command"] == UPDATE)
        .map(|frame| frame["payload"].clone())
        .collect()
}

/// Broadcasts `marker` to every connection (ordered after anything published before it)
/// and returns the presence updates each client got before it.
async fn updates_before_marker(
    mesh: &Mesh,
    marker: &str,
    clients: &mut [&mut RawClient],
) -> Vec<Vec<Value>> {
    mesh.broadcast(marker, &json!(null))
        .await
        .expect("broadcast marker");
    let mut all = Vec::new();
    for client in clients.iter_mut() {
        all.push(updates_in(
            &frames_before_push(client, marker, Noise::Kept).await,
        ));
    }
    all
}

/// Reads until `n` pings have arrived (the server's clock, for a window without any
/// other ordering event); returns the presence updates seen meanwhile.
async fn updates_over_pings(client: &mut RawClient, n: usize) -> Vec<Value> {
    within(&format!("{n} pings"), async {
        let mut pings = 0;
        let mut updates = Vec::new();
        while pings < n {
            let frame = client.next().await;
            if frame.get("id").is_none() && frame["command"] == "ping" {
                pings += 1;
            } else if frame.get("id").is_none() && frame["command"] == UPDATE {
                updates.push(frame["payload"].clone());
            }
        }
        updates
    })
    .await
}

/// A short summary of an update, for comparing sequences: (type, connection, room, state).
fn summary(update: &Value) -> (String, String, String, Value) {
    (
        update["type"].as_str().unwrap_or_default().to_owned(),
        update["connectionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        update["roomName"].as_str().unwrap_or_default().to_owned(),
        update.get("state").cloned().unwrap_or(Value::Null),
    )
}

fn s(kind: &str, connection: &str, room: &str, state: Value) -> (String, String, String, Value) {
    (
        kind.to_owned(),
        connection.to_owned(),
        room.to_owned(),
        state,
    )
}

fn sorted_states(mut states: Vec<(String, Value)>) -> Vec<(String, Value)> {
    states.sort_by(|a, b| a.0.cmp(&b.0));
    states
}

fn tracking(backend: &Backend, room: &str) -> MeshBuilder {
    backend
        .builder()
        .track_presence(room, PresenceOptions::new())
}

// ---------------------------------------------------------------------------------------
// Subscriptions, join and leave.

async fn subscribe_to_untracked_and_empty_tracked_rooms(backend: Backend) {
    let server = serve(tracking(&backend, "lobby")).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut member = RawClient::connect(&server.url()).await;

    assert_eq!(
        client
            .command_within(
                1,
                "mesh/subscribe-presence",
                json!({"roomName": "untracked"})
            )
            .await,
        json!({"id": 1, "command": "mesh/subscribe-presence",
            "payload": {"success": false, "present": []}})
    );
    client
        .send_text(r#"{"id":2,"command":"mesh/subscribe-presence","payload":{"roomName":"lobby"}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":2,"command":"mesh/subscribe-presence","payload":{"success":true,"present":[],"states":{}}}"#
    );
    assert_eq!(
        presence_state(&mut client, 3, "lobby").await,
        json!({"success": true, "present": [], "states": {}})
    );
    let refused = presence_state(&mut client, 4, "untracked").await;
    assert_eq!(
        (&refused["success"], &refused["present"]),
        (&json!(false), &json!([])),
        "{refused}"
    );

    // Joining an untracked room announces nothing and makes nobody present; a state
    // cannot be published there (presence-state.test.ts).
    assert_eq!(join(&mut member, 1, "untracked").await["success"], true);
    assert_eq!(
        publish(&mut member, 2, "untracked", json!({"a": 1})).await,
        false
    );
    assert_eq!(
        call(
            &mut member,
            3,
            "mesh/clear-presence-state",
            json!({"roomName": "untracked"})
        )
        .await,
        false
    );
    assert_eq!(
        server
            .mesh
            .room("untracked")
            .present()
            .await
            .expect("present"),
        Vec::<String>::new()
    );
    assert_eq!(
        server
            .mesh
            .room("untracked")
            .presence_states()
            .await
            .expect("states"),
        vec![]
    );
    let updates = updates_before_marker(&server.mesh, "marker", &mut [&mut client]).await;
    assert_eq!(updates[0], Vec::<Value>::new());

    // unsubscribe answers whether the caller was subscribed.
    let unsubscribe =
        |id: u64, room: &str| (id, "mesh/unsubscribe-presence", json!({ "roomName": room }));
    for ((id, command, payload), expected) in [
        (unsubscribe(5, "lobby"), true),
        (unsubscribe(6, "lobby"), false),
        (unsubscribe(7, "untracked"), false),
    ] {
        assert_eq!(
            client.command_within(id, command, payload).await,
            json!({"id": id, "command": command, "payload": expected})
        );
    }
}

async fn join_and_leave_updates_cross_instances_with_exact_fields(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher_a = RawClient::connect(&a.url()).await;
    let mut watcher_b = RawClient::connect(&b.url()).await;
    for watcher in [&mut watcher_a, &mut watcher_b] {
        assert_eq!(
            subscribe_presence(watcher, 1, "room").await["success"],
            true
        );
    }
    let mut member_b = RawClient::connect(&b.url()).await;
    let mut member_a = RawClient::connect(&a.url()).await;

    // A join on B reaches the subscriber on A (and the one on B), exactly once each.
    let before = now_ms();
    join(&mut member_b, 1, "room").await;
    for watcher in [&mut watcher_a, &mut watcher_b] {
        let update = presence_update(watcher).await;
        assert_update(&update, membership_update("join", &member_b.id, "room"));
        let timestamp = update["timestamp"].as_u64().expect("timestamp");
        assert!(
            timestamp >= before && timestamp <= now_ms(),
            "{timestamp} not in [{before}, now]"
        );
    }
    join(&mut member_a, 1, "room").await;
    for watcher in [&mut watcher_a, &mut watcher_b] {
        expect_update(watcher, membership_update("join", &member_a.id, "room")).await;
    }
    assert_eq!(
        a.mesh.room("room").present().await.expect("present"),
        vec![member_b.id.clone(), member_a.id.clone()]
    );

    // presence-subscription.test.ts: B's leave reaches A as a leave.
    leave(&mut member_b, 2, "room").await;
    for watcher in [&mut watcher_a, &mut watcher_b] {
        expect_update(watcher, membership_update("leave", &member_b.id, "room")).await;
    }
    leave(&mut member_a, 2, "room").await;
    for watcher in [&mut watcher_a, &mut watcher_b] {
        expect_update(watcher, membership_update("leave", &member_a.id, "room")).await;
    }
    assert_eq!(
        b.mesh.room("room").present().await.expect("present"),
        Vec::<String>::new()
    );
    // The exact frame on the wire.
    join(&mut member_b, 3, "room").await;
    let frame = watcher_a.next_text().await;
    let timestamp = serde_json::from_str::<Value>(&frame).expect("json")["payload"]["timestamp"]
        .as_u64()
        .expect("timestamp");
    assert_eq!(
        frame,
        format!(
            r#"{{"command":"mesh/presence-update","payload":{{"type":"join","connectionId":"{}","roomName":"room","timestamp":{timestamp}}}}}"#,
            member_b.id
        )
    );
}

async fn one_join_per_membership(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut twice = RawClient::connect(&b.url()).await;
    let mut other = RawClient::connect(&a.url()).await;

    join(&mut twice, 1, "room").await;
    join(&mut twice, 2, "room").await;
    assert!(a.mesh.room("room").add(&twice.id).await.expect("add"));
    assert!(b.mesh.room("room").add(&twice.id).await.expect("add"));
    // A later join is the ordering event: only `twice`'s one join may come before it.
    join(&mut other, 1, "room").await;
    let mut updates = Vec::new();
    loop {
        let update = summary(&presence_update(&mut watcher).await);
        let done = update.1 == other.id;
        updates.push(update);
        if done {
            break;
        }
    }
    assert_eq!(
        updates,
        [
            s("join", &twice.id, "room", Value::Null),
            s("join", &other.id, "room", Value::Null)
        ]
    );
    assert_eq!(
        a.mesh.room("room").present().await.expect("present"),
        vec![twice.id.clone(), other.id.clone()]
    );

    // Likewise one leave: leaving twice announces once.
    leave(&mut twice, 3, "room").await;
    leave(&mut twice, 4, "room").await;
    assert!(!a.mesh.room("room").remove(&twice.id).await.expect("remove"));
    leave(&mut other, 2, "room").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(summary(&presence_update(&mut watcher).await));
    }
    assert_eq!(
        seen,
        [
            s("leave", &twice.id, "room", Value::Null),
            s("leave", &other.id, "room", Value::Null)
        ]
    );
}

async fn server_side_changes_announce_presence(backend: Backend) {
    let builder = |backend: &Backend| {
        backend
            .builder()
            .track_presence(Regex::new("^room-").expect("regex"), PresenceOptions::new())
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room-1").await;
    subscribe_presence(&mut watcher, 2, "room-2").await;
    let member = RawClient::connect(&b.url()).await;
    let mut local = RawClient::connect(&a.url()).await;

    // presence-subscription.test.ts: addToRoom gives exactly one join, removeFromRoom
    // exactly one leave, here for a connection held by the other instance.
    assert!(a.mesh.room("room-1").add(&member.id).await.expect("add"));
    expect_update(
        &mut watcher,
        membership_update("join", &member.id, "room-1"),
    )
    .await;
    assert!(a
        .mesh
        .room("room-1")
        .remove(&member.id)
        .await
        .expect("remove"));
    expect_update(
        &mut watcher,
        membership_update("leave", &member.id, "room-1"),
    )
    .await;

    // remove_from_all_rooms: one leave per tracked room.
    assert!(a.mesh.room("room-1").add(&member.id).await.expect("add"));
    assert!(a.mesh.room("room-2").add(&member.id).await.expect("add"));
    assert!(a.mesh.room("other").add(&member.id).await.expect("add"));
    for room in ["room-1", "room-2"] {
        expect_update(&mut watcher, membership_update("join", &member.id, room)).await;
    }
    assert!(a
        .mesh
        .remove_from_all_rooms(&member.id)
        .await
        .expect("remove all"));
    let mut leaves = vec![
        summary(&presence_update(&mut watcher).await),
        summary(&presence_update(&mut watcher).await),
    ];
    leaves.sort_by_key(|u| format!("{u:?}"));
    assert_eq!(
        leaves,
        [
            s("leave", &member.id, "room-1", Value::Null),
            s("leave", &member.id, "room-2", Value::Null)
        ]
    );

    // clear_room: a leave for every member, on both instances.
    join(&mut local, 1, "room-1").await;
    expect_update(&mut watcher, membership_update("join", &local.id, "room-1")).await;
    assert!(b.mesh.room("room-1").add(&member.id).await.expect("add"));
    expect_update(
        &mut watcher,
        membership_update("join", &member.id, "room-1"),
    )
    .await;
    b.mesh.room("room-1").clear().await.expect("clear");
    let mut leaves = vec![
        summary(&presence_update(&mut watcher).await),
        summary(&presence_update(&mut watcher).await),
    ];
    leaves.sort_by_key(|u| format!("{u:?}"));
    let mut expected = vec![
        s("leave", &member.id, "room-1", Value::Null),
        s("leave", &local.id, "room-1", Value::Null),
    ];
    expected.sort_by_key(|u| format!("{u:?}"));
    assert_eq!(leaves, expected);
    assert_eq!(
        a.mesh.room("room-1").present().await.expect("present"),
        Vec::<String>::new()
    );
    // Nothing more: no second leave for anyone.
    let updates = updates_before_marker(&a.mesh, "marker", &mut [&mut watcher]).await;
    assert_eq!(updates[0], Vec::<Value>::new());
}

async fn unsubscribe_stops_updates(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut leaving = RawClient::connect(&a.url()).await;
    let mut staying = RawClient::connect(&a.url()).await;
    for watcher in [&mut leaving, &mut staying] {
        subscribe_presence(watcher, 1, "room").await;
    }
    let mut member = RawClient::connect(&b.url()).await;
    join(&mut member, 1, "room").await;
    for watcher in [&mut leaving, &mut staying] {
        expect_update(watcher, membership_update("join", &member.id, "room")).await;
    }

    assert_eq!(
        call(
            &mut leaving,
            2,
            "mesh/unsubscribe-presence",
            json!({"roomName": "room"})
        )
        .await,
        true
    );
    // presence-subscription.test.ts: after unsubscribing, a removal is not delivered;
    // the subscriber that stayed, on the same instance, still gets it.
    a.mesh
        .room("room")
        .remove(&member.id)
        .await
        .expect("remove");
    expect_update(&mut staying, membership_update("leave", &member.id, "room")).await;
    join(&mut member, 2, "room").await;
    publish(&mut member, 3, "room", json!({"n": 1})).await;
    expect_update(&mut staying, membership_update("join", &member.id, "room")).await;
    expect_update(
        &mut staying,
        state_update(&member.id, "room", json!({"n": 1})),
    )
    .await;
    let updates = updates_before_marker(&b.mesh, "marker", &mut [&mut leaving]).await;
    assert_eq!(updates[0], Vec::<Value>::new());
    assert_eq!(
        call(
            &mut leaving,
            3,
            "mesh/unsubscribe-presence",
            json!({"roomName": "room"})
        )
        .await,
        false
    );
}

async fn presence_guard_refuses_watching(backend: Backend) {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let builder = |backend: &Backend| {
        let seen = seen.clone();
        backend.builder().track_presence(
            Regex::new("^guarded:").expect("regex"),
            PresenceOptions::new().guard(move |connection: Connection, room: String| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(room);
                    connection.headers().contains_key("x-allow")
                }
            }),
        )
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    let mut allowed = RawClient::connect_request(ws_request(&a.url(), &[("x-allow", "1")])).await;
    let mut refused = RawClient::connect(&a.url()).await;
    let mut member = RawClient::connect(&b.url()).await;

    assert_eq!(
        subscribe_presence(&mut allowed, 1, "guarded:1").await,
        json!({"success": true, "present": [], "states": {}})
    );
    assert_eq!(
        refused
            .command_within(
                1,
                "mesh/subscribe-presence",
                json!({"roomName": "guarded:1"})
            )
            .await,
        json!({"id": 1, "command": "mesh/subscribe-presence",
            "payload": {"success": false, "present": []}})
    );

    join(&mut member, 1, "guarded:1").await;
    expect_update(
        &mut allowed,
        membership_update("join", &member.id, "guarded:1"),
    )
    .await;
    publish(&mut member, 2, "guarded:1", json!({"secret": true})).await;
    expect_update(
        &mut allowed,
        state_update(&member.id, "guarded:1", json!({"secret": true})),
    )
    .await;

    // The guard also hides who is present from get-presence-state and from the join
    // reply; the refused connection still becomes a present member.
    let state = presence_state(&mut refused, 2, "guarded:1").await;
    assert_eq!(
        (&state["success"], &state["present"]),
        (&json!(false), &json!([])),
        "{state}"
    );
    assert!(
        state.get("states").is_none_or(|s| s == &json!({})),
        "{state}"
    );
    assert_eq!(
        join(&mut refused, 3, "guarded:1").await,
        json!({"success": true, "present": []})
    );
    expect_update(
        &mut allowed,
        membership_update("join", &refused.id, "guarded:1"),
    )
    .await;
    assert_eq!(
        join(&mut allowed, 2, "guarded:1").await,
        json!({"success": true, "present": [
            {"id": member.id, "metadata": null},
            {"id": refused.id, "metadata": null},
            {"id": allowed.id, "metadata": null},
        ]})
    );
    assert_eq!(
        presence_state(&mut allowed, 3, "guarded:1").await,
        json!({"success": true, "present": [member.id, refused.id, allowed.id],
            "states": {member.id.as_str(): {"secret": true}}})
    );
    // The refused subscriber got no update at all.
    let updates = updates_before_marker(&a.mesh, "marker", &mut [&mut refused]).await;
    assert_eq!(updates[0], Vec::<Value>::new());
    // The guard saw the exact room name every time.
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|room| room == "guarded:1"), "{seen:?}");
}

async fn regex_patterns_track_presence(backend: Backend) {
    let server = serve(
        backend
            .builder()
            .track_presence(
                Regex::new(r"^game:\d+$").expect("regex"),
                PresenceOptions::new(),
            )
            // An exact name beats a regex.
            .track_presence(
                "game:0",
                PresenceOptions::new().guard(|_c: Connection, _r: String| async { false }),
            ),
    )
    .await;
    let mut watcher = RawClient::connect(&server.url()).await;
    let mut member = RawClient::connect(&server.url()).await;
    for (n, (room, tracked)) in [
        ("game:7", true),
        ("game:123", true),
        ("game:x", false),
        ("my-game:7", false),
        ("game:7x", false),
        ("game:0", false),
    ]
    .into_iter()
    .enumerate()
    {
        let reply = subscribe_presence(&mut watcher, n as u64 + 1, room).await;
        assert_eq!(reply["success"], tracked, "{room}: {reply}");
    }
    join(&mut member, 1, "game:x").await;
    join(&mut member, 2, "game:7").await;
    // The untracked join announced nothing: the first update is game:7's.
    expect_update(
        &mut watcher,
        membership_update("join", &member.id, "game:7"),
    )
    .await;
    assert_eq!(
        server.mesh.room("game:7").present().await.expect("present"),
        vec![member.id.clone()]
    );
    assert_eq!(
        server.mesh.room("game:x").present().await.expect("present"),
        Vec::<String>::new()
    );
}

// ---------------------------------------------------------------------------------------
// States.

async fn states_publish_and_clear(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut member = RawClient::connect(&b.url()).await;
    join(&mut member, 1, "room").await;
    expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;

    assert_eq!(
        member
            .command_within(
                2,
                "mesh/publish-presence-state",
                json!({"roomName": "room", "state": {"status": "typing"}})
            )
            .await,
        json!({"id": 2, "command": "mesh/publish-presence-state", "payload": true})
    );
    expect_update(
        &mut watcher,
        state_update(&member.id, "room", json!({"status": "typing"})),
    )
    .await;
    // presence-state.test.ts: two publishes arrive in order; the stored one is the latest.
    assert_eq!(
        publish(&mut member, 3, "room", json!({"status": "idle"})).await,
        true
    );
    expect_update(
        &mut watcher,
        state_update(&member.id, "room", json!({"status": "idle"})),
    )
    .await;
    assert_eq!(
        presence_state(&mut watcher, 2, "room").await,
        json!({"success": true, "present": [member.id],
            "states": {member.id.as_str(): {"status": "idle"}}})
    );
    assert_eq!(
        a.mesh.room("room").presence_states().await.expect("states"),
        vec![(member.id.clone(), json!({"status": "idle"}))]
    );

    // Clearing announces state: null with exactly the state fields.
    assert_eq!(
        member
            .command_within(4, "mesh/clear-presence-state", json!({"roomName": "room"}))
            .await,
        json!({"id": 4, "command": "mesh/clear-presence-state", "payload": true})
    );
    expect_update(&mut watcher, state_update(&member.id, "room", Value::Null)).await;
    assert_eq!(
        b.mesh.room("room").presence_states().await.expect("states"),
        vec![]
    );
    // Clearing without a state: true (the caller is present), and no update; the next
    // update is the following publish.
    assert_eq!(
        call(
            &mut member,
            5,
            "mesh/clear-presence-state",
            json!({"roomName": "room"})
        )
        .await,
        true
    );
    publish(&mut member, 6, "room", json!({"n": 2})).await;
    expect_update(
        &mut watcher,
        state_update(&member.id, "room", json!({"n": 2})),
    )
    .await;
}

async fn silent_state_is_stored_without_an_update(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut member = RawClient::connect(&b.url()).await;
    let mut later = RawClient::connect(&a.url()).await;
    join(&mut member, 1, "room").await;
    expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;

    assert_eq!(
        call(
            &mut member,
            2,
            "mesh/publish-presence-state",
            json!({"roomName": "room", "state": {"mood": "quiet"}, "silent": true})
        )
        .await,
        true
    );
    // The next update is a later join, not a state.
    join(&mut later, 1, "room").await;
    expect_update(&mut watcher, membership_update("join", &later.id, "room")).await;
    // The state is stored: visible to get-presence-state and to a later subscriber.
    assert_eq!(
        presence_state(&mut watcher, 2, "room").await,
        json!({"success": true, "present": [member.id, later.id],
            "states": {member.id.as_str(): {"mood": "quiet"}}})
    );
    let mut late_watcher = RawClient::connect(&b.url()).await;
    assert_eq!(
        subscribe_presence(&mut late_watcher, 1, "room").await,
        json!({"success": true,
            "present": [{"id": member.id, "metadata": null}, {"id": later.id, "metadata": null}],
            "states": {member.id.as_str(): {"mood": "quiet"}}})
    );
    // silent: false is an ordinary publish.
    call(
        &mut member,
        3,
        "mesh/publish-presence-state",
        json!({"roomName": "room", "state": {"mood": "loud"}, "silent": false}),
    )
    .await;
    for watcher in [&mut watcher, &mut late_watcher] {
        expect_update(
            watcher,
            state_update(&member.id, "room", json!({"mood": "loud"})),
        )
        .await;
    }
}

async fn state_expiry_announces_null(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut member = RawClient::connect(&b.url()).await;
    join(&mut member, 1, "room").await;
    expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;

    let published_at = Instant::now();
    assert_eq!(
        publish_expiring(&mut member, 2, "room", json!({"typing": true}), 200).await,
        true
    );
    expect_update(
        &mut watcher,
        state_update(&member.id, "room", json!({"typing": true})),
    )
    .await;
    expect_update(&mut watcher, state_update(&member.id, "room", Value::Null)).await;
    let elapsed = published_at.elapsed();
    assert!(
        elapsed >= Duration::from_millis(180) && elapsed < Duration::from_secs(3),
        "state expired after {elapsed:?}"
    );
    assert_eq!(
        a.mesh.room("room").presence_states().await.expect("states"),
        vec![]
    );
    assert_eq!(
        presence_state(&mut watcher, 2, "room").await,
        json!({"success": true, "present": [member.id], "states": {}})
    );
    // Only the state expired: the member is still present.
    assert_eq!(
        b.mesh.room("room").present().await.expect("present"),
        vec![member.id.clone()]
    );
}

async fn states_with_different_expiries_expire_independently(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut short = RawClient::connect(&a.url()).await;
    let mut long = RawClient::connect(&b.url()).await;
    for member in [&mut short, &mut long] {
        join(member, 1, "room").await;
        expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;
    }
    publish_expiring(&mut short, 2, "room", json!({"v": "short"}), 200).await;
    publish_expiring(&mut long, 2, "room", json!({"v": "long"}), 800).await;
    expect_update(
        &mut watcher,
        state_update(&short.id, "room", json!({"v": "short"})),
    )
    .await;
    expect_update(
        &mut watcher,
        state_update(&long.id, "room", json!({"v": "long"})),
    )
    .await;
    expect_update(&mut watcher, state_update(&short.id, "room", Value::Null)).await;
    assert_eq!(
        b.mesh.room("room").presence_states().await.expect("states"),
        vec![(long.id.clone(), json!({"v": "long"}))]
    );
    expect_update(&mut watcher, state_update(&long.id, "room", Value::Null)).await;
    assert_eq!(
        a.mesh.room("room").presence_states().await.expect("states"),
        vec![]
    );
}

async fn replacing_a_state_drops_its_expiry(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut replaced = RawClient::connect(&b.url()).await;
    let mut timer = RawClient::connect(&a.url()).await;
    for member in [&mut replaced, &mut timer] {
        join(member, 1, "room").await;
    }
    publish_expiring(&mut replaced, 2, "room", json!({"v": 1}), 150).await;
    publish(&mut replaced, 3, "room", json!({"v": 2})).await;
    // The timer's expiry, later than the first state's would have been, is the
    // ordering event.
    publish_expiring(&mut timer, 2, "room", json!({"t": 1}), 450).await;
    let mut updates = Vec::new();
    loop {
        let update = summary(&presence_update(&mut watcher).await);
        let done = update == s("state", &timer.id, "room", Value::Null);
        updates.push(update);
        if done {
            break;
        }
    }
    assert_eq!(
        updates,
        [
            s("join", &replaced.id, "room", Value::Null),
            s("join", &timer.id, "room", Value::Null),
            s("state", &replaced.id, "room", json!({"v": 1})),
            s("state", &replaced.id, "room", json!({"v": 2})),
            s("state", &timer.id, "room", json!({"t": 1})),
            s("state", &timer.id, "room", Value::Null),
        ]
    );
    assert_eq!(
        a.mesh.room("room").presence_states().await.expect("states"),
        vec![(replaced.id.clone(), json!({"v": 2}))]
    );
}

async fn states_are_isolated_per_room(backend: Backend) {
    let builder = |backend: &Backend| {
        backend
            .builder()
            .track_presence(Regex::new("^iso:").expect("regex"), PresenceOptions::new())
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "iso:2").await;
    let mut member = RawClient::connect(&b.url()).await;
    join(&mut member, 1, "iso:1").await;
    join(&mut member, 2, "iso:2").await;
    publish(&mut member, 3, "iso:1", json!({"a": 1})).await;
    publish(&mut member, 4, "iso:2", json!({"b": 2})).await;
    publish(&mut member, 5, "iso:1", json!({"a": 3})).await;
    // The iso:2 watcher sees iso:2's join and state only.
    expect_update(&mut watcher, membership_update("join", &member.id, "iso:2")).await;
    expect_update(
        &mut watcher,
        state_update(&member.id, "iso:2", json!({"b": 2})),
    )
    .await;
    assert_eq!(
        a.mesh
            .room("iso:1")
            .presence_states()
            .await
            .expect("states"),
        vec![(member.id.clone(), json!({"a": 3}))]
    );
    assert_eq!(
        a.mesh
            .room("iso:2")
            .presence_states()
            .await
            .expect("states"),
        vec![(member.id.clone(), json!({"b": 2}))]
    );
    // Clearing one room's state leaves the other's.
    call(
        &mut member,
        6,
        "mesh/clear-presence-state",
        json!({"roomName": "iso:1"}),
    )
    .await;
    assert_eq!(
        b.mesh
            .room("iso:1")
            .presence_states()
            .await
            .expect("states"),
        vec![]
    );
    assert_eq!(
        presence_state(&mut watcher, 2, "iso:2").await,
        json!({"success": true, "present": [member.id], "states": {member.id.as_str(): {"b": 2}}})
    );
    // Leaving one room keeps the other's state too.
    leave(&mut member, 7, "iso:1").await;
    assert_eq!(
        b.mesh
            .room("iso:2")
            .presence_states()
            .await
            .expect("states"),
        vec![(member.id.clone(), json!({"b": 2}))]
    );
    let updates = updates_before_marker(&b.mesh, "marker", &mut [&mut watcher]).await;
    assert_eq!(updates[0], Vec::<Value>::new());
}

async fn leaving_removes_the_state(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut member = RawClient::connect(&b.url()).await;

    // presence-state.test.ts: join, state, leave: exactly three updates; after rejoining
    // there is no state.
    join(&mut member, 1, "room").await;
    publish(&mut member, 2, "room", json!({"x": 1})).await;
    leave(&mut member, 3, "room").await;
    join(&mut member, 4, "room").await;
    let mut updates = Vec::new();
    while updates.len() < 4 {
        updates.push(summary(&presence_update(&mut watcher).await));
    }
    assert_eq!(
        updates,
        [
            s("join", &member.id, "room", Value::Null),
            s("state", &member.id, "room", json!({"x": 1})),
            s("leave", &member.id, "room", Value::Null),
            s("join", &member.id, "room", Value::Null),
        ]
    );
    assert_eq!(
        presence_state(&mut watcher, 2, "room").await,
        json!({"success": true, "present": [member.id], "states": {}})
    );
    assert_eq!(
        a.mesh.room("room").presence_states().await.expect("states"),
        vec![]
    );

    // A server-side removal takes the state too.
    publish(&mut member, 5, "room", json!({"x": 2})).await;
    expect_update(
        &mut watcher,
        state_update(&member.id, "room", json!({"x": 2})),
    )
    .await;
    a.mesh
        .room("room")
        .remove(&member.id)
        .await
        .expect("remove");
    expect_update(&mut watcher, membership_update("leave", &member.id, "room")).await;
    assert!(a.mesh.room("room").add(&member.id).await.expect("add"));
    expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;
    assert_eq!(
        b.mesh.room("room").presence_states().await.expect("states"),
        vec![]
    );

    // A state that was due to expire is gone with the leave: no `state: null` follows
    // (a later expiry of another member's state is the ordering event).
    let mut timer = RawClient::connect(&a.url()).await;
    join(&mut timer, 1, "room").await;
    publish_expiring(&mut member, 6, "room", json!({"x": 3}), 150).await;
    leave(&mut member, 7, "room").await;
    publish_expiring(&mut timer, 2, "room", json!({"t": 1}), 450).await;
    let mut updates = Vec::new();
    loop {
        let update = summary(&presence_update(&mut watcher).await);
        let done = update == s("state", &timer.id, "room", Value::Null);
        updates.push(update);
        if done {
            break;
        }
    }
    assert_eq!(
        updates,
        [
            s("join", &timer.id, "room", Value::Null),
            s("state", &member.id, "room", json!({"x": 3})),
            s("leave", &member.id, "room", Value::Null),
            s("state", &timer.id, "room", json!({"t": 1})),
            s("state", &timer.id, "room", Value::Null),
        ]
    );
}

async fn bad_state_input_stores_nothing(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut member = RawClient::connect(&b.url()).await;
    join(&mut member, 1, "room").await;
    expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;

    let room = "room";
    let invalid = [
        json!({"roomName": room, "state": "typing"}),
        json!({"roomName": room, "state": 5}),
        json!({"roomName": room, "state": [1, 2]}),
        json!({"roomName": room, "state": true}),
        json!({"roomName": room, "state": {"a": 1}, "expireAfter": -1}),
        json!({"roomName": room, "state": {"a": 1}, "expireAfter": 0}),
        json!({"roomName": room, "state": {"a": 1}, "expireAfter": 1.5}),
        json!({"roomName": room, "state": {"a": 1}, "expireAfter": 86_400_001u64}),
        json!({"roomName": room, "state": {"a": 1}, "expireAfter": u64::MAX}),
        json!({"roomName": room, "state": {"a": 1}, "expireAfter": 1e20}),
        json!({"roomName": room, "state": {"a": 1}, "expireAfter": "100"}),
        json!({"roomName": room, "state": {"a": 1}, "silent": "yes"}),
    ];
    for (n, payload) in invalid.iter().enumerate() {
        let reply = call(
            &mut member,
            10 + n as u64,
            "mesh/publish-presence-state",
            payload.clone(),
        )
        .await;
        assert_eq!(reply["code"], "EINVALID", "{payload}: {reply}");
    }
    // presence-state.test.ts: a missing state answers false; so does a null one.
    for (n, payload) in [
        json!({"roomName": room}),
        json!({"roomName": room, "state": null}),
        json!({"roomName": room, "expireAfter": 100}),
    ]
    .iter()
    .enumerate()
    {
        let reply = call(
            &mut member,
            50 + n as u64,
            "mesh/publish-presence-state",
            payload.clone(),
        )
        .await;
        assert_eq!(reply, false, "{payload}");
    }
    assert_eq!(
        b.mesh.room(room).presence_states().await.expect("states"),
        vec![]
    );
    assert_eq!(
        presence_state(&mut watcher, 2, room).await,
        json!({"success": true, "present": [member.id], "states": {}})
    );
    // The longest expiry allowed is a day; that publish is the first state update.
    assert_eq!(
        publish_expiring(&mut member, 60, room, json!({"ok": true}), 86_400_000).await,
        true
    );
    expect_update(
        &mut watcher,
        state_update(&member.id, room, json!({"ok": true})),
    )
    .await;
    assert_eq!(call(&mut member, 61, "mesh/noop", json!({})).await, true);
}

async fn caller_not_present_cannot_publish_or_clear(backend: Backend) {
    let server = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&server.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut outsider = RawClient::connect(&server.url()).await;
    let mut member = RawClient::connect(&server.url()).await;
    join(&mut outsider, 1, "elsewhere").await;
    join(&mut member, 1, "room").await;

    assert_eq!(
        publish(&mut outsider, 2, "room", json!({"x": 1})).await,
        false
    );
    assert_eq!(
        call(
            &mut outsider,
            3,
            "mesh/clear-presence-state",
            json!({"roomName": "room"})
        )
        .await,
        false
    );
    assert_eq!(
        server
            .mesh
            .room("room")
            .presence_states()
            .await
            .expect("states"),
        vec![]
    );
    // Not a member, but it may read the room (presence-state.test.ts, client 3).
    assert_eq!(
        presence_state(&mut outsider, 4, "room").await,
        json!({"success": true, "present": [member.id], "states": {}})
    );
    // After leaving, the former member is refused as well.
    leave(&mut member, 2, "room").await;
    assert_eq!(
        publish(&mut member, 3, "room", json!({"x": 1})).await,
        false
    );
    let updates = updates_before_marker(&server.mesh, "marker", &mut [&mut watcher]).await;
    assert_eq!(
        updates[0].iter().map(summary).collect::<Vec<_>>(),
        [
            s("join", &member.id, "room", Value::Null),
            s("leave", &member.id, "room", Value::Null)
        ]
    );
}

async fn presence_commands_refuse_bad_room_names(backend: Backend) {
    // Every room is tracked, and one subscription is allowed: a bad name that was
    // stored anyway would use it up.
    let server = serve(
        backend
            .builder()
            .track_presence(Regex::new(".*").expect("regex"), PresenceOptions::new())
            .max_subscriptions_per_connection(1),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    let too_long = "x".repeat(2000);
    let rooms = [
        None,
        Some(json!(null)),
        Some(json!(5)),
        Some(json!(["a"])),
        Some(json!("")),
        Some(json!(too_long)),
    ];
    let mut id = 0;
    for command in [
        "mesh/subscribe-presence",
        "mesh/unsubscribe-presence",
        "mesh/publish-presence-state",
        "mesh/clear-presence-state",
        "mesh/get-presence-state",
    ] {
        for room in &rooms {
            let mut payload = json!({"state": {"a": 1}});
            if let Some(room) = room {
                payload["roomName"] = room.clone();
            }
            id += 1;
            let reply = client.command_within(id, command, payload.clone()).await;
            assert_eq!(
                (&reply["command"], &reply["payload"]["code"]),
                (&json!(command), &json!("EINVALID")),
                "{command} {payload}: {reply}"
            );
        }
    }
    assert_eq!(
        server.mesh.rooms().await.expect("rooms"),
        Vec::<String>::new()
    );
    // Nothing was subscribed: the one allowed subscription is still free.
    assert_eq!(
        subscribe_presence(&mut client, 100, "fine").await,
        json!({"success": true, "present": [], "states": {}})
    );
}

async fn presence_subscription_limit_answers_eoverloaded(backend: Backend) {
    let server = serve(
        backend
            .builder()
            .track_presence(Regex::new("^r").expect("regex"), PresenceOptions::new())
            .max_subscriptions_per_connection(2),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        subscribe_presence(&mut client, 1, "r1").await["success"],
        true
    );
    assert_eq!(
        subscribe_presence(&mut client, 2, "r2").await["success"],
        true
    );
    let refused = subscribe_presence(&mut client, 3, "r3").await;
    assert_eq!(refused["code"], "EOVERLOADED", "{refused}");
    // Subscribing again to one it holds is not one more.
    assert_eq!(
        subscribe_presence(&mut client, 4, "r1").await["success"],
        true
    );
    call(
        &mut client,
        5,
        "mesh/unsubscribe-presence",
        json!({"roomName": "r1"}),
    )
    .await;
    assert_eq!(
        subscribe_presence(&mut client, 6, "r3").await["success"],
        true
    );
    // The refused subscription delivers nothing; the held one does.
    let mut member = RawClient::connect(&server.url()).await;
    join(&mut member, 1, "r1").await;
    join(&mut member, 2, "r3").await;
    expect_update(&mut client, membership_update("join", &member.id, "r3")).await;
}

// ---------------------------------------------------------------------------------------
// TTL, disconnects and dead instances.

async fn lapsed_presence_leaves_once_and_returns_with_a_pong(backend: Backend) {
    // Pings every 100 ms, presence for 400 ms after the last pong; silent connections
    // stay open (their presence lapses, their membership does not).
    let builder = |backend: &Backend| {
        backend
            .builder()
            .ping_interval(Duration::from_millis(100))
            .max_missed_pongs(1000)
            .track_presence(
                "room",
                PresenceOptions::new().ttl(Duration::from_millis(400)),
            )
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    // Watchers read but never answer pings; they are not members, so it does not matter.
    let mut watcher_a = RawClient::connect(&a.url()).await;
    let mut watcher_b = RawClient::connect(&b.url()).await;
    for watcher in [&mut watcher_a, &mut watcher_b] {
        subscribe_presence(watcher, 1, "room").await;
    }
    // `alive` answers every ping (the Rust client does it itself); `silent` never does.
    let alive = MeshClient::connect(&a.url()).await.expect("client");
    let alive_id = alive.connection_id();
    alive
        .command("mesh/join-room", json!({"roomName": "room"}))
        .await
        .expect("join");
    let mut silent = RawClient::connect(&b.url()).await;
    let joined_at = Instant::now();
    join(&mut silent, 1, "room").await;

    for watcher in [&mut watcher_a, &mut watcher_b] {
        expect_update(watcher, membership_update("join", &alive_id, "room")).await;
        expect_update(watcher, membership_update("join", &silent.id, "room")).await;
    }
    // Exactly one leave reaches each watcher, for the silent member only, after its TTL.
    expect_update(
        &mut watcher_a,
        membership_update("leave", &silent.id, "room"),
    )
    .await;
    let lapsed_after = joined_at.elapsed();
    assert!(
        lapsed_after >= Duration::from_millis(350) && lapsed_after < Duration::from_secs(3),
        "lapsed after {lapsed_after:?} (ttl 400 ms)"
    );
    expect_update(
        &mut watcher_b,
        membership_update("leave", &silent.id, "room"),
    )
    .await;
    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            mesh.room("room").present().await.expect("present"),
            vec![alive_id.clone()]
        );
        // Membership outlives presence.
        assert!(mesh.room("room").contains(&silent.id).await.expect("in"));
    }
    // No longer present: it may not publish a state.
    assert_eq!(
        publish(&mut silent, 2, "room", json!({"here": true})).await,
        false
    );
    // Over several more TTLs, nothing else happens: no second leave for the silent
    // member (from the other instance's sweeper), and the answering one stays.
    let window = updates_over_pings(&mut watcher_a, 12).await;
    assert_eq!(window, Vec::<Value>::new());
    let rest = updates_before_marker(&a.mesh, "marker", &mut [&mut watcher_b]).await;
    assert_eq!(rest[0], Vec::<Value>::new());
    assert!(
        joined_at.elapsed() > Duration::from_millis(1200),
        "the window must span several TTLs"
    );
    assert_eq!(
        b.mesh.room("room").present().await.expect("present"),
        vec![alive_id.clone()]
    );

    // One pong later it is present again, announced with a join.
    silent
        .send_json(json!({"id": 1000, "command": "pong", "payload": {}}))
        .await;
    for watcher in [&mut watcher_a, &mut watcher_b] {
        expect_update(watcher, membership_update("join", &silent.id, "room")).await;
    }
    assert_eq!(
        a.mesh.room("room").present().await.expect("present"),
        vec![alive_id.clone(), silent.id.clone()]
    );
    assert_eq!(
        publish(&mut silent, 3, "room", json!({"here": true})).await,
        true
    );
    alive.close().await;
}

async fn killed_instance_members_leave_once(backend: Backend) {
    let tracked =
        |backend: &Backend| fast_liveness(backend).track_presence("room", PresenceOptions::new());
    let survivor_1 = serve(tracked(&backend)).await;
    let survivor_2 = serve(tracked(&backend)).await;
    let doomed = DoomedInstance::start(tracked(&backend)).await;
    let mut watcher_1 = RawClient::connect(&survivor_1.url()).await;
    let mut watcher_2 = RawClient::connect(&survivor_2.url()).await;
    for watcher in [&mut watcher_1, &mut watcher_2] {
        subscribe_presence(watcher, 1, "room").await;
    }
    let mut keeper = RawClient::connect(&survivor_1.url()).await;
    let mut victim = RawClient::connect(&doomed.url).await;
    join(&mut keeper, 1, "room").await;
    join(&mut victim, 1, "room").await;
    publish(&mut victim, 2, "room", json!({"on": "doomed"})).await;
    for watcher in [&mut watcher_1, &mut watcher_2] {
        expect_update(watcher, membership_update("join", &keeper.id, "room")).await;
        expect_update(watcher, membership_update("join", &victim.id, "room")).await;
        expect_update(
            watcher,
            state_update(&victim.id, "room", json!({"on": "doomed"})),
        )
        .await;
    }

    let killed_at = Instant::now();
    doomed.kill().await;
    // The survivors find the dead instance and announce its member's leave: the next
    // update on both, with exact fields.
    for watcher in [&mut watcher_1, &mut watcher_2] {
        expect_update(watcher, membership_update("leave", &victim.id, "room")).await;
    }
    let swept_after = killed_at.elapsed();
    assert!(swept_after < Duration::from_secs(4), "{swept_after:?}");
    eprintln!(
        "a killed instance's member left after {swept_after:?} (the leave reached both survivors)"
    );
    for mesh in [&survivor_1.mesh, &survivor_2.mesh] {
        assert_eq!(
            mesh.room("room").present().await.expect("present"),
            vec![keeper.id.clone()]
        );
        assert_eq!(
            mesh.room("room").presence_states().await.expect("states"),
            vec![]
        );
    }
    assert_eq!(
        presence_state(&mut watcher_1, 2, "room").await,
        json!({"success": true, "present": [keeper.id], "states": {}})
    );

    // Exactly one leave: a state expiring well after every survivor has swept again is
    // the ordering event, and nothing comes before it but its own updates.
    publish_expiring(&mut keeper, 2, "room", json!({"k": 1}), 1200).await;
    for watcher in [&mut watcher_1, &mut watcher_2] {
        let mut updates = Vec::new();
        loop {
            let update = summary(&presence_update(watcher).await);
            let done = update == s("state", &keeper.id, "room", Value::Null);
            updates.push(update);
            if done {
                break;
            }
        }
        assert_eq!(
            updates,
            [
                s("state", &keeper.id, "room", json!({"k": 1})),
                s("state", &keeper.id, "room", Value::Null),
            ]
        );
    }
}

async fn presence_lapses_on_the_survivors_when_its_instance_is_gone(backend: Backend) {
    // The Redis instance TTL is the default 10 s here, so a leave within a few seconds
    // is the presence TTL lapsing, found by a surviving instance's sweeper (the owner,
    // which would otherwise sweep its own connection's lapse, is dead).
    let tracked = |backend: &Backend| {
        backend
            .builder()
            .ping_interval(Duration::from_millis(100))
            .max_missed_pongs(1000)
            .track_presence(
                "room",
                PresenceOptions::new().ttl(Duration::from_millis(500)),
            )
    };
    let survivor = serve(tracked(&backend)).await;
    let doomed = DoomedInstance::start(tracked(&backend)).await;
    let mut watcher = RawClient::connect(&survivor.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    // It answers pings, so it stays present for as long as its instance lives.
    let victim = MeshClient::builder(doomed.url.as_str())
        .reconnect(false)
        .connect()
        .await
        .expect("client");
    let victim_id = victim.connection_id();
    victim
        .command("mesh/join-room", json!({"roomName": "room"}))
        .await
        .expect("join");
    expect_update(&mut watcher, membership_update("join", &victim_id, "room")).await;
    // Still present after more than a TTL (the watcher's pings measure the time): its
    // pongs refresh it.
    let window = updates_over_pings(&mut watcher, 8).await;
    assert_eq!(window, Vec::<Value>::new());

    let killed_at = Instant::now();
    doomed.kill().await;
    expect_update(&mut watcher, membership_update("leave", &victim_id, "room")).await;
    let lapsed_after = killed_at.elapsed();
    assert!(
        lapsed_after < Duration::from_secs(4),
        "presence of a dead instance's connection lapsed after {lapsed_after:?}"
    );
    assert_eq!(
        survivor.mesh.room("room").present().await.expect("present"),
        Vec::<String>::new()
    );
    drop(victim);
}

async fn disconnect_announces_leave_on_other_instances(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut closes = RawClient::connect(&b.url()).await;
    let mut closed = RawClient::connect(&b.url()).await;
    for member in [&mut closes, &mut closed] {
        join(member, 1, "room").await;
        expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;
    }
    publish(&mut closes, 2, "room", json!({"bye": true})).await;
    expect_update(
        &mut watcher,
        state_update(&closes.id, "room", json!({"bye": true})),
    )
    .await;

    // presence-subscription.test.ts: B's close() reaches A as a leave, and the
    // connection is no longer present; its state is gone (presence-state.test.ts).
    closes.close().await;
    expect_update(&mut watcher, membership_update("leave", &closes.id, "room")).await;
    assert_eq!(
        a.mesh.room("room").present().await.expect("present"),
        vec![closed.id.clone()]
    );
    assert_eq!(
        a.mesh.room("room").presence_states().await.expect("states"),
        vec![]
    );

    // A server-side close, asked from the other instance.
    a.mesh
        .close_connection(&closed.id, "done")
        .await
        .expect("close");
    assert_eq!(closed.closed().await, (1000, "done".to_owned()));
    expect_update(&mut watcher, membership_update("leave", &closed.id, "room")).await;
    assert_eq!(
        b.mesh.room("room").present().await.expect("present"),
        Vec::<String>::new()
    );
}

async fn late_subscriber_sees_members_and_states_of_every_instance(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let mut m1 = RawClient::connect(&a.url()).await;
    let mut m2 = RawClient::connect(&b.url()).await;
    let mut m3 = RawClient::connect(&b.url()).await;
    call(
        &mut m1,
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"name": "m1"}}),
    )
    .await;
    b.mesh
        .set_connection_metadata(&m3.id, json!({"name": "m3"}), MergeStrategy::Replace)
        .await
        .expect("set");
    join(&mut m1, 2, "room").await;
    join(&mut m2, 1, "room").await;
    // The join reply lists every member with its metadata, across instances.
    assert_eq!(
        join(&mut m3, 1, "room").await,
        json!({"success": true, "present": [
            {"id": m1.id, "metadata": {"name": "m1"}},
            {"id": m2.id, "metadata": null},
            {"id": m3.id, "metadata": {"name": "m3"}},
        ]})
    );
    publish(&mut m1, 3, "room", json!({"s": 1})).await;
    call(
        &mut m3,
        2,
        "mesh/publish-presence-state",
        json!({"roomName": "room", "state": {"s": 3}, "silent": true}),
    )
    .await;

    // Not a member of the room: the ids and states, but no metadata (docs/protocol.md §6).
    let expected = json!({"success": true,
        "present": [
            {"id": m1.id, "metadata": null},
            {"id": m2.id, "metadata": null},
            {"id": m3.id, "metadata": null},
        ],
        "states": {m1.id.as_str(): {"s": 1}, m3.id.as_str(): {"s": 3}}});
    for server in [&a, &b] {
        let mut late = RawClient::connect(&server.url()).await;
        assert_eq!(subscribe_presence(&mut late, 1, "room").await, expected);
        assert_eq!(
            presence_state(&mut late, 2, "room").await,
            json!({"success": true, "present": [m1.id, m2.id, m3.id],
                "states": {m1.id.as_str(): {"s": 1}, m3.id.as_str(): {"s": 3}}})
        );
        assert_eq!(
            server.mesh.room("room").present().await.expect("present"),
            vec![m1.id.clone(), m2.id.clone(), m3.id.clone()]
        );
        assert_eq!(
            sorted_states(
                server
                    .mesh
                    .room("room")
                    .presence_states()
                    .await
                    .expect("states")
            ),
            sorted_states(vec![
                (m1.id.clone(), json!({"s": 1})),
                (m3.id.clone(), json!({"s": 3}))
            ])
        );
    }
}

// ---------------------------------------------------------------------------------------
// Whose metadata presence shows (docs/protocol.md §6): the rule of mesh/get-connection-metadata.

/// Two members on B, each with metadata (one set by the client, one by the server).
async fn members_with_metadata(b: &TestServer, room: &str) -> (RawClient, RawClient) {
    let mut m1 = RawClient::connect(&b.url()).await;
    let mut m2 = RawClient::connect(&b.url()).await;
    call(
        &mut m1,
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"name": "m1"}}),
    )
    .await;
    b.mesh
        .set_connection_metadata(&m2.id, json!({"name": "m2"}), MergeStrategy::Replace)
        .await
        .expect("set");
    join(&mut m1, 2, room).await;
    assert_eq!(
        join(&mut m2, 1, room).await,
        json!({"success": true, "present": [
            {"id": m1.id, "metadata": {"name": "m1"}},
            {"id": m2.id, "metadata": {"name": "m2"}},
        ]})
    );
    (m1, m2)
}

async fn presence_replies_show_metadata_only_to_members_of_the_room(backend: Backend) {
    let a = serve(tracking(&backend, "room")).await;
    let b = serve(tracking(&backend, "room")).await;
    let (m1, mut m2) = members_with_metadata(&b, "room").await;
    let hidden = json!([
        {"id": m1.id, "metadata": null},
        {"id": m2.id, "metadata": null},
    ]);
    let shown = json!([
        {"id": m1.id, "metadata": {"name": "m1"}},
        {"id": m2.id, "metadata": {"name": "m2"}},
    ]);

    // An outsider on the other instance sees who is present, not their metadata.
    let mut outsider = RawClient::connect(&a.url()).await;
    call(
        &mut outsider,
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"name": "outsider"}}),
    )
    .await;
    assert_eq!(
        subscribe_presence(&mut outsider, 2, "room").await,
        json!({"success": true, "present": hidden, "states": {}})
    );
    assert_eq!(
        presence_state(&mut outsider, 3, "room").await,
        json!({"success": true, "present": [m1.id, m2.id], "states": {}})
    );
    // mesh/get-connection-metadata says the same.
    assert_eq!(
        call(
            &mut outsider,
            4,
            "mesh/get-connection-metadata",
            json!({"connectionId": m1.id})
        )
        .await,
        json!({"metadata": null})
    );

    // A member subscribing sees the others' metadata, on its own instance and across.
    assert_eq!(
        subscribe_presence(&mut m2, 2, "room").await,
        json!({"success": true, "present": shown, "states": {}})
    );
    let mut member_on_a = RawClient::connect(&a.url()).await;
    let mut shown_with_a = shown.as_array().expect("array").clone();
    shown_with_a.push(json!({"id": member_on_a.id, "metadata": null}));
    assert_eq!(
        join(&mut member_on_a, 1, "room").await,
        json!({"success": true, "present": shown_with_a})
    );
    assert_eq!(
        subscribe_presence(&mut member_on_a, 2, "room").await,
        json!({"success": true, "present": shown_with_a, "states": {}})
    );
    // Presence updates carry no metadata, whoever receives them.
    expect_update(
        &mut outsider,
        membership_update("join", &member_on_a.id, "room"),
    )
    .await;
    leave(&mut member_on_a, 3, "room").await;
    expect_update(
        &mut outsider,
        membership_update("leave", &member_on_a.id, "room"),
    )
    .await;

    // A reply shows what the caller may read when it is made: once the outsider joins,
    // its join reply and a new subscription show the metadata...
    let mut shown_with_outsider = shown.as_array().expect("array").clone();
    shown_with_outsider.push(json!({"id": outsider.id, "metadata": {"name": "outsider"}}));
    assert_eq!(
        join(&mut outsider, 5, "room").await,
        json!({"success": true, "present": shown_with_outsider})
    );
    assert_eq!(
        call(
            &mut outsider,
            6,
            "mesh/unsubscribe-presence",
            json!({"roomName": "room"})
        )
        .await,
        json!(true)
    );
    assert_eq!(
        subscribe_presence(&mut outsider, 7, "room").await,
        json!({"success": true, "present": shown_with_outsider, "states": {}})
    );
    // ...and once it has left, they are hidden again.
    leave(&mut outsider, 8, "room").await;
    assert_eq!(
        call(
            &mut outsider,
            9,
            "mesh/unsubscribe-presence",
            json!({"roomName": "room"})
        )
        .await,
        json!(true)
    );
    assert_eq!(
        subscribe_presence(&mut outsider, 10, "room").await,
        json!({"success": true, "present": hidden, "states": {}})
    );
}

async fn open_connection_metadata_shows_it_in_presence_replies_to_anyone(backend: Backend) {
    let a = serve(tracking(&backend, "room").open_connection_metadata(true)).await;
    let b = serve(tracking(&backend, "room").open_connection_metadata(true)).await;
    let (m1, m2) = members_with_metadata(&b, "room").await;
    let mut outsider = RawClient::connect(&a.url()).await;
    assert_eq!(
        subscribe_presence(&mut outsider, 1, "room").await,
        json!({"success": true, "present": [
            {"id": m1.id, "metadata": {"name": "m1"}},
            {"id": m2.id, "metadata": {"name": "m2"}},
        ], "states": {}})
    );
    assert_eq!(
        presence_state(&mut outsider, 2, "room").await,
        json!({"success": true, "present": [m1.id, m2.id], "states": {}})
    );
}

// ---------------------------------------------------------------------------------------
// Byte limits (issue 12 §1).

async fn a_state_over_max_presence_state_bytes_is_refused_and_nothing_is_stored_or_sent(
    backend: Backend,
) {
    const LIMIT: usize = 100;
    let a = serve(tracking(&backend, "room").max_presence_state_bytes(LIMIT)).await;
    let b = serve(tracking(&backend, "room").max_presence_state_bytes(LIMIT)).await;
    let mut watcher = RawClient::connect(&a.url()).await;
    subscribe_presence(&mut watcher, 1, "room").await;
    let mut member = RawClient::connect(&b.url()).await;
    join(&mut member, 1, "room").await;
    expect_update(&mut watcher, membership_update("join", &member.id, "room")).await;

    // Exactly the limit is stored and announced.
    let at_limit = object_of_size("pad", LIMIT);
    assert_eq!(
        publish(&mut member, 2, "room", at_limit.clone()).await,
        true
    );
    expect_update(
        &mut watcher,
        state_update(&member.id, "room", at_limit.clone()),
    )
    .await;

    // One byte more is refused, silent or expiring alike.
    let over = object_of_size("pad", LIMIT + 1);
    for (n, payload) in [
        json!({"roomName": "room", "state": over}),
        json!({"roomName": "room", "state": over, "silent": true}),
        json!({"roomName": "room", "state": over, "expireAfter": 60_000}),
    ]
    .into_iter()
    .enumerate()
    {
        let reply = member
            .command_within(10 + n as u64, "mesh/publish-presence-state", payload)
            .await;
        assert_eq!(reply["command"], "mesh/publish-presence-state");
        assert_over_byte_limit(&reply["payload"], "max_presence_state_bytes");
    }
    // The stored state stays, on every instance, and no update was sent.
    assert_eq!(
        updates_before_marker(&b.mesh, "marker", &mut [&mut watcher]).await,
        [Vec::<Value>::new()]
    );
    for server in [&a, &b] {
        assert_eq!(
            server
                .mesh
                .room("room")
                .presence_states()
                .await
                .expect("states"),
            [(member.id.clone(), at_limit.clone())]
        );
    }
    assert_eq!(
        presence_state(&mut watcher, 2, "room").await,
        json!({"success": true, "present": [member.id], "states": {member.id.as_str(): at_limit}})
    );
    // The member can still publish a state within the limit.
    assert_eq!(
        publish(&mut member, 20, "room", json!({"ok": 1})).await,
        true
    );
    expect_update(
        &mut watcher,
        state_update(&member.id, "room", json!({"ok": 1})),
    )
    .await;
}

const PRESENCE_FRAME: usize = 4096;

/// Connects `n` members to `server` and joins them to `room`, one after the other (so
/// they are listed in this order).
async fn members_in_order(server: &TestServer, room: &str, n: usize) -> Vec<RawClient> {
    let mut members = Vec::new();
    for _ in 0..n {
        let mut member = RawClient::connect(&server.url()).await;
        assert_eq!(join(&mut member, 1, room).await["success"], true);
        members.push(member);
    }
    members
}

async fn presence_replies_hold_the_states_that_fit_in_a_frame(backend: Backend) {
    let a = serve(tracking(&backend, "room").max_frame_size(PRESENCE_FRAME)).await;
    let b = serve(tracking(&backend, "room").max_frame_size(PRESENCE_FRAME)).await;
    let mut members = members_in_order(&b, "room", 4).await;
    // Two states of 1,200 bytes fit beside the member list; a third would not.
    let state = |n: usize| {
        let mut state = object_of_size("pad", 1200);
        state["n"] = json!(n);
        state
    };
    for (n, member) in members.iter_mut().enumerate() {
        assert_eq!(publish(member, 2, "room", state(n)).await, true);
    }
    let ids: Vec<String> = members.iter().map(|member| member.id.clone()).collect();
    let mut watcher = RawClient::connect(&a.url()).await;

    // Every member is listed (their metadata is not shown outside the room); the states
    // are those of the leading members that fit.
    let leading_states = json!({ids[0].as_str(): state(0), ids[1].as_str(): state(1)});
    assert_eq!(
        call_within_frame(
            &mut watcher,
            1,
            "mesh/subscribe-presence",
            json!({"roomName": "room"}),
            PRESENCE_FRAME
        )
        .await,
        json!({"success": true,
               "present": ids.iter().map(|id| json!({"id": id, "metadata": null})).collect::<Vec<_>>(),
               "states": leading_states,
               "truncated": true})
    );
    assert_eq!(
        call_within_frame(
            &mut watcher,
            2,
            "mesh/get-presence-state",
            json!({"roomName": "room"}),
            PRESENCE_FRAME
        )
        .await,
        json!({"success": true, "present": ids, "states": leading_states, "truncated": true})
    );
    // Every state is still stored: only the replies hold less.
    assert_eq!(
        sorted_states(b.mesh.room("room").presence_states().await.expect("states")),
        sorted_states(
            ids.iter()
                .enumerate()
                .map(|(n, id)| (id.clone(), state(n)))
                .collect()
        )
    );
    // The subscription made with a truncated reply is live.
    assert_eq!(
        publish(&mut members[3], 3, "room", json!({"small": true})).await,
        true
    );
    expect_update(
        &mut watcher,
        state_update(&ids[3], "room", json!({"small": true})),
    )
    .await;
    // Once everything fits, there is no `truncated` field at all.
    for (n, member) in members.iter_mut().enumerate().skip(1) {
        assert_eq!(publish(member, 4, "room", json!({"n": n})).await, true);
    }
    let all_small: serde_json::Map<String, Value> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let state = if n == 0 { state(0) } else { json!({"n": n}) };
            (id.clone(), state)
        })
        .collect();
    assert_eq!(
        call_within_frame(
            &mut watcher,
            3,
            "mesh/get-presence-state",
            json!({"roomName": "room"}),
            PRESENCE_FRAME
        )
        .await,
        json!({"success": true, "present": ids, "states": all_small})
    );
}

async fn presence_replies_hold_the_leading_members_that_fit_in_a_frame(backend: Backend) {
    // Metadata is shown to anyone, so members' entries are large; two fit, a third would not.
    let open = |backend: &Backend| {
        tracking(backend, "room")
            .max_frame_size(PRESENCE_FRAME)
            .open_connection_metadata(true)
    };
    let a = serve(open(&backend)).await;
    let b = serve(open(&backend)).await;
    let metadata = |n: usize| {
        let mut metadata = object_of_size("pad", 1200);
        metadata["n"] = json!(n);
        metadata
    };
    let mut members = Vec::new();
    for n in 0..4 {
        let mut member = RawClient::connect(&b.url()).await;
        b.mesh
            .set_connection_metadata(&member.id, metadata(n), MergeStrategy::Replace)
            .await
            .expect("set metadata");
        assert_eq!(join(&mut member, 1, "room").await["success"], true);
        assert_eq!(publish(&mut member, 2, "room", json!({"n": n})).await, true);
        members.push(member);
    }
    let ids: Vec<String> = members.iter().map(|member| member.id.clone()).collect();
    let mut watcher = RawClient::connect(&a.url()).await;

    // The leading members in join order, and only their states.
    assert_eq!(
        call_within_frame(
            &mut watcher,
            1,
            "mesh/subscribe-presence",
            json!({"roomName": "room"}),
            PRESENCE_FRAME
        )
        .await,
        json!({"success": true,
               "present": [
                   {"id": ids[0], "metadata": metadata(0)},
                   {"id": ids[1], "metadata": metadata(1)},
               ],
               "states": {ids[0].as_str(): {"n": 0}, ids[1].as_str(): {"n": 1}},
               "truncated": true})
    );
    // The same room without metadata in the reply fits whole: no `truncated` field.
    let states: serde_json::Map<String, Value> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id.clone(), json!({"n": n})))
        .collect();
    assert_eq!(
        call_within_frame(
            &mut watcher,
            2,
            "mesh/get-presence-state",
            json!({"roomName": "room"}),
            PRESENCE_FRAME
        )
        .await,
        json!({"success": true, "present": ids, "states": states})
    );
    // The watcher hears every member, listed or not.
    assert_eq!(leave(&mut members[3], 3, "room").await["success"], true);
    expect_update(&mut watcher, membership_update("leave", &ids[3], "room")).await;
}
