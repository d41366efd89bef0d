//! The Centrifugal protocol v2 in JSON (the protocol of Centrifugo and its SDKs), at
//! `/connection/websocket`. Each WebSocket text frame holds one or more JSON objects separated by
//! newlines: commands with an `id`, replies with the same `id`, pushes without one; `{}` is a ping
//! from the server and the client's pong.
//!
//! Channels: `#<user>` (the user's own messages) and `all` (`push.all`) are server-side
//! subscriptions, announced in the connect reply; topics are client-side subscriptions. A
//! publication's `offset` is the message's `seq` and the `epoch` names the stream, so a client
//! that recovers from an offset gets exactly what Herald replays after that `seq`.
//!
//! A reply must come before the publications of its channel, but Herald replays before it reports
//! how the replay went: while a subscription is being answered the codec holds that channel's
//! messages and sends them inside (or right after) the reply.

mod command;
mod proto;
pub(crate) mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use herald_shared::frame::{RpcResult, ServerFrame};
use herald_shared::token::now_secs;
use serde_json::json;

use super::{Command, Refusal, WireFormat};
use crate::close::{Close, CloseCode};
use crate::delivery::message::Message;
use crate::websocket::frame;
pub(crate) use command::{ConnectCommand, parse_connect};
use wire::error;

/// A server-side subscription asked for in the connect command, and how it recovers.
#[derive(Debug)]
pub(crate) struct ServerSub {
    pub(crate) channel: String,
    /// The offset to recover after, when the client asked to and its epoch is the stream's.
    pub(crate) recover_from: Option<u64>,
    /// The client asked to recover (whatever its epoch).
    pub(crate) was_recovering: bool,
}

/// One Centrifugal connection.
#[derive(Debug)]
pub(crate) struct CentrifugalCodec {
    user: String,
    epoch: String,
    /// The token's expiry (seconds since the Unix epoch), for the `ttl` of replies.
    expires: u64,
    /// The connect command, until its reply is sent.
    connecting: Option<Connecting>,
    /// Client-side subscriptions being answered, by channel.
    subscribing: HashMap<String, Subscribing>,
    subscribed: HashSet<String>,
    /// Channels whose recovery was answered with error 112: the client is not subscribed, and what
    /// comes for them until the session has left them (or the client subscribes again) is dropped.
    rejected: HashSet<String>,
    /// Channels the session is to leave (answered with error 112).
    to_leave: Vec<String>,
    unsubscribing: HashMap<String, u32>,
    /// The `refresh` command being answered.
    refreshing: Option<u32>,
    /// The highest `seq` the connection knows of: the offset a new subscription starts from.
    top: u64,
    /// The Protobuf encoding (binary frames) instead of JSON.
    protobuf: bool,
    /// Commands the client sent in the frame of its `connect`, for the session to run.
    first_input: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Connecting {
    id: u32,
    /// The session replays (so the reply waits for the replay's end).
    resuming: bool,
    subs: Vec<(ServerSub, Held)>,
    /// From `welcome`.
    conn: String,
    heartbeat: u64,
}

#[derive(Debug)]
struct Subscribing {
    id: u32,
    recover_from: Option<u64>,
    was_recovering: bool,
    /// Answer a recovery that cannot give everything with error 112.
    reject_unrecovered: bool,
    held: Held,
}

/// Publications held for a reply, by `seq` (a message can be both live and replayed), each in the
/// connection's encoding: its JSON, or its Protobuf `Publication`.
type Held = BTreeMap<u64, Vec<u8>>;

impl CentrifugalCodec {
    /// The codec of a connection whose `connect` command (`id`) was accepted.
    pub(crate) fn new(
        user: &str,
        epoch: String,
        expires: u64,
        id: u32,
        subs: Vec<ServerSub>,
        protobuf: bool,
    ) -> CentrifugalCodec {
        let resuming = subs.iter().any(|sub| sub.recover_from.is_some());
        let subs = subs.into_iter().map(|sub| (sub, Held::new())).collect();
        CentrifugalCodec {
            user: user.to_string(),
            epoch,
            expires,
            connecting: Some(Connecting { id, resuming, subs, conn: String::new(), heartbeat: 0 }),
            subscribing: HashMap::new(),
            subscribed: HashSet::new(),
            rejected: HashSet::new(),
            to_leave: Vec::new(),
            unsubscribing: HashMap::new(),
            refreshing: None,
            top: 0,
            protobuf,
            first_input: None,
        }
    }

    /// Keeps the commands of `message` (the client's first) after its `connect`, if any.
    pub(crate) fn keep_after_connect(&mut self, message: &[u8]) {
        self.first_input = after_first_command(message, self.protobuf).filter(|rest| !rest.is_empty());
    }

    /// The commands the client sent with its `connect`, once.
    pub(crate) fn take_first_input(&mut self) -> Option<Vec<u8>> {
        self.first_input.take()
    }

    /// The server-side channels of `user`.
    pub(crate) fn server_channels(user: &str) -> [String; 2] {
        [format!("#{user}"), wire::ALL.to_string()]
    }

    /// The push of `message`, or nothing while its channel's reply is pending (then it is held).
    pub(super) fn message(&mut self, message: &Message) -> Option<Bytes> {
        self.takes(message).then(|| message.encoded(self.format()).clone())
    }

    /// Whether `message` goes out now; if not, it is held while its channel's reply is pending
    /// (or dropped, when the client had it already or it came before the subscription).
    pub(crate) fn takes(&mut self, message: &Message) -> bool {
        let channel = wire::channel(&message.audience);
        if let Some(connecting) = &mut self.connecting
            && let Some((sub, held)) = connecting.subs.iter_mut().find(|(sub, _)| sub.channel == channel)
        {
            if sub.recover_from.is_some_and(|from| message.seq > from) {
                hold(held, message, self.protobuf);
            }
            return false;
        }
        if let Some(subscribing) = self.subscribing.get_mut(channel.as_ref()) {
            if message.seq > subscribing.recover_from.unwrap_or(0) {
                hold(&mut subscribing.held, message, self.protobuf);
            }
            return false;
        }
        self.top = self.top.max(message.seq);
        !self.rejected.contains(channel.as_ref())
    }

    /// Whether the messages of `last`'s channel up to `last` all go out now (none is held for a
    /// subscription being made), as [`Self::takes`] would take each.
    pub(crate) fn takes_run(&self, last: &Message) -> bool {
        let channel = wire::channel(&last.audience);
        let connecting = self.connecting.as_ref().is_some_and(|c| c.subs.iter().any(|(sub, _)| sub.channel == channel));
        !connecting && !self.subscribing.contains_key(channel.as_ref()) && !self.rejected.contains(channel.as_ref())
    }

    /// Notes the messages [`Self::takes_run`] let through, up to `last`, as taken.
    pub(crate) fn note_taken(&mut self, last: &Message) {
        self.top = self.top.max(last.seq);
    }

    /// The encoding's wire format.
    pub(crate) fn format(&self) -> WireFormat {
        if self.protobuf { WireFormat::CentrifugalProtobuf } else { WireFormat::Centrifugal }
    }

    /// The server's ping: an empty reply.
    pub(crate) fn ping(&self) -> Bytes {
        to_frame(self.protobuf, b"{}")
    }

    pub(super) fn notice(&mut self, notice: &ServerFrame) -> Option<Bytes> {
        match notice {
            ServerFrame::Welcome { conn, seq, heartbeat, .. } => {
                self.top = *seq;
                let connecting = self.connecting.as_mut()?;
                connecting.conn = conn.clone();
                connecting.heartbeat = *heartbeat;
                if connecting.resuming { None } else { self.connected(false) }
            }
            ServerFrame::Replayed { topic: None, complete, .. } => self.connected(*complete),
            ServerFrame::Replayed { topic: Some(topic), complete, .. } => self.subscribed(topic, Some(*complete)),
            ServerFrame::Subscribed { topic } => match self.subscribing.get(topic) {
                Some(pending) if pending.recover_from.is_none() => self.subscribed(topic, None),
                _ => None,
            },
            ServerFrame::Unsubscribed { topic } => {
                self.rejected.remove(topic);
                // Subscribed meanwhile, when the unsubscribe came while it was subscribing.
                self.subscribed.remove(topic);
                let id = self.unsubscribing.remove(topic)?;
                Some(to_frame(self.protobuf, &wire::reply(id, "unsubscribe", &json!({}))))
            }
            ServerFrame::RpcResult(result) => self.rpc_result(result),
            ServerFrame::Error { code, message, topic: Some(topic) } => {
                let id = match self.subscribing.remove(topic) {
                    Some(pending) => pending.id,
                    None => self.unsubscribing.remove(topic)?,
                };
                Some(to_frame(self.protobuf, &wire::error_reply(id, wire::error_code(code), message)))
            }
            _ => None,
        }
    }

    /// The connect reply, once the session's replay (if any) ended `complete` or not.
    fn connected(&mut self, complete: bool) -> Option<Bytes> {
        let connecting = self.connecting.take()?;
        let mut subs = serde_json::Map::new();
        let mut after = Vec::new();
        let mut splice = Splice::default();
        for (sub, held) in connecting.subs {
            let recovered = sub.recover_from.is_some() && complete;
            let offset = held.keys().next_back().copied().unwrap_or(0).max(self.top);
            let mut result = position(&self.epoch, offset);
            result["was_recovering"] = sub.was_recovering.into();
            result["recovered"] = recovered.into();
            // The SDKs read a connect reply's publications only when it says recovered.
            if recovered {
                result["publications"] = splice.publications(&held, self.protobuf);
            } else {
                after.extend(held.values().map(|publication| push(&sub.channel, publication, self.protobuf)));
            }
            subs.insert(sub.channel, result);
        }
        let result = json!({
            "client": connecting.conn,
            "version": concat!("herald ", env!("CARGO_PKG_VERSION")),
            "subs": subs,
            "ping": connecting.heartbeat,
            "pong": true,
            "expires": true,
            "ttl": refresh_in(self.expires),
        });
        Some(lines(self.protobuf, splice.into_reply(wire::reply(connecting.id, "connect", &result)), after))
    }

    /// Channels the session is to leave: a subscribe answered with error 112 subscribed nothing.
    pub(super) fn take_to_leave(&mut self) -> Vec<String> {
        std::mem::take(&mut self.to_leave)
    }

    /// The subscribe reply for `topic`; `complete` says how its replay went, if it had one.
    fn subscribed(&mut self, topic: &str, complete: Option<bool>) -> Option<Bytes> {
        let pending = self.subscribing.remove(topic)?;
        let recovered = pending.recover_from.is_some() && complete == Some(true);
        if pending.was_recovering && !recovered && pending.reject_unrecovered {
            // The client loads its state again and subscribes anew (the session's subscription
            // stays: that subscribe finds it); nothing reaches the client for it meanwhile.
            let reply = wire::error_reply(pending.id, error::UNRECOVERABLE_POSITION, "unrecoverable position");
            self.rejected.insert(topic.to_string());
            self.to_leave.push(topic.to_string());
            return Some(to_frame(self.protobuf, &reply));
        }
        self.subscribed.insert(topic.to_string());
        let offset = pending.held.keys().next_back().copied().unwrap_or(0).max(self.top);
        self.top = offset;
        let mut result = position(&self.epoch, offset);
        result["was_recovering"] = pending.was_recovering.into();
        result["recovered"] = recovered.into();
        // Unlike a connect reply's, these are always read.
        let mut splice = Splice::default();
        result["publications"] = splice.publications(&pending.held, self.protobuf);
        Some(to_frame(self.protobuf, &splice.into_reply(wire::reply(pending.id, "subscribe", &result))))
    }

    fn rpc_result(&mut self, result: &RpcResult) -> Option<Bytes> {
        let (method, id) = match result.id.strip_prefix(PRESENCE_PREFIX) {
            Some(id) => ("presence_stats", id),
            None => ("rpc", result.id.as_str()),
        };
        let id: u32 = id.parse().ok()?;
        let reply = match (&result.data, &result.error) {
            (_, Some(failure)) => wire::error_reply(id, wire::error_code(&failure.code), &failure.message),
            (data, None) if method == "rpc" => wire::reply(id, method, &json!({ "data": data })),
            (data, None) => wire::reply(id, method, data.as_ref().unwrap_or(&json!({}))),
        };
        Some(to_frame(self.protobuf, &reply))
    }

    /// The answer to the pending `refresh`: the token's new expiry, or why it was refused.
    pub(crate) fn refreshed(&mut self, outcome: Result<u64, (u32, String)>) -> Option<Bytes> {
        let id = self.refreshing.take()?;
        let reply = match outcome {
            Ok(expires) => {
                self.expires = expires;
                wire::reply(id, "refresh", &json!({"expires": true, "ttl": refresh_in(expires)}))
            }
            Err((code, message)) => wire::error_reply(id, code, &message),
        };
        Some(to_frame(self.protobuf, &reply))
    }

    /// Reads a frame of commands.
    pub(super) fn decode(&mut self, text: &[u8]) -> Vec<Result<Command, Refusal>> {
        if self.protobuf {
            let Some(commands) = proto_commands(text) else {
                return vec![Err(Refusal::Close(Close::new(CloseCode::Policy, "not Protobuf commands")))];
            };
            return commands.iter().filter_map(|command| self.command(command).transpose()).collect();
        }
        text.split(|byte| *byte == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .filter_map(|line| self.command(line).transpose())
            .collect()
    }

    fn command(&mut self, line: &[u8]) -> Result<Option<Command>, Refusal> {
        let (id, parsed) = command::parse(line)?;
        let protobuf = self.protobuf;
        let reply =
            |code, message: &str| Err(Refusal::Reply(to_frame(protobuf, &wire::error_reply(id, code, message))));
        match parsed {
            command::Parsed::Pong => Ok(None),
            command::Parsed::Subscribe { channel, recover, offset, epoch, reject_unrecovered, filtered } => {
                if filtered {
                    return reply(error::BAD_REQUEST, "tags filters are not supported");
                }
                if channel.starts_with('#') && channel != format!("#{}", self.user) {
                    return reply(error::PERMISSION_DENIED, "permission denied");
                }
                let taken = self.subscribed.contains(&channel) || self.subscribing.contains_key(&channel);
                if taken || CentrifugalCodec::server_channels(&self.user).contains(&channel) {
                    return reply(error::ALREADY_SUBSCRIBED, "already subscribed");
                }
                self.rejected.remove(&channel);
                let since = (recover && epoch == self.epoch).then_some(offset);
                let pending = Subscribing {
                    id,
                    recover_from: since,
                    was_recovering: recover,
                    reject_unrecovered,
                    held: Held::new(),
                };
                self.subscribing.insert(channel.clone(), pending);
                Ok(Some(Command::Subscribe { topic: channel, since }))
            }
            command::Parsed::Unsubscribe { channel } => {
                // One still subscribing is left after its subscribe (the session takes them in order);
                // one already being left has nothing more to undo.
                let leaving = self.unsubscribing.contains_key(&channel);
                if leaving || (!self.subscribed.remove(&channel) && !self.subscribing.contains_key(&channel)) {
                    // Nothing to undo: the server-side channels stay, unknown ones are not there.
                    return Err(Refusal::Reply(to_frame(protobuf, &wire::reply(id, "unsubscribe", &json!({})))));
                }
                self.unsubscribing.insert(channel.clone(), id);
                Ok(Some(Command::Unsubscribe { topic: channel }))
            }
            command::Parsed::Rpc { method, data } => {
                Ok(Some(Command::Rpc { id: id.to_string(), function: method, data }))
            }
            command::Parsed::PresenceStats { channel } => {
                let user = if channel == wire::ALL {
                    None
                } else if channel == format!("#{}", self.user) {
                    Some(self.user.clone())
                } else if channel.starts_with('#') {
                    return reply(error::PERMISSION_DENIED, "permission denied");
                } else {
                    let refusal = wire::not_served(id, "presence is kept for #<user> and all only");
                    return Err(Refusal::Reply(to_frame(protobuf, &refusal)));
                };
                Ok(Some(Command::Presence { id: format!("{PRESENCE_PREFIX}{id}"), user }))
            }
            command::Parsed::Refresh { token } => {
                if self.refreshing.replace(id).is_some() {
                    return reply(error::BAD_REQUEST, "a refresh is already in progress");
                }
                Ok(Some(Command::Refresh { token }))
            }
            // As Centrifugo does: a bad request, which ends the connection (3501).
            command::Parsed::Connect => Err(Refusal::Close(Close::new(CloseCode::Policy, "already connected"))),
            command::Parsed::Publish => reply(error::PERMISSION_DENIED, "clients do not publish: backends do"),
            command::Parsed::Unavailable(method) => {
                let refusal = wire::not_served(id, &format!("{method} is not available on this server"));
                Err(Refusal::Reply(to_frame(protobuf, &refusal)))
            }
            command::Parsed::Unknown(method) => reply(error::METHOD_NOT_FOUND, &format!("unknown method {method}")),
        }
    }
}

/// Presence answers travel as rpc results whose id starts with this.
const PRESENCE_PREFIX: &str = "p";

/// The `ttl` the SDKs refresh the token after: a little before it `expires`, so the new one
/// arrives before the gateway closes the connection (3005) at the expiry.
fn refresh_in(expires: u64) -> u64 {
    // The protocol's `ttl` is 32 bits: a longer one would be cut to a short one.
    let left = expires.saturating_sub(now_secs()).min(u64::from(u32::MAX));
    left.saturating_sub((left / 5).clamp(1, 30)).max(1)
}

fn hold(held: &mut Held, message: &Message, protobuf: bool) {
    held.entry(message.seq).or_insert_with(|| {
        if protobuf {
            return proto::publication(message);
        }
        let mut publication = Vec::with_capacity(message.payload.len() + 64);
        wire::write_publication(&mut publication, message);
        publication
    });
}

fn position(epoch: &str, offset: u64) -> serde_json::Value {
    json!({"recoverable": true, "positioned": true, "epoch": epoch, "offset": offset})
}

/// Held publications put into a reply as they were encoded: read back into a `serde_json::Value`,
/// a payload's numbers and strings would be written again otherwise (or, past what `f64` holds,
/// left out).
#[derive(Default)]
struct Splice {
    /// Each list of JSON publications, `[…]`, that a placeholder stands for.
    lists: Vec<Vec<u8>>,
}

impl Splice {
    /// What a reply's `publications` is set to: a placeholder (JSON), or the encoded messages
    /// (Protobuf, see [`proto::ENCODED`]).
    fn publications(&mut self, held: &Held, protobuf: bool) -> serde_json::Value {
        if protobuf {
            let encoded = |publication: &Vec<u8>| json!({ proto::ENCODED: STANDARD.encode(publication) });
            return held.values().map(encoded).collect();
        }
        let mut list = b"[".to_vec();
        for (index, publication) in held.values().enumerate() {
            if index > 0 {
                list.push(b',');
            }
            list.extend_from_slice(publication);
        }
        list.push(b']');
        self.lists.push(list);
        format!("{PLACEHOLDER}{}", self.lists.len() - 1).into()
    }

    /// `reply` (JSON) with each placeholder replaced by its list. Every placeholder is found before
    /// any list goes in, so that a payload spliced in (which may hold anything) is never searched.
    fn into_reply(self, mut reply: Vec<u8>) -> Vec<u8> {
        let mut found: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        for (index, list) in self.lists.into_iter().enumerate() {
            let placeholder = serde_json::to_vec(&format!("{PLACEHOLDER}{index}")).expect("strings serialize");
            if let Some(at) = memchr::memmem::find(&reply, &placeholder) {
                found.push((at, placeholder.len(), list));
            }
        }
        // From the last, so that the positions before each splice still hold.
        found.sort_by_key(|(at, ..)| std::cmp::Reverse(*at));
        for (at, len, list) in found {
            reply.splice(at..at + len, list);
        }
        reply
    }
}

/// The start of the placeholder of a list of publications: no channel, id or name holds a NUL.
const PLACEHOLDER: &str = "\u{0}publications:";

/// A push of `publication` (as held) in `channel`: JSON, or a length-prefixed Protobuf `Reply`.
fn push(channel: &str, publication: &[u8], protobuf: bool) -> Vec<u8> {
    if protobuf {
        return proto::push_of(channel, publication);
    }
    let mut out = Vec::with_capacity(publication.len() + channel.len() + 32);
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    herald_shared::payload::write_json_string(&mut out, channel);
    out.extend_from_slice(b",\"pub\":");
    out.extend_from_slice(publication);
    out.extend_from_slice(b"}}");
    out
}

/// One frame holding the reply `first` (JSON) and then the pushes `rest` (see [`push`]): one JSON
/// object per line, or length-prefixed Protobuf replies.
fn lines(protobuf: bool, first: Vec<u8>, rest: Vec<Vec<u8>>) -> Bytes {
    if protobuf {
        let mut body = proto_reply(&first);
        for push in rest {
            body.extend_from_slice(&push);
        }
        return frame::binary(&body);
    }
    let mut body = first;
    for line in rest {
        body.push(b'\n');
        body.extend_from_slice(&line);
    }
    frame::text(&body)
}

/// A reply (as the JSON encoding writes it) in a frame of the connection's encoding.
pub(crate) fn to_frame(protobuf: bool, reply: &[u8]) -> Bytes {
    if protobuf { frame::binary(&proto_reply(reply)) } else { frame::text(reply) }
}

/// A JSON reply as a length-prefixed Protobuf `Reply`.
fn proto_reply(reply: &[u8]) -> Vec<u8> {
    let value: serde_json::Value = serde_json::from_slice(reply).unwrap_or_default();
    proto::delimited(&proto::encode("Reply", &value))
}

/// The commands of a Protobuf frame, each as the JSON the JSON encoding would carry.
pub(crate) fn proto_commands(bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let commands = proto::split(bytes)?;
    commands.into_iter().map(|command| Some(proto::decode("Command", command)?.to_string().into_bytes())).collect()
}

/// What follows the first command of `message`: the next lines (JSON), or the next length-prefixed
/// commands (Protobuf).
fn after_first_command(message: &[u8], protobuf: bool) -> Option<Vec<u8>> {
    if !protobuf {
        let newline = memchr::memchr(b'\n', message)?;
        return Some(message[newline + 1..].to_vec());
    }
    let first = proto::split(message)?.into_iter().next()?;
    // The first command's bytes lie in `message`, right after its length.
    let end = first.as_ptr() as usize - message.as_ptr() as usize + first.len();
    Some(message[end..].to_vec())
}

/// The first command of a connection as JSON, whatever its encoding.
pub(crate) fn first_command(message: &[u8], protobuf: bool) -> Option<Vec<u8>> {
    if protobuf { proto_commands(message)?.into_iter().next() } else { Some(message.to_vec()) }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
