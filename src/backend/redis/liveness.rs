//! Instances and the connections they hold: attaching (entering `P instances`, starting
//! the pub/sub subscriber and the heartbeat) and detaching, registering connections, the
//! heartbeat that finds a lost registration and enters again, and the sweep that removes
//! what lapsed (dead instances' connections, presence, presence states). The module docs
//! of `redis/mod.rs` explain the design ("Liveness and expiry").

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{redis_error, subscriber, RedisBackend, WeakBackend};
use crate::backend::Inbox;
use crate::error::MeshError;

/// Most entries of each kind one sweep removes; more are left for an immediate next sweep.
const SWEEP_BATCH: usize = 256;

impl RedisBackend {
    pub(super) async fn attach_instance(
        &self,
        instance_id: Arc<str>,
        inbox: Weak<dyn Inbox>,
    ) -> Result<(), MeshError> {
        self.run(self.enter(&instance_id)).await?;
        let (first, subscribed) = oneshot::channel();
        let (commands, receiver) = mpsc::unbounded_channel();
        let subscriber = tokio::spawn(subscriber::run(
            self.downgrade(),
            instance_id.clone(),
            inbox.clone(),
            receiver,
            first,
        ));
        match subscribed.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(MeshError::Unavailable("Redis subscriber stopped".into())),
        }
        if let Ok(mut subscribers) = self.shared.subscribers.lock() {
            subscribers.insert(instance_id.clone(), commands);
        }
        let heartbeat = tokio::spawn(run_heartbeat(self.downgrade(), instance_id.clone(), inbox));
        self.spawn(&instance_id, subscriber);
        self.spawn(&instance_id, heartbeat);
        Ok(())
    }

    pub(super) async fn detach_instance(&self, instance_id: &str) -> Result<(), MeshError> {
        let stopped = self
            .shared
            .tasks
            .lock()
            .ok()
            .and_then(|mut tasks| tasks.remove(instance_id));
        for task in stopped.into_iter().flatten() {
            task.abort();
        }
        if let Ok(mut subscribers) = self.shared.subscribers.lock() {
            subscribers.remove(instance_id);
        }
        let keys = &self.shared.keys;
        self.run(async {
            let mut conn = self.connection().await?;
            self.shared
                .scripts
                .detach
                .key(keys.instances())
                .key(keys.instance_connections(instance_id))
                .arg(&keys.prefix)
                .arg(instance_id)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(())
        })
        .await
    }

    pub(super) async fn register(
        &self,
        instance_id: &str,
        connection_id: &str,
    ) -> Result<(), MeshError> {
        let mut conn = self.connection().await?;
        self.shared
            .scripts
            .register
            .arg(&self.shared.keys.prefix)
            .arg(instance_id)
            .arg(connection_id)
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    pub(super) async fn unregister(
        &self,
        instance_id: &str,
        connection_id: &str,
    ) -> Result<(), MeshError> {
        let keys = &self.shared.keys;
        let mut conn = self.connection().await?;
        self.shared
            .scripts
            .unregister
            .key(keys.instance_connections(instance_id))
            .arg(&keys.prefix)
            .arg(connection_id)
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    pub(super) async fn sweep_expired(&self) -> Result<Duration, MeshError> {
        let mut conn = self.connection().await?;
        let next_due: i64 = self
            .shared
            .scripts
            .sweep
            .arg(&self.shared.keys.prefix)
            .arg(SWEEP_BATCH)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        // Entries made by other instances after this sweep are caught by their own
        // sweepers, or by this one within a heartbeat interval if they die.
        Ok(u64::try_from(next_due)
            .map(Duration::from_millis)
            .unwrap_or(self.shared.heartbeat_interval)
            .min(self.shared.heartbeat_interval))
    }

    /// Extends the instance's deadline; `false` when it is no longer registered.
    async fn heartbeat(&self, instance_id: &str) -> Result<bool, MeshError> {
        self.liveness(&self.shared.scripts.heartbeat, instance_id)
            .await
    }

    /// Registers the instance (again), with a fresh deadline.
    async fn enter(&self, instance_id: &str) -> Result<(), MeshError> {
        self.liveness(&self.shared.scripts.enter, instance_id)
            .await
            .map(drop)
    }

    async fn liveness(&self, script: &redis::Script, instance_id: &str) -> Result<bool, MeshError> {
        let mut conn = self.connection().await?;
        let ttl_ms = u64::try_from(self.shared.instance_ttl.as_millis()).unwrap_or(u64::MAX);
        let registered: i64 = script
            .key(self.shared.keys.instances())
            .arg(instance_id)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(registered == 1)
    }

    fn spawn(&self, instance_id: &Arc<str>, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.shared.tasks.lock() {
            tasks.entry(instance_id.clone()).or_default().push(task);
        }
    }
}

/// Proves this instance alive, forever; the engine's sweeper removes dead ones.
async fn run_heartbeat(backend: WeakBackend, instance_id: Arc<str>, inbox: Weak<dyn Inbox>) {
    let Some(interval) = backend
        .upgrade()
        .map(|backend| backend.shared.heartbeat_interval)
    else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(local), Some(backend)) = (inbox.upgrade(), backend.upgrade()) else {
            return;
        };
        match backend.run(backend.heartbeat(&instance_id)).await {
            Ok(true) => {}
            Ok(false) => {
                // Its connections were forgotten with it: they are closed first, and
                // only then does the instance enter again. Were the heartbeat to add it
                // back, a heartbeat that ran late, after a sweep, and whose reply was
                // lost would leave them open with nothing stored for them.
                local.registration_lost();
                if let Err(err) = backend.run(backend.enter(&instance_id)).await {
                    tracing::warn!(%err, "could not register the instance again; will retry");
                }
            }
            Err(err) => tracing::warn!(%err, "Redis heartbeat failed"),
        }
    }
}
