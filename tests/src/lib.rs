//! Test harness: a real NATS server with JetStream, gateways running in-process on ephemeral ports,
//! WebSocket clients from a different implementation than the server's (tokio-tungstenite), and
//! push-function runtimes in-process.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod functions;
pub mod gateway;
pub mod images;
pub mod kv;
pub mod nats;
pub mod nats_filter;
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

/// A free TCP port (bound on every address, then released) for a server a test starts. It is
/// below the kernel's range of ports for outgoing connections, so that no connection of another
/// test takes it before the server binds it, and not handed out before by this process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let outgoing_low = outgoing_ports_start();
    if outgoing_low <= LOWEST + 1_000 {
        return std::net::TcpListener::bind("0.0.0.0:0").and_then(|l| l.local_addr()).expect("a free port").port();
    }
    let span = outgoing_low - LOWEST;
    // Processes running at once start at different places.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::UNIX_EPOCH.elapsed().unwrap_or_default().subsec_nanos();
    let _ = NEXT.compare_exchange(0, seed % span + 1, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = LOWEST + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        if std::net::TcpListener::bind(("0.0.0.0", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port between {LOWEST} and {outgoing_low}");
}

/// Where the kernel's ports for outgoing connections start (Linux's default when unknown).
fn outgoing_ports_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
