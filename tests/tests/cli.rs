//! The `herald-gateway` binary's tools, run as a newcomer runs them against a real NATS: `pub`
//! answers at once, with a reason and a non-zero exit, when NATS refuses the password or is not there.

use std::process::{Command, Output};

use herald_tests::TestNats;
use herald_tests::nats::Role;

/// Runs `herald-gateway pub push.user.cli '{"text":"hi"}'` as `user` with `password` against `url`.
fn publish(url: &str, user: &str, password: &str) -> Output {
    Command::new(herald_tests::gateway::binary())
        .args(["pub", "push.user.cli", r#"{"text":"hi"}"#])
        .env("HERALD_NATS_URL", url)
        .env("HERALD_NATS_USER", user)
        .env("HERALD_NATS_PASSWORD", password)
        .env_remove("HERALD_LOG")
        .output()
        .expect("run herald-gateway pub")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn pub_stores_the_message_and_prints_its_seq() {
    let nats = TestNats::start().await;
    // The stream exists once a gateway or the functions made it; here the test makes it.
    herald_shared::stream::ensure_stream(&nats.jetstream().await, &Default::default()).await.expect("stream");
    let output = publish(&nats.url(), Role::Publisher.user(), &Role::Publisher.password());
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "stored: seq 1 (duplicate: false)\n");
}

#[tokio::test]
async fn pub_with_a_wrong_password_says_authorization_violation_at_once() {
    let nats = TestNats::start().await;
    let output = publish(&nats.url(), Role::Publisher.user(), "not-the-password");
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        format!(
            "herald-gateway: authorization violation: NATS at {} refused user publisher (check HERALD_NATS_USER and HERALD_NATS_PASSWORD)\n",
            nats.url()
        )
    );
    assert!(output.stdout.is_empty());
}

#[tokio::test]
async fn pub_with_nats_down_says_cannot_connect_at_once() {
    let url = format!("nats://127.0.0.1:{}", herald_tests::free_port());
    let output = publish(&url, Role::Publisher.user(), &Role::Publisher.password());
    assert_eq!(output.status.code(), Some(2));
    let said = stderr(&output);
    assert!(said.starts_with(&format!("herald-gateway: cannot connect to NATS at {url}: ")), "{said}");
    assert_eq!(said.lines().count(), 1, "one line, not a retry loop: {said}");
}

#[test]
fn token_refuses_claims_a_gateway_would_refuse() {
    let token = |args: &[&str]| {
        Command::new(herald_tests::gateway::binary())
            .arg("token")
            .args(args)
            .arg("--dev")
            .env_remove("HERALD_LOG")
            .output()
            .expect("run herald-gateway token")
    };
    let signed = token(&["--user", "42", "--topics", "sport-*,news"]);
    assert!(signed.status.success(), "{}", stderr(&signed));
    assert_eq!(String::from_utf8_lossy(&signed.stdout).matches('.').count(), 2, "a JWT");
    for args in [
        ["--user", "42", "--topics", "sport.*"],
        ["--user", "a b", "--topics", "news"],
        ["--user", "42", "--ttl", "0s"],
    ] {
        let refused = token(&args);
        assert!(!refused.status.success(), "{args:?} signed");
        assert!(refused.stdout.is_empty() && !stderr(&refused).is_empty(), "{args:?}: {}", stderr(&refused));
    }
}

/// An empty `jwt_secret` (`HERALD_JWT_SECRET=` in a manifest) is no key: the gateway does not
/// start with it, even beside a public key, and `token` does not sign with it.
#[tokio::test]
async fn an_empty_jwt_secret_stops_the_gateway_and_signs_nothing() {
    for args in [&[][..], &["token", "--user", "42"][..]] {
        let run = tokio::process::Command::new(herald_tests::gateway::binary())
            .args(args)
            .env("HERALD_JWT_SECRET", "")
            .env("HERALD_NATS_URL", "nats://127.0.0.1:1")
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env_remove("HERALD_LOG")
            .kill_on_drop(true)
            .output();
        // A gateway that took the empty key would keep trying to reach NATS.
        let output = tokio::time::timeout(std::time::Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("{args:?} still runs after 30 s: it took the empty secret"))
            .expect("run herald-gateway");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(output.stdout.is_empty(), "{args:?} printed {}", String::from_utf8_lossy(&output.stdout));
        assert!(stderr(&output).contains("jwt_secret is empty"), "{args:?}: {}", stderr(&output));
    }
}

/// A kind no path of Herald writes is refused before anything is published.
#[test]
fn pub_refuses_a_kind_with_a_control_character() {
    let output = Command::new(herald_tests::gateway::binary())
        .args(["pub", "push.user.cli", "{}", "--kind", "a\nb"])
        .env("HERALD_NATS_URL", "nats://127.0.0.1:1")
        .env_remove("HERALD_LOG")
        .output()
        .expect("run herald-gateway pub");
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("control character"), "{}", stderr(&output));
}

/// A user NATS does not let publish pushes, or read their acknowledgements, is told so, not that
/// the publish timed out; so is a publish that no stream stores.
#[tokio::test]
async fn pub_says_what_nats_refused_and_when_no_stream_stores_the_subject() {
    let nats = TestNats::start().await;
    let output = publish(&nats.url(), Role::Publisher.user(), &Role::Publisher.password());
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("no stream stores this subject: NATS needs JetStream"), "{}", stderr(&output));

    herald_shared::stream::ensure_stream(&nats.jetstream().await, &Default::default()).await.expect("stream");
    let output = publish(&nats.url(), Role::Gateway.user(), &Role::Gateway.password());
    assert_eq!(output.status.code(), Some(2));
    let said = stderr(&output);
    assert!(said.contains("NATS refused user gateway") && said.contains("push.user.cli"), "{said}");
    let output = publish(&nats.url(), Role::Functions.user(), &Role::Functions.password());
    assert_eq!(output.status.code(), Some(2));
    let said = stderr(&output);
    assert!(
        said.contains("NATS refused user functions the acknowledgement") && said.contains("may be stored"),
        "{said}"
    );
}

/// With JetStream's storage full, `pub` says the message was not stored and why.
#[tokio::test]
async fn pub_says_when_jetstream_has_no_room() {
    let nats = TestNats::start_with_config("jetstream {\n  max_memory_store: 64MB\n  max_file_store: 256KB\n}").await;
    let js = nats.jetstream().await;
    herald_shared::stream::ensure_stream(&js, &Default::default()).await.expect("stream");
    for stored in 0.. {
        assert!(stored < 1000, "1,000 messages of 1 KiB stored in 256 KiB");
        let ack = js.publish("push.user.filler", vec![b'x'; 1024].into()).await.expect("sent");
        if ack.await.is_err() {
            break;
        }
    }
    let output = publish(&nats.url(), Role::Publisher.user(), &Role::Publisher.password());
    assert_eq!(output.status.code(), Some(2));
    let said = stderr(&output);
    assert!(said.contains("JetStream has no room for the message") && said.contains("was not stored"), "{said}");
}

/// Values no gateway can run with are refused at start, naming the setting, instead of running
/// wrongly (a zero heartbeat sent pings without a pause; a zero `sessions_max_age` kept dead
/// gateways' claims for ever).
#[tokio::test]
async fn settings_no_gateway_can_run_with_stop_it_at_start() {
    for (key, value) in [
        ("HERALD_HEARTBEAT", "0s"),
        ("HERALD_SESSIONS_MAX_AGE", "0s"),
        ("HERALD_MAX_FRAME_BYTES", "0"),
        ("HERALD_WRITE_STALL_TIMEOUT", "0s"),
        ("HERALD_WRITE_BATCH_FRAMES", "0"),
        ("HERALD_NODE_ID", ""),
        ("HERALD_NATS_URL", ""),
        ("HERALD_API_KEYS", r#"["k", ""]"#),
        ("HERALD_NATS_TLS_CA", "/nonexistent/ca.pem"),
    ] {
        let run = tokio::process::Command::new(herald_tests::gateway::binary())
            .arg("--dev")
            .env("HERALD_NATS_URL", "nats://127.0.0.1:1")
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env(key, value)
            .env_remove("HERALD_LOG")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(std::time::Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("{key}={value}: still runs after 30 s"))
            .expect("run herald-gateway");
        assert_eq!(output.status.code(), Some(2), "{key}={value}: {}", stderr(&output));
        let setting = key.trim_start_matches("HERALD_").to_lowercase();
        assert!(stderr(&output).contains(&setting), "{key}={value}: {}", stderr(&output));
    }
}

/// A `HERALD_LOG` that is not a log filter stops the gateway at start, naming it, instead of
/// logging at the default and hiding the lines the operator asked for.
#[tokio::test]
async fn a_log_filter_that_does_not_parse_stops_the_gateway_at_start() {
    let run = tokio::process::Command::new(herald_tests::gateway::binary())
        .arg("--dev")
        .env("HERALD_NATS_URL", "nats://127.0.0.1:1")
        .env("HERALD_LISTEN", "127.0.0.1:0")
        .env("HERALD_LOG", "info,herald_gateway=loud")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .expect("still runs after 30 s")
        .expect("run herald-gateway");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let said = stderr(&output);
    assert!(
        said.starts_with("herald-gateway: HERALD_LOG=\"info,herald_gateway=loud\" is not a log filter: "),
        "{said}"
    );
    assert_eq!(said.lines().count(), 1, "{said}");
}
