//! One raw socket: a single task that writes what is queued (in vectored writes) and reads only to
//! notice the client leaving.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::outbound::Outbound;
use super::registry::Registry;
use super::{RawOptions, text_frame};

/// Most bytes taken from the queue for one write.
const BATCH_BYTES: usize = 256 * 1024;

/// Serves one upgraded connection until the client leaves or falls behind.
pub(crate) async fn run(mut stream: TcpStream, registry: Arc<Registry>, user: Option<String>, options: &RawOptions) {
    let outbound = Arc::new(Outbound::new(options.queue_bytes));
    let id = registry.add(outbound.clone(), user.as_deref());
    outbound.push(&text_frame(b"ready"));
    // Allocated at the first write, so an idle socket costs nothing here.
    let mut batch = Vec::new();
    let mut sink = [0u8; 256];
    loop {
        tokio::select! {
            _ = outbound.ready.notified() => {
                if drain(&mut stream, &outbound, &mut batch, options.batch_frames).await.is_err() {
                    break;
                }
            }
            readable = stream.readable() => {
                if readable.is_err() {
                    break;
                }
                // Client frames (a close, pongs) need no answer here; the end of the stream ends the socket.
                match stream.try_read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        }
    }
    registry.remove(id, user.as_deref());
}

/// Writes everything queued; fails when the queue was closed or the socket broke.
async fn drain(stream: &mut TcpStream, outbound: &Outbound, batch: &mut Vec<Bytes>, max: usize) -> std::io::Result<()> {
    loop {
        batch.clear();
        let closed = outbound.take(batch, max, BATCH_BYTES);
        if closed {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if batch.is_empty() {
            return Ok(());
        }
        write_all(stream, batch).await?;
    }
}

async fn write_all(stream: &mut TcpStream, batch: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|frame| IoSlice::new(frame)).collect();
    let mut remaining: &mut [IoSlice<'_>] = &mut slices;
    while !remaining.is_empty() {
        let written = stream.write_vectored(remaining).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut remaining, written);
    }
    Ok(())
}
