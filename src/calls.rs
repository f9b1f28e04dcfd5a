//! Calls between instances. A membership change of a connection (joining or leaving a
//! room) runs on the instance that holds the connection, which keeps its topic index in
//! step with the backend. Another instance asks for it with a [`Delivery::Call`] and waits
//! for the [`Delivery::Answer`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::backend::{ConnectionOp, Delivery};
use crate::connection::Connection;
use crate::error::MeshError;
use crate::mesh::Mesh;

/// Longest an instance waits for the holder of a connection to apply a change to it: above
/// the holder's worst case (its membership lock, then a subscribe and a script, each
/// bounded by the backend's 3 s operation timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The calls of this instance awaiting their answer.
#[derive(Default)]
pub(crate) struct Calls {
    pending: Mutex<HashMap<u64, oneshot::Sender<Option<bool>>>>,
    next: AtomicU64,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<Option<bool>>>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands an answer from another instance to the call waiting for it.
    pub(crate) fn answered(&self, call_id: u64, outcome: Option<bool>) {
        if let Some(waiter) = self.lock().remove(&call_id) {
            let _ = waiter.send(outcome);
        }
    }
}

/// Forgets a call however its caller ends (answered, timed out, or dropped).
struct PendingCall<'a> {
    calls: &'a Calls,
    call_id: u64,
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.call_id);
    }
}

impl Mesh {
    /// Runs a membership change on the instance that holds the connection: here, or by
    /// a call to its instance, answered once the change is done. `Ok(false)` when no
    /// instance holds it.
    pub(crate) async fn on_holder(
        &self,
        connection_id: &str,
        op: ConnectionOp,
    ) -> Result<bool, MeshError> {
        self.ready().await?;
        if let Some(connection) = self.connection(connection_id) {
            return self.apply(&connection, op).await;
        }
        let calls = &self.inner().calls;
        let call_id = calls.next.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        calls.lock().insert(call_id, answer);
        let _pending = PendingCall { calls, call_id };
        let routed = self
            .backend()
            .publish(Delivery::Call {
                connection_id: Arc::from(connection_id),
                from: Arc::from(self.instance_id()),
                call_id,
                op,
            })
            .await?;
        if !routed {
            return Ok(false);
        }
        match tokio::time::timeout(CALL_TIMEOUT, answered).await {
            Ok(Ok(Some(done))) => Ok(done),
            Ok(Ok(None)) => Err(MeshError::Unavailable(
                "the instance holding the connection could not apply the change".into(),
            )),
            _ => Err(MeshError::Unavailable(
                "the instance holding the connection did not answer".into(),
            )),
        }
    }

    /// Runs a call from instance `from` on a local connection, and answers it.
    pub(crate) fn run_call(
        &self,
        connection_id: Arc<str>,
        from: Arc<str>,
        call_id: u64,
        op: ConnectionOp,
    ) {
        let mesh = self.clone();
        tokio::spawn(async move {
            let outcome = match mesh.connection(&connection_id) {
                Some(connection) => match mesh.apply(&connection, op).await {
                    Ok(done) => Some(done),
                    Err(err) => {
                        tracing::warn!(%err, "could not apply a change asked by another instance");
                        None
                    }
                },
                None => Some(false),
            };
            let answer = Delivery::Answer {
                to: from,
                call_id,
                outcome,
            };
            if let Err(err) = mesh.backend().publish(answer).await {
                tracing::warn!(%err, "could not answer another instance");
            }
        });
    }

    /// Runs a membership change on a local connection.
    async fn apply(&self, connection: &Connection, op: ConnectionOp) -> Result<bool, MeshError> {
        match op {
            ConnectionOp::JoinRoom(room) => Ok(matches!(
                self.join_local(connection, &room, None).await?,
                crate::rooms::JoinOutcome::Joined
            )),
            ConnectionOp::LeaveRoom(room) => self.leave_local(connection, &room).await,
            ConnectionOp::LeaveAllRooms => self.leave_all_local(connection).await.map(|()| true),
        }
    }
}
