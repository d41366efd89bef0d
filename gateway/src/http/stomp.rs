//! `GET /stomp`: STOMP over WebSocket. The upgrade is checked like `/ws` (handshake, origin,
//! readiness, limits), but who connects is only known from the CONNECT frame that follows it: its
//! `passcode` or `Authorization` header (or the `token` query parameter, or the upgrade's own
//! `Authorization` header). A bad CONNECT gets an ERROR frame and the close; a good one becomes a
//! session speaking [`StompCodec`], whose first frame, CONNECTED, is the session's welcome.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_shared::frame::error_code;
use herald_shared::id::{IdKind, check_id};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use tokio::io::AsyncWriteExt;

use super::auth::{CONFLICT, ConnectRequest, DEFAULT_DEVICE, Rejection, UNAUTHORIZED};
use super::handshake;
use super::server::{self, HttpResponse, admit, refused_origin};
use crate::Shared;
use crate::close::Close;
use crate::cluster::policy::PolicyError;
use crate::codec::stomp::{Connected, Frame, StompCodec, Transport, Version, parse};
use crate::codec::{Codec, sockjs, stomp};
use crate::session::{self, Connection, ReadHalf, WriteHalf};
use crate::websocket::frame as ws;
use crate::websocket::reader::{Inbound, MessageReader};

/// How long the last frames of a refused connection may take.
const REFUSAL_GRACE: Duration = Duration::from_secs(3);

/// What the upgrade request said about the connection, for the CONNECT frame to complete.
#[derive(Debug, Default)]
pub(crate) struct Hints {
    token: Option<String>,
    device: Option<String>,
    since: Option<String>,
}

/// Upgrades a `/stomp` request (or SockJS's `/stomp/<server>/<session>/websocket`, see
/// [`super::sockjs`]) and runs the connection.
pub(crate) async fn upgrade(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
    transport: Transport,
) -> HttpResponse {
    let checked = check(&shared, &request, peer);
    let upgraded = checked.and_then(|(subprotocol, address, permit)| {
        let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut request)
            .map_err(|error| Rejection::new(StatusCode::BAD_REQUEST, "bad_request", error.to_string()))?;
        Ok((subprotocol, address, permit, response, upgrade))
    });
    let (subprotocol, address, permit, mut response, upgrade) = match upgraded {
        Ok(upgraded) => upgraded,
        Err(refused) => return server::refuse(&shared, &request, peer, &refused),
    };
    let subprotocol = match transport {
        Transport::WebSocket => subprotocol,
        // SockJS offers no subprotocol: CONNECT's `accept-version` decides.
        Transport::SockJs => None,
    };
    let hints = hints(&request);
    if let Some(version) = subprotocol {
        response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(version.subprotocol()));
    }
    let tracker = shared.sessions.clone();
    let connect = move |upgraded| connect_upgraded(shared, upgraded, hints, address, transport);
    tracker.spawn(super::edge::after_upgrade(upgrade, Some(permit), connect));
    response.map(|_| http_body_util::Full::new(Bytes::new()))
}

/// What a `/stomp` request must pass before its upgrade: the subprotocol it may speak, the
/// client's address and its place under the connection limits.
fn check(
    shared: &Shared,
    request: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<(Option<Version>, std::net::IpAddr, super::limits::Permit), Rejection> {
    handshake::check(request)?;
    if let Some(origin) = refused_origin(&shared.config.allowed_origins, request) {
        let reason = format!("origin {origin} is not allowed");
        return Err(Rejection::new(StatusCode::FORBIDDEN, "forbidden_origin", reason));
    }
    let subprotocol = subprotocol(request)?;
    let (address, permit) = admit(shared, request, peer)?;
    Ok((subprotocol, address, permit))
}

/// The highest STOMP version among the offered subprotocols; none offered is fine (the CONNECT
/// frame's `accept-version` decides), offers of none of them are refused.
fn subprotocol<B>(request: &Request<B>) -> Result<Option<Version>, Rejection> {
    let mut offered = request.headers().get_all(SEC_WEBSOCKET_PROTOCOL).iter().peekable();
    if offered.peek().is_none() {
        return Ok(None);
    }
    let best = offered
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(Version::parse)
        .max();
    match best {
        Some(version) => Ok(Some(version)),
        None => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Sec-WebSocket-Protocol must offer v12.stomp, v11.stomp or v10.stomp",
        )),
    }
}

pub(crate) fn hints<B>(request: &Request<B>) -> Hints {
    let mut hints = Hints::default();
    for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "token" => hints.token = Some(value.into_owned()),
            "device" => hints.device = Some(value.into_owned()),
            "since" => hints.since = Some(value.into_owned()),
            _ => {}
        }
    }
    if hints.token.is_none() {
        let header = request.headers().get(AUTHORIZATION).and_then(|value| value.to_str().ok());
        hints.token = header.and_then(bearer).map(str::to_string);
    }
    hints
}

fn bearer(value: &str) -> Option<&str> {
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)
}

/// Why a CONNECT is refused: the ERROR frame's `message` (a Herald error code) and its body.
fn refused(message: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection::in_protocol(message, detail)
}

/// [`connect`] on an upgraded WebSocket. Not an `async fn`: its locals would be held for the
/// connection's whole life.
fn connect_upgraded(
    shared: Arc<Shared>,
    upgraded: Upgraded,
    hints: Hints,
    address: IpAddr,
    transport: Transport,
) -> impl Future<Output = ()> + Send + 'static {
    let (read_half, write_half) = session::split(upgraded);
    let reader = MessageReader::new(read_half, shared.config.max_frame_bytes);
    connect(shared, reader, write_half, hints, address, transport)
}

/// Reads the CONNECT frame, authenticates it and runs the session; refuses it with an ERROR.
pub(crate) fn connect(
    shared: Arc<Shared>,
    reader: MessageReader<ReadHalf>,
    write_half: WriteHalf,
    hints: Hints,
    address: IpAddr,
    transport: Transport,
) -> impl Future<Output = ()> + Send + 'static {
    session::accept_then_run(accept(shared, reader, write_half, hints, address, transport))
}

/// Reads the CONNECT frame and authenticates it: the session's future, or `None` once refused.
async fn accept(
    shared: Arc<Shared>,
    mut reader: MessageReader<ReadHalf>,
    mut write_half: WriteHalf,
    hints: Hints,
    address: IpAddr,
    transport: Transport,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    if transport == Transport::SockJs && write_half.write_all(&sockjs::open()).await.is_err() {
        return None;
    }
    let deadline = shared.config.heartbeat + shared.config.heartbeat_timeout;
    let first = first_frame(&mut reader, &mut write_half, transport);
    let frame = tokio::select! {
        // Boxed (here and below): accepting runs once.
        frame = Box::pin(tokio::time::timeout(deadline, first)) => frame,
        _ = shared.shutdown.cancelled() => return None,
    };
    let refuse = |write_half, refusal| refuse(&shared, address, write_half, refusal, transport);
    let refusal = match frame {
        Ok(Ok(Some(frame))) => match authenticate(&shared, &frame, hints) {
            Ok((request, connected)) => {
                let conn = crate::id::random_id(12);
                match Box::pin(shared.policies.reserve(&request.claims.sub, &conn)).await {
                    Ok(()) => Ok((request, connected, conn)),
                    Err(error @ PolicyError::Taken) => Err(refused(CONFLICT, error.to_string())),
                    Err(error) => Err(refused(error_code::UNAVAILABLE, error.to_string())),
                }
            }
            Err(refusal) => Err(refusal),
        },
        Ok(Ok(None)) => return None,
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(refused(error_code::BAD_REQUEST, "no CONNECT frame in time")),
    };
    let (request, connected, conn) = match refusal {
        Ok(accepted) => accepted,
        Err(refusal) => {
            refuse(&mut write_half, refusal).await;
            return None;
        }
    };
    let codec = Codec::Stomp(Box::new(StompCodec::new(
        connected,
        shared.config.heartbeat,
        transport,
        shared.config.max_frame_bytes,
    )));
    let connection = Connection { reader, write_half, codec };
    Some(session::run_with(shared, connection, request, conn, address))
}

/// The client's first frame; `None` when it closed first.
async fn first_frame(
    reader: &mut MessageReader<ReadHalf>,
    write_half: &mut WriteHalf,
    transport: Transport,
) -> Result<Option<Frame>, Rejection> {
    loop {
        match reader.next().await {
            Ok(Inbound::Text(text) | Inbound::Binary(text)) => {
                let frame = match transport {
                    Transport::WebSocket => parse(&text),
                    Transport::SockJs => first_sockjs_frame(&text),
                };
                match frame {
                    Ok(Some(frame)) => return Ok(Some(frame)),
                    Ok(None) => continue,
                    Err(error) => return Err(refused(error_code::BAD_REQUEST, error)),
                }
            }
            Ok(Inbound::Ping(payload)) => {
                let _ = write_half.write_all(&ws::pong(&payload)).await;
            }
            Ok(Inbound::Pong) => {}
            // Closed with a close of its own, as after CONNECT: the client's echoed, or the
            // code of what it broke (a binary message, a bad WebSocket frame).
            Ok(Inbound::Close(code)) => return Ok(say_close(write_half, transport, Close::by_client(code)).await),
            Err(close) => return Ok(say_close(write_half, transport, close).await),
        }
    }
}

/// Sends the close frame of `close` (none when the connection is gone); no frame to return.
async fn say_close(write_half: &mut WriteHalf, transport: Transport, close: Close) -> Option<Frame> {
    if let Some(bytes) = crate::codec::close_frame(transport.format(), &close) {
        let _ = write_half.write_all(&bytes).await;
    }
    None
}

/// The STOMP frame in a client's first SockJS message, which must hold it alone: the session that
/// would run the frames after it does not exist yet.
fn first_sockjs_frame(text: &[u8]) -> Result<Option<Frame>, String> {
    let messages = sockjs::parse(text)?;
    let mut frames = Vec::new();
    for message in &messages {
        frames.extend(parse(message.as_bytes())?);
    }
    match frames.len() {
        0 | 1 => Ok(frames.pop()),
        _ => Err("CONNECT must come alone in its SockJS message".into()),
    }
}

/// Who a CONNECT frame says connects, and what it negotiated.
fn authenticate(shared: &Shared, frame: &Frame, hints: Hints) -> Result<(ConnectRequest, Connected), Rejection> {
    if frame.command != "CONNECT" && frame.command != "STOMP" {
        return Err(refused(error_code::BAD_REQUEST, format!("expected CONNECT, got {}", frame.command)));
    }
    let version = frame
        .header("accept-version")
        .unwrap_or("1.0")
        .split(',')
        .filter_map(Version::parse)
        .max()
        .ok_or_else(|| refused(error_code::BAD_REQUEST, "supported versions are 1.0, 1.1 and 1.2"))?;
    let (client_sends, client_wants) = heart_beat(frame.header("heart-beat").unwrap_or("0,0"))
        .ok_or_else(|| refused(error_code::BAD_REQUEST, "heart-beat must be two numbers: cx,cy"))?;
    let token = connect_token(frame, hints.token).ok_or_else(|| {
        let reason = "no token: pass it as CONNECT's passcode, an Authorization: Bearer header or ?token=";
        Rejection::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED, reason)
    })?;
    let claims = shared.verifier.verify(&token).map_err(Rejection::unauthorized)?;
    let device = frame.header("herald-device").map(str::to_string).or(hints.device);
    let shares_device = device.is_none();
    let device = device.unwrap_or_else(|| DEFAULT_DEVICE.to_string());
    check_id(IdKind::Device, &device).map_err(|error| refused(error_code::BAD_REQUEST, error.to_string()))?;
    let since = frame.header("herald-since").map(str::to_string).or(hints.since);
    let since = since
        .map(|since| since.parse::<u64>())
        .transpose()
        .map_err(|_| refused(error_code::BAD_REQUEST, "herald-since must be a sequence number"))?;
    let connected = Connected { version, client_sends, client_wants, allowed_topics: claims.topics.clone() };
    let request = ConnectRequest { claims, device, since, epoch: None, topics: Vec::new(), live: false, shares_device };
    Ok((request, connected))
}

/// The token a CONNECT comes with: its `passcode`, its `Authorization: Bearer`, or the upgrade's
/// (`?token=`, its header), in that order. Apps moved from Spring send a login and passcode of
/// their own that Spring ignored (`guest`/`guest`, empty ones) beside a token in the URL: one
/// shaped like a JWT is taken over them; when none is, the first given is (and its error told).
fn connect_token(frame: &Frame, upgrade_token: Option<String>) -> Option<String> {
    let bearer_header = frame.header("Authorization").or(frame.header("authorization")).and_then(bearer);
    let given: Vec<String> = [frame.header("passcode"), bearer_header]
        .into_iter()
        .flatten()
        .map(str::to_string)
        .chain(upgrade_token)
        .filter(|token| !token.is_empty())
        .collect();
    let jwt_shaped = |token: &&String| token.split('.').count() == 3;
    given.iter().find(jwt_shaped).or(given.first()).cloned()
}

/// A `heart-beat` header: how often the client sends, how often it wants to hear (0: never).
pub(crate) fn heart_beat(value: &str) -> Option<(Duration, Duration)> {
    let (sends, wants) = value.split_once(',')?;
    // Capped: a client announcing beats hours apart would otherwise switch off the detection of
    // a dead peer for its connection.
    let millis = |text: &str| text.trim().parse::<u64>().ok().map(|ms| Duration::from_millis(ms).min(MAX_HEART_BEAT));
    Some((millis(sends)?, millis(wants)?))
}

/// The longest heart-beat interval a client can negotiate (either way).
const MAX_HEART_BEAT: Duration = Duration::from_secs(600);

/// Counts the refusal and sends it: ERROR, then the close (1008).
async fn refuse(
    shared: &Shared,
    address: IpAddr,
    write_half: &mut WriteHalf,
    refusal: Rejection,
    transport: Transport,
) {
    shared.refusals.refused(&refusal, address);
    let error = stomp::error_frame(refusal.error, &refusal.reason);
    let close = transport.close(Some(&error), herald_shared::frame::close_code::POLICY, refusal.error);
    let _ = tokio::time::timeout(REFUSAL_GRACE, async {
        write_half.write_all(&close).await?;
        write_half.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heart_beats_and_subprotocols() {
        assert_eq!(heart_beat("0,1000"), Some((Duration::ZERO, Duration::from_secs(1))));
        assert_eq!(heart_beat("10"), None);
        let forever = heart_beat("18446744073709551615,99999999999");
        assert_eq!(forever, Some((MAX_HEART_BEAT, MAX_HEART_BEAT)), "capped");
        let request = |offer: &str| Request::builder().header(SEC_WEBSOCKET_PROTOCOL, offer).body(()).unwrap();
        assert_eq!(subprotocol(&request("v10.stomp, v12.stomp")).unwrap(), Some(Version::V12));
        assert!(subprotocol(&request("mqtt")).is_err());
        assert_eq!(subprotocol(&Request::builder().body(()).unwrap()).unwrap(), None);
    }
}
