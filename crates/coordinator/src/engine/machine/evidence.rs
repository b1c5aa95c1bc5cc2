//! Revocation evidence: what the provider's usage data says about the old
//! version before deactivation, during grace and while monitoring.

use super::fmt_ms;
use super::model::*;

pub(super) fn last_switch_ms(rot: &Rotation) -> i64 {
    rot.hosts
        .values()
        .filter(|h| h.state == HostState::Healthy)
        .filter_map(|h| h.history.iter().rev().find(|(s, _)| *s == HostState::Healthy).map(|(_, t)| *t))
        .max()
        .unwrap_or(rot.created_ms)
}

fn fmt_at(ms: i64) -> String {
    rekey_common::time::format_unix(ms / 1000)
}

/// The provider's answer to a usage check of the old version.
pub(super) fn usage_checked(
    rot: &mut Rotation,
    usage: Option<Usage>,
    error: Option<String>,
    now: i64,
    actions: &mut Vec<Action>,
) {
    if !rot.usage_check_pending {
        return; // late answer
    }
    rot.usage_check_pending = false;
    let phase = rot.state;
    let mut entry = EvidenceEntry { at_ms: now, phase, usage, error: error.clone(), verdict: String::new() };
    match phase {
        RotationState::Verified => before_revocation(rot, &mut entry, usage, error, now, actions),
        RotationState::Grace | RotationState::Monitoring => while_watching(rot, &mut entry, usage, error, now, actions),
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
    error: Option<String>,
    now: i64,
    actions: &mut Vec<Action>,
) {
    let old = rot.old_version.clone().unwrap_or_default();
    let switch = last_switch_ms(rot);
    let limit = switch + rot.policy.usage_granularity_ms;
    match (usage, &error) {
        (_, Some(e)) => {
            entry.verdict = format!("usage of {old} unknown ({e}); revocation held, checking again");
            rot.next_check_ms = Some(now + rot.policy.check_every_ms);
        }
        (Some(Usage::At(t)), None) if t > limit => {
            entry.verdict = format!(
                "{old} was used at {} after every host had switched ({}): revocation held",
                fmt_at(t),
                fmt_at(switch)
            );
            let message = format!(
                "{old} of {} was used at {}, after every target host had switched to the new version at {}: \
                 an undeclared consumer? find it with `rekey scope {}`, then resume to check again",
                rot.secret,
                fmt_at(t),
                fmt_at(switch),
                rot.secret
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
                Usage::At(t) => format!("last used at {}, before every host switched", fmt_at(t)),
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
    error: Option<String>,
    now: i64,
    actions: &mut Vec<Action>,
) {
    let old = rot.old_version.clone().unwrap_or_default();
    let phase = rot.state;
    rot.next_check_ms = Some(now + rot.policy.check_every_ms);
    let since = if phase == RotationState::Grace {
        rot.deactivated_ms
    } else {
        rot.phase_until_ms.map(|t| t - rot.policy.monitor_ms)
    };
    match (usage, since) {
        (Some(Usage::At(t)), Some(since))
            if t > since + rot.policy.usage_granularity_ms && rot.alerted_use_ms.is_none_or(|a| t > a) =>
        {
            rot.alerted_use_ms = Some(t);
            let what = if phase == RotationState::Grace { "deactivated" } else { "revoked" };
            entry.verdict = format!("{old} used at {} after it was {what}", fmt_at(t));
            let reactivate = phase == RotationState::Grace && rot.policy.grace_use == GraceUse::Reactivate;
            let message = format!(
                "the {what} old version {old} of {} was used at {}{}",
                rot.secret,
                fmt_at(t),
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
