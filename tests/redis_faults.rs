//! Redis faults: a killed instance is swept; a restarted Redis neither crashes nor wedges
//! an instance. These tests start private `redis-server` processes on free ports.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tower_mesh::{Mesh, MeshBuilder, RedisBackend};

/// A private `redis-server` on a free port, stopped when dropped.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    fn restart(&mut self) {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {binary} (install redis-server or set REDIS_SERVER): {err}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn builder(url: &str, prefix: &str) -> MeshBuilder {
    let backend = RedisBackend::builder(url)
        .prefix(prefix)
        .liveness(Duration::from_millis(200), Duration::from_millis(1000))
        .build()
        .expect("backend");
    Mesh::builder().redis_backend(backend).command("echo", |tower_mesh::extract::Payload(p): tower_mesh::extract::Payload<serde_json::Value>| async move { p })
}

/// Runs a mesh server on a runtime of its own, so that the test can kill the whole
/// instance at once: `shutdown_background` drops every task without any cleanup, which
/// is what Redis sees when a process is SIGKILLed.
struct DoomedInstance {
    runtime: Option<tokio::runtime::Runtime>,
    url: String,
}

impl DoomedInstance {
    fn start(builder: MeshBuilder) -> DoomedInstance {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let url = runtime.block_on(async {
            let (layer, _mesh) = builder.build();
            let app = axum::Router::new().layer(layer);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            format!("ws://{addr}/")
        });
        DoomedInstance {
            runtime: Some(runtime),
            url,
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instance_is_swept_by_the_survivors() {
    let redis = RedisServer::start();
    let prefix = "mesh:kill:";
    let survivor = serve(builder(&redis.url(), prefix)).await;
    let mut doomed = tokio::task::spawn_blocking({
        let url = redis.url();
        move || DoomedInstance::start(builder(&url, prefix))
    })
    .await
    .expect("doomed instance");
    let victim = RawClient::connect(&doomed.url).await;
    let bystander = RawClient::connect(&survivor.url()).await;
    let ids = |all: Vec<(String, serde_json::Value)>| {
        all.into_iter().map(|(id, _)| id).collect::<Vec<_>>()
    };
    let listed = ids(survivor
        .mesh
        .all_connection_metadata()
        .await
        .expect("metadata"));
    assert!(
        listed.contains(&victim.id) && listed.contains(&bystander.id),
        "{listed:?}"
    );

    tokio::task::spawn_blocking(move || doomed.kill())
        .await
        .expect("kill");
    let killed_at = Instant::now();

    // Nothing announces a dead instance (that is the point), so poll what the survivor
    // sees, within a bound well above ttl + heartbeat interval.
    loop {
        let listed = ids(survivor
            .mesh
            .all_connection_metadata()
            .await
            .expect("metadata"));
        if !listed.contains(&victim.id) {
            assert!(
                listed.contains(&bystander.id),
                "the live connection must stay: {listed:?}"
            );
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "dead instance not swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "dead instance swept after {:?} (ttl 1000 ms, heartbeat 200 ms)",
        killed_at.elapsed()
    );
    assert_eq!(
        survivor
            .mesh
            .connection_metadata(&victim.id)
            .await
            .expect("read"),
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_redis_does_not_wedge_an_instance() {
    let mut redis = RedisServer::start();
    let prefix = "mesh:restart:";
    let tracked =
        |url: &str| builder(url, prefix).track_presence("room", tower_mesh::PresenceOptions::new());
    let a = serve(tracked(&redis.url())).await;
    let b = serve(tracked(&redis.url())).await;
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    a.mesh
        .send(&on_b.id, "before", &json!(1))
        .await
        .expect("send");
    on_b.push("before").await;

    redis.kill();

    // Commands that need Redis fail with EUNAVAILABLE; the connection stays open.
    let reply = on_a
        .command(1, "mesh/get-my-connection-metadata", json!({}))
        .await;
    assert_eq!(reply["payload"]["code"], "EUNAVAILABLE", "{reply}");
    let reply = on_a.command(2, "echo", json!("still here")).await;
    assert_eq!(reply["payload"], "still here");
    assert!(a.mesh.broadcast("lost", &json!(0)).await.is_err());

    redis.restart();
    let restarted_at = Instant::now();

    // Redis came back empty: every connection's rooms, presence and metadata are gone.
    // Each instance notices on its next heartbeat and closes its connections with 1012,
    // so that their clients reconnect and set everything up again.
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            client.closed().await,
            (1012, "server state lost, reconnect".to_owned())
        );
    }
    eprintln!(
        "connections closed for a fresh start {:?} after the restart",
        restarted_at.elapsed()
    );

    // New connections get the whole mesh back: cross-instance pushes, rooms, presence,
    // metadata.
    let mut on_a = RawClient::connect(&a.url()).await;
    let mut on_b = RawClient::connect(&b.url()).await;
    for client in [&mut on_a, &mut on_b] {
        let reply = client
            .command(3, "mesh/join-room", json!({"roomName": "room"}))
            .await;
        assert_eq!(reply["payload"]["success"], true);
    }
    a.mesh
        .send(&on_b.id, "after", &json!(2))
        .await
        .expect("send");
    assert_eq!(on_b.push("after").await["payload"], 2);
    a.mesh
        .broadcast_room("room", "to-room", &json!("again"))
        .await
        .expect("broadcast");
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.push("to-room").await["payload"], "again");
    }
    let mut present = b.mesh.present_connections("room").await.expect("present");
    present.sort();
    let mut both = vec![on_a.id.clone(), on_b.id.clone()];
    both.sort();
    assert_eq!(present, both);
    let reply = on_a
        .command(
            4,
            "mesh/set-my-connection-metadata",
            json!({"metadata": {"ok": true}}),
        )
        .await;
    assert_eq!(reply["payload"], json!({"success": true}));
    let reply = on_a
        .command(5, "mesh/get-my-connection-metadata", json!({}))
        .await;
    assert_eq!(reply["payload"], json!({"metadata": {"ok": true}}));
}

/// When an instance's pub/sub connection is re-established (here: Redis drops it with
/// `CLIENT KILL TYPE pubsub`; in the field: a stall such as SIGSTOP that fails the health
/// probe), the instance catches its record subscribers up from what is stored. An update
/// they already had is not sent again: each record update arrives exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_pubsub_reconnect_repeats_no_record_update() {
    let redis = RedisServer::start();
    let prefix = "mesh:pubsub-reconnect:";
    let open = |url: &str| {
        builder(url, prefix).expose_record(
            tower_mesh::Regex::new(".*").expect("regex"),
            tower_mesh::Access::open(),
        )
    };
    let a = serve(open(&redis.url())).await;
    let b = serve(open(&redis.url())).await;
    let mut client = RawClient::connect(&a.url()).await;
    let reply = client
        .command(
            1,
            "mesh/subscribe-record",
            json!({"recordId": "doc", "mode": "full"}),
        )
        .await;
    assert_eq!(reply["payload"]["version"], 0, "{reply}");
    b.mesh
        .write_record("doc", json!({"v": 1}), Default::default())
        .await
        .expect("write");
    assert_eq!(
        client.push("mesh/record-update").await["payload"]["version"],
        1
    );

    let mut redis_client = redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis_client)
        .await
        .expect("CLIENT KILL");
    assert!(killed >= 2, "both instances' pub/sub connections: {killed}");

    // Instance A is back on pub/sub (and has started catching up) once a push from B
    // reaches its client again; each probe is a fresh attempt.
    let mut updates = Vec::new();
    within("A's pub/sub to come back", async {
        for probe in 0u64.. {
            b.mesh
                .send(&client.id, "probe", &json!(probe))
                .await
                .expect("send");
            let window = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Ok(frame) = tokio::time::timeout_at(window, client.next()).await {
                if frame["command"] == "mesh/record-update" {
                    updates.push(frame["payload"].clone());
                }
                if frame["command"] == "probe" {
                    return;
                }
            }
        }
    })
    .await;
    b.mesh
        .write_record("doc", json!({"v": 2}), Default::default())
        .await
        .expect("write");
    b.mesh
        .broadcast("marker", &json!(null))
        .await
        .expect("broadcast");
    within("the marker", async {
        loop {
            let frame = client.next().await;
            if frame["command"] == "mesh/record-update" {
                updates.push(frame["payload"].clone());
            }
            if frame["command"] == "marker" {
                return;
            }
        }
    })
    .await;
    assert_eq!(
        updates,
        [json!({"recordId": "doc", "full": {"v": 2}, "version": 2})],
        "after the reconnect, exactly the one new update"
    );
}
