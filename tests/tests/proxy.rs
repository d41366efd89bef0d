//! Herald behind real nginx, configured with the sample users copy (deploy/nginx/herald.conf): clients
//! connect through it to two gateways; when one gateway stops, its clients reconnect through nginx, land
//! on the other and resume with `since`, missing nothing and receiving nothing twice. The gateways trust
//! nginx's address, and take the client's address from nginx's X-Forwarded-For only then.
//!
//! Needs nginx (scripts/test installs Debian's); without it these tests print a note and pass, unless
//! HERALD_REQUIRE_NGINX=1 or HERALD_REQUIRE_DOCKER=1.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use futures::StreamExt;
use herald_gateway::Config;
use herald_shared::frame::{ServerFrame, close_code};
use herald_tests::gateway::token;
use herald_tests::nginx::{self, TestNginx};
use herald_tests::stomp::{Receiver, StompClient, StompEvent};
use herald_tests::ws::{Event, FRAME_TIMEOUT};
use herald_tests::{Publisher, TestGateway, TestNats, WsClient};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// nginx's address as the gateways see it (nginx connects to them from 127.0.0.1).
const NGINX_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A gateway named `node` that trusts nginx's X-Forwarded-For.
async fn proxied_gateway(nats: &TestNats, node: &str) -> TestGateway {
    TestGateway::start_with(nats, |c: &mut Config| {
        c.node_id = node.to_string();
        c.trusted_proxies = vec![NGINX_ADDRESS];
    })
    .await
}

/// A client connected through nginx, with every `seq` it received, in order.
struct Client {
    user: String,
    socket: WsClient,
    node: String,
    seqs: Vec<u64>,
}

/// Connects `user` through nginx (resuming after `since`) and reads the `welcome`: the socket and the
/// gateway it landed on.
async fn connect(nginx: &TestNginx, user: &str, since: Option<u64>) -> (WsClient, String) {
    let mut query = format!("token={}", token(user));
    if let Some(since) = since {
        query.push_str(&format!("&since={since}"));
    }
    let mut socket = match WsClient::connect(&nginx.ws_url(&query)).await {
        Ok(socket) => socket,
        Err(refused) => panic!("{user}: nginx answered {} {}\n{}", refused.status, refused.body, nginx.logs()),
    };
    match socket.next_event().await {
        Event::Frame(welcome @ ServerFrame::Welcome { .. }) => {
            let ServerFrame::Welcome { node, .. } = &welcome else { unreachable!() };
            let node = node.clone();
            socket.welcome = Some(welcome);
            (socket, node)
        }
        other => panic!("{user}: expected welcome through nginx, got {other:?}\n{}", nginx.logs()),
    }
}

/// Publishes one message to each user and then one to everyone, and records what each user is owed.
async fn publish_round(publisher: &Publisher, expected: &mut BTreeMap<String, Vec<u64>>, round: &str) {
    let users: Vec<String> = expected.keys().cloned().collect();
    for user in &users {
        let seq = publisher.publish(&format!("push.user.{user}"), &format!(r#"{{"round":"{round}"}}"#)).await;
        expected.get_mut(user).unwrap().push(seq);
    }
    let seq = publisher.publish("push.all", &format!(r#"{{"round":"{round}","all":true}}"#)).await;
    for seqs in expected.values_mut() {
        seqs.push(seq);
    }
}

/// Reads live messages until `client` has everything it is owed, and checks it got exactly that.
async fn receive_live(client: &mut Client, expected: &BTreeMap<String, Vec<u64>>) {
    let owed = &expected[&client.user];
    let missing = owed.len().checked_sub(client.seqs.len()).expect("not more than owed");
    let received = client.socket.expect_msgs(missing).await;
    client.seqs.extend(received);
    assert_eq!(&client.seqs, owed, "{} on {}: every message once, in order", client.user, client.node);
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// Graceful shutdown: sockets are closed with 1012.
    Shutdown,
    /// As a crash: the sockets just end (nginx closes the client's side).
    Kill,
}

async fn clients_move_to_the_other_gateway_through_nginx(stop: Stop) {
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let a = proxied_gateway(&nats, "gw-a").await;
    let b = proxied_gateway(&nats, "gw-b").await;
    let nginx = TestNginx::start(&[a.addr, b.addr]).await;

    // Six clients through nginx, spread over both gateways by its round robin.
    let mut clients = Vec::new();
    let mut expected = BTreeMap::new();
    for i in 0..6 {
        let user = format!("px{i}");
        let (socket, node) = connect(&nginx, &user, None).await;
        expected.insert(user.clone(), Vec::new());
        clients.push(Client { user, socket, node, seqs: Vec::new() });
    }
    let on = |node: &str, clients: &[Client]| clients.iter().filter(|c| c.node == node).count();
    assert!(
        on("gw-a", &clients) > 0 && on("gw-b", &clients) > 0,
        "nginx spreads clients over both gateways: {:?}\n{}",
        clients.iter().map(|c| (&c.user, &c.node)).collect::<Vec<_>>(),
        nginx.logs()
    );
    assert_eq!(on("gw-a", &clients) + on("gw-b", &clients), clients.len());

    publish_round(&publisher, &mut expected, "before").await;
    for client in &mut clients {
        receive_live(client, &expected).await;
    }

    // gw-a stops; its clients see their sockets end through nginx.
    let (mut moving, mut staying): (Vec<Client>, Vec<Client>) = clients.into_iter().partition(|c| c.node == "gw-a");
    let closes = futures::future::join_all(moving.iter_mut().map(|c| c.socket.expect_close()));
    let stopped = async {
        match stop {
            Stop::Shutdown => a.shutdown().await,
            Stop::Kill => a.kill().await,
        }
    };
    let (closes, ()) = tokio::join!(closes, stopped);
    for (client, close) in moving.iter().zip(closes) {
        let code = close.map(|(code, _)| code);
        match stop {
            Stop::Shutdown => assert_eq!(code, Some(close_code::RESTART), "{}: gw-a restarting", client.user),
            Stop::Kill => assert_eq!(code, None, "{}: the socket just ends", client.user),
        }
    }

    // Published while those clients are away: the others receive it live.
    publish_round(&publisher, &mut expected, "while away").await;
    for client in &mut staying {
        receive_live(client, &expected).await;
    }

    // They reconnect through nginx with their last seq, land on gw-b and get exactly what they missed.
    for client in &mut moving {
        let since = *client.seqs.last().expect("received messages before the stop");
        let (socket, node) = connect(&nginx, &client.user, Some(since)).await;
        assert_eq!(node, "gw-b", "{}: nginx sends the reconnect to the gateway still running", client.user);
        client.socket = socket;
        client.node = node;
        let mut replayed = Vec::new();
        let summary = loop {
            match client.socket.next_frame().await {
                ServerFrame::Msg(msg) => replayed.push(msg.seq),
                ServerFrame::Replayed { from, to, count, complete, topic } => break (from, to, count, complete, topic),
                other => panic!("{}: expected replayed messages, got {other:?}", client.user),
            }
        };
        let owed = &expected[&client.user];
        let missed: Vec<u64> = owed.iter().copied().filter(|&seq| seq > since).collect();
        assert_eq!(replayed, missed, "{}: the messages published while away, each once, in order", client.user);
        assert_eq!(summary, (since + 1, *missed.last().unwrap(), missed.len() as u64, true, None), "{}", client.user);
        client.seqs.extend(replayed);
    }

    // Live again, all on gw-b: the full histories are exact.
    b.wait_metric("herald_gateway_connections", 6.0).await;
    publish_round(&publisher, &mut expected, "after").await;
    for client in moving.iter_mut().chain(staying.iter_mut()) {
        receive_live(client, &expected).await;
        assert_eq!(client.seqs.len(), 3 * 2, "{}: three rounds of one own message and one for all", client.user);
    }
}

#[tokio::test]
async fn clients_resume_on_the_other_gateway_through_nginx_when_one_shuts_down() {
    if nginx::available("clients_resume_on_the_other_gateway_through_nginx_when_one_shuts_down") {
        clients_move_to_the_other_gateway_through_nginx(Stop::Shutdown).await;
    }
}

#[tokio::test]
async fn clients_resume_on_the_other_gateway_through_nginx_when_one_is_killed() {
    if nginx::available("clients_resume_on_the_other_gateway_through_nginx_when_one_is_killed") {
        clients_move_to_the_other_gateway_through_nginx(Stop::Kill).await;
    }
}

/// Opens a WebSocket through nginx from the local address `source` (any of 127.0.0.0/8), with extra
/// headers: the open socket once its `welcome` arrived, or the HTTP refusal's status and body.
async fn connect_from(
    source: Ipv4Addr,
    nginx: &TestNginx,
    user: &str,
    headers: &[(&str, &str)],
) -> Result<WebSocketStream<TcpStream>, (u16, Value)> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.into(), 0)).unwrap_or_else(|e| panic!("bind {source}: {e}"));
    let stream = socket.connect(nginx.addr).await.expect("connect to nginx");
    let mut request = nginx.ws_url(&format!("token={}", token(user))).into_client_request().unwrap();
    for (name, value) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    let mut socket = match tokio_tungstenite::client_async(request, stream).await {
        Ok((socket, _)) => socket,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap_or(Value::Null);
            return Err((response.status().as_u16(), body));
        }
        Err(other) => panic!("{user} from {source}: {other}\n{}", nginx.logs()),
    };
    let first = tokio::time::timeout(FRAME_TIMEOUT, socket.next()).await.expect("a frame in time");
    match first {
        Some(Ok(Message::Text(text))) => {
            let frame: ServerFrame = serde_json::from_str(&text).unwrap();
            assert!(matches!(frame, ServerFrame::Welcome { .. }), "{user}: expected welcome, got {frame:?}");
        }
        other => panic!("{user}: expected welcome, got {other:?}"),
    }
    Ok(socket)
}

/// A refusal for too many connections from `address`, as the gateway words it.
fn assert_too_many_from<T>(result: Result<T, (u16, Value)>, address: &str) {
    let Err((status, body)) = result else { panic!("expected 429 for {address}, the socket was accepted") };
    assert_eq!((status, body["error"].as_str()), (429, Some("too_many_connections")), "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.ends_with(&format!(" {address}")), "the gateway counted the socket for {address}: {body}");
}

#[tokio::test]
async fn gateways_take_the_client_address_from_nginx_only_when_they_trust_it() {
    if !nginx::available("gateways_take_the_client_address_from_nginx_only_when_they_trust_it") {
        return;
    }
    let nats = TestNats::start().await;
    let client_a = Ipv4Addr::new(127, 0, 0, 2);
    let client_b = Ipv4Addr::new(127, 0, 0, 3);

    // Trusting nginx: one socket per client address, the address nginx saw.
    let trusting = TestGateway::start_with(&nats, |c| {
        c.max_connections_per_address = 1;
        c.trusted_proxies = vec![NGINX_ADDRESS];
    })
    .await;
    let nginx = TestNginx::start(&[trusting.addr]).await;

    // The other paths go through as well; /metrics is not published.
    let http = reqwest::Client::new();
    for (path, status, contains) in [
        ("/healthz", 200, r#""ok":true"#),
        ("/readyz", 200, r#""ready":true"#),
        ("/", 200, "<title>Herald demo</title>"),
        ("/herald.js", 200, "export class HeraldError"),
        ("/metrics", 404, ""),
        ("/ws", 426, "upgrade_required"),
    ] {
        let response = http.get(nginx.http_url(path)).send().await.expect("nginx answers");
        let got = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        assert!(got == status && body.contains(contains), "GET {path} through nginx: {got} {body}");
    }

    let _first = connect_from(client_a, &nginx, "t1", &[]).await.expect("127.0.0.2's first socket");
    let _other = connect_from(client_b, &nginx, "t2", &[]).await.expect("127.0.0.3's first socket (its own address)");
    assert_too_many_from(connect_from(client_a, &nginx, "t3", &[]).await, "127.0.0.2");
    // A forged X-Forwarded-For gains nothing: nginx appends the address it saw, which the gateway takes.
    assert_too_many_from(
        connect_from(client_b, &nginx, "t4", &[("X-Forwarded-For", "203.0.113.7")]).await,
        "127.0.0.3",
    );

    // Not trusting nginx: every socket through it is nginx's own.
    let untrusting = TestGateway::start_with(&nats, |c| c.max_connections_per_address = 1).await;
    let nginx = TestNginx::start(&[untrusting.addr]).await;
    let _first = connect_from(client_a, &nginx, "u1", &[]).await.expect("the first socket through nginx");
    assert_too_many_from(connect_from(client_b, &nginx, "u2", &[]).await, &NGINX_ADDRESS.to_string());
}

/// STOMP (an upgrade at /stomp, and over SockJS at /stomp/info and /stomp/<server>/<session>/websocket) and
/// Server-Sent Events (a long response at /sse) go through the sample as /ws does: delivered as they come,
/// not buffered.
#[tokio::test]
async fn stomp_and_sse_go_through_nginx() {
    if !nginx::available("stomp_and_sse_go_through_nginx") {
        return;
    }
    let nats = TestNats::start().await;
    let publisher = Publisher::new(&nats).await;
    let gateway = proxied_gateway(&nats, "gw-a").await;
    let nginx = TestNginx::start(&[gateway.addr]).await;

    let stomp_url = nginx.http_url("/stomp").replacen("http", "ws", 1);
    let mut stomp = herald_tests::stomp::StompClient::connect(&stomp_url, &[("passcode", &token("pia"))]).await;
    stomp.expect("CONNECTED").await;
    stomp.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/q"), ("receipt", "r")], "").await;
    stomp.expect("RECEIPT").await;
    let info = reqwest::get(nginx.http_url("/stomp/info")).await.unwrap();
    assert_eq!(info.status(), 200);
    assert_eq!(info.json::<serde_json::Value>().await.unwrap()["websocket"], true);
    let sockjs_url = nginx.http_url("/stomp/000/proxied/websocket").replacen("http", "ws", 1);
    let mut sockjs = herald_tests::stomp::StompClient::connect_sockjs(
        &sockjs_url,
        &[("passcode", &token("pia")), ("herald-device", "sockjs")],
    )
    .await;
    sockjs.expect("CONNECTED").await;
    sockjs.send_frame("SUBSCRIBE", &[("id", "q"), ("destination", "/user/queue/q"), ("receipt", "r")], "").await;
    sockjs.expect("RECEIPT").await;
    let sse_url = nginx.http_url(&format!("/sse?token={}&device=web", token("pia")));
    let mut sse = herald_tests::sse::SseClient::open(&sse_url, &[]).await.expect("the stream through nginx");
    assert_eq!(sse.next_event().await.event, "welcome");

    let seq = publisher.publish("push.user.pia", r#"{"n":1}"#).await;
    let message = stomp.expect("MESSAGE").await;
    assert_eq!((message.header("message-id"), message.body.as_str()), (seq.to_string().as_str(), r#"{"n":1}"#));
    let event = sse.next_event().await;
    assert_eq!((event.id, event.data.as_str()), (Some(seq.to_string()), r#"{"n":1}"#));
    let message = sockjs.expect("MESSAGE").await;
    assert_eq!((message.header("message-id"), message.body.as_str()), (seq.to_string().as_str(), r#"{"n":1}"#));
}

/// Socket.IO's long-polling sessions live in one gateway: the sample routes `/socket.io/` to a sticky
/// upstream, so a polling client and one that polls then upgrades (python-socketio's default) keep
/// reaching the gateway that holds their session, and get everything.
#[tokio::test]
async fn socket_io_polling_and_its_upgrade_stick_to_one_gateway_through_nginx() {
    if !nginx::available("socket_io_polling_and_its_upgrade_stick_to_one_gateway_through_nginx") {
        return;
    }
    let Some(python) = herald_tests::sdk::python() else { return };
    let nats = TestNats::start().await;
    let (one, two) = (proxied_gateway(&nats, "one").await, proxied_gateway(&nats, "two").await);
    let nginx = TestNginx::start(&[one.addr, two.addr]).await;
    let publisher = Publisher::new(&nats).await;
    let mut clients = Vec::new();
    for transports in [serde_json::json!(["polling"]), Value::Null] {
        let mut sdk = herald_tests::sdk::SdkClient::start(&python, "socketio_client.py");
        let url = nginx.http_url("");
        sdk.send(serde_json::json!({"op": "connect", "url": url, "token": token("sio-n"), "transports": transports}))
            .await;
        let connected = sdk.wait_for("connected", |e| e["event"] == "connected" || e["event"] == "error").await;
        assert_eq!(connected["event"], "connected", "{connected}\n{}", nginx.logs());
        clients.push(sdk);
    }
    let mut published = Vec::new();
    for n in 0..20 {
        published.push(publisher.publish(["push.user.sio-n", "push.all"][n % 2], &n.to_string()).await);
    }
    for sdk in &clients {
        let seqs: Vec<u64> =
            sdk.wait_count("event", 20).await.iter().map(|e| e["args"][1]["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, published);
        assert!(sdk.named("disconnected").is_empty(), "{:?}", sdk.events());
    }
}

/// A SockJS session over HTTP requests (XHR streaming, EventSource, XHR polling) lives in one
/// gateway: the sample hashes the session's path, so every request of a session, each poll and each
/// `xhr_send`, reaches that gateway (round robin would send every other one to a gateway without the
/// session: 404, or a poll that opens a second session).
#[tokio::test]
async fn sockjs_sessions_over_http_requests_reach_their_gateway_through_nginx() {
    if !nginx::available("sockjs_sessions_over_http_requests_reach_their_gateway_through_nginx") {
        return;
    }
    let nats = TestNats::start().await;
    let (one, two) = (proxied_gateway(&nats, "one").await, proxied_gateway(&nats, "two").await);
    let nginx = TestNginx::start(&[one.addr, two.addr]).await;
    let publisher = Publisher::new(&nats).await;
    let mut clients = Vec::new();
    let receivers = [Receiver::XhrStreaming, Receiver::XhrStreaming, Receiver::EventSource, Receiver::XhrPolling];
    for (session, receiver) in ["xa", "xb", "xc", "xd"].into_iter().zip(receivers) {
        let base = nginx.http_url(&format!("/stomp/000/{session}"));
        let mut client = herald_tests::stomp::StompClient::connect_xhr(
            &base,
            receiver,
            &[("passcode", &token("xia")), ("herald-device", session)],
        )
        .await;
        client.expect("CONNECTED").await;
        // Three sends, each answered on the stream.
        let sends = [
            ("SUBSCRIBE", [("id", "0"), ("destination", "/topic/all"), ("receipt", "r0")]),
            ("UNSUBSCRIBE", [("id", "0"), ("destination", "/topic/all"), ("receipt", "r1")]),
            ("SUBSCRIBE", [("id", "1"), ("destination", "/user/queue/q"), ("receipt", "r2")]),
        ];
        for (command, headers) in sends {
            client.send_frame(command, &headers, "").await;
            assert_eq!(client.expect("RECEIPT").await.header("receipt-id"), headers[2].1);
        }
        clients.push(client);
    }
    let seq = publisher.publish("push.user.xia", "1").await;
    for client in &mut clients {
        assert_eq!(client.expect("MESSAGE").await.header("message-id"), seq.to_string());
    }
}

/// A gateway that drains while a SockJS session over HTTP requests is open keeps its listener for
/// that session's requests and answers anything else 503: nginx passes those to the other gateway.
#[tokio::test]
async fn requests_reach_the_other_gateway_through_nginx_while_one_drains_a_sockjs_session() {
    if !nginx::available("requests_reach_the_other_gateway_through_nginx_while_one_drains_a_sockjs_session") {
        return;
    }
    let nats = TestNats::start().await;
    let (draining, running) = (proxied_gateway(&nats, "draining").await, proxied_gateway(&nats, "running").await);
    let nginx = TestNginx::start(&[draining.addr, running.addr]).await;
    // Between two polls: its session stays open for the next one after the gateway closed it.
    let base = draining.http_url("/stomp/000/held");
    let mut held = StompClient::connect_xhr(&base, Receiver::XhrPolling, &[("passcode", &token("hal"))]).await;
    held.expect("CONNECTED").await;
    let mut watcher = draining.connect("watcher").await;

    draining.begin_shutdown();
    assert_eq!(watcher.expect_close().await.map(|c| c.0), Some(close_code::RESTART));
    let direct = reqwest::get(draining.http_url("/herald.js")).await.expect("answered while draining");
    assert_eq!(direct.status(), 503);
    let http = reqwest::Client::new();
    for path in ["/", "/herald.js", "/healthz", "/readyz", "/socket.io/?EIO=4&transport=polling"] {
        for _ in 0..2 {
            let response = http.get(nginx.http_url(path)).send().await.expect("answered through nginx");
            assert_eq!(response.status(), 200, "{path} through nginx\n{}", nginx.logs());
        }
    }
    held.drop_http_connections();
    assert_eq!(held.next_event().await, StompEvent::Close(Some((1012, "gateway restarting".into()))));
}
