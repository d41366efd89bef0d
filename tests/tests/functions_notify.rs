//! Built-in `notify`: business events on `events.notify.>` become pushes to users, a topic or
//! everyone, once per event id; bad events are dead-lettered at once and push nothing.

use herald_functions::Config;
use herald_shared::subject::{STREAM, header};
use herald_tests::functions::{
    dead_letters, last_push, publish_event, start_builtins, stored_counts, test_config, wait_settled,
};
use herald_tests::{TestGateway, TestNats};
use serde_json::json;

fn notify_only(nats: &TestNats) -> Config {
    let mut config = test_config(nats);
    config.builtins = vec!["notify".into()];
    config
}

#[tokio::test]
async fn notify_pushes_to_the_listed_users_and_to_everyone() {
    let nats = TestNats::start().await;
    let gateway = TestGateway::start(&nats).await;
    let runtime = start_builtins(&notify_only(&nats)).await;
    let js = nats.jetstream().await;
    let mut alice = gateway.connect("alice").await;
    let mut bob = gateway.connect("bob").await;
    let mut carol = gateway.connect("carol").await;

    let to_users =
        json!({"id": "order-7", "to": {"users": ["alice", "bob"]}, "kind": "mail", "data": {"text": "shipped"}});
    publish_event(&js, "events.notify.orders", to_users.to_string()).await;
    for (client, user) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        let msg = client.expect_msg().await;
        assert_eq!(
            (msg.to.as_str(), msg.id.as_str(), msg.kind.as_str()),
            ("user", &*format!("order-7:user:{user}"), "mail")
        );
        assert_eq!(msg.data, json!({"text": "shipped"}));
    }

    let to_all = json!({"id": "maint-1", "to": {"all": true}, "kind": "ops", "data": "down at noon"});
    publish_event(&js, "events.notify.ops", to_all.to_string()).await;
    // carol's first message is the broadcast: she never got the users' one.
    for client in [&mut alice, &mut bob, &mut carol] {
        let msg = client.expect_msg().await;
        assert_eq!((msg.to.as_str(), msg.id.as_str(), msg.kind.as_str()), ("all", "maint-1:all", "ops"));
        assert_eq!(msg.data, json!("down at noon"));
    }
    runtime.shutdown().await;
}

#[tokio::test]
async fn notify_to_a_topic_is_stored_for_the_topic() {
    let nats = TestNats::start().await;
    let runtime = start_builtins(&notify_only(&nats)).await;
    let js = nats.jetstream().await;

    let event = json!({"id": "edition-9", "to": {"topic": "news"}, "kind": "digest", "data": {"headline": "hi"}});
    publish_event(&js, "events.notify.news", event.to_string()).await;
    let stored = last_push(&js, "push.topic.news").await;
    assert_eq!(stored.headers.get(header::NATS_MSG_ID).map(|v| v.as_str()), Some("edition-9:topic:news"));
    assert_eq!(stored.headers.get(header::HERALD_TYPE).map(|v| v.as_str()), Some("digest"));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&stored.payload).unwrap(), json!({"headline": "hi"}));
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_republished_notification_pushes_once_and_an_event_without_id_uses_its_sequence() {
    let nats = TestNats::start().await;
    let config = notify_only(&nats);
    let runtime = start_builtins(&config).await;
    let js = nats.jetstream().await;

    let event = json!({"id": "welcome-dave", "to": {"users": ["dave", "dave"]}, "data": {"text": "hello"}});
    publish_event(&js, "events.notify.signup", event.to_string()).await;
    let again = publish_event(&js, "events.notify.signup", event.to_string()).await;
    let anonymous = json!({"to": {"users": ["erin"]}, "data": 1});
    let anonymous_seq = publish_event(&js, "events.notify.signup", anonymous.to_string()).await;
    wait_settled(&js, &config.events_stream, "notify", again.max(anonymous_seq)).await;

    assert_eq!(stored_counts(&js, STREAM, "push.user.dave").await.get("push.user.dave"), Some(&1));
    let stored = last_push(&js, "push.user.erin").await;
    let expected = format!("HERALD_EVENTS-{anonymous_seq}:user:erin");
    assert_eq!(stored.headers.get(header::NATS_MSG_ID).map(|v| v.as_str()), Some(expected.as_str()));
    assert_eq!(stored.headers.get(header::HERALD_TYPE), None);
    runtime.shutdown().await;
}

#[tokio::test]
async fn bad_notifications_are_dead_lettered_at_once_and_push_nothing() {
    let nats = TestNats::start().await;
    let config = notify_only(&nats);
    let runtime = start_builtins(&config).await;
    let js = nats.jetstream().await;

    let bad = [
        "not json".to_string(),
        json!({"id": "x1", "to": {"users": ["ok", "*"]}, "data": 1}).to_string(),
        json!({"id": "x2", "to": {"topic": "a.b"}, "data": 1}).to_string(),
        json!({"id": "x3", "to": {"users": ["ok"]}, "kind": "a\nb", "data": 1}).to_string(),
        json!({"id": "x4", "to": {"all": true}}).to_string(),
    ];
    let mut last = 0;
    for body in &bad {
        last = publish_event(&js, "events.notify.bad", body.clone()).await;
    }
    wait_settled(&js, &config.events_stream, "notify", last).await;

    let letters = dead_letters(&js, &config, "notify", bad.len()).await;
    assert_eq!(letters.len(), bad.len());
    assert!(letters.iter().all(|letter| letter.attempts == 1), "{letters:?}");
    assert_eq!(letters[0].data, json!("not json"));
    assert!(letters[0].error.starts_with("bad JSON"), "{}", letters[0].error);
    assert!(letters[1].error.contains("user id"), "{}", letters[1].error);
    // Nothing reached the push stream, not even for the valid user of a bad event.
    let pushes = stored_counts(&js, STREAM, "push.>").await;
    assert!(pushes.is_empty(), "{pushes:?}");
    runtime.shutdown().await;
}

#[tokio::test]
async fn notify_to_many_users_stores_one_push_per_user() {
    let nats = TestNats::start().await;
    let config = notify_only(&nats);
    let runtime = start_builtins(&config).await;
    let js = nats.jetstream().await;

    // More users than pushes in flight at once (256), so the pipeline refills.
    let users: Vec<String> = (0..500).map(|n| format!("member-{n:03}")).collect();
    let event = json!({"id": "newsletter-1", "to": {"users": users}, "kind": "news", "data": {"issue": 1}});
    let seq = publish_event(&js, "events.notify.newsletter", event.to_string()).await;
    wait_settled(&js, &config.events_stream, "notify", seq).await;
    // Republished: every push is a duplicate, nothing new is stored.
    let again = publish_event(&js, "events.notify.newsletter", event.to_string()).await;
    wait_settled(&js, &config.events_stream, "notify", again).await;

    let stored = stored_counts(&js, STREAM, "push.>").await;
    let expected: std::collections::BTreeMap<String, usize> =
        users.iter().map(|user| (format!("push.user.{user}"), 1)).collect();
    assert_eq!(stored, expected);
    let last = last_push(&js, "push.user.member-499").await;
    assert_eq!(last.headers.get(header::NATS_MSG_ID).map(|v| v.as_str()), Some("newsletter-1:user:member-499"));
    assert!(stored_counts(&js, &config.dlq_stream, "herald.dlq.>").await.is_empty());
    runtime.shutdown().await;
}

/// A copy started with notify subjects outside `events_subjects`, or with no events subjects at
/// all, is refused before it touches anything: the durable consumer every copy shares keeps its
/// filter and the events stream its subjects (a copy that moved them made the others skip the
/// events stored meanwhile, for good).
#[tokio::test]
async fn a_copy_consuming_outside_the_events_subjects_is_refused_and_changes_nothing() {
    let nats = TestNats::start().await;
    let good = notify_only(&nats);
    let runtime = start_builtins(&good).await;
    let js = nats.jetstream().await;
    let shared_state = async || {
        let mut stream = js.get_stream("HERALD_EVENTS").await.unwrap();
        let consumer = stream.consumer_info("herald-fn-notify").await.unwrap().config.filter_subjects.clone();
        (stream.info().await.unwrap().config.subjects.clone(), consumer)
    };
    let before = shared_state().await;
    assert_eq!(before, (vec!["events.>".to_string()], vec!["events.notify.>".to_string()]));

    let mut outside = good.clone();
    outside.notify_subjects = vec!["other.>".into()];
    let mut no_events = good.clone();
    no_events.events_subjects = Vec::new();
    for bad in [outside, no_events] {
        let refused = herald_functions::start(&bad).await.err().expect("refused at start");
        assert!(matches!(refused, herald_functions::StartError::Config(_)), "{refused}");
    }
    assert_eq!(shared_state().await, before);
    runtime.shutdown().await;
}
