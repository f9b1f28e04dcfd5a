//! The harness every suite shares: servers on real sockets, raw WebSocket clients, the
//! backends a conformance test runs on, private redis-servers, the example binaries as
//! processes, and waits that fail instead of hanging.

use std::time::Duration;

mod backend;
mod byte_limits;
mod commands;
mod example_process;
mod mesh_client;
mod raw_client;
mod records;
mod redis_cluster;
mod redis_server;
#[cfg(feature = "redis-tls-rustls")]
mod redis_tls_cluster;
mod server;
mod waiting;

pub(crate) use backend::*;
pub(crate) use byte_limits::*;
pub(crate) use commands::*;
pub(crate) use example_process::*;
pub(crate) use mesh_client::*;
pub(crate) use raw_client::*;
pub(crate) use records::*;
pub(crate) use redis_cluster::*;
pub(crate) use redis_server::*;
#[cfg(feature = "redis-tls-rustls")]
pub(crate) use redis_tls_cluster::*;
pub(crate) use server::*;
pub(crate) use waiting::*;

/// How long a test waits for something that should happen promptly.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// `items`, sorted.
pub(crate) fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

/// Instantiates `async fn name(backend: Backend)` tests once per backend:
/// `conformance!(a, b);` makes `memory::a`, `redis::a`, `redis_cluster::a`, and the
/// same for `b`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::memory()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::redis()).await
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::redis_cluster()).await
                }
            )*
        }
    };
}

pub(crate) use conformance;
