//! The integration tests, in one test binary: each module is a suite (rooms, presence,
//! records, ...), and `common` is the harness they share. One binary links the crate once
//! instead of once per suite. It needs the default features (the Redis backend, the
//! client, axum): `cargo test --all-features` runs it.

#![cfg(all(feature = "redis", feature = "client", feature = "axum"))]

mod common;

#[cfg(feature = "unstable-backend")]
mod backend_conformance;
mod bad_input;
mod browser;
mod channels;
mod client;
mod client_rooms;
mod client_sync;
mod collections;
mod conformance;
mod extractors;
mod http;
mod lifecycle;
mod limits;
mod middleware;
mod plain_channels;
mod presence;
mod protocol;
mod records;
mod redis_cluster_faults;
mod redis_cluster_harness;
mod redis_faults;
#[cfg(feature = "redis-tls-rustls")]
mod redis_tls;
mod registry;
mod rooms;
mod smoke;
mod tower_services;
