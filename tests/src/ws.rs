//! A WebSocket test client (tokio-tungstenite) that reads Herald frames.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_shared::frame::{Msg, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for one expected frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(15);

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Frame(ServerFrame),
    /// A close frame (code, reason), or the end of the stream (`None`).
    Close(Option<(u16, String)>),
}

/// An HTTP answer instead of an upgrade.
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: u16,
    pub body: serde_json::Value,
}

pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `welcome`, once read.
    pub welcome: Option<ServerFrame>,
}

impl WsClient {
    /// Opens a WebSocket; an HTTP refusal comes back as [`Refused`].
    pub async fn connect(url: &str) -> Result<WsClient, Refused> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((stream, _)) => Ok(WsClient { stream, welcome: None }),
            Err(Error::Http(response)) => {
                let body = response.body().as_deref().unwrap_or_default();
                Err(Refused {
                    status: response.status().as_u16(),
                    body: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
                })
            }
            Err(other) => panic!("cannot connect to {url}: {other}"),
        }
    }

    /// Opens a WebSocket with extra request headers (`Origin`, `X-Forwarded-For`, …; a name given
    /// twice is sent twice).
    pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Result<WsClient, Refused> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("a valid URL");
        for (name, value) in headers {
            request.headers_mut().append(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok(WsClient { stream, welcome: None }),
            Err(Error::Http(response)) => Err(Refused {
                status: response.status().as_u16(),
                body: serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .unwrap_or(serde_json::Value::Null),
            }),
            Err(other) => panic!("cannot connect to {url}: {other}"),
        }
    }

    /// Opens a WebSocket whose socket receives into a kernel buffer of about `bytes` (so that a
    /// client that stops reading stops the server's writes soon).
    pub async fn connect_with_receive_buffer(url: &str, bytes: u32) -> WsClient {
        let address = url.trim_start_matches("ws://").split('/').next().expect("a host in the URL");
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(address.parse().expect("an address")).await.expect("connect");
        let (stream, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.expect("upgrade");
        WsClient { stream, welcome: None }
    }

    /// Opens a WebSocket; any failure (refusal, nothing listening) is an error.
    pub async fn try_connect(url: &str) -> Result<WsClient, String> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((stream, _)) => Ok(WsClient { stream, welcome: None }),
            Err(error) => Err(error.to_string()),
        }
    }

    /// The next frame or close, skipping control frames; panics after [`FRAME_TIMEOUT`].
    pub async fn next_event(&mut self) -> Event {
        tokio::time::timeout(FRAME_TIMEOUT, self.recv()).await.expect("no frame from the gateway in time")
    }

    /// The next frame or close, skipping control frames, however long it takes (cancel-safe).
    pub async fn recv(&mut self) -> Event {
        loop {
            let message = self.stream.next().await;
            match message {
                Some(Ok(Message::Text(text))) => {
                    let frame = serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad frame {text}: {e}"));
                    return Event::Frame(frame);
                }
                Some(Ok(Message::Close(close))) => {
                    return Event::Close(close.map(|c: CloseFrame| (u16::from(c.code), c.reason.to_string())));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(_))) => panic!("the gateway sent a binary frame"),
                Some(Err(_)) | None => return Event::Close(None),
            }
        }
    }

    /// The next frame; panics on a close.
    pub async fn next_frame(&mut self) -> ServerFrame {
        match self.next_event().await {
            Event::Frame(frame) => frame,
            Event::Close(close) => panic!("connection closed ({close:?}) while a frame was expected"),
        }
    }

    /// Reads the `welcome` and returns the stream sequence it announced.
    pub async fn expect_welcome(&mut self) -> u64 {
        match self.next_frame().await {
            frame @ ServerFrame::Welcome { seq, .. } => {
                self.welcome = Some(frame);
                seq
            }
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// The next frame, which must be a `msg`.
    pub async fn expect_msg(&mut self) -> Msg {
        match self.next_frame().await {
            ServerFrame::Msg(msg) => msg,
            other => panic!("expected msg, got {other:?}"),
        }
    }

    /// The `seq` of the `welcome` read at connect.
    pub fn welcome_seq(&self) -> u64 {
        match &self.welcome {
            Some(ServerFrame::Welcome { seq, .. }) => *seq,
            _ => panic!("no welcome read yet"),
        }
    }

    /// The next frame, which must be `replayed`: (from, to, count, complete, topic).
    pub async fn expect_replayed(&mut self) -> (u64, u64, u64, bool, Option<String>) {
        match self.next_frame().await {
            ServerFrame::Replayed { from, to, count, complete, topic } => (from, to, count, complete, topic),
            other => panic!("expected replayed, got {other:?}"),
        }
    }

    /// The sequences of the next `n` frames, which must all be `msg`.
    pub async fn expect_msgs(&mut self, n: usize) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(n);
        for _ in 0..n {
            seqs.push(self.expect_msg().await.seq);
        }
        seqs
    }

    /// Reads until the connection closes and returns the close code (None: no close frame).
    pub async fn expect_close(&mut self) -> Option<(u16, String)> {
        loop {
            if let Event::Close(close) = self.next_event().await {
                return close;
            }
        }
    }

    /// Sends a JSON frame.
    pub async fn send_json(&mut self, value: serde_json::Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send to the gateway");
    }

    /// Sends any WebSocket message.
    pub async fn send(&mut self, message: Message) -> Result<(), Error> {
        self.stream.send(message).await
    }
}
