//! Channels: each keeps its newest messages, bounded by count and bytes, and a message
//! is kept and announced under one lock.

use std::collections::VecDeque;

use super::MemoryBackend;
use crate::backend::Delivery;

impl MemoryBackend {
    pub(super) fn append_to_channel(
        &self,
        channel: &str,
        message: &str,
        history: usize,
        history_bytes: usize,
        announcement: Delivery,
    ) {
        let mut state = self.lock();
        if history > 0 {
            let kept = state.channel_history.entry(channel.to_owned()).or_default();
            kept.push(message, history, history_bytes);
        }
        state.announcements.push(announcement);
        state.flush();
    }

    pub(super) fn read_channel_history(
        &self,
        channel: &str,
        limit: usize,
        max_message_bytes: usize,
        max_bytes: usize,
    ) -> Vec<String> {
        let state = self.lock();
        let Some(kept) = state.channel_history.get(channel) else {
            return Vec::new();
        };
        let mut read = Vec::new();
        let mut total = 0usize;
        for message in kept.messages.iter() {
            if read.len() >= limit || total > max_bytes {
                break;
            }
            if message.len() <= max_message_bytes {
                total = total.saturating_add(message.len());
                read.push(message.clone());
            }
        }
        read
    }
}

/// One channel's kept messages, newest first, and their size in bytes.
#[derive(Default)]
pub(super) struct History {
    messages: VecDeque<String>,
    bytes: usize,
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
}
