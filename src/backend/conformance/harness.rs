//! What every case is built from: two attached instances of one store, each with a
//! recording inbox, and assertions that name the case and the instance when they fail.

use std::collections::HashSet;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::backend::{now_ms, Backend, Delivery, Inbox, PresenceChange, Push, Topic};
use crate::error::MeshError;

/// How long a delivery may take to arrive.
pub(super) const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one backend operation may take.
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How far a presence change's timestamp may be from this host's clock (a networked
/// store may stamp with its own clock).
const CLOCK_TOLERANCE_MS: u64 = 10 * 60 * 1000;
/// The command of the broadcasts that prove nothing else was delivered first.
const MARKER_COMMAND: &str = "conformance/marker";

/// One case: two instances attached to one fresh store.
pub(super) struct Case<B> {
    pub(super) a: Instance<B>,
    pub(super) b: Instance<B>,
    name: &'static str,
    markers: AtomicU64,
}

impl<B: Backend> Case<B> {
    /// Attaches `instance-a` and `instance-b`, one on each handle.
    pub(super) async fn start(name: &'static str, [first, second]: [B; 2]) -> Self {
        Case {
            a: Instance::attach(name, "instance-a", first).await,
            b: Instance::attach(name, "instance-b", second).await,
            name,
            markers: AtomicU64::new(0),
        }
    }

    /// Checks that nothing undelivered or unexpected is left, then detaches what is
    /// still attached.
    pub(super) async fn finish(self) {
        if let Some(from) = [&self.a, &self.b].into_iter().find(|i| i.is_attached()) {
            self.quiet(from, "the end of the case").await;
        }
        for instance in [&self.a, &self.b] {
            let lost = instance.inbox.registrations_lost.load(Ordering::SeqCst);
            assert_eq!(
                lost, 0,
                "[{}] {}: the backend reported the registration of a live instance lost",
                self.name, instance.id
            );
            if instance.is_attached() {
                instance.detach().await;
            }
        }
    }

    /// Proves that neither attached instance received anything it was not expected to
    /// (a second announcement, a push for a connection it does not hold): broadcasts a
    /// marker through `from` and expects it as the next delivery of each.
    pub(super) async fn quiet(&self, from: &Instance<B>, after: &str) {
        let marker = self.markers.fetch_add(1, Ordering::SeqCst);
        let delivery = Delivery::Broadcast {
            push: push(MARKER_COMMAND, json!({ "marker": marker })),
        };
        assert!(
            from.publish(delivery.clone()).await,
            "[{}] {}: publishing a broadcast returned false",
            self.name,
            from.id
        );
        for instance in [&self.a, &self.b] {
            if !instance.is_attached() {
                continue;
            }
            let next = instance.next(&format!("the marker after {after}")).await;
            assert_eq!(
                next, delivery,
                "[{}] {}: after {after}, expected nothing more (the marker), but got another delivery",
                self.name, instance.id
            );
        }
    }

    /// Both instances, for what each must do.
    pub(super) fn both(&self) -> [&Instance<B>; 2] {
        [&self.a, &self.b]
    }

    /// Starts listening to `topic` on both instances.
    pub(super) async fn listen_on_both(&self, topic: &Topic) {
        for instance in self.both() {
            instance.listen(topic.clone()).await;
        }
    }
}

/// One instance of the mesh: a handle to the store, and its recording inbox.
pub(super) struct Instance<B> {
    pub(super) backend: B,
    pub(super) id: Arc<str>,
    case: &'static str,
    inbox: Arc<Recorder>,
    received: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
    attached: AtomicBool,
}

impl<B: Backend> Instance<B> {
    async fn attach(case: &'static str, id: &'static str, backend: B) -> Self {
        let (sender, received) = mpsc::unbounded_channel();
        let inbox = Arc::new(Recorder {
            sender,
            listening: Mutex::new(HashSet::new()),
            registrations_lost: AtomicUsize::new(0),
        });
        let instance = Instance {
            backend,
            id: Arc::from(id),
            case,
            inbox,
            received: tokio::sync::Mutex::new(received),
            attached: AtomicBool::new(false),
        };
        let weak: Weak<Recorder> = Arc::downgrade(&instance.inbox);
        instance
            .ok(
                "attach",
                instance
                    .backend
                    .attach(instance.id.clone(), weak as Weak<dyn Inbox>),
            )
            .await;
        instance.attached.store(true, Ordering::SeqCst);
        instance
    }

    fn is_attached(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    /// Detaches the instance; the case no longer expects deliveries on it.
    pub(super) async fn detach(&self) {
        self.attached.store(false, Ordering::SeqCst);
        self.ok("detach", self.backend.detach(&self.id)).await;
    }

    /// Awaits a backend operation that must succeed within [`OPERATION_TIMEOUT`].
    pub(super) async fn ok<T>(
        &self,
        what: impl Display,
        operation: impl Future<Output = Result<T, MeshError>>,
    ) -> T {
        match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
            Ok(Ok(value)) => value,
            Ok(Err(err)) => panic!("[{}] {}: {what} failed: {err}", self.case, self.id),
            Err(_) => panic!(
                "[{}] {}: {what} did not complete within {OPERATION_TIMEOUT:?}",
                self.case, self.id
            ),
        }
    }

    /// Awaits a backend operation that must fail within [`OPERATION_TIMEOUT`].
    pub(super) async fn refused<T: std::fmt::Debug>(
        &self,
        what: impl Display,
        operation: impl Future<Output = Result<T, MeshError>>,
    ) -> MeshError {
        match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
            Ok(Err(err)) => err,
            Ok(Ok(value)) => panic!(
                "[{}] {}: {what} should have failed, but returned {value:?}",
                self.case, self.id
            ),
            Err(_) => panic!(
                "[{}] {}: {what} did not complete within {OPERATION_TIMEOUT:?}",
                self.case, self.id
            ),
        }
    }

    /// Registers a connection as held by this instance.
    pub(super) async fn register(&self, connection_id: &str) {
        self.ok(
            format!("register_connection({connection_id:?})"),
            self.backend.register_connection(&self.id, connection_id),
        )
        .await;
    }

    /// Unregisters a connection this instance holds.
    pub(super) async fn unregister(&self, connection_id: &str) {
        self.ok(
            format!("unregister_connection({connection_id:?})"),
            self.backend.unregister_connection(&self.id, connection_id),
        )
        .await;
    }

    /// Joins a room for a connection this instance holds, which must be registered.
    pub(super) async fn join(&self, connection_id: &str, room: &str, ttl: Option<Duration>) {
        let joined = self
            .ok(
                format!("join_room({connection_id:?}, {room:?})"),
                self.backend.join_room(connection_id, room, ttl),
            )
            .await;
        assert!(
            joined,
            "[{}] {}: join_room({connection_id:?}, {room:?}) of a registered connection returned false",
            self.case, self.id
        );
    }

    /// Publishes a delivery; returns what `publish` answered.
    pub(super) async fn publish(&self, delivery: Delivery) -> bool {
        let what = format!("publish({delivery:?})");
        self.ok(what, self.backend.publish(delivery)).await
    }

    /// A local connection starts listening to `topic` (as the engine does, before
    /// subscribing); returns once `subscribe` resolved.
    pub(super) async fn listen(&self, topic: Topic) {
        self.inbox.listening().insert(topic.clone());
        self.ok(
            format!("subscribe({topic:?})"),
            self.backend.subscribe(&self.id, &topic),
        )
        .await;
    }

    /// The last local listener of `topic` goes (as the engine does, before unsubscribing).
    pub(super) fn stop_listening(&self, topic: &Topic) {
        self.inbox.listening().remove(topic);
        self.backend.unsubscribe(&self.id, topic);
    }

    /// The next delivery this instance received (a topic delivery only if it listens to
    /// the topic, as the engine filters); panics after [`DELIVERY_TIMEOUT`].
    pub(super) async fn next(&self, what: &str) -> Delivery {
        let mut received = self.received.lock().await;
        match tokio::time::timeout(DELIVERY_TIMEOUT, received.recv()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => panic!("[{}] {}: the inbox is gone", self.case, self.id),
            Err(_) => panic!(
                "[{}] {}: {what} was not delivered within {DELIVERY_TIMEOUT:?}",
                self.case, self.id
            ),
        }
    }

    /// Expects `expected` as the next delivery.
    pub(super) async fn expect(&self, expected: &Delivery, what: &str) {
        let next = self.next(what).await;
        assert_eq!(
            &next, expected,
            "[{}] {}: expected {what} as the next delivery",
            self.case, self.id
        );
    }

    /// Expects a presence change as the next delivery (a state compared as JSON, the
    /// timestamp checked to be roughly now).
    pub(super) async fn expect_presence(
        &self,
        room: &str,
        connection_id: &str,
        change: PresenceChange,
        what: &str,
    ) {
        let next = self.next(what).await;
        self.check_presence(&next, room, connection_id, &change, what);
    }

    /// Expects these presence changes as the next deliveries, in any order.
    pub(super) async fn expect_presences_in_any_order(
        &self,
        expected: &[(&str, &str, PresenceChange)],
        what: &str,
    ) {
        let mut received = Vec::new();
        for _ in expected {
            received.push(self.next(what).await);
        }
        for (room, connection_id, change) in expected {
            let found = received.iter().position(|delivery| {
                matches!(delivery, Delivery::Presence { room: r, connection_id: c, .. }
                    if &**r == *room && &**c == *connection_id)
            });
            let Some(found) = found else {
                panic!(
                    "[{}] {}: {what}: expected a presence change of {connection_id:?} in \
                     {room:?}, got {received:?}",
                    self.case, self.id
                );
            };
            let delivery = received.remove(found);
            self.check_presence(&delivery, room, connection_id, change, what);
        }
    }

    #[track_caller]
    fn check_presence(
        &self,
        delivery: &Delivery,
        room: &str,
        connection_id: &str,
        change: &PresenceChange,
        what: &str,
    ) {
        let Delivery::Presence {
            room: got_room,
            connection_id: got_connection,
            change: got_change,
            timestamp,
        } = delivery
        else {
            panic!(
                "[{}] {}: expected {what} (a presence change), got {delivery:?}",
                self.case, self.id
            );
        };
        assert!(
            &**got_room == room
                && &**got_connection == connection_id
                && same_change(got_change, change),
            "[{}] {}: expected {what}: {change:?} of {connection_id:?} in {room:?}, got {delivery:?}",
            self.case,
            self.id
        );
        assert!(
            now_ms().abs_diff(*timestamp) < CLOCK_TOLERANCE_MS,
            "[{}] {}: {what}: timestamp {timestamp} is not milliseconds since the epoch near now",
            self.case,
            self.id
        );
    }

    /// Fails the case.
    #[track_caller]
    pub(super) fn fail(&self, what: impl Display) -> ! {
        panic!("[{}] {}: {what}", self.case, self.id)
    }

    /// Asserts a condition about this case, naming it on failure.
    #[track_caller]
    pub(super) fn check(&self, holds: bool, what: impl Display) {
        assert!(holds, "[{}] {}: {what}", self.case, self.id);
    }

    /// Asserts equality, naming the case on failure.
    #[track_caller]
    pub(super) fn same<T: PartialEq + std::fmt::Debug>(&self, got: T, expected: T, what: &str) {
        assert_eq!(got, expected, "[{}] {}: {what}", self.case, self.id);
    }

    /// Asserts that two JSON values are equal, and, when object keys keep their order
    /// (the `preserve-order` feature), that they serialise alike too.
    #[track_caller]
    pub(super) fn same_json(&self, got: &Value, expected: &Value, what: &str) {
        self.same(got, expected, what);
        if cfg!(feature = "preserve-order") {
            self.same(
                got.to_string(),
                expected.to_string(),
                &format!("{what} (object keys in the order written)"),
            );
        }
    }
}

/// The recording inbox: what it receives goes to the case, except topic deliveries for
/// topics it does not listen to, which it drops as the engine does (a backend may hand
/// every topic delivery to every instance).
struct Recorder {
    sender: mpsc::UnboundedSender<Delivery>,
    listening: Mutex<HashSet<Topic>>,
    registrations_lost: AtomicUsize,
}

impl Recorder {
    fn listening(&self) -> std::sync::MutexGuard<'_, HashSet<Topic>> {
        // Poisoned only by a panicking case, which fails anyway.
        self.listening
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inbox for Recorder {
    fn deliver(&self, delivery: Delivery) {
        if let Some(topic) = topic_of(&delivery) {
            if !self.listening().contains(&topic) {
                return;
            }
        }
        // The case may be over (a late announcement to a detached instance).
        let _ = self.sender.send(delivery);
    }

    fn resubscribed(&self) {}

    fn registration_lost(&self) {
        self.registrations_lost.fetch_add(1, Ordering::SeqCst);
    }

    fn has_listeners(&self, topic: &Topic) -> bool {
        self.listening().contains(topic)
    }

    fn topics(&self) -> Vec<Topic> {
        self.listening().iter().cloned().collect()
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

/// The topic a delivery is addressed to, if it is addressed to listeners.
fn topic_of(delivery: &Delivery) -> Option<Topic> {
    match delivery {
        Delivery::Topic { topic, .. } => Some(topic.clone()),
        Delivery::ChannelMessage { channel, .. } => Some(Topic::Channel(channel.clone())),
        Delivery::Presence { room, .. } => Some(Topic::Presence(room.clone())),
        Delivery::Record { record_id, .. } | Delivery::RecordDeleted { record_id, .. } => {
            Some(Topic::Record(record_id.clone()))
        }
        Delivery::RecordsChanged { exposure, .. } => Some(Topic::Collections(exposure.clone())),
        Delivery::ToConnection { .. }
        | Delivery::Broadcast { .. }
        | Delivery::Close { .. }
        | Delivery::Call { .. }
        | Delivery::Answer { .. } => None,
    }
}

/// Presence changes compare states as JSON values, not texts.
fn same_change(got: &PresenceChange, expected: &PresenceChange) -> bool {
    match (got, expected) {
        (PresenceChange::State(Some(got)), PresenceChange::State(Some(expected))) => {
            match (
                serde_json::from_str::<Value>(got),
                serde_json::from_str::<Value>(expected),
            ) {
                (Ok(got), Ok(expected)) => got == expected,
                _ => false,
            }
        }
        _ => got == expected,
    }
}

/// A push with this command and payload.
pub(super) fn push(command: &str, payload: Value) -> Push {
    Push {
        command: Arc::from(command),
        payload: Arc::from(payload.to_string()),
    }
}

/// A presence state change to `state`.
pub(super) fn state_change(state: &Value) -> PresenceChange {
    PresenceChange::State(Some(Arc::from(state.to_string())))
}
