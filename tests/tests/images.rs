//! The images `scripts/images` builds, run as an operator runs them: the gateway's container reaching
//! NATS by its container name (a static glibc binary in a scratch image, with no NSS library to load),
//! over TLS trusting the image's CA bundle; and the compose stack (`deploy/compose.yaml`) delivering
//! through nginx, then taken down.

use std::time::Duration;

use herald_shared::frame::ServerFrame;
use herald_shared::token::{Claims, issue_hs256, now_secs};
use herald_tests::images::{self, TestStack};
use herald_tests::nats::{Role, ServerTls};
use herald_tests::{Publisher, TestNats, WsClient, eventually, free_port, gateway};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::{Value, json};
use testcontainers::core::IntoContainerPort;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// How long a container or the stack may take to become ready (a cluster elects its leaders first).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A container of the gateway image, its listener mapped to a host port.
struct GatewayContainer {
    container: ContainerAsync<GenericImage>,
    port: u16,
}

impl GatewayContainer {
    /// Starts `image` on `network` as the NATS user `gateway`, with `env` and `files` (path, contents)
    /// added, and waits until `/readyz` says 200.
    async fn start(image: &str, network: &str, env: &[(&str, String)], files: &[(&str, Vec<u8>)]) -> Self {
        let (name, tag) = image.split_once(':').expect("image is name:tag");
        let port = free_port();
        let mut request = GenericImage::new(name, tag)
            .with_exposed_port(8080.tcp())
            .with_mapped_port(port, 8080.tcp())
            .with_network(network)
            .with_env_var("HERALD_NATS_USER", Role::Gateway.user())
            .with_env_var("HERALD_NATS_PASSWORD", Role::Gateway.password())
            .with_env_var("HERALD_JWT_SECRET", gateway::SECRET)
            .with_env_var("HERALD_NODE_ID", "image-gateway");
        for (key, value) in env {
            request = request.with_env_var(*key, value.clone());
        }
        for (path, contents) in files {
            request = request.with_copy_to(*path, contents.clone());
        }
        let container = request.start().await.expect("start the gateway container");
        let gateway = GatewayContainer { container, port };
        let url = format!("http://127.0.0.1:{port}/readyz");
        let ready = async {
            loop {
                if reqwest::get(&url).await.is_ok_and(|response| response.status() == 200) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(READY_TIMEOUT, ready).await.is_err() {
            let log = gateway.container.stderr_to_vec().await.unwrap_or_default();
            panic!(
                "the gateway container is not ready after {READY_TIMEOUT:?}; its log:\n{}",
                String::from_utf8_lossy(&log)
            );
        }
        gateway
    }

    /// Connects `user` and reads the `welcome`, which must come from this container.
    async fn connect(&self, user: &str) -> WsClient {
        let url = format!("ws://127.0.0.1:{}/ws?token={}", self.port, gateway::token(user));
        let mut client = WsClient::connect(&url).await.expect("connection accepted");
        client.expect_welcome().await;
        match &client.welcome {
            Some(ServerFrame::Welcome { node, .. }) => assert_eq!(node, "image-gateway"),
            other => panic!("expected a welcome, got {other:?}"),
        }
        client
    }
}

/// A name of this test run for networks and containers.
fn run_name(test: &str) -> String {
    format!("herald-image-{}-{test}", std::process::id())
}

#[tokio::test]
async fn the_gateway_image_reaches_nats_by_its_container_name_and_delivers() {
    if !images::available("the_gateway_image_reaches_nats_by_its_container_name_and_delivers") {
        return;
    }
    let [image] = images::ensure(&["gateway"]).try_into().unwrap();
    let network = run_name("plain");
    let nats_name = format!("{network}-nats");
    let nats = TestNats::start_on_network(&network, &nats_name).await;
    // A name, not an address: Docker's DNS answers it, through the static binary's getaddrinfo.
    let url = format!("nats://{nats_name}:4222");
    let gateway = GatewayContainer::start(&image, &network, &[("HERALD_NATS_URL", url)], &[]).await;

    let mut client = gateway.connect("ivy").await;
    let seq = Publisher::new(&nats).await.publish("push.user.ivy", r#"{"text":"from a container"}"#).await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (seq, json!({"text": "from a container"})));
}

/// A CA (PEM) and a certificate it signed for `host`.
fn certificates(host: &str) -> (String, ServerTls) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Herald image test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server =
        CertificateParams::new(vec![host.to_string(), "127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    (ca.pem(), ServerTls { cert_pem: server.pem(), key_pem: key.serialize_pem() })
}

/// The certificates in the image's CA bundle (copied out of a created, never started, container).
fn bundle_certificates(image: &str) -> usize {
    let run = |args: &[&str]| {
        let output = std::process::Command::new("docker").args(args).output().expect("run docker");
        assert!(output.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let container = run(&["create", image]);
    let bundle = std::env::temp_dir().join(format!("{container}.crt"));
    run(&["cp", &format!("{container}:/etc/ssl/certs/ca-certificates.crt"), bundle.to_str().unwrap()]);
    run(&["rm", &container]);
    let pem = std::fs::read_to_string(&bundle).expect("the copied bundle");
    let _ = std::fs::remove_file(bundle);
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

#[tokio::test]
async fn the_gateway_image_trusts_its_ca_bundle_for_tls_to_nats() {
    if !images::available("the_gateway_image_trusts_its_ca_bundle_for_tls_to_nats") {
        return;
    }
    let [image] = images::ensure(&["gateway"]).try_into().unwrap();
    // The build machine's authorities are in the image.
    let shipped = bundle_certificates(&image);
    assert!(shipped > 50, "the image's CA bundle holds {shipped} certificates");

    let network = run_name("tls");
    let nats_name = format!("{network}-nats");
    let (ca_pem, server_tls) = certificates(&nats_name);
    let ca_file = std::env::temp_dir().join(format!("{network}-ca.pem"));
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let nats = TestNats::start_tls_on_network(&server_tls, &ca_file, &network, &nats_name).await;
    // The bundle's place holds the test CA, and no nats_tls_ca is set: the gateway trusts NATS through
    // the system bundle of a scratch image, as it trusts a public authority in production.
    let url = format!("nats://{nats_name}:4222");
    let bundle = ("/etc/ssl/certs/ca-certificates.crt", ca_pem.into_bytes());
    let gateway = GatewayContainer::start(&image, &network, &[("HERALD_NATS_URL", url)], &[bundle]).await;

    let mut client = gateway.connect("tess").await;
    let seq = Publisher::new(&nats).await.publish("push.user.tess", r#"{"text":"over TLS"}"#).await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (seq, json!({"text": "over TLS"})));
    let _ = std::fs::remove_file(ca_file);
}

#[tokio::test]
async fn the_compose_stack_delivers_through_nginx_and_comes_down() {
    let test = "the_compose_stack_delivers_through_nginx_and_comes_down";
    if !images::available(test) {
        return;
    }
    images::ensure(&["gateway", "functions", "nats", "nginx"]);
    let Some(stack) = TestStack::up(test) else { return };
    let nginx = format!("127.0.0.1:{}", stack.http_port);

    // nginx answers for the gateways once one is ready (after the cluster elected its leaders).
    eventually("a gateway ready behind nginx", READY_TIMEOUT, || async {
        let response = reqwest::get(format!("http://{nginx}/readyz")).await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;

    // A client through nginx, with a token signed by the stack's secret.
    let claims = Claims { sub: "compose".into(), exp: now_secs() + 3600, topics: vec![] };
    let token = issue_hs256(stack.jwt_secret.as_bytes(), &claims);
    let mut client =
        WsClient::connect(&format!("ws://{nginx}/ws?token={token}")).await.expect("upgraded through nginx");
    client.expect_welcome().await;

    // A backend publishes through gateway-1's HTTP API (its own port, not through nginx); the id makes
    // a retry store nothing twice.
    let http = reqwest::Client::new();
    let publish = format!("http://127.0.0.1:{}/v1/publish", stack.api_port);
    let body = json!({"to": {"user": "compose"}, "id": "compose-1", "data": {"text": "through nginx"}});
    let seq = eventually("a publish through the HTTP API", READY_TIMEOUT, || async {
        let response = http.post(&publish).bearer_auth(&stack.api_key).json(&body).send().await.ok()?;
        if response.status() != 200 {
            return None;
        }
        response.json::<Value>().await.ok()?["seq"].as_u64()
    })
    .await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (seq, json!({"text": "through nginx"})));

    // The functions' container answers an rpc (the built-in prefs.get) through nginx and a gateway;
    // it may still be registering when the gateways are ready.
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    for call in 0.. {
        let id = format!("prefs-{call}");
        client.send_json(json!({"type": "rpc", "id": id, "fn": "prefs.get", "data": {}})).await;
        match client.next_frame().await {
            ServerFrame::RpcResult(result) if result.ok => break,
            ServerFrame::RpcResult(result) => {
                assert!(tokio::time::Instant::now() < deadline, "prefs.get never answered: {result:?}");
            }
            other => panic!("expected an rpc_result, got {other:?}"),
        }
        // Not faster than the gateway's rpc rate (20 calls per second).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    drop(client);
    stack.down();
}
