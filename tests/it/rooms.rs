//! Rooms and room metadata (issue 4, items 1, 3 and 4), on both backends and over real
//! WebSockets. Multi-instance tests put clients on different instances of one mesh;
//! "membership ends" tests use a tracked room's presence `leave` as the event that says
//! the cleanup happened, then check every room of the connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tower_mesh::extract::Payload;
use tower_mesh::{
    from_fn, CommandError, CommandRequest, Connection, MergeStrategy, Mesh, Next, PresenceOptions,
    Regex,
};

use crate::common::*;

conformance!(
    join_and_leave_golden_replies,
    membership_queries_on_every_instance,
    rooms_exist_while_they_have_members,
    room_broadcasts_reach_members_on_every_instance_only,
    broadcast_excluding_skips_the_excluded,
    server_side_membership_of_a_connection_on_another_instance,
    remove_from_all_rooms_on_another_instance,
    clear_room_empties_it_everywhere_and_deletes_its_metadata,
    room_metadata_set_merge_update_and_list,
    concurrent_room_metadata_updates_keep_every_key,
    room_metadata_over_the_wire,
    membership_ends_when_the_client_closes,
    membership_ends_when_the_server_closes_the_connection,
    membership_ends_after_missed_pongs,
    membership_is_swept_after_the_instance_is_killed,
    global_layer_refuses_joins_using_the_upgrade_request,
    room_guard_refuses_joins,
    bad_room_names_are_refused_and_nothing_is_stored,
    room_limit_per_connection_answers_eoverloaded,
    connection_metadata_is_readable_only_while_sharing_a_room,
    join_reply_shows_no_metadata_to_a_caller_removed_before_it,
    join_reply_with_open_metadata_shows_it_to_a_caller_removed_before_it,
    join_reply_holds_the_leading_members_that_fit_in_a_frame,
    room_metadata_over_max_metadata_bytes_is_refused_and_the_old_value_stays,
);

// ---------------------------------------------------------------------------------------
// Helpers.

/// Waits for the presence update `kind` of `connection` in `room` (the next one).
async fn expect_presence(client: &mut RawClient, kind: &str, connection: &str, room: &str) {
    let update = presence_update(client).await;
    assert_eq!(
        (
            &update["type"],
            &update["connectionId"],
            &update["roomName"]
        ),
        (&json!(kind), &json!(connection), &json!(room)),
        "unexpected presence update: {update}"
    );
}

fn ids(members: &[(String, Value)]) -> Vec<String> {
    members.iter().map(|(id, _)| id.clone()).collect()
}

// ---------------------------------------------------------------------------------------
// Joining and leaving.

async fn join_and_leave_golden_replies(backend: Backend) {
    let server = serve(backend.builder()).await;
    let mut ann = RawClient::connect(&server.url()).await;
    let mut bob = RawClient::connect(&server.url()).await;
    assert_eq!(
        call(
            &mut ann,
            1,
            "mesh/set-my-connection-metadata",
            json!({"metadata": {"name": "ann"}}),
        )
        .await,
        json!({"success": true})
    );

    // The first member sees itself, with its metadata; exact bytes on the wire.
    ann.send_text(r#"{"id":2,"command":"mesh/join-room","payload":{"roomName":"lobby"}}"#)
        .await;
    assert_eq!(
        ann.next_text().await,
        format!(
            r#"{{"id":2,"command":"mesh/join-room","payload":{{"success":true,"present":[{{"id":"{}","metadata":{{"name":"ann"}}}}]}}}}"#,
            ann.id
        )
    );
    // The second sees both, in join order; no metadata is null.
    assert_eq!(
        bob.command_within(7, "mesh/join-room", json!({"roomName": "lobby"}))
            .await,
        json!({"id": 7, "command": "mesh/join-room", "payload": {"success": true, "present": [
            {"id": ann.id, "metadata": {"name": "ann"}},
            {"id": bob.id, "metadata": null},
        ]}})
    );
    // Joining again changes nothing, not even the order.
    assert_eq!(
        join(&mut ann, 3, "lobby").await,
        json!({"success": true, "present": [
            {"id": ann.id, "metadata": {"name": "ann"}},
            {"id": bob.id, "metadata": null},
        ]})
    );
    assert_eq!(
        server.mesh.room("lobby").members().await.expect("members"),
        vec![ann.id.clone(), bob.id.clone()]
    );

    bob.send_text(r#"{"id":8,"command":"mesh/leave-room","payload":{"roomName":"lobby"}}"#)
        .await;
    assert_eq!(
        bob.next_text().await,
        r#"{"id":8,"command":"mesh/leave-room","payload":{"success":true}}"#
    );
    assert!(!server
        .mesh
        .room("lobby")
        .contains(&bob.id)
        .await
        .expect("is_in_room"));
    // Leaving a room one is not in is still a success.
    assert_eq!(leave(&mut bob, 9, "lobby").await, json!({"success": true}));
    assert_eq!(
        leave(&mut bob, 10, "never-joined").await,
        json!({"success": true})
    );
    assert_eq!(
        server.mesh.rooms().await.expect("rooms"),
        vec!["lobby".to_owned()]
    );

    // Rejoining puts bob last, now with the metadata he set meanwhile.
    call(
        &mut bob,
        11,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"name": "bob"}}),
    )
    .await;
    assert_eq!(
        join(&mut bob, 12, "lobby").await,
        json!({"success": true, "present": [
            {"id": ann.id, "metadata": {"name": "ann"}},
            {"id": bob.id, "metadata": {"name": "bob"}},
        ]})
    );
}

async fn membership_queries_on_every_instance(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    let mut also_a = RawClient::connect(&a.url()).await;
    b.mesh
        .set_connection_metadata(&on_b.id, json!({"n": "b"}), MergeStrategy::Replace)
        .await
        .expect("set");

    join(&mut on_b, 1, "r1").await;
    join(&mut on_a, 1, "r1").await;
    join(&mut also_a, 1, "r2").await;
    join(&mut on_a, 2, "r2").await;

    for mesh in [&a.mesh, &b.mesh] {
        // rooms.test.ts: isInRoom after joins (true, true, true, false, false).
        let checks = [
            (&on_b.id, "r1", true),
            (&on_a.id, "r1", true),
            (&also_a.id, "r2", true),
            (&also_a.id, "r1", false),
            (&on_b.id, "r2", false),
        ];
        for (id, room, expected) in checks {
            assert_eq!(
                mesh.room(room).contains(id).await.expect("is_in_room"),
                expected,
                "{id} in {room}"
            );
        }
        assert_eq!(
            mesh.room("r1").members().await.expect("members"),
            vec![on_b.id.clone(), on_a.id.clone()]
        );
        assert_eq!(
            mesh.room("r2").members().await.expect("members"),
            vec![also_a.id.clone(), on_a.id.clone()]
        );
        assert_eq!(
            mesh.room("r1")
                .members_with_metadata()
                .await
                .expect("with metadata"),
            vec![
                (on_b.id.clone(), json!({"n": "b"})),
                (on_a.id.clone(), Value::Null)
            ]
        );
        // basic.test.ts: the metadata of a room that does not exist is an empty list.
        assert_eq!(
            mesh.room("non-existent-room")
                .members_with_metadata()
                .await
                .expect("with metadata"),
            vec![]
        );
        assert_eq!(
            mesh.room("non-existent-room")
                .members()
                .await
                .expect("members"),
            Vec::<String>::new()
        );
        assert_eq!(
            mesh.connection_rooms(&on_a.id).await.expect("rooms of"),
            vec!["r1".to_owned(), "r2".to_owned()]
        );
        assert_eq!(
            mesh.connection_rooms("nobody").await.expect("rooms of"),
            Vec::<String>::new()
        );
        assert_eq!(
            mesh.rooms().await.expect("rooms"),
            vec!["r1".to_owned(), "r2".to_owned()]
        );
        assert!(mesh.share_a_room(&on_a.id, &on_b.id).await.expect("share"));
        assert!(mesh
            .share_a_room(&on_a.id, &also_a.id)
            .await
            .expect("share"));
        assert!(!mesh
            .share_a_room(&on_b.id, &also_a.id)
            .await
            .expect("share"));
    }
}

async fn rooms_exist_while_they_have_members(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut first = RawClient::connect(&a.url()).await;
    let mut second = RawClient::connect(&b.url()).await;
    assert_eq!(a.mesh.rooms().await.expect("rooms"), Vec::<String>::new());
    join(&mut first, 1, "room-z").await;
    join(&mut first, 2, "room-a").await;
    join(&mut second, 1, "room-a").await;
    // Sorted by name, whatever the order they appeared in.
    assert_eq!(
        b.mesh.rooms().await.expect("rooms"),
        vec!["room-a".to_owned(), "room-z".to_owned()]
    );
    // rooms.test.ts: a room outlives one of two members leaving...
    leave(&mut first, 3, "room-a").await;
    assert_eq!(
        a.mesh.rooms().await.expect("rooms"),
        vec!["room-a".to_owned(), "room-z".to_owned()]
    );
    // ...and disappears with the last.
    leave(&mut second, 2, "room-a").await;
    assert_eq!(
        a.mesh.rooms().await.expect("rooms"),
        vec!["room-z".to_owned()]
    );
    assert_eq!(
        b.mesh.room("room-a").members().await.expect("members"),
        Vec::<String>::new()
    );
    leave(&mut first, 4, "room-z").await;
    assert_eq!(b.mesh.rooms().await.expect("rooms"), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// Room broadcasts.

/// `broadcast-room {room, message}`: a client asks its instance to broadcast to a room.
async fn broadcast_room_command(
    mesh: Mesh,
    Payload(request): Payload<Value>,
) -> Result<Value, CommandError> {
    let room = request["room"].as_str().unwrap_or_default();
    mesh.room(room)
        .broadcast("room-message", &request["message"])
        .await
        .map_err(|err| CommandError::new("ESERVER", err.to_string()))?;
    Ok(json!({"success": true}))
}

async fn room_broadcasts_reach_members_on_every_instance_only(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .command("broadcast-room", broadcast_room_command),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .command("broadcast-room", broadcast_room_command),
    )
    .await;
    let mut member_a = RawClient::connect(&a.url()).await;
    let mut member_b = RawClient::connect(&b.url()).await;
    let mut member_b2 = RawClient::connect(&b.url()).await;
    // Outsiders on both instances, one of them in another room.
    let mut outsider_a = RawClient::connect(&a.url()).await;
    let mut outsider_b = RawClient::connect(&b.url()).await;
    join(&mut outsider_b, 1, "other").await;
    for member in [&mut member_a, &mut member_b, &mut member_b2] {
        join(member, 1, "room").await;
    }

    // Server-side, from A: every member gets it, on both instances.
    a.mesh
        .room("room")
        .broadcast("room-message", &json!({"text": "hi room"}))
        .await
        .expect("broadcast_room");
    for member in [&mut member_a, &mut member_b, &mut member_b2] {
        assert_eq!(
            member.push_within("room-message").await,
            json!({"command": "room-message", "payload": {"text": "hi room"}})
        );
    }
    let before = frames_before_marker(
        &a.mesh,
        "marker-1",
        &mut [&mut outsider_a, &mut outsider_b],
        Noise::Kept,
    )
    .await;
    for frames in &before {
        assert!(
            pushes_named(frames, "room-message").is_empty(),
            "{frames:?}"
        );
    }

    // Started by a client on B (multiple-instance.test.ts): reaches members on A and B,
    // the sender included.
    member_b
        .send_json(json!({"id": 5, "command": "broadcast-room",
            "payload": {"room": "room", "message": {"text": "from b"}}}))
        .await;
    // The reply and the sender's own copy may come in either order.
    within("the reply and the room message", async {
        let mut got_reply = false;
        let mut got_push = false;
        while !(got_reply && got_push) {
            let frame = member_b.next().await;
            if frame["id"] == 5 {
                assert_eq!(frame["payload"], json!({"success": true}));
                got_reply = true;
            } else if frame["command"] == "room-message" {
                assert_eq!(frame["payload"], json!({"text": "from b"}));
                got_push = true;
            }
        }
    })
    .await;
    for member in [&mut member_a, &mut member_b2] {
        assert_eq!(
            member.push_within("room-message").await["payload"],
            json!({"text": "from b"})
        );
    }
    let before = frames_before_marker(
        &b.mesh,
        "marker-2",
        &mut [&mut outsider_a, &mut outsider_b],
        Noise::Kept,
    )
    .await;
    for frames in &before {
        assert!(
            pushes_named(frames, "room-message").is_empty(),
            "{frames:?}"
        );
    }
    // A room nobody is in: no error, nothing delivered.
    a.mesh
        .room("empty-room")
        .broadcast("room-message", &json!(0))
        .await
        .expect("broadcast to an empty room");
}

async fn broadcast_excluding_skips_the_excluded(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut sender = RawClient::connect(&a.url()).await;
    let mut excluded_b = RawClient::connect(&b.url()).await;
    let mut kept_a = RawClient::connect(&a.url()).await;
    let mut kept_b = RawClient::connect(&b.url()).await;
    for client in [&mut sender, &mut excluded_b, &mut kept_a, &mut kept_b] {
        join(client, 1, "room").await;
    }
    b.mesh
        .room("room")
        .except(&sender.id)
        .except(&excluded_b.id)
        .broadcast("room-message", &json!({"n": 1}))
        .await
        .expect("broadcast excluding two");
    for kept in [&mut kept_a, &mut kept_b] {
        assert_eq!(
            kept.push_within("room-message").await["payload"],
            json!({"n": 1})
        );
    }
    let before = frames_before_marker(
        &a.mesh,
        "marker",
        &mut [&mut sender, &mut excluded_b],
        Noise::Kept,
    )
    .await;
    for frames in &before {
        assert!(
            pushes_named(frames, "room-message").is_empty(),
            "{frames:?}"
        );
    }
    // A plain room broadcast reaches everyone.
    a.mesh
        .room("room")
        .broadcast("room-message", &json!({"n": 2}))
        .await
        .expect("broadcast");
    for client in [&mut sender, &mut excluded_b, &mut kept_a, &mut kept_b] {
        assert_eq!(
            client.push_within("room-message").await["payload"],
            json!({"n": 2})
        );
    }
}

// ---------------------------------------------------------------------------------------
// Server-side membership changes.

async fn server_side_membership_of_a_connection_on_another_instance(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut on_b = RawClient::connect(&b.url()).await;

    // Added from A, which does not hold it; a broadcast right after reaches it.
    assert!(a.mesh.room("room").add(&on_b.id).await.expect("add"));
    a.mesh
        .room("room")
        .broadcast("hello", &json!(1))
        .await
        .expect("broadcast");
    assert_eq!(on_b.push_within("hello").await["payload"], 1);
    for mesh in [&a.mesh, &b.mesh] {
        assert!(mesh
            .room("room")
            .contains(&on_b.id)
            .await
            .expect("is_in_room"));
        assert_eq!(
            mesh.room("room").members().await.expect("members"),
            vec![on_b.id.clone()]
        );
    }
    // Adding twice is harmless; adding a connection nobody holds answers false.
    assert!(a.mesh.room("room").add(&on_b.id).await.expect("add"));
    assert!(!a.mesh.room("room").add("nobody").await.expect("add"));
    assert_eq!(
        a.mesh.room("room").members().await.expect("members"),
        vec![on_b.id.clone()]
    );

    // Removed from A; a broadcast right after does not reach it.
    assert!(a.mesh.room("room").remove(&on_b.id).await.expect("remove"));
    a.mesh
        .room("room")
        .broadcast("hello", &json!(2))
        .await
        .expect("broadcast");
    let before = frames_before_marker(&a.mesh, "marker", &mut [&mut on_b], Noise::Kept).await;
    assert!(pushes_named(&before[0], "hello").is_empty(), "{before:?}");
    assert!(!b
        .mesh
        .room("room")
        .contains(&on_b.id)
        .await
        .expect("is_in_room"));
    assert_eq!(a.mesh.rooms().await.expect("rooms"), Vec::<String>::new());
    // Removing again, or a connection nobody holds, answers false.
    assert!(!a.mesh.room("room").remove(&on_b.id).await.expect("remove"));
    assert!(!a.mesh.room("room").remove("nobody").await.expect("remove"));

    // The same on the instance that holds it.
    assert!(b.mesh.room("local").add(&on_b.id).await.expect("add"));
    b.mesh
        .room("local")
        .broadcast("hello", &json!(3))
        .await
        .expect("broadcast");
    assert_eq!(on_b.push_within("hello").await["payload"], 3);
    assert!(b.mesh.room("local").remove(&on_b.id).await.expect("remove"));
    assert_eq!(
        b.mesh.connection_rooms(&on_b.id).await.expect("rooms of"),
        Vec::<String>::new()
    );
}

async fn remove_from_all_rooms_on_another_instance(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    let mut stays = RawClient::connect(&a.url()).await;
    join(&mut on_b, 1, "r1").await;
    join(&mut stays, 1, "r1").await;
    for room in ["r2", "r3"] {
        assert!(a.mesh.room(room).add(&on_b.id).await.expect("add"));
    }
    assert_eq!(
        a.mesh.connection_rooms(&on_b.id).await.expect("rooms of"),
        vec!["r1".to_owned(), "r2".to_owned(), "r3".to_owned()]
    );

    assert!(a
        .mesh
        .remove_from_all_rooms(&on_b.id)
        .await
        .expect("remove all"));
    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            mesh.connection_rooms(&on_b.id).await.expect("rooms of"),
            Vec::<String>::new()
        );
        assert_eq!(mesh.rooms().await.expect("rooms"), vec!["r1".to_owned()]);
        assert_eq!(
            mesh.room("r1").members().await.expect("members"),
            vec![stays.id.clone()]
        );
    }
    for room in ["r1", "r2", "r3"] {
        a.mesh
            .room(room)
            .broadcast("hello", &json!(room))
            .await
            .expect("broadcast");
    }
    assert_eq!(stays.push_within("hello").await["payload"], "r1");
    let before = frames_before_marker(&a.mesh, "marker", &mut [&mut on_b], Noise::Kept).await;
    assert!(pushes_named(&before[0], "hello").is_empty(), "{before:?}");
    // The connection itself is untouched and can join again.
    assert_eq!(
        join(&mut on_b, 2, "r2").await,
        json!({"success": true, "present": [{"id": on_b.id, "metadata": null}]})
    );
    assert!(!a
        .mesh
        .remove_from_all_rooms("nobody")
        .await
        .expect("remove all"));
}

async fn clear_room_empties_it_everywhere_and_deletes_its_metadata(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut x = RawClient::connect(&a.url()).await;
    let mut y = RawClient::connect(&b.url()).await;
    let mut z = RawClient::connect(&b.url()).await;
    join(&mut x, 1, "room").await;
    join(&mut y, 1, "room").await;
    join(&mut y, 2, "keep").await;
    join(&mut z, 1, "keep").await;
    a.mesh
        .room("room")
        .set_metadata(json!({"topic": "cleared"}), MergeStrategy::Replace)
        .await
        .expect("set");
    a.mesh
        .room("keep")
        .set_metadata(json!({"topic": "kept"}), MergeStrategy::Replace)
        .await
        .expect("set");

    b.mesh.room("room").clear().await.expect("clear");

    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            mesh.room("room").members().await.expect("members"),
            Vec::<String>::new()
        );
        assert!(!mesh.room("room").contains(&x.id).await.expect("is_in_room"));
        assert!(!mesh.room("room").contains(&y.id).await.expect("is_in_room"));
        assert_eq!(mesh.rooms().await.expect("rooms"), vec!["keep".to_owned()]);
        assert_eq!(mesh.room("room").metadata().await.expect("metadata"), None);
        assert_eq!(
            mesh.all_room_metadata().await.expect("all"),
            vec![("keep".to_owned(), json!({"topic": "kept"}))]
        );
        assert_eq!(
            mesh.connection_rooms(&y.id).await.expect("rooms of"),
            vec!["keep".to_owned()]
        );
    }
    // No broadcast reaches the former members any more; the other room still works.
    a.mesh
        .room("room")
        .broadcast("hello", &json!("room"))
        .await
        .expect("broadcast");
    a.mesh
        .room("keep")
        .broadcast("hello", &json!("keep"))
        .await
        .expect("broadcast");
    assert_eq!(z.push_within("hello").await["payload"], "keep");
    assert_eq!(y.push_within("hello").await["payload"], "keep");
    let before = frames_before_marker(&a.mesh, "marker", &mut [&mut x, &mut y], Noise::Kept).await;
    for frames in &before {
        assert!(pushes_named(frames, "hello").is_empty(), "{frames:?}");
    }
    assert_eq!(
        call(
            &mut x,
            2,
            "mesh/get-room-metadata",
            json!({"roomName": "room"})
        )
        .await,
        json!({"metadata": null})
    );
    // The room can be used again from scratch.
    assert_eq!(
        join(&mut x, 3, "room").await,
        json!({"success": true, "present": [{"id": x.id, "metadata": null}]})
    );
    // Clearing a room nobody is in is fine.
    a.mesh.room("never").clear().await.expect("clear");
}

// ---------------------------------------------------------------------------------------
// Room metadata.

async fn room_metadata_set_merge_update_and_list(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let (ma, mb) = (&a.mesh, &b.mesh);
    assert_eq!(ma.room("room-none").metadata().await.expect("get"), None);
    assert_eq!(ma.all_room_metadata().await.expect("all"), vec![]);

    // Inserted b before a, to show the listing is sorted by room.
    ma.room("room-b")
        .set_metadata(
            json!({"type": "public", "maxUsers": 10}),
            MergeStrategy::Replace,
        )
        .await
        .expect("set");
    ma.room("room-a")
        .set_metadata(
            json!({"type": "private", "maxUsers": 5, "settings": {"x": 1}}),
            MergeStrategy::Replace,
        )
        .await
        .expect("set");
    assert_eq!(
        mb.room("room-a").metadata().await.expect("get"),
        Some(json!({"type": "private", "maxUsers": 5, "settings": {"x": 1}}))
    );

    // Shallow merge: top-level keys overlay, nested objects are replaced.
    mb.room("room-a")
        .update_metadata(json!({"maxUsers": 6, "settings": {"y": 2}}))
        .await
        .expect("update");
    assert_eq!(
        ma.room("room-a").metadata().await.expect("get"),
        Some(json!({"type": "private", "maxUsers": 6, "settings": {"y": 2}}))
    );
    // Deep merge: nested objects merge.
    ma.room("room-a")
        .set_metadata(json!({"settings": {"z": 3}}), MergeStrategy::DeepMerge)
        .await
        .expect("deep merge");
    assert_eq!(
        mb.room("room-a").metadata().await.expect("get"),
        Some(json!({"type": "private", "maxUsers": 6, "settings": {"y": 2, "z": 3}}))
    );
    ma.room("room-a")
        .set_metadata(json!({"type": "secret"}), MergeStrategy::Merge)
        .await
        .expect("merge");
    assert_eq!(
        mb.room("room-a").metadata().await.expect("get"),
        Some(json!({"type": "secret", "maxUsers": 6, "settings": {"y": 2, "z": 3}}))
    );
    // Replace drops the old keys.
    mb.room("room-b")
        .set_metadata(json!({"type": "public"}), MergeStrategy::Replace)
        .await
        .expect("replace");
    assert_eq!(
        ma.room("room-b").metadata().await.expect("get"),
        Some(json!({"type": "public"}))
    );
    // Merging an object over a non-object gives the object; an update of a room that had
    // none stores it.
    ma.room("room-c")
        .set_metadata(json!("plain"), MergeStrategy::Replace)
        .await
        .expect("set");
    ma.room("room-c")
        .update_metadata(json!({"a": 1}))
        .await
        .expect("update");
    ma.room("room-d")
        .update_metadata(json!({"fresh": true}))
        .await
        .expect("update");
    assert_eq!(
        mb.room("room-c").metadata().await.expect("get"),
        Some(json!({"a": 1}))
    );

    let all = mb.all_room_metadata().await.expect("all");
    assert_eq!(
        all,
        vec![
            (
                "room-a".to_owned(),
                json!({"type": "secret", "maxUsers": 6, "settings": {"y": 2, "z": 3}})
            ),
            ("room-b".to_owned(), json!({"type": "public"})),
            ("room-c".to_owned(), json!({"a": 1})),
            ("room-d".to_owned(), json!({"fresh": true})),
        ]
    );
    // rooms.test.ts: the listing can be filtered by metadata fields.
    let public: Vec<&str> = all
        .iter()
        .filter(|(_, metadata)| metadata["type"] == "public")
        .map(|(room, _)| room.as_str())
        .collect();
    assert_eq!(public, ["room-b"]);
    // Metadata alone does not make a room exist.
    assert_eq!(ma.rooms().await.expect("rooms"), Vec::<String>::new());
    // Clearing a room without members removes its metadata.
    ma.room("room-c").clear().await.expect("clear");
    assert_eq!(mb.room("room-c").metadata().await.expect("get"), None);
    assert_eq!(
        ids(&mb.all_room_metadata().await.expect("all")),
        ["room-a", "room-b", "room-d"]
    );
}

async fn concurrent_room_metadata_updates_keep_every_key(backend: Backend) {
    // Merges are read-modify-writes: a hundred concurrent ones, from two instances (say
    // every member of a busy room updating its entry at once), must neither lose each
    // other's keys nor fail.
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let updates = (0..100).map(|n| {
        let mesh = if n % 2 == 0 {
            a.mesh.clone()
        } else {
            b.mesh.clone()
        };
        tokio::spawn(async move {
            mesh.room("busy")
                .update_metadata(json!({ format!("k{n}"): n }))
                .await
        })
    });
    for update in futures_util::future::join_all(updates).await {
        update.expect("task").expect("update");
    }
    let metadata = a
        .mesh
        .room("busy")
        .metadata()
        .await
        .expect("get")
        .expect("some");
    let expected: serde_json::Map<String, Value> =
        (0..100).map(|n| (format!("k{n}"), json!(n))).collect();
    let mut got = metadata.as_object().expect("object").clone();
    got.sort_keys();
    let mut expected = expected;
    expected.sort_keys();
    assert_eq!(got, expected);
}

async fn room_metadata_over_the_wire(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&b.url()).await;
    // client.test.ts: server-set room metadata is what the client reads, on any instance.
    a.mesh
        .room("lobby")
        .set_metadata(
            json!({"title": "Lobby", "tags": ["a", "b"]}),
            MergeStrategy::Replace,
        )
        .await
        .expect("set");
    client
        .send_text(r#"{"id":1,"command":"mesh/get-room-metadata","payload":{"roomName":"lobby"}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":1,"command":"mesh/get-room-metadata","payload":{"metadata":{"title":"Lobby","tags":["a","b"]}}}"#
    );
    assert_eq!(
        client
            .command_within(
                2,
                "mesh/get-room-metadata",
                json!({"roomName": "unknown-room"})
            )
            .await,
        json!({"id": 2, "command": "mesh/get-room-metadata", "payload": {"metadata": null}})
    );
    a.mesh
        .room("lobby")
        .update_metadata(json!({"title": "Main"}))
        .await
        .expect("update");
    assert_eq!(
        call(
            &mut client,
            3,
            "mesh/get-room-metadata",
            json!({"roomName": "lobby"})
        )
        .await,
        json!({"metadata": {"title": "Main", "tags": ["a", "b"]}})
    );
}

// ---------------------------------------------------------------------------------------
// Membership ends with the connection, whatever ends it.

/// A watcher on instance A subscribed to the presence of `tracked`; members on B join
/// `tracked` (for the leave event) and `plain` (untracked) too.
async fn membership_ends_when_the_client_closes(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .track_presence("tracked", PresenceOptions::new()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .track_presence("tracked", PresenceOptions::new()),
    )
    .await;
    let mut watcher = RawClient::connect(&a.url()).await;
    let reply = subscribe_presence(&mut watcher, 1, "tracked").await;
    assert_eq!(reply["success"], true, "{reply}");
    let mut keeper = RawClient::connect(&a.url()).await;
    let mut victim = RawClient::connect(&b.url()).await;
    join(&mut keeper, 1, "plain").await;
    join(&mut victim, 1, "plain").await;
    join(&mut victim, 2, "tracked").await;
    join(&mut victim, 3, "solo").await;
    expect_presence(&mut watcher, "join", &victim.id, "tracked").await;
    assert_eq!(
        a.mesh.room("plain").members().await.expect("members"),
        vec![keeper.id.clone(), victim.id.clone()]
    );
    let victim_id = victim.id.clone();

    victim.close().await;
    expect_presence(&mut watcher, "leave", &victim_id, "tracked").await;

    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            mesh.connection_rooms(&victim_id).await.expect("rooms of"),
            Vec::<String>::new()
        );
        assert_eq!(
            mesh.room("plain").members().await.expect("members"),
            vec![keeper.id.clone()]
        );
        assert!(!mesh.room("plain").contains(&victim_id).await.expect("in"));
        assert_eq!(
            mesh.room("tracked").members().await.expect("members"),
            Vec::<String>::new()
        );
        assert_eq!(
            mesh.room("tracked").present().await.expect("present"),
            Vec::<String>::new()
        );
        assert_eq!(mesh.rooms().await.expect("rooms"), vec!["plain".to_owned()]);
    }
    b.mesh
        .room("plain")
        .broadcast("hello", &json!(1))
        .await
        .expect("broadcast");
    assert_eq!(keeper.push_within("hello").await["payload"], 1);
}

async fn membership_ends_when_the_server_closes_the_connection(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .track_presence("tracked", PresenceOptions::new()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .track_presence("tracked", PresenceOptions::new()),
    )
    .await;
    let mut watcher = RawClient::connect(&a.url()).await;
    let reply = subscribe_presence(&mut watcher, 1, "tracked").await;
    assert_eq!(reply["success"], true, "{reply}");
    let mut victim = RawClient::connect(&b.url()).await;
    let mut local_victim = RawClient::connect(&a.url()).await;
    for client in [&mut victim, &mut local_victim] {
        join(client, 1, "plain").await;
        join(client, 2, "tracked").await;
        expect_presence(&mut watcher, "join", &client.id, "tracked").await;
    }

    // Closed by the instance that does not hold it, then by the one that does.
    a.mesh
        .close_connection(&victim.id, "bye")
        .await
        .expect("close");
    assert_eq!(victim.closed().await, (1000, "bye".to_owned()));
    expect_presence(&mut watcher, "leave", &victim.id, "tracked").await;
    assert_eq!(
        b.mesh.room("plain").members().await.expect("members"),
        vec![local_victim.id.clone()]
    );
    a.mesh
        .close_connection(&local_victim.id, "bye too")
        .await
        .expect("close");
    assert_eq!(local_victim.closed().await, (1000, "bye too".to_owned()));
    expect_presence(&mut watcher, "leave", &local_victim.id, "tracked").await;

    for mesh in [&a.mesh, &b.mesh] {
        for id in [&victim.id, &local_victim.id] {
            assert_eq!(
                mesh.connection_rooms(id).await.expect("rooms of"),
                Vec::<String>::new()
            );
        }
        assert_eq!(mesh.rooms().await.expect("rooms"), Vec::<String>::new());
    }
}

async fn membership_ends_after_missed_pongs(backend: Backend) {
    // B closes silent connections fast; the presence TTL is long, so the leave comes
    // from the close and not from a lapse.
    let a = serve(
        backend
            .builder()
            .track_presence("tracked", PresenceOptions::new()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .ping_interval(Duration::from_millis(100))
            .max_missed_pongs(1)
            .track_presence(
                "tracked",
                PresenceOptions::new().ttl(Duration::from_secs(30)),
            ),
    )
    .await;
    let mut watcher = RawClient::connect(&a.url()).await;
    let reply = subscribe_presence(&mut watcher, 1, "tracked").await;
    assert_eq!(reply["success"], true, "{reply}");
    let mut keeper = RawClient::connect(&a.url()).await;
    join(&mut keeper, 1, "plain").await;
    // It reads (its replies), but never answers a ping.
    let mut silent = RawClient::connect(&b.url()).await;
    join(&mut silent, 1, "plain").await;
    join(&mut silent, 2, "tracked").await;
    expect_presence(&mut watcher, "join", &silent.id, "tracked").await;

    let (code, _) = silent.closed().await;
    assert_eq!(code, 1008);
    expect_presence(&mut watcher, "leave", &silent.id, "tracked").await;
    assert_eq!(
        a.mesh.connection_rooms(&silent.id).await.expect("rooms of"),
        Vec::<String>::new()
    );
    assert_eq!(
        a.mesh.room("plain").members().await.expect("members"),
        vec![keeper.id.clone()]
    );
    assert_eq!(
        a.mesh.rooms().await.expect("rooms"),
        vec!["plain".to_owned()]
    );
}

async fn membership_is_swept_after_the_instance_is_killed(backend: Backend) {
    let survivor =
        serve(fast_liveness(&backend).track_presence("tracked", PresenceOptions::new())).await;
    let doomed = DoomedInstance::start(
        fast_liveness(&backend).track_presence("tracked", PresenceOptions::new()),
    )
    .await;
    let mut watcher = RawClient::connect(&survivor.url()).await;
    let reply = subscribe_presence(&mut watcher, 1, "tracked").await;
    assert_eq!(reply["success"], true, "{reply}");
    let mut keeper = RawClient::connect(&survivor.url()).await;
    join(&mut keeper, 1, "plain").await;
    let mut victim = RawClient::connect(&doomed.url).await;
    call(
        &mut victim,
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"doomed": true}}),
    )
    .await;
    join(&mut victim, 2, "plain").await;
    join(&mut victim, 3, "solo").await;
    join(&mut victim, 4, "tracked").await;
    expect_presence(&mut watcher, "join", &victim.id, "tracked").await;
    assert_eq!(
        survivor.mesh.rooms().await.expect("rooms"),
        vec!["plain".to_owned(), "solo".to_owned(), "tracked".to_owned()]
    );

    let killed_at = std::time::Instant::now();
    doomed.kill().await;
    // Nothing announces a death; the sweep that removes the dead instance's connections
    // announces the leave, and has removed every room of the victim by then.
    expect_presence(&mut watcher, "leave", &victim.id, "tracked").await;
    let swept_after = killed_at.elapsed();
    assert!(swept_after < Duration::from_secs(4), "{swept_after:?}");

    let mesh = &survivor.mesh;
    assert_eq!(
        mesh.connection_rooms(&victim.id).await.expect("rooms of"),
        Vec::<String>::new()
    );
    assert_eq!(
        mesh.room("plain").members().await.expect("members"),
        vec![keeper.id.clone()]
    );
    assert!(!mesh.room("solo").contains(&victim.id).await.expect("in"));
    assert_eq!(mesh.rooms().await.expect("rooms"), vec!["plain".to_owned()]);
    assert_eq!(
        mesh.connection_metadata(&victim.id).await.expect("meta"),
        None
    );
    assert!(!ids(&mesh.all_connection_metadata().await.expect("all")).contains(&victim.id));
    // The survivor keeps serving the room.
    mesh.room("plain")
        .broadcast("after", &json!(1))
        .await
        .expect("broadcast");
    assert_eq!(keeper.push_within("after").await["payload"], 1);
    // Server-side changes to the dead connection find nobody.
    assert!(!mesh.room("plain").add(&victim.id).await.expect("add"));
}

// ---------------------------------------------------------------------------------------
// Guards and layers.

async fn global_layer_refuses_joins_using_the_upgrade_request(backend: Backend) {
    // An auth layer: only the user "root" (put in the upgrade request's extensions by an
    // HTTP layer outside the mesh) may join rooms named admin:*.
    let builder =
        backend
            .builder()
            .layer(from_fn(|request: CommandRequest, next: Next| async move {
                if request.command() == "mesh/join-room" {
                    let room = request.payload()["roomName"].as_str().unwrap_or_default();
                    let user = request
                        .connection()
                        .extensions()
                        .get::<User>()
                        .map(|user| user.0.clone());
                    if room.starts_with("admin:") && user.as_deref() != Some("root") {
                        return Err(CommandError::forbidden("admins only"));
                    }
                }
                next.run(request).await
            }));
    let server = serve_wrapped(builder, |mesh_layer| {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .layer(mesh_layer)
            .layer(axum::middleware::from_fn(insert_user))
    })
    .await;
    let mut ann = RawClient::connect_request(ws_request(&server.url(), &[("x-user", "ann")])).await;
    let mut root =
        RawClient::connect_request(ws_request(&server.url(), &[("x-user", "root")])).await;
    let mut anonymous = RawClient::connect(&server.url()).await;

    for client in [&mut ann, &mut anonymous] {
        client
            .send_text(r#"{"id":1,"command":"mesh/join-room","payload":{"roomName":"admin:ops"}}"#)
            .await;
        assert_eq!(
            client.next_text().await,
            r#"{"id":1,"command":"mesh/join-room","payload":{"error":"admins only","code":"EFORBIDDEN","name":"CommandError"}}"#
        );
    }
    assert_eq!(
        server.mesh.rooms().await.expect("rooms"),
        Vec::<String>::new()
    );
    assert!(!server
        .mesh
        .room("admin:ops")
        .contains(&ann.id)
        .await
        .expect("in"));

    assert_eq!(
        join(&mut root, 1, "admin:ops").await,
        json!({"success": true, "present": [{"id": root.id, "metadata": null}]})
    );
    assert_eq!(
        join(&mut ann, 2, "public").await,
        json!({"success": true, "present": [{"id": ann.id, "metadata": null}]})
    );
    assert_eq!(
        server
            .mesh
            .room("admin:ops")
            .members()
            .await
            .expect("members"),
        vec![root.id.clone()]
    );
    // A refused connection keeps working, and broadcasts to the room miss it.
    server
        .mesh
        .room("admin:ops")
        .broadcast("secret", &json!(1))
        .await
        .expect("broadcast");
    assert_eq!(root.push_within("secret").await["payload"], 1);
    let before = frames_before_marker(
        &server.mesh,
        "marker",
        &mut [&mut ann, &mut anonymous],
        Noise::Kept,
    )
    .await;
    for frames in &before {
        assert!(pushes_named(frames, "secret").is_empty(), "{frames:?}");
    }
}

async fn room_guard_refuses_joins(backend: Backend) {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let guard_seen = seen.clone();
    let builder = backend
        .builder()
        .room_guard(
            Regex::new("^vip:").expect("regex"),
            move |connection: Connection, room: String| {
                let seen = guard_seen.clone();
                async move {
                    seen.lock().unwrap().push(room);
                    connection.headers().contains_key("x-vip")
                }
            },
        )
        .room_guard("closed", |_connection: Connection, _room: String| async {
            false
        });
    let a = serve(builder).await;
    let mut plain = RawClient::connect(&a.url()).await;
    let mut vip = RawClient::connect_request(ws_request(&a.url(), &[("x-vip", "1")])).await;

    assert_eq!(
        plain
            .command_within(1, "mesh/join-room", json!({"roomName": "vip:lounge"}))
            .await,
        json!({"id": 1, "command": "mesh/join-room", "payload": {"success": false, "present": []}})
    );
    assert_eq!(
        join(&mut vip, 1, "vip:lounge").await,
        json!({"success": true, "present": [{"id": vip.id, "metadata": null}]})
    );
    // Refused for everyone; other rooms stay open.
    for client in [&mut plain, &mut vip] {
        assert_eq!(
            join(client, 2, "closed").await,
            json!({"success": false, "present": []})
        );
    }
    assert_eq!(join(&mut plain, 3, "open").await["success"], true);
    // The guard got the exact room names it was asked about.
    assert_eq!(*seen.lock().unwrap(), ["vip:lounge", "vip:lounge"]);
    assert_eq!(
        a.mesh.room("vip:lounge").members().await.expect("members"),
        vec![vip.id.clone()]
    );
    assert_eq!(
        a.mesh.connection_rooms(&plain.id).await.expect("rooms of"),
        vec!["open".to_owned()]
    );
    assert_eq!(
        a.mesh.rooms().await.expect("rooms"),
        vec!["open".to_owned(), "vip:lounge".to_owned()]
    );
    // Server-side calls are trusted: the guard does not apply.
    assert!(a.mesh.room("closed").add(&plain.id).await.expect("add"));
    assert!(a.mesh.room("closed").contains(&plain.id).await.expect("in"));
}

// ---------------------------------------------------------------------------------------
// Bad input and limits.

async fn bad_room_names_are_refused_and_nothing_is_stored(backend: Backend) {
    let server = serve(backend.builder()).await;
    let mut client = RawClient::connect(&server.url()).await;
    let too_long = "x".repeat(2000);
    let just_over = "y".repeat(tower_mesh::MAX_NAME_BYTES + 1);
    let bad_payloads = [
        json!({}),
        json!({"roomName": null}),
        json!({"roomName": 5}),
        json!({"roomName": ["a"]}),
        json!({"roomName": {"name": "a"}}),
        json!({"roomName": ""}),
        json!({"roomName": too_long}),
        json!({"roomName": just_over}),
        json!({"room": "lobby"}),
        json!("lobby"),
        json!(null),
    ];
    let mut id = 0;
    for command in [
        "mesh/join-room",
        "mesh/leave-room",
        "mesh/get-room-metadata",
    ] {
        for payload in &bad_payloads {
            id += 1;
            let reply = client.command_within(id, command, payload.clone()).await;
            assert_eq!(reply["id"], id);
            assert_eq!(reply["command"], command);
            assert_eq!(
                reply["payload"]["code"], "EINVALID",
                "{command} {payload}: {reply}"
            );
            assert!(reply["payload"]["error"].is_string(), "{reply}");
        }
    }
    assert_eq!(
        server.mesh.rooms().await.expect("rooms"),
        Vec::<String>::new()
    );
    assert_eq!(
        server
            .mesh
            .connection_rooms(&client.id)
            .await
            .expect("rooms of"),
        Vec::<String>::new()
    );
    assert_eq!(server.mesh.all_room_metadata().await.expect("all"), vec![]);
    // The connection keeps working, and a name of exactly the limit is fine.
    assert_eq!(call(&mut client, 900, "mesh/noop", json!({})).await, true);
    let longest = "z".repeat(tower_mesh::MAX_NAME_BYTES);
    assert_eq!(join(&mut client, 901, &longest).await["success"], true);
    assert_eq!(server.mesh.rooms().await.expect("rooms"), vec![longest]);
}

async fn room_limit_per_connection_answers_eoverloaded(backend: Backend) {
    let server = serve(backend.builder().max_rooms_per_connection(2)).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut other = RawClient::connect(&server.url()).await;
    assert_eq!(join(&mut client, 1, "r1").await["success"], true);
    assert_eq!(join(&mut client, 2, "r2").await["success"], true);
    let refused = join(&mut client, 3, "r3").await;
    assert_eq!(refused["code"], "EOVERLOADED", "{refused}");
    assert!(!server
        .mesh
        .room("r3")
        .contains(&client.id)
        .await
        .expect("in"));
    assert_eq!(
        server.mesh.room("r3").members().await.expect("members"),
        Vec::<String>::new()
    );
    // Joining a room it is already in is not one more.
    assert_eq!(join(&mut client, 4, "r2").await["success"], true);
    // Leaving frees a slot.
    leave(&mut client, 5, "r1").await;
    assert_eq!(join(&mut client, 6, "r3").await["success"], true);
    assert_eq!(
        server
            .mesh
            .connection_rooms(&client.id)
            .await
            .expect("rooms of"),
        vec!["r2".to_owned(), "r3".to_owned()]
    );
    // The limit is per connection.
    for (n, room) in ["r1", "r2"].into_iter().enumerate() {
        assert_eq!(join(&mut other, n as u64 + 1, room).await["success"], true);
    }
    assert_eq!(call(&mut client, 7, "mesh/noop", json!({})).await, true);
}

async fn connection_metadata_is_readable_only_while_sharing_a_room(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut owner = RawClient::connect(&a.url()).await;
    let mut reader = RawClient::connect(&b.url()).await;
    call(
        &mut owner,
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"name": "owner"}}),
    )
    .await;
    let read = |id: &str| json!({ "connectionId": id });
    let owner_id = owner.id.clone();

    assert_eq!(
        call(
            &mut reader,
            1,
            "mesh/get-connection-metadata",
            read(&owner_id)
        )
        .await,
        json!({"metadata": null})
    );
    // In different rooms: still private.
    join(&mut owner, 2, "room-1").await;
    join(&mut reader, 2, "room-2").await;
    assert_eq!(
        call(
            &mut reader,
            3,
            "mesh/get-connection-metadata",
            read(&owner_id)
        )
        .await,
        json!({"metadata": null})
    );
    // Sharing a room: readable.
    join(&mut reader, 4, "room-1").await;
    assert_eq!(
        call(
            &mut reader,
            5,
            "mesh/get-connection-metadata",
            read(&owner_id)
        )
        .await,
        json!({"metadata": {"name": "owner"}})
    );
    // The owner leaves: private again.
    leave(&mut owner, 3, "room-1").await;
    assert_eq!(
        call(
            &mut reader,
            6,
            "mesh/get-connection-metadata",
            read(&owner_id)
        )
        .await,
        json!({"metadata": null})
    );
    // Sharing through a server-side add, from the other instance, works as well.
    assert!(b.mesh.room("room-2").add(&owner_id).await.expect("add"));
    assert_eq!(
        call(
            &mut reader,
            7,
            "mesh/get-connection-metadata",
            read(&owner_id)
        )
        .await,
        json!({"metadata": {"name": "owner"}})
    );
    b.mesh
        .remove_from_all_rooms(&owner_id)
        .await
        .expect("remove");
    assert_eq!(
        call(
            &mut reader,
            8,
            "mesh/get-connection-metadata",
            read(&owner_id)
        )
        .await,
        json!({"metadata": null})
    );
}

/// The payload of the reply to a `mesh/join-room` on instance A whose caller the server
/// removes from the room (from instance B) after the join and before the reply is made,
/// and the id of the room's member on B, whose metadata is `{"name": "member"}`. The
/// presence guard, which the join consults between the two, holds the join until then.
async fn join_reply_after_a_removal(backend: &Backend, open_metadata: bool) -> (Value, String) {
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let guard_release = release.clone();
    let holding_guard = PresenceOptions::new().guard(move |connection: Connection, _room| {
        let entered = entered_tx.clone();
        let release = guard_release.clone();
        async move {
            let _ = entered.send(connection.id().to_owned());
            release
                .acquire()
                .await
                .map(|permit| permit.forget())
                .is_ok()
        }
    });
    let a = serve(
        backend
            .builder()
            .open_connection_metadata(open_metadata)
            .track_presence("room", holding_guard),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .open_connection_metadata(open_metadata)
            .track_presence("room", PresenceOptions::new()),
    )
    .await;
    let mut member = RawClient::connect(&b.url()).await;
    call(
        &mut member,
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"name": "member"}}),
    )
    .await;
    join(&mut member, 2, "room").await;

    let mut joiner = RawClient::connect(&a.url()).await;
    joiner
        .send_json(json!({"id": 1, "command": "mesh/join-room", "payload": {"roomName": "room"}}))
        .await;
    assert_eq!(recv_within(&mut entered).await, joiner.id);
    assert!(b
        .mesh
        .room("room")
        .remove(&joiner.id)
        .await
        .expect("remove"));
    release.add_permits(1);
    let reply = within("the join reply", joiner.reply(1)).await;
    (reply["payload"].clone(), member.id.clone())
}

async fn join_reply_shows_no_metadata_to_a_caller_removed_before_it(backend: Backend) {
    // The reply says what the caller may read when it is made (docs/protocol.md §6): it no
    // longer shares the room, so the member's metadata is hidden.
    let (reply, member) = join_reply_after_a_removal(&backend, false).await;
    assert_eq!(
        reply,
        json!({"success": true, "present": [{"id": member, "metadata": null}]})
    );
}

async fn join_reply_with_open_metadata_shows_it_to_a_caller_removed_before_it(backend: Backend) {
    let (reply, member) = join_reply_after_a_removal(&backend, true).await;
    assert_eq!(
        reply,
        json!({"success": true, "present": [{"id": member, "metadata": {"name": "member"}}]})
    );
}

// ---------------------------------------------------------------------------------------
// Byte limits (issue 12 §1).

async fn join_reply_holds_the_leading_members_that_fit_in_a_frame(backend: Backend) {
    const FRAME: usize = 4096;
    let a = serve(backend.builder().max_frame_size(FRAME)).await;
    let b = serve(backend.builder().max_frame_size(FRAME)).await;
    // Members on B with metadata of about 1,200 bytes: two entries fit in a reply, a third
    // would not.
    let metadata = |n: usize| {
        let mut metadata = object_of_size("pad", 1200);
        metadata["n"] = json!(n);
        metadata
    };
    let mut members = Vec::new();
    for n in 0..3 {
        let mut member = RawClient::connect(&b.url()).await;
        call(
            &mut member,
            1,
            "mesh/set-my-connection-metadata",
            json!({ "metadata": metadata(n) }),
        )
        .await;
        assert_eq!(join(&mut member, 2, "big").await["success"], true);
        members.push(member);
    }
    let mut joiner = RawClient::connect(&a.url()).await;
    joiner
        .send_json(json!({"id": 1, "command": "mesh/join-room", "payload": {"roomName": "big"}}))
        .await;
    let text = within("the join reply", async {
        loop {
            let text = joiner.next_text().await;
            if serde_json::from_str::<Value>(&text).expect("JSON")["id"] == 1 {
                return text;
            }
        }
    })
    .await;
    assert!(text.len() <= FRAME, "{} bytes: {text}", text.len());
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("JSON")["payload"],
        json!({"success": true, "present": [
            {"id": members[0].id, "metadata": metadata(0)},
            {"id": members[1].id, "metadata": metadata(1)},
        ], "truncated": true})
    );
    // The join itself is whole: the joiner is a member, listed last.
    assert_eq!(
        b.mesh.room("big").members().await.expect("members"),
        [
            members[0].id.clone(),
            members[1].id.clone(),
            members[2].id.clone(),
            joiner.id.clone()
        ]
    );
    // A reply that lists every member has no `truncated` field at all.
    let mut small = RawClient::connect(&a.url()).await;
    assert_eq!(
        join(&mut small, 1, "small").await,
        json!({"success": true, "present": [{"id": small.id, "metadata": null}]})
    );
    assert_eq!(
        join(&mut members[0], 3, "small").await,
        json!({"success": true, "present": [
            {"id": small.id, "metadata": null},
            {"id": members[0].id, "metadata": metadata(0)},
        ]})
    );
}

async fn room_metadata_over_max_metadata_bytes_is_refused_and_the_old_value_stays(
    backend: Backend,
) {
    const LIMIT: usize = 200;
    let a = serve(backend.builder().max_metadata_bytes(LIMIT)).await;
    let b = serve(backend.builder().max_metadata_bytes(LIMIT)).await;
    let mut reader = RawClient::connect(&b.url()).await;
    let (ma, mb) = (&a.mesh, &b.mesh);

    // A room without metadata: refused, it still has none.
    let over = object_of_size("pad", LIMIT + 1);
    assert_too_large(
        ma.room("lobby")
            .set_metadata(over.clone(), MergeStrategy::Replace)
            .await,
        "max_metadata_bytes",
        LIMIT,
        LIMIT + 1,
    );
    assert_eq!(mb.room("lobby").metadata().await.expect("get"), None);
    assert_eq!(mb.all_room_metadata().await.expect("all"), vec![]);
    // Merging into nothing is measured the same way.
    assert_too_large(
        ma.room("lobby").update_metadata(over.clone()).await,
        "max_metadata_bytes",
        LIMIT,
        LIMIT + 1,
    );
    assert_eq!(mb.room("lobby").metadata().await.expect("get"), None);

    // Exactly the limit is stored.
    let at_limit = object_of_size("pad", LIMIT);
    ma.room("lobby")
        .set_metadata(at_limit.clone(), MergeStrategy::Replace)
        .await
        .expect("set");
    assert_eq!(
        mb.room("lobby").metadata().await.expect("get"),
        Some(at_limit)
    );

    // Values that fit on their own, merged into what is stored, would not: refused, and the
    // stored metadata stays.
    let base = json!({"title": "x".repeat(100), "settings": {"theme": "dark"}});
    mb.room("lobby")
        .set_metadata(base.clone(), MergeStrategy::Replace)
        .await
        .expect("set");
    let top_level = json!({"topic": "y".repeat(80)});
    let nested = json!({"settings": {"motto": "z".repeat(80)}});
    let mut merged = base.clone();
    merged["topic"] = top_level["topic"].clone();
    let mut deep_merged = base.clone();
    deep_merged["settings"]["motto"] = nested["settings"]["motto"].clone();
    assert_too_large(
        ma.room("lobby").update_metadata(top_level.clone()).await,
        "max_metadata_bytes",
        LIMIT,
        merged.to_string().len(),
    );
    assert_too_large(
        ma.room("lobby")
            .set_metadata(top_level, MergeStrategy::Merge)
            .await,
        "max_metadata_bytes",
        LIMIT,
        merged.to_string().len(),
    );
    assert_too_large(
        mb.room("lobby")
            .set_metadata(nested, MergeStrategy::DeepMerge)
            .await,
        "max_metadata_bytes",
        LIMIT,
        deep_merged.to_string().len(),
    );
    assert_eq!(
        ma.room("lobby").metadata().await.expect("get"),
        Some(base.clone())
    );
    assert_eq!(
        call(
            &mut reader,
            1,
            "mesh/get-room-metadata",
            json!({"roomName": "lobby"})
        )
        .await,
        json!({ "metadata": base })
    );
    // A merge that stays within the limit is stored.
    ma.room("lobby")
        .set_metadata(
            json!({"settings": {"motto": "short"}}),
            MergeStrategy::DeepMerge,
        )
        .await
        .expect("deep merge");
    assert_eq!(
        call(
            &mut reader,
            2,
            "mesh/get-room-metadata",
            json!({"roomName": "lobby"})
        )
        .await,
        json!({"metadata": {"title": "x".repeat(100), "settings": {"theme": "dark", "motto": "short"}}})
    );
}
