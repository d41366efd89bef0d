//! A NATS server with JetStream for one test.
//!
//! By default a container (testcontainers) of an image built locally from the static nats-server in
//! `.tools/bin` and the repository's `nats.conf`, built when absent (no registry is reachable here).
//! `HERALD_NATS_IMAGE=name:tag` runs another image instead (e.g. the official `nats`), given the
//! same configuration. Without a Docker daemon, a nats-server process is spawned instead, unless
//! `HERALD_REQUIRE_DOCKER=1` (CI) makes that an error.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use crate::{free_port, workspace_root};

const NATS_VERSION: &str = "2.15.1";

/// The NATS users of `nats.conf`, with the passwords the tests give the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Functions,
    Publisher,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Gateway, Role::Functions, Role::Publisher, Role::Admin];

    pub fn user(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Functions => "functions",
            Role::Publisher => "publisher",
            Role::Admin => "admin",
        }
    }

    pub fn password(self) -> String {
        format!("test-{}-password", self.user())
    }

    /// The environment variable nats.conf reads the password from.
    pub fn password_variable(self) -> String {
        format!("HERALD_NATS_{}_PASSWORD", self.user().to_uppercase())
    }
}

/// A running NATS server.
pub struct TestNats {
    port: u16,
    backend: Backend,
    /// The CA that signed the server's certificate, when it requires TLS.
    tls_ca: Option<PathBuf>,
}

enum Backend {
    Container(Box<ContainerAsync<GenericImage>>),
    Process { child: Mutex<Option<Child>>, store: PathBuf, config: PathBuf },
}

/// A NATS container on a free host port. The port is free when picked but may be taken before
/// Docker binds it (by an outgoing connection of another test, say): then another one is picked.
async fn start_container(
    tls: Option<&ServerTls>,
    network: Option<(&str, &str)>,
    extra: &str,
) -> (u16, ContainerAsync<GenericImage>) {
    let mut attempts = 0;
    loop {
        let port = free_port();
        let image = image_name();
        let (name, tag) = image.split_once(':').expect("image is name:tag");
        let conf = workspace_root().join("nats.conf");
        let mut request = GenericImage::new(name, tag)
            .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
            .with_exposed_port(4222.tcp())
            .with_mapped_port(port, 4222.tcp())
            .with_copy_to("/etc/herald/nats.conf", conf)
            .with_startup_timeout(Duration::from_secs(60));
        request = match tls {
            None if !extra.is_empty() => request
                .with_copy_to("/etc/herald/extra.conf", format!("include nats.conf\n{extra}\n").into_bytes())
                .with_cmd(["-c", "/etc/herald/extra.conf", "-sd", "/data/jetstream"]),
            None => request.with_cmd(["-c", "/etc/herald/nats.conf", "-sd", "/data/jetstream"]),
            Some(tls) => request
                .with_copy_to("/etc/herald/tls.conf", tls_config("/etc/herald").into_bytes())
                .with_copy_to("/etc/herald/server.pem", tls.cert_pem.clone().into_bytes())
                .with_copy_to("/etc/herald/server-key.pem", tls.key_pem.clone().into_bytes())
                .with_cmd(["-c", "/etc/herald/tls.conf", "-sd", "/data/jetstream"]),
        };
        for role in Role::ALL {
            request = request.with_env_var(role.password_variable(), role.password());
        }
        if let Some((network, name)) = network {
            request = request.with_network(network).with_container_name(name);
        }
        match request.start().await {
            Ok(container) => return (port, container),
            // (A named container is left behind, holding its name: no second try.)
            Err(error) if network.is_none() && attempts < 5 && error.to_string().contains("address already in use") => {
                attempts += 1
            }
            Err(error) => panic!("start the NATS container: {error}"),
        }
    }
}

/// A server certificate (chain) and its key, PEM, for a NATS that requires TLS from every client.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The configuration of a NATS with TLS: the repository's, plus a `tls` block for clients.
fn tls_config(dir: &str) -> String {
    format!("include nats.conf\ntls {{\n  cert_file: \"{dir}/server.pem\"\n  key_file: \"{dir}/server-key.pem\"\n}}\n")
}

impl TestNats {
    /// Starts a NATS server on a fixed host port (kept across stop/start).
    pub async fn start() -> TestNats {
        TestNats::start_with(None, None, "").await
    }

    /// Starts a NATS server with the repository's configuration followed by `extra` (a block
    /// there replaces nats.conf's: `jetstream { … }`, say).
    pub async fn start_with_config(extra: &str) -> TestNats {
        TestNats::start_with(None, None, extra).await
    }

    /// Starts a NATS container named `name` on the Docker network `network` (created if absent),
    /// where other containers reach it as `nats://<name>:4222`; the host reaches it at
    /// [`TestNats::url`] as usual. Docker only (panics without it).
    pub async fn start_on_network(network: &str, name: &str) -> TestNats {
        assert!(docker_available(), "TestNats::start_on_network needs a Docker daemon");
        TestNats::start_with(None, Some((network, name)), "").await
    }

    /// [`TestNats::start_on_network`] with TLS required, as [`TestNats::start_tls`].
    pub async fn start_tls_on_network(tls: &ServerTls, ca: &std::path::Path, network: &str, name: &str) -> TestNats {
        assert!(docker_available(), "TestNats::start_tls_on_network needs a Docker daemon");
        TestNats::start_with(Some((tls, ca)), Some((network, name)), "").await
    }

    /// Starts a NATS server that requires TLS, with `tls`'s certificate, issued by the CA in the PEM
    /// file `ca` (which this harness's clients trust).
    pub async fn start_tls(tls: &ServerTls, ca: &std::path::Path) -> TestNats {
        TestNats::start_with(Some((tls, ca)), None, "").await
    }

    async fn start_with(
        tls: Option<(&ServerTls, &std::path::Path)>,
        network: Option<(&str, &str)>,
        extra: &str,
    ) -> TestNats {
        let tls_ca = tls.map(|(_, ca)| ca.to_path_buf());
        let tls = tls.map(|(tls, _)| tls);
        if docker_available() {
            let (port, container) = start_container(tls, network, extra).await;
            TestNats { port, backend: Backend::Container(Box::new(container)), tls_ca }
        } else {
            assert!(
                std::env::var("HERALD_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "HERALD_REQUIRE_DOCKER=1 but no Docker daemon is reachable"
            );
            let port = free_port();
            eprintln!("no Docker daemon: running nats-server as a process");
            let store = std::env::temp_dir().join(format!("herald-nats-{port}"));
            let config = match tls {
                None if !extra.is_empty() => {
                    let dir = std::env::temp_dir().join(format!("herald-nats-{port}-conf"));
                    std::fs::create_dir_all(&dir).expect("config dir");
                    std::fs::copy(workspace_root().join("nats.conf"), dir.join("nats.conf")).expect("copy nats.conf");
                    std::fs::write(dir.join("extra.conf"), format!("include nats.conf\n{extra}\n")).expect("write");
                    dir.join("extra.conf")
                }
                None => workspace_root().join("nats.conf"),
                Some(tls) => {
                    let dir = std::env::temp_dir().join(format!("herald-nats-{port}-conf"));
                    std::fs::create_dir_all(&dir).expect("config dir");
                    std::fs::copy(workspace_root().join("nats.conf"), dir.join("nats.conf")).expect("copy nats.conf");
                    std::fs::write(dir.join("server.pem"), &tls.cert_pem).expect("write the certificate");
                    std::fs::write(dir.join("server-key.pem"), &tls.key_pem).expect("write the key");
                    std::fs::write(dir.join("tls.conf"), tls_config(dir.to_str().unwrap())).expect("write tls.conf");
                    dir.join("tls.conf")
                }
            };
            let backend = Backend::Process { child: Mutex::new(None), store, config };
            let nats = TestNats { port, backend, tls_ca };
            nats.start_again().await;
            nats
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A connection as the admin user (allowed everything).
    pub async fn client(&self) -> async_nats::Client {
        self.client_as(Role::Admin).await.expect("connect to NATS")
    }

    /// A connection as `role`'s user.
    pub async fn client_as(&self, role: Role) -> Result<async_nats::Client, async_nats::ConnectError> {
        let mut options = async_nats::ConnectOptions::with_user_and_password(role.user().into(), role.password());
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        options.connect(self.url()).await
    }

    /// A JetStream context on a new admin connection.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// The cursor of `device` (`<user>.<device>`) in the `herald-cursors` bucket, once it is
    /// `at_least` (within 30 s).
    pub async fn device_cursor_at_least(&self, device: &str, at_least: u64) -> u64 {
        let cursors = self.jetstream().await.get_key_value("herald-cursors").await.expect("the cursors bucket");
        crate::eventually(&format!("{device}'s cursor at {at_least}"), Duration::from_secs(30), || async {
            let written = cursors.get(device).await.ok().flatten()?;
            let cursor: u64 = String::from_utf8_lossy(&written).parse().ok()?;
            (cursor >= at_least).then_some(cursor)
        })
        .await
    }

    /// Stops the server; its JetStream store is kept for [`TestNats::start_again`].
    pub async fn stop(&self) {
        match &self.backend {
            Backend::Container(container) => container.stop().await.expect("stop NATS"),
            Backend::Process { child, .. } => {
                if let Some(mut child) = child.lock().unwrap().take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// Freezes the server (`docker pause`, or SIGSTOP): connections stay open, nothing is answered.
    pub async fn pause(&self) {
        match &self.backend {
            Backend::Container(container) => container.pause().await.expect("pause NATS"),
            Backend::Process { child, .. } => signal(child, "-STOP"),
        }
    }

    /// Lets a [`TestNats::pause`]d server go on where it stopped.
    pub async fn unpause(&self) {
        match &self.backend {
            Backend::Container(container) => container.unpause().await.expect("unpause NATS"),
            Backend::Process { child, .. } => signal(child, "-CONT"),
        }
    }

    /// Starts the server again on the same port and waits until it accepts clients.
    pub async fn start_again(&self) {
        match &self.backend {
            Backend::Container(container) => container.start().await.expect("start NATS again"),
            Backend::Process { child, store, config } => {
                let mut command = Command::new(workspace_root().join(".tools/bin/nats-server"));
                for role in Role::ALL {
                    command.env(role.password_variable(), role.password());
                }
                let spawned = command
                    .args(["-c", config.to_str().unwrap()])
                    .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", "0", "-sd", store.to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn nats-server (run scripts/install-nats)");
                *child.lock().unwrap() = Some(spawned);
            }
        }
        crate::eventually("NATS accepting clients", Duration::from_secs(30), || async {
            self.client_as(Role::Admin).await.ok().map(|_| ())
        })
        .await;
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        if let Backend::Process { child, store, .. } = &self.backend {
            if let Some(mut child) = child.lock().unwrap().take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(store);
        }
    }
}

/// Sends `signal` (`-STOP`, `-CONT`) to the server process.
fn signal(child: &Mutex<Option<Child>>, signal: &str) {
    let pid = child.lock().unwrap().as_ref().expect("NATS is running").id();
    let sent = Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// Whether a Docker daemon answers (checked once).
pub fn docker_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

/// The image to run: `HERALD_NATS_IMAGE`, or the local one, built now if absent.
pub fn image_name() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| match std::env::var("HERALD_NATS_IMAGE") {
            Ok(image) if !image.is_empty() => image,
            _ => build_local_image(),
        })
        .clone()
}

/// Builds `herald-nats:<version>-<hash of binary and config>` from scratch + the static binary.
fn build_local_image() -> String {
    let root = workspace_root();
    let binary = root.join(".tools/bin/nats-server");
    let bytes = std::fs::read(&binary)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/install-nats (scripts/test does)", binary.display()));
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&bytes, &mut hasher);
    std::hash::Hash::hash(&std::fs::read(root.join("nats.conf")).expect("nats.conf"), &mut hasher);
    let tag = format!("{NATS_VERSION}-{:08x}", std::hash::Hasher::finish(&hasher) as u32);
    let image = format!("herald-nats:{tag}");
    let exists = Command::new("docker")
        .args(["image", "inspect", &image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        let context = std::env::temp_dir().join(format!("herald-nats-image-{}", std::process::id()));
        std::fs::create_dir_all(&context).expect("build context");
        std::fs::copy(&binary, context.join("nats-server")).expect("copy nats-server");
        std::fs::copy(root.join("nats.conf"), context.join("nats.conf")).expect("copy nats.conf");
        std::fs::write(
            context.join("Dockerfile"),
            "FROM scratch\nCOPY nats-server /nats-server\nCOPY nats.conf /etc/herald/nats.conf\n\
             EXPOSE 4222 8222\nENTRYPOINT [\"/nats-server\"]\n\
             CMD [\"-c\", \"/etc/herald/nats.conf\", \"-sd\", \"/data/jetstream\"]\n",
        )
        .expect("Dockerfile");
        let status = Command::new("docker")
            .args(["build", "-q", "-t", &image])
            .arg(&context)
            .stdout(Stdio::null())
            .status()
            .expect("run docker build");
        let _ = std::fs::remove_dir_all(&context);
        assert!(status.success(), "docker build of {image} failed");
    }
    image
}
