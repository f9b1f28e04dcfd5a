//! The conformance suite: every test runs on the in-memory backend and on Redis, and the
//! multi-instance tests put clients on different instances of one mesh.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_mesh::extract::{Connection, Payload};
use tower_mesh::{CommandError, MergeStrategy, MeshBuilder};

use crate::common::*;

conformance!(
    golden_frames,
    error_replies,
    bad_input_keeps_the_connection_and_its_neighbours,
    connection_metadata_strategies,
    other_connections_metadata_is_private_by_default,
    other_connections_metadata_when_opened,
    server_pushes_reach_the_right_connections,
    metadata_does_not_break_routing,
    close_connection_on_another_instance,
    all_connection_metadata_in_order,
    on_connect_and_on_disconnect,
    on_connect_refusal,
    missed_pongs_close_the_connection,
    answered_pings_keep_the_connection,
    latency_round_trip,
);

fn with_commands(builder: MeshBuilder) -> MeshBuilder {
    builder
        .command("echo", echo)
        .command("nothing", || async {})
        .command("fail", || async {
            Err::<Value, _>(std::io::Error::other("This is a test error"))
        })
        .command("fail-coded", || async {
            Err::<Value, _>(CommandError::new("EMINE", "mine"))
        })
        .command(
            "typed",
            |Payload(n): Payload<u32>| async move { json!(n + 1) },
        )
}

async fn golden_frames(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert!(!client.id.is_empty());
    assert_eq!(
        client
            .command(65300001, "echo", json!({"a": [1, "x"]}))
            .await,
        json!({"id": 65300001, "command": "echo", "payload": {"a": [1, "x"]}})
    );
    assert_eq!(
        client.command(2, "mesh/noop", json!({})).await,
        json!({"id": 2, "command": "mesh/noop", "payload": true})
    );
    client
        .send_text(r#"{"id":3,"command":"nothing","payload":{}}"#)
        .await;
    let raw = client.next_text().await;
    assert_eq!(raw, r#"{"id":3,"command":"nothing","payload":null}"#);
}

async fn error_replies(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(65320003, "no-such", json!({})).await,
        json!({"id": 65320003, "command": "no-such", "payload": {
            "error": "Command \"no-such\" not found", "code": "ENOTFOUND", "name": "CommandError"}})
    );
    for name in ["toString", "__proto__", "constructor"] {
        let reply = client.command(4, name, json!({})).await;
        assert_eq!(reply["payload"]["code"], "ENOTFOUND", "{name}");
    }
    assert_eq!(
        client.command(5, "fail", json!({})).await["payload"],
        json!({"error": "This is a test error", "code": "ESERVER", "name": "Error"})
    );
    assert_eq!(
        client.command(6, "fail-coded", json!({})).await["payload"],
        json!({"error": "mine", "code": "EMINE", "name": "Error"})
    );
    let wrong_type = client.command(7, "typed", json!("seven")).await;
    assert_eq!(wrong_type["payload"]["code"], "EINVALID");
    let message = wrong_type["payload"]["error"].as_str().unwrap_or_default();
    assert!(message.contains("invalid type"), "{message}");
    assert_eq!(client.command(8, "typed", json!(7)).await["payload"], 8);
}

async fn bad_input_keeps_the_connection_and_its_neighbours(backend: Backend) {
    let server = serve(with_commands(backend.builder())).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut neighbour = RawClient::connect(&server.url()).await;
    // Frames without a usable id are dropped without a reply: the next frame the client
    // sees is the reply to the echo sent right after.
    for dropped in [
        "{not json",
        "[1,2,3]",
        "42",
        r#""a string""#,
        r#"{"command":"echo","payload":{}}"#,
        r#"{"id":"7","command":"echo","payload":{}}"#,
        r#"{"id":-1,"command":"echo","payload":{}}"#,
    ] {
        client.send_text(dropped).await;
        let reply = client.command(100, "echo", json!(dropped)).await;
        assert_eq!(reply["payload"], dropped, "after {dropped}");
    }
    // Frames with an id but no usable command or payload get an EINVALID reply.
    for (frame, command) in [
        (r#"{"id":11,"payload":{}}"#, Value::Null),
        (r#"{"id":11,"command":5,"payload":{}}"#, json!(5)),
        (r#"{"id":11,"command":"echo"}"#, json!("echo")),
    ] {
        client.send_text(frame).await;
        let reply = client.reply(11).await;
        assert_eq!(reply["command"], command, "{frame}");
        assert_eq!(reply["payload"]["code"], "EINVALID", "{frame}");
    }
    // Binary frames are read as UTF-8 text. (Invalid UTF-8, in a binary frame as in a text
    // frame, closes the connection with 1007: see bad_input.rs.)
    client
        .send_binary(br#"{"id":12,"command":"echo","payload":"bin"}"#.to_vec())
        .await;
    assert_eq!(client.reply(12).await["payload"], "bin");
    assert_eq!(
        client.command(13, "echo", json!("ok")).await["payload"],
        "ok"
    );
    // The neighbour saw nothing but its own traffic.
    assert_eq!(
        neighbour.command(1, "echo", json!("n")).await,
        json!({"id":1,"command":"echo","payload":"n"})
    );
}

async fn connection_metadata_strategies(backend: Backend) {
    let server = serve(backend.builder()).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut id = 0;
    let mut set = |metadata: Value, strategy: Option<&str>| {
        id += 1;
        let mut payload = json!({ "metadata": metadata });
        if let Some(strategy) = strategy {
            payload["options"] = json!({ "strategy": strategy });
        }
        (id, payload)
    };
    async fn call(client: &mut RawClient, (id, payload): (u64, Value)) -> Value {
        client
            .command(id, "mesh/set-my-connection-metadata", payload)
            .await["payload"]
            .clone()
    }
    async fn mine(client: &mut RawClient) -> Value {
        client
            .command(999, "mesh/get-my-connection-metadata", json!({}))
            .await["payload"]["metadata"]
            .clone()
    }
    assert_eq!(mine(&mut client).await, Value::Null);
    let first =
        json!({"name": "a", "preferences": {"theme": "dark", "notifications": {"email": true}}});
    assert_eq!(
        call(&mut client, set(first.clone(), None)).await,
        json!({"success": true})
    );
    assert_eq!(mine(&mut client).await, first);
    call(
        &mut client,
        set(
            json!({"preferences": {"notifications": {"push": false}}}),
            Some("deepMerge"),
        ),
    )
    .await;
    assert_eq!(
        mine(&mut client).await,
        json!({"name": "a", "preferences": {"theme": "dark", "notifications": {"email": true, "push": false}}})
    );
    call(
        &mut client,
        set(json!({"preferences": {"theme": "light"}}), Some("merge")),
    )
    .await;
    assert_eq!(
        mine(&mut client).await,
        json!({"name": "a", "preferences": {"theme": "light"}})
    );
    call(&mut client, set(json!({"replaced": true}), Some("replace"))).await;
    assert_eq!(mine(&mut client).await, json!({"replaced": true}));
    call(&mut client, set(json!("initial-string"), None)).await;
    call(&mut client, set(json!({"a": 1}), Some("merge"))).await;
    assert_eq!(mine(&mut client).await, json!({"a": 1}));
    call(&mut client, set(json!({}), None)).await;
    assert_eq!(mine(&mut client).await, json!({}));
    call(&mut client, set(Value::Null, None)).await;
    assert_eq!(mine(&mut client).await, Value::Null);
    // An unknown strategy or a missing metadata field is an EINVALID reply, nothing stored.
    let bad = client
        .command(
            50,
            "mesh/set-my-connection-metadata",
            json!({"metadata": 1, "options": {"strategy": "nope"}}),
        )
        .await;
    assert_eq!(bad["payload"]["code"], "EINVALID");
    let bad = client
        .command(51, "mesh/set-my-connection-metadata", json!({}))
        .await;
    assert_eq!(bad["payload"]["code"], "EINVALID");
    assert_eq!(mine(&mut client).await, Value::Null);
    // The server side sees the same value.
    server
        .mesh
        .set_connection_metadata(&client.id, json!({"by": "server"}), MergeStrategy::Replace)
        .await
        .expect("set");
    assert_eq!(mine(&mut client).await, json!({"by": "server"}));
}

async fn other_connections_metadata_is_private_by_default(backend: Backend) {
    let server = serve(backend.builder()).await;
    let mut a = RawClient::connect(&server.url()).await;
    let mut b = RawClient::connect(&server.url()).await;
    b.command(
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"secret": 1}}),
    )
    .await;
    let other = a
        .command(
            2,
            "mesh/get-connection-metadata",
            json!({"connectionId": b.id}),
        )
        .await;
    assert_eq!(other["payload"], json!({"metadata": null}));
    let own = b
        .command(
            3,
            "mesh/get-connection-metadata",
            json!({"connectionId": b.id}),
        )
        .await;
    assert_eq!(own["payload"], json!({"metadata": {"secret": 1}}));
    let missing = a
        .command(4, "mesh/get-connection-metadata", json!({}))
        .await;
    assert_eq!(missing["payload"]["code"], "EINVALID");
}

async fn other_connections_metadata_when_opened(backend: Backend) {
    // Two instances: the reader is on A, the connection it reads is held by B.
    let a = serve(backend.builder().open_connection_metadata(true)).await;
    let b = serve(backend.builder().open_connection_metadata(true)).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    on_b.command(
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"n": 1}}),
    )
    .await;
    let read = on_a
        .command(
            2,
            "mesh/get-connection-metadata",
            json!({"connectionId": on_b.id}),
        )
        .await;
    assert_eq!(read["payload"], json!({"metadata": {"n": 1}}));
    let unknown = on_a
        .command(
            3,
            "mesh/get-connection-metadata",
            json!({"connectionId": "nobody"}),
        )
        .await;
    assert_eq!(unknown["payload"], json!({"metadata": null}));
}

async fn server_pushes_reach_the_right_connections(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    let mut also_b = RawClient::connect(&b.url()).await;
    let local: Vec<String> = b
        .mesh
        .connections()
        .iter()
        .map(|c| c.id().to_owned())
        .collect();
    assert!(local.contains(&on_b.id) && local.contains(&also_b.id) && !local.contains(&on_a.id));

    a.mesh
        .send(&on_b.id, "hello", &json!({"to": "b"}))
        .await
        .expect("send");
    assert_eq!(
        on_b.next().await,
        json!({"command": "hello", "payload": {"to": "b"}})
    );
    a.mesh
        .broadcast("everyone", &json!([1, 2]))
        .await
        .expect("broadcast");
    for client in [&mut on_a, &mut on_b, &mut also_b] {
        assert_eq!(client.push("everyone").await["payload"], json!([1, 2]));
    }
    // `also_b` got the broadcast and nothing addressed to `on_b`: its next frame is its
    // own echo... of mesh/noop.
    assert_eq!(
        also_b.command(1, "mesh/noop", json!({})).await["payload"],
        true
    );
    // A push to a connection that does not exist goes nowhere, without error.
    a.mesh
        .send("nobody", "lost", &json!(0))
        .await
        .expect("send to nobody");
}

async fn metadata_does_not_break_routing(backend: Backend) {
    // mesh's reference loses pushes to a connection once its metadata is set (docs/protocol.md §6).
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    on_b.command(
        1,
        "mesh/set-my-connection-metadata",
        json!({"metadata": {"user": "x"}}),
    )
    .await;
    b.mesh
        .set_connection_metadata(&on_b.id, json!({"more": true}), MergeStrategy::Merge)
        .await
        .expect("set");
    a.mesh
        .send(&on_b.id, "still-routed", &json!(1))
        .await
        .expect("send");
    assert_eq!(on_b.push("still-routed").await["payload"], 1);
    assert_eq!(
        a.mesh.connection_metadata(&on_b.id).await.expect("read"),
        Some(json!({"user": "x", "more": true}))
    );
}

async fn close_connection_on_another_instance(backend: Backend) {
    let a = serve(backend.builder()).await;
    let b = serve(backend.builder()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    a.mesh
        .close_connection(&on_b.id, "bye")
        .await
        .expect("close");
    assert_eq!(on_b.closed().await, (1000, "bye".to_owned()));
}

async fn all_connection_metadata_in_order(backend: Backend) {
    let server = serve(backend.builder()).await;
    assert_eq!(
        server.mesh.all_connection_metadata().await.expect("all"),
        vec![]
    );
    let first = RawClient::connect(&server.url()).await;
    let second = RawClient::connect(&server.url()).await;
    server
        .mesh
        .set_connection_metadata(&second.id, json!({"n": 2}), MergeStrategy::Replace)
        .await
        .expect("set");
    assert_eq!(
        server.mesh.all_connection_metadata().await.expect("all"),
        vec![
            (first.id.clone(), Value::Null),
            (second.id.clone(), json!({"n": 2}))
        ]
    );
}

async fn on_connect_and_on_disconnect(backend: Backend) {
    let (disconnected, mut disconnects) = mpsc::unbounded_channel();
    let builder = backend
        .builder()
        .on_connect(|connection: Connection| async move {
            let agent = connection
                .headers()
                .get("x-agent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            connection
                .set_metadata(
                    json!({"agent": agent, "query": connection.uri().query()}),
                    MergeStrategy::Replace,
                )
                .await?;
            connection.send("welcome", &json!("hi")).ok();
            Ok(())
        })
        .on_disconnect(move |connection: Connection| {
            let disconnected = disconnected.clone();
            async move {
                let metadata = connection.metadata().await.ok().flatten();
                let _ = disconnected.send((
                    connection.id().to_owned(),
                    connection.is_closed(),
                    metadata,
                ));
            }
        });
    let server = serve(builder).await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            server.ws_url("/?room=7"),
        )
        .expect("request");
    request
        .headers_mut()
        .insert("x-agent", "tests".parse().expect("header"));
    let mut client = RawClient::connect_request(request).await;
    // The hook's push follows mesh/assign-id.
    assert_eq!(
        client.next().await,
        json!({"command": "welcome", "payload": "hi"})
    );
    let mine = client
        .command(1, "mesh/get-my-connection-metadata", json!({}))
        .await;
    assert_eq!(
        mine["payload"],
        json!({"metadata": {"agent": "tests", "query": "room=7"}})
    );
    let id = client.id.clone();
    client.close().await;
    let (gone, closed, metadata) = tokio::time::timeout(WAIT, disconnects.recv())
        .await
        .expect("on_disconnect ran")
        .expect("channel");
    assert_eq!((gone, closed), (id, true));
    assert_eq!(metadata, Some(json!({"agent": "tests", "query": "room=7"})));
    // Exactly once.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), disconnects.recv())
            .await
            .is_err()
    );
    assert!(server.mesh.connections().is_empty());
}

async fn on_connect_refusal(backend: Backend) {
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = ran.clone();
    let builder = backend
        .builder()
        .on_connect(|_connection: Connection| async { Err(CommandError::forbidden("nope")) })
        .on_disconnect(move |_connection: Connection| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {}
        });
    let server = serve(builder).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .expect("upgrade");
    // The very first frame is the close: no id was ever assigned.
    let (code, reason) = first_close(&mut socket).await;
    assert_eq!((code, reason.as_str()), (1008, "nope"));
    assert!(server.mesh.connections().is_empty());
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
}

async fn missed_pongs_close_the_connection(backend: Backend) {
    let (disconnected, mut disconnects) = mpsc::unbounded_channel();
    let builder = backend
        .builder()
        .ping_interval(Duration::from_millis(50))
        .max_missed_pongs(1)
        .on_disconnect(move |connection: Connection| {
            let _ = disconnected.send(connection.id().to_owned());
            async {}
        });
    let server = serve(builder).await;
    let mut silent = RawClient::connect(&server.url()).await;
    // The client reads (and so sees pings) but never answers them.
    assert_eq!(
        silent.push("ping").await,
        json!({"command": "ping", "payload": {}})
    );
    let (code, reason) = silent.closed().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("ping"), "{reason}");
    let gone = tokio::time::timeout(WAIT, disconnects.recv())
        .await
        .expect("on_disconnect")
        .expect("channel");
    assert_eq!(gone, silent.id);
    assert_eq!(server.mesh.stats().ping_timeout_closes, 1);
}

async fn answered_pings_keep_the_connection(backend: Backend) {
    let server = serve(
        with_commands(backend.builder())
            .ping_interval(Duration::from_millis(50))
            .max_missed_pongs(1),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    for n in 0..6u64 {
        client.push("ping").await;
        client
            .send_json(json!({"id": 1000 + n, "command": "pong", "payload": {}}))
            .await;
    }
    // Pongs get no reply: the next frame with an id is the echo's.
    let reply = client.command(7, "echo", json!("alive")).await;
    assert_eq!(reply["payload"], "alive");
    assert_eq!(server.mesh.stats().ping_timeout_closes, 0);
}

async fn latency_round_trip(backend: Backend) {
    let server = serve(
        backend
            .builder()
            .latency_interval(Duration::from_millis(50)),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.push("latency:request").await,
        json!({"command": "latency:request", "payload": {}})
    );
    client
        .send_json(json!({"id": 1, "command": "latency:response", "payload": {}}))
        .await;
    let report = client.push("latency").await;
    assert!(report["payload"].is_u64(), "{report}");
    let connection = server
        .mesh
        .connection(&client.id)
        .expect("local connection");
    assert!(connection.latency().is_some());
}
