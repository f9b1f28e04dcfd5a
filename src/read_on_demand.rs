//! A socket whose read buffer exists only while data is arriving.
//!
//! tungstenite assembles frames in a buffer it allocates when the WebSocket is made and
//! keeps for the connection's whole life, and each of its reads takes at most that
//! buffer's initial size from the socket. A buffer large enough to read the socket
//! efficiently is then most of an idle connection's memory. So tungstenite gets a small
//! buffer ([`FRAME_BUFFER_BYTES`]), and reads the socket through this wrapper: it reads
//! up to `read_buffer_size` bytes at once into a buffer of its own, hands them to
//! tungstenite in tungstenite's smaller pieces, and frees that buffer whenever the socket
//! has nothing more to read, which is where an idle connection waits.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The buffer tungstenite keeps for the connection's whole life, and so the most it asks
/// for in one read: a typical command frame fits in it, and a burst of them takes a few
/// reads. At 256 bytes tungstenite's per-read work showed in the rpc profile (2% more
/// instructions per command); from 512 bytes on it did not.
pub(crate) const FRAME_BUFFER_BYTES: usize = 512;

/// An I/O object whose reads go through a buffer held only while data is arriving.
pub(crate) struct ReadOnDemand<T> {
    inner: T,
    /// What the last read from `inner` brought and is not handed on yet; `None` once it
    /// is all handed on and the socket had nothing more.
    buffer: Option<BytesMut>,
    read_size: usize,
}

impl<T> ReadOnDemand<T> {
    /// Reads `inner` up to `read_size` bytes at a time.
    pub(crate) fn new(inner: T, read_size: usize) -> Self {
        ReadOnDemand {
            inner,
            buffer: None,
            read_size: read_size.max(1),
        }
    }

    /// Hands on what is left of the last read; whether there was any.
    fn hand_on(&mut self, out: &mut ReadBuf<'_>) -> bool {
        let Some(buffer) = self.buffer.as_mut().filter(|buffer| !buffer.is_empty()) else {
            return false;
        };
        let take = out.remaining().min(buffer.len());
        out.put_slice(&buffer[..take]);
        buffer.advance(take);
        true
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadOnDemand<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 || this.hand_on(out) {
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= this.read_size {
            // The caller's buffer is as large as ours would be: no copy.
            this.buffer = None;
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        let read_size = this.read_size;
        let buffer = this
            .buffer
            .get_or_insert_with(|| BytesMut::with_capacity(read_size));
        // Empty here: this takes the allocation back whole rather than growing it.
        buffer.reserve(read_size);
        // Into the buffer's spare capacity, which is never zeroed first.
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, buffer) {
            Poll::Ready(Ok(_)) => {
                // At the end of the stream nothing was read, and `out` stays empty.
                this.hand_on(out);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                // Idle until the socket is readable again: nothing to hold on to.
                this.buffer = None;
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadOnDemand<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
