//! The rotation engine end to end: a real rekeyd, scripted agents over real
//! mTLS, the real CLI. Crashes are real SIGKILLs.

use rekey_tests::scripted::{Behavior, ScriptedAgent};
use rekey_tests::{Coordinator, StoreKind, wait_for};
use rekey_types::v1::{
    AuditRecordView, HostState, IncidentSecretState, IncidentState, IncidentView, RotationState, RotationView,
    VersionStatus, VersionView,
};
use serde_json::Value;
use std::time::Duration;

const SECRET: &str = "api-key";

fn catalog(grace: &str) -> String {
    format!(
        r#"
[metrics]
listen = "127.0.0.1:0"

[[secret]]
name = "{SECRET}"
provider = {{ kind = "random", length = 40, prefix = "ak_" }}
selector = {{ env = "test" }}
[secret.rollout]
canary = 1
# Rounded down: 5 hosts are 1, 2, 2 (host-3 fails beside host-2; host-4 waits).
waves = ["60%", "100%"]
host_deadline = "20s"
[secret.revocation]
monitor = "0s"
grace = "{grace}"

[[secret]]
name = "db-password"
all_agents = true
provider = {{ kind = "random", length = 24 }}
[secret.revocation]
monitor = "0s"
"#
    )
}

struct Fleet {
    _tmp: tempfile::TempDir,
    c: Coordinator,
    agents: Vec<ScriptedAgent>,
}

fn fleet(n: usize, grace: &str, store: StoreKind) -> Fleet {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-engine-").tempdir().unwrap();
    let c = Coordinator::start_on(&tmp.path().join("c"), &catalog(grace), store);
    let agents = (1..=n)
        .map(|i| ScriptedAgent::enroll(&c, tmp.path(), &format!("host-{i}"), &[SECRET, "db-password"], &["env=test"]))
        .collect::<Vec<_>>();
    wait_for("agents connected", || agents.iter().all(|a| c.is_connected(&a.name)));
    Fleet { _tmp: tmp, c, agents }
}

fn rotation(c: &Coordinator, id: &str) -> RotationView {
    c.rotation(id)
}

fn start(c: &Coordinator, secret: &str) -> String {
    c.cli_ok(&["rotate", "start", secret]).trim().to_string()
}

fn start_skipping_preflight(c: &Coordinator, reason: &str) -> String {
    c.cli_ok(&["rotate", "start", SECRET, "--skip-preflight", "--reason", reason]).trim().to_string()
}

fn wait_state(c: &Coordinator, id: &str, states: &[RotationState]) -> RotationView {
    let mut last = None;
    wait_for(&format!("rotation {id} to reach {states:?}"), || {
        let r = rotation(c, id);
        let reached = states.contains(&r.state);
        last = Some(r);
        reached
    });
    last.expect("polled")
}

fn versions(c: &Coordinator, secret: &str) -> Vec<VersionView> {
    c.versions(secret)
}

/// Index of the first audit record matching `f`.
fn audit_index(audit: &[AuditRecordView], f: impl Fn(&AuditRecordView) -> bool) -> Option<usize> {
    audit.iter().position(f)
}

/// The old version is never deactivated before every host confirmed: in the
/// audit chain, the last `healthy` comes before `rotation.deactivating`.
fn assert_revocation_after_confirmation(c: &Coordinator, id: &str) {
    let audit = c.audit();
    let of = |r: &AuditRecordView| r.details["rotation"] == id;
    let deact = audit_index(&audit, |r| of(r) && r.action == "rotation.deactivating")
        .unwrap_or_else(|| panic!("no deactivation recorded for {id}"));
    let last_healthy = audit.iter().rposition(|r| of(r) && r.action == "host.state" && r.details["to"] == "healthy");
    assert!(last_healthy.is_some_and(|h| h < deact), "deactivated before the last confirmation");
}

fn a_rotation_goes_canary_waves_verified_deactivate_grace_delete_completed(store: StoreKind) {
    let f = fleet(5, "1s", store);
    // First rotation: establishes the first version (nothing to revoke yet).
    let out = f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]);
    assert!(out.contains("[completed]"), "{out}");
    let v1 = f.c.secrets()[0].current_version.clone().unwrap();
    assert!(f.agents.iter().all(|a| a.applied(SECRET).unwrap().0 == v1));

    // Second rotation: the full lifecycle with revocation.
    let id = start(&f.c, SECRET);
    let r = wait_state(&f.c, &id, &[RotationState::Completed, RotationState::Halted]);
    assert_eq!(r.state, RotationState::Completed, "{r:#?}");
    let v2 = r.new_version.as_deref().unwrap();
    assert_eq!(r.old_version.as_deref(), Some(v1.as_str()));
    let states: Vec<RotationState> = r.timeline.iter().map(|t| t.state).collect();
    use RotationState::*;
    let order = [Planned, Generating, RollingOut, Verified, Deactivating, Grace, Deleting, Completed];
    let mut pos = 0;
    for s in order {
        pos += states[pos..].iter().position(|x| *x == s).unwrap_or_else(|| panic!("{s} missing from {states:?}"));
    }
    // Every host confirmed the new version with the expected fingerprint.
    let expected = r.expected_fingerprint.as_deref().unwrap();
    for (name, h) in &r.hosts {
        assert_eq!(h.state, HostState::Healthy, "{name}");
        assert_eq!(h.fingerprint.as_deref(), Some(expected), "{name}");
    }
    // Canary first: host-1 was healthy before any other host got the delivery.
    let hist = |h: &str, st: HostState| -> i64 { r.hosts[h].first_at(st).unwrap() };
    for other in ["host-2", "host-3", "host-4", "host-5"] {
        assert!(
            hist("host-1", HostState::Healthy) <= hist(other, HostState::Delivered),
            "{other} delivered before the canary confirmed"
        );
    }
    assert!(
        hist("host-3", HostState::Healthy) <= hist("host-4", HostState::Delivered),
        "wave 2 started before wave 1 finished"
    );
    // The provider holds the new version only; agents were told to purge the old one.
    let vs = versions(&f.c, SECRET);
    assert_eq!(vs.len(), 1, "{vs:?}");
    assert_eq!((vs[0].id.as_str(), vs[0].status), (v2, VersionStatus::Active));
    wait_for("purges", || f.agents.iter().all(|a| a.purges().contains(&(SECRET.into(), v1.clone()))));
    assert_revocation_after_confirmation(&f.c, &id);
    assert!(f.c.cli_ok(&["audit", "verify"]).contains("audit chain intact"));
    // Human-readable status and lists.
    let status = f.c.cli_ok(&["rotate", "status", &id]);
    assert!(status.contains("completed") && status.contains("host-5") && status.contains("hmac-sha256:"), "{status}");
    let list = f.c.cli_ok(&["rotate", "list"]);
    assert!(list.contains(&id) && list.contains("5/5 healthy"), "{list}");
    // No secret value reached the coordinator's logs, the CLI's output or the metrics.
    let logs = f.c.logs()
        + &status
        + &f.c.cli_ok(&["audit"])
        + &f.c.cli_ok(&["rotate", "status", &id, "-o", "json"])
        + &f.c.metrics();
    for a in &f.agents {
        for v in a.values_seen() {
            let v = String::from_utf8_lossy(&v).into_owned();
            assert!(!logs.contains(&v), "a secret value leaked into logs or output");
        }
    }
}

fn a_failing_host_halts_the_rollout_and_abort_restores_everyone(store: StoreKind) {
    let f = fleet(5, "1s", store);
    f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]);
    let v1 = f.agents[0].applied(SECRET).unwrap();
    f.agents[2].set_behavior(SECRET, Behavior::Fail("health check http://127.0.0.1:8080/health returned 503".into()));
    let out = f.c.cli(&["rotate", "start", SECRET, "--wait"]);
    assert!(!out.status.success(), "a halted rotation must not exit 0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("halted") && err.contains("host-3") && err.contains("returned 503"), "{err}");
    let id = f.c.rotations(None)[0].id.clone();
    let r = rotation(&f.c, &id);
    assert_eq!(r.state, RotationState::Halted);
    assert_eq!(r.hosts["host-3"].state, HostState::RolledBack);
    assert!(r.hosts["host-3"].error.as_deref().unwrap().contains("503"));
    assert_eq!(r.hosts["host-4"].state, HostState::Pending, "the next wave must not start");
    // The old version is untouched at the provider and still what host-3 runs.
    let vs = versions(&f.c, SECRET);
    assert!(vs.iter().any(|v| v.id == v1.0 && v.status == VersionStatus::Active), "{vs:?}");
    assert_eq!(f.agents[2].applied(SECRET).unwrap(), v1);
    // Status for humans shows the failure.
    let status = f.c.cli_ok(&["rotate", "status", &id]);
    assert!(status.contains("halted") && status.contains("returned 503"), "{status}");

    // Pause is refused while halted; abort rolls back everyone who applied.
    let out = f.c.cli(&["rotate", "pause", &id]);
    assert!(!out.status.success());
    f.c.cli_ok(&["rotate", "abort", &id]);
    let r = wait_state(&f.c, &id, &[RotationState::Aborted]);
    assert_eq!(r.state, RotationState::Aborted);
    for a in &f.agents {
        assert_eq!(a.applied(SECRET).unwrap(), v1, "{} is not back on the old version", a.name);
    }
    assert!(f.agents[0].rollbacks().iter().any(|(rid, _)| *rid == id));
    assert!(f.agents[3].rollbacks().is_empty(), "host-4 never got the new version");
    // The new version is gone at the provider; the old one is current.
    let vs = versions(&f.c, SECRET);
    assert_eq!(vs.len(), 1, "{vs:?}");
    assert_eq!(vs[0].id, v1.0);
    assert_eq!(f.c.secrets()[0].current_version.as_deref(), Some(v1.0.as_str()));
}

fn an_unreachable_host_blocks_revocation_until_it_returns_and_exclusion_is_audited(store: StoreKind) {
    let mut f = fleet(3, "1s", store);
    f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]);
    let v1 = f.agents[0].applied(SECRET).unwrap().0;
    f.agents[1].stop();
    wait_for("host-2 gone", || !f.c.is_connected("host-2"));
    // The preflight would refuse a start with a consumer down: skipped, on purpose.
    let id = start_skipping_preflight(&f.c, "host-2 is down: the unreachable path under test");
    wait_for("host-2 unreachable, the others healthy", || {
        let r = rotation(&f.c, &id);
        r.hosts["host-2"].state == HostState::Unreachable && r.hosts["host-3"].state == HostState::Healthy
    });
    std::thread::sleep(Duration::from_secs(2));
    let r = rotation(&f.c, &id);
    assert_eq!(r.state, RotationState::RollingOut, "must wait, neither halt nor revoke");
    assert!(r.waiting_on.as_deref().unwrap().contains("host-2"));
    assert!(versions(&f.c, SECRET).iter().any(|v| v.id == v1 && v.status == VersionStatus::Active));
    // It comes back: it gets the delivery, and the rotation completes.
    f.agents[1].start();
    let r = wait_state(&f.c, &id, &[RotationState::Completed]);
    assert_eq!(r.hosts["host-2"].state, HostState::Healthy);
    assert_revocation_after_confirmation(&f.c, &id);

    // Next rotation: host-3 is gone for good; the operator excludes it.
    f.agents[2].stop();
    wait_for("host-3 gone", || !f.c.is_connected("host-3"));
    let id = start_skipping_preflight(&f.c, "host-3 is gone for good");
    wait_for("host-3 unreachable", || rotation(&f.c, &id).hosts["host-3"].state == HostState::Unreachable);
    let out = f.c.cli(&["rotate", "exclude", &id, "host-3", "--reason", ""]);
    assert!(!out.status.success(), "an exclusion needs a reason");
    f.c.cli_ok(&["rotate", "exclude", &id, "host-3", "--reason", "host decommissioned (INC-42)"]);
    let r = wait_state(&f.c, &id, &[RotationState::Completed]);
    assert_eq!(r.hosts["host-3"].exclusion.as_ref().unwrap().reason, "host decommissioned (INC-42)");
    let audit = f.c.audit();
    assert!(audit.iter().any(|a| a.actor == "operator/admin"
        && a.details["host"] == "host-3"
        && a.details["to"] == "excluded"
        && a.details["reason"] == "host decommissioned (INC-42)"));
}

fn one_rotation_per_secret_and_different_secrets_run_concurrently(store: StoreKind) {
    let f = fleet(2, "30s", store);
    f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]);
    let a = start(&f.c, SECRET);
    let out = f.c.cli(&["rotate", "start", SECRET]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already being rotated") && err.contains(&a), "{err}");
    let b = start(&f.c, "db-password");
    assert_ne!(a, b);
    wait_state(&f.c, &b, &[RotationState::Completed]);
    wait_state(&f.c, &a, &[RotationState::Grace]);
    // Unknown secrets and rotations are clear errors.
    let out = f.c.cli(&["rotate", "start", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown secret \"nope\""));
    let out = f.c.cli(&["rotate", "status", "rot-nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rotation \"rot-nope\""));
    // The catalog lists consumers and the active rotation.
    let secrets = f.c.secrets();
    assert_eq!(secrets[0].name, SECRET);
    assert_eq!(secrets[0].consumers, ["host-1", "host-2"]);
    assert_eq!(secrets[0].active_rotation.as_deref(), Some(a.as_str()));
    assert!(f.c.cli_ok(&["secrets"]).contains("host-1,host-2"));
}

fn a_secret_without_consumers_is_refused(store: StoreKind) {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-engine-").tempdir().unwrap();
    let c = Coordinator::start_on(&tmp.path().join("c"), &catalog("1s"), store);
    // An agent that does not match the selector.
    let _a = ScriptedAgent::enroll(&c, tmp.path(), "other", &[SECRET], &["env=prod"]);
    wait_for("connected", || c.is_connected("other"));
    let out = c.cli(&["rotate", "start", SECRET]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent consumes secret"), "{out:?}");
    assert!(c.rotations(None).is_empty());
}

/// SIGKILL of rekeyd after generating, mid-wave, after verification and
/// during the grace period: each rotation completes, exactly one new version
/// exists, the old one is revoked only after every host confirmed.
fn sigkill_of_rekeyd_at_any_point_loses_nothing(store: StoreKind) {
    let mut f = fleet(4, "3s", store);
    f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]);
    for point in ["after-generating", "mid-wave", "after-verification", "during-grace"] {
        let v_old = f.agents[0].applied(SECRET).unwrap().0;
        if point == "mid-wave" {
            f.agents[2].set_behavior(SECRET, Behavior::Hang);
        }
        let id = start(&f.c, SECRET);
        match point {
            "after-generating" => {
                wait_for("new version", || rotation(&f.c, &id).new_version.is_some());
            }
            "mid-wave" => {
                wait_for("host-3 stuck", || rotation(&f.c, &id).hosts["host-3"].state == HostState::Delivered);
            }
            "after-verification" | "during-grace" => {
                wait_state(&f.c, &id, &[RotationState::Grace]);
            }
            _ => unreachable!(),
        }
        let before = rotation(&f.c, &id);
        let new_version = before.new_version.clone().expect("a new version before the kill");
        f.c.kill();
        if point == "mid-wave" {
            f.agents[2].set_behavior(SECRET, Behavior::Succeed);
        }
        f.c.restart();
        let r = wait_state(&f.c, &id, &[RotationState::Completed]);
        assert_eq!(r.new_version.as_deref(), Some(new_version.as_str()), "{point}: a second new version was created");
        let vs = versions(&f.c, SECRET);
        assert_eq!(vs.len(), 1, "{point}: provider holds {vs:?}");
        assert_eq!(vs[0].id, new_version, "{point}");
        assert_ne!(vs[0].id, v_old);
        for a in &f.agents {
            assert_eq!(a.applied(SECRET).unwrap().0, new_version, "{point}: {}", a.name);
        }
        assert_revocation_after_confirmation(&f.c, &id);
        // Confirmations survived the crash: no host was asked twice to apply
        // the version it had already confirmed before the kill, except by the
        // idempotent re-delivery the protocol allows.
        assert!(f.c.logs().contains("resuming rotation"), "{point}");
    }
    assert!(f.c.cli_ok(&["audit", "verify"]).contains("intact"));
}

fn a_tampered_audit_record_is_found(store: StoreKind) {
    let mut f = fleet(1, "1s", store);
    f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]);
    f.c.kill();
    {
        let config = rekey_coordinator::config::Config::from_file(&f.c.config).unwrap();
        let offline = rekey_coordinator::store::postgres::FenceMode::Offline;
        let (store, _) = rekey_coordinator::ha::open_store(&config, offline).unwrap();
        let key = std::sync::Arc::new(rekey_coordinator::crypto::Key::generate().unwrap());
        let state = rekey_coordinator::engine::state::EngineState::open(&store, key).unwrap();
        let mut rec = state.audit_records().unwrap()[2].clone();
        rec.actor = "operator/mallory".into();
        state.tamper_audit_record(&rec).unwrap();
    }
    // rekeyd refuses to run on a store whose chain is broken, naming the record.
    let out = std::process::Command::new(&rekey_tests::bins().rekeyd)
        .arg("--config")
        .arg(&f.c.config)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken at record 3") && err.contains("altered"), "{err}");
}

fn a_campaign_rotates_every_matching_secret_with_bounded_concurrency_and_one_report(store: StoreKind) {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-campaign-").tempdir().unwrap();
    let mut catalog = String::new();
    for name in ["vendor-a", "vendor-b", "vendor-c", "unrelated"] {
        catalog.push_str(&format!(
            "[[secret]]\nname = \"{name}\"\nall_agents = true\nprovider = {{ kind = \"random\" }}\n[secret.revocation]\ngrace = \"1s\"\nmonitor = \"0s\"\n\n"
        ));
    }
    let c = Coordinator::start_on(&tmp.path().join("c"), &catalog, store);
    let secrets = ["vendor-a", "vendor-b", "vendor-c", "unrelated"];
    let agents: Vec<ScriptedAgent> =
        (1..=3).map(|i| ScriptedAgent::enroll(&c, tmp.path(), &format!("host-{i}"), &secrets, &[])).collect();
    wait_for("agents connected", || agents.iter().all(|a| c.is_connected(&a.name)));

    let out = c.cli(&["incident", "open", "x", "--secrets", "nothing-*"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secret of the catalog matches"), "{out:?}");

    let id = c
        .cli_ok(&["incident", "open", "vendor breach", "--secrets", "vendor-*", "--concurrency", "2"])
        .trim()
        .to_string();
    assert!(id.starts_with("inc-"), "{id}");
    let mut status = None;
    wait_for("campaign done", || {
        let s = c.incident(&id);
        let done = s.state == IncidentState::Done;
        status = Some(s);
        done
    });
    let status = status.expect("polled");
    let s = &status.secrets;
    assert_eq!(s.keys().collect::<Vec<_>>(), vec!["vendor-a", "vendor-b", "vendor-c"]);
    for (name, p) in s {
        assert_eq!(p.state, IncidentSecretState::Rotation(RotationState::Completed), "{name}: {p:?}");
        assert_eq!(p.healthy, Some(3), "{name}");
    }
    // Bounded concurrency: never more than 2 rotations rolling out at once.
    let rotations: Vec<RotationView> = s.values().map(|p| c.rotation(p.rotation.as_deref().unwrap())).collect();
    let spans: Vec<(i64, i64)> = rotations
        .iter()
        .map(|r| {
            let at = |st: RotationState| r.timeline.iter().find(|e| e.state == st).unwrap().at_ms;
            (at(RotationState::Planned), at(RotationState::Verified))
        })
        .collect();
    // At the moment each rollout started, how many were in their rollout phase
    // (itself included)? Counting every span that meets a long one would also
    // count two that ran one after the other inside it (seen on a loaded machine).
    for (i, a) in spans.iter().enumerate() {
        let active = spans.iter().filter(|b| b.0 <= a.0 && a.0 < b.1).count();
        assert!(active <= 2, "rollout {i} started while {} others were rolling out: {spans:?}", active - 1);
    }
    // The unmatched secret was left alone.
    assert!(c.rotations(Some("unrelated")).is_empty());
    // One Markdown report: every secret and every host.
    let report = c.cli_ok(&["report", &id]);
    assert!(report.starts_with("# Incident report: vendor breach"), "{report}");
    for needle in ["vendor-a", "vendor-b", "vendor-c", "host-1", "host-2", "host-3", "audit chain at head"] {
        assert!(report.contains(needle), "{needle} missing from the report:\n{report}");
    }
    assert!(!report.contains("unrelated"));
    let json: Value = serde_json::from_str(&c.cli_ok(&["report", &id, "--format", "json"])).unwrap();
    assert_eq!(json["kind"], "incident");
    for a in &agents {
        for v in a.values_seen() {
            assert!(!report.contains(&*String::from_utf8_lossy(&v)), "a secret value is in the report");
        }
    }
    let closed: IncidentView = c.cli_view(&["incident", "close", &id]);
    assert_eq!(closed.state, IncidentState::Closed);
    let list = c.cli_ok(&["incident", "list"]);
    assert!(list.contains("vendor breach") && list.contains("closed"), "{list}");
}

/// Found by the simulation (issue #15): an abort waits for the rollback of
/// every host that may hold the new version, and a revoked agent never
/// answers again. Revoking it excludes it from the rotation (audited as the
/// operator's exclusion), so the abort finishes.
#[test]
fn revoking_an_agent_lets_an_abort_that_waits_for_it_finish() {
    let mut f = fleet(3, "1s", rekey_tests::StoreKind::Sled);
    f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]);
    f.agents[1].stop();
    wait_for("host-2 gone", || !f.c.is_connected("host-2"));
    let id = start_skipping_preflight(&f.c, "host-2 is down: the path under test");
    wait_for("host-2 unreachable", || rotation(&f.c, &id).hosts["host-2"].state == HostState::Unreachable);
    f.c.cli_ok(&["rotate", "abort", &id]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rotation(&f.c, &id).state, RotationState::Aborting, "the abort waits for host-2's rollback");
    f.c.cli_ok(&["agent", "revoke", "host-2"]);
    let r = wait_state(&f.c, &id, &[RotationState::Aborted]);
    let exclusion = r.hosts["host-2"].exclusion.as_ref().expect("host-2 excluded");
    assert!(exclusion.reason.contains("revoked"), "{exclusion:?}");
    assert!(
        f.c.audit()
            .iter()
            .any(|a| a.actor == "operator/admin" && a.details["host"] == "host-2" && a.details["to"] == "excluded")
    );
}

/// The engine suite runs on both stores — the embedded sled and a real
/// PostgreSQL — through the same tests.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod on_sled {
            $(#[test]
            fn $name() {
                super::$name(rekey_tests::StoreKind::Sled)
            })*
        }
        mod on_postgres {
            $(#[test]
            fn $name() {
                super::$name(rekey_tests::StoreKind::Postgres)
            })*
        }
    };
}

on_both_stores!(
    a_rotation_goes_canary_waves_verified_deactivate_grace_delete_completed,
    a_failing_host_halts_the_rollout_and_abort_restores_everyone,
    an_unreachable_host_blocks_revocation_until_it_returns_and_exclusion_is_audited,
    one_rotation_per_secret_and_different_secrets_run_concurrently,
    a_secret_without_consumers_is_refused,
    sigkill_of_rekeyd_at_any_point_loses_nothing,
    a_tampered_audit_record_is_found,
    a_campaign_rotates_every_matching_secret_with_bounded_concurrency_and_one_report
);
