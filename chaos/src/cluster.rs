//! A three-node NATS cluster in containers of the local NATS image (the tests' image, built when
//! absent), configured by the repository's `nats-cluster.conf`.
//!
//! Each node sits on two Docker networks of the run's own: `clients`, where its client and
//! monitoring ports are published on 127.0.0.1 (the gateways and publishers connect there), and
//! `routes`, where the nodes reach each other under an alias that exists only on that network. So
//! disconnecting a node from `routes` cuts it off from the other nodes while its clients still
//! reach it: a real partition, with a minority node that still accepts connections.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use herald_shared::subject::STREAM;
use herald_tests::nats::Role;
use serde_json::Value;

use crate::docker::{docker, docker_quietly, save_logs};
use crate::http;

/// Nodes of the cluster.
pub const NODES: usize = 3;
/// How long the cluster may take to start and elect its JetStream leader.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one request to the JetStream API may take.
const API_TIMEOUT: Duration = Duration::from_secs(3);

/// One NATS node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its `server_name` (`n1`…), as stream info names the leader and the replicas.
    pub name: String,
    /// Its container.
    pub container: String,
    /// Its host name on the routes network.
    route_host: String,
    /// Host port of its client listener (4222).
    client_port: u16,
    /// Host port of its monitoring listener (8222).
    monitor_port: u16,
}

impl Node {
    /// Its monitoring listener on the host.
    fn monitor_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.monitor_port))
    }
}

/// A running cluster; its containers and networks are removed when it is dropped.
pub struct Cluster {
    nodes: Vec<Node>,
    clients_network: String,
    routes_network: String,
}

impl Cluster {
    /// Starts three nodes named after `run_id` and waits until JetStream answers.
    /// `scratch` is a directory for the configuration copied into the containers.
    pub async fn start(run_id: &str, scratch: &Path) -> Result<Cluster> {
        let image =
            tokio::task::spawn_blocking(herald_tests::nats::image_name).await.context("build the NATS image")?;
        let nodes: Vec<Node> = (1..=NODES)
            .map(|n| {
                let container = format!("{run_id}-n{n}");
                let route_host = format!("{container}-route");
                let (client_port, monitor_port) = (herald_tests::free_port(), herald_tests::free_port());
                Node { name: format!("n{n}"), container, route_host, client_port, monitor_port }
            })
            .collect();
        let cluster =
            Cluster { nodes, clients_network: format!("{run_id}-clients"), routes_network: format!("{run_id}-routes") };
        // From here on, dropping `cluster` removes whatever was created.
        for network in [&cluster.clients_network, &cluster.routes_network] {
            docker(&["network", "create", "--label", "herald-chaos", network]).await?;
        }
        let config = copy_config(scratch)?;
        for node in &cluster.nodes {
            cluster.create(node, &image, &config).await.with_context(|| format!("start NATS node {}", node.name))?;
        }
        cluster.wait_jetstream().await?;
        Ok(cluster)
    }

    /// Creates and starts `node`'s container.
    async fn create(&self, node: &Node, image: &str, config: &Path) -> Result<()> {
        let routes: Vec<String> = self.nodes.iter().map(|node| format!("nats://{}:6222", node.route_host)).collect();
        let mut args: Vec<String> =
            ["create", "--name", &node.container, "--label", "herald-chaos"].into_iter().map(String::from).collect();
        args.extend(["--network".into(), self.clients_network.clone()]);
        args.extend(["-p".into(), format!("127.0.0.1:{}:4222", node.client_port)]);
        args.extend(["-p".into(), format!("127.0.0.1:{}:8222", node.monitor_port)]);
        let mut env = vec![
            ("HERALD_NATS_NAME".to_string(), node.name.clone()),
            ("HERALD_NATS_CLUSTER_LISTEN".to_string(), "0.0.0.0:6222".to_string()),
            ("HERALD_NATS_ROUTES".to_string(), format!("[{}]", routes.join(", "))),
        ];
        env.extend(Role::ALL.iter().map(|role| (role.password_variable(), role.password())));
        for (key, value) in env {
            args.extend(["-e".into(), format!("{key}={value}")]);
        }
        args.push(image.to_string());
        // Clients get every node's host port; the nodes' own addresses are not for them. Routes are
        // advertised under the routes network's alias, so no route goes over the clients network.
        args.extend(
            ["-c", "/etc/herald/nats-cluster.conf", "-sd", "/data/jetstream", "--no_advertise"].map(String::from),
        );
        args.extend(["--cluster_advertise".into(), format!("{}:6222", node.route_host)]);
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        docker(&["cp", &format!("{}/.", config.display()), &format!("{}:/etc/herald", node.container)]).await?;
        self.join_routes(node).await?;
        docker(&["start", &node.container]).await?;
        Ok(())
    }

    /// Waits until every node answers and JetStream takes API requests.
    async fn wait_jetstream(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(client) = self.connect(Role::Admin, "herald-chaos start").await
                && async_nats::jetstream::new(client).query_account().await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the NATS cluster's JetStream is not available after {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every node's client URL, comma-separated (what gateways and publishers are given).
    pub fn url(&self) -> String {
        self.nodes.iter().map(|node| format!("nats://127.0.0.1:{}", node.client_port)).collect::<Vec<_>>().join(",")
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `name`'s client URL.
    pub fn node_url(&self, name: &str) -> Result<String> {
        Ok(format!("nats://127.0.0.1:{}", self.node(name)?.client_port))
    }

    /// A connection as `role`'s user to any node, reconnecting to any of them forever.
    pub async fn connect(&self, role: Role, name: &str) -> Result<async_nats::Client> {
        connect(&self.url(), role, name).await
    }

    /// A connection as `role`'s user to node `node` alone.
    pub async fn connect_to_node(&self, node: &str, role: Role, name: &str) -> Result<async_nats::Client> {
        connect(&self.node_url(node)?, role, name).await
    }

    fn node(&self, name: &str) -> Result<&Node> {
        self.nodes.iter().find(|node| node.name == name).with_context(|| format!("no NATS node {name}"))
    }

    /// Kills node `name` as a crash would: SIGKILL, no goodbye to routes or clients.
    pub async fn kill(&self, name: &str) -> Result<()> {
        docker(&["kill", "--signal", "KILL", &self.node(name)?.container]).await.map(|_| ())
    }

    /// Starts node `name` again (same ports, same JetStream store).
    pub async fn restart(&self, name: &str) -> Result<()> {
        docker(&["start", &self.node(name)?.container]).await.map(|_| ())
    }

    /// Cuts node `name` off from the other nodes; its clients still reach it.
    pub async fn isolate(&self, name: &str) -> Result<()> {
        docker(&["network", "disconnect", &self.routes_network, &self.node(name)?.container]).await.map(|_| ())
    }

    /// Connects node `name` to the other nodes again.
    pub async fn rejoin(&self, name: &str) -> Result<()> {
        self.join_routes(self.node(name)?).await
    }

    async fn join_routes(&self, node: &Node) -> Result<()> {
        docker(&["network", "connect", "--alias", &node.route_host, &self.routes_network, &node.container])
            .await
            .map(|_| ())
    }

    /// The node holding the client connection named `connection` (per its `/connz`), if any.
    pub async fn node_of_connection(&self, connection: &str) -> Option<String> {
        for node in &self.nodes {
            let Some(connz) = http::get_json(node.monitor_addr(), "/connz?limit=4096").await else { continue };
            let connections = connz["connections"].as_array().cloned().unwrap_or_default();
            if connections.iter().any(|c| c["name"].as_str() == Some(connection)) {
                return Some(node.name.clone());
            }
        }
        None
    }

    /// The stream's state as `$JS.API.STREAM.INFO.HERALD` reports it.
    pub async fn stream_info(&self, admin: &async_nats::Client) -> Result<Value> {
        let subject = format!("$JS.API.STREAM.INFO.{STREAM}");
        let reply = tokio::time::timeout(API_TIMEOUT, admin.request(subject, Default::default()))
            .await
            .context("stream info timed out")?
            .context("stream info")?;
        let info: Value = serde_json::from_slice(&reply.payload).context("stream info is not JSON")?;
        if let Some(error) = info.get("error") {
            bail!("stream info: {error}");
        }
        Ok(info)
    }

    /// The node leading the stream, if it has a leader.
    pub async fn stream_leader(&self, admin: &async_nats::Client) -> Result<Option<String>> {
        let info = self.stream_info(admin).await?;
        Ok(info["cluster"]["leader"].as_str().map(String::from))
    }

    /// What keeps the cluster from being whole: nodes whose `/healthz` fails, a stream without a
    /// leader, replicas that are not current. Empty when all is well.
    pub async fn problems(&self, admin: &async_nats::Client) -> Vec<String> {
        let mut problems = Vec::new();
        for node in &self.nodes {
            if !http::is_ok(node.monitor_addr(), "/healthz").await {
                problems.push(format!("{} not healthy", node.name));
            }
        }
        match self.stream_info(admin).await {
            Err(error) => problems.push(format!("{error:#}")),
            Ok(info) => {
                let cluster = &info["cluster"];
                if cluster["leader"].as_str().is_none() {
                    problems.push("the stream has no leader".into());
                }
                let replicas = cluster["replicas"].as_array().cloned().unwrap_or_default();
                if replicas.len() + 1 < NODES {
                    problems.push(format!("the stream has {} followers", replicas.len()));
                }
                for replica in replicas.iter().filter(|replica| replica["current"] != true) {
                    problems.push(format!("replica {} is not current", replica["name"]));
                }
            }
        }
        problems
    }

    /// Writes every node's log to `dir/nats-<node>.log`.
    pub async fn save_logs(&self, dir: &Path) {
        for node in &self.nodes {
            let path = dir.join(format!("nats-{}.log", node.name));
            if let Err(error) = save_logs(&node.container, &path).await {
                eprintln!("herald-chaos: logs of {}: {error:#}", node.name);
            }
        }
    }
}

/// A connection as `role`'s user to the nodes at `urls` (comma-separated), reconnecting forever.
async fn connect(urls: &str, role: Role, name: &str) -> Result<async_nats::Client> {
    let servers: Vec<async_nats::ServerAddr> =
        urls.split(',').map(|url| url.parse()).collect::<Result<_, _>>().context("a node's URL")?;
    async_nats::ConnectOptions::with_user_and_password(role.user().into(), role.password())
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(servers)
        .await
        .with_context(|| format!("connect to NATS as {}", role.user()))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            docker_quietly(&["rm", "--force", "--volumes", &node.container]);
        }
        docker_quietly(&["network", "rm", &self.clients_network, &self.routes_network]);
    }
}

/// Copies the repository's `nats.conf` and `nats-cluster.conf` into `scratch/nats-conf`, the
/// directory copied to `/etc/herald` in each container.
fn copy_config(scratch: &Path) -> Result<std::path::PathBuf> {
    let dir = scratch.join("nats-conf");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for file in ["nats.conf", "nats-cluster.conf"] {
        let source = herald_tests::workspace_root().join(file);
        std::fs::copy(&source, dir.join(file)).with_context(|| format!("copy {}", source.display()))?;
    }
    Ok(dir)
}
