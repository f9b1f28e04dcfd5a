//! A reconnecting, typed Rust client for the mesh protocol (feature `client`).
//!
//! It speaks only the wire protocol, so it works against any mesh server. It answers
//! `ping` and `latency:request` itself, turns error payloads into [`ClientError::Command`],
//! and after a dropped connection reconnects with backoff, renews what it had (rooms,
//! presence, channels, records, collections) and runs the
//! [`on_reconnect`](ClientBuilder::on_reconnect) hooks.
//!
//! ```no_run
//! use serde_json::json;
//! use tower_mesh::client::MeshClient;
//!
//! # async fn run() -> Result<(), tower_mesh::client::ClientError> {
//! let client = MeshClient::connect("ws://127.0.0.1:8787/").await?;
//! let reply = client.command("echo", json!({ "hello": "mesh" })).await?;
//! let mut pushes = client.pushes();
//! while let Ok(push) = pushes.recv().await {
//!     println!("{}: {}", push.command, push.payload);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

mod channels;
mod collections;
mod records;
mod rooms;
mod sync;

pub use collections::{CollectionChange, CollectionSnapshot, CollectionSubscription};
pub use records::{RecordChange, RecordMode, RecordSubscription};
pub use rooms::{
    Member, PresenceKind, PresenceSnapshot, PresenceUpdate, StateKeeper, StateOptions,
};

/// Why a client call failed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection could not be made (refused, HTTP error such as 401, handshake).
    Connect(String),
    /// No reply arrived within the timeout.
    Timeout,
    /// The connection closed before the reply, or the client was closed.
    Closed,
    /// The server replied with an error payload.
    Command(CommandFailure),
    /// The reply did not deserialise into the requested type.
    Decode(String),
    /// The server answered `success: false` (a guard refused, or the name is not
    /// exposed or tracked).
    Refused(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(reason) => write!(f, "could not connect: {reason}"),
            ClientError::Timeout => f.write_str("command timed out"),
            ClientError::Closed => f.write_str("connection closed"),
            ClientError::Command(failure) => failure.fmt(f),
            ClientError::Decode(reason) => write!(f, "unexpected reply: {reason}"),
            ClientError::Refused(what) => write!(f, "refused: {what}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// An error reply: the payload `{error, code, name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandFailure {
    /// Machine-readable code, for example `ENOTFOUND`.
    pub code: String,
    /// Human-readable message.
    pub error: String,
    /// The error's kind, for example `CommandError` (empty when the server sent none).
    pub name: String,
}

impl fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.error)
    }
}

impl CommandFailure {
    /// Reads an error payload: an object with string `error` and `code`.
    fn from_payload(payload: &Value) -> Option<CommandFailure> {
        let object = payload.as_object()?;
        let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_owned);
        Some(CommandFailure {
            code: text("code")?,
            error: text("error")?,
            name: text("name").unwrap_or_default(),
        })
    }
}

/// A push from the server: a frame without id.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// The event name.
    pub command: String,
    /// The event's payload.
    pub payload: Value,
}

/// A change in the client's connection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The first connection is up.
    Connected {
        /// The id the server assigned.
        connection_id: String,
    },
    /// The connection dropped; the client reconnects unless it was closed.
    Disconnected,
    /// A channel subscription was renewed on a new connection (before
    /// [`Reconnected`](ClientEvent::Reconnected)). With `recovered`, every message
    /// published while disconnected has reached the subscription's streams, in order,
    /// and the live ones follow. Without, some may be missing (the server's history no
    /// longer holds them all, the channel's stream was reset, or the server does not
    /// support recovery): read what the channel describes again.
    ChannelRestored {
        /// The channel's name.
        channel: String,
        /// Whether nothing was missed.
        recovered: bool,
    },
    /// A new connection is up and the reconnect hooks have run.
    Reconnected {
        /// The new connection's id.
        connection_id: String,
    },
    /// The server reported the last round trip, in milliseconds.
    Latency(f64),
    /// The server pinged.
    Ping,
}

type ReconnectHook =
    Arc<dyn Fn(MeshClient) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;
type PushCallback = Arc<dyn Fn(Value) + Send + Sync>;

/// Configures a [`MeshClient`]. Start with [`MeshClient::builder`].
#[must_use = "a builder does nothing until connect() is called"]
pub struct ClientBuilder {
    url: String,
    command_timeout: Duration,
    reconnect: bool,
    backoff: (Duration, Duration),
    ping_timeout: Duration,
    max_missed_pings: u32,
    answer_pings: bool,
    hooks: Vec<ReconnectHook>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Default timeout of [`MeshClient::command`]. Default 30 s.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Whether to reconnect after the connection drops. Default `true`.
    pub fn reconnect(mut self, enabled: bool) -> Self {
        self.reconnect = enabled;
        self
    }

    /// Delay before the first reconnect attempt (doubling after each failure) and its
    /// cap. Defaults 2 s (mesh's) and 30 s; attempts are unlimited.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max.max(initial));
        self
    }

    /// The link counts as dead, and the client reconnects, when no ping arrived for
    /// `timeout * (max_missed_pings + 1)`. Defaults 30 s and 1, as mesh's client.
    pub fn ping_timeout(mut self, timeout: Duration, max_missed_pings: u32) -> Self {
        self.ping_timeout = timeout;
        self.max_missed_pings = max_missed_pings;
        self
    }

    /// Whether to answer pings. Default `true`; `false` simulates a dead client.
    pub fn answer_pings(mut self, answer: bool) -> Self {
        self.answer_pings = answer;
        self
    }

    /// Runs after every reconnect, once the new id has arrived and before
    /// [`ClientEvent::Reconnected`]; hooks run in the order added, after the client has
    /// re-joined its rooms, renewed its presence subscriptions, re-published its
    /// presence states and subscribed to its channels, records and collections again.
    pub fn on_reconnect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(MeshClient) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.hooks
            .push(Arc::new(move |client| Box::pin(hook(client))));
        self
    }

    /// Connects; resolves once the server has assigned the connection id.
    pub async fn connect(self) -> Result<MeshClient, ClientError> {
        let (pushes, _) = broadcast::channel(1024);
        let (events, _) = broadcast::channel(256);
        let inner = Arc::new(Inner {
            url: self.url,
            command_timeout: self.command_timeout,
            reconnect: self.reconnect,
            backoff: self.backoff,
            ping_timeout: self.ping_timeout * (self.max_missed_pings + 1),
            answer_pings: self.answer_pings,
            hooks: self.hooks,
            next_id: AtomicU64::new(1),
            link: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            connection_id: watch::channel(None).0,
            pushes,
            events,
            callbacks: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            memberships: Mutex::new(rooms::Memberships::default()),
            sync: sync::State::default(),
            wake: Notify::new(),
            task: Mutex::new(None),
        });
        let (socket, id) = open(&inner).await?;
        let outgoing = install(&inner, &id);
        let _ = inner.events.send(ClientEvent::Connected {
            connection_id: id.clone(),
        });
        let task = tokio::spawn(run(inner.clone(), (socket, outgoing)));
        *lock(&inner.task) = Some(task);
        Ok(MeshClient {
            handle: Arc::new(Handle { inner, owner: true }),
        })
    }
}

/// A connection to a mesh server. Cheap to clone; the connection closes when the last
/// clone is dropped or [`close`](MeshClient::close) is called.
#[derive(Clone)]
pub struct MeshClient {
    handle: Arc<Handle>,
}

impl fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClient")
            .field("url", &self.handle.inner.url)
            .field("connection_id", &self.connection_id())
            .finish_non_exhaustive()
    }
}

/// Ends the background task when the last user-held `MeshClient` goes away.
struct Handle {
    inner: Arc<Inner>,
    /// `false` for the handles given to reconnect hooks: they must not close the client.
    owner: bool,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.owner {
            self.inner.closed.store(true, Ordering::SeqCst);
            self.inner.wake.notify_one();
        }
    }
}

struct Inner {
    url: String,
    command_timeout: Duration,
    reconnect: bool,
    backoff: (Duration, Duration),
    ping_timeout: Duration,
    answer_pings: bool,
    hooks: Vec<ReconnectHook>,
    next_id: AtomicU64,
    /// The current socket's outgoing queue; `None` while disconnected.
    link: Mutex<Option<mpsc::UnboundedSender<Message>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    connection_id: watch::Sender<Option<String>>,
    pushes: broadcast::Sender<Push>,
    events: broadcast::Sender<ClientEvent>,
    callbacks: Mutex<HashMap<String, Vec<PushCallback>>>,
    closed: AtomicBool,
    /// Rooms, presence subscriptions and states to restore after a reconnect.
    memberships: Mutex<rooms::Memberships>,
    /// Channel, record and collection subscriptions, to route pushes and to restore.
    sync: sync::State,
    /// Wakes the connection task for `close` and `force_reconnect`.
    wake: Notify,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and waits for `mesh/assign-id`.
async fn open(inner: &Inner) -> Result<(Socket, String), ClientError> {
    let handshake = async {
        let (mut socket, _) = tokio_tungstenite::connect_async(inner.url.as_str())
            .await
            .map_err(|err| ClientError::Connect(err.to_string()))?;
        loop {
            match socket.next().await {
                Some(Ok(message)) => {
                    if let Message::Close(frame) = &message {
                        let reason = frame
                            .as_ref()
                            .map(|f| f.reason.to_string())
                            .unwrap_or_default();
                        return Err(ClientError::Connect(format!("closed by server: {reason}")));
                    }
                    let Some(frame) = parse(&message) else {
                        continue;
                    };
                    if frame.get("id").is_none() && frame["command"] == "mesh/assign-id" {
                        if let Some(id) = frame["payload"].as_str() {
                            return Ok((socket, id.to_owned()));
                        }
                    }
                }
                Some(Err(err)) => return Err(ClientError::Connect(err.to_string())),
                None => {
                    return Err(ClientError::Connect(
                        "closed before an id was assigned".into(),
                    ))
                }
            }
        }
    };
    tokio::time::timeout(inner.command_timeout, handshake)
        .await
        .unwrap_or(Err(ClientError::Timeout))
}

fn parse(message: &Message) -> Option<Value> {
    let text = match message {
        Message::Text(text) => text.as_str(),
        Message::Binary(bytes) => std::str::from_utf8(bytes).ok()?,
        _ => return None,
    };
    match serde_json::from_str::<Value>(text) {
        Ok(frame) if frame.is_object() => Some(frame),
        _ => {
            tracing::debug!("ignored a frame that is not a JSON object");
            None
        }
    }
}

/// Makes a freshly opened connection the current one: its id and its outgoing queue.
fn install(inner: &Inner, id: &str) -> mpsc::UnboundedReceiver<Message> {
    let (link, outgoing) = mpsc::unbounded_channel();
    *lock(&inner.link) = Some(link);
    inner.connection_id.send_replace(Some(id.to_owned()));
    outgoing
}

/// Owns the socket for the client's whole life: one connection after another.
async fn run(inner: Arc<Inner>, first: (Socket, mpsc::UnboundedReceiver<Message>)) {
    let mut current = Some(first);
    let mut delay = inner.backoff.0;
    loop {
        if let Some((socket, outgoing)) = current.take() {
            delay = inner.backoff.0;
            serve(&inner, socket, outgoing).await;
            inner.connection_id.send_replace(None);
            *lock(&inner.link) = None;
            lock(&inner.pending).clear();
            let _ = inner.events.send(ClientEvent::Disconnected);
        }
        if inner.closed.load(Ordering::SeqCst) || !inner.reconnect {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = inner.wake.notified() => {}
        }
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        match open(&inner).await {
            Ok((socket, id)) => {
                let outgoing = install(&inner, &id);
                announce_reconnect(&inner, id);
                current = Some((socket, outgoing));
            }
            Err(err) => {
                tracing::debug!(%err, "reconnect failed");
                delay = (delay * 2).min(inner.backoff.1);
            }
        }
    }
}

/// Runs one connection until it drops, the client closes, or a reconnect is forced.
async fn serve(
    inner: &Arc<Inner>,
    mut socket: Socket,
    mut outgoing: mpsc::UnboundedReceiver<Message>,
) {
    let mut ping_deadline = Instant::now() + inner.ping_timeout;
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(message)) => {
                    if let Some(frame) = parse(&message) {
                        if frame["command"] == "ping" && frame.get("id").is_none() {
                            ping_deadline = Instant::now() + inner.ping_timeout;
                        }
                        if let Some(answer) = handle_frame(inner, frame) {
                            if socket.send(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            },
            Some(message) = outgoing.recv() => {
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(ping_deadline) => {
                tracing::debug!("no ping from the server; reconnecting");
                return;
            }
            () = inner.wake.notified() => {
                if inner.closed.load(Ordering::SeqCst) {
                    let close = Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "client closed".into() }));
                    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                }
                return;
            }
        }
    }
}

/// The reconnect hooks call commands, which need this connection served: run them beside it.
fn announce_reconnect(inner: &Arc<Inner>, id: String) {
    let client = MeshClient::observer(inner);
    let hooks = inner.hooks.clone();
    let events = inner.events.clone();
    tokio::spawn(async move {
        rooms::restore(&client).await;
        sync::restore(&client).await;
        for hook in &hooks {
            hook(client.clone()).await;
        }
        let _ = events.send(ClientEvent::Reconnected { connection_id: id });
    });
}

/// Resolves replies, answers probes, and fans pushes out. Returns a frame to send back.
fn handle_frame(inner: &Arc<Inner>, mut frame: Value) -> Option<Message> {
    let payload = frame
        .get_mut("payload")
        .map(Value::take)
        .unwrap_or(Value::Null);
    if let Some(id) = frame.get("id").and_then(Value::as_u64) {
        if let Some(waiter) = lock(&inner.pending).remove(&id) {
            let _ = waiter.send(payload);
        }
        return None;
    }
    let command = frame.get("command").and_then(Value::as_str)?.to_owned();
    match command.as_str() {
        "ping" => {
            let _ = inner.events.send(ClientEvent::Ping);
            inner.answer_pings.then(|| answer(inner, "pong"))
        }
        "latency:request" => Some(answer(inner, "latency:response")),
        "latency" => {
            let _ = inner
                .events
                .send(ClientEvent::Latency(payload.as_f64().unwrap_or_default()));
            None
        }
        _ => {
            if command == rooms::PRESENCE_UPDATE {
                rooms::dispatch_presence(inner, &payload);
            }
            sync::dispatch(inner, &command, &payload);
            let callbacks = lock(&inner.callbacks)
                .get(&command)
                .cloned()
                .unwrap_or_default();
            for callback in callbacks {
                callback(payload.clone());
            }
            let _ = inner.pushes.send(Push { command, payload });
            None
        }
    }
}

fn answer(inner: &Inner, command: &str) -> Message {
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    Message::text(json!({ "id": id, "command": command, "payload": {} }).to_string())
}

impl MeshClient {
    /// Connects to `url` with the default settings.
    pub async fn connect(url: &str) -> Result<MeshClient, ClientError> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a client for `url` (`ws://host:port/path`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            command_timeout: Duration::from_secs(30),
            reconnect: true,
            backoff: (Duration::from_secs(2), Duration::from_secs(30)),
            ping_timeout: Duration::from_secs(30),
            max_missed_pings: 1,
            answer_pings: true,
            hooks: Vec::new(),
        }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.handle.inner
    }

    /// A handle for the client's own tasks: it does not keep the client open.
    fn observer(inner: &Arc<Inner>) -> MeshClient {
        MeshClient {
            handle: Arc::new(Handle {
                inner: inner.clone(),
                owner: false,
            }),
        }
    }

    /// The current connection's id (empty while disconnected); it changes after a reconnect.
    pub fn connection_id(&self) -> String {
        self.inner()
            .connection_id
            .borrow()
            .clone()
            .unwrap_or_default()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner().connection_id.borrow().is_some()
    }

    /// Sends a command and waits for its reply, within the default timeout.
    pub async fn command(&self, name: &str, payload: Value) -> Result<Value, ClientError> {
        self.command_with_timeout(name, payload, self.inner().command_timeout)
            .await
    }

    /// Sends a command and waits for its reply within `timeout`. While disconnected it
    /// waits for the reconnect, within the same timeout.
    pub async fn command_with_timeout(
        &self,
        name: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let inner = self.inner();
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let call = async {
            let mut connected = inner.connection_id.subscribe();
            loop {
                if inner.closed.load(Ordering::SeqCst) {
                    return Err(ClientError::Closed);
                }
                if connected.borrow_and_update().is_some() {
                    break;
                }
                if !inner.reconnect {
                    return Err(ClientError::Closed);
                }
                connected.changed().await.map_err(|_| ClientError::Closed)?;
            }
            let (waiter, reply) = oneshot::channel();
            lock(&inner.pending).insert(id, waiter);
            let frame =
                Message::text(json!({ "id": id, "command": name, "payload": payload }).to_string());
            let sent = lock(&inner.link)
                .as_ref()
                .map(|link| link.send(frame).is_ok());
            if sent != Some(true) {
                return Err(ClientError::Closed);
            }
            reply.await.map_err(|_| ClientError::Closed)
        };
        let payload = match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout),
        };
        lock(&inner.pending).remove(&id);
        let payload = payload?;
        match CommandFailure::from_payload(&payload) {
            Some(failure) => Err(ClientError::Command(failure)),
            None => Ok(payload),
        }
    }

    /// Sends a command with any serialisable payload and deserialises the reply.
    pub async fn command_as<T: DeserializeOwned>(
        &self,
        name: &str,
        payload: impl Serialize,
    ) -> Result<T, ClientError> {
        let payload =
            serde_json::to_value(payload).map_err(|err| ClientError::Decode(err.to_string()))?;
        let reply = self.command(name, payload).await?;
        serde_json::from_value(reply).map_err(|err| ClientError::Decode(err.to_string()))
    }

    /// Every push from now on (except `ping`, `latency:request` and `latency`, which
    /// surface as [`ClientEvent`]s).
    pub fn pushes(&self) -> broadcast::Receiver<Push> {
        self.inner().pushes.subscribe()
    }

    /// Calls `callback` with the payload of every push named `command`.
    pub fn on(&self, command: &str, callback: impl Fn(Value) + Send + Sync + 'static) {
        lock(&self.inner().callbacks)
            .entry(command.to_owned())
            .or_default()
            .push(Arc::new(callback));
    }

    /// Connection changes, pings and latency reports from now on.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.inner().events.subscribe()
    }

    /// Closes the connection (close code 1000) and stops reconnecting; pending commands
    /// fail with [`ClientError::Closed`].
    pub async fn close(&self) {
        let inner = self.inner();
        inner.closed.store(true, Ordering::SeqCst);
        inner.wake.notify_one();
        let task = lock(&inner.task).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }

    /// Drops the socket and reconnects at once, as if the network had dropped it.
    pub async fn force_reconnect(&self) {
        self.inner().wake.notify_one();
    }
}
