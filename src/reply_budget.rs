//! Replies that list many things (channel history, presence, collection members) never
//! grow past the frame limit: they hold the entries that fit, in the order the reply
//! lists them (for history, newest first), and say `truncated: true` (docs/protocol.md §7;
//! mesh's client ignores the field).

use serde::Serialize;

use crate::mesh::Mesh;

/// Room left in a reply's budget for its envelope: the id, the command name and the
/// reply's fixed fields.
const ENVELOPE_BYTES: usize = 1024;

/// How many bytes of listed entries a reply may hold.
pub(crate) fn for_entries(mesh: &Mesh) -> usize {
    mesh.config().max_frame_bytes.saturating_sub(ENVELOPE_BYTES)
}

/// The length of `value` as compact JSON text, counted without building the text.
pub(crate) fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and JSON values always serialise.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The leading `entries` whose sizes (plus a separating comma each) fit in `budget`, and
/// whether any were left out.
pub(crate) fn leading_that_fit<T>(
    entries: Vec<T>,
    budget: usize,
    size: impl Fn(&T) -> usize,
) -> (Vec<T>, bool) {
    let mut used = 0usize;
    let mut kept = 0;
    for entry in &entries {
        used = used.saturating_add(size(entry) + 1);
        if used > budget {
            break;
        }
        kept += 1;
    }
    let truncated = kept < entries.len();
    let mut entries = entries;
    entries.truncate(kept);
    (entries, truncated)
}

/// Adds `"truncated": true` to a reply object when entries were left out (and nothing
/// otherwise, so complete replies stay exactly as mesh sends them).
pub(crate) fn mark(mut reply: serde_json::Value, truncated: bool) -> serde_json::Value {
    if truncated {
        if let Some(fields) = reply.as_object_mut() {
            fields.insert("truncated".to_owned(), serde_json::Value::Bool(true));
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_json_text_exactly() {
        let value = json!({"a": "x\"y", "b": [1, 2.5, null]});
        assert_eq!(json_len(&value), value.to_string().len());
        assert_eq!(json_len("é\n"), "\"é\\n\"".len());
    }

    #[test]
    fn keeps_the_leading_entries_that_fit() {
        let (kept, truncated) = leading_that_fit(vec![3, 3, 3], 8, |n| *n);
        assert_eq!((kept, truncated), (vec![3, 3], true));
        let (kept, truncated) = leading_that_fit(vec![3, 3], 8, |n| *n);
        assert_eq!((kept, truncated), (vec![3, 3], false));
        let (kept, truncated) = leading_that_fit(vec![9], 8, |n| *n);
        assert_eq!((kept, truncated), (Vec::<usize>::new(), true));
    }
}
