//! Delivery: pushes and closes reach the holder of their connection, broadcasts every
//! instance, topic deliveries the instances that subscribed, calls and answers their
//! instance.

use std::sync::Arc;

use serde_json::json;

use super::harness::{push, Case};
use crate::backend::{Backend, ConnectionOp, Delivery, Topic};

/// `ToConnection` and `Close` reach only the instance that holds the connection, whichever
/// instance publishes them; one for a connection nobody holds is refused.
pub(super) async fn to_connection<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    a.register("conn-a").await;
    a.register("conn-a2").await;
    b.register("conn-b").await;

    for from in case.both() {
        let delivery = Delivery::ToConnection {
            connection_id: Arc::from("conn-a"),
            push: push(
                "conformance/to-conn-a",
                json!({ "from": &*from.id, "text": "h\u{e9}llo \"quoted\"\n" }),
            ),
        };
        let published = from.publish(delivery.clone()).await;
        from.check(
            published,
            "a push to conn-a, held by instance-a, was refused",
        );
        a.expect(&delivery, "the push to conn-a, unchanged").await;
        case.quiet(from, "a push to conn-a (only its holder receives it, once)")
            .await;
    }

    let to_b = Delivery::ToConnection {
        connection_id: Arc::from("conn-b"),
        push: push("conformance/to-conn-b", json!([1, 2, 3])),
    };
    let published = a.publish(to_b.clone()).await;
    a.check(
        published,
        "a push to conn-b, held by instance-b, was refused",
    );
    b.expect(&to_b, "the push to conn-b, unchanged").await;
    case.quiet(a, "a push to conn-b (only its holder receives it)")
        .await;

    let close = Delivery::Close {
        connection_id: Arc::from("conn-b"),
        reason: "conformance: going away".to_owned(),
    };
    let published = a.publish(close.clone()).await;
    a.check(
        published,
        "a close of conn-b, held by instance-b, was refused",
    );
    b.expect(&close, "the close of conn-b, unchanged").await;
    case.quiet(a, "a close of conn-b (only its holder receives it)")
        .await;

    for from in case.both() {
        let to_nobody = Delivery::ToConnection {
            connection_id: Arc::from("conn-nobody"),
            push: push("conformance/lost", json!({})),
        };
        let published = from.publish(to_nobody).await;
        from.check(
            !published,
            "publish of a push to a connection nobody holds returned true",
        );
        let close_nobody = Delivery::Close {
            connection_id: Arc::from("conn-nobody"),
            reason: String::new(),
        };
        let published = from.publish(close_nobody).await;
        from.check(
            !published,
            "publish of a close of a connection nobody holds returned true",
        );
    }
    case.quiet(b, "deliveries to a connection nobody holds")
        .await;
}

/// A broadcast reaches every instance, once per instance however many connections it
/// holds.
pub(super) async fn broadcast<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    let before_any_connection = Delivery::Broadcast {
        push: push("conformance/early", json!(null)),
    };
    let published = a.publish(before_any_connection.clone()).await;
    a.check(published, "a broadcast was refused");
    for instance in case.both() {
        instance
            .expect(&before_any_connection, "a broadcast before any connection")
            .await;
    }

    a.register("conn-1").await;
    a.register("conn-2").await;
    b.register("conn-3").await;
    let delivery = Delivery::Broadcast {
        push: push("conformance/news", json!({ "headline": "all hands" })),
    };
    let published = b.publish(delivery.clone()).await;
    b.check(published, "a broadcast was refused");
    for instance in case.both() {
        instance.expect(&delivery, "the broadcast, unchanged").await;
    }
    case.quiet(b, "a broadcast (each instance receives it once)")
        .await;
}

/// Topic deliveries reach an instance whose inbox listens to the topic once its
/// `subscribe` resolved, with every field unchanged; an `unsubscribe` while the inbox
/// still listens keeps them coming.
pub(super) async fn topics<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    let lobby = Topic::Room(Arc::from("lobby"));
    b.listen(lobby.clone()).await;
    let delivery = Delivery::Topic {
        topic: lobby.clone(),
        push: push("conformance/room-message", json!({ "text": "hi" })),
        exclude: Arc::from(vec![Arc::from("conn-x"), Arc::from("conn-y")]),
    };
    let published = a.publish(delivery.clone()).await;
    a.check(published, "a topic delivery was refused");
    b.expect(
        &delivery,
        "the topic delivery, with its exclusions, unchanged",
    )
    .await;
    case.quiet(a, "a topic delivery").await;

    let every_kind = [
        Topic::Room(Arc::from("room:with:colons")),
        Topic::Presence(Arc::from("lobby")),
        Topic::Channel(Arc::from("news")),
        Topic::Record(Arc::from("doc/1")),
        Topic::Collections(Arc::from("doc/*")),
    ];
    for topic in every_kind {
        case.listen_on_both(&topic).await;
        let delivery = Delivery::Topic {
            topic: topic.clone(),
            push: push("conformance/topic", json!({ "topic": topic.key() })),
            exclude: Arc::from(Vec::new()),
        };
        let published = b.publish(delivery.clone()).await;
        b.check(published, format!("a delivery to {topic:?} was refused"));
        for instance in case.both() {
            instance
                .expect(&delivery, &format!("the delivery to {topic:?}"))
                .await;
        }
        case.quiet(b, &format!("a delivery to {topic:?}")).await;
    }

    // The inbox still listens, so the unsubscribe must change nothing.
    b.backend.unsubscribe(&b.id, &lobby);
    b.listen(Topic::Channel(Arc::from("after-unsubscribe")))
        .await;
    let published = a.publish(delivery.clone()).await;
    a.check(published, "a topic delivery was refused");
    b.expect(
        &delivery,
        "a topic delivery after an unsubscribe while the inbox still listens",
    )
    .await;
    case.quiet(a, "a topic delivery after an unsubscribe").await;

    b.stop_listening(&lobby);
    b.listen(lobby.clone()).await;
    let published = a.publish(delivery.clone()).await;
    a.check(published, "a topic delivery was refused");
    b.expect(&delivery, "a topic delivery after subscribing again")
        .await;
    case.quiet(a, "a topic delivery after subscribing again")
        .await;
}

/// A call reaches the holder of its connection, an answer the instance it names; either
/// naming something nobody holds is refused.
pub(super) async fn calls<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    b.register("conn-b").await;
    let ops = [
        ConnectionOp::JoinRoom(Arc::from("lobby")),
        ConnectionOp::LeaveRoom(Arc::from("lobby")),
        ConnectionOp::LeaveAllRooms,
    ];
    for (call_id, op) in (7..).zip(ops) {
        let call = Delivery::Call {
            connection_id: Arc::from("conn-b"),
            from: a.id.clone(),
            call_id,
            op,
        };
        let published = a.publish(call.clone()).await;
        a.check(
            published,
            "a call on conn-b, held by instance-b, was refused",
        );
        b.expect(&call, "the call, unchanged").await;
        let answer = Delivery::Answer {
            to: a.id.clone(),
            call_id,
            outcome: if call_id == 8 { None } else { Some(true) },
        };
        let published = b.publish(answer.clone()).await;
        b.check(published, "an answer to instance-a was refused");
        a.expect(&answer, "the answer, unchanged").await;
        case.quiet(b, "a call and its answer").await;
    }

    let call_nobody = Delivery::Call {
        connection_id: Arc::from("conn-nobody"),
        from: a.id.clone(),
        call_id: 1,
        op: ConnectionOp::LeaveAllRooms,
    };
    let published = a.publish(call_nobody).await;
    a.check(
        !published,
        "publish of a call on a connection nobody holds returned true",
    );
    let answer_nobody = Delivery::Answer {
        to: Arc::from("instance-nobody"),
        call_id: 1,
        outcome: Some(false),
    };
    let published = b.publish(answer_nobody).await;
    b.check(
        !published,
        "publish of an answer to an instance that is not attached returned true",
    );
    case.quiet(a, "deliveries to something nobody holds").await;
}
