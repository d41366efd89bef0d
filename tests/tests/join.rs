//! Exact delivery under churn: publishers keep publishing while clients reconnect to either of two
//! gateways (one of them dies and is replaced); every client's sequence of `seq`, across all its
//! connections, must be exactly the stream's messages addressed to it: no gap, no duplicate, in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_shared::frame::ServerFrame;
use herald_tests::gateway::token;
use herald_tests::ws::Event;
use herald_tests::{Publisher, TestGateway, TestNats, WsClient};
use tokio::sync::watch;

const USERS: [&str; 3] = ["c0", "c1", "c2"];
const TOTAL: usize = 10_000;
const MIN_RECONNECTS: usize = 50;

/// What one publisher published: (seq, user index or None for push.all).
type Published = Arc<Mutex<Vec<(u64, Option<usize>)>>>;

/// How long a client waits for its next frame before the test fails: messages flow all the time,
/// so a silence this long is a hang (a lost message the client would wait for forever).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_live_join_without_gap_or_duplicate_under_reconnects_and_a_gateway_death() {
    let nats = TestNats::start().await;
    let gateway_a = TestGateway::start(&nats).await;
    let gateway_b = TestGateway::start(&nats).await;
    let urls = Arc::new(Mutex::new(vec![gateway_a.ws_url(""), gateway_b.ws_url("")]));
    let published: Published = Arc::default();
    let (expected_tx, expected_rx) = watch::channel::<Option<HashMap<usize, usize>>>(None);

    let clients: Vec<_> =
        (0..USERS.len()).map(|index| tokio::spawn(client(index, urls.clone(), expected_rx.clone()))).collect();

    // Two publishers, each half of the messages, a seventh of them broadcasts.
    let publisher = Publisher::new(&nats).await;
    let publishers: Vec<_> = (0..2)
        .map(|half| {
            let (publisher, published) = (publisher.clone(), published.clone());
            tokio::spawn(async move {
                for n in (half..TOTAL).step_by(2) {
                    let audience = if n % 7 == 0 { None } else { Some(n % USERS.len()) };
                    let subject = audience.map_or("push.all".to_string(), |u| format!("push.user.{}", USERS[u]));
                    let seq = publisher.publish(&subject, &format!("{{\"n\":{n}}}")).await;
                    published.lock().unwrap().push((seq, audience));
                }
            })
        })
        .collect();

    // Halfway through, gateway A dies; a new gateway takes its place in the clients' list.
    herald_tests::eventually("half of the messages published", Duration::from_secs(300), || async {
        (published.lock().unwrap().len() >= TOTAL / 2).then_some(())
    })
    .await;
    gateway_a.kill().await;
    let gateway_c = TestGateway::start(&nats).await;
    urls.lock().unwrap()[0] = gateway_c.ws_url("");

    for publisher in publishers {
        publisher.await.unwrap();
    }
    let published = published.lock().unwrap().clone();
    assert_eq!(published.len(), TOTAL);
    let expected: Vec<Vec<u64>> = (0..USERS.len())
        .map(|user| {
            let mut seqs: Vec<u64> =
                published.iter().filter(|(_, to)| to.is_none_or(|u| u == user)).map(|(seq, _)| *seq).collect();
            seqs.sort();
            seqs
        })
        .collect();
    expected_tx.send(Some(expected.iter().enumerate().map(|(user, seqs)| (user, seqs.len())).collect())).unwrap();

    for (user, handle) in clients.into_iter().enumerate() {
        let (received, reconnects) = handle.await.unwrap();
        assert!(reconnects >= MIN_RECONNECTS, "{}: only {reconnects} reconnects", USERS[user]);
        assert_eq!(received.len(), expected[user].len(), "{}: count", USERS[user]);
        assert_eq!(received, expected[user], "{}: the full sequence", USERS[user]);
    }
    drop(gateway_b);
    drop(gateway_c);
}

/// Connects, reads a few dozen messages, drops the connection, resumes with `since` from the last
/// `seq` it got — on the other gateway — until it has everything expected of it.
async fn client(
    index: usize,
    urls: Arc<Mutex<Vec<String>>>,
    mut expected: watch::Receiver<Option<HashMap<usize, usize>>>,
) -> (Vec<u64>, usize) {
    let user = USERS[index];
    let mut received: Vec<u64> = Vec::new();
    let mut reconnects = 0usize;
    let done = |received: &Vec<u64>, expected: &watch::Receiver<Option<HashMap<usize, usize>>>| {
        expected.borrow().as_ref().is_some_and(|counts| received.len() >= counts[&index])
    };
    while !done(&received, &expected) {
        let since = received.last().copied().unwrap_or(0);
        let base = urls.lock().unwrap()[(reconnects + index) % 2].clone();
        let url = format!("{base}token={}&since={since}", token(user));
        reconnects += 1;
        let Ok(mut socket) = WsClient::try_connect(&url).await else { continue };
        // A quota between 20 and 69 messages, different for each connection.
        let quota = 20 + (reconnects * 13 + index * 7) % 50;
        let mut got = 0;
        while got < quota && !done(&received, &expected) {
            let event = tokio::select! {
                event = tokio::time::timeout(READ_TIMEOUT, socket.recv()) => event.unwrap_or_else(|_| {
                    panic!("{user}: no frame for {READ_TIMEOUT:?} after {:?}", received.last())
                }),
                _ = expected.changed() => continue,
            };
            match event {
                Event::Frame(ServerFrame::Msg(msg)) => {
                    assert!(
                        received.last().is_none_or(|last| msg.seq > *last),
                        "{user}: {} after {:?}",
                        msg.seq,
                        received.last()
                    );
                    received.push(msg.seq);
                    got += 1;
                }
                Event::Frame(ServerFrame::Replayed { complete, .. }) => assert!(complete, "{user}: incomplete replay"),
                Event::Frame(ServerFrame::Welcome { .. }) => {}
                Event::Frame(other) => panic!("{user}: unexpected {other:?}"),
                // The gateway died, restarted or found us slow: resume elsewhere.
                Event::Close(_) => break,
            }
        }
    }
    (received, reconnects)
}
