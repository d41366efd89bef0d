//! Socket.IO 4 over Engine.IO 4 (a WebSocket, or long-polling: see [`crate::http::engineio`]), at
//! `/socket.io/`, namespace `/`.
//!
//! A message is an event named by its kind (`message` when it has none) with the payload and
//! `{seq, to, id, ts}`, and the `seq` as a last string argument: the offset Socket.IO clients keep
//! for connection state recovery (a reconnect with `pid` and `offset` replays from there). Clients
//! emit `rpc` (function, data, ack), `sub` (topic, optional since, optional ack) and `unsub`
//! (topic, optional ack); acks answer `{"ok":true,…}` or `{"ok":false,"error":{code,message}}`.

mod pid;
pub(crate) mod wire;

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use herald_shared::frame::{RpcResult, ServerFrame};
use serde_json::{Value, json};

use super::{Command, Refusal};
use crate::close::{Close, CloseCode};
pub(crate) use pid::Pid;
use wire::{engine, packet};

/// One Socket.IO connection.
#[derive(Debug)]
pub(crate) struct SocketIoCodec {
    /// The private id of the connection's state: the client's own when it recovers.
    pid: Pid,
    /// The client asked to recover its state: the CONNECT answer waits for the replay's end, to
    /// give the pid back only when nothing after the client's offset is missing.
    recovering: bool,
    /// The session welcomed the connection.
    welcomed: bool,
    connected: bool,
    /// Ack ids of `sub` and `unsub` events waiting for their answer, by topic, in order.
    sub_acks: HashMap<String, VecDeque<u64>>,
    unsub_acks: HashMap<String, VecDeque<u64>>,
}

impl SocketIoCodec {
    pub(crate) fn new(pid: Pid, recovering: bool) -> SocketIoCodec {
        let (welcomed, connected) = (false, false);
        SocketIoCodec { pid, recovering, welcomed, connected, sub_acks: HashMap::new(), unsub_acks: HashMap::new() }
    }

    /// The CONNECT answer.
    fn connect(&mut self) -> Bytes {
        self.connected = true;
        self.connect_packet(&self.pid)
    }

    /// The CONNECT answer with `pid`. The socket's id (`socket.id`, public: apps log it and send
    /// it to their backends) is derived from the pid one way, so it does not give the pid away: a
    /// recovered socket keeps the id it had, as socket.io keeps `socket.id` across a recovery, and
    /// one not recovered gets the next pid, so another id.
    fn connect_packet(&self, pid: &Pid) -> Bytes {
        wire::packet(packet::CONNECT, None, &json!({"sid": pid.socket_id(), "pid": pid.to_string()}))
    }

    /// The CONNECT answer queued was dropped unsent (the connection closes): [`Self::close`]
    /// answers instead.
    pub(crate) fn answer_dropped(&mut self) {
        self.connected = false;
    }

    /// The last bytes of the connection. A recovering client that was not answered yet gets its
    /// answer first, "not recovered": clients hand over the events they hold only then, and move
    /// their offset past them, so that the next recovery does not hand them over a second time.
    pub(crate) fn close(&self, close: &Close) -> Bytes {
        let last = close_frame(close);
        if !self.recovering || self.connected || !self.welcomed {
            return last;
        }
        let mut both = self.connect_packet(&self.pid.next()).to_vec();
        both.extend_from_slice(&last);
        Bytes::from(both)
    }

    pub(super) fn notice(&mut self, notice: &ServerFrame) -> Option<Bytes> {
        match notice {
            ServerFrame::Welcome { .. } => {
                self.welcomed = true;
                (!self.recovering).then(|| self.connect())
            }
            // The replayed events went first: clients hold events that come before the CONNECT
            // answer and hand them over right after it.
            ServerFrame::Replayed { topic: None, complete, .. } if self.recovering && !self.connected => {
                if !complete {
                    self.pid = self.pid.next();
                }
                Some(self.connect())
            }
            ServerFrame::Subscribed { topic } => answer(&mut self.sub_acks, topic, json!({"ok": true, "topic": topic})),
            ServerFrame::Unsubscribed { topic } => {
                answer(&mut self.unsub_acks, topic, json!({"ok": true, "topic": topic}))
            }
            ServerFrame::RpcResult(result) => rpc_answer(result),
            ServerFrame::Error { code, message, topic } => {
                let error = json!({"code": code, "message": message, "topic": topic});
                if let Some(topic) = topic {
                    let failed = json!({"ok": false, "error": error});
                    for acks in [&mut self.sub_acks, &mut self.unsub_acks] {
                        if acks.get(topic).is_some_and(|ids| !ids.is_empty()) {
                            return answer(acks, topic, failed);
                        }
                    }
                }
                Some(wire::packet(packet::EVENT, None, &json!(["error", error])))
            }
            _ => None,
        }
    }

    /// Reads an Engine.IO packet.
    pub(super) fn decode(&mut self, text: &[u8]) -> Vec<Result<Command, Refusal>> {
        let refused = |reason: &'static str| vec![Err(Refusal::Close(Close::new(CloseCode::Policy, reason)))];
        match text.split_first() {
            Some((&engine::PONG | &engine::NOOP, _)) => Vec::new(),
            // A ping from the client (the probe of an upgrade): answered with its data.
            Some((&engine::PING, data)) => {
                let mut pong = vec![engine::PONG];
                pong.extend_from_slice(data);
                vec![Err(Refusal::Reply(crate::websocket::frame::text(&pong)))]
            }
            Some((&engine::CLOSE, _)) => vec![Err(Refusal::Close(Close::client_left("client closed")))],
            Some((&engine::MESSAGE, socket_io)) => match socket_io.split_first() {
                Some((&packet::EVENT, rest)) => match in_namespace(rest) {
                    Ok(rest) => vec![self.event(rest)],
                    Err(namespace) => {
                        let reason = format!("an event in namespace {namespace}, which this connection is not on");
                        vec![Err(Refusal::Close(Close::new(CloseCode::Policy, reason)))]
                    }
                },
                Some((&packet::DISCONNECT, rest)) => match in_namespace(rest) {
                    Ok(_) => vec![Err(Refusal::Close(Close::client_left("client disconnected")))],
                    // Leaving a namespace it was refused: nothing to do.
                    Err(_) => Vec::new(),
                },
                Some((&packet::CONNECT, rest)) => match namespace_of(rest) {
                    // Another namespace: refused in it, as socket.io refuses one it does not serve;
                    // this connection goes on.
                    Some(namespace) => {
                        let refusal = json!({"message": "Invalid namespace: only / is served"});
                        vec![Err(Refusal::Reply(wire::namespaced_packet(
                            packet::CONNECT_ERROR,
                            Some(namespace),
                            &refusal,
                        )))]
                    }
                    // A second CONNECT to the namespace this connection is on: nothing to do.
                    None => Vec::new(),
                },
                _ => refused("not a Socket.IO packet this server accepts"),
            },
            _ => refused("not an Engine.IO packet"),
        }
    }

    /// An EVENT packet after its type: an optional ack id, then a JSON array `[name, args…]`.
    fn event(&mut self, rest: &[u8]) -> Result<Command, Refusal> {
        let digits = rest.iter().take_while(|byte| byte.is_ascii_digit()).count();
        let ack = match digits {
            0 => None,
            // ASCII digits: UTF-8.
            _ => match std::str::from_utf8(&rest[..digits]).ok().and_then(|id| id.parse::<u64>().ok()) {
                Some(id) => Some(id),
                None => return Err(Refusal::Close(Close::new(CloseCode::Policy, "an ack id is below 2^64"))),
            },
        };
        let Ok(Value::Array(args)) = serde_json::from_slice::<Value>(&rest[digits..]) else {
            return Err(Refusal::Close(Close::new(CloseCode::Policy, "an event is a JSON array")));
        };
        let mut args = args.into_iter();
        let name = args.next();
        let (first, second) = (args.next(), args.next());
        let refuse = |code: &str, message: String| {
            let error = json!({"code": code, "message": message});
            Err(Refusal::Reply(match ack {
                Some(id) => wire::packet(packet::ACK, Some(id), &json!([{"ok": false, "error": error}])),
                None => wire::packet(packet::EVENT, None, &json!(["error", error])),
            }))
        };
        match (name.as_ref().and_then(Value::as_str), first) {
            (Some("rpc"), Some(Value::String(function))) => {
                let id = ack.map(|id| id.to_string()).unwrap_or_default();
                Ok(Command::Rpc { id, function, data: second.unwrap_or(Value::Null) })
            }
            (Some("sub"), Some(Value::String(topic))) => {
                let since = match second {
                    None | Some(Value::Null) => None,
                    Some(since) => match seq_of(&since) {
                        Some(since) => Some(since),
                        None => return refuse("bad_request", "since must be a sequence number".into()),
                    },
                };
                if let Some(id) = ack {
                    self.sub_acks.entry(topic.clone()).or_default().push_back(id);
                }
                Ok(Command::Subscribe { topic, since })
            }
            (Some("unsub"), Some(Value::String(topic))) => {
                if let Some(id) = ack {
                    self.unsub_acks.entry(topic.clone()).or_default().push_back(id);
                }
                Ok(Command::Unsubscribe { topic })
            }
            (Some(name @ ("rpc" | "sub" | "unsub")), _) => {
                refuse("bad_request", format!("{name} needs a name as its first argument"))
            }
            (Some(name), _) => refuse("unknown_event", format!("unknown event {name:?}")),
            (None, _) => refuse("bad_request", "an event starts with its name".into()),
        }
    }
}

/// The rest of a packet after its namespace, when that is `/` (left out, or written out as `/,`);
/// else the namespace it names.
fn in_namespace(packet: &[u8]) -> Result<&[u8], String> {
    if !packet.starts_with(b"/") {
        return Ok(packet);
    }
    let end = packet.iter().position(|byte| *byte == b',').unwrap_or(packet.len());
    match &packet[..end] {
        b"/" => Ok(packet.get(end + 1..).unwrap_or_default()),
        other => Err(String::from_utf8_lossy(&other[..other.len().min(256)]).into_owned()),
    }
}

/// The namespace a CONNECT's data names, unless it is `/` (`/chat` of `/chat,{…}`).
pub(crate) fn namespace_of(connect: &[u8]) -> Option<&str> {
    let name = connect.split(|byte| *byte == b',').next()?;
    let name = std::str::from_utf8(name).ok()?;
    (name.starts_with('/') && name != "/" && name.len() <= 256).then_some(name)
}

/// The ack of the oldest waiting `sub`/`unsub` of `topic`, if it asked for one.
fn answer(acks: &mut HashMap<String, VecDeque<u64>>, topic: &str, body: Value) -> Option<Bytes> {
    let waiting = acks.get_mut(topic)?;
    let id = waiting.pop_front()?;
    if waiting.is_empty() {
        acks.remove(topic);
    }
    Some(wire::packet(packet::ACK, Some(id), &json!([body])))
}

fn rpc_answer(result: &RpcResult) -> Option<Bytes> {
    let Ok(id) = result.id.parse::<u64>() else {
        // Emitted without an ack: only a failure is told, as an `error` event (as a refused `sub`).
        let error = result.error.as_ref()?;
        let body = json!({"code": error.code, "message": error.message});
        return Some(wire::packet(packet::EVENT, None, &json!(["error", body])));
    };
    let body = match &result.error {
        Some(error) => json!({"ok": false, "error": {"code": error.code, "message": error.message}}),
        None => json!({"ok": true, "data": result.data}),
    };
    Some(wire::packet(packet::ACK, Some(id), &json!([body])))
}

/// The last bytes of a connection: a Socket.IO DISCONNECT first when the client must not reconnect
/// (Socket.IO clients reconnect after anything else).
pub(crate) fn close_frame(close: &Close) -> Bytes {
    let close_frame = crate::websocket::frame::close(close.number(), &close.reason);
    if matches!(close.code, CloseCode::Disconnected | CloseCode::Replaced) {
        let mut both = crate::websocket::frame::text(&[engine::MESSAGE, packet::DISCONNECT]).to_vec();
        both.extend_from_slice(&close_frame);
        return Bytes::from(both);
    }
    close_frame
}

/// A `seq` as Socket.IO clients hand it back: a number, or the offset as events carry it (a string).
pub(crate) fn seq_of(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| value.as_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &Bytes) -> &str {
        std::str::from_utf8(&frame[2..]).unwrap()
    }

    #[test]
    fn events_become_commands_and_answers_acks() {
        let mut codec = SocketIoCodec::new(Pid::new("p1"), false);
        let welcome = ServerFrame::Welcome {
            conn: "c1".into(),
            user: "u".into(),
            device: "d".into(),
            node: "n".into(),
            seq: 1,
            heartbeat: 25,
            read: 0,
            unread: 0,
            epoch: None,
        };
        let socket_id = Pid::parse("p1").unwrap().socket_id();
        assert_eq!(text(&codec.notice(&welcome).unwrap()), format!(r#"40{{"pid":"p1","sid":"{socket_id}"}}"#));
        assert_eq!(
            codec.decode(br#"421["rpc","echo",{"a":1}]"#),
            vec![Ok(Command::Rpc { id: "1".into(), function: "echo".into(), data: json!({"a": 1}) })]
        );
        assert_eq!(
            codec.decode(br#"422["sub","news",4]"#),
            vec![Ok(Command::Subscribe { topic: "news".into(), since: Some(4) })]
        );
        let subscribed = codec.notice(&ServerFrame::Subscribed { topic: "news".into() }).unwrap();
        assert_eq!(text(&subscribed), r#"432[{"ok":true,"topic":"news"}]"#);
        assert!(codec.decode(b"3").is_empty());
        assert!(matches!(&codec.decode(br#"42["dance"]"#)[..], [Err(Refusal::Reply(_))]));
        assert!(matches!(&codec.decode(b"42{}")[..], [Err(Refusal::Close(_))]));
        // An ack id too large to answer is malformed, not an event whose answer is thrown away.
        assert_eq!(
            codec.decode(br#"4218446744073709551616["rpc","prefs.get",{}]"#),
            vec![Err(Refusal::Close(Close::new(CloseCode::Policy, "an ack id is below 2^64")))]
        );
        // The default namespace may be written out; another one is not this connection's.
        assert_eq!(codec.decode(br#"42/,3["unsub","news"]"#), vec![Ok(Command::Unsubscribe { topic: "news".into() })]);
        assert!(matches!(&codec.decode(br#"42/chat,["sub","news"]"#)[..], [Err(Refusal::Close(_))]));
        assert!(codec.decode(b"41/chat,").is_empty());
        assert!(matches!(&codec.decode(b"41/,")[..], [Err(Refusal::Close(_))]));
    }

    fn welcome() -> ServerFrame {
        let (conn, user, device, node) = ("c2".into(), "u".into(), "d".into(), "n".into());
        ServerFrame::Welcome { conn, user, device, node, seq: 9, heartbeat: 25, read: 0, unread: 0, epoch: None }
    }

    fn replayed(complete: bool, topic: Option<&str>) -> ServerFrame {
        ServerFrame::Replayed { from: 5, to: 7, count: 3, complete, topic: topic.map(str::to_string) }
    }

    #[test]
    fn a_recovering_client_is_answered_after_its_replay_with_its_own_pid_only_if_nothing_is_missing() {
        for (complete, pid) in [(true, "c1.2"), (false, "c1.3")] {
            let mut codec = SocketIoCodec::new(Pid::parse("c1.2").unwrap(), true);
            assert_eq!(codec.notice(&welcome()), None);
            // A topic's replay does not answer the CONNECT.
            assert_eq!(codec.notice(&replayed(true, Some("news"))), None);
            let connect = codec.notice(&replayed(complete, None)).unwrap();
            // Recovered, the socket keeps its id; not recovered, it gets another.
            let socket_id = Pid::parse(pid).unwrap().socket_id();
            assert_eq!(text(&connect), format!(r#"40{{"pid":"{pid}","sid":"{socket_id}"}}"#));
            assert_eq!(codec.notice(&replayed(true, None)), None, "one answer");
        }
    }

    #[test]
    fn a_recovering_client_closed_before_its_answer_is_answered_not_recovered_first() {
        let close = Close::new(CloseCode::Unavailable, "stream unavailable");
        let mut codec = SocketIoCodec::new(Pid::parse("c1.2").unwrap(), true);
        assert_eq!(codec.notice(&welcome()), None);
        let last = codec.close(&close);
        let socket_id = Pid::parse("c1.3").unwrap().socket_id();
        assert!(last[2..].starts_with(format!(r#"40{{"pid":"c1.3","sid":"{socket_id}"}}"#).as_bytes()), "{last:?}");
        assert!(last.ends_with(&close_frame(&close)));
        // Answered already: only the close.
        codec.notice(&replayed(true, None));
        assert_eq!(codec.close(&close), close_frame(&close));
    }

    #[test]
    fn a_close_that_must_not_be_retried_says_disconnect_first() {
        let frame = close_frame(&Close::new(CloseCode::Replaced, "replaced"));
        assert_eq!(&frame[..4], b"\x81\x0241");
        assert_eq!(frame[4], 0x88);
    }
}
