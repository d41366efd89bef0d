//! Built-in `prefs.get` / `prefs.set`: the caller's own muted kinds in KV `herald-prefs`, the
//! caller always taken from `Herald-User`, never from the body.

use herald_shared::id::kv_key;
use herald_shared::subject::KV_PREFS;
use herald_tests::TestNats;
use herald_tests::functions::{RpcAnswer, call, start_builtins, test_config};
use serde_json::json;

async fn stored(js: &async_nats::jetstream::Context, user: &str) -> Option<serde_json::Value> {
    let bucket = js.get_key_value(KV_PREFS).await.expect("the prefs bucket exists");
    let value = bucket.get(kv_key(user)).await.expect("KV get")?;
    Some(serde_json::from_slice(&value).expect("stored JSON"))
}

#[tokio::test]
async fn set_then_get_returns_the_muted_kinds_and_the_kv_holds_them() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.builtins = vec!["prefs".into()];
    let runtime = start_builtins(&config).await;
    let client = nats.client().await;
    let js = nats.jetstream().await;

    let user = "ann@example";
    assert_eq!(
        call(&client, "prefs.get", Some(user), json!(null)).await,
        RpcAnswer { body: json!({"muted": []}), error: None }
    );
    let set = call(&client, "prefs.set", Some(user), json!({"muted": ["marketing", "digest", "marketing"]})).await;
    let expected = json!({"muted": ["marketing", "digest"]});
    assert_eq!(set, RpcAnswer { body: expected.clone(), error: None });
    assert_eq!(call(&client, "prefs.get", Some(user), json!({})).await.body, expected);
    // Stored under the escaped key of the user.
    assert_eq!(kv_key(user), "ann=40example");
    assert_eq!(stored(&js, user).await, Some(expected));
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_body_naming_another_user_changes_only_the_callers_prefs() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.builtins = vec!["prefs".into()];
    let runtime = start_builtins(&config).await;
    let client = nats.client().await;
    let js = nats.jetstream().await;

    call(&client, "prefs.set", Some("bob"), json!({"muted": ["chat"]})).await;
    let forged = call(&client, "prefs.set", Some("mallory"), json!({"user": "bob", "muted": ["mail"]})).await;
    assert_eq!(forged, RpcAnswer { body: json!({"muted": ["mail"]}), error: None });
    assert_eq!(stored(&js, "bob").await, Some(json!({"muted": ["chat"]})));
    assert_eq!(stored(&js, "mallory").await, Some(json!({"muted": ["mail"]})));
    let bob = call(&client, "prefs.get", Some("mallory"), json!({"user": "bob"})).await;
    assert_eq!(bob.body, json!({"muted": ["mail"]}));
    runtime.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_and_missing_identity_are_refused_and_store_nothing() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.builtins = vec!["prefs".into()];
    let runtime = start_builtins(&config).await;
    let client = nats.client().await;
    let js = nats.jetstream().await;

    let too_many: Vec<String> = (0..65).map(|i| format!("k{i}")).collect();
    let bad_bodies = [
        json!({"muted": "marketing"}),
        json!({"muted": [1, 2]}),
        json!({"muted": too_many}),
        json!({"muted": ["x".repeat(129)]}),
        json!({"muted": [""]}),
        json!({"muted": ["a\nb"]}),
        json!({}),
    ];
    for body in bad_bodies {
        let answer = call(&client, "prefs.set", Some("carol"), body.clone()).await;
        assert!(answer.error.is_some(), "{body} was accepted");
    }
    assert_eq!(stored(&js, "carol").await, None);

    for function in ["prefs.get", "prefs.set"] {
        let answer = call(&client, function, None, json!({"muted": []})).await;
        assert_eq!(answer.error.as_deref(), Some("no caller identity: Herald-User is missing"), "{function}");
        let answer = call(&client, function, Some("a.b"), json!({"muted": []})).await;
        assert_eq!(
            answer.error.as_deref(),
            Some(r#"no caller identity: Herald-User "a.b" is no user id"#),
            "{function}"
        );
    }
    runtime.shutdown().await;
}
