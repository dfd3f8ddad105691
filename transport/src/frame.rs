//! Length-prefixed frames with a size limit and a time limit, the unit of every meshsync
//! protocol: a 4-byte big-endian length, then that many bytes.
//!
//! A frame longer than the reader's limit is refused before any of it is read into memory, so
//! a hostile peer cannot make a node allocate more than the limit. Decoding a frame's payload
//! (postcard) is the caller's business, and fails cleanly on garbage.

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why reading or writing a frame failed. Each closes the stream it happened on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("peer sent nothing for {0:?}")]
    Timeout(Duration),
    #[error("stream closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl FrameError {
    /// A failed read: the stream ending early is [`FrameError::Closed`].
    pub(crate) fn of_read(error: std::io::Error) -> FrameError {
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
            _ => FrameError::Io(error),
        }
    }
}

/// Writes one frame and flushes.
pub async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        limit: u32::MAX as usize,
    })?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(payload).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one frame of at most `limit` bytes, waiting at most `timeout` for it to start and
/// complete. `Ok(None)` means the peer closed the stream cleanly between frames.
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, FrameError> {
    tokio::time::timeout(timeout, read_frame_untimed(stream, limit))
        .await
        .map_err(|_| FrameError::Timeout(timeout))?
}

async fn read_frame_untimed<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = stream.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Closed)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(FrameError::of_read)?;
    Ok(Some(payload))
}

/// Decodes a postcard message, mapping failure to [`FrameError::Malformed`].
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Encodes a postcard message.
pub fn encode<T: serde::Serialize>(message: &T) -> Vec<u8> {
    postcard::to_stdvec(message).expect("in-memory messages always encode")
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use proptest::prelude::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused_unread() {
        rt().block_on(async {
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, b"hello").await.unwrap();
            write_frame(&mut buf, &[7u8; 100]).await.unwrap();
            buf.set_position(0);
            let t = Duration::from_secs(1);
            assert_eq!(
                read_frame(&mut buf, 10, t).await.unwrap().unwrap(),
                b"hello"
            );
            assert!(matches!(
                read_frame(&mut buf, 10, t).await,
                Err(FrameError::TooLarge {
                    len: 100,
                    limit: 10
                })
            ));
            let mut claims_4gb = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1]);
            assert!(matches!(
                read_frame(&mut claims_4gb, 1 << 20, t).await,
                Err(FrameError::TooLarge { .. })
            ));
            let mut empty = Cursor::new(Vec::new());
            assert!(read_frame(&mut empty, 10, t).await.unwrap().is_none());
        });
    }

    proptest! {
        #[test]
        fn random_and_truncated_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            rt().block_on(async {
                let mut cursor = Cursor::new(bytes.clone());
                let _ = read_frame(&mut cursor, 64, Duration::from_millis(50)).await;
            });
            let _ = decode::<crate::chunks::Want>(&bytes);
            let _ = decode::<crate::pair::Invite>(&bytes);
            let _ = decode::<crate::peers::PeerList>(&bytes);
            let _ = crate::pair::Invite::parse(&String::from_utf8_lossy(&bytes));
            let _ = crate::chunks::decode_response_header(&bytes);
        }
    }
}
