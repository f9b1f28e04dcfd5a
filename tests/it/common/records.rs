//! Records under continuous writes, and following their updates (records and
//! collections suites).

use serde_json::{json, Value};
use tower_mesh::{MergeStrategy, Mesh};

use super::{within, RawClient};

/// Writes `value` over the record (replacing it) on `mesh`; returns the new version, or
/// `None` when nothing changed.
pub(crate) async fn write_record(mesh: &Mesh, record_id: &str, value: Value) -> Option<u64> {
    mesh.write_record(record_id, value, MergeStrategy::Replace)
        .await
        .expect("write_record")
}

/// Writes `{"n": k}` to a record without pause (k = 1, 2, ...; so version k holds
/// `{"n": k}`), on `mesh`, until dropped.
pub(crate) struct ContinuousWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<u64>>,
}

impl ContinuousWriter {
    /// Starts once the first write (version 1) is stored.
    pub(crate) async fn start(mesh: &Mesh, record_id: &str) -> ContinuousWriter {
        mesh.write_record(record_id, json!({ "n": 1 }), Default::default())
            .await
            .expect("write_record");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mesh, record_id, stopped) = (mesh.clone(), record_id.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 1;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                mesh.write_record(&record_id, json!({ "n": n }), Default::default())
                    .await
                    .expect("write_record");
                tokio::task::yield_now().await;
            }
            n
        });
        ContinuousWriter {
            stop,
            task: Some(task),
        }
    }

    /// Stops writing; returns how many writes were made.
    pub(crate) async fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let task = self.task.take().expect("running");
        within("the writer to stop", task).await.expect("writer")
    }
}

impl Drop for ContinuousWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Follows the `mesh/record-update` pushes of `record_id` on `client` until `deadline` or
/// until the reply `until_reply` arrives (whichever the caller asks for), asserting that
/// each one is exactly the next version after `version` and holds `{"n": version}`
/// (patches are applied to `document`). Returns how many updates arrived and the reply,
/// if one was awaited.
pub(crate) async fn follow_consecutive_updates(
    client: &mut RawClient,
    record_id: &str,
    document: &mut Value,
    version: &mut u64,
    deadline: Option<tokio::time::Instant>,
    until_reply: Option<u64>,
) -> (usize, Option<Value>) {
    let mut updates = 0;
    loop {
        let frame = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, client.next()).await {
                Ok(frame) => frame,
                Err(_) => return (updates, None),
            },
            None => within("a reply", client.next()).await,
        };
        if until_reply.is_some() && frame["id"].as_u64() == until_reply {
            return (updates, Some(frame));
        }
        if frame.get("id").is_some() || frame["command"] != "mesh/record-update" {
            continue;
        }
        let update = &frame["payload"];
        if update["recordId"] != record_id {
            continue;
        }
        let got = update["version"].as_u64().expect("a version");
        assert_eq!(
            got,
            *version + 1,
            "after version {version}, the next update must be version {}: {update}",
            *version + 1
        );
        if let Some(patch) = update.get("patch") {
            let patch: json_patch::Patch =
                serde_json::from_value(patch.clone()).expect("a JSON patch");
            json_patch::patch(document, &patch).expect("the patch applies");
        } else {
            *document = update["full"].clone();
        }
        assert_eq!(*document, json!({ "n": got }), "the value at version {got}");
        *version = got;
        updates += 1;
    }
}
