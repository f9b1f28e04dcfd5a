//! Bounded connections: the outbound queue budget (a client that stops reading is closed
//! while everyone else keeps receiving), the per-connection in-flight limit, the upgrade
//! headers a connection keeps, and the connections an instance holds, on every backend.
//! (The inbound frame limit is in bad_input.rs.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tower_mesh::extract::{Connection, Payload};
use tower_mesh::{Access, BoxError, Collection, Mesh, MeshBuilder};

use crate::common::*;

conformance!(
    slow_consumer_is_closed_while_others_keep_receiving,
    in_flight_limit_holds_back_further_commands,
    slow_consumer_that_reads_late_gets_a_close_frame,
    pongs_are_read_while_the_in_flight_limit_is_reached,
    a_pipelining_client_gets_every_large_reply,
    frames_larger_than_the_read_buffer_and_bursts_of_small_ones_arrive_whole,
    a_reply_over_the_budget_then_a_tiny_one_both_arrive,
    pings_behind_queued_replies_are_not_counted_as_missed,
    a_client_that_stops_reading_under_a_broadcast_flood_is_closed,
    pushes_over_the_budget_close_even_while_replies_are_queued,
    a_pipelining_client_that_never_reads_is_closed,
    collection_diffs_count_against_the_push_budget,
    a_huge_upgrade_header_is_not_kept_but_the_small_ones_are,
    kept_headers_are_taken_in_request_order_within_the_budget,
    upgrades_beyond_max_connections_get_503_until_one_closes,
    concurrent_upgrades_never_exceed_max_connections,
);

/// Pushes the test sends to the client that keeps reading.
const TICKS: u64 = 200;

async fn slow_consumer_is_closed_while_others_keep_receiving(backend: Backend) {
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let builder = backend
        .builder()
        .command("echo", echo)
        .max_outbound_bytes(64 * 1024)
        // No heartbeat frames during this long test.
        .ping_interval(Duration::from_secs(3600))
        .latency_interval(Duration::from_secs(3600))
        .on_disconnect(move |connection: Connection| {
            let _ = gone_tx.send(connection.id().to_owned());
            async {}
        });
    let server = serve(builder).await;
    // Connected, then never read again: its socket is not polled for the rest of the test.
    let slow = RawClient::connect(&server.url()).await;
    let mut reader = RawClient::connect(&server.url()).await;
    let reader_id = reader.id.clone();
    // The other client reads everything sent to it, in the background.
    let reading = tokio::spawn(async move {
        let mut expected = 0;
        while expected < TICKS {
            let frame = reader.next().await;
            // The heartbeat may probe a long test; nothing else may arrive.
            if frame["command"] == "latency:request" || frame["command"] == "ping" {
                continue;
            }
            assert_eq!(frame, json!({"command": "tick", "payload": expected}));
            expected += 1;
        }
        reader
    });

    let kib = "k".repeat(1024);
    let mut ticks = 0;
    let mut bulk = 0u64;
    // Pushes of 1 KiB fill the TCP buffers and then the 64 KiB queue; keep going (up to a
    // bound: 200 MiB) until the slow client is closed.
    while bulk < 200_000 {
        server
            .mesh
            .send(&slow.id, "bulk", &json!({"n": bulk, "data": kib}))
            .await
            .expect("send");
        bulk += 1;
        if bulk % 100 == 0 {
            if ticks < TICKS {
                server
                    .mesh
                    .send(&reader_id, "tick", &json!(ticks))
                    .await
                    .expect("send");
                ticks += 1;
            }
            tokio::task::yield_now().await;
            if server.mesh.stats().slow_consumer_closes >= 1 {
                break;
            }
        }
    }
    assert!(
        server.mesh.stats().slow_consumer_closes >= 1,
        "still not closed after {bulk} pushes of 1 KiB"
    );
    // The rest of the reader's pushes.
    while ticks < TICKS {
        server
            .mesh
            .send(&reader_id, "tick", &json!(ticks))
            .await
            .expect("send");
        ticks += 1;
    }
    assert_eq!(recv_within(&mut gone).await, slow.id);
    let mut reader = tokio::time::timeout(WAIT, reading)
        .await
        .expect("the reader got every push")
        .expect("reader");
    assert_echo_is_next(&mut reader, 1).await;
    assert_eq!(server.mesh.stats().slow_consumer_closes, 1);
    assert!(server.mesh.connection(&reader.id).is_some());
    // Only the slow client's hook ran.
    assert_no_more(&mut gone).await;
    drop(slow);
}

async fn in_flight_limit_holds_back_further_commands(backend: Backend) {
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let (handler_gate, handler_started) = (gate.clone(), started.clone());
    let builder = backend
        .builder()
        .command("echo", echo)
        .max_in_flight(2)
        .command("hold", move |Payload(n): Payload<u64>| {
            let (gate, started, started_tx) = (
                handler_gate.clone(),
                handler_started.clone(),
                started_tx.clone(),
            );
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send(n);
                gate.acquire().await.expect("gate").forget();
                json!(format!("released {n}"))
            }
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut other = RawClient::connect(&server.url()).await;
    for n in 1..=3u64 {
        client
            .send_json(json!({"id": n, "command": "hold", "payload": n}))
            .await;
    }
    let mut first_two = vec![
        recv_within(&mut started_rx).await,
        recv_within(&mut started_rx).await,
    ];
    first_two.sort();
    assert_eq!(first_two, vec![1, 2]);
    // The third waits: it does not start within a short window...
    assert!(
        tokio::time::timeout(Duration::from_millis(200), started_rx.recv())
            .await
            .is_err(),
        "a third command started beyond max_in_flight(2)"
    );
    assert_eq!(started.load(Ordering::SeqCst), 2);
    // ...and the connection is not read meanwhile, while other connections are served.
    client
        .send_json(json!({"id": 4, "command": "echo", "payload": "queued"}))
        .await;
    assert_echo_is_next(&mut other, 100).await;

    // Release one: its reply comes, and only then does the third start.
    gate.add_permits(1);
    let reply = client.next().await;
    let released = reply["id"].as_u64().expect("a reply");
    assert!(released == 1 || released == 2, "{reply}");
    assert_eq!(
        reply,
        json!({"id": released, "command": "hold", "payload": format!("released {released}")})
    );
    assert_eq!(recv_within(&mut started_rx).await, 3);
    assert_eq!(started.load(Ordering::SeqCst), 3);

    // Release the rest: every command is answered, the echo included.
    gate.add_permits(2);
    let mut rest: Vec<Value> = Vec::new();
    for _ in 0..3 {
        rest.push(client.next().await);
    }
    rest.sort_by_key(|frame| frame["id"].as_u64());
    let still_held = 3 - released;
    assert_eq!(
        rest,
        vec![
            json!({"id": still_held, "command": "hold", "payload": format!("released {still_held}")}),
            json!({"id": 3, "command": "hold", "payload": "released 3"}),
            json!({"id": 4, "command": "echo", "payload": "queued"}),
        ]
    );
    assert_eq!(started.load(Ordering::SeqCst), 3);
}

async fn slow_consumer_that_reads_late_gets_a_close_frame(backend: Backend) {
    let builder = backend
        .builder()
        .max_outbound_bytes(64 * 1024)
        .ping_interval(Duration::from_secs(3600))
        .latency_interval(Duration::from_secs(3600));
    let server = serve(builder).await;
    let mut slow = RawClient::connect(&server.url()).await;
    let kib = "k".repeat(1024);
    let mut sent = 0u64;
    while server.mesh.stats().slow_consumer_closes == 0 && sent < 200_000 {
        server
            .mesh
            .send(&slow.id, "bulk", &json!({"n": sent, "data": kib}))
            .await
            .expect("send");
        sent += 1;
        if sent % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(server.mesh.stats().slow_consumer_closes, 1);
    // The client now catches up: it gets what was already on its way (on a busy machine
    // the writer may not have run before the queue overflowed, so possibly nothing), in
    // order, then a close frame with a reason (the frames still queued were dropped).
    let mut last: Option<u64> = None;
    let (code, reason) = loop {
        let message = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut slow.socket))
            .await
            .expect("a frame or the close")
            .expect("socket open")
            .expect("no socket error");
        match message {
            tokio_tungstenite::tungstenite::Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(frame["command"], "bulk");
                let n = frame["payload"]["n"].as_u64().expect("n");
                assert_eq!(n, last.map_or(0, |last| last + 1), "in order, no gap");
                last = Some(n);
            }
            tokio_tungstenite::tungstenite::Message::Close(Some(frame)) => {
                break (u16::from(frame.code), frame.reason.to_string())
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert!(!reason.is_empty());
    assert!(
        last.is_none_or(|last| last + 1 < sent),
        "{last:?} of {sent}"
    );
}

async fn pongs_are_read_while_the_in_flight_limit_is_reached(backend: Backend) {
    // Liveness must not depend on how long a client's commands take: a client that
    // answers every ping stays connected while its in-flight slots are all busy.
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let handler_gate = gate.clone();
    let builder = backend
        .builder()
        .max_in_flight(1)
        .ping_interval(Duration::from_millis(50))
        .max_missed_pongs(1)
        .command("hold", move || {
            let (gate, started_tx) = (handler_gate.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(());
                gate.acquire().await.expect("gate").forget();
                json!("released")
            }
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_json(json!({"id": 1, "command": "hold", "payload": {}}))
        .await;
    recv_within(&mut started).await;
    // Answer six pings (several times the missed-pong allowance) while `hold` runs.
    for n in 0..6u64 {
        let frame = client.next().await;
        assert_eq!(frame, json!({"command": "ping", "payload": {}}));
        client
            .send_json(json!({"id": 100 + n, "command": "pong", "payload": {}}))
            .await;
    }
    assert_eq!(server.mesh.stats().ping_timeout_closes, 0);
    gate.add_permits(1);
    let reply = loop {
        let frame = client.next().await;
        if frame.get("id").is_some() {
            break frame;
        }
        client
            .send_json(json!({"id": 200, "command": "pong", "payload": {}}))
            .await;
    };
    assert_eq!(
        reply,
        json!({"id": 1, "command": "hold", "payload": "released"})
    );
}

/// `blob {bytes}`: replies with a string of `bytes` bytes, so a tiny request can ask for a
/// large reply.
fn with_blob(builder: MeshBuilder) -> MeshBuilder {
    builder.command("blob", |Payload(bytes): Payload<usize>| async move {
        json!("b".repeat(bytes))
    })
}

/// A collection whose resolver waits until the test releases it: its subscription holds
/// its reply's place in the outbound queue, and everything queued after it waits.
struct HeldCollection {
    gate: Arc<Semaphore>,
    resolving_tx: mpsc::UnboundedSender<()>,
    resolving: tokio::sync::Mutex<mpsc::UnboundedReceiver<()>>,
}

impl HeldCollection {
    fn new() -> Self {
        let (resolving_tx, resolving) = mpsc::unbounded_channel();
        HeldCollection {
            gate: Arc::new(Semaphore::new(0)),
            resolving_tx,
            resolving: tokio::sync::Mutex::new(resolving),
        }
    }

    /// Exposes the collection `held`.
    fn expose(&self, builder: MeshBuilder) -> MeshBuilder {
        let (gate, resolving_tx) = (self.gate.clone(), self.resolving_tx.clone());
        builder.expose_collection(
            "held",
            Collection::resolved_by(move |_mesh: Mesh, _connection: Connection, _id: String| {
                let (gate, resolving_tx) = (gate.clone(), resolving_tx.clone());
                async move {
                    let _ = resolving_tx.send(());
                    gate.acquire().await.expect("gate").forget();
                    Ok::<Vec<String>, BoxError>(Vec::new())
                }
            }),
        )
    }

    /// The command frame that subscribes to it.
    fn subscribe(id: u64) -> Value {
        json!({"id": id, "command": "mesh/subscribe-collection",
               "payload": {"collectionId": "held"}})
    }

    /// Waits until a subscription's resolver runs (its reply's place is reserved).
    async fn resolving(&self) {
        recv_within(&mut *self.resolving.lock().await).await;
    }

    /// Lets every waiting resolver finish.
    fn release(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// Sends every frame in one socket write.
async fn send_in_one_write(client: &mut RawClient, frames: impl IntoIterator<Item = Value>) {
    for frame in frames {
        client
            .socket
            .feed(Message::text(frame.to_string()))
            .await
            .expect("feed");
    }
    client.socket.flush().await.expect("flush");
}

async fn a_pipelining_client_gets_every_large_reply(backend: Backend) {
    // Replies are back-pressure, not the push budget (docs/protocol.md §3.5): 60 replies of about
    // 20 KB, asked for in one write, are more than the default 1 MiB budget together.
    let server = serve(
        backend
            .builder()
            .command("echo", echo)
            .expose_channel("log", Access::open()),
    )
    .await;
    let line = "m".repeat(1000);
    for n in 0..20 {
        server
            .mesh
            .write_channel("log", &format!("{n:02}{line}"), 20)
            .await
            .expect("write_channel");
    }
    let mut client = RawClient::connect(&server.url()).await;
    send_in_one_write(
        &mut client,
        (1..=60u64).map(|id| {
            json!({"id": id, "command": "mesh/get-channel-history",
                   "payload": {"channel": "log", "limit": 20}})
        }),
    )
    .await;
    let replies = within("60 replies", client.replies(60)).await;
    for id in 1..=60u64 {
        let reply = &replies[&id];
        assert_eq!(reply["payload"]["success"], true, "{id}");
        let history = reply["payload"]["history"].as_array().expect("history");
        assert_eq!(history.len(), 20, "{id}");
        assert!(reply.to_string().len() > 20_000, "{id}");
    }
    assert_echo_is_next(&mut client, 100).await;
    assert_eq!(server.mesh.stats().slow_consumer_closes, 0);
}

async fn frames_larger_than_the_read_buffer_and_bursts_of_small_ones_arrive_whole(
    backend: Backend,
) {
    // The socket is read 300 bytes at a time and handed on in smaller pieces: frames of
    // every size straddle both, in one write and one at a time.
    let server = serve(
        backend
            .builder()
            .command("echo", echo)
            .read_buffer_size(300),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    let sizes = [0usize, 1, 100, 250, 256, 299, 300, 301, 513, 4096, 70_000];
    let payload = |id: u64| json!("x".repeat(sizes[(id as usize) % sizes.len()]) + &id.to_string());
    send_in_one_write(
        &mut client,
        (1..=200u64).map(|id| json!({"id": id, "command": "echo", "payload": payload(id)})),
    )
    .await;
    let replies = within("200 replies", client.replies(200)).await;
    for id in 1..=200u64 {
        assert_eq!(replies[&id]["payload"], payload(id), "{id}");
    }
    for id in 201..=222u64 {
        assert_eq!(
            client.command(id, "echo", payload(id)).await["payload"],
            payload(id)
        );
    }
}

async fn a_reply_over_the_budget_then_a_tiny_one_both_arrive(backend: Backend) {
    const LIMIT: usize = 1024 * 1024;
    let server = serve(
        backend
            .builder()
            .command("echo", echo)
            .max_frame_size(LIMIT)
            .max_outbound_bytes(LIMIT),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    // A request just under the frame limit; its reply is as long, so together with any
    // other reply it is over the outbound budget.
    let envelope = json!({"id": 1, "command": "echo", "payload": ""})
        .to_string()
        .len();
    let large = "e".repeat(LIMIT - envelope - 8);
    send_in_one_write(
        &mut client,
        [
            json!({"id": 1, "command": "echo", "payload": large}),
            json!({"id": 2, "command": "echo", "payload": "tiny"}),
        ],
    )
    .await;
    let replies = within("both replies", client.replies(2)).await;
    assert_eq!(replies[&1]["payload"], json!(large));
    assert_eq!(replies[&2]["payload"], "tiny");
    assert_echo_is_next(&mut client, 3).await;
    assert_eq!(server.mesh.stats().slow_consumer_closes, 0);
}

async fn pings_behind_queued_replies_are_not_counted_as_missed(backend: Backend) {
    // A collection subscription holds its reply's place while its resolver runs; the
    // replies asked for after it wait behind it, over the budget, so the connection is not
    // read. Its pings wait there too: the client cannot answer them, and they must not
    // count against it.
    let held = HeldCollection::new();
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let builder = held
        .expose(with_blob(backend.builder()))
        .command("echo", echo)
        .max_outbound_bytes(64 * 1024)
        .ping_interval(Duration::from_millis(100))
        .max_missed_pongs(2)
        .latency_interval(Duration::from_secs(3600))
        .on_disconnect(move |connection: Connection| {
            let _ = gone_tx.send((connection.id().to_owned(), connection.close_reason()));
            async {}
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut frames = vec![HeldCollection::subscribe(1)];
    frames.extend((2..=5u64).map(|id| json!({"id": id, "command": "blob", "payload": 40_000})));
    send_in_one_write(&mut client, frames).await;
    held.resolving().await;
    // Ten ping intervals with the replies held: four counted pings would close it. The
    // client reads meanwhile, but only pings queued before the held reply can reach it.
    let window = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(window);
    loop {
        tokio::select! {
            () = &mut window => break,
            gone = gone.recv() => panic!("closed while its replies were held back: {gone:?}"),
            frame = client.next() => {
                assert_eq!(frame["command"], "ping", "{frame}");
                client
                    .send_json(json!({"id": 99, "command": "pong", "payload": {}}))
                    .await;
            }
        }
    }
    held.release();
    // The subscription's reply first, then every other reply; pings are answered.
    let mut ids = Vec::new();
    within("every reply", async {
        while ids.len() < 5 {
            let frame = client.next().await;
            if frame["command"] == "ping" {
                client
                    .send_json(json!({"id": 100, "command": "pong", "payload": {}}))
                    .await;
                continue;
            }
            let id = frame["id"].as_u64().expect("a reply");
            if id == 1 {
                assert_eq!(frame["payload"]["success"], true, "{frame}");
            } else {
                assert_eq!(frame["payload"].as_str().map(str::len), Some(40_000));
            }
            ids.push(id);
        }
    })
    .await;
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    let stats = server.mesh.stats();
    assert_eq!(
        (stats.ping_timeout_closes, stats.slow_consumer_closes),
        (0, 0)
    );
    assert!(server.mesh.connection(&client.id).is_some());
}

/// Replies of 64 KiB asked for by a client that then stops reading: 12.5 MiB, more than
/// the socket buffers hold, so some stay queued on the server.
const UNREAD_REPLIES: u64 = 200;
const UNREAD_REPLY_BYTES: usize = 64 * 1024;

async fn a_client_that_stops_reading_under_a_broadcast_flood_is_closed(backend: Backend) {
    // It asked for replies and stopped reading; its reading is paused by them, but the
    // broadcasts it does not drain still close it.
    let builder = with_blob(backend.builder())
        .max_outbound_bytes(64 * 1024)
        .ping_interval(Duration::from_secs(3600))
        .latency_interval(Duration::from_secs(3600));
    let server = serve(builder).await;
    let mut slow = RawClient::connect(&server.url()).await;
    send_in_one_write(
        &mut slow,
        (1..=UNREAD_REPLIES)
            .map(|id| json!({"id": id, "command": "blob", "payload": UNREAD_REPLY_BYTES})),
    )
    .await;
    let kib = "k".repeat(1024);
    let mut sent = 0u64;
    while server.mesh.stats().slow_consumer_closes == 0 && sent < 200_000 {
        server
            .mesh
            .broadcast("flood", &json!({"n": sent, "data": kib}))
            .await
            .expect("broadcast");
        sent += 1;
        if sent % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(server.mesh.stats().slow_consumer_closes, 1);
    // The client now reads what was on its way, then the close frame: not every reply,
    // since the queued ones were dropped with the close.
    let mut replies = 0;
    let (code, reason) = within("the close frame", async {
        loop {
            let message = futures_util::StreamExt::next(&mut slow.socket)
                .await
                .expect("socket open")
                .expect("no socket error");
            match message {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(&text).expect("JSON");
                    if frame.get("id").is_some() {
                        replies += 1;
                    }
                }
                Message::Close(Some(frame)) => {
                    break (u16::from(frame.code), frame.reason.to_string())
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(code, 1008);
    assert_eq!(reason, "outbound queue full: client too slow");
    assert!(replies < UNREAD_REPLIES, "{replies} replies");
    assert_eq!(server.mesh.stats().ping_timeout_closes, 0);
}

async fn pushes_over_the_budget_close_even_while_replies_are_queued(backend: Backend) {
    // The replies wait behind a held subscription reply, over the budget: the connection
    // is not read. Pushes queue behind them and count against the budget on their own:
    // queued replies neither make them overflow nor shelter the client when they do.
    let held = HeldCollection::new();
    let builder = held
        .expose(with_blob(backend.builder()))
        .max_outbound_bytes(64 * 1024)
        .ping_interval(Duration::from_secs(3600))
        .latency_interval(Duration::from_secs(3600));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut frames = vec![HeldCollection::subscribe(1)];
    frames.extend((2..=4u64).map(|id| json!({"id": id, "command": "blob", "payload": 40_000})));
    send_in_one_write(&mut client, frames).await;
    held.resolving().await;
    // 52 KB of pushes fit beside 120 KB of replies...
    let kib = "k".repeat(1000);
    for n in 0..50 {
        server
            .mesh
            .send(&client.id, "bulk", &json!({"n": n, "data": kib}))
            .await
            .expect("send");
    }
    assert_eq!(server.mesh.stats().slow_consumer_closes, 0);
    assert!(server.mesh.connection(&client.id).is_some());
    // ...the push that takes the pushes over the budget closes the client.
    server
        .mesh
        .send(
            &client.id,
            "bulk",
            &json!({"n": 50, "data": kib.repeat(20)}),
        )
        .await
        .expect("send");
    assert_eq!(server.mesh.stats().slow_consumer_closes, 1);
    // Nothing queued went out: the close frame is the first thing the client reads.
    let (code, reason) = first_close(&mut client.socket).await;
    assert_eq!(code, 1008);
    assert_eq!(reason, "outbound queue full: client too slow");
    held.release();
}

async fn a_pipelining_client_that_never_reads_is_closed(backend: Backend) {
    // Its reading is paused by its own replies, so its missed pongs are excused only while
    // its replies still move; once the socket takes nothing for whole ping intervals, the
    // client is closed as not reading.
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let builder = with_blob(backend.builder())
        .max_outbound_bytes(64 * 1024)
        .ping_interval(Duration::from_millis(50))
        .max_missed_pongs(1)
        .latency_interval(Duration::from_secs(3600))
        .on_disconnect(move |connection: Connection| {
            let _ = gone_tx.send(connection.id().to_owned());
            async {}
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    send_in_one_write(
        &mut client,
        (1..=UNREAD_REPLIES)
            .map(|id| json!({"id": id, "command": "blob", "payload": UNREAD_REPLY_BYTES})),
    )
    .await;
    assert_eq!(recv_within(&mut gone).await, client.id);
    let stats = server.mesh.stats();
    assert_eq!(
        (stats.ping_timeout_closes, stats.slow_consumer_closes),
        (1, 0)
    );
}

/// A collection diff is a push the client never asked for, although it takes a reserved
/// place in the queue (before the updates of the records it adds): a subscriber that
/// stops reading while its collection keeps growing is closed as a slow consumer, instead
/// of piling up diffs for ever.
async fn collection_diffs_count_against_the_push_budget(backend: Backend) {
    let builder = backend
        .builder()
        .max_outbound_bytes(64 * 1024)
        .ping_interval(Duration::from_secs(3600))
        .latency_interval(Duration::from_secs(3600))
        .expose_record(
            tower_mesh::Regex::new("^flood:").expect("regex"),
            Access::open(),
        )
        .expose_collection(
            "flood",
            Collection::matching(tower_mesh::Regex::new("^flood:").expect("regex")),
        );
    let server = serve(builder).await;
    let mut slow = RawClient::connect(&server.url()).await;
    let reply = slow
        .command(
            1,
            "mesh/subscribe-collection",
            json!({"collectionId": "flood"}),
        )
        .await;
    assert_eq!(reply["payload"]["success"], true, "{reply}");
    // From now on it never reads: every new record reaches it in a diff.
    let chunk = "d".repeat(8 * 1024);
    let mut written = 0u64;
    while server.mesh.stats().slow_consumer_closes == 0 && written < 20_000 {
        written += 1;
        server
            .mesh
            .write_record(
                &format!("flood:{written}"),
                json!({ "data": chunk }),
                Default::default(),
            )
            .await
            .expect("write_record");
    }
    assert_eq!(
        server.mesh.stats().slow_consumer_closes,
        1,
        "{written} records written without closing the subscriber"
    );
}

/// `headers`: the names of the upgrade request's headers the connection kept, with the
/// value of `x-user`.
async fn kept_headers(connection: Connection) -> Value {
    let names: Vec<&str> = connection
        .headers()
        .keys()
        .map(|name| name.as_str())
        .collect();
    let kept_bytes: usize = connection
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let user = connection
        .headers()
        .get("x-user")
        .and_then(|value| value.to_str().ok());
    json!({ "names": names, "bytes": kept_bytes, "x-user": user })
}

/// The WebSocket handshake headers a raw upgrade sends before its own, in this order.
fn handshake_headers() -> Vec<(String, String)> {
    [
        ("host", "mesh.test".to_owned()),
        ("upgrade", "websocket".to_owned()),
        ("connection", "upgrade".to_owned()),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==".to_owned()),
        ("sec-websocket-version", "13".to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// Upgrades with exactly `headers`, in this order on the wire, and waits for the id.
async fn raw_upgrade(addr: std::net::SocketAddr, headers: &[(String, String)]) -> RawClient {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = String::from("GET / HTTP/1.1\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    // Frames may follow the 101 in the same read: what is past the head is handed on.
    let mut received = Vec::new();
    let end = within("the 101", async {
        loop {
            if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                return end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before answering: {received:?}");
            received.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&received[..end]).to_string();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let socket = tokio_tungstenite::WebSocketStream::from_partially_read(
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        received[end..].to_vec(),
        Role::Client,
        None,
    )
    .await;
    RawClient::assigned(socket).await
}

/// The names of the headers a connection kept, in order, as `headers` reports them.
async fn kept_names(client: &mut RawClient) -> (Vec<String>, Value) {
    let kept = client.command(1, "headers", json!({})).await["payload"].clone();
    let names = serde_json::from_value(kept["names"].clone()).expect("header names");
    (names, kept)
}

fn names(headers: &[(String, String)]) -> Vec<String> {
    headers.iter().map(|(name, _)| name.clone()).collect()
}

fn with(mut headers: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    headers.extend(
        extra
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    );
    headers
}

async fn a_huge_upgrade_header_is_not_kept_but_the_small_ones_are(backend: Backend) {
    let builder = backend.builder().command("headers", kept_headers);
    let server = serve(builder).await;

    // 300 KB (within hyper's limit on a request head), then the small headers a command
    // typically reads.
    let huge = "h".repeat(300_000);
    let sent = with(
        handshake_headers(),
        &[
            ("x-huge", huge.as_str()),
            ("x-user", "alice"),
            ("x-trace", "t-1"),
        ],
    );
    let mut client = raw_upgrade(server.addr, &sent).await;
    let (kept, report) = kept_names(&mut client).await;
    // Every other header, the ones after the huge one included, in order.
    let expected: Vec<String> = names(&sent)
        .into_iter()
        .filter(|name| name != "x-huge")
        .collect();
    assert_eq!(kept, expected, "{report}");
    assert_eq!(report["x-user"], "alice");

    // A request of ordinary size keeps every header.
    let sent = with(
        handshake_headers(),
        &[("x-user", "bob"), ("x-trace", "t-2")],
    );
    let mut client = raw_upgrade(server.addr, &sent).await;
    let (kept, report) = kept_names(&mut client).await;
    assert_eq!(kept, names(&sent));
    assert_eq!(report["x-user"], "bob");
}

async fn kept_headers_are_taken_in_request_order_within_the_budget(backend: Backend) {
    let header = |name: &str, size: usize| (name.to_owned(), "v".repeat(size - name.len()));
    let handshake = handshake_headers();
    let handshake_bytes: usize = handshake
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    // Room for the handshake and 150 bytes more: the first 100-byte header fits, the
    // second would not (it is left out), the 40-byte one after it still fits.
    let builder = backend
        .builder()
        .command("headers", kept_headers)
        .max_kept_header_bytes(handshake_bytes + 150);
    let server = serve(builder).await;
    let mut sent = handshake.clone();
    sent.extend([
        header("x-first", 100),
        header("x-second", 100),
        header("x-third", 40),
    ]);
    let mut client = raw_upgrade(server.addr, &sent).await;
    let (kept, report) = kept_names(&mut client).await;
    let mut expected = names(&handshake);
    expected.extend(["x-first".to_owned(), "x-third".to_owned()]);
    assert_eq!(kept, expected, "{report}");
    assert_eq!(report["bytes"], handshake_bytes + 140);
}

/// Connects, or returns the refusal: its status and `Retry-After` header.
async fn connect_or_refusal(url: &str) -> Result<RawClient, (u16, Option<String>)> {
    use tokio_tungstenite::tungstenite::Error;
    let (socket, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(connected) => connected,
        Err(Error::Http(response)) => {
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|value| value.to_str().expect("ASCII").to_owned());
            return Err((response.status().as_u16(), retry_after));
        }
        Err(other) => panic!("upgrade failed without an HTTP answer: {other}"),
    };
    Ok(RawClient::assigned(socket).await)
}

async fn upgrades_beyond_max_connections_get_503_until_one_closes(backend: Backend) {
    let (gone_tx, mut gone) = mpsc::unbounded_channel();
    let builder = backend
        .builder()
        .command("echo", echo)
        .max_connections(2)
        .on_disconnect(move |connection: Connection| {
            let _ = gone_tx.send(connection.id().to_owned());
            async {}
        });
    let server = serve(builder).await;
    let mut first = RawClient::connect(&server.url()).await;
    let mut second = RawClient::connect(&server.url()).await;

    let refusal = connect_or_refusal(&server.url()).await.err();
    assert_eq!(refusal, Some((503, Some("5".to_owned()))));
    assert_eq!(server.mesh.stats().refused_connections, 1);
    assert_eq!(server.mesh.stats().connections, 2);
    // The two connected are served as before.
    assert_echo_is_next(&mut second, 1).await;

    first.close().await;
    assert_eq!(recv_within(&mut gone).await, first.id);
    // Its place is given back when its task ends, just before the close is counted.
    within("the closed connection to be counted", async {
        while server.mesh.stats().connections_closed < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut third = connect_or_refusal(&server.url())
        .await
        .unwrap_or_else(|refusal| panic!("refused after a connection closed: {refusal:?}"));
    assert_echo_is_next(&mut third, 2).await;
    assert_eq!(server.mesh.stats().refused_connections, 1);
    assert_eq!(server.mesh.stats().connections_opened, 3);
}

async fn concurrent_upgrades_never_exceed_max_connections(backend: Backend) {
    const LIMIT: usize = 4;
    const ATTEMPTS: usize = 24;
    let server = serve(backend.builder().max_connections(LIMIT)).await;
    let url = server.url();
    let attempts = (0..ATTEMPTS).map(|_| connect_or_refusal(&url));
    let outcomes = within(
        "every upgrade to be answered",
        futures_util::future::join_all(attempts),
    )
    .await;
    let (connected, refused): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
    assert_eq!(connected.len(), LIMIT);
    for refusal in &refused {
        assert_eq!(refusal.as_ref().err(), Some(&(503, Some("5".to_owned()))));
    }
    let stats = server.mesh.stats();
    assert_eq!(stats.refused_connections, (ATTEMPTS - LIMIT) as u64);
    assert_eq!(stats.connections, LIMIT);
    assert_eq!(stats.connections_opened, LIMIT as u64);
}
