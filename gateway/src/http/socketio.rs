//! `/socket.io/`: Socket.IO 4 on Engine.IO 4's WebSocket transport. The Engine.IO handshake
//! (`0{"sid",…}`) is sent as the socket opens; the client's Socket.IO CONNECT carries the token
//! (`auth: {"token"}`, or `?token=`), and `pid` + `offset` when it recovers its connection state.
//! Long-polling is not served: clients must use the WebSocket transport.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use crate::Shared;
use crate::codec::socketio::wire::{self, engine, packet};
use crate::codec::{Codec, SocketIoCodec};
use crate::http::auth::{ConnectRequest, Rejection};
use crate::session::{self, Socket};
use crate::websocket::frame;
use crate::websocket::reader::Inbound;

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

/// Opens the WebSocket; the CONNECT is read on it afterwards.
pub(crate) async fn websocket(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<HttpResponse, Rejection> {
    let query: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    let param = |name: &str| query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    if param("EIO") != Some("4") {
        return Ok(engine_error(5, "Unsupported protocol version"));
    }
    if param("transport") != Some("websocket") {
        return Ok(engine_error(0, "Transport unknown: this server offers the websocket transport only"));
    }
    if param("sid").is_some() {
        return Ok(engine_error(1, "Session ID unknown"));
    }
    let query_token = param("token").map(str::to_string);
    let (permit, address) = super::edge::admit(&shared, &request, peer)?;
    let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut request)
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    shared.sessions.clone().spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(upgraded) => {
                let socket = Socket::new(upgraded.into_inner().into_inner(), shared.config.max_frame_bytes);
                serve(shared, socket, address, query_token).await;
            }
            Err(error) => debug!(%error, "upgrade failed"),
        }
    });
    Ok(response.map(|_| Full::new(Bytes::new())))
}

/// The CONNECT packet's `auth`.
#[derive(Debug, Default, Deserialize)]
struct Auth {
    #[serde(default)]
    token: Option<String>,
    /// The private id of the connection being recovered.
    #[serde(default)]
    pid: Option<String>,
    /// The last offset (`seq`) the client received, with `pid`.
    #[serde(default)]
    offset: Option<String>,
}

async fn serve(shared: Arc<Shared>, mut socket: Socket, address: IpAddr, query_token: Option<String>) {
    let conn = crate::id::random_id(12);
    let open = json!({
        "sid": conn,
        "upgrades": [],
        "pingInterval": shared.config.heartbeat.as_millis() as u64,
        "pingTimeout": shared.config.heartbeat_timeout.as_millis() as u64,
        "maxPayload": shared.config.max_frame_bytes,
    });
    let mut handshake = vec![engine::OPEN];
    handshake.extend_from_slice(open.to_string().as_bytes());
    if socket.writer.write_all(&frame::text(&handshake)).await.is_err() {
        return;
    }
    let accepted = tokio::select! {
        accepted = accept(&shared, &mut socket, &conn, query_token) => accepted,
        _ = shared.shutdown.cancelled() => Err("the server is shutting down".to_string()),
    };
    match accepted {
        Ok((request, codec)) => session::run_codec(shared, socket, request, conn, address, codec).await,
        Err(reason) => {
            debug!(%reason, "socket.io connection refused");
            let refusal = wire::packet(packet::CONNECT_ERROR, None, &json!({"message": reason}));
            let _ = socket.writer.write_all(&refusal).await;
            let _ = socket.writer.write_all(&frame::close(1000, "")).await;
            let _ = socket.writer.shutdown().await;
        }
    }
}

/// Reads the CONNECT, checks the token and claims the user's session slot.
async fn accept(
    shared: &Shared,
    socket: &mut Socket,
    conn: &str,
    query_token: Option<String>,
) -> Result<(ConnectRequest, Codec), String> {
    let text = tokio::time::timeout(CONNECT_TIMEOUT, first_text(socket))
        .await
        .map_err(|_| "no CONNECT in time".to_string())?
        .ok_or("no CONNECT")?;
    let auth = match text.as_slice() {
        [engine::MESSAGE, packet::CONNECT] => Auth::default(),
        [engine::MESSAGE, packet::CONNECT, b'{', ..] => {
            serde_json::from_slice(&text[2..]).map_err(|e| format!("bad CONNECT auth: {e}"))?
        }
        [engine::MESSAGE, packet::CONNECT, b'/', ..] => return Err("Invalid namespace: only / is served".into()),
        _ => return Err("the first packet must be a Socket.IO CONNECT".into()),
    };
    let token = auth.token.or(query_token).ok_or("no token: pass auth {token} or ?token=")?;
    let claims = shared.verifier.verify(&token).map_err(|e| e.to_string())?;
    let since = match (&auth.pid, &auth.offset) {
        (Some(_), Some(offset)) => Some(offset.parse::<u64>().map_err(|_| "offset must be a sequence number")?),
        _ => None,
    };
    shared.policies.reserve(&claims.sub, conn).await.map_err(|error| error.to_string())?;
    // A recovering client gets its own pid back: Socket.IO clients take that as "recovered".
    let pid = auth.pid.filter(|_| since.is_some()).unwrap_or_else(|| conn.to_string());
    let codec = Codec::SocketIo(Box::new(SocketIoCodec::new(pid)));
    let request = ConnectRequest { claims, device: format!("socketio-{conn}"), since, topics: Vec::new(), live: true };
    Ok((request, codec))
}

/// The first text message, answering WebSocket pings before it; none if the client closed.
async fn first_text(socket: &mut Socket) -> Option<Vec<u8>> {
    loop {
        match socket.reader.next().await.ok()? {
            Inbound::Text(text) => return Some(text),
            Inbound::Ping(payload) => socket.writer.write_all(&frame::pong(&payload)).await.ok()?,
            Inbound::Pong => {}
            Inbound::Close(_) => return None,
        }
    }
}
