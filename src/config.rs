//! Engine settings, each with its documented default.

use std::time::Duration;

/// The longest room (and later channel, record, collection) name a client may use, in
/// bytes; longer names are `EINVALID`.
pub const MAX_NAME_BYTES: usize = 1024;

/// Settings of one mesh; set through [`MeshBuilder`](crate::MeshBuilder).
#[derive(Debug, Clone)]
pub(crate) struct MeshConfig {
    /// Path the WebSocket endpoint answers on. Default `/`.
    pub path: String,
    /// Interval between pings. Default 30 s (mesh's `pingInterval`).
    pub ping_interval: Duration,
    /// Unanswered pings tolerated before closing. Default 1 (mesh's `maxMissedPongs`).
    pub max_missed_pongs: u32,
    /// Interval between latency probes. Default 5 s (mesh's `latencyInterval`).
    pub latency_interval: Duration,
    /// Largest inbound frame, in bytes. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Outbound queue budget per connection, in bytes, for pushes and for replies apart.
    /// Default 1 MiB.
    pub max_outbound_bytes: usize,
    /// Commands of one connection running at once. Default 64.
    pub max_in_flight: usize,
    /// Bytes one read takes from the socket, through a buffer held only while data
    /// arrives. Default 2 KiB.
    pub read_buffer_bytes: usize,
    /// Bytes gathered before a socket write, per connection. Default 16 KiB.
    pub write_buffer_bytes: usize,
    /// Longest `shutdown` waits for connections to finish. Default 10 s.
    pub shutdown_timeout: Duration,
    /// Whether any connection may read any other's metadata, on every path. Default `false`.
    pub open_connection_metadata: bool,
    /// Rooms one connection may be in through `mesh/join-room`. Default 1024.
    pub max_rooms_per_connection: usize,
    /// Subscriptions (presence, channels, records, collections) one connection may hold.
    /// Default 1024.
    pub max_subscriptions_per_connection: usize,
    /// Records one collection subscription may hold. Default 10 000.
    pub max_collection_members: usize,
    /// Channel names clients may never use. Default `Some("mesh:")`.
    pub reserved_channel_prefix: Option<String>,
    /// Byte limits on what clients and the server store (see [`ByteLimits`]).
    pub bytes: ByteLimits,
    /// Bytes of upgrade-request header names and values a connection keeps. Default 16 KiB.
    pub max_kept_header_bytes: usize,
    /// WebSocket connections this instance holds at once. Default 100 000.
    pub max_connections: usize,
}

/// The most bytes, as JSON text, of each thing a client can make the mesh store or send
/// to many. Over a limit, the write is refused with `EINVALID` naming the limit, and
/// nothing is stored or sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteLimits {
    /// A record's stored value, after any merge. Default 1 MiB (never above the frame
    /// limit).
    pub record: usize,
    /// One channel message. Default 64 KiB.
    pub channel_message: usize,
    /// Every kept message of one channel together; the oldest go first. Default 8 MiB.
    pub history: usize,
    /// One presence state. Default 16 KiB.
    pub presence_state: usize,
    /// A connection's or a room's metadata, after any merge. Default 16 KiB.
    pub metadata: usize,
}

impl Default for ByteLimits {
    fn default() -> Self {
        ByteLimits {
            record: 1024 * 1024,
            channel_message: 64 * 1024,
            history: 8 * 1024 * 1024,
            presence_state: 16 * 1024,
            metadata: 16 * 1024,
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            path: "/".to_owned(),
            ping_interval: Duration::from_secs(30),
            max_missed_pongs: 1,
            latency_interval: Duration::from_secs(5),
            max_frame_bytes: 1024 * 1024,
            max_outbound_bytes: 1024 * 1024,
            max_in_flight: 64,
            read_buffer_bytes: 2 * 1024,
            write_buffer_bytes: 16 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            open_connection_metadata: false,
            max_rooms_per_connection: 1024,
            max_subscriptions_per_connection: 1024,
            max_collection_members: 10_000,
            reserved_channel_prefix: Some("mesh:".to_owned()),
            bytes: ByteLimits::default(),
            max_kept_header_bytes: 16 * 1024,
            max_connections: 100_000,
        }
    }
}
