//! Instances and the connections they hold: attaching (entering the instances, starting
//! the pub/sub subscriber and the heartbeat) and detaching, registering and forgetting
//! connections, the heartbeat that finds a lost registration and enters again, and the
//! sweep that removes what lapsed (dead instances' connections, presence, presence
//! states). The module docs of `redis/mod.rs` explain the design ("Liveness and expiry").

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};

use super::rooms::Part;
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
        self.run("attach", self.enter(&instance_id)).await?;
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
        let connections: Vec<String> = self
            .run(
                "detach",
                self.query_one(redis::cmd("SMEMBERS").arg(keys.instance_connections(instance_id))),
            )
            .await?;
        let mut unregisters: Vec<BoxFuture<'_, Result<(), MeshError>>> = Vec::new();
        for connection_id in connections {
            unregisters.push(Box::pin(async move {
                self.run(
                    "unregister_connection",
                    self.unregister(instance_id, &connection_id),
                )
                .await
            }));
        }
        futures_util::stream::iter(unregisters)
            .buffer_unordered(super::CROSS_SLOT_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        // Last, so that a detach cut short leaves the connections to the sweep.
        self.run("detach", async {
            let mut conn = self.connection().await?;
            redis::pipe()
                .cmd("ZREM")
                .arg(keys.instances())
                .arg(instance_id)
                .ignore()
                .cmd("DEL")
                .arg(keys.instance_connections(instance_id))
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(redis_error)
        })
        .await
    }

    /// Registers a connection: first in the registry (so that, should this stop half-way,
    /// the sweep still finds it when the instance dies), then its routing.
    pub(super) async fn register(
        &self,
        instance_id: &str,
        connection_id: &str,
    ) -> Result<(), MeshError> {
        let keys = &self.shared.keys;
        let mut conn = self.connection().await?;
        let registered: i64 = self
            .shared
            .scripts
            .register
            .key(keys.instance_connections(instance_id))
            .key(keys.connections())
            .key(keys.instances())
            .arg(connection_id)
            .arg(instance_id)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        if registered == 0 {
            return Err(MeshError::Unavailable(
                "this instance is not registered in Redis (it is registering again)".into(),
            ));
        }
        redis::cmd("HSET")
            .arg(keys.connection(connection_id))
            .arg("instance")
            .arg(instance_id)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    /// Forgets a connection, then takes it out of the registry: a forget cut short is
    /// done again by the sweep should the instance die, and doing it again is harmless.
    pub(super) async fn unregister(
        &self,
        instance_id: &str,
        connection_id: &str,
    ) -> Result<(), MeshError> {
        self.forget(connection_id).await?;
        self.drop_from_registry(
            &self.shared.keys.instance_connections(instance_id),
            connection_id,
        )
        .await
    }

    /// Takes a forgotten connection out of `set` (its instance's, or the dead ones) and
    /// out of the ordered listing.
    async fn drop_from_registry(&self, set: &str, connection_id: &str) -> Result<(), MeshError> {
        let mut conn = self.connection().await?;
        redis::pipe()
            .cmd("SREM")
            .arg(set)
            .arg(connection_id)
            .ignore()
            .cmd("ZREM")
            .arg(self.shared.keys.connections())
            .arg(connection_id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    /// Forgets a connection: it stops being registered (so no join or metadata write can
    /// succeed any more), its memberships go, then its keys, and last its presence, with
    /// the `leave` announcements, so that whoever sees one finds the connection gone
    /// everywhere. Each step may be repeated: a leave that finds nothing announces
    /// nothing, so every leave is announced exactly once however often, and by whomever,
    /// this runs.
    async fn forget(&self, connection_id: &str) -> Result<(), MeshError> {
        let keys = &self.shared.keys;
        let mut conn = self.connection().await?;
        let rooms: Vec<String> = self
            .shared
            .scripts
            .release
            .key(keys.connection(connection_id))
            .key(keys.connection_rooms(connection_id))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let left = self.leave_part(connection_id, &rooms, Part::Member).await?;
        redis::cmd("DEL")
            .arg(keys.connection(connection_id))
            .arg(keys.connection_rooms(connection_id))
            .arg(keys.connection_metadata(connection_id))
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_error)?;
        let present: Vec<&String> = rooms
            .iter()
            .zip(left)
            .filter_map(|(room, (_, present))| present.then_some(room))
            .collect();
        self.leave_part(connection_id, &present, Part::Presence)
            .await
            .map(drop)
    }

    /// Sweeps what lapsed: dead instances' connections (forgotten as `unregister` does)
    /// and, in every room bucket, presence and states past their deadline. Returns when
    /// the next deadline is due. The two parts run side by side, and a connection that
    /// cannot be forgotten now (its room's slot unreachable, say) is left for the next
    /// sweep without holding up the other part.
    pub(super) async fn sweep_expired(&self) -> Result<Duration, MeshError> {
        let keys = &self.shared.keys;
        let instances = async {
            let mut conn = self.connection().await?;
            let (due, dead): (i64, Vec<String>) = self
                .shared
                .scripts
                .sweep_instances
                .key(keys.instances())
                .key(keys.dead_connections())
                .arg(keys.registry())
                .arg(SWEEP_BATCH)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let dead_set = keys.dead_connections();
            let mut forgets: Vec<BoxFuture<'_, Result<(), MeshError>>> = Vec::new();
            for connection_id in dead {
                let dead_set = &dead_set;
                forgets.push(Box::pin(async move {
                    self.forget(&connection_id).await?;
                    self.drop_from_registry(dead_set, &connection_id).await
                }));
            }
            let mut forgotten =
                futures_util::stream::iter(forgets).buffer_unordered(super::CROSS_SLOT_CONCURRENCY);
            while let Some(outcome) = forgotten.next().await {
                if let Err(err) = outcome {
                    tracing::warn!(%err, "could not forget a dead instance's connection; the next sweep retries");
                }
            }
            Ok::<_, MeshError>(due)
        };
        let rooms = async {
            let buckets = keys
                .room_buckets()
                .map(|bucket| {
                    let mut sweep = self.shared.scripts.sweep_rooms.prepare_invoke();
                    sweep.key(bucket).arg(SWEEP_BATCH);
                    sweep
                })
                .collect();
            self.invoke_each::<i64>(buckets).await
        };
        let (instances_due, rooms_due) = futures_util::join!(instances, rooms);
        // Negative: nothing is due. Entries made by other instances after this sweep are
        // caught by their own sweepers, or by this one within a heartbeat interval if
        // they die.
        let next_due = std::iter::once(instances_due?)
            .chain(rooms_due?)
            .filter_map(|due| u64::try_from(due).ok())
            .min();
        Ok(next_due
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
        match backend
            .run("heartbeat", backend.heartbeat(&instance_id))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Its connections were forgotten with it: they are closed first, and
                // only then does the instance enter again. Were the heartbeat to add it
                // back, a heartbeat that ran late, after a sweep, and whose reply was
                // lost would leave them open with nothing stored for them.
                local.registration_lost();
                if let Err(err) = backend.run("attach", backend.enter(&instance_id)).await {
                    tracing::warn!(%err, "could not register the instance again; will retry");
                }
            }
            Err(err) => tracing::warn!(%err, "Redis heartbeat failed"),
        }
    }
}
