//! Running one command: its handler or layered service, panics, and the reply frame.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::Value;

use super::{CommandRequest, Route};
use crate::connection::Connection;
use crate::error::CommandError;
use crate::mesh::Mesh;
use crate::protocol::{self, Frame};

/// Runs one command and returns its reply frame. Never fails: every failure, a panic
/// included, becomes an error reply for this command alone.
pub(crate) async fn dispatch(
    mesh: Mesh,
    connection: Connection,
    id: u64,
    (command, route): (Arc<str>, Route),
    payload: Value,
) -> Frame {
    let request = CommandRequest::new(Arc::clone(&command), payload, connection, mesh);
    // Lazily, so that a panic in the handler's synchronous part (its extractors) is
    // caught below too.
    let run = async move { route.run(request).await };
    let text = match AssertUnwindSafe(run).catch_unwind().await {
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
