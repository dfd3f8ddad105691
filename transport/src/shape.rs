//! Slow and lossy links for simulations: the in-memory transport's byte streams, paced to a
//! bandwidth and broken at random (a reset, as a flaky link does to a connection), before Noise
//! and Yamux run over them — so everything above, from the handshake up, sees a bad link.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, Future};

/// How bad a node's links are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkShape {
    /// Bytes per second each connection may send.
    pub bytes_per_sec: u64,
    /// Chance, per million writes, that the connection breaks instead.
    pub breaks_per_million_writes: u32,
}

/// A stream shaped by a [`LinkShape`].
pub struct Shaped<S> {
    inner: S,
    shape: LinkShape,
    /// Pacing: no write before this sleep ends.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    dice: u64,
    broken: bool,
}

impl<S> Shaped<S> {
    pub fn new(inner: S, shape: LinkShape) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Shaped {
            inner,
            shape,
            pause: None,
            dice: seed | 1,
            broken: false,
        }
    }

    fn roll(&mut self) -> u32 {
        self.dice ^= self.dice << 13;
        self.dice ^= self.dice >> 7;
        self.dice ^= self.dice << 17;
        (self.dice % 1_000_000) as u32
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Shaped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.broken {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Shaped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        if self.broken || self.roll() < self.shape.breaks_per_million_writes {
            self.broken = true;
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        let written = match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let rate = self.shape.bytes_per_sec.max(1);
        let pause = Duration::from_nanos((written as u64).saturating_mul(1_000_000_000) / rate);
        self.pause = Some(Box::pin(tokio::time::sleep(pause)));
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
