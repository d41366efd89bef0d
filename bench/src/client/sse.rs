//! Server-Sent Events, client side, kept to what a load tool needs: the `GET` that opens a stream,
//! and events found in place in the response body (the gateway ends lines with `\n` only). The
//! client never sends anything after its request.

use std::sync::LazyLock;

use anyhow::{Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::http::{self, Body};

/// Sends the request for the stream at `path` and reads the `200` response head; returns how the
/// body is framed and the bytes read past the head (its start). Any other answer is an error
/// carrying its status line and the start of its body.
pub async fn open(stream: &mut TcpStream, host: &str, path: &str) -> Result<(Body, Vec<u8>)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let head = http::read_head(stream, "the event stream's response head").await?;
    let status_line = head.status_line();
    if !status_line.starts_with("HTTP/1.1 200") {
        bail!("event stream refused: {status_line} {}", head.quoted_body());
    }
    let content_type = head.header("content-type").unwrap_or_default();
    if !content_type.starts_with("text/event-stream") {
        bail!("not an event stream: content-type {content_type:?} {}", head.quoted_body());
    }
    Ok((Body::of(&head)?, head.into_rest()))
}

/// The event at the start of `buf`, without the blank line that ends it, and the bytes it took;
/// `None` while it has not fully arrived.
pub fn next_event(buf: &[u8]) -> Option<(&[u8], usize)> {
    if buf.first() == Some(&b'\n') {
        return Some((&[], 1));
    }
    let end = event_end(buf)?;
    Some((&buf[..end - 2], end))
}

/// Where the first event in `buf` ends, past its blank line.
pub fn event_end(buf: &[u8]) -> Option<usize> {
    // Built once: `memmem::find` would build a searcher for every event.
    static EVENT_END: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));
    EVENT_END.find(buf).map(|end| end + 2)
}

/// The fields of `event`, name and value, in order (the space after the colon is not part of the
/// value); comment lines are left out.
pub fn fields(event: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', event).chain(std::iter::once(event.len()));
    ends.filter_map(move |end| {
        let line = &event[start..end];
        start = end + 1;
        if line.starts_with(b":") {
            return None;
        }
        Some(match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        })
    })
}

/// The data of `event`: its `data` fields joined with line ends.
pub fn data(event: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    for (i, (_, value)) in fields(event).filter(|(name, _)| *name == b"data").enumerate() {
        if i > 0 {
            data.push(b'\n');
        }
        data.extend_from_slice(value);
    }
    data
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::client::http::Chunked;

    /// Opens a stream at a server that answers `response`; returns the result and the request it got.
    async fn open_against(response: &'static [u8]) -> (Result<(Body, Vec<u8>)>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 1024];
            let len = socket.read(&mut request).await.unwrap();
            socket.write_all(response).await.unwrap();
            String::from_utf8(request[..len].to_vec()).unwrap()
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let opened = open(&mut stream, "gateway", "/sse?token=t&device=d").await;
        (opened, server.await.unwrap())
    }

    #[tokio::test]
    async fn a_stream_opens_with_a_200_and_anything_else_is_refused() {
        let (opened, request) = open_against(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\n: hi\n",
        )
        .await;
        assert_eq!(request, "GET /sse?token=t&device=d HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n\r\n");
        let (body, early) = opened.unwrap();
        assert_eq!((body, early.as_slice()), (Body::Chunked(Chunked::default()), &b"5\r\n: hi\n"[..]));
        let (opened, _) =
            open_against(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 25\r\n\r\n{\"error\":\"unauthorized\"}").await;
        let error = format!("{:#}", opened.unwrap_err());
        assert_eq!(error, r#"event stream refused: HTTP/1.1 401 Unauthorized {"error":"unauthorized"}"#);
        let (opened, _) = open_against(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\n\r\n<html>").await;
        assert!(format!("{:#}", opened.unwrap_err()).starts_with("not an event stream"));
    }

    #[test]
    fn events_end_at_a_blank_line() {
        let stream = b"retry: 1000\nevent: welcome\ndata: {}\n\n: ping\n\nid: 3\ndata: x\n\nid: 4";
        let (first, len) = next_event(stream).unwrap();
        assert_eq!(first, b"retry: 1000\nevent: welcome\ndata: {}");
        let (second, len2) = next_event(&stream[len..]).unwrap();
        assert_eq!(second, b": ping");
        let (third, len3) = next_event(&stream[len + len2..]).unwrap();
        assert_eq!(third, b"id: 3\ndata: x");
        assert_eq!(next_event(&stream[len + len2 + len3..]), None, "not ended yet");
        assert_eq!(next_event(b"\nid: 1\n\n"), Some((&b""[..], 1)), "a stray blank line is an empty event");
    }

    #[test]
    fn fields_leave_out_comments_and_the_space_after_the_colon() {
        let event = b": comment\nid: 7\nevent:mail\ndata: {\ndata:   \"a\": 1\ndata: }\ndata";
        let fields: Vec<_> = fields(event).collect();
        assert_eq!(
            fields,
            [
                (&b"id"[..], &b"7"[..]),
                (b"event", b"mail"),
                (b"data", b"{"),
                (b"data", b"  \"a\": 1"),
                (b"data", b"}"),
                (b"data", b""),
            ]
        );
        assert_eq!(data(event), b"{\n  \"a\": 1\n}\n");
        assert_eq!(data(b"event: x"), b"");
        assert_eq!(data(b"data\ndata: x"), b"\nx");
    }
}
