//! The trait-level backend conformance suite (`tower_mesh::backend::conformance`), run
//! for both backends that ship.

use tower_mesh::backend::{conformance, MemoryBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_conforms() {
    conformance::run(|| async {
        let store = MemoryBackend::new();
        [store.clone(), store]
    })
    .await;
}

/// The suite's future can be spawned (it is `Send` when the store and its factory are).
#[test]
fn the_suite_is_send() {
    fn assert_send<T: Send>(_: T) {}
    assert_send(conformance::run(|| async {
        let store = MemoryBackend::new();
        [store.clone(), store]
    }));
}

/// Every case gets two handles (as two processes would have) on a key prefix of its own
/// under one prefix for the run, whose keys are deleted afterwards, pass or fail.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_conforms() {
    use tower_mesh::backend::RedisBackend;

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let run_prefix = format!("mesh-conformance:{}:", uuid::Uuid::new_v4().simple());
    let suite = conformance::run({
        let (url, run_prefix) = (url.clone(), run_prefix.clone());
        move || {
            let url = url.clone();
            let prefix = format!("{run_prefix}{}:", uuid::Uuid::new_v4().simple());
            async move {
                let handle = || {
                    RedisBackend::builder(url.as_str())
                        .prefix(prefix.as_str())
                        .build()
                        .expect("a valid Redis URL")
                };
                [handle(), handle()]
            }
        }
    });
    // In a task of its own, so that the keys are deleted when a case fails too.
    let outcome = tokio::spawn(suite).await;
    delete_keys(&url, &run_prefix).await;
    if let Err(failed) = outcome {
        std::panic::resume_unwind(failed.into_panic());
    }
}

/// Deletes every key under `prefix`.
#[cfg(feature = "redis")]
async fn delete_keys(url: &str, prefix: &str) {
    let client = redis::Client::open(url).expect("a valid Redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut connection)
                .await
                .expect("DEL");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}
