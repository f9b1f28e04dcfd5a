//! Running one command: its handler or layered service, panics, and the reply frame.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::{CommandRequest, RegisteredCommand};
use crate::connection::Connection;
use crate::error::{BoxError, CommandError};
use crate::mesh::Mesh;
use crate::metrics::Stopwatch;
use crate::protocol::{self, Frame};

/// One command on its way to its reply frame. Never fails: every failure, a panic
/// included, becomes an error reply for this command alone.
///
/// It is `Unpin` and holds little more than the handler's own boxed future, so a
/// connection can poll it once where it was read (most commands finish then) and move it
/// into its set of running commands only when it did not.
pub(crate) struct CommandRun {
    id: u64,
    command: Arc<RegisteredCommand>,
    started: Stopwatch,
    state: RunState,
}

enum RunState {
    Running(BoxFuture<'static, Result<Value, BoxError>>),
    /// The handler (or its extractors) panicked as it was called.
    Panicked(Box<dyn Any + Send>),
    Done,
}

/// Starts one command: the handler is called here, so its extractors run now.
pub(crate) fn dispatch(
    mesh: Mesh,
    connection: Connection,
    id: u64,
    command: Arc<RegisteredCommand>,
    payload: Value,
) -> CommandRun {
    let started = Stopwatch::start();
    let request = CommandRequest::new(Arc::clone(&command.name), payload, connection, mesh);
    let state = match std::panic::catch_unwind(AssertUnwindSafe(|| command.route.run(request))) {
        Ok(run) => RunState::Running(run),
        Err(panic) => RunState::Panicked(panic),
    };
    CommandRun {
        id,
        command,
        started,
        state,
    }
}

impl Future for CommandRun {
    type Output = Frame;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Frame> {
        let this = self.get_mut();
        let outcome = match std::mem::replace(&mut this.state, RunState::Done) {
            RunState::Running(mut run) => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| run.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => {
                        this.state = RunState::Running(run);
                        return Poll::Pending;
                    }
                    Ok(Poll::Ready(outcome)) => Ok(outcome),
                    Err(panic) => Err(panic),
                }
            }
            RunState::Panicked(panic) => Err(panic),
            RunState::Done => return Poll::Pending,
        };
        let name = &this.command.name;
        let metrics = &this.command.metrics;
        let text = match outcome {
            Ok(Ok(value)) => {
                metrics.answered(this.started, None);
                protocol::value_reply(this.id, name, &value)
            }
            Ok(Err(err)) => {
                let err = CommandError::from_box(err);
                tracing::debug!(code = err.code(), error = err.message(), "command failed");
                metrics.answered(this.started, Some(err.code()));
                protocol::error_reply(this.id, &**name, &err)
            }
            Err(panic) => {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                // The command span is debug-level, so this names the command itself.
                tracing::error!(
                    panic = %detail,
                    command = %name,
                    request = this.id,
                    "command handler panicked"
                );
                let err = CommandError::internal();
                metrics.answered(this.started, Some(err.code()));
                protocol::error_reply(this.id, &**name, &err)
            }
        };
        Poll::Ready(Frame::from(text))
    }
}
