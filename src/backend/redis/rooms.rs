//! Rooms: joining (which also makes a connection present in a tracked room) and leaving,
//! and the listings of members and rooms.
//!
//! A connection's rooms and a room's members are in different slots, so a join and a
//! leave are steps of one script each, ordered so that a connection forgotten in between
//! never stays a member (see "Steps across slots" in the module docs of `mod.rs`).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::{millis, parse_json_or_null, redis_error, RedisBackend};
use crate::error::MeshError;

/// What a leave script removes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Part {
    /// The membership only (and it answers whether the connection is present).
    Member,
    /// The presence and state only, announcing the `leave`.
    Presence,
    /// Both, in one step.
    All,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Member => "member",
            Part::Presence => "presence",
            Part::All => "all",
        }
    }
}

impl RedisBackend {
    /// Joins in three steps: the connection notes the room (only while registered), the
    /// room takes the member, and the connection is checked to be registered still. A
    /// forget that ran between the first and the last step may have missed the member
    /// (it reads the noted rooms first, and leaves them before the member arrived): the
    /// join then takes the member out again itself, and answers that the connection is
    /// not registered.
    pub(super) async fn join(
        &self,
        connection_id: &str,
        room: &str,
        presence_ttl: Option<Duration>,
    ) -> Result<bool, MeshError> {
        let keys = &self.shared.keys;
        let scripts = &self.shared.scripts;
        let mut conn = self.connection().await?;
        let noted: i64 = scripts
            .enter_room
            .key(keys.connection(connection_id))
            .key(keys.connection_rooms(connection_id))
            .arg(room)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        if noted == 0 {
            return Ok(false);
        }
        let joined = async {
            scripts
                .join
                .key(keys.room_base(room))
                .arg(connection_id)
                .arg(room)
                .arg(presence_ttl.map_or(0, millis))
                .invoke_async::<()>(&mut conn.clone())
                .await
                .map_err(redis_error)?;
            redis::cmd("HEXISTS")
                .arg(keys.connection(connection_id))
                .arg("instance")
                .query_async::<bool>(&mut conn.clone())
                .await
                .map_err(redis_error)
        };
        match joined.await {
            Ok(true) => Ok(true),
            // Not registered any more: a forget ran in between and may have missed the
            // member. Failed: the member may have arrived (a lost reply) with nobody to
            // check the registration; the caller reports the join failed. Either way the
            // join is undone, note included, so that nothing is left that no forget will
            // remove; what cannot be undone now is for a later forget or the sweep.
            outcome => {
                if let Err(err) = self.undo_join(connection_id, room).await {
                    tracing::warn!(%err, "could not undo an interrupted join");
                }
                outcome
            }
        }
    }

    async fn undo_join(&self, connection_id: &str, room: &str) -> Result<(), MeshError> {
        self.leave_part(connection_id, &[room], Part::All).await?;
        self.query_one::<()>(
            redis::cmd("SREM")
                .arg(self.shared.keys.connection_rooms(connection_id))
                .arg(room),
        )
        .await
    }

    /// Leaves in steps: the membership, then the connection's note of the room, and last
    /// its presence there (with the `leave` announcement), so that whoever sees the
    /// announcement finds the leave complete. A leave cut short leaves a note of a room
    /// the connection is not in (which a later forget leaves again, harmlessly), or a
    /// presence that lapses (the sweep announces it), never a member nobody knows of.
    pub(super) async fn leave(&self, connection_id: &str, room: &str) -> Result<bool, MeshError> {
        let [(was_member, present)] = self
            .leave_part(connection_id, &[room], Part::Member)
            .await?[..]
        else {
            return Err(MeshError::Corrupt("a leave answered for no room".into()));
        };
        // The membership is gone: the leave has happened. What follows is tidying that a
        // later forget (the note) or the sweep (the presence) finishes if it fails now.
        let noted = self
            .query_one::<()>(
                redis::cmd("SREM")
                    .arg(self.shared.keys.connection_rooms(connection_id))
                    .arg(room),
            )
            .await;
        if let Err(err) = noted {
            tracing::warn!(%err, "a leave could not remove its note; the connection's forget will");
        } else if present {
            if let Err(err) = self
                .leave_part(connection_id, &[room], Part::Presence)
                .await
            {
                tracing::warn!(%err, "a leave could not end its presence; the sweep will");
            }
        }
        Ok(was_member)
    }

    /// Takes `part` of a connection out of each of `rooms` (one script per room, in its
    /// bucket): for each, whether it was a member and whether it is (or, with
    /// [`Part::All`], was) present.
    pub(super) async fn leave_part<R: AsRef<str>>(
        &self,
        connection_id: &str,
        rooms: &[R],
        part: Part,
    ) -> Result<Vec<(bool, bool)>, MeshError> {
        let leaves = rooms
            .iter()
            .map(|room| {
                let room = room.as_ref();
                let mut leave = self.shared.scripts.leave.prepare_invoke();
                leave
                    .key(self.shared.keys.room_base(room))
                    .arg(connection_id)
                    .arg(room)
                    .arg(part.name());
                leave
            })
            .collect();
        let found: Vec<(i64, i64)> = self.invoke_each(leaves).await?;
        Ok(found
            .into_iter()
            .map(|(member, present)| (member == 1, present == 1))
            .collect())
    }

    pub(super) async fn members(&self, room: &str) -> Result<Vec<String>, MeshError> {
        self.query_one(
            redis::cmd("ZRANGE")
                .arg(self.shared.keys.room(room))
                .arg(0)
                .arg(-1),
        )
        .await
    }

    pub(super) async fn members_with_metadata(
        &self,
        room: &str,
    ) -> Result<Vec<(String, Value)>, MeshError> {
        let members = self.members(room).await?;
        self.with_connection_metadata(members).await
    }

    /// Each connection with its metadata (`null` when it has none): one `MGET` per
    /// connection bucket.
    pub(super) async fn with_connection_metadata(
        &self,
        ids: Vec<String>,
    ) -> Result<Vec<(String, Value)>, MeshError> {
        let keys = &self.shared.keys;
        let mut by_bucket: HashMap<u32, Vec<usize>> = HashMap::new();
        for (index, id) in ids.iter().enumerate() {
            by_bucket
                .entry(keys.connection_bucket(id))
                .or_default()
                .push(index);
        }
        let mut places = Vec::with_capacity(by_bucket.len());
        let mut reads = Vec::with_capacity(by_bucket.len());
        for indexes in by_bucket.into_values() {
            let mut read = redis::cmd("MGET");
            for &index in &indexes {
                read.arg(keys.connection_metadata(&ids[index]));
            }
            reads.push(read);
            places.push(indexes);
        }
        let buckets: Vec<Vec<Option<String>>> = self.query_each(reads).await?;
        let mut metadata: Vec<Option<String>> = vec![None; ids.len()];
        for (indexes, values) in places.into_iter().zip(buckets) {
            for (index, value) in indexes.into_iter().zip(values) {
                metadata[index] = value;
            }
        }
        ids.into_iter()
            .zip(metadata)
            .map(|(id, raw)| Ok((id, parse_json_or_null(raw.as_deref())?)))
            .collect()
    }

    /// The rooms a connection is a member of: its notes, checked against the rooms'
    /// members (a note can outlive a leave or a join that was cut short).
    pub(super) async fn rooms_of(&self, connection_id: &str) -> Result<Vec<String>, MeshError> {
        let noted: Vec<String> = self
            .query_one(redis::cmd("SMEMBERS").arg(self.shared.keys.connection_rooms(connection_id)))
            .await?;
        let mut rooms = self.members_of(&noted, &[connection_id]).await?;
        rooms.sort_unstable();
        Ok(rooms)
    }

    /// Those of `rooms` that every one of `connections` is a member of.
    async fn members_of(
        &self,
        rooms: &[String],
        connections: &[&str],
    ) -> Result<Vec<String>, MeshError> {
        // ZSCORE, not ZMSCORE: Redis 5 and 6.0 have no ZMSCORE.
        let mut checks = Vec::with_capacity(rooms.len() * connections.len());
        for room in rooms {
            for &connection in connections {
                let mut check = redis::cmd("ZSCORE");
                check.arg(self.shared.keys.room(room)).arg(connection);
                checks.push(check);
            }
        }
        let scores: Vec<Option<f64>> = self.query_each(checks).await?;
        Ok(rooms
            .iter()
            .zip(scores.chunks(connections.len().max(1)))
            .filter(|(_, scores)| scores.iter().all(Option::is_some))
            .map(|(room, _)| room.clone())
            .collect())
    }

    /// Every room with a member: the union of the buckets' room sets.
    pub(super) async fn list_rooms(&self) -> Result<Vec<String>, MeshError> {
        let reads = self
            .shared
            .keys
            .room_buckets()
            .map(|bucket| {
                let mut read = redis::cmd("SMEMBERS");
                read.arg(format!("{bucket}rooms"));
                read
            })
            .collect();
        let buckets: Vec<Vec<String>> = self.query_each(reads).await?;
        let mut rooms: Vec<String> = buckets.into_iter().flatten().collect();
        rooms.sort_unstable();
        Ok(rooms)
    }

    /// Whether two connections share a room: the rooms both noted, checked against the
    /// rooms' members (a note can outlive a cut-short join, which must not open anyone's
    /// metadata).
    pub(super) async fn in_a_common_room(&self, a: &str, b: &str) -> Result<bool, MeshError> {
        let keys = &self.shared.keys;
        let mut of_a = redis::cmd("SMEMBERS");
        of_a.arg(keys.connection_rooms(a));
        let mut of_b = redis::cmd("SMEMBERS");
        of_b.arg(keys.connection_rooms(b));
        let (rooms_of_a, rooms_of_b) = futures_util::try_join!(
            self.query_one::<Vec<String>>(&of_a),
            self.query_one::<Vec<String>>(&of_b),
        )?;
        let common: Vec<String> = rooms_of_a
            .into_iter()
            .filter(|room| rooms_of_b.contains(room))
            .collect();
        if common.is_empty() {
            return Ok(false);
        }
        Ok(!self.members_of(&common, &[a, b]).await?.is_empty())
    }
}
