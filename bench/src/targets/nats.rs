//! A nats-server process for one target run: its own ports, its own configuration file and, with
//! JetStream, its own store in a temporary directory that goes away with it.

use std::net::SocketAddr;

use anyhow::Result;
use tempfile::TempDir;
use tokio::process::Command;

use super::Tools;
use crate::process::{Spawned, free_port};

/// What the server enables besides core NATS.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsFeatures {
    /// JetStream, with the limits of the repository's `nats.conf`.
    pub jetstream: bool,
    /// The WebSocket listener (plain, no TLS).
    pub websocket: bool,
}

/// A running nats-server.
pub struct NatsServer {
    process: Spawned,
    /// The client port on 127.0.0.1.
    pub port: u16,
    /// The WebSocket port on 127.0.0.1, when enabled.
    pub ws_port: Option<u16>,
    /// Configuration and store; removed after the process.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients (and WebSocket connections).
    pub async fn start(tools: &Tools, features: NatsFeatures, label: &str) -> Result<NatsServer> {
        let dir = tempfile::Builder::new().prefix("herald-bench-nats-").tempdir()?;
        let port = free_port()?;
        let ws_port = if features.websocket { Some(free_port()?) } else { None };
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, config(port, ws_port, features.jetstream.then(|| dir.path().join("store"))))?;
        let mut command = Command::new(&tools.nats_server);
        command.arg("-c").arg(&conf);
        let mut process = Spawned::spawn("nats-server", command, &tools.log_path(label, "nats"))?;
        process.wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        if let Some(ws_port) = ws_port {
            process.wait_listening(SocketAddr::from(([127, 0, 0, 1], ws_port))).await?;
        }
        Ok(NatsServer { process, port, ws_port, dir })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Kills the server and removes its store.
    pub async fn stop(self) {
        self.process.stop().await;
        drop(self.dir);
    }
}

/// The configuration file: the repository's `nats.conf` limits, on ports of its own, without the
/// monitoring port.
fn config(port: u16, ws_port: Option<u16>, store: Option<std::path::PathBuf>) -> String {
    let mut conf = format!("listen: \"127.0.0.1:{port}\"\nmax_payload: 1MB\n");
    if let Some(store) = store {
        conf.push_str(&format!(
            "jetstream {{\n  store_dir: {:?}\n  max_memory_store: 256MB\n  max_file_store: 8GB\n}}\n",
            store.display().to_string()
        ));
    }
    if let Some(ws_port) = ws_port {
        conf.push_str(&format!("websocket {{\n  host: \"127.0.0.1\"\n  port: {ws_port}\n  no_tls: true\n}}\n"));
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_enables_what_is_asked() {
        let conf = config(4222, Some(8443), Some("/tmp/s".into()));
        assert!(conf.contains("listen: \"127.0.0.1:4222\""));
        assert!(conf.contains("store_dir: \"/tmp/s\""));
        assert!(conf.contains("port: 8443"));
        assert!(!config(4222, None, None).contains("jetstream"));
    }
}
