//! Revocation evidence: what the provider's usage data says about the old
//! version before deactivation, during grace and while monitoring.

use super::fmt_ms;
use super::model::*;

/// When the last target host confirmed the new version.
pub(super) fn last_switch_ms(rot: &Rotation) -> i64 {
    rot.hosts
        .values()
        .filter(|h| h.state == HostState::Healthy)
        .filter_map(|h| h.history.iter().rev().find(|(s, _)| *s == HostState::Healthy).map(|(_, t)| *t))
        .max()
        .unwrap_or(rot.created_ms)
}

/// Uses of the old version from this time on hold revocation: the last
/// switch, or an operator's resume after dealing with a consumer.
pub(super) fn evidence_from_ms(rot: &Rotation) -> i64 {
    last_switch_ms(rot).max(rot.evidence_since_ms.unwrap_or(i64::MIN))
}

/// Whether a use reported at `t` may have happened at or after `limit`: the
/// provider's clock is coarse (a use stamped with the switch's second may
/// have come after the switch), so the whole reported interval counts.
fn may_be_at_or_after(t: i64, detail: &UseDetail, limit: i64) -> bool {
    t + detail.resolution_ms.max(1) > limit
}

/// Whole seconds as the provider gave them, milliseconds where there are some.
fn fmt_at(ms: i64) -> String {
    if ms.rem_euclid(1000) == 0 {
        rekey_common::time::format_unix(ms.div_euclid(1000))
    } else {
        rekey_common::time::format_unix_ms(ms)
    }
}

fn from_source(detail: &UseDetail) -> String {
    detail.source.as_deref().map(|s| format!(" from {s}")).unwrap_or_default()
}

/// The provider's answer to a usage check of the old version.
pub(super) fn usage_checked(
    rot: &mut Rotation,
    usage: Option<Usage>,
    detail: UseDetail,
    error: Option<String>,
    now: i64,
    actions: &mut Vec<Action>,
) {
    if !rot.usage_check_pending {
        return; // late answer
    }
    rot.usage_check_pending = false;
    let phase = rot.state;
    let source = detail.source.clone();
    let mut entry = EvidenceEntry { at_ms: now, phase, usage, error: error.clone(), source, verdict: String::new() };
    if usage == Some(Usage::Gone) && error.is_none() {
        let old = rot.old_version.clone().unwrap_or_default();
        entry.verdict = format!("{old} no longer exists at the provider (removed outside rekey): counted as revoked");
        if rot.old_revoked_ms.is_none() && matches!(phase, RotationState::Verified | RotationState::Grace) {
            old_gone(rot, "checking its usage", now, actions);
        }
        rot.evidence.push(entry);
        return;
    }
    match phase {
        RotationState::Verified => before_revocation(rot, &mut entry, usage, &detail, error, now, actions),
        RotationState::Grace | RotationState::Monitoring => {
            while_watching(rot, &mut entry, usage, &detail, error, actions)
        }
        _ => return,
    }
    rot.evidence.push(entry);
    if rot.evidence.len() > 200 {
        rot.evidence.remove(0);
    }
}

/// Verified, before deactivation: no use of the old version after every host
/// switched (plus the provider's granularity and one observation interval),
/// or the rotation halts with an alert.
fn before_revocation(
    rot: &mut Rotation,
    entry: &mut EvidenceEntry,
    usage: Option<Usage>,
    detail: &UseDetail,
    error: Option<String>,
    now: i64,
    actions: &mut Vec<Action>,
) {
    let old = rot.old_version.clone().unwrap_or_default();
    let switch = evidence_from_ms(rot);
    let since = if rot.evidence_since_ms.is_some_and(|t| t >= last_switch_ms(rot)) {
        "an operator resumed"
    } else {
        "every target host had switched to the new version"
    };
    let limit = switch + rot.policy.usage_granularity_ms;
    match (usage, &error) {
        (_, Some(e)) => {
            entry.verdict = format!("usage of {old} unknown ({e}); revocation held, checking again");
            rot.next_check_ms = Some(now + rot.policy.check_every_ms);
        }
        (Some(Usage::At(t)), None) if may_be_at_or_after(t, detail, limit) => {
            let used = format!("{old} of {} was used at {}{}", rot.secret, fmt_at(t), from_source(detail));
            if rot.policy.use_after_switch == UseAfterSwitch::Revoke {
                entry.verdict = format!(
                    "{used}, after {since} ({}): revoking anyway (on_use_after_switch = revoke)",
                    fmt_at(switch)
                );
                rot.evidence_ok = true;
                let message = format!(
                    "{used}, after {since} at {}: revoking it anyway, as the policy says \
                     (on_use_after_switch = \"revoke\"); whoever still uses it is cut off — find them with `rekey scope {}`",
                    fmt_at(switch),
                    rot.secret
                );
                actions.push(Action::Alert { kind: AlertKind::OldVersionUsed, severity: Severity::Critical, message });
                return;
            }
            entry.verdict = format!("{used}, after {since} ({}): revocation held", fmt_at(switch));
            let message = format!(
                "{used}, after {since} at {}: revocation held. An undeclared consumer or an attacker? \
                 Find it with `rekey scope {}`, then `rekey rotate resume {id}` to check again from then; \
                 or revoke it now: `rekey rotate revoke {id} --reason \"…\"`",
                fmt_at(switch),
                rot.secret,
                id = rot.id
            );
            actions.push(Action::Alert {
                kind: AlertKind::OldVersionUsed,
                severity: Severity::Critical,
                message: message.clone(),
            });
            rot.halt(message, now);
        }
        (Some(Usage::Unknown) | None, None) => {
            entry.verdict = "the provider reports no usage data for this kind of secret".to_string();
            rot.evidence_ok = true;
        }
        (Some(u), None) => {
            // The provider has usage data: observe it for one check interval
            // after the switch, so a forgotten consumer shows up.
            let observed_until = limit + rot.policy.check_every_ms;
            let last = match u {
                Usage::At(t) => format!("last used at {}{}, before {since}", fmt_at(t), from_source(detail)),
                _ => "never used".to_string(),
            };
            if now >= observed_until {
                entry.verdict = format!("{old} {last}; no use since: ok");
                rot.evidence_ok = true;
            } else {
                entry.verdict = format!("{old} {last}; observing until {}", fmt_at(observed_until));
                rot.next_check_ms = Some(observed_until);
            }
        }
    }
}

/// Grace and monitoring: a use after deactivation (or deletion) alerts once
/// per use and, during grace and by policy, reactivates the old version.
fn while_watching(
    rot: &mut Rotation,
    entry: &mut EvidenceEntry,
    usage: Option<Usage>,
    detail: &UseDetail,
    error: Option<String>,
    actions: &mut Vec<Action>,
) {
    let old = rot.old_version.clone().unwrap_or_default();
    let phase = rot.state;
    // The next check was scheduled when this one was issued (at its due time).
    let since = if phase == RotationState::Grace {
        rot.deactivated_ms
    } else {
        rot.phase_until_ms.map(|t| t - rot.policy.monitor_ms)
    };
    match (usage, since) {
        (Some(Usage::At(t)), Some(since))
            if may_be_at_or_after(t, detail, since + rot.policy.usage_granularity_ms)
                && rot.alerted_use_ms.is_none_or(|a| t > a) =>
        {
            rot.alerted_use_ms = Some(t);
            let what = if phase == RotationState::Grace { "deactivated" } else { "revoked" };
            entry.verdict = format!("{old} used at {}{} after it was {what}", fmt_at(t), from_source(detail));
            let reactivate =
                phase == RotationState::Grace && rot.policy.grace_use == GraceUse::Reactivate && !rot.revoke_forced();
            let message = format!(
                "the {what} old version {old} of {} was used at {}{}{}",
                rot.secret,
                fmt_at(t),
                from_source(detail),
                if reactivate { "; reactivating it and halting the rotation" } else { "" }
            );
            actions.push(Action::Alert {
                kind: if phase == RotationState::Grace {
                    AlertKind::OldVersionUsedDuringGrace
                } else {
                    AlertKind::OldVersionUsedAfterRevocation
                },
                severity: Severity::Critical,
                message,
            });
            if reactivate {
                rot.reactivating = true;
                actions.push(Action::ReactivateOld);
            }
        }
        _ => {
            entry.verdict = match (&error, usage) {
                (Some(e), _) => format!("usage unknown: {e}"),
                (None, Some(Usage::At(t))) => format!("last used at {}: no use since", fmt_at(t)),
                (None, _) => "no use reported".into(),
            };
        }
    }
}

pub(super) fn enter_monitoring(rot: &mut Rotation, note: &str, now: i64) {
    if rot.policy.monitor_ms > 0 {
        rot.phase_until_ms = Some(now + rot.policy.monitor_ms);
        rot.next_check_ms = Some(now + rot.policy.check_every_ms);
        rot.goto(RotationState::Monitoring, format!("{note}; monitoring for {}", fmt_ms(rot.policy.monitor_ms)), now);
    } else {
        rot.phase_until_ms = None;
        rot.goto(RotationState::Completed, format!("{note}; completed"), now);
    }
}

/// The old version was already gone when rekey came to it: counted as revoked.
pub(super) fn old_gone(rot: &mut Rotation, what: &str, now: i64, actions: &mut Vec<Action>) {
    let old = rot.old_version.clone().unwrap_or_default();
    rot.reactivating = false;
    rot.old_revoked_ms = Some(now);
    actions.push(Action::PurgeOld);
    let note = format!(
        "old version {old} was already gone at the provider when {what} (removed outside rekey): counted as revoked"
    );
    enter_monitoring(rot, &note, now);
}
