//! `/socket.io/`: Socket.IO 4 on Engine.IO 4, over a WebSocket or HTTP long-polling (see
//! [`super::engineio`]) with the upgrade to a WebSocket. The Engine.IO handshake (`0{"sid",…}`)
//! opens the connection; the client's Socket.IO CONNECT carries the token (`auth: {"token"}`, or
//! `?token=`), and `pid` + `offset` when it recovers its connection state.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::Either;
use herald_shared::frame::{close_code, error_code};
use herald_shared::id::{IdKind, check_id, topic_allowed};
use herald_shared::token::Claims;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::warn;

use crate::Shared;
use crate::cluster::policy::PolicyError;
use crate::codec::socketio::wire::{self, engine, packet};
use crate::codec::socketio::{Pid, seq_of};
use crate::codec::{Codec, SocketIoCodec};
use crate::http::auth::{CONFLICT, ConnectRequest, Rejection, UNAUTHORIZED};
use crate::http::body::{self, BodyError};
use crate::session::{self, Socket};
use crate::websocket::frame;
use crate::websocket::reader::Inbound;

/// Characters of an Engine.IO sid (alphanumeric: about 119 bits).
const ENGINE_SID_LEN: usize = 20;

/// How long a client may take to send its CONNECT after the WebSocket opened.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type HttpResponse = Response<Full<Bytes>>;

/// An Engine.IO refusal before the upgrade: 400 with `{"code","message"}` as Engine.IO servers answer.
fn engine_error(code: u8, message: &str) -> HttpResponse {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(json!({"code": code, "message": message}).to_string())))
        .expect("static response parts are valid")
}

/// A GET: a WebSocket (new, or the upgrade of a polling session), a polling handshake, or a poll.
pub(crate) async fn get(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<HttpResponse, Rejection> {
    let query = Query::of(&request);
    if query.param("EIO") != Some("4") {
        return Ok(engine_error(5, "Unsupported protocol version"));
    }
    let sid = query.param("sid").map(str::to_string);
    match (query.param("transport"), sid) {
        (Some("polling"), None) => {
            let (permit, address) = super::edge::admit(&shared, &request, peer)?;
            // The Engine.IO sid lets whoever knows it poll and post as the session: it is known
            // only to the client, never shown as the conn id, the socket's id or in logs.
            let sid = crate::id::random_id(ENGINE_SID_LEN);
            let conn = crate::id::random_id(12);
            let socket = shared.polling.open(&sid, shared.config.max_frame_bytes);
            let body = super::engineio::open_packet(&open(&shared, &sid, &["websocket"]));
            let query_token = query.param("token").map(str::to_string);
            shared.sessions.clone().spawn(async move {
                serve_opened(shared.clone(), socket, address, query_token, conn.clone()).await;
                drop(permit);
                // The few packets the session wrote last (a CONNECT_ERROR, say) wait for the
                // client's next poll, which removes the session once it took them; a poll that
                // never comes is given up after the time a client may take between two.
                let polling = shared.polling.get(&sid);
                if polling.is_some_and(|polling| polling.left_last_words(LAST_WORDS)) {
                    let linger = shared.config.heartbeat + shared.config.heartbeat_timeout;
                    tokio::select! {
                        _ = tokio::time::sleep(linger) => {}
                        _ = shared.shutdown.cancelled() => {}
                    }
                }
                shared.polling.remove(&sid);
            });
            Ok(text(body))
        }
        (Some("polling"), Some(sid)) => match shared.polling.get(&sid) {
            Some(polling) => Ok(match polling.poll().await {
                super::engineio::Poll::Packets(packets) => text(packets.into()),
                // Not Engine.IO's close packet: python-socketio takes that for the server's wish
                // that it stay away, while a gateway restarting wants it back. A close that wants
                // it away sent Socket.IO's DISCONNECT before. The next request finds no session,
                // which every client takes for a transport error, and reconnects.
                super::engineio::Poll::Closed => {
                    shared.polling.remove(&sid);
                    text(Bytes::from_static(b"6"))
                }
                // As Engine.IO's server: the client broke the transport's rule, and its session ends.
                super::engineio::Poll::Overlap => {
                    polling.close(close_code::PROTOCOL_ERROR).await;
                    engine_error(3, "Bad request")
                }
            }),
            None => Ok(engine_error(1, "Session ID unknown")),
        },
        (Some("websocket"), sid) => {
            super::handshake::check(&request)?;
            let polling = match &sid {
                Some(sid) => match shared.polling.get(sid) {
                    Some(polling) => Some(polling),
                    None => return Ok(engine_error(1, "Session ID unknown")),
                },
                None => None,
            };
            let admitted = match polling {
                // The session holds its place under the limits already.
                Some(_) => None,
                None => Some(super::edge::admit(&shared, &request, peer)?),
            };
            let query_token = query.param("token").map(str::to_string);
            let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut request)
                .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
            let (permit, address) = admitted.unzip();
            let tracker = shared.sessions.clone();
            let run = move |upgraded| {
                let socket = Socket::new(upgraded, shared.config.max_frame_bytes);
                match (polling, address) {
                    // Rare (a polling session moving to WebSocket), and short: boxed.
                    (Some(polling), _) => Either::Left(Box::pin(upgrade_polling(polling, socket))),
                    (None, Some(address)) => Either::Right(Either::Left(serve(shared, socket, address, query_token))),
                    (None, None) => Either::Right(Either::Right(std::future::ready(()))),
                }
            };
            tracker.spawn(super::edge::after_upgrade(upgrade, permit, run));
            Ok(response.map(|_| Full::new(Bytes::new())))
        }
        _ => Ok(engine_error(0, "Transport unknown")),
    }
}

/// A POST to a polling session: the client's packets.
pub(crate) async fn post(shared: Arc<Shared>, request: Request<Incoming>) -> Result<HttpResponse, Rejection> {
    let query = Query::of(&request);
    let Some(polling) = query.param("sid").and_then(|sid| shared.polling.get(sid)) else {
        return Ok(engine_error(1, "Session ID unknown"));
    };
    let limit = shared.config.max_frame_bytes;
    let (parts, body) = request.into_parts();
    let body = match body::read(&parts.headers, body, limit, shared.config.request_body_timeout).await {
        Ok(body) => body,
        // As Engine.IO's server does, and as a WebSocket message over the limit does: the session
        // ends (its client reconnects) rather than living on without the packets.
        Err(BodyError::TooLarge) => {
            polling.close(close_code::TOO_BIG).await;
            let reason = format!("over {limit} bytes: the session is closed");
            return Err(Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", reason));
        }
        Err(BodyError::TimedOut) => {
            polling.close(close_code::PROTOCOL_ERROR).await;
            let reason = "the body did not arrive within request_body_timeout: the session is closed";
            return Err(Rejection::new(StatusCode::REQUEST_TIMEOUT, "timeout", reason));
        }
        Err(BodyError::CutOff) => {
            polling.close(close_code::PROTOCOL_ERROR).await;
            let reason = "the body was cut off: the session is closed";
            return Err(Rejection::new(StatusCode::BAD_REQUEST, "bad_request", reason));
        }
    };
    match polling.post(&body).await {
        Ok(()) => Ok(text(Bytes::from_static(b"ok"))),
        Err(_) => Ok(engine_error(1, "Session ID unknown")),
    }
}

/// The upgrade of a polling session: the probe, then the upgrade packet, then the session moves.
async fn upgrade_polling(polling: Arc<super::engineio::Polling>, mut socket: Socket) {
    let probe = [engine::PING, b'p', b'r', b'o', b'b', b'e'];
    if first_text(&mut socket).await.as_deref() != Some(&probe[..]) {
        return;
    }
    let answer = [engine::PONG, b'p', b'r', b'o', b'b', b'e'];
    if socket.writer.write_all(&frame::text(&answer)).await.is_err() {
        return;
    }
    if first_text(&mut socket).await.as_deref() != Some(&[engine::UPGRADE][..]) {
        return;
    }
    polling.upgrade(socket).await;
}

/// A request's query parameters.
struct Query(Vec<(String, String)>);

impl Query {
    fn of<B>(request: &Request<B>) -> Query {
        Query(form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()).into_owned().collect())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

fn text(body: Bytes) -> HttpResponse {
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=UTF-8")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(body))
        .expect("static response parts are valid")
}

/// Engine.IO's open packet data for connection `sid`.
fn open(shared: &Shared, sid: &str, upgrades: &[&str]) -> serde_json::Value {
    json!({
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": shared.config.heartbeat.as_millis() as u64,
        "pingTimeout": shared.config.heartbeat_timeout.as_millis() as u64,
        "maxPayload": shared.config.max_frame_bytes,
    })
}

/// At most what an ended polling session keeps for its client's next poll.
const LAST_WORDS: usize = 8 * 1024;

/// The CONNECT packet's `auth`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Auth {
    #[serde(default)]
    token: Option<String>,
    /// The private id of the connection being recovered.
    #[serde(default)]
    pid: Option<String>,
    /// The last offset (`seq`) the client received, with `pid`: a string as events carry it, or
    /// a number.
    #[serde(default)]
    offset: Option<serde_json::Value>,
}

/// A new WebSocket connection: the open packet, then the session.
fn serve(
    shared: Arc<Shared>,
    socket: Socket,
    address: IpAddr,
    query_token: Option<String>,
) -> impl Future<Output = ()> {
    session::accept_then_run(open_and_accept(shared, socket, address, query_token))
}

/// Sends the open packet, then accepts the CONNECT (see [`accept_or_refuse`]).
async fn open_and_accept(
    shared: Arc<Shared>,
    mut socket: Socket,
    address: IpAddr,
    query_token: Option<String>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let conn = crate::id::random_id(12);
    let handshake = super::engineio::open_packet(&open(&shared, &crate::id::random_id(ENGINE_SID_LEN), &[]));
    if socket.writer.write_all(&frame::text(&handshake)).await.is_err() {
        return None;
    }
    accept_or_refuse(shared, socket, address, query_token, conn).await
}

/// A connection whose open packet was sent: its CONNECT, then its session.
fn serve_opened(
    shared: Arc<Shared>,
    socket: Socket,
    address: IpAddr,
    query_token: Option<String>,
    conn: String,
) -> impl Future<Output = ()> {
    session::accept_then_run(accept_or_refuse(shared, socket, address, query_token, conn))
}

/// The session's future once the CONNECT is accepted, or `None` once refused.
async fn accept_or_refuse(
    shared: Arc<Shared>,
    mut socket: Socket,
    address: IpAddr,
    query_token: Option<String>,
    conn: String,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let mut namespace = None;
    let accepted = tokio::select! {
        // Boxed: accepting runs once.
        accepted = Box::pin(accept(&shared, &mut socket, &conn, query_token, &mut namespace)) => accepted,
        _ = shared.shutdown.cancelled() => Err(None),
    };
    match accepted {
        Ok((request, codec)) => Some(session::run_codec(shared, socket, request, conn, address, codec)),
        Err(refusal) => {
            let reason = match refusal {
                Some(refusal) => {
                    shared.refusals.refused(&refusal, address);
                    refusal.reason
                }
                None if shared.shutdown.is_cancelled() => "the server is shutting down".to_string(),
                None => "no CONNECT".to_string(),
            };
            // In the namespace the client asked for, or its SDK does not see it.
            let refusal =
                wire::namespaced_packet(packet::CONNECT_ERROR, namespace.as_deref(), &json!({"message": reason}));
            let _ = socket.writer.write_all(&refusal).await;
            let _ = socket.writer.write_all(&frame::close(1000, "")).await;
            let _ = socket.writer.shutdown().await;
            None
        }
    }
}

/// Reads the CONNECT, checks the token and claims the user's session slot; `None`: the client
/// closed first. `namespace`: the one the CONNECT named, when not `/`.
async fn accept(
    shared: &Shared,
    socket: &mut Socket,
    conn: &str,
    query_token: Option<String>,
    namespace: &mut Option<String>,
) -> Result<(ConnectRequest, Codec), Option<Rejection>> {
    let bad_request = |reason: &str| Some(Rejection::in_protocol(error_code::BAD_REQUEST, reason));
    let text = tokio::time::timeout(CONNECT_TIMEOUT, first_text(socket))
        .await
        .map_err(|_| bad_request("no CONNECT in time"))?
        .ok_or(None)?;
    *namespace = other_namespace(&text);
    let auth = connect_auth(&text).map_err(|reason| bad_request(&reason))?;
    let token = auth
        .token
        .filter(|token| !token.is_empty())
        .or(query_token.filter(|token| !token.is_empty()))
        .ok_or_else(|| Some(Rejection::in_protocol(UNAUTHORIZED, "no token: pass auth {token} or ?token=")))?;
    let claims = shared.verifier.verify(&token).map_err(|error| Some(Rejection::unauthorized(error)))?;
    // A client recovering its state: `since` is its offset, and its pid names its device.
    let (pid, since) = match (&auth.pid, &auth.offset) {
        (Some(pid), Some(offset)) => (
            Some(Pid::parse(pid).ok_or_else(|| bad_request("pid is not one this server gives"))?),
            Some(seq_of(offset).ok_or_else(|| bad_request("offset must be a sequence number"))?),
        ),
        _ => (None, None),
    };
    shared.policies.reserve(&claims.sub, conn).await.map_err(|error| {
        let code = if matches!(error, PolicyError::Taken) { CONFLICT } else { error_code::UNAVAILABLE };
        Some(Rejection::in_protocol(code, error.to_string()))
    })?;
    let recovering = pid.is_some();
    let (pid, topics) = match pid {
        Some(pid) => recovered_state(shared, &claims, pid).await,
        None => (Pid::new(&crate::id::random_id(12)), Vec::new()),
    };
    // Kept from now on, so that the state can be recovered whatever becomes of this connection.
    if let Err(error) = shared.socketio_states.write(&claims.sub, &pid.device(), topics.clone()).await {
        warn!(user = %claims.sub, %error, "the Socket.IO state was not written: a recovery will not find it");
    }
    let request =
        ConnectRequest { claims, device: pid.device(), since, epoch: None, topics, live: true, shares_device: false };
    Ok((request, Codec::SocketIo(Box::new(SocketIoCodec::new(pid, recovering)))))
}

/// The pid and topics a recovering connection resumes with: its own pid and its state's topics when
/// the state is still kept, and every topic is still allowed by its token. Otherwise the next pid
/// (the client is told it was not recovered), with the topics still allowed; with no state kept (gone,
/// or the pid is another user's), a pid of a lineage of its own: two users never share a lineage,
/// nor a `socket.id`.
async fn recovered_state(shared: &Shared, claims: &Claims, pid: Pid) -> (Pid, Vec<String>) {
    let kept = match shared.socketio_states.read(&claims.sub, &pid.device()).await {
        Ok(Some(kept)) => kept,
        Ok(None) => return (Pid::new(&crate::id::random_id(12)), Vec::new()),
        Err(error) => {
            // Most likely the user's own state, unread for now: the same state (a loss noted for it
            // is reported to its next recovery), not recovered.
            warn!(user = %claims.sub, %error, "the Socket.IO state could not be read: not recovered");
            return (pid.next(), Vec::new());
        }
    };
    let mut topics = kept;
    let count = topics.len();
    topics.retain(|topic| check_id(IdKind::Topic, topic).is_ok() && topic_allowed(&claims.topics, topic));
    topics.truncate(shared.config.max_topics);
    let whole = topics.len() == count;
    topics.sort();
    topics.dedup();
    (if whole { pid } else { pid.next() }, topics)
}

/// The auth of the first packet, which must be a Socket.IO CONNECT to namespace `/`.
pub(crate) fn connect_auth(text: &[u8]) -> Result<Auth, String> {
    let Some(rest) = text.strip_prefix(&[engine::MESSAGE, packet::CONNECT]) else {
        return Err("the first packet must be a Socket.IO CONNECT".into());
    };
    // `/` written out (`40/,{…}`) is the default namespace too.
    let rest = rest.strip_prefix(b"/,").unwrap_or(rest);
    match rest {
        [] => Ok(Auth::default()),
        [b'{', ..] => serde_json::from_slice(rest).map_err(|e| format!("bad CONNECT auth: {e}")),
        [b'/', ..] => Err("Invalid namespace: only / is served".into()),
        _ => Err("the first packet must be a Socket.IO CONNECT".into()),
    }
}

/// The namespace of a CONNECT to one other than `/` (`40/chat,{…}`).
fn other_namespace(text: &[u8]) -> Option<String> {
    let rest = text.strip_prefix(&[engine::MESSAGE, packet::CONNECT])?;
    crate::codec::socketio::namespace_of(rest).map(str::to_string)
}

/// The first text message, answering WebSocket pings before it; none if the client closed.
async fn first_text(socket: &mut Socket) -> Option<Vec<u8>> {
    loop {
        match socket.reader.next().await.ok()? {
            Inbound::Text(text) => return Some(text),
            Inbound::Ping(payload) => socket.writer.write_all(&frame::pong(&payload)).await.ok()?,
            Inbound::Pong | Inbound::Binary(_) => {}
            Inbound::Close(_) => return None,
        }
    }
}
