//! One request, one reply, on a libp2p stream: the shape of `/meshsync/doc/2` (state exchange)
//! and `/meshsync/peers/1`. Several requests may follow one another on the same stream.
//! Requests and replies are frames with a size limit; anything malformed, oversized or late
//! closes the stream with a logged reason.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};

use crate::frame;
use crate::{Transport, TransportError};

/// `/meshsync/doc/2`: exchange of the replicated state (membership and index changes).
/// (2: index shards follow folders; a device that shards by path alone speaks 1 and is not
/// understood, rather than having every change refused.)
pub const DOC: StreamProtocol = StreamProtocol::new("/meshsync/doc/2");
/// `/meshsync/sealed/1`: push and pull of sealed changes and sealed chunks to and from
/// storage peers.
pub const SEALED: StreamProtocol = StreamProtocol::new("/meshsync/sealed/1");
/// The largest request or reply.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `request` to `peer` on `protocol` and waits for the reply.
pub async fn request(
    transport: &Transport,
    peer: PeerId,
    protocol: StreamProtocol,
    request: &[u8],
) -> Result<Vec<u8>, TransportError> {
    let cut = transport.cut_off(peer);
    tokio::select! {
        biased; // a reply that is there wins
        reply = exchange(transport, peer, protocol, request) => reply,
        () = cut => Err(TransportError::Stream { peer, reason: "disconnected".into() }),
    }
}

async fn exchange(
    transport: &Transport,
    peer: PeerId,
    protocol: StreamProtocol,
    request: &[u8],
) -> Result<Vec<u8>, TransportError> {
    let mut control = transport.control();
    let mut stream = tokio::time::timeout(TIMEOUT, control.open_stream(peer, protocol))
        .await
        .map_err(|_| TransportError::Stream {
            peer,
            reason: "timed out".into(),
        })?
        .map_err(|e| TransportError::Stream {
            peer,
            reason: e.to_string(),
        })?;
    frame::write_frame(&mut stream, request).await?;
    let reply = frame::read_frame(&mut stream, MAX_MESSAGE, TIMEOUT)
        .await?
        .ok_or(frame::FrameError::Closed)?;
    let _ = stream.close().await;
    let counters = transport.counters(&peer);
    counters
        .bytes_out
        .fetch_add(request.len() as u64 + 4, Ordering::Relaxed);
    counters
        .bytes_in
        .fetch_add(reply.len() as u64 + 4, Ordering::Relaxed);
    Ok(reply)
}

/// Answers every request on `protocol` from an allowed peer with `handler`'s reply (`None`
/// closes the stream). Runs until the transport stops.
pub fn serve<F, Fut>(
    transport: &Transport,
    protocol: StreamProtocol,
    handler: F,
) -> Result<(), TransportError>
where
    F: Fn(PeerId, Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<Vec<u8>>> + Send,
{
    serve_for(transport, protocol, false, handler)
}

/// [`serve`] that also answers removed devices let in to hear of their removal
/// ([`crate::Allowed::set_notice`]): only for the protocol that tells them.
pub fn serve_notice<F, Fut>(
    transport: &Transport,
    protocol: StreamProtocol,
    handler: F,
) -> Result<(), TransportError>
where
    F: Fn(PeerId, Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<Vec<u8>>> + Send,
{
    serve_for(transport, protocol, true, handler)
}

fn serve_for<F, Fut>(
    transport: &Transport,
    protocol: StreamProtocol,
    notice: bool,
    handler: F,
) -> Result<(), TransportError>
where
    F: Fn(PeerId, Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<Vec<u8>>> + Send,
{
    let mut incoming = transport
        .control()
        .accept(protocol.clone())
        .map_err(|_| TransportError::Setup(format!("{protocol} is already served")))?;
    let transport = transport.clone();
    let limit = crate::limit::InboundLimit::default();
    tokio::spawn(async move {
        while let Some((peer, mut stream)) = incoming.next().await {
            let let_in = transport.allowed().contains(&peer)
                || (notice && transport.allowed().is_notice(&peer));
            if !let_in {
                tracing::warn!(peer = %crate::describe(&peer), %protocol, "stream from a non-member refused");
                continue;
            }
            let Some(place) = limit.admit(peer) else {
                tracing::warn!(%peer, %protocol, "too many streams from one peer; closing the new one");
                continue; // dropping the stream closes it
            };
            let handler = handler.clone();
            let transport = transport.clone();
            let protocol = protocol.clone();
            tokio::spawn(async move {
                let _place = place;
                let counters = transport.counters(&peer);
                loop {
                    let request = match frame::read_frame(&mut stream, MAX_MESSAGE, TIMEOUT).await {
                        Ok(Some(request)) => request,
                        Ok(None) => break,
                        Err(error) => {
                            tracing::info!(%peer, %protocol, %error, "closing stream");
                            break;
                        }
                    };
                    counters
                        .bytes_in
                        .fetch_add(request.len() as u64 + 4, Ordering::Relaxed);
                    let Some(reply) = handler(peer, request).await else {
                        tracing::info!(%peer, %protocol, "request refused; closing stream");
                        break;
                    };
                    if let Err(error) = frame::write_frame(&mut stream, &reply).await {
                        tracing::info!(%peer, %protocol, %error, "closing stream");
                        break;
                    }
                    counters
                        .bytes_out
                        .fetch_add(reply.len() as u64 + 4, Ordering::Relaxed);
                }
                let _ = stream.close().await;
            });
        }
    });
    Ok(())
}
