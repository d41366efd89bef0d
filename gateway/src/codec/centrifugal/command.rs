//! Reading the client's commands: `{"id":N,"<method>":{...}}`, or `{}` (a pong).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::super::Refusal;
use crate::close::{Close, CloseCode};

/// A command, read.
#[derive(Debug, PartialEq)]
pub(super) enum Parsed {
    Pong,
    Connect,
    Subscribe {
        channel: String,
        recover: bool,
        offset: u64,
        epoch: String,
        /// The client wants error 112 rather than a reply that says `recovered: false`.
        reject_unrecovered: bool,
        /// A tags filter came with it (not supported).
        filtered: bool,
    },
    Unsubscribe {
        channel: String,
    },
    Rpc {
        method: String,
        data: Value,
    },
    PresenceStats {
        channel: String,
    },
    Refresh {
        token: String,
    },
    Publish,
    /// A method of the protocol this server does not offer.
    Unavailable(String),
    Unknown(String),
}

/// The `connect` command, the first a client sends.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ConnectCommand {
    #[serde(default)]
    pub(crate) token: String,
    /// Server-side subscriptions to recover: channel → position.
    #[serde(default)]
    pub(crate) subs: HashMap<String, SubPosition>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct SubPosition {
    #[serde(default)]
    pub(crate) recover: bool,
    #[serde(default)]
    pub(crate) offset: u64,
    #[serde(default)]
    pub(crate) epoch: String,
}

#[derive(Deserialize)]
struct SubscribeRequest {
    channel: String,
    #[serde(default)]
    recover: bool,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    flag: i64,
    #[serde(default)]
    tf: Option<Value>,
}

/// The subscribe flag asking for error 112 when a recovery cannot give everything.
const FLAG_REJECT_UNRECOVERED: i64 = 2;

#[derive(Deserialize)]
struct ChannelRequest {
    channel: String,
}

#[derive(Deserialize)]
struct RpcRequest {
    #[serde(default)]
    method: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct RefreshRequest {
    token: String,
}

/// A client that breaks the protocol is disconnected with 3501 (bad request).
fn bad_request(reason: impl Into<std::borrow::Cow<'static, str>>) -> Refusal {
    Refusal::Close(Close::new(CloseCode::Policy, reason))
}

/// The command's id, method name and body.
fn split(line: &[u8]) -> Result<Option<(u32, String, Value)>, Refusal> {
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(line) else {
        return Err(bad_request("a command is a JSON object"));
    };
    if object.is_empty() {
        return Ok(None);
    }
    let id = object.remove("id").and_then(|id| id.as_u64()).and_then(|id| u32::try_from(id).ok());
    // `send` (an asynchronous message, which Herald has no use for) is the one command without an id.
    if id.is_none() && object.len() == 1 && object.contains_key("send") {
        return Ok(None);
    }
    let Some(id) = id.filter(|id| *id > 0) else {
        return Err(bad_request("a command needs an id"));
    };
    let mut methods = object.into_iter();
    match (methods.next(), methods.next()) {
        (Some((method, body)), None) => Ok(Some((id, method, body))),
        _ => Err(bad_request("a command has one method")),
    }
}

fn body<T: serde::de::DeserializeOwned>(method: &str, body: Value) -> Result<T, Refusal> {
    serde_json::from_value(body).map_err(|error| bad_request(format!("bad {method} command: {error}")))
}

/// Reads one command (one line of a frame).
pub(super) fn parse(line: &[u8]) -> Result<(u32, Parsed), Refusal> {
    let Some((id, method, value)) = split(line)? else {
        return Ok((0, Parsed::Pong));
    };
    let parsed = match method.as_str() {
        "connect" => Parsed::Connect,
        "subscribe" => {
            let request: SubscribeRequest = body(&method, value)?;
            let SubscribeRequest { channel, recover, offset, epoch, flag, tf } = request;
            let reject_unrecovered = flag & FLAG_REJECT_UNRECOVERED != 0;
            Parsed::Subscribe { channel, recover, offset, epoch, reject_unrecovered, filtered: tf.is_some() }
        }
        "unsubscribe" => Parsed::Unsubscribe { channel: body::<ChannelRequest>(&method, value)?.channel },
        "rpc" => {
            let request: RpcRequest = body(&method, value)?;
            Parsed::Rpc { method: request.method, data: request.data }
        }
        "presence_stats" => Parsed::PresenceStats { channel: body::<ChannelRequest>(&method, value)?.channel },
        "refresh" => Parsed::Refresh { token: body::<RefreshRequest>(&method, value)?.token },
        "publish" => Parsed::Publish,
        "presence" | "history" | "sub_refresh" => Parsed::Unavailable(method),
        "send" => Parsed::Pong,
        _ => Parsed::Unknown(method),
    };
    Ok((id, parsed))
}

/// Reads the first frame of a connection, which must be a `connect` command.
pub(crate) fn parse_connect(text: &[u8]) -> Result<(u32, ConnectCommand), String> {
    let first = text.split(|byte| *byte == b'\n').next().unwrap_or_default();
    match split(first) {
        Ok(Some((id, method, value))) if method == "connect" => {
            serde_json::from_value(value).map(|connect| (id, connect)).map_err(|e| format!("bad connect command: {e}"))
        }
        Ok(_) => Err("the first command must be connect".into()),
        Err(Refusal::Close(close)) => Err(close.reason.into_owned()),
        Err(_) => Err("bad connect command".into()),
    }
}
