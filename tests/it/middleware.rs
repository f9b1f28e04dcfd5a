//! Commands are tower services and middleware are tower layers (issue 2, items 5 and 6),
//! and the extractors a handler can ask for, on every backend.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tower::limit::ConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;
use tower::ServiceBuilder;
use tower_mesh::command::{handler_service, FromFnLayer};
use tower_mesh::extract::{Connection, Extension, Payload, State};
use tower_mesh::{from_fn, BoxError, CommandError, CommandRequest, Mesh, Next};

use crate::common::*;

conformance!(
    timeout_layer_answers_etimeout_and_the_connection_keeps_serving,
    concurrency_limit_layer_holds_across_connections,
    load_shed_over_a_limit_answers_eoverloaded,
    global_layer_wraps_builtin_commands,
    unknown_commands_never_reach_middleware,
    layers_run_global_then_command_then_handler,
    command_layer_wraps_a_builtin,
    panicking_handler_fails_only_its_command,
    panicking_extractor_fails_only_its_command,
    command_service_accepts_a_hand_written_service,
    typed_payload_extractor,
    connection_extractor_sees_the_upgrade_request,
    state_extractor,
    middleware_extension_reaches_the_handler,
    http_middleware_extension_reaches_the_handler,
    middleware_can_rewrite_payload_and_reply,
);

async fn timeout_layer_answers_etimeout_and_the_connection_keeps_serving(backend: Backend) {
    let builder = backend
        .builder()
        .command("echo", echo)
        .command("slow", || async { std::future::pending::<Value>().await })
        .command_layer("slow", TimeoutLayer::new(Duration::from_millis(750)));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_json(json!({"id": 1, "command": "slow", "payload": {}}))
        .await;
    // While `slow` hangs (its timeout is far longer than an echo takes), the connection
    // keeps serving: the echo sent after it is answered first.
    assert_echo_is_next(&mut client, 2).await;
    assert_eq!(
        client.next().await,
        json!({"id": 1, "command": "slow", "payload": {
            "error": "Command timed out", "code": "ETIMEOUT", "name": "CommandError"}})
    );
    // The connection keeps serving, and the timed-out handler is gone for good.
    assert_echo_is_next(&mut client, 3).await;
}

/// A handler that records how many of its calls run at once, at most.
#[derive(Clone, Default)]
struct Gauge {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Gauge {
    async fn work(self) -> Value {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Simulated work, long enough for concurrent calls to overlap were they allowed to.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        json!("done")
    }
}

async fn concurrency_limit_layer_holds_across_connections(backend: Backend) {
    let gauge = Gauge::default();
    let handler_gauge = gauge.clone();
    let builder = backend
        .builder()
        .command("limited", move || handler_gauge.clone().work())
        .command_layer("limited", ConcurrencyLimitLayer::new(1));
    let server = serve(builder).await;
    let mut a = RawClient::connect(&server.url()).await;
    let mut b = RawClient::connect(&server.url()).await;
    for id in 1..=4 {
        for client in [&mut a, &mut b] {
            client
                .send_json(json!({"id": id, "command": "limited", "payload": {}}))
                .await;
        }
    }
    // Replies may come in any order: collect four per connection.
    for client in [&mut a, &mut b] {
        let mut replies = Vec::new();
        for _ in 1..=4 {
            replies.push(client.next().await);
        }
        replies.sort_by_key(|frame| frame["id"].as_u64());
        let expected: Vec<Value> = (1..=4)
            .map(|id| json!({"id": id, "command": "limited", "payload": "done"}))
            .collect();
        assert_eq!(replies, expected);
    }
    assert_eq!(gauge.calls.load(Ordering::SeqCst), 8);
    assert_eq!(gauge.most.load(Ordering::SeqCst), 1);
}

async fn load_shed_over_a_limit_answers_eoverloaded(backend: Backend) {
    let release = Arc::new(Notify::new());
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let handler_release = release.clone();
    let builder = backend
        .builder()
        .command("echo", echo)
        .command("busy", move || {
            let (release, started_tx) = (handler_release.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(());
                release.notified().await;
                json!("finished")
            }
        })
        // First added is outermost: the shedder sees the limit's readiness.
        .command_layer("busy", LoadShedLayer::new())
        .command_layer("busy", ConcurrencyLimitLayer::new(1));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_json(json!({"id": 1, "command": "busy", "payload": {}}))
        .await;
    recv_within(&mut started).await;
    assert_eq!(
        client.command(2, "busy", json!({})).await,
        json!({"id": 2, "command": "busy", "payload": {
            "error": "Server overloaded, try again later", "code": "EOVERLOADED", "name": "CommandError"}})
    );
    release.notify_one();
    assert_eq!(client.reply(1).await["payload"], "finished");
    assert_echo_is_next(&mut client, 3).await;
}

async fn global_layer_wraps_builtin_commands(backend: Backend) {
    let builder = backend.builder().command("echo", echo).layer(from_fn(
        |request: CommandRequest, next: Next| async move {
            if request.command() == "mesh/noop" {
                return Err(CommandError::forbidden("noop is not allowed here"));
            }
            next.run(request).await
        },
    ));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":1,"command":"mesh/noop","payload":{}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":1,"command":"mesh/noop","payload":{"error":"noop is not allowed here","code":"EFORBIDDEN","name":"CommandError"}}"#
    );
    // Everything else passes through the same layer.
    assert_echo_is_next(&mut client, 2).await;
    assert_eq!(
        client
            .command(3, "mesh/get-my-connection-metadata", json!({}))
            .await["payload"],
        json!({"metadata": null})
    );
}

async fn unknown_commands_never_reach_middleware(backend: Backend) {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let layer_seen = seen.clone();
    let builder = backend.builder().command("echo", echo).layer(from_fn(
        move |request: CommandRequest, next: Next| {
            let seen = layer_seen.clone();
            async move {
                seen.lock().unwrap().push(request.command().to_owned());
                next.run(request).await
            }
        },
    ));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "nope", json!({})).await["payload"]["code"],
        "ENOTFOUND"
    );
    assert_echo_is_next(&mut client, 2).await;
    assert_eq!(*seen.lock().unwrap(), vec!["echo".to_owned()]);
}

type Log = Arc<Mutex<Vec<String>>>;
type Reply = Pin<Box<dyn Future<Output = Result<Value, CommandError>> + Send>>;

/// A `from_fn` layer that logs `name` before and `name after` after the rest of the stack.
fn recorder(
    log: &Log,
    name: &'static str,
) -> FromFnLayer<impl Fn(CommandRequest, Next) -> Reply + Clone + Send + Sync + 'static> {
    let log = log.clone();
    from_fn(move |request: CommandRequest, next: Next| -> Reply {
        let log = log.clone();
        Box::pin(async move {
            log.lock().unwrap().push(name.to_owned());
            let result = next.run(request).await;
            log.lock().unwrap().push(format!("{name} after"));
            result
        })
    })
}

async fn layers_run_global_then_command_then_handler(backend: Backend) {
    let log: Log = Arc::default();
    let handler_log = log.clone();
    // Added in a scrambled order on purpose: command layers before global ones.
    let builder = backend
        .builder()
        .command_layer("ordered", recorder(&log, "command 1"))
        .layer(recorder(&log, "global 1"))
        .command("ordered", move || {
            let log = handler_log.clone();
            async move {
                log.lock().unwrap().push("handler".to_owned());
                json!("ok")
            }
        })
        .command_layer("ordered", recorder(&log, "command 2"))
        .layer(recorder(&log, "global 2"));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "ordered", json!({})).await,
        json!({"id": 1, "command": "ordered", "payload": "ok"})
    );
    assert_eq!(
        *log.lock().unwrap(),
        [
            "global 1",
            "global 2",
            "command 1",
            "command 2",
            "handler",
            "command 2 after",
            "command 1 after",
            "global 2 after",
            "global 1 after",
        ]
    );
}

async fn command_layer_wraps_a_builtin(backend: Backend) {
    let log: Log = Arc::default();
    let builder = backend
        .builder()
        .command("echo", echo)
        .command_layer("mesh/noop", recorder(&log, "noop layer"));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "mesh/noop", json!({})).await["payload"],
        true
    );
    assert_echo_is_next(&mut client, 2).await;
    assert_eq!(*log.lock().unwrap(), ["noop layer", "noop layer after"]);
}

/// An extractor that panics while the handler is being called, before its future exists.
struct Exploding;

impl tower_mesh::extract::FromCommandRequest for Exploding {
    type Rejection = CommandError;

    fn from_command_request(_: CommandRequest) -> Result<Self, CommandError> {
        panic!("extractor panic detail");
    }
}

async fn panicking_extractor_fails_only_its_command(backend: Backend) {
    let builder = backend
        .builder()
        .command("echo", echo)
        .command("boom", |_: Exploding| async { json!("unreachable") });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_text(r#"{"id":1,"command":"boom","payload":{}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":1,"command":"boom","payload":{"error":"internal server error","code":"ESERVER","name":"Error"}}"#
    );
    assert_echo_is_next(&mut client, 2).await;
}

async fn panicking_handler_fails_only_its_command(backend: Backend) {
    let release = Arc::new(Notify::new());
    let handler_release = release.clone();
    let builder = backend
        .builder()
        .command("echo", echo)
        .command("boom", |Payload(p): Payload<Value>| async move {
            if p["spare"] != true {
                panic!("secret panic detail");
            }
            json!("spared")
        })
        .command("wait", move || {
            let release = handler_release.clone();
            async move {
                release.notified().await;
                json!("waited")
            }
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut other = RawClient::connect(&server.url()).await;
    // A command of the same connection is in flight while the handler panics.
    client
        .send_json(json!({"id": 1, "command": "wait", "payload": {}}))
        .await;
    client
        .send_text(r#"{"id":2,"command":"boom","payload":{}}"#)
        .await;
    assert_eq!(
        client.next_text().await,
        r#"{"id":2,"command":"boom","payload":{"error":"internal server error","code":"ESERVER","name":"Error"}}"#
    );
    release.notify_one();
    assert_eq!(
        client.next().await,
        json!({"id": 1, "command": "wait", "payload": "waited"})
    );
    assert_echo_is_next(&mut client, 3).await;
    // It can panic again, and nobody else noticed.
    assert_eq!(
        client.command(4, "boom", json!({})).await["payload"]["code"],
        "ESERVER"
    );
    assert_echo_is_next(&mut other, 5).await;
    assert_eq!(server.mesh.connections().len(), 2);
}

async fn command_service_accepts_a_hand_written_service(backend: Backend) {
    let service = tower::service_fn(|request: CommandRequest| async move {
        if request.payload()["fail"] == true {
            return Err::<Value, BoxError>("service said no".into());
        }
        Ok(json!({
            "command": request.command(),
            "payload": request.payload(),
            "connection": request.connection().id(),
        }))
    });
    // A handler wrapped in layers by hand, with tower's ServiceBuilder.
    let composed = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(50)))
        .service(handler_service(|| async {
            std::future::pending::<Value>().await
        }));
    let builder = backend
        .builder()
        .command("echo", echo)
        .command_service("raw", service)
        .command_service("composed", composed);
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "raw", json!({"x": 1})).await,
        json!({"id": 1, "command": "raw", "payload": {
            "command": "raw", "payload": {"x": 1}, "connection": client.id}})
    );
    assert_eq!(
        client.command(2, "raw", json!({"fail": true})).await["payload"],
        json!({"error": "service said no", "code": "ESERVER", "name": "Error"})
    );
    assert_eq!(
        client.command(3, "composed", json!({})).await["payload"]["code"],
        "ETIMEOUT"
    );
    assert_echo_is_next(&mut client, 4).await;
}

#[derive(Debug, Deserialize)]
struct Order {
    item: String,
    quantity: u32,
    #[serde(default)]
    note: Option<String>,
    address: Address,
}

#[derive(Debug, Deserialize)]
struct Address {
    city: String,
}

async fn typed_payload_extractor(backend: Backend) {
    let builder = backend
        .builder()
        .command("order", |Payload(order): Payload<Order>| async move {
            json!({
                "summary": format!("{} x{} to {}", order.item, order.quantity, order.address.city),
                "note": order.note,
            })
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client
            .command(
                1,
                "order",
                json!({"item": "tea", "quantity": 3, "address": {"city": "Oslo"}, "extra": true})
            )
            .await["payload"],
        json!({"summary": "tea x3 to Oslo", "note": null})
    );
    let bad = client
        .command(
            2,
            "order",
            json!({"item": "tea", "quantity": -1, "address": {"city": "Oslo"}}),
        )
        .await;
    assert_eq!(bad["payload"]["code"], "EINVALID");
    let bad = client
        .command(3, "order", json!({"item": "tea", "quantity": 1}))
        .await;
    assert_eq!(bad["payload"]["code"], "EINVALID");
    let message = bad["payload"]["error"].as_str().unwrap_or_default();
    assert!(message.contains("address"), "{message}");
}

async fn connection_extractor_sees_the_upgrade_request(backend: Backend) {
    let builder =
        backend
            .builder()
            .command("whoami", |connection: Connection, mesh: Mesh| async move {
                json!({
                    "id": connection.id(),
                    "path": connection.uri().path(),
                    "query": connection.uri().query(),
                    "agent": connection.headers().get("x-agent").and_then(|v| v.to_str().ok()),
                    "method": connection.request_parts().method.as_str(),
                    "local": mesh.connection(connection.id()).is_some(),
                })
            });
    let server = serve(builder).await;
    let request = ws_request(
        &server.ws_url("/?room=7&user=ann"),
        &[("x-agent", "conformance")],
    );
    let mut client = RawClient::connect_request(request).await;
    assert_eq!(
        client.command(1, "whoami", json!({})).await["payload"],
        json!({
            "id": client.id,
            "path": "/",
            "query": "room=7&user=ann",
            "agent": "conformance",
            "method": "GET",
            "local": true,
        })
    );
    // Another connection has its own request.
    let mut plain = RawClient::connect(&server.url()).await;
    let reply = plain.command(2, "whoami", json!({})).await["payload"].clone();
    assert_eq!(reply["query"], Value::Null);
    assert_eq!(reply["agent"], Value::Null);
    assert_eq!(reply["id"], json!(plain.id));
}

#[derive(Clone)]
struct AppState {
    greeting: &'static str,
    hits: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct NeverRegistered;

async fn state_extractor(backend: Backend) {
    let hits = Arc::new(AtomicUsize::new(0));
    let builder = backend
        .builder()
        .state(AppState {
            greeting: "hello",
            hits: hits.clone(),
        })
        .command("greet", |State(state): State<AppState>| async move {
            let n = state.hits.fetch_add(1, Ordering::SeqCst) + 1;
            json!(format!("{} #{n}", state.greeting))
        })
        .command("unregistered", |State(_): State<NeverRegistered>| async {
            json!("ran")
        });
    let server = serve(builder).await;
    let mut a = RawClient::connect(&server.url()).await;
    let mut b = RawClient::connect(&server.url()).await;
    assert_eq!(
        a.command(1, "greet", json!({})).await["payload"],
        "hello #1"
    );
    // One shared value across connections.
    assert_eq!(
        b.command(2, "greet", json!({})).await["payload"],
        "hello #2"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        server.mesh.state::<AppState>().map(|s| s.greeting),
        Some("hello")
    );
    // A state type never registered is a server error, and the handler does not run.
    assert_eq!(
        a.command(3, "unregistered", json!({})).await["payload"]["code"],
        "ESERVER"
    );
}

#[derive(Clone, Debug)]
struct Tag(&'static str);

async fn middleware_extension_reaches_the_handler(backend: Backend) {
    let builder = backend
        .builder()
        .layer(from_fn(
            |mut request: CommandRequest, next: Next| async move {
                let tag = if request.command() == "tagged" {
                    "from global middleware"
                } else {
                    "other"
                };
                request.extensions_mut().insert(Tag(tag));
                next.run(request).await
            },
        ))
        .command_layer(
            "tagged",
            from_fn(|mut request: CommandRequest, next: Next| async move {
                // A later layer sees what an earlier one left, and may build on it.
                let seen = request.extensions().get::<Tag>().map(|t| t.0);
                assert_eq!(seen, Some("from global middleware"));
                request
                    .extensions_mut()
                    .insert(User("set by a layer".into()));
                next.run(request).await
            }),
        )
        .command(
            "tagged",
            |Extension(tag): Extension<Tag>, Extension(user): Extension<User>| async move {
                json!([tag.0, user.0])
            },
        )
        .command("untagged", |Extension(user): Extension<User>| async move {
            json!(user.0)
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "tagged", json!({})).await["payload"],
        json!(["from global middleware", "set by a layer"])
    );
    // Extensions are per command: nothing leaks into the next one, so a missing
    // extension is a server error.
    assert_eq!(
        client.command(2, "untagged", json!({})).await["payload"]["code"],
        "ESERVER"
    );
}

async fn http_middleware_extension_reaches_the_handler(backend: Backend) {
    let (mesh_layer, mesh) = backend
        .builder()
        .command("whoami", |Extension(user): Extension<User>| async move {
            json!(user.0)
        })
        .command_layer(
            "override",
            from_fn(|mut request: CommandRequest, next: Next| async move {
                request.extensions_mut().insert(User("layer wins".into()));
                next.run(request).await
            }),
        )
        .command("override", |Extension(user): Extension<User>| async move {
            json!(user.0)
        })
        .build();
    // The HTTP middleware is outside the mesh layer: it sees the upgrade request first.
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .layer(mesh_layer)
        .layer(axum::middleware::from_fn(insert_user));
    let server = serve_app(mesh, app).await;
    let mut ann = RawClient::connect_request(ws_request(&server.url(), &[("x-user", "ann")])).await;
    let mut anonymous = RawClient::connect(&server.url()).await;
    assert_eq!(ann.command(1, "whoami", json!({})).await["payload"], "ann");
    assert_eq!(
        anonymous.command(2, "whoami", json!({})).await["payload"],
        "anonymous"
    );
    // A command's own extensions come before the upgrade request's.
    assert_eq!(
        ann.command(3, "override", json!({})).await["payload"],
        "layer wins"
    );
    // The extension stays with the connection for every later command.
    assert_eq!(ann.command(4, "whoami", json!({})).await["payload"], "ann");
}

async fn middleware_can_rewrite_payload_and_reply(backend: Backend) {
    let builder = backend.builder().command("echo", echo).command_layer(
        "echo",
        from_fn(|mut request: CommandRequest, next: Next| async move {
            if let Some(text) = request.payload().as_str() {
                *request.payload_mut() = json!(text.trim().to_lowercase());
            }
            let reply = next.run(request).await?;
            Ok(json!({"wrapped": reply}))
        }),
    );
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "echo", json!("  HeLLo ")).await,
        json!({"id": 1, "command": "echo", "payload": {"wrapped": "hello"}})
    );
    assert_eq!(
        client.command(2, "echo", json!([1])).await["payload"],
        json!({"wrapped": [1]})
    );
}
