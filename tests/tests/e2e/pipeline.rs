//! Real agents applying real deliveries from the engine: files rewritten,
//! commands run, health checked — and real agent processes killed with
//! SIGKILL in the middle of an apply.

use rekey_tests::{Agent, Coordinator, wait_for};
use rekey_types::v1::{AlertKind, AlertView, HostState, RotationState, RotationView};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "app-token";

fn catalog() -> String {
    format!(
        r#"
[[secret]]
name = "{SECRET}"
all_agents = true
provider = {{ kind = "random", length = 32, prefix = "tok_" }}
[secret.rollout]
canary = 0
host_deadline = "60s"
[secret.revocation]
monitor = "0s"
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

fn rotation(c: &Coordinator, id: &str) -> RotationView {
    c.rotation(id)
}

fn wait_state(c: &Coordinator, id: &str, states: &[RotationState]) -> RotationView {
    let mut last = None;
    wait_for(&format!("{id} in {states:?}"), || {
        let r = rotation(c, id);
        let reached = states.contains(&r.state);
        last = Some(r);
        reached
    });
    last.expect("polled")
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
    wait_for("agents connected", || agents.iter().all(|a| c.is_connected(&a.name)));
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
        // The service's health is blocked on purpose: its preflight would (rightly) refuse.
        let id = c
            .cli_ok(&["rotate", "start", SECRET, "--skip-preflight", "--reason", "the test blocks the service"])
            .trim()
            .to_string();
        wait_for(&format!("host-1 inside its {step}"), || marker.exists());
        assert_ne!(std::fs::read(&conf).unwrap(), before, "the new version is written before the restart");
        a.kill();
        std::fs::remove_file(&block).unwrap();
        a.start();
        // Recovery restores the old file byte for byte and tells the truth.
        // The rollout halts on the host's "failed"; its "rolled back" follows.
        wait_state(&c, &id, &[RotationState::Halted]);
        wait_for(&format!("{step}: host-1 rolled back"), || {
            c.rotation(&id).hosts["host-1"].state == HostState::RolledBack
        });
        let r = c.rotation(&id);
        assert_eq!(std::fs::read(&conf).unwrap(), before, "{step}: old content not restored");
        let h = &r.hosts["host-1"];
        assert_eq!(h.state, HostState::RolledBack, "{step}: {r:#?}");
        let err = h.error.as_deref().unwrap();
        assert!(err.contains("interrupted") && err.contains("rolled back"), "{step}: {err}");
        assert_eq!(r.hosts["host-2"].state, HostState::Healthy);
        // The old version is still current at the provider; resume finishes the job.
        c.cli_ok(&["rotate", "resume", &id]);
        let r = wait_state(&c, &id, &[RotationState::Completed]);
        assert_eq!(r.hosts["host-1"].state, HostState::Healthy);
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
    wait_for("host-1 healthy", || rotation(&c, &id).hosts["host-1"].state == HostState::Healthy);
    agents[0].kill();
    agents[0].start();
    let r = wait_state(&c, &id, &[RotationState::Completed]);
    assert_eq!(r.hosts["host-1"].state, HostState::Healthy);
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

// ---- real services --------------------------------------------------------

/// Plain HTTP/1.1 on loopback (the demo API and services speak http).
fn http(addr: &str, method: &str, path: &str, bearer: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Kills the detached demo services at the end of the test.
struct Services(Vec<std::path::PathBuf>);
impl Drop for Services {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Ok(pid) = std::fs::read_to_string(p) {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

fn service_args(dir: &Path, api: &str, port: u16) -> Vec<String> {
    let d = dir.display();
    let svc = rekey_tests::bins().demo_service.display().to_string();
    [
        svc.as_str(),
        "--detach",
        "--replace",
        "--pidfile",
        &format!("{d}/service.pid"),
        "--credentials",
        &format!("{d}/service.env"),
        "--api",
        &format!("http://{api}"),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--log",
        &format!("{d}/service.log"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// An agent that keeps `dir/service.env` up to date, restarts the demo
/// service and checks its health (optionally requiring `body` in it).
fn service_agent_config(dir: &Path, api: &str, port: u16, body: Option<&str>) -> String {
    let cmd = service_args(dir, api, port).iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    let body = body.map(|b| format!("body_contains = {b:?}\n")).unwrap_or_default();
    format!(
        r##"state_dir = "state"
[reconnect]
initial_backoff = "100ms"
max_backoff = "1s"

[[secret]]
name = "saas-key"
  [[secret.file]]
  path = "{d}/service.env"
  kind = "env-file"
  keys = {{ DEMO_API_KEY = "value" }}
  [secret.restart]
  kind = "command"
  command = [{cmd}]
  timeout = "20s"
  [secret.health]
  kind = "http"
  url = "http://127.0.0.1:{port}/health"
  {body}retries = 4
  interval = "200ms"
  timeout = "2s"
"##,
        d = dir.display()
    )
}

/// Done means (issue 4): a rotation from the engine reaches 3 real agents, each
/// rewriting a real config file, restarting a real demo service and confirming
/// healthy; then one host whose service fails on the new key rolls back and
/// halts the rollout, its file byte-identical and its service healthy again.
#[test]
fn three_real_agents_rotate_a_real_services_key_and_a_failing_service_rolls_back() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let bins = rekey_tests::bins();
    let tmp = tempfile::Builder::new().prefix("rekey-services-").tempdir().unwrap();
    let token_file = tmp.path().join("admin.token");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&token_file).unwrap();
        std::io::Write::write_all(&mut f, b"adm_test_token").unwrap();
    }
    let addr_file = tmp.path().join("api.addr");
    let mut api_proc = std::process::Command::new(&bins.demo_api)
        .args(["--listen", "127.0.0.1:0", "--addr-file"])
        .arg(&addr_file)
        .arg("--admin-token-file")
        .arg(&token_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("demo api", || addr_file.exists());
    let api = std::fs::read_to_string(&addr_file).unwrap().trim().to_string();
    let (st, body) = http(&api, "POST", "/v1/keys", "adm_test_token", r#"{"name":"initial"}"#);
    assert_eq!(st, 201, "{body}");
    let first: Value = serde_json::from_str(&body).unwrap();
    let first_secret = first["secret"].as_str().unwrap().to_string();

    let catalog = format!(
        r#"
[[secret]]
name = "saas-key"
all_agents = true
[secret.provider]
kind = "http"
base_url = "http://{api}"
token_file = "{token}"
timeout = "5s"
create = {{ url = "/v1/keys", body = {{ name = "rekey {{rotation_id}}" }}, fields = {{ value = "/secret" }} }}
delete = {{ url = "/v1/keys/{{id}}" }}
deactivate = {{ url = "/v1/keys/{{id}}/deactivate" }}
list = {{ url = "/v1/keys", status_pointer = "/status" }}
[secret.rollout]
canary = 1
host_deadline = "60s"
[secret.revocation]
monitor = "0s"
grace = "1s"
"#,
        token = token_file.display()
    );
    let c = Coordinator::start(&tmp.path().join("c"), &catalog);
    let mut services = Services(Vec::new());
    let mut hosts = Vec::new();
    for i in 1..=3 {
        let name = format!("host-{i}");
        let dir = tmp.path().join(format!("svc-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("service.env"), format!("# demo\nDEMO_API_KEY={first_secret}\nOTHER=kept\n")).unwrap();
        let port = rekey_tests::free_port();
        let args = service_args(&dir, &api, port);
        let st = std::process::Command::new(&args[0]).args(&args[1..]).output().unwrap();
        assert!(st.status.success(), "service {name} did not start: {}", String::from_utf8_lossy(&st.stderr));
        services.0.push(dir.join("service.pid"));
        let mut a = Agent::with_config(tmp.path(), &name, &service_agent_config(&dir, &api, port, None));
        a.enroll_ok(&c, &[]);
        a.start();
        hosts.push((a, dir, port));
    }
    wait_for("agents connected", || hosts.iter().all(|(a, _, _)| c.is_connected(&a.name)));

    // A clean rotation: every file rewritten, every service restarted on the new key.
    let out = c.cli(&["rotate", "start", "saas-key", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut new_secret = String::new();
    for (a, dir, port) in &hosts {
        let env = std::fs::read_to_string(dir.join("service.env")).unwrap();
        assert!(!env.contains(&first_secret), "{}: old key still in the file", a.name);
        assert!(env.contains("OTHER=kept") && env.starts_with("# demo\n"), "{}: other lines changed: {env}", a.name);
        new_secret = env.lines().find_map(|l| l.strip_prefix("DEMO_API_KEY=")).unwrap().to_string();
        assert_eq!(http(&format!("127.0.0.1:{port}"), "GET", "/health", "", "").0, 200, "{}", a.name);
        assert!(!a.logs().contains(&new_secret), "{}: the key leaked into the agent log", a.name);
    }
    assert_eq!(http(&api, "GET", "/v1/whoami", &first_secret, "").0, 401, "the old key must be revoked");
    assert_eq!(http(&api, "GET", "/v1/whoami", &new_secret, "").0, 200);
    assert!(!c.logs().contains(&new_secret) && !c.logs().contains(&first_secret), "a key leaked into rekeyd's log");

    // host-2's service only passes its health check on the key it has now.
    let current_id = c.secrets()[0].current_version.clone().unwrap();
    let (a2, dir2, port2) = &mut hosts[1];
    std::fs::write(&a2.config, service_agent_config(dir2, &api, *port2, Some(&current_id))).unwrap();
    a2.kill();
    a2.start();
    wait_for("host-2 back", || c.is_connected("host-2"));
    let before = std::fs::read(dir2.join("service.env")).unwrap();
    let out = c.cli(&["rotate", "start", "saas-key", "--wait"]);
    assert!(!out.status.success());
    let id = c.rotations(None)[0].id.clone();
    // `--wait` returns at the halt (it follows the server's stream); host-2's
    // rollback report arrives just after.
    let mut r = rotation(&c, &id);
    assert_eq!(r.state, RotationState::Halted, "{r:#?}");
    wait_for("host-2 rolled back", || {
        r = rotation(&c, &id);
        r.hosts["host-2"].state == HostState::RolledBack
    });
    let err = r.hosts["host-2"].error.as_deref().unwrap();
    assert!(err.contains("health check") && err.contains(&format!("127.0.0.1:{port2}/health")), "{err}");
    assert_eq!(std::fs::read(dir2.join("service.env")).unwrap(), before, "host-2's file is not byte-identical");
    assert_eq!(http(&format!("127.0.0.1:{port2}"), "GET", "/health", "", "").0, 200, "host-2's service is not healthy");
    assert_eq!(http(&api, "GET", "/v1/whoami", &new_secret, "").0, 200, "the old key must still be valid");
    let _ = api_proc.kill();
    let _ = api_proc.wait();
}

/// The retired key as a tripwire, fleet side: while a rotation is monitoring,
/// a copy of the revoked value left in a file nobody declared is found by a
/// scan (keyed fingerprints, never the value) and raises an alert.
#[test]
fn a_leftover_copy_of_the_revoked_value_raises_an_alert_while_monitoring() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-tripwire-").tempdir().unwrap();
    let catalog = catalog().replace("monitor = \"0s\"", "monitor = \"1h\"\ncheck_every = \"2s\"");
    let c = Coordinator::start(&tmp.path().join("c"), &catalog);
    let dir = tmp.path().join("agent-host-1");
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    let config = format!("{}\n[scan]\nroots = [\"{}\"]\n", agent_config(&dir), dir.join("extra").display());
    let mut a = Agent::with_config(tmp.path(), "host-1", &config);
    a.enroll_ok(&c, &[]);
    a.start();
    wait_for("agent connected", || c.is_connected("host-1"));
    let out = c.cli(&["rotate", "start", SECRET, "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Someone copied the key into a file rekey does not manage.
    let v1 = std::fs::read_to_string(dir.join("app.conf")).unwrap();
    let v1 = v1.lines().find_map(|l| l.strip_prefix("token = ")).unwrap().to_string();
    std::fs::write(dir.join("extra/old-notes.txt"), format!("backup of the token:\n  {v1}\n")).unwrap();
    // The next rotation revokes it and keeps watching.
    let out = c.cli(&["rotate", "start", SECRET, "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut alerts: Vec<AlertView> = Vec::new();
    wait_for("leftover alert", || {
        alerts = c.alerts();
        alerts.iter().any(|x| x.kind == AlertKind::LeftoverFound)
    });
    let a0 = alerts.iter().find(|x| x.kind == AlertKind::LeftoverFound).unwrap().clone();
    assert_eq!(a0.details["host"], "host-1");
    assert!(a0.details["path"].as_str().unwrap().ends_with("extra/old-notes.txt"), "{a0:?}");
    assert_eq!(a0.details["line"], 2);
    assert_eq!(a0.details["declared"], false);
    // Reported once, not at every scan.
    std::thread::sleep(Duration::from_secs(5));
    let all = c.alerts();
    let n = all.iter().filter(|x| x.kind == AlertKind::LeftoverFound).count();
    assert_eq!(n, 1, "{all:#?}");
    assert!(!c.logs().contains(&v1) && !c.cli_ok(&["alerts"]).contains(&v1), "the value leaked");
    // The rotation's report shows where the old value was found after it.
    let id = a0.rotation.as_deref().unwrap();
    let report = c.cli_ok(&["report", id]);
    assert!(
        report.contains("## Scope")
            && report.contains("leftovers of the old value")
            && report.contains("old-notes.txt"),
        "{report}"
    );
    assert!(!report.contains(&v1));
}
