//! One client connection: a task that dials, upgrades, speaks its protocol and counts what arrives
//! until the fleet stops it.
//!
//! Cheap per connection: no read buffer of its own while idle. The task waits for readability, then
//! reads into a per-thread scratch buffer, handles every whole frame there and keeps only the tail
//! of a partial frame. Counters go to the fleet once per read, not once per frame.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::fleet::FleetShared;
use super::protocol::{Decoder, Event, Protocol};
use super::ws::{self, OP_CLOSE, OP_PING, OP_PONG, Parsed};
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
    /// The target's WebSocket listener.
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

/// Per-connection state between reads.
struct Conn {
    decoder: Decoder,
    /// The opcode of the frames sent (see [`super::protocol::Protocol::send_opcode`]).
    send_opcode: u8,
    resume: bool,
    /// The tail of a frame that has not fully arrived.
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
    let (decoder, hello) = Decoder::new(&spec.protocol);
    let resume = matches!(spec.protocol, Protocol::Herald { resume: true });
    let send_opcode = spec.protocol.send_opcode();
    let mut conn =
        Conn { decoder, send_opcode, resume, partial: Vec::new(), out: Vec::new(), report: ClientReport::default() };
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

/// Dials, upgrades, sends the protocol's opening bytes and handles frames that came with the
/// handshake response.
async fn open(spec: &ClientSpec, hello: &[u8], conn: &mut Conn, fleet: &FleetShared) -> Result<TcpStream> {
    let socket = if spec.addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(source) = spec.source {
        socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("bind {source}"))?;
    }
    let mut stream = socket.connect(spec.addr).await.with_context(|| format!("connect {}", spec.addr))?;
    stream.set_nodelay(true)?;
    let early = ws::handshake(&mut stream, &spec.addr.to_string(), &spec.path).await?;
    if !hello.is_empty() {
        let mut frame = Vec::with_capacity(hello.len() + 14);
        ws::encode(spec.protocol.send_opcode(), hello, &mut frame);
        stream.write_all(&frame).await?;
    }
    if !early.is_empty() {
        conn.handle(&early, fleet);
        flush(&stream, conn).await?;
    }
    Ok(stream)
}

/// Reads until the fleet stops or the connection ends.
async fn read_loop(stream: &TcpStream, conn: &mut Conn, fleet: &FleetShared) -> Result<()> {
    loop {
        tokio::select! {
            ready = stream.readable() => ready?,
            _ = fleet.stop.cancelled() => return Ok(()),
        }
        let read = SCRATCH.with_borrow_mut(|scratch| match stream.try_read(scratch) {
            Ok(0) => Ok(false),
            Ok(n) => {
                conn.handle(&scratch[..n], fleet);
                Ok(true)
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
            Err(error) => Err(error),
        });
        if !read? || conn.report.ended_by_server {
            conn.report.ended_by_server = true;
            return Ok(());
        }
        if let Some(error) = &conn.report.error {
            bail!("{error}");
        }
        flush(stream, conn).await?;
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
    /// Handles bytes just read: every whole frame, keeping a partial one for the next read.
    fn handle(&mut self, data: &[u8], fleet: &FleetShared) {
        let before = self.report.msgs;
        let now = now_ns();
        if self.partial.is_empty() {
            let used = self.frames(data, now, fleet);
            self.partial.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.frames(&buf, now, fleet);
            buf.drain(..used);
            self.partial = buf;
        }
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
            Event::Failed(error) => report.error = Some(error),
        });
        if !reply.is_empty() {
            ws::encode(self.send_opcode, &reply, &mut self.out);
        }
    }
}
