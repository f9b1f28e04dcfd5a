//! JSON text for the values replies carry, written byte for byte as `serde_json` writes
//! them, but faster for the common case: a string with nothing to escape is copied as one
//! slice instead of being checked and written byte by byte. Every command's reply goes
//! through here, so this is on the hottest path there is.

use std::fmt::Write as _;

use serde_json::Value;

/// Appends `value` as compact JSON, exactly as `serde_json::to_string` writes it.
pub(super) fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(number) => write_number(out, number),
        Value::String(text) => write_str(out, text),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (index, (key, item)) in map.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_str(out, key);
                out.push(':');
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// Appends `text` as a JSON string.
pub(super) fn write_str(out: &mut String, text: &str) {
    if needs_escaping(text.as_bytes()) {
        // Rare in practice; serde_json knows every escape, so it writes these.
        out.push_str(&serde_json::Value::from(text).to_string());
    } else {
        out.push('"');
        out.push_str(text);
        out.push('"');
    }
}

/// Whether any byte of `bytes` must be escaped in a JSON string. Checked 16 bytes at a
/// time without an early exit inside a block, which the compiler can turn into vector
/// instructions: a byte-by-byte search cost more than writing the rest of the reply.
pub(super) fn needs_escaping(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        if block
            .iter()
            .fold(0u8, |found, &byte| found | u8::from(needs_escape(byte)))
            != 0
        {
            return true;
        }
    }
    blocks.remainder().iter().any(|&byte| needs_escape(byte))
}

/// The bytes JSON strings escape: quote, backslash and the control characters.
fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

fn write_number(out: &mut String, number: &serde_json::Number) {
    if let Some(unsigned) = number.as_u64() {
        out.push_str(itoa::Buffer::new().format(unsigned));
    } else if let Some(signed) = number.as_i64() {
        out.push_str(itoa::Buffer::new().format(signed));
    } else {
        // Floats are rare in replies; `Display` is what serde_json writes for them.
        let _ = write!(out, "{number}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn written(value: &Value) -> String {
        let mut out = String::new();
        write_value(&mut out, value);
        out
    }

    #[test]
    fn finds_an_escape_anywhere() {
        for len in 0..40 {
            assert!(!needs_escaping("x".repeat(len).as_bytes()));
            assert!(!needs_escaping("é😀\u{7f} ~/!#".repeat(len).as_bytes()));
            for at in 0..len {
                for escaped in [b'"', b'\\', b'\n', 0x1f] {
                    let mut bytes = vec![b'x'; len];
                    bytes[at] = escaped;
                    assert!(needs_escaping(&bytes), "{len} {at} {escaped}");
                }
            }
        }
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let values = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(-1),
            json!(1.0),
            json!(-0.0),
            json!(0.1),
            json!(1.5e-7),
            json!(1e300),
            json!(f64::MAX),
            json!(123456789.125),
            json!(""),
            json!("plain text"),
            json!("quote \" backslash \\ slash /"),
            json!("controls \u{0} \u{1} \u{8} \u{9} \n \u{b} \u{c} \r \u{1f} \u{7f}"),
            json!("unicode é 😀 \u{2028} \u{2029}"),
            json!([]),
            json!({}),
            json!([1, "two", [3.5, null], {"four": false}]),
            json!({"b": 1, "a": {"nested \"key\"": [true, {"x\n": "y"}]}, "": ""}),
        ];
        for value in values {
            assert_eq!(
                written(&value),
                serde_json::to_string(&value).unwrap(),
                "{value:?}"
            );
        }
    }
}
