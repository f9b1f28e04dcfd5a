//! Commands and middleware are tower services and layers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::TimeoutLayer;
use tower_mesh::extract::{Extension, Payload, State};
use tower_mesh::{from_fn, CommandError, CommandRequest, Mesh, Next};

use crate::common::*;

#[tokio::test]
async fn a_timeout_layer_answers_etimeout_and_the_connection_keeps_serving() {
    let builder = Mesh::builder()
        .command("echo", echo)
        .command("slow", || async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            json!("too late")
        })
        .command_layer("slow", TimeoutLayer::new(Duration::from_millis(50)));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    client
        .send_json(json!({"id": 1, "command": "slow", "payload": {}}))
        .await;
    // Commands run concurrently: the echo sent after the slow command answers first.
    assert_eq!(
        client.command(2, "echo", json!("first")).await["payload"],
        "first"
    );
    let reply = client.reply(1).await;
    assert_eq!(
        reply["payload"],
        json!({"error": "Command timed out", "code": "ETIMEOUT", "name": "CommandError"})
    );
    assert_eq!(
        client.command(3, "echo", json!("after")).await["payload"],
        "after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_layer_holds_across_connections() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (running_in, most_in) = (running.clone(), most.clone());
    let builder = Mesh::builder()
        .command("limited", move || {
            let (running, most) = (running_in.clone(), most_in.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                json!("done")
            }
        })
        .command_layer("limited", ConcurrencyLimitLayer::new(1));
    let server = serve(builder).await;
    let mut a = RawClient::connect(&server.url()).await;
    let mut b = RawClient::connect(&server.url()).await;
    for id in 1..=3 {
        a.send_json(json!({"id": id, "command": "limited", "payload": {}}))
            .await;
        b.send_json(json!({"id": id, "command": "limited", "payload": {}}))
            .await;
    }
    for client in [&mut a, &mut b] {
        let replies = client.replies(3).await;
        for id in 1..=3u64 {
            assert_eq!(replies[&id]["payload"], "done");
        }
    }
    assert_eq!(most.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn global_layers_wrap_built_ins_and_run_before_command_layers() {
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = |label: &'static str, order: Arc<Mutex<Vec<String>>>| {
        from_fn(move |request: CommandRequest, next: Next| {
            let order = order.clone();
            async move {
                order
                    .lock()
                    .expect("lock")
                    .push(format!("{label}:{}", request.command()));
                next.run(request).await
            }
        })
    };
    let handler_order = order.clone();
    let builder = Mesh::builder()
        .command("work", move || {
            let order = handler_order.clone();
            async move {
                order.lock().expect("lock").push("handler".into());
                json!("worked")
            }
        })
        .layer(record("global-1", order.clone()))
        .layer(record("global-2", order.clone()))
        .command_layer("work", record("command", order.clone()))
        .layer(from_fn(|request: CommandRequest, next: Next| async move {
            if request.command() == "mesh/noop" {
                return Err(CommandError::forbidden("no noop for you"));
            }
            next.run(request).await
        }));
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    assert_eq!(
        client.command(1, "work", json!({})).await["payload"],
        "worked"
    );
    assert_eq!(
        *order.lock().expect("lock"),
        vec!["global-1:work", "global-2:work", "command:work", "handler"]
    );
    let refused = client.command(2, "mesh/noop", json!({})).await;
    assert_eq!(
        refused["payload"],
        json!({"error": "no noop for you", "code": "EFORBIDDEN", "name": "CommandError"})
    );
    // Unknown commands are answered before any layer runs.
    order.lock().expect("lock").clear();
    assert_eq!(
        client.command(3, "nope", json!({})).await["payload"]["code"],
        "ENOTFOUND"
    );
    assert!(order.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_command() {
    let builder = Mesh::builder()
        .command("echo", echo)
        .command("boom", || async {
            if true {
                panic!("handler bug");
            }
            json!(null)
        });
    let server = serve(builder).await;
    let mut client = RawClient::connect(&server.url()).await;
    let mut other = RawClient::connect(&server.url()).await;
    let reply = client.command(1, "boom", json!({})).await;
    assert_eq!(
        reply["payload"],
        json!({"error": "internal server error", "code": "ESERVER", "name": "Error"})
    );
    assert_eq!(
        client.command(2, "echo", json!("ok")).await["payload"],
        "ok"
    );
    assert_eq!(
        other.command(1, "echo", json!("fine")).await["payload"],
        "fine"
    );
}

#[tokio::test]
async fn a_plain_tower_service_is_a_command() {
    let service = tower::service_fn(|request: CommandRequest| async move {
        Ok::<_, std::convert::Infallible>(json!({
            "command": request.command(),
            "connection": request.connection().id(),
            "payload": request.payload(),
        }))
    });
    let server = serve(Mesh::builder().command_service("raw", service)).await;
    let mut client = RawClient::connect(&server.url()).await;
    let reply = client.command(1, "raw", json!([1])).await;
    assert_eq!(
        reply["payload"],
        json!({"command": "raw", "connection": client.id, "payload": [1]})
    );
}

#[derive(Clone)]
struct Greeting(&'static str);

#[derive(Clone)]
struct RequestTag(u32);

#[derive(serde::Deserialize)]
struct Point {
    x: i64,
    y: i64,
}

#[tokio::test]
async fn extractors_see_payload_state_and_both_kinds_of_extensions() {
    async fn whoami(
        Extension(user): Extension<User>,
        Extension(tag): Extension<RequestTag>,
        State(greeting): State<Greeting>,
        Payload(point): Payload<Point>,
    ) -> Value {
        json!({"text": format!("{} {}", greeting.0, user.0), "tag": tag.0, "sum": point.x + point.y})
    }
    let builder = Mesh::builder()
        .state(Greeting("hello"))
        .command("whoami", whoami)
        .layer(from_fn(
            |mut request: CommandRequest, next: Next| async move {
                request.extensions_mut().insert(RequestTag(7));
                next.run(request).await
            },
        ));
    // An HTTP layer in front of mesh puts the user in the upgrade request's extensions.
    let server = serve_wrapped(builder, |mesh_layer| {
        axum::Router::new()
            .layer(mesh_layer)
            .layer(axum::middleware::from_fn(
                |mut request: axum::extract::Request, next: axum::middleware::Next| async move {
                    request.extensions_mut().insert(User("ada".into()));
                    next.run(request).await
                },
            ))
    })
    .await;
    let mut client = RawClient::connect(&server.url()).await;
    let reply = client.command(1, "whoami", json!({"x": 2, "y": 3})).await;
    assert_eq!(
        reply["payload"],
        json!({"text": "hello ada", "tag": 7, "sum": 5})
    );
    let bad = client.command(2, "whoami", json!({"x": "two"})).await;
    assert_eq!(bad["payload"]["code"], "EINVALID");
}
