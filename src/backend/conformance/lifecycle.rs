//! Forgetting connections: one unregistered, or every connection of a detached instance,
//! with its rooms, presence (each leave announced) and metadata.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::harness::{push, Case, Instance};
use crate::backend::{
    Backend, Delivery, MetadataKind, MetadataOf, MetadataWrite, PresenceChange, Topic,
};
use crate::merge::MergeStrategy;

const TTL: Duration = Duration::from_secs(60);

fn write(value: Value) -> MetadataWrite {
    MetadataWrite::new(
        value,
        MergeStrategy::Replace,
        1024,
        "conformance metadata".to_owned(),
    )
}

/// Checks, from `from`, that nothing is left of `connection_id`.
async fn forgotten<B: Backend>(from: &Instance<B>, connection_id: &str) {
    let metadata = from
        .ok(
            "metadata",
            from.backend.metadata(MetadataOf::Connection(connection_id)),
        )
        .await;
    from.same(metadata, None, "the metadata of a forgotten connection");
    let rooms = from
        .ok(
            "connection_rooms",
            from.backend.connection_rooms(connection_id),
        )
        .await;
    from.same(rooms, Vec::new(), "the rooms of a forgotten connection");
    let delivered = from
        .publish(Delivery::ToConnection {
            connection_id: Arc::from(connection_id),
            push: push("conformance/lost", json!({})),
        })
        .await;
    from.check(
        !delivered,
        "publish of a push to a forgotten connection returned true",
    );
    let written = from
        .ok(
            "set_metadata of a forgotten connection",
            from.backend
                .set_metadata(MetadataOf::Connection(connection_id), &write(json!(1))),
        )
        .await;
    from.check(
        !written,
        "set_metadata of a forgotten connection returned true",
    );
    let joined = from
        .ok(
            "join_room of a forgotten connection",
            from.backend.join_room(connection_id, "room-1", None),
        )
        .await;
    from.check(!joined, "join_room of a forgotten connection returned true");
}

/// Unregistering a connection removes its rooms, its presence (a leave announced in each
/// room where it was present) and its metadata, and nothing of other connections.
pub(super) async fn unregister<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    for room in ["room-1", "room-2"] {
        case.listen_on_both(&Topic::Presence(Arc::from(room))).await;
    }
    a.register("conn-gone").await;
    b.register("conn-stays").await;
    let written = a
        .ok(
            "set_metadata",
            a.backend.set_metadata(
                MetadataOf::Connection("conn-gone"),
                &write(json!({ "n": 1 })),
            ),
        )
        .await;
    a.check(
        written,
        "set_metadata of a registered connection returned false",
    );
    for room in ["room-1", "room-2"] {
        a.join("conn-gone", room, Some(TTL)).await;
        for instance in case.both() {
            instance
                .expect_presence(room, "conn-gone", PresenceChange::Join, "a join")
                .await;
        }
    }
    a.join("conn-gone", "room-3", None).await;
    b.join("conn-stays", "room-1", Some(TTL)).await;
    for instance in case.both() {
        instance
            .expect_presence("room-1", "conn-stays", PresenceChange::Join, "a join")
            .await;
    }

    a.unregister("conn-gone").await;
    for instance in case.both() {
        instance
            .expect_presences_in_any_order(
                &[
                    ("room-1", "conn-gone", PresenceChange::Leave),
                    ("room-2", "conn-gone", PresenceChange::Leave),
                ],
                "the leaves of an unregistered connection",
            )
            .await;
    }
    case.quiet(
        a,
        "unregister_connection (one leave in each room where present)",
    )
    .await;

    for instance in case.both() {
        forgotten(instance, "conn-gone").await;
        let rooms = instance.ok("rooms", instance.backend.rooms()).await;
        instance.same(
            rooms,
            vec!["room-1".to_owned()],
            "rooms() after unregistering",
        );
        let members = instance
            .ok("room_members", instance.backend.room_members("room-1"))
            .await;
        instance.same(
            members,
            vec!["conn-stays".to_owned()],
            "the members after unregistering",
        );
        let presence = instance
            .ok("presence", instance.backend.presence("room-1"))
            .await;
        instance.same(
            presence.present,
            vec![("conn-stays".to_owned(), Value::Null)],
            "the presence after unregistering",
        );
        let all = instance
            .ok(
                "all_metadata",
                instance.backend.all_metadata(MetadataKind::Connection),
            )
            .await;
        instance.same(
            all,
            vec![("conn-stays".to_owned(), Value::Null)],
            "all_metadata(Connection) after unregistering",
        );
        let shared = instance
            .ok(
                "share_a_room",
                instance.backend.share_a_room("conn-gone", "conn-stays"),
            )
            .await;
        instance.check(
            !shared,
            "share_a_room with an unregistered connection returned true",
        );
    }
    let stored = b
        .ok(
            "set_presence_state of an unregistered connection",
            b.backend
                .set_presence_state("conn-gone", "room-1", Some(&json!(1)), None, false),
        )
        .await;
    b.check(
        !stored,
        "set_presence_state of an unregistered connection returned true",
    );
    case.quiet(b, "the reads after unregistering").await;
}

/// Detaching an instance forgets every connection it holds, announcing their leaves to
/// the instances still attached, and leaves the other instance's connections alone.
pub(super) async fn detach<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&Topic::Presence(Arc::from("room-1")))
        .await;
    a.register("conn-a1").await;
    a.register("conn-a2").await;
    b.register("conn-b").await;
    let written = a
        .ok(
            "set_metadata",
            a.backend
                .set_metadata(MetadataOf::Connection("conn-a2"), &write(json!({ "n": 2 }))),
        )
        .await;
    a.check(
        written,
        "set_metadata of a registered connection returned false",
    );
    a.join("conn-a1", "room-1", Some(TTL)).await;
    for instance in case.both() {
        instance
            .expect_presence("room-1", "conn-a1", PresenceChange::Join, "a join")
            .await;
    }
    a.join("conn-a2", "room-1", None).await;
    a.join("conn-a2", "room-2", None).await;
    b.join("conn-b", "room-1", Some(TTL)).await;
    for instance in case.both() {
        instance
            .expect_presence("room-1", "conn-b", PresenceChange::Join, "a join")
            .await;
    }

    a.detach().await;
    b.expect_presence(
        "room-1",
        "conn-a1",
        PresenceChange::Leave,
        "the leave of a connection of the detached instance",
    )
    .await;
    case.quiet(b, "detach (one leave for each presence of its connections)")
        .await;

    for connection_id in ["conn-a1", "conn-a2"] {
        forgotten(b, connection_id).await;
    }
    let members = b.ok("room_members", b.backend.room_members("room-1")).await;
    b.same(
        members,
        vec!["conn-b".to_owned()],
        "the members after detach",
    );
    let rooms = b.ok("rooms", b.backend.rooms()).await;
    b.same(rooms, vec!["room-1".to_owned()], "rooms() after detach");
    let all = b
        .ok(
            "all_metadata",
            b.backend.all_metadata(MetadataKind::Connection),
        )
        .await;
    b.same(
        all,
        vec![("conn-b".to_owned(), Value::Null)],
        "all_metadata(Connection) after detach",
    );
    let presence = b.ok("presence", b.backend.presence("room-1")).await;
    b.same(
        presence.present,
        vec![("conn-b".to_owned(), Value::Null)],
        "the presence after detach",
    );
    let to_b = Delivery::ToConnection {
        connection_id: Arc::from("conn-b"),
        push: push("conformance/still-here", json!({})),
    };
    let delivered = b.publish(to_b.clone()).await;
    b.check(
        delivered,
        "a push to a connection of the remaining instance was refused",
    );
    b.expect(&to_b, "a push to a connection of the remaining instance")
        .await;
}
