//! A NATS node dies under load: three NATS nodes (the stream and buckets at three replicas), two
//! gateways, publishers that retry until acknowledged, clients that stay connected or come back
//! later. The node killed holds one gateway's delivery connection and leads the stream. Every client
//! must get exactly the messages addressed to it, each once, in order; the stream must hold each
//! published message once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use herald_shared::frame::{ServerFrame, close_code};
use herald_tests::gateway::{token, token_with};
use herald_tests::nats::Role;
use herald_tests::ws::{Event, FRAME_TIMEOUT};
use herald_tests::{TestCluster, TestGateway, WsClient, eventually};
use tokio::sync::watch;

/// Users connected all along, and one that connects only after everything was published.
const ONLINE: [&str; 3] = ["k0", "k1", "k2"];
const OFFLINE: &str = "k3";
const TOTAL: usize = 3_000;
/// Publish retries (all publishers together) that mean the cluster is not coming back.
const MAX_RETRIES: usize = 600;
/// Silence on a client's socket that means something is stuck (messages come every millisecond or
/// so until all are published, and the test knows when a client has them all).
const SILENCE: Duration = Duration::from_secs(45);

/// What was published and stored: message number → (stream sequence, the user it was for, or None
/// for `push.all`).
type Stored = Arc<Mutex<HashMap<usize, (u64, Option<usize>)>>>;

/// (seq, message id) of the messages one user got or should get, in order.
type Messages = Vec<(u64, String)>;

/// Every user's expected messages, once everything was published.
type Expected = watch::Receiver<Option<Vec<Messages>>>;

/// One cluster at a time: three nodes and two gateways load the machine enough.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_nats_node_that_leads_the_stream_loses_and_duplicates_nothing() {
    let _alone = ONE_CLUSTER.lock().await;
    tokio::time::timeout(Duration::from_secs(300), run()).await.expect("the cluster test finished in time");
}

async fn run() {
    let cluster = TestCluster::start().await;
    let replicated = |config: &mut herald_gateway::Config| config.stream.stream_replicas = 3;
    let gateway_a = TestGateway::start_on(&cluster.url(), replicated).await;
    let gateway_b = TestGateway::start_on(&cluster.url(), replicated).await;
    let urls = [gateway_a.ws_url(""), gateway_b.ws_url("")];

    let admin = jetstream::new(cluster.client().await.expect("connect to the cluster"));
    let victim = victim(&cluster, &admin, &gateway_a).await;

    let (expected_tx, expected_rx) = watch::channel::<Option<Vec<Messages>>>(None);
    let clients: Vec<_> = (0..ONLINE.len())
        .map(|index| tokio::spawn(client(ONLINE[index], index, urls.clone(), index, expected_rx.clone())))
        .collect();

    let stored: Stored = Arc::default();
    let publisher = jetstream::new(cluster.client_as(Role::Publisher).await.expect("connect as publisher"));
    let publishers: Vec<_> =
        (0..2).map(|half| tokio::spawn(publish_half(publisher.clone(), half, stored.clone()))).collect();

    eventually("a third of the messages stored", Duration::from_secs(120), || async {
        (stored.lock().unwrap().len() >= TOTAL / 3).then_some(())
    })
    .await;
    cluster.kill(&victim).await;

    let mut retries = 0;
    for publisher in publishers {
        retries += publisher.await.unwrap();
    }
    let stored = stored.lock().unwrap().clone();
    assert_eq!(stored.len(), TOTAL, "every message acknowledged");
    let mut seqs: Vec<u64> = stored.values().map(|(seq, _)| *seq).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), TOTAL, "every message has its own sequence");

    let info = admin.get_stream("HERALD").await.expect("the stream").info().await.expect("stream info").clone();
    assert_eq!(info.state.messages, TOTAL as u64, "the stream holds each message once ({retries} retried publishes)");
    let leader = info.cluster.and_then(|cluster| cluster.leader);
    assert!(leader.is_some_and(|leader| leader != victim), "a surviving node leads the stream");

    // The premise: gateway A lost its delivery connection with the node and repaired its sessions
    // (once that connection is back, which may be after the last publish).
    let repairs = eventually("gateway A noticed the lost node", Duration::from_secs(60), || async {
        let repairs = gateway_a.metric("herald_gateway_repairs_total").await;
        (repairs >= 1.0).then_some(repairs)
    })
    .await;
    eprintln!("killed {victim}; {retries} publishes retried; gateway A repaired {repairs} sessions");
    let users = ONLINE.len() + 1;
    let expected: Vec<Messages> = (0..users).map(|user| addressed_to(&stored, user)).collect();
    expected_tx.send(Some(expected.clone())).unwrap();
    for (index, handle) in clients.into_iter().enumerate() {
        let received = handle.await.unwrap();
        assert_eq!(received.len(), expected[index].len(), "{}: count", ONLINE[index]);
        assert_eq!(received, expected[index], "{}: the full sequence", ONLINE[index]);
    }

    // The user who was away the whole time replays everything from the surviving replicas.
    let offline = ONLINE.len();
    let received = client(OFFLINE, offline, urls, 1, expected_rx).await;
    assert_eq!(received, expected[offline], "{OFFLINE}: the full sequence, replayed");
}

/// The node to kill: the one holding gateway A's delivery connection, made the stream's leader.
async fn victim(cluster: &TestCluster, admin: &jetstream::Context, gateway: &TestGateway) -> String {
    let connection = format!("herald-gateway {} delivery", gateway.config.node_id);
    let victim = eventually("the node of gateway A's delivery connection", Duration::from_secs(30), || {
        cluster.node_of_connection(&connection)
    })
    .await;
    // A step-down request naming the preferred new leader (nats-server 2.11 and later).
    let preferred = serde_json::json!({ "placement": { "preferred": victim } });
    eventually(&format!("{victim} leads the stream"), Duration::from_secs(60), || async {
        let info = admin.get_stream("HERALD").await.ok()?.info().await.ok()?.clone();
        let leader = info.cluster.and_then(|cluster| cluster.leader)?;
        if leader == victim {
            return Some(());
        }
        let _ = admin.request::<_, _, serde_json::Value>("STREAM.LEADER.STEPDOWN.HERALD", &preferred).await;
        None
    })
    .await;
    victim
}

/// Publishes every other message (from `half`), each until acknowledged, as a backend with retries
/// does: a publish whose acknowledgement is lost is sent again with the same `Nats-Msg-Id`.
/// Returns how many publishes were retried.
async fn publish_half(js: jetstream::Context, half: usize, stored: Stored) -> usize {
    let mut retries = 0;
    for n in (half..TOTAL).step_by(2) {
        let audience = if n % 7 == 0 { None } else { Some(n % (ONLINE.len() + 1)) };
        let subject = match audience {
            None => "push.all".to_string(),
            Some(user) => format!("push.user.{}", user_name(user)),
        };
        loop {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", message_id(n).as_str());
            let body = format!("{{\"n\":{n}}}").into();
            let acked = match js.publish_with_headers(subject.clone(), headers, body).await {
                Ok(ack) => ack.await.ok(),
                Err(_) => None,
            };
            if let Some(ack) = acked {
                stored.lock().unwrap().insert(n, (ack.sequence, audience));
                break;
            }
            retries += 1;
            assert!(retries < MAX_RETRIES, "message {n}: still not acknowledged after {retries} retries in all");
            // Backing off between attempts, as a real publisher does, while the stream elects a leader.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    retries
}

fn user_name(index: usize) -> &'static str {
    ONLINE.get(index).copied().unwrap_or(OFFLINE)
}

fn message_id(n: usize) -> String {
    format!("m-{n}")
}

/// (seq, message id) of everything addressed to `user`, in stream order.
fn addressed_to(stored: &HashMap<usize, (u64, Option<usize>)>, user: usize) -> Messages {
    let mut messages: Messages = stored
        .iter()
        .filter(|(_, (_, to))| to.is_none_or(|to| to == user))
        .map(|(n, (seq, _))| (*seq, message_id(*n)))
        .collect();
    messages.sort();
    messages
}

/// Stays connected, reading; on any close resumes with `since` on the other gateway; returns when
/// it has as many messages as expected of it.
async fn client(user: &str, index: usize, urls: [String; 2], first: usize, mut expected: Expected) -> Messages {
    let mut received: Messages = Vec::new();
    let done = |received: &Messages, expected: &Expected| {
        expected.borrow().as_ref().is_some_and(|all| received.len() >= all[index].len())
    };
    let mut attempt = first;
    while !done(&received, &expected) {
        let since = received.last().map_or(0, |(seq, _)| *seq);
        let url = format!("{}token={}&since={since}", urls[attempt % 2], token(user));
        attempt += 1;
        let Ok(mut socket) = WsClient::try_connect(&url).await else { continue };
        while !done(&received, &expected) {
            let event = tokio::select! {
                event = tokio::time::timeout(SILENCE, socket.recv()) => event.unwrap_or_else(|_| {
                    panic!("{user}: nothing for {SILENCE:?} with {} messages, the last {:?}", received.len(), received.last())
                }),
                _ = expected.changed() => continue,
            };
            match event {
                Event::Frame(ServerFrame::Msg(msg)) => {
                    assert!(
                        received.last().is_none_or(|(last, _)| msg.seq > *last),
                        "{user}: {} out of order",
                        msg.seq
                    );
                    received.push((msg.seq, msg.id));
                }
                Event::Frame(frame @ ServerFrame::Replayed { .. }) => {
                    assert!(
                        matches!(frame, ServerFrame::Replayed { complete: true, .. }),
                        "{user}: incomplete replay {frame:?} after {:?}",
                        received.last()
                    )
                }
                Event::Frame(ServerFrame::Welcome { .. }) => {}
                Event::Frame(other) => panic!("{user}: unexpected {other:?}"),
                Event::Close(_) => break,
            }
        }
    }
    received
}

/// A fresh cluster started together with its gateways, as a compose file or an orchestrator does:
/// the gateways come up while JetStream has no leader yet (one node of three), so nothing can be
/// created; once the other nodes are up, they create the stream and every bucket and become ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_started_before_jetstream_has_a_leader_create_everything_once_it_has_one() {
    let _alone = ONE_CLUSTER.lock().await;
    let cluster = TestCluster::start().await;
    let names = cluster.names();
    cluster.kill(&names[1]).await;
    cluster.kill(&names[2]).await;
    let replicated = |c: &mut herald_gateway::Config| c.stream.stream_replicas = 3;
    let gateways = [
        TestGateway::start_unready(&cluster.url(), replicated).await,
        TestGateway::start_unready(&cluster.url(), replicated).await,
    ];
    for gateway in &gateways {
        assert_eq!(gateway.readyz().await, 503);
    }

    cluster.restart(&names[1]).await;
    cluster.restart(&names[2]).await;
    for gateway in &gateways {
        eventually("readyz 200", Duration::from_secs(120), || async { (gateway.readyz().await == 200).then_some(()) })
            .await;
    }
    let js = jetstream::new(cluster.client().await.expect("a node answers"));
    assert_eq!(js.get_stream("HERALD").await.unwrap().cached_info().config.num_replicas, 3);
    for bucket in herald_shared::subject::BUCKETS {
        let store = js.get_key_value(bucket).await.unwrap_or_else(|e| panic!("{bucket}: {e}"));
        assert_eq!(store.status().await.unwrap().info.config.num_replicas, 3, "{bucket}");
    }

    let mut clients = Vec::new();
    for (gateway, device) in gateways.iter().zip(["phone", "laptop"]) {
        clients.push(gateway.connect_with(&format!("token={}&device={device}", token("early"))).await);
    }
    let publisher = jetstream::new(cluster.client_as(Role::Publisher).await.expect("a node answers"));
    let seq = publisher.publish("push.user.early", "up".into()).await.unwrap().await.unwrap().sequence;
    for client in &mut clients {
        assert_eq!(client.expect_msg().await.seq, seq);
    }
}

/// A cluster that lost its quorum (two nodes of three gone) has a stream no server leads: nothing
/// can be stored or read, and connections would only open to close with 1013. The gateway on the
/// node left says it is not ready, and is ready again once the nodes are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_stream_has_no_leader_is_not_ready() {
    let _alone = ONE_CLUSTER.lock().await;
    let cluster = TestCluster::start().await;
    let [kept, gone @ ..] = <[String; 3]>::try_from(cluster.names()).expect("three nodes");
    let replicated = |config: &mut herald_gateway::Config| config.stream.stream_replicas = 3;
    let gateway = TestGateway::start_on(&cluster.node_url(&kept), replicated).await;
    assert_eq!(gateway.readyz().await, 200);
    for node in &gone {
        cluster.kill(node).await;
    }
    // Said as such: a question that times out would say "does not answer", and only after it did.
    let leaderless = || async {
        let problems = gateway.readyz_problems().await;
        problems.iter().any(|problem| problem == "stream HERALD or a KV bucket has no leader").then_some(())
    };
    eventually("readyz: no leader", Duration::from_secs(60), leaderless).await;
    assert_eq!(gateway.readyz().await, 503);
    for node in &gone {
        cluster.restart(node).await;
    }
    eventually("readyz 200", Duration::from_secs(120), || async { (gateway.readyz().await == 200).then_some(()) })
        .await;
}

/// A gateway given one node's URL learns the others from NATS, as NATS clients do: when that node
/// dies for good, its delivery connection moves to another node and its sockets go on receiving
/// (a socket closed meanwhile resumes, as clients do; what comes after that must arrive live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_given_one_node_delivers_through_the_others_once_that_node_dies() {
    let _alone = ONE_CLUSTER.lock().await;
    let cluster = TestCluster::start().await;
    let seed = cluster.names().remove(0);
    let gateway = TestGateway::start_on(&cluster.node_url(&seed), |config| config.stream.stream_replicas = 3).await;
    let publisher = jetstream::new(cluster.client_as(Role::Publisher).await.expect("connect as publisher"));
    let publish = |payload: &'static str| {
        let publisher = publisher.clone();
        eventually("the stream storing a message", Duration::from_secs(60), move || {
            let publisher = publisher.clone();
            async move {
                publisher.publish("push.user.seeded", payload.into()).await.ok()?.await.ok().map(|ack| ack.sequence)
            }
        })
    };
    let mut client = gateway.connect("seeded").await;
    let first = publish("before").await;
    assert_eq!(client.expect_msg().await.seq, first);

    cluster.kill(&seed).await;
    let during = publish("while the seed is gone").await;
    let mut last = first;
    while last < during {
        match tokio::time::timeout(Duration::from_secs(60), client.recv()).await.expect("a frame within 60 s") {
            Event::Frame(ServerFrame::Msg(msg)) => last = msg.seq,
            Event::Frame(_) => {}
            Event::Close(_) => {
                let query = format!("token={}&since={last}", token("seeded"));
                client = eventually("the gateway taking the resume", Duration::from_secs(60), || async {
                    WsClient::try_connect(&gateway.ws_url(&query)).await.ok()
                })
                .await;
            }
        }
    }
    assert_eq!(last, during);
    let after = publish("after").await;
    loop {
        match client.next_event().await {
            Event::Frame(ServerFrame::Msg(msg)) => break assert_eq!(msg.seq, after),
            Event::Frame(_) => {}
            Event::Close(close) => panic!("closed ({close:?}) while the message after was expected"),
        }
    }
}

/// A functions copy or a gateway started without the cluster's `stream_replicas` (1 by default)
/// takes no replica away: the functions do not change the gateways' buckets, and each updates its
/// streams (the gateway `HERALD` and the buckets, the functions their events and dead letters) but
/// never to fewer replicas than they have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_fewer_replicas_takes_none_away() {
    let _alone = ONE_CLUSTER.lock().await;
    let cluster = TestCluster::start().await;
    let _gateway = TestGateway::start_on(&cluster.url(), |c| c.stream.stream_replicas = 3).await;
    let config = |replicas| {
        let mut config = herald_functions::Config::default();
        config.nats.nats_url = cluster.url();
        config.nats.nats_user = Some(Role::Functions.user().into());
        config.nats.nats_password = Some(Role::Functions.password());
        config.metrics_listen = "127.0.0.1:0".parse().unwrap();
        config.stream.stream_replicas = replicas;
        config
    };
    let replicated = herald_functions::start(&config(3)).await.expect("functions start");
    let default = herald_functions::start(&config(1)).await.expect("functions start");
    let _default_gateway = TestGateway::start_on(&cluster.url(), |_| {}).await;
    let js = jetstream::new(cluster.client().await.expect("a node answers"));
    let buckets = herald_shared::subject::BUCKETS.map(|bucket| format!("KV_{bucket}"));
    let streams = buckets.into_iter().chain(["HERALD".into(), config(1).events_stream, config(1).dlq_stream]);
    for stream in streams {
        let info = js.get_stream(&stream).await.unwrap_or_else(|e| panic!("{stream}: {e}"));
        assert_eq!(info.cached_info().config.num_replicas, 3, "{stream}");
    }
    drop((replicated, default));
}

/// A stream leader that fails after storing a message and before republishing it leaves the
/// message stored but never delivered; nothing on its subject says so until the next message of
/// that subject. The gateways follow the stream's leader changes and ask the new leader for the
/// last message of each subject they route: the one behind gets a gap, and only its sessions catch
/// up, so the message arrives, before anything newer. The test stores such a message while the
/// stream does not republish, then moves the stream's leadership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_but_never_republished_arrives_when_the_stream_changes_leader() {
    let _alone = ONE_CLUSTER.lock().await;
    let mut led = Led::start().await;
    let mut bystander = led.gateway.connect_with(&format!("token={}", token("bystander"))).await;
    let first = led.publish("push.user.led", "\"first\"").await;
    assert_eq!(led.client.expect_msg().await.seq, first);
    let unrepublished = led.publish_unrepublished("push.user.led", "\"stored only\"").await;
    led.change_leader().await;

    let repaired = led.client.expect_msg().await;
    assert_eq!((repaired.seq, repaired.data), (unrepublished, serde_json::json!("stored only")));
    let after = led.publish("push.all", "\"after\"").await;
    assert_eq!(led.client.expect_msg().await.seq, after);
    assert_eq!(bystander.expect_msg().await.seq, after);
    // Only the session of the subject behind caught up.
    assert_eq!(led.gateway.metric("herald_gateway_repairs_total").await, 1.0);
    assert_eq!(led.gateway.metric("herald_gateway_delivery_gaps_total").await, 1.0);
}

/// The same, but a newer `push.all` message went out before the leader change (as when the new
/// leader's first messages reach the gateway before its election does): the stored message can no
/// longer be sent in order. The gateway notes the loss and closes with 4008, and the resume reports
/// `complete:false`; without the leader check the client would never learn of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_but_never_republished_behind_a_newer_one_is_reported_when_the_stream_changes_leader() {
    let _alone = ONE_CLUSTER.lock().await;
    let mut led = Led::start().await;
    let first = led.publish("push.user.led", "1").await;
    assert_eq!(led.client.expect_msg().await.seq, first);
    let _lost = led.publish_unrepublished("push.user.led", "2").await;
    let newer = led.publish("push.all", "3").await;
    assert_eq!(led.client.expect_msg().await.seq, newer);
    led.change_leader().await;

    assert_eq!(led.client.expect_close().await.map(|close| close.0), Some(close_code::SLOW_CONSUMER));
    let mut resumed = led.gateway.connect_with(&format!("token={}&since={newer}", token("led"))).await;
    assert!(!resumed.expect_replayed().await.3, "the resume reports the loss");
}

/// A topic's message lost that way is owed only to sessions subscribed before it: one connected
/// before it that subscribed to the topic after it, without `since` (live from then on), goes on,
/// while one subscribed before it is told with 4008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_but_never_republished_is_not_owed_to_a_later_subscription() {
    let _alone = ONE_CLUSTER.lock().await;
    let led = Led::start().await;
    let connect = |user: &str| format!("token={}", token_with(user, &["news"], 3600));
    let mut early = led.gateway.connect_with(&format!("{}&topics=news", connect("early"))).await;
    let mut late = led.gateway.connect_with(&connect("late")).await;
    let first = led.publish("push.topic.news", "1").await;
    assert_eq!(early.expect_msg().await.seq, first);
    let _lost = led.publish_unrepublished("push.topic.news", "2").await;
    let newer = led.publish("push.all", "3").await;
    assert_eq!(early.expect_msg().await.seq, newer);
    assert_eq!(late.expect_msg().await.seq, newer);
    late.send_json(serde_json::json!({"type": "sub", "topic": "news"})).await;
    assert_eq!(late.next_frame().await, ServerFrame::Subscribed { topic: "news".into() });
    led.change_leader().await;

    assert_eq!(early.expect_close().await.map(|close| close.0), Some(close_code::SLOW_CONSUMER));
    let after = led.publish("push.topic.news", "4").await;
    assert_eq!(late.expect_msg().await.seq, after, "the later subscription goes on");
}

/// A gap that could be a loss (a message of the user's missing behind a newer `push.all` one already
/// sent) while the stream has no leader (two of three nodes frozen, as a partition cuts them off) for
/// longer than a join waits: the gateway keeps asking the stream's leader whether a message of the
/// user's is stored there, and goes on when it learns that none is, instead of assuming a loss and
/// closing with 4008 (a loss reported for nothing has the client reload its state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_check_outwaits_a_stream_without_a_leader_instead_of_reporting_a_loss() {
    /// Longer than the gateway kept asking before (5 s of retries after a first question that waits
    /// up to 5 s for its answer).
    const LEADERLESS: Duration = Duration::from_secs(12);
    let _alone = ONE_CLUSTER.lock().await;
    let cluster = TestCluster::start().await;
    let [kept, frozen @ ..] = <[String; 3]>::try_from(cluster.names()).expect("three nodes");
    let replicated = |config: &mut herald_gateway::Config| config.stream.stream_replicas = 3;
    let gateway = TestGateway::start_on(&cluster.node_url(&kept), replicated).await;
    let mut client = gateway.connect_with(&format!("token={}", token("gap"))).await;
    let publisher = jetstream::new(cluster.client_as(Role::Publisher).await.expect("connect as publisher"));
    let publish = |subject: &'static str| {
        let publisher = publisher.clone();
        async move { publisher.publish(subject, "1".into()).await.unwrap().await.unwrap().sequence }
    };
    let first = publish("push.user.gap").await;
    let second = publish("push.all").await;
    assert_eq!(client.expect_msgs(2).await, vec![first, second]);

    // The kept node must not lead the stream, or it would answer from its store for a while.
    let admin = cluster.client_of(&kept).await.expect("connect to the kept node");
    lead_elsewhere(&jetstream::new(admin.clone()), &kept).await;
    let mut questions = admin.subscribe("$JS.API.STREAM.MSG.GET.HERALD").await.unwrap();
    admin.flush().await.unwrap();
    for node in &frozen {
        cluster.pause(node).await;
    }
    // The user's next message names push.all's `second` as its predecessor, as in repair.rs.
    forge_until_asked(&admin, &mut questions, "herald.deliver.user.gap", second + 1, second).await;
    let first_question = tokio::time::Instant::now();
    let still_asking = tokio::time::timeout(LEADERLESS + FRAME_TIMEOUT, async {
        while questions.next().await.is_some() {
            if first_question.elapsed() >= LEADERLESS {
                return;
            }
        }
    });
    still_asking.await.expect("the gateway still asks the stream's leader 12 s after its first question");
    for node in &frozen {
        cluster.unpause(node).await;
    }

    assert_eq!(client.expect_msg().await.seq, second + 1);
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 0.0);
    assert_eq!(gateway.metric("herald_gateway_connections").await, 1.0);
}

/// A client that leaves while the gateway asks the stream's leader whether a message it missed is
/// stored (the stream has no leader: two of three nodes frozen): the question goes on without the
/// connection, and the loss it finds (the message is stored, behind a newer one already sent) is
/// noted, so the client's resume is told (`complete:false`) instead of skipping it in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_check_goes_on_after_its_client_leaves_and_the_resume_is_told_of_the_loss() {
    let _alone = ONE_CLUSTER.lock().await;
    let cluster = TestCluster::start().await;
    let [kept, frozen @ ..] = <[String; 3]>::try_from(cluster.names()).expect("three nodes");
    let replicated = |config: &mut herald_gateway::Config| config.stream.stream_replicas = 3;
    let gateway = TestGateway::start_on(&cluster.node_url(&kept), replicated).await;
    let nats = cluster.client_of(&kept).await.expect("connect to the kept node");
    let admin = jetstream::new(nats.clone());
    // The kept node must not lead the stream, or it would answer from its store for a while. Before
    // the user has a route: the gateway asks a new leader what each routed subject stores, and
    // would find the message below as soon as it is stored.
    lead_elsewhere(&admin, &kept).await;
    let mut client = gateway.connect_with(&format!("token={}", token("gone"))).await;
    let publisher = jetstream::new(cluster.client_as(Role::Publisher).await.expect("connect as publisher"));
    let publish = |subject: &'static str| {
        let publisher = publisher.clone();
        async move { publisher.publish(subject, "1".into()).await.unwrap().await.unwrap().sequence }
    };
    let first = publish("push.user.gone").await;
    assert_eq!(client.expect_msg().await.seq, first);
    // Stored, never delivered: the stream does not republish it.
    let config = admin.get_stream("HERALD").await.unwrap().info().await.unwrap().config.clone();
    admin.update_stream(jetstream::stream::Config { republish: None, ..config.clone() }).await.unwrap();
    let missed = publish("push.user.gone").await;
    admin.update_stream(config).await.unwrap();
    let newer = publish("push.all").await;
    assert_eq!(client.expect_msg().await.seq, newer);

    let mut questions = nats.subscribe("$JS.API.STREAM.MSG.GET.HERALD").await.unwrap();
    nats.flush().await.unwrap();
    for node in &frozen {
        cluster.pause(node).await;
    }
    // The user's next message names `missed` as its predecessor: behind `newer`, already sent.
    forge_until_asked(&nats, &mut questions, "herald.deliver.user.gone", newer + 1, missed).await;
    drop(client);
    eventually("the session ended", Duration::from_secs(60), || async {
        (gateway.metric("herald_gateway_users").await == 0.0).then_some(())
    })
    .await;
    for node in &frozen {
        cluster.unpause(node).await;
    }

    let cursors = admin.get_key_value("herald-cursors").await.expect("the cursors bucket");
    let note = eventually("the loss noted", Duration::from_secs(60), || async {
        cursors.get("gone.default.lost").await.ok().flatten()
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&note), missed.to_string());
    let mut resumed = gateway.connect_with(&format!("token={}&since={newer}", token("gone"))).await;
    let (.., complete, _) = resumed.expect_replayed().await;
    assert!(!complete, "the resume reports the loss of {missed}");
    assert_eq!(gateway.metric("herald_gateway_unrepairable_gaps_total").await, 1.0);
    assert_eq!(gateway.metric("herald_gateway_losses_assumed_total").await, 0.0, "the leader's answer found it");
}

/// Delivers a forged message `seq` naming `last` as its subject's predecessor on `subject` until
/// the gateway asks the stream's leader about it (`questions`). Sent again if no question comes:
/// a gateway whose delivery connection is moving (its node's stream has no leader) misses what
/// comes meanwhile, and a copy that did arrive is a duplicate it drops.
async fn forge_until_asked(
    nats: &async_nats::Client,
    questions: &mut async_nats::Subscriber,
    subject: &'static str,
    seq: u64,
    last: u64,
) {
    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    loop {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Sequence", seq.to_string().as_str());
        headers.insert("Nats-Last-Sequence", last.to_string().as_str());
        headers.insert("Nats-Time-Stamp", "2026-01-01T00:00:00Z");
        nats.publish_with_headers(subject, headers, "3".into()).await.unwrap();
        nats.flush().await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), questions.next()).await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway never asked the stream's leader");
    }
}

/// A gateway on a three-node cluster, user `led` connected, and the test's NATS clients.
struct Led {
    cluster: TestCluster,
    gateway: TestGateway,
    client: WsClient,
    publisher: jetstream::Context,
    admin: jetstream::Context,
}

impl Led {
    async fn start() -> Led {
        let cluster = TestCluster::start().await;
        let replicated = |config: &mut herald_gateway::Config| config.stream.stream_replicas = 3;
        let gateway = TestGateway::start_on(&cluster.url(), replicated).await;
        let client = gateway.connect_with(&format!("token={}", token("led"))).await;
        let publisher = jetstream::new(cluster.client_as(Role::Publisher).await.expect("connect as publisher"));
        let admin = jetstream::new(cluster.client().await.expect("connect to the cluster"));
        Led { cluster, gateway, client, publisher, admin }
    }

    async fn publish(&self, subject: &'static str, payload: &'static str) -> u64 {
        self.publisher.publish(subject, payload.into()).await.unwrap().await.unwrap().sequence
    }

    /// Publishes while the stream does not republish: stored, never delivered.
    async fn publish_unrepublished(&self, subject: &'static str, payload: &'static str) -> u64 {
        let mut stream = self.admin.get_stream("HERALD").await.expect("the stream");
        let config = stream.info().await.expect("stream info").config.clone();
        let without = jetstream::stream::Config { republish: None, ..config.clone() };
        self.admin.update_stream(without).await.expect("no republish");
        let seq = self.publish(subject, payload).await;
        self.admin.update_stream(config).await.expect("republish again");
        seq
    }

    /// Has another node lead the stream.
    async fn change_leader(&self) {
        let before = stream_leader(&self.admin).await;
        assert!(before.is_some(), "the stream has a leader ({:?})", self.cluster.names());
        lead_elsewhere(&self.admin, &before.unwrap()).await;
    }
}

/// The node leading the stream, if it has a leader.
async fn stream_leader(admin: &jetstream::Context) -> Option<String> {
    let info = admin.get_stream("HERALD").await.ok()?.info().await.ok()?.clone();
    info.cluster.and_then(|cluster| cluster.leader)
}

/// Has the stream's leader step down until a node other than `node` leads it.
async fn lead_elsewhere(admin: &jetstream::Context, node: &str) {
    eventually("another node leads the stream", Duration::from_secs(60), || async {
        if stream_leader(admin).await?.as_str() != node {
            return Some(());
        }
        let _ = admin.request::<_, _, serde_json::Value>("STREAM.LEADER.STEPDOWN.HERALD", &()).await;
        None
    })
    .await;
}
