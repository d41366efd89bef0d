//! `/connection/websocket`: the Centrifugal protocol's endpoint. The WebSocket opens first and the
//! client authenticates in its first message, a `connect` command; once the token is good the
//! connection becomes a session like any other, speaking [`CentrifugalCodec`]'s protocol.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;

use crate::Shared;
use crate::close::Close;
use crate::cluster::policy::PolicyError;
use crate::codec::Codec;
use crate::codec::centrifugal::wire::{self, disconnect, error};
use crate::codec::centrifugal::{CentrifugalCodec, ConnectCommand, ServerSub, first_command, parse_connect, to_frame};
use crate::http::auth::{CONFLICT, ConnectRequest, Rejection, UNAUTHORIZED};
use crate::session::{self, Socket};
use crate::websocket::frame;
use crate::websocket::reader::Inbound;
use herald_shared::frame::error_code;
use herald_shared::token::TokenError;

/// How long a client may take to send `connect` after the WebSocket opened.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused client may take to close after its error reply.
const REFUSED_GRACE: Duration = Duration::from_secs(3);

/// Opens the WebSocket; the `connect` command is read on it afterwards.
pub(crate) async fn websocket(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Rejection> {
    super::handshake::check(&request)?;
    let (permit, address) = super::edge::admit(&shared, &request, peer)?;
    let asked = asks_protobuf(&request);
    let (mut response, upgrade) = fastwebsockets::upgrade::upgrade(&mut request)
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    if asked == Some(Asked::Subprotocol) {
        // Only when asked: the JSON SDKs refuse an answer naming a subprotocol they did not ask for.
        response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(PROTOBUF));
    }
    let tracker = shared.sessions.clone();
    let serve = move |upgraded| serve_upgraded(shared, upgraded, address, asked.is_some());
    tracker.spawn(super::edge::after_upgrade(upgrade, Some(permit), serve));
    Ok(response.map(|_| Full::new(Bytes::new())))
}

/// The subprotocol of the Protobuf encoding.
const PROTOBUF: &str = "centrifuge-protobuf";

/// How a client asked for the Protobuf encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// `Sec-WebSocket-Protocol: centrifuge-protobuf` (the SDKs).
    Subprotocol,
    /// `?format=protobuf` (older SDKs).
    Query,
}

fn asks_protobuf<B>(request: &Request<B>) -> Option<Asked> {
    let header = request.headers().get_all(SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok());
    if header.flat_map(|value| value.split(',')).any(|protocol| protocol.trim() == PROTOBUF) {
        return Some(Asked::Subprotocol);
    }
    let query = request.uri().query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .any(|(key, value)| key == "format" && value == "protobuf")
        .then_some(Asked::Query)
}

/// A connection refused before its session: what to send, and whether to wait for the client's
/// close first (after an error reply the SDKs close and retry by themselves).
struct Refused {
    /// A reply as the JSON encoding writes it.
    reply: Option<Vec<u8>>,
    code: u16,
    /// The Herald error code it is counted under (see [`Rejection::in_protocol`]); none when the
    /// gateway is shutting down.
    error: Option<&'static str>,
    reason: String,
}

impl Refused {
    fn close(code: u16, error: &'static str, reason: impl Into<String>) -> Refused {
        Refused { reply: None, code, error: Some(error), reason: reason.into() }
    }
}

/// Serves an upgraded connection. Not an `async fn`: its locals would be held for the connection's
/// whole life.
fn serve_upgraded(
    shared: Arc<Shared>,
    upgraded: Upgraded,
    address: IpAddr,
    protobuf: bool,
) -> impl Future<Output = ()> + Send {
    let mut socket = Socket::new(upgraded, shared.config.max_frame_bytes);
    if protobuf {
        socket.reader.accept_binary();
    }
    session::accept_then_run(accept_or_refuse(shared, socket, address, protobuf))
}

/// The session's future once the `connect` command is accepted, or `None` once refused.
async fn accept_or_refuse(
    shared: Arc<Shared>,
    mut socket: Socket,
    address: IpAddr,
    protobuf: bool,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let conn = crate::id::random_id(12);
    let accepted = tokio::select! {
        // Boxed: accepting runs once.
        accepted = Box::pin(accept(&shared, &mut socket, &conn, protobuf)) => accepted,
        _ = shared.shutdown.cancelled() => Err(Refused { reply: None, code: disconnect::SHUTDOWN, error: None, reason: "shutting down".into() }),
    };
    match accepted {
        Ok((request, codec)) => Some(session::run_codec(shared, socket, request, conn, address, codec)),
        Err(refused) => {
            refuse(&shared, address, socket, refused, protobuf).await;
            None
        }
    }
}

/// Reads and checks the `connect` command; claims the user's session slot.
async fn accept(
    shared: &Shared,
    socket: &mut Socket,
    conn: &str,
    protobuf: bool,
) -> Result<(ConnectRequest, Codec), Refused> {
    let text = match tokio::time::timeout(CONNECT_TIMEOUT, first_message(socket)).await {
        Err(_) => return Err(Refused::close(disconnect::STALE, error_code::BAD_REQUEST, "no connect command in time")),
        // The close of what the client broke (a message over the limit: 1009), or its own echoed.
        Ok(Err(close)) => {
            let reason = if close.reason.is_empty() { "no connect command".into() } else { close.reason.to_string() };
            return Err(Refused::close(wire::disconnect_code(close.code), error_code::BAD_REQUEST, reason));
        }
        Ok(Ok(text)) => text,
    };
    let message = text;
    let text = first_command(&message, protobuf)
        .ok_or_else(|| Refused::close(disconnect::BAD_REQUEST, error_code::BAD_REQUEST, "not a command"))?;
    let (id, connect) = parse_connect(&text)
        .map_err(|reason| Refused::close(disconnect::BAD_REQUEST, error_code::BAD_REQUEST, reason))?;
    let claims = match shared.verifier.verify(&connect.token) {
        Ok(claims) => claims,
        Err(TokenError::Expired) => {
            let reply = wire::error_reply(id, error::TOKEN_EXPIRED, "token expired");
            let reason = "token expired".into();
            return Err(Refused { reply: Some(reply), code: 1000, error: Some(UNAUTHORIZED), reason });
        }
        Err(refused) => return Err(Refused::close(disconnect::INVALID_TOKEN, UNAUTHORIZED, refused.to_string())),
    };
    let epoch = epoch(shared)
        .await
        .map_err(|reason| Refused::close(disconnect::SERVER_ERROR, error_code::UNAVAILABLE, reason))?;
    let subs = server_subs(&claims.sub, &connect, &epoch);
    let since = subs.iter().filter_map(|sub| sub.recover_from).min();
    match shared.policies.reserve(&claims.sub, conn).await {
        Ok(()) => {}
        Err(PolicyError::Taken) => {
            return Err(Refused::close(disconnect::CONNECTION_LIMIT, CONFLICT, PolicyError::Taken.to_string()));
        }
        Err(error) => return Err(Refused::close(disconnect::SERVER_ERROR, error_code::UNAVAILABLE, error.to_string())),
    }
    let mut codec = CentrifugalCodec::new(&claims.sub, epoch, claims.exp, id, subs, protobuf);
    codec.keep_after_connect(&message);
    // Each connection is a device of its own: the client keeps its positions, not the gateway.
    let request = ConnectRequest {
        claims,
        device: format!("centrifugal-{conn}"),
        since,
        epoch: None,
        topics: Vec::new(),
        live: true,
        shares_device: false,
    };
    Ok((request, Codec::Centrifugal(Box::new(codec))))
}

/// The first message (text, or binary with Protobuf), answering pings before it; else how the
/// connection ends: the client closed, or broke the protocol.
async fn first_message(socket: &mut Socket) -> Result<Vec<u8>, Close> {
    loop {
        match socket.reader.next().await? {
            Inbound::Text(message) | Inbound::Binary(message) => return Ok(message),
            Inbound::Ping(payload) => {
                socket.writer.write_all(&frame::pong(&payload)).await.map_err(|_| Close::gone("write failed"))?
            }
            Inbound::Pong => {}
            Inbound::Close(code) => return Err(Close::by_client(code)),
        }
    }
}

/// `#<user>` and `all`, each recovering from where the client says if it asks with the stream's
/// epoch.
fn server_subs(user: &str, connect: &ConnectCommand, epoch: &str) -> Vec<ServerSub> {
    CentrifugalCodec::server_channels(user)
        .into_iter()
        .map(|channel| {
            let asked = connect.subs.get(&channel).filter(|position| position.recover);
            let recover_from = asked.filter(|position| position.epoch == epoch).map(|position| position.offset);
            ServerSub { channel, recover_from, was_recovering: asked.is_some() }
        })
        .collect()
}

/// The stream's epoch, read with the bounds (one request for the many connections of a storm).
async fn epoch(shared: &Shared) -> Result<String, String> {
    let epoch = shared.bounds.read_epoch().await.map_err(|e| e.to_string())?;
    Ok(crate::session::bounds::epoch_text(epoch))
}

/// Counts the refusal and sends it: the error reply, if any, then the close.
async fn refuse(shared: &Shared, address: IpAddr, mut socket: Socket, refused: Refused, protobuf: bool) {
    if let Some(error) = refused.error {
        shared.refusals.refused(&Rejection::in_protocol(error, refused.reason.clone()), address);
    }
    if let Some(reply) = refused.reply {
        let _ = socket.writer.write_all(&to_frame(protobuf, &reply)).await;
        // The client closes once it has read the reply.
        let _ = tokio::time::timeout(REFUSED_GRACE, async { while socket.reader.next().await.is_ok() {} }).await;
    }
    let _ = socket.writer.write_all(&frame::close(refused.code, &refused.reason)).await;
    let _ = socket.writer.shutdown().await;
}
