//! A NATS node cut off from the other two (a real partition: the node still serves its clients)
//! while they store messages. Alone, the node's replica of the stream has no leader and answers for
//! the stream from its own store, which lacks those messages, and the republish of what the others
//! store no longer reaches it. A gateway on it must neither trust those answers nor stay on it.

use std::time::Duration;

use async_nats::jetstream;
use herald_chaos::cluster::Cluster;
use herald_shared::frame::{ServerFrame, close_code};
use herald_tests::gateway::token_with;
use herald_tests::nats::Role;
use herald_tests::ws::Event;
use herald_tests::{TestGateway, WsClient, eventually};

/// One cluster at a time: three nodes and a gateway load the machine enough.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A client subscribes to a topic with `since` while its gateway's node is cut off: the replay
/// must bring the topic's messages the other nodes stored meanwhile (after the node is back, on a
/// resume if the gateway gave up with 1013), never none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_through_a_cut_off_node_brings_what_the_others_stored_meanwhile() {
    if !docker_available() {
        return;
    }
    let _alone = ONE_CLUSTER.lock().await;
    let scratch = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&format!("herald-cut-{}", std::process::id()), scratch.path()).await.unwrap();
    let (cut, other) = ("n1", "n2");
    let gateway =
        TestGateway::start_on(&cluster.node_url(cut).unwrap(), |config| config.stream.stream_replicas = 3).await;
    let admin = cluster.connect_to_node(other, Role::Admin, "test-admin").await.unwrap();
    // Led elsewhere, so that the other two store without an election.
    lead_elsewhere(&cluster, &admin, cut).await;
    let publisher = jetstream::new(admin.clone());
    let publish = |payload: &'static str| {
        let publisher = publisher.clone();
        async move { publisher.publish("push.topic.news", payload.into()).await.unwrap().await.unwrap().sequence }
    };
    let token = token_with("reader", &["news"], 3600);
    let mut client = gateway.connect_with(&format!("token={token}")).await;
    let seen = publish("1").await;

    cluster.isolate(cut).await.unwrap();
    let missed = vec![publish("2").await, publish("3").await];
    let on_cut = cluster.connect_to_node(cut, Role::Admin, "test-on-cut").await.unwrap();
    eventually("the cut-off node answering for the stream alone", Duration::from_secs(60), || async {
        let answer = on_cut.request("$JS.API.STREAM.INFO.HERALD", "".into()).await.ok()?;
        let info: serde_json::Value = serde_json::from_slice(&answer.payload).ok()?;
        let leaderless = info["cluster"]["leader"].as_str().unwrap_or_default().is_empty();
        (leaderless && info["state"]["last_seq"] == seen).then_some(())
    })
    .await;

    client.send_json(serde_json::json!({"type": "sub", "topic": "news", "since": seen})).await;
    let mut replayed = replay_of(&mut client).await;
    cluster.rejoin(cut).await.unwrap();
    // Closed with 1013 (the stream had no leader for longer than the gateway waits, or the gateway
    // moved its delivery connection and every session caught up): the client resumes, as clients
    // do, until a resume replays.
    let query = format!("token={token}&topics=news&since={seen}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while replayed.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no resume replayed within 90 s");
        let mut resumed = eventually("the gateway taking the resume", Duration::from_secs(90), || async {
            WsClient::connect(&gateway.ws_url(&query)).await.ok()
        })
        .await;
        replayed = replay_of(&mut resumed).await;
    }
    assert_eq!(replayed, Some(missed));
}

/// A gateway's delivery connection on a node cut off from the others: the node still answers pings,
/// and answers for the stream from its own store (without a leader), while the republish of what
/// the others store no longer reaches it. The gateway moves the connection to another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_connection_leaves_a_node_cut_off_from_the_others() {
    if !docker_available() {
        return;
    }
    let _alone = ONE_CLUSTER.lock().await;
    let scratch = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&format!("herald-feed-{}", std::process::id()), scratch.path()).await.unwrap();
    let gateway = TestGateway::start_on(&cluster.url(), |config| config.stream.stream_replicas = 3).await;
    let connection = format!("herald-gateway {} delivery", gateway.config.node_id);
    let cut = eventually("the delivery connection's node", Duration::from_secs(30), || {
        cluster.node_of_connection(&connection)
    })
    .await;

    cluster.isolate(&cut).await.unwrap();
    let moved = eventually("the delivery connection on another node", Duration::from_secs(60), || async {
        cluster.node_of_connection(&connection).await.filter(|node| *node != cut)
    })
    .await;
    assert_ne!(moved, cut);
    cluster.rejoin(&cut).await.unwrap();
}

/// Whether Docker runs here (CI requires it); the test is skipped otherwise.
fn docker_available() -> bool {
    let available = herald_tests::nats::docker_available();
    assert!(
        available || std::env::var("HERALD_REQUIRE_DOCKER").as_deref() != Ok("1"),
        "HERALD_REQUIRE_DOCKER=1 but no Docker"
    );
    if !available {
        eprintln!("no Docker daemon: skipped");
    }
    available
}

/// Has the stream's leader step down until a node other than `node` leads it.
async fn lead_elsewhere(cluster: &Cluster, admin: &async_nats::Client, node: &str) {
    eventually("a node other than the one cut off leads the stream", Duration::from_secs(60), || async {
        if cluster.stream_leader(admin).await.ok()?? != node {
            return Some(());
        }
        let _ = admin.request("$JS.API.STREAM.LEADER.STEPDOWN.HERALD", "".into()).await;
        None
    })
    .await;
}

/// The `msg` sequences of a replay, up to its `replayed` frame; `None` if the connection closed
/// first, with 1013.
async fn replay_of(client: &mut WsClient) -> Option<Vec<u64>> {
    let mut seqs = Vec::new();
    loop {
        match client.next_event().await {
            Event::Frame(ServerFrame::Welcome { .. } | ServerFrame::Subscribed { .. }) => {}
            Event::Frame(ServerFrame::Msg(msg)) => seqs.push(msg.seq),
            Event::Frame(replayed @ ServerFrame::Replayed { complete, .. }) => {
                assert!(complete, "{replayed:?} after {seqs:?}");
                return Some(seqs);
            }
            Event::Frame(other) => panic!("unexpected frame {other:?}"),
            Event::Close(close) => {
                assert_eq!(close.as_ref().map(|close| close.0), Some(close_code::TRY_AGAIN_LATER), "{close:?}");
                return None;
            }
        }
    }
}
