//! Waits with an overall deadline, and reading frames up to a push or a marker.

use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};
use tower_mesh::Mesh;

use super::{RawClient, WAIT};

/// Every wait has an overall deadline of [`WAIT`]. `RawClient`'s own timeout is per
/// frame, and the latency probe every 5 s would keep it from ever firing, so a missing
/// event would stall a test until the ping timeout instead of failing it.
pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The next message on a channel (hook calls, client callbacks), within [`WAIT`].
pub(crate) async fn recv_within<T>(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, receiver.recv())
        .await
        .expect("timed out waiting for a message on a channel")
        .expect("channel closed")
}

/// Asserts that nothing more arrives on a hook channel during a short window.
pub(crate) async fn assert_no_more<T: std::fmt::Debug>(
    receiver: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
) {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(200), receiver.recv()).await
    {
        panic!("unexpected extra hook call: {extra:?}");
    }
}

/// [`RawClient`]'s waits with an overall deadline (see [`within`]).
pub(crate) trait Within {
    /// [`RawClient::command`] with an overall deadline.
    async fn command_within(&mut self, id: u64, command: &str, payload: Value) -> Value;
    /// [`RawClient::push`] with an overall deadline.
    async fn push_within(&mut self, command: &str) -> Value;
}

impl Within for RawClient {
    async fn command_within(&mut self, id: u64, command: &str, payload: Value) -> Value {
        within(
            &format!("the reply to {command} #{id}"),
            self.command(id, command, payload),
        )
        .await
    }

    async fn push_within(&mut self, command: &str) -> Value {
        within(&format!("a {command} push"), self.push(command)).await
    }
}

/// The reply with this id exactly as the server wrote it (other frames skipped).
pub(crate) async fn reply_text(client: &mut RawClient, id: u64) -> String {
    within(&format!("the reply #{id}"), client.reply_text(id)).await
}

/// The next push named `command` exactly as the server wrote it (other frames skipped).
pub(crate) async fn push_text(client: &mut RawClient, command: &str) -> String {
    within(&format!("a {command} push"), async {
        loop {
            let text = client.next_text().await;
            let frame: Value = serde_json::from_str(&text).expect("JSON");
            if frame.get("id").is_none() && frame["command"] == command {
                return text;
            }
        }
    })
    .await
}

/// Whether the `frames_before_*` helpers keep the pushes the server sends on its own
/// schedule (pings and latency probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noise {
    /// Every frame is returned.
    Kept,
    /// Pings and latency probes are left out: for suites whose waits can span one.
    Dropped,
}

/// A push the server sends on its own schedule (see [`Noise`]).
pub(crate) fn is_noise(frame: &Value) -> bool {
    frame.get("id").is_none()
        && matches!(
            frame["command"].as_str(),
            Some("latency" | "latency:request" | "ping")
        )
}

/// Reads frames until the push named `command`; returns the frames read before it.
pub(crate) async fn frames_before_push(
    client: &mut RawClient,
    command: &str,
    noise: Noise,
) -> Vec<Value> {
    within(&format!("a {command} push"), async {
        let mut before = Vec::new();
        loop {
            let frame = client.next().await;
            if frame.get("id").is_none() && frame["command"] == command {
                return before;
            }
            if noise == Noise::Kept || !is_noise(&frame) {
                before.push(frame);
            }
        }
    })
    .await
}

/// Broadcasts `marker` to every connection of the mesh and returns, per client, the
/// frames that came before it.
///
/// On one Redis and in memory a broadcast is ordered after anything published before it.
/// On a Cluster it is not (docs/protocol.md §5): a broadcast travels on classic pub/sub,
/// while a room's, channel's or record's pushes travel on their shard, over another
/// connection. So the marker goes out twice: the second only once every client has the
/// first, which gives a push published before the first a whole round trip more to
/// arrive. The frames before the second marker count (the first is left out).
pub(crate) async fn frames_before_marker(
    mesh: &Mesh,
    marker: &str,
    clients: &mut [&mut RawClient],
    noise: Noise,
) -> Vec<Vec<Value>> {
    let mut all = Vec::new();
    mesh.broadcast(marker, &json!(null))
        .await
        .expect("broadcast marker");
    for client in clients.iter_mut() {
        all.push(frames_before_push(client, marker, noise).await);
    }
    mesh.broadcast(marker, &json!(null))
        .await
        .expect("broadcast marker");
    for (client, before) in clients.iter_mut().zip(all.iter_mut()) {
        before.extend(frames_before_push(client, marker, noise).await);
    }
    all
}

/// The pushes named `command` among `frames`.
pub(crate) fn pushes_named<'a>(frames: &'a [Value], command: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|frame| frame.get("id").is_none() && frame["command"] == command)
        .collect()
}
