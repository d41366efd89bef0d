//! Broadcast fan-out through the shared log: a thousand sockets read `push.all`, each exactly,
//! while a few stop reading long enough to fall out of the log's window and then catch up from
//! the stream instead of being closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use herald_tests::gateway::token;
use herald_tests::{Publisher, TestGateway, TestNats, WsClient, eventually};

const SOCKETS: usize = 1000;
const STALLED: usize = 3;
const MESSAGES: usize = 200;
const ROUND: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sockets_read_push_all_exactly_while_stalled_ones_fall_out_of_the_window_and_catch_up() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        // A small window, and small socket buffers so that a reader that stops stops the gateway's
        // writes soon: a stalled socket is then far behind the window after a few hundred messages.
        c.broadcast_log_entries = 32;
        c.socket_send_buffer = 8 * 1024;
        c.write_stall_timeout = Duration::from_secs(300);
    })
    .await;
    let clients: Vec<WsClient> = futures::stream::iter(0..SOCKETS)
        .map(|n| {
            let url = gateway.ws_url(&format!("token={}", token(&format!("fan{n}"))));
            async move {
                let mut client = WsClient::connect_with_receive_buffer(&url, 4096).await;
                client.expect_welcome().await;
                client
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let (mut stalled, readers) = {
        let mut clients = clients;
        let readers = clients.split_off(STALLED);
        (clients, readers)
    };

    let received = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = readers
        .into_iter()
        .map(|mut client| {
            let received = received.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::with_capacity(MESSAGES);
                for _ in 0..MESSAGES {
                    seqs.push(client.expect_msg().await.seq);
                    received.fetch_add(1, Ordering::Relaxed);
                }
                (seqs, client)
            })
        })
        .collect();
    // Published in rounds smaller than the window, each read by every reader before the next: the
    // readers keep up, the stalled sockets fall ever further behind.
    let publisher = Publisher::new(&nats).await;
    // 200 messages of 2.5 KB: twice what a stalled session may queue (256 KiB of live frames) and
    // its socket may hold, so it falls out of the window even if woken meanwhile.
    let body = format!("\"{}\"", "x".repeat(2500));
    let mut published = Vec::new();
    for _ in 0..MESSAGES / ROUND {
        let mut acks = Vec::new();
        for _ in 0..ROUND {
            acks.push(publisher.send("push.all", &[], &body).await);
        }
        for ack in acks {
            published.push(ack.await.expect("stored").sequence);
        }
        let expected = published.len() * (SOCKETS - STALLED);
        eventually("every reader has the round", Duration::from_secs(60), || async {
            (received.load(Ordering::Relaxed) == expected).then_some(())
        })
        .await;
    }

    let mut open = Vec::new();
    for reader in readers {
        let (seqs, client) = reader.await.expect("reader");
        assert_eq!(seqs, published);
        open.push(client);
    }
    // The stalled sockets wake up: everything, in order, once, although most of it left the
    // window long ago.
    for client in &mut stalled {
        assert_eq!(client.expect_msgs(MESSAGES).await, published);
    }
    assert!(gateway.metric("herald_gateway_repairs_total").await >= STALLED as f64, "they caught up from the stream");
    assert_eq!(gateway.metric("herald_gateway_slow_consumer_closes_total").await, 0.0);
    assert_eq!(gateway.metric("herald_gateway_connections").await, SOCKETS as f64, "nobody was closed");
    drop(open);
}
