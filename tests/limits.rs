//! Bounded connections: the outbound queue budget (a client that stops reading is closed
//! while everyone else keeps receiving) and the per-connection in-flight limit, on every
//! backend. (The inbound frame limit is in bad_input.rs.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tower_mesh::extract::{Connection, Payload};
use tower_mesh::{Access, BoxError, Collection, Mesh, MeshBuilder};

conformance!(
    slow_consumer_is_closed_while_others_keep_receiving,
    in_flight_limit_holds_back_further_commands,
    slow_consumer_that_reads_late_gets_a_close_frame,
    pongs_are_read_while_the_in_flight_limit_is_reached,
    a_pipelining_client_gets_every_large_reply,
    a_reply_over_the_budget_then_a_tiny_one_both_arrive,
    pings_behind_queued_replies_are_not_counted_as_missed,
    a_client_that_stops_reading_under_a_broadcast_flood_is_closed,
    pushes_over_the_budget_close_even_while_replies_are_queued,
    a_pipelining_client_that_never_reads_is_closed,
    collection_diffs_count_against_the_push_budget,
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
    // Replies are back-pressure, not the push budget (PROTOCOL.md §9): 60 replies of about
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
        .expose_record(tower_mesh::Regex::new("^flood:").expect("regex"), Access::open())
        .expose_collection(
            "flood",
            Collection::matching(tower_mesh::Regex::new("^flood:").expect("regex")),
        );
    let server = serve(builder).await;
    let mut slow = RawClient::connect(&server.url()).await;
    let reply = slow
        .command(1, "mesh/subscribe-collection", json!({"collectionId": "flood"}))
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
