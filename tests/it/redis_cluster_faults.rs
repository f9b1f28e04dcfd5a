//! Redis Cluster faults: the master of a room's slot fails over, an instance dies, every
//! node restarts empty. Each test starts a private cluster (`RedisCluster`), never the
//! shared one from `REDIS_CLUSTER_URLS`, since it kills or wipes nodes.
//!
//! The cluster's methods block the test's thread (see `RedisCluster`); the instances and
//! clients run on the runtime's workers meanwhile.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tower_mesh::client::{
    ClientError, ClientEvent, MeshClient, PresenceKind, PresenceUpdate, Push, RecordChange,
    RecordMode, StateOptions,
};
use tower_mesh::{Access, MergeStrategy, MeshBuilder, MeshError, PresenceOptions};

use crate::common::*;

/// How long the mesh gets to recover from a fault once the cluster is healthy again (the
/// cluster client refreshing its slot map, reconnecting and subscribing again; an
/// instance noticing a lost registration; a client reconnecting and setting itself up).
const RECOVERY: Duration = Duration::from_secs(15);

/// The bucket of `room` as the backend's key layout has it (FNV-1a-32 of the name, modulo
/// 64): the room's keys are in the slot of hash tag `rooms:N`.
fn room_bucket(room: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in room.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % 64
}

/// A key in the slot of `room`'s keys (prefixes do not matter: only the hash tag does).
fn room_slot_key(room: &str) -> String {
    format!("{{rooms:{}}}", room_bucket(room))
}

/// A room name starting with `stem` whose keys the master on `port` serves.
fn room_served_by(cluster: &RedisCluster, port: u16, stem: &str) -> String {
    // A bucket lands on a given one of three masters one time in three or so.
    (0..200)
        .map(|n| format!("{stem}-{n}"))
        .find(|room| cluster.master_of_key(&room_slot_key(room)) == port)
        .unwrap_or_else(|| panic!("no room of 200 named {stem}-N is served by {port}"))
}

/// A mesh instance on `cluster` under `prefix`, with the instance liveness the defaults
/// give (2 s heartbeat, 10 s TTL), or with `fast_liveness`'s (200 ms, 1 s) when `fast`.
fn instance(cluster: &RedisCluster, prefix: &str, fast: bool) -> MeshBuilder {
    let backend = Backend::RedisCluster {
        seeds: cluster.urls(),
        prefix: prefix.to_owned(),
    };
    let builder = if fast {
        fast_liveness(&backend)
    } else {
        backend.builder()
    };
    builder.command("echo", echo)
}

/// A client that reconnects quickly, and whose commands wait longer than any Redis
/// operation of the server (3 s), so that a server's answer, EUNAVAILABLE included, comes
/// before the client gives up. A server that cannot register a connection while a slot
/// is between masters closes it with 1013 ("try again later"): that is an answer, and
/// the connect is tried again, for up to 10 s.
async fn connect(url: &str) -> MeshClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let connected = MeshClient::builder(url)
            .backoff(Duration::from_millis(100), Duration::from_millis(400))
            .command_timeout(Duration::from_secs(10))
            .connect()
            .await;
        match connected {
            Ok(client) => return client,
            Err(ClientError::Connect(reason))
                if reason.contains("server unavailable") && Instant::now() < deadline =>
            {
                eprintln!("connect answered 1013 ({reason}); trying again");
                // A backoff between attempts, as the client's own reconnects have.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("connect: {err}"),
        }
    }
}

/// The next presence update that `wanted` accepts, within `within`; panics with `what`
/// and every update skipped meanwhile.
async fn presence_update(
    updates: &mut mpsc::UnboundedReceiver<PresenceUpdate>,
    what: &str,
    within: Duration,
    wanted: impl Fn(&PresenceUpdate) -> bool,
) -> PresenceUpdate {
    let mut skipped = Vec::new();
    let found = tokio::time::timeout(within, async {
        loop {
            let update = updates.recv().await.expect("presence updates");
            if wanted(&update) {
                return update;
            }
            skipped.push(update);
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!("no presence update {what} within {within:?}; skipped {skipped:?}")
    })
}

/// Reads `updates` until one of `kind` has come for each of `ids`, in whatever order
/// (different connections' updates are not ordered), within `within`; panics, naming
/// `stream`, when one comes twice, when another connection's update of `kind` comes, or
/// when some never come. Updates of other kinds are skipped.
async fn one_update_each(
    updates: &mut mpsc::UnboundedReceiver<PresenceUpdate>,
    kind: PresenceKind,
    ids: &[&String],
    stream: &str,
    within: Duration,
) {
    let mut awaited: Vec<&String> = ids.to_vec();
    let arrived = tokio::time::timeout(within, async {
        while !awaited.is_empty() {
            let update = updates.recv().await.expect("presence updates");
            if update.kind != kind {
                continue;
            }
            let before = awaited.len();
            awaited.retain(|id| **id != update.connection_id);
            assert!(
                awaited.len() < before,
                "an unexpected or second {kind:?} on {stream}: {update:?}"
            );
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "no {kind:?} on {stream} within {within:?} for {awaited:?}"
    );
}

/// The next push named `command`, within [`WAIT`].
async fn push(pushes: &mut broadcast::Receiver<Push>, command: &str) -> Value {
    within(&format!("a {command} push"), async {
        loop {
            match pushes.recv().await {
                Ok(push) if push.command == command => return push.payload,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(err) => panic!("pushes: {err}"),
            }
        }
    })
    .await
}

/// The next [`ClientEvent::Reconnected`] with an id other than `old_id`, within
/// [`RECOVERY`]; returns the new id.
async fn reconnected(events: &mut broadcast::Receiver<ClientEvent>, old_id: &str) -> String {
    tokio::time::timeout(RECOVERY, async {
        loop {
            match events.recv().await {
                Ok(ClientEvent::Reconnected { connection_id }) if connection_id != old_id => {
                    return connection_id
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(err) => panic!("events: {err}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{old_id}'s client did not reconnect within {RECOVERY:?}"))
}

/// Broadcasts numbered probes to `room` until each of `pushes` has received one, within
/// [`RECOVERY`]. Nothing announces that an instance's sharded subscriptions moved to a
/// promoted replica, so each probe is a fresh attempt; a probe that fails (the slot map
/// not yet refreshed) is tried again too.
async fn until_room_broadcasts_arrive(
    server: &TestServer,
    room: &str,
    pushes: &mut [&mut broadcast::Receiver<Push>],
) {
    let started = Instant::now();
    let mut arrived = vec![false; pushes.len()];
    let mut last_failure = None;
    for probe in 0u64.. {
        assert!(
            started.elapsed() < RECOVERY,
            "room broadcasts did not reach every member within {RECOVERY:?} \
             (arrived: {arrived:?}, last failure: {last_failure:?})"
        );
        if let Err(err) = server.mesh.room(room).broadcast("probe", &probe).await {
            last_failure = Some(err.to_string());
        }
        let window = tokio::time::Instant::now() + Duration::from_millis(200);
        for (pushes, arrived) in pushes.iter_mut().zip(arrived.iter_mut()) {
            while !*arrived {
                match tokio::time::timeout_at(window, pushes.recv()).await {
                    Ok(Ok(push)) => *arrived = push.command == "probe",
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                    Ok(Err(err)) => panic!("pushes: {err}"),
                    Err(_) => break,
                }
            }
        }
        if arrived.iter().all(|arrived| *arrived) {
            return;
        }
    }
}

/// Waits until the replica on `replica` has every write its master on `master` made (the
/// master's replication offset is the replica's), so that a failover loses nothing:
/// these tests are about the mesh's recovery, not about what asynchronous replication
/// may drop.
fn wait_replica_synced(master: u16, replica: u16) {
    let info = || -> String {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{master}")).expect("a valid URL");
        let mut connection = client
            .get_connection_with_timeout(WAIT)
            .unwrap_or_else(|err| panic!("connect to {master}: {err}"));
        redis::cmd("INFO")
            .arg("replication")
            .query(&mut connection)
            .unwrap_or_else(|err| panic!("INFO replication on {master}: {err}"))
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let info = info();
        let field = |line: &str, name: &str| {
            line.split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=")).map(str::to_owned))
        };
        let master_offset = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("master_repl_offset:"))
            .map(str::to_owned);
        let replica_offset = info
            .lines()
            .filter(|line| line.starts_with("slave"))
            .find(|line| field(line, "port").as_deref() == Some(replica.to_string().as_str()))
            .and_then(|line| field(line, "offset"));
        if master_offset.is_some() && master_offset == replica_offset {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica on {replica} did not catch up with {master}: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the master that holds a room's slot (the one the replica follows) while members
/// on two instances are present. Once the replica has taken over, the room carries on:
/// broadcasts and presence updates reach both members on their old connections, a new
/// member's join and a presence state are announced, and the listings are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_master_failing_over_keeps_presence_and_delivery() {
    let mut cluster = RedisCluster::start(true);
    let master = cluster.master_ports()[0];
    let replica = cluster.replica_port().expect("a replica");
    let room = room_served_by(&cluster, master, "failover");
    // Default liveness: an instance must outlive the failover (the registry's slot may
    // be on the failing master too) without being declared dead.
    let tracked = || {
        instance(&cluster, "mesh:failover:", false).track_presence(&room, PresenceOptions::new())
    };
    let a = serve(tracked()).await;
    let b = serve(tracked()).await;

    let on_a = connect(&a.url()).await;
    let on_b = connect(&b.url()).await;
    let (a_id, b_id) = (on_a.connection_id(), on_b.connection_id());
    on_a.join_room(&room).await.expect("join on A");
    on_b.join_room(&room).await.expect("join on B");
    let (_, mut a_updates) = on_a.subscribe_presence(&room).await.expect("presence on A");
    let (_, mut b_updates) = on_b.subscribe_presence(&room).await.expect("presence on B");
    let mut a_pushes = on_a.pushes();
    let mut b_pushes = on_b.pushes();
    let mut a_events = on_a.events();
    let mut b_events = on_b.events();
    a.mesh
        .room(&room)
        .broadcast("before", &json!(1))
        .await
        .expect("broadcast before the failover");
    assert_eq!(push(&mut a_pushes, "before").await, 1);
    assert_eq!(push(&mut b_pushes, "before").await, 1);

    wait_replica_synced(master, replica);
    assert_eq!(
        cluster.master_of_key(&room_slot_key(&room)),
        master,
        "the room's slot is on the master the replica follows"
    );
    cluster.kill(master);

    // During the outage, what needs the room's slot may fail, with EUNAVAILABLE only, and
    // the servers keep answering what needs no Redis.
    assert_eq!(
        on_a.command("echo", json!("still here")).await,
        Ok(json!("still here"))
    );
    match on_b
        .publish_presence_state(&room, json!({"during": "outage"}), StateOptions::new())
        .await
    {
        Ok(_) => {}
        Err(ClientError::Command(failure)) if failure.code == "EUNAVAILABLE" => {}
        Err(other) => panic!("a presence state during the outage: {other}"),
    }
    match a.mesh.room(&room).members().await {
        Ok(_) | Err(MeshError::Unavailable(_)) => {}
        Err(other) => panic!("room members during the outage: {other}"),
    }
    assert_eq!(
        on_b.command("echo", json!("still here")).await,
        Ok(json!("still here"))
    );

    cluster.wait_failover(master);
    let failed_over_at = Instant::now();
    assert_eq!(cluster.master_of_key(&room_slot_key(&room)), replica);

    // Both instances subscribe to the room's topics again on the promoted replica.
    until_room_broadcasts_arrive(&a, &room, &mut [&mut a_pushes, &mut b_pushes]).await;
    until_room_broadcasts_arrive(&b, &room, &mut [&mut a_pushes, &mut b_pushes]).await;
    eprintln!(
        "room broadcasts reach both members {:?} after the failover",
        failed_over_at.elapsed()
    );
    b.mesh
        .room(&room)
        .broadcast("after", &json!(2))
        .await
        .expect("broadcast after the failover");
    assert_eq!(push(&mut a_pushes, "after").await, 2);
    assert_eq!(push(&mut b_pushes, "after").await, 2);

    // A new member's join reaches both members' presence subscriptions.
    let on_c = connect(&b.url()).await;
    let c_id = on_c.connection_id();
    on_c.join_room(&room)
        .await
        .expect("join after the failover");
    for (updates, on) in [(&mut a_updates, "A"), (&mut b_updates, "B")] {
        presence_update(
            updates,
            &format!("(join of {c_id}) on {on}"),
            WAIT,
            |update| update.kind == PresenceKind::Join && update.connection_id == c_id,
        )
        .await;
    }

    // And so does a presence state.
    let state = json!({"mood": "failed over"});
    assert_eq!(
        on_a.publish_presence_state(&room, state.clone(), StateOptions::new())
            .await,
        Ok(true),
        "a presence state after the failover is stored"
    );
    for (updates, on) in [(&mut a_updates, "A"), (&mut b_updates, "B")] {
        let update = presence_update(
            updates,
            &format!("(state of {a_id}) on {on}"),
            WAIT,
            |update| {
                update.kind == PresenceKind::State
                    && update.connection_id == a_id
                    && update.state.as_ref() == Some(&state)
            },
        )
        .await;
        assert_eq!(update.room_name, room);
    }

    // No member lost its connection (no instance was declared dead), and the listings
    // show all three, from either instance.
    let everyone = sorted(vec![a_id.clone(), b_id.clone(), c_id.clone()]);
    for server in [&a, &b] {
        let members = sorted(server.mesh.room(&room).members().await.expect("members"));
        assert_eq!(members, everyone, "room members after the failover");
        let present = sorted(server.mesh.room(&room).present().await.expect("present"));
        assert_eq!(present, everyone, "present after the failover");
        let states = server
            .mesh
            .room(&room)
            .presence_states()
            .await
            .expect("presence states");
        assert!(
            states.contains(&(a_id.clone(), state.clone())),
            "presence states after the failover: {states:?}"
        );
    }
    let snapshot = on_c.presence_state(&room).await.expect("presence snapshot");
    let mut seen: Vec<String> = snapshot.present.into_iter().map(|m| m.id).collect();
    seen.sort();
    assert_eq!(seen, everyone, "a client's presence snapshot");
    assert_eq!(snapshot.states.get(&a_id), Some(&state));
    for (events, on) in [(&mut a_events, "A"), (&mut b_events, "B")] {
        while let Ok(event) = events.try_recv() {
            assert!(
                !matches!(
                    event,
                    ClientEvent::Disconnected | ClientEvent::Reconnected { .. }
                ),
                "the member on {on} lost its connection: {event:?}"
            );
        }
    }
    for client in [&on_a, &on_b, &on_c] {
        client.close().await;
    }
}

/// A tower-mesh instance dies without detaching while its connections are members of two
/// tracked rooms (on different masters). The survivor sweeps them: its members get one
/// `leave` for each dead membership, and only one, and the listings drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instances_members_are_swept_once_on_a_cluster() {
    let cluster = RedisCluster::start(false);
    let masters = cluster.master_ports().to_vec();
    // Two rooms in slots of different masters, and neither on the registry's master: a
    // forget spans three nodes.
    let first = room_served_by(&cluster, masters[1], "first");
    let second = room_served_by(&cluster, masters[2], "second");
    let tracked = || {
        instance(&cluster, "mesh:kill:", true)
            .track_presence(&first, PresenceOptions::new())
            .track_presence(&second, PresenceOptions::new())
    };
    let survivor = serve(tracked()).await;
    let doomed = DoomedInstance::start(tracked()).await;

    // Survivor: one member in both rooms, one in the second; both watch presence.
    let both = connect(&survivor.url()).await;
    let one = connect(&survivor.url()).await;
    let (both_id, one_id) = (both.connection_id(), one.connection_id());
    both.join_room(&first).await.expect("join");
    both.join_room(&second).await.expect("join");
    one.join_room(&second).await.expect("join");
    let (_, mut both_first) = both.subscribe_presence(&first).await.expect("presence");
    let (_, mut both_second) = both.subscribe_presence(&second).await.expect("presence");
    let (_, mut one_second) = one.subscribe_presence(&second).await.expect("presence");

    // Doomed: one member in both rooms, one in the first.
    let mut victim_both = RawClient::connect(&doomed.url).await;
    let mut victim_first = RawClient::connect(&doomed.url).await;
    for (victim, rooms) in [
        (&mut victim_both, vec![&first, &second]),
        (&mut victim_first, vec![&first]),
    ] {
        for room in rooms {
            let reply = victim
                .command_within(1, "mesh/join-room", json!({"roomName": room}))
                .await;
            assert_eq!(reply["payload"]["success"], true, "{reply}");
        }
    }
    let victims = [victim_both.id.clone(), victim_first.id.clone()];
    // Each leave expected, by presence stream: (stream, what it is, the leaving members).
    let mut streams = [
        (
            &mut both_first,
            "the first room's, on the member of both",
            vec![&victims[0], &victims[1]],
        ),
        (
            &mut both_second,
            "the second room's, on the member of both",
            vec![&victims[0]],
        ),
        (
            &mut one_second,
            "the second room's, on the member of one",
            vec![&victims[0]],
        ),
    ];
    for (updates, stream, joining) in &mut streams {
        one_update_each(updates, PresenceKind::Join, joining, stream, WAIT).await;
    }

    doomed.kill().await;
    let killed_at = Instant::now();

    // Nothing announces a dead instance: its leaves are the announcement. Within the
    // TTL (1 s) and a few sweeps, each membership's leave arrives.
    for (updates, stream, leaving) in &mut streams {
        one_update_each(updates, PresenceKind::Leave, leaving, stream, RECOVERY).await;
    }
    eprintln!(
        "the dead instance's leaves arrived {:?} after the kill (ttl 1000 ms, heartbeat 200 ms)",
        killed_at.elapsed()
    );

    // The forget ends with the registry: once the victims are out of it, no step of
    // theirs is left to run, and so no leave is left to announce.
    loop {
        let registered: Vec<String> = survivor
            .mesh
            .all_connection_metadata()
            .await
            .expect("metadata")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if victims.iter().all(|victim| !registered.contains(victim)) {
            assert_eq!(
                sorted(registered),
                sorted(vec![both_id.clone(), one_id.clone()]),
                "the survivor's connections stay registered"
            );
            break;
        }
        assert!(
            killed_at.elapsed() < RECOVERY,
            "the dead instance's connections were not forgotten: {registered:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A presence state in each room comes after anything announced before it on the
    // room's topic: no second leave came before it.
    let marker = json!({"marker": true});
    for room in [&first, &second] {
        assert_eq!(
            both.publish_presence_state(room, marker.clone(), StateOptions::new())
                .await,
            Ok(true)
        );
    }
    for (updates, stream, _) in &mut streams {
        let mut before = Vec::new();
        within(&format!("the marker state on {stream}"), async {
            loop {
                let update = updates.recv().await.expect("presence updates");
                if update.kind == PresenceKind::State
                    && update.connection_id == both_id
                    && update.state.as_ref() == Some(&marker)
                {
                    return;
                }
                before.push(update);
            }
        })
        .await;
        assert_eq!(before, [], "nothing more after the leaves on {stream}");
    }

    for (room, staying) in [
        (&first, vec![both_id.clone()]),
        (&second, sorted(vec![both_id.clone(), one_id.clone()])),
    ] {
        let rooms = survivor.mesh.room(room);
        assert_eq!(
            sorted(rooms.members().await.expect("members")),
            staying,
            "{room}'s members"
        );
        assert_eq!(
            sorted(rooms.present().await.expect("present")),
            staying,
            "{room}'s present"
        );
    }
    for victim in &victims {
        assert_eq!(
            survivor.mesh.connection_rooms(victim).await.expect("rooms"),
            Vec::<String>::new(),
            "{victim}'s rooms"
        );
        assert_eq!(
            survivor
                .mesh
                .connection_metadata(victim)
                .await
                .expect("metadata"),
            None,
            "{victim}'s metadata"
        );
    }
    both.close().await;
    one.close().await;
}

/// Every node of the cluster restarts empty. Each instance finds its registration lost
/// and closes its connections with 1012; the Rust client reconnects and sets itself up
/// again, and the whole mesh works again without restarting tower-mesh: rooms, presence,
/// broadcasts, records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_works_again_after_every_node_restarts_empty() {
    let mut cluster = RedisCluster::start(false);
    let room = "restart-room";
    let open = || {
        instance(&cluster, "mesh:restart:", true)
            .track_presence(room, PresenceOptions::new())
            .expose_writable_record(everything(), Access::open())
    };
    let a = serve(open()).await;
    let b = serve(open()).await;

    // Raw clients to read the close code; the Rust client's to reconnect on their own.
    let mut raw_on_a = RawClient::connect(&a.url()).await;
    let mut raw_on_b = RawClient::connect(&b.url()).await;
    let on_a = connect(&a.url()).await;
    let on_b = connect(&b.url()).await;
    let (old_a, old_b) = (on_a.connection_id(), on_b.connection_id());
    on_a.join_room(room).await.expect("join on A");
    on_b.join_room(room).await.expect("join on B");
    let (_, mut a_updates) = on_a.subscribe_presence(room).await.expect("presence on A");
    let (_, mut b_updates) = on_b.subscribe_presence(room).await.expect("presence on B");
    let a_state = json!({"on": "A"});
    assert_eq!(
        on_a.publish_presence_state(room, a_state.clone(), StateOptions::new())
            .await,
        Ok(true)
    );
    let mut a_doc = on_a
        .subscribe_record("doc", RecordMode::Full)
        .await
        .expect("subscribe");
    let mut b_doc = on_b
        .subscribe_record("doc", RecordMode::Patch)
        .await
        .expect("subscribe");
    b.mesh
        .write_record("doc", json!({"n": 1}), MergeStrategy::Replace)
        .await
        .expect("write before the restart");
    for doc in [&mut a_doc, &mut b_doc] {
        let change = within("the first record update", doc.next()).await;
        assert_eq!(
            change,
            Some(RecordChange::Updated {
                value: json!({"n": 1}),
                version: 1
            })
        );
    }
    let mut a_events = on_a.events();
    let mut b_events = on_b.events();

    cluster.restart_all_empty();
    let restarted_at = Instant::now();

    for raw in [&mut raw_on_a, &mut raw_on_b] {
        assert_eq!(
            raw.closed().await,
            (1012, "server state lost, reconnect".to_owned())
        );
    }
    let new_a = reconnected(&mut a_events, &old_a).await;
    let new_b = reconnected(&mut b_events, &old_b).await;
    eprintln!(
        "both clients reconnected {:?} after the restart",
        restarted_at.elapsed()
    );
    assert_eq!(on_a.connection_id(), new_a);
    assert_eq!(on_b.connection_id(), new_b);

    // The clients joined again, renewed their presence subscriptions and re-published
    // their states before reporting the reconnect.
    let both = sorted(vec![new_a.clone(), new_b.clone()]);
    for server in [&a, &b] {
        let rooms = server.mesh.room(room);
        assert_eq!(
            sorted(rooms.members().await.expect("members")),
            both,
            "members"
        );
        assert_eq!(
            sorted(rooms.present().await.expect("present")),
            both,
            "present"
        );
        assert_eq!(
            rooms.presence_states().await.expect("states"),
            vec![(new_a.clone(), a_state.clone())],
            "presence states"
        );
    }

    // Joins and presence states are announced on both instances.
    let on_c = connect(&b.url()).await;
    let new_c = on_c.connection_id();
    on_c.join_room(room).await.expect("join after the restart");
    for (updates, on) in [(&mut a_updates, "A"), (&mut b_updates, "B")] {
        presence_update(
            updates,
            &format!("(join of {new_c}) on {on}"),
            WAIT,
            |update| update.kind == PresenceKind::Join && update.connection_id == new_c,
        )
        .await;
    }
    let b_state = json!({"on": "B"});
    assert_eq!(
        on_b.publish_presence_state(room, b_state.clone(), StateOptions::new())
            .await,
        Ok(true)
    );
    for (updates, on) in [(&mut a_updates, "A"), (&mut b_updates, "B")] {
        presence_update(
            updates,
            &format!("(state of {new_b}) on {on}"),
            WAIT,
            |update| {
                update.kind == PresenceKind::State
                    && update.connection_id == new_b
                    && update.state.as_ref() == Some(&b_state)
            },
        )
        .await;
    }

    // Room broadcasts reach every member, on either instance.
    let mut pushes = [on_a.pushes(), on_b.pushes(), on_c.pushes()];
    a.mesh
        .room(room)
        .broadcast("after", &json!("restart"))
        .await
        .expect("broadcast after the restart");
    for pushes in &mut pushes {
        assert_eq!(push(pushes, "after").await, "restart");
    }

    // The record subscriptions were renewed (the record is gone: version 0), and a
    // write from a client reaches them; a new subscription reads it.
    on_c.write_record("doc", json!({"n": 2}), MergeStrategy::Replace)
        .await
        .expect("a client's write after the restart");
    for doc in [&mut a_doc, &mut b_doc] {
        let wanted = RecordChange::Updated {
            value: json!({"n": 2}),
            version: 1,
        };
        let mut seen = Vec::new();
        within("the record update after the restart", async {
            while let Some(change) = doc.next().await {
                if change == wanted {
                    return;
                }
                seen.push(change);
            }
            panic!("the record subscription ended; changes: {seen:?}");
        })
        .await;
        assert!(
            seen.iter().all(|change| *change
                == RecordChange::Updated {
                    value: Value::Null,
                    version: 0
                }),
            "before the new write, only the renewal's (record gone): {seen:?}"
        );
    }
    let fresh = on_c
        .subscribe_record("doc", RecordMode::Full)
        .await
        .expect("subscribe after the restart");
    assert_eq!((fresh.value(), fresh.version()), (&json!({"n": 2}), 1));

    for client in [&on_a, &on_b, &on_c] {
        client.close().await;
    }
}
