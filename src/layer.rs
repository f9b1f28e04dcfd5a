//! `MeshLayer` and `MeshService`: mesh mounted on any tower HTTP service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use pin_project::pin_project;
use tower::{Layer, Service};

use crate::mesh::Mesh;
use crate::upgrade::{self, Upgrade};

/// A tower `Layer` that serves mesh on its path and passes every other request through.
///
/// Requests to the configured path that ask for a WebSocket upgrade are answered here
/// (`101`, or `400` with a reason when the upgrade request is malformed); the socket is
/// then handed to the engine. Everything else reaches the inner service untouched. Layers
/// outside this one (auth, timeouts, tracing) see the upgrade request first and may refuse
/// it before any WebSocket exists.
#[derive(Clone, Debug)]
pub struct MeshLayer {
    mesh: Mesh,
}

impl MeshLayer {
    pub(crate) fn new(mesh: Mesh) -> Self {
        MeshLayer { mesh }
    }
}

impl<S> Layer<S> for MeshLayer {
    type Service = MeshService<S>;

    fn layer(&self, inner: S) -> MeshService<S> {
        MeshService {
            inner,
            mesh: self.mesh.clone(),
        }
    }
}

/// The service [`MeshLayer`] produces around an inner HTTP service `S`.
#[derive(Clone, Debug)]
pub struct MeshService<S> {
    inner: S,
    mesh: Mesh,
}

/// The response body of [`MeshService`]: the inner service's body, or mesh's own short
/// body for the handshake answers.
pub type MeshBody<B> = Either<B, Full<Bytes>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for MeshService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<MeshBody<ResBody>>;
    type Error = S::Error;
    type Future = MeshFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if request.uri().path() != self.mesh.config().path {
            return self.call_inner(request);
        }
        match upgrade::classify(&request) {
            Upgrade::NotRequested => self.call_inner(request),
            Upgrade::Malformed(reason) => MeshFuture::Ready(Some(upgrade::bad_request(reason))),
            Upgrade::Valid { accept_key } => {
                MeshFuture::Ready(Some(upgrade::accept(&self.mesh, request, accept_key)))
            }
        }
    }
}

impl<S> MeshService<S> {
    /// Passes a request on, with the `Mesh` handle in its extensions so that HTTP handlers
    /// behind the layer can reach the server-side API.
    fn call_inner<ReqBody, ResBody>(
        &mut self,
        mut request: Request<ReqBody>,
    ) -> MeshFuture<S::Future>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        request.extensions_mut().insert(self.mesh.clone());
        MeshFuture::Inner(self.inner.call(request))
    }
}

/// The future of [`MeshService`]: the inner service's, or an immediate handshake answer.
#[pin_project(project = MeshFutureProj)]
#[derive(Debug)]
pub enum MeshFuture<F> {
    /// The request went to the inner service.
    Inner(#[pin] F),
    /// Mesh answered the request itself.
    Ready(Option<Response<Full<Bytes>>>),
}

impl<F, B, E> Future for MeshFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<MeshBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            MeshFutureProj::Inner(fut) => fut
                .poll(cx)
                .map(|result| result.map(|response| response.map(Either::Left))),
            MeshFutureProj::Ready(response) => match response.take() {
                Some(response) => Poll::Ready(Ok(response.map(Either::Right))),
                // Polled again after completion: a contract violation by the caller;
                // answer rather than panic.
                None => Poll::Ready(Ok(
                    upgrade::server_error("polled after completion").map(Either::Right)
                )),
            },
        }
    }
}
