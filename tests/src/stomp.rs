//! A raw STOMP-over-WebSocket test client (tokio-tungstenite and a frame parser of its own): sends
//! any bytes, reads frames, heart-beats and the close exactly as they come; also over SockJS's
//! WebSocket transport (`o`, `h`, `a[…]`, `c[…]` inside the WebSocket messages), and over its
//! transports over HTTP requests (the same frames, one per line of a streaming response, an event
//! stream or a poll; `xhr_send` POSTs).

use std::collections::VecDeque;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ws::FRAME_TIMEOUT;

/// A server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StompFrame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The body's bytes when the frame came in a binary WebSocket message (`body` is then their
    /// lossy text).
    pub binary: Option<Vec<u8>>,
    /// The command and header lines as they came (escaped as they were).
    pub head: String,
}

impl StompFrame {
    /// Header `name`'s (first) value; panics when the frame has none.
    pub fn header(&self, name: &str) -> &str {
        self.get(name).unwrap_or_else(|| panic!("{} frame without {name}: {self:?}", self.command))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// Parses one frame (headers unescaped as STOMP 1.2 says).
    pub fn parse(text: &str) -> StompFrame {
        let (head, body) = text.split_once("\n\n").unwrap_or_else(|| panic!("no blank line in {text:?}"));
        let body = body.strip_suffix('\0').unwrap_or_else(|| panic!("no NUL at the end of {text:?}"));
        let mut lines = head.lines();
        let command = lines.next().unwrap().to_string();
        let unescape = |value: &str| value.replace("\\c", ":").replace("\\n", "\n").replace("\\\\", "\\");
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("bad header {line:?}"));
                (name.to_string(), unescape(value))
            })
            .collect();
        StompFrame { command, headers, body: body.to_string(), binary: None, head: head.to_string() }
    }

    /// Parses one frame that came in a binary WebSocket message: UTF-8 headers, any body.
    pub fn parse_binary(bytes: &[u8]) -> StompFrame {
        let split = bytes.windows(2).position(|pair| pair == b"\n\n").expect("a blank line");
        let body = &bytes[split + 2..];
        let body = body.strip_suffix(b"\0").expect("a NUL at the end");
        let head = std::str::from_utf8(&bytes[..split + 2]).expect("UTF-8 headers");
        let frame = StompFrame::parse(&format!("{head}\0"));
        StompFrame { body: String::from_utf8_lossy(body).into_owned(), binary: Some(body.to_vec()), ..frame }
    }
}

/// What the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StompEvent {
    Frame(StompFrame),
    /// A heart-beat (a text message of EOLs).
    HeartBeat,
    /// A close frame (code, reason), or the end of the stream.
    Close(Option<(u16, String)>),
}

pub struct StompClient {
    link: Link,
    /// The subprotocol the server chose.
    pub subprotocol: Option<String>,
    /// Whether STOMP frames travel in SockJS's framing.
    sockjs: bool,
    /// Events read from one SockJS message frame and not yet returned.
    pending: VecDeque<StompEvent>,
}

/// How the client reaches the gateway.
enum Link {
    WebSocket(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Xhr(Box<Xhr>),
}

/// How a SockJS client over HTTP requests receives: its transport's name in the session's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    XhrStreaming,
    EventSource,
    XhrPolling,
}

impl Receiver {
    fn path(self) -> &'static str {
        match self {
            Receiver::XhrStreaming => "xhr_streaming",
            Receiver::EventSource => "eventsource",
            Receiver::XhrPolling => "xhr",
        }
    }
}

/// SockJS's transports over HTTP requests: one receiving request after another for what the
/// gateway sends (each opened when the one before ended, until the session's close), a POST for
/// each message the client sends.
struct Xhr {
    http: reqwest::Client,
    /// `…/<server>/<session>`.
    base: String,
    receiver: Receiver,
    response: reqwest::Response,
    /// Bytes of the response not yet read as a line.
    buffered: Vec<u8>,
    /// Receiving requests made so far.
    requests: usize,
    /// Whether the session's close came.
    closed: bool,
}

impl Xhr {
    /// Opens session `base` with its first receiving request, whose first frame is `o`.
    async fn open(base: &str, receiver: Receiver) -> Xhr {
        let http = reqwest::Client::new();
        let (response, buffered) = Xhr::request(&http, base, receiver).await;
        let mut xhr = Xhr { http, base: base.into(), receiver, response, buffered, requests: 1, closed: false };
        let line = tokio::time::timeout(FRAME_TIMEOUT, xhr.next_line()).await.expect("the opening in time");
        assert_eq!(line.as_deref(), Some("o"), "SockJS's open frame");
        xhr
    }

    /// A receiving request, checked for its transport's content type and prelude, and the bytes
    /// read after its prelude.
    async fn request(http: &reqwest::Client, base: &str, receiver: Receiver) -> (reqwest::Response, Vec<u8>) {
        let url = format!("{base}/{}", receiver.path());
        let request = match receiver {
            Receiver::EventSource => http.get(url),
            Receiver::XhrStreaming | Receiver::XhrPolling => http.post(url),
        };
        let mut response = request.send().await.expect("the receiving request answered");
        assert_eq!(response.status(), 200);
        let (content_type, prelude) = match receiver {
            Receiver::XhrStreaming => ("application/javascript; charset=UTF-8", format!("{}\n", "h".repeat(2048))),
            Receiver::EventSource => ("text/event-stream; charset=UTF-8", "\r\n".into()),
            Receiver::XhrPolling => ("application/javascript; charset=UTF-8", String::new()),
        };
        assert_eq!(response.headers()["content-type"], content_type);
        let mut read = Vec::new();
        while read.len() < prelude.len() {
            let chunk = tokio::time::timeout(FRAME_TIMEOUT, response.chunk()).await.expect("the prelude in time");
            read.extend_from_slice(&chunk.expect("the prelude").expect("the prelude"));
        }
        assert_eq!(&read[..prelude.len()], prelude.as_bytes(), "the prelude");
        (response, read.split_off(prelude.len()))
    }

    /// The next frame the gateway sent; `None` when the session's close was the last.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffered.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=end).collect();
                let line = String::from_utf8(line[..end].to_vec()).expect("UTF-8 lines");
                let frame = match self.receiver {
                    Receiver::EventSource if line.trim_end_matches('\r').is_empty() => continue,
                    Receiver::EventSource => {
                        line.trim_end_matches('\r').strip_prefix("data: ").expect("data lines").to_string()
                    }
                    Receiver::XhrStreaming | Receiver::XhrPolling => line,
                };
                self.closed |= frame.starts_with("c[");
                return Some(frame);
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffered.extend_from_slice(&chunk),
                Ok(None) if !self.closed => {
                    assert!(self.buffered.is_empty(), "a response ended inside a frame");
                    (self.response, self.buffered) = Xhr::request(&self.http, &self.base, self.receiver).await;
                    self.requests += 1;
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Sends the next requests on new connections, as a client whose kept-alive one was closed.
    fn drop_connections(&mut self) {
        self.http = reqwest::Client::new();
    }

    /// POSTs `body` to `xhr_send`: the status and the answer's text.
    async fn send(&self, body: &str) -> (u16, String) {
        let url = format!("{}/xhr_send", self.base);
        let response = self.http.post(url).body(body.to_string()).send().await.expect("xhr_send answered");
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

impl StompClient {
    /// Opens `url` offering `subprotocols` (comma-separated, none if empty) and `headers`.
    pub async fn open(url: &str, subprotocols: &str, headers: &[(&str, &str)]) -> StompClient {
        let mut request = url.into_client_request().expect("a valid URL");
        if !subprotocols.is_empty() {
            request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(subprotocols).unwrap());
        }
        for (name, value) in headers {
            let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            request.headers_mut().insert(name, HeaderValue::from_str(value).unwrap());
        }
        let (stream, response) = tokio_tungstenite::connect_async(request).await.expect("upgrade to /stomp");
        let subprotocol =
            response.headers().get("sec-websocket-protocol").map(|value| value.to_str().unwrap().to_string());
        StompClient { link: Link::WebSocket(Box::new(stream)), subprotocol, sockjs: false, pending: VecDeque::new() }
    }

    /// Opens SockJS's WebSocket transport at `url` (`…/stomp/<server>/<session>/websocket`) and
    /// reads its open frame `o`.
    pub async fn open_sockjs(url: &str) -> StompClient {
        let (mut stream, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade to SockJS's transport");
        let open = tokio::time::timeout(FRAME_TIMEOUT, stream.next()).await.expect("the open frame in time");
        assert_eq!(open.unwrap().unwrap(), Message::text("o"), "SockJS opens with `o`");
        StompClient {
            link: Link::WebSocket(Box::new(stream)),
            subprotocol: None,
            sockjs: true,
            pending: VecDeque::new(),
        }
    }

    /// Opens SockJS session `base` (`http://…/stomp/<server>/<session>`) over HTTP requests
    /// received the `receiver` way, and reads its open frame `o`.
    pub async fn open_xhr(base: &str, receiver: Receiver) -> StompClient {
        let xhr = Xhr::open(base, receiver).await;
        StompClient { link: Link::Xhr(Box::new(xhr)), subprotocol: None, sockjs: true, pending: VecDeque::new() }
    }

    /// [`StompClient::open_xhr`], then CONNECT with `headers` (`accept-version:1.2` added).
    pub async fn connect_xhr(base: &str, receiver: Receiver, headers: &[(&str, &str)]) -> StompClient {
        let mut client = StompClient::open_xhr(base, receiver).await;
        let mut all = vec![("accept-version", "1.2"), ("host", "herald")];
        all.extend_from_slice(headers);
        client.send_frame("CONNECT", &all, "").await;
        client
    }

    /// POSTs `body` as it is to the session's `xhr_send`: the status and the answer's text.
    pub async fn xhr_send(&self, body: &str) -> (u16, String) {
        self.xhr().send(body).await
    }

    /// How many receiving requests the session's client made so far.
    pub fn receiving_requests(&self) -> usize {
        self.xhr().requests
    }

    /// Sends the next HTTP requests on new connections (a SockJS transport over them).
    pub fn drop_http_connections(&mut self) {
        match &mut self.link {
            Link::Xhr(xhr) => xhr.drop_connections(),
            _ => panic!("not a SockJS transport over HTTP requests"),
        }
    }

    fn xhr(&self) -> &Xhr {
        match &self.link {
            Link::Xhr(xhr) => xhr,
            Link::WebSocket(_) => panic!("not a SockJS client over HTTP requests"),
        }
    }

    /// [`StompClient::open_sockjs`], then CONNECT with `headers` (`accept-version:1.2` added).
    pub async fn connect_sockjs(url: &str, headers: &[(&str, &str)]) -> StompClient {
        let mut client = StompClient::open_sockjs(url).await;
        let mut all = vec![("accept-version", "1.2"), ("host", "herald")];
        all.extend_from_slice(headers);
        client.send_frame("CONNECT", &all, "").await;
        client
    }

    /// [`StompClient::connect`] over a TCP connection made by the test (a small receive buffer, say).
    pub async fn connect_over(tcp: TcpStream, url: &str, headers: &[(&str, &str)]) -> StompClient {
        let mut request = url.into_client_request().expect("a valid URL");
        request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("v12.stomp"));
        let (stream, _) =
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)).await.expect("upgrade to /stomp");
        let mut client = StompClient {
            link: Link::WebSocket(Box::new(stream)),
            subprotocol: None,
            sockjs: false,
            pending: VecDeque::new(),
        };
        let mut all = vec![("accept-version", "1.2"), ("host", "herald")];
        all.extend_from_slice(headers);
        client.send_frame("CONNECT", &all, "").await;
        client
    }

    /// Opens `url` (offering `v12.stomp`) and sends CONNECT with `headers` (`accept-version:1.2`
    /// added).
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> StompClient {
        let mut client = StompClient::open(url, "v12.stomp", &[]).await;
        let mut all = vec![("accept-version", "1.2"), ("host", "herald")];
        all.extend_from_slice(headers);
        client.send_frame("CONNECT", &all, "").await;
        client
    }

    /// Sends a frame.
    pub async fn send_frame(&mut self, command: &str, headers: &[(&str, &str)], body: &str) {
        let mut text = format!("{command}\n");
        for (name, value) in headers {
            text.push_str(&format!("{name}:{value}\n"));
        }
        text.push('\n');
        text.push_str(body);
        text.push('\0');
        self.send_raw(&text).await;
    }

    /// Sends one WebSocket text message (over SockJS: a message frame holding `text`).
    pub async fn send_raw(&mut self, text: &str) {
        let text = if self.sockjs { serde_json::json!([text]).to_string() } else { text.to_string() };
        self.send_websocket(&text).await;
    }

    /// Sends one WebSocket message of the `message` given (a binary one, a close), on the WebSocket.
    pub async fn send_message(&mut self, message: Message) {
        match &mut self.link {
            Link::WebSocket(stream) => stream.send(message).await.expect("send to the gateway"),
            Link::Xhr(_) => panic!("an XHR transport sends text only"),
        }
    }

    /// Sends one WebSocket text message as it is, SockJS or not.
    pub async fn send_websocket(&mut self, text: &str) {
        match &mut self.link {
            Link::WebSocket(stream) => stream.send(Message::text(text)).await.expect("send to the gateway"),
            Link::Xhr(xhr) => assert_eq!(xhr.send(text).await, (204, String::new()), "xhr_send of {text:?}"),
        }
    }

    /// The next frame, heart-beat or close; panics after [`FRAME_TIMEOUT`].
    pub async fn next_event(&mut self) -> StompEvent {
        tokio::time::timeout(FRAME_TIMEOUT, self.recv()).await.expect("nothing from the gateway in time")
    }

    async fn recv(&mut self) -> StompEvent {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            let stream = match &mut self.link {
                Link::WebSocket(stream) => stream,
                Link::Xhr(xhr) => match xhr.next_line().await {
                    Some(line) => {
                        self.pending.extend(sockjs_events(&line));
                        continue;
                    }
                    None => return StompEvent::Close(None),
                },
            };
            match stream.next().await {
                Some(Ok(Message::Text(text))) if self.sockjs => self.pending.extend(sockjs_events(&text)),
                Some(Ok(Message::Text(text))) => return stomp_event(&text),
                Some(Ok(Message::Close(close))) => {
                    return StompEvent::Close(close.map(|c| (u16::from(c.code), c.reason.to_string())));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(bytes))) if !self.sockjs => {
                    return StompEvent::Frame(StompFrame::parse_binary(&bytes));
                }
                Some(Ok(Message::Binary(_))) => panic!("the gateway sent a binary frame on SockJS"),
                Some(Err(_)) | None => return StompEvent::Close(None),
            }
        }
    }

    /// The next frame, whatever its command (heart-beats skipped).
    pub async fn next_frame(&mut self) -> StompFrame {
        loop {
            match self.next_event().await {
                StompEvent::HeartBeat => continue,
                StompEvent::Frame(frame) => return frame,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next frame, skipping heart-beats; panics on a close or another command.
    pub async fn expect(&mut self, command: &str) -> StompFrame {
        loop {
            match self.next_event().await {
                StompEvent::HeartBeat => continue,
                StompEvent::Frame(frame) if frame.command == command => return frame,
                other => panic!("expected {command}, got {other:?}"),
            }
        }
    }

    /// The close code after an ERROR frame, which is returned too.
    pub async fn expect_error_and_close(&mut self) -> (StompFrame, Option<u16>) {
        let error = self.expect("ERROR").await;
        loop {
            match self.next_event().await {
                StompEvent::HeartBeat => continue,
                StompEvent::Close(close) => return (error, close.map(|(code, _)| code)),
                other => panic!("expected the close after {error:?}, got {other:?}"),
            }
        }
    }
}

/// A STOMP WebSocket message: a frame or heart-beats.
fn stomp_event(text: &str) -> StompEvent {
    if text.trim_matches(['\n', '\r']).is_empty() {
        return StompEvent::HeartBeat;
    }
    StompEvent::Frame(StompFrame::parse(text))
}

/// The events of one SockJS frame: `h` a heart-beat, `a[…]` its STOMP messages, `c[code,reason]`
/// the close (the WebSocket close that follows it is read as another).
fn sockjs_events(text: &str) -> Vec<StompEvent> {
    if text == "h" {
        return vec![StompEvent::HeartBeat];
    }
    if let Some(messages) = text.strip_prefix('a') {
        let messages: Vec<String> =
            serde_json::from_str(messages).unwrap_or_else(|_| panic!("bad SockJS frame {text}"));
        return messages.iter().map(|message| stomp_event(message)).collect();
    }
    if let Some(close) = text.strip_prefix('c') {
        let (code, reason): (u16, String) = serde_json::from_str(close).unwrap_or_else(|_| panic!("bad close {text}"));
        return vec![StompEvent::Close(Some((code, reason)))];
    }
    panic!("unknown SockJS frame {text:?}")
}
