//! Push functions, rpc: request/reply on `herald.fn.<name>`, the caller's identity from headers,
//! errors as `Herald-Error`, copies sharing calls through the queue group, every function listed in
//! the micro service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_functions::{Event, Function, HandlerError, RpcReply, RpcRequest};
use herald_shared::functions::header::NATS_SERVICE_ERROR_CODE;
use herald_tests::TestNats;
use herald_tests::functions::{RpcAnswer, call, metric, start, start_builtins, test_config};
use serde_json::{Value, json};

fn whoami() -> Function {
    Function::rpc("whoami", |request: RpcRequest| async move {
        RpcReply::json(&json!({
            "user": request.user,
            "device": request.device,
            "conn": request.conn,
            "function": request.function,
            "body": request.json::<serde_json::Value>()?,
        }))
    })
}

#[tokio::test]
async fn a_call_gets_the_handlers_reply_with_the_callers_identity_from_headers() {
    let nats = TestNats::start().await;
    let runtime = start(&nats, &test_config(&nats), vec![whoami()]).await;
    let client = nats.client().await;

    let answer = call(&client, "whoami", Some("alice"), json!({"n": 1, "user": "mallory"})).await;
    let expected = json!({"user": "alice", "device": "phone", "conn": "c-1", "function": "whoami",
        "body": {"n": 1, "user": "mallory"}});
    assert_eq!(answer, RpcAnswer { body: expected, error: None });

    // Without identity headers the fields are empty, not taken from the body.
    let anonymous = call(&client, "whoami", None, json!({"user": "mallory"})).await;
    assert_eq!((anonymous.body["user"].clone(), anonymous.error), (serde_json::Value::Null, None));
    assert_eq!(metric(&runtime, r#"herald_functions_calls_total{function="whoami"}"#).await, 2.0);
    runtime.shutdown().await;
}

#[tokio::test]
async fn handler_errors_timeouts_and_panics_come_back_as_herald_error() {
    let nats = TestNats::start().await;
    let functions = vec![
        Function::rpc("refuse", |_: RpcRequest| async { Err::<RpcReply, _>(HandlerError::permanent("nope:\r\nX: 1")) }),
        Function::rpc("flaky", |_: RpcRequest| async { Err::<RpcReply, _>(HandlerError::transient("db down")) }),
        Function::rpc("slow", |_: RpcRequest| async { std::future::pending::<Result<RpcReply, HandlerError>>().await })
            .timeout(Duration::from_millis(200)),
        Function::rpc("boom", |request: RpcRequest| async move {
            if !request.body.is_empty() {
                panic!("handler bug");
            }
            RpcReply::json(&json!(null))
        }),
        whoami(),
    ];
    let runtime = start(&nats, &test_config(&nats), functions).await;
    let client = nats.client().await;

    // The error text is safe to carry in a header: line breaks are flattened.
    assert_eq!(call(&client, "refuse", Some("a"), json!({})).await.error.as_deref(), Some("nope:  X: 1"));
    assert_eq!(call(&client, "flaky", Some("a"), json!({})).await.error.as_deref(), Some("db down"));
    assert_eq!(call(&client, "slow", Some("a"), json!({})).await.error.as_deref(), Some("timed out after 200ms"));
    assert_eq!(call(&client, "boom", Some("a"), json!({})).await.error.as_deref(), Some("the handler panicked"));
    let bad_json = client.request("herald.fn.whoami", "{not json".into()).await.unwrap();
    let headers = bad_json.headers.expect("error headers");
    assert!(headers.get("Herald-Error").unwrap().as_str().starts_with("bad JSON"));
    assert_eq!(headers.get(NATS_SERVICE_ERROR_CODE).unwrap().as_str(), "400");

    // The runtime is still healthy after all of that.
    assert_eq!(call(&client, "whoami", Some("a"), json!(1)).await.error, None);
    assert_eq!(metric(&runtime, r#"herald_functions_errors_total{function="slow"}"#).await, 1.0);
    assert_eq!(metric(&runtime, r#"herald_functions_errors_total{function="whoami"}"#).await, 1.0);
    assert_eq!(metric(&runtime, r#"herald_functions_in_flight{function="slow"}"#).await, 0.0);
    runtime.shutdown().await;
}

#[tokio::test]
async fn two_copies_share_the_calls() {
    let nats = TestNats::start().await;
    let config = test_config(&nats);
    let served = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let counting = |count: Arc<AtomicUsize>| {
        Function::rpc("count", move |_: RpcRequest| {
            let count = count.clone();
            async move { RpcReply::json(&count.fetch_add(1, Ordering::SeqCst)) }
        })
    };
    let first = start(&nats, &config, vec![counting(served[0].clone())]).await;
    let second = start(&nats, &config, vec![counting(served[1].clone())]).await;
    let client = nats.client().await;

    let sent = 60;
    for _ in 0..sent {
        assert_eq!(call(&client, "count", Some("u"), json!({})).await.error, None);
    }
    let (a, b) = (served[0].load(Ordering::SeqCst), served[1].load(Ordering::SeqCst));
    assert_eq!(a + b, sent, "every call served exactly once");
    assert!(a > 0 && b > 0, "both copies served calls: {a} and {b}");
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test]
async fn functions_are_listed_as_a_micro_service() {
    let nats = TestNats::start().await;
    let functions = vec![
        whoami(),
        Function::events("orders", ["events.order.>"], |_: Event| async { Ok(()) }),
        Function::lifecycle("audit", |_: Event| async { Ok(()) }),
    ];
    let runtime = start(&nats, &test_config(&nats), functions).await;
    let client = nats.client().await;
    assert_eq!(call(&client, "whoami", Some("alice"), json!({})).await.error, None);

    let info = client.request("$SRV.INFO.herald-functions", "".into()).await.expect("service info");
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["name"], "herald-functions");
    // Every function is listed with its trigger, whatever it is.
    let listed = |key: &str| -> Value { serde_json::from_str(info["metadata"][key].as_str().expect(key)).unwrap() };
    assert_eq!(info["metadata"].as_object().map(|m| m.len()), Some(3), "{info}");
    assert_eq!(listed("fn.whoami"), json!({"trigger": "rpc", "subject": "herald.fn.whoami"}));
    assert_eq!(
        listed("fn.orders"),
        json!({"trigger": "durable", "subjects": ["events.order.>"], "stream": "HERALD_EVENTS",
            "consumer": "herald-fn-orders"})
    );
    assert_eq!(
        listed("fn.audit"),
        json!({"trigger": "lifecycle", "subjects": ["herald.events.connect", "herald.events.disconnect"],
            "queue_group": "herald-functions.audit"})
    );
    // rpc functions are its endpoints: they answer requests.
    let endpoints = info["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "{info}");
    assert_eq!(
        (endpoints[0]["subject"].as_str(), endpoints[0]["queue_group"].as_str()),
        (Some("herald.fn.whoami"), Some("herald-functions"))
    );
    assert_eq!(endpoints[0]["metadata"], json!({"function": "whoami"}));

    // The statistics carry the function's own counters.
    let stats = client.request("$SRV.STATS.herald-functions", "".into()).await.expect("service stats");
    let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
    let endpoint = &stats["endpoints"][0];
    assert_eq!((endpoint["subject"].as_str(), endpoint["num_requests"].as_u64()), (Some("herald.fn.whoami"), Some(1)));
    assert_eq!(
        endpoint["data"],
        json!({"function": "whoami", "calls": 1, "errors": 0, "retries": 0, "dead_letters": 0, "in_flight": 0})
    );

    // After a graceful shutdown nobody answers, and the service is gone.
    runtime.shutdown().await;
    let gone = client.request("herald.fn.whoami", "{}".into()).await.expect_err("no responders");
    assert_eq!(gone.kind(), async_nats::RequestErrorKind::NoResponders);
    let gone = client.request("$SRV.PING.herald-functions", "".into()).await.expect_err("no service");
    assert_eq!(gone.kind(), async_nats::RequestErrorKind::NoResponders);
}

#[tokio::test]
async fn the_builtin_durable_functions_are_listed_too() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.builtins = vec!["notify".into(), "relay".into()];
    config.relay_url = Some("http://127.0.0.1:9/hooks".into());
    let runtime = start_builtins(&config).await;
    let client = nats.client().await;

    let info = client.request("$SRV.INFO.herald-functions", "".into()).await.expect("service info");
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    let mut triggers: Vec<(String, Value)> = info["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, value)| {
            (key.clone(), serde_json::from_str::<Value>(value.as_str().unwrap()).unwrap()["trigger"].clone())
        })
        .collect();
    triggers.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(triggers, [("fn.notify".to_string(), json!("durable")), ("fn.relay".to_string(), json!("durable"))]);
    assert_eq!(info["endpoints"], json!([]));
    runtime.shutdown().await;
}
