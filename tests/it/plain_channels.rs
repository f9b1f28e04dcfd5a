//! Plain Redis channels (issue 15): with `RedisBackendBuilder::plain_channels`, channels
//! whose names match are plain Redis channels. A separate raw Redis client (the `redis`
//! crate, its own connections) publishes on the channel's own name and appends to its
//! history list, and subscribes to what the mesh writes; text published on the engine's
//! own (prefixed) channels injects nothing; a channel that is not plain works as before;
//! outside messages over `max_channel_message_bytes` reach nobody. Clients see plain
//! channels exactly as any other, on either backend.
//!
//! Every test runs its meshes under a key prefix of its own, and names its plain
//! channels after that prefix: plain channel names are not prefixed, and the suites
//! share one Redis. "Nothing arrived" is shown without sleeping: after the outside
//! publish, the server broadcasts a marker, which reaches each client after whatever its
//! instance received before it on its one pub/sub connection.
//!
//! Redis Cluster is not covered: the backend targets a single Redis so far. The Cluster
//! step should run the outside-publisher tests against a Cluster too, publishing with a
//! plain `PUBLISH` on a node other than the subscribers' (see the backend's module docs).

use futures_util::StreamExt;
use serde_json::{json, Value};
use tower_mesh::{Access, Mesh, MeshBuilder, RedisBackend, Regex};

use crate::common::*;

conformance!(plain_channels_look_like_any_other_to_clients);

const MESSAGE: &str = "mesh/subscription-message";

/// A Redis-backed test mesh whose `ext:` channels are plain, and a raw client beside it.
struct Plain {
    url: String,
    prefix: String,
    /// The outside process's connection: none of the mesh's.
    outside: ::redis::aio::MultiplexedConnection,
}

impl Plain {
    async fn new() -> Self {
        let Backend::Redis { url, prefix } = Backend::redis() else {
            unreachable!("Backend::redis() is a Redis backend")
        };
        let outside = ::redis::Client::open(url.as_str())
            .expect("a valid Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("a raw Redis connection");
        Plain {
            url,
            prefix,
            outside,
        }
    }

    /// A builder for one more instance of the mesh: `ext:` channels plain, every channel
    /// exposed.
    fn builder(&self) -> MeshBuilder {
        plain_builder(&self.url, &self.prefix).expose_channel(everything(), Access::open())
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

    fn redis(&self) -> ::redis::aio::MultiplexedConnection {
        self.outside.clone()
    }

    /// `PUBLISH channel payload` from outside the mesh; how many subscribers got it.
    async fn publish(&self, channel: &str, payload: impl ::redis::ToRedisArgs) -> i64 {
        ::redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.redis())
            .await
            .expect("PUBLISH")
    }

    /// `LPUSH` from outside the mesh, oldest first: the last is the newest.
    async fn lpush(&self, key: &str, messages: &[&str]) {
        let _: i64 = ::redis::cmd("LPUSH")
            .arg(key)
            .arg(messages)
            .query_async(&mut self.redis())
            .await
            .expect("LPUSH");
    }

    async fn lrange(&self, key: &str) -> Vec<String> {
        ::redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut self.redis())
            .await
            .expect("LRANGE")
    }

    async fn get(&self, key: &str) -> Option<String> {
        ::redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.redis())
            .await
            .expect("GET")
    }
}

fn plain_builder(url: &str, prefix: &str) -> MeshBuilder {
    plain_mesh(RedisBackend::builder(url).prefix(prefix))
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
    let mut client = subscribed(&a, &channel).await;
    for n in 1..=3 {
        b.mesh
            .write_channel(&channel, &format!("message {n}"), 2)
            .await
            .expect("write_channel");
        assert_eq!(
            message(&mut client).await,
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
        call(
            &mut late,
            1,
            "mesh/subscribe-channel",
            json!({"channel": channel, "historyLimit": 1})
        )
        .await,
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
        message(&mut late).await,
        json!({"channel": channel, "message": "after"})
    );
    for frames in pushes_before_marker(&a.mesh, "marker", &mut [&mut client]).await {
        assert!(pushes_named(&frames, MESSAGE).is_empty(), "{frames:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_publish_reaches_subscribers_on_every_instance() {
    let plain = Plain::new().await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let channel = plain.channel(true, "notifications");
    let mut on_a = subscribed(&a, &channel).await;
    let mut on_b = subscribed(&b, &channel).await;

    // One subscription per instance, on the channel's own name.
    let text = r#"{"kind":"deploy","id":7}"#;
    assert_eq!(plain.publish(&channel, text).await, 2);
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            message(client).await,
            json!({"channel": channel, "message": text})
        );
    }
    // Any text is a message; it is not parsed.
    assert_eq!(plain.publish(&channel, "not json").await, 2);
    assert_eq!(
        message(&mut on_a).await,
        json!({"channel": channel, "message": "not json"})
    );

    // Once nobody on an instance listens, it unsubscribes from the channel.
    call(
        &mut on_b,
        2,
        "mesh/unsubscribe-channel",
        json!({"channel": channel}),
    )
    .await;
    // The unsubscribe is applied in order by the instance's subscriber: wait for it.
    within("the instance to unsubscribe", async {
        while plain.publish(&channel, "probe").await != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    for frames in pushes_before_marker(&b.mesh, "marker", &mut [&mut on_b]).await {
        assert!(pushes_named(&frames, MESSAGE).is_empty(), "{frames:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_write_reaches_outside_subscribers_and_the_list() {
    let plain = Plain::new().await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let channel = plain.channel(true, "orders");
    let mut client = subscribed(&b, &channel).await;

    let mut outside = ::redis::Client::open(plain.url.as_str())
        .expect("a valid Redis URL")
        .get_async_pubsub()
        .await
        .expect("a raw pub/sub connection");
    outside.subscribe(&channel).await.expect("SUBSCRIBE");
    let mut outside = outside.into_on_message();

    a.mesh
        .write_channel(&channel, r#"{"id":1}"#, 10)
        .await
        .expect("write_channel");
    let received = within("the outside subscriber's message", outside.next())
        .await
        .expect("a message");
    assert_eq!(received.get_channel_name(), channel);
    assert_eq!(received.get_payload_bytes(), br#"{"id":1}"#);
    assert_eq!(
        message(&mut client).await,
        json!({"channel": channel, "message": r#"{"id":1}"#})
    );
    assert_eq!(
        plain.lrange(&plain.history_key(&channel)).await,
        [r#"{"id":1}"#]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_history_is_read_newest_first_and_bounded() {
    let plain = Plain::new().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_bytes_count_what_outsiders_appended() {
    let plain = Plain::new().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_text_on_the_engines_channels_injects_nothing() {
    let plain = Plain::new().await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let plain_channel = plain.channel(true, "feed");
    let other_channel = plain.channel(false, "feed");
    let mut client = subscribed(&a, &plain_channel).await;
    assert_eq!(
        subscribe(&mut client, 2, &other_channel).await,
        json!({"success": true, "history": []})
    );
    let p = &plain.prefix;
    let frame =
        r#"{"command":"mesh/subscription-message","payload":{"channel":"x","message":"y"}}"#;
    for target in [
        format!("{p}broadcast"),
        format!("{p}instance:{{{}}}", a.mesh.instance_id()),
        format!("{p}topic:channel:{{{plain_channel}}}"),
        format!("{p}topic:channel:{{{other_channel}}}"),
    ] {
        // A rendered frame, and text shaped like an envelope's tag and length.
        plain.publish(&target, frame).await;
        plain
            .publish(&target, "b\u{4}\0\0\0ping\u{2}\0\0\0{}")
            .await;
        plain.publish(&target, vec![0xffu8, 0xfe]).await;
    }
    // Not UTF-8: no message, on a plain channel either.
    plain.publish(&plain_channel, vec![0xffu8, 0xfe]).await;
    // A plain pattern never reaches under the prefix, whatever it matches.
    let everything_plain = serve(
        Mesh::builder()
            .redis_backend(
                RedisBackend::builder(plain.url.as_str())
                    .prefix(p.as_str())
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
        message(&mut client).await,
        json!({"channel": other_channel, "message": "still enveloped"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_is_not_plain_works_as_before() {
    let plain = Plain::new().await;
    let a = serve(plain.builder()).await;
    let b = serve(plain.builder()).await;
    let channel = plain.channel(false, "news");
    let mut client = subscribed(&a, &channel).await;
    // Nobody subscribes to its bare name: an outside publish there reaches nobody.
    assert_eq!(plain.publish(&channel, "hello").await, 0);
    b.mesh
        .write_channel(&channel, "from the mesh", 10)
        .await
        .expect("write_channel");
    assert_eq!(
        message(&mut client).await,
        json!({"channel": channel, "message": "from the mesh"})
    );
    assert_eq!(
        plain.lrange(&plain.history_key(&channel)).await,
        ["from the mesh"]
    );
    // Its history keeps no length mark: only plain channels need one.
    let length_key = format!("{}history-length:{{{channel}}}", plain.prefix);
    assert_eq!(plain.get(&length_key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_outside_messages_are_not_delivered() {
    let plain = Plain::new().await;
    const LONGEST: usize = 16;
    let server = serve(plain.builder().max_channel_message_bytes(LONGEST)).await;
    let channel = plain.channel(true, "alerts");
    let mut client = subscribed(&server, &channel).await;
    let dropped_before = server.mesh.stats().dropped_channel_messages;

    assert_eq!(plain.publish(&channel, "x".repeat(LONGEST + 1)).await, 1);
    for frames in pushes_before_marker(&server.mesh, "marker", &mut [&mut client]).await {
        assert!(pushes_named(&frames, MESSAGE).is_empty(), "{frames:?}");
    }
    assert_eq!(
        server.mesh.stats().dropped_channel_messages,
        dropped_before + 1
    );
    // One at the limit is delivered.
    let fits = "y".repeat(LONGEST);
    plain.publish(&channel, fits.as_str()).await;
    assert_eq!(
        message(&mut client).await,
        json!({"channel": channel, "message": fits})
    );
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
