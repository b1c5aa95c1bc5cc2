//! A scope scan is not an offline oracle for secret values (issue #11 item 4).
//!
//! A rogue agent that declares nothing still takes part in every scan (copies
//! nobody declared must be found), so it must receive nothing it could test a
//! guess of the value against: no fingerprint and no length — only a fresh
//! salt. The coordinator does the matching on the salted token HMACs the
//! agents send back, and still finds a real copy planted in an undeclared
//! file on another (real) agent that declares nothing.

use rekey_tests::scripted::ScriptedAgent;
use rekey_tests::{Agent, Coordinator, wait_for};
use rekey_types::v1::{ScanStatus, VersionRole};
use std::path::Path;

const SECRET: &str = "oracle-token";

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
"#
    )
}

/// A real agent scanning `dir/scan`, consuming `secrets` into `dir/<secret>.conf`.
fn start_agent(c: &Coordinator, tmp: &Path, name: &str, secrets: &[&str]) -> Agent {
    let dir = tmp.join(format!("agent-{name}"));
    std::fs::create_dir_all(dir.join("scan")).unwrap();
    let d = dir.display();
    let mut config = format!(
        "state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n\
         [scan]\nroots = [\"{d}/scan\"]\ntimeout = \"10s\"\n"
    );
    for s in secrets {
        config.push_str(&format!(
            "\n[[secret]]\nname = \"{s}\"\n  [[secret.file]]\n  path = \"{d}/{s}.conf\"\n  kind = \"template\"\n  \
             template = \"token = {{{{ value }}}}\\n\"\n"
        ));
    }
    let mut a = Agent::with_config(tmp, name, &config);
    a.enroll_ok(c, &[]);
    a.start();
    a
}

fn hmac_hex(salt: &[u8], value: &[u8]) -> String {
    hex::encode(ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, salt), value).as_ref())
}

#[test]
fn a_scope_scan_gives_a_rogue_agent_nothing_to_test_guesses_against_and_still_finds_copies() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-oracle-").tempdir().unwrap();
    let t = tmp.path();
    let c = Coordinator::start(&t.join("c"), &catalog());
    let consumer = start_agent(&c, t, "consumer", &[SECRET]);
    // Declares nothing, scans a root where someone left a copy.
    let batch = start_agent(&c, t, "batch", &[]);
    // Declares nothing and records every scan request it gets.
    let rogue = ScriptedAgent::enroll(&c, t, "rogue", &[], &[]);
    // A scripted consumer: it holds the value anyway, so it gets the targets.
    let scripted_consumer = ScriptedAgent::enroll(&c, t, "scripted-consumer", &[SECRET], &[]);
    wait_for("agents connected", || {
        [&consumer, &batch].iter().all(|a| c.is_connected(&a.name))
            && c.is_connected(&rogue.name)
            && c.is_connected(&scripted_consumer.name)
    });

    let out = c.cli(&["rotate", "start", SECRET, "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let declared = consumer.dir.join(format!("{SECRET}.conf"));
    let text = std::fs::read_to_string(&declared).unwrap();
    let value = text.lines().find_map(|l| l.strip_prefix("token = ")).expect("token line").to_string();
    assert!(value.starts_with("tok_"));

    // A real copy in a file nobody declares, on a host that declares nothing.
    let notes = batch.dir.join("scan/notes.txt");
    std::fs::write(&notes, format!("todo\nthe token is {value}, do not share\n")).unwrap();

    let map = c.scope(SECRET, &["--timeout", "10s"]);

    // The rogue agent was asked (it answered, nothing found) ...
    let r = map.hosts.iter().find(|h| h.host == "rogue").expect("rogue asked");
    assert_eq!(r.status, ScanStatus::Answered, "{r:#?}");
    let requests = rogue.scan_requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let req = &requests[0];
    // ... with a blind request: a salt, and no fingerprint, no length.
    assert!(req.blind, "{req:?}");
    assert!(req.targets.is_empty(), "a non-consumer got targets: {req:?}");
    assert!((16..=64).contains(&req.salt.len()), "{req:?}");
    // Nothing it received is the value or its fingerprint under the scan's salt.
    let seen = format!("{req:?}");
    assert!(!seen.contains(&value), "the value went to a non-consumer");
    assert!(!seen.contains(&hmac_hex(&req.salt, value.as_bytes())), "the fingerprint went to a non-consumer");
    // Everything it got is the scan id, the salt, the timeout and the blind flag.
    let bare = rekey_proto::v1::ScanRequest {
        scan_id: req.scan_id.clone(),
        salt: req.salt.clone(),
        timeout_ms: req.timeout_ms,
        blind: true,
        targets: Vec::new(),
    };
    assert_eq!(req, &bare);

    // A consumer (which holds the value anyway) gets the targets.
    let creqs = scripted_consumer.scan_requests();
    assert_eq!(creqs.len(), 1, "{creqs:#?}");
    assert!(!creqs[0].blind);
    assert_eq!(creqs[0].targets.len(), 1, "{creqs:#?}");
    assert_eq!(creqs[0].targets[0].fingerprint, hmac_hex(&creqs[0].salt, value.as_bytes()));

    // The planted copy on the host that declares nothing is still found,
    // matched by the coordinator, with path and line.
    let b = map.hosts.iter().find(|h| h.host == "batch").expect("batch asked");
    assert_eq!((b.status, b.declares_secret), (ScanStatus::Answered, false), "{b:#?}");
    let f = b.files.iter().find(|f| f.path == notes.display().to_string()).unwrap_or_else(|| panic!("{b:#?}"));
    assert!(!f.declared);
    assert_eq!(f.lines.iter().map(|l| (l.line, l.role)).collect::<Vec<_>>(), vec![(2, VersionRole::Current)]);
    assert!(map.undeclared.iter().any(|o| o.host == "batch" && o.line == 2), "{map:#?}");
    // The consumer's declared file is found by the consumer itself.
    let h = map.hosts.iter().find(|h| h.host == "consumer").expect("consumer asked");
    let df = h.files.iter().find(|f| f.path == declared.display().to_string()).unwrap_or_else(|| panic!("{h:#?}"));
    assert!(df.declared);
    // A random 32-character token is not weak.
    assert!(map.searched.iter().all(|s| s.weak.is_none()), "{:#?}", map.searched);

    // The value is in no log and not in the CLI's output.
    let json = serde_json::to_string(&map).unwrap();
    assert!(!json.contains(&value));
    assert!(!c.logs().contains(&value), "the value leaked into rekeyd's log");
    assert!(!batch.logs().contains(&value), "the value leaked into the agent's log");
}
