//! Plain Redis channels (issue 15): with `RedisBackendBuilder::plain_channels`, channels
//! whose names match are plain Redis channels. A separate raw Redis client (the `redis`
//! crate, its own connections) publishes on the channel's own name and appends to its
//! history list, and subscribes to what the mesh writes; text published on the engine's
//! own (prefixed) channels injects nothing; a channel that is not plain works as before;
//! outside messages over `max_channel_message_bytes` reach nobody. Clients see plain
//! channels exactly as any other, on either backend.
//!
//! The raw-client tests run on a single Redis (`on_redis::*`) and on the Redis Cluster
//! of `REDIS_CLUSTER_URLS` (`on_cluster::*`). On a Cluster the outside process publishes
//! with a plain `PUBLISH` over a single-node connection to each master in turn, so that
//! messages are published on nodes other than the one that holds the instances'
//! subscriptions (classic pub/sub crosses the cluster bus), and it reads and appends to
//! the history list through a Cluster-aware connection (the list's slot is the channel
//! name's).
//!
//! Every test runs its meshes under a key prefix of its own, and names its plain
//! channels after that prefix: plain channel names are not prefixed, and the suites
//! share one Redis. "Nothing arrived" is shown without sleeping. On a single Redis, after
//! the outside publish, the server broadcasts a marker, which reaches each client after
//! whatever its instance received before it on its one pub/sub connection. On a Cluster
//! an instance reads pub/sub over one connection per node, with no order between them,
//! so the marker proves it only weakly there; where they can, the Cluster variants follow
//! the message that must not arrive with one that must, on the same channel and from the
//! same node (one bus link, then one subscription connection: they arrive in that
//! order), and await that one. Subscriber counts come from `PUBSUB NUMSUB` asked of
//! every node, since a classic `PUBLISH` on a Cluster counts only the publishing node's
//! subscribers.

use std::collections::HashMap;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tower_mesh::{Access, Mesh, MeshBuilder, RedisBackend, Regex};

use crate::common::*;

conformance!(plain_channels_look_like_any_other_to_clients);

/// Instantiates `async fn name(backend: Backend)` raw-client tests on a single Redis
/// (`on_redis::name`) and on the Redis Cluster (`on_cluster::name`).
macro_rules! on_redis_and_cluster {
    ($($name:ident),* $(,)?) => {
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::redis()).await
                }
            )*
        }
        mod on_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::redis_cluster()).await
                }
            )*
        }
    };
}

on_redis_and_cluster!(
    an_outside_publish_reaches_subscribers_on_every_instance,
    a_mesh_write_reaches_outside_subscribers_and_the_list,
    outside_history_is_read_newest_first_and_bounded,
    history_bytes_count_what_outsiders_appended,
    outside_text_on_the_engines_channels_injects_nothing,
    a_channel_that_is_not_plain_works_as_before,
    oversize_outside_messages_are_not_delivered,
    a_plain_channel_has_no_positions_and_never_recovers,
);

const MESSAGE: &str = "mesh/subscription-message";

/// A Redis-backed test mesh whose `ext:` channels are plain, and a raw client beside it
/// (the outside process: none of its connections are the mesh's).
struct Plain {
    /// The mesh's Redis or Cluster, under this test's prefix.
    backend: Backend,
    prefix: String,
    /// Where the outside process publishes: the one Redis, or every master of the
    /// Cluster, each over a single-node connection.
    publishers: Vec<Publisher>,
    /// The outside process's connection for keys.
    keyspace: Keyspace,
}

/// A single-node connection of the outside process, to publish on.
struct Publisher {
    url: String,
    connection: ::redis::aio::MultiplexedConnection,
}

impl Publisher {
    async fn connect(url: &str) -> Self {
        let connection = ::redis::Client::open(url)
            .unwrap_or_else(|err| panic!("{url} is not a valid Redis URL: {err}"))
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|err| panic!("a raw Redis connection to {url}: {err}"));
        Publisher {
            url: url.to_owned(),
            connection,
        }
    }

    /// `PUBLISH channel payload` on this node; how many subscribers got it. On a Cluster
    /// that counts this node's subscribers only.
    async fn publish(&self, channel: &str, payload: impl ::redis::ToRedisArgs) -> i64 {
        ::redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.connection.clone())
            .await
            .unwrap_or_else(|err| panic!("PUBLISH on {}: {err}", self.url))
    }

    async fn query<T: ::redis::FromRedisValue>(&self, command: &::redis::Cmd, what: &str) -> T {
        command
            .query_async(&mut self.connection.clone())
            .await
            .unwrap_or_else(|err| panic!("{what} on {}: {err}", self.url))
    }
}

/// The outside process's connection for keys: on a Cluster a Cluster-aware one, which
/// sends each command to the master of its key's slot.
enum Keyspace {
    Single(::redis::aio::MultiplexedConnection),
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl Keyspace {
    async fn query<T: ::redis::FromRedisValue>(&self, command: &::redis::Cmd, what: &str) -> T {
        match self {
            Keyspace::Single(connection) => command.query_async(&mut connection.clone()).await,
            Keyspace::Cluster(connection) => command.query_async(&mut connection.clone()).await,
        }
        .unwrap_or_else(|err| panic!("{what}: {err}"))
    }
}

impl Plain {
    async fn new(backend: Backend) -> Self {
        let (prefix, publishers, keyspace) = match &backend {
            Backend::Redis { url, prefix } => {
                let publisher = Publisher::connect(url).await;
                let keyspace = Keyspace::Single(publisher.connection.clone());
                (prefix.clone(), vec![publisher], keyspace)
            }
            Backend::RedisCluster { seeds, prefix } => {
                let keyspace =
                    ::redis::cluster::ClusterClient::new(seeds.iter().map(String::as_str))
                        .expect("valid Redis Cluster seed URLs")
                        .get_async_connection()
                        .await
                        .expect("a raw Redis Cluster connection");
                (
                    prefix.clone(),
                    masters(seeds).await,
                    Keyspace::Cluster(keyspace),
                )
            }
            Backend::Memory(_) => unreachable!("the outside process needs Redis"),
        };
        Plain {
            backend,
            prefix,
            publishers,
            keyspace,
        }
    }

    fn on_cluster(&self) -> bool {
        matches!(self.backend, Backend::RedisCluster { .. })
    }

    /// A Redis backend builder on this test's Redis (or Cluster) and prefix.
    fn redis_builder(&self) -> tower_mesh::RedisBackendBuilder {
        self.backend
            .redis_builder()
            .expect("the outside tests run on Redis")
    }

    /// A builder for one more instance of the mesh: `ext:` channels plain, every channel
    /// exposed.
    fn builder(&self) -> MeshBuilder {
        plain_mesh(self.redis_builder()).expose_channel(everything(), Access::open())
    }

    /// A channel name of this test's own; plain when `plain`.
    fn channel(&self, plain: bool, name: &str) -> String {
        let kind = if plain { "ext:" } else { "int:" };
        format!("{kind}{}{name}", self.prefix)
    }

    /// The history list of `channel`, as the backend documents it.
    fn history_key(&self, channel: &str) -> String {
        format!("{}history:{{{channel}}}", self.prefix)
    }

    /// How many subscriptions `channel` has: on a Cluster, summed over every node (the
    /// Cluster-aware connection asks them all).
    async fn subscribers(&self, channel: &str) -> i64 {
        let counts: HashMap<String, i64> = self
            .keyspace
            .query(
                ::redis::cmd("PUBSUB").arg("NUMSUB").arg(channel),
                "PUBSUB NUMSUB",
            )
            .await;
        counts.get(channel).copied().unwrap_or_default()
    }

    /// Waits until `channel` has `count` subscriptions.
    async fn await_subscribers(&self, channel: &str, count: i64) {
        within(&format!("{count} subscriptions to {channel}"), async {
            while self.subscribers(channel).await != count {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    /// `SPUBLISH channel payload` through the Cluster-aware connection (to the master of
    /// the channel's slot): how an outside process reaches a sharded channel.
    async fn spublish(&self, channel: &str, payload: impl ::redis::ToRedisArgs) {
        let _: i64 = self
            .keyspace
            .query(
                ::redis::cmd("SPUBLISH").arg(channel).arg(payload),
                "SPUBLISH",
            )
            .await;
    }

    /// `LPUSH` from outside the mesh, oldest first: the last is the newest.
    async fn lpush(&self, key: &str, messages: &[&str]) {
        let _: i64 = self
            .keyspace
            .query(::redis::cmd("LPUSH").arg(key).arg(messages), "LPUSH")
            .await;
    }

    async fn lrange(&self, key: &str) -> Vec<String> {
        self.keyspace
            .query(::redis::cmd("LRANGE").arg(key).arg(0).arg(-1), "LRANGE")
            .await
    }

    async fn get(&self, key: &str) -> Option<String> {
        self.keyspace
            .query(::redis::cmd("GET").arg(key), "GET")
            .await
    }

    /// A key's `PTTL`: -1 without expiry, -2 when absent.
    async fn pttl(&self, key: &str) -> i64 {
        self.keyspace
            .query(::redis::cmd("PTTL").arg(key), "PTTL")
            .await
    }
}

/// A single-node connection to every master of the Cluster. The seeds must be the
/// masters, all of them (scripts/test's are): checked, so that "each master in turn"
/// covers the node that holds the subscriptions and at least one that does not.
async fn masters(seeds: &[String]) -> Vec<Publisher> {
    let mut masters = Vec::new();
    for seed in seeds {
        let node = Publisher::connect(seed).await;
        let info: String = node
            .query(::redis::cmd("INFO").arg("replication"), "INFO replication")
            .await;
        assert!(
            info.lines().any(|line| line.trim() == "role:master"),
            "{seed} in REDIS_CLUSTER_URLS is not a master:\n{info}"
        );
        masters.push(node);
    }
    let info: String = masters[0]
        .query(::redis::cmd("CLUSTER").arg("INFO"), "CLUSTER INFO")
        .await;
    let size = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("cluster_size:"))
        .and_then(|size| size.parse::<usize>().ok());
    assert_eq!(
        size,
        Some(masters.len()),
        "REDIS_CLUSTER_URLS must name every master of the Cluster once:\n{info}"
    );
    assert!(
        masters.len() >= 2,
        "a Cluster of one master publishes every message on the subscribers' node"
    );
    masters
}

/// A mesh on `redis` whose `ext:` channels are plain.
fn plain_mesh(redis: tower_mesh::RedisBackendBuilder) -> MeshBuilder {
    Mesh::builder().redis_backend(
        redis
            .plain_channels(Regex::new("^ext:").expect("regex"))
            .build()
            .expect("Redis backend"),
    )
}

async fn subscribe(client: &mut RawClient, id: u64, channel: &str) -> Value {
    call(
        client,
        id,
        "mesh/subscribe-channel",
        json!({ "channel": channel }),
    )
    .await
}

async fn subscribed(server: &TestServer, channel: &str) -> RawClient {
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        subscribe(&mut client, 1, channel).await,
        json!({"success": true, "history": []})
    );
    client
}

async fn message(client: &mut RawClient) -> Value {
    client.push_within(MESSAGE).await["payload"].clone()
}

/// The pushes (noise left out) that reached each client before the marker.
async fn pushes_before_marker(
    mesh: &Mesh,
    marker: &str,
    clients: &mut [&mut RawClient],
) -> Vec<Vec<Value>> {
    frames_before_marker(mesh, marker, clients, Noise::Dropped).await
}

// ---------------------------------------------------------------------------------------

/// What a WebSocket client sees of an `ext:` channel is the same on both backends: on
/// Redis it is plain, on the in-memory backend (which has no outside publishers, and no
/// such setting) it is an ordinary channel.
async fn plain_channels_look_like_any_other_to_clients(backend: Backend) {
    let builder = |backend: &Backend| {
        match backend.redis_builder() {
            None => backend.builder(),
            Some(redis) => plain_mesh(redis),
        }
        .expose_channel(Regex::new("^ext:").expect("regex"), Access::open())
    };
    let a = serve(builder(&backend)).await;
    let b = serve(builder(&backend)).await;
    let channel = match &backend {
        Backend::Memory(_) => "ext:news".to_owned(),
        Backend::Redis { prefix, .. } | Backend::RedisCluster { prefix, .. } => {
            format!("ext:{prefix}news")
        }
    };
    // In memory the channel has positions, as any other; a plain one has none (see
    // tests/it/recovery.rs): they are left out here.
    let mut client = RawClient::connect(&a.url()).await;
    assert_eq!(
        without_position(subscribe(&mut client, 1, &channel).await),
        json!({"success": true, "history": []})
    );
    for n in 1..=3 {
        b.mesh
            .write_channel(&channel, &format!("message {n}"), 2)
            .await
            .expect("write_channel");
        assert_eq!(
            without_position(message(&mut client).await),
            json!({"channel": channel, "message": format!("message {n}")})
        );
    }
    assert_eq!(
        call(
            &mut client,
            2,
            "mesh/get-channel-history",
            json!({"channel": channel})
        )
        .await,
        json!({"success": true, "history": ["message 3", "message 2"]})
    );
    let mut late = RawClient::connect(&b.url()).await;
    assert_eq!(
        without_position(
            call(
                &mut late,
                1,
                "mesh/subscribe-channel",
                json!({"channel": channel, "historyLimit": 1})
            )
            .await
        ),
        json!({"success": true, "history": ["message 3"]})
    );
    assert_eq!(
        call(
            &mut client,
            3,
            "mesh/unsubscribe-channel",
            json!({"channel": channel})
        )
        .await,
        json!(true)
    );
    b.mesh
        .write_channel(&channel, "after", 2)
        .await
        .expect("write_channel");
    assert_eq!(
        without_position(message(&mut late).await),
        json!({"channel": channel, "message": "after"})
    );
    for frames in pushes_before_marker(&a.mesh, "marker", &mut [&mut client]).await {
        assert!(pushes_named(&frames, MESSAGE).is_empty(), "{frames:?}");
    }
}

async fn an_outside_publish_reaches_subscribers_on_every_instance(backend: Backend) {
    let plain = Plain::new(backend).await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let channel = plain.channel(true, "notifications");
    let mut on_a = subscribed(&a, &channel).await;
    let mut on_b = subscribed(&b, &channel).await;

    // One subscription per instance, on the channel's own name.
    assert_eq!(plain.subscribers(&channel).await, 2);
    let text = r#"{"kind":"deploy","id":7}"#;
    for publisher in &plain.publishers {
        let reached = publisher.publish(&channel, text).await;
        if !plain.on_cluster() {
            assert_eq!(reached, 2);
        }
        for client in [&mut on_a, &mut on_b] {
            assert_eq!(
                message(client).await,
                json!({"channel": channel, "message": text})
            );
        }
    }
    // Any text is a message; it is not parsed.
    for publisher in &plain.publishers {
        let reached = publisher.publish(&channel, "not json").await;
        if !plain.on_cluster() {
            assert_eq!(reached, 2);
        }
        assert_eq!(
            message(&mut on_a).await,
            json!({"channel": channel, "message": "not json"})
        );
    }

    // Once nobody on an instance listens, it unsubscribes from the channel.
    call(
        &mut on_b,
        2,
        "mesh/unsubscribe-channel",
        json!({"channel": channel}),
    )
    .await;
    // The unsubscribe is applied in order by the instance's subscriber: wait for it.
    if plain.on_cluster() {
        plain.await_subscribers(&channel, 1).await;
        // Redis sends b nothing more; a still gets what every node publishes.
        for publisher in &plain.publishers {
            publisher.publish(&channel, "after").await;
            assert_eq!(
                message(&mut on_a).await,
                json!({"channel": channel, "message": "after"})
            );
        }
    } else {
        let publisher = &plain.publishers[0];
        within("the instance to unsubscribe", async {
            while publisher.publish(&channel, "probe").await != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }
    for frames in pushes_before_marker(&b.mesh, "marker", &mut [&mut on_b]).await {
        assert!(pushes_named(&frames, MESSAGE).is_empty(), "{frames:?}");
    }
}

async fn a_mesh_write_reaches_outside_subscribers_and_the_list(backend: Backend) {
    let plain = Plain::new(backend).await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let channel = plain.channel(true, "orders");
    let mut client = subscribed(&b, &channel).await;

    // An outside subscriber on every node the outside process publishes on: on a
    // Cluster, every master, most of them not the one the mesh publishes on.
    let mut outsiders = Vec::new();
    for node in &plain.publishers {
        let mut outside = ::redis::Client::open(node.url.as_str())
            .expect("a valid Redis URL")
            .get_async_pubsub()
            .await
            .expect("a raw pub/sub connection");
        outside.subscribe(&channel).await.expect("SUBSCRIBE");
        outsiders.push((node.url.as_str(), outside.into_on_message()));
    }

    a.mesh
        .write_channel(&channel, r#"{"id":1}"#, 10)
        .await
        .expect("write_channel");
    for (url, outside) in &mut outsiders {
        let received = within(
            &format!("the outside subscriber's message on {url}"),
            outside.next(),
        )
        .await
        .expect("a message");
        assert_eq!(received.get_channel_name(), channel, "on {url}");
        assert_eq!(received.get_payload_bytes(), br#"{"id":1}"#, "on {url}");
    }
    assert_eq!(
        message(&mut client).await,
        json!({"channel": channel, "message": r#"{"id":1}"#})
    );
    assert_eq!(
        plain.lrange(&plain.history_key(&channel)).await,
        [r#"{"id":1}"#]
    );
}

async fn outside_history_is_read_newest_first_and_bounded(backend: Backend) {
    let plain = Plain::new(backend).await;
    const FRAME: usize = 4096;
    const LONGEST: usize = 512;
    let server = serve(
        plain
            .builder()
            .max_frame_size(FRAME)
            .max_channel_message_bytes(LONGEST),
    )
    .await;
    let channel = plain.channel(true, "log");
    let key = plain.history_key(&channel);
    let oversize = "x".repeat(LONGEST + 1);
    plain
        .lpush(&key, &["first", "second", &oversize, "third"])
        .await;
    let mut client = RawClient::connect(&server.url()).await;

    // Newest first; the message over max_channel_message_bytes is left out, as it would
    // be live.
    assert_eq!(
        call(
            &mut client,
            1,
            "mesh/get-channel-history",
            json!({"channel": channel})
        )
        .await,
        json!({"success": true, "history": ["third", "second", "first"]})
    );
    assert_eq!(
        call(
            &mut client,
            2,
            "mesh/subscribe-channel",
            json!({"channel": channel, "historyLimit": 2})
        )
        .await,
        json!({"success": true, "history": ["third", "second"]})
    );
    assert_eq!(
        server
            .mesh
            .channel_history(&channel, 10)
            .await
            .expect("history"),
        ["third", "second", "first"]
    );

    // A list far larger than a frame: the reply holds the newest that fit.
    let filler = "y".repeat(LONGEST);
    let many: Vec<&str> = std::iter::repeat_n(filler.as_str(), 50).collect();
    plain.lpush(&key, &many).await;
    let reply = call_within_frame(
        &mut client,
        3,
        "mesh/get-channel-history",
        json!({"channel": channel, "limit": 100}),
        FRAME,
    )
    .await;
    assert_eq!(reply["truncated"], json!(true), "{reply}");
    let history = reply["history"].as_array().expect("history");
    assert!(!history.is_empty() && history.len() < 50, "{reply}");
    assert!(history.iter().all(|message| message == &json!(filler)));
}

async fn history_bytes_count_what_outsiders_appended(backend: Backend) {
    let plain = Plain::new(backend).await;
    let server = serve(plain.builder().max_history_bytes(30)).await;
    let channel = plain.channel(true, "sized");
    let key = plain.history_key(&channel);
    let bytes_key = format!("{}history-bytes:{{{channel}}}", plain.prefix);
    // Ten bytes each.
    plain
        .lpush(&key, &["outside-01", "outside-02", "outside-03"])
        .await;
    server
        .mesh
        .write_channel(&channel, "inside-004", 10)
        .await
        .expect("write_channel");
    // The write counted the outsiders' messages: 30 bytes are kept, not 40.
    assert_eq!(
        plain.lrange(&key).await,
        ["inside-004", "outside-03", "outside-02"]
    );
    assert_eq!(plain.get(&bytes_key).await.as_deref(), Some("30"));
    // And again after more outside appends between two mesh writes.
    plain.lpush(&key, &["outside-05"]).await;
    server
        .mesh
        .write_channel(&channel, "inside-006", 10)
        .await
        .expect("write_channel");
    assert_eq!(
        plain.lrange(&key).await,
        ["inside-006", "outside-05", "inside-004"]
    );
    assert_eq!(plain.get(&bytes_key).await.as_deref(), Some("30"));
}

async fn outside_text_on_the_engines_channels_injects_nothing(backend: Backend) {
    let plain = Plain::new(backend).await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let plain_channel = plain.channel(true, "feed");
    let other_channel = plain.channel(false, "feed");
    let mut client = subscribed(&a, &plain_channel).await;
    assert_eq!(
        without_position(subscribe(&mut client, 2, &other_channel).await),
        json!({"success": true, "history": []})
    );
    let p = &plain.prefix;
    let frame =
        r#"{"command":"mesh/subscription-message","payload":{"channel":"x","message":"y"}}"#;
    let texts: [&[u8]; 3] = [
        // A rendered frame, and text shaped like an envelope's tag and length.
        frame.as_bytes(),
        "b\u{4}\0\0\0ping\u{2}\0\0\0{}".as_bytes(),
        &[0xff, 0xfe],
    ];
    for target in [
        format!("{p}broadcast"),
        format!("{p}instance:{{{}}}", a.mesh.instance_id()),
        format!("{p}topic:channel:{{{plain_channel}}}"),
        format!("{p}topic:channel:{{{other_channel}}}"),
    ] {
        for text in texts {
            for publisher in &plain.publishers {
                publisher.publish(&target, text).await;
            }
            // On a Cluster the instance's own channel and the topics are sharded.
            if plain.on_cluster() {
                plain.spublish(&target, text).await;
            }
        }
    }
    // Not UTF-8: no message, on a plain channel either.
    for publisher in &plain.publishers {
        publisher.publish(&plain_channel, &[0xffu8, 0xfe][..]).await;
    }
    // A plain pattern never reaches under the prefix, whatever it matches.
    let everything_plain = serve(
        Mesh::builder()
            .redis_backend(
                plain
                    .redis_builder()
                    .plain_channels(everything())
                    .build()
                    .expect("Redis backend"),
            )
            .expose_channel(everything(), Access::open()),
    )
    .await;
    everything_plain
        .mesh
        .write_channel(&format!("{p}broadcast"), frame, 0)
        .await
        .expect("write_channel");
    // Weak on a Cluster (see the module docs). There the writes below back it up for the
    // plain channel and the other channel's topic: each is published on the node that
    // serves its channel, after the texts published there on that channel (the plain
    // channel's from that node, the topic's by SPUBLISH), so an injected message would
    // reach the client before it.
    for frames in pushes_before_marker(&b.mesh, "marker", &mut [&mut client]).await {
        assert!(frames.is_empty(), "nothing before the marker: {frames:?}");
    }
    // Both instances and their subscriptions still work.
    b.mesh
        .write_channel(&plain_channel, "still plain", 0)
        .await
        .expect("write_channel");
    assert_eq!(
        message(&mut client).await,
        json!({"channel": plain_channel, "message": "still plain"})
    );
    b.mesh
        .write_channel(&other_channel, "still enveloped", 0)
        .await
        .expect("write_channel");
    assert_eq!(
        without_position(message(&mut client).await),
        json!({"channel": other_channel, "message": "still enveloped"})
    );
}

async fn a_channel_that_is_not_plain_works_as_before(backend: Backend) {
    let plain = Plain::new(backend).await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let channel = plain.channel(false, "news");
    let mut client = RawClient::connect(&a.url()).await;
    let reply = subscribe(&mut client, 1, &channel).await;
    assert_eq!(reply["offset"], 0, "it has positions: {reply}");
    // Nobody subscribes to its bare name: an outside publish there reaches nobody, on
    // any node.
    assert_eq!(plain.subscribers(&channel).await, 0);
    for publisher in &plain.publishers {
        assert_eq!(publisher.publish(&channel, "hello").await, 0);
    }
    b.mesh
        .write_channel(&channel, "from the mesh", 10)
        .await
        .expect("write_channel");
    assert_eq!(
        message(&mut client).await,
        json!({"channel": channel, "message": "from the mesh", "offset": 1})
    );
    assert_eq!(
        plain.lrange(&plain.history_key(&channel)).await,
        ["from the mesh"]
    );
    // Its history keeps no length mark: only plain channels need one.
    let length_key = format!("{}history-length:{{{channel}}}", plain.prefix);
    assert_eq!(plain.get(&length_key).await, None);
    // Its position lasts as long as its history. One of a channel that keeps nothing
    // expires (within a day), and so does the one a read of a channel never written
    // makes: names nobody keeps leave no key behind for good. A plain channel has none.
    let position = |channel: &str| format!("{}history-position:{{{channel}}}", plain.prefix);
    assert_eq!(plain.pttl(&position(&channel)).await, -1);
    let unkept = plain.channel(false, "unkept");
    b.mesh
        .write_channel(&unkept, "not kept", 0)
        .await
        .expect("write_channel");
    let day = 24 * 60 * 60 * 1000;
    assert!((1..=day).contains(&plain.pttl(&position(&unkept)).await));
    let read_only = plain.channel(false, "read-only");
    let _ = subscribe(&mut client, 2, &read_only).await;
    assert!((1..=day).contains(&plain.pttl(&position(&read_only)).await));
    b.mesh
        .write_channel(&read_only, "kept", 10)
        .await
        .expect("write_channel");
    assert_eq!(plain.pttl(&position(&read_only)).await, -1);
    let plain_channel = plain.channel(true, "ticks");
    b.mesh
        .write_channel(&plain_channel, "kept", 10)
        .await
        .expect("write_channel");
    assert_eq!(plain.pttl(&position(&plain_channel)).await, -2);
}

/// Outside publishers carry no offsets, so a plain channel has no positions: replies
/// carry no `epoch` or `offset`, messages no `offset`, and `since` never recovers.
async fn a_plain_channel_has_no_positions_and_never_recovers(backend: Backend) {
    let plain = Plain::new(backend).await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let channel = plain.channel(true, "ticks");
    let mut client = subscribed(&a, &channel).await;
    b.mesh
        .write_channel(&channel, "from the mesh", 10)
        .await
        .expect("write_channel");
    assert_eq!(
        message(&mut client).await,
        json!({"channel": channel, "message": "from the mesh"})
    );
    for publisher in &plain.publishers {
        publisher.publish(&channel, "from outside").await;
        assert_eq!(
            message(&mut client).await,
            json!({"channel": channel, "message": "from outside"})
        );
    }
    let mut late = RawClient::connect(&b.url()).await;
    assert_eq!(
        call(
            &mut late,
            1,
            "mesh/subscribe-channel",
            json!({"channel": channel, "historyLimit": 1,
                   "since": {"epoch": "any", "offset": 0}})
        )
        .await,
        json!({"success": true, "history": ["from the mesh"], "recovered": false})
    );
    assert_eq!(
        call(
            &mut late,
            2,
            "mesh/get-channel-history",
            json!({"channel": channel, "limit": 1, "since": 0})
        )
        .await,
        json!({"success": true, "history": ["from the mesh"], "recovered": false})
    );
}

async fn oversize_outside_messages_are_not_delivered(backend: Backend) {
    let plain = Plain::new(backend).await;
    const LONGEST: usize = 16;
    let server = serve(plain.builder().max_channel_message_bytes(LONGEST)).await;
    let channel = plain.channel(true, "alerts");
    let mut client = subscribed(&server, &channel).await;
    let dropped_before = server.mesh.stats().dropped_channel_messages;
    assert_eq!(plain.subscribers(&channel).await, 1);

    let oversize = "x".repeat(LONGEST + 1);
    let fits = "y".repeat(LONGEST);
    for (published, publisher) in (1..).zip(&plain.publishers) {
        let reached = publisher.publish(&channel, oversize.as_str()).await;
        if !plain.on_cluster() {
            assert_eq!(reached, 1);
            for frames in pushes_before_marker(&server.mesh, "marker", &mut [&mut client]).await {
                assert!(pushes_named(&frames, MESSAGE).is_empty(), "{frames:?}");
            }
            assert_eq!(
                server.mesh.stats().dropped_channel_messages,
                dropped_before + published
            );
        }
        // One at the limit is delivered. From the same node on the same channel it
        // arrives after the oversize one, so the first message the client gets shows
        // that the oversize one reached nobody (on a Cluster too), and by then it has been
        // counted.
        publisher.publish(&channel, fits.as_str()).await;
        assert_eq!(
            message(&mut client).await,
            json!({"channel": channel, "message": fits})
        );
        assert_eq!(
            server.mesh.stats().dropped_channel_messages,
            dropped_before + published
        );
    }
}

#[test]
fn plain_channels_need_a_key_prefix() {
    let built = RedisBackend::builder("redis://127.0.0.1:6379")
        .prefix("")
        .plain_channels("ext:orders")
        .build();
    assert!(built.is_err());
    assert!(RedisBackend::builder("redis://127.0.0.1:6379")
        .prefix("")
        .build()
        .is_ok());
}
