//! One listener's stream of record updates: it never goes backwards.
//!
//! A subscription starts with a snapshot (the record's value and version, in a
//! subscribe reply or a collection's member list), read *after* the listener starts
//! listening so that no update falls between the two. Updates published before the
//! snapshot was read can therefore still arrive after it (on Redis, pub/sub is a
//! different connection than the read), and a catch-up after a pub/sub reconnect
//! re-sends what may already have arrived. mesh's client answers a patch whose version is
//! not its current one + 1 by subscribing again, so each stale or repeated update would
//! cost a resync round trip (docs/protocol.md §7.2).
//!
//! So each listener remembers the highest version it was given (a snapshot's version
//! counts) and drops any update at or below it. While a snapshot is being read, updates
//! wait here and, once its version is known, only the newer ones follow the reply. A gap
//! (a version that never arrived) passes as it is: the client resyncs over it. A deletion
//! is always delivered, in order, and the next incarnation of the record starts again
//! from version 1.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::connection::Connection;
use crate::protocol::Frame;

/// Updates held while a snapshot is read are few (one read's worth of writes); beyond
/// this many, the oldest are dropped, which the client sees as a gap and resyncs over.
const MAX_HELD: usize = 64;

/// Where one listener's record stream stands. Shared by every copy of the listener.
#[derive(Default)]
pub(crate) struct RecordStream {
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    /// The highest version this listener was given, snapshots included.
    delivered: u64,
    /// Snapshots being read: while any is, events wait in `held`.
    snapshots_pending: u32,
    held: VecDeque<(Event, Option<Frame>)>,
    /// The listener stopped listening: a delivery that raced with its end is dropped.
    ended: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Update(u64),
    Deleted,
}

impl RecordStream {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Offers the update to `version`; it is sent to `connection` unless it is not newer
    /// than what the listener has, or held until a pending snapshot is read.
    pub(crate) fn offer_update(&self, connection: &Connection, version: u64, frame: Frame) {
        self.lock()
            .offer(connection, Event::Update(version), Some(frame));
    }

    /// Offers a deletion: the next incarnation of the record starts again from version 1.
    /// The notice (`None` for a listener that mesh's clients do not tell, one only a
    /// collection holds) is always sent, in order with the updates.
    pub(crate) fn offer_deleted(&self, connection: &Connection, notice: Option<Frame>) {
        self.lock().offer(connection, Event::Deleted, notice);
    }

    /// Stops the stream: nothing offered from now on is sent through it. What a pending
    /// snapshot holds still follows that snapshot.
    pub(crate) fn end(&self) {
        self.lock().ended = true;
    }

    /// Holds events until the snapshot this begins is read. Called where the listen
    /// starts, in the same step, so that no delivery slips between the two.
    pub(crate) fn begin_snapshot(self: &Arc<Self>, connection: &Connection) -> Snapshot {
        self.lock().snapshots_pending += 1;
        Snapshot {
            stream: Some(self.clone()),
            connection: connection.clone(),
        }
    }
}

impl StreamState {
    fn offer(&mut self, connection: &Connection, event: Event, frame: Option<Frame>) {
        if self.ended {
            return;
        }
        if self.snapshots_pending > 0 {
            if self.held.len() == MAX_HELD {
                self.held.pop_front();
            }
            self.held.push_back((event, frame));
            return;
        }
        self.deliver(connection, event, frame);
    }

    fn deliver(&mut self, connection: &Connection, event: Event, frame: Option<Frame>) {
        match event {
            Event::Update(version) if version <= self.delivered => {
                tracing::trace!(
                    version,
                    delivered = self.delivered,
                    "dropped a record update the listener already has"
                );
                return;
            }
            Event::Update(version) => self.delivered = version,
            Event::Deleted => self.delivered = 0,
        }
        // Sent under the stream's lock, so a concurrent delivery cannot overtake the
        // events a snapshot releases.
        if let Some(frame) = frame {
            send(connection, frame);
        }
    }

    fn snapshot_done(&mut self, connection: &Connection, read: Option<(u64, Option<Frame>)>) {
        match read {
            // The snapshot's own update, first (unless the listener has that version).
            Some((version, Some(frame))) => {
                self.deliver(connection, Event::Update(version), Some(frame))
            }
            Some((version, None)) => self.delivered = self.delivered.max(version),
            None => {}
        }
        self.snapshots_pending = self.snapshots_pending.saturating_sub(1);
        if self.snapshots_pending == 0 {
            // Held before the stream ended (a deletion that ended the subscription, say):
            // still owed to the client, after its snapshot.
            for (event, frame) in std::mem::take(&mut self.held) {
                self.deliver(connection, event, frame);
            }
        }
    }
}

/// Sends a stream's frame to its listener: through the registry (which counts it against
/// the push budget) while the mesh is alive, else straight onto the connection's queue.
/// Shared with the channel streams.
pub(crate) fn send(connection: &Connection, frame: Frame) {
    match connection.mesh() {
        Some(mesh) => {
            let _ = mesh.registry().send_frame(connection, frame);
        }
        None => {
            let _ = connection.push_frame(frame);
        }
    }
}

/// A snapshot being read for one listener. Say which version it read with
/// [`Snapshot::taken`]; dropped without that (the read failed), the held events are
/// released as they are.
#[must_use = "a snapshot holds its listener's updates until it is taken"]
pub(crate) struct Snapshot {
    stream: Option<Arc<RecordStream>>,
    connection: Connection,
}

impl Snapshot {
    /// The snapshot read the record at `version` (0 when it does not exist): the listener
    /// has it, and only newer updates follow.
    pub(crate) fn taken(mut self, version: u64) {
        if let Some(stream) = self.stream.take() {
            stream
                .lock()
                .snapshot_done(&self.connection, Some((version, None)));
        }
    }

    /// As [`Snapshot::taken`], and sends `update` (the record at `version`) before
    /// anything newer: mesh follows a collection diff that adds a record just written
    /// with that record's `mesh/record-update`. It is not sent to a listener that already
    /// has that version.
    pub(crate) fn taken_with_update(mut self, version: u64, update: Frame) {
        if let Some(stream) = self.stream.take() {
            stream
                .lock()
                .snapshot_done(&self.connection, Some((version, Some(update))));
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.lock().snapshot_done(&self.connection, None);
        }
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("connection", &self.connection.id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Batch;

    fn connection() -> Connection {
        let (parts, ()) = http::Request::new(()).into_parts();
        Connection::new(Arc::from("c"), parts, 1 << 20, std::sync::Weak::new())
    }

    /// What the connection was sent so far.
    async fn sent(connection: &Connection) -> Vec<String> {
        connection.push_frame(Frame::from("end")).expect("queued");
        let mut out = Vec::new();
        while !out.iter().any(|frame: &Frame| frame.as_str() == "end") {
            assert!(matches!(
                connection.outbound().next_batch(&mut out).await,
                Batch::Frames
            ));
        }
        out.pop();
        out.iter().map(|frame| frame.as_str().to_owned()).collect()
    }

    #[tokio::test]
    async fn a_snapshot_drops_what_it_covers_and_releases_what_is_newer_in_order() {
        let connection = connection();
        let stream = Arc::new(RecordStream::default());
        let snapshot = stream.begin_snapshot(&connection);
        for version in [3, 4, 5, 6] {
            stream.offer_update(&connection, version, Frame::from(version.to_string()));
        }
        assert!(
            sent(&connection).await.is_empty(),
            "held until the snapshot"
        );
        snapshot.taken(4);
        stream.offer_update(&connection, 6, Frame::from("6 again"));
        stream.offer_update(&connection, 8, Frame::from("8"));
        assert_eq!(sent(&connection).await, ["5", "6", "8"]);
    }

    #[tokio::test]
    async fn a_deletion_always_passes_and_the_next_incarnation_starts_at_one() {
        let connection = connection();
        let stream = Arc::new(RecordStream::default());
        stream.begin_snapshot(&connection).taken(7);
        stream.offer_deleted(&connection, Some(Frame::from("deleted")));
        stream.offer_update(&connection, 1, Frame::from("1"));
        assert_eq!(sent(&connection).await, ["deleted", "1"]);
    }

    #[tokio::test]
    async fn an_untold_deletion_still_restarts_the_versions() {
        let connection = connection();
        let stream = Arc::new(RecordStream::default());
        stream.begin_snapshot(&connection).taken(7);
        stream.offer_deleted(&connection, None);
        stream.offer_update(&connection, 1, Frame::from("1"));
        assert_eq!(sent(&connection).await, ["1"]);
    }

    #[tokio::test]
    async fn a_snapshots_own_update_comes_before_newer_ones_and_only_once() {
        let connection = connection();
        let stream = Arc::new(RecordStream::default());
        let snapshot = stream.begin_snapshot(&connection);
        for version in [3, 4, 5] {
            stream.offer_update(&connection, version, Frame::from(version.to_string()));
        }
        snapshot.taken_with_update(4, Frame::from("4 whole"));
        let again = stream.begin_snapshot(&connection);
        again.taken_with_update(5, Frame::from("5 whole"));
        assert_eq!(sent(&connection).await, ["4 whole", "5"]);
    }

    #[tokio::test]
    async fn a_failed_snapshot_releases_what_it_held() {
        let connection = connection();
        let stream = Arc::new(RecordStream::default());
        stream.begin_snapshot(&connection).taken(2);
        let failed = stream.begin_snapshot(&connection);
        stream.offer_update(&connection, 2, Frame::from("2"));
        stream.offer_update(&connection, 3, Frame::from("3"));
        drop(failed);
        assert_eq!(sent(&connection).await, ["3"]);
    }

    #[tokio::test]
    async fn an_ended_stream_sends_only_what_its_snapshot_held() {
        let connection = connection();
        let stream = Arc::new(RecordStream::default());
        let snapshot = stream.begin_snapshot(&connection);
        stream.offer_deleted(&connection, Some(Frame::from("deleted")));
        stream.end();
        stream.offer_update(&connection, 1, Frame::from("1"));
        snapshot.taken(0);
        assert_eq!(sent(&connection).await, ["deleted"]);
    }

    #[tokio::test]
    async fn concurrent_snapshots_release_once_both_are_taken() {
        let connection = connection();
        let stream = Arc::new(RecordStream::default());
        let first = stream.begin_snapshot(&connection);
        let second = stream.begin_snapshot(&connection);
        stream.offer_update(&connection, 5, Frame::from("5"));
        stream.offer_update(&connection, 6, Frame::from("6"));
        first.taken(4);
        assert!(sent(&connection).await.is_empty());
        second.taken(5);
        assert_eq!(sent(&connection).await, ["6"]);
    }
}
