//! Breach response when someone is still using the leaked key (issue #16):
//! an attacker keeps using the old AWS key (a signed IAM call on moto, 1 Hz)
//! during and after the switch. The evidence gate holds revocation and says
//! which command ends it; the operator runs that one command and the old key
//! is gone at the provider, on the record. With `on_use_after_switch =
//! "revoke"` rekey does it by itself and says so.

use super::providers::{Fleet, fleet, iam, start, wait_state};
use rekey_tests::wait_for;
use rekey_types::v1::{self, DecisionKind, RotationState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Uses the key once a second until `stop`; counts refusals.
fn attacker<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    w: &'s iam::World,
    key: &'s (String, String),
    stop: &'s AtomicBool,
    refused: &'s AtomicUsize,
) {
    s.spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            if w.get_user_with(&key.0, &key.1).is_err() {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

fn old_key_active(w: &iam::World, id: &str) -> Option<bool> {
    w.keys_now().iter().find(|(k, _)| k == id).map(|(_, a)| *a)
}

fn assert_no_value_leaked(f: &Fleet, texts: &[&str], secret: &str) {
    let logs = f.c.logs();
    for t in texts.iter().chain([&logs.as_str()]) {
        assert!(!t.contains(secret), "a secret value leaked");
    }
}

#[test]
fn an_attacker_on_the_old_key_is_cut_off_by_one_documented_command() {
    let w = iam::world(&[aws_sdk_iam::types::StatusType::Active]);
    let old = w.keys[0].clone();
    let f = fleet(2, &["aws-app"], |_| {
        w.catalog("aws-app")
            .replace("grace = \"1s\"", "grace = \"60s\"")
            .replace("check_every = \"1s\"", "check_every = \"2s\"")
    });
    let (stop, refused) = (AtomicBool::new(false), AtomicUsize::new(0));
    std::thread::scope(|s| {
        attacker(s, &w, &old, &stop, &refused);
        let id = start(&f.c, "aws-app");
        // Routine policy (hold): the use after the switch holds revocation…
        let r = wait_state(&f.c, &id, &[RotationState::Halted]);
        let reason = r.halt_reason.clone().unwrap();
        let command = format!("rekey rotate revoke {id} --reason");
        assert!(reason.contains(&old.0) && reason.contains(&command), "{reason}");
        assert_eq!(old_key_active(&w, &old.0), Some(true), "held: the old key is still active");
        // …the alert and the status say exactly what to run.
        let alert = f.c.alerts().into_iter().find(|a| a.kind == v1::AlertKind::OldVersionUsed).expect("an alert");
        assert!(alert.message.contains(&command), "{}", alert.message);
        let status = f.c.cli_ok(&["rotate", "status", &id]);
        assert!(status.contains("what you can do now") && status.contains(&command), "{status}");
        // The old ways out stay refused; the operator's is one command.
        assert!(!f.c.cli(&["rotate", "abort", &id]).status.success());
        let why = "INC-7: leaked key still used by an unknown client";
        f.c.cli_ok(&["rotate", "revoke", &id, "--reason", why]);
        let r = wait_state(&f.c, &id, &[RotationState::Completed, RotationState::Halted]);
        assert_eq!(r.state, RotationState::Completed, "{r:#?}");
        assert_eq!(old_key_active(&w, &old.0), None, "the old key is deleted at the provider");
        let d = &r.decisions[0];
        assert_eq!((d.kind, d.reason.as_str()), (DecisionKind::Revoke, why));
        assert!(d.by.starts_with("operator/"), "{}", d.by);
        // The attacker is refused from then on.
        let before = refused.load(Ordering::SeqCst);
        wait_for("the attacker to be refused", || refused.load(Ordering::SeqCst) > before);
        stop.store(true, Ordering::SeqCst);
        // On the record: audit and report carry who and why.
        let audit = f.c.audit();
        assert!(
            audit.iter().any(|a| a.action == "rotation.decision.revoke" && a.details["reason"] == why),
            "no audited decision"
        );
        let report = f.c.cli_ok(&["report", &id]);
        assert!(report.contains(why) && report.contains("forced by operator/"), "{report}");
        assert_no_value_leaked(&f, &[&report, &status, &alert.message], &old.1);
    });
}

#[test]
fn with_on_use_after_switch_revoke_the_leaked_key_goes_without_waiting_for_anyone() {
    let w = iam::world(&[aws_sdk_iam::types::StatusType::Active]);
    let old = w.keys[0].clone();
    let f = fleet(1, &["aws-app"], |_| {
        w.catalog("aws-app").replace("check_every = \"1s\"", "check_every = \"2s\"\non_use_after_switch = \"revoke\"")
    });
    let (stop, refused) = (AtomicBool::new(false), AtomicUsize::new(0));
    std::thread::scope(|s| {
        attacker(s, &w, &old, &stop, &refused);
        let id = start(&f.c, "aws-app");
        let r = wait_state(&f.c, &id, &[RotationState::Completed, RotationState::Halted]);
        stop.store(true, Ordering::SeqCst);
        assert_eq!(r.state, RotationState::Completed, "{r:#?}");
        assert_eq!(old_key_active(&w, &old.0), None, "deleted despite the use");
        assert!(
            r.evidence.iter().any(|e| e.verdict.contains("revoking anyway")),
            "the evidence says why it went ahead: {:?}",
            r.evidence
        );
        let alert = f.c.alerts().into_iter().find(|a| a.kind == v1::AlertKind::OldVersionUsed).expect("an alert");
        assert!(alert.message.contains("revoking it anyway"), "{}", alert.message);
    });
}
