//! Gateways running in-process, on ephemeral ports, against a test NATS.

use std::net::SocketAddr;
use std::time::Duration;

use herald_gateway::{Config, Gateway};
use herald_shared::token::{Claims, issue_hs256, now_secs};

use crate::nats::Role;
use crate::{Publisher, TestNats, WsClient, eventually};

/// The HS256 secret test gateways accept.
pub const SECRET: &str = "herald-test-secret";

/// A gateway for one test.
pub struct TestGateway {
    gateway: Option<Gateway>,
    pub addr: SocketAddr,
    /// The HTTP API's address, when `api_listen` was set.
    pub api_addr: Option<SocketAddr>,
    pub config: Config,
}

impl TestGateway {
    /// A gateway with test defaults, ready to serve.
    pub async fn start(nats: &TestNats) -> TestGateway {
        Self::start_with(nats, |_| {}).await
    }

    /// A gateway with test defaults changed by `adjust`, ready to serve.
    pub async fn start_with(nats: &TestNats, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        Self::start_on(&nats.url(), adjust).await
    }

    /// A gateway on the NATS server(s) at `nats_url` (comma-separated), with test defaults changed by
    /// `adjust`, ready to serve.
    pub async fn start_on(nats_url: &str, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        let gateway = Self::start_unready(nats_url, adjust).await;
        gateway.wait_ready().await;
        gateway
    }

    /// [`TestGateway::start_on`] without waiting until the gateway is ready.
    pub async fn start_unready(nats_url: &str, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        init_logs();
        let mut config = test_config(nats_url);
        adjust(&mut config);
        let gateway = Gateway::start(config.clone()).await.expect("gateway starts");
        let (addr, api_addr) = (gateway.local_addr(), gateway.api_addr());
        TestGateway { gateway: Some(gateway), addr, api_addr, config }
    }

    /// `ws://…/ws?<query>`.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// `http://…<path>`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<api>/<path>` of the HTTP API.
    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api_addr.expect("the gateway has an HTTP API"))
    }

    /// Connects `user` (device `default`) and reads its `welcome`.
    pub async fn connect(&self, user: &str) -> WsClient {
        self.connect_with(&format!("token={}", token(user))).await
    }

    /// Connects with `query` and reads the `welcome`.
    pub async fn connect_with(&self, query: &str) -> WsClient {
        let mut client = WsClient::connect(&self.ws_url(query)).await.expect("connection accepted");
        client.expect_welcome().await;
        client
    }

    /// The status of `GET /readyz`.
    pub async fn readyz(&self) -> u16 {
        match reqwest::get(self.http_url("/readyz")).await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// The `problems` `GET /readyz` names (none when ready).
    pub async fn readyz_problems(&self) -> Vec<String> {
        let Ok(response) = reqwest::get(self.http_url("/readyz")).await else { return vec!["no answer".into()] };
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        body["problems"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect()
    }

    /// The value of metric `name` (as exported, e.g. `herald_gateway_connections`), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.http_url("/metrics")).await.expect("GET /metrics").text().await.unwrap();
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once(' '))
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| value.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Connections refused with `status` and `reason` (`herald_gateway_connections_refused_total`).
    pub async fn refusals(&self, status: u16, reason: &str) -> f64 {
        self.metric(&format!(r#"herald_gateway_connections_refused_total{{status="{status}",reason="{reason}"}}"#))
            .await
    }

    /// Waits until metric `name` equals `value`.
    pub async fn wait_metric(&self, name: &str, value: f64) {
        eventually(&format!("{name} == {value}"), Duration::from_secs(30), || async {
            (self.metric(name).await == value).then_some(())
        })
        .await;
    }

    /// Publishes `body` to `subject` until this gateway has closed a socket as a slow consumer
    /// (`herald_gateway_slow_consumer_closes_total` reaches 1), for a reader that stopped reading;
    /// returns the sequences published. How much it takes depends on the kernel's socket buffers
    /// (autotuned receive buffers hold tens of MiB on some machines), so it publishes until the
    /// close rather than a fixed amount, at most `max_messages`; then the gateway's write has
    /// stalled, and the close comes when the stall lasted its timeout, however fast that was.
    pub async fn publish_until_slow_consumer_close(
        &self,
        publisher: &Publisher,
        subject: &str,
        body: &str,
        max_messages: usize,
    ) -> Vec<u64> {
        let metric = "herald_gateway_slow_consumer_closes_total";
        let mut published = Vec::new();
        while published.len() < max_messages && self.metric(metric).await < 1.0 {
            for _ in 0..8 {
                published.push(publisher.publish(subject, body).await);
            }
        }
        self.wait_metric(metric, 1.0).await;
        published
    }

    /// Waits until `/readyz` says 200.
    pub async fn wait_ready(&self) {
        eventually("gateway ready", Duration::from_secs(30), || async { (self.readyz().await == 200).then_some(()) })
            .await;
    }

    /// Kills the gateway as a crash would (no close frames), waiting until it stopped.
    pub async fn kill(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.kill();
            gateway.stopped().await;
        }
    }

    /// Starts a graceful shutdown without waiting for it ([`TestGateway::shutdown`] waits).
    pub fn begin_shutdown(&self) {
        if let Some(gateway) = &self.gateway {
            gateway.shutdown();
        }
    }

    /// Graceful shutdown, waiting until the gateway stopped.
    pub async fn shutdown(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown();
            gateway.stopped().await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gateway) = &self.gateway {
            gateway.shutdown();
        }
    }
}

/// The configuration test gateways start from.
pub fn test_config(nats_url: &str) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some(SECRET.to_string()),
        shutdown_grace: Duration::from_secs(5),
        // Every gateway answers presence and disconnect questions within the window in these tests:
        // four times the default, so that a loaded machine does not make one late.
        gather_window: Duration::from_secs(1),
        ..Config::default()
    };
    config.nats.nats_url = nats_url.to_string();
    config.nats.nats_user = Some(Role::Gateway.user().to_string());
    config.nats.nats_password = Some(Role::Gateway.password());
    config
}

/// A token for `user`, valid for an hour, with no topics.
pub fn token(user: &str) -> String {
    token_with(user, &[], 3600)
}

/// A token for `user` allowing `topics`, valid for `ttl_secs` (negative: already expired).
pub fn token_with(user: &str, topics: &[&str], ttl_secs: i64) -> String {
    let exp = (now_secs() as i64 + ttl_secs).max(1) as u64;
    let claims = Claims { sub: user.to_string(), exp, topics: topics.iter().map(|t| t.to_string()).collect() };
    issue_hs256(SECRET.as_bytes(), &claims)
}

/// Logs of in-process gateways and functions go to the test output when `HERALD_TEST_LOG` is set (e.g. `debug`).
pub(crate) fn init_logs() {
    if let Ok(filter) = std::env::var("HERALD_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// The `herald-gateway` binary of this build profile, brought up to date first. Built for the whole
/// workspace (`--workspace`), as scripts/test-browser and herald-bench's smoke test build it: the
/// dependencies' features then do not depend on which package asked, and are those of
/// `cargo test --workspace` but for dev-dependencies' (figment's `test`), so the binary reuses most
/// of what the tests' build compiled.
pub fn binary() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.current_dir(crate::workspace_root()).args(["build", "--quiet", "--workspace", "--bin", "herald-gateway"]);
    if release {
        build.arg("--release");
    }
    assert!(build.status().expect("run cargo build").success(), "cannot build herald-gateway");
    target.join(if release { "release" } else { "debug" }).join("herald-gateway")
}
