//! Connection and room metadata, merged by `MetadataWrite::apply` under the lock.

use serde_json::Value;

use super::MemoryBackend;
use crate::backend::{MetadataKind, MetadataOf, MetadataWrite};
use crate::error::MeshError;

impl MemoryBackend {
    pub(super) fn read_metadata(&self, of: MetadataOf<'_>) -> Option<Value> {
        match of {
            MetadataOf::Connection(id) => self.read_connection_metadata(id),
            MetadataOf::Room(room) => self.read_room_metadata(room),
        }
    }

    pub(super) fn write_metadata(
        &self,
        of: MetadataOf<'_>,
        write: &MetadataWrite,
    ) -> Result<bool, MeshError> {
        match of {
            MetadataOf::Connection(id) => self.write_connection_metadata(id, write),
            MetadataOf::Room(room) => self.write_room_metadata(room, write).map(|()| true),
        }
    }

    pub(super) fn list_metadata(&self, kind: MetadataKind) -> Vec<(String, Value)> {
        match kind {
            MetadataKind::Connection => self.list_connection_metadata(),
            MetadataKind::Room => self.list_room_metadata(),
        }
    }

    fn read_connection_metadata(&self, connection_id: &str) -> Option<Value> {
        self.lock()
            .connections
            .get(connection_id)
            .and_then(|entry| entry.metadata.clone())
    }

    fn write_connection_metadata(
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

    fn list_connection_metadata(&self) -> Vec<(String, Value)> {
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

    fn read_room_metadata(&self, room: &str) -> Option<Value> {
        self.lock().room_metadata.get(room).cloned()
    }

    fn write_room_metadata(&self, room: &str, write: &MetadataWrite) -> Result<(), MeshError> {
        let mut state = self.lock();
        let (merged, _) = write.apply(state.room_metadata.get(room).cloned())?;
        state.room_metadata.insert(room.to_owned(), merged);
        Ok(())
    }

    pub(super) fn remove_room_metadata(&self, room: &str) {
        self.lock().room_metadata.remove(room);
    }

    fn list_room_metadata(&self) -> Vec<(String, Value)> {
        self.lock()
            .room_metadata
            .iter()
            .map(|(room, metadata)| (room.clone(), metadata.clone()))
            .collect()
    }
}
