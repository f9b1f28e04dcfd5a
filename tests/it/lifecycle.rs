//! A connection's life: `on_connect` (sees the request, sets metadata, may refuse),
//! liveness (ping/pong), `on_disconnect` exactly once whatever ended the connection, and
//! graceful shutdown, on every backend. Hook calls are awaited through channels. The
//! interop example's binary is run too: its SIGTERM shutdown, and its handling of sockets
//! that never finish a request and of running out of file descriptors.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tower_mesh::extract::Connection;
use tower_mesh::{CommandError, MergeStrategy, MeshBuilder};

use crate::common::*;

conformance!(
    on_connect_sees_the_request_and_sets_metadata,
    on_connect_refusal_closes_before_assign_id,
    on_disconnect_once_after_client_close,
    on_disconnect_once_after_network_drop,
    on_disconnect_once_after_server_close,
    missed_pongs_close_only_the_silent_client,
    shutdown_closes_everyone_and_refuses_new_upgrades,
    axum_graceful_shutdown_runs_mesh_shutdown,
    commands_sent_early_wait_for_on_connect,
    on_connect_panic_refuses_the_connection,
    on_disconnect_panic_does_not_break_the_mesh,
    on_disconnect_once_after_oversize_close,
);

/// A builder whose `on_disconnect` reports each ended connection's id on a channel.
fn reporting(builder: MeshBuilder) -> (MeshBuilder, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let builder = builder
        .command("echo", echo)
        .on_disconnect(move |connection: Connection| {
            let tx = tx.clone();
            async move {
                // Some cleanup work: callers that claim to wait for the hook must really wait.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(connection.id().to_owned());
            }
        });
    (builder, rx)
}

async fn on_connect_sees_the_request_and_sets_metadata(backend: Backend) {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let builder =
        backend
            .builder()
            .command("echo", echo)
            .on_connect(move |connection: Connection| {
                let seen_tx = seen_tx.clone();
                async move {
                    let user = connection
                        .headers()
                        .get("x-user")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("nobody")
                        .to_owned();
                    let mesh = connection.mesh().expect("mesh is alive");
                    let stored = mesh
                        .set_connection_metadata(
                            connection.id(),
                            json!({"user": user, "query": connection.uri().query()}),
                            MergeStrategy::Replace,
                        )
                        .await
                        .map_err(|err| CommandError::server(err.to_string()))?;
                    let _ = seen_tx.send((connection.id().to_owned(), stored));
                    Ok(())
                }
            });
    let server = serve(builder).await;
    let request = ws_request(&server.ws_url("/?room=lobby"), &[("x-user", "ann")]);
    let mut client = RawClient::connect_request(request).await;
    let (hook_id, stored) = recv_within(&mut seen).await;
    assert_eq!(hook_id, client.id);
    assert!(stored, "the connection is registered when on_connect runs");
    // The very first command already sees what the hook stored.
    assert_eq!(
        client
            .command(1, "mesh/get-my-connection-metadata", json!({}))
            .await,
        json!({"id": 1, "command": "mesh/get-my-connection-metadata",
               "payload": {"metadata": {"user": "ann", "query": "room=lobby"}}})
    );
    assert_eq!(
        server
            .mesh
            .connection_metadata(&client.id)
            .await
            .expect("read"),
        Some(json!({"user": "ann", "query": "room=lobby"}))
    );
    let mut other = RawClient::connect(&server.url()).await;
    assert_eq!(
        other
            .command(2, "mesh/get-my-connection-metadata", json!({}))
            .await["payload"],
        json!({"metadata": {"user": "nobody", "query": null}})
    );
}

async fn on_connect_refusal_closes_before_assign_id(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder());
    let builder = builder.on_connect(|connection: Connection| async move {
        if connection.headers().contains_key("x-refuse") {
            return Err(CommandError::new("EREFUSED", "nope"));
        }
        Ok(())
    });
    let server = serve(builder).await;
    let (mut socket, response) =
        tokio_tungstenite::connect_async(ws_request(&server.url(), &[("x-refuse", "1")]))
            .await
            .expect("the upgrade itself succeeds");
    assert_eq!(response.status(), 101);
    // The very first message is the close: no mesh/assign-id, no other frame.
    assert_eq!(first_close(&mut socket).await, (1008, "nope".to_owned()));
    assert!(server.mesh.connections().is_empty());
    // Others are accepted as usual.
    let mut accepted = RawClient::connect(&server.url()).await;
    assert_echo_is_next(&mut accepted, 1).await;
    assert_eq!(server.connection_ids(), vec![accepted.id.clone()]);
    // on_disconnect runs only for accepted connections.
    accepted.close().await;
    assert_eq!(recv_within(&mut disconnects).await, accepted.id);
    assert_no_more(&mut disconnects).await;
}

async fn on_disconnect_once_after_client_close(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder());
    let server = serve(builder).await;
    let mut leaving = RawClient::connect(&server.url()).await;
    let mut staying = RawClient::connect(&server.url()).await;
    leaving.close().await;
    assert_eq!(recv_within(&mut disconnects).await, leaving.id);
    assert_echo_is_next(&mut staying, 1).await;
    assert_no_more(&mut disconnects).await;
    // (The connection leaves the registry right after its hook returned.)
    assert_eq!(server.connection_ids(), vec![staying.id.clone()]);
}

async fn on_disconnect_once_after_network_drop(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder());
    let server = serve(builder).await;
    let dropped = RawClient::connect(&server.url()).await;
    let id = dropped.id.clone();
    // No close frame: the TCP connection just goes away.
    drop(dropped);
    assert_eq!(recv_within(&mut disconnects).await, id);
    assert_no_more(&mut disconnects).await;
    assert!(server.mesh.connections().is_empty());
}

async fn on_disconnect_once_after_server_close(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder());
    let server = serve(builder).await;
    let mut closed = RawClient::connect(&server.url()).await;
    let mut staying = RawClient::connect(&server.url()).await;
    server
        .mesh
        .close_connection(&closed.id, "bye")
        .await
        .expect("close");
    assert_eq!(closed.closed().await, (1000, "bye".to_owned()));
    assert_eq!(recv_within(&mut disconnects).await, closed.id);
    assert_echo_is_next(&mut staying, 1).await;
    // Closing it again, or closing a connection that never existed, does nothing.
    server
        .mesh
        .close_connection(&closed.id, "again")
        .await
        .expect("close again");
    server
        .mesh
        .close_connection("no-such-connection", "bye")
        .await
        .expect("close nobody");
    assert_echo_is_next(&mut staying, 2).await;
    assert_no_more(&mut disconnects).await;
    assert_eq!(server.connection_ids(), vec![staying.id.clone()]);
}

const PING: &str = r#"{"command":"ping","payload":{}}"#;

async fn missed_pongs_close_only_the_silent_client(backend: Backend) {
    let (builder, mut disconnects) = reporting(
        backend
            .builder()
            .ping_interval(Duration::from_millis(50))
            .max_missed_pongs(1)
            // Latency probes go out in slices of their interval too: none in this test.
            .latency_interval(Duration::from_secs(3600)),
    );
    let server = serve(builder).await;
    let mut silent = RawClient::connect(&server.url()).await;
    let mut live = RawClient::connect(&server.url()).await;
    let live_id = live.id.clone();
    // The live client answers every ping (with an id, as the JS client does) until told
    // to stop, and reports each one.
    let (answered_tx, mut answered) = mpsc::unbounded_channel();
    let (stop, mut stop_signal) = oneshot::channel::<()>();
    let responder = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let frame = tokio::select! {
                _ = &mut stop_signal => return live,
                frame = live.next() => frame,
            };
            assert_eq!(frame, json!({"command": "ping", "payload": {}}));
            n += 1;
            live.send_json(json!({"id": 10_000 + n, "command": "pong", "payload": {}}))
                .await;
            let _ = answered_tx.send(n);
        }
    });
    // The silent client reads (so it sees the pings) but never answers.
    assert_eq!(silent.next_text().await, PING);
    let (code, reason) = silent.closed().await;
    assert_eq!(code, 1008);
    assert!(!reason.is_empty(), "the close frame carries a reason");
    assert_eq!(recv_within(&mut disconnects).await, silent.id);
    assert_eq!(server.mesh.stats().ping_timeout_closes, 1);
    // Eight ping intervals later the live client is still there...
    while recv_within(&mut answered).await < 8 {}
    assert_no_more(&mut disconnects).await;
    assert_eq!(server.connection_ids(), vec![live_id]);
    assert_eq!(server.mesh.stats().ping_timeout_closes, 1);
    // ...and served.
    stop.send(()).expect("responder running");
    let mut live = tokio::time::timeout(WAIT, responder)
        .await
        .expect("responder stops")
        .expect("responder");
    live.send_json(json!({"id": 1, "command": "echo", "payload": "still here"}))
        .await;
    let reply = loop {
        let frame = live.next().await;
        if frame.get("id").is_some() {
            break frame;
        }
        // Pongs got no reply; only pings may come in between.
        assert_eq!(frame, json!({"command": "ping", "payload": {}}));
        live.send_json(json!({"id": 2, "command": "pong", "payload": {}}))
            .await;
    };
    assert_eq!(
        reply,
        json!({"id": 1, "command": "echo", "payload": "still here"})
    );
}

/// Reads until the close frame, answering nothing, in the background.
fn await_close(mut client: RawClient) -> tokio::task::JoinHandle<(String, u16, String)> {
    tokio::spawn(async move {
        let (code, reason) = client.closed().await;
        (client.id, code, reason)
    })
}

async fn shutdown_closes_everyone_and_refuses_new_upgrades(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder());
    let server = serve(builder).await;
    let mut clients = Vec::new();
    for n in 0..3 {
        let mut client = RawClient::connect(&server.url()).await;
        assert_echo_is_next(&mut client, n).await;
        clients.push(client);
    }
    let mut expected: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    expected.sort();
    let closes: Vec<_> = clients.into_iter().map(await_close).collect();

    let clean = tokio::time::timeout(WAIT, server.mesh.shutdown())
        .await
        .expect("shutdown returns within its bound");
    assert!(clean, "every connection finished in time");
    // Every on_disconnect ran before shutdown returned: their reports are already there.
    let mut reported = Vec::new();
    while let Ok(id) = disconnects.try_recv() {
        reported.push(id);
    }
    reported.sort();
    assert_eq!(reported, expected);
    assert!(server.mesh.connections().is_empty());
    assert!(server.mesh.is_shutting_down());

    for close in closes {
        let (id, code, reason) = tokio::time::timeout(WAIT, close)
            .await
            .expect("close seen")
            .expect("reader");
        assert_eq!(code, 1001, "{id}");
        assert!(!reason.is_empty(), "{id}: the close frame carries a reason");
    }
    // No new WebSocket after shutdown; plain HTTP is the app's business and still works.
    assert_eq!(refused_upgrade(server.url()).await, 503);
    let health = raw_http(
        server.addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(health.status, 200);
    assert_no_more(&mut disconnects).await;
}

async fn axum_graceful_shutdown_runs_mesh_shutdown(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder());
    let (mesh_layer, mesh) = builder.build();
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .layer(mesh_layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stop_signal) = oneshot::channel::<()>();
    let (clean_tx, clean_rx) = oneshot::channel::<bool>();
    let shutdown_mesh = mesh.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_signal.await;
                let _ = clean_tx.send(shutdown_mesh.shutdown().await);
            })
            .await
    });
    let url = format!("ws://{addr}/");
    let mut a = RawClient::connect(&url).await;
    let mut b = RawClient::connect(&url).await;
    assert_echo_is_next(&mut a, 1).await;
    assert_echo_is_next(&mut b, 2).await;
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort();
    let closes = [await_close(a), await_close(b)];

    stop.send(()).expect("server is running");
    let served = tokio::time::timeout(WAIT, server)
        .await
        .expect("axum finished its graceful shutdown")
        .expect("server task");
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(clean_rx.await, Ok(true));
    let mut reported = Vec::new();
    while let Ok(id) = disconnects.try_recv() {
        reported.push(id);
    }
    reported.sort();
    assert_eq!(reported, expected);
    for close in closes {
        let (_, code, _) = tokio::time::timeout(WAIT, close)
            .await
            .expect("close seen")
            .expect("reader");
        assert_eq!(code, 1001);
    }
    assert!(mesh.connections().is_empty());
}

async fn commands_sent_early_wait_for_on_connect(backend: Backend) {
    // Register, then assign the id, then read (docs/protocol.md §3.1): a command sent right after
    // the upgrade, before mesh/assign-id arrived, runs only after on_connect finished.
    let (release, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = std::sync::Arc::new(tokio::sync::Mutex::new(release_rx));
    let builder = backend.builder().on_connect(move |connection: Connection| {
        let release_rx = release_rx.clone();
        async move {
            release_rx.lock().await.recv().await;
            connection
                .set_metadata(json!({"ready": true}), MergeStrategy::Replace)
                .await
                .map_err(|err| CommandError::server(err.to_string()))
        }
    });
    let server = serve(builder).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .expect("upgrade");
    futures_util::SinkExt::send(
        &mut socket,
        tokio_tungstenite::tungstenite::Message::text(
            r#"{"id":1,"command":"mesh/get-my-connection-metadata","payload":{}}"#,
        ),
    )
    .await
    .expect("send");
    release.send(()).expect("hook waiting");
    let first = next_json(&mut socket).await;
    assert_eq!(first["command"], "mesh/assign-id", "{first}");
    assert_eq!(
        next_json(&mut socket).await,
        json!({"id": 1, "command": "mesh/get-my-connection-metadata",
               "payload": {"metadata": {"ready": true}}})
    );
}

async fn on_connect_panic_refuses_the_connection(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder());
    let builder = builder.on_connect(|connection: Connection| async move {
        if connection.uri().query() == Some("panic") {
            panic!("on_connect blew up");
        }
        Ok(())
    });
    let server = serve(builder).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(server.ws_url("/?panic"))
        .await
        .expect("upgrade");
    let (code, reason) = first_close(&mut socket).await;
    assert_eq!(code, 1008);
    assert!(!reason.is_empty());
    assert!(
        !reason.contains("blew up"),
        "no panic detail on the wire: {reason}"
    );
    let mut fine = RawClient::connect(&server.url()).await;
    assert_echo_is_next(&mut fine, 1).await;
    assert_eq!(server.connection_ids(), vec![fine.id.clone()]);
    assert_no_more(&mut disconnects).await;
}

async fn on_disconnect_panic_does_not_break_the_mesh(backend: Backend) {
    let (tx, mut ran) = mpsc::unbounded_channel();
    let builder =
        backend
            .builder()
            .command("echo", echo)
            .on_disconnect(move |connection: Connection| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(connection.id().to_owned());
                    panic!("on_disconnect blew up");
                }
            });
    let server = serve(builder).await;
    let mut first = RawClient::connect(&server.url()).await;
    let mut second = RawClient::connect(&server.url()).await;
    first.close().await;
    assert_eq!(recv_within(&mut ran).await, first.id);
    assert_echo_is_next(&mut second, 1).await;
    let mut third = RawClient::connect(&server.url()).await;
    assert_echo_is_next(&mut third, 2).await;
    assert_no_more(&mut ran).await;
    assert_eq!(server.connection_ids(), {
        let mut expected = vec![second.id.clone(), third.id.clone()];
        expected.sort();
        expected
    });
}

async fn on_disconnect_once_after_oversize_close(backend: Backend) {
    let (builder, mut disconnects) = reporting(backend.builder().max_frame_size(1024));
    let server = serve(builder).await;
    let mut big = RawClient::connect(&server.url()).await;
    big.send_text(&"x".repeat(4096)).await;
    assert_eq!(big.closed().await.0, 1009);
    assert_eq!(recv_within(&mut disconnects).await, big.id);
    assert_no_more(&mut disconnects).await;
    assert_eq!(server.mesh.stats().oversize_closes, 1);
    assert!(server.mesh.connections().is_empty());
}

/// The example servers shut down on SIGTERM (what orchestrators send) as on Ctrl-C: with
/// 1,000 clients connected to the interop example, every client gets a 1001 close frame
/// and the process exits in time, cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interop_example_shuts_down_gracefully_on_sigterm() {
    const CLIENTS: usize = 1000;
    let mut server = ExampleProcess::start_interop(&[], None).await;

    let url = server.url();
    let mut clients = Vec::with_capacity(CLIENTS);
    for batch in 0..CLIENTS / 100 {
        let connecting = (0..100).map(|_| RawClient::connect(&url));
        let connected = within(
            &format!("client batch {batch} to connect"),
            futures_util::future::join_all(connecting),
        )
        .await;
        clients.extend(connected);
    }

    server.terminate();
    let closes = futures_util::future::join_all(clients.iter_mut().map(RawClient::closed)).await;
    let going_away = closes
        .iter()
        .filter(|close| **close == (1001, "server shutting down".to_owned()))
        .count();
    assert_eq!(
        going_away,
        CLIENTS,
        "every client gets 1001: {:?}",
        &closes[..3]
    );
    // Within the mesh's shutdown timeout (10 s by default), with room to spare.
    server.exits_cleanly_within(Duration::from_secs(15)).await;
}

/// Reads (and drops) what the server sends until it closes the socket; returns when that
/// was, or `None` when it did not within `limit`.
async fn closed_by_server(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    limit: Duration,
) -> Option<tokio::time::Instant> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return tokio::time::Instant::now(),
                Ok(_) => continue,
            }
        }
    })
    .await
    .ok()
}

/// The examples give a client 30 s (here `HEADER_READ_TIMEOUT_MS=500`) to send a request
/// head, then close its socket: a socket that sends nothing, one that trickles a request
/// head a byte at a time without ever finishing it (slowloris), and a keep-alive connection
/// idle after its request. A WebSocket open all the while is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interop_example_closes_sockets_that_send_no_request_head_in_time() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(500);
    // Far above the timeout: a busy machine may be slow to close, never early.
    const CLOSE_WITHIN: Duration = Duration::from_secs(10);
    let server = ExampleProcess::start_interop(
        &[(
            "HEADER_READ_TIMEOUT_MS",
            &HEADER_READ_TIMEOUT.as_millis().to_string(),
        )],
        None,
    )
    .await;
    let mut websocket = RawClient::connect(&server.url()).await;

    let started = tokio::time::Instant::now();
    let idle = TcpStream::connect(server.addr()).await.expect("connect");
    let (slowloris, mut trickle) = TcpStream::connect(server.addr())
        .await
        .expect("connect")
        .into_split();
    let trickling = tokio::spawn(async move {
        let head = b"GET /health HTTP/1.1\r\nHost: mesh.test\r\nX-Slow: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if trickle.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut keep_alive = TcpStream::connect(server.addr()).await.expect("connect");
    keep_alive
        .write_all(b"GET /health HTTP/1.1\r\nHost: mesh.test\r\n\r\n")
        .await
        .expect("write");

    let (idle, slowloris, keep_alive) = tokio::join!(
        closed_by_server(idle, CLOSE_WITHIN),
        closed_by_server(slowloris, CLOSE_WITHIN),
        closed_by_server(keep_alive, CLOSE_WITHIN),
    );
    for (socket, closed) in [
        ("idle", idle),
        ("slowloris", slowloris),
        ("keep-alive", keep_alive),
    ] {
        let closed = closed.unwrap_or_else(|| panic!("the {socket} socket is still open"));
        assert!(
            closed - started >= HEADER_READ_TIMEOUT,
            "the {socket} socket was closed before its time: {:?}",
            closed - started
        );
    }
    trickling.abort();
    // Open since before the other sockets, so for longer than the header timeout.
    let reply = websocket.command(1, "echo", json!("still here")).await;
    assert_eq!(reply["payload"], "still here");
}

/// When idle sockets exhaust the process's file descriptors, the examples' accept loop
/// backs off and waits, and serves again once the header timeout has closed them: the
/// interop example, limited to 64 open files, with 150 idle sockets, still answers a
/// WebSocket client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interop_example_serves_again_once_idle_sockets_free_their_descriptors() {
    const IDLE_SOCKETS: usize = 150;
    let mut server =
        ExampleProcess::start_interop(&[("HEADER_READ_TIMEOUT_MS", "500")], Some(64)).await;
    let mut idle = Vec::with_capacity(IDLE_SOCKETS);
    for _ in 0..IDLE_SOCKETS {
        // The kernel completes each connection; the server accepts what it has room for.
        idle.push(
            tokio::net::TcpStream::connect(server.addr())
                .await
                .expect("connect"),
        );
    }
    server.logged("accept error").await;
    // Queued behind every idle socket: it is accepted once they have been, and closed.
    let mut client =
        tokio::time::timeout(Duration::from_secs(30), RawClient::connect(&server.url()))
            .await
            .expect("a client is served once the idle sockets are closed");
    let reply = client.command(1, "echo", json!("served")).await;
    assert_eq!(reply["payload"], "served");
    drop(idle);
}

/// Issue 16: the interop example's `GET /health` reports `Mesh::health`. It answers 200
/// while Redis answers, 503 with the reason once Redis is gone, and 200 again within a
/// few seconds of Redis's return (an empty Redis: the instance registers again first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interop_examples_health_follows_redis() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let server = ExampleProcess::start_interop(
        &[("REDIS_URL", url.as_str()), ("MESH_PREFIX", "health-test:")],
        None,
    )
    .await;
    let health = || async {
        raw_http(
            server.addr(),
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
    };
    let first = health().await;
    assert_eq!(first.status, 200, "{first:?}");

    redis.kill();
    // Each check waits at most the backend's operation timeout (3 s) for Redis.
    let down = wait_for_status(&health, 503, Duration::from_secs(20)).await;
    assert!(
        down.body.contains("unreachable"),
        "the reason names the backend: {down:?}"
    );

    redis.restart();
    // Redis is back empty: the heartbeat (every 2 s) finds the instance missing and
    // registers it again; until then /health says so.
    wait_for_status(&health, 200, Duration::from_secs(20)).await;
}

/// Polls `health` until it answers `status` (each poll is one request; there is no event
/// to await), failing after `limit`. Returns that response.
async fn wait_for_status<F, Fut>(health: &F, status: u16, limit: Duration) -> RawResponse
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = RawResponse>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        let response = health().await;
        if response.status == status {
            return response;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/health did not answer {status} within {limit:?}; last: {response:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue 16: the interop example's `GET /metrics` answers the `mesh_*` metrics in
/// Prometheus text, with bounded labels. One client's commands (an echo, a room join,
/// channel, record, presence and collection subscriptions, a broadcast to its room, a
/// malformed payload and two unknown commands) are counted by command and error code, the frames and bytes it sent are
/// counted exactly, and the connection, room and subscription gauges go back to 0 after
/// it closes, with the close counted by code and reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interop_example_answers_mesh_metrics() {
    let server = ExampleProcess::start_interop(
        // No pings or latency probes: every frame in is one this test sent.
        &[
            ("PING_INTERVAL_MS", "600000"),
            ("LATENCY_INTERVAL_MS", "600000"),
        ],
        None,
    )
    .await;
    let scrape = || async {
        let response = raw_http(
            server.addr(),
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(response.status, 200, "{response:?}");
        assert!(
            response.head.contains("text/plain"),
            "Prometheus text: {response:?}"
        );
        Scrape(response.body)
    };

    let mut client = RawClient::connect(&server.url()).await;
    let frames = [
        r#"{"id":1,"command":"echo","payload":"one"}"#,
        r#"{"id":2,"command":"echo","payload":"two"}"#,
        r#"{"id":3,"command":"echo","payload":"three"}"#,
        r#"{"id":4,"command":"mesh/join-room","payload":{"roomName":"lobby"}}"#,
        r#"{"id":5,"command":"mesh/subscribe-channel","payload":{"channel":"news"}}"#,
        r#"{"id":6,"command":"broadcast-room","payload":{"room":"lobby","message":"hi"}}"#,
        // A payload the handler's extractor refuses: EINVALID.
        r#"{"id":7,"command":"write-record","payload":{"nope":true}}"#,
        // Names no route serves: both counted as `unknown`, never by their own name.
        r#"{"id":8,"command":"no-such-command","payload":null}"#,
        r#"{"id":9,"command":"another-made-up-name-42","payload":null}"#,
        r#"{"id":10,"command":"mesh/subscribe-record","payload":{"recordId":"doc:1"}}"#,
        r#"{"id":11,"command":"mesh/subscribe-presence","payload":{"roomName":"lobby"}}"#,
        r#"{"id":12,"command":"mesh/subscribe-collection","payload":{"collectionId":"doc"}}"#,
    ];
    for frame in frames {
        client.send_text(frame).await;
    }
    let replies = client.replies(frames.len()).await;
    assert_eq!(replies[&4]["payload"]["success"], true, "{:?}", replies[&4]);
    assert_eq!(
        replies[&7]["payload"]["code"], "EINVALID",
        "{:?}",
        replies[&7]
    );
    assert_eq!(
        replies[&8]["payload"]["code"], "ENOTFOUND",
        "{:?}",
        replies[&8]
    );

    let open = scrape().await;
    assert_eq!(open.value("mesh_connections", &[]), Some(1.0), "{open}");
    assert_eq!(open.value("mesh_rooms", &[]), Some(1.0), "{open}");
    for kind in ["channel", "record", "presence", "collection"] {
        assert_eq!(
            open.value("mesh_subscriptions", &[("kind", kind)]),
            Some(1.0),
            "{kind}: {open}"
        );
    }
    for (command, count) in [
        ("echo", 3.0),
        ("mesh/join-room", 1.0),
        ("mesh/subscribe-channel", 1.0),
        ("broadcast-room", 1.0),
        ("write-record", 1.0),
        ("unknown", 2.0),
    ] {
        assert_eq!(
            open.value("mesh_commands_total", &[("command", command)]),
            Some(count),
            "{command}: {open}"
        );
    }
    assert_eq!(
        open.value(
            "mesh_command_duration_seconds_count",
            &[("command", "echo")]
        ),
        Some(3.0),
        "{open}"
    );
    assert_eq!(
        open.value(
            "mesh_command_errors_total",
            &[("command", "write-record"), ("code", "EINVALID")]
        ),
        Some(1.0),
        "{open}"
    );
    assert_eq!(
        open.value(
            "mesh_command_errors_total",
            &[("command", "unknown"), ("code", "ENOTFOUND")]
        ),
        Some(2.0),
        "{open}"
    );
    assert_eq!(
        open.value("mesh_command_errors_total", &[("command", "echo")]),
        None,
        "no error series for a command that did not fail: {open}"
    );
    for name in [
        "no-such-command",
        "another-made-up-name-42",
        "lobby",
        &client.id,
    ] {
        assert!(!open.0.contains(name), "{name} is not a label: {open}");
    }
    let sent_bytes: usize = frames.iter().map(|frame| frame.len()).sum();
    assert_eq!(
        open.value("mesh_frames_total", &[("direction", "in")]),
        Some(frames.len() as f64),
        "{open}"
    );
    assert_eq!(
        open.value("mesh_bytes_total", &[("direction", "in")]),
        Some(sent_bytes as f64),
        "{open}"
    );
    // The id, a reply per frame and the room broadcast's push, at least.
    let frames_out = open
        .value("mesh_frames_total", &[("direction", "out")])
        .unwrap_or_default();
    assert!(frames_out >= (frames.len() + 2) as f64, "{open}");
    // The broadcast reached its one member.
    assert_eq!(
        open.value("mesh_fanout_recipients_count", &[("kind", "room")]),
        Some(1.0),
        "{open}"
    );
    assert_eq!(
        open.value("mesh_fanout_recipients_sum", &[("kind", "room")]),
        Some(1.0),
        "{open}"
    );

    client.close().await;
    // The server unregisters the connection after its close handshake: poll for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let closed = loop {
        let scraped = scrape().await;
        if scraped.value("mesh_connections", &[]) == Some(0.0) {
            break scraped;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mesh_connections did not return to 0: {scraped}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(closed.value("mesh_rooms", &[]), Some(0.0), "{closed}");
    for kind in ["channel", "record", "presence", "collection"] {
        assert_eq!(
            closed.value("mesh_subscriptions", &[("kind", kind)]),
            Some(0.0),
            "{kind}: {closed}"
        );
    }
    assert_eq!(
        closed.value(
            "mesh_closes_total",
            &[("code", "1000"), ("reason", "peer_closed")]
        ),
        Some(1.0),
        "{closed}"
    );
    assert_eq!(
        closed.value("mesh_slow_consumer_closes_total", &[]),
        None,
        "{closed}"
    );
}

/// One `GET /metrics` body, in Prometheus text.
struct Scrape(String);

impl Scrape {
    /// The value of the series `name` whose labels are exactly `labels` (in any order).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut wanted: Vec<(String, String)> = labels
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        wanted.sort();
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (series_name, mut series_labels) = match series.split_once('{') {
                    Some((series_name, rest)) => {
                        let labels = rest.strip_suffix('}')?;
                        let parsed: Option<Vec<(String, String)>> = labels
                            .split(',')
                            .filter(|pair| !pair.is_empty())
                            .map(|pair| {
                                let (key, value) = pair.split_once('=')?;
                                Some((key.to_owned(), value.trim_matches('"').to_owned()))
                            })
                            .collect();
                        (series_name, parsed?)
                    }
                    None => (series, Vec::new()),
                };
                series_labels.sort();
                (series_name == name && series_labels == wanted)
                    .then(|| value.parse().ok())
                    .flatten()
            })
    }
}

impl std::fmt::Display for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
