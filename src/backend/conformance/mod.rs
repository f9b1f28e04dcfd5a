//! The conformance suite every [`Backend`] must pass, at the level of the trait: no
//! WebSockets, no engine, just two instances attached to one store, each with an
//! [`Inbox`](super::Inbox) that records what it is delivered.
//!
//! [`run`] runs every case. Each case asks `new_store` for a fresh, empty store and two
//! handles to it (two instances of one mesh, as two processes sharing one Redis would
//! have), attaches `instance-a` and `instance-b`, drives the trait's operations through
//! both handles, and checks what they return and what each inbox receives against the
//! contract in the trait's docs: delivery (pushes, closes, broadcasts, topics, calls and
//! answers), connection and room metadata, rooms, presence (announcements, the presence
//! view, lapsed TTLs and state expiries swept by both instances at once, refreshes),
//! unregistering connections and detaching instances, channel history, and records
//! (versions, concurrent writers on both instances, id listings, deletions).
//!
//! It is a test harness: a failure panics, with a message that names the case, the
//! instance and what went wrong, so call it from a test. It needs a Tokio runtime with
//! timers (`#[tokio::test]` gives one; a multi-threaded one lets the concurrency cases
//! overlap more). A run takes a few seconds: deliveries are awaited, never slept for,
//! except where time must pass for a TTL to lapse (about 0.7 s, twice).
//!
//! # Running it for a backend
//!
//! ```
//! use tower_mesh::backend::{conformance, MemoryBackend};
//!
//! // In a test: #[tokio::test(flavor = "multi_thread")] async fn memory_backend_conforms()
//! # async fn memory_backend_conforms() {
//! conformance::run(|| async {
//!     // One store, two handles: clones of one MemoryBackend share their state.
//!     let store = MemoryBackend::new();
//!     [store.clone(), store]
//! })
//! .await;
//! # }
//! ```
//!
//! For a networked store, build two separate handles for each case, isolated from every
//! other case: `RedisBackend` gets two `RedisBackend::builder(url).prefix(p).build()`
//! with a prefix `p` unique to the case (this crate's `tests/it/backend_conformance.rs` does
//! that, and deletes the keys afterwards).
//!
//! # What the suite assumes
//!
//! - Each call of `new_store` returns handles to a store that holds nothing yet.
//! - The recording inbox drops topic deliveries (`Topic`, `Presence`, `Record`,
//!   `RecordDeleted`, `RecordsChanged`) for topics it does not listen to, as the engine
//!   does: a backend may hand them to every instance (the default `subscribe`) or only to
//!   the subscribed ones. Everything else it receives, the case must expect.
//! - To prove that something was *not* delivered, a case broadcasts a marker and expects
//!   it as the next delivery of each instance. So deliveries that one handle publishes
//!   one after another, directly or from inside an operation, each awaited before the
//!   next, must reach an instance in that order.
//! - Ids are plain: connection ids, room names and record ids are ASCII or short UTF-8.

mod channels;
mod delivery;
mod harness;
mod lifecycle;
mod metadata;
mod presence;
mod records;
mod rooms;

use std::future::Future;

use self::harness::Case;
use super::Backend;

/// Runs every case of the suite, each on a fresh store from `new_store`.
///
/// `new_store` returns two handles to one new, empty store: the suite attaches one
/// instance on each. Panics, naming the case, on the first behaviour that breaks the
/// [`Backend`] contract, or when an operation or an expected delivery takes longer than
/// a few seconds.
pub async fn run<B, F, Fut>(mut new_store: F)
where
    B: Backend,
    F: FnMut() -> Fut,
    Fut: Future<Output = [B; 2]>,
{
    macro_rules! cases {
        ($($case:path),* $(,)?) => {$(
            let case = Case::start(stringify!($case), new_store().await).await;
            $case(&case).await;
            case.finish().await;
        )*};
    }
    cases![
        delivery::to_connection,
        delivery::broadcast,
        delivery::topics,
        delivery::calls,
        metadata::connection,
        metadata::room,
        metadata::all_connections,
        rooms::membership,
        rooms::listings,
        presence::announcements,
        presence::presence_view,
        presence::ttl,
        presence::state_expiry,
        lifecycle::unregister,
        lifecycle::detach,
        channels::count_bound,
        channels::byte_bound,
        channels::read_bounds,
        channels::positions,
        records::writes,
        records::concurrent_writers,
        records::ids_and_deletes,
    ];
}
