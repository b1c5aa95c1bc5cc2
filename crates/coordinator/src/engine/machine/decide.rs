//! Operators' exits: `revoke` (the old version goes now, despite the usage
//! evidence), `finish` (completed where it stands) and `abandon` (rekey stops
//! acting), each with who and why; and [`exits`], the list of what an
//! operator can do in each state, shown by `rekey rotate status`.

use super::model::*;

/// Applies an operator's decision.
pub(super) fn decide(
    rot: &mut Rotation,
    kind: DecisionKind,
    by: String,
    reason: String,
    now: i64,
    actions: &mut Vec<Action>,
) -> Result<(), Refusal> {
    if reason.trim().is_empty() {
        return Err(Refusal(format!(
            "`rekey rotate {} {}` needs a reason (--reason TEXT): it goes to the audit log and the report",
            kind.as_str(),
            rot.id
        )));
    }
    if rot.state.is_terminal() {
        return Err(Refusal(format!("rotation {} is {}: nothing to change", rot.id, rot.state.as_str())));
    }
    let decision = Decision { kind, by, reason, at_ms: now, from: rot.state, hosts_on_new: rot.verified() };
    match kind {
        DecisionKind::Revoke => revoke(rot, decision, now, actions),
        DecisionKind::Finish => finish(rot, decision, now),
        DecisionKind::Abandon => {
            let note = format!(
                "abandoned by {}: {}; rekey stopped acting — the provider and the hosts stay as they are ({})",
                decision.by,
                decision.reason,
                versions_left(rot)
            );
            rot.decisions.push(decision);
            rot.goto(RotationState::Abandoned, note, now);
            Ok(())
        }
    }
}

/// The old and new versions as the rotation leaves them, in words.
fn versions_left(rot: &Rotation) -> String {
    let old = match (&rot.old_version, rot.old_revoked_ms, rot.deactivated_ms) {
        (None, _, _) => "no old version".to_string(),
        (Some(v), Some(_), _) => format!("old version {v} revoked"),
        (Some(v), None, Some(_)) => format!("old version {v} deactivated, not deleted"),
        (Some(v), None, None) => format!("old version {v} still active"),
    };
    match &rot.new_version {
        Some(v) => format!("{old}; new version {v}"),
        None => format!("{old}; no new version was created"),
    }
}

/// Hosts that have not confirmed the new version, for refusals.
fn unconfirmed(rot: &Rotation) -> String {
    let hosts = rot.blocking_hosts();
    if hosts.is_empty() {
        return "the rollout has not finished".to_string();
    }
    rekey_common::error::named(hosts.into_iter().map(|(h, s)| format!("{h} ({})", s.as_str())), ", ")
}

fn revoke(rot: &mut Rotation, d: Decision, now: i64, actions: &mut Vec<Action>) -> Result<(), Refusal> {
    let id = rot.id.clone();
    let Some(old) = rot.old_version.clone() else {
        return Err(Refusal(format!("rotation {id} has no old version to revoke (the secret's first version)")));
    };
    if rot.old_revoked_ms.is_some() {
        return Err(Refusal(format!("the old version {old} of rotation {id} is already revoked")));
    }
    if !rot.verified() {
        return Err(Refusal(format!(
            "rotation {id}: not every target host confirmed the new version ({}); revoking {old} now would cut \
             them off — exclude them first (`rekey rotate exclude {id} HOST --reason …`), or abort",
            unconfirmed(rot)
        )));
    }
    if rot.state == RotationState::Deleting {
        return Err(Refusal(format!("rotation {id} is already deleting the old version {old}")));
    }
    let note = format!("revocation of {old} forced by {}: {}", d.by, d.reason);
    rot.decisions.push(d);
    rot.paused = false;
    rot.halt_reason = None;
    rot.halted_from = None;
    rot.evidence_ok = true;
    rot.usage_check_pending = false;
    rot.reactivating = false;
    if rot.state == RotationState::Deactivating {
        // The deactivation in flight is followed by deletion at once.
        rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note });
    } else if rot.deactivated_ms.is_some() || !rot.policy.deactivate {
        rot.goto(RotationState::Deleting, format!("{note}; deleting it now"), now);
        actions.push(Action::DeleteOld);
    } else {
        rot.goto(RotationState::Deactivating, format!("{note}; deactivating it, then deleting it"), now);
        actions.push(Action::DeactivateOld);
    }
    Ok(())
}

fn finish(rot: &mut Rotation, d: Decision, now: i64) -> Result<(), Refusal> {
    if !rot.verified() {
        return Err(Refusal(format!(
            "rotation {}: not every target host confirmed the new version ({}); finishing would leave them behind \
             — abort to roll them back, or abandon to leave everything as it is",
            rot.id,
            unconfirmed(rot)
        )));
    }
    let note = format!("finished by {}: {}; {}", d.by, d.reason, versions_left(rot));
    rot.decisions.push(d);
    rot.halt_reason = None;
    rot.phase_until_ms = None;
    rot.goto(RotationState::Completed, note, now);
    Ok(())
}

/// One thing an operator can do to a rotation in its current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub verb: &'static str,
    pub command: String,
    pub what: &'static str,
}

/// What an operator can do now, for `rekey rotate status` and alerts.
pub fn exits(rot: &Rotation) -> Vec<Exit> {
    let id = &rot.id;
    let exit = |verb: &'static str, args: &str, what: &'static str| Exit {
        verb,
        command: format!("rekey rotate {verb} {id}{args}"),
        what,
    };
    let reason = " --reason \"…\"";
    let mut out = Vec::new();
    if rot.state.is_terminal() {
        return out;
    }
    let verified = rot.verified();
    match rot.state {
        RotationState::RollingOut if rot.paused => out.push(exit("resume", "", "start the next waves")),
        RotationState::RollingOut => out.push(exit("pause", "", "start no new wave")),
        RotationState::Halted if verified => {
            out.push(exit("resume", "", "check the old version's usage again, counting from now"))
        }
        RotationState::Halted => out.push(exit("resume", "", "retry the failed step or hosts")),
        _ => {}
    }
    if !verified && matches!(rot.state, RotationState::RollingOut | RotationState::Halted) {
        out.push(exit("exclude", &format!(" HOST{reason}"), "stop waiting for a host"));
    }
    if matches!(rot.state, RotationState::Planned | RotationState::RollingOut)
        || (rot.state == RotationState::Halted && !verified)
    {
        out.push(exit("abort", "", "roll every host back and delete the new version"));
    }
    if verified && rot.old_version.is_some() && rot.old_revoked_ms.is_none() && rot.state != RotationState::Deleting {
        out.push(exit("revoke", reason, "deactivate and delete the old version now, despite the evidence"));
    }
    if verified {
        out.push(exit("finish", reason, "mark it completed as it stands, the provider left as it is"));
    }
    if rot.state != RotationState::Planned {
        out.push(exit("abandon", reason, "stop acting; the provider and the hosts stay as they are"));
    }
    out
}
