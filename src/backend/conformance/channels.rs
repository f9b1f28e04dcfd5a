//! Channels: each message is kept (newest first, bounded by count and by bytes) and
//! announced in one step; the history is read newest first up to a limit.

use std::sync::Arc;

use serde_json::json;

use super::harness::{push, Case, Instance};
use crate::backend::{Backend, Delivery, Topic};

/// Plenty: a bound that never bites.
const UNBOUNDED_BYTES: usize = 1 << 20;

fn announcement(channel: &str, message: &str) -> Delivery {
    Delivery::Topic {
        topic: Topic::Channel(Arc::from(channel)),
        push: push(
            "channel-message", // opaque to a backend
            json!({ "channel": channel, "message": message }),
        ),
        exclude: Arc::from(Vec::new()),
    }
}

/// Writes a message, expecting its announcement on every instance that listens.
async fn write<B: Backend>(
    case: &Case<B>,
    from: &Instance<B>,
    channel: &str,
    message: &str,
    history: usize,
    history_bytes: usize,
) {
    let delivery = announcement(channel, message);
    from.ok(
        format!("write_channel({channel:?}, {message:?}, {history}, {history_bytes})"),
        from.backend
            .write_channel(channel, message, history, history_bytes, delivery.clone()),
    )
    .await;
    for instance in case.both() {
        instance
            .expect(
                &delivery,
                &format!("the announcement of {message:?} on {channel:?}"),
            )
            .await;
    }
}

async fn history<B: Backend>(from: &Instance<B>, channel: &str, limit: usize) -> Vec<String> {
    from.ok(
        format!("channel_history({channel:?}, {limit})"),
        from.backend
            .channel_history(channel, limit, UNBOUNDED_BYTES, UNBOUNDED_BYTES),
    )
    .await
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

/// The history keeps the newest `history` messages, newest first; a smaller bound on a
/// later write trims to it; reads stop at their limit.
pub(super) async fn count_bound<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&Topic::Channel(Arc::from("news")))
        .await;
    for instance in case.both() {
        let empty = history(instance, "news", 10).await;
        instance.same(empty, Vec::new(), "the history of a channel never written");
    }
    for (n, from) in (1..=5).zip([a, b].into_iter().cycle()) {
        write(
            case,
            from,
            "news",
            &format!("message {n}"),
            3,
            UNBOUNDED_BYTES,
        )
        .await;
    }
    for instance in case.both() {
        let kept = history(instance, "news", 10).await;
        instance.same(
            kept,
            strings(&["message 5", "message 4", "message 3"]),
            "the history bounded to 3 messages, newest first",
        );
        let limited = history(instance, "news", 2).await;
        instance.same(
            limited,
            strings(&["message 5", "message 4"]),
            "channel_history with a limit of 2",
        );
        let none = history(instance, "news", 0).await;
        instance.same(none, Vec::new(), "channel_history with a limit of 0");
    }
    write(case, b, "news", "message 6", 2, UNBOUNDED_BYTES).await;
    for instance in case.both() {
        let kept = history(instance, "news", 10).await;
        instance.same(
            kept,
            strings(&["message 6", "message 5"]),
            "the history after a write with a smaller count bound",
        );
    }
    case.quiet(a, "channel writes (one announcement each)")
        .await;
}

/// The history keeps at most `history_bytes` bytes, the oldest going first (a message
/// over the bound alone is not kept); with `history` 0 the message is not kept, and
/// still announced.
pub(super) async fn byte_bound<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    for channel in ["sized", "live-only"] {
        case.listen_on_both(&Topic::Channel(Arc::from(channel)))
            .await;
    }
    // Ten bytes each: two fit in 25 bytes, three do not.
    for (message, from) in ["message-01", "message-02", "message-03"]
        .into_iter()
        .zip([a, b, a])
    {
        write(case, from, "sized", message, 10, 25).await;
    }
    for instance in case.both() {
        let kept = history(instance, "sized", 10).await;
        instance.same(
            kept,
            strings(&["message-03", "message-02"]),
            "the history bounded to 25 bytes",
        );
    }
    let too_big = "x".repeat(30);
    write(case, b, "sized", &too_big, 10, 25).await;
    for instance in case.both() {
        let kept = history(instance, "sized", 10).await;
        instance.same(
            kept,
            Vec::new(),
            "the history after a message over the byte bound",
        );
    }
    write(case, a, "sized", "message-04", 10, 25).await;
    for instance in case.both() {
        let kept = history(instance, "sized", 10).await;
        instance.same(
            kept,
            strings(&["message-04"]),
            "the history after it emptied",
        );
    }

    write(case, a, "live-only", "not kept", 0, UNBOUNDED_BYTES).await;
    for instance in case.both() {
        let kept = history(instance, "live-only", 10).await;
        instance.same(
            kept,
            Vec::new(),
            "the history of a channel written with history 0",
        );
    }
    case.quiet(b, "channel writes (one announcement each)")
        .await;
}

/// A history read leaves out messages over its message bound (only other writers than
/// the mesh keep one), and stops after the message that takes it past its byte bound.
pub(super) async fn read_bounds<B: Backend>(case: &Case<B>) {
    let a = &case.a;
    case.listen_on_both(&Topic::Channel(Arc::from("bounded")))
        .await;
    for message in ["aaaa", "bbbbbbbbbb", "cc", "dddd"] {
        write(case, a, "bounded", message, 10, UNBOUNDED_BYTES).await;
    }
    for instance in case.both() {
        let read = |max_message: usize, max_bytes: usize| {
            let description =
                format!("channel_history(\"bounded\", 10, {max_message}, {max_bytes})");
            instance.ok(
                description,
                instance
                    .backend
                    .channel_history("bounded", 10, max_message, max_bytes),
            )
        };
        let skipped = read(5, UNBOUNDED_BYTES).await;
        instance.same(
            skipped,
            strings(&["dddd", "cc", "aaaa"]),
            "the history without the message over 5 bytes",
        );
        let stopped = read(UNBOUNDED_BYTES, 5).await;
        instance.same(
            stopped,
            strings(&["dddd", "cc"]),
            "the history up to the message that takes it past 5 bytes",
        );
        let exact = read(UNBOUNDED_BYTES, 6).await;
        instance.same(
            exact,
            strings(&["dddd", "cc", "bbbbbbbbbb"]),
            "the history up to the message that takes it past 6 bytes",
        );
    }
    case.quiet(a, "channel writes (one announcement each)")
        .await;
}
