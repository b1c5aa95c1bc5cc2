//! Campaigns and waves end to end, over real `rekey-agent` processes that
//! render a file and health-check it: an incident's start order and
//! `--wait` (done → exit 0; a secret that could not start → exit 2, never
//! `done`), and a staging wave chosen by labels that pauses before
//! production until an operator resumes.

use rekey_tests::{Agent, Coordinator, wait_for};
use rekey_types::v1::{
    AuditRecordView, CampaignState, HostState, IncidentSecretState, IncidentState, IncidentView, RotationState,
    RotationView,
};
use std::path::Path;

/// A real agent consuming `secrets`: each is rendered into `DIR/SECRET.conf`,
/// "restarted" by a command and health-checked by reading the file back.
fn agent_config(dir: &Path, secrets: &[&str]) -> String {
    let d = dir.display();
    let mut text =
        String::from("state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n");
    for s in secrets {
        text.push_str(&format!(
            r##"
[[secret]]
name = "{s}"
  [[secret.file]]
  path = "{d}/{s}.conf"
  kind = "template"
  template = "key = {{{{ value }}}}\n"
  [secret.restart]
  kind = "command"
  command = ["/bin/true"]
  [secret.health]
  kind = "command"
  command = ["/bin/sh", "-c", "grep -q '^key = ' {d}/{s}.conf"]
  retries = 2
  interval = "100ms"
"##
        ));
    }
    text
}

fn agents(c: &Coordinator, tmp: &Path, hosts: &[(&str, &str)], secrets: &[&str]) -> Vec<Agent> {
    let agents: Vec<Agent> = hosts
        .iter()
        .map(|(name, labels)| {
            let dir = tmp.join(format!("agent-{name}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut a = Agent::with_config(tmp, name, &agent_config(&dir, secrets));
            let labels: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
            a.enroll_ok(c, &labels);
            a.start();
            a
        })
        .collect();
    wait_for("agents connected", || agents.iter().all(|a| c.is_connected(&a.name)));
    agents
}

fn secret(name: &str, rule: &str, extra: &str) -> String {
    format!(
        "[[secret]]\nname = \"{name}\"\n{rule}\n{extra}\nprovider = {{ kind = \"random\" }}\n\
         [secret.rollout]\nhost_deadline = \"60s\"\n[secret.revocation]\ngrace = \"0s\"\nmonitor = \"0s\"\n\n"
    )
}

fn at(r: &RotationView, state: RotationState) -> i64 {
    r.timeline.iter().find(|e| e.state == state).unwrap_or_else(|| panic!("{} never {state}", r.id)).at_ms
}

/// `--first` puts the exposed key ahead of catalog priority and catalog order;
/// `--wait` stops with exit 2 when a secret cannot start (no consumer), and the
/// incident is never `done` while that secret was not started. A second incident
/// whose secrets all rotate ends `--wait` with exit 0.
#[test]
fn an_incident_runs_the_exposed_key_first_and_wait_says_when_an_operator_is_needed() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-campaigns-").tempdir().unwrap();
    // Catalog order: zeta-key (nobody consumes it), mail-key (priority 5), fleet-key.
    let catalog = [
        secret("zeta-key", "hosts = [\"decommissioned\"]", ""),
        secret("mail-key", "all_agents = true", "priority = 5"),
        secret("fleet-key", "all_agents = true", ""),
    ]
    .concat();
    let c = Coordinator::start(&tmp.path().join("c"), &catalog);
    let _agents = agents(&c, tmp.path(), &[("host-1", ""), ("host-2", ""), ("host-3", "")], &["mail-key", "fleet-key"]);

    let bad = c.cli(&["incident", "open", "x", "--secrets", "*-key", "--first", "payments"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--first \"payments\" is not one of the secrets"), "{bad:?}");

    let out = c.cli(&[
        "incident",
        "open",
        "breach",
        "--secrets",
        "*-key",
        "--first",
        "fleet-key",
        "--concurrency",
        "1",
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit 2: needs an operator\n{stdout}\n{stderr}");
    assert!(stdout.contains("opened: fleet-key, mail-key, zeta-key"), "{stdout}");
    assert!(
        stderr.contains("needs an operator") && stderr.contains("zeta-key: not started: no agent consumes"),
        "{stderr}"
    );
    // Live progress: each secret's state as it changed.
    assert!(stdout.contains("fleet-key: ") && stdout.contains("zeta-key: not_started"), "{stdout}");

    let id = c.cli_view::<Vec<IncidentView>>(&["incident", "list"])[0].id.clone();
    let mut status = None;
    wait_for("both rotations end", || {
        let s = c.incident(&id);
        let ended = ["fleet-key", "mail-key"]
            .iter()
            .all(|n| s.secrets[*n].state == IncidentSecretState::Rotation(RotationState::Completed));
        status = Some(s);
        ended
    });
    let s = status.unwrap();
    assert_eq!(s.order, vec!["fleet-key", "mail-key", "zeta-key"]);
    assert_eq!(s.state, IncidentState::Running, "never done while zeta-key was not started: {s:?}");
    assert_eq!(s.secrets["zeta-key"].state, IncidentSecretState::Campaign(CampaignState::NotStarted));
    assert!(s.needs_operator.iter().any(|l| l.starts_with("zeta-key: not started")), "{s:?}");
    let table = c.cli_ok(&["incident", "status", &id]);
    assert!(table.contains("needs an operator:") && table.contains("zeta-key"), "{table}");

    // The exposed key went first; the next one started once its slot freed.
    let fleet = c.rotation(s.secrets["fleet-key"].rotation.as_deref().unwrap());
    let mail = c.rotation(s.secrets["mail-key"].rotation.as_deref().unwrap());
    assert!(at(&fleet, RotationState::Verified) <= at(&mail, RotationState::Planned), "concurrency 1 in order");
    eprintln!(
        "slot freed → next secret planned: {} ms",
        at(&mail, RotationState::Planned) - at(&fleet, RotationState::Verified)
    );
    for r in [&fleet, &mail] {
        assert!(r.hosts.values().all(|h| h.state == HostState::Healthy), "{r:?}");
    }

    let done = c.cli(&["incident", "open", "mail again", "--secrets", "mail-key", "--wait"]);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert_eq!(done.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&done.stderr));
    assert!(stdout.contains("mail-key: completed") && stdout.contains("done"), "{stdout}");
}

fn host_delivered<'a>(audit: &'a [AuditRecordView], rotation: &str, host: &str) -> Option<&'a AuditRecordView> {
    audit
        .iter()
        .find(|r| r.details["rotation"] == rotation && r.details["host"] == host && r.details["to"] == "delivered")
}

/// A staging wave chosen by labels goes first (its canary included), every
/// staging host confirms, the rollout pauses (`pause_after`) with the exact
/// resume command, no production host gets anything until the operator
/// resumes, then production follows in its percentage waves.
#[test]
fn a_staging_wave_goes_first_and_pauses_until_an_operator_resumes() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-waves-").tempdir().unwrap();
    let catalog = secret("api-key", "selector = { app = \"web\" }", "")
        .replace("[secret.rollout]\n", "[secret.rollout]\ncanary = 1\nwaves = [{ selector = { env = \"staging\" }, pause_after = true }, \"50%\", \"100%\"]\n");
    let c = Coordinator::start(&tmp.path().join("c"), &catalog);
    let hosts = [
        ("prod-1", "app=web,env=prod"),
        ("prod-2", "app=web,env=prod"),
        ("prod-3", "app=web,env=prod"),
        ("prod-4", "app=web,env=prod"),
        ("stage-1", "app=web,env=staging"),
        ("stage-2", "app=web,env=staging"),
    ];
    let _agents = agents(&c, tmp.path(), &hosts, &["api-key"]);

    let id = c.cli_ok(&["rotate", "start", "api-key"]).trim().to_string();
    let mut last = None;
    wait_for("paused after the staging wave", || {
        let r = c.rotation(&id);
        let paused = r.paused;
        last = Some(r);
        paused
    });
    let r = last.unwrap();
    // Canary from staging, then the rest of staging, then production: 50% of 4, the rest.
    assert_eq!(r.waves, vec![vec!["stage-1"], vec!["stage-2"], vec!["prod-1", "prod-2"], vec!["prod-3", "prod-4"]]);
    assert_eq!(r.pause_after, vec![1]);
    assert_eq!(r.policy.selector_waves.len(), 1);
    for (name, h) in &r.hosts {
        let want = if name.starts_with("stage") { HostState::Healthy } else { HostState::Pending };
        assert_eq!(h.state, want, "{name} while paused: {r:?}");
    }
    let waiting = r.waiting_on.clone().unwrap_or_default();
    assert!(waiting.contains("pause_after") && waiting.contains(&format!("rekey rotate resume {id}")), "{waiting}");
    c.cli_ok(&["rotate", "resume", &id]);
    let mut last = None;
    wait_for("rotation completed", || {
        let r = c.rotation(&id);
        let done = r.state == RotationState::Completed;
        last = Some(r);
        done
    });
    assert!(last.unwrap().hosts.values().all(|h| h.state == HostState::Healthy));
    // In the audit chain, every staging host was confirmed before any
    // production host was delivered to, and each of those deliveries was the
    // operator's resume (same actor and commit as the `resumed by` record).
    let audit = c.audit();
    let started = audit.iter().find(|r| r.action == "rotation.start" && r.details["rotation"] == id.as_str()).unwrap();
    assert_eq!(started.details["wave_kinds"], serde_json::json!(["canary", "env=staging", "50%", "100%"]));
    assert_eq!(started.details["pause_after"], serde_json::json!([1]));
    let resumed = audit
        .iter()
        .find(|r| {
            r.details["rotation"] == id.as_str()
                && r.details["note"].as_str().is_some_and(|n| n.starts_with("resumed by"))
        })
        .expect("resume audited");
    let staged = audit
        .iter()
        .filter(|r| r.details["rotation"] == id.as_str() && r.details["to"] == "healthy")
        .filter(|r| r.details["host"].as_str().is_some_and(|h| h.starts_with("stage")))
        .map(|r| r.seq)
        .max()
        .expect("staging confirmed");
    for prod in ["prod-1", "prod-2"] {
        let d = host_delivered(&audit, &id, prod).unwrap_or_else(|| panic!("{prod} never delivered"));
        assert!(staged < d.seq, "{prod} delivered at {} before staging was confirmed at {staged}", d.seq);
        assert_eq!((d.actor.as_str(), d.at_ms), (resumed.actor.as_str(), resumed.at_ms), "{prod}: {d:?}");
    }
}
