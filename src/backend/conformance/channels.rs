//! Channels: each message is kept (newest first, bounded by count and by bytes), given
//! the next offset of the channel's stream and announced in one step; the history is read
//! newest first up to a limit, or from a position when every message after it is kept.

use std::sync::Arc;

use super::harness::{Case, Instance};
use crate::backend::{
    Backend, ChannelHistory, ChannelPosition, Delivery, HistoryRead, Since, Topic,
};

/// Plenty: a bound that never bites.
const UNBOUNDED_BYTES: usize = 1 << 20;

/// Writes a message, expecting its announcement, with the position the write returned,
/// on every instance that listens. Returns that position.
async fn write<B: Backend>(
    case: &Case<B>,
    from: &Instance<B>,
    channel: &str,
    message: &str,
    history: usize,
    history_bytes: usize,
) -> ChannelPosition {
    let position = from
        .ok(
            format!("write_channel({channel:?}, {message:?}, {history}, {history_bytes})"),
            from.backend
                .write_channel(channel, message, history, history_bytes),
        )
        .await;
    let Some(position) = position else {
        from.fail(format!("write_channel({channel:?}) returned no position"));
    };
    let delivery = Delivery::ChannelMessage {
        channel: Arc::from(channel),
        message: Arc::from(message),
        position: Some(position.clone()),
    };
    for instance in case.both() {
        instance
            .expect(
                &delivery,
                &format!("the announcement of {message:?} on {channel:?}"),
            )
            .await;
    }
    position
}

/// A history read with these bounds and `since`.
async fn read<B: Backend>(
    from: &Instance<B>,
    channel: &str,
    limit: usize,
    since: Option<Since<'_>>,
    max_message_bytes: usize,
    max_bytes: usize,
) -> ChannelHistory {
    from.ok(
        format!(
            "channel_history({channel:?}, {limit}, {since:?}, {max_message_bytes}, {max_bytes})"
        ),
        from.backend.channel_history(
            channel,
            HistoryRead {
                limit,
                since,
                max_message_bytes,
                max_bytes,
            },
        ),
    )
    .await
}

async fn history<B: Backend>(from: &Instance<B>, channel: &str, limit: usize) -> Vec<String> {
    read(from, channel, limit, None, UNBOUNDED_BYTES, UNBOUNDED_BYTES)
        .await
        .messages
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
        let read = |max_message: usize, max_bytes: usize| async move {
            read(instance, "bounded", 10, None, max_message, max_bytes)
                .await
                .messages
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

/// Every message takes the next offset of its channel's stream, on whichever instance it
/// is written; every instance reads the same epoch, even of a channel never written (and
/// keeps it once it is). A read from a position returns exactly the messages after it
/// while all of them are kept, and the newest `limit` with `recovered: false` otherwise:
/// another epoch, a position ahead of the stream, a message published with `history`
/// 0 or trimmed since, more than `at_most` messages, or more than the byte bounds.
pub(super) async fn positions<B: Backend>(case: &Case<B>) {
    let (a, b) = (&case.a, &case.b);
    case.listen_on_both(&Topic::Channel(Arc::from("stream")))
        .await;
    let before = read(a, "stream", 10, None, UNBOUNDED_BYTES, UNBOUNDED_BYTES).await;
    let Some(start) = before.position.clone() else {
        a.fail("a channel never written has no position");
    };
    a.same(start.offset, 0, "the offset of a channel never written");
    let epoch = start.epoch.clone();
    let at = |offset: u64| ChannelPosition {
        epoch: epoch.clone(),
        offset,
    };
    let mut written = Vec::new();
    for (n, from) in (1..=4).zip([b, a, b, a]) {
        let position = write(case, from, "stream", &format!("m{n}"), 10, UNBOUNDED_BYTES).await;
        from.same(position, at(n), "the position of a write");
        written.push(format!("m{n}"));
    }
    let own = Some(&*epoch);
    let exact = |messages: &[&str]| ChannelHistory {
        messages: strings(messages),
        position: Some(at(4)),
        recovered: true,
    };
    let newest = ChannelHistory {
        messages: strings(&["m4"]),
        position: Some(at(4)),
        recovered: false,
    };
    for instance in case.both() {
        let cases = [
            (own, 1, 100, exact(&["m4", "m3", "m2"]), "after offset 1"),
            (
                own,
                0,
                100,
                exact(&["m4", "m3", "m2", "m1"]),
                "after offset 0",
            ),
            (own, 4, 100, exact(&[]), "after the newest"),
            (
                None,
                2,
                100,
                exact(&["m4", "m3"]),
                "after offset 2 of the current epoch",
            ),
            (
                Some("another"),
                2,
                100,
                newest.clone(),
                "after a position of another epoch",
            ),
            (
                own,
                5,
                100,
                newest.clone(),
                "after a position ahead of the stream",
            ),
            (own, 1, 2, newest.clone(), "more messages than at_most"),
        ];
        for (epoch, offset, at_most, expected, what) in cases {
            let since = Since {
                epoch,
                offset,
                at_most,
            };
            let got = read(
                instance,
                "stream",
                1,
                Some(since),
                UNBOUNDED_BYTES,
                UNBOUNDED_BYTES,
            )
            .await;
            instance.same(got, expected, what);
        }
        let since = Since {
            epoch: own,
            offset: 1,
            at_most: 100,
        };
        let bounded = read(instance, "stream", 1, Some(since), UNBOUNDED_BYTES, 5).await;
        instance.same(bounded, newest.clone(), "more bytes than max_bytes");
        let skipping = read(instance, "stream", 1, Some(since), 1, UNBOUNDED_BYTES).await;
        instance.same(
            skipping.recovered,
            false,
            "a message over max_message_bytes",
        );
    }
    // A message not kept: no position before it can be recovered any more.
    write(case, a, "stream", "m5", 0, UNBOUNDED_BYTES).await;
    write(case, b, "stream", "m6", 10, UNBOUNDED_BYTES).await;
    // Trimmed: only the newest three are kept.
    for n in 7..=9 {
        write(case, a, "stream", &format!("m{n}"), 3, UNBOUNDED_BYTES).await;
    }
    for instance in case.both() {
        let recover = |offset: u64| {
            let since = Since {
                epoch: own,
                offset,
                at_most: 100,
            };
            read(
                instance,
                "stream",
                2,
                Some(since),
                UNBOUNDED_BYTES,
                UNBOUNDED_BYTES,
            )
        };
        instance.same(
            recover(6).await,
            ChannelHistory {
                messages: strings(&["m9", "m8", "m7"]),
                position: Some(at(9)),
                recovered: true,
            },
            "after the oldest kept message",
        );
        let lost = ChannelHistory {
            messages: strings(&["m9", "m8"]),
            position: Some(at(9)),
            recovered: false,
        };
        instance.same(recover(5).await, lost.clone(), "after a trimmed message");
        instance.same(recover(4).await, lost.clone(), "before a message not kept");
    }
    case.quiet(a, "channel writes (one announcement each)")
        .await;
}
