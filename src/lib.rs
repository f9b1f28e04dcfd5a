#![doc = include_str!("../docs/crate.md")]
#![warn(missing_docs)]
// docs.rs (nightly, `--cfg docsrs`) marks which feature each gated item needs.
#![cfg_attr(docsrs, feature(doc_cfg))]
// The backend seam serves networked backends (reconnects, catch-up, channel names): built
// with the in-memory backend alone, those parts have no caller.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

mod access;
#[cfg(feature = "axum")]
mod axum_extract;
#[cfg(feature = "unstable-backend")]
pub mod backend;
#[cfg(not(feature = "unstable-backend"))]
#[allow(unreachable_pub)] // the seam is public with `unstable-backend` only
mod backend;
mod builder;
mod builtin;
mod calls;
mod channel_stream;
mod channels;
mod collections;
pub mod command;
mod config;
mod connection;
mod error;
mod heartbeat;
mod inbox;
mod layer;
mod merge;
mod mesh;
mod metadata;
mod metrics;
mod presence;
mod protocol;
mod read_on_demand;
mod record_stream;
mod records;
mod reply_budget;
mod rooms;
mod topics;
mod upgrade;

#[cfg(feature = "client")]
pub mod client;

/// Handler arguments: everything a command handler can ask for.
///
/// Every argument but the last implements [`FromCommandParts`](extract::FromCommandParts)
/// (it only reads the request); the last may instead implement
/// [`FromCommandRequest`](extract::FromCommandRequest) (it consumes the request): that is
/// why [`Payload`](extract::Payload) comes last.
pub mod extract {
    pub use crate::command::rejection;
    pub use crate::command::{
        Extension, FromCommandParts, FromCommandRequest, OptionalFromCommandParts,
        OptionalFromCommandRequest, Payload, State,
    };
    pub use crate::connection::Connection;
    pub use crate::mesh::Mesh;
}

pub use access::{Access, Pattern};
pub use backend::MemoryBackend;
#[cfg(feature = "redis")]
pub use backend::{RedisBackend, RedisBackendBuilder};
pub use builder::MeshBuilder;
pub use channels::MAX_HISTORY_LIMIT;
pub use collections::Collection;
pub use command::{from_fn, CommandRequest, CommandService, Json, Next};
pub use config::MAX_NAME_BYTES;
pub use connection::{CloseReason, Connection, SendError};
pub use error::{BackendError, BoxError, CommandError, MeshError};
pub use layer::{MeshBody, MeshFuture, MeshLayer, MeshService};
pub use merge::MergeStrategy;
pub use mesh::{Health, Mesh, MeshStats};
pub use presence::{PresenceOptions, MAX_STATE_EXPIRY};
pub use records::{Record, RecordEvent};
/// Regular expressions for name patterns (`track_presence(Regex::new("^game:")?, ..)`).
pub use regex::Regex;
pub use rooms::{Room, RoomBroadcast};

/// The README's Rust snippets, compiled (and the self-contained ones run) as doc tests, so
/// the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
