//! Byte limits (records, channels, presence, rooms, registry and collections suites).

use serde_json::{json, Value};

/// A JSON object `{key: "xx…x"}` whose text is exactly `bytes` long.
pub(crate) fn object_of_size(key: &str, bytes: usize) -> Value {
    let overhead = json!({ key: "" }).to_string().len();
    let value = json!({ key: "x".repeat(bytes - overhead) });
    assert_eq!(value.to_string().len(), bytes);
    value
}

/// Asserts that a reply's `payload` refuses a write over a byte limit: `EINVALID`, with a
/// message naming the builder `setting` that sets the limit.
pub(crate) fn assert_over_byte_limit(payload: &Value, setting: &str) {
    assert_eq!(payload["code"], "EINVALID", "{payload}");
    assert_eq!(payload["name"], "CommandError", "{payload}");
    let message = payload["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {payload}"));
    assert!(
        message.contains(setting),
        "the message must name {setting}: {payload}"
    );
}

/// Asserts that `result` is [`tower_mesh::MeshError::TooLarge`] for `setting`, with
/// `limit` and the refused value's `size`, and that its message names the setting.
pub(crate) fn assert_too_large<T: std::fmt::Debug>(
    result: Result<T, tower_mesh::MeshError>,
    setting: &str,
    limit: usize,
    size: usize,
) {
    match result {
        Err(
            err @ tower_mesh::MeshError::TooLarge {
                setting: refused_by,
                limit: refused_over,
                size: refused_size,
                ..
            },
        ) => {
            assert_eq!(
                (refused_by, refused_over, refused_size),
                (setting, limit, size),
                "{err}"
            );
            assert!(err.to_string().contains(setting), "{err}");
        }
        other => panic!("expected TooLarge ({setting}), got {other:?}"),
    }
}
