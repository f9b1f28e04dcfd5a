//! The trait-level backend conformance suite (`tower_mesh::backend::conformance`), run
//! for both backends that ship: in memory, and on Redis both single and Cluster.

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

/// The same on the Redis Cluster of `REDIS_CLUSTER_URLS` (which scripts/test starts):
/// every case gets two `RedisBackend::cluster` handles on a prefix of its own, and the
/// run's keys are deleted afterwards from every master.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_backend_conforms() {
    use tower_mesh::backend::RedisBackend;

    let seeds = crate::common::cluster_seeds();
    let run_prefix = format!("mesh-conformance:{}:", uuid::Uuid::new_v4().simple());
    let suite = conformance::run({
        let (seeds, run_prefix) = (seeds.clone(), run_prefix.clone());
        move || {
            let seeds = seeds.clone();
            let prefix = format!("{run_prefix}{}:", uuid::Uuid::new_v4().simple());
            async move {
                let handle = || {
                    RedisBackend::cluster(seeds.iter().map(String::as_str))
                        .prefix(prefix.as_str())
                        .build()
                        .expect("valid Redis Cluster seed URLs")
                };
                [handle(), handle()]
            }
        }
    });
    let outcome = tokio::spawn(suite).await;
    delete_cluster_keys(&seeds, &run_prefix).await;
    if let Err(failed) = outcome {
        std::panic::resume_unwind(failed.into_panic());
    }
}

/// Deletes every key under `prefix` from a Cluster: each node holds its own keys, so
/// each master is scanned with a single-node connection, and the keys it holds are
/// deleted there one by one (a multi-key `DEL` must stay in one slot). The seeds must
/// be every master, as scripts/test's are, which is checked: a master left out would
/// keep its keys.
#[cfg(feature = "redis")]
async fn delete_cluster_keys(seeds: &[String], prefix: &str) {
    for seed in seeds {
        let mut connection = connect(seed).await;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut connection)
            .await
            .expect("CLUSTER INFO");
        let masters = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("cluster_size:"))
            .and_then(|size| size.parse::<usize>().ok());
        assert_eq!(
            masters,
            Some(seeds.len()),
            "REDIS_CLUSTER_URLS must name every master of the Cluster once:\n{info}"
        );
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut connection)
            .await
            .expect("INFO replication");
        assert!(
            info.lines().any(|line| line.trim() == "role:master"),
            "{seed} in REDIS_CLUSTER_URLS is not a master:\n{info}"
        );
        for_each_key_batch(&mut connection, prefix, |keys| {
            let mut deletes = redis::pipe();
            for key in keys {
                deletes.cmd("DEL").arg(key).ignore();
            }
            deletes
        })
        .await;
    }
}

/// Deletes every key under `prefix`.
#[cfg(feature = "redis")]
async fn delete_keys(url: &str, prefix: &str) {
    let mut connection = connect(url).await;
    for_each_key_batch(&mut connection, prefix, |keys| {
        let mut delete = redis::pipe();
        delete.cmd("DEL").arg(keys).ignore();
        delete
    })
    .await;
}

#[cfg(feature = "redis")]
async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap_or_else(|err| panic!("{url} is not a valid Redis URL: {err}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|err| panic!("{url} does not answer: {err}"))
}

/// Scans the keys under `prefix` that `connection`'s node holds and runs the pipeline
/// `delete` makes for each batch.
#[cfg(feature = "redis")]
async fn for_each_key_batch(
    connection: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    delete: impl Fn(&[String]) -> redis::Pipeline,
) {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            delete(&keys)
                .query_async::<()>(connection)
                .await
                .expect("DEL");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}
