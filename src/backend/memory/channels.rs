//! Channels: each keeps its newest messages, bounded by count and bytes, and a message
//! is kept, given its offset and announced under one lock.
//!
//! Nothing in memory is ever lost while the process runs, so one epoch, made when the
//! backend is, serves every channel: a new process is a new epoch.

use std::collections::VecDeque;
use std::sync::Arc;

use super::MemoryBackend;
use crate::backend::{ChannelHistory, ChannelPosition, Delivery, HistoryRead, Since};

impl MemoryBackend {
    pub(super) fn append_to_channel(
        &self,
        channel: &str,
        message: &str,
        history: usize,
        history_bytes: usize,
    ) -> ChannelPosition {
        let mut state = self.lock();
        let epoch = state.epoch.0.clone();
        let kept = state.channel_history.entry(channel.to_owned()).or_default();
        kept.offset += 1;
        let offset = kept.offset;
        if history > 0 {
            kept.push(message, history, history_bytes);
        } else {
            kept.gap = offset;
        }
        let position = ChannelPosition { epoch, offset };
        state.announcements.push(Delivery::ChannelMessage {
            channel: Arc::from(channel),
            message: Arc::from(message),
            position: Some(position.clone()),
        });
        state.flush();
        position
    }

    pub(super) fn read_channel_history(
        &self,
        channel: &str,
        read: HistoryRead<'_>,
    ) -> ChannelHistory {
        let state = self.lock();
        let epoch = state.epoch.0.clone();
        let Some(kept) = state.channel_history.get(channel) else {
            let recovered = read
                .since
                .is_some_and(|since| since.offset == 0 && since.epoch.is_none_or(|e| *e == *epoch));
            return ChannelHistory {
                messages: Vec::new(),
                position: Some(ChannelPosition { epoch, offset: 0 }),
                recovered,
            };
        };
        let position = Some(ChannelPosition {
            epoch: epoch.clone(),
            offset: kept.offset,
        });
        if let Some(messages) = read
            .since
            .and_then(|since| kept.after(since, &epoch, read.max_message_bytes, read.max_bytes))
        {
            return ChannelHistory {
                messages,
                position,
                recovered: true,
            };
        }
        let mut messages = Vec::new();
        let mut total = 0usize;
        for message in kept.messages.iter() {
            if messages.len() >= read.limit || total > read.max_bytes {
                break;
            }
            if message.len() <= read.max_message_bytes {
                total = total.saturating_add(message.len());
                messages.push(message.clone());
            }
        }
        ChannelHistory {
            messages,
            position,
            recovered: false,
        }
    }
}

/// The memory backend's one epoch.
pub(super) struct Epoch(pub(super) Arc<str>);

impl Default for Epoch {
    fn default() -> Self {
        Epoch(Arc::from(crate::backend::new_epoch()))
    }
}

/// One channel's stream: its kept messages, newest first, and their size in bytes; the
/// offset of the newest message published, and of the newest one not kept.
#[derive(Default)]
pub(super) struct History {
    messages: VecDeque<String>,
    bytes: usize,
    offset: u64,
    /// Messages at or before this one may be missing from `messages`; the kept ones
    /// after it are `offset`, `offset - 1`, … with none left out.
    gap: u64,
}

impl History {
    /// Keeps `message` as the newest, then drops the oldest until at most `count`
    /// messages and `max_bytes` bytes remain.
    fn push(&mut self, message: &str, count: usize, max_bytes: usize) {
        self.messages.push_front(message.to_owned());
        self.bytes += message.len();
        while self.messages.len() > count || self.bytes > max_bytes {
            match self.messages.pop_back() {
                Some(oldest) => self.bytes -= oldest.len(),
                None => break,
            }
        }
        if self.messages.capacity() > 2 * self.messages.len() + 16 {
            self.messages.shrink_to_fit();
        }
    }

    /// Every message after `since`, newest first, when all of them are kept, within the
    /// bounds; `None` otherwise.
    fn after(
        &self,
        since: Since<'_>,
        epoch: &str,
        max_message_bytes: usize,
        max_bytes: usize,
    ) -> Option<Vec<String>> {
        if since.epoch.is_some_and(|theirs| theirs != epoch)
            || since.offset > self.offset
            || since.offset < self.gap
        {
            return None;
        }
        let missed = usize::try_from(self.offset - since.offset).ok()?;
        if missed > since.at_most || missed > self.messages.len() {
            return None;
        }
        let mut total = 0usize;
        let mut out = Vec::with_capacity(missed);
        for message in self.messages.iter().take(missed) {
            total = total.saturating_add(message.len());
            if message.len() > max_message_bytes || total > max_bytes {
                return None;
            }
            out.push(message.clone());
        }
        Some(out)
    }
}
