//! What a command name leads to: its handler called directly, or its tower stack.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use super::handler::{Handler, HandlerService};
use super::{CommandRequest, CommandService};
use crate::error::BoxError;
use crate::metrics::CommandMetrics;

/// A command as the mesh keeps it: its name, what it leads to, and its metrics. One
/// `Arc` of it travels with each run, instead of clones of its name and service.
pub(crate) struct RegisteredCommand {
    pub(crate) name: Arc<str>,
    pub(crate) route: Route,
    pub(crate) metrics: CommandMetrics,
}

impl RegisteredCommand {
    pub(crate) fn new(name: Arc<str>, route: Route) -> Self {
        RegisteredCommand {
            metrics: CommandMetrics::new(Arc::clone(&name)),
            name,
            route,
        }
    }
}

/// A registered command. An async-fn handler that no layer wraps is called directly:
/// going through a tower stack would clone a boxed service and wait for readiness on
/// every command, for a handler that is always ready. Anything else runs as a service.
#[derive(Clone)]
pub(crate) enum Route {
    /// The handler, and the same handler as a service for layers to wrap.
    Handler(Arc<dyn ErasedHandler>, CommandService),
    Service(CommandService),
}

/// An async-fn handler with its argument types erased.
pub(crate) trait ErasedHandler: Send + Sync {
    fn call(&self, request: CommandRequest) -> BoxFuture<'static, Result<Value, BoxError>>;
}

impl<H: Handler<T>, T: 'static> ErasedHandler for HandlerService<H, T> {
    fn call(&self, request: CommandRequest) -> BoxFuture<'static, Result<Value, BoxError>> {
        self.handler().clone().call(request)
    }
}

impl Route {
    pub(crate) fn handler<H: Handler<T>, T: 'static>(handler: H) -> Self {
        let service = super::handler_service(handler);
        Route::Handler(Arc::new(service.clone()), BoxCloneSyncService::new(service))
    }

    pub(crate) fn service<S>(service: S) -> Self
    where
        S: Service<CommandRequest, Response = Value> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        Route::Service(BoxCloneSyncService::new(service.map_err(Into::into)))
    }

    /// The command as a service, for layers to wrap.
    pub(crate) fn into_service(self) -> CommandService {
        match self {
            Route::Handler(_, service) | Route::Service(service) => service,
        }
    }

    /// Runs the command on one request (a service is cloned per request, as tower
    /// expects: readiness belongs to the clone that is called; a handler is not).
    ///
    /// The future is boxed either way: a connection keeps every running command's future
    /// side by side, and a boxed one keeps that slot small.
    pub(crate) fn run(
        &self,
        request: CommandRequest,
    ) -> BoxFuture<'static, Result<Value, BoxError>> {
        match self {
            Route::Handler(handler, _) => handler.call(request),
            Route::Service(service) => Box::pin(service.clone().oneshot(request)),
        }
    }
}
