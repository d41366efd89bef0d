//! Third-party protocol SDKs (PyPI packages, installed into `.tools/browser-venv` by
//! `scripts/test-browser` from tests/browser/requirements.txt), each remote-controlled by a script
//! in tests/clients: the test writes one JSON command per line, the script prints one JSON event per
//! line.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::eventually;

/// How long an SDK event may take.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The venv's Python, or `None` (the test is then skipped, loudly) when `scripts/test-browser` has
/// not built it; with `HERALD_REQUIRE_BROWSER=1` a missing venv fails the test instead.
pub fn python() -> Option<std::path::PathBuf> {
    let python = crate::workspace_root().join(".tools/browser-venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    if std::env::var("HERALD_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("HERALD_REQUIRE_BROWSER=1 but {} is missing: run scripts/test-browser", python.display());
    }
    eprintln!("SKIPPED: {} is missing (scripts/test-browser builds it)", python.display());
    None
}

/// One SDK client in a script of its own.
pub struct SdkClient {
    child: Child,
    stdin: ChildStdin,
    events: Arc<Mutex<Vec<Value>>>,
}

impl SdkClient {
    /// Starts tests/clients/`script` with `python`.
    pub fn start(python: &std::path::Path, script: &str) -> SdkClient {
        let mut child = Command::new(python)
            .arg(crate::workspace_root().join("tests/clients").join(script))
            .env("NO_PROXY", "*")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the SDK script starts");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let collected = events.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "output", "line": line}));
                collected.lock().unwrap().push(event);
            }
        });
        SdkClient { child, stdin, events }
    }

    /// Sends the script a command.
    pub async fn send(&mut self, command: Value) {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.expect("the SDK script reads commands");
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// The events named `name` so far.
    pub fn named(&self, name: &str) -> Vec<Value> {
        self.events().into_iter().filter(|event| event["event"] == name).collect()
    }

    /// Waits for an event that `matches`, and returns it.
    pub async fn wait_for(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        eventually(what, EVENT_TIMEOUT, || async { self.events().into_iter().find(|event| matches(event)) }).await
    }

    /// Waits until `count` events named `name` came, and returns them.
    pub async fn wait_count(&self, name: &str, count: usize) -> Vec<Value> {
        let what = format!("{count} {name} events");
        eventually(&what, EVENT_TIMEOUT, || async {
            let found = self.named(name);
            (found.len() >= count).then_some(found)
        })
        .await
    }
}

impl Drop for SdkClient {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
