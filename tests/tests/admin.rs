//! The operators' HTTP API (what the admin page shows and does), against a real NATS: gateways and
//! their users, the stream's state, the functions' statistics, dead letters listed, re-driven and
//! purged, a user looked up and disconnected; and the page itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use herald_functions::{Event, Function, HandlerError, Pusher};
use herald_shared::frame::close_code;
use herald_shared::subject::Audience;
use herald_tests::functions::{dead_letters, publish_event, start, test_config, wait_settled};
use herald_tests::gateway::token;
use herald_tests::{TestGateway, TestNats, eventually};
use serde_json::{Value, json};

const KEY: &str = "admin-test-key";

async fn api_gateway(nats: &TestNats) -> TestGateway {
    TestGateway::start_with(nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec![KEY.into()];
        c.api_nats_user = Some(herald_tests::nats::Role::Publisher.user().into());
        c.api_nats_password = Some(herald_tests::nats::Role::Publisher.password());
    })
    .await
}

async fn get(gateway: &TestGateway, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new().get(gateway.api_url(path)).bearer_auth(KEY).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn post(gateway: &TestGateway, path: &str, body: Value) -> (u16, Value) {
    let request = reqwest::Client::new().post(gateway.api_url(path)).bearer_auth(KEY).body(body.to_string());
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_admin_page_is_served_without_a_key_and_the_api_needs_one() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let page = reqwest::get(gateway.api_url("/admin")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.unwrap().contains("<title>Herald admin</title>"));
    let head = reqwest::Client::new().head(gateway.api_url("/admin")).send().await.unwrap();
    assert_eq!((head.status().as_u16(), head.bytes().await.unwrap().len()), (200, 0), "HEAD /admin");
    for path in ["/v1/gateways", "/v1/stream", "/v1/functions", "/v1/dead-letters", "/v1/users/zoe"] {
        let response = reqwest::get(gateway.api_url(path)).await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{path}");
    }
    // Not on the public listener.
    let public = reqwest::get(gateway.http_url("/admin")).await.unwrap();
    assert_eq!(public.status().as_u16(), 404);
}

#[tokio::test]
async fn gateways_list_their_connections_and_users() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let other = TestGateway::start(&nats).await;
    let _a = gateway.connect_with(&format!("token={}&device=phone", token("ann"))).await;
    let _b = other.connect_with(&format!("token={}&device=laptop", token("ann"))).await;
    let _c = other.connect("bob").await;

    let (status, body) = get(&gateway, "/v1/gateways").await;
    assert_eq!(status, 200);
    assert_eq!((body["connections"].as_u64(), body["users"].as_u64()), (Some(3), Some(2)), "{body}");
    let mut expected = vec![
        json!({"node": gateway.config.node_id, "connections": 1, "users": 1, "user_ids": ["ann"]}),
        json!({"node": other.config.node_id, "connections": 2, "users": 2, "user_ids": ["ann", "bob"]}),
    ];
    expected.sort_by_key(|g| g["node"].as_str().unwrap().to_string());
    assert_eq!(body["gateways"], Value::Array(expected));
}

#[tokio::test]
async fn the_stream_reports_its_state_limits_and_fullest_subject() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start_with(&nats, |c| {
        c.api_listen = Some("127.0.0.1:0".parse().unwrap());
        c.api_keys = vec![KEY.into()];
        c.stream.stream_max_msgs_per_subject = 10;
    })
    .await;
    let js = nats.jetstream().await;
    let mut seqs = Vec::new();
    for (subject, n) in [("push.user.ann", 4), ("push.user.bob", 1), ("push.all", 2)] {
        for _ in 0..n {
            seqs.push(js.publish(subject, "x".into()).await.unwrap().await.unwrap().sequence);
        }
    }
    let (status, body) = get(&gateway, "/v1/stream").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stream"], "HERALD");
    assert_eq!((body["messages"].as_u64(), body["subjects"].as_u64()), (Some(7), Some(3)));
    assert_eq!((body["first_seq"].as_u64(), body["last_seq"].as_u64()), (Some(seqs[0]), Some(seqs[6])));
    assert!(body["bytes"].as_u64().unwrap() > 0);
    assert_eq!(body["limits"]["max_msgs_per_subject"], 10);
    assert_eq!(body["limits"]["max_age_secs"], 7 * 24 * 3600);
    assert_eq!(body["limits"]["max_bytes"], -1);
    assert_eq!(body["retention"]["fullest_subject"], json!({"subject": "push.user.ann", "messages": 4, "share": 0.4}));
    assert_eq!(body["retention"]["bytes"], Value::Null);
    let age = body["retention"]["oldest_age"].as_f64().unwrap();
    assert!((0.0..0.01).contains(&age), "the oldest message is seconds old: {age}");
}

#[tokio::test]
async fn functions_report_their_micro_service_statistics() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let config = test_config(&nats);
    let echo =
        Function::rpc("echo", |_: herald_functions::RpcRequest| async { herald_functions::RpcReply::json(&"hi") });
    let audit = Function::events("audit", ["events.audit.>"], |_: Event| async { Ok(()) });
    let runtime = start(&nats, &config, vec![echo, audit]).await;
    let client = nats.client().await;
    for _ in 0..2 {
        let answer = herald_tests::functions::call(&client, "echo", Some("ann"), json!({"n": 1})).await;
        assert_eq!(answer.error, None);
    }

    let (status, body) = get(&gateway, "/v1/functions").await;
    assert_eq!(status, 200, "{body}");
    let services = body["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{body}");
    assert_eq!(services[0]["name"], "herald-functions");
    // Every function with its trigger (a durable one has no request counters, but is listed).
    assert_eq!(
        services[0]["functions"],
        json!([
            {"name": "audit", "trigger": "durable", "subjects": ["events.audit.>"], "stream": "HERALD_EVENTS",
             "consumer": "herald-fn-audit"},
            {"name": "echo", "trigger": "rpc", "subject": "herald.fn.echo"},
        ])
    );
    let endpoints = services[0]["endpoints"].as_array().unwrap();
    let echo = endpoints.iter().find(|e| e["subject"] == "herald.fn.echo").expect("the echo endpoint");
    assert_eq!((echo["requests"].as_u64(), echo["errors"].as_u64()), (Some(2), Some(0)));
    assert_eq!(
        echo["data"],
        json!({"function": "echo", "calls": 2, "errors": 0, "retries": 0, "dead_letters": 0, "in_flight": 0})
    );
    runtime.shutdown().await;
}

/// A function that pushes each event's `text` to user `ann`, failing permanently while `down`.
fn forwarder(down: Arc<AtomicBool>, pusher: Pusher) -> Function {
    Function::events("forward", ["events.forward.>"], move |event: Event| {
        let (down, pusher) = (down.clone(), pusher.clone());
        async move {
            if down.load(Ordering::SeqCst) {
                return Err(HandlerError::permanent("downstream refused it"));
            }
            let body: Value = event.json()?;
            let payload = Bytes::from(body["text"].to_string());
            pusher.push(&event.id, &Audience::User("ann".into()), None, payload).await?;
            Ok(())
        }
    })
}

#[tokio::test]
async fn dead_letters_are_listed_redriven_to_a_push_and_purged() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let config = test_config(&nats);
    let js = nats.jetstream().await;
    let down = Arc::new(AtomicBool::new(true));
    let runtime = start(&nats, &config, vec![forwarder(down.clone(), Pusher::new(js.clone()))]).await;
    let mut ann = gateway.connect("ann").await;

    let (status, body) = get(&gateway, "/v1/dead-letters").await;
    assert_eq!((status, body), (200, json!({"total": 0, "functions": []})));
    // A number past 64 bits, and members out of order: re-encoded, the event would change.
    let original = r#"{"text":"first","n":12345678901234567890123}"#;
    let first = publish_event(&js, "events.forward.1", original).await;
    wait_settled(&js, &config.events_stream, "forward", first).await;
    dead_letters(&js, &config, "forward", 1).await;

    let (status, body) = get(&gateway, "/v1/dead-letters").await;
    assert_eq!((status, body), (200, json!({"total": 1, "functions": [{"function": "forward", "dead_letters": 1}]})));
    let (status, body) = get(&gateway, "/v1/dead-letters/forward").await;
    assert_eq!(status, 200, "{body}");
    let letters = body["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (&letter["subject"], &letter["event_seq"], &letter["attempts"], &letter["error"], &letter["data"]),
        (
            &json!("events.forward.1"),
            &json!(first),
            &json!(1),
            &json!("downstream refused it"),
            &serde_json::from_str::<Value>(original).unwrap()
        )
    );
    let letter_seq = letter["seq"].as_u64().unwrap();
    assert_eq!(body["next"], letter_seq);

    // Downstream is back: the re-driven event is a new event (its attempts count from 1) and pushes.
    down.store(false, Ordering::SeqCst);
    let (status, body) = post(&gateway, "/v1/dead-letters/forward/redrive", json!({"seq": letter_seq})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["subject"], &body["stream"], &body["duplicate"]),
        (&json!("events.forward.1"), &json!("HERALD_EVENTS"), &json!(false))
    );
    let event_seq = body["event_seq"].as_u64().unwrap();
    assert!(event_seq > first);
    let events = js.get_stream(&config.events_stream).await.unwrap();
    let redriven = events.get_raw_message(event_seq).await.unwrap();
    assert_eq!(std::str::from_utf8(&redriven.payload).unwrap(), original, "the event as it was published");
    let msg = ann.expect_msg().await;
    assert_eq!((msg.to.as_str(), msg.data), ("user", json!("first")));
    wait_settled(&js, &config.events_stream, "forward", event_seq).await;
    let (_, body) = get(&gateway, "/v1/dead-letters").await;
    assert_eq!(body, json!({"total": 0, "functions": []}));
    // The letter is gone: re-driving it again is a 404, and so is a letter of another function.
    let (status, body) = post(&gateway, "/v1/dead-letters/forward/redrive", json!({"seq": letter_seq})).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));

    // Two more letters, purged at once.
    down.store(true, Ordering::SeqCst);
    let mut last = 0;
    for n in 2..=3 {
        last = publish_event(&js, &format!("events.forward.{n}"), r#"{"text":"later"}"#).await;
    }
    wait_settled(&js, &config.events_stream, "forward", last).await;
    let letters = dead_letters(&js, &config, "forward", 2).await;
    assert_eq!(letters.len(), 2);
    let (status, body) = get(&gateway, "/v1/dead-letters/forward?limit=1").await;
    assert_eq!((status, body["dead_letters"].as_array().map(Vec::len)), (200, Some(1)));
    // A name in the path may be percent-encoded, as URL builders write it.
    assert_eq!(get(&gateway, "/v1/dead-letters/%66orward?limit=1").await, (status, body.clone()));
    let after = body["next"].as_u64().unwrap();
    let (_, body) = get(&gateway, &format!("/v1/dead-letters/forward?after={after}")).await;
    assert_eq!(body["dead_letters"].as_array().map(Vec::len), Some(1));
    let (status, body) = get(&gateway, &format!("/v1/dead-letters/forward?after={}", u64::MAX)).await;
    assert_eq!((status, body["dead_letters"].clone()), (200, json!([])));
    let (status, body) = post(&gateway, "/v1/dead-letters/other/redrive", json!({"seq": after})).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")), "a letter of forward, not of other");
    let (status, body) = post(&gateway, "/v1/dead-letters/forward/purge", json!({})).await;
    assert_eq!((status, body), (200, json!({"function": "forward", "purged": 2})));
    let (_, body) = get(&gateway, "/v1/dead-letters/forward").await;
    assert_eq!(body["dead_letters"], json!([]));

    // A large event (its data and its payload would not both fit in what NATS takes): its letter
    // keeps the payload alone, and the API reads the data from it.
    let large = format!("\"{}\"", "y".repeat(700_000));
    let seq = publish_event(&js, "events.forward.large", large.clone()).await;
    wait_settled(&js, &config.events_stream, "forward", seq).await;
    let letter = dead_letters(&js, &config, "forward", 1).await.remove(0);
    assert_eq!((letter.data, letter.payload.is_some()), (Value::Null, true));
    let (_, body) = get(&gateway, "/v1/dead-letters/forward").await;
    assert_eq!(body["dead_letters"][0]["data"], serde_json::from_str::<Value>(&large).unwrap());

    for (path, body, status) in [
        ("/v1/dead-letters/a*b/redrive", json!({"seq": 1}), 400),
        ("/v1/dead-letters/forward/redrive", json!({"seq": "x"}), 400),
        ("/v1/dead-letters/forward/redrive", json!({"seq": 0}), 400),
        ("/v1/dead-letters/forward/redrive", json!({"seq": 1, "extra": 1}), 400),
        ("/v1/dead-letters/forward/explode", json!({}), 404),
    ] {
        let (got, answer) = post(&gateway, path, body).await;
        assert_eq!(got, status, "{path}: {answer}");
    }
    let (status, _) = get(&gateway, "/v1/dead-letters/forward?limit=0").await;
    assert_eq!(status, 400);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_user_is_looked_up_across_gateways_and_disconnected_with_4003() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let other = TestGateway::start(&nats).await;
    let mut phone = gateway.connect_with(&format!("token={}&device=phone", token("zoe"))).await;
    let mut laptop = other.connect_with(&format!("token={}&device=laptop", token("zoe"))).await;
    let js = nats.jetstream().await;
    let mut seqs = Vec::new();
    for text in ["a", "b", "c"] {
        seqs.push(js.publish("push.user.zoe", text.into()).await.unwrap().await.unwrap().sequence);
    }
    assert_eq!(phone.expect_msgs(3).await, seqs);
    assert_eq!(laptop.expect_msgs(3).await, seqs);
    phone.send_json(json!({"type": "ack", "seq": seqs[1]})).await;
    phone.send_json(json!({"type": "read", "seq": seqs[0]})).await;
    let prefs = js.get_key_value("herald-prefs").await.unwrap();
    prefs.put("zoe", r#"{"muted":["marketing"]}"#.into()).await.unwrap();

    let body = eventually("the phone's cursor and the read position stored", herald_tests::functions::WAIT, || async {
        let (_, body) = get(&gateway, "/v1/users/zoe").await;
        // The laptop's cursor is where it started (nothing acknowledged); the phone's, its ack.
        let devices = json!([{"device": "laptop", "cursor": 0}, {"device": "phone", "cursor": seqs[1]}]);
        (body["devices"] == devices && body["read"] == seqs[0]).then_some(body)
    })
    .await;
    assert_eq!((body["user"].as_str(), body["online"].as_bool()), (Some("zoe"), Some(true)));
    assert_eq!((body["unread"].as_u64(), body["last"].as_u64()), (Some(2), Some(seqs[2])));
    assert_eq!(body["muted"], json!(["marketing"]));
    let sockets = body["sockets"].as_array().unwrap();
    let mut seen: Vec<(String, String, String)> = sockets
        .iter()
        .map(|s| {
            (
                s["node"].as_str().unwrap().into(),
                s["device"].as_str().unwrap().into(),
                s["address"].as_str().unwrap().into(),
            )
        })
        .collect();
    seen.sort();
    let mut expected = vec![
        (gateway.config.node_id.clone(), "phone".to_string(), "127.0.0.1".to_string()),
        (other.config.node_id.clone(), "laptop".to_string(), "127.0.0.1".to_string()),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    assert!(sockets.iter().all(|s| s["conn"].as_str().is_some_and(|c| !c.is_empty()) && s["since"].is_string()));

    let (status, body) = post(&gateway, "/v1/disconnect", json!({"user": "zoe"})).await;
    assert_eq!((status, body["disconnected"].as_u64()), (200, Some(2)));
    assert_eq!(phone.expect_close().await.map(|c| c.0), Some(close_code::DISCONNECTED));
    assert_eq!(laptop.expect_close().await.map(|c| c.0), Some(close_code::DISCONNECTED));
    let body = eventually("no socket left", herald_tests::functions::WAIT, || async {
        let (_, body) = get(&gateway, "/v1/users/zoe").await;
        (body["sockets"] == json!([])).then_some(body)
    })
    .await;
    assert_eq!(body["online"], false);

    let (status, body) = get(&gateway, "/v1/users/nobody").await;
    assert_eq!(status, 200);
    assert_eq!(
        (&body["sockets"], &body["devices"], &body["read"], &body["unread"], &body["muted"]),
        (&json!([]), &json!([]), &json!(0), &json!(0), &json!([]))
    );
    let (status, body) = get(&gateway, "/v1/users/a.b").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
}

/// While the gateway has no NATS, the questions every gateway or function answers get 503, not an
/// answer of "none" (no gateway, nobody online, nobody disconnected) while the question waits to
/// be sent once NATS is back (a disconnect then carried out after its answer said 0); so do reads of
/// the stream, the inbox and the dead letters, at once.
#[tokio::test]
async fn questions_to_the_cluster_and_reads_get_503_while_nats_is_down() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let _connected = gateway.connect("ban").await;
    assert_eq!(get(&gateway, "/v1/presence/ban").await.1["online"], true);
    nats.stop().await;
    eventually("the gateway sees NATS gone", std::time::Duration::from_secs(30), || async {
        let ready = reqwest::get(gateway.http_url("/readyz")).await.ok()?.text().await.ok()?;
        ready.contains("not connected to NATS").then_some(())
    })
    .await;
    for (status, body) in [
        get(&gateway, "/v1/gateways").await,
        get(&gateway, "/v1/functions").await,
        get(&gateway, "/v1/presence/ban").await,
        get(&gateway, "/v1/users/ban").await,
        post(&gateway, "/v1/disconnect", json!({"user": "ban"})).await,
        // What JetStream keeps is answered at once too, not after a request's timeout.
        get(&gateway, "/v1/stream").await,
        get(&gateway, "/v1/inbox/ban").await,
        get(&gateway, "/v1/inbox/ban/messages").await,
        post(&gateway, "/v1/inbox/ban/read", json!({"seq": 1})).await,
        get(&gateway, "/v1/dead-letters").await,
        get(&gateway, "/v1/dead-letters/notify").await,
        post(&gateway, "/v1/dead-letters/notify/purge", json!({})).await,
    ] {
        assert_eq!((status, &body["error"]), (503, &json!("unavailable")), "{body}");
        assert!(body["reason"].as_str().is_some_and(|m| m.starts_with("not connected to NATS")), "{body}");
    }
    // A path that takes no such method is still told so.
    let (status, body) = post(&gateway, "/v1/stream", json!({})).await;
    assert_eq!((status, &body["error"]), (405, &json!("method_not_allowed")), "{body}");
    // Input that can never succeed is told so, not to try again later.
    for (status, body) in [
        get(&gateway, "/v1/presence/%3E").await,
        get(&gateway, "/v1/users/a%2Eb").await,
        get(&gateway, "/v1/inbox/%2A").await,
        get(&gateway, "/v1/inbox/a.b/messages").await,
        get(&gateway, "/v1/inbox/ban/messages?limit=0").await,
        post(&gateway, "/v1/inbox/a*/read", json!({"seq": 1})).await,
        get(&gateway, "/v1/dead-letters/%2A").await,
        get(&gateway, "/v1/dead-letters/notify?after=x").await,
    ] {
        assert_eq!((status, &body["error"]), (400, &json!("bad_request")), "{body}");
    }
}

/// A NATS server that hangs (its connections stay open, nothing is answered) is not a cluster
/// where no one is connected: the questions every gateway answers get 503, not "nobody" (a
/// gateway answers its own question: without its answer, the question never went round), and
/// are answered again once it goes on.
#[tokio::test]
async fn questions_to_the_gateways_get_503_while_nats_hangs() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let _connected = gateway.connect("cas").await;
    assert_eq!(get(&gateway, "/v1/presence/cas").await.1["online"], true);
    nats.pause().await;
    for (status, body) in [
        get(&gateway, "/v1/presence/cas").await,
        get(&gateway, "/v1/gateways").await,
        post(&gateway, "/v1/disconnect", json!({"user": "cas"})).await,
    ] {
        assert_eq!((status, &body["error"]), (503, &json!("unavailable")), "{body}");
        assert!(body["reason"].as_str().is_some_and(|m| m.contains("NATS did not route")), "{body}");
    }
    nats.unpause().await;
    eventually("the gateways answered again", std::time::Duration::from_secs(30), || async {
        let (status, body) = get(&gateway, "/v1/gateways").await;
        (status == 200 && body["gateways"].as_array()?.len() == 1).then_some(())
    })
    .await;
}

/// A message in the dead-letter stream that is no dead letter (published there by hand, or by
/// another version) is listed as unreadable, with its content, instead of failing the whole list
/// with 503; its re-drive is refused (422), and the readable letters still list and re-drive.
#[tokio::test]
async fn an_unreadable_dead_letter_hides_no_other_and_is_not_redriven() {
    let nats = TestNats::start().await;
    let gateway = api_gateway(&nats).await;
    let js = nats.jetstream().await;
    let config = async_nats::jetstream::stream::Config {
        name: "HERALD_DLQ".into(),
        subjects: vec!["herald.dlq.>".into()],
        ..Default::default()
    };
    js.create_stream(config).await.unwrap();
    let events = async_nats::jetstream::stream::Config {
        name: "HERALD_EVENTS".into(),
        subjects: vec!["events.>".into()],
        ..Default::default()
    };
    js.create_stream(events).await.unwrap();
    let letter = json!({"function": "notify", "subject": "events.notify.x", "stream": "HERALD_EVENTS", "seq": 1,
        "attempts": 3, "error": "boom", "data": {"n": 1}, "ts": "2026-12-06T00:00:00Z"});
    for body in [json!({"note": "old format"}).to_string(), letter.to_string()] {
        js.publish("herald.dlq.notify", body.into()).await.unwrap().await.unwrap();
    }

    let (status, body) = get(&gateway, "/v1/dead-letters/notify").await;
    assert_eq!(status, 200, "{body}");
    let letters = body["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{body}");
    assert!(letters[0]["unreadable"].as_str().is_some_and(|why| why.contains("missing field")), "{body}");
    assert_eq!(letters[0]["data"], json!({"note": "old format"}));
    assert_eq!((&letters[1]["error"], &letters[1]["attempts"]), (&json!("boom"), &json!(3)));

    let (status, refused) = post(&gateway, "/v1/dead-letters/notify/redrive", json!({"seq": 1})).await;
    assert_eq!((status, &refused["error"]), (422, &json!("bad_letter")), "{refused}");
    let (status, redriven) = post(&gateway, "/v1/dead-letters/notify/redrive", json!({"seq": 2})).await;
    assert_eq!((status, &redriven["subject"]), (200, &json!("events.notify.x")), "{redriven}");
}
