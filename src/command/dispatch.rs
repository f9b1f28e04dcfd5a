//! Running one command: its handler or layered service, panics, and the reply frame.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::Value;

use super::{CommandRequest, Route};
use crate::connection::Connection;
use crate::error::CommandError;
use crate::mesh::Mesh;
use crate::protocol::{self, Frame};

/// Starts one command and returns the future of its reply frame. Never fails: every
/// failure, a panic included, becomes an error reply for this command alone.
///
/// The handler is called here (its extractors run now) and the returned future holds
/// little more than the handler's own boxed future: a connection keeps one per running
/// command.
pub(crate) fn dispatch(
    mesh: Mesh,
    connection: Connection,
    id: u64,
    (command, route): (Arc<str>, Route),
    payload: Value,
) -> impl Future<Output = Frame> + Send + 'static {
    let request = CommandRequest::new(Arc::clone(&command), payload, connection, mesh);
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| route.run(request)));
    async move {
        let outcome = match started {
            Ok(run) => AssertUnwindSafe(run).catch_unwind().await,
            Err(panic) => Err(panic),
        };
        let text = match outcome {
            Ok(Ok(value)) => protocol::reply(id, &*command, &value),
            Ok(Err(err)) => {
                let err = CommandError::from_box(err);
                tracing::debug!(code = err.code(), error = err.message(), "command failed");
                protocol::error_reply(id, &*command, &err)
            }
            Err(panic) => {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %detail, "command handler panicked");
                protocol::error_reply(id, &*command, &CommandError::internal())
            }
        };
        Frame::from(text)
    }
}
