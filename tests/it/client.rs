//! The Rust client against a real server.

use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tower_mesh::client::{ClientError, ClientEvent, MeshClient};
use tower_mesh::Mesh;

use crate::common::*;

async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<ClientEvent>,
    wanted: fn(&ClientEvent) -> bool,
) -> ClientEvent {
    loop {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("event in time")
            .expect("events");
        if wanted(&event) {
            return event;
        }
    }
}

#[tokio::test]
async fn commands_replies_and_typed_errors() {
    let builder = Mesh::builder()
        .command("echo", echo)
        .command("slow", || async {
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
    let server = serve(builder).await;
    let client = MeshClient::connect(&server.url()).await.expect("connect");
    assert!(server.mesh.connection(&client.connection_id()).is_some());
    assert_eq!(
        client.command("echo", json!({"a": 1})).await,
        Ok(json!({"a": 1}))
    );
    let sum: Vec<u32> = client
        .command_as("echo", vec![1u32, 2])
        .await
        .expect("typed");
    assert_eq!(sum, vec![1, 2]);
    match client.command("missing", json!({})).await {
        Err(ClientError::Command(failure)) => {
            assert_eq!(failure.code, "ENOTFOUND");
            assert_eq!(failure.name, "CommandError");
            assert_eq!(failure.error, "Command \"missing\" not found");
        }
        other => panic!("{other:?}"),
    }
    let slow = client
        .command_with_timeout("slow", json!({}), Duration::from_millis(100))
        .await;
    assert_eq!(slow, Err(ClientError::Timeout));
    let wrong: Result<String, _> = client.command_as("echo", 5).await;
    assert!(matches!(wrong, Err(ClientError::Decode(_))), "{wrong:?}");
}

#[tokio::test]
async fn pushes_reach_the_stream_and_callbacks() {
    let server = serve(Mesh::builder()).await;
    let client = MeshClient::connect(&server.url()).await.expect("connect");
    let mut pushes = client.pushes();
    let (seen, mut calls) = mpsc::unbounded_channel();
    client.on("hello", move |payload| {
        let _ = seen.send(payload);
    });
    server
        .mesh
        .send(&client.connection_id(), "hello", &json!("world"))
        .await
        .expect("send");
    let push = tokio::time::timeout(WAIT, pushes.recv())
        .await
        .expect("push")
        .expect("stream");
    assert_eq!(
        (push.command.as_str(), push.payload),
        ("hello", json!("world"))
    );
    assert_eq!(
        tokio::time::timeout(WAIT, calls.recv())
            .await
            .expect("callback"),
        Some(json!("world"))
    );
}

#[tokio::test]
async fn answers_pings_and_latency_probes() {
    let server = serve(
        Mesh::builder()
            .ping_interval(Duration::from_millis(30))
            .max_missed_pongs(1)
            .latency_interval(Duration::from_millis(30)),
    )
    .await;
    let client = MeshClient::connect(&server.url()).await.expect("connect");
    let mut events = client.events();
    for _ in 0..5 {
        next_event(&mut events, |e| matches!(e, ClientEvent::Ping)).await;
    }
    next_event(&mut events, |e| matches!(e, ClientEvent::Latency(_))).await;
    // Five pings later the server has not dropped it: the client answered every one.
    assert!(client.is_connected());
    assert_eq!(server.mesh.stats().ping_timeout_closes, 0);
}

#[tokio::test]
async fn reconnects_and_runs_its_hooks() {
    let server = serve(Mesh::builder().command("echo", echo)).await;
    let (hook_ran, mut hooks) = mpsc::unbounded_channel();
    let client = MeshClient::builder(server.url())
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .on_reconnect(move |client: MeshClient| {
            let hook_ran = hook_ran.clone();
            async move {
                // Hooks may send commands: the new connection is served while they run.
                let echoed = client.command("echo", json!("resubscribed")).await;
                let _ = hook_ran.send((client.connection_id(), echoed));
            }
        })
        .connect()
        .await
        .expect("connect");
    let mut events = client.events();
    let first_id = client.connection_id();
    server
        .mesh
        .close_connection(&first_id, "go away")
        .await
        .expect("close");
    next_event(&mut events, |e| matches!(e, ClientEvent::Disconnected)).await;
    let reconnected = next_event(&mut events, |e| {
        matches!(e, ClientEvent::Reconnected { .. })
    })
    .await;
    let (hook_id, echoed) = tokio::time::timeout(WAIT, hooks.recv())
        .await
        .expect("hook")
        .expect("channel");
    assert_eq!(echoed, Ok(json!("resubscribed")));
    assert_ne!(hook_id, first_id);
    assert_eq!(
        reconnected,
        ClientEvent::Reconnected {
            connection_id: hook_id.clone()
        }
    );
    assert_eq!(client.command("echo", json!(2)).await, Ok(json!(2)));
    assert!(server.mesh.connection(&first_id).is_none());
}

#[tokio::test]
async fn close_ends_the_connection_and_refuses_commands() {
    let (gone, mut disconnects) = mpsc::unbounded_channel();
    let server = serve(
        Mesh::builder().on_disconnect(move |connection: tower_mesh::Connection| {
            let _ = gone.send(connection.id().to_owned());
            async {}
        }),
    )
    .await;
    let client = MeshClient::connect(&server.url()).await.expect("connect");
    let id = client.connection_id();
    client.close().await;
    assert_eq!(
        tokio::time::timeout(WAIT, disconnects.recv())
            .await
            .expect("disconnect"),
        Some(id)
    );
    assert_eq!(
        client.command("mesh/noop", json!({})).await,
        Err(ClientError::Closed)
    );
}

#[tokio::test]
async fn a_refused_upgrade_is_a_connect_error() {
    let server = serve_wrapped(Mesh::builder(), |mesh_layer| {
        axum::Router::new()
            .layer(mesh_layer)
            .layer(axum::middleware::from_fn(
                |_request: axum::extract::Request, _next: axum::middleware::Next| async {
                    axum::http::StatusCode::UNAUTHORIZED
                },
            ))
    })
    .await;
    match MeshClient::connect(&server.url()).await {
        Err(ClientError::Connect(reason)) => assert!(reason.contains("401"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
