//! Metadata: connection and room metadata written and read from either instance, merged
//! by each strategy, bounded in size, and listed.

use serde_json::{json, Value};

use super::harness::{Case, Instance};
use crate::backend::{Backend, MetadataKind, MetadataOf, MetadataWrite};
use crate::error::MeshError;
use crate::merge::MergeStrategy;

/// Large enough for every write of these cases but the refused ones.
const LIMIT: usize = 1024;

fn write(value: Value, strategy: MergeStrategy) -> MetadataWrite {
    MetadataWrite::new(value, strategy, LIMIT, "conformance metadata".to_owned())
}

async fn read<B: Backend>(from: &Instance<B>, of: MetadataOf<'_>) -> Option<Value> {
    from.ok(format!("metadata({of:?})"), from.backend.metadata(of))
        .await
}

async fn set<B: Backend>(from: &Instance<B>, of: MetadataOf<'_>, write: &MetadataWrite) -> bool {
    from.ok(
        format!("set_metadata({of:?}, {write:?})"),
        from.backend.set_metadata(of, write),
    )
    .await
}

async fn list<B: Backend>(from: &Instance<B>, kind: MetadataKind) -> Vec<(String, Value)> {
    from.ok(
        format!("all_metadata({kind:?})"),
        from.backend.all_metadata(kind),
    )
    .await
}

/// Writes a sequence of merges through alternating instances, checking after each what
/// both read.
async fn merges<B: Backend>(case: &Case<B>, of: MetadataOf<'_>) {
    let steps = [
        (
            json!({ "name": "ada", "tags": { "x": 1 } }),
            MergeStrategy::Replace,
            json!({ "name": "ada", "tags": { "x": 1 } }),
        ),
        (
            json!({ "tags": { "y": 2 }, "age": 36 }),
            MergeStrategy::Merge,
            json!({ "name": "ada", "tags": { "y": 2 }, "age": 36 }),
        ),
        (
            json!({ "tags": { "z": 3 }, "name": "ada l." }),
            MergeStrategy::DeepMerge,
            json!({ "name": "ada l.", "tags": { "y": 2, "z": 3 }, "age": 36 }),
        ),
        (
            json!({ "name": "grace" }),
            MergeStrategy::Replace,
            json!({ "name": "grace" }),
        ),
    ];
    for (step, (value, strategy, expected)) in steps.into_iter().enumerate() {
        let (writer, reader) = if step % 2 == 0 {
            (&case.b, &case.a)
        } else {
            (&case.a, &case.b)
        };
        let written = set(writer, of, &write(value, strategy)).await;
        writer.check(
            written,
            format!("a {strategy:?} write of {of:?} was refused"),
        );
        for instance in [writer, reader] {
            let stored = read(instance, of).await;
            instance.same_json(
                &stored.unwrap_or(Value::Null),
                &expected,
                &format!("{of:?} after a {strategy:?} write"),
            );
        }
    }
}

/// A write over the limit fails with `TooLarge` and stores nothing.
async fn too_large<B: Backend>(from: &Instance<B>, of: MetadataOf<'_>, before: Option<Value>) {
    let big = json!({ "blob": "x".repeat(LIMIT) });
    let refused = from
        .refused(
            format!("set_metadata({of:?}) over max_bytes"),
            from.backend
                .set_metadata(of, &write(big, MergeStrategy::Merge)),
        )
        .await;
    from.check(
        matches!(refused, MeshError::TooLarge { limit: LIMIT, .. }),
        format!("a write of {of:?} over max_bytes failed with {refused:?}, not TooLarge"),
    );
    let after = read(from, of).await;
    from.same(
        after,
        before,
        &format!("{of:?} after a refused write (nothing stored)"),
    );
}

/// A live connection's metadata, from either instance, with every strategy; an unknown
/// connection's writes are refused with `false`; a write over the limit stores nothing.
pub(super) async fn connection<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    a.register("conn-1").await;
    b.register("conn-2").await;
    let of = MetadataOf::Connection("conn-1");
    for instance in case.both() {
        let none = read(instance, of).await;
        instance.same(none, None, "the metadata of a connection without any");
    }
    merges(case, of).await;
    too_large(a, of, Some(json!({ "name": "grace" }))).await;
    too_large(b, MetadataOf::Connection("conn-2"), None).await;

    let unknown = MetadataOf::Connection("conn-unknown");
    for instance in case.both() {
        let written = set(instance, unknown, &write(json!(1), MergeStrategy::Replace)).await;
        instance.check(
            !written,
            "set_metadata of an unregistered connection returned true",
        );
        let stored = read(instance, unknown).await;
        instance.same(stored, None, "the metadata of an unregistered connection");
    }
    let other = read(b, MetadataOf::Connection("conn-2")).await;
    b.same(other, None, "the metadata of another connection");
    case.quiet(a, "metadata writes (they announce nothing)")
        .await;
}

/// A room's metadata, whether or not it has members, from either instance, with every
/// strategy; listed sorted by room; gone once deleted.
pub(super) async fn room<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    let of = MetadataOf::Room("lobby");
    for instance in case.both() {
        let none = read(instance, of).await;
        instance.same(none, None, "the metadata of a room without any");
    }
    merges(case, of).await;
    too_large(b, of, Some(json!({ "name": "grace" }))).await;
    too_large(a, MetadataOf::Room("refused"), None).await;

    for (room, from) in [("zeta", a), ("alpha", b), ("mid", a)] {
        let value = json!({ "room": room });
        let written = set(
            from,
            MetadataOf::Room(room),
            &write(value, MergeStrategy::Replace),
        )
        .await;
        from.check(
            written,
            format!("set_metadata of room {room:?} returned false"),
        );
    }
    let expected = |rooms: &[&str]| -> Vec<(String, Value)> {
        rooms
            .iter()
            .map(|room| {
                let value = if *room == "lobby" {
                    json!({ "name": "grace" })
                } else {
                    json!({ "room": room })
                };
                (room.to_string(), value)
            })
            .collect()
    };
    for instance in case.both() {
        let all = list(instance, MetadataKind::Room).await;
        instance.same(
            all,
            expected(&["alpha", "lobby", "mid", "zeta"]),
            "all_metadata(Room): every room with metadata, sorted by name",
        );
    }

    b.ok(
        "delete_room_metadata(\"mid\")",
        b.backend.delete_room_metadata("mid"),
    )
    .await;
    for instance in case.both() {
        let gone = read(instance, MetadataOf::Room("mid")).await;
        instance.same(
            gone,
            None,
            "the metadata of a room after delete_room_metadata",
        );
        let all = list(instance, MetadataKind::Room).await;
        instance.same(
            all,
            expected(&["alpha", "lobby", "zeta"]),
            "all_metadata(Room) after delete_room_metadata",
        );
    }
    for room in ["mid", "never-had-any"] {
        a.ok(
            format!("delete_room_metadata({room:?}) of a room without metadata"),
            a.backend.delete_room_metadata(room),
        )
        .await;
    }
    let kept = read(a, MetadataOf::Room("alpha")).await;
    a.same(
        kept,
        Some(json!({ "room": "alpha" })),
        "another room's metadata after a delete",
    );
    case.quiet(a, "room metadata writes (they announce nothing)")
        .await;
}

/// `all_metadata(Connection)` lists every live connection in registration order, with
/// `null` for one without metadata.
pub(super) async fn all_connections<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    let none = list(b, MetadataKind::Connection).await;
    b.same(
        none,
        Vec::new(),
        "all_metadata(Connection) with no connection",
    );

    a.register("conn-zulu").await;
    b.register("conn-alpha").await;
    a.register("conn-mike").await;
    for (connection_id, from) in [("conn-mike", b), ("conn-zulu", a)] {
        let value = json!({ "id": connection_id });
        let written = set(
            from,
            MetadataOf::Connection(connection_id),
            &write(value, MergeStrategy::Replace),
        )
        .await;
        from.check(
            written,
            format!("set_metadata of {connection_id:?} returned false"),
        );
    }
    for instance in case.both() {
        let all = list(instance, MetadataKind::Connection).await;
        instance.same(
            all,
            vec![
                ("conn-zulu".to_owned(), json!({ "id": "conn-zulu" })),
                ("conn-alpha".to_owned(), Value::Null),
                ("conn-mike".to_owned(), json!({ "id": "conn-mike" })),
            ],
            "all_metadata(Connection): registration order, null for none",
        );
    }

    b.unregister("conn-alpha").await;
    a.unregister("conn-zulu").await;
    for instance in case.both() {
        let all = list(instance, MetadataKind::Connection).await;
        instance.same(
            all,
            vec![("conn-mike".to_owned(), json!({ "id": "conn-mike" }))],
            "all_metadata(Connection) after unregistering two connections",
        );
    }
}
