//! The integration tests, in one test binary: each module is a suite (rooms, presence,
//! records, ...), and `common` is the harness they share. One binary links the crate once
//! instead of once per suite.

mod common;

mod bad_input;
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
mod presence;
mod protocol;
mod records;
mod redis_faults;
mod registry;
mod rooms;
mod smoke;
mod tower_services;
