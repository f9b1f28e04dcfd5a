//! Metrics through the [`metrics`](https://docs.rs/metrics) crate's facade: every metric's
//! name, labels and description, and the small functions the engine calls where things
//! happen. The application picks the exporter (Prometheus, StatsD, OpenTelemetry...) by
//! installing a `metrics` recorder; with none installed every recording is a no-op.
//!
//! The table of metrics and labels users read is the crate docs' "Metrics" section
//! (`docs/crate.md`, repeated in the README); each constant below names one of them.
//! Labels are bounded: never a connection id, room, channel or record name. `command` is
//! a registered command's name (a built-in `mesh/...` one or a route of the application);
//! a client's unknown command is `unknown`. `code` is one of the engine's error codes, or
//! `other` for a code a handler chose. Every other label value is a `&'static str` chosen
//! here.
//!
//! Commands' handles are registered at each command's first run and kept beside its
//! route, and the frame and byte counters' at the mesh's first connection, so the hot
//! path neither hashes a key nor allocates a label; install the recorder before the
//! first client connects.

// Without the feature the recording macros drop their arguments, names and labels unread.
#![cfg_attr(not(feature = "metrics"), allow(unused_variables, dead_code))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::connection::CloseReason;

#[cfg(feature = "metrics")]
use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram,
};
#[cfg(not(feature = "metrics"))]
use noop::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram,
};

/// Gauge: connections registered on this instance.
pub(crate) const CONNECTIONS: &str = "mesh_connections";
/// Gauge: rooms with at least one member on this instance.
pub(crate) const ROOMS: &str = "mesh_rooms";
/// Gauge, by `kind`: subscriptions held by this instance's connections.
pub(crate) const SUBSCRIPTIONS: &str = "mesh_subscriptions";
/// Counter, by `command`: commands received.
pub(crate) const COMMANDS: &str = "mesh_commands_total";
/// Counter, by `command` and `code`: commands answered with an error.
pub(crate) const COMMAND_ERRORS: &str = "mesh_command_errors_total";
/// Histogram, by `command`: seconds from a command's frame to its reply.
pub(crate) const COMMAND_DURATION: &str = "mesh_command_duration_seconds";
/// Counter, by `code` and `reason`: connections ended.
pub(crate) const CLOSES: &str = "mesh_closes_total";
/// Counter: connections closed for not reading what was sent to them.
pub(crate) const SLOW_CONSUMER_CLOSES: &str = "mesh_slow_consumer_closes_total";
/// Counter, by `direction`: WebSocket data frames.
pub(crate) const FRAMES: &str = "mesh_frames_total";
/// Counter, by `direction`: bytes of WebSocket data frames (payloads).
pub(crate) const BYTES: &str = "mesh_bytes_total";
/// Histogram, by `kind`: local recipients of one published message or push.
pub(crate) const FANOUT: &str = "mesh_fanout_recipients";
/// Histogram, by `operation`: seconds a backend operation took.
pub(crate) const BACKEND_DURATION: &str = "mesh_backend_operation_duration_seconds";
/// Counter, by `operation`: backend operations that failed.
pub(crate) const BACKEND_ERRORS: &str = "mesh_backend_errors_total";

/// The `command` label of a command no route serves.
pub(crate) const UNKNOWN_COMMAND: &str = "unknown";

/// The error codes that label errors as themselves; any other code is `other`.
const ERROR_CODES: [&str; 7] = [
    "ENOTFOUND",
    "ESERVER",
    "EINVALID",
    "ETIMEOUT",
    "EUNAVAILABLE",
    "EFORBIDDEN",
    "EOVERLOADED",
];
const OTHER_CODE: &str = "other";

/// Tells the recorder what each metric is. Called at a mesh's first connection: a
/// description given before the recorder is installed is lost.
fn describe() {
    describe_gauge!(CONNECTIONS, "Connections registered on this instance.");
    describe_gauge!(ROOMS, "Rooms with at least one member on this instance.");
    describe_gauge!(
        SUBSCRIPTIONS,
        "Channel, record, presence and collection subscriptions held by this instance's connections."
    );
    describe_counter!(COMMANDS, "Commands received, by command.");
    describe_counter!(
        COMMAND_ERRORS,
        "Commands answered with an error, by command and error code."
    );
    describe_histogram!(
        COMMAND_DURATION,
        ::metrics::Unit::Seconds,
        "Time from a command's frame to its reply, by command."
    );
    describe_counter!(CLOSES, "Connections ended, by close code and reason.");
    describe_counter!(
        SLOW_CONSUMER_CLOSES,
        "Connections closed because their outbound queue was full."
    );
    describe_counter!(FRAMES, "WebSocket data frames, by direction (in, out).");
    describe_counter!(
        BYTES,
        ::metrics::Unit::Bytes,
        "Bytes of WebSocket data frames, by direction (in, out)."
    );
    describe_histogram!(
        FANOUT,
        "Local recipients of one published message or push, by kind."
    );
    describe_histogram!(
        BACKEND_DURATION,
        ::metrics::Unit::Seconds,
        "Time a backend operation took, by operation (Redis backend)."
    );
    describe_counter!(
        BACKEND_ERRORS,
        "Backend operations that failed, by operation."
    );
}

/// A mesh's own handles: the frame and byte counters every frame touches, and the
/// metrics of unknown commands.
pub(crate) struct MeshMetrics {
    wire: OnceLock<Wire>,
    unknown: CommandMetrics,
}

struct Wire {
    frames_in: Counter,
    frames_out: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl Default for MeshMetrics {
    fn default() -> Self {
        MeshMetrics {
            wire: OnceLock::new(),
            unknown: CommandMetrics::new(Arc::from(UNKNOWN_COMMAND)),
        }
    }
}

impl MeshMetrics {
    /// The metrics of a command no route serves.
    pub(crate) fn unknown_command(&self) -> &CommandMetrics {
        &self.unknown
    }

    /// Registers the frame counters and describes every metric, once: at the first
    /// connection, by when the application has installed its recorder.
    pub(crate) fn connection_started(&self) {
        self.wire();
    }

    fn wire(&self) -> &Wire {
        self.wire.get_or_init(|| {
            #[cfg(feature = "metrics")]
            clock();
            describe();
            Wire {
                frames_in: counter!(FRAMES, "direction" => "in"),
                frames_out: counter!(FRAMES, "direction" => "out"),
                bytes_in: counter!(BYTES, "direction" => "in"),
                bytes_out: counter!(BYTES, "direction" => "out"),
            }
        })
    }

    /// `frames` data frames of `bytes` in all written to a client, and what its
    /// `received` tally holds: counted together, once per write.
    pub(crate) fn frames_sent(&self, frames: usize, bytes: usize, received: &Received) {
        let wire = self.wire();
        wire.frames_out.increment(frames as u64);
        wire.bytes_out.increment(bytes as u64);
        self.count_received(received);
    }

    /// Counts what a connection's `received` tally holds, and empties it.
    pub(crate) fn count_received(&self, received: &Received) {
        let frames = received.frames.swap(0, Ordering::Relaxed);
        if frames > 0 {
            let wire = self.wire();
            wire.frames_in.increment(frames);
            wire.bytes_in
                .increment(received.bytes.swap(0, Ordering::Relaxed));
        }
    }
}

/// The frames one connection read and has not counted yet. The shared counters are
/// touched by every connection on every thread, and some exporters' increments are two
/// atomic operations: a connection counts what it read when it next writes (every
/// command gets a reply) or ends, once for a whole burst.
#[derive(Default)]
pub(crate) struct Received {
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl Received {
    /// One data frame of `bytes`. Only the connection's own task reads and writes the
    /// tally, so a load and a store do (no locked instruction).
    pub(crate) fn frame(&self, bytes: usize) {
        let add = |counter: &AtomicU64, n: u64| {
            counter.store(
                counter.load(Ordering::Relaxed).wrapping_add(n),
                Ordering::Relaxed,
            );
        };
        add(&self.frames, 1);
        add(&self.bytes, bytes as u64);
    }
}

/// The metrics of one command name, registered at its first run.
pub(crate) struct CommandMetrics {
    label: Arc<str>,
    handles: OnceLock<CommandHandles>,
}

struct CommandHandles {
    commands: Counter,
    /// Registered at the first command that runs: refused ones are not timed.
    duration: OnceLock<Histogram>,
    /// By [`ERROR_CODES`] index, then `other`; registered at the first such error.
    errors: [OnceLock<Counter>; ERROR_CODES.len() + 1],
}

impl CommandMetrics {
    /// The metrics of the command `label`, a registered name or [`UNKNOWN_COMMAND`].
    pub(crate) fn new(label: Arc<str>) -> Self {
        CommandMetrics {
            label,
            handles: OnceLock::new(),
        }
    }

    fn handles(&self) -> &CommandHandles {
        self.handles.get_or_init(|| CommandHandles {
            commands: counter!(COMMANDS, "command" => shared(&self.label)),
            duration: OnceLock::new(),
            errors: Default::default(),
        })
    }

    /// One command answered: counted, timed from `started`, and its error code counted
    /// when it failed.
    pub(crate) fn answered(&self, started: Stopwatch, error_code: Option<&str>) {
        let handles = self.handles();
        handles.commands.increment(1);
        let duration = handles
            .duration
            .get_or_init(|| histogram!(COMMAND_DURATION, "command" => shared(&self.label)));
        started.record(duration);
        if let Some(code) = error_code {
            self.error(handles, code).increment(1);
        }
    }

    /// One command refused before it ran (unknown, or a malformed frame): counted with
    /// its error, not timed.
    pub(crate) fn refused(&self, error_code: &str) {
        let handles = self.handles();
        handles.commands.increment(1);
        self.error(handles, error_code).increment(1);
    }

    fn error<'a>(&self, handles: &'a CommandHandles, code: &str) -> &'a Counter {
        let index = ERROR_CODES
            .iter()
            .position(|known| *known == code)
            .unwrap_or(ERROR_CODES.len());
        let code = ERROR_CODES.get(index).copied().unwrap_or(OTHER_CODE);
        handles.errors[index].get_or_init(
            || counter!(COMMAND_ERRORS, "command" => shared(&self.label), "code" => code),
        )
    }
}

#[cfg(feature = "metrics")]
fn shared(label: &Arc<str>) -> ::metrics::SharedString {
    ::metrics::SharedString::from_shared(Arc::clone(label))
}

/// When a command started, for its duration; nothing without the `metrics` feature.
///
/// It reads the CPU's time-stamp counter where that is reliable (a `clock_gettime`
/// elsewhere): every command takes two readings, and a counter reading costs a fraction
/// of `Instant::now`'s.
#[derive(Clone, Copy)]
pub(crate) struct Stopwatch {
    #[cfg(feature = "metrics")]
    started: u64,
}

/// Calibrated once per process (a few milliseconds), at the first connection.
#[cfg(feature = "metrics")]
fn clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

impl Stopwatch {
    pub(crate) fn start() -> Self {
        Stopwatch {
            #[cfg(feature = "metrics")]
            started: clock().raw(),
        }
    }

    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn record(self, histogram: &Histogram) {
        #[cfg(feature = "metrics")]
        {
            let clock = clock();
            let nanos = clock.delta_as_nanos(self.started, clock.raw());
            histogram.record(nanos as f64 * 1e-9);
        }
    }
}

/// A connection was registered (+1) or unregistered (-1).
pub(crate) fn connections_changed(delta: i8) {
    gauge!(CONNECTIONS).increment(f64::from(delta));
}

/// The number of rooms with local members changed by `delta`.
pub(crate) fn rooms_changed(delta: i8) {
    gauge!(ROOMS).increment(f64::from(delta));
}

/// What a subscription is to: the `kind` label of [`SUBSCRIPTIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubscriptionKind {
    Channel,
    Record,
    Presence,
    Collection,
}

/// The subscriptions of `kind` held by local connections changed by `delta`.
pub(crate) fn subscriptions_changed(kind: SubscriptionKind, delta: i8) {
    let gauge = match kind {
        SubscriptionKind::Channel => gauge!(SUBSCRIPTIONS, "kind" => "channel"),
        SubscriptionKind::Record => gauge!(SUBSCRIPTIONS, "kind" => "record"),
        SubscriptionKind::Presence => gauge!(SUBSCRIPTIONS, "kind" => "presence"),
        SubscriptionKind::Collection => gauge!(SUBSCRIPTIONS, "kind" => "collection"),
    };
    gauge.increment(f64::from(delta));
}

/// What a fan-out delivered: the `kind` label of [`FANOUT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FanOutKind {
    Room,
    Presence,
    Channel,
    Record,
    Broadcast,
}

/// One published message or push reached `recipients` local connections.
pub(crate) fn fanned_out(kind: FanOutKind, recipients: usize) {
    let histogram = match kind {
        FanOutKind::Room => histogram!(FANOUT, "kind" => "room"),
        FanOutKind::Presence => histogram!(FANOUT, "kind" => "presence"),
        FanOutKind::Channel => histogram!(FANOUT, "kind" => "channel"),
        FanOutKind::Record => histogram!(FANOUT, "kind" => "record"),
        FanOutKind::Broadcast => histogram!(FANOUT, "kind" => "broadcast"),
    };
    histogram.record(recipients as f64);
}

/// A connection ended for `reason`.
pub(crate) fn connection_closed(reason: &CloseReason) {
    let counter = match reason {
        CloseReason::PeerClosed => counter!(CLOSES, "code" => "1000", "reason" => "peer_closed"),
        CloseReason::Normal(_) => counter!(CLOSES, "code" => "1000", "reason" => "normal"),
        CloseReason::GoingAway => counter!(CLOSES, "code" => "1001", "reason" => "going_away"),
        CloseReason::ProtocolError(_) => {
            counter!(CLOSES, "code" => "1002", "reason" => "protocol_error")
        }
        CloseReason::InvalidData(_) => {
            counter!(CLOSES, "code" => "1007", "reason" => "invalid_data")
        }
        CloseReason::SlowConsumer => {
            counter!(SLOW_CONSUMER_CLOSES).increment(1);
            counter!(CLOSES, "code" => "1008", "reason" => "slow_consumer")
        }
        CloseReason::PingTimeout => counter!(CLOSES, "code" => "1008", "reason" => "ping_timeout"),
        CloseReason::Refused(_) => counter!(CLOSES, "code" => "1008", "reason" => "refused"),
        CloseReason::FrameTooLarge => {
            counter!(CLOSES, "code" => "1009", "reason" => "frame_too_large")
        }
        CloseReason::StateLost => counter!(CLOSES, "code" => "1012", "reason" => "state_lost"),
        CloseReason::Unavailable => counter!(CLOSES, "code" => "1013", "reason" => "unavailable"),
    };
    counter.increment(1);
}

/// A backend `operation` (a `&'static str`, so the label is never built per call) took
/// `started`'s time and succeeded or failed.
pub(crate) fn backend_operation(operation: &'static str, started: Stopwatch, succeeded: bool) {
    started.record(&histogram!(BACKEND_DURATION, "operation" => operation));
    if !succeeded {
        counter!(BACKEND_ERRORS, "operation" => operation).increment(1);
    }
}

/// Stand-ins for the `metrics` crate's macros and handles without the `metrics` feature:
/// every recording compiles to nothing (the macros drop their arguments unread).
#[cfg(not(feature = "metrics"))]
mod noop {
    #[derive(Clone, Default)]
    pub(super) struct Counter;
    impl Counter {
        pub(super) fn increment(&self, _: u64) {}
    }
    #[derive(Clone, Default)]
    pub(super) struct Gauge;
    impl Gauge {
        pub(super) fn increment(&self, _: f64) {}
    }
    #[derive(Clone, Default)]
    pub(super) struct Histogram;
    impl Histogram {
        pub(super) fn record(&self, _: f64) {}
    }
    macro_rules! counter {
        ($($ignored:tt)*) => {
            $crate::metrics::noop::Counter
        };
    }
    macro_rules! gauge {
        ($($ignored:tt)*) => {
            $crate::metrics::noop::Gauge
        };
    }
    macro_rules! histogram {
        ($($ignored:tt)*) => {
            $crate::metrics::noop::Histogram
        };
    }
    macro_rules! describe {
        ($($ignored:tt)*) => {
            ()
        };
    }
    pub(super) use {
        counter, describe as describe_counter, describe as describe_gauge,
        describe as describe_histogram, gauge, histogram,
    };
}
