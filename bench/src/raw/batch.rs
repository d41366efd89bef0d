//! What one socket sends in its next write: gathered from the ring and the mailbox, then
//! written with one vectored write (more only when the kernel takes part of it).

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Buffers of frames (ring entries, unicast frames) waiting for one write, bounded in count
/// (iovecs) and bytes.
pub(crate) struct Batch {
    frames: Vec<Bytes>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl Batch {
    /// An empty batch of at most `max_frames` buffers and about `max_bytes` bytes. Allocates at the
    /// first push, so an idle socket's batch costs nothing.
    pub(crate) fn new(max_frames: usize, max_bytes: usize) -> Batch {
        Batch { frames: Vec::new(), bytes: 0, max_frames: max_frames.max(1), max_bytes }
    }

    /// Adds `frame` (even past the bounds: the caller asks [`Batch::is_full`] before taking more).
    pub(crate) fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push(frame);
    }

    /// Whether the next write should go out before more frames are taken.
    pub(crate) fn is_full(&self) -> bool {
        self.frames.len() >= self.max_frames || self.bytes >= self.max_bytes
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frames waiting, in order.
    #[cfg(test)]
    pub(crate) fn frames(&self) -> &[Bytes] {
        &self.frames
    }

    /// Writes every frame to `out`, then empties the batch.
    pub(crate) async fn write_to(&mut self, out: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self.frames.iter().map(|frame| IoSlice::new(frame)).collect();
        let mut remaining: &mut [IoSlice<'_>] = &mut slices;
        while !remaining.is_empty() {
            let written = out.write_vectored(remaining).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut remaining, written);
        }
        self.frames.clear();
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_full_by_frames_or_by_bytes() {
        let mut by_frames = Batch::new(2, 1000);
        by_frames.push(Bytes::from_static(b"a"));
        assert!(!by_frames.is_full());
        by_frames.push(Bytes::from_static(b"b"));
        assert!(by_frames.is_full());

        let mut by_bytes = Batch::new(100, 4);
        by_bytes.push(Bytes::from_static(b"abcd"));
        assert!(by_bytes.is_full());
    }

    #[tokio::test]
    async fn writes_everything_even_in_pieces() {
        // A pipe this small takes each write in pieces, so the slices advance mid-frame.
        let (mut writer, mut reader) = tokio::io::duplex(3);
        let mut batch = Batch::new(10, 1000);
        for frame in ["hello ", "vectored ", "world"] {
            batch.push(Bytes::from(frame));
        }
        let read = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut all).await.unwrap();
            all
        });
        batch.write_to(&mut writer).await.unwrap();
        assert!(batch.is_empty());
        drop(writer);
        assert_eq!(read.await.unwrap(), b"hello vectored world");
    }
}
