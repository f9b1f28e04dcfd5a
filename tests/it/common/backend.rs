//! The backends a conformance test runs on, and builders on them.

use std::time::Duration;

use tower_mesh::{MemoryBackend, Mesh, MeshBuilder, Regex};

/// Which backend a conformance test runs on.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Memory(MemoryBackend),
    /// The Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`), under a key prefix of
    /// this test's own so that parallel tests never collide.
    Redis {
        url: String,
        prefix: String,
    },
    /// The Redis Cluster at `REDIS_CLUSTER_URLS` (comma-separated seed URLs, which
    /// `scripts/test` sets after starting a local Cluster), under a prefix of its own.
    RedisCluster {
        seeds: Vec<String>,
        prefix: String,
    },
}

impl Backend {
    pub(crate) fn memory() -> Self {
        Backend::Memory(MemoryBackend::new())
    }

    pub(crate) fn redis() -> Self {
        Backend::Redis {
            url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            prefix: unique_prefix(),
        }
    }

    /// Fails (never skips) without `REDIS_CLUSTER_URLS`.
    pub(crate) fn redis_cluster() -> Self {
        Backend::RedisCluster {
            seeds: cluster_seeds(),
            prefix: unique_prefix(),
        }
    }

    /// A Redis backend builder on this backend's Redis and prefix (`None` for memory).
    pub(crate) fn redis_builder(&self) -> Option<tower_mesh::RedisBackendBuilder> {
        match self {
            Backend::Memory(_) => None,
            Backend::Redis { url, prefix } => {
                Some(tower_mesh::RedisBackend::builder(url.as_str()).prefix(prefix.as_str()))
            }
            Backend::RedisCluster { seeds, prefix } => {
                Some(tower_mesh::RedisBackend::cluster(seeds.clone()).prefix(prefix.as_str()))
            }
        }
    }

    /// A builder on this backend; builders from one `Backend` value form one mesh (each
    /// is a separate instance).
    pub(crate) fn builder(&self) -> MeshBuilder {
        match (self, self.redis_builder()) {
            (_, Some(redis)) => {
                Mesh::builder().redis_backend(redis.build().expect("Redis backend"))
            }
            (Backend::Memory(backend), None) => Mesh::builder().memory_backend(backend.clone()),
            (_, None) => unreachable!("every Redis backend has a Redis builder"),
        }
    }
}

/// A builder on `backend` whose dead instances are noticed fast: on Redis a 200 ms
/// heartbeat and a 1 s instance TTL (the in-memory backend notices a dropped instance
/// within about a second anyway).
pub(crate) fn fast_liveness(backend: &Backend) -> MeshBuilder {
    match (backend, backend.redis_builder()) {
        (_, Some(redis)) => Mesh::builder().redis_backend(
            redis
                .liveness(Duration::from_millis(200), Duration::from_millis(1000))
                .build()
                .expect("Redis backend"),
        ),
        (Backend::Memory(memory), None) => Mesh::builder().memory_backend(memory.clone()),
        (_, None) => unreachable!("every Redis backend has a Redis builder"),
    }
}

/// A key prefix no other test uses.
fn unique_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("mesh-test:{}:{nanos:x}:{n}:", std::process::id())
}

/// The seed URLs in `REDIS_CLUSTER_URLS`; panics, telling how to get a Cluster, when
/// there are none.
pub(crate) fn cluster_seeds() -> Vec<String> {
    let seeds: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        !seeds.is_empty(),
        "REDIS_CLUSTER_URLS is not set: run the tests with scripts/test, which starts a local Redis Cluster"
    );
    seeds
}

/// A pattern that matches every name: exposes every channel or record it is given for.
pub(crate) fn everything() -> Regex {
    Regex::new(".*").expect("regex")
}
