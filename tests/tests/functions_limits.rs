//! Push functions, limits: at most `concurrency` calls of a function run at once (and a saturated
//! function does not hold up another), and a durable call that outlives its timeout fails and is
//! retried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_functions::{Event, Function, RpcReply, RpcRequest};
use herald_tests::functions::{WAIT, call, metric, publish_event, start, stored_counts, test_config, wait_settled};
use herald_tests::{TestNats, eventually};
use serde_json::json;
use tokio::sync::Semaphore;

/// Counts the calls running now and the most that ever ran at once, and holds each call until the
/// test releases it.
#[derive(Clone)]
struct Occupancy {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    entered: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
}

impl Occupancy {
    fn new() -> Occupancy {
        Occupancy {
            running: Arc::default(),
            most: Arc::default(),
            entered: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
        }
    }

    async fn hold(&self) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.entered.fetch_add(1, Ordering::SeqCst);
        let _ = self.release.acquire().await.map(|permit| permit.forget());
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    async fn wait_entered(&self, count: usize) {
        eventually(&format!("{count} calls entered"), WAIT, || async {
            (self.entered.load(Ordering::SeqCst) >= count).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn no_more_than_concurrency_calls_run_at_once() {
    let nats = TestNats::start().await;
    let occupancy = Occupancy::new();
    let functions = {
        let occupancy = occupancy.clone();
        vec![
            Function::rpc("busy", move |_: RpcRequest| {
                let occupancy = occupancy.clone();
                async move {
                    occupancy.hold().await;
                    RpcReply::json(&"done")
                }
            })
            .concurrency(3),
            Function::rpc("free", |_: RpcRequest| async { RpcReply::json(&"free") }),
        ]
    };
    let runtime = start(&nats, &test_config(&nats), functions).await;
    let client = nats.client().await;

    let calls = 10;
    let mut answers = Vec::new();
    for _ in 0..calls {
        let client = client.clone();
        answers.push(tokio::spawn(async move { call(&client, "busy", Some("u"), json!({})).await }));
    }
    occupancy.wait_entered(3).await;
    assert_eq!(metric(&runtime, r#"herald_functions_in_flight{function="busy"}"#).await, 3.0);
    // Another function is not held up by the saturated one.
    assert_eq!(call(&client, "free", Some("u"), json!({})).await.body, json!("free"));
    // Each call released lets exactly one waiting call in.
    for released in 1..=calls {
        occupancy.release.add_permits(1);
        occupancy.wait_entered((3 + released).min(calls)).await;
    }
    for answer in answers {
        assert_eq!(answer.await.unwrap().body, json!("done"));
    }
    assert_eq!(occupancy.entered.load(Ordering::SeqCst), calls);
    assert_eq!(occupancy.most.load(Ordering::SeqCst), 3, "never more than 3 at once");
    assert_eq!(metric(&runtime, r#"herald_functions_calls_total{function="busy"}"#).await, calls as f64);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_durable_call_that_times_out_is_retried_and_then_succeeds() {
    let nats = TestNats::start().await;
    let config = test_config(&nats);
    let attempts: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stuck_once = {
        let attempts = attempts.clone();
        Function::events("stuck-once", ["events.slow.>"], move |event: Event| {
            attempts.lock().unwrap().push(event.attempt);
            async move {
                if event.attempt == 1 {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        })
        .timeout(Duration::from_secs(2))
    };
    let runtime = start(&nats, &config, vec![stuck_once]).await;
    let js = nats.jetstream().await;

    let seq = publish_event(&js, "events.slow.1", "{}").await;
    wait_settled(&js, &config.events_stream, "stuck-once", seq).await;

    assert_eq!(*attempts.lock().unwrap(), [1, 2], "timed out once, then handled");
    let counter = |name: &str| format!(r#"herald_functions_{name}{{function="stuck-once"}}"#);
    assert_eq!(metric(&runtime, &counter("calls_total")).await, 2.0);
    assert_eq!(metric(&runtime, &counter("errors_total")).await, 1.0);
    assert_eq!(metric(&runtime, &counter("retries_total")).await, 1.0);
    assert_eq!(metric(&runtime, &counter("dead_letters_total")).await, 0.0);
    assert_eq!(metric(&runtime, &counter("in_flight")).await, 0.0);
    assert!(stored_counts(&js, &config.dlq_stream, "herald.dlq.>").await.is_empty());
    runtime.shutdown().await;
}

/// A NATS out of reach: a start says it cannot connect, naming the URL and why (each attempt of
/// the binary logs it), instead of waiting in silence on its first requests.
#[tokio::test]
async fn a_start_with_nats_out_of_reach_says_it_cannot_connect() {
    let mut config = herald_functions::Config::default();
    config.nats.nats_url = format!("nats://127.0.0.1:{}", herald_tests::free_port());
    config.metrics_listen = "127.0.0.1:0".parse().unwrap();
    let started = tokio::time::timeout(Duration::from_secs(60), herald_functions::start(&config)).await;
    let error = started.expect("an answer within 60 s").err().expect("no NATS: no start");
    let said = error.to_string();
    assert!(matches!(error, herald_functions::StartError::Nats(_)), "{said}");
    assert!(said.contains(&format!("cannot connect to NATS at {}", config.nats.nats_url)), "{said}");
}

/// Settings no later attempt can fix end the start with a configuration error (the binary exits
/// with status 2, as the gateway does), where they were tried again for ever as a NATS not ready.
#[tokio::test]
async fn settings_no_start_can_fix_are_a_configuration_error() {
    type Setting = fn(&mut herald_functions::Config);
    let cases: [(Setting, &str); 6] = [
        (|c| c.nats.nats_url = String::new(), "nats_url is empty"),
        (|c| c.nats.nats_tls_ca = Some("/".into()), "nats_tls_ca /: not a file"),
        (|c| c.nats.nats_url = "http://127.0.0.1:4222".into(), "bad NATS settings"),
        (|c| c.nats.nats_creds = Some("/nonexistent/herald.creds".into()), "bad NATS settings"),
        (|c| c.nats.nats_tls_ca = Some("/nonexistent/ca.pem".into()), "nats_tls_ca /nonexistent/ca.pem"),
        (|c| c.timeout = Duration::ZERO, "timeout is 0"),
    ];
    for (set, expected) in cases {
        let mut config = herald_functions::Config::default();
        config.nats.nats_url = format!("nats://127.0.0.1:{}", herald_tests::free_port());
        config.metrics_listen = "127.0.0.1:0".parse().unwrap();
        set(&mut config);
        let started = tokio::time::timeout(Duration::from_secs(60), herald_functions::start(&config)).await;
        let error = started.expect("an answer within 60 s").err().expect("no start");
        let said = error.to_string();
        assert!(matches!(error, herald_functions::StartError::Config(_)), "{said}");
        assert!(said.contains(expected), "{said}");
    }
}
