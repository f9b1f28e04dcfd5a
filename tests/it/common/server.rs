//! Mesh servers on free ports: the usual axum app, apps built around the mesh layer, and
//! instances that can be killed at once.

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tower_mesh::extract::Payload;
use tower_mesh::{Mesh, MeshBuilder};

use super::sorted;

/// A mesh served by axum on 127.0.0.1 with a free port.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) mesh: Mesh,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// `ws://` URL of the mesh endpoint at `path`.
    pub(crate) fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub(crate) fn url(&self) -> String {
        self.ws_url("/")
    }

    /// The ids of the connections this instance holds, sorted.
    pub(crate) fn connection_ids(&self) -> Vec<String> {
        sorted(
            self.mesh
                .connections()
                .iter()
                .map(|c| c.id().to_owned())
                .collect(),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `builder` at `/` beside `GET /health`, on a free port.
pub(crate) async fn serve(builder: MeshBuilder) -> TestServer {
    serve_router(builder, Router::new()).await
}

/// Serves `builder` layered on `router` (which gets `GET /health` added).
pub(crate) async fn serve_router(builder: MeshBuilder, router: Router) -> TestServer {
    serve_wrapped(builder, |mesh_layer| {
        router
            .route("/health", get(|| async { "ok" }))
            .layer(mesh_layer)
    })
    .await
}

/// Serves the app `make_app` builds around the mesh layer (so HTTP layers can go outside it).
pub(crate) async fn serve_wrapped(
    builder: MeshBuilder,
    make_app: impl FnOnce(tower_mesh::MeshLayer) -> Router,
) -> TestServer {
    let (layer, mesh) = builder.build();
    serve_app(mesh, make_app(layer)).await
}

/// Serves a fully assembled axum app (for example one with HTTP middleware *outside* the
/// mesh layer) on a free port. `mesh` is the handle from the same `build()`.
pub(crate) async fn serve_app(mesh: Mesh, app: Router) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    TestServer { addr, mesh, task }
}

/// `echo`: replies with its payload. Most suites register it under the name `echo`.
pub(crate) async fn echo(Payload(payload): Payload<Value>) -> Value {
    payload
}

/// Who made the upgrade request: [`insert_user`] puts it in the request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct User(pub(crate) String);

/// HTTP middleware: the `x-user` header (`anonymous` without one) as a [`User`] in the
/// request's extensions.
pub(crate) async fn insert_user(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let name = request
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned();
    request.extensions_mut().insert(User(name));
    next.run(request).await
}

/// A mesh instance on a runtime of its own, killed at once with `shutdown_background`:
/// every task is dropped without cleanup, as when its process is SIGKILLed. No `Mesh`
/// handle of it outlives the runtime.
pub(crate) struct DoomedInstance {
    runtime: Option<tokio::runtime::Runtime>,
    pub(crate) url: String,
}

impl DoomedInstance {
    pub(crate) async fn start(builder: MeshBuilder) -> DoomedInstance {
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let url = runtime.block_on(async {
                let (layer, _mesh) = builder.build();
                let app = Router::new().layer(layer);
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
        })
        .await
        .expect("doomed instance")
    }

    pub(crate) async fn kill(mut self) {
        let runtime = self.runtime.take();
        tokio::task::spawn_blocking(move || {
            if let Some(runtime) = runtime {
                runtime.shutdown_background();
            }
        })
        .await
        .expect("kill");
    }
}
