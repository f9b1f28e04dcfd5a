//! Channels (issue 5): exposure, guards and the reserved prefix, server writes reaching
//! subscribers on every instance, history (newest first, trimmed), unsubscribing, bad
//! input and the subscription limit, on both backends and over real WebSockets. Writers
//! and subscribers sit on different instances of one mesh wherever that applies.
//!
//! "Nothing arrived" is shown without sleeping: after the action, the server broadcasts a
//! marker, which every instance delivers after whatever was published before it; the
//! frames that came before the marker are checked.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tower_mesh::{Access, Connection, Mesh, Regex};

use crate::common::*;

conformance!(
    subscribe_and_unsubscribe_golden_replies,
    unexposed_channels_are_refused,
    reserved_prefix_is_refused_even_when_exposed,
    reserved_prefix_can_be_changed_or_opened,
    guard_allows_and_refuses_with_the_exact_name,
    regex_exposure_passes_the_exact_name_to_its_guard,
    re_exposing_a_name_replaces_its_guard,
    server_writes_reach_subscribers_on_every_instance,
    non_string_messages_are_sent_as_json_text,
    history_is_newest_first_and_limited,
    history_is_trimmed_to_what_the_write_keeps,
    history_zero_keeps_nothing_and_leaves_history_alone,
    get_channel_history_default_and_limit,
    unsubscribe_stops_delivery_on_that_connection_only,
    messages_reach_only_their_channel,
    bad_channel_input_is_einvalid_and_subscribes_nothing,
    channel_subscription_limit_answers_eoverloaded,
    a_message_over_max_channel_message_bytes_is_neither_sent_nor_kept,
    history_keeps_the_newest_messages_that_fit_in_max_history_bytes,
    history_replies_hold_the_newest_messages_that_fit_in_a_frame,
);

// ---------------------------------------------------------------------------------------
// Helpers.

const MESSAGE: &str = "mesh/subscription-message";

/// Subscribes; the reply without its position (tests/it/recovery.rs is about that).
async fn subscribe(client: &mut RawClient, id: u64, channel: &str) -> Value {
    without_position(
        call(
            client,
            id,
            "mesh/subscribe-channel",
            json!({ "channel": channel }),
        )
        .await,
    )
}

async fn subscribe_with_history(client: &mut RawClient, id: u64, channel: &str, n: u64) -> Value {
    without_position(
        call(
            client,
            id,
            "mesh/subscribe-channel",
            json!({ "channel": channel, "historyLimit": n }),
        )
        .await,
    )
}

async fn unsubscribe(client: &mut RawClient, id: u64, channel: &str) -> Value {
    call(
        client,
        id,
        "mesh/unsubscribe-channel",
        json!({ "channel": channel }),
    )
    .await
}

async fn history(client: &mut RawClient, id: u64, payload: Value) -> Value {
    call(client, id, "mesh/get-channel-history", payload).await
}

/// The next channel message's payload, without its offset.
async fn message(client: &mut RawClient) -> Value {
    without_position(client.push_within(MESSAGE).await["payload"].clone())
}

/// Asserts that no channel message came before the marker, for each client.
async fn assert_no_message(mesh: &Mesh, marker: &str, clients: &mut [&mut RawClient]) {
    for frames in frames_before_marker(mesh, marker, clients, Noise::Kept).await {
        assert!(
            pushes_named(&frames, MESSAGE).is_empty(),
            "unexpected channel message: {frames:?}"
        );
    }
}

async fn write(mesh: &Mesh, channel: &str, message: &str, history: usize) {
    mesh.write_channel(channel, message, history)
        .await
        .expect("write_channel");
}

fn strings(items: &[&str]) -> Value {
    json!(items)
}

// ---------------------------------------------------------------------------------------
// Subscribing, exposure and guards.

async fn subscribe_and_unsubscribe_golden_replies(backend: Backend) {
    let server = serve(backend.builder().expose_channel("news", Access::open())).await;
    let mut client = RawClient::connect(&server.url()).await;

    // Exact bytes on the wire: mesh's reply, then tower-mesh's position (the channel's
    // epoch, and offset 0 before its first message).
    client
        .send_text(r#"{"id":1,"command":"mesh/subscribe-channel","payload":{"channel":"news"}}"#)
        .await;
    let reply = within("the subscribe reply", client.next_text()).await;
    let epoch = serde_json::from_str::<Value>(&reply).expect("JSON")["payload"]["epoch"]
        .as_str()
        .expect("an epoch")
        .to_owned();
    assert_eq!(
        reply,
        format!(
            r#"{{"id":1,"command":"mesh/subscribe-channel","payload":{{"success":true,"history":[],"epoch":"{epoch}","offset":0}}}}"#
        )
    );
    // Subscribing again is still a success.
    assert_eq!(
        client
            .command_within(2, "mesh/subscribe-channel", json!({"channel": "news"}))
            .await,
        json!({"id": 2, "command": "mesh/subscribe-channel",
               "payload": {"success": true, "history": [], "epoch": epoch, "offset": 0}})
    );
    assert_eq!(
        client
            .command_within(3, "mesh/unsubscribe-channel", json!({"channel": "news"}))
            .await,
        json!({"id": 3, "command": "mesh/unsubscribe-channel", "payload": true})
    );
    // Only the first unsubscribe finds a subscription; one never made finds none.
    assert_eq!(unsubscribe(&mut client, 4, "news").await, false);
    assert_eq!(unsubscribe(&mut client, 5, "not:subscribed").await, false);
    // Subscribing without historyLimit returns no history even when some is kept.
    write(&server.mesh, "news", "kept", 10).await;
    assert_eq!(
        subscribe(&mut client, 6, "news").await,
        json!({"success": true, "history": []})
    );
    // It was written while the client was not subscribed: it is history, not a push.
    let before =
        frames_before_marker(&server.mesh, "marker", &mut [&mut client], Noise::Kept).await;
    assert!(pushes_named(&before[0], MESSAGE).is_empty(), "{before:?}");
    write(&server.mesh, "news", "live", 10).await;
    assert_eq!(
        message(&mut client).await,
        json!({"channel": "news", "message": "live"})
    );
}

async fn unexposed_channels_are_refused(backend: Backend) {
    let a = serve(backend.builder().expose_channel("news", Access::open())).await;
    let b = serve(backend.builder().expose_channel("news", Access::open())).await;
    let mut client = RawClient::connect(&a.url()).await;

    assert_eq!(
        client
            .command_within(1, "mesh/subscribe-channel", json!({"channel": "secret"}))
            .await,
        json!({"id": 1, "command": "mesh/subscribe-channel",
               "payload": {"success": false, "history": []}})
    );
    // Kept history of an unexposed channel is not readable either.
    write(&b.mesh, "secret", "s1", 10).await;
    assert_eq!(
        subscribe_with_history(&mut client, 2, "secret", 10).await,
        json!({"success": false, "history": []})
    );
    assert_eq!(
        history(&mut client, 3, json!({"channel": "secret"})).await,
        json!({"success": false, "history": []})
    );
    // A refused subscription is no subscription: nothing arrives, nothing to undo.
    write(&b.mesh, "secret", "s2", 10).await;
    assert_no_message(&b.mesh, "marker", &mut [&mut client]).await;
    assert_eq!(unsubscribe(&mut client, 4, "secret").await, false);
    // The history itself is intact for the server.
    assert_eq!(
        a.mesh.channel_history("secret", 10).await.expect("history"),
        vec!["s2".to_owned(), "s1".to_owned()]
    );
}

async fn reserved_prefix_is_refused_even_when_exposed(backend: Backend) {
    // Everything is exposed, "mesh:exact" even by name; the default reserved prefix wins.
    let a = serve(
        backend
            .builder()
            .expose_channel(everything(), Access::open())
            .expose_channel("mesh:exact", Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let mut client = RawClient::connect(&a.url()).await;

    let refused = json!({"success": false, "history": []});
    let mut id = 0;
    for channel in ["mesh:x", "mesh:exact", "mesh:record-updates", "mesh:"] {
        id += 1;
        assert_eq!(
            subscribe_with_history(&mut client, id, channel, 5).await,
            refused,
            "{channel}"
        );
        id += 1;
        assert_eq!(
            history(&mut client, id, json!({"channel": channel})).await,
            refused,
            "{channel}"
        );
        id += 1;
        assert_eq!(
            unsubscribe(&mut client, id, channel).await,
            false,
            "{channel}"
        );
    }
    // The server may still write a reserved name; clients never hear it.
    write(&b.mesh, "mesh:x", "internal", 5).await;
    assert_no_message(&b.mesh, "marker", &mut [&mut client]).await;
    assert_eq!(
        subscribe_with_history(&mut client, 100, "mesh:x", 5).await,
        refused
    );
    // Only the prefix is reserved: similar names are ordinary channels.
    for (n, channel) in ["meshx", "mesh", "Mesh:x", "x:mesh:"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            subscribe(&mut client, 200 + n as u64, channel).await,
            json!({"success": true, "history": []}),
            "{channel}"
        );
    }
}

async fn reserved_prefix_can_be_changed_or_opened(backend: Backend) {
    let open = serve(
        backend
            .builder()
            .reserved_channel_prefix(None)
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let custom = serve(
        backend
            .builder()
            .reserved_channel_prefix(Some("internal:"))
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let mut on_open = RawClient::connect(&open.url()).await;
    let mut on_custom = RawClient::connect(&custom.url()).await;

    // Without a reserved prefix, "mesh:" names are ordinary exposed channels.
    custom
        .mesh
        .write_channel("mesh:x", "old", 5)
        .await
        .expect("write");
    assert_eq!(
        subscribe_with_history(&mut on_open, 1, "mesh:x", 5).await,
        json!({"success": true, "history": ["old"]})
    );
    // With another prefix, that prefix is refused and "mesh:" is open.
    assert_eq!(
        subscribe_with_history(&mut on_custom, 1, "internal:x", 5).await,
        json!({"success": false, "history": []})
    );
    assert_eq!(
        history(&mut on_custom, 2, json!({"channel": "internal:x"})).await,
        json!({"success": false, "history": []})
    );
    assert_eq!(
        subscribe_with_history(&mut on_custom, 3, "mesh:x", 5).await,
        json!({"success": true, "history": ["old"]})
    );
    write(&open.mesh, "mesh:x", "new", 5).await;
    for client in [&mut on_open, &mut on_custom] {
        assert_eq!(
            message(client).await,
            json!({"channel": "mesh:x", "message": "new"})
        );
    }
    write(&open.mesh, "internal:x", "hidden", 5).await;
    assert_no_message(&open.mesh, "marker", &mut [&mut on_custom]).await;
}

/// Records the names a guard was asked about; allows connections with an `x-allowed`
/// header.
fn recording_guard(seen: &Arc<Mutex<Vec<String>>>) -> Access {
    let seen = seen.clone();
    Access::guarded(move |connection: Connection, name: String| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(name);
            connection.headers().contains_key("x-allowed")
        }
    })
}

async fn guard_allows_and_refuses_with_the_exact_name(backend: Backend) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let a = serve(
        backend
            .builder()
            .expose_channel("vip", recording_guard(&seen)),
    )
    .await;
    let b = serve(backend.builder()).await;
    let mut allowed = RawClient::connect_request(ws_request(&a.url(), &[("x-allowed", "1")])).await;
    let mut refused = RawClient::connect(&a.url()).await;

    write(&b.mesh, "vip", "earlier", 5).await;
    assert_eq!(
        subscribe_with_history(&mut allowed, 1, "vip", 5).await,
        json!({"success": true, "history": ["earlier"]})
    );
    assert_eq!(
        subscribe_with_history(&mut refused, 1, "vip", 5).await,
        json!({"success": false, "history": []})
    );
    // The guard also decides who reads the history.
    assert_eq!(
        history(&mut refused, 2, json!({"channel": "vip"})).await,
        json!({"success": false, "history": []})
    );
    assert_eq!(
        history(&mut allowed, 2, json!({"channel": "vip"})).await,
        json!({"success": true, "history": ["earlier"]})
    );
    assert_eq!(*seen.lock().unwrap(), ["vip", "vip", "vip", "vip"]);

    write(&b.mesh, "vip", "live", 5).await;
    assert_eq!(
        message(&mut allowed).await,
        json!({"channel": "vip", "message": "live"})
    );
    assert_no_message(&b.mesh, "marker", &mut [&mut refused]).await;
}

async fn regex_exposure_passes_the_exact_name_to_its_guard(backend: Backend) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = serve(backend.builder().expose_channel(
        Regex::new(r"^test:channel:\d+$").expect("regex"),
        recording_guard(&seen),
    ))
    .await;
    let mut allowed =
        RawClient::connect_request(ws_request(&server.url(), &[("x-allowed", "1")])).await;
    let mut refused = RawClient::connect(&server.url()).await;

    assert_eq!(
        subscribe(&mut allowed, 1, "test:channel:42").await,
        json!({"success": true, "history": []})
    );
    assert_eq!(
        subscribe(&mut refused, 1, "test:channel:7").await,
        json!({"success": false, "history": []})
    );
    // Names the regex does not match are not exposed: the guard is not even asked.
    for (n, channel) in ["test:channel:x", "test:channel:1:2", "other"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            subscribe(&mut allowed, 10 + n as u64, channel).await,
            json!({"success": false, "history": []}),
            "{channel}"
        );
    }
    assert_eq!(*seen.lock().unwrap(), ["test:channel:42", "test:channel:7"]);
    write(&server.mesh, "test:channel:42", "hello", 0).await;
    assert_eq!(
        message(&mut allowed).await,
        json!({"channel": "test:channel:42", "message": "hello"})
    );
}

async fn re_exposing_a_name_replaces_its_guard(backend: Backend) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = serve(
        backend
            .builder()
            .expose_channel("test:channel", Access::open())
            .expose_channel("test:channel", recording_guard(&seen))
            // A regex re-exposed with the same source replaces its access too.
            .expose_channel(Regex::new("^room:").expect("regex"), Access::open())
            .expose_channel(
                Regex::new("^room:").expect("regex"),
                Access::guarded(|_connection: Connection, _name: String| async { false }),
            ),
    )
    .await;
    let mut allowed =
        RawClient::connect_request(ws_request(&server.url(), &[("x-allowed", "1")])).await;
    let mut plain = RawClient::connect(&server.url()).await;

    assert_eq!(
        subscribe(&mut allowed, 1, "test:channel").await["success"],
        true
    );
    assert_eq!(
        subscribe(&mut plain, 1, "test:channel").await,
        json!({"success": false, "history": []})
    );
    assert_eq!(*seen.lock().unwrap(), ["test:channel", "test:channel"]);
    for client in [&mut allowed, &mut plain] {
        assert_eq!(
            subscribe(client, 2, "room:1").await,
            json!({"success": false, "history": []})
        );
    }
}

// ---------------------------------------------------------------------------------------
// Writing and delivery.

async fn server_writes_reach_subscribers_on_every_instance(backend: Backend) {
    let a = serve(backend.builder().expose_channel("news", Access::open())).await;
    let b = serve(backend.builder().expose_channel("news", Access::open())).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut also_on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    let mut outsider_a = RawClient::connect(&a.url()).await;
    let mut outsider_b = RawClient::connect(&b.url()).await;
    for client in [&mut on_a, &mut also_on_a, &mut on_b] {
        assert_eq!(subscribe(client, 1, "news").await["success"], true);
    }

    // Written through B: every subscriber, on A and on B, gets the exact push, with the
    // message's offset (the channel's first).
    write(&b.mesh, "news", "Hello, Redis!", 0).await;
    for client in [&mut on_a, &mut also_on_a, &mut on_b] {
        assert_eq!(
            push_text(client, MESSAGE).await,
            r#"{"command":"mesh/subscription-message","payload":{"channel":"news","message":"Hello, Redis!","offset":1}}"#
        );
    }
    // Written through A: the same, in write order.
    write(&a.mesh, "news", "one", 0).await;
    write(&a.mesh, "news", "two", 0).await;
    for client in [&mut on_a, &mut also_on_a, &mut on_b] {
        assert_eq!(message(client).await["message"], "one");
        assert_eq!(message(client).await["message"], "two");
    }
    // Connections that did not subscribe get nothing, and every subscriber got each
    // message exactly once.
    let before = frames_before_marker(
        &a.mesh,
        "marker",
        &mut [
            &mut on_a,
            &mut also_on_a,
            &mut on_b,
            &mut outsider_a,
            &mut outsider_b,
        ],
        Noise::Kept,
    )
    .await;
    for frames in &before {
        assert!(pushes_named(frames, MESSAGE).is_empty(), "{frames:?}");
    }
}

#[derive(serde::Serialize)]
struct Note {
    text: &'static str,
    n: u32,
}

async fn non_string_messages_are_sent_as_json_text(backend: Backend) {
    let a = serve(backend.builder().expose_channel("data", Access::open())).await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;
    assert_eq!(subscribe(&mut client, 1, "data").await["success"], true);

    let mesh = &b.mesh;
    mesh.write_channel("data", &json!({"text": "hello channel"}), 10)
        .await
        .expect("object");
    mesh.write_channel("data", &5, 10).await.expect("number");
    mesh.write_channel("data", &true, 10).await.expect("bool");
    mesh.write_channel("data", &Value::Null, 10)
        .await
        .expect("null");
    mesh.write_channel("data", &json!([1, "two"]), 10)
        .await
        .expect("array");
    mesh.write_channel("data", &Note { text: "hi", n: 2 }, 10)
        .await
        .expect("struct");
    // A string is sent as it is, even one that looks like JSON.
    mesh.write_channel("data", &json!("5"), 10)
        .await
        .expect("string value");
    mesh.write_channel("data", "{\"a\":1}", 10)
        .await
        .expect("str");
    mesh.write_channel("data", &String::from("plain"), 10)
        .await
        .expect("String");

    let expected = [
        r#"{"text":"hello channel"}"#,
        "5",
        "true",
        "null",
        r#"[1,"two"]"#,
        r#"{"text":"hi","n":2}"#,
        "5",
        r#"{"a":1}"#,
        "plain",
    ];
    for text in expected {
        assert_eq!(
            message(&mut client).await,
            json!({"channel": "data", "message": text})
        );
    }
    // The history keeps the same strings, newest first.
    let mut newest_first: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    newest_first.reverse();
    assert_eq!(
        a.mesh.channel_history("data", 20).await.expect("history"),
        newest_first
    );
    assert_eq!(
        history(&mut client, 2, json!({"channel": "data"})).await,
        json!({"success": true, "history": newest_first})
    );
}

// ---------------------------------------------------------------------------------------
// History.

async fn history_is_newest_first_and_limited(backend: Backend) {
    let a = serve(backend.builder().expose_channel("chat", Access::open())).await;
    let b = serve(backend.builder().expose_channel("chat", Access::open())).await;
    for n in 1..=5 {
        write(&b.mesh, "chat", &format!("Message {n}"), 10).await;
    }
    let mut client = RawClient::connect(&a.url()).await;
    let reply = client
        .command_within(
            1,
            "mesh/subscribe-channel",
            json!({"channel": "chat", "historyLimit": 3}),
        )
        .await;
    // The position is the newest message's, whichever instance wrote it.
    let epoch = reply["payload"]["epoch"].clone();
    assert!(epoch.is_string(), "{reply}");
    assert_eq!(
        reply,
        json!({"id": 1, "command": "mesh/subscribe-channel", "payload": {
            "success": true, "history": ["Message 5", "Message 4", "Message 3"],
            "epoch": epoch, "offset": 5}})
    );
    // Every instance sees the same history.
    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            mesh.channel_history("chat", 10).await.expect("history"),
            [
                "Message 5",
                "Message 4",
                "Message 3",
                "Message 2",
                "Message 1"
            ]
        );
        assert_eq!(
            mesh.channel_history("chat", 2).await.expect("history"),
            ["Message 5", "Message 4"]
        );
        assert_eq!(
            mesh.channel_history("chat", 0).await.expect("history"),
            Vec::<String>::new()
        );
    }
    // A limit above what is kept gives everything; 0 gives nothing but subscribes.
    let mut other = RawClient::connect(&b.url()).await;
    assert_eq!(
        subscribe_with_history(&mut other, 1, "chat", 1000).await["history"],
        strings(&[
            "Message 5",
            "Message 4",
            "Message 3",
            "Message 2",
            "Message 1"
        ])
    );
    let mut third = RawClient::connect(&b.url()).await;
    assert_eq!(
        subscribe_with_history(&mut third, 1, "chat", 0).await,
        json!({"success": true, "history": []})
    );
    // A limit beyond the largest one served is capped, not refused.
    assert_eq!(
        subscribe_with_history(&mut third, 2, "chat", 1 << 40).await["history"]
            .as_array()
            .map(Vec::len),
        Some(5)
    );
    // History is read at subscription time; what comes after arrives live, once each.
    write(&a.mesh, "chat", "Message 6", 10).await;
    for client in [&mut client, &mut other, &mut third] {
        assert_eq!(
            message(client).await,
            json!({"channel": "chat", "message": "Message 6"})
        );
    }
    // A channel nothing was kept for has an empty history.
    assert_eq!(
        a.mesh.channel_history("never", 10).await.expect("history"),
        Vec::<String>::new()
    );
}

async fn history_is_trimmed_to_what_the_write_keeps(backend: Backend) {
    let a = serve(backend.builder().expose_channel("chat", Access::open())).await;
    let b = serve(backend.builder().expose_channel("chat", Access::open())).await;
    for n in 1..=4 {
        write(&b.mesh, "chat", &format!("Message {n}"), 3).await;
    }
    let mut client = RawClient::connect(&a.url()).await;
    let kept = strings(&["Message 4", "Message 3", "Message 2"]);
    assert_eq!(
        subscribe_with_history(&mut client, 1, "chat", 3).await,
        json!({"success": true, "history": kept})
    );
    assert_eq!(
        subscribe_with_history(&mut client, 2, "chat", 10).await["history"],
        kept
    );
    assert_eq!(
        a.mesh.channel_history("chat", 10).await.expect("history"),
        ["Message 4", "Message 3", "Message 2"]
    );
    // Each write keeps at most what it says: a longer one lets history grow again, a
    // shorter one trims it.
    write(&a.mesh, "chat", "Message 5", 5).await;
    assert_eq!(
        b.mesh.channel_history("chat", 10).await.expect("history"),
        ["Message 5", "Message 4", "Message 3", "Message 2"]
    );
    write(&a.mesh, "chat", "Message 6", 1).await;
    assert_eq!(
        b.mesh.channel_history("chat", 10).await.expect("history"),
        ["Message 6"]
    );
}

async fn history_zero_keeps_nothing_and_leaves_history_alone(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;

    write(&b.mesh, "fresh", "not kept", 0).await;
    assert_eq!(
        subscribe_with_history(&mut client, 1, "fresh", 10).await,
        json!({"success": true, "history": []})
    );
    write(&b.mesh, "kept", "a", 2).await;
    write(&b.mesh, "kept", "b", 2).await;
    assert_eq!(
        subscribe_with_history(&mut client, 2, "kept", 10).await,
        json!({"success": true, "history": ["b", "a"]})
    );
    // A history-0 write still reaches subscribers live, but is not kept and trims nothing.
    write(&b.mesh, "kept", "live only", 0).await;
    assert_eq!(
        message(&mut client).await,
        json!({"channel": "kept", "message": "live only"})
    );
    assert_eq!(
        a.mesh.channel_history("kept", 10).await.expect("history"),
        ["b", "a"]
    );
    assert_eq!(
        history(&mut client, 3, json!({"channel": "kept"})).await,
        json!({"success": true, "history": ["b", "a"]})
    );
    assert_eq!(
        history(&mut client, 4, json!({"channel": "fresh"})).await,
        json!({"success": true, "history": []})
    );
}

async fn get_channel_history_default_and_limit(backend: Backend) {
    let a = serve(backend.builder().expose_channel("log", Access::open())).await;
    let b = serve(backend.builder()).await;
    for n in 1..=60 {
        write(&b.mesh, "log", &format!("m{n}"), 100).await;
    }
    let newest = |count: usize| -> Value {
        json!((0..count)
            .map(|i| format!("m{}", 60 - i))
            .collect::<Vec<_>>())
    };
    let mut client = RawClient::connect(&a.url()).await;
    // Without a limit: the newest 50.
    assert_eq!(
        client
            .command_within(1, "mesh/get-channel-history", json!({"channel": "log"}))
            .await,
        json!({"id": 1, "command": "mesh/get-channel-history",
               "payload": {"success": true, "history": newest(50)}})
    );
    assert_eq!(
        history(&mut client, 2, json!({"channel": "log", "limit": 5})).await,
        json!({"success": true, "history": newest(5)})
    );
    assert_eq!(
        history(&mut client, 3, json!({"channel": "log", "limit": 1000})).await,
        json!({"success": true, "history": newest(60)})
    );
    assert_eq!(
        history(&mut client, 4, json!({"channel": "log", "limit": 0})).await,
        json!({"success": true, "history": []})
    );
    // Reading history does not subscribe.
    write(&b.mesh, "log", "after", 100).await;
    let before = frames_before_marker(&b.mesh, "marker", &mut [&mut client], Noise::Kept).await;
    assert!(pushes_named(&before[0], MESSAGE).is_empty(), "{before:?}");
    assert_eq!(unsubscribe(&mut client, 5, "log").await, false);
}

// ---------------------------------------------------------------------------------------
// Unsubscribing and isolation.

async fn unsubscribe_stops_delivery_on_that_connection_only(backend: Backend) {
    let a = serve(backend.builder().expose_channel("news", Access::open())).await;
    let b = serve(backend.builder().expose_channel("news", Access::open())).await;
    let mut leaver = RawClient::connect(&a.url()).await;
    let mut stayer = RawClient::connect(&a.url()).await;
    for client in [&mut leaver, &mut stayer] {
        assert_eq!(subscribe(client, 1, "news").await["success"], true);
    }
    write(&b.mesh, "news", "first", 0).await;
    for client in [&mut leaver, &mut stayer] {
        assert_eq!(message(client).await["message"], "first");
    }

    assert_eq!(unsubscribe(&mut leaver, 2, "news").await, true);
    assert_eq!(unsubscribe(&mut leaver, 3, "news").await, false);
    // Another local subscriber keeps the instance listening.
    write(&b.mesh, "news", "second", 0).await;
    assert_eq!(message(&mut stayer).await["message"], "second");
    let before = frames_before_marker(&b.mesh, "marker-1", &mut [&mut leaver], Noise::Kept).await;
    assert!(pushes_named(&before[0], MESSAGE).is_empty(), "{before:?}");

    // The last local subscriber leaves: nothing reaches that instance's connections.
    assert_eq!(unsubscribe(&mut stayer, 2, "news").await, true);
    write(&b.mesh, "news", "third", 0).await;
    assert_no_message(&b.mesh, "marker-2", &mut [&mut leaver, &mut stayer]).await;

    // Subscribing again works again.
    assert_eq!(subscribe(&mut leaver, 4, "news").await["success"], true);
    write(&b.mesh, "news", "fourth", 0).await;
    assert_eq!(
        message(&mut leaver).await,
        json!({"channel": "news", "message": "fourth"})
    );
    assert_no_message(&b.mesh, "marker-3", &mut [&mut stayer]).await;
}

async fn messages_reach_only_their_channel(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let mut one = RawClient::connect(&a.url()).await;
    let mut two = RawClient::connect(&b.url()).await;
    assert_eq!(subscribe(&mut one, 1, "channel:1").await["success"], true);
    assert_eq!(subscribe(&mut two, 1, "channel:2").await["success"], true);

    write(&a.mesh, "channel:1", "for one", 0).await;
    assert_eq!(
        message(&mut one).await,
        json!({"channel": "channel:1", "message": "for one"})
    );
    write(&b.mesh, "channel:2", "for two", 0).await;
    assert_eq!(
        message(&mut two).await,
        json!({"channel": "channel:2", "message": "for two"})
    );
    // Prefixes of each other are different channels.
    write(&a.mesh, "channel:10", "for nobody", 0).await;
    write(&a.mesh, "channel", "for nobody", 0).await;
    let before =
        frames_before_marker(&a.mesh, "marker", &mut [&mut one, &mut two], Noise::Kept).await;
    for frames in &before {
        assert!(pushes_named(frames, MESSAGE).is_empty(), "{frames:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Bad input and limits.

async fn bad_channel_input_is_einvalid_and_subscribes_nothing(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .expose_channel(everything(), Access::open()),
    )
    .await;
    let mut client = RawClient::connect(&a.url()).await;
    let too_long = "x".repeat(tower_mesh::MAX_NAME_BYTES + 1);
    let bad_names = [
        json!({}),
        json!({"channel": null}),
        json!({"channel": 5}),
        json!({"channel": ["news"]}),
        json!({"channel": {"name": "news"}}),
        json!({"channel": ""}),
        json!({"channel": too_long}),
        json!({"name": "news"}),
        json!("news"),
        json!(null),
    ];
    let mut id = 0;
    let expect_invalid = |reply: Value, command: &str, payload: &Value| {
        assert_eq!(reply["command"], command, "{reply}");
        assert_eq!(
            reply["payload"]["code"], "EINVALID",
            "{command} {payload}: {reply}"
        );
        assert_eq!(reply["payload"]["name"], "CommandError", "{reply}");
        assert!(reply["payload"]["error"].is_string(), "{reply}");
    };
    for command in [
        "mesh/subscribe-channel",
        "mesh/unsubscribe-channel",
        "mesh/get-channel-history",
    ] {
        for payload in &bad_names {
            id += 1;
            let reply = client.command_within(id, command, payload.clone()).await;
            assert_eq!(reply["id"], id);
            expect_invalid(reply, command, payload);
        }
    }
    // Bad limits, on a good name.
    let bad_limits = [
        (
            "mesh/subscribe-channel",
            json!({"channel": "news", "historyLimit": -1}),
        ),
        (
            "mesh/subscribe-channel",
            json!({"channel": "news", "historyLimit": 1.5}),
        ),
        (
            "mesh/subscribe-channel",
            json!({"channel": "news", "historyLimit": "3"}),
        ),
        (
            "mesh/get-channel-history",
            json!({"channel": "news", "limit": -1}),
        ),
        (
            "mesh/get-channel-history",
            json!({"channel": "news", "limit": "all"}),
        ),
    ];
    for (command, payload) in &bad_limits {
        id += 1;
        let reply = client.command_within(id, command, payload.clone()).await;
        expect_invalid(reply, command, payload);
    }
    // None of that subscribed the client to anything.
    a.mesh
        .write_channel("news", "after", 0)
        .await
        .expect("write");
    assert_no_message(&a.mesh, "marker", &mut [&mut client]).await;
    assert_eq!(unsubscribe(&mut client, 900, "news").await, false);
    // The connection keeps working, and a name of exactly the limit is fine.
    let longest = "z".repeat(tower_mesh::MAX_NAME_BYTES);
    assert_eq!(
        subscribe(&mut client, 901, &longest).await,
        json!({"success": true, "history": []})
    );
    a.mesh
        .write_channel(&longest, "long", 0)
        .await
        .expect("write");
    assert_eq!(message(&mut client).await["message"], "long");
}

async fn channel_subscription_limit_answers_eoverloaded(backend: Backend) {
    let a = serve(
        backend
            .builder()
            .max_subscriptions_per_connection(2)
            .expose_channel(everything(), Access::open())
            .expose_record(everything(), Access::open()),
    )
    .await;
    let b = serve(backend.builder()).await;
    let mut client = RawClient::connect(&a.url()).await;
    let mut other = RawClient::connect(&a.url()).await;
    assert_eq!(subscribe(&mut client, 1, "c1").await["success"], true);
    assert_eq!(subscribe(&mut client, 2, "c2").await["success"], true);
    let refused = client
        .command_within(3, "mesh/subscribe-channel", json!({"channel": "c3"}))
        .await;
    assert_eq!(refused["payload"]["code"], "EOVERLOADED", "{refused}");
    assert_eq!(refused["payload"]["name"], "CommandError", "{refused}");
    // Records count towards the same limit.
    let refused = client
        .command_within(4, "mesh/subscribe-record", json!({"recordId": "r1"}))
        .await;
    assert_eq!(refused["payload"]["code"], "EOVERLOADED", "{refused}");
    // The refused subscription stored nothing.
    write(&b.mesh, "c3", "not for client", 0).await;
    assert_no_message(&b.mesh, "marker-1", &mut [&mut client]).await;
    // Subscribing to one it holds is not one more.
    assert_eq!(subscribe(&mut client, 5, "c1").await["success"], true);
    // Unsubscribing frees a slot.
    assert_eq!(unsubscribe(&mut client, 6, "c2").await, true);
    assert_eq!(subscribe(&mut client, 7, "c3").await["success"], true);
    write(&b.mesh, "c3", "now for client", 0).await;
    assert_eq!(
        message(&mut client).await,
        json!({"channel": "c3", "message": "now for client"})
    );
    // The limit is per connection.
    for (n, channel) in ["c1", "c2"].into_iter().enumerate() {
        assert_eq!(
            subscribe(&mut other, n as u64 + 1, channel).await["success"],
            true
        );
    }
    assert_eq!(call(&mut client, 8, "mesh/noop", json!({})).await, true);
}

// ---------------------------------------------------------------------------------------
// Byte limits (issue 12 §1).

/// A message of exactly `bytes` bytes that starts with `tag` (so its place is visible).
fn message_of_size(tag: &str, bytes: usize) -> String {
    format!("{tag}:{}", "x".repeat(bytes - tag.len() - 1))
}

async fn a_message_over_max_channel_message_bytes_is_neither_sent_nor_kept(backend: Backend) {
    const LIMIT: usize = 100;
    let a = serve(
        backend
            .builder()
            .max_channel_message_bytes(LIMIT)
            .expose_channel("chat", Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .max_channel_message_bytes(LIMIT)
            .expose_channel("chat", Access::open()),
    )
    .await;
    let mut subscriber = RawClient::connect(&b.url()).await;
    subscribe(&mut subscriber, 1, "chat").await;

    // Exactly the limit is sent and kept.
    let at_limit = message_of_size("first", LIMIT);
    write(&a.mesh, "chat", &at_limit, 10).await;
    assert_eq!(
        message(&mut subscriber).await,
        json!({"channel": "chat", "message": at_limit})
    );

    // One byte more is refused, however it is given: a string, a string whose characters
    // are fewer than its bytes, a value whose JSON text is over the limit.
    let over = message_of_size("over", LIMIT + 1);
    assert_too_large(
        a.mesh.write_channel("chat", &over, 10).await,
        "max_channel_message_bytes",
        LIMIT,
        LIMIT + 1,
    );
    let accented = "é".repeat(LIMIT / 2 + 1);
    assert!(accented.chars().count() <= LIMIT);
    assert_too_large(
        a.mesh.write_channel("chat", &accented, 10).await,
        "max_channel_message_bytes",
        LIMIT,
        accented.len(),
    );
    let value = object_of_size("pad", LIMIT + 1);
    assert_too_large(
        a.mesh.write_channel("chat", &value, 10).await,
        "max_channel_message_bytes",
        LIMIT,
        LIMIT + 1,
    );
    // Nothing was sent, and nothing kept, on any instance.
    assert_no_message(&a.mesh, "marker", &mut [&mut subscriber]).await;
    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            mesh.channel_history("chat", 10).await.expect("history"),
            [at_limit.as_str()]
        );
    }
    assert_eq!(
        history(&mut subscriber, 2, json!({"channel": "chat"})).await,
        json!({"success": true, "history": [at_limit]})
    );
}

async fn history_keeps_the_newest_messages_that_fit_in_max_history_bytes(backend: Backend) {
    const BYTES: usize = 100;
    const SIZE: usize = 30;
    let a = serve(
        backend
            .builder()
            .max_history_bytes(BYTES)
            .expose_channel("log", Access::open()),
    )
    .await;
    let b = serve(
        backend
            .builder()
            .max_history_bytes(BYTES)
            .expose_channel("log", Access::open()),
    )
    .await;
    let m = |n: u32| message_of_size(&format!("m{n}"), SIZE);
    for n in 1..=6 {
        write(&a.mesh, "log", &m(n), 10).await;
    }
    // Three messages are 90 bytes, a fourth would make 120: the three newest stay.
    let newest_three = [m(6), m(5), m(4)];
    for mesh in [&a.mesh, &b.mesh] {
        assert_eq!(
            mesh.channel_history("log", 10).await.expect("history"),
            newest_three
        );
    }
    let mut client = RawClient::connect(&b.url()).await;
    assert_eq!(
        subscribe_with_history(&mut client, 1, "log", 10).await,
        json!({"success": true, "history": newest_three})
    );
    assert_eq!(
        history(&mut client, 2, json!({"channel": "log", "limit": 10})).await,
        json!({"success": true, "history": newest_three})
    );

    // The count a write asks for still applies, and what it drops no longer counts: after
    // keeping two (60 bytes), two more messages fit again before the oldest goes.
    write(&b.mesh, "log", &m(7), 2).await;
    assert_eq!(
        a.mesh.channel_history("log", 10).await.expect("history"),
        [m(7), m(6)]
    );
    write(&b.mesh, "log", &m(8), 10).await;
    assert_eq!(
        a.mesh.channel_history("log", 10).await.expect("history"),
        [m(8), m(7), m(6)]
    );
    write(&a.mesh, "log", &m(9), 10).await;
    assert_eq!(
        b.mesh.channel_history("log", 10).await.expect("history"),
        [m(9), m(8), m(7)]
    );

    // A message larger than the whole budget is sent, but nothing can be kept beside it,
    // not even itself; the next message is counted from nothing.
    let huge = message_of_size("huge", BYTES + 1);
    write(&a.mesh, "log", &huge, 10).await;
    for sent in [m(7), m(8), m(9), huge] {
        assert_eq!(
            message(&mut client).await,
            json!({"channel": "log", "message": sent})
        );
    }
    assert_eq!(
        b.mesh.channel_history("log", 10).await.expect("history"),
        Vec::<String>::new()
    );
    for n in 10..=13 {
        write(&b.mesh, "log", &m(n), 10).await;
    }
    assert_eq!(
        a.mesh.channel_history("log", 10).await.expect("history"),
        [m(13), m(12), m(11)]
    );
}

async fn history_replies_hold_the_newest_messages_that_fit_in_a_frame(backend: Backend) {
    const FRAME: usize = 4096;
    const SIZE: usize = 900;
    let a = serve(
        backend
            .builder()
            .max_frame_size(FRAME)
            .expose_channel("big", Access::open()),
    )
    .await;
    let b = serve(backend.builder().max_frame_size(FRAME)).await;
    let m = |n: u32| message_of_size(&format!("m{n}"), SIZE);
    for n in 1..=5 {
        write(&b.mesh, "big", &m(n), 10).await;
    }
    let mut client = RawClient::connect(&a.url()).await;

    // Three messages fit in the reply (with its envelope) within a frame; four would not.
    let newest_that_fit = json!([m(5), m(4), m(3)]);
    let truncated = json!({"success": true, "history": newest_that_fit, "truncated": true});
    for (id, command, payload) in [
        (
            1,
            "mesh/get-channel-history",
            json!({"channel": "big", "limit": 10}),
        ),
        (2, "mesh/get-channel-history", json!({"channel": "big"})),
        (
            3,
            "mesh/subscribe-channel",
            json!({"channel": "big", "historyLimit": 10}),
        ),
    ] {
        client
            .send_json(json!({"id": id, "command": command, "payload": payload}))
            .await;
        let text = reply_text(&mut client, id).await;
        assert!(text.len() <= FRAME, "{} bytes: {text}", text.len());
        let mut reply: Value = serde_json::from_str(&text).expect("JSON");
        reply["payload"] = without_position(reply["payload"].take());
        assert_eq!(
            reply,
            json!({"id": id, "command": command, "payload": truncated}),
            "{command} {payload}"
        );
    }
    // Everything is still kept: only the replies hold less.
    assert_eq!(
        a.mesh.channel_history("big", 10).await.expect("history"),
        [m(5), m(4), m(3), m(2), m(1)]
    );
    // A reply that holds everything asked for has no `truncated` field at all.
    assert_eq!(
        history(&mut client, 4, json!({"channel": "big", "limit": 3})).await,
        json!({"success": true, "history": newest_that_fit})
    );
    assert_eq!(
        subscribe_with_history(&mut client, 5, "big", 2).await,
        json!({"success": true, "history": [m(5), m(4)]})
    );
    // The subscription made with a truncated reply is live.
    write(&b.mesh, "big", "after", 10).await;
    assert_eq!(
        message(&mut client).await,
        json!({"channel": "big", "message": "after"})
    );
}
