//! Records: reads, the ordered id index, and writes and deletions by compare-and-set on
//! a write token (the `record_cas` Lua script), which also publishes the write's
//! announcements.

use super::{conflict_pause, envelope, parse_json, redis_error, RedisBackend};
use crate::backend::{Delivery, RecordRemover, RecordUpdater, StoredRecord};
use crate::error::MeshError;

impl RedisBackend {
    pub(super) async fn read_records(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<StoredRecord>>, MeshError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let reads = ids
            .iter()
            .map(|id| {
                let mut read = redis::cmd("HMGET");
                read.arg(self.shared.keys.record(id))
                    .arg("value")
                    .arg("version");
                read
            })
            .collect();
        let stored: Vec<(Option<String>, Option<u64>)> = self.query_each(reads).await?;
        stored.into_iter().map(stored_record).collect()
    }

    /// The ids that start with `prefix`, in byte order: a range of each bucket's index,
    /// merged.
    pub(super) async fn list_record_ids(&self, prefix: &str) -> Result<Vec<String>, MeshError> {
        let (lower, upper) = if prefix.is_empty() {
            (b"-".to_vec(), b"+".to_vec())
        } else {
            // No UTF-8 text holds the byte 0xff: every id with the prefix sorts
            // between the prefix itself and the prefix followed by it.
            let mut lower = Vec::with_capacity(prefix.len() + 1);
            lower.push(b'[');
            lower.extend_from_slice(prefix.as_bytes());
            let mut upper = lower.clone();
            upper.push(0xff);
            (lower, upper)
        };
        let reads = self
            .shared
            .keys
            .record_id_indexes()
            .map(|index| {
                let mut read = redis::cmd("ZRANGEBYLEX");
                read.arg(index).arg(&lower).arg(&upper);
                read
            })
            .collect();
        let buckets: Vec<Vec<String>> = self.query_each(reads).await?;
        let mut ids: Vec<String> = buckets.into_iter().flatten().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    pub(super) async fn write_record(
        &self,
        id: &str,
        update: &RecordUpdater,
    ) -> Result<Option<StoredRecord>, MeshError> {
        let mut conn = self.connection().await?;
        // Compare-and-set: read, compute in Rust (merges and diffs keep key order,
        // which Lua's cjson would not), then write only if no other writer got in,
        // else compute again on what that writer stored. The check is on a token
        // that every write renews, not on the version, which a deletion resets: a
        // record deleted and created again never passes for the one read.
        let mut attempt = 0;
        loop {
            let (current, token) = self.read_record(&mut conn, id).await?;
            let version = current.as_ref().map_or(0, |record| record.version);
            let Some(write) = update(current.as_ref())? else {
                return Ok(None);
            };
            let stored = StoredRecord {
                value: write.value,
                version: version + 1,
            };
            let written = self
                .record_cas(
                    &mut conn,
                    id,
                    &token,
                    Some((&write.json, stored.version)),
                    &write.announcements,
                )
                .await?;
            if written {
                return Ok(Some(stored));
            }
            attempt += 1;
            conflict_pause(attempt).await;
        }
    }

    pub(super) async fn remove_record(
        &self,
        id: &str,
        announce: &RecordRemover,
    ) -> Result<Option<StoredRecord>, MeshError> {
        let mut conn = self.connection().await?;
        let mut attempt = 0;
        loop {
            let (Some(current), token) = self.read_record(&mut conn, id).await? else {
                return Ok(None);
            };
            let announcements = announce(&current);
            if self
                .record_cas(&mut conn, id, &token, None, &announcements)
                .await?
            {
                return Ok(Some(current));
            }
            attempt += 1;
            conflict_pause(attempt).await;
        }
    }

    /// A record and its write token (empty when there is no record).
    async fn read_record(
        &self,
        conn: &mut super::Connection,
        id: &str,
    ) -> Result<(Option<StoredRecord>, String), MeshError> {
        let (value, version, token): (Option<String>, Option<u64>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.shared.keys.record(id))
                .arg("value")
                .arg("version")
                .arg("token")
                .query_async(conn)
                .await
                .map_err(redis_error)?;
        Ok((stored_record((value, version))?, token.unwrap_or_default()))
    }

    /// Writes `(value, version)` (or, with `None`, deletes) a record if its token is still
    /// `expected`, publishing `announcements` with it. Returns whether it did.
    async fn record_cas(
        &self,
        conn: &mut super::Connection,
        id: &str,
        expected: &str,
        write: Option<(&str, u64)>,
        announcements: &[Delivery],
    ) -> Result<bool, MeshError> {
        let keys = &self.shared.keys;
        let (value, version) = write.unwrap_or(("", 0));
        let mut invocation = self.shared.scripts.record_cas.prepare_invoke();
        invocation
            .key(keys.record(id))
            .key(keys.record_ids_of(id))
            .arg(id)
            .arg(expected)
            .arg(value)
            .arg(version)
            .arg(uuid::Uuid::new_v4().simple().to_string());
        for announcement in announcements {
            let Some((channel, pubsub)) = keys.channel_of(announcement) else {
                return Err(MeshError::Corrupt(
                    "a record announcement must go to a topic".into(),
                ));
            };
            invocation
                .arg(pubsub.publish_command())
                .arg(channel)
                .arg(envelope::encode(announcement));
        }
        let written: i64 = invocation.invoke_async(conn).await.map_err(redis_error)?;
        Ok(written == 1)
    }
}

fn stored_record(
    (value, version): (Option<String>, Option<u64>),
) -> Result<Option<StoredRecord>, MeshError> {
    match (value, version) {
        (Some(value), Some(version)) => Ok(Some(StoredRecord {
            value: parse_json(&value)?,
            version,
        })),
        (None, None) => Ok(None),
        _ => Err(MeshError::Corrupt(
            "a record hash lacks its value or version".into(),
        )),
    }
}
