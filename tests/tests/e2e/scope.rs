//! Scope discovery end to end: real agents search their declared files and
//! scan roots for keyed fingerprints and the coordinator builds the consumer
//! map — undeclared copies, declared files, hosts that do not answer, hosts
//! that do not even consume the secret, skipped files, and leftovers of an
//! old version after a rotation. No value may appear in any log, the audit
//! log or the CLI's output.

use rekey_tests::{Agent, Coordinator, wait_for};
use rekey_types::v1::{
    AuditRecordView, RotationState, RotationView, ScanStatus, ScopeFileView, ScopeHostView, ScopeView, VersionRole,
};
use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "scope-token";
/// Its old value stays held by the coordinator (no deletion at the provider).
const KEPT: &str = "kept-token";
/// Deleted at the provider, then watched: the old value is held until monitoring ends.
const WATCHED: &str = "watched-token";

fn catalog() -> String {
    let mut out = String::new();
    for (name, delete, monitor) in [(SECRET, true, "0s"), (KEPT, false, "0s"), (WATCHED, true, "15s")] {
        out.push_str(&format!(
            r#"
[[secret]]
name = "{name}"
all_agents = true
provider = {{ kind = "random", length = 32, prefix = "tok_" }}
[secret.rollout]
canary = 0
host_deadline = "60s"
[secret.revocation]
grace = "1s"
delete = {delete}
monitor = "{monitor}"
"#
        ));
    }
    out
}

/// An agent consuming `secrets` (each into `dir/<secret>.conf`) that also
/// scans `dir/scan`.
fn agent_config(dir: &Path, secrets: &[&str]) -> String {
    let d = dir.display();
    let mut text = format!(
        "state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n\
         [scan]\nroots = [\"{d}/scan\"]\nmax_file_size = \"64KiB\"\ntimeout = \"10s\"\n"
    );
    for s in secrets {
        text.push_str(&format!(
            "\n[[secret]]\nname = \"{s}\"\n  [[secret.file]]\n  path = \"{d}/{s}.conf\"\n  kind = \"template\"\n  \
             template = \"# managed by rekey\\ntoken = {{{{ value }}}}\\n\"\n"
        ));
    }
    text
}

fn start_agent(c: &Coordinator, tmp: &Path, name: &str, secrets: &[&str]) -> Agent {
    let dir = tmp.join(format!("agent-{name}"));
    std::fs::create_dir_all(dir.join("scan")).unwrap();
    let mut a = Agent::with_config(tmp, name, &agent_config(&dir, secrets));
    a.enroll_ok(c, &[]);
    a.start();
    a
}

fn value_in(conf: &Path) -> String {
    let text = std::fs::read_to_string(conf).unwrap();
    text.lines().find_map(|l| l.strip_prefix("token = ")).expect("token line").to_string()
}

fn host<'a>(map: &'a ScopeView, name: &str) -> &'a ScopeHostView {
    map.hosts.iter().find(|h| h.host == name).unwrap_or_else(|| panic!("{name}: {map:#?}"))
}

fn file<'a>(h: &'a ScopeHostView, path: &Path) -> &'a ScopeFileView {
    let p = path.display().to_string();
    h.files.iter().find(|f| f.path == p).unwrap_or_else(|| panic!("{p}: {h:#?}"))
}

fn lines(f: &ScopeFileView) -> Vec<(u32, VersionRole)> {
    f.lines.iter().map(|l| (l.line, l.role)).collect()
}

/// The pid of a running agent, from its command line (the fixture keeps its child private).
fn pid_of(a: &Agent) -> u32 {
    let needle = a.config.display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("rekey-agent") && cmd.contains(" run ") && cmd.contains(&needle) {
            return pid;
        }
    }
    panic!("no process for agent {}", a.name);
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

fn assert_nowhere(value: &str, what: &str, texts: &[(&str, String)]) {
    for (name, text) in texts {
        assert!(!text.contains(value), "the {what} value leaked into {name}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}

#[test]
fn scope_maps_declared_and_undeclared_copies_and_silent_hosts() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-scope-").tempdir().unwrap();
    let t = tmp.path();
    let c = Coordinator::start(&t.join("c"), &catalog());
    let consumers: Vec<Agent> = (1..=3).map(|i| start_agent(&c, t, &format!("host-{i}"), &[SECRET])).collect();
    // Consumes nothing, but someone left a copy under its scan root.
    let batch = start_agent(&c, t, "batch", &[]);
    // Enrolled, never started.
    let idle = Agent::with_config(t, "idle", "state_dir = \"state\"\n");
    idle.enroll_ok(&c, &[]);
    wait_for("agents connected", || consumers.iter().chain([&batch]).all(|a| c.is_connected(&a.name)));

    // The first version lands in every consumer's declared file.
    let out = c.cli(&["rotate", "start", SECRET, "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = |a: &Agent| a.dir.clone();
    let value = value_in(&dir(&consumers[0]).join(format!("{SECRET}.conf")));
    for a in &consumers {
        assert_eq!(value_in(&dir(a).join(format!("{SECRET}.conf"))), value);
    }

    // Copies nobody declared: on host-1 (deep under its root, line 3) and on batch (line 2).
    let copy = dir(&consumers[0]).join("scan/app/conf.d/copy.env");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::write(&copy, format!("# copied by hand\nOTHER=1\nexport API_TOKEN=\"{value}\"\n")).unwrap();
    let notes = dir(&batch).join("scan/notes.txt");
    std::fs::write(&notes, format!("todo\nthe token is {value}, do not share\n")).unwrap();
    // On host-2: a binary file and one over the size limit, both holding the value: skipped and counted.
    let mut binary = b"\x7fELF\0\0\0".to_vec();
    binary.extend_from_slice(format!("\n{value}\n").as_bytes());
    std::fs::write(dir(&consumers[1]).join("scan/app.bin"), binary).unwrap();
    let big = format!("{}\n{value}\n", "#".repeat(70 * 1024));
    std::fs::write(dir(&consumers[1]).join("scan/huge.log"), big).unwrap();

    // host-3 stays connected but stops answering.
    let stopped = pid_of(&consumers[2]);
    signal(stopped, "-STOP");

    let map = c.scope(SECRET, &["--timeout", "4s"]);
    signal(stopped, "-CONT");

    assert_eq!(map.secret, SECRET);
    assert_eq!(map.filter, "all");
    let scan_id = map.scan_id.clone();
    assert!(scan_id.starts_with("scan-"), "{map:#?}");
    // host-1: its declared file and the undeclared copy, with path and line.
    let h1 = host(&map, "host-1");
    assert_eq!(h1.status, ScanStatus::Answered, "{h1:#?}");
    let declared = file(h1, &dir(&consumers[0]).join(format!("{SECRET}.conf")));
    assert!(declared.declared);
    assert_eq!(lines(declared), vec![(2, VersionRole::Current)]);
    let undeclared = file(h1, &copy);
    assert!(!undeclared.declared);
    assert_eq!(lines(undeclared), vec![(3, VersionRole::Current)]);
    // host-2: declared and found; binary and oversized files skipped and counted.
    let h2 = host(&map, "host-2");
    assert_eq!(h2.files.len(), 1, "{h2:#?}");
    assert!(file(h2, &dir(&consumers[1]).join(format!("{SECRET}.conf"))).declared);
    assert_eq!(h2.skipped.get("binary"), Some(&1), "{h2:#?}");
    assert_eq!(h2.skipped.get("too_large"), Some(&1), "{h2:#?}");
    assert!(!h2.declared_not_found);
    // host-3: asked, silent.
    let h3 = host(&map, "host-3");
    assert_eq!(h3.status, ScanStatus::NotAnswering, "{h3:#?}");
    assert!(h3.connected);
    assert!(h3.error.as_deref().unwrap().contains("no answer within 4s"), "{h3:#?}");
    // batch: does not consume the secret, holds a copy anyway.
    let b = host(&map, "batch");
    assert_eq!((b.status, b.declares_secret), (ScanStatus::Answered, false), "{b:#?}");
    assert_eq!(lines(file(b, &notes)), vec![(2, VersionRole::Current)]);
    assert!(!file(b, &notes).declared);
    // idle: enrolled, not connected.
    let i = host(&map, "idle");
    assert_eq!((i.status, i.connected), (ScanStatus::NotAnswering, false), "{i:#?}");
    let s = &map.summary;
    assert_eq!(s.hosts_asked, 4, "{s:#?}");
    assert_eq!(s.answered, 3, "{s:#?}");
    assert_eq!(s.undeclared, 2, "{s:#?}");
    assert_eq!(s.not_answering, ["host-3", "idle"]);
    let mut undeclared_places: Vec<(String, String, u32)> =
        map.undeclared.iter().map(|o| (o.host.clone(), o.path.clone(), o.line)).collect();
    undeclared_places.sort();
    assert_eq!(
        undeclared_places,
        vec![("batch".into(), notes.display().to_string(), 2), ("host-1".into(), copy.display().to_string(), 3)]
    );

    // The table says the same.
    let table = c.cli_ok(&["scope", SECRET, "--timeout", "10s"]);
    assert!(table.contains("UNDECLARED") && table.contains(&copy.display().to_string()), "{table}");
    assert!(table.contains("declared") && table.contains("not answering: not connected"), "{table}");
    let json_text = serde_json::to_string(&map).unwrap();

    // The scan is audited (who, what, where asked), without values.
    let audit = c.cli_ok(&["audit", "-o", "json"]);
    let records: Vec<AuditRecordView> = serde_json::from_str(&audit).unwrap();
    let scan = records
        .iter()
        .find(|r| r.action == "scope.scan" && r.details["scan"] == scan_id.as_str())
        .unwrap_or_else(|| panic!("no scope.scan audit record: {records:#?}"));
    assert!(scan.actor.contains("operator"), "{scan:#?}");
    assert_eq!(scan.details["secret"], SECRET);
    assert_eq!(scan.details["hosts_asked"], serde_json::json!(["batch", "host-1", "host-2", "host-3"]));
    assert!(records.iter().any(|r| r.action == "scope.result"));

    // The value is nowhere but in the files: logs, audit, CLI output, agents' state.
    let mut texts = vec![
        ("the coordinator log", c.logs()),
        ("the audit log", audit),
        ("the scope json", json_text),
        ("the scope table", table),
    ];
    for a in consumers.iter().chain([&batch]) {
        texts.push(("an agent log", a.logs()));
        for f in walk(&a.state_dir()) {
            if !f.display().to_string().contains("backup") {
                texts.push(("an agent state file", String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned()));
            }
        }
    }
    assert_nowhere(&value, "current", &texts);
}

#[test]
fn leftover_scans_find_old_copies_and_say_when_the_old_value_is_gone() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-leftover-").tempdir().unwrap();
    let t = tmp.path();
    let c = Coordinator::start(&t.join("c"), &catalog());
    let a = start_agent(&c, t, "web-1", &[KEPT, WATCHED]);
    wait_for("agent connected", || c.is_connected(&a.name));

    // Bad questions get clear answers.
    let err = |args: &[&str]| {
        let out = c.cli(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err(&["scope", "nope"]).contains("unknown secret \"nope\""));
    assert!(err(&["scope", KEPT]).contains("has no current version"));
    assert!(err(&["scope", KEPT, "--rotation", "rot-missing"]).contains("unknown rotation"));

    let rotate = |secret: &str| {
        let out = c.cli(&["rotate", "start", secret, "--wait", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: RotationView = serde_json::from_slice(&out.stdout).unwrap();
        v.id
    };
    let conf = a.dir.join(format!("{KEPT}.conf"));
    rotate(KEPT);
    let old = value_in(&conf);
    // Someone copied the value by hand; the next rotation cannot know.
    let copy = a.dir.join("scan/backup-of-config.txt");
    std::fs::write(&copy, format!("token: {old}\n")).unwrap();
    let second = rotate(KEPT);
    let new = value_in(&conf);
    assert_ne!(old, new);

    for args in [vec!["scope", KEPT, "--version", "old"], vec!["scope", KEPT, "--rotation", second.as_str()]] {
        let map: ScopeView = c.cli_view(&args);
        assert!(map.leftover_scan, "{map:#?}");
        assert_eq!(map.rotation.as_deref(), Some(second.as_str()));
        let leftovers = &map.leftovers;
        assert_eq!(leftovers.len(), 1, "{map:#?}");
        assert_eq!(leftovers[0].path, copy.display().to_string());
        assert_eq!((leftovers[0].line, leftovers[0].role), (1, VersionRole::Old));
        assert!(!leftovers[0].declared);
        // The managed file holds the new value only: not a leftover, and a clean
        // consumer is not reported as missing the secret.
        assert!(map.summary.declared_not_found.is_empty());
        let table = c.cli_ok(&args);
        assert!(table.starts_with("leftovers of kept-token"), "{table}");
        assert!(table.contains("LEFTOVER (UNDECLARED)"), "{table}");
        let json = serde_json::to_string(&map).unwrap();
        assert_nowhere(&old, "old", &[("the leftover json", json), ("the leftover table", table)]);
    }
    // Without a filter: the new value where it belongs, the old one where it lingers.
    let map = c.scope(KEPT, &[]);
    let h = host(&map, "web-1");
    assert_eq!(lines(file(h, &conf)), vec![(2, VersionRole::Current)]);
    assert_eq!(lines(file(h, &copy)), vec![(1, VersionRole::Old)]);
    assert_eq!(map.summary.leftovers, 1);

    // Revoked at the provider: the old value is held through monitoring, so
    // leftovers can still be found then; forgotten once the rotation completes.
    let watched = a.dir.join(format!("{WATCHED}.conf"));
    rotate(WATCHED);
    let revoked = value_in(&watched);
    let stale = a.dir.join("scan/stale.env");
    std::fs::write(&stale, format!("# old copy\nW={revoked}\n")).unwrap();
    let id = c.cli_ok(&["rotate", "start", WATCHED]).trim().to_string();
    let state = |id: &str| c.rotation(id).state;
    wait_for("the rotation to monitor", || state(&id) == RotationState::Monitoring);
    let map = c.scope(WATCHED, &["--version", "old"]);
    assert_eq!(map.rotation.as_deref(), Some(id.as_str()), "{map:#?}");
    let leftovers = &map.leftovers;
    assert_eq!(leftovers.len(), 1, "{map:#?}");
    assert_eq!((leftovers[0].path.as_str(), leftovers[0].line), (&*stale.display().to_string(), 2));
    wait_for("the rotation to complete", || state(&id) == RotationState::Completed);
    let e = err(&["scope", WATCHED, "--version", "old"]);
    assert!(
        e.contains(&format!(
            "the old value of {WATCHED} is no longer held by the coordinator (forgotten at revocation)"
        )),
        "{e}"
    );
    // The unfiltered scan still runs, and says what it could not look for.
    let map = c.scope(WATCHED, &[]);
    assert_eq!(map.not_searched[0].role, VersionRole::Old, "{map:#?}");
    assert!(map.not_searched[0].reason.contains("forgotten at revocation"));
    assert_eq!(map.summary.leftovers, 0);
    assert_nowhere(&revoked, "revoked", &[("the coordinator log", c.logs()), ("the agent log", a.logs())]);
    assert_nowhere(&new, "new", &[("the coordinator log", c.logs()), ("the agent log", a.logs())]);
    assert_nowhere(&old, "old", &[("the coordinator log", c.logs()), ("the agent log", a.logs())]);
}
