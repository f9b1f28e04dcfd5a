//! Redis faults: a killed instance is swept; a restarted Redis neither crashes nor wedges
//! an instance. These tests start private `redis-server` processes on free ports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_mesh::client::{ClientEvent, MeshClient, PresenceKind, StateOptions};
use tower_mesh::{MergeStrategy, Mesh, MeshBuilder, PresenceOptions, RedisBackend};

use crate::common::*;

fn builder(url: &str, prefix: &str) -> MeshBuilder {
    let backend = RedisBackend::builder(url)
        .prefix(prefix)
        .liveness(Duration::from_millis(200), Duration::from_millis(1000))
        .build()
        .expect("backend");
    Mesh::builder().redis_backend(backend).command("echo", echo)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instance_is_swept_by_the_survivors() {
    let redis = RedisServer::start();
    let prefix = "mesh:kill:";
    let survivor = serve(builder(&redis.url(), prefix)).await;
    let doomed = DoomedInstance::start(builder(&redis.url(), prefix)).await;
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

    doomed.kill().await;
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
        .room("room")
        .broadcast("to-room", &json!("again"))
        .await
        .expect("broadcast");
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.push("to-room").await["payload"], "again");
    }
    let mut present = b.mesh.room("room").present().await.expect("present");
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

const REJOIN_ROOM: &str = "xroom";

/// Checks that every member's current connection is in the room, present, and in every
/// member's presence snapshot, and that nothing else is: `Err` says what differs.
async fn members_are_in_room_and_presence(
    server: &TestServer,
    members: &[MeshClient],
) -> Result<(), String> {
    let mut ids: Vec<String> = members.iter().map(MeshClient::connection_id).collect();
    if ids.iter().any(String::is_empty) {
        return Err("a member is not connected".into());
    }
    ids.sort();
    let mut in_room = server
        .mesh
        .room(REJOIN_ROOM)
        .members()
        .await
        .map_err(|err| format!("room_members: {err}"))?;
    in_room.sort();
    if in_room != ids {
        return Err(format!("room members {in_room:?}, members {ids:?}"));
    }
    let mut present = server
        .mesh
        .room(REJOIN_ROOM)
        .present()
        .await
        .map_err(|err| format!("present_connections: {err}"))?;
    present.sort();
    if present != ids {
        return Err(format!("present {present:?}, members {ids:?}"));
    }
    for member in members {
        let reply = member
            .command("mesh/subscribe-presence", json!({"roomName": REJOIN_ROOM}))
            .await
            .map_err(|err| format!("subscribe-presence: {err}"))?;
        let mut seen: Vec<String> = reply["present"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|member| member["id"].as_str().map(str::to_owned))
            .collect();
        seen.sort();
        if seen != ids {
            return Err(format!(
                "{}'s presence snapshot {seen:?}, members {ids:?}",
                member.connection_id()
            ));
        }
    }
    Ok(())
}

/// Polls [`members_are_in_room_and_presence`] until it holds; panics with the last
/// difference after `within`. Nothing announces "every reconnect and re-join is done".
async fn settle(server: &TestServer, members: &[MeshClient], within: Duration, phase: &str) {
    let deadline = Instant::now() + within;
    loop {
        match members_are_in_room_and_presence(server, members).await {
            Ok(()) => return,
            Err(difference) => assert!(
                Instant::now() < deadline,
                "{phase}: not settled after {within:?}: {difference}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 11 §2. Members of a tracked room on two instances, with broadcasts, record writes
/// and presence states going on, live through a Redis stall longer than the instance TTL
/// and then a Redis restart that loses everything. Each instance closes its connections
/// with 1012 when it finds its registration lost, and all their clients reconnect and
/// re-join at once: every one of them must end up in the room, present, and in every
/// member's presence snapshot, and its `leave` must come when its instance dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_reconnect_after_a_stall_and_a_restart_are_in_their_room_and_presence() {
    const MEMBERS_PER_INSTANCE: usize = 12;
    let mut redis = RedisServer::start();
    let prefix = "mesh:rejoin:";
    let instance = |url: &str| {
        // Pings lenient enough that a loaded test machine does not close connections
        // for missed pongs: this test is about Redis faults.
        builder(url, prefix)
            .ping_interval(Duration::from_millis(500))
            .max_missed_pongs(4)
            .track_presence(
                REJOIN_ROOM,
                PresenceOptions::new().ttl(Duration::from_millis(1500)),
            )
    };
    let survivor = serve(instance(&redis.url())).await;
    let doomed = DoomedInstance::start(instance(&redis.url())).await;

    let connect = |url: String| async move {
        MeshClient::builder(url)
            .backoff(Duration::from_millis(100), Duration::from_millis(400))
            .command_timeout(Duration::from_secs(4))
            .connect()
            .await
            .expect("connect")
    };
    let mut members = Vec::new();
    let mut on_doomed = Vec::new();
    for n in 0..2 * MEMBERS_PER_INSTANCE {
        let doomed_one = n % 2 == 1;
        let url = if doomed_one {
            doomed.url.clone()
        } else {
            survivor.url()
        };
        let member = connect(url).await;
        member.join_room(REJOIN_ROOM).await.expect("join");
        members.push(member);
        on_doomed.push(doomed_one);
    }
    // A member of the surviving instance watches presence through every reconnect (its
    // client renews the subscription, and so does every settle check).
    let (_, mut updates) = members[0]
        .subscribe_presence(REJOIN_ROOM)
        .await
        .expect("subscribe presence");
    settle(&survivor, &members, Duration::from_secs(5), "start").await;

    // Writers and broadcasters keep Redis busy through every fault; their failures
    // while Redis is away are expected.
    let mut activity = Vec::new();
    activity.push(tokio::spawn({
        let mesh = survivor.mesh.clone();
        async move {
            for n in 0u64.. {
                let _ = mesh.room(REJOIN_ROOM).broadcast("tick", &n).await;
                let _ = mesh
                    .write_record("scoreboard", json!({ "n": n }), MergeStrategy::Replace)
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }));
    for member in &members {
        let member = member.clone();
        activity.push(tokio::spawn(async move {
            for n in 0u64.. {
                let _ = member
                    .publish_presence_state(REJOIN_ROOM, json!({ "n": n }), StateOptions::new())
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    // A stall longer than the instance TTL: on resuming, Redis runs what queued, sweeps
    // included, in whatever order it arrived.
    redis.pause();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.resume();
    settle(
        &survivor,
        &members,
        Duration::from_secs(10),
        "after the stall",
    )
    .await;

    // Then Redis restarts empty: every member must reconnect and set itself up again.
    let before: Vec<String> = members.iter().map(MeshClient::connection_id).collect();
    let mut events: Vec<_> = members.iter().map(MeshClient::events).collect();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    for ((events, old_id), member) in events.iter_mut().zip(&before).zip(&members) {
        let reconnected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Ok(ClientEvent::Reconnected { connection_id }) if connection_id != *old_id => {
                        return
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(err) => panic!("events: {err}"),
                }
            }
        })
        .await;
        assert!(
            reconnected.is_ok(),
            "{old_id} ({}) did not reconnect after the restart",
            member.connection_id()
        );
    }
    settle(
        &survivor,
        &members,
        Duration::from_secs(10),
        "after the restart",
    )
    .await;

    // The doomed instance dies without a word: the survivor's sweep must announce the
    // leave of every member it held.
    while updates.try_recv().is_ok() {}
    let mut gone: Vec<String> = members
        .iter()
        .zip(&on_doomed)
        .filter(|(_, doomed_one)| **doomed_one)
        .map(|(member, _)| member.connection_id())
        .collect();
    doomed.kill().await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while !gone.is_empty() {
            let update = updates.recv().await.expect("presence updates");
            if update.kind == PresenceKind::Leave {
                gone.retain(|id| *id != update.connection_id);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no leave came for {gone:?}"));
    let staying: Vec<MeshClient> = members
        .iter()
        .zip(&on_doomed)
        .filter(|(_, doomed_one)| !**doomed_one)
        .map(|(member, _)| member.clone())
        .collect();
    settle(
        &survivor,
        &staying,
        Duration::from_secs(5),
        "after the kill",
    )
    .await;

    for task in activity {
        task.abort();
    }
    for member in &members {
        member.close().await;
    }
}

/// A TCP proxy in front of Redis that can hold an instance's traffic, both ways, from the
/// first command that mentions `needle` until released: what it held then reaches Redis
/// and runs, but the replies come after the client gave up on them. That is a reply lost
/// while its command still took effect, as a stall or a slow network makes them.
struct HoldingProxy {
    port: u16,
    needle: Vec<u8>,
    armed: Arc<AtomicBool>,
    held: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingProxy {
    async fn start(redis_port: u16, needle: &str) -> HoldingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let needle = needle.as_bytes().to_vec();
        let armed = Arc::new(AtomicBool::new(false));
        let held = watch::Sender::new(false);
        let task = tokio::spawn({
            let (needle, armed, held) = (needle.clone(), armed.clone(), held.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let trap = Some((needle.clone(), armed.clone()));
                    tokio::spawn(pump(client_read, server_write, held.clone(), trap));
                    tokio::spawn(pump(server_read, client_write, held.clone(), None));
                }
            }
        });
        HoldingProxy {
            port,
            needle,
            armed,
            held,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Holds everything from the next command that mentions the needle; resolves once
    /// that command is held.
    async fn hold_from_next_mention(&self) {
        let mut held = self.held.subscribe();
        self.armed.store(true, Ordering::SeqCst);
        within(
            &format!(
                "a command mentioning {:?}",
                String::from_utf8_lossy(&self.needle)
            ),
            held.wait_for(|held| *held),
        )
        .await
        .expect("proxy running");
    }

    fn release(&self) {
        self.held.send_replace(false);
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a proxied connection, waiting while the proxy holds traffic.
/// With a trap, the first chunk that mentions its needle while armed starts the hold.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    held: watch::Sender<bool>,
    trap: Option<(Vec<u8>, Arc<AtomicBool>)>,
) {
    let mut released = held.subscribe();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let chunk = &buffer[..read];
        if let Some((needle, armed)) = &trap {
            if chunk
                .windows(needle.len())
                .any(|window| window == needle.as_slice())
                && armed.swap(false, Ordering::SeqCst)
            {
                held.send_replace(true);
            }
        }
        if released.wait_for(|held| !*held).await.is_err() || to.write_all(chunk).await.is_err() {
            break;
        }
    }
    // What the client sent before it went away still reaches Redis, as it would have.
    let _ = to.shutdown().await;
}

/// An instance whose heartbeat is held until the other instance has swept it as dead,
/// and then runs after all: the heartbeat's reply is lost, and the heartbeat puts the
/// instance back among the living. The instance must still learn that its connections
/// were forgotten, and close them so that their clients set themselves up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_swept_while_its_heartbeat_reply_is_lost_closes_its_connections() {
    let redis = RedisServer::start();
    let prefix = "mesh:lost-reply:";
    let proxy = HoldingProxy::start(redis.port, &format!("{prefix}{{registry}}:instances")).await;
    let tracked = |url: &str| builder(url, prefix).track_presence("room", PresenceOptions::new());
    let survivor = serve(tracked(&redis.url())).await;
    let stalled = serve(tracked(&proxy.url())).await;
    let mut member = RawClient::connect(&stalled.url()).await;
    let reply = member
        .command(1, "mesh/join-room", json!({"roomName": "room"}))
        .await;
    assert_eq!(reply["payload"]["success"], true);

    proxy.hold_from_next_mention().await;
    // Nothing announces a sweep: poll what the survivor sees.
    let held_at = Instant::now();
    while survivor
        .mesh
        .room("room")
        .members()
        .await
        .expect("members")
        .contains(&member.id)
    {
        assert!(
            held_at.elapsed() < WAIT,
            "the stalled instance was not swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.release();

    assert_eq!(
        member.closed().await,
        (1012, "server state lost, reconnect".to_owned())
    );
    let mut member = RawClient::connect(&stalled.url()).await;
    let reply = member
        .command(1, "mesh/join-room", json!({"roomName": "room"}))
        .await;
    assert_eq!(reply["payload"]["success"], true);
    assert_eq!(
        survivor.mesh.room("room").members().await.unwrap(),
        vec![member.id.clone()]
    );
    assert_eq!(
        survivor.mesh.room("room").present().await.unwrap(),
        vec![member.id.clone()]
    );
}

/// A Redis that restarts empty has lost every channel's stream: the channel gets a new
/// epoch, so a position from before the restart is not recovered (the messages written
/// after the restart are not all the client missed).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_redis_changes_the_channels_epoch() {
    let mut redis = RedisServer::start();
    let server = serve(
        builder(&redis.url(), "mesh:epoch:").expose_channel("news", tower_mesh::Access::open()),
    )
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    for n in 1..=3 {
        server
            .mesh
            .write_channel("news", &format!("m{n}"), 10)
            .await
            .expect("write_channel");
    }
    let before = client
        .command(1, "mesh/subscribe-channel", json!({"channel": "news"}))
        .await["payload"]
        .clone();
    assert_eq!(before["offset"], 3, "{before}");

    redis.kill();
    redis.restart();
    // The instance notices the loss and closes its connections (see above).
    assert_eq!(client.closed().await.0, 1012);

    let mut client = RawClient::connect(&server.url()).await;
    server
        .mesh
        .write_channel("news", "after", 10)
        .await
        .expect("write_channel");
    let reply = client
        .command(
            1,
            "mesh/subscribe-channel",
            json!({"channel": "news", "historyLimit": 5,
                   "since": {"epoch": before["epoch"], "offset": 0}}),
        )
        .await["payload"]
        .clone();
    assert_ne!(reply["epoch"], before["epoch"], "{reply}");
    assert!(reply["epoch"].is_string(), "{reply}");
    assert_eq!(reply["offset"], 1, "{reply}");
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["history"], json!(["after"]));
}
