//! KV failing for a moment, as while a bucket elects a leader.

use futures::StreamExt;

use crate::TestNats;
use crate::ws::{FRAME_TIMEOUT, WsClient};

/// Connects to `url` while the gateway's first direct read of KV `bucket` goes unanswered, as while
/// KV fails over: the bucket stops answering direct reads and a subscriber takes the request
/// without answering it; once it has, the bucket answers again.
pub async fn connect_while_a_read_goes_unanswered(nats: &TestNats, bucket: &str, url: String) -> WsClient {
    let js = nats.jetstream().await;
    let stream = format!("KV_{bucket}");
    let mut config = js.get_stream(&stream).await.unwrap().info().await.unwrap().config.clone();
    assert!(config.allow_direct, "the gateway reads KV with direct gets");
    config.allow_direct = false;
    js.update_stream(&config).await.unwrap();
    let client = nats.client().await;
    let mut reads = client.subscribe(format!("$JS.API.DIRECT.GET.{stream}.>")).await.unwrap();
    client.flush().await.unwrap();
    let socket = tokio::spawn(async move { WsClient::connect(&url).await.expect("admitted") });
    let read = tokio::time::timeout(FRAME_TIMEOUT, reads.next()).await;
    assert!(read.expect("the gateway reads KV").is_some());
    reads.unsubscribe().await.unwrap();
    config.allow_direct = true;
    js.update_stream(&config).await.unwrap();
    socket.await.unwrap()
}
