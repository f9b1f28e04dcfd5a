//! Records: reads, prefix listings from the ordered map, and writes and deletions under
//! the lock (so concurrent writers are serialised), each announced before the lock is
//! released.

use super::MemoryBackend;
use crate::backend::{RecordRemover, RecordUpdater, StoredRecord};
use crate::error::MeshError;

impl MemoryBackend {
    pub(super) fn read_records(&self, ids: &[String]) -> Vec<Option<StoredRecord>> {
        let state = self.lock();
        ids.iter()
            .map(|id| state.records.get(id).cloned())
            .collect()
    }

    pub(super) fn list_record_ids(&self, prefix: &str) -> Vec<String> {
        self.lock()
            .records
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .map(|(id, _)| id)
            .take_while(|id| id.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub(super) fn write_record(
        &self,
        id: &str,
        update: &RecordUpdater,
    ) -> Result<Option<StoredRecord>, MeshError> {
        let mut state = self.lock();
        let current = state.records.get(id);
        let version = current.map_or(0, |record| record.version);
        let Some(write) = update(current)? else {
            return Ok(None);
        };
        let stored = StoredRecord {
            value: write.value,
            version: version + 1,
        };
        state.records.insert(id.to_owned(), stored.clone());
        state.announcements.extend(write.announcements);
        state.flush();
        Ok(Some(stored))
    }

    pub(super) fn remove_record(&self, id: &str, announce: &RecordRemover) -> Option<StoredRecord> {
        let mut state = self.lock();
        let removed = state.records.remove(id)?;
        let announcements = announce(&removed);
        state.announcements.extend(announcements);
        state.flush();
        Some(removed)
    }
}
