// Copyright 2019 Parity Technologies (UK) Ltd.
//
// Permission is hereby granted, free of charge, to any person obtaining a
// copy of this software and associated documentation files (the "Software"),
// to deal in the Software without restriction, including without limitation
// the rights to use, copy, modify, merge, publish, distribute, sublicense,
// and/or sell copies of the Software, and to permit persons to whom the
// Software is furnished to do so, subject to the following conditions:
//
// The above copyright notice and this permission notice shall be included in
// all copies or substantial portions of the Software.
//
// THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
// OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
// FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
// AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
// LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING
// FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
// DEALINGS IN THE SOFTWARE.

//! Noise protocol I/O.

mod framed;
pub(crate) mod handshake;
use std::{
    cmp::min,
    fmt, io,
    pin::Pin,
    task::{Context, Poll},
};

use asynchronous_codec::Framed;
use framed::{Codec, MAX_FRAME_LEN};
use futures::{prelude::*, ready};

/// A noise session to a remote.
///
/// `T` is the type of the underlying I/O resource.
pub struct Output<T> {
    io: Framed<T, Codec<snow::TransportState>>,
    /// meshsync patch: the last frame's cleartext, `recv_buffer[recv_offset..recv_len]` still
    /// to read. Frames are decrypted into this one buffer (it grows to the largest frame and
    /// keeps that length), not into a zero-filled new one each.
    recv_buffer: Vec<u8>,
    recv_len: usize,
    recv_offset: usize,
    send_buffer: Vec<u8>,
    send_offset: usize,
    /// meshsync patch: the protocol name the session was negotiated under.
    protocol: &'static str,
}

impl<T> fmt::Debug for Output<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseOutput").finish()
    }
}

impl<T> Output<T> {
    fn new(io: Framed<T, Codec<snow::TransportState>>) -> Self {
        Output {
            io,
            recv_buffer: Vec::new(),
            recv_len: 0,
            recv_offset: 0,
            send_buffer: Vec::new(),
            send_offset: 0,
            protocol: crate::PROTOCOL_CHACHA,
        }
    }

    /// meshsync patch: the protocol name the session was negotiated under
    /// ([`crate::PROTOCOL_CHACHA`] or [`crate::PROTOCOL_AESGCM`]).
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    pub(crate) fn with_protocol(mut self, protocol: &'static str) -> Self {
        self.protocol = protocol;
        self
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Output<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let len = self.recv_len;
            let off = self.recv_offset;
            if off < len {
                let n = min(len - off, buf.len());
                buf[..n].copy_from_slice(&self.recv_buffer[off..off + n]);
                tracing::trace!(copied_bytes=%(off + n), total_bytes=%len, "read: copied");
                self.recv_offset += n;
                return Poll::Ready(Ok(n));
            }

            match Pin::new(&mut self.io).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(0)),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(ciphertext))) => {
                    // meshsync patch: the codec hands over the frame as sent; it is decrypted
                    // here, in order, into the kept buffer.
                    let this = &mut *self;
                    if this.recv_buffer.len() < ciphertext.len() {
                        this.recv_buffer.resize(ciphertext.len(), 0);
                    }
                    let n = this
                        .io
                        .codec_mut()
                        .decrypt_into(&ciphertext, &mut this.recv_buffer)?;
                    this.recv_len = n;
                    this.recv_offset = 0;
                }
            }
        }
    }
}

/// meshsync patch: a write at least this long is sealed straight from the caller's buffer as a
/// frame of its own (after any smaller writes buffered before it), instead of being copied into
/// the send buffer first. A muxer writes each of its frames as a small header and then a body:
/// the headers are still gathered, the bodies are no longer copied on their way to the cipher.
const DIRECT_WRITE: usize = 2048;

impl<T: AsyncWrite + Unpin> AsyncWrite for Output<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = Pin::into_inner(self);
        let mut io = Pin::new(&mut this.io);

        // meshsync patch: a long write goes out as its own frame, sealed from `buf`.
        if buf.len() >= DIRECT_WRITE {
            if this.send_offset > 0 {
                ready!(io.as_mut().poll_ready(cx))?;
                io.as_mut().start_send(&this.send_buffer[..this.send_offset])?;
                this.send_offset = 0;
            }
            ready!(io.as_mut().poll_ready(cx))?;
            let n = min(MAX_FRAME_LEN, buf.len());
            io.as_mut().start_send(&buf[..n])?;
            tracing::trace!(bytes=%n, "write: sent directly");
            return Poll::Ready(Ok(n));
        }

        // The MAX_FRAME_LEN is the maximum buffer size before a frame must be sent.
        if this.send_offset == MAX_FRAME_LEN {
            tracing::trace!(bytes=%MAX_FRAME_LEN, "write: sending");
            ready!(io.as_mut().poll_ready(cx))?;
            io.as_mut().start_send(&this.send_buffer)?;
            this.send_offset = 0;
        }

        let off = this.send_offset;
        let n = min(MAX_FRAME_LEN - off, buf.len());
        // meshsync patch: appended, not zero-filled first and then overwritten.
        this.send_buffer.truncate(off);
        this.send_buffer.extend_from_slice(&buf[..n]);
        this.send_offset += n;
        tracing::trace!(bytes=%this.send_offset, "write: buffered");

        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = Pin::into_inner(self);
        let mut io = Pin::new(&mut this.io);

        // Check if there is still one more frame to send.
        if this.send_offset > 0 {
            ready!(io.as_mut().poll_ready(cx))?;
            tracing::trace!(bytes= %this.send_offset, "flush: sending");
            io.as_mut().start_send(&this.send_buffer[..this.send_offset])?;
            this.send_offset = 0;
        }

        io.as_mut().poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.io).poll_close(cx)
    }
}
