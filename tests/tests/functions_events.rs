//! Push functions, durable events and lifecycle events: copies share a durable consumer, a killed
//! copy's events go to the other copy without pushing twice, failures retry then dead-letter,
//! lifecycle events reach each function once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_functions::{Event, Function, HandlerError, Pusher};
use herald_shared::functions::{DeadLetter, LifecycleEvent};
use herald_shared::subject::{Audience, EVENTS_CONNECT, EVENTS_DISCONNECT, STREAM};
use herald_tests::functions::{
    WAIT, dead_letters, metric, publish_event, start, start_at, stored_counts, test_config, wait_settled,
};
use herald_tests::{TestGateway, TestNats, eventually};
use serde_json::json;

/// What handlers saw, shared with the test.
type Seen<T> = Arc<Mutex<Vec<T>>>;

fn recorder<T>() -> Seen<T> {
    Arc::new(Mutex::new(Vec::new()))
}

/// A durable function on `events.test.>` that records each event's `n` and succeeds.
fn collecting(name: &str, seen: Seen<u64>) -> Function {
    working(name, seen, Duration::ZERO)
}

/// [`collecting`], each call taking `work` after it recorded its event.
fn working(name: &str, seen: Seen<u64>, work: Duration) -> Function {
    Function::events(name, ["events.test.>"], move |event: Event| {
        let seen = seen.clone();
        async move {
            let body: serde_json::Value = event.json()?;
            seen.lock().unwrap().push(body["n"].as_u64().unwrap_or(u64::MAX));
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            Ok(())
        }
    })
}

/// Each of events `0..sent` was handled once, by one copy or another.
fn assert_each_handled_once(copies: &[&Seen<u64>], sent: u64) {
    let mut counts = BTreeMap::new();
    for n in copies.iter().flat_map(|seen| seen.lock().unwrap().clone()) {
        *counts.entry(n).or_insert(0) += 1;
    }
    assert_eq!(counts, (0..sent).map(|n| (n, 1)).collect::<BTreeMap<_, _>>(), "each event handled exactly once");
}

#[tokio::test]
async fn two_copies_share_a_durable_consumer_and_handle_every_event_once() {
    let nats = TestNats::start().await;
    let config = test_config(&nats);
    let (seen_a, seen_b) = (recorder(), recorder());
    let first = start(&nats, &config, vec![collecting("collect", seen_a.clone()).concurrency(2)]).await;
    let second = start(&nats, &config, vec![collecting("collect", seen_b.clone()).concurrency(2)]).await;
    let js = nats.jetstream().await;

    let sent = 100;
    let mut last = 0;
    for n in 0..sent {
        last = publish_event(&js, &format!("events.test.{}", n % 3), json!({ "n": n }).to_string()).await;
    }
    wait_settled(&js, &config.events_stream, "collect", last).await;

    assert_each_handled_once(&[&seen_a, &seen_b], sent);
    first.shutdown().await;
    second.shutdown().await;
}

/// Handlers that run longer than `ack_wait` (their `+WPI`s keep them) in two copies: each event is
/// handled once. A copy used to pull a batch more than it could start, and an event waiting there had
/// no `+WPI` until it started, so its `ack_wait` ran out and the other copy ran it too.
#[tokio::test]
async fn events_waiting_for_a_busy_copy_are_not_pulled_so_slow_handlers_run_each_once() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.ack_wait = Duration::from_secs(3);
    // The work itself takes half as long again as ack_wait.
    let slow =
        |seen| working("slow", seen, Duration::from_millis(4500)).concurrency(4).timeout(Duration::from_secs(30));
    let (seen_a, seen_b) = (recorder(), recorder());
    let first = start(&nats, &config, vec![slow(seen_a.clone())]).await;
    let second = start(&nats, &config, vec![slow(seen_b.clone())]).await;
    let js = nats.jetstream().await;

    let (sent, mut last) = (16, 0);
    for n in 0..sent {
        last = publish_event(&js, "events.test.slow", json!({ "n": n }).to_string()).await;
    }
    wait_settled(&js, &config.events_stream, "slow", last).await;

    assert_each_handled_once(&[&seen_a, &seen_b], sent);
    first.shutdown().await;
    second.shutdown().await;
}

/// A durable consumer deleted under a running copy (an operator's mistake, a stream restored) is
/// created again, and the events that follow are handled.
#[tokio::test]
async fn a_consumer_deleted_under_a_copy_is_created_again() {
    let nats = TestNats::start().await;
    let config = test_config(&nats);
    let seen = recorder();
    let copy = start(&nats, &config, vec![collecting("collect", seen.clone())]).await;
    let js = nats.jetstream().await;
    let first = publish_event(&js, "events.test.a", json!({ "n": 1 }).to_string()).await;
    wait_settled(&js, &config.events_stream, "collect", first).await;

    let durable = herald_functions::durable::durable_name("collect");
    js.delete_consumer_from_stream(&durable, &config.events_stream).await.expect("deleted");
    publish_event(&js, "events.test.a", json!({ "n": 2 }).to_string()).await;
    eventually("the event after the deletion handled", WAIT, || async {
        seen.lock().unwrap().contains(&2).then_some(())
    })
    .await;
    copy.shutdown().await;
}

#[tokio::test]
async fn a_killed_copys_events_go_to_another_copy_and_push_once() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let mut kim = gateway.connect("kim").await;
    let mut config = test_config(&nats);
    // Unacknowledged events come back after this; the crashed copy stops reporting progress.
    config.ack_wait = Duration::from_secs(1);
    let js = nats.jetstream().await;

    // The first copy pushes, then hangs before acknowledging: a crash between the side effect
    // and the ack.
    let pushed_by_first: Seen<String> = recorder();
    let hanging = {
        let (pusher, pushed) = (Pusher::new(js.clone()), pushed_by_first.clone());
        Function::events("forward", ["events.test.>"], move |event: Event| {
            let (pusher, pushed) = (pusher.clone(), pushed.clone());
            async move {
                pusher.push(&event.id, &Audience::User("kim".into()), Some("chat"), event.payload.clone()).await?;
                pushed.lock().unwrap().push(event.id.clone());
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .concurrency(2)
        .timeout(Duration::from_secs(3600))
    };
    let first = start(&nats, &config, vec![hanging]).await;
    let sent = 6;
    let mut last = 0;
    for n in 0..sent {
        last = publish_event(&js, "events.test.kim", json!({ "n": n }).to_string()).await;
    }
    eventually("the first copy pushed and hung twice", WAIT, || async {
        (pushed_by_first.lock().unwrap().len() == 2).then_some(())
    })
    .await;
    first.kill().await;

    // The second copy handles everything, including the two events the first one held.
    let handled_by_second: Seen<(String, bool)> = recorder();
    let forwarding = {
        let (pusher, handled) = (Pusher::new(js.clone()), handled_by_second.clone());
        Function::events("forward", ["events.test.>"], move |event: Event| {
            let (pusher, handled) = (pusher.clone(), handled.clone());
            async move {
                let to = Audience::User("kim".into());
                let ack = pusher.push(&event.id, &to, Some("chat"), event.payload.clone()).await?;
                handled.lock().unwrap().push((event.id.clone(), ack.duplicate));
                Ok(())
            }
        })
    };
    let second = start(&nats, &config, vec![forwarding]).await;
    wait_settled(&js, &config.events_stream, "forward", last).await;

    let handled = handled_by_second.lock().unwrap().clone();
    let ids: BTreeSet<_> = handled.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), sent, "every event handled by the second copy: {handled:?}");
    let duplicates: BTreeSet<_> =
        handled.iter().filter(|(_, duplicate)| *duplicate).map(|(id, _)| id.clone()).collect();
    let pushed_first: BTreeSet<_> = pushed_by_first.lock().unwrap().iter().cloned().collect();
    assert_eq!(duplicates, pushed_first, "exactly the first copy's pushes were repeats, and deduplicated");
    // The stream holds one push per event, and kim receives each once.
    assert_eq!(stored_counts(&js, STREAM, "push.user.kim").await.get("push.user.kim"), Some(&sent));
    let mut received = BTreeSet::new();
    for _ in 0..sent {
        let msg = kim.expect_msg().await;
        assert_eq!(msg.kind, "chat");
        assert!(received.insert(msg.id.clone()), "msg {} twice", msg.id);
    }
    let sentinel = publish_event(&js, "push.user.kim", "sentinel").await;
    assert_eq!(kim.expect_msg().await.seq, sentinel, "nothing else was delivered in between");
    second.shutdown().await;
}

#[tokio::test]
async fn failures_are_retried_with_backoff_then_dead_lettered() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.max_attempts = 3;
    let attempts: Seen<(String, u64)> = recorder();
    let record = |attempts: &Seen<(String, u64)>, event: &Event| {
        attempts.lock().unwrap().push((event.subject.clone(), event.attempt));
    };
    let functions = {
        let (a, b, c, d) = (attempts.clone(), attempts.clone(), attempts.clone(), attempts.clone());
        vec![
            Function::events("always-fails", ["events.fail.>"], move |event: Event| {
                record(&a, &event);
                async { Err(HandlerError::transient("downstream unavailable")) }
            }),
            Function::events("third-time-lucky", ["events.lucky.>"], move |event: Event| {
                record(&b, &event);
                let attempt = event.attempt;
                async move { if attempt < 3 { Err(HandlerError::transient("not yet")) } else { Ok(()) } }
            }),
            Function::events("rejects", ["events.reject.>"], move |event: Event| {
                record(&c, &event);
                async { Err(HandlerError::permanent("cannot ever work")) }
            }),
            // A second function on the same events gets its own dead letters.
            Function::events("rejects-too", ["events.reject.>"], move |event: Event| {
                record(&d, &event);
                async { Err(HandlerError::permanent("me neither")) }
            }),
        ]
    };
    let runtime = start(&nats, &config, functions).await;
    let js = nats.jetstream().await;

    let failing = publish_event(&js, "events.fail.1", vec![0xff, 0x00]).await;
    let lucky = publish_event(&js, "events.lucky.1", "{}").await;
    let rejected = publish_event(&js, "events.reject.1", r#"{"a":1}"#).await;
    wait_settled(&js, &config.events_stream, "always-fails", failing).await;
    wait_settled(&js, &config.events_stream, "third-time-lucky", lucky).await;
    wait_settled(&js, &config.events_stream, "rejects", rejected).await;
    wait_settled(&js, &config.events_stream, "rejects-too", rejected).await;

    let letters = dead_letters(&js, &config, "always-fails", 1).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.function.as_str(), letter.subject.as_str(), letter.stream.as_str(), letter.seq, letter.attempts),
        ("always-fails", "events.fail.1", "HERALD_EVENTS", failing, 3)
    );
    assert_eq!((letter.error.as_str(), &letter.data), ("downstream unavailable", &json!({"$base64": "/wA="})));
    let rejected_letters = dead_letters(&js, &config, "rejects", 1).await;
    assert_eq!((rejected_letters.len(), rejected_letters[0].attempts), (1, 1));
    assert_eq!(rejected_letters[0].data, json!({"a": 1}));
    let other_letters = dead_letters(&js, &config, "rejects-too", 1).await;
    assert_eq!((other_letters[0].function.as_str(), other_letters[0].seq), ("rejects-too", rejected));
    assert_eq!(stored_counts(&js, &config.dlq_stream, "herald.dlq.third-time-lucky").await.len(), 0);

    let mut seen = attempts.lock().unwrap().clone();
    seen.sort();
    let expected = [("events.fail.1", 1), ("events.fail.1", 2), ("events.fail.1", 3), ("events.lucky.1", 1)];
    let expected: Vec<_> = expected
        .into_iter()
        .chain([("events.lucky.1", 2), ("events.lucky.1", 3), ("events.reject.1", 1), ("events.reject.1", 1)])
        .map(|(subject, attempt)| (subject.to_string(), attempt))
        .collect();
    assert_eq!(seen, expected);
    let counter = |name: &str, function: &str| format!(r#"herald_functions_{name}_total{{function="{function}"}}"#);
    assert_eq!(metric(&runtime, &counter("retries", "always-fails")).await, 2.0);
    assert_eq!(metric(&runtime, &counter("dead_letters", "always-fails")).await, 1.0);
    assert_eq!(metric(&runtime, &counter("dead_letters", "rejects")).await, 1.0);
    assert_eq!(metric(&runtime, &counter("retries", "third-time-lucky")).await, 2.0);
    assert_eq!(metric(&runtime, &counter("dead_letters", "third-time-lucky")).await, 0.0);
    // Probes ask with HEAD: GET's status and length, no body.
    let head = reqwest::Client::new().head(format!("http://{}/metrics", runtime.metrics_addr())).send().await.unwrap();
    let length = head.headers().get("content-length").map(|v| v.to_str().unwrap().to_string());
    assert_eq!((head.status().as_u16(), head.bytes().await.unwrap().len()), (200, 0));
    assert!(length.is_some_and(|l| l != "0"), "HEAD /metrics gives GET's length");
    runtime.shutdown().await;
}

#[tokio::test]
async fn lifecycle_events_reach_each_function_once_across_copies() {
    let nats = TestNats::start().await;
    let config = test_config(&nats);
    let audit: Seen<(String, LifecycleEvent, String)> = recorder();
    let counted: Seen<String> = recorder();
    let auditing = |seen: Seen<(String, LifecycleEvent, String)>| {
        Function::lifecycle("audit", move |event: Event| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((event.subject.clone(), event.lifecycle()?, event.id.clone()));
                Ok(())
            }
        })
    };
    let counting = {
        let counted = counted.clone();
        Function::lifecycle("count", move |event: Event| {
            counted.lock().unwrap().push(event.subject.clone());
            async { Ok(()) }
        })
    };
    let first = start(&nats, &config, vec![auditing(audit.clone()), counting]).await;
    let second = start(&nats, &config, vec![auditing(audit.clone())]).await;
    let gateway_side = nats.client().await;

    let connect = LifecycleEvent {
        user: "ann".into(),
        device: "phone".into(),
        conn: "c7".into(),
        node: "gw-1".into(),
        ts: "2026-01-02T03:04:05Z".into(),
        code: None,
        reason: None,
    };
    let disconnect = LifecycleEvent { code: Some(1000), reason: Some("bye".into()), ..connect.clone() };
    for (subject, event) in [(EVENTS_CONNECT, &connect), (EVENTS_DISCONNECT, &disconnect)] {
        gateway_side.publish(subject, serde_json::to_vec(event).unwrap().into()).await.unwrap();
    }
    gateway_side.flush().await.unwrap();
    eventually("both functions saw both events", WAIT, || async {
        (audit.lock().unwrap().len() >= 2 && counted.lock().unwrap().len() >= 2).then_some(())
    })
    .await;
    // Core NATS never redelivers; a later event arriving proves nothing else was pending.
    let later = LifecycleEvent { conn: "c8".into(), ..connect.clone() };
    gateway_side.publish(EVENTS_CONNECT, serde_json::to_vec(&later).unwrap().into()).await.unwrap();
    eventually("the later event", WAIT, || async {
        (audit.lock().unwrap().len() >= 3 && counted.lock().unwrap().len() >= 3).then_some(())
    })
    .await;

    let mut audited = audit.lock().unwrap().clone();
    audited.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!(
        audited,
        vec![
            (EVENTS_CONNECT.to_string(), connect.clone(), "gw-1:c7:connect".to_string()),
            (EVENTS_DISCONNECT.to_string(), disconnect, "gw-1:c7:disconnect".to_string()),
            (EVENTS_CONNECT.to_string(), later, "gw-1:c8:connect".to_string()),
        ]
    );
    assert_eq!(counted.lock().unwrap().len(), 3);
    first.shutdown().await;
    second.shutdown().await;
}

/// NATS stores any header bytes a publisher sends; the functions' NATS client drops its connection
/// on a delivery whose headers it cannot parse, so such an event came back after every `ack_wait`,
/// for ever, unhandled, cutting every function's connection each time. It is dead-lettered instead,
/// unhandled, and terminated for the function's consumer; the stream keeps it, the events around
/// it are handled, and one on subjects no function takes is left alone.
#[tokio::test]
async fn an_event_the_nats_client_cannot_take_is_dead_lettered_and_ended() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    // Events lost with the connection come back after this.
    config.ack_wait = Duration::from_secs(2);
    let seen = recorder();
    let runtime = start(&nats, &config, vec![collecting("collect", seen.clone())]).await;
    let js = nats.jetstream().await;

    publish_event(&js, "events.test.a", json!({ "n": 1 }).to_string()).await;
    use herald_tests::publish::publish_raw as raw;
    let unparsable = raw(&nats, "events.test.b", &[b"X-Custom: caf\xe9"], br#"{"n":2}"#).await;
    raw(&nats, "events.other.c", &[b"X-Custom: caf\xe9"], br#"{"n":3}"#).await;
    let last = publish_event(&js, "events.test.d", json!({ "n": 4 }).to_string()).await;

    let letters = dead_letters(&js, &config, "collect", 1).await;
    let found: Vec<(u64, &str, u64, &str)> = letters
        .iter()
        .map(|letter| (letter.seq, letter.subject.as_str(), letter.attempts, letter.error.as_str()))
        .collect();
    let why = "the NATS client cannot take it (headers that are not UTF-8), so no handler saw it";
    assert_eq!(found, [(unparsable, "events.test.b", 0, why)]);
    assert_eq!(letters[0].data, json!({ "n": 2 }));
    wait_settled(&js, &config.events_stream, "collect", last).await;
    let mut handled = seen.lock().unwrap().clone();
    handled.sort();
    assert_eq!(handled, vec![1, 4]);
    // The stream keeps every event, the one no function takes too.
    let mut stream = js.get_stream(&config.events_stream).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert_eq!((state.messages, state.last_sequence), (4, last));
    assert_eq!(dead_letters(&js, &config, "collect", 1).await.len(), 1);
    runtime.shutdown().await;
}

/// A carriage return alone in a header value makes the NATS client panic: its connection is gone
/// for good, so the copy says so (`/healthz` answers 503; the binary exits, to be started again),
/// and the next copy to start dead-letters the event before it pulls (it was ended for no one and
/// would stop that copy too), then handles the events after it.
#[tokio::test]
async fn an_event_that_stops_the_nats_client_is_dead_lettered_by_the_next_copy() {
    let nats = TestNats::start().await;
    let config = test_config(&nats);
    let seen = recorder();
    let first = start(&nats, &config, vec![collecting("collect", seen.clone())]).await;
    let js = nats.jetstream().await;
    let poison = herald_tests::publish::publish_raw(&nats, "events.test.a", &[b"X-Trace: a\rb"], br#"{"n":1}"#).await;
    tokio::time::timeout(WAIT, first.nats_client_lost()).await.expect("the first copy's NATS client stopped");
    let health = reqwest::get(format!("http://{}/healthz", first.metrics_addr())).await.unwrap();
    assert_eq!(health.status(), 503);
    let last = publish_event(&js, "events.test.b", json!({ "n": 2 }).to_string()).await;
    // Due again at once (as after `ack_wait`), handed back as the dead copy never could.
    let ack = format!("$JS.ACK.{}.herald-fn-collect.1.{poison}.1.0.0", config.events_stream);
    nats.client().await.request(ack, "-NAK".into()).await.expect("the hand-back taken");

    let second = start(&nats, &config, vec![collecting("collect", seen.clone())]).await;
    let letters = dead_letters(&js, &config, "collect", 1).await;
    let why = "the NATS client cannot take it (a carriage return inside a header value), so no handler saw it";
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].seq, letters[0].error.as_str(), letters[0].attempts), (poison, why, 0));
    wait_settled(&js, &config.events_stream, "collect", last).await;
    assert_eq!(*seen.lock().unwrap(), vec![2]);
    assert_eq!(metric(&second, r#"herald_functions_dead_letters_total{function="collect"}"#).await, 1.0);
    let health = reqwest::get(format!("http://{}/healthz", second.metrics_addr())).await.unwrap();
    assert_eq!(health.status(), 200, "the next copy never pulled the event");
    second.shutdown().await;
    first.kill().await;
}

/// An event ended without a delivery stays in the sweeps' window while an event before it is still
/// being retried; it is dead-lettered once, not again at every sweep (a purged letter came back).
#[tokio::test]
async fn an_event_ended_without_a_delivery_is_dead_lettered_once() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    // A sweep every second while the first event comes again, about once a second.
    config.ack_wait = Duration::from_secs(1);
    (config.retry_initial, config.retry_max, config.max_attempts) =
        (Duration::from_secs(1), Duration::from_secs(1), 100);
    let failing = Function::events("stubborn", ["events.test.>"], |_: Event| async {
        Err::<(), _>(HandlerError::transient("not yet"))
    });
    let runtime = start(&nats, &config, vec![failing]).await;
    let js = nats.jetstream().await;
    publish_event(&js, "events.test.a", json!({ "n": 1 }).to_string()).await;
    let poison = herald_tests::publish::publish_raw(&nats, "events.test.b", &[b"X-Custom: caf\xe9"], b"{}").await;
    let letters = dead_letters(&js, &config, "stubborn", 1).await;
    assert_eq!(letters[0].seq, poison);
    // The letter is stored before its sweep reads the stream's answer and counts it.
    let counted = r#"herald_functions_dead_letters_total{function="stubborn"}"#;
    eventually("the letter counted", WAIT, || async { (metric(&runtime, counted).await == 1.0).then_some(()) }).await;
    // Several sweeps later (the first event retried four times more), still one letter.
    let retries = r#"herald_functions_retries_total{function="stubborn"}"#;
    let now = metric(&runtime, retries).await;
    eventually("four more retries", WAIT, || async { (metric(&runtime, retries).await >= now + 4.0).then_some(()) })
        .await;
    assert_eq!(metric(&runtime, counted).await, 1.0);
    runtime.kill().await;
}

/// A letter whose publish went unanswered may be stored all the same: sent again, the stream calls
/// it a duplicate, and it is still the one letter this copy wrote, so it counts (it did not, and
/// `herald_functions_dead_letters_total` read 0 beside a stored letter on a loaded machine).
#[tokio::test]
async fn a_letter_stored_without_an_answer_counts_once() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.ack_wait = Duration::from_secs(2);
    let letters_subject = herald_shared::subject::dead_letter("collect");
    let filter = herald_tests::nats_filter::NatsFilter::start(&nats, &letters_subject).await;
    let runtime = start_at(&filter.url(), &config, vec![collecting("collect", recorder())]).await;
    let js = nats.jetstream().await;
    filter.drop_publishes();
    let poison = herald_tests::publish::publish_raw(&nats, "events.test.a", &[b"X-Custom: caf\xe9"], b"{}").await;
    // The copy's letter goes unanswered; as if it had been stored, the same letter is.
    filter.wait_dropped(1).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("collect:{}-{poison}", config.events_stream).as_str());
    let letter = DeadLetter {
        function: "collect".into(),
        subject: "events.test.a".into(),
        stream: config.events_stream.clone(),
        seq: poison,
        attempts: 0,
        error: "the first try".into(),
        data: json!({}),
        payload: None,
        ts: "2026-12-07T00:00:00Z".into(),
    };
    let letter = serde_json::to_vec(&letter).unwrap();
    js.publish_with_headers(letters_subject, headers, letter.into()).await.unwrap().await.expect("stored");
    filter.pass_publishes();

    wait_settled(&js, &config.events_stream, "collect", poison).await;
    assert_eq!(dead_letters(&js, &config, "collect", 1).await.len(), 1);
    assert_eq!(metric(&runtime, r#"herald_functions_dead_letters_total{function="collect"}"#).await, 1.0);
    runtime.kill().await;
}
