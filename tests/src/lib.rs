//! Test harness: a real NATS server with JetStream, gateways running in-process on ephemeral ports,
//! WebSocket clients from a different implementation than the server's (tokio-tungstenite), and
//! push-function runtimes in-process.

pub mod cluster;
pub mod functions;
pub mod gateway;
pub mod images;
pub mod nats;
pub mod nginx;
pub mod publish;
pub mod sdk;
pub mod sse;
pub mod stomp;
pub mod wait;
pub mod ws;

pub use cluster::TestCluster;
pub use gateway::TestGateway;
pub use nats::TestNats;
pub use publish::Publisher;
pub use wait::eventually;
pub use ws::WsClient;

/// The workspace root (where nats.conf and .tools live).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}
