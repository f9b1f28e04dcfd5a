//! The Rust client's rooms and presence: joins, presence as a stream and as a callback,
//! states kept alive, and everything restored after a reconnect, on both backends.

use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tower_mesh::client::{ClientError, PresenceKind, StateOptions};
use tower_mesh::{MeshBuilder, PresenceOptions};

use crate::common::*;

conformance!(
    join_leave_and_room_metadata,
    presence_as_a_stream_and_as_a_callback,
    refused_subscriptions_are_errors,
    states_publish_clear_and_expire,
    a_kept_state_outlives_its_expiry_until_the_keeper_is_dropped,
    rooms_presence_and_states_are_restored_after_a_reconnect,
);

fn tracked(builder: MeshBuilder) -> MeshBuilder {
    builder
        .ping_interval(Duration::from_millis(100))
        .track_presence("lobby", PresenceOptions::new())
        .track_presence(
            "private",
            PresenceOptions::new().guard(|_, _| async { false }),
        )
}

async fn join_leave_and_room_metadata(backend: Backend) {
    let server = serve(tracked(backend.builder())).await;
    let alice = client(&server.url()).await;
    let bob = client(&server.url()).await;
    let members = alice.join_room("lobby").await.expect("join");
    assert_eq!(
        members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        [alice.connection_id()]
    );
    let members = bob.join_room("lobby").await.expect("join");
    assert_eq!(
        members.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        [alice.connection_id(), bob.connection_id()]
    );
    assert_eq!(
        server.mesh.room("lobby").members().await.unwrap(),
        vec![alice.connection_id(), bob.connection_id()]
    );
    bob.leave_room("lobby").await.expect("leave");
    assert_eq!(
        server.mesh.room("lobby").members().await.unwrap(),
        vec![alice.connection_id()]
    );
    assert_eq!(alice.room_metadata("lobby").await, Ok(None));
    server
        .mesh
        .room("lobby")
        .update_metadata(json!({"topic": "hi"}))
        .await
        .expect("metadata");
    assert_eq!(
        alice.room_metadata("lobby").await,
        Ok(Some(json!({"topic": "hi"})))
    );
}

async fn presence_as_a_stream_and_as_a_callback(backend: Backend) {
    let server = serve(tracked(backend.builder())).await;
    let watcher = client(&server.url()).await;
    let member = client(&server.url()).await;
    let (snapshot, mut updates) = watcher.subscribe_presence("lobby").await.expect("sub");
    assert!(snapshot.present.is_empty() && snapshot.states.is_empty());
    let (seen, mut seen_by_callback) = mpsc::unbounded_channel();
    watcher
        .subscribe_presence_with("lobby", move |update| {
            let _ = seen.send(update);
        })
        .await
        .expect("second subscriber on the same client");
    member.join_room("lobby").await.expect("join");
    for stream in [&mut updates, &mut seen_by_callback] {
        let update = recv_within(stream).await;
        assert_eq!(
            (
                update.kind,
                update.connection_id.as_str(),
                update.room_name.as_str()
            ),
            (PresenceKind::Join, member.connection_id().as_str(), "lobby")
        );
        assert!(update.timestamp > 0);
    }
    member.leave_room("lobby").await.expect("leave");
    for stream in [&mut updates, &mut seen_by_callback] {
        assert_eq!(recv_within(stream).await.kind, PresenceKind::Leave);
    }
    assert_eq!(watcher.unsubscribe_presence("lobby").await, Ok(true));
    assert_eq!(watcher.unsubscribe_presence("lobby").await, Ok(false));
    // Both channels end once the subscription is gone (the callbacks were dropped).
    assert!(updates.recv().await.is_none());
    assert!(seen_by_callback.recv().await.is_none());
}

async fn refused_subscriptions_are_errors(backend: Backend) {
    let server = serve(tracked(backend.builder())).await;
    let alice = client(&server.url()).await;
    for room in ["untracked", "private"] {
        assert!(
            matches!(
                alice.subscribe_presence(room).await,
                Err(ClientError::Refused(_))
            ),
            "{room}"
        );
        assert!(matches!(
            alice.presence_state(room).await,
            Err(ClientError::Refused(_))
        ));
    }
    // A refused subscription leaves nothing behind to renew after a reconnect.
    reconnect(&alice).await;
    assert!(server.mesh.rooms().await.expect("rooms").is_empty());
}

async fn states_publish_clear_and_expire(backend: Backend) {
    let server = serve(tracked(backend.builder())).await;
    let watcher = client(&server.url()).await;
    let member = client(&server.url()).await;
    let (_, mut updates) = watcher.subscribe_presence("lobby").await.expect("sub");
    // Not present yet: nothing stored.
    assert_eq!(
        member
            .publish_presence_state("lobby", json!({"typing": true}), StateOptions::new())
            .await,
        Ok(false)
    );
    member.join_room("lobby").await.expect("join");
    assert_eq!(recv_within(&mut updates).await.kind, PresenceKind::Join);
    assert_eq!(
        member
            .publish_presence_state("lobby", json!({"typing": true}), StateOptions::new())
            .await,
        Ok(true)
    );
    let update = recv_within(&mut updates).await;
    assert_eq!(
        (update.kind, update.state),
        (PresenceKind::State, Some(json!({"typing": true})))
    );
    let snapshot = watcher.presence_state("lobby").await.expect("state");
    assert_eq!(snapshot.present.len(), 1);
    assert_eq!(
        snapshot.states.get(&member.connection_id()),
        Some(&json!({"typing": true}))
    );
    assert_eq!(member.clear_presence_state("lobby").await, Ok(true));
    let update = recv_within(&mut updates).await;
    assert_eq!((update.kind, update.state), (PresenceKind::State, None));
    let options = StateOptions::new().expire_after(Duration::from_millis(150));
    assert_eq!(
        member
            .publish_presence_state("lobby", json!({"away": 1}), options)
            .await,
        Ok(true)
    );
    assert_eq!(
        recv_within(&mut updates).await.state,
        Some(json!({"away": 1}))
    );
    let expired = recv_within(&mut updates).await;
    assert_eq!((expired.kind, expired.state), (PresenceKind::State, None));
}

async fn a_kept_state_outlives_its_expiry_until_the_keeper_is_dropped(backend: Backend) {
    let server = serve(tracked(backend.builder())).await;
    let watcher = client(&server.url()).await;
    let member = client(&server.url()).await;
    member.join_room("lobby").await.expect("join");
    let (_, mut updates) = watcher.subscribe_presence("lobby").await.expect("sub");
    let keeper = member
        .keep_presence_state(
            "lobby",
            json!({"status": "here"}),
            Duration::from_millis(150),
        )
        .await
        .expect("kept");
    assert_eq!(
        recv_within(&mut updates).await.state,
        Some(json!({"status": "here"}))
    );
    // Several expiry periods (300 ms each) pass while it is kept: the refreshes are
    // silent, and the state is there throughout.
    let kept_until = tokio::time::Instant::now() + Duration::from_millis(900);
    while tokio::time::Instant::now() < kept_until {
        let states = server
            .mesh
            .room("lobby")
            .presence_states()
            .await
            .expect("states");
        assert_eq!(states.len(), 1, "the kept state is still there");
        tokio::task::yield_now().await;
    }
    assert!(
        updates.try_recv().is_err(),
        "no update while the state is kept"
    );
    drop(keeper);
    let expired = recv_within(&mut updates).await;
    assert_eq!((expired.kind, expired.state), (PresenceKind::State, None));
    assert!(server
        .mesh
        .room("lobby")
        .presence_states()
        .await
        .expect("states")
        .is_empty());
}

async fn rooms_presence_and_states_are_restored_after_a_reconnect(backend: Backend) {
    // Two instances: the watcher stays on one while the member reconnects to the other.
    let first = serve(tracked(backend.builder())).await;
    let second = serve(tracked(backend.builder())).await;
    let watcher = client(&first.url()).await;
    let member = client(&second.url()).await;
    member.join_room("lobby").await.expect("join");
    member.join_room("plain").await.expect("join");
    assert_eq!(
        member
            .publish_presence_state("lobby", json!({"mood": "ok"}), StateOptions::new())
            .await,
        Ok(true)
    );
    let (snapshot, mut updates) = watcher.subscribe_presence("lobby").await.expect("sub");
    assert_eq!(snapshot.present.len(), 1);
    let (member_watch, mut member_updates) = member.subscribe_presence("lobby").await.expect("sub");
    assert_eq!(member_watch.present.len(), 1);

    let old_id = member.connection_id();
    let new_id = reconnect(&member).await;
    assert_ne!(new_id, old_id);
    // The watcher sees the old connection leave, the new one join and publish its state.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let update = recv_within(&mut updates).await;
        seen.push((update.kind, update.connection_id, update.state));
    }
    assert!(seen.contains(&(PresenceKind::Leave, old_id.clone(), None)));
    assert!(seen.contains(&(PresenceKind::Join, new_id.clone(), None)));
    assert!(seen.contains(&(
        PresenceKind::State,
        new_id.clone(),
        Some(json!({"mood": "ok"}))
    )));
    // Rooms were re-joined, and the new connection gets room broadcasts.
    let mut rooms = first.mesh.connection_rooms(&new_id).await.expect("rooms");
    rooms.sort();
    assert_eq!(rooms, ["lobby", "plain"]);
    let mut pushes = member.pushes();
    first
        .mesh
        .room("plain")
        .broadcast("news", &json!("fresh"))
        .await
        .expect("broadcast");
    let push = loop {
        let push = tokio::time::timeout(WAIT, pushes.recv())
            .await
            .expect("push in time")
            .expect("push");
        if push.command != "mesh/presence-update" {
            break push;
        }
    };
    assert_eq!(
        (push.command.as_str(), push.payload),
        ("news", json!("fresh"))
    );
    // The member's own presence subscription was renewed: it hears a newcomer.
    let newcomer = client(&first.url()).await;
    newcomer.join_room("lobby").await.expect("join");
    loop {
        let update = recv_within(&mut member_updates).await;
        if update.kind == PresenceKind::Join && update.connection_id == newcomer.connection_id() {
            break;
        }
    }
}
