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
//!
//! # Replies are back-pressure, pushes are the budget
//!
//! Every frame is one of two kinds, counted apart, each against the whole budget
//! (`max_outbound_bytes`):
//! - A **reply** answers a command the client sent: a command's reply (also one put in a
//!   reserved place), an error reply, `ENOTFOUND`. The client asked for it, so it is always
//!   queued, however large, and never closes the connection. While the queued reply bytes
//!   are over the budget, the connection's reader stops reading frames
//!   ([`Outbound::replies_backed_up`]) until the writer has taken them
//!   ([`Outbound::reply_room`]): a client that pipelines more than it reads is slowed down
//!   through TCP, as by the in-flight limit.
//! - A **push** is anything the client did not ask for: broadcasts, channel, presence and
//!   record updates, pings. A push that would take the queued push bytes over the budget
//!   (while other pushes are queued: a lone push larger than the budget still goes out)
//!   marks the client a slow consumer: the queue is dropped and the connection closed with
//!   1008.
//!
//! The two counts never mix. Queued replies never make a push overflow, so a client that
//! pipelines and reads promptly is not closed because a broadcast arrived meanwhile; and
//! queued replies do not shelter a client from a push overflow either: a client that does
//! not read is closed by the pushes it does not drain, whatever replies wait with them.
//! Pushes do not pause reading (a client cannot slow down what it did not ask for). A
//! connection thus holds at most the budget in pushes, about the budget in replies plus
//! the replies of the commands already running when reading paused, and the batch the
//! writer is writing.
//!
//! The queue also tells the heartbeat whether its writer is stuck ([`Outbound::write_progress`]):
//! a client whose reading is paused cannot have its pongs read, which excuses missed pongs
//! only as long as the socket still takes what the writer gives it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::protocol::Frame;

/// Why a connection is being closed by the server (or was closed by the peer).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The client sent a frame that is not valid UTF-8, as text or as binary (close code
    /// 1007, RFC 6455 §7.4.1).
    InvalidData(String),
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
            CloseReason::InvalidData(_) => 1007,
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
            | CloseReason::ProtocolError(reason)
            | CloseReason::InvalidData(reason) => reason,
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
#[non_exhaustive]
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
    /// The writer's task, waiting for frames. One waiter only, so an atomic waker: a
    /// `Notify` took a lock on both sides of every wake, a fifth of a broadcast's cost per
    /// recipient.
    wake_writer: AtomicWaker,
    closing: Notify,
    /// Woken when the queued reply bytes fall back within the budget.
    reply_room: Notify,
    /// Whether the queued reply bytes are over the budget. Kept under the lock, read
    /// without it: the reader checks it before every frame it reads.
    replies_over_budget: AtomicBool,
    max_bytes: usize,
}

#[derive(Default)]
struct QueueState {
    slots: VecDeque<Slot>,
    /// Bytes of the queued replies.
    reply_bytes: usize,
    /// Bytes of the queued pushes.
    push_bytes: usize,
    close: Option<CloseReason>,
    next_reservation: u64,
    /// Batches the writer has taken so far.
    batches_taken: u64,
    /// Whether the writer is writing a batch (rather than waiting for one).
    writer_busy: bool,
}

enum Slot {
    Reply(Frame),
    Push(Frame),
    /// The place of a reply not written yet; the writer stops here until it is filled.
    Reserved(u64),
}

impl Slot {
    fn is_frame(&self) -> bool {
        !matches!(self, Slot::Reserved(_))
    }
}

/// How far the writer has got, for the heartbeat's liveness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteProgress {
    /// Batches taken so far: it changes whenever the socket took a whole batch.
    pub(crate) batches_taken: u64,
    /// Whether the writer is in the middle of a batch (it may be stuck on the socket).
    pub(crate) writing: bool,
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
            wake_writer: AtomicWaker::new(),
            closing: Notify::new(),
            reply_room: Notify::new(),
            replies_over_budget: AtomicBool::new(false),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a push (a frame the client did not ask for). A push larger than the whole
    /// budget still goes out when no other push is queued, so one large push is never
    /// mistaken for a slow client; otherwise a push over the budget closes the connection
    /// as a slow consumer.
    pub(crate) fn push(&self, frame: Frame) -> Result<(), SendError> {
        let mut state = self.lock();
        if state.close.is_some() {
            return Err(SendError::Closed);
        }
        let len = frame.len();
        if state.push_bytes > 0 && state.push_bytes + len > self.max_bytes {
            self.drop_queue(&mut state);
            state.close = Some(CloseReason::SlowConsumer);
            drop(state);
            self.wake_all();
            return Err(SendError::QueueFull);
        }
        let first_in_line = state.slots.is_empty();
        state.push_bytes += len;
        state.slots.push_back(Slot::Push(frame));
        drop(state);
        self.wake_writer_if(first_in_line);
        Ok(())
    }

    /// Queues a reply (a frame answering a command of the client's). It is always queued,
    /// however large; past the budget it pauses the reading of the connection instead.
    pub(crate) fn reply(&self, frame: Frame) -> Result<(), SendError> {
        let mut state = self.lock();
        if state.close.is_some() {
            return Err(SendError::Closed);
        }
        let first_in_line = state.slots.is_empty();
        self.count_reply(&mut state, frame.len());
        state.slots.push_back(Slot::Reply(frame));
        drop(state);
        self.wake_writer_if(first_in_line);
        Ok(())
    }

    fn count_reply(&self, state: &mut QueueState, len: usize) {
        state.reply_bytes += len;
        if state.reply_bytes > self.max_bytes {
            self.replies_over_budget.store(true, Ordering::Release);
        }
    }

    /// The writer drains every ready frame each time it wakes, so it only needs waking
    /// when a frame is the first in line: behind another frame it has a wake-up pending
    /// already, and behind a reservation it must wait for `fill` anyway.
    fn wake_writer_if(&self, first_in_line: bool) {
        if first_in_line {
            self.wake_writer.wake();
        }
    }

    /// Empties the queue (when closing without writing what is queued).
    fn drop_queue(&self, state: &mut QueueState) {
        state.slots.clear();
        state.push_bytes = 0;
        state.reply_bytes = 0;
        self.replies_over_budget.store(false, Ordering::Release);
    }

    /// Gives back the queue's ring if nothing is queued: called at a pong, so a
    /// connection that has gone quiet holds none.
    pub(crate) fn trim_idle(&self) {
        let mut state = self.lock();
        if state.slots.is_empty() && state.slots.capacity() > 0 {
            state.slots = VecDeque::new();
        }
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

    /// Puts the reply `frame` in a reserved place (or, with `None`, gives the place up),
    /// letting the frames behind it go. It counts as a reply: it never closes the
    /// connection, and it counts towards pausing its reading.
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
                self.count_reply(&mut state, frame.len());
                state.slots[index] = Slot::Reply(frame);
            }
            None => {
                state.slots.remove(index);
            }
        }
        drop(state);
        self.wake_writer.wake();
    }

    /// Puts the push `frame` in a reserved place (a push that must reach the client before
    /// what was queued after the reservation, such as a collection diff before the
    /// updates of the records it adds). It counts as a push: over the budget it closes
    /// the connection as a slow consumer, as [`Outbound::push`] does.
    pub(crate) fn fill_push(&self, reservation: u64, frame: Frame) -> Result<(), SendError> {
        let mut state = self.lock();
        let Some(index) = state
            .slots
            .iter()
            .position(|slot| matches!(slot, Slot::Reserved(id) if *id == reservation))
        else {
            return Err(SendError::Closed);
        };
        let len = frame.len();
        if state.push_bytes > 0 && state.push_bytes + len > self.max_bytes {
            self.drop_queue(&mut state);
            state.close = Some(CloseReason::SlowConsumer);
            drop(state);
            self.wake_all();
            return Err(SendError::QueueFull);
        }
        state.push_bytes += len;
        state.slots[index] = Slot::Push(frame);
        drop(state);
        self.wake_writer.wake();
        Ok(())
    }

    /// Starts closing; the first reason wins. Returns whether this call started it.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let mut state = self.lock();
        if state.close.is_some() {
            return false;
        }
        if reason.keeps_queued_frames() {
            // What is queued still goes out; replies never filled must not hold it back.
            state.slots.retain(Slot::is_frame);
        } else {
            self.drop_queue(&mut state);
        }
        state.close = Some(reason);
        drop(state);
        self.wake_all();
        true
    }

    fn wake_all(&self) {
        self.wake_writer.wake();
        self.closing.notify_waiters();
        self.reply_room.notify_waiters();
    }

    /// Whether the queued replies are over the budget: the connection must not be read
    /// until [`reply_room`](Self::reply_room) resolves.
    pub(crate) fn replies_backed_up(&self) -> bool {
        self.replies_over_budget.load(Ordering::Acquire)
    }

    /// Resolves once the queued replies are within the budget again (or the queue was
    /// dropped).
    pub(crate) async fn reply_room(&self) {
        loop {
            let notified = self.reply_room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.replies_backed_up() {
                return;
            }
            notified.await;
        }
    }

    /// How far the writer has got; see [`WriteProgress`].
    pub(crate) fn write_progress(&self) -> WriteProgress {
        let state = self.lock();
        WriteProgress {
            batches_taken: state.batches_taken,
            writing: state.writer_busy,
        }
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

    /// Waits for work and moves every queued frame into `out`. Calling it again means the
    /// previous batch was written.
    pub(crate) async fn next_batch(&self, out: &mut Vec<Frame>) -> Batch {
        std::future::poll_fn(|cx| {
            // Registered before the queue is looked at, so a frame queued in between
            // wakes it.
            self.wake_writer.register(cx.waker());
            match self.take_batch(out) {
                Some(batch) => Poll::Ready(batch),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Moves every queued frame into `out`; `None` when there is nothing to do yet.
    fn take_batch(&self, out: &mut Vec<Frame>) -> Option<Batch> {
        {
            let mut state = self.lock();
            state.writer_busy = false;
            let ready = state
                .slots
                .iter()
                .take_while(|slot| slot.is_frame())
                .count();
            if ready > 0 {
                let (mut replies, mut pushes) = (0, 0);
                for slot in state.slots.drain(..ready) {
                    match slot {
                        Slot::Reply(frame) => {
                            replies += frame.len();
                            out.push(frame);
                        }
                        Slot::Push(frame) => {
                            pushes += frame.len();
                            out.push(frame);
                        }
                        Slot::Reserved(_) => {}
                    }
                }
                state.reply_bytes = state.reply_bytes.saturating_sub(replies);
                state.push_bytes = state.push_bytes.saturating_sub(pushes);
                state.batches_taken += 1;
                state.writer_busy = true;
                if state.slots.is_empty() && state.batches_taken == 1 {
                    // The connection's greeting (its id, what `on_connect` sent): a
                    // connection that then stays idle keeps no ring. After that the
                    // ring is kept, since allocating it again for every broadcast cost
                    // a sixth of a delivery; `trim_idle` gives it back at a pong.
                    state.slots = VecDeque::new();
                } else if state.slots.capacity() > 64 && state.slots.len() < 8 {
                    // A burst grew the ring; an idle connection should not keep it.
                    state.slots.shrink_to(8);
                }
                let room_for_replies = state.reply_bytes <= self.max_bytes
                    && self.replies_over_budget.load(Ordering::Relaxed);
                if room_for_replies {
                    self.replies_over_budget.store(false, Ordering::Release);
                }
                drop(state);
                if room_for_replies {
                    self.reply_room.notify_waiters();
                }
                return Some(Batch::Frames);
            }
            if state.slots.is_empty() {
                if let Some(reason) = &state.close {
                    return Some(Batch::Close(reason.clone()));
                }
            }
        }
        None
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
    fn replies_never_close_and_back_up_past_the_budget() {
        let queue = Outbound::new(10);
        assert!(queue.reply(Frame::from("1234567890123")).is_ok());
        assert!(queue.replies_backed_up());
        assert!(queue.reply(Frame::from("more")).is_ok());
        assert_eq!(queue.close_reason(), None);
    }

    #[tokio::test]
    async fn taking_the_replies_makes_room() {
        let queue = Outbound::new(10);
        queue.reply(Frame::from("1234567890123")).unwrap();
        let room = queue.reply_room();
        tokio::pin!(room);
        assert!(futures_util::poll!(room.as_mut()).is_pending());
        let mut out = Vec::new();
        assert!(matches!(queue.next_batch(&mut out).await, Batch::Frames));
        assert!(!queue.replies_backed_up());
        room.await;
    }

    #[test]
    fn replies_and_pushes_are_counted_apart() {
        let queue = Outbound::new(10);
        queue.reply(Frame::from("123456789")).unwrap();
        // Queued replies do not make a push overflow...
        assert!(queue.push(Frame::from("123456789")).is_ok());
        // ...nor do they keep one from overflowing.
        assert_eq!(queue.push(Frame::from("12")), Err(SendError::QueueFull));
        assert_eq!(queue.close_reason(), Some(CloseReason::SlowConsumer));
        assert!(!queue.replies_backed_up());
    }

    #[test]
    fn a_filled_reservation_is_a_reply() {
        let queue = Outbound::new(10);
        let place = queue.reserve().unwrap();
        queue.fill(place, Some(Frame::from("much larger than ten bytes")));
        assert!(queue.replies_backed_up());
        assert!(queue.push(Frame::from("push")).is_ok());
    }

    #[tokio::test]
    async fn write_progress_counts_batches_and_knows_when_the_writer_is_writing() {
        let queue = Outbound::new(100);
        let idle = queue.write_progress();
        assert!(!idle.writing);
        queue.push(Frame::from("a")).unwrap();
        let mut out = Vec::new();
        assert!(matches!(queue.next_batch(&mut out).await, Batch::Frames));
        let writing = queue.write_progress();
        assert!(writing.writing);
        assert_eq!(writing.batches_taken, idle.batches_taken + 1);
    }

    #[test]
    fn close_reason_text_fits_a_close_frame() {
        let long = "é".repeat(100);
        assert!(CloseReason::Normal(long).text().len() <= 123);
    }
}
