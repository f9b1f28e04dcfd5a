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
}

impl Backend {
    pub(crate) fn memory() -> Self {
        Backend::Memory(MemoryBackend::new())
    }

    pub(crate) fn redis() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Backend::Redis {
            url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            prefix: format!("mesh-test:{}:{nanos:x}:{n}:", std::process::id()),
        }
    }

    /// A builder on this backend; builders from one `Backend` value form one mesh (each
    /// is a separate instance).
    pub(crate) fn builder(&self) -> MeshBuilder {
        match self {
            Backend::Memory(backend) => Mesh::builder().memory_backend(backend.clone()),
            Backend::Redis { url, prefix } => Mesh::builder().redis_backend(
                tower_mesh::RedisBackend::builder(url.as_str())
                    .prefix(prefix.as_str())
                    .build()
                    .expect("Redis backend"),
            ),
        }
    }
}

/// A builder on `backend` whose dead instances are noticed fast: on Redis a 200 ms
/// heartbeat and a 1 s instance TTL (the in-memory backend notices a dropped instance
/// within about a second anyway).
pub(crate) fn fast_liveness(backend: &Backend) -> MeshBuilder {
    match backend {
        Backend::Memory(memory) => Mesh::builder().memory_backend(memory.clone()),
        Backend::Redis { url, prefix } => Mesh::builder().redis_backend(
            tower_mesh::RedisBackend::builder(url.as_str())
                .prefix(prefix.as_str())
                .liveness(Duration::from_millis(200), Duration::from_millis(1000))
                .build()
                .expect("Redis backend"),
        ),
    }
}

/// A pattern that matches every name: exposes every channel or record it is given for.
pub(crate) fn everything() -> Regex {
    Regex::new(".*").expect("regex")
}
