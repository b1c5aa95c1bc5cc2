//! Operators' exits (revoke, finish, abandon), versions already gone at the
//! provider, the `on_use_after_switch` policy, conservative timestamps and
//! due times.

use super::tests::{all_healthy, ev, rotation, start};
use super::*;

fn used(t: i64, resolution_ms: i64) -> Event {
    Event::UsageChecked {
        usage: Some(Usage::At(t)),
        detail: UseDetail { resolution_ms, source: Some("iam in eu-west-1".into()) },
        error: None,
    }
}

fn decide(kind: DecisionKind, reason: &str) -> Event {
    Event::Decide { kind, by: "operator/oncall".into(), reason: reason.into() }
}

/// A rotation whose revocation is held: every host switched at 1000, the old
/// version was used at 1090 (an attacker or a forgotten host).
fn held() -> Rotation {
    let p = Policy {
        require_evidence: true,
        usage_granularity_ms: 0,
        check_every_ms: 40,
        grace_ms: 60_000,
        ..Policy::default()
    };
    let mut r = rotation(1, Policy { canary: 0, ..p });
    start(&mut r);
    assert_eq!(all_healthy(&mut r, &["h1".into()], 1000), vec![Action::CheckUsage]);
    let a = ev(&mut r, used(1090, 1), 1100);
    assert!(matches!(&a[..], [Action::Alert { kind: AlertKind::OldVersionUsed, .. }]), "{a:?}");
    assert_eq!(r.state, RotationState::Halted);
    r
}

#[test]
fn revoke_after_a_hold_deactivates_then_deletes_at_once_on_the_record() {
    let mut r = held();
    let reason = r.halt_reason.clone().unwrap();
    assert!(reason.contains("from iam in eu-west-1"), "the source of the use is shown: {reason}");
    assert!(reason.contains("rekey rotate revoke rot-1 --reason"), "the exact command is shown: {reason}");
    assert!(handle(&mut r, decide(DecisionKind::Revoke, "  "), 1200).is_err(), "a reason is required");
    assert_eq!(ev(&mut r, decide(DecisionKind::Revoke, "leaked key, attacker"), 1200), vec![Action::DeactivateOld]);
    assert_eq!(r.state, RotationState::Deactivating);
    assert!(r.halt_reason.is_none() && r.halted_from.is_none());
    let d = &r.decisions[0];
    assert_eq!(
        (d.kind, d.by.as_str(), d.reason.as_str(), d.from),
        (DecisionKind::Revoke, "operator/oncall", "leaked key, attacker", RotationState::Halted)
    );
    assert!(d.hosts_on_new);
    // No grace: the operator decided; deletion follows the deactivation.
    assert_eq!(ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 1300), vec![Action::DeleteOld]);
    assert_eq!(r.state, RotationState::Deleting);
    assert_eq!(ev(&mut r, Event::ProviderDone { op: ProviderOp::DeleteOld }, 1400), vec![Action::PurgeOld]);
    assert!(r.state == RotationState::Completed || r.state == RotationState::Monitoring, "{:?}", r.state);
    assert_eq!(r.old_revoked_ms, Some(1400));
    assert!(r.timeline.iter().any(|t| t.note.contains("forced by operator/oncall: leaked key, attacker")));
    assert!(handle(&mut r, decide(DecisionKind::Revoke, "again"), 1500).is_err());
}

#[test]
fn revoke_during_grace_deletes_now_and_a_later_use_no_longer_reactivates() {
    let p = Policy { canary: 0, grace_ms: 60_000, check_every_ms: 1000, ..Policy::default() };
    let mut r = rotation(1, Policy { require_evidence: false, ..p });
    start(&mut r);
    assert_eq!(all_healthy(&mut r, &["h1".into()], 10), vec![Action::DeactivateOld]);
    ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 100);
    assert_eq!(r.state, RotationState::Grace);
    assert_eq!(ev(&mut r, decide(DecisionKind::Revoke, "incident 42"), 200), vec![Action::DeleteOld]);
    assert_eq!(r.state, RotationState::Deleting);
}

#[test]
fn revoke_and_finish_are_refused_while_hosts_are_unconfirmed_naming_them() {
    let mut r = rotation(2, Policy { canary: 0, ..Policy::default() });
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 10);
    for kind in [DecisionKind::Revoke, DecisionKind::Finish] {
        let e = handle(&mut r, decide(kind, "why"), 20).unwrap_err();
        assert!(e.0.contains("h2"), "{e}");
    }
    assert_eq!(r.state, RotationState::RollingOut);
    assert!(r.decisions.is_empty());
}

#[test]
fn policy_revoke_alerts_and_revokes_despite_the_use() {
    let mut r = rotation(
        1,
        Policy { canary: 0, check_every_ms: 40, use_after_switch: UseAfterSwitch::Revoke, ..Policy::default() },
    );
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 1000);
    ev(&mut r, Event::Tick, 1000);
    let a = ev(&mut r, used(1090, 1), 1100);
    assert!(
        matches!(&a[0], Action::Alert { kind: AlertKind::OldVersionUsed, message, .. } if message.contains("revoking it anyway")),
        "{a:?}"
    );
    assert_eq!(a[1], Action::DeactivateOld);
    assert!(r.evidence.last().unwrap().verdict.contains("on_use_after_switch = revoke"));
}

#[test]
fn a_use_stamped_with_the_switch_second_counts_as_after_it() {
    let mut r = rotation(1, Policy { canary: 0, check_every_ms: 1000, ..Policy::default() });
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 5300); // switched at 5.3 s
    ev(&mut r, Event::Tick, 5300);
    // The provider says "used at 5 s" (whole seconds): that may be 5.9 s.
    let a = ev(&mut r, used(5000, 1000), 5400);
    assert!(matches!(&a[..], [Action::Alert { .. }]), "{a:?}");
    // Used at 4 s (whole seconds): before the switch, whatever the fraction.
    let mut r = rotation(1, Policy { canary: 0, check_every_ms: 1000, ..Policy::default() });
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 5300);
    ev(&mut r, Event::Tick, 5300);
    assert!(ev(&mut r, used(4000, 1000), 5400).is_empty());
    assert_eq!(r.state, RotationState::Verified);
}

#[test]
fn a_version_already_gone_at_the_provider_counts_as_revoked() {
    // Deactivating: the provider says it does not exist.
    let mut r = rotation(1, Policy { canary: 0, require_evidence: false, ..Policy::default() });
    start(&mut r);
    assert_eq!(all_healthy(&mut r, &["h1".into()], 10), vec![Action::DeactivateOld]);
    assert_eq!(ev(&mut r, Event::OldGone { op: ProviderOp::DeactivateOld }, 20), vec![Action::PurgeOld]);
    assert!(matches!(r.state, RotationState::Monitoring | RotationState::Completed));
    assert_eq!(r.old_revoked_ms, Some(20));
    assert!(r.timeline.last().unwrap().note.contains("already gone"));
    // Gathering evidence: deleted by hand meanwhile.
    let mut r = held();
    ev(&mut r, Event::Resume { by: "op".into() }, 2000);
    ev(&mut r, Event::Tick, 2000);
    let a =
        ev(&mut r, Event::UsageChecked { usage: Some(Usage::Gone), detail: UseDetail::default(), error: None }, 2010);
    assert_eq!(a, vec![Action::PurgeOld]);
    assert!(matches!(r.state, RotationState::Monitoring | RotationState::Completed));
    // A late duplicate changes nothing.
    let before = r.clone();
    ev(&mut r, Event::OldGone { op: ProviderOp::DeactivateOld }, 2020);
    assert_eq!(r.state, before.state);
}

#[test]
fn a_failed_reactivation_keeps_the_evidence_to_gather_again() {
    let p = Policy { canary: 0, grace_ms: 10_000, check_every_ms: 1000, require_evidence: false, ..Policy::default() };
    let mut r = rotation(1, p);
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 100);
    ev(&mut r, Event::Tick, 1100);
    let a = ev(&mut r, used(1050, 1), 1150);
    assert_eq!(a.last(), Some(&Action::ReactivateOld));
    ev(&mut r, Event::ProviderFailed { op: ProviderOp::ReactivateOld, error: "no reactivate request".into() }, 1200);
    assert_eq!(r.state, RotationState::Halted);
    assert_eq!(r.halted_from, Some(RotationState::Verified), "the real halted-from state is kept");
    assert!(!r.evidence_ok);
    ev(&mut r, Event::Resume { by: "op".into() }, 1300);
    assert!(
        r.timeline.iter().any(|t| t.note.contains("checking usage evidence again")),
        "resume goes through the evidence again"
    );
}

#[test]
fn finish_and_abandon_end_the_rotation_with_who_and_why() {
    let mut r = held();
    ev(&mut r, decide(DecisionKind::Finish, "key revoked by hand at the provider"), 1200);
    assert_eq!(r.state, RotationState::Completed);
    assert!(r.leaves_new_current());
    assert!(r.timeline.last().unwrap().note.contains("finished by operator/oncall: key revoked by hand"));

    // Abandon before verification: the old version stays the current one.
    let mut r = rotation(2, Policy { canary: 0, ..Policy::default() });
    start(&mut r);
    ev(&mut r, decide(DecisionKind::Abandon, "wrong secret"), 10);
    assert_eq!(r.state, RotationState::Abandoned);
    assert!(r.state.is_terminal() && !r.leaves_new_current());
    assert!(r.timeline.last().unwrap().note.contains("new version v2"));
    assert!(handle(&mut r, Event::Resume { by: "op".into() }, 11).is_err());
    // Abandon after every host switched: the new version is the current one.
    let mut r = held();
    ev(&mut r, decide(DecisionKind::Abandon, "provider outage"), 1200);
    assert!(r.leaves_new_current());
    // Abandon works where nothing else does: generating.
    let mut r = rotation(1, Policy::default());
    ev(&mut r, Event::Begin, 1);
    assert!(handle(&mut r, Event::Abort { by: "op".into() }, 2).is_err());
    ev(&mut r, decide(DecisionKind::Abandon, "provider hangs"), 2);
    assert_eq!(r.state, RotationState::Abandoned);
}

#[test]
fn every_state_lists_its_exits_with_exact_commands() {
    let verbs = |r: &Rotation| exits(r).into_iter().map(|e| e.verb).collect::<Vec<_>>();
    let r = held();
    assert_eq!(verbs(&r), ["resume", "revoke", "finish", "abandon"]);
    assert!(exits(&r).iter().any(|e| e.command == "rekey rotate revoke rot-1 --reason \"…\""));
    let mut r = rotation(2, Policy { canary: 0, ..Policy::default() });
    start(&mut r);
    assert_eq!(verbs(&r), ["pause", "exclude", "abort", "abandon"]);
    ev(&mut r, decide(DecisionKind::Abandon, "x"), 5);
    assert!(exits(&r).is_empty());
}

#[test]
fn due_times_follow_the_policy_not_a_tick() {
    let p = Policy { canary: 0, grace_ms: 4000, check_every_ms: 1000, require_evidence: false, ..Policy::default() };
    let mut r = rotation(1, p);
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 100);
    assert_eq!(next_due(&r), Some(1100), "the first check");
    assert_eq!(ev(&mut r, Event::Tick, 1100), vec![Action::CheckUsage]);
    assert_eq!(next_due(&r), None, "waiting for the answer");
    ev(&mut r, Event::UsageChecked { usage: Some(Usage::Never), detail: UseDetail::default(), error: None }, 1450);
    assert_eq!(next_due(&r), Some(2100), "checks keep their cadence, not the answer's time");
    for t in [2100, 3100] {
        ev(&mut r, Event::Tick, t);
        ev(
            &mut r,
            Event::UsageChecked { usage: Some(Usage::Never), detail: UseDetail::default(), error: None },
            t + 50,
        );
    }
    assert_eq!(next_due(&r), Some(4100), "grace ends at 100 + 4000");
    assert_eq!(ev(&mut r, Event::Tick, 4100), vec![Action::CheckUsage], "a last check at the end of grace");
    ev(&mut r, Event::UsageChecked { usage: Some(Usage::Never), detail: UseDetail::default(), error: None }, 4150);
    assert_eq!(r.state, RotationState::Deleting);
}
