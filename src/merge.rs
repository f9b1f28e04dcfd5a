//! How a metadata write combines with the stored value (mesh's `strategy` option).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a new metadata value combines with the stored one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MergeStrategy {
    /// Store the new value as it is (the default).
    #[default]
    Replace,
    /// When both values are objects, overlay the new keys on the old (one level deep);
    /// otherwise store the new value.
    Merge,
    /// Like `Merge`, but nested objects merge recursively; arrays and scalars replace.
    DeepMerge,
}

impl MergeStrategy {
    /// Combines `old` (absent when nothing is stored) with `new`.
    pub fn apply(self, old: Option<Value>, new: Value) -> Value {
        match (self, old) {
            (MergeStrategy::Replace, _) | (_, None) => new,
            (MergeStrategy::Merge, Some(Value::Object(mut old))) => match new {
                Value::Object(new) => {
                    old.extend(new);
                    Value::Object(old)
                }
                new => new,
            },
            (MergeStrategy::DeepMerge, Some(old)) => deep_merge(old, new),
            (MergeStrategy::Merge, Some(_)) => new,
        }
    }
}

fn deep_merge(old: Value, new: Value) -> Value {
    match (old, new) {
        (Value::Object(mut old), Value::Object(new)) => {
            for (key, value) in new {
                // In place: removing and inserting again would move the key to the end.
                match old.get_mut(&key) {
                    Some(previous) => *previous = deep_merge(previous.take(), value),
                    None => {
                        old.insert(key, value);
                    }
                }
            }
            Value::Object(old)
        }
        (_, new) => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategies() {
        let old = json!({"name":"a","preferences":{"notifications":{"email":true},"theme":"dark"}});
        let new = json!({"preferences":{"notifications":{"push":false}}});
        assert_eq!(
            MergeStrategy::Replace.apply(Some(old.clone()), new.clone()),
            new
        );
        assert_eq!(
            MergeStrategy::Merge.apply(Some(old.clone()), new.clone()),
            json!({"name":"a","preferences":{"notifications":{"push":false}}})
        );
        assert_eq!(
            MergeStrategy::DeepMerge.apply(Some(old), new),
            json!({"name":"a","preferences":{"notifications":{"email":true,"push":false},"theme":"dark"}})
        );
        assert_eq!(
            MergeStrategy::Merge.apply(Some(json!("initial-string")), json!({"a":1})),
            json!({"a":1})
        );
        assert_eq!(MergeStrategy::DeepMerge.apply(None, json!([1])), json!([1]));
    }

    #[test]
    fn parses_wire_names() {
        let parsed: MergeStrategy = serde_json::from_value(json!("deepMerge")).unwrap();
        assert_eq!(parsed, MergeStrategy::DeepMerge);
    }
}
