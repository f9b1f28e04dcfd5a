//! The physical limit for broadcast on this stack: a bare tokio + tokio-tungstenite server
//! speaking just enough of the mesh wire protocol for `bench broadcast` to drive it
//! unchanged. It is the baseline tower-mesh's room broadcast is measured against, so it is
//! written to be as fast as the stack allows: a multi-thread runtime, a reader and a writer
//! task per connection, Nagle disabled, each pushed frame serialised once and shared by every
//! member, and writes batched (each queued frame is `feed`ed and the socket is flushed only
//! when no further frame is immediately queued, so a burst costs one write).
//!
//! What it speaks (nothing else: no pings, no presence, no limits):
//! - on connect it sends `{"command":"mesh/assign-id","payload":"<id>"}`, a unique id;
//! - `mesh/join-room {roomName}` joins the room and replies
//!   `{"id":<id>,"command":"mesh/join-room","payload":{"success":true,"present":[]}}`;
//! - `broadcast-room {room, message}` pushes `{"command":"room-message","payload":<message>}`
//!   to every member of `room` and replies
//!   `{"id":<id>,"command":"broadcast-room","payload":{"success":true}}`;
//! - anything else (`pong` included) is ignored; a connection that closes leaves its rooms.
//!
//! Contract: `PORT` (default 8789); `GET /health` answers `200 OK` (handled by hand, before
//! the WebSocket handshake); any other request is upgraded to a WebSocket on any path.
//!
//! ```text
//! cargo run --release -p tower-mesh-bench --bin raw_fanout
//! PORT=18789 cargo run --release -p tower-mesh-bench --bin raw_fanout
//! ```

#[path = "../health.rs"]
mod health;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Socket read buffer per connection: tower-mesh's default. tungstenite's own (128 KiB) is
/// zeroed before every read, which with thousands of members would measure memset.
const READ_BUFFER_BYTES: usize = 4 * 1024;

type Ws = WebSocketStream<TcpStream>;

/// A connection's outbox. Unbounded, so a broadcast never waits on one slow member (a
/// bounded one would either stall the whole room behind it or drop frames); the frames are
/// shared, so a backlog costs a queue slot per frame, not a copy. A real server would bound
/// it and drop the laggard; the baseline measures the unhindered path.
type Outbox = mpsc::UnboundedSender<Message>;

/// Members of each room, by connection id.
#[derive(Default)]
struct Rooms {
    members: RwLock<HashMap<String, HashMap<u64, Outbox>>>,
}

impl Rooms {
    fn join(&self, room: &str, id: u64, outbox: &Outbox) {
        let mut rooms = self.members.write().unwrap_or_else(|e| e.into_inner());
        rooms
            .entry(room.to_owned())
            .or_default()
            .insert(id, outbox.clone());
    }

    fn leave(&self, room: &str, id: u64) {
        let mut rooms = self.members.write().unwrap_or_else(|e| e.into_inner());
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Queues `frame` for every member. An unbounded send never waits, so the members are
    /// sent to under the read lock instead of cloning every sender out first; concurrent
    /// broadcasts share the lock, only joins and leaves wait.
    fn broadcast(&self, room: &str, frame: &Utf8Bytes) {
        let rooms = self.members.read().unwrap_or_else(|e| e.into_inner());
        if let Some(members) = rooms.get(room) {
            for outbox in members.values() {
                // A member whose writer has ended is leaving; its reader removes it.
                let _ = outbox.send(Message::Text(frame.clone()));
            }
        }
    }
}

/// The head of every client frame. `id` is kept raw: replies echo it as sent.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    command: Cow<'a, str>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct JoinRoom<'a> {
    #[serde(borrow, rename = "roomName")]
    room_name: Cow<'a, str>,
}

#[derive(Deserialize)]
struct BroadcastRoom<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow)]
    message: &'a RawValue,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let listener = health::bind("raw_fanout", 8789).await?;
    let rooms = Arc::new(Rooms::default());
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let stream = health::accept(&listener).await;
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(stream, id, rooms.clone()));
    }
}

/// Answers a health check by hand, or upgrades and serves the connection.
async fn serve(mut stream: TcpStream, id: u64, rooms: Arc<Rooms>) {
    let _ = stream.set_nodelay(true);
    if health::is_health_check(&stream).await {
        health::answer_health(&mut stream).await;
        return;
    }
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (sink, stream) = ws.split();
    let (outbox, queued) = mpsc::unbounded_channel();
    let assign = format!(r#"{{"command":"mesh/assign-id","payload":"{id}"}}"#);
    let _ = outbox.send(Message::text(assign));
    let writer = tokio::spawn(write(sink, queued));
    let joined = read(stream, id, &outbox, &rooms).await;
    for room in &joined {
        rooms.leave(room, id);
    }
    // The writer ends once every sender is gone: this one, and the rooms' just removed.
    drop(outbox);
    let _ = writer.await;
}

/// Handles the connection's frames until it closes; returns the rooms it joined.
async fn read(mut stream: SplitStream<Ws>, id: u64, outbox: &Outbox, rooms: &Rooms) -> Vec<String> {
    let mut joined = Vec::new();
    while let Some(Ok(msg)) = stream.next().await {
        let bytes: &[u8] = match &msg {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
            // tungstenite answers pings and close frames itself.
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        let Ok(request) = serde_json::from_slice::<Request>(bytes) else {
            continue;
        };
        match &*request.command {
            "mesh/join-room" => {
                let Some(join) = parse::<JoinRoom>(request.payload) else {
                    continue;
                };
                if !joined.iter().any(|room| *room == join.room_name) {
                    rooms.join(&join.room_name, id, outbox);
                    joined.push(join.room_name.into_owned());
                }
                reply(
                    outbox,
                    request.id,
                    "mesh/join-room",
                    r#"{"success":true,"present":[]}"#,
                );
            }
            "broadcast-room" => {
                let Some(broadcast) = parse::<BroadcastRoom>(request.payload) else {
                    continue;
                };
                // Serialised once; every member's `Message` shares these bytes.
                let frame = Utf8Bytes::from(format!(
                    r#"{{"command":"room-message","payload":{}}}"#,
                    broadcast.message.get()
                ));
                rooms.broadcast(&broadcast.room, &frame);
                reply(outbox, request.id, "broadcast-room", r#"{"success":true}"#);
            }
            _ => {}
        }
    }
    joined
}

/// The payload as `T`; `None` when it is missing or malformed (the frame is ignored).
fn parse<'a, T: Deserialize<'a>>(payload: Option<&'a RawValue>) -> Option<T> {
    serde_json::from_str(payload?.get()).ok()
}

/// Queues a reply to a command; a command sent without an id gets none.
fn reply(outbox: &Outbox, id: Option<&RawValue>, command: &str, payload: &str) {
    let Some(id) = id else { return };
    let frame = format!(
        r#"{{"id":{},"command":"{command}","payload":{payload}}}"#,
        id.get()
    );
    let _ = outbox.send(Message::text(frame));
}

/// Writes queued frames: `feed` each, and flush only when no further frame is queued now.
async fn write(mut sink: SplitSink<Ws, Message>, mut queued: mpsc::UnboundedReceiver<Message>) {
    while let Some(frame) = queued.recv().await {
        if sink.feed(frame).await.is_err() {
            return;
        }
        while let Ok(frame) = queued.try_recv() {
            if sink.feed(frame).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
