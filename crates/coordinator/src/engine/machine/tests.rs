use super::*;
use crate::engine::plan::Amount;
use proptest::prelude::*;

const FP: &str = "hmac-sha256:new";

fn hosts(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("h{i}")).collect()
}

pub(super) fn rotation(n: usize, policy: Policy) -> Rotation {
    let targets: Vec<_> =
        hosts(n).into_iter().map(|name| crate::engine::plan::Target { name, labels: Default::default() }).collect();
    let waves = crate::engine::plan::plan_waves(&targets, policy.canary, &policy.selector_waves, &policy.waves).waves;
    Rotation::new(
        "rot-1".into(),
        "api-key".into(),
        "operator/admin".into(),
        policy,
        Some("v1".into()),
        waves,
        "k".into(),
        0,
    )
}

pub(super) fn ev(rot: &mut Rotation, e: Event, now: i64) -> Vec<Action> {
    handle(rot, e, now).unwrap()
}

fn report(host: &str, stage: Stage) -> Event {
    Event::Report {
        host: host.into(),
        version: "v2".into(),
        stage,
        fingerprint: if stage == Stage::Healthy { FP.into() } else { String::new() },
        error: if stage == Stage::Failed { "health check returned 503".into() } else { String::new() },
        at_ms: 0,
    }
}

pub(super) fn start(rot: &mut Rotation) -> Vec<Action> {
    assert_eq!(ev(rot, Event::Begin, 1), vec![Action::Create]);
    assert_eq!(rot.state, RotationState::Generating);
    ev(rot, Event::Generated { version: "v2".into(), fingerprint: FP.into() }, 2)
}

fn delivers(actions: &[Action]) -> Vec<String> {
    actions.iter().filter_map(|a| if let Action::Deliver { host } = a { Some(host.clone()) } else { None }).collect()
}

pub(super) fn all_healthy(rot: &mut Rotation, hs: &[String], now: i64) -> Vec<Action> {
    let mut out = Vec::new();
    for h in hs {
        for st in [Stage::Delivered, Stage::Applied, Stage::Restarted, Stage::Healthy] {
            out.extend(ev(rot, report(h, st), now));
        }
    }
    out
}

fn policy() -> Policy {
    Policy {
        canary: 1,
        waves: vec![Amount::Percent(60), Amount::Percent(100)],
        grace_ms: 1000,
        require_evidence: false,
        ..Policy::default()
    }
}

#[test]
fn happy_path_canary_waves_verify_deactivate_grace_delete_complete() {
    let mut r = rotation(5, policy());
    assert_eq!(r.waves.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 2, 2]);
    let a = start(&mut r);
    assert_eq!(delivers(&a), vec!["h1"], "only the canary first");
    assert_eq!(r.state, RotationState::RollingOut);
    let a = all_healthy(&mut r, &["h1".into()], 3);
    assert_eq!(delivers(&a), vec!["h2", "h3"]);
    assert_eq!(r.current_wave, 1);
    let a = all_healthy(&mut r, &["h2".into(), "h3".into()], 4);
    assert_eq!(delivers(&a), vec!["h4", "h5"]);
    let a = all_healthy(&mut r, &["h4".into()], 5);
    assert!(a.is_empty());
    let a = all_healthy(&mut r, &["h5".into()], 6);
    assert_eq!(a, vec![Action::DeactivateOld]);
    assert_eq!(r.state, RotationState::Deactivating);
    assert!(r.timeline.iter().any(|t| t.state == RotationState::Verified));
    assert!(ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 10).is_empty());
    assert_eq!((r.state, r.phase_until_ms), (RotationState::Grace, Some(1010)));
    assert!(ev(&mut r, Event::Tick, 1009).is_empty());
    assert_eq!(ev(&mut r, Event::Tick, 1010), vec![Action::DeleteOld]);
    assert_eq!(r.state, RotationState::Deleting);
    assert_eq!(ev(&mut r, Event::ProviderDone { op: ProviderOp::DeleteOld }, 1011), vec![Action::PurgeOld]);
    assert_eq!(r.state, RotationState::Completed);
}

#[test]
fn a_failed_canary_halts_with_the_old_version_untouched_and_resume_retries_it() {
    let mut r = rotation(3, policy());
    start(&mut r);
    let a = ev(&mut r, report("h1", Stage::Failed), 3);
    assert!(a.is_empty());
    ev(&mut r, report("h1", Stage::RolledBack), 4);
    assert_eq!(r.state, RotationState::Halted);
    assert!(r.halt_reason.as_deref().unwrap().contains("canary failed"), "{:?}", r.halt_reason);
    assert!(r.halt_reason.as_deref().unwrap().contains("503"));
    assert_eq!(r.hosts["h2"].state, HostState::Pending, "no further wave after a failed canary");
    let a = ev(&mut r, Event::Resume { by: "op".into() }, 5);
    assert_eq!(delivers(&a), vec!["h1"]);
    assert_eq!(r.state, RotationState::RollingOut);
}

#[test]
fn failures_within_budget_continue_but_block_verification() {
    let mut r = rotation(5, Policy { failure_budget: Amount::Count(1), ..policy() });
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    ev(&mut r, report("h2", Stage::Failed), 4);
    let a = all_healthy(&mut r, &["h3".into()], 5);
    assert_eq!(delivers(&a), vec!["h4", "h5"], "one failure is within budget");
    let a = all_healthy(&mut r, &["h4".into(), "h5".into()], 6);
    assert!(!a.contains(&Action::DeactivateOld), "a failed host keeps the gate closed");
    assert_eq!(r.state, RotationState::Halted);
    assert!(r.halt_reason.as_deref().unwrap().contains("h2"));
    // Excluding it (with who and why) opens the gate.
    let a = ev(
        &mut r,
        Event::Exclude { host: "h2".into(), by: "operator/admin".into(), reason: "decommissioned".into() },
        7,
    );
    assert!(a.is_empty(), "exclusion alone does not resume a halted rotation");
    let a = ev(&mut r, Event::Resume { by: "op".into() }, 8);
    assert_eq!(a, vec![Action::DeactivateOld]);
    let ex = r.hosts["h2"].exclusion.as_ref().unwrap();
    assert_eq!((ex.by.as_str(), ex.reason.as_str()), ("operator/admin", "decommissioned"));
}

#[test]
fn a_second_failure_over_budget_halts() {
    let mut r = rotation(5, Policy { failure_budget: Amount::Count(1), ..policy() });
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    ev(&mut r, report("h2", Stage::Failed), 4);
    ev(&mut r, report("h3", Stage::Refused), 5);
    assert_eq!(r.state, RotationState::Halted);
    assert!(r.halt_reason.as_deref().unwrap().contains("over the failure budget of 1"));
    assert!(r.hosts["h3"].error.as_deref().unwrap().starts_with("agent refused the delivery"));
}

#[test]
fn an_unreachable_host_blocks_revocation_until_it_returns_or_is_excluded() {
    let mut r = rotation(3, Policy { canary: 0, waves: vec![], ..policy() });
    let a = start(&mut r);
    assert_eq!(delivers(&a).len(), 3);
    ev(&mut r, Event::SendFailed { host: "h3".into(), error: "agent h3 is not connected".into() }, 3);
    assert_eq!(r.hosts["h3"].state, HostState::Unreachable);
    let a = all_healthy(&mut r, &["h1".into(), "h2".into()], 4);
    assert!(a.is_empty());
    assert_eq!(r.state, RotationState::RollingOut, "waiting, not halted");
    assert_eq!(r.blocking_hosts(), vec![("h3".to_string(), HostState::Unreachable)]);
    // It comes back: after a moment for its own reports, it gets the delivery.
    let a = ev(&mut r, Event::Connected { host: "h3".into(), applied: Some(("v1".into(), "old".into())) }, 5);
    assert!(delivers(&a).is_empty());
    let a = ev(&mut r, Event::Tick, 5 + REDELIVER_AFTER_MS);
    assert_eq!(delivers(&a), vec!["h3"]);
    let a = all_healthy(&mut r, &["h3".into()], 6 + REDELIVER_AFTER_MS);
    assert_eq!(a, vec![Action::DeactivateOld]);
}

#[test]
fn silence_past_the_host_deadline_marks_a_host_unreachable() {
    let mut r = rotation(2, Policy { canary: 0, waves: vec![], host_deadline_ms: 100, ..policy() });
    start(&mut r);
    ev(&mut r, report("h1", Stage::Applied), 3);
    all_healthy(&mut r, &["h2".into()], 3);
    ev(&mut r, Event::Tick, 50);
    assert_eq!(r.hosts["h1"].state, HostState::Applied);
    ev(&mut r, Event::Tick, 103);
    assert_eq!(r.hosts["h1"].state, HostState::Unreachable);
    assert!(r.hosts["h1"].error.as_deref().unwrap().contains("last stage: applied"));
    // A reconnect reporting the new version loaded counts as confirmation.
    let a = ev(&mut r, Event::Connected { host: "h1".into(), applied: Some(("v2".into(), FP.into())) }, 110);
    assert_eq!(a, vec![Action::DeactivateOld]);
}

fn stamped(host: &str, stage: Stage, at_ms: i64) -> Event {
    let Event::Report { host, version, stage, fingerprint, error, .. } = report(host, stage) else { unreachable!() };
    Event::Report { host, version, stage, fingerprint, error, at_ms }
}

#[test]
fn stage_times_are_the_hosts_own_within_delivery_and_receipt() {
    let mut r = rotation(1, policy());
    start(&mut r); // delivered to h1 at 2
    let h = |r: &Rotation| r.hosts["h1"].clone();
    // Queued reports: the host applied at 5 and restarted at 6, rekeyd heard at 40.
    ev(&mut r, stamped("h1", Stage::Applied, 5), 40);
    ev(&mut r, stamped("h1", Stage::Restarted, 6), 41);
    assert_eq!(h(&r).history[2..], [(HostState::Applied, 5), (HostState::Restarted, 6)]);
    assert_eq!(h(&r).last_report, Some(ReportTimes { host_ms: 6, received_ms: 41 }));
    assert_eq!(h(&r).updated_ms, 41, "rekeyd's own clock still says when it learnt it");
    // A clock ahead: clamped to the receipt. Stamped 0 (an old agent): the receipt.
    ev(&mut r, stamped("h1", Stage::Healthy, 10_000), 50);
    assert_eq!(h(&r).history.last(), Some(&(HostState::Healthy, 50)));
    assert_eq!(h(&r).last_report, Some(ReportTimes { host_ms: 10_000, received_ms: 50 }));
    let mut r = rotation(1, policy());
    start(&mut r);
    // A clock behind: never before the delivery (rekeyd sent it at 2).
    ev(&mut r, stamped("h1", Stage::Applied, 1), 30);
    assert_eq!(h(&r).history.last(), Some(&(HostState::Applied, 2)));
    ev(&mut r, stamped("h1", Stage::Restarted, 0), 31);
    assert_eq!(h(&r).history.last(), Some(&(HostState::Restarted, 31)));
}

#[test]
fn a_wrong_fingerprint_is_a_failure_not_a_confirmation() {
    let mut r = rotation(1, policy());
    start(&mut r);
    let bad = Event::Report {
        host: "h1".into(),
        version: "v2".into(),
        stage: Stage::Healthy,
        fingerprint: "hmac-sha256:other".into(),
        error: String::new(),
        at_ms: 0,
    };
    let a = ev(&mut r, bad, 3);
    assert!(!a.contains(&Action::DeactivateOld));
    assert_eq!(r.hosts["h1"].state, HostState::Failed);
    assert_eq!(r.state, RotationState::Halted);
}

#[test]
fn a_host_that_reconnects_mid_apply_reports_before_it_is_sent_the_version_again() {
    let mut r = rotation(1, Policy { canary: 0, waves: vec![], ..policy() });
    start(&mut r);
    ev(&mut r, report("h1", Stage::Applied), 3);
    // The agent was killed mid-apply and restarted: hello says old version,
    // then its recovery reports arrive before any re-delivery.
    let a = ev(&mut r, Event::Connected { host: "h1".into(), applied: Some(("v1".into(), "old".into())) }, 4);
    assert!(a.is_empty());
    ev(&mut r, report("h1", Stage::Failed), 5);
    ev(&mut r, report("h1", Stage::RolledBack), 6);
    let a = ev(&mut r, Event::Tick, 10_000);
    assert!(delivers(&a).is_empty(), "the truth was told: no blind re-delivery");
    assert_eq!(r.state, RotationState::Halted);
    assert_eq!(r.hosts["h1"].state, HostState::RolledBack);
}

#[test]
fn stale_duplicate_and_reordered_reports_change_nothing() {
    let mut r = rotation(2, Policy { canary: 0, waves: vec![], ..policy() });
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    let before = r.hosts["h1"].clone();
    ev(&mut r, report("h1", Stage::Applied), 4); // reordered
    ev(&mut r, report("h1", Stage::Healthy), 4); // duplicate
    let mut stale = report("h1", Stage::Failed);
    if let Event::Report { version, .. } = &mut stale {
        *version = "v0".into();
    }
    ev(&mut r, stale, 5);
    ev(&mut r, report("nobody", Stage::Failed), 5);
    assert_eq!(r.hosts["h1"].state, before.state);
    assert_eq!(r.hosts["h1"].fingerprint, before.fingerprint);
    assert!(!r.hosts.contains_key("nobody"));
}

#[test]
fn abort_rolls_back_everyone_before_deleting_the_new_version() {
    let mut r = rotation(3, policy());
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    ev(&mut r, report("h2", Stage::Applied), 4);
    let a = ev(&mut r, Event::Abort { by: "op".into() }, 5);
    assert_eq!(r.state, RotationState::Aborting);
    let rb: Vec<_> = a.iter().filter(|x| matches!(x, Action::Rollback { .. })).collect();
    assert_eq!(rb.len(), 2, "h1 (healthy), h2 (applying), not h3 (never delivered): {a:?}");
    let a = ev(&mut r, report("h1", Stage::RolledBack), 6);
    assert!(a.is_empty());
    // h2 finishes its apply after the abort: it is told again.
    let a = ev(&mut r, report("h2", Stage::Healthy), 7);
    assert_eq!(a, vec![Action::Rollback { host: "h2".into() }]);
    let a = ev(&mut r, report("h2", Stage::RolledBack), 8);
    assert_eq!(a, vec![Action::DeleteNew]);
    assert_eq!(ev(&mut r, Event::ProviderDone { op: ProviderOp::DeleteNew }, 10), vec![]);
    assert_eq!(r.state, RotationState::Aborted);
}

#[test]
fn abort_waits_for_an_unreachable_host_or_its_exclusion() {
    let mut r = rotation(2, Policy { canary: 0, waves: vec![], ..policy() });
    start(&mut r);
    ev(&mut r, Event::SendFailed { host: "h2".into(), error: "gone".into() }, 3);
    ev(&mut r, Event::Abort { by: "op".into() }, 4);
    ev(&mut r, report("h1", Stage::RolledBack), 5);
    assert_eq!(r.state, RotationState::Aborting, "h2 may hold the new version");
    let a = ev(&mut r, Event::Connected { host: "h2".into(), applied: None }, 6);
    assert_eq!(a, vec![Action::Rollback { host: "h2".into() }]);
    let a = ev(&mut r, Event::Exclude { host: "h2".into(), by: "op".into(), reason: "host destroyed".into() }, 7);
    assert_eq!(a, vec![Action::DeleteNew]);
}

#[test]
fn operator_commands_are_refused_where_they_make_no_sense() {
    let mut r = rotation(1, policy());
    assert!(handle(&mut r, Event::Resume { by: "op".into() }, 0).is_err());
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    assert_eq!(r.state, RotationState::Deactivating);
    let e = handle(&mut r, Event::Abort { by: "op".into() }, 4).unwrap_err();
    assert!(e.0.contains("nothing to roll back"), "{e}");
    assert!(handle(&mut r, Event::Pause { by: "op".into() }, 4).is_err());
    assert!(handle(&mut r, Event::Exclude { host: "h1".into(), by: "op".into(), reason: "x".into() }, 4).is_err());
    let mut r = rotation(1, policy());
    let e = handle(&mut r, Event::Exclude { host: "zz".into(), by: "op".into(), reason: "x".into() }, 0).unwrap_err();
    assert!(e.0.contains("not a target"));
}

#[test]
fn a_pause_after_wave_holds_the_next_wave_until_resume() {
    let mut r = rotation(5, policy());
    r.pause_after = vec![1];
    start(&mut r);
    let a = all_healthy(&mut r, &["h1".into()], 3);
    assert_eq!(delivers(&a), vec!["h2", "h3"], "no pause after the canary");
    let a = all_healthy(&mut r, &["h2".into(), "h3".into()], 4);
    assert!(delivers(&a).is_empty(), "wave 1 confirmed: paused before wave 2");
    assert!(r.paused && r.current_wave == 2, "{r:?}");
    assert!(r.timeline.last().unwrap().note.contains("pause_after"));
    assert!(ev(&mut r, Event::Tick, 60_000).is_empty(), "a paused rollout stays paused");
    let a = ev(&mut r, Event::Resume { by: "op".into() }, 5);
    assert_eq!(delivers(&a), vec!["h4", "h5"]);
    all_healthy(&mut r, &["h4".into(), "h5".into()], 6);
    assert!(r.verified(), "{:?}", r.state);
}

#[test]
fn pause_stops_new_waves_and_resume_continues() {
    let mut r = rotation(3, policy());
    start(&mut r);
    ev(&mut r, Event::Pause { by: "op".into() }, 3);
    let a = all_healthy(&mut r, &["h1".into()], 4);
    assert!(delivers(&a).is_empty(), "paused: no new wave");
    let a = ev(&mut r, Event::Resume { by: "op".into() }, 5);
    assert_eq!(delivers(&a), vec!["h2"]);
}

#[test]
fn provider_failures_halt_and_resume_redoes_the_step() {
    let mut r = rotation(1, policy());
    ev(&mut r, Event::Begin, 1);
    ev(&mut r, Event::ProviderFailed { op: ProviderOp::Create, error: "HTTP 503".into() }, 2);
    assert_eq!(r.state, RotationState::Halted);
    assert!(r.halt_reason.as_deref().unwrap().contains("HTTP 503"));
    assert_eq!(ev(&mut r, Event::Resume { by: "op".into() }, 3), vec![Action::Create]);
    ev(&mut r, Event::Generated { version: "v2".into(), fingerprint: FP.into() }, 4);
    all_healthy(&mut r, &["h1".into()], 5);
    ev(&mut r, Event::ProviderFailed { op: ProviderOp::DeactivateOld, error: "throttled".into() }, 6);
    assert_eq!(r.state, RotationState::Halted);
    assert!(handle(&mut r, Event::Abort { by: "op".into() }, 7).is_err(), "past verification: no abort");
    assert_eq!(ev(&mut r, Event::Resume { by: "op".into() }, 8), vec![Action::DeactivateOld]);
}

#[test]
fn a_first_version_has_nothing_to_revoke() {
    let waves = vec![hosts(1)];
    let mut r = Rotation::new("rot-2".into(), "s".into(), "op".into(), policy(), None, waves, "k".into(), 0);
    start(&mut r);
    let a = all_healthy(&mut r, &["h1".into()], 3);
    assert!(a.is_empty());
    assert_eq!(r.state, RotationState::Completed);
}

#[test]
fn restart_redoes_the_pending_provider_call_of_each_state() {
    let mut r = rotation(1, policy());
    ev(&mut r, Event::Begin, 1);
    assert_eq!(on_restart(&mut r.clone(), 2), vec![Action::Create]);
    // (evidence off in `policy()`; see the evidence tests for CheckUsage replays)
    ev(&mut r, Event::Generated { version: "v2".into(), fingerprint: FP.into() }, 2);
    assert!(on_restart(&mut r.clone(), 3).is_empty(), "deliveries are redone on reconnect");
    all_healthy(&mut r, &["h1".into()], 3);
    assert_eq!(on_restart(&mut r.clone(), 4), vec![Action::DeactivateOld]);
    ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 4);
    assert!(on_restart(&mut r.clone(), 5).is_empty());
    assert_eq!(on_restart(&mut r.clone(), 5000), vec![Action::DeleteOld], "grace over while down");
}

#[test]
fn revocation_waits_for_usage_evidence_and_holds_on_use_after_the_switch() {
    let p = Policy { require_evidence: true, usage_granularity_ms: 60, check_every_ms: 40, ..policy() };
    let mut r = rotation(1, p.clone());
    start(&mut r);
    let a = all_healthy(&mut r, &["h1".into()], 1000);
    assert!(a.is_empty(), "no check before the provider's granularity has passed: {a:?}");
    assert_eq!(r.state, RotationState::Verified);
    assert_eq!(ev(&mut r, Event::Tick, 1060), vec![Action::CheckUsage]);
    assert!(ev(&mut r, Event::Tick, 1065).is_empty(), "one check at a time");
    // Used before the switch (+ granularity): fine so far; observe one interval more.
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(1050)), detail: UseDetail::default(), error: None },
        1070,
    );
    assert!(a.is_empty(), "{a:?}");
    assert!(r.evidence[0].verdict.contains("observing until"), "{:?}", r.evidence);
    assert!(ev(&mut r, Event::Tick, 1090).is_empty());
    assert_eq!(ev(&mut r, Event::Tick, 1100), vec![Action::CheckUsage]);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(1050)), detail: UseDetail::default(), error: None },
        1110,
    );
    assert_eq!(a, vec![Action::DeactivateOld]);
    assert!(r.evidence[1].verdict.contains("no use since: ok"), "{:?}", r.evidence);

    // Used after every host switched (+ granularity): an unknown consumer. Hold, alert, halt.
    let mut r = rotation(1, p.clone());
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 1000);
    ev(&mut r, Event::Tick, 1060);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(1055)), detail: UseDetail::default(), error: None },
        1061,
    );
    assert!(a.is_empty(), "use within the granularity after the switch is not held against it: {a:?}");
    ev(&mut r, Event::Tick, 1100);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(1090)), detail: UseDetail::default(), error: None },
        1101,
    );
    assert!(matches!(&a[..], [Action::Alert { kind, .. }] if *kind == AlertKind::OldVersionUsed), "{a:?}");
    assert_eq!(r.state, RotationState::Halted);
    assert!(r.halt_reason.as_deref().unwrap().contains("rekey scope"));
    assert!(r.halt_reason.as_deref().unwrap().contains(&format!("rekey rotate revoke {} --reason", r.id)));
    // Resume checks again (it does not skip the evidence), counting from the
    // operator's decision: the use that held it no longer does…
    let a = ev(&mut r, Event::Resume { by: "op".into() }, 7000);
    assert!(a.is_empty(), "the provider's granularity after the resume first: {a:?}");
    assert_eq!(ev(&mut r, Event::Tick, 7060), vec![Action::CheckUsage]);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(1090)), detail: UseDetail::default(), error: None },
        7070,
    );
    assert!(a.is_empty(), "{a:?}");
    assert!(r.evidence.last().unwrap().verdict.contains("before an operator resumed"), "{:?}", r.evidence);
    // …but a new use after it holds revocation again.
    assert_eq!(ev(&mut r, Event::Tick, 7100), vec![Action::CheckUsage]);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(7090)), detail: UseDetail::default(), error: None },
        7101,
    );
    assert!(matches!(&a[..], [Action::Alert { .. }]), "{a:?}");
    assert_eq!(r.state, RotationState::Halted);
    assert!(r.halt_reason.as_deref().unwrap().contains("after an operator resumed"), "{:?}", r.halt_reason);
    // A provider without usage data does not block (or delay) revocation.
    let mut r = rotation(1, p);
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 1000);
    ev(&mut r, Event::Tick, 1060);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::Unknown), detail: UseDetail::default(), error: None },
        1061,
    );
    assert_eq!(a, vec![Action::DeactivateOld]);
}

#[test]
fn use_during_grace_alerts_and_by_policy_reactivates_and_halts() {
    let p = Policy { grace_ms: 10_000, check_every_ms: 1000, ..policy() };
    let mut r = rotation(1, p.clone());
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 100);
    assert_eq!(r.state, RotationState::Grace);
    assert_eq!(ev(&mut r, Event::Tick, 1100), vec![Action::CheckUsage]);
    let a =
        ev(&mut r, Event::UsageChecked { usage: Some(Usage::At(50)), detail: UseDetail::default(), error: None }, 1150);
    assert!(a.is_empty(), "use before the deactivation is not an alert: {a:?}");
    assert_eq!(ev(&mut r, Event::Tick, 2200), vec![Action::CheckUsage]);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(2000)), detail: UseDetail::default(), error: None },
        2300,
    );
    assert!(
        matches!(&a[0], Action::Alert { kind, severity, .. } if *kind == AlertKind::OldVersionUsedDuringGrace && *severity == Severity::Critical)
    );
    assert_eq!(a[1], Action::ReactivateOld);
    // The grace timer must not delete a key that is being reactivated.
    assert!(ev(&mut r, Event::Tick, 50_000).is_empty());
    ev(&mut r, Event::ProviderDone { op: ProviderOp::ReactivateOld }, 50_001);
    assert_eq!(r.state, RotationState::Halted);
    assert!(r.halt_reason.as_deref().unwrap().contains("reactivated"));
    assert!(handle(&mut r, Event::Abort { by: "op".into() }, 50_002).is_err(), "every host is on the new version");

    // Policy "proceed": alert only, deletion follows the grace period.
    let mut r = rotation(1, Policy { grace_use: GraceUse::Proceed, ..p });
    start(&mut r);
    all_healthy(&mut r, &["h1".into()], 3);
    ev(&mut r, Event::ProviderDone { op: ProviderOp::DeactivateOld }, 100);
    ev(&mut r, Event::Tick, 1100);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(1000)), detail: UseDetail::default(), error: None },
        1150,
    );
    assert_eq!(a.len(), 1, "{a:?}");
    // A last check before deletion, then the old version goes.
    assert_eq!(ev(&mut r, Event::Tick, 10_100), vec![Action::CheckUsage]);
    let a = ev(
        &mut r,
        Event::UsageChecked { usage: Some(Usage::At(1000)), detail: UseDetail::default(), error: None },
        10_150,
    );
    assert_eq!(a, vec![Action::DeleteOld]);
}

// ---- properties ----------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Ev(Event),
    Crash,
}

fn arb_step(n: usize) -> impl Strategy<Value = Step> {
    let host = (1..=n + 1).prop_map(|i| format!("h{i}")); // h{n+1} is not a target
    let stage = prop_oneof![
        Just(Stage::Delivered),
        Just(Stage::Applied),
        Just(Stage::Restarted),
        Just(Stage::Healthy),
        Just(Stage::Healthy),
        Just(Stage::Failed),
        Just(Stage::RolledBack),
        Just(Stage::Refused)
    ];
    let version = prop_oneof![4 => Just("v2".to_string()), 1 => Just("v1".to_string()), 1 => Just("v3".to_string())];
    let fp = prop_oneof![5 => Just(FP.to_string()), 1 => Just("hmac-sha256:bad".to_string())];
    let op = prop_oneof![
        Just(ProviderOp::Create),
        Just(ProviderOp::DeactivateOld),
        Just(ProviderOp::DeleteOld),
        Just(ProviderOp::DeleteNew)
    ];
    let applied = proptest::option::of((version.clone(), fp.clone()));
    prop_oneof![
        2 => Just(Step::Ev(Event::Begin)),
        2 => (version.clone(), fp.clone()).prop_map(|(v, f)| Step::Ev(Event::Generated { version: v, fingerprint: f })),
        20 => (host.clone(), version, stage, fp, -5i64..900).prop_map(|(h, v, s, f, at)| Step::Ev(Event::Report {
            host: h, version: v, stage: s, fingerprint: f, error: "boom".into(), at_ms: at })),
        4 => (host.clone(), applied).prop_map(|(h, a)| Step::Ev(Event::Connected { host: h, applied: a })),
        3 => host.clone().prop_map(|h| Step::Ev(Event::SendFailed { host: h, error: "down".into() })),
        4 => Just(Step::Ev(Event::Tick)),
        3 => op.clone().prop_map(|op| Step::Ev(Event::ProviderDone { op })),
        1 => op.prop_map(|op| Step::Ev(Event::ProviderFailed { op, error: "err".into() })),
        1 => Just(Step::Ev(Event::Pause { by: "op".into() })),
        2 => Just(Step::Ev(Event::Resume { by: "op".into() })),
        1 => Just(Step::Ev(Event::Abort { by: "op".into() })),
        1 => host.prop_map(|h| Step::Ev(Event::Exclude { host: h, by: "op".into(), reason: "r".into() })),
        2 => Just(Step::Crash),
        1 => prop_oneof![Just(DecisionKind::Revoke), Just(DecisionKind::Finish), Just(DecisionKind::Abandon)]
            .prop_map(|kind| Step::Ev(Event::Decide { kind, by: "op".into(), reason: "r".into() })),
        1 => prop_oneof![Just(ProviderOp::DeactivateOld), Just(ProviderOp::DeleteOld), Just(ProviderOp::ReactivateOld)]
            .prop_map(|op| Step::Ev(Event::OldGone { op })),
        2 => prop_oneof![
            Just(Some(Usage::Unknown)), Just(Some(Usage::Never)), (0i64..2000).prop_map(|t| Some(Usage::At(t))), Just(None),
            Just(Some(Usage::Gone))
        ].prop_map(|usage| Step::Ev(Event::UsageChecked { usage, detail: UseDetail::default(), error: if usage.is_none() { Some("throttled".into()) } else { None } })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The invariants of DESIGN.md over random sequences of host reports,
    /// timeouts, crashes, duplicate and reordered messages, operator commands.
    #[test]
    fn invariants_hold_under_any_event_sequence(
        n in 1usize..6,
        canary in 0usize..3,
        budget in 0usize..3,
        steps in proptest::collection::vec(arb_step(5), 1..120),
    ) {
        let policy = Policy { canary, waves: vec![Amount::Percent(50), Amount::Percent(100)],
            failure_budget: Amount::Count(budget), host_deadline_ms: 50, grace_ms: 30, ..Policy::default() };
        let mut r = rotation(n, policy);
        let mut now = 0i64;
        let mut first_version: Option<String> = None;
        let mut deactivated = false;
        let mut deleted_new = false;
        let mut delivered_since_delete_new = false;
        for step in steps {
            now += 7;
            let before = r.clone();
            let actions = match step {
                Step::Ev(e) => match handle(&mut r, e, now) {
                    Ok(a) => {
                        // Every changed host is in `touched` (what the store
                        // rewrites), with the state it had before.
                        for (name, h) in &r.hosts {
                            if before.hosts[name] != *h {
                                prop_assert_eq!(r.touched.0.get(name), Some(&before.hosts[name].state), "{} changed untouched", name);
                            }
                        }
                        a
                    }
                    Err(_) => continue,
                },
                Step::Crash => {
                    // Only what was persisted survives: a serde round trip.
                    let json = serde_json::to_string(&r).unwrap();
                    r = serde_json::from_str(&json).unwrap();
                    on_restart(&mut r, now)
                }
            };
            // A second new version is never created.
            if let Some(v) = &r.new_version {
                match &first_version {
                    None => first_version = Some(v.clone()),
                    Some(f) => prop_assert_eq!(f, v),
                }
                prop_assert!(!actions.contains(&Action::Create), "create after the version exists");
            }
            for a in &actions {
                match a {
                    // 1. Never revoke the old version before every target confirmed (or was excluded).
                    Action::DeactivateOld | Action::DeleteOld => {
                        prop_assert!(r.gate_open(), "revoking with hosts unconfirmed: {:?}", r.blocking_hosts());
                        prop_assert!(!deleted_new, "old revoked after new deleted");
                        deactivated = true;
                    }
                    // 2. Never delete the new version while a host may still run on it.
                    Action::DeleteNew => {
                        prop_assert!(r.hosts.values().all(|h| !h.rollback_pending), "deleting new with rollbacks pending");
                        prop_assert!(!deactivated, "new deleted after old revoked: no working secret left");
                        deleted_new = true;
                    }
                    Action::Deliver { host } => {
                        prop_assert!(r.hosts.contains_key(host));
                        prop_assert!(r.hosts[host].state != HostState::Excluded);
                        if deleted_new { delivered_since_delete_new = true; }
                    }
                    _ => {}
                }
            }
            prop_assert!(!delivered_since_delete_new, "delivered a version that is being deleted");
            // No dead ends: every state that is not final offers an operator an exit.
            prop_assert!(r.state.is_terminal() || !exits(&r).is_empty(), "no exit from {:?}", r.state);
            if r.state.is_terminal() {
                prop_assert!(!actions.iter().any(|a| matches!(a, Action::Create | Action::Deliver { .. })), "acting after the end");
            }
            // Host times (the agents' own clocks, skewed at random here) keep
            // every history in order and never in the future.
            for h in r.hosts.values() {
                prop_assert!(h.history.windows(2).all(|w| w[0].1 <= w[1].1), "history out of order: {:?}", h.history);
                prop_assert!(h.history.iter().all(|(_, t)| *t <= now), "a step after its receipt: {:?}", h.history);
            }
            // Confirmations are never lost: a healthy host past verification stays confirmed.
            if r.state.is_past_verification() {
                prop_assert!(r.gate_open() || r.state == RotationState::Halted);
            }
        }
    }
}
