//! Real agents applying real deliveries from the engine: files rewritten,
//! commands run, health checked — and real agent processes killed with
//! SIGKILL in the middle of an apply.

use rekey_tests::{Agent, Coordinator, wait_for};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "app-token";

fn catalog() -> String {
    format!(
        r#"
[[secret]]
name = "{SECRET}"
provider = {{ kind = "random", length = 32, prefix = "tok_" }}
[secret.rollout]
canary = 0
host_deadline = "60s"
[secret.revocation]
grace = "1s"
"#
    )
}

/// An agent whose restart and health check block while `dir/block-restart`
/// or `dir/block-health` exist, leaving a marker when they start.
fn agent_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r##"state_dir = "state"
[reconnect]
initial_backoff = "100ms"
max_backoff = "1s"

[[secret]]
name = "{SECRET}"
  [[secret.file]]
  path = "{d}/app.conf"
  kind = "template"
  template = "# managed by rekey\ntoken = {{{{ value }}}}\n"
  [secret.restart]
  kind = "command"
  command = ["/bin/sh", "-c", "touch {d}/restarting; while [ -e {d}/block-restart ]; do sleep 0.1; done"]
  timeout = "60s"
  [secret.health]
  kind = "command"
  command = ["/bin/sh", "-c", "touch {d}/checking; while [ -e {d}/block-health ]; do sleep 0.1; done; grep -q '^token = tok_' {d}/app.conf"]
  retries = 2
  interval = "100ms"
  timeout = "60s"
"##
    )
}

fn rotation(c: &Coordinator, id: &str) -> Value {
    c.cli_json(&["rotate", "status", id])
}

fn wait_state(c: &Coordinator, id: &str, states: &[&str]) -> Value {
    let mut last = Value::Null;
    wait_for(&format!("{id} in {states:?}"), Duration::from_secs(60), || {
        last = rotation(c, id);
        states.contains(&last["state"].as_str().unwrap_or(""))
    });
    last
}

#[test]
fn an_agent_killed_mid_apply_rolls_back_on_restart_and_reports_the_truth() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-pipeline-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &catalog());
    let mut agents: Vec<Agent> = (1..=2)
        .map(|i| {
            let name = format!("host-{i}");
            let dir = tmp.path().join(format!("agent-{name}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut a = Agent::with_config(tmp.path(), &name, &agent_config(&dir));
            a.enroll_ok(&c, &[]);
            a.start();
            a
        })
        .collect();
    wait_for("agents connected", Duration::from_secs(20), || agents.iter().all(|a| c.is_connected(&a.name)));
    // The first version lands everywhere.
    let out = c.cli(&["rotate", "start", SECRET, "--wait"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), agents[0].logs());

    for step in ["restart", "health"] {
        let a = &mut agents[0];
        let conf = a.dir.join("app.conf");
        let before = std::fs::read(&conf).unwrap();
        let marker = a.dir.join(if step == "restart" { "restarting" } else { "checking" });
        let block = a.dir.join(format!("block-{step}"));
        let _ = std::fs::remove_file(&marker);
        std::fs::write(&block, "").unwrap();
        let id = c.cli_ok(&["rotate", "start", SECRET]).trim().to_string();
        wait_for(&format!("host-1 inside its {step}"), Duration::from_secs(30), || marker.exists());
        assert_ne!(std::fs::read(&conf).unwrap(), before, "the new version is written before the restart");
        a.kill();
        std::fs::remove_file(&block).unwrap();
        a.start();
        // Recovery restores the old file byte for byte and tells the truth.
        let r = wait_state(&c, &id, &["halted"]);
        assert_eq!(std::fs::read(&conf).unwrap(), before, "{step}: old content not restored");
        let h = &r["hosts"]["host-1"];
        assert_eq!(h["state"], "rolled_back", "{step}: {r:#}");
        let err = h["error"].as_str().unwrap();
        assert!(err.contains("interrupted") && err.contains("rolled back"), "{step}: {err}");
        assert_eq!(r["hosts"]["host-2"]["state"], "healthy");
        // The old version is still current at the provider; resume finishes the job.
        c.cli_ok(&["rotate", "resume", &id]);
        let r = wait_state(&c, &id, &["completed"]);
        assert_eq!(r["hosts"]["host-1"]["state"], "healthy");
        let now = std::fs::read_to_string(&conf).unwrap();
        assert_ne!(now.as_bytes(), before.as_slice());
        // The value is in the managed file, and nowhere in the agent's logs or journal.
        let value = now.lines().find_map(|l| l.strip_prefix("token = ")).unwrap().to_string();
        assert!(!a.logs().contains(&value), "{step}: the value leaked into the agent log");
        for entry in walk(&a.state_dir()) {
            let name = entry.display().to_string();
            if name.contains("backup") {
                continue; // private backups (0600) hold values by design, purged after revocation
            }
            let content = std::fs::read(&entry).unwrap_or_default();
            assert!(!String::from_utf8_lossy(&content).contains(&value), "{step}: value in {name}");
        }
        assert!(!c.logs().contains(&value), "{step}: the value leaked into the coordinator log");
    }

    // Killed after it confirmed: its restart changes nothing, its hello says what it runs.
    let id = c.cli_ok(&["rotate", "start", SECRET]).trim().to_string();
    wait_for("host-1 healthy", Duration::from_secs(30), || rotation(&c, &id)["hosts"]["host-1"]["state"] == "healthy");
    agents[0].kill();
    agents[0].start();
    let r = wait_state(&c, &id, &["completed"]);
    assert_eq!(r["hosts"]["host-1"]["state"], "healthy");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
