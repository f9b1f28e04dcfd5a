//! Commands as tower services: the request type, async-fn handlers with extractors, and
//! `from_fn` middleware.
//!
//! A command handler is any `Service<CommandRequest, Response = Value>` whose error converts
//! into [`BoxError`]; its error becomes the reply's `{error, code, name}` payload (see
//! [`CommandError::from_box`](crate::CommandError::from_box)). Middleware is any tower `Layer` over [`CommandService`].

mod dispatch;
mod extract;
mod handler;
mod middleware;
pub mod rejection;
mod route;

use std::sync::Arc;

use serde_json::Value;
use tower::util::BoxCloneSyncService;

pub(crate) use dispatch::dispatch;
pub(crate) use route::{RegisteredCommand, Route};

use crate::connection::Connection;
use crate::error::BoxError;
use crate::mesh::Mesh;

pub use extract::{
    Extension, FromCommandParts, FromCommandRequest, OptionalFromCommandParts,
    OptionalFromCommandRequest, Payload, State,
};
pub use handler::{handler_service, Handler, HandlerService, IntoCommandResponse, Json};
pub use middleware::{from_fn, FromFn, FromFnLayer, Next};

/// The type-erased command service every command becomes once its layers are applied.
/// Layers given to [`MeshBuilder::layer`](crate::MeshBuilder::layer) wrap this type.
pub type CommandService = BoxCloneSyncService<CommandRequest, Value, BoxError>;

/// One command from one client, as a tower request.
///
/// It carries the command name and payload, the [`Connection`] it came from (with the
/// upgrade request's headers, URI and extensions), the [`Mesh`] handle, and extensions of
/// its own in which middleware can leave values for the handler.
pub struct CommandRequest {
    command: Arc<str>,
    payload: Value,
    connection: Connection,
    mesh: Mesh,
    extensions: http::Extensions,
}

impl CommandRequest {
    /// Builds a request, for example to drive a command service in a unit test.
    pub fn new(
        command: impl Into<Arc<str>>,
        payload: Value,
        connection: Connection,
        mesh: Mesh,
    ) -> Self {
        CommandRequest {
            command: command.into(),
            payload,
            connection,
            mesh,
            extensions: http::Extensions::new(),
        }
    }

    /// The command name, for example `"mesh/join-room"`.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// The payload as the client sent it.
    pub fn payload(&self) -> &Value {
        &self.payload
    }

    /// The payload, mutably (a middleware may normalise it).
    pub fn payload_mut(&mut self) -> &mut Value {
        &mut self.payload
    }

    /// Consumes the request for its payload, as a [`FromCommandRequest`] extractor such as
    /// [`Payload`] does.
    pub fn into_payload(self) -> Value {
        self.payload
    }

    /// The connection the command came from.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The mesh handle: the whole server-side API.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The WebSocket upgrade request's headers, URI and extensions (what HTTP layers such
    /// as an auth layer left there).
    pub fn request_parts(&self) -> &http::request::Parts {
        self.connection.request_parts()
    }

    /// Values that middleware attached to this command for the layers and handler after it.
    pub fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    /// Mutable access to this command's own extensions.
    pub fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }
}

impl std::fmt::Debug for CommandRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandRequest")
            .field("command", &self.command)
            .field("connection", &self.connection.id())
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}
