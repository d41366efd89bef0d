//! Built-in `relay`: business events POSTed to a real local HTTP endpoint, retried with the same
//! idempotency key until it accepts (after failures and timeouts), dead-lettered after the last
//! attempt or at once on a 4xx.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use herald_functions::Config;
use herald_tests::TestNats;
use herald_tests::functions::{
    dead_letters, metric, publish_event, start_builtins, stored_counts, test_config, wait_settled,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

/// One request the endpoint received.
#[derive(Debug, Clone, PartialEq)]
struct Received {
    idempotency_key: String,
    token: String,
    subject: String,
    content_type: String,
    body: Bytes,
}

/// A local HTTP endpoint answering `failure` to the first `failures` requests (or, with no
/// `failure`, never answering them), then 204.
struct Endpoint {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Endpoint {
    async fn start(failures: usize, failure: StatusCode) -> Endpoint {
        Endpoint::start_with(failures, Some(failure)).await
    }

    /// Never answers the first `failures` requests: the client times out.
    async fn silent(failures: usize) -> Endpoint {
        Endpoint::start_with(failures, None).await
    }

    async fn start_with(failures: usize, failure: Option<StatusCode>) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let service = hyper::service::service_fn(move |request| {
                    let log = log.clone();
                    async move { Ok::<_, Infallible>(answer(request, &log, failures, failure).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Endpoint { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/herald", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn answer(
    request: Request<Incoming>,
    log: &Mutex<Vec<Received>>,
    failures: usize,
    failure: Option<StatusCode>,
) -> Response<Full<Bytes>> {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut received = Received {
        idempotency_key: header("idempotency-key"),
        token: header("x-token"),
        subject: header("herald-subject"),
        content_type: header("content-type"),
        body: Bytes::new(),
    };
    received.body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let attempt = {
        let mut log = log.lock().unwrap();
        log.push(received);
        log.len()
    };
    let status = match failure {
        _ if attempt > failures => StatusCode::NO_CONTENT,
        Some(failure) => failure,
        None => std::future::pending().await,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn relay_config(nats: &TestNats, endpoint: &Endpoint, max_attempts: u64) -> Config {
    let mut config = test_config(nats);
    config.builtins = vec!["relay".into()];
    config.relay_url = Some(endpoint.url());
    config.relay_headers.insert("X-Token".into(), "s3cret".into());
    config.max_attempts = max_attempts;
    config
}

#[tokio::test]
async fn relay_retries_failures_and_delivers_once_with_one_idempotency_key() {
    let nats = TestNats::start().await;
    let endpoint = Endpoint::start(2, StatusCode::INTERNAL_SERVER_ERROR).await;
    let config = relay_config(&nats, &endpoint, 5);
    let runtime = start_builtins(&config).await;
    let js = nats.jetstream().await;

    let body = json!({"order": 7, "state": "shipped"}).to_string();
    let seq = publish_event(&js, "events.relay.orders", body.clone()).await;
    wait_settled(&js, &config.events_stream, "relay", seq).await;

    let expected = Received {
        idempotency_key: format!("HERALD_EVENTS-{seq}"),
        token: "s3cret".into(),
        subject: "events.relay.orders".into(),
        content_type: "application/json".into(),
        body: Bytes::from(body),
    };
    assert_eq!(endpoint.received(), vec![expected.clone(), expected.clone(), expected], "two failures, then success");
    assert!(stored_counts(&js, &config.dlq_stream, "herald.dlq.>").await.is_empty());
    runtime.shutdown().await;
}

#[tokio::test]
async fn relay_dead_letters_after_the_last_attempt() {
    let nats = TestNats::start().await;
    let endpoint = Endpoint::start(usize::MAX, StatusCode::SERVICE_UNAVAILABLE).await;
    let config = relay_config(&nats, &endpoint, 3);
    let runtime = start_builtins(&config).await;
    let js = nats.jetstream().await;

    let seq = publish_event(&js, "events.relay.audit", vec![0xff, 0xfe]).await;
    wait_settled(&js, &config.events_stream, "relay", seq).await;

    let received = endpoint.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.idempotency_key == format!("HERALD_EVENTS-{seq}")));
    assert!(received.iter().all(|r| r.content_type == "application/octet-stream"));
    let letters = dead_letters(&js, &config, "relay", 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].seq, letters[0].attempts, letters[0].subject.as_str()), (seq, 3, "events.relay.audit"));
    assert!(letters[0].error.contains("503"), "{}", letters[0].error);
    assert_eq!(letters[0].data, json!({"$base64": "//4="}));
    runtime.shutdown().await;
}

#[tokio::test]
async fn relay_dead_letters_a_client_error_at_once_and_retries_a_closed_port() {
    let nats = TestNats::start().await;
    let endpoint = Endpoint::start(usize::MAX, StatusCode::UNPROCESSABLE_ENTITY).await;
    let config = relay_config(&nats, &endpoint, 3);
    let runtime = start_builtins(&config).await;
    let js = nats.jetstream().await;

    let seq = publish_event(&js, "events.relay.bad", "{}").await;
    wait_settled(&js, &config.events_stream, "relay", seq).await;
    assert_eq!(endpoint.received().len(), 1);
    let letters = dead_letters(&js, &config, "relay", 1).await;
    assert_eq!((letters[0].attempts, letters[0].error.contains("422")), (1, true));
    runtime.shutdown().await;

    // Nothing listening: a connection error is retried to the last attempt.
    let closed = herald_tests::free_port();
    let mut config = config.clone();
    config.relay_url = Some(format!("http://127.0.0.1:{closed}/"));
    let runtime = start_builtins(&config).await;
    let seq = publish_event(&js, "events.relay.lost", "{}").await;
    wait_settled(&js, &config.events_stream, "relay", seq).await;
    let letters = dead_letters(&js, &config, "relay", 2).await;
    assert_eq!((letters[1].seq, letters[1].attempts), (seq, 3));
    runtime.shutdown().await;
}

#[tokio::test]
async fn relay_retries_a_request_that_timed_out() {
    let nats = TestNats::start().await;
    let endpoint = Endpoint::silent(1).await;
    let mut config = relay_config(&nats, &endpoint, 3);
    config.relay_timeout = std::time::Duration::from_secs(2);
    let runtime = start_builtins(&config).await;
    let js = nats.jetstream().await;

    let seq = publish_event(&js, "events.relay.slow", r#"{"n":1}"#).await;
    wait_settled(&js, &config.events_stream, "relay", seq).await;

    let received = endpoint.received();
    assert_eq!(received.len(), 2, "the unanswered request, then the accepted one");
    assert!(received.iter().all(|r| r.idempotency_key == format!("HERALD_EVENTS-{seq}")));
    assert!(received.iter().all(|r| r.body == Bytes::from_static(br#"{"n":1}"#)));
    assert_eq!(metric(&runtime, r#"herald_functions_retries_total{function="relay"}"#).await, 1.0);
    assert!(stored_counts(&js, &config.dlq_stream, "herald.dlq.>").await.is_empty());
    runtime.shutdown().await;

    // Unanswered each time: the letter says it timed out, and after how long.
    let endpoint = Endpoint::silent(2).await;
    let mut config = relay_config(&nats, &endpoint, 2);
    config.relay_timeout = std::time::Duration::from_secs(1);
    let runtime = start_builtins(&config).await;
    let seq = publish_event(&js, "events.relay.slower", r#"{"n":2}"#).await;
    wait_settled(&js, &config.events_stream, "relay", seq).await;
    let letters = dead_letters(&js, &config, "relay", 1).await;
    assert!(letters[0].error.contains("no answer within relay_timeout (1s)"), "{}", letters[0].error);
    runtime.shutdown().await;
}
