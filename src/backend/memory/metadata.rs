//! Connection and room metadata, merged by `MetadataWrite::apply` under the lock.

use serde_json::Value;

use super::MemoryBackend;
use crate::error::MeshError;
use crate::metadata::MetadataWrite;

impl MemoryBackend {
    pub(super) fn read_connection_metadata(&self, connection_id: &str) -> Option<Value> {
        self.lock()
            .connections
            .get(connection_id)
            .and_then(|entry| entry.metadata.clone())
    }

    pub(super) fn write_connection_metadata(
        &self,
        connection_id: &str,
        write: &MetadataWrite,
    ) -> Result<bool, MeshError> {
        let mut state = self.lock();
        let Some(entry) = state.connections.get_mut(connection_id) else {
            return Ok(false);
        };
        let (merged, _) = write.apply(entry.metadata.clone())?;
        entry.metadata = Some(merged);
        Ok(true)
    }

    pub(super) fn list_connection_metadata(&self) -> Vec<(String, Value)> {
        let state = self.lock();
        let mut all: Vec<_> = state
            .connections
            .iter()
            .map(|(id, entry)| {
                (
                    entry.sequence,
                    id.clone(),
                    entry.metadata.clone().unwrap_or(Value::Null),
                )
            })
            .collect();
        all.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        all.into_iter()
            .map(|(_, id, metadata)| (id, metadata))
            .collect()
    }

    pub(super) fn read_room_metadata(&self, room: &str) -> Option<Value> {
        self.lock().room_metadata.get(room).cloned()
    }

    pub(super) fn write_room_metadata(
        &self,
        room: &str,
        write: &MetadataWrite,
    ) -> Result<(), MeshError> {
        let mut state = self.lock();
        let (merged, _) = write.apply(state.room_metadata.get(room).cloned())?;
        state.room_metadata.insert(room.to_owned(), merged);
        Ok(())
    }

    pub(super) fn remove_room_metadata(&self, room: &str) {
        self.lock().room_metadata.remove(room);
    }

    pub(super) fn list_room_metadata(&self) -> Vec<(String, Value)> {
        self.lock()
            .room_metadata
            .iter()
            .map(|(room, metadata)| (room.clone(), metadata.clone()))
            .collect()
    }
}
