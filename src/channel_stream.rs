//! One listener's stream of channel messages: no message twice, none lost between a
//! subscription's history and its live messages.
//!
//! A subscription reads the channel's history (with the position of the newest message)
//! *after* the listener starts listening, so no message falls between the two. Messages
//! published before the read can therefore still arrive after it (on Redis, pub/sub is a
//! different connection than the read): they are in the reply already, or before the
//! position the reply gives, so sending them would break recovery's promise of exactly
//! the missed messages, then the live ones.
//!
//! So while the history is read, messages wait here; once the reply's position is known,
//! only those after it follow the reply. From then on the stream drops any message at or
//! before the newest it was given, in the same epoch (a message of another epoch means
//! the stream was reset, and passes). Messages without a position (a Redis plain
//! channel's) always pass.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::ChannelPosition;
use crate::connection::Connection;
use crate::protocol::Frame;
use crate::record_stream::send;

/// Messages held while a history is read are one read's worth of writes. Beyond this many
/// the stream stops holding and sends them all as they come: nothing is lost, but the
/// snapshot may then overlap them, so it reports that it could not be exact.
const MAX_HELD: usize = 1024;

/// Where one listener's channel stream stands. Shared by every copy of the listener.
#[derive(Default)]
pub(crate) struct ChannelStream {
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    /// The newest message this listener was given (or that a snapshot covered).
    delivered: Option<ChannelPosition>,
    /// Snapshots being read: while any is, messages wait in `held`.
    snapshots_pending: u32,
    held: VecDeque<(Option<ChannelPosition>, Frame)>,
    /// The held messages overflowed and were sent before the pending snapshots were
    /// taken: those snapshots may overlap what was sent.
    overflowed: bool,
    /// The listener stopped listening: a delivery that raced with its end is dropped.
    ended: bool,
}

impl ChannelStream {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Offers a message at `position`: sent to `connection` unless the listener has it
    /// already, or held until a pending snapshot is taken.
    pub(crate) fn offer(
        &self,
        connection: &Connection,
        position: Option<&ChannelPosition>,
        frame: Frame,
    ) {
        let mut state = self.lock();
        if state.ended {
            return;
        }
        if state.snapshots_pending > 0 && !state.overflowed {
            if state.held.len() < MAX_HELD {
                state.held.push_back((position.cloned(), frame));
                return;
            }
            tracing::debug!("too many channel messages held during a history read; sending them");
            state.overflowed = true;
            for (held_position, held_frame) in std::mem::take(&mut state.held) {
                state.deliver(connection, held_position.as_ref(), held_frame);
            }
        }
        state.deliver(connection, position, frame);
    }

    /// Stops the stream: nothing offered from now on is sent through it. What a pending
    /// snapshot holds still follows that snapshot.
    pub(crate) fn end(&self) {
        self.lock().ended = true;
    }

    /// Holds messages until the snapshot this begins is taken. Called where the listen
    /// starts, in the same step, so that no delivery slips between the two.
    pub(crate) fn begin_snapshot(self: &Arc<Self>, connection: &Connection) -> ChannelSnapshot {
        self.lock().snapshots_pending += 1;
        ChannelSnapshot {
            stream: Some(self.clone()),
            connection: connection.clone(),
        }
    }
}

impl StreamState {
    fn deliver(
        &mut self,
        connection: &Connection,
        position: Option<&ChannelPosition>,
        frame: Frame,
    ) {
        if let Some(position) = position {
            match &self.delivered {
                Some(delivered)
                    if delivered.epoch == position.epoch && position.offset <= delivered.offset =>
                {
                    tracing::trace!(
                        offset = position.offset,
                        delivered = delivered.offset,
                        "dropped a channel message the listener already has"
                    );
                    return;
                }
                _ => self.delivered = Some(position.clone()),
            }
        }
        // Sent under the stream's lock, so a concurrent delivery cannot overtake the
        // messages a snapshot releases.
        send(connection, frame);
    }

    /// Returns whether the snapshot is exact: no message it may overlap was sent.
    fn snapshot_done(
        &mut self,
        connection: &Connection,
        position: Option<ChannelPosition>,
    ) -> bool {
        if let Some(position) = position {
            let newer = match &self.delivered {
                Some(delivered) if delivered.epoch == position.epoch => {
                    position.offset > delivered.offset
                }
                _ => true,
            };
            if newer {
                self.delivered = Some(position);
            }
        }
        let exact = !self.overflowed;
        self.snapshots_pending = self.snapshots_pending.saturating_sub(1);
        if self.snapshots_pending == 0 {
            self.overflowed = false;
            // Held before the stream ended: still owed to the client, after its snapshot.
            for (position, frame) in std::mem::take(&mut self.held) {
                self.deliver(connection, position.as_ref(), frame);
            }
        }
        exact
    }
}

/// A history being read for one listener. Say which position it read with
/// [`ChannelSnapshot::taken`]; dropped without that (the read failed), the held messages
/// are released as they are.
#[must_use = "a snapshot holds its listener's messages until it is taken"]
pub(crate) struct ChannelSnapshot {
    stream: Option<Arc<ChannelStream>>,
    connection: Connection,
}

impl ChannelSnapshot {
    /// The read saw the channel up to `position` (`None`: a channel without positions):
    /// the listener has everything up to it, and only later messages follow. Returns
    /// whether that holds exactly: `false` when held messages overflowed and were sent
    /// before the position was known, so some may repeat what the read returned.
    pub(crate) fn taken(mut self, position: Option<ChannelPosition>) -> bool {
        match self.stream.take() {
            Some(stream) => stream.lock().snapshot_done(&self.connection, position),
            None => true,
        }
    }
}

impl Drop for ChannelSnapshot {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.lock().snapshot_done(&self.connection, None);
        }
    }
}

impl std::fmt::Debug for ChannelSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSnapshot")
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

    fn at(epoch: &str, offset: u64) -> ChannelPosition {
        ChannelPosition {
            epoch: Arc::from(epoch),
            offset,
        }
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

    fn offer(stream: &ChannelStream, connection: &Connection, epoch: &str, offset: u64) {
        stream.offer(
            connection,
            Some(&at(epoch, offset)),
            Frame::from(format!("{epoch}{offset}")),
        );
    }

    #[tokio::test]
    async fn a_snapshot_drops_what_it_covers_and_releases_what_is_newer_in_order() {
        let connection = connection();
        let stream = Arc::new(ChannelStream::default());
        let snapshot = stream.begin_snapshot(&connection);
        for offset in [3, 4, 5, 6] {
            offer(&stream, &connection, "e", offset);
        }
        assert!(
            sent(&connection).await.is_empty(),
            "held until the snapshot"
        );
        assert!(snapshot.taken(Some(at("e", 4))));
        offer(&stream, &connection, "e", 6);
        offer(&stream, &connection, "e", 3);
        offer(&stream, &connection, "e", 7);
        assert_eq!(sent(&connection).await, ["e5", "e6", "e7"]);
    }

    #[tokio::test]
    async fn another_epoch_passes_and_positionless_messages_always_pass() {
        let connection = connection();
        let stream = Arc::new(ChannelStream::default());
        assert!(stream.begin_snapshot(&connection).taken(Some(at("old", 9))));
        offer(&stream, &connection, "new", 1);
        stream.offer(&connection, None, Frame::from("plain"));
        offer(&stream, &connection, "new", 1);
        offer(&stream, &connection, "new", 2);
        assert_eq!(sent(&connection).await, ["new1", "plain", "new2"]);
    }

    #[tokio::test]
    async fn an_overflow_sends_everything_and_the_snapshot_says_it_is_not_exact() {
        let connection = connection();
        let stream = Arc::new(ChannelStream::default());
        let snapshot = stream.begin_snapshot(&connection);
        for offset in 1..=(MAX_HELD as u64 + 1) {
            offer(&stream, &connection, "e", offset);
        }
        assert_eq!(sent(&connection).await.len(), MAX_HELD + 1);
        assert!(!snapshot.taken(Some(at("e", 5))));
        offer(&stream, &connection, "e", MAX_HELD as u64 + 1);
        offer(&stream, &connection, "e", MAX_HELD as u64 + 2);
        assert_eq!(sent(&connection).await, [format!("e{}", MAX_HELD + 2)]);
        assert!(
            stream.begin_snapshot(&connection).taken(None),
            "exact again"
        );
    }

    #[tokio::test]
    async fn a_failed_snapshot_releases_what_it_held() {
        let connection = connection();
        let stream = Arc::new(ChannelStream::default());
        let failed = stream.begin_snapshot(&connection);
        offer(&stream, &connection, "e", 1);
        drop(failed);
        assert_eq!(sent(&connection).await, ["e1"]);
    }
}
