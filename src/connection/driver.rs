//! The life of one connection: register, assign its id, read and write until it ends,
//! then clean up exactly once.
//!
//! The driver is generic over any `Sink<Message> + Stream<Item = Result<Message, _>>`, so
//! it runs on a real socket and on an in-process pipe alike.

use std::cell::Cell;
use std::future::poll_fn;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;
use futures_util::{Future, Sink, SinkExt, Stream, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use super::outbound::{Batch, CloseReason};
use super::Connection;
use crate::command::{dispatch, RegisteredCommand};
use crate::error::CommandError;
use crate::mesh::Mesh;
use crate::metrics::{MeshMetrics, Received};
use crate::protocol::{self, Frame, Inbound};

tokio::task_local! {
    /// The place in the outbound queue reserved for the reply of the command this task
    /// runs, if its handler reserved one.
    static REPLY_PLACE: Cell<Option<u64>>;
}

/// Called by a subscription handler just before it starts listening: reserves the place
/// of its reply, so updates published after its snapshot wait behind the reply (a client
/// places updates only once it has the reply). Elsewhere (server-side calls) it does
/// nothing.
pub(crate) fn reserve_reply_place(connection: &Connection) {
    let _ = REPLY_PLACE.try_with(|place| {
        if place.get().is_none() {
            place.set(connection.reserve_reply());
        }
    });
}

/// How long the writer may take to deliver the close frame, and how long we then read
/// on for the peer's acknowledgement, before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A WebSocket as the driver needs it: frames in, frames out.
pub(crate) trait Socket:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin + Send + 'static
{
}

impl<T> Socket for T where
    T: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Unpin
        + Send
        + 'static
{
}

/// Serves one upgraded WebSocket until it ends.
///
/// The connection and the socket's halves are made before the returned future starts, so
/// that future holds only handles to them: an async fn would keep room for its arguments
/// (the socket, the request's parts) beside its own state for the connection's whole life.
pub(crate) fn serve(
    mesh: Mesh,
    socket: impl Socket,
    parts: Box<http::request::Parts>,
) -> impl Future<Output = ()> {
    let id = mesh.next_connection_id();
    // Debug, as the command spans inside it are: with a subscriber, every span enabled
    // keeps its fields in memory for as long as it lives, a few hundred bytes per
    // connection. Events the driver logs above debug name the connection themselves.
    let span = tracing::debug_span!("connection", connection = %id);
    let connection = Connection::new(
        id,
        *parts,
        mesh.config().max_outbound_bytes,
        mesh.downgrade(),
    );
    let (sink, stream) = socket.split();
    let served = serve_connection(mesh, connection, sink, stream);
    // Entering and leaving even a disabled span on every poll showed in the fan-out
    // profile; a connection whose span is off runs without the wrapper.
    if span.is_disabled() {
        Either::Left(served)
    } else {
        Either::Right(served.instrument(span))
    }
}

async fn serve_connection<W, R>(mesh: Mesh, connection: Connection, mut sink: W, mut stream: R)
where
    W: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let _live = mesh.connection_started();
    mesh.inner().metrics.connection_started();
    // Setting up and cleaning up await the backend and the hooks, whose futures are far
    // larger than the running loop's. Boxed, they are on the heap only while they run:
    // inline, the task would keep room for the largest of them for the connection's whole
    // life, idle or not.
    let accepted = match Box::pin(set_up(&mesh, &connection, &mut sink, &mut stream)).await {
        SetUp::NotRegistered => {
            crate::metrics::connection_closed(&closed_for(&connection));
            return;
        }
        SetUp::Refused => false,
        SetUp::Accepted => {
            run(&mesh, &connection, &mut sink, &mut stream).await;
            true
        }
    };
    Box::pin(clean_up(
        &mesh,
        &connection,
        &mut sink,
        &mut stream,
        accepted,
    ))
    .await;
    crate::metrics::connection_closed(&closed_for(&connection));
}

/// Why a connection that ended did.
fn closed_for(connection: &Connection) -> CloseReason {
    connection.close_reason().unwrap_or(CloseReason::PeerClosed)
}

/// How setting a connection up went.
enum SetUp {
    /// The backend could not register it; it is closed and needs no cleanup.
    NotRegistered,
    /// `on_connect` refused it; it is closing, and registered.
    Refused,
    Accepted,
}

/// Registers the connection, queues its id and runs `on_connect`.
async fn set_up<W, R>(mesh: &Mesh, connection: &Connection, sink: &mut W, stream: &mut R) -> SetUp
where
    W: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    // Register first, then assign the id, then read (docs/protocol.md §6): no command can run
    // for a connection the mesh does not know yet.
    if let Err(err) = mesh.register(connection).await {
        tracing::warn!(connection = connection.id(), %err, "could not register connection");
        connection.close_with(match err {
            crate::error::MeshError::ShuttingDown => CloseReason::GoingAway,
            _ => CloseReason::Unavailable,
        });
        finish(connection, sink, stream, false).await;
        return SetUp::NotRegistered;
    }
    // The id is queued before `on_connect` runs, so anything the hook sends follows it;
    // nothing is written until the hook has accepted the connection.
    let _ = connection.push_frame(Frame::from(protocol::push(
        protocol::ASSIGN_ID,
        connection.id(),
    )));
    match mesh.run_on_connect(connection).await {
        Ok(()) => {
            tracing::debug!("connected");
            SetUp::Accepted
        }
        Err(reason) => {
            tracing::debug!(%reason, "on_connect refused the connection");
            connection.close_with(CloseReason::Refused(reason));
            SetUp::Refused
        }
    }
}

/// Reads and writes until the connection ends.
async fn run<W, R>(mesh: &Mesh, connection: &Connection, sink: &mut W, stream: &mut R)
where
    W: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut running = None;
    let received = Received::default();
    {
        let reader = read_loop(
            mesh,
            connection,
            stream,
            &received,
            &mut running,
            |id, command, payload, cx| start_command(mesh, connection, id, command, payload, cx),
        );
        let writer = write_loop(&mesh.inner().metrics, &received, connection, sink);
        // Side by side in one task, each polled only when it was woken: a broadcast
        // wakes the writer alone, and the reader is not asked to read a socket that
        // has nothing for it (tungstenite zeroes its read buffer on every attempt).
        let mut reader = pin!(reader);
        let mut writer = pin!(writer);
        if let Ended::Reader(reason) = first_to_end(reader.as_mut(), writer.as_mut()).await {
            connection.close_with(reason);
            // Boxed: a timer is over a hundred bytes the running loop need not keep.
            let _ = Box::pin(tokio::time::timeout(CLOSE_GRACE, writer)).await;
        }
    }
    if let Some(mut running) = running.filter(|running| !running.is_empty()) {
        // Commands still running finish on their own, as they would have had the
        // connection stayed: cancelling one midway could leave a change half made.
        tokio::spawn(async move { while running.next().await.is_some() {} }.in_current_span());
    }
    mesh.inner().metrics.count_received(&received);
    // Whatever ended it, the handle now reports the connection as closed.
    connection.close_with(CloseReason::PeerClosed);
}

/// Runs `on_disconnect` (for an accepted connection), unregisters the connection and
/// sends its close frame if one is owed.
async fn clean_up<W, R>(
    mesh: &Mesh,
    connection: &Connection,
    sink: &mut W,
    stream: &mut R,
    accepted: bool,
) where
    W: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    if accepted {
        // The hook runs while the connection is still registered, so it can read the
        // connection's metadata one last time.
        mesh.run_on_disconnect(connection).await;
    }
    // Clean up before waiting on the peer's close acknowledgement, so that a peer that
    // never answers cannot keep a dead connection listed.
    mesh.unregister(connection).await;
    finish(connection, sink, stream, accepted).await;
    tracing::debug!(reason = ?connection.close_reason(), "disconnected");
}

/// Which half of a connection's loop ended first.
enum Ended {
    Reader(CloseReason),
    Writer,
}

/// Polls a connection's reader and writer side by side until one ends, each only when it
/// was woken.
///
/// Both stay where they are, inside the connection's own future: a `FuturesUnordered`
/// would allocate each of them, and an empty node of their size, on the heap (over a
/// kilobyte per connection, idle or not). Each half gets its own waker, which marks the
/// half and wakes the task.
async fn first_to_end<Reader, Writer>(
    mut reader: Pin<&mut Reader>,
    mut writer: Pin<&mut Writer>,
) -> Ended
where
    Reader: Future<Output = CloseReason>,
    Writer: Future,
{
    let reader_wake = Arc::new(HalfWake::woken());
    let writer_wake = Arc::new(HalfWake::woken());
    let reader_waker = Waker::from(Arc::clone(&reader_wake));
    let writer_waker = Waker::from(Arc::clone(&writer_wake));
    poll_fn(|cx| {
        // Registered before the marks are read, so a wake in between is not lost.
        reader_wake.task.register(cx.waker());
        writer_wake.task.register(cx.waker());
        // The reader first: the replies it queues are then written in the same pass.
        if reader_wake.take() {
            if let Poll::Ready(reason) = reader
                .as_mut()
                .poll(&mut Context::from_waker(&reader_waker))
            {
                return Poll::Ready(Ended::Reader(reason));
            }
        }
        if writer_wake.take()
            && writer
                .as_mut()
                .poll(&mut Context::from_waker(&writer_waker))
                .is_ready()
        {
            return Poll::Ready(Ended::Writer);
        }
        Poll::Pending
    })
    .await
}

/// The waker of one half of a connection's loop.
struct HalfWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl HalfWake {
    /// Starts marked, so the half is polled on the first pass.
    fn woken() -> Self {
        HalfWake {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }

    /// Whether the half was woken since the last call.
    fn take(&self) -> bool {
        self.woken.swap(false, Ordering::AcqRel)
    }
}

impl Wake for HalfWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Sends the close frame if it is still owed, then reads on briefly so the peer sees it
/// before the socket goes away.
async fn finish<W, R>(
    connection: &Connection,
    sink: &mut W,
    stream: &mut R,
    close_already_written: bool,
) where
    W: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let reason = connection.close_reason().unwrap_or(CloseReason::PeerClosed);
    if reason == CloseReason::PeerClosed {
        return;
    }
    if !close_already_written {
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(close_message(&reason))).await;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
}

fn close_message(reason: &CloseReason) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.text().into(),
    }))
}

/// Reads frames and runs their commands until the peer goes away or the server starts
/// closing. Returns why the connection must end.
///
/// Commands run inside the connection's own task, side by side in `running`, rather than
/// as spawned tasks: a command that completes at once (most do) has its reply queued in
/// the same poll that read it, so every reply to one burst of frames leaves in one write.
/// The set is made at the first command, and given back at a pong while it is empty.
///
/// Reading pauses, so that back-pressure reaches the client through TCP instead of growing
/// our memory, while either
/// - `max_in_flight` commands are running, until one finishes, or
/// - the queued replies are over the outbound budget (the client asks for more than it
///   reads), until the writer has taken them (see the `outbound` module: replies are
///   back-pressure, pushes are the budget).
///
/// Meanwhile its unanswered pings do not count against it, since its pongs wait unread
/// behind its other frames (see `Liveness` for the one exception: a writer stuck on the
/// socket).
async fn read_loop<R, Run, F>(
    mesh: &Mesh,
    connection: &Connection,
    stream: &mut R,
    received: &Received,
    running: &mut Option<FuturesUnordered<Run>>,
    start_command: F,
) -> CloseReason
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    Run: Future<Output = ()>,
    F: Fn(u64, Arc<RegisteredCommand>, Value, &mut Context<'_>) -> Option<Run>,
{
    let max_in_flight = mesh.config().max_in_flight;
    let metrics = &mesh.inner().metrics;
    let outbound = connection.outbound();
    // Made once: registering for the close notification on every frame would take the
    // notifier's lock twice per frame.
    let closed = outbound.closed();
    tokio::pin!(closed);
    let mut paused = false;
    loop {
        let replies_backed_up = outbound.replies_backed_up();
        let running_count = running.as_ref().map_or(0, FuturesUnordered::len);
        let reading = !replies_backed_up && running_count < max_in_flight;
        if paused == reading {
            paused = !reading;
            connection.set_reading_paused(paused);
        }
        // Biased: finish commands before reading more, so a burst's replies are queued
        // before the writer next runs. The close notification comes last: it is polled
        // whenever nothing else is ready, and a client that never stops sending still
        // runs out of tokio's per-poll budget every 128 reads, which makes it so.
        // Polled first, it cost a sizeable part of a small command.
        let message = tokio::select! {
            biased;
            Some(()) = next_finished(running), if running_count > 0 => continue,
            () = outbound.reply_room(), if replies_backed_up => continue,
            message = stream.next(), if reading => message,
            () = &mut closed => return server_close(connection),
        };
        let text = match message {
            None => return CloseReason::PeerClosed,
            Some(Err(err)) => return read_error(mesh, connection, err),
            Some(Ok(Message::Text(text))) => text,
            // Read as UTF-8 text (docs/protocol.md §1); bytes that are not UTF-8 are the same
            // bad input as in a text frame, which the WebSocket layer refuses.
            Some(Ok(Message::Binary(bytes))) => match Frame::try_from(bytes) {
                Ok(text) => text,
                Err(_) => {
                    tracing::debug!("closing: a binary frame is not UTF-8");
                    return CloseReason::InvalidData("frame is not valid UTF-8".to_owned());
                }
            },
            Some(Ok(Message::Close(_))) => return CloseReason::PeerClosed,
            Some(Ok(_)) => continue,
        };
        received.frame(text.len());
        match Inbound::parse(&text) {
            Inbound::Command {
                id,
                command,
                payload,
            } => match mesh.command(&command) {
                Some(registered) => {
                    let mut command = Some((Arc::clone(registered), payload));
                    let unfinished =
                        poll_fn(|cx| {
                            Poll::Ready(command.take().and_then(|(command, payload)| {
                                start_command(id, command, payload, cx)
                            }))
                        })
                        .await;
                    if let Some(unfinished) = unfinished {
                        running
                            .get_or_insert_with(FuturesUnordered::new)
                            .push(unfinished);
                    }
                }
                // Unknown commands are answered before any middleware runs (docs/protocol.md §1).
                None => {
                    let error = CommandError::not_found(&command);
                    metrics.unknown_command().refused(error.code());
                    let reply = protocol::error_reply(id, &*command, &error);
                    connection.push_reply(None, Frame::from(reply));
                }
            },
            Inbound::Invalid { id, command, error } => {
                tracing::debug!(id, error = error.message(), "invalid frame");
                match command.as_str().and_then(|name| mesh.command(name)) {
                    Some(registered) => registered.metrics.refused(error.code()),
                    None => metrics.unknown_command().refused(error.code()),
                }
                connection.push_reply(
                    None,
                    Frame::from(protocol::error_reply(id, &command, &error)),
                );
            }
            Inbound::Unanswerable { reason } => tracing::debug!(reason, "dropped a frame"),
            Inbound::Pong => {
                // An empty set still holds a node the size of a command's future: a
                // connection gone quiet gives it back at its next pong.
                if running.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    *running = None;
                }
                outbound.trim_idle();
                mesh.pong_received(connection);
            }
            Inbound::LatencyResponse => connection.latency_response_received(),
        }
    }
}

/// The next command of `running` to finish; never, when there is none.
async fn next_finished<Run: Future<Output = ()>>(
    running: &mut Option<FuturesUnordered<Run>>,
) -> Option<()> {
    match running {
        Some(running) => running.next().await,
        None => std::future::pending().await,
    }
}

/// Starts one command and polls it once, in its span and with its reply place: a command
/// that finishes at once (most do) has its reply queued now, without a place in the
/// connection's set of running commands. Returns the rest of its run when it did not.
fn start_command(
    mesh: &Mesh,
    connection: &Connection,
    id: u64,
    command: Arc<RegisteredCommand>,
    payload: Value,
    cx: &mut Context<'_>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let span = tracing::debug_span!("command", command = %command.name, id);
    let (mut run, first_poll, place) = span.in_scope(|| {
        let mut run = dispatch(mesh.clone(), connection.clone(), id, command, payload);
        REPLY_PLACE.sync_scope(Cell::new(None), || {
            let first_poll = Pin::new(&mut run).poll(cx);
            (run, first_poll, REPLY_PLACE.with(Cell::take))
        })
    });
    if let Poll::Ready(reply) = first_poll {
        connection.push_reply(place, reply);
        return None;
    }
    let connection = connection.clone();
    Some(
        async move {
            // A subscription reserves its reply's place as it starts listening (see
            // `reserve_reply_place`): the reply goes before every update published after
            // its snapshot.
            let (reply, reservation) = REPLY_PLACE
                .scope(Cell::new(place), async {
                    let reply = (&mut run).await;
                    (reply, REPLY_PLACE.with(Cell::take))
                })
                .await;
            connection.push_reply(reservation, reply);
        }
        .instrument(span),
    )
}

fn server_close(connection: &Connection) -> CloseReason {
    connection.close_reason().unwrap_or(CloseReason::GoingAway)
}

fn read_error(mesh: &Mesh, connection: &Connection, err: WsError) -> CloseReason {
    match err {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            tracing::info!(
                connection = connection.id(),
                size,
                max_size,
                "closing: inbound frame too large"
            );
            mesh.stats_record_oversize();
            CloseReason::FrameTooLarge
        }
        WsError::Capacity(other) => {
            tracing::info!(connection = connection.id(), %other, "closing: inbound frame too large");
            mesh.stats_record_oversize();
            CloseReason::FrameTooLarge
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => {
            CloseReason::PeerClosed
        }
        // A text frame (or a close frame's reason) that is not UTF-8: RFC 6455 §8.1 says
        // 1007. The bytes are the client's; they stay out of the close reason.
        WsError::Utf8(_) => {
            tracing::debug!("closing: a frame is not valid UTF-8");
            CloseReason::InvalidData("frame is not valid UTF-8".to_owned())
        }
        other => {
            tracing::debug!(%other, "closing: protocol error");
            CloseReason::ProtocolError(other.to_string())
        }
    }
}

/// Writes queued frames in batches (one flush per batch) until a close is due.
async fn write_loop<W>(
    metrics: &MeshMetrics,
    received: &Received,
    connection: &Connection,
    sink: &mut W,
) -> Result<(), WsError>
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let mut batch: Vec<Frame> = Vec::new();
    let mut greeting = true;
    loop {
        match connection.outbound().next_batch(&mut batch).await {
            Batch::Frames => {
                let bytes = batch.iter().map(|frame| frame.as_str().len()).sum();
                metrics.frames_sent(batch.len(), bytes, received);
                for frame in batch.drain(..) {
                    sink.feed(Message::Text(frame)).await?;
                }
                sink.flush().await?;
                // Like the queue's ring (see `Outbound::next_batch`): not kept after the
                // greeting, so an idle connection holds none, and never above 256 frames.
                if std::mem::take(&mut greeting) || batch.capacity() > 256 {
                    batch = Vec::new();
                }
            }
            Batch::Close(CloseReason::PeerClosed) => {
                // The WebSocket layer answers a peer's close frame (with 1002 when its
                // code is not a valid one); flushing sends that answer before the
                // socket is dropped.
                sink.flush().await?;
                return Ok(());
            }
            Batch::Close(reason) => {
                sink.send(close_message(&reason)).await?;
                return Ok(());
            }
        }
    }
}
