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
use bytes::{Buf, BytesMut};
use framed::{Codec, MAX_FRAME_LEN};
use futures::{prelude::*, ready};

/// A noise session to a remote.
///
/// `T` is the type of the underlying I/O resource.
///
/// meshsync patch: in the transport phase the session frames the stream itself instead of
/// through `asynchronous_codec::Framed`, which read the socket 8 KiB at a time into a stack
/// buffer and copied that on (eight `recv`s and a copy per 64 KB frame; 9 % of a receiving
/// daemon's CPU in meshsync's bulk bench went to `recv` calls other than their copy). The
/// bytes on the wire are the same Noise frames (a 2-byte big-endian length, then the
/// ciphertext).
pub struct Output<T> {
    io: T,
    codec: Codec<snow::TransportState>,
    /// Bytes read from `io`, `read_buffer[read_start..read_end]` not yet decrypted: room for
    /// two whole frames, zero-filled once.
    read_buffer: Vec<u8>,
    read_start: usize,
    read_end: usize,
    /// The last frame's cleartext, `recv_buffer[recv_offset..recv_len]` still to read.
    /// Frames are decrypted into this one buffer (it grows to the largest frame and keeps that
    /// length), not into a zero-filled new one each.
    recv_buffer: Vec<u8>,
    recv_len: usize,
    recv_offset: usize,
    /// Small writes gathered into the next frame.
    send_buffer: Vec<u8>,
    send_offset: usize,
    /// Sealed frames not yet written to `io`.
    write_buffer: BytesMut,
    /// meshsync patch: the protocol name the session was negotiated under.
    protocol: &'static str,
}

/// Room to read into: two of the longest frames with their length prefixes.
const READ_BUFFER: usize = 2 * (2 + 65535);
/// Sealed bytes buffered before a write waits for them to go out (asynchronous-codec's mark).
const WRITE_HIGH: usize = 128 * 1024;

impl<T> fmt::Debug for Output<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseOutput").finish()
    }
}

impl<T> Output<T> {
    fn new(framed: Framed<T, Codec<snow::TransportState>>) -> Self
    where
        T: AsyncRead + AsyncWrite,
    {
        // What the handshake's framing already read (the remote may have written right after
        // its last handshake message) or has not yet written is carried over.
        let parts = framed.into_parts();
        let mut read_buffer = vec![0u8; READ_BUFFER.max(parts.read_buffer.len())];
        read_buffer[..parts.read_buffer.len()].copy_from_slice(&parts.read_buffer);
        Output {
            io: parts.io,
            codec: parts.codec,
            read_end: parts.read_buffer.len(),
            read_buffer,
            read_start: 0,
            recv_buffer: Vec::new(),
            recv_len: 0,
            recv_offset: 0,
            send_buffer: Vec::new(),
            send_offset: 0,
            write_buffer: parts.write_buffer,
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

    /// The next whole frame's ciphertext in the read buffer, if one is there (and moves past
    /// it).
    fn next_frame(&mut self) -> Option<(usize, usize)> {
        let have = &self.read_buffer[self.read_start..self.read_end];
        if have.len() < 2 {
            return None;
        }
        let len = u16::from_be_bytes([have[0], have[1]]) as usize;
        if have.len() < 2 + len {
            return None;
        }
        let at = self.read_start + 2;
        self.read_start = at + len;
        Some((at, at + len))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Output<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            let len = this.recv_len;
            let off = this.recv_offset;
            if off < len {
                let n = min(len - off, buf.len());
                buf[..n].copy_from_slice(&this.recv_buffer[off..off + n]);
                tracing::trace!(copied_bytes=%(off + n), total_bytes=%len, "read: copied");
                this.recv_offset += n;
                return Poll::Ready(Ok(n));
            }

            if let Some((from, to)) = this.next_frame() {
                // Decrypted in order, with the session's next nonce, into the kept buffer.
                if this.recv_buffer.len() < to - from {
                    this.recv_buffer.resize(to - from, 0);
                }
                let n = this
                    .codec
                    .decrypt_into(&this.read_buffer[from..to], &mut this.recv_buffer)?;
                this.recv_len = n;
                this.recv_offset = 0;
                continue;
            }

            // No whole frame: move what there is of the next one to the front, and read on.
            if this.read_start > 0 {
                this.read_buffer
                    .copy_within(this.read_start..this.read_end, 0);
                this.read_end -= this.read_start;
                this.read_start = 0;
            }
            let n = ready!(
                Pin::new(&mut this.io).poll_read(cx, &mut this.read_buffer[this.read_end..])
            )?;
            if n == 0 {
                if this.read_end > 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "bytes remaining in stream",
                    )));
                }
                return Poll::Ready(Ok(0));
            }
            this.read_end += n;
        }
    }
}

impl<T: AsyncWrite + Unpin> Output<T> {
    /// Seals `cleartext` as one frame behind those waiting to go out.
    fn seal(&mut self, cleartext: &[u8]) -> io::Result<()> {
        use asynchronous_codec::Encoder;
        self.codec.encode(cleartext, &mut self.write_buffer)
    }

    /// Writes sealed frames out until fewer than `keep` bytes wait (all of them for 0).
    fn poll_write_out(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<io::Result<()>> {
        while !self.write_buffer.is_empty() && self.write_buffer.len() >= keep {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write_buffer))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.write_buffer.advance(n);
        }
        Poll::Ready(Ok(()))
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

        // meshsync patch: a long write goes out as its own frame, sealed from `buf`.
        if buf.len() >= DIRECT_WRITE {
            ready!(this.poll_write_out(cx, WRITE_HIGH))?;
            if this.send_offset > 0 {
                let gathered = std::mem::take(&mut this.send_buffer);
                let sealed = this.seal(&gathered[..this.send_offset]);
                this.send_buffer = gathered;
                sealed?;
                this.send_offset = 0;
            }
            let n = min(MAX_FRAME_LEN, buf.len());
            this.seal(&buf[..n])?;
            tracing::trace!(bytes=%n, "write: sent directly");
            return Poll::Ready(Ok(n));
        }

        // The MAX_FRAME_LEN is the maximum buffer size before a frame must be sent.
        if this.send_offset == MAX_FRAME_LEN {
            tracing::trace!(bytes=%MAX_FRAME_LEN, "write: sending");
            ready!(this.poll_write_out(cx, WRITE_HIGH))?;
            let gathered = std::mem::take(&mut this.send_buffer);
            let sealed = this.seal(&gathered[..MAX_FRAME_LEN]);
            this.send_buffer = gathered;
            sealed?;
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

        // Check if there is still one more frame to send.
        if this.send_offset > 0 {
            tracing::trace!(bytes= %this.send_offset, "flush: sending");
            let gathered = std::mem::take(&mut this.send_buffer);
            let sealed = this.seal(&gathered[..this.send_offset]);
            this.send_buffer = gathered;
            sealed?;
            this.send_offset = 0;
        }

        ready!(this.poll_write_out(cx, 0))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.io).poll_close(cx)
    }
}
