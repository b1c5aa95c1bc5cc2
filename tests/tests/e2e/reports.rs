//! Reports, secrets and alerts as an operator reads them, over a real
//! coordinator, the demo SaaS API (the `http` provider) and a scripted agent.

use rekey_tests::fixtures::DemoApi;
use rekey_tests::scripted::ScriptedAgent;
use rekey_tests::{Coordinator, wait_for};
use rekey_types::v1::{RotationState, RotationView};
use serde_json::json;

fn catalog(api: &DemoApi, revocation: &str) -> String {
    format!(
        r#"[[secret]]
name = "saas"
all_agents = true
{provider}[secret.revocation]
{revocation}
"#,
        provider = super::providers::demo_provider(&api.url, &api.admin_token_file)
    )
}

fn wait_state(c: &Coordinator, id: &str, states: &[RotationState]) -> RotationView {
    let mut last = None;
    wait_for(&format!("rotation {id} to reach {states:?}"), || {
        let r = c.rotation(id);
        let reached = states.contains(&r.state);
        last = Some(r);
        reached
    });
    last.expect("polled")
}

/// Issue 16 item 5: after deleting a key rekey did not create, the provider
/// can no longer see its use and the coordinator never held its value to
/// search for: the report says plainly what was and was not watched.
#[test]
fn monitoring_an_adopted_key_reports_what_it_could_not_watch() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let api = DemoApi::start();
    let (status, k0) = api.admin("POST", "/v1/keys", Some(json!({ "name": "made by hand" })));
    assert_eq!(status, 201, "{k0}");
    let adopted = k0["id"].as_str().unwrap().to_string();
    let tmp = tempfile::Builder::new().prefix("rekey-reports-").tempdir().unwrap();
    let c = Coordinator::start(
        &tmp.path().join("c"),
        &catalog(&api, "grace = \"1s\"\nmonitor = \"1h\"\ncheck_every = \"1s\""),
    );
    let agent = ScriptedAgent::enroll(&c, tmp.path(), "host-1", &["saas"], &[]);
    wait_for("agent connected", || c.is_connected(&agent.name));

    let id = c.cli_ok(&["rotate", "start", "saas"]).trim().to_string();
    let r = wait_state(&c, &id, &[RotationState::Monitoring, RotationState::Halted, RotationState::Aborted]);
    assert_eq!(r.state, RotationState::Monitoring, "{r:#?}");
    assert_eq!(r.old_version.as_deref(), Some(adopted.as_str()), "rekey adopted the provider's key");
    wait_for("a skipped leftover scan and two usage checks in monitoring", || {
        let skipped = c.audit().iter().any(|a| a.action == "tripwire.skipped" && a.details["rotation"] == id);
        let checks = c.rotation(&id).evidence.iter().filter(|e| e.phase == RotationState::Monitoring).count();
        skipped && checks >= 2
    });
    let report = c.cli_ok(&["report", &id]);
    let truths: [&str; 6] = [
        "## What was watched after the switch",
        &format!("usage checks of the old version `{adopted}` at the provider after the switch"),
        "The fleet was NOT searched for leftover copies of the old value (from ",
        &format!("the old version {adopted} was not created by rekey (it was adopted from the provider)"),
        "Rolled out: 1 of 1 target hosts confirmed the new version",
        &format!("The old version `{adopted}` was deleted at the provider"),
    ];
    for truth in truths {
        assert!(report.contains(truth), "the report lacks {truth:?}:\n{report}");
    }
    // Every check after the deletion is named for what it is: it could not see a use.
    let blind = report.contains("ran after the old version was deleted") || report.contains("failed.");
    assert!(blind, "checks of a deleted version read as evidence:\n{report}");
    // Audited once per rotation and reason, not at every interval.
    let skips = c.audit().iter().filter(|a| a.action == "tripwire.skipped" && a.details["rotation"] == id).count();
    assert_eq!(skips, 1);
    assert!(
        c.logs().contains("tripwire scan skipped: not watched"),
        "the coordinator log says the old value is not watched"
    );
    let json = c.cli_json(&["report", &id, "--format", "json"]);
    assert!(json["watched"].as_array().is_some_and(|w| w.len() >= 2), "{json:#}");
}

/// Issue 16 item 8: a consumer that keeps using the adopted key holds its
/// revocation; alerts are numbered 1, 2, … across a coordinator restart (not
/// 2000002 → 4000001), `rekey alerts` shows milliseconds, and `rekey secrets`
/// shows the adopted key as current instead of `-`.
#[test]
fn alert_numbers_survive_a_restart_and_the_adopted_key_is_shown() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let api = DemoApi::start();
    let (status, k0) = api.admin("POST", "/v1/keys", Some(json!({ "name": "made by hand" })));
    assert_eq!(status, 201, "{k0}");
    let (adopted, old_secret) = (k0["id"].as_str().unwrap().to_string(), k0["secret"].as_str().unwrap().to_string());
    let tmp = tempfile::Builder::new().prefix("rekey-alerts-").tempdir().unwrap();
    let mut c = Coordinator::start(
        &tmp.path().join("c"),
        &catalog(&api, "grace = \"1s\"\nmonitor = \"0s\"\ncheck_every = \"1s\""),
    );
    let agent = ScriptedAgent::enroll(&c, tmp.path(), "host-1", &["saas"], &[]);
    wait_for("agent connected", || c.is_connected(&agent.name));
    // A forgotten consumer keeps using the old key.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let user = {
        let (stop, addr) = (stop.clone(), api.addr.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let auth = format!("Bearer {old_secret}");
                let _ = rekey_tests::fixtures::http(&addr, "GET", "/v1/whoami", &[("Authorization", &auth)], b"");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
    };
    let id = c.cli_ok(&["rotate", "start", "saas"]).trim().to_string();
    let r = wait_state(&c, &id, &[RotationState::Halted, RotationState::Completed, RotationState::Aborted]);
    assert_eq!(r.state, RotationState::Halted, "use after the switch holds revocation: {r:#?}");
    wait_for("an alert", || !c.alerts().is_empty());
    let first: Vec<u64> = c.alerts().iter().map(|a| a.seq).collect();
    assert_eq!(first.iter().min(), Some(&1), "alerts start at 1: {first:?}");

    // The key rekey took from the provider is shown as current, and said to be adopted.
    let s = c.secret("saas");
    assert_eq!((s.current_version.as_deref(), s.current_version_adopted), (Some(adopted.as_str()), true));
    let table = c.cli_ok(&["secrets"]);
    assert!(table.contains(&format!("{adopted} (adopted)")), "{table}");

    c.restart();
    wait_for("agent back", || c.is_connected(&agent.name));
    let before = c.alerts().len();
    let _ = c.cli(&["rotate", "resume", &id]);
    wait_for("an alert after the restart", || c.alerts().len() > before);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    user.join().unwrap();
    let mut seqs: Vec<u64> = c.alerts().iter().map(|a| a.seq).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "alert numbers are dense across the restart");
    // Times to the millisecond: 2026-12-02T11:38:35.123Z.
    let alerts = c.cli_ok(&["alerts"]);
    let ms = alerts.split_whitespace().any(|w| w.len() == 24 && w.ends_with('Z') && w.as_bytes()[19] == b'.');
    assert!(ms, "rekey alerts shows whole seconds:\n{alerts}");
}
