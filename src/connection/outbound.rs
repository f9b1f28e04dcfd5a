//! A connection's outbound queue, bounded in bytes.
//!
//! Producers (replies, pushes, broadcasts) never wait: a frame is queued, or the
//! connection is marked for closing because its client does not drain what it is sent.
//! The writer takes everything queued in one batch, so frames that arrive together are
//! written with one flush.
//!
//! A subscription command reserves its reply's place in the queue before it runs: frames
//! queued after the reservation (updates published after the command read its snapshot)
//! wait behind it, so the client always gets the reply first and never an update it
//! cannot yet place.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::protocol::Frame;

/// Why a connection is being closed by the server (or was closed by the peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the connection, or the network dropped it.
    PeerClosed,
    /// The server closed it on purpose, with a reason (close code 1000).
    Normal(String),
    /// The server is shutting down (close code 1001).
    GoingAway,
    /// The client did not drain its outbound queue (close code 1008).
    SlowConsumer,
    /// The client missed too many pings (close code 1008).
    PingTimeout,
    /// The client sent a frame over the size limit (close code 1009).
    FrameTooLarge,
    /// The `on_connect` hook refused the connection (close code 1008).
    Refused(String),
    /// A protocol or I/O error on the socket (close code 1002).
    ProtocolError(String),
    /// The backend was unreachable when the connection arrived (close code 1013, try again later).
    Unavailable,
    /// The backend lost the connection's rooms, presence and metadata (a restarted Redis,
    /// or this instance was swept as dead during a stall); the client should reconnect
    /// and set them up again (close code 1012, service restart).
    StateLost,
}

impl CloseReason {
    /// The WebSocket close code sent for this reason.
    pub fn code(&self) -> u16 {
        match self {
            CloseReason::PeerClosed | CloseReason::Normal(_) => 1000,
            CloseReason::GoingAway => 1001,
            CloseReason::ProtocolError(_) => 1002,
            CloseReason::SlowConsumer | CloseReason::PingTimeout | CloseReason::Refused(_) => 1008,
            CloseReason::FrameTooLarge => 1009,
            CloseReason::StateLost => 1012,
            CloseReason::Unavailable => 1013,
        }
    }

    /// The reason text sent in the close frame (at most 123 bytes on the wire).
    pub fn text(&self) -> String {
        let text = match self {
            CloseReason::PeerClosed => "closed by peer",
            CloseReason::Normal(reason)
            | CloseReason::Refused(reason)
            | CloseReason::ProtocolError(reason) => reason,
            CloseReason::GoingAway => "server shutting down",
            CloseReason::SlowConsumer => "outbound queue full: client too slow",
            CloseReason::PingTimeout => "ping timeout: missed pongs",
            CloseReason::FrameTooLarge => "frame too large",
            CloseReason::Unavailable => "server unavailable, try again later",
            CloseReason::StateLost => "server state lost, reconnect",
        };
        truncate_utf8(text, 123).to_owned()
    }

    /// Whether frames already queued should still be written before the close frame.
    fn keeps_queued_frames(&self) -> bool {
        matches!(self, CloseReason::Normal(_) | CloseReason::GoingAway)
    }
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection is closed or closing.
    Closed,
    /// The queue is full: the connection is now being closed as a slow consumer.
    QueueFull,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::Closed => "connection closed",
            SendError::QueueFull => "outbound queue full",
        })
    }
}

impl std::error::Error for SendError {}

pub(crate) struct Outbound {
    state: Mutex<QueueState>,
    wake_writer: Notify,
    closing: Notify,
    max_bytes: usize,
}

#[derive(Default)]
struct QueueState {
    slots: VecDeque<Slot>,
    bytes: usize,
    close: Option<CloseReason>,
    next_reservation: u64,
}

enum Slot {
    Frame(Frame),
    /// The place of a reply not written yet; the writer stops here until it is filled.
    Reserved(u64),
}

/// What the writer should do next.
pub(crate) enum Batch {
    /// Write these frames (moved into the caller's buffer), then ask again.
    Frames,
    /// Write the close frame and stop.
    Close(CloseReason),
}

impl Outbound {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Outbound {
            state: Mutex::new(QueueState::default()),
            wake_writer: Notify::new(),
            closing: Notify::new(),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame. A frame larger than the whole budget still goes out when the queue
    /// is empty, so one large reply is never mistaken for a slow client.
    pub(crate) fn push(&self, frame: Frame) -> Result<(), SendError> {
        let mut state = self.lock();
        if state.close.is_some() {
            return Err(SendError::Closed);
        }
        let len = frame.len();
        if state.bytes > 0 && state.bytes + len > self.max_bytes {
            state.slots.clear();
            state.bytes = 0;
            state.close = Some(CloseReason::SlowConsumer);
            drop(state);
            self.wake_all();
            return Err(SendError::QueueFull);
        }
        // The writer drains every ready frame each time it wakes, so it only needs waking
        // when this frame is the first in line: behind another frame it has a wake-up
        // pending already, and behind a reservation it must wait for `fill` anyway.
        let first_in_line = state.slots.is_empty();
        state.bytes += len;
        state.slots.push_back(Slot::Frame(frame));
        drop(state);
        if first_in_line {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Reserves the next place in the queue; `None` when the connection is closing.
    pub(crate) fn reserve(&self) -> Option<u64> {
        let mut state = self.lock();
        if state.close.is_some() {
            return None;
        }
        let id = state.next_reservation;
        state.next_reservation += 1;
        state.slots.push_back(Slot::Reserved(id));
        Some(id)
    }

    /// Puts `frame` in a reserved place (or, with `None`, gives the place up), letting
    /// the frames behind it go. The frame is not counted against the budget: it is a
    /// reply already owed.
    pub(crate) fn fill(&self, reservation: u64, frame: Option<Frame>) {
        let mut state = self.lock();
        let Some(index) = state
            .slots
            .iter()
            .position(|slot| matches!(slot, Slot::Reserved(id) if *id == reservation))
        else {
            return;
        };
        match frame {
            Some(frame) => {
                state.bytes += frame.len();
                state.slots[index] = Slot::Frame(frame);
            }
            None => {
                state.slots.remove(index);
            }
        }
        drop(state);
        self.wake_writer.notify_one();
    }

    /// Starts closing; the first reason wins. Returns whether this call started it.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let mut state = self.lock();
        if state.close.is_some() {
            return false;
        }
        if reason.keeps_queued_frames() {
            // What is queued still goes out; replies never filled must not hold it back.
            state.slots.retain(|slot| matches!(slot, Slot::Frame(_)));
        } else {
            state.slots.clear();
            state.bytes = 0;
        }
        state.close = Some(reason);
        drop(state);
        self.wake_all();
        true
    }

    fn wake_all(&self) {
        self.wake_writer.notify_one();
        self.closing.notify_waiters();
    }

    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close.clone()
    }

    /// Resolves once closing has started.
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.closing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().close.is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Waits for work and moves every queued frame into `out`.
    pub(crate) async fn next_batch(&self, out: &mut Vec<Frame>) -> Batch {
        loop {
            {
                let mut state = self.lock();
                let ready = state
                    .slots
                    .iter()
                    .take_while(|slot| matches!(slot, Slot::Frame(_)))
                    .count();
                if ready > 0 {
                    let mut taken = 0;
                    for slot in state.slots.drain(..ready) {
                        if let Slot::Frame(frame) = slot {
                            taken += frame.len();
                            out.push(frame);
                        }
                    }
                    state.bytes = state.bytes.saturating_sub(taken);
                    if state.slots.capacity() > 64 && state.slots.len() < 8 {
                        // A burst grew the ring; an idle connection should not keep it.
                        state.slots.shrink_to(8);
                    }
                    return Batch::Frames;
                }
                if state.slots.is_empty() {
                    if let Some(reason) = &state.close {
                        return Batch::Close(reason.clone());
                    }
                }
            }
            self.wake_writer.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_and_drops_frames() {
        let queue = Outbound::new(10);
        assert!(queue.push(Frame::from("123456")).is_ok());
        assert_eq!(queue.push(Frame::from("123456")), Err(SendError::QueueFull));
        assert_eq!(queue.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(queue.push(Frame::from("1")), Err(SendError::Closed));
    }

    #[test]
    fn a_single_large_frame_passes_an_empty_queue() {
        let queue = Outbound::new(4);
        assert!(queue
            .push(Frame::from("much larger than four bytes"))
            .is_ok());
    }

    #[tokio::test]
    async fn batches_then_close() {
        let queue = Outbound::new(100);
        queue.push(Frame::from("a")).unwrap();
        queue.push(Frame::from("b")).unwrap();
        queue.close(CloseReason::GoingAway);
        let mut out = Vec::new();
        assert!(matches!(queue.next_batch(&mut out).await, Batch::Frames));
        assert_eq!(out.len(), 2);
        assert!(matches!(
            queue.next_batch(&mut out).await,
            Batch::Close(CloseReason::GoingAway)
        ));
    }

    #[tokio::test]
    async fn a_reserved_reply_goes_before_what_was_queued_after_it() {
        let queue = Outbound::new(100);
        queue.push(Frame::from("before")).unwrap();
        let reply = queue.reserve().unwrap();
        let given_up = queue.reserve().unwrap();
        queue.push(Frame::from("after")).unwrap();
        let mut out = Vec::new();
        assert!(matches!(queue.next_batch(&mut out).await, Batch::Frames));
        assert_eq!(out, [Frame::from("before")]);
        queue.fill(given_up, None);
        queue.fill(reply, Some(Frame::from("reply")));
        out.clear();
        assert!(matches!(queue.next_batch(&mut out).await, Batch::Frames));
        assert_eq!(out, [Frame::from("reply"), Frame::from("after")]);
    }

    #[tokio::test]
    async fn a_going_away_close_does_not_wait_for_unfilled_replies() {
        let queue = Outbound::new(100);
        let _reply = queue.reserve().unwrap();
        queue.push(Frame::from("queued")).unwrap();
        queue.close(CloseReason::GoingAway);
        assert_eq!(queue.reserve(), None);
        let mut out = Vec::new();
        assert!(matches!(queue.next_batch(&mut out).await, Batch::Frames));
        assert_eq!(out, [Frame::from("queued")]);
        assert!(matches!(
            queue.next_batch(&mut out).await,
            Batch::Close(CloseReason::GoingAway)
        ));
    }

    #[test]
    fn close_reason_text_fits_a_close_frame() {
        let long = "é".repeat(100);
        assert!(CloseReason::Normal(long).text().len() <= 123);
    }
}
