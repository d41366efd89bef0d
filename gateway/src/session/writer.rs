//! The only task that writes to a socket: it takes everything queued in the outbox and sends it in
//! one vectored write, then the close frame once the outbox closes.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::delivery::outbox::{Close, Outbox};
use crate::websocket::frame;

/// Most bytes taken from the queue for one write.
const BATCH_BYTES: usize = 256 * 1024;
/// How long the close frame may take to go out.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes the outbox to `io` until it closes; returns the close sent (or the write error's).
pub(crate) async fn run<W: AsyncWrite + Unpin>(mut io: W, outbox: Arc<Outbox>, batch_frames: usize) -> Close {
    loop {
        // A fresh batch each time: an idle socket keeps no batch buffer.
        let mut batch: Vec<Bytes> = Vec::new();
        if let Some(close) = outbox.next_batch(&mut batch, batch_frames, BATCH_BYTES).await {
            // 1006 means the connection is already gone; it is never sent.
            let frame = (close.code != 1006).then(|| frame::close(close.code, &close.reason));
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
                if let Some(frame) = frame {
                    io.write_all(&frame).await?;
                }
                io.shutdown().await
            })
            .await;
            return close;
        }
        if let Err(error) = write_all(&mut io, &batch).await {
            let close = Close::new(1006, format!("write failed: {error}"));
            outbox.close(close.clone());
            return close;
        }
    }
}

/// Writes every frame of `batch`, with as few system calls as the socket allows.
async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, batch: &[Bytes]) -> std::io::Result<()> {
    if let [single] = batch {
        return io.write_all(single).await;
    }
    let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|frame| IoSlice::new(frame)).collect();
    let mut remaining: &mut [IoSlice<'_>] = &mut slices;
    while !remaining.is_empty() {
        let written = io.write_vectored(remaining).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut remaining, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::outbox::Close;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_queued_frames_then_the_close_frame() {
        let (client, server) = tokio::io::duplex(16);
        let outbox = Arc::new(Outbox::new(1 << 20));
        outbox.release(Vec::new(), &[]);
        outbox.push_control(frame::text(b"first"));
        outbox.push_control(frame::text(b"second"));
        let writer = tokio::spawn(run(server, outbox.clone(), 64));
        let mut client = client;
        let mut received = vec![0u8; 15];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(&received[..7], &frame::text(b"first")[..]);
        assert_eq!(&received[7..], &frame::text(b"second")[..]);
        outbox.close(Close::new(1012, "restart"));
        let mut close = Vec::new();
        client.read_to_end(&mut close).await.unwrap();
        assert_eq!(close, frame::close(1012, "restart").to_vec());
        assert_eq!(writer.await.unwrap().code, 1012);
    }
}
