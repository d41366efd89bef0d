//! Real nginx (Debian's binary) as a process in front of test gateways, configured with the sample
//! users copy, `deploy/nginx/herald.conf`: only its `listen` address and its upstream servers are
//! replaced. The harness wraps it in a main configuration of its own (pid, logs and temp files in a
//! temporary directory), as `/etc/nginx/nginx.conf` includes `conf.d/*.conf`.
//!
//! Without nginx the tests that need it print a note and pass, unless `HERALD_REQUIRE_NGINX=1` or
//! `HERALD_REQUIRE_DOCKER=1` (CI) makes that an error. `HERALD_NGINX` names another binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{eventually, free_port, workspace_root};

/// The upstream blocks of the sample whose servers are replaced.
const UPSTREAMS: [&str; 3] = ["herald_gateways", "herald_gateways_sticky", "herald_gateways_sockjs"];

/// The sample configuration: `deploy/nginx/herald.conf`.
pub fn sample_path() -> PathBuf {
    workspace_root().join("deploy/nginx/herald.conf")
}

/// The nginx binary: `HERALD_NGINX`, `nginx` on the PATH, or `/usr/sbin/nginx`; `None` when none runs.
pub fn binary() -> Option<PathBuf> {
    let candidates = match std::env::var("HERALD_NGINX") {
        Ok(path) if !path.is_empty() => vec![PathBuf::from(path)],
        _ => vec![PathBuf::from("nginx"), PathBuf::from("/usr/sbin/nginx")],
    };
    candidates.into_iter().find(|candidate| {
        Command::new(candidate)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

/// Whether nginx must be there (CI): `HERALD_REQUIRE_NGINX=1` or `HERALD_REQUIRE_DOCKER=1`.
pub fn required() -> bool {
    ["HERALD_REQUIRE_NGINX", "HERALD_REQUIRE_DOCKER"].iter().any(|name| std::env::var(name).as_deref() == Ok("1"))
}

/// Whether nginx is installed. When it is not: panics if it is [`required`], otherwise prints a loud
/// note so that the calling test can return early (skip).
pub fn available(test: &str) -> bool {
    if binary().is_some() {
        return true;
    }
    assert!(
        !required(),
        "HERALD_REQUIRE_NGINX=1 or HERALD_REQUIRE_DOCKER=1, but no nginx was found (scripts/test installs \
         Debian's: apt-get install nginx; HERALD_NGINX names another binary)"
    );
    eprintln!(
        "########################################################################\n\
         # SKIPPED {test}:\n\
         #   no nginx was found (apt-get install nginx; scripts/test installs it;\n\
         #   HERALD_REQUIRE_NGINX=1 makes this an error)\n\
         ########################################################################"
    );
    false
}

/// The sample configuration with its `listen` directive(s) replaced by one `listen <listen>;` and the
/// servers of each of the [`UPSTREAMS`] blocks by one per address of `upstreams`, each keeping the
/// parameters (`max_fails=…`) of the block's first server. Panics when the sample no longer has them.
pub fn render(sample: &str, listen: SocketAddr, upstreams: &[SocketAddr]) -> String {
    assert!(!upstreams.is_empty(), "nginx needs at least one upstream");
    let (mut listened, mut served, mut in_upstream) = (false, false, false);
    let mut blocks_served = 0;
    let mut out = String::with_capacity(sample.len());
    for line in sample.lines() {
        let code = line.split('#').next().unwrap_or("").trim();
        let indent = &line[..line.len() - line.trim_start().len()];
        let directive = code.split_whitespace().next().unwrap_or("");
        if directive == "upstream" && code.split_whitespace().nth(1).is_some_and(|name| UPSTREAMS.contains(&name)) {
            (in_upstream, served) = (true, false);
        } else if in_upstream && code.starts_with('}') {
            in_upstream = false;
            blocks_served += usize::from(served);
        }
        match directive {
            "listen" => {
                if !listened {
                    out.push_str(&format!("{indent}listen {listen};\n"));
                    listened = true;
                }
            }
            "server" if in_upstream => {
                if !served {
                    let parameters: Vec<&str> =
                        code.trim_end_matches(';').split_whitespace().skip(2).collect::<Vec<_>>();
                    for upstream in upstreams {
                        let mut server = format!("{indent}server {upstream}");
                        for parameter in &parameters {
                            server.push(' ');
                            server.push_str(parameter);
                        }
                        out.push_str(&server);
                        out.push_str(";\n");
                    }
                    served = true;
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert!(listened, "{}: no `listen` directive to point at the test's port", sample_path().display());
    assert_eq!(
        blocks_served,
        UPSTREAMS.len(),
        "{}: each of the upstreams {UPSTREAMS:?} needs a `server` to point at the test gateways",
        sample_path().display()
    );
    out
}

/// A running nginx, stopped (and its directory removed) on drop.
pub struct TestNginx {
    /// The address it listens on.
    pub addr: SocketAddr,
    binary: PathBuf,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl TestNginx {
    /// Starts nginx with the sample configuration in front of `upstreams` and waits until it accepts
    /// connections. Panics without nginx: call [`available`] first.
    pub async fn start(upstreams: &[SocketAddr]) -> TestNginx {
        let binary = binary().expect("nginx is installed (check nginx::available first)");
        let sample =
            std::fs::read_to_string(sample_path()).unwrap_or_else(|e| panic!("{}: {e}", sample_path().display()));
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-nginx-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("nginx's directory");
        std::fs::write(dir.join("nginx.conf"), main_config(&dir)).expect("write nginx.conf");
        // The port is free when picked; should another process take it first, nginx exits and a new
        // one is picked.
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            std::fs::write(dir.join("herald.conf"), render(&sample, addr, upstreams)).expect("write herald.conf");
            let _ = std::fs::remove_file(dir.join("error.log"));
            let child = nginx(&binary, &dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            let nginx = TestNginx { addr, binary: binary.clone(), dir: dir.clone(), child: Mutex::new(Some(child)) };
            let started = eventually("nginx accepting connections", Duration::from_secs(30), || async {
                if let Some(status) = nginx.child.lock().unwrap().as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    return Some(Err(status));
                }
                tokio::net::TcpStream::connect(addr).await.ok().map(|_| Ok(()))
            })
            .await;
            match started {
                Ok(()) => return nginx,
                Err(status) => {
                    let logs = nginx.logs();
                    if !logs.contains("Address already in use") {
                        panic!("nginx exited at start ({status}):\n{logs}");
                    }
                    nginx.child.lock().unwrap().take();
                }
            }
        }
        panic!("nginx found no free port in 5 tries");
    }

    /// `ws://<nginx>/ws?<query>`.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// `http://<nginx><path>`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The error and access logs so far, for failure messages.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("--- error.log\n{}--- access.log\n{}", read("error.log"), read("access.log"))
    }
}

impl Drop for TestNginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // A fast shutdown through the master, which stops its workers too (killing the master
            // alone would leave them serving).
            let _ = nginx(&self.binary, &self.dir).arg("-s").arg("stop").stderr(Stdio::null()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("nginx's configuration and logs are kept in {}", self.dir.display());
        }
    }
}

/// `nginx` with its prefix, main configuration and early error log in `dir`.
fn nginx(binary: &Path, dir: &Path) -> Command {
    let mut command = Command::new(binary);
    command.arg("-p").arg(dir).arg("-c").arg(dir.join("nginx.conf")).arg("-e").arg(dir.join("error.log"));
    command
}

/// The main configuration around the sample (what `/etc/nginx/nginx.conf` is in production), with every
/// file nginx writes inside `dir`.
fn main_config(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 2;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   log_format herald '$remote_addr \"$request\" $status upstream=$upstream_addr \
         xff=\"$http_x_forwarded_for\"';\n\
         \x20   access_log {dir}/access.log herald;\n\
         \x20   client_body_temp_path {dir}/client_body;\n\
         \x20   proxy_temp_path {dir}/proxy;\n\
         \x20   fastcgi_temp_path {dir}/fastcgi;\n\
         \x20   uwsgi_temp_path {dir}/uwsgi;\n\
         \x20   scgi_temp_path {dir}/scgi;\n\
         \x20   include {dir}/herald.conf;\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_is_templated_with_the_test_addresses_only() {
        let sample = std::fs::read_to_string(sample_path()).unwrap();
        let listen: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        let upstreams: Vec<SocketAddr> = vec!["127.0.0.1:1001".parse().unwrap(), "127.0.0.1:1002".parse().unwrap()];
        let rendered = render(&sample, listen, &upstreams);
        let code: Vec<&str> =
            rendered.lines().map(|l| l.split('#').next().unwrap().trim()).filter(|l| !l.is_empty()).collect();
        assert_eq!(
            code.iter().copied().filter(|l| l.starts_with("listen ")).collect::<Vec<_>>(),
            ["listen 127.0.0.1:18080;"]
        );
        // Both upstreams (round robin, and the sticky one of Socket.IO) get the test's two gateways.
        let servers: Vec<&&str> = code.iter().filter(|l| l.starts_with("server 127.0.0.1:100")).collect();
        assert_eq!(servers.len(), 2 * UPSTREAMS.len(), "{rendered}");
        assert!(servers[0].ends_with("max_fails=1 fail_timeout=10s;"), "{rendered}");
        // Everything else is the sample's, line for line.
        fn unchanged(text: &str) -> Vec<&str> {
            // `server <host>:<port> …;` in the upstream block, not `server {` or `server_name`.
            let upstream_server =
                |l: &str| l.starts_with("server ") && l.split_whitespace().nth(1).is_some_and(|a| a.contains(':'));
            text.lines().map(str::trim_start).filter(|l| !l.starts_with("listen") && !upstream_server(l)).collect()
        }
        assert_eq!(unchanged(&rendered), unchanged(&sample));
    }
}
