//! The HTTP/1.1 a client needs around its real transport: reading a response head (the WebSocket
//! upgrade's, the event stream's) and taking a response body out of its framing (chunked, a
//! `Content-Length`, or until the server closes) in place, in the read buffer.

use anyhow::{Result, bail};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest chunk-size (or trailer) line accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Bytes of a refusal's body quoted in errors.
const QUOTED_BODY: usize = 200;

/// A response head, with the bytes read past it.
#[derive(Debug)]
pub struct ResponseHead {
    /// The head and the bytes read after it.
    buf: Vec<u8>,
    /// Where the head ends (after its blank line).
    head_end: usize,
}

/// Reads a response head off `stream`; `during` names the exchange in errors.
pub async fn read_head(stream: &mut TcpStream, during: &str) -> Result<ResponseHead> {
    let mut buf = Vec::with_capacity(512);
    let head_end = loop {
        if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > MAX_HEAD {
            bail!("HTTP response head over {MAX_HEAD} bytes");
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("connection closed during {during}");
        }
    };
    Ok(ResponseHead { buf, head_end })
}

impl ResponseHead {
    /// The status line, e.g. `HTTP/1.1 200 OK`.
    pub fn status_line(&self) -> String {
        let line = self.buf.split(|b| *b == b'\r').next().unwrap_or_default();
        String::from_utf8_lossy(line).into_owned()
    }

    /// The value of header `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        let head = std::str::from_utf8(&self.buf[..self.head_end]).ok()?;
        head.split("\r\n").skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// The start of the body that came with the head, for an error.
    pub fn quoted_body(&self) -> String {
        let body = &self.buf[self.head_end..];
        String::from_utf8_lossy(&body[..body.len().min(QUOTED_BODY)]).into_owned()
    }

    /// The bytes read past the head.
    pub fn into_rest(mut self) -> Vec<u8> {
        self.buf.split_off(self.head_end)
    }
}

/// How a response body is delimited, and how much of it is left.
#[derive(Debug, PartialEq, Eq)]
pub enum Body {
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// `Content-Length`: the body bytes still to come.
    Length(u64),
    /// Neither: the body ends when the server closes the connection.
    UntilClose,
}

/// What [`Body::decode`] found in one read.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Body bytes, now at the start of the buffer.
    pub len: usize,
    /// Whether the body is complete (bytes after it are ignored).
    pub ended: bool,
}

impl Body {
    /// The framing `head` announces.
    pub fn of(head: &ResponseHead) -> Result<Body> {
        if let Some(encoding) = head.header("transfer-encoding") {
            if !encoding.eq_ignore_ascii_case("chunked") {
                bail!("unsupported Transfer-Encoding: {encoding}");
            }
            return Ok(Body::Chunked(Chunked::default()));
        }
        match head.header("content-length") {
            Some(length) => match length.parse() {
                Ok(length) => Ok(Body::Length(length)),
                Err(_) => bail!("bad Content-Length: {length}"),
            },
            None => Ok(Body::UntilClose),
        }
    }

    /// Takes the body bytes out of `buf`, just read from the connection, moving them to its start.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<Decoded> {
        match self {
            Body::Chunked(chunked) => chunked.decode(buf),
            Body::Length(left) => {
                let len = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= len as u64;
                Ok(Decoded { len, ended: *left == 0 })
            }
            Body::UntilClose => Ok(Decoded { len: buf.len(), ended: false }),
        }
    }
}

/// Where a chunked body is between reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    /// A line cut by the end of a read (rare: only a chunk-size line split across reads).
    line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, with this many bytes to come.
    Data(usize),
    /// Expecting the line end after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to a blank one.
    Trailers,
    /// The body is complete.
    Done,
}

impl Chunked {
    /// Removes the chunk framing from `buf` in place: the data of its chunks is moved together at
    /// the start (one `memmove` per chunk, the price of handing the events above contiguous bytes).
    fn decode(&mut self, buf: &mut [u8]) -> Result<Decoded> {
        let (mut read, mut written) = (0, 0);
        while read < buf.len() {
            match self.state {
                ChunkState::Data(left) => {
                    let take = left.min(buf.len() - read);
                    if read != written {
                        buf.copy_within(read..read + take, written);
                    }
                    read += take;
                    written += take;
                    self.state = if take == left { ChunkState::DataEnd } else { ChunkState::Data(left - take) };
                }
                ChunkState::Done => break,
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailers => {
                    let Some(end) = memchr::memchr(b'\n', &buf[read..]) else {
                        self.keep_line_start(&buf[read..])?;
                        break;
                    };
                    let line = &buf[read..read + end];
                    read += end + 1;
                    if self.line.is_empty() {
                        self.state = next_state(self.state, line)?;
                    } else {
                        self.line.extend_from_slice(line);
                        self.state = next_state(self.state, &self.line)?;
                        self.line.clear();
                    }
                }
            }
        }
        Ok(Decoded { len: written, ended: self.state == ChunkState::Done })
    }

    fn keep_line_start(&mut self, start: &[u8]) -> Result<()> {
        if self.line.len() + start.len() > MAX_CHUNK_LINE {
            bail!("chunked body: a line over {MAX_CHUNK_LINE} bytes");
        }
        self.line.extend_from_slice(start);
        Ok(())
    }
}

/// The state after `line` (without its `\n`) in `state`.
fn next_state(state: ChunkState, line: &[u8]) -> Result<ChunkState> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match state {
        ChunkState::Size => match chunk_size(line) {
            Some(0) => Ok(ChunkState::Trailers),
            Some(size) => Ok(ChunkState::Data(size)),
            None => bail!("chunked body: bad chunk-size line {:?}", String::from_utf8_lossy(line)),
        },
        ChunkState::DataEnd if line.is_empty() => Ok(ChunkState::Size),
        ChunkState::DataEnd => bail!("chunked body: chunk data longer than its size"),
        ChunkState::Trailers if line.is_empty() => Ok(ChunkState::Done),
        other => Ok(other),
    }
}

/// The size of a chunk-size line (hexadecimal, maybe followed by `;extensions`).
fn chunk_size(line: &[u8]) -> Option<usize> {
    let digits = line.split(|b| *b == b';').next()?.trim_ascii();
    usize::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` read in pieces cut at `cuts`; returns the body and whether it ended.
    fn decode_in_pieces(body: &mut Body, wire: &[u8], cuts: &[usize]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut ended = false;
        let mut start = 0;
        for end in cuts.iter().copied().chain([wire.len()]) {
            let mut piece = wire[start..end].to_vec();
            start = end;
            let decoded = body.decode(&mut piece).unwrap();
            out.extend_from_slice(&piece[..decoded.len]);
            ended = decoded.ended;
        }
        (out, ended)
    }

    #[test]
    fn chunks_come_out_whole_however_the_reads_cut_them() {
        let wire = b"5\r\nhello\r\n19;ext=1\r\n, chunked world, in parts\r\n0\r\nx-trailer: 1\r\n\r\nleftover";
        let expected = b"hello, chunked world, in parts";
        for cut in 0..=wire.len() {
            let (body, ended) = decode_in_pieces(&mut Body::Chunked(Chunked::default()), wire, &[cut]);
            assert_eq!(body, expected, "cut at {cut}");
            assert!(ended, "cut at {cut}");
        }
        for (first, second) in [(1, 2), (2, 3), (4, 9), (13, 14)] {
            let (body, _) = decode_in_pieces(&mut Body::Chunked(Chunked::default()), wire, &[first, second]);
            assert_eq!(body, expected, "cuts at {first} and {second}");
        }
        let (body, ended) = decode_in_pieces(&mut Body::Chunked(Chunked::default()), &wire[..24], &[]);
        assert_eq!((body.as_slice(), ended), (&b"hello, ch"[..], false));
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        assert!(Chunked::default().decode(&mut b"zz\r\n".to_vec()).is_err());
        assert!(Chunked::default().decode(&mut b"2\r\nabc\r\n".to_vec()).is_err());
        assert!(Chunked::default().decode(&mut vec![b'1'; MAX_CHUNK_LINE + 1]).is_err());
    }

    #[test]
    fn a_length_body_ends_after_its_length_and_a_plain_one_never() {
        let (body, ended) = decode_in_pieces(&mut Body::Length(7), b"abcdefghij", &[3]);
        assert_eq!((body.as_slice(), ended), (&b"abcdefg"[..], true));
        let (body, ended) = decode_in_pieces(&mut Body::UntilClose, b"abcdefghij", &[3]);
        assert_eq!((body.as_slice(), ended), (&b"abcdefghij"[..], false));
    }

    #[test]
    fn the_framing_follows_the_head() {
        let head = |text: &str| {
            let buf = text.as_bytes().to_vec();
            ResponseHead { head_end: buf.len(), buf }
        };
        let chunked = head("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(chunked.status_line(), "HTTP/1.1 200 OK");
        assert_eq!(chunked.header("Content-Type"), Some("text/event-stream"));
        assert_eq!(Body::of(&chunked).unwrap(), Body::Chunked(Chunked::default()));
        assert_eq!(Body::of(&head("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n")).unwrap(), Body::Length(12));
        assert_eq!(Body::of(&head("HTTP/1.0 200 OK\r\n\r\n")).unwrap(), Body::UntilClose);
        assert!(Body::of(&head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n")).is_err());
    }
}
