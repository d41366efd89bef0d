//! Every scenario at toy size against every target, so the tool never rots. Only that the tool
//! works is checked (exit status, the JSON's fields, counts the scenario defines exactly), never a
//! timing; for Herald, every count must also be complete (nothing lost, no problem reported).
//!
//! Needs `.tools/bin/nats-server` (`scripts/install-nats`) and the `herald-gateway` binary of the
//! same profile, which `cargo test --workspace` builds (this test builds it when missing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

const TARGETS: [&str; 4] = ["herald", "nats-ws", "raw", "herald-stomp"];

/// One scenario at a time: they start processes and load the machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_herald-bench"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ is inside the workspace").to_path_buf()
}

/// The gateway binary next to the tool's, built with the same profile if missing (for the whole
/// workspace, as herald-tests builds it: see `herald_tests::gateway::binary`).
fn gateway() -> PathBuf {
    let path = bench().with_file_name("herald-gateway");
    if !path.is_file() {
        let release = bench().parent().and_then(Path::file_name).is_some_and(|dir| dir == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(workspace_root()).args(["build", "--workspace", "--bin", "herald-gateway"]);
        if release {
            build.arg("--release");
        }
        assert!(build.status().expect("run cargo build").success(), "cannot build herald-gateway");
    }
    path
}

/// Runs `herald-bench <scenario> <args>` on every target and returns its JSON report.
fn run(scenario: &str, args: &[&str]) -> Value {
    run_on(&TARGETS, scenario, args)
}

/// Runs `herald-bench <scenario> <args>` on `targets` and returns its JSON report.
fn run_on(targets: &[&str], scenario: &str, args: &[&str]) -> Value {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let nats = workspace_root().join(".tools/bin/nats-server");
    assert!(nats.is_file(), "{}: run scripts/install-nats", nats.display());
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join(format!("{scenario}.json"));
    let output = Command::new(bench())
        .arg(scenario)
        .args(["--targets", &targets.join(",")])
        .arg("--gateway-bin")
        .arg(gateway())
        .arg("--nats-server")
        .arg(&nats)
        .arg("--out-dir")
        .arg(out.path())
        .arg("--json")
        .arg(&json)
        .args(["--threads", "2"])
        .args(args)
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "herald-bench {scenario} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(&format!("== {scenario}:")), "no table printed:\n{stdout}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).expect("JSON report written")).unwrap();
    assert_eq!(report["scenario"], scenario);
    assert_eq!(report["ok"], true, "{report:#}");
    assert!(report["machine"]["cpus"].as_u64().unwrap() > 0);
    for target in targets {
        assert!(report["results"][target].is_object() || report["results"][target].is_array(), "{target}: {report:#}");
    }
    assert!(!report["figures"].as_array().unwrap().is_empty());
    report
}

fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("not a count: {value}"))
}

#[test]
fn idle() {
    let report = run("idle", &["--idle-connections", "30", "--idle-settle-secs", "0.2"]);
    for target in TARGETS {
        let result = &report["results"][target];
        assert_eq!(count(&result["connected"]), 30, "{target}: {result:#}");
        assert!(result["server_bytes_per_connection"].is_number(), "{target}");
        assert!(count(&result["server_rss_after"]) > 0);
    }
}

#[test]
fn fanout() {
    fanout_on(&TARGETS);
}

/// Fan-out to clients of each protocol the gateway speaks.
#[test]
fn fanout_per_protocol() {
    fanout_on(&["herald", "herald-stomp", "herald-centrifugal", "herald-socketio", "herald-sse"]);
}

fn fanout_on(targets: &[&str]) {
    let report = run_on(
        targets,
        "fanout",
        &[
            "--fanout-connections",
            "10,20",
            "--fanout-start",
            "500",
            "--fanout-step-secs",
            "0.3",
            "--fanout-max-steps",
            "2",
        ],
    );
    for target in targets {
        let runs = report["results"][target].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for run in runs {
            let connections = count(&run["connections"]);
            assert!(run["stopped_by"].is_string());
            let steps = run["steps"].as_array().unwrap();
            assert!(!steps.is_empty() && steps.len() <= 2);
            for step in steps {
                let expected = count(&step["expected"]);
                assert_eq!(expected, count(&step["sent"]) * connections, "{target}: {step:#}");
                // At toy size Herald delivers every message to every socket (within the step's
                // grace), whatever protocol they speak; whether it did so fast enough ("kept_up") is
                // a timing, not checked here.
                if target.starts_with("herald") {
                    assert_eq!(count(&step["ended_by_server"]), 0, "{target}: {step:#}");
                    assert_eq!(count(&step["received"]), expected, "{target}: {step:#}");
                }
                // A step that kept up got every delivery, once.
                if step["kept_up"] == true {
                    assert_eq!(count(&step["received"]), expected, "{target}: {step:#}");
                } else {
                    assert!(step["reason"].is_string(), "{target}: {step:#}");
                }
            }
        }
    }
}

#[test]
fn unicast() {
    // The maximum is searched first (two steps from 100 msgs/s), then two levels on every target.
    let report = run(
        "unicast",
        &[
            "--unicast-users",
            "20",
            "--unicast-start",
            "100",
            "--unicast-max-steps",
            "2",
            "--unicast-levels",
            "25,75",
            "--unicast-secs",
            "0.3",
        ],
    );
    let basis = &report["params"]["basis"];
    let steps = basis["steps"].as_array().expect("the search's steps");
    assert!(!steps.is_empty() && steps.len() <= 2, "{basis}");
    let max = basis["max_msgs_per_sec"].as_f64().unwrap();
    assert!(steps.iter().any(|s| s["kept_up"] == true && s["nominal_msgs_per_sec"].as_f64() == Some(max)));
    for target in TARGETS {
        let levels = report["results"][target].as_array().unwrap();
        assert_eq!(levels.len(), 2);
        for level in levels {
            assert!(count(&level["sent"]) > 0);
            assert!(count(&level["received"]) <= count(&level["sent"]));
            if target == "herald" {
                assert_eq!(count(&level["received"]), count(&level["sent"]), "{target}: {level:#}");
            }
            assert!(level["latency_us"]["p99"].is_number());
        }
    }
}

#[test]
fn storm() {
    let report = run(
        "storm",
        &[
            "--storm-clients",
            "40",
            "--storm-backlog",
            "2",
            "--storm-live-timeout-secs",
            "1",
            "--storm-pause-secs",
            "0.2",
        ],
    );
    for target in TARGETS {
        let result = &report["results"][target];
        assert_eq!(count(&result["connect"]["welcomed"]), 40, "{target}: {result:#}");
        assert_eq!(count(&result["resume"]["welcomed"]), 40, "{target}: {result:#}");
        assert_eq!(count(&result["backlog_published"]), 80);
        let resume = &result["resume"];
        if target == "herald" {
            // Every client resumes: a replayed frame each, and the backlog of two messages each.
            assert!(resume["problem"].is_null(), "{resume:#}");
            assert_eq!(count(&resume["replayed_frames"]), 40, "{resume:#}");
            assert_eq!(count(&resume["replayed_msgs"]), 80, "{resume:#}");
        } else {
            assert_eq!(count(&resume["live"]), 40);
        }
    }
}

#[test]
fn replay() {
    let report = run("replay", &["--replay-messages", "2500", "--replay-timeout-secs", "5"]);
    for target in TARGETS {
        let result = &report["results"][target];
        assert_eq!(count(&result["published"]), 2500);
        if target == "herald" {
            // The tool raises the stream's per-subject limit (default 1000) for this scenario.
            assert_eq!(count(&result["stored"]), 2500, "{result:#}");
        }
        if target == "herald" {
            assert!(result["problem"].is_null(), "{result:#}");
            assert_eq!(count(&result["replayed_count"]), 2500, "{result:#}");
        }
        assert_eq!(count(&result["received"]), 2500, "{target}: {result:#}");
    }
}
