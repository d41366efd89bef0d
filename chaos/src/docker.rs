//! The Docker command line: the tool drives containers and networks with `docker …` commands, which
//! can do everything it needs (kill, start, disconnect from one network) and need no client library.

use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// Runs `docker <args>` and returns its standard output, trimmed; fails with its standard error.
pub async fn docker(args: &[&str]) -> Result<String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run docker {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Runs `docker <args>` without waiting for an async runtime, ignoring failures (for cleanup in
/// `Drop`, where the runtime may be shutting down).
pub fn docker_quietly(args: &[&str]) {
    let _ = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Writes `docker logs <container>` (its stdout and stderr) to `path`.
pub async fn save_logs(container: &str, path: &std::path::Path) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let status = Command::new("docker")
        .args(["logs", "--timestamps", container])
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .await
        .context("run docker logs")?;
    if !status.success() {
        bail!("docker logs {container} failed");
    }
    Ok(())
}
