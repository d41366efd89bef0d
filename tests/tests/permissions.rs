//! Least privilege in nats.conf: publishers cannot read deliveries or the stream, gateways cannot
//! publish pushes, nobody gets in without a password.

use std::time::Duration;

use async_nats::{ConnectErrorKind, Event};
use futures::StreamExt;
use herald_tests::nats::Role;
use herald_tests::{Publisher, TestNats, eventually};
use tokio::sync::mpsc;

/// A connection as `role` whose server errors (permission violations) are collected.
async fn watched_client(nats: &TestNats, role: Role) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (errors, received) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(role.user().into(), role.password())
        .event_callback(move |event| {
            let errors = errors.clone();
            async move {
                if let Event::ServerError(error) = event {
                    let _ = errors.send(error.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .expect("connect");
    (client, received)
}

async fn violation(errors: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), errors.recv()).await.expect("a server error").unwrap()
}

#[tokio::test]
async fn a_publisher_can_publish_but_cannot_read_deliveries_or_the_stream() {
    let nats = TestNats::start().await;
    let _gateway = herald_tests::TestGateway::start(&nats).await; // creates the stream
    let (client, mut errors) = watched_client(&nats, Role::Publisher).await;

    // Subscribing to the republish is refused by the server...
    let mut spy = client.subscribe("herald.deliver.>").await.unwrap();
    let error = violation(&mut errors).await;
    assert!(error.to_lowercase().contains("permissions violation"), "{error}");
    assert!(error.contains("herald.deliver.>"), "{error}");
    // ...and gets nothing: a message to a user is stored, then a marker on an allowed subject
    // arrives while the spy subscription stays empty.
    let mut markers = client.subscribe("_INBOX.marker").await.unwrap();
    let seq = Publisher::new(&nats).await.publish("push.user.victim", "secret").await;
    assert!(seq > 0);
    let admin = nats.client().await;
    admin.publish("_INBOX.marker", "after".into()).await.unwrap();
    admin.flush().await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), markers.next()).await.unwrap().unwrap().payload, "after");
    assert!(futures::FutureExt::now_or_never(spy.next()).is_none(), "the publisher read a delivery");

    // Reading the stream directly is refused too.
    let js = async_nats::jetstream::new(client.clone());
    let denied = tokio::time::timeout(Duration::from_secs(10), async {
        js.get_stream("HERALD").await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    assert!(!matches!(denied, Ok(Ok(()))), "the publisher read the stream's info");
    let error = violation(&mut errors).await;
    assert!(error.to_lowercase().contains("permissions violation"), "{error}");

    // Operators' replies, on their own prefix, are out of reach (the default `_INBOX` is not).
    let _admin_replies = client.subscribe("_INBOX_admin.>").await.unwrap();
    let error = violation(&mut errors).await;
    assert!(error.to_lowercase().contains("permissions violation") && error.contains("_INBOX_admin"), "{error}");

    // A misspelt push subject, which the stream would not store, is refused out loud.
    for subject in ["push.users.victim", "push.user.victim.x", "push.topics.news"] {
        client.publish(subject, "lost?".into()).await.unwrap();
        client.flush().await.unwrap();
        let error = violation(&mut errors).await;
        assert!(error.to_lowercase().contains("permissions violation") && error.contains(subject), "{error}");
    }
    assert!(Publisher::new(&nats).await.publish("push.topic.news", "fine").await > seq);
    assert!(Publisher::new(&nats).await.publish("push.all", "fine").await > seq);
}

#[tokio::test]
async fn a_gateway_cannot_publish_pushes_and_functions_cannot_read_deliveries() {
    let nats = TestNats::start().await;
    let _gateway = herald_tests::TestGateway::start(&nats).await;
    let admin = nats.jetstream().await;
    let before = admin.get_stream("HERALD").await.unwrap().cached_info().state.last_sequence;

    let (gateway, mut errors) = watched_client(&nats, Role::Gateway).await;
    gateway.publish("push.user.victim", "forged".into()).await.unwrap();
    let error = violation(&mut errors).await;
    assert!(error.to_lowercase().contains("permissions violation") && error.contains("push.user.victim"), "{error}");
    // Nothing was stored: a real publish right after gets the next sequence.
    let next = Publisher::new(&nats).await.publish("push.user.victim", "real").await;
    assert_eq!(next, before + 1);

    let (functions, mut errors) = watched_client(&nats, Role::Functions).await;
    let _spy = functions.subscribe("herald.deliver.>").await.unwrap();
    let error = violation(&mut errors).await;
    assert!(error.to_lowercase().contains("permissions violation"), "{error}");
}

#[tokio::test]
async fn nobody_connects_without_the_right_password() {
    let nats = TestNats::start().await;
    let wrong =
        async_nats::ConnectOptions::with_user_and_password("gateway".into(), "guess".into()).connect(nats.url()).await;
    assert_eq!(wrong.err().map(|e| e.kind()), Some(ConnectErrorKind::AuthorizationViolation));
    let anonymous = async_nats::connect(nats.url()).await;
    assert_eq!(anonymous.err().map(|e| e.kind()), Some(ConnectErrorKind::AuthorizationViolation));
    // The right one works.
    eventually("the gateway user connects", Duration::from_secs(10), || async {
        nats.client_as(Role::Gateway).await.ok().map(|_| ())
    })
    .await;
}
