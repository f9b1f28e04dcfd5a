//! `from_fn`: a one-off async middleware without writing a `Layer` by hand.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde_json::Value;
use tower::{Layer, Service, ServiceExt};

use super::{CommandRequest, CommandService};
use crate::error::{BoxError, CommandError};

/// The rest of the stack after a `from_fn` middleware: call [`Next::run`] to go on.
pub struct Next {
    inner: CommandService,
}

impl Next {
    /// Runs the remaining layers and the handler.
    pub async fn run(self, request: CommandRequest) -> Result<Value, CommandError> {
        self.inner
            .oneshot(request)
            .await
            .map_err(CommandError::from_box)
    }
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next").finish_non_exhaustive()
    }
}

/// Makes a middleware layer from an async function `(CommandRequest, Next) -> Result<Value, CommandError>`.
///
/// ```
/// use tower_mesh::{from_fn, CommandError, Mesh};
///
/// let guard = from_fn(|request: tower_mesh::CommandRequest, next: tower_mesh::Next| async move {
///     if request.command() == "mesh/join-room" && request.payload()["roomName"] == "admin" {
///         return Err(CommandError::forbidden("admins only"));
///     }
///     next.run(request).await
/// });
/// let (_layer, _mesh) = Mesh::builder().layer(guard).build();
/// ```
pub fn from_fn<F, Fut>(f: F) -> FromFnLayer<F>
where
    F: Fn(CommandRequest, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, CommandError>> + Send + 'static,
{
    FromFnLayer { f }
}

/// The layer [`from_fn`] returns.
#[derive(Clone, Debug)]
pub struct FromFnLayer<F> {
    f: F,
}

impl<F: Clone> Layer<CommandService> for FromFnLayer<F> {
    type Service = FromFn<F>;

    fn layer(&self, inner: CommandService) -> FromFn<F> {
        FromFn {
            f: self.f.clone(),
            inner,
        }
    }
}

/// The service [`FromFnLayer`] produces.
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
    inner: CommandService,
}

impl<F> std::fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

impl<F, Fut> Service<CommandRequest> for FromFn<F>
where
    F: Fn(CommandRequest, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, CommandError>> + Send + 'static,
{
    type Response = Value;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Value, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the inner stack is awaited inside `Next::run` (oneshot), so a
        // middleware that answers early never reserves capacity it does not use.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: CommandRequest) -> Self::Future {
        let next = Next {
            inner: self.inner.clone(),
        };
        let fut = (self.f)(request, next);
        Box::pin(async move { fut.await.map_err(|err| Box::new(err) as BoxError) })
    }
}
