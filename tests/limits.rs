//! Bounded connections: the outbound queue budget (a client that stops reading is closed
//! while everyone else keeps receiving) and the per-connection in-flight limit, on every
//! backend. (The inbound frame limit is in bad_input.rs.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tower_mesh::extract::{Connection, Payload};

conformance!(
    slow_consumer_is_closed_while_others_keep_receiving,
    in_flight_limit_holds_back_further_commands,
    slow_consumer_that_reads_late_gets_a_close_frame,
    pongs_are_read_while_the_in_flight_limit_is_reached,
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
