//! One restart per service: a campaign rotates three secrets that one host
//! consumes behind the same restart command. The real agent batches their
//! deliveries and restarts once, with one health check; the restart command
//! fails if it ever runs twice at once.

use rekey_tests::{Agent, Coordinator, wait_for};
use rekey_types::v1::{IncidentSecretState, IncidentState, RotationState};

const SECRETS: [&str; 3] = ["svc-api-key", "svc-db-password", "svc-queue-token"];

fn catalog() -> String {
    let mut out = String::new();
    for name in SECRETS {
        out.push_str(&format!(
            "[[secret]]\nname = \"{name}\"\nall_agents = true\nprovider = {{ kind = \"random\", length = 24, prefix = \"tok_\" }}\n\
             [secret.rollout]\ncanary = 0\nhost_deadline = \"120s\"\n[secret.revocation]\ngrace = \"1s\"\nmonitor = \"0s\"\n\n"
        ));
    }
    out
}

/// Three secrets, each its own file, one restart command (a lock directory
/// it refuses to share, a count of its runs) and one health check (counted).
fn agent_config(dir: &std::path::Path) -> String {
    let d = dir.display();
    let restart = format!(
        "mkdir {d}/restart.lock || {{ echo concurrent restart >&2; exit 1; }}; echo run >> {d}/restarts; sleep 0.3; rmdir {d}/restart.lock"
    );
    let health = format!("echo check >> {d}/checks; grep -q '^token = tok_' {d}/svc-api-key.conf");
    let mut text = String::from(
        "state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n[apply]\nbatch_window = \"10s\"\n",
    );
    for name in SECRETS {
        text.push_str(&format!(
            "[[secret]]\nname = \"{name}\"\n  [[secret.file]]\n  path = \"{d}/{name}.conf\"\n  kind = \"template\"\n  template = \"token = {{{{ value }}}}\\n\"\n\
             \x20 [secret.restart]\n  kind = \"command\"\n  command = [\"/bin/sh\", \"-c\", {restart:?}]\n\
             \x20 [secret.health]\n  kind = \"command\"\n  command = [\"/bin/sh\", \"-c\", {health:?}]\n  retries = 1\n"
        ));
    }
    text
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().count()
}

#[test]
fn a_campaign_restarts_a_shared_service_once() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-shared-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &catalog());
    let dir = tmp.path().join("agent-web-1");
    std::fs::create_dir_all(&dir).unwrap();
    let mut agent = Agent::with_config(tmp.path(), "web-1", &agent_config(&dir));
    agent.enroll_ok(&c, &[]);
    agent.start();
    wait_for("agent connected", || c.is_connected("web-1"));

    let id = c.cli_ok(&["incident", "open", "shared service", "--secrets", "svc-*", "--concurrency", "3"]);
    let id = id.trim();
    let mut last = None;
    wait_for("campaign done", || {
        let s = c.incident(id);
        let done = s.state == IncidentState::Done;
        last = Some(s);
        done
    });
    let status = last.expect("polled");
    for name in SECRETS {
        let p = &status.secrets[name];
        assert_eq!(p.state, IncidentSecretState::Rotation(RotationState::Completed), "{name}: {p:?}");
        let conf = std::fs::read_to_string(dir.join(format!("{name}.conf"))).unwrap();
        assert!(conf.starts_with("token = tok_"), "{name}: {conf}");
    }
    assert_eq!(lines(&dir.join("restarts")), 1, "one restart for three secrets\n{}", agent.logs());
    assert_eq!(lines(&dir.join("checks")), 1, "one health check for three secrets\n{}", agent.logs());
    assert!(agent.logs().contains("applying together: one restart, one health check"), "{}", agent.logs());
}
