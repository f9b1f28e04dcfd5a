//! Records: versioned writes computed from the stored record, serialised across
//! instances, announced atomically; reads by id, ordered id listings, deletions.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::harness::{Case, Instance};
use crate::backend::{Backend, Delivery, RecordUpdater, RecordWrite, StoredRecord, Topic};
use crate::error::MeshError;

/// The exposure whose collections hear of every write of these cases.
const EXPOSURE: &str = "docs/*";

/// What a write of `value` as `version` of `id` announces: the record's new version, then
/// the change to its collections.
fn announcements(id: &str, version: u64, json: &Arc<str>) -> Vec<Delivery> {
    vec![
        Delivery::Record {
            record_id: Arc::from(id),
            version,
            value: json.clone(),
            patch: None,
        },
        Delivery::RecordsChanged {
            exposure: Arc::from(EXPOSURE),
            record_id: Arc::from(id),
        },
    ]
}

/// An update that stores `value`, announcing it unless `quiet`, and remembers which
/// stored record it was computed from.
struct SetTo {
    id: &'static str,
    value: Value,
    announce: bool,
    seen: Mutex<Vec<Option<StoredRecord>>>,
}

impl SetTo {
    fn new(id: &'static str, value: Value, announce: bool) -> Arc<Self> {
        Arc::new(SetTo {
            id,
            value,
            announce,
            seen: Mutex::new(Vec::new()),
        })
    }

    fn update(&self, current: Option<&StoredRecord>) -> Result<Option<RecordWrite>, MeshError> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(current.cloned());
        }
        let version = current.map_or(0, |record| record.version) + 1;
        let json: Arc<str> = Arc::from(self.value.to_string());
        Ok(Some(RecordWrite {
            value: self.value.clone(),
            announcements: if self.announce {
                announcements(self.id, version, &json)
            } else {
                Vec::new()
            },
            json,
        }))
    }

    /// The stored record the last run of the update saw.
    fn last_seen(&self) -> Option<StoredRecord> {
        self.seen
            .lock()
            .ok()
            .and_then(|seen| seen.last().cloned())
            .flatten()
    }
}

async fn set<B: Backend>(from: &Instance<B>, write: &Arc<SetTo>) -> Option<StoredRecord> {
    // Updaters are 'static (`RecordUpdater` is a `dyn Fn` without a lifetime).
    let id = write.id;
    let write = write.clone();
    let update = move |current: Option<&StoredRecord>| write.update(current);
    from.ok(
        format!("update_record({id:?})"),
        from.backend.update_record(id, &update),
    )
    .await
}

async fn read<B: Backend>(from: &Instance<B>, ids: &[&str]) -> Vec<Option<StoredRecord>> {
    let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    from.ok(format!("records({ids:?})"), from.backend.records(&ids))
        .await
}

async fn ids<B: Backend>(from: &Instance<B>, prefix: &str) -> Vec<String> {
    from.ok(
        format!("record_ids({prefix:?})"),
        from.backend.record_ids(prefix),
    )
    .await
}

/// Expects a write's announcements on both instances (both listen).
async fn announced<B: Backend>(case: &Case<B>, id: &str, version: u64, value: &Value) {
    let json: Arc<str> = Arc::from(value.to_string());
    for instance in case.both() {
        for delivery in announcements(id, version, &json) {
            instance
                .expect(
                    &delivery,
                    &format!("the announcement of version {version} of {id:?}"),
                )
                .await;
        }
    }
}

/// The first write is version 1 and each next one more; an update that changes nothing
/// or fails stores and announces nothing; reads keep the order asked, with `None` for a
/// missing record.
pub(super) async fn writes<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&Topic::Record(Arc::from("doc"))).await;
    case.listen_on_both(&Topic::Collections(Arc::from(EXPOSURE)))
        .await;
    let missing = read(b, &["doc"]).await;
    b.same(missing, vec![None], "a record never written");

    // Keys out of order: with `preserve-order` they must come back as written.
    let first = json!({ "title": "one", "zeta": 1, "alpha": [1, 2] });
    let write = SetTo::new("doc", first.clone(), true);
    let stored = set(a, &write).await;
    a.same(
        write.last_seen(),
        None,
        "what the first update of a record saw",
    );
    let expected = StoredRecord {
        value: first.clone(),
        version: 1,
    };
    a.same(
        stored,
        Some(expected.clone()),
        "what the first write stored",
    );
    announced(case, "doc", 1, &first).await;
    for instance in case.both() {
        let stored = read(instance, &["doc"]).await;
        instance.same(
            &stored,
            &vec![Some(expected.clone())],
            "the record after the first write",
        );
        if let Some(Some(record)) = stored.first() {
            instance.same_json(&record.value, &first, "the stored value");
        }
    }

    let unchanged = |_: Option<&StoredRecord>| Ok(None);
    let stored = b
        .ok(
            "update_record that changes nothing",
            b.backend.update_record("doc", &unchanged),
        )
        .await;
    b.same(stored, None, "update_record whose update returns None");
    let refusal = |_: Option<&StoredRecord>| {
        Err(MeshError::TooLarge {
            what: "record \"doc\"".to_owned(),
            setting: "max_record_bytes",
            limit: 10,
            size: 20,
        })
    };
    let refused = b
        .refused(
            "update_record whose update fails",
            b.backend.update_record("doc", &refusal),
        )
        .await;
    b.check(
        matches!(
            refused,
            MeshError::TooLarge {
                limit: 10,
                size: 20,
                ..
            }
        ),
        format!("update_record returned {refused:?}, not the update's error"),
    );
    let stored = a
        .ok(
            "update_record of a missing record that changes nothing",
            a.backend.update_record("ghost", &unchanged),
        )
        .await;
    a.same(
        stored,
        None,
        "update_record of a missing record whose update returns None",
    );
    case.quiet(a, "updates that store nothing (they announce nothing)")
        .await;
    for instance in case.both() {
        let stored = read(instance, &["doc", "ghost"]).await;
        instance.same(
            stored,
            vec![Some(expected.clone()), None],
            "the records after updates that stored nothing",
        );
        let listed = ids(instance, "").await;
        instance.same(
            listed,
            vec!["doc".to_owned()],
            "record_ids after updates that stored nothing",
        );
    }

    let second = json!({ "title": "two" });
    let write = SetTo::new("doc", second.clone(), true);
    let stored = set(b, &write).await;
    b.same(
        write.last_seen(),
        Some(expected),
        "what the second update saw",
    );
    let expected = StoredRecord {
        value: second.clone(),
        version: 2,
    };
    b.same(
        stored,
        Some(expected.clone()),
        "what the second write stored",
    );
    announced(case, "doc", 2, &second).await;
    for instance in case.both() {
        let stored = read(instance, &["ghost", "doc"]).await;
        instance.same(
            stored,
            vec![None, Some(expected.clone())],
            "records(ids): the order asked, None for a missing one",
        );
        let none = read(instance, &[]).await;
        instance.same(none, Vec::new(), "records of no ids");
    }
}

/// Writers on both instances at once: every write is stored, each as its own version.
pub(super) async fn concurrent_writers<B: Backend>(case: &Case<B>) {
    const WRITES: u64 = 25;
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&Topic::Record(Arc::from("counter")))
        .await;
    case.listen_on_both(&Topic::Collections(Arc::from(EXPOSURE)))
        .await;
    let increment: &RecordUpdater = &|current| {
        let count = current
            .and_then(|record| record.value.get("count"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let version = current.map_or(0, |record| record.version) + 1;
        let value = json!({ "count": count + 1 });
        let json: Arc<str> = Arc::from(value.to_string());
        Ok(Some(RecordWrite {
            value,
            announcements: announcements("counter", version, &json),
            json,
        }))
    };
    let (from_a, from_b) = tokio::join!(
        write_many(a, "counter", WRITES, increment),
        write_many(b, "counter", WRITES, increment),
    );
    let mut versions = Vec::new();
    for record in from_a.iter().chain(&from_b) {
        let Some(record) = record else {
            a.fail("update_record whose update always writes returned None");
        };
        a.same(
            record.value.clone(),
            json!({ "count": record.version }),
            "a concurrent write's value (one more than the version it replaced: no write lost)",
        );
        versions.push(record.version);
    }
    versions.sort_unstable();
    a.same(
        versions,
        (1..=2 * WRITES).collect::<Vec<_>>(),
        "the versions of concurrent writes (each used once)",
    );
    for instance in case.both() {
        let stored = read(instance, &["counter"]).await;
        instance.same(
            stored,
            vec![Some(StoredRecord {
                value: json!({ "count": 2 * WRITES }),
                version: 2 * WRITES,
            })],
            "the record after concurrent writes",
        );
        for version in 1..=2 * WRITES {
            let json: Arc<str> = Arc::from(json!({ "count": version }).to_string());
            for delivery in announcements("counter", version, &json) {
                instance
                    .expect(
                        &delivery,
                        &format!("the announcement of version {version}, in order"),
                    )
                    .await;
            }
        }
    }
}

/// Runs `update` on record `id` `times` times, one after another.
async fn write_many<B: Backend>(
    from: &Instance<B>,
    id: &str,
    times: u64,
    update: &RecordUpdater,
) -> Vec<Option<StoredRecord>> {
    let mut stored = Vec::new();
    for _ in 0..times {
        let record = from
            .ok(
                format!("update_record({id:?})"),
                from.backend.update_record(id, update),
            )
            .await;
        stored.push(record);
    }
    stored
}

/// Ids are listed in byte order, filtered by prefix; a deletion returns what was stored
/// and announces it, a missing record deletes nothing, and a record written after its
/// deletion starts again at version 1.
pub(super) async fn ids_and_deletes<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    let written = ["b", "a/2", "a", "ab", "a/1", "B", "\u{e9}", "z", "a/1"];
    for (id, from) in written.into_iter().zip([a, b].into_iter().cycle()) {
        set(from, &SetTo::new(id, json!({ "id": id }), false)).await;
    }
    for instance in case.both() {
        for (prefix, expected) in [
            ("", &["B", "a", "a/1", "a/2", "ab", "b", "z", "\u{e9}"][..]),
            ("a", &["a", "a/1", "a/2", "ab"]),
            ("a/", &["a/1", "a/2"]),
            ("\u{e9}", &["\u{e9}"]),
            ("c", &[]),
        ] {
            let listed = ids(instance, prefix).await;
            let expected: Vec<String> = expected.iter().map(|id| id.to_string()).collect();
            instance.same(
                listed,
                expected,
                &format!("record_ids({prefix:?}): byte order"),
            );
        }
    }

    case.listen_on_both(&Topic::Record(Arc::from("a/1"))).await;
    case.listen_on_both(&Topic::Collections(Arc::from(EXPOSURE)))
        .await;
    let announce = |stored: &StoredRecord| {
        vec![Delivery::RecordDeleted {
            record_id: Arc::from("a/1"),
            version: stored.version,
        }]
    };
    let deleted = b
        .ok(
            "delete_record(\"a/1\")",
            b.backend.delete_record("a/1", &announce),
        )
        .await;
    b.same(
        deleted,
        Some(StoredRecord {
            value: json!({ "id": "a/1" }),
            version: 2,
        }),
        "what delete_record returned (the stored record)",
    );
    let notice = Delivery::RecordDeleted {
        record_id: Arc::from("a/1"),
        version: 2,
    };
    for instance in case.both() {
        instance.expect(&notice, "the deletion notice").await;
        let stored = read(instance, &["a/1", "a/2"]).await;
        instance.same(
            stored,
            vec![
                None,
                Some(StoredRecord {
                    value: json!({ "id": "a/2" }),
                    version: 1,
                }),
            ],
            "the records after a deletion",
        );
        let listed = ids(instance, "a/").await;
        instance.same(
            listed,
            vec!["a/2".to_owned()],
            "record_ids after a deletion",
        );
    }
    let deleted = a
        .ok(
            "delete_record of a missing record",
            a.backend.delete_record("a/1", &announce),
        )
        .await;
    a.same(deleted, None, "delete_record of a missing record");
    case.quiet(a, "a deletion of a missing record (announces nothing)")
        .await;

    let again = json!({ "id": "a/1", "again": true });
    let write = SetTo::new("a/1", again.clone(), true);
    let stored = set(a, &write).await;
    a.same(
        write.last_seen(),
        None,
        "what an update after a deletion saw",
    );
    a.same(
        stored,
        Some(StoredRecord {
            value: again.clone(),
            version: 1,
        }),
        "a write after a deletion (version 1 again)",
    );
    announced(case, "a/1", 1, &again).await;
}
