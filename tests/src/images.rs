//! Herald's container images (`scripts/images`, `deploy/docker/`) and the compose stack
//! (`deploy/compose.yaml`) for tests.
//!
//! The images are `herald-<name>:<version>` (the workspace version, or `HERALD_IMAGE_TAG`), built with
//! `scripts/images` when one is missing. `scripts/test` builds its own before the tests (tagged `test`, of
//! unoptimized binaries), so there they are current; a plain `cargo test` runs whatever image of this
//! version exists (`scripts/images` rebuilds).
//!
//! Without Docker (or without docker-compose / `docker compose`, for the stack) the tests that need them
//! print a note and pass, unless `HERALD_REQUIRE_DOCKER=1` (CI) makes that an error.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use crate::nats::docker_available;
use crate::{free_port, workspace_root};

/// The tag of the images the tests run: `HERALD_IMAGE_TAG`, or the workspace version.
pub fn tag() -> String {
    std::env::var("HERALD_IMAGE_TAG")
        .ok()
        .filter(|tag| !tag.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").into())
}

/// Whether Docker must be there (CI).
fn required() -> bool {
    std::env::var("HERALD_REQUIRE_DOCKER").as_deref() == Ok("1")
}

fn skip(test: &str, why: &str) {
    eprintln!(
        "########################################################################\n\
         # SKIPPED {test}:\n\
         #   {why}\n\
         #   (HERALD_REQUIRE_DOCKER=1 makes this an error)\n\
         ########################################################################"
    );
}

/// Whether a Docker daemon answers. When none does: panics under `HERALD_REQUIRE_DOCKER=1`, otherwise
/// prints a loud note so that the calling test can return early (skip).
pub fn available(test: &str) -> bool {
    if docker_available() {
        return true;
    }
    assert!(!required(), "HERALD_REQUIRE_DOCKER=1 but no Docker daemon is reachable");
    skip(test, "no Docker daemon");
    false
}

/// `herald-<name>:<tag>` for each of `names` (`gateway`, `functions`, `nats`, `nginx`), built first
/// with `scripts/images` when any is missing.
pub fn ensure(names: &[&str]) -> Vec<String> {
    // Tests of one binary share the build.
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_build = BUILD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    wait_for_a_build_under_way();
    let images: Vec<String> = names.iter().map(|name| format!("herald-{name}:{}", tag())).collect();
    let missing: Vec<&str> =
        names.iter().zip(&images).filter(|(_, image)| !exists(image)).map(|(name, _)| *name).collect();
    if !missing.is_empty() {
        eprintln!("building the images {missing:?} with scripts/images (the first build takes minutes)");
        let status =
            Command::new(workspace_root().join("scripts/images")).args(&missing).status().expect("run scripts/images");
        assert!(status.success(), "scripts/images {} failed", missing.join(" "));
        for image in &images {
            assert!(exists(image), "scripts/images built no {image} (HERALD_IMAGE_TAG is {})", tag());
        }
    }
    images
}

/// Waits until no `scripts/images` runs: scripts/test builds the images in the background while the
/// tests run, holding this lock, and an image looked for meanwhile would be missing or stale.
fn wait_for_a_build_under_way() {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let Ok(lock) = std::fs::File::open(target.join("images.lock")) else {
        return; // no build has run here
    };
    let started = std::time::Instant::now();
    lock.lock_shared().expect("wait for scripts/images (target/images.lock)");
    let waited = started.elapsed();
    if waited.as_secs() > 0 {
        eprintln!("waited {waited:.0?} for the images being built (scripts/images)");
    }
}

fn exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The compose command: `HERALD_COMPOSE` (e.g. `docker-compose`), else `docker compose` (v2), else
/// `docker-compose` (v1); `None` when none runs.
pub fn compose_command() -> Option<Vec<String>> {
    let candidates: Vec<Vec<String>> = match std::env::var("HERALD_COMPOSE") {
        Ok(command) if !command.trim().is_empty() => vec![command.split_whitespace().map(String::from).collect()],
        _ => vec![vec!["docker".into(), "compose".into()], vec!["docker-compose".into()]],
    };
    candidates.into_iter().find(|command| {
        Command::new(&command[0])
            .args(&command[1..])
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

/// `deploy/compose.yaml` running as a project of its own, with its own host ports and an env file
/// written for it; taken down (volumes too) on drop.
pub struct TestStack {
    compose: Vec<String>,
    project: String,
    dir: PathBuf,
    /// nginx, where clients connect.
    pub http_port: u16,
    /// gateway-1's HTTP API.
    pub api_port: u16,
    /// The secret the gateways verify tokens with.
    pub jwt_secret: String,
    /// The HTTP API's key.
    pub api_key: String,
    down: bool,
}

impl TestStack {
    /// Brings the stack up (`up -d`; the images must exist: see [`ensure`]). `None` (a skip note
    /// printed) without a compose command, unless `HERALD_REQUIRE_DOCKER=1`.
    pub fn up(test: &str) -> Option<TestStack> {
        let Some(compose) = compose_command() else {
            assert!(!required(), "HERALD_REQUIRE_DOCKER=1 but neither `docker compose` nor docker-compose runs");
            skip(test, "neither `docker compose` nor docker-compose runs");
            return None;
        };
        let project = format!("herald-test-{}", std::process::id());
        let dir = std::env::temp_dir().join(&project);
        std::fs::create_dir_all(&dir).expect("the stack's directory");
        let stack = TestStack {
            compose,
            project: project.clone(),
            dir,
            http_port: free_port(),
            api_port: free_port(),
            jwt_secret: format!("{project}-jwt-secret"),
            api_key: format!("{project}-api-key"),
            down: false,
        };
        // What an operator writes into deploy/.env (see deploy/.env.example), with ports of its own.
        let env = [
            ("COMPOSE_PROJECT_NAME", project.clone()),
            ("HERALD_IMAGE_TAG", tag()),
            ("HERALD_NATS_GATEWAY_PASSWORD", format!("{project}-gateway")),
            ("HERALD_NATS_FUNCTIONS_PASSWORD", format!("{project}-functions")),
            ("HERALD_NATS_PUBLISHER_PASSWORD", format!("{project}-publisher")),
            ("HERALD_NATS_ADMIN_PASSWORD", format!("{project}-admin")),
            ("HERALD_JWT_SECRET", stack.jwt_secret.clone()),
            ("HERALD_API_KEY", stack.api_key.clone()),
            ("HERALD_HTTP_PORT", stack.http_port.to_string()),
            ("HERALD_API_PORT", stack.api_port.to_string()),
            ("HERALD_NATS_PORT", free_port().to_string()),
            ("HERALD_NATS_MONITOR_PORT", free_port().to_string()),
        ];
        let env: String = env.iter().map(|(key, value)| format!("{key}={value}\n")).collect();
        std::fs::write(stack.dir.join(".env"), env).expect("write the env file");
        let up = stack.run(&["up", "-d"]);
        assert!(up.status.success(), "compose up failed:\n{}", String::from_utf8_lossy(&up.stderr));
        Some(stack)
    }

    /// Runs the compose command on this project with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        let file = workspace_root().join("deploy/compose.yaml");
        Command::new(&self.compose[0])
            .args(&self.compose[1..])
            .args(["--project-name", &self.project])
            .arg("--env-file")
            .arg(self.dir.join(".env"))
            .arg("--file")
            .arg(file)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the compose command")
    }

    /// The last lines of every service's log.
    pub fn logs(&self) -> String {
        let logs = self.run(&["logs", "--no-color", "--tail", "40"]);
        format!("{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr))
    }

    /// The ids of the project's containers.
    pub fn containers(&self) -> Vec<String> {
        let ps = self.run(&["ps", "--quiet"]);
        String::from_utf8_lossy(&ps.stdout).lines().filter(|line| !line.trim().is_empty()).map(String::from).collect()
    }

    /// `down --volumes`, checked: it succeeds and leaves no container of the project.
    pub fn down(mut self) {
        self.down = true;
        let down = self.run(&["down", "--volumes", "--timeout", "10"]);
        assert!(down.status.success(), "compose down failed:\n{}", String::from_utf8_lossy(&down.stderr));
        let left = self.containers();
        assert!(left.is_empty(), "containers left after compose down: {left:?}");
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        if !self.down {
            if std::thread::panicking() {
                eprintln!("--- the stack's logs\n{}", self.logs());
            }
            let _ = self.run(&["down", "--volumes", "--timeout", "10"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
