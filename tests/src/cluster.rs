//! A three-node NATS cluster for one test, from the repository's `nats-cluster.conf`.
//!
//! With Docker: three containers of the local NATS image on a Docker network of their own, routing
//! to each other by container name, each with its client port mapped to a host port. Without
//! Docker (local runs only; CI requires it): three nats-server processes on 127.0.0.1.

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use crate::nats::{Role, docker_available, image_name};
use crate::{eventually, free_port, workspace_root};

/// Nodes of a test cluster.
pub const NODES: usize = 3;

/// A running three-node cluster.
pub struct TestCluster {
    nodes: Vec<Node>,
}

struct Node {
    /// The node's `server_name`, as stream info reports its leader and replicas.
    name: String,
    /// The host port of its client listener.
    port: u16,
    /// The host port of its monitoring listener (`/connz`).
    monitor_port: u16,
    backend: Backend,
}

enum Backend {
    Container(Box<ContainerAsync<GenericImage>>),
    Process { child: Mutex<Option<Child>>, store: std::path::PathBuf, command: Box<dyn Fn() -> Command + Send + Sync> },
}

impl TestCluster {
    /// Starts three nodes and waits until JetStream has elected its meta leader.
    pub async fn start() -> TestCluster {
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let id = format!("herald-{}-{}", std::process::id(), CLUSTERS.fetch_add(1, Ordering::Relaxed));
        let names: Vec<String> = (1..=NODES).map(|n| format!("{id}-n{n}")).collect();
        let nodes = if docker_available() {
            start_containers(&id, &names).await
        } else {
            assert!(
                std::env::var("HERALD_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "HERALD_REQUIRE_DOCKER=1 but no Docker daemon is reachable"
            );
            start_processes(&names)
        };
        let cluster = TestCluster { nodes };
        eventually("the cluster's JetStream is available", Duration::from_secs(60), || async {
            let client = cluster.client().await?;
            async_nats::jetstream::new(client).query_account().await.ok().map(|_| ())
        })
        .await;
        cluster
    }

    /// Every node's URL, comma-separated (what gateways and clients are given).
    pub fn url(&self) -> String {
        self.nodes.iter().map(|node| format!("nats://127.0.0.1:{}", node.port)).collect::<Vec<_>>().join(",")
    }

    /// The names of the nodes.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.name.clone()).collect()
    }

    /// An admin connection to any live node.
    pub async fn client(&self) -> Option<async_nats::Client> {
        self.client_as(Role::Admin).await
    }

    /// The URL of node `name` alone.
    pub fn node_url(&self, name: &str) -> String {
        format!("nats://127.0.0.1:{}", self.node(name).port)
    }

    /// A connection as `role` to any live node.
    pub async fn client_as(&self, role: Role) -> Option<async_nats::Client> {
        connect(&self.url(), role).await
    }

    /// An admin connection to node `name` alone.
    pub async fn client_of(&self, name: &str) -> Option<async_nats::Client> {
        connect(&self.node_url(name), Role::Admin).await
    }

    /// The name of the node holding the client connection named `connection`, if any node does.
    pub async fn node_of_connection(&self, connection: &str) -> Option<String> {
        for node in &self.nodes {
            let url = format!("http://127.0.0.1:{}/connz?limit=1024", node.monitor_port);
            let Ok(response) = reqwest::get(&url).await else { continue };
            let Ok(connz) = response.json::<serde_json::Value>().await else { continue };
            let connections = connz["connections"].as_array().cloned().unwrap_or_default();
            if connections.iter().any(|c| c["name"].as_str() == Some(connection)) {
                return Some(node.name.clone());
            }
        }
        None
    }

    /// Freezes node `name` (SIGSTOP): its sockets stay open and nothing on them is answered, as
    /// when a network partition cuts it off.
    pub async fn pause(&self, name: &str) {
        match &self.node(name).backend {
            Backend::Container(container) => container.pause().await.expect("pause the node"),
            Backend::Process { child, .. } => signal(child, "-STOP"),
        }
    }

    /// Lets node `name` run again after [`TestCluster::pause`].
    pub async fn unpause(&self, name: &str) {
        match &self.node(name).backend {
            Backend::Container(container) => container.unpause().await.expect("unpause the node"),
            Backend::Process { child, .. } => signal(child, "-CONT"),
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|node| node.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Kills node `name` as a crash would (SIGKILL, no goodbye to its routes or clients).
    pub async fn kill(&self, name: &str) {
        match &self.node(name).backend {
            Backend::Container(container) => container.stop_with_timeout(Some(0)).await.expect("kill the node"),
            Backend::Process { child, .. } => {
                if let Some(mut child) = child.lock().unwrap().take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// Starts node `name` again after [`TestCluster::kill`], with its store, on the same ports.
    pub async fn restart(&self, name: &str) {
        match &self.node(name).backend {
            Backend::Container(container) => container.start().await.expect("restart the node"),
            Backend::Process { child, command, .. } => {
                let spawned = command().spawn().expect("spawn nats-server");
                *child.lock().unwrap() = Some(spawned);
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Backend::Process { child, store, .. } = &node.backend {
                if let Some(mut child) = child.lock().unwrap().take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let _ = std::fs::remove_dir_all(store);
            }
        }
    }
}

async fn connect(urls: &str, role: Role) -> Option<async_nats::Client> {
    let servers: Vec<async_nats::ServerAddr> = urls.split(',').filter_map(|url| url.parse().ok()).collect();
    async_nats::ConnectOptions::with_user_and_password(role.user().into(), role.password())
        .connection_timeout(Duration::from_secs(2))
        .connect(servers)
        .await
        .ok()
}

/// Sends `signal` (as `kill` names it) to a node's process.
fn signal(child: &Mutex<Option<Child>>, signal: &str) {
    let pid = child.lock().unwrap().as_ref().expect("the node runs").id();
    let sent = Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// Containers on network `id`, routing to each other by container name.
async fn start_containers(id: &str, names: &[String]) -> Vec<Node> {
    let image = image_name();
    let (image, tag) = image.split_once(':').expect("image is name:tag");
    let routes = format!("[{}]", names.iter().map(|name| format!("nats://{name}:6222")).collect::<Vec<_>>().join(", "));
    let starts = names.iter().map(|name| {
        let (port, monitor_port) = (free_port(), free_port());
        let mut request = GenericImage::new(image, tag)
            .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
            .with_exposed_port(4222.tcp())
            .with_mapped_port(port, 4222.tcp())
            .with_mapped_port(monitor_port, 8222.tcp())
            .with_copy_to("/etc/herald/nats.conf", workspace_root().join("nats.conf"))
            .with_copy_to("/etc/herald/nats-cluster.conf", workspace_root().join("nats-cluster.conf"))
            // Each node advertises its host port (its address on the Docker network is not for
            // clients): clients given one node learn the others, as in a cluster outside Docker.
            .with_cmd([
                "-c".to_string(),
                "/etc/herald/nats-cluster.conf".into(),
                "-sd".into(),
                "/data/jetstream".into(),
                "--client_advertise".into(),
                format!("127.0.0.1:{port}"),
            ])
            .with_network(id)
            .with_container_name(name)
            .with_env_var("HERALD_NATS_NAME", name)
            .with_env_var("HERALD_NATS_CLUSTER_LISTEN", "0.0.0.0:6222")
            .with_env_var("HERALD_NATS_ROUTES", &routes)
            .with_startup_timeout(Duration::from_secs(60));
        for role in Role::ALL {
            request = request.with_env_var(role.password_variable(), role.password());
        }
        async move {
            let container = request.start().await.expect("start a NATS node container");
            Node { name: name.clone(), port, monitor_port, backend: Backend::Container(Box::new(container)) }
        }
    });
    futures::future::join_all(starts).await
}

/// Processes on 127.0.0.1, each with its own client, monitoring and route ports.
fn start_processes(names: &[String]) -> Vec<Node> {
    let route_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let routes = format!(
        "[{}]",
        route_ports.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect::<Vec<_>>().join(", ")
    );
    names
        .iter()
        .zip(&route_ports)
        .map(|(name, route_port)| {
            let (port, monitor_port) = (free_port(), free_port());
            let store = std::env::temp_dir().join(format!("{name}-store"));
            let (node_name, route_port, routes, store_dir) = (name.clone(), *route_port, routes.clone(), store.clone());
            let command = move || {
                let mut command = Command::new(workspace_root().join(".tools/bin/nats-server"));
                for role in Role::ALL {
                    command.env(role.password_variable(), role.password());
                }
                command
                    .env("HERALD_NATS_NAME", &node_name)
                    .env("HERALD_NATS_CLUSTER_LISTEN", format!("127.0.0.1:{route_port}"))
                    .env("HERALD_NATS_ROUTES", &routes)
                    .args(["-c", workspace_root().join("nats-cluster.conf").to_str().unwrap()])
                    .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor_port.to_string()])
                    .args(["-sd", store_dir.to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                command
            };
            let child = command().spawn().expect("spawn nats-server (run scripts/install-nats)");
            let backend = Backend::Process { child: Mutex::new(Some(child)), store, command: Box::new(command) };
            Node { name: name.clone(), port, monitor_port, backend }
        })
        .collect()
}
