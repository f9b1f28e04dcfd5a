//! One client connection: its handle, its outbound queue, and the task that drives it.

mod driver;
mod outbound;
mod registry;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::error::MeshError;
use crate::merge::MergeStrategy;
use crate::mesh::{Mesh, MeshInner};
use crate::protocol::{self, Frame};

pub(crate) use driver::{reserve_reply_place, serve};
#[cfg(test)]
pub(crate) use outbound::Batch;
pub(crate) use outbound::Outbound;
pub use outbound::{CloseReason, SendError};
pub(crate) use registry::Registry;

/// A handle to one client connection. Cheap to clone.
///
/// It keeps the WebSocket upgrade request's parts (headers, URI, extensions such as the
/// user an auth layer stored), so every command of the connection can see them; of the
/// headers, at most [`max_kept_header_bytes`](crate::MeshBuilder::max_kept_header_bytes).
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

struct Shared {
    id: Arc<str>,
    /// Weak: a handle kept by user code must not keep a shut-down mesh alive.
    mesh: Weak<MeshInner>,
    parts: http::request::Parts,
    outbound: Outbound,
    liveness: Liveness,
    /// Serialises the connection's membership changes (rooms, subscriptions) with each
    /// other and with its final cleanup, so none can slip in after the cleanup ran.
    membership: tokio::sync::Mutex<()>,
}

/// Proof that a connection's membership lock is held.
pub(crate) type MembershipGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Ping and latency bookkeeping, driven by the mesh's heartbeat.
///
/// A client's pongs can only be seen when its frames are read. While its reading is paused
/// (all its in-flight slots busy, or its queued replies over the outbound budget) its
/// pongs may be waiting unread behind its other frames, so a ping sent while reading is
/// paused, or was paused at any time since the previous ping, is not counted as missed.
/// That excuse holds only while the client still reads what it is sent: when the writer
/// has been stuck on the same batch since the previous ping (the socket took nothing), the
/// ping counts, so a client that pipelines requests and never reads is still closed.
#[derive(Default)]
struct Liveness {
    missed_pongs: AtomicU32,
    /// Set while the reader cannot read (in-flight limit, or replies over the budget) and
    /// so cannot see pongs.
    reading_paused: AtomicBool,
    /// Set whenever reading pauses; cleared by each ping.
    paused_since_ping: AtomicBool,
    /// The writer's batch count at the previous excused ping.
    batches_at_last_ping: AtomicU64,
    latency_probe_sent: Mutex<Option<Instant>>,
    /// Last round trip in milliseconds; `u64::MAX` until one is measured.
    latency_ms: AtomicU64,
}

impl Connection {
    pub(crate) fn new(
        id: Arc<str>,
        parts: http::request::Parts,
        max_outbound_bytes: usize,
        mesh: Weak<MeshInner>,
    ) -> Self {
        Connection {
            shared: Arc::new(Shared {
                id,
                mesh,
                parts,
                outbound: Outbound::new(max_outbound_bytes),
                liveness: Liveness {
                    latency_ms: AtomicU64::new(u64::MAX),
                    ..Liveness::default()
                },
                membership: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The connection id, unique across every instance of the mesh.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub(crate) fn shared_id(&self) -> Arc<str> {
        self.shared.id.clone()
    }

    /// The upgrade request's method, URI, headers and extensions; the headers as
    /// [`headers`](Self::headers) describes.
    pub fn request_parts(&self) -> &http::request::Parts {
        &self.shared.parts
    }

    /// The upgrade request's headers, as many as
    /// [`max_kept_header_bytes`](crate::MeshBuilder::max_kept_header_bytes) allows (16 KiB
    /// of names and values by default): in request order, a header that would take the
    /// total over the budget is left out and the ones after it that fit are kept. Read a
    /// header that may be large in an HTTP layer outside the mesh layer, which sees every
    /// header, and store what the commands need in the request's extensions.
    pub fn headers(&self) -> &http::HeaderMap {
        &self.shared.parts.headers
    }

    /// The upgrade request's URI (with its query string).
    pub fn uri(&self) -> &http::Uri {
        &self.shared.parts.uri
    }

    /// The upgrade request's extensions: whatever HTTP layers stored there.
    pub fn extensions(&self) -> &http::Extensions {
        &self.shared.parts.extensions
    }

    /// The mesh this connection belongs to; `None` once the mesh is gone.
    pub fn mesh(&self) -> Option<Mesh> {
        Mesh::from_weak(&self.shared.mesh)
    }

    fn require_mesh(&self) -> Result<Mesh, MeshError> {
        self.mesh().ok_or(MeshError::ShuttingDown)
    }

    /// This connection's metadata (`None` when none was set), as every instance sees it.
    pub async fn metadata(&self) -> Result<Option<Value>, MeshError> {
        self.require_mesh()?.connection_metadata(self.id()).await
    }

    /// Combines `metadata` into this connection's metadata with `strategy`.
    pub async fn set_metadata(
        &self,
        metadata: Value,
        strategy: MergeStrategy,
    ) -> Result<(), MeshError> {
        self.require_mesh()?
            .set_connection_metadata(self.id(), metadata, strategy)
            .await
            .map(drop)
    }

    /// Sends a push `{command, payload}` to this connection. It never waits: the frame is
    /// queued, or refused when the connection is closing or its queue is full (which
    /// closes it as a slow consumer).
    pub fn send<P: Serialize + ?Sized>(&self, command: &str, payload: &P) -> Result<(), SendError> {
        self.push_frame(Frame::from(protocol::push(command, payload)))
    }

    pub(crate) fn push_frame(&self, frame: Frame) -> Result<(), SendError> {
        self.shared.outbound.push(frame)
    }

    /// Reserves the place of a reply in the outbound queue: nothing queued later is
    /// written before it. `None` when the connection is closing.
    pub(crate) fn reserve_reply(&self) -> Option<u64> {
        self.shared.outbound.reserve()
    }

    /// Gives up a reserved place (nothing will fill it).
    pub(crate) fn release_reservation(&self, reservation: Option<u64>) {
        if let Some(reservation) = reservation {
            self.shared.outbound.fill(reservation, None);
        }
    }

    /// Queues a reply, in its reserved place if it has one. A reply never closes the
    /// connection for its size; queued replies over the budget pause reading instead.
    pub(crate) fn push_reply(&self, reservation: Option<u64>, reply: Frame) {
        match reservation {
            Some(reservation) => self.shared.outbound.fill(reservation, Some(reply)),
            None => {
                let _ = self.shared.outbound.reply(reply);
            }
        }
    }

    /// Queues a push in its reserved place: it counts against the push budget (see
    /// [`Outbound::fill_push`]).
    pub(crate) fn push_in_reserved_place(
        &self,
        reservation: Option<u64>,
        frame: Frame,
    ) -> Result<(), SendError> {
        match reservation {
            Some(reservation) => self.shared.outbound.fill_push(reservation, frame),
            None => self.push_frame(frame),
        }
    }

    /// Closes the connection with close code 1000 and `reason`, after the frames already
    /// queued for it are written.
    pub fn close(&self, reason: impl Into<String>) {
        self.close_with(CloseReason::Normal(reason.into()));
    }

    pub(crate) fn close_with(&self, reason: CloseReason) -> bool {
        self.shared.outbound.close(reason)
    }

    /// Whether the connection is closed or closing.
    pub fn is_closed(&self) -> bool {
        self.shared.outbound.close_reason().is_some()
    }

    /// Why the connection closed, once it is closing.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.outbound.close_reason()
    }

    /// The last measured round trip of a latency probe.
    pub fn latency(&self) -> Option<Duration> {
        match self.shared.liveness.latency_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Takes the membership lock; see [`MembershipGuard`].
    pub(crate) async fn lock_membership(&self) -> MembershipGuard<'_> {
        self.shared.membership.lock().await
    }

    pub(crate) fn outbound(&self) -> &Outbound {
        &self.shared.outbound
    }

    /// Counts one more unanswered ping; returns how many are now unanswered. A ping sent
    /// while reading is (or was, since the previous ping) paused does not count, unless
    /// the writer is stuck; see [`Liveness`].
    pub(crate) fn ping_sent(&self) -> u32 {
        let liveness = &self.shared.liveness;
        let paused = liveness.paused_since_ping.swap(false, Ordering::Relaxed)
            || liveness.reading_paused.load(Ordering::Relaxed);
        if paused && !self.writer_stuck_since_last_ping() {
            return liveness.missed_pongs.load(Ordering::Relaxed);
        }
        liveness.missed_pongs.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether the writer is on the same batch as at the previous excused ping. (After
    /// pings that were counted anyway, the first excused one sees progress: the excuse
    /// errs towards keeping the client, by one ping interval at most.)
    fn writer_stuck_since_last_ping(&self) -> bool {
        let progress = self.shared.outbound.write_progress();
        let before = self
            .shared
            .liveness
            .batches_at_last_ping
            .swap(progress.batches_taken, Ordering::Relaxed);
        progress.writing && before == progress.batches_taken
    }

    /// Whether the connection answered the last ping (or could not: its reading is, or
    /// was since, paused). Such a connection's presence is extended.
    pub(crate) fn answered_last_ping(&self) -> bool {
        let liveness = &self.shared.liveness;
        liveness.missed_pongs.load(Ordering::Relaxed) == 0
            || liveness.reading_paused.load(Ordering::Relaxed)
            || liveness.paused_since_ping.load(Ordering::Relaxed)
    }

    /// Records whether the reader is reading; called only when that changes.
    pub(crate) fn set_reading_paused(&self, paused: bool) {
        let liveness = &self.shared.liveness;
        liveness.reading_paused.store(paused, Ordering::Relaxed);
        if paused {
            liveness.paused_since_ping.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn pong_received(&self) {
        self.shared
            .liveness
            .missed_pongs
            .store(0, Ordering::Relaxed);
    }

    pub(crate) fn latency_probe_sent(&self) {
        if let Ok(mut sent) = self.shared.liveness.latency_probe_sent.lock() {
            *sent = Some(Instant::now());
        }
    }

    pub(crate) fn latency_response_received(&self) {
        let sent = self
            .shared
            .liveness
            .latency_probe_sent
            .lock()
            .ok()
            .and_then(|mut sent| sent.take());
        if let Some(sent) = sent {
            let ms = u64::try_from(sent.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.shared.liveness.latency_ms.store(ms, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Connection {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for Connection {}
