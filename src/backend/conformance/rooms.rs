//! Rooms: joining and leaving, members in join order (with metadata), a connection's
//! rooms, the rooms that have members, and whether two connections share one.

use serde_json::{json, Value};

use super::harness::{Case, Instance};
use crate::backend::{Backend, MetadataOf, MetadataWrite};
use crate::merge::MergeStrategy;

async fn members<B: Backend>(from: &Instance<B>, room: &str) -> Vec<String> {
    from.ok(
        format!("room_members({room:?})"),
        from.backend.room_members(room),
    )
    .await
}

async fn rooms_of<B: Backend>(from: &Instance<B>, connection_id: &str) -> Vec<String> {
    let mut rooms = from
        .ok(
            format!("connection_rooms({connection_id:?})"),
            from.backend.connection_rooms(connection_id),
        )
        .await;
    // The trait promises no order for a connection's rooms.
    rooms.sort_unstable();
    rooms
}

async fn rooms<B: Backend>(from: &Instance<B>) -> Vec<String> {
    from.ok("rooms()", from.backend.rooms()).await
}

async fn share<B: Backend>(from: &Instance<B>, first: &str, second: &str) -> bool {
    from.ok(
        format!("share_a_room({first:?}, {second:?})"),
        from.backend.share_a_room(first, second),
    )
    .await
}

async fn leave<B: Backend>(from: &Instance<B>, connection_id: &str, room: &str) -> bool {
    from.ok(
        format!("leave_room({connection_id:?}, {room:?})"),
        from.backend.leave_room(connection_id, room),
    )
    .await
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

/// Joining needs a registered connection; members are listed in join order (a repeated
/// join keeps its place), with their metadata.
pub(super) async fn membership<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    let joined = a
        .ok(
            "join_room of an unregistered connection",
            a.backend.join_room("conn-ghost", "lobby", None),
        )
        .await;
    a.check(
        !joined,
        "join_room of an unregistered connection returned true",
    );
    let listed = rooms(b).await;
    b.same(listed, Vec::new(), "rooms() after a refused join");
    let listed = members(b, "lobby").await;
    b.same(listed, Vec::new(), "the members after a refused join");

    a.register("conn-1").await;
    b.register("conn-2").await;
    a.register("conn-3").await;
    a.join("conn-3", "lobby", None).await;
    a.join("conn-1", "lobby", None).await;
    b.join("conn-2", "lobby", None).await;
    a.join("conn-3", "lobby", None).await;
    for instance in case.both() {
        let listed = members(instance, "lobby").await;
        instance.same(
            listed,
            strings(&["conn-3", "conn-1", "conn-2"]),
            "room_members in join order (a repeated join keeps its place)",
        );
    }

    let metadata = json!({ "name": "ada" });
    let write = MetadataWrite::new(
        metadata.clone(),
        MergeStrategy::Replace,
        1024,
        "conformance metadata".to_owned(),
    );
    let written = b
        .ok(
            "set_metadata of conn-1",
            b.backend
                .set_metadata(MetadataOf::Connection("conn-1"), &write),
        )
        .await;
    b.check(
        written,
        "set_metadata of a registered connection returned false",
    );
    for instance in case.both() {
        let listed = instance
            .ok(
                "room_members_with_metadata(\"lobby\")",
                instance.backend.room_members_with_metadata("lobby"),
            )
            .await;
        instance.same(
            listed,
            vec![
                ("conn-3".to_owned(), Value::Null),
                ("conn-1".to_owned(), metadata.clone()),
                ("conn-2".to_owned(), Value::Null),
            ],
            "room_members_with_metadata: join order, null for none",
        );
    }
    case.quiet(a, "joins without a presence TTL (they announce nothing)")
        .await;
}

/// A connection's rooms, the rooms with members (sorted, an emptied room gone), shared
/// rooms, and leaving (`true` only for a member).
pub(super) async fn listings<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    a.register("conn-1").await;
    b.register("conn-2").await;
    a.register("conn-3").await;
    for room in ["zoo", "lobby", "attic"] {
        a.join("conn-1", room, None).await;
    }
    b.join("conn-2", "zoo", None).await;
    a.join("conn-3", "solo", None).await;

    for instance in case.both() {
        let listed = rooms_of(instance, "conn-1").await;
        instance.same(
            listed,
            strings(&["attic", "lobby", "zoo"]),
            "connection_rooms of conn-1",
        );
        let listed = rooms_of(instance, "conn-unknown").await;
        instance.same(
            listed,
            Vec::new(),
            "connection_rooms of an unknown connection",
        );
        let listed = rooms(instance).await;
        instance.same(
            listed,
            strings(&["attic", "lobby", "solo", "zoo"]),
            "rooms(): every room with a member, sorted",
        );
        let shared = share(instance, "conn-1", "conn-2").await;
        instance.check(shared, "share_a_room of two members of zoo returned false");
        let shared = share(instance, "conn-2", "conn-1").await;
        instance.check(shared, "share_a_room (the other way) returned false");
        let shared = share(instance, "conn-3", "conn-2").await;
        instance.check(
            !shared,
            "share_a_room of connections in different rooms returned true",
        );
        let shared = share(instance, "conn-1", "conn-unknown").await;
        instance.check(
            !shared,
            "share_a_room with an unknown connection returned true",
        );
    }

    let left = leave(b, "conn-2", "zoo").await;
    b.check(left, "leave_room of a member returned false");
    let left = leave(b, "conn-2", "zoo").await;
    b.check(!left, "a second leave_room returned true");
    let left = leave(a, "conn-3", "lobby").await;
    a.check(!left, "leave_room of a room never joined returned true");
    let left = leave(a, "conn-unknown", "lobby").await;
    a.check(!left, "leave_room of an unknown connection returned true");
    for instance in case.both() {
        let listed = members(instance, "zoo").await;
        instance.same(
            listed,
            strings(&["conn-1"]),
            "the members of zoo after a leave",
        );
        let shared = share(instance, "conn-1", "conn-2").await;
        instance.check(!shared, "share_a_room after one of them left returned true");
        let listed = rooms_of(instance, "conn-2").await;
        instance.same(
            listed,
            Vec::new(),
            "connection_rooms after leaving every room",
        );
    }

    let left = leave(a, "conn-3", "solo").await;
    a.check(left, "leave_room of a member returned false");
    for instance in case.both() {
        let listed = rooms(instance).await;
        instance.same(
            listed,
            strings(&["attic", "lobby", "zoo"]),
            "rooms() after the last member of solo left",
        );
        let listed = members(instance, "solo").await;
        instance.same(listed, Vec::new(), "the members of an emptied room");
    }
    case.quiet(
        a,
        "joins and leaves without presence (they announce nothing)",
    )
    .await;
}
