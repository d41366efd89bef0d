//! The short chaos run, as CI runs it: 20,000 messages to 20 users on two gateways while the
//! schedule kills gateways (SIGKILL, rolling SIGTERM) and NATS nodes (any, and the stream's leader)
//! every few seconds. About two to three minutes. Nothing may be lost, duplicated, reordered or
//! misdelivered.
//!
//! The schedule includes cutting off a NATS node from the others (the one holding a gateway's
//! delivery connection); `partitions_lose_nothing` runs partitions only, longer.
//!
//! Needs Docker (the NATS image is built locally from `.tools/bin/nats-server`: scripts/install-nats).
//! Without a Docker daemon the tests are skipped, unless `HERALD_REQUIRE_DOCKER=1` (CI) makes that a
//! failure.

use std::process::Command;

use serde_json::Value;

/// Sizes of the short run (docs/operations.md, "Chaos runs").
const SHORT: &[&str] = &[
    "--messages",
    "20000",
    "--rate",
    "200",
    "--users",
    "20",
    "--gateways",
    "2",
    "--fault-interval",
    "5s",
    "--fault-downtime",
    "5s",
    "--seed",
    "1",
];

#[test]
fn the_short_chaos_run_loses_duplicates_and_reorders_nothing() {
    let faults = "gateway-kill,gateway-restart,nats-kill,leader-kill,partition";
    let Some((stdout, report)) = run(&["--faults", faults]) else {
        return;
    };
    assert_eq!(report["published"]["acked"], 20_000);
    assert_eq!(report["clients"].as_array().unwrap().len(), 20);
    let faults = report["faults"].as_array().unwrap();
    assert!(faults.len() >= 3, "only {} faults injected:\n{stdout}", faults.len());
    assert!(report["gateways"].as_array().unwrap().iter().all(|gateway| gateway["rss_end"].as_u64() > Some(0)));
}

/// Partitions of the node holding a gateway's delivery connection, each long enough that its routes
/// break (about five minutes). Run it with `cargo test -p herald-chaos -- --ignored`.
#[test]
#[ignore = "about five minutes: run it with --ignored"]
fn partitions_lose_nothing() {
    run(&["--messages", "40000", "--faults", "partition", "--fault-downtime", "15s"]);
}

/// Runs the short schedule with `extra` arguments, checks the verdict, and returns the standard
/// output and the JSON report; `None` when there is no Docker to run it on.
fn run(extra: &[&str]) -> Option<(String, Value)> {
    if !herald_tests::nats::docker_available() {
        assert!(
            std::env::var("HERALD_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "HERALD_REQUIRE_DOCKER=1 but no Docker daemon is reachable"
        );
        eprintln!("no Docker daemon: the chaos run is skipped");
        return None;
    }
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_herald-chaos"))
        .args(SHORT)
        .args(extra)
        .arg("--out-dir")
        .arg(out.path())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run herald-chaos");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "herald-chaos failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);

    // The last line is the summary; the file holds the whole report.
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON summary line");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).unwrap();
    assert_eq!(summary["ok"], true, "{stdout}");
    assert_eq!(report["ok"], true);
    for count in ["lost", "duplicated", "out_of_order", "unexpected"] {
        assert_eq!(summary[count], 0, "{count}: {stdout}");
    }
    assert_eq!(summary["stored"], summary["messages"], "the stream holds each message once");
    assert_eq!(summary["expected"], summary["delivered"]);
    assert_eq!(summary["faults_not_recovered"], 0, "a fault not recovered from:\n{stdout}");
    Some((stdout, report))
}
