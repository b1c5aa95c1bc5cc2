//! Architecture invariants checked with `cargo tree` (see ARCHITECTURE.md).

use std::process::Command;

fn tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--quiet", "-e", "normal", "--prefix", "none", "-p", package])
        .current_dir(rekey_tests::workspace_root())
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Architecture Invariant: the agent links no cloud SDK and not the coordinator.
#[test]
fn agent_links_no_cloud_sdk_nor_coordinator() {
    let t = tree("rekey-agent");
    assert!(t.contains("rekey-proto"), "cargo tree output looks wrong:\n{t}");
    for forbidden in ["aws-sdk", "aws-config", "aws-smithy", "vaultrs", "rekey-coordinator", "sled"] {
        let hits: Vec<&str> = t.lines().filter(|l| l.starts_with(forbidden)).collect();
        assert!(hits.is_empty(), "rekey-agent depends on {forbidden}: {hits:?}");
    }
}

/// Architecture Invariant: one TLS crypto provider (ring) for the workspace.
#[test]
fn no_aws_lc_anywhere() {
    for p in ["rekey-agent", "rekey-coordinator", "rekey-cli"] {
        let t = tree(p);
        assert!(!t.lines().any(|l| l.starts_with("aws-lc")), "{p} pulls in aws-lc:\n{t}");
    }
}

/// Architecture Invariant: the views (`rekey-types`) are plain data: serde
/// only, no tonic, no coordinator, so anything may read them.
#[test]
fn the_views_crate_is_plain_data() {
    let t = tree("rekey-types");
    assert!(t.lines().next().is_some_and(|l| l.starts_with("rekey-types")), "cargo tree output looks wrong:\n{t}");
    for forbidden in ["tonic", "prost", "rekey-", "sled", "tokio"] {
        let hits: Vec<&str> = t.lines().skip(1).filter(|l| l.starts_with(forbidden)).collect();
        assert!(hits.is_empty(), "rekey-types depends on {forbidden}: {hits:?}");
    }
}

/// Architecture Invariant: the deterministic simulation's seams (clock,
/// dialer, jitter, command runner) are installed by the simulation alone: no
/// production crate calls an `install_*` seam, and no binary links turmoil.
#[test]
fn production_code_installs_no_simulation_seam() {
    for p in ["rekey-agent", "rekey-coordinator", "rekey-cli"] {
        let t = tree(p);
        assert!(!t.lines().any(|l| l.starts_with("turmoil")), "{p} links turmoil:\n{t}");
    }
    let seams = ["install_clock(", "install_dialer(", "install_jitter(", "install_command_runner("];
    let mut calls = Vec::new();
    let mut stack = vec![rekey_tests::workspace_root().join("crates")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    if seams.iter().any(|s| line.contains(s))
                        && !line.contains("pub fn ")
                        && !line.trim_start().starts_with("//")
                    {
                        calls.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(calls.is_empty(), "production code installs a simulation seam:\n{}", calls.join("\n"));
}
