//! One client connection: a task that dials, upgrades to WebSocket (or opens an event stream),
//! speaks its protocol and counts what arrives until the fleet stops it.
//!
//! Cheap per connection: no read buffer of its own while idle. The task waits for readability, then
//! reads into a per-thread scratch buffer, handles every whole frame (or event) there and keeps only
//! the tail of a partial one. Counters go to the fleet once per read, not once per frame.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::fleet::FleetShared;
use super::http::Body;
use super::protocol::{Decoder, Event, Protocol};
use super::sse;
use super::ws::{self, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Parsed};
use crate::payload::{now_ns, stamp_in};

/// Bytes read per system call.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// The read buffer shared by every connection a worker thread polls.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
    /// Latency samples of one read, recorded into the fleet's histogram with one lock.
    static SAMPLES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Where and how one client connects.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// The target's listener.
    pub addr: SocketAddr,
    /// A local address to bind before connecting (to spread connections over source addresses).
    pub source: Option<IpAddr>,
    /// Request path and query, e.g. `/ws?token=…`.
    pub path: String,
    /// What the client speaks.
    pub protocol: Protocol,
}

/// What one client saw, returned when the fleet stops.
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    /// The sequence in Herald's `welcome`.
    pub welcome_seq: Option<u64>,
    /// Whether the welcome (or its equivalent) arrived.
    pub welcomed: bool,
    /// Whether the client went live (welcome, or `replayed` when resuming).
    pub live: bool,
    /// The `count` of Herald's `replayed` frame.
    pub replayed_count: Option<u64>,
    /// Messages received in all.
    pub msgs: u64,
    /// Messages received before the client went live (replayed ones).
    pub msgs_before_live: u64,
    /// The close code the server sent, if it closed the connection.
    pub close_code: Option<u16>,
    /// Whether the server ended the connection (close frame or end of stream) before the fleet
    /// stopped it.
    pub ended_by_server: bool,
    /// Why the client failed, if it did.
    pub error: Option<String>,
}

/// What carries the protocol's bytes.
enum Transport {
    /// WebSocket frames.
    WebSocket,
    /// The body of an HTTP response holding Server-Sent Events.
    EventStream(Body),
}

/// Per-connection state between reads.
struct Conn {
    transport: Transport,
    decoder: Decoder,
    /// The opcode of the frames sent (see [`super::protocol::Protocol::send_opcode`]).
    send_opcode: u8,
    resume: bool,
    /// The tail of a frame (or event) that has not fully arrived.
    partial: Vec<u8>,
    /// Bytes to send after handling a read.
    out: Vec<u8>,
    report: ClientReport,
}

/// Runs one client until the fleet stops it or the server ends it.
pub(crate) async fn run(spec: ClientSpec, fleet: Arc<FleetShared>) -> ClientReport {
    let permit = match &fleet.connect_limit {
        Some(limit) => limit.clone().acquire_owned().await.ok(),
        None => None,
    };
    let (mut conn, hello) = Conn::new(&spec.protocol);
    let stream = tokio::select! {
        opened = tokio::time::timeout(fleet.connect_timeout, open(&spec, &hello, &mut conn, &fleet)) => match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return fleet.failed(conn.report, format!("{error:#}")),
            Err(_) => return fleet.failed(conn.report, "timed out connecting".into()),
        },
        _ = fleet.stop.cancelled() => return conn.report,
    };
    drop(permit);
    if let Err(error) = read_loop(&stream, &mut conn, &fleet).await {
        conn.report.error.get_or_insert_with(|| format!("{error:#}"));
    }
    if !conn.report.welcomed {
        let error = conn.report.error.take().unwrap_or_else(|| match conn.report.close_code {
            Some(code) => format!("closed by the server with {code} before the welcome"),
            None if conn.report.ended_by_server => "closed by the server before the welcome".into(),
            None => "stopped before the welcome".into(),
        });
        return fleet.failed(conn.report, error);
    }
    if conn.report.ended_by_server {
        fleet.ended(&conn.report);
    }
    conn.report
}

/// Dials, upgrades (or requests the event stream), sends the protocol's opening bytes and handles
/// what came with the response head.
async fn open(spec: &ClientSpec, hello: &[u8], conn: &mut Conn, fleet: &FleetShared) -> Result<TcpStream> {
    let socket = if spec.addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(source) = spec.source {
        socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("bind {source}"))?;
    }
    let mut stream = socket.connect(spec.addr).await.with_context(|| format!("connect {}", spec.addr))?;
    stream.set_nodelay(true)?;
    let host = spec.addr.to_string();
    let mut early = if let Transport::EventStream(body) = &mut conn.transport {
        let (framing, early) = sse::open(&mut stream, &host, &spec.path).await?;
        *body = framing;
        early
    } else {
        let early = ws::handshake(&mut stream, &host, &spec.path).await?;
        if !hello.is_empty() {
            let mut frame = Vec::with_capacity(hello.len() + 14);
            ws::encode(spec.protocol.send_opcode(), hello, &mut frame);
            stream.write_all(&frame).await?;
        }
        early
    };
    if !early.is_empty() {
        conn.handle(&mut early, fleet);
    }
    Ok(stream)
}

/// Reads until the fleet stops or the connection ends.
async fn read_loop(stream: &TcpStream, conn: &mut Conn, fleet: &FleetShared) -> Result<()> {
    loop {
        // Checked before waiting: what came with the response head may already have ended it (and
        // an HTTP server keeps the connection open after a complete response).
        if conn.report.ended_by_server {
            return Ok(());
        }
        if let Some(error) = &conn.report.error {
            bail!("{error}");
        }
        flush(stream, conn).await?;
        tokio::select! {
            ready = stream.readable() => ready?,
            _ = fleet.stop.cancelled() => return Ok(()),
        }
        let read = SCRATCH.with_borrow_mut(|scratch| match stream.try_read(scratch) {
            Ok(0) => Ok(false),
            Ok(n) => {
                conn.handle(&mut scratch[..n], fleet);
                Ok(true)
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
            Err(error) => Err(error),
        });
        if !read? {
            conn.report.ended_by_server = true;
        }
    }
}

/// Sends the bytes the last read asked for (pongs, NATS `PONG`s).
async fn flush(stream: &TcpStream, conn: &mut Conn) -> std::io::Result<()> {
    let mut at = 0;
    while at < conn.out.len() {
        stream.writable().await?;
        match stream.try_write(&conn.out[at..]) {
            Ok(n) => at += n,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    conn.out.clear();
    Ok(())
}

impl Conn {
    /// A connection speaking `protocol`, and the bytes to send once it is open.
    fn new(protocol: &Protocol) -> (Conn, Vec<u8>) {
        let transport = match protocol {
            // The body's real framing is known once the response head is read.
            Protocol::Sse => Transport::EventStream(Body::UntilClose),
            _ => Transport::WebSocket,
        };
        let (decoder, hello) = Decoder::new(protocol);
        let conn = Conn {
            transport,
            decoder,
            send_opcode: protocol.send_opcode(),
            resume: matches!(protocol, Protocol::Herald { resume: true }),
            partial: Vec::new(),
            out: Vec::new(),
            report: ClientReport::default(),
        };
        (conn, hello)
    }

    /// Handles bytes just read: every whole frame (or event), keeping a partial one for the next
    /// read. An event stream's body is first taken out of its HTTP framing, in place.
    fn handle(&mut self, data: &mut [u8], fleet: &FleetShared) {
        let before = self.report.msgs;
        let now = now_ns();
        let (data, body_ended) = match &mut self.transport {
            Transport::WebSocket => (&*data, false),
            Transport::EventStream(body) => match body.decode(data) {
                Ok(decoded) => (&data[..decoded.len], decoded.ended),
                Err(error) => {
                    self.report.error = Some(format!("{error:#}"));
                    return;
                }
            },
        };
        let mut data = data;
        if !self.partial.is_empty() {
            // Only the rest of the unit the last read cut is copied, never the whole read: the
            // tool's cost per message must not depend on how the server sizes its writes.
            let rest = self.rest_of_partial(data);
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(&data[..rest]);
            data = &data[rest..];
            let used = self.units(&buf, now, fleet);
            buf.drain(..used);
            self.partial = buf;
        }
        if self.partial.is_empty() {
            let used = self.units(data, now, fleet);
            self.partial.extend_from_slice(&data[used..]);
        } else {
            self.partial.extend_from_slice(data);
        }
        self.report.ended_by_server |= body_ended;
        if self.partial.is_empty() && self.partial.capacity() > SCRATCH_BYTES {
            self.partial = Vec::new();
        }
        fleet.add_msgs(self.report.msgs - before, now);
        SAMPLES.with_borrow_mut(|samples| {
            if !samples.is_empty() {
                fleet.record_latencies(samples);
                samples.clear();
            }
        });
    }

    /// How many bytes at the start of `data` complete the unit `partial` holds the start of (all
    /// of `data` when they do not).
    fn rest_of_partial(&self, data: &[u8]) -> usize {
        let needed = match self.transport {
            Transport::WebSocket => {
                // A server frame's head is 10 bytes at most.
                let mut head = [0u8; 10];
                let from_partial = self.partial.len().min(head.len());
                head[..from_partial].copy_from_slice(&self.partial[..from_partial]);
                let from_data = (head.len() - from_partial).min(data.len());
                head[from_partial..from_partial + from_data].copy_from_slice(&data[..from_data]);
                ws::frame_len(&head[..from_partial + from_data]).map(|len| len.saturating_sub(self.partial.len()))
            }
            // An event ends at the first blank line, which may begin in the part already read.
            Transport::EventStream(_) if self.partial.ends_with(b"\n") && data.first() == Some(&b'\n') => Some(1),
            Transport::EventStream(_) => sse::event_end(data),
        };
        needed.map_or(data.len(), |needed| needed.min(data.len()))
    }

    /// Handles the whole frames (or events) at the start of `buf`; returns the bytes they took.
    fn units(&mut self, buf: &[u8], now: u64, fleet: &FleetShared) -> usize {
        match self.transport {
            Transport::WebSocket => self.frames(buf, now, fleet),
            Transport::EventStream(_) => self.events(buf, now, fleet),
        }
    }

    /// Handles the whole frames at the start of `buf`; returns the bytes they took.
    fn frames(&mut self, buf: &[u8], now: u64, fleet: &FleetShared) -> usize {
        let mut at = 0;
        while at < buf.len() {
            match ws::parse(&buf[at..]) {
                Parsed::Frame(frame, len) => {
                    at += len;
                    match frame.opcode {
                        OP_PING => ws::encode(OP_PONG, frame.payload, &mut self.out),
                        OP_PONG => {}
                        OP_CLOSE => {
                            self.report.close_code =
                                frame.payload.get(..2).map(|code| u16::from_be_bytes([code[0], code[1]]));
                            self.report.ended_by_server = true;
                            return at;
                        }
                        opcode => self.data(opcode, frame.payload, now, fleet),
                    }
                }
                Parsed::Incomplete => break,
                Parsed::Invalid(why) => {
                    self.report.error = Some(why.to_string());
                    return buf.len();
                }
            }
        }
        at
    }

    /// Handles the whole events at the start of `buf`; returns the bytes they took.
    fn events(&mut self, buf: &[u8], now: u64, fleet: &FleetShared) -> usize {
        let mut at = 0;
        while let Some((event, len)) = sse::next_event(&buf[at..]) {
            at += len;
            self.data(OP_TEXT, event, now, fleet);
            if self.report.ended_by_server {
                return at;
            }
        }
        at
    }

    fn data(&mut self, opcode: u8, payload: &[u8], now: u64, fleet: &FleetShared) {
        let mut reply = Vec::new();
        let report = &mut self.report;
        let resume = self.resume;
        self.decoder.on_data(opcode, payload, &mut reply, &mut |event| match event {
            Event::Welcome { seq } => {
                report.welcomed = true;
                report.welcome_seq = seq;
                fleet.welcomed(now);
                if !resume {
                    report.live = true;
                    fleet.live(now);
                }
            }
            Event::Replayed { count } => {
                report.replayed_count = Some(count);
                if !report.live {
                    report.live = true;
                    fleet.live(now);
                }
            }
            Event::Msg(bytes) => {
                report.msgs += 1;
                if !report.live {
                    report.msgs_before_live += 1;
                } else if fleet.record_latency
                    && let Some(stamp) = stamp_in(bytes)
                {
                    SAMPLES.with_borrow_mut(|samples| samples.push(now.saturating_sub(stamp)));
                }
            }
            Event::Closed { code } => {
                report.close_code = code;
                report.ended_by_server = true;
            }
            Event::Failed(error) => report.error = Some(error),
        });
        if !reply.is_empty() {
            ws::encode(self.send_opcode, &reply, &mut self.out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Fleet, FleetOptions};
    use crate::payload::stamped;

    const WELCOME: &str = r#"{"type":"welcome","conn":"c","user":"u","device":"d","node":"n","seq":7,"heartbeat":25}"#;

    fn message_event(seq: u64) -> String {
        format!("id: {seq}\nevent: message\ndata: {}\n\n", String::from_utf8(stamped(5, 100).to_vec()).unwrap())
    }

    /// A chunked body as the gateway sends it: welcome and a comment in one chunk, two messages and
    /// half a third in the next, the rest of it in another, the close event, the last chunk.
    fn chunked_stream() -> Vec<u8> {
        let start = format!("retry: 1000\nevent: welcome\ndata: {WELCOME}\n\n: ping\n\n");
        let (third, cut) = (message_event(10), 40);
        let chunks = [
            start,
            format!("{}{}{}", message_event(8), message_event(9), &third[..cut]),
            third[cut..].to_string(),
            "event: close\ndata: {\"code\":4008,\"reason\":\"slow\"}\n\n".to_string(),
        ];
        let mut wire: Vec<u8> = chunks.iter().flat_map(|c| format!("{:x}\r\n{c}\r\n", c.len()).into_bytes()).collect();
        wire.extend_from_slice(b"0\r\n\r\n");
        wire
    }

    /// Feeds `wire` to a fresh event-stream connection in pieces cut at `cuts`; returns the report,
    /// the messages the fleet counted and the latencies it recorded.
    fn read_in_pieces(body: Body, wire: &[u8], cuts: &[usize]) -> (ClientReport, u64, u64) {
        let fleet = Fleet::launch(Vec::new(), &FleetOptions { record_latency: true, ..FleetOptions::default() });
        let (mut conn, _) = Conn::new(&Protocol::Sse);
        conn.transport = Transport::EventStream(body);
        let mut start = 0;
        for end in cuts.iter().copied().chain([wire.len()]) {
            conn.handle(&mut wire[start..end].to_vec(), fleet.shared());
            start = end;
        }
        assert!(conn.out.is_empty(), "an SSE client never sends");
        (conn.report, fleet.counts().msgs, fleet.latency().count)
    }

    #[test]
    fn an_event_stream_reads_the_same_however_reads_cut_it() {
        let wire = chunked_stream();
        let mut cuts: Vec<Vec<usize>> = (0..=wire.len()).map(|cut| vec![cut]).collect();
        for first in (0..wire.len()).step_by(7) {
            cuts.extend((first..wire.len()).step_by(5).map(|second| vec![first, second]));
        }
        for cuts in cuts {
            let (report, msgs, latencies) = read_in_pieces(Body::Chunked(Default::default()), &wire, &cuts);
            assert!(report.welcomed && report.live && report.error.is_none(), "{cuts:?}: {report:?}");
            assert_eq!(report.welcome_seq, Some(7));
            assert_eq!((report.msgs, msgs, latencies), (3, 3, 3), "{cuts:?}");
            assert_eq!((report.close_code, report.ended_by_server), (Some(4008), true), "{cuts:?}");
        }
    }

    /// An unmasked frame, as a server sends it.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..=125 => frame.push(len as u8),
            len => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn websocket_frames_read_the_same_however_reads_cut_them() {
        let msg = |pad: usize| {
            let data = String::from_utf8(stamped(5, pad).to_vec()).unwrap();
            server_frame(OP_TEXT, format!(r#"{{"type":"msg","seq":8,"data":{data}}}"#).as_bytes())
        };
        let frames = [
            server_frame(OP_TEXT, WELCOME.as_bytes()),
            msg(30),
            msg(300),
            server_frame(OP_PING, b"hi"),
            msg(100),
            server_frame(OP_CLOSE, &4008u16.to_be_bytes()),
        ];
        let wire = frames.concat();
        let fleet = Fleet::launch(Vec::new(), &FleetOptions { record_latency: true, ..FleetOptions::default() });
        let mut cuts: Vec<Vec<usize>> = (0..=wire.len()).map(|cut| vec![cut]).collect();
        for first in (0..wire.len()).step_by(3) {
            cuts.extend((first..wire.len()).step_by(7).map(|second| vec![first, second]));
        }
        for cuts in cuts {
            let (mut conn, _) = Conn::new(&Protocol::Herald { resume: false });
            let mut start = 0;
            for end in cuts.iter().copied().chain([wire.len()]) {
                conn.handle(&mut wire[start..end].to_vec(), fleet.shared());
                start = end;
            }
            let report = &conn.report;
            assert!(report.welcomed && report.error.is_none(), "{cuts:?}: {report:?}");
            assert_eq!((report.msgs, report.close_code), (3, Some(4008)), "{cuts:?}");
            let mut pong = Vec::new();
            ws::encode(OP_PONG, b"hi", &mut pong);
            assert_eq!(conn.out, pong, "{cuts:?}");
            assert!(conn.partial.is_empty(), "{cuts:?}");
        }
    }

    #[test]
    fn an_event_stream_ends_with_its_body() {
        let welcome = format!("event: welcome\ndata: {WELCOME}\n\n");
        let wire = format!("{:x}\r\n{welcome}\r\n0\r\n\r\n", welcome.len());
        let (report, _, _) = read_in_pieces(Body::Chunked(Default::default()), wire.as_bytes(), &[]);
        assert!(report.welcomed && report.ended_by_server && report.close_code.is_none());
        // A gateway that is not ready answers with a whole body holding only a close event.
        let refusal = "retry: 1000\nevent: close\ndata: {\"code\":1013,\"reason\":\"nats\"}\n\n";
        let (report, _, _) = read_in_pieces(Body::Length(refusal.len() as u64), refusal.as_bytes(), &[20]);
        assert!(!report.welcomed && report.ended_by_server);
        assert_eq!(report.close_code, Some(1013));
        let unchunked = format!("event: welcome\ndata: {WELCOME}\n\n{}", message_event(8));
        let (report, msgs, _) = read_in_pieces(Body::UntilClose, unchunked.as_bytes(), &[30]);
        assert!(report.welcomed && !report.ended_by_server);
        assert_eq!(msgs, 1);
    }

    #[test]
    fn bad_chunk_framing_fails_the_client() {
        let (report, _, _) = read_in_pieces(Body::Chunked(Default::default()), b"zz\r\n", &[]);
        assert!(report.error.unwrap().contains("chunk-size"));
    }
}
