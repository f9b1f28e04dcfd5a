//! Recovery after a reconnect (issue 17 part 2, docs/protocol.md §7.3): channel stream
//! positions, `since` on `mesh/subscribe-channel` and `mesh/get-channel-history`, and the
//! Rust client's automatic recovery, on both backends, over real WebSockets, with the
//! client moving between two instances of one mesh. A Redis restart is in
//! tests/it/redis_faults.rs, plain channels in tests/it/plain_channels.rs.

use serde_json::{json, Value};
use tokio::sync::watch;
use tower_mesh::client::ClientEvent;
use tower_mesh::{Access, Mesh};

use crate::common::*;

conformance!(
    a_client_that_moves_to_another_instance_gets_exactly_what_it_missed_then_live_messages,
    recovery_races_with_writes_without_a_gap_or_a_repeat,
    a_foreign_stale_or_lost_position_is_not_recovered,
    get_channel_history_reads_from_an_offset,
    the_rust_client_recovers_on_every_reconnect_and_says_when_it_cannot,
);

const MESSAGE: &str = "mesh/subscription-message";

async fn write(mesh: &Mesh, channel: &str, message: &str, history: usize) {
    mesh.write_channel(channel, message, history)
        .await
        .expect("write_channel");
}

async fn subscribe(client: &mut RawClient, id: u64, payload: Value) -> Value {
    call(client, id, "mesh/subscribe-channel", payload).await
}

/// The position a reply gives: `{epoch, offset}`.
fn position(reply: &Value) -> Value {
    let (Some(epoch), Some(offset)) = (reply["epoch"].as_str(), reply["offset"].as_u64()) else {
        panic!("no position in {reply}");
    };
    json!({ "epoch": epoch, "offset": offset })
}

/// The next channel message's `(message, offset)`.
async fn message(client: &mut RawClient) -> (String, u64) {
    let payload = client.push_within(MESSAGE).await["payload"].clone();
    (
        payload["message"].as_str().expect("message").to_owned(),
        payload["offset"].as_u64().expect("offset"),
    )
}

/// Asserts that no channel message came before the marker.
async fn assert_no_message(mesh: &Mesh, client: &mut RawClient) {
    for frames in frames_before_marker(mesh, "marker", &mut [client], Noise::Kept).await {
        assert!(
            pushes_named(&frames, MESSAGE).is_empty(),
            "unexpected channel message: {frames:?}"
        );
    }
}

async fn a_client_that_moves_to_another_instance_gets_exactly_what_it_missed_then_live_messages(
    backend: Backend,
) {
    let a = serve(backend.builder().expose_channel("news", Access::open())).await;
    let b = serve(backend.builder().expose_channel("news", Access::open())).await;
    write(&a.mesh, "news", "before", 100).await;

    let mut client = RawClient::connect(&a.url()).await;
    let reply = subscribe(&mut client, 1, json!({"channel": "news"})).await;
    assert_eq!(reply["history"], json!([]));
    assert_eq!(reply["offset"], 1, "the newest message's position: {reply}");
    write(&b.mesh, "news", "seen 1", 100).await;
    write(&a.mesh, "news", "seen 2", 100).await;
    assert_eq!(message(&mut client).await, ("seen 1".to_owned(), 2));
    assert_eq!(message(&mut client).await, ("seen 2".to_owned(), 3));
    let since = json!({"epoch": reply["epoch"], "offset": 3});
    client.close().await;

    for n in 1..=3 {
        write(&b.mesh, "news", &format!("missed {n}"), 100).await;
    }

    // Back on the other instance, from where it was: exactly the missed ones, newest
    // first as history always is, whatever historyLimit says.
    let mut client = RawClient::connect(&b.url()).await;
    let reply = subscribe(
        &mut client,
        1,
        json!({"channel": "news", "historyLimit": 1, "since": since}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"success": true, "history": ["missed 3", "missed 2", "missed 1"],
               "epoch": since["epoch"], "offset": 6, "recovered": true})
    );
    // Then the live ones, in order, from both instances, each once.
    write(&a.mesh, "news", "live 1", 100).await;
    write(&b.mesh, "news", "live 2", 0).await;
    assert_eq!(message(&mut client).await, ("live 1".to_owned(), 7));
    assert_eq!(message(&mut client).await, ("live 2".to_owned(), 8));
    assert_no_message(&a.mesh, &mut client).await;

    // Nothing missed: recovered, with an empty history.
    let mut again = RawClient::connect(&a.url()).await;
    let reply = subscribe(
        &mut again,
        1,
        json!({"channel": "news", "since": {"epoch": since["epoch"], "offset": 8}}),
    )
    .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["history"], json!([]));
    assert_eq!(
        position(&reply),
        json!({"epoch": since["epoch"], "offset": 8})
    );
}

/// Messages are written without pause on one instance while the client subscribes
/// from a position on the other: what the reply holds and what follows it, together,
/// are every message after that position, in order, each once, wherever the read fell.
async fn recovery_races_with_writes_without_a_gap_or_a_repeat(backend: Backend) {
    const TOTAL: u64 = 200;
    let a = serve(backend.builder().expose_channel("feed", Access::open())).await;
    let b = serve(backend.builder().expose_channel("feed", Access::open())).await;
    for n in 1..=10 {
        write(&b.mesh, "feed", &format!("m{n}"), 1000).await;
    }
    let mut probe = RawClient::connect(&a.url()).await;
    let epoch = subscribe(&mut probe, 1, json!({"channel": "feed"})).await["epoch"].clone();

    let writer = {
        let mesh = b.mesh.clone();
        tokio::spawn(async move {
            for n in 11..=TOTAL {
                write(&mesh, "feed", &format!("m{n}"), 1000).await;
            }
        })
    };
    let mut client = RawClient::connect(&a.url()).await;
    let reply = subscribe(
        &mut client,
        1,
        json!({"channel": "feed", "since": {"epoch": epoch, "offset": 5}}),
    )
    .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    let newest = reply["offset"].as_u64().expect("offset");
    let mut seen: Vec<String> = reply["history"]
        .as_array()
        .expect("history")
        .iter()
        .rev()
        .map(|message| message.as_str().expect("text").to_owned())
        .collect();
    assert_eq!(seen.len() as u64, newest - 5, "{reply}");
    while (seen.len() as u64) < TOTAL - 5 {
        let (text, offset) = message(&mut client).await;
        assert_eq!(offset, 6 + seen.len() as u64, "after {seen:?}");
        seen.push(text);
    }
    within("the writer", writer).await.expect("writer");
    let expected: Vec<String> = (6..=TOTAL).map(|n| format!("m{n}")).collect();
    assert_eq!(seen, expected);
    assert_no_message(&a.mesh, &mut client).await;
}

async fn a_foreign_stale_or_lost_position_is_not_recovered(backend: Backend) {
    let a = serve(backend.builder().expose_channel("log", Access::open())).await;
    let b = serve(backend.builder().expose_channel("log", Access::open())).await;
    let mut client = RawClient::connect(&a.url()).await;
    let epoch = subscribe(&mut client, 1, json!({"channel": "log"})).await["epoch"].clone();
    // Five messages, of which the history keeps three; the fourth is not kept at all.
    for n in 1..=5 {
        let keep = if n == 4 { 0 } else { 3 };
        write(&b.mesh, "log", &format!("m{n}"), keep).await;
    }
    let not_recovered = |history: Value| {
        json!({"success": true, "history": history, "epoch": epoch, "offset": 5,
               "recovered": false})
    };
    for (id, since, why) in [
        (
            11,
            json!({"epoch": "another", "offset": 4}),
            "another epoch",
        ),
        (
            12,
            json!({"epoch": epoch, "offset": 6}),
            "ahead of the stream",
        ),
        (
            13,
            json!({"epoch": epoch, "offset": 3}),
            "a message not kept since",
        ),
        (
            14,
            json!({"epoch": epoch, "offset": 0}),
            "messages trimmed since",
        ),
    ] {
        // A new connection each time: one already subscribed recovers nothing.
        let mut client = RawClient::connect(&b.url()).await;
        let reply = subscribe(
            &mut client,
            id,
            json!({"channel": "log", "historyLimit": 2, "since": since}),
        )
        .await;
        assert_eq!(reply, not_recovered(json!(["m5", "m3"])), "{why}");
    }
    // After the message not kept, the rest is there.
    let mut fresh = RawClient::connect(&a.url()).await;
    let reply = subscribe(
        &mut fresh,
        15,
        json!({"channel": "log", "historyLimit": 2, "since": {"epoch": epoch, "offset": 4}}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"success": true, "history": ["m5"], "epoch": epoch, "offset": 5,
               "recovered": true})
    );
    // A connection subscribed all along had every message live; subscribing again
    // leaves its stream as it is, and recovers nothing.
    for n in 1..=5 {
        assert_eq!(message(&mut client).await, (format!("m{n}"), n));
    }
    let reply = subscribe(
        &mut client,
        3,
        json!({"channel": "log", "since": {"epoch": epoch, "offset": 4}}),
    )
    .await;
    assert_eq!(reply["recovered"], false, "{reply}");
    write(&a.mesh, "log", "m6", 3).await;
    assert_eq!(message(&mut client).await, ("m6".to_owned(), 6));
    // mesh's own `since` (a timestamp, say) is no position: ignored, and the reply is
    // mesh's with the position.
    let reply = subscribe(
        &mut client,
        2,
        json!({"channel": "log", "historyLimit": 1, "since": 1_700_000_000_000u64}),
    )
    .await;
    assert_eq!(reply.get("recovered"), None, "{reply}");
    assert_eq!(reply["history"], json!(["m6"]));
    assert_no_message(&b.mesh, &mut client).await;
}

async fn get_channel_history_reads_from_an_offset(backend: Backend) {
    let a = serve(backend.builder().expose_channel("chat", Access::open())).await;
    let b = serve(backend.builder().expose_channel("chat", Access::open())).await;
    for n in 1..=4 {
        write(&b.mesh, "chat", &format!("m{n}"), 10).await;
    }
    let mut client = RawClient::connect(&a.url()).await;
    let epoch = subscribe(&mut client, 1, json!({"channel": "chat"})).await["epoch"].clone();
    let history = |id: u64, since: Value| {
        json!({"id": id, "command": "mesh/get-channel-history",
               "payload": {"channel": "chat", "limit": 1, "since": since}})
    };
    for (id, since, expected) in [
        // A bare offset is one of the current epoch.
        (
            2,
            json!(2),
            json!({"success": true, "history": ["m4", "m3"], "epoch": epoch, "offset": 4,
                   "recovered": true}),
        ),
        (
            3,
            json!({"epoch": epoch, "offset": 3}),
            json!({"success": true, "history": ["m4"], "epoch": epoch, "offset": 4,
                   "recovered": true}),
        ),
        (
            4,
            json!({"epoch": "another", "offset": 3}),
            json!({"success": true, "history": ["m4"], "epoch": epoch, "offset": 4,
                   "recovered": false}),
        ),
        (
            5,
            json!(9),
            json!({"success": true, "history": ["m4"], "epoch": epoch, "offset": 4,
                   "recovered": false}),
        ),
    ] {
        client.send_json(history(id, since.clone())).await;
        let reply = client.reply(id).await["payload"].clone();
        assert_eq!(reply, expected, "since {since}");
    }
    // Any other `since` is mesh's: ignored, and the reply is exactly mesh's.
    for (id, since) in [(6, json!("yesterday")), (7, json!(-1)), (8, json!(1.5))] {
        client.send_json(history(id, since.clone())).await;
        assert_eq!(
            client.reply(id).await["payload"],
            json!({"success": true, "history": ["m4"]}),
            "since {since}"
        );
    }
}

/// A mesh whose connections wait for `gate` to be open before they are accepted: a
/// reconnecting client stays away, deterministically, while the test writes.
fn gated(backend: &Backend, gate: &watch::Sender<bool>) -> tower_mesh::MeshBuilder {
    let open = gate.subscribe();
    backend
        .builder()
        .expose_channel("news", Access::open())
        .on_connect(move |_| {
            let mut open = open.clone();
            async move {
                let _ = open.wait_for(|open| *open).await;
                Ok(())
            }
        })
}

/// Drops the client's connection and waits until it is away.
async fn disconnect(
    client: &tower_mesh::client::MeshClient,
) -> tokio::sync::broadcast::Receiver<ClientEvent> {
    let mut events = client.events();
    client.force_reconnect().await;
    loop {
        if within("the disconnect", events.recv())
            .await
            .expect("events")
            == ClientEvent::Disconnected
        {
            return events;
        }
    }
}

/// The `ChannelRestored` events up to `Reconnected`.
async fn restored(events: &mut tokio::sync::broadcast::Receiver<ClientEvent>) -> Vec<ClientEvent> {
    let mut restored = Vec::new();
    loop {
        match within("the reconnect", events.recv())
            .await
            .expect("events")
        {
            ClientEvent::Reconnected { .. } => return restored,
            event @ ClientEvent::ChannelRestored { .. } => restored.push(event),
            _ => {}
        }
    }
}

async fn the_rust_client_recovers_on_every_reconnect_and_says_when_it_cannot(backend: Backend) {
    let (gate, _) = watch::channel(true);
    let a = serve(gated(&backend, &gate)).await;
    let b = serve(backend.builder().expose_channel("news", Access::open())).await;
    let alice = client(&a.url()).await;
    let (_, mut news) = alice
        .subscribe_channel("news", None)
        .await
        .expect("subscribe");
    write(&b.mesh, "news", "m1", 100).await;
    assert_eq!(recv_within(&mut news).await, "m1");

    // Away while three messages are written through the other instance: they arrive
    // first, in order, and the live ones follow.
    gate.send_replace(false);
    let mut events = disconnect(&alice).await;
    for n in 2..=4 {
        write(&b.mesh, "news", &format!("m{n}"), 100).await;
    }
    gate.send_replace(true);
    assert_eq!(
        restored(&mut events).await,
        [ClientEvent::ChannelRestored {
            channel: "news".to_owned(),
            recovered: true
        }]
    );
    write(&b.mesh, "news", "m5", 100).await;
    for n in 2..=5 {
        assert_eq!(recv_within(&mut news).await, format!("m{n}"));
    }

    // Away while a message is written that the history does not keep: the client says
    // the channel was not recovered (the application reads its state again), and goes
    // on with the live messages.
    gate.send_replace(false);
    let mut events = disconnect(&alice).await;
    write(&b.mesh, "news", "not kept", 0).await;
    write(&b.mesh, "news", "kept", 100).await;
    gate.send_replace(true);
    assert_eq!(
        restored(&mut events).await,
        [ClientEvent::ChannelRestored {
            channel: "news".to_owned(),
            recovered: false
        }]
    );
    write(&b.mesh, "news", "m8", 100).await;
    assert_eq!(recv_within(&mut news).await, "m8");

    // And recovers again from there on the next reconnect.
    gate.send_replace(false);
    let mut events = disconnect(&alice).await;
    write(&b.mesh, "news", "m9", 100).await;
    gate.send_replace(true);
    assert_eq!(
        restored(&mut events).await,
        [ClientEvent::ChannelRestored {
            channel: "news".to_owned(),
            recovered: true
        }]
    );
    assert_eq!(recv_within(&mut news).await, "m9");
    assert!(news.try_recv().is_err(), "nothing more");
}
