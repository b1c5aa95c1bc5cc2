//! `rekey demo --hosts 3`, run as a newcomer would: to completion, exit 0,
//! a report, and nothing left running. Needs the real agent's dry run (the
//! agent branch): without it every host's preflight goes unanswered.

use std::process::Command;

#[test]
fn the_demo_runs_to_completion_and_cleans_up() {
    let bins = rekey_tests::bins();
    let out = Command::new(&bins.cli).args(["demo", "--hosts", "3"]).env("RUST_LOG", "warn").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rekey demo failed:\n{stdout}\n{stderr}");

    // It did what it says: a plan, a clean rotation, a misconfigured host
    // caught by the plan before any key exists (and a refused start), a
    // run-time failure that halts and rolls back, a fix, a report.
    for expected in [
        "all 3 agents connected",
        "metrics at http://127.0.0.1:",
        "$ rekey rotate plan demo-api-key",
        "no problems",
        "old key",
        "(revoked)",
        "problem: host-2: file",
        "servce.env: the file does not exist",
        "refused: the preflight of demo-api-key found 1 problem(s); no key was generated",
        "rolled back by itself",
        "host-3",
        "the previous key is now refused (401)",
        "# Rotation report",
        "## Failures and rollbacks",
        "## Hosts",
        "audit chain at head",
        "where to look next",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in the demo output:\n{stdout}");
    }
    // The run-time failure is in the report, with its reason.
    assert!(stdout.contains("**host-3** failed"), "the report should name the failed host:\n{stdout}");
    // Without --keep nothing is left to look at: the hints say to rerun with it.
    assert!(stdout.contains("rerun with --keep"), "{stdout}");
    assert!(!stdout.contains("--operator-dir"), "hints for a directory that is gone:\n{stdout}");
    // Live progress: every state of the lifecycle was shown.
    for state in ["rolling_out", "verified", "deactivating", "grace", "deleting", "monitoring"] {
        assert!(stdout.contains(state) || stderr.contains(state), "{state} never shown");
    }

    // Everything it started is gone, and so is its directory.
    let dir = stdout
        .lines()
        .next()
        .and_then(|l| l.split(" in ").nth(1))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no working directory in the first line:\n{stdout}"))
        .to_string();
    assert!(dir.contains("rekey-demo-"), "{dir}");
    let leftover = Command::new("pgrep").args(["-f", &dir]).output().unwrap();
    assert!(leftover.stdout.is_empty(), "processes left running: {}", String::from_utf8_lossy(&leftover.stdout));
    assert!(!std::path::Path::new(&dir).exists(), "{dir} was not removed");
}
