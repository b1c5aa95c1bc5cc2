//! The rotation state machine: pure (no I/O, `now` passed in), separate from
//! its driver. [`handle`] applies one event to a [`Rotation`] and returns the
//! side effects the driver must perform *after* persisting the new state.
//! [`on_restart`] returns what a restarted coordinator must redo.
//!
//! ```text
//! planned → generating → rolling_out (canary, waves) → verified → deactivating
//!         → grace → deleting → monitoring → completed
//! rollout failure over budget → halted (old untouched) → resume | abort
//! abort → hosts roll back → new version deleted → aborted
//! ```

mod decide;
mod evidence;
mod model;

pub use decide::{Exit, exits};
use evidence::{enter_monitoring, evidence_from_ms, usage_checked};
pub use model::*;

fn fmt_ms(ms: i64) -> String {
    if ms % 1000 == 0 { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

/// Applies `event`; returns the side effects to perform once the new state is durable.
pub fn handle(rot: &mut Rotation, event: Event, now: i64) -> Result<Vec<Action>, Refusal> {
    let mut actions = Vec::new();
    rot.touched.0.clear();
    match event {
        Event::Begin => {
            if rot.state == RotationState::Planned {
                rot.goto(RotationState::Generating, "generating the new version", now);
                actions.push(Action::Create);
            }
        }
        Event::Generated { version, fingerprint } => generated(rot, version, fingerprint, now),
        Event::ProviderDone { op } => provider_done(rot, op, now, &mut actions),
        Event::ProviderFailed { op, error } => provider_failed(rot, op, &error, now),
        Event::OldGone { op } => {
            let what = match (op, rot.state) {
                (ProviderOp::DeactivateOld, RotationState::Deactivating) => Some("deactivating it"),
                (ProviderOp::DeleteOld, RotationState::Deleting) => Some("deleting it"),
                (ProviderOp::ReactivateOld, RotationState::Grace) if rot.reactivating => Some("reactivating it"),
                _ => None, // late or duplicate
            };
            if let Some(what) = what {
                evidence::old_gone(rot, what, now, &mut actions);
            }
        }
        Event::Report { host, version, stage, fingerprint, error, at_ms } => {
            let reported = Reported { stage, fingerprint, error, at_ms };
            report(rot, &host, &version, reported, now, &mut actions);
        }
        Event::Connected { host, applied } => {
            connected(rot, &host, applied, now, &mut actions);
        }
        Event::SendFailed { host, error } => {
            if rot.hosts.get(&host).is_some_and(|h| h.state.in_flight() || h.state == HostState::Pending)
                && let Some(h) = rot.host_mut(&host)
            {
                h.error = Some(error);
                h.set(HostState::Unreachable, now);
            }
        }
        Event::Tick => tick(rot, now, &mut actions),
        Event::UsageChecked { usage, detail, error } => usage_checked(rot, usage, detail, error, now, &mut actions),
        Event::Pause { by } => pause(rot, &by, now)?,
        Event::Resume { by } => resume(rot, &by, now, &mut actions)?,
        Event::Abort { by } => abort(rot, &by, now, &mut actions)?,
        Event::Exclude { host, by, reason } => exclude(rot, &host, by, reason, now)?,
        Event::Decide { kind, by, reason } => decide::decide(rot, kind, by, reason, now, &mut actions)?,
    }
    advance(rot, now, &mut actions);
    rot.updated_ms = now;
    Ok(actions)
}

fn generated(rot: &mut Rotation, version: String, fingerprint: String, now: i64) {
    // Only the first answer counts: a replayed create returns the same version.
    if rot.new_version.is_none() && matches!(rot.state, RotationState::Generating | RotationState::Halted) {
        rot.new_version = Some(version.clone());
        rot.expected_fingerprint = Some(fingerprint);
        if rot.state == RotationState::Halted {
            // Halted while the create was in flight: keep the version, stay halted.
            rot.halted_from = Some(RotationState::RollingOut);
        } else if rot.hosts.is_empty() {
            rot.goto(RotationState::RollingOut, format!("version {version} created; no target hosts"), now);
        } else {
            rot.goto(RotationState::RollingOut, format!("version {version} created; rolling out"), now);
        }
    }
}

fn provider_done(rot: &mut Rotation, op: ProviderOp, now: i64, actions: &mut Vec<Action>) {
    match (op, rot.state) {
        (ProviderOp::ReactivateOld, RotationState::Grace) if rot.reactivating => {
            rot.reactivating = false;
            rot.deactivated_ms = None;
            rot.evidence_ok = false;
            rot.halted_from = Some(RotationState::Verified);
            let reason = "the old version was used during the grace period and has been reactivated; \
                          find the consumer (`rekey scope`), then resume to check again and revoke"
                .to_string();
            rot.halt_reason = Some(reason.clone());
            rot.goto(RotationState::Halted, reason, now);
        }
        (ProviderOp::DeactivateOld, RotationState::Deactivating) if rot.revoke_forced() => {
            rot.deactivated_ms = Some(now);
            rot.goto(RotationState::Deleting, "old version deactivated; deleting it at once (revocation forced)", now);
            actions.push(Action::DeleteOld);
        }
        (ProviderOp::DeactivateOld, RotationState::Deactivating) => {
            rot.deactivated_ms = Some(now);
            rot.next_check_ms = Some(now + rot.policy.check_every_ms);
            rot.phase_until_ms = Some(now + rot.policy.grace_ms);
            let note = format!("old version deactivated; grace period of {}", fmt_ms(rot.policy.grace_ms));
            rot.goto(RotationState::Grace, note, now);
        }
        (ProviderOp::DeleteOld, RotationState::Deleting) => {
            rot.old_revoked_ms = Some(now);
            actions.push(Action::PurgeOld);
            enter_monitoring(rot, "old version deleted", now);
        }
        (ProviderOp::DeleteNew, RotationState::Aborting) => {
            rot.goto(RotationState::Aborted, "new version deleted; every host back on the old version", now);
        }
        _ => {} // late or duplicate: ignore
    }
}

fn provider_failed(rot: &mut Rotation, op: ProviderOp, error: &str, now: i64) {
    let (expected, what) = match op {
        ProviderOp::Create => (RotationState::Generating, "creating the new version"),
        ProviderOp::DeactivateOld => (RotationState::Deactivating, "deactivating the old version"),
        ProviderOp::DeleteOld => (RotationState::Deleting, "deleting the old version"),
        ProviderOp::DeleteNew => (RotationState::Aborting, "deleting the new version"),
        ProviderOp::ReactivateOld => (RotationState::Grace, "reactivating the old version after its use during grace"),
    };
    if rot.state != expected {
        return;
    }
    if op == ProviderOp::DeleteNew {
        rot.delete_new_issued = false;
    }
    let exits = if rot.verified() {
        format!("resume, or decide: `rekey rotate revoke|finish|abandon {} --reason …`", rot.id)
    } else {
        "resume (or abort)".to_string()
    };
    let reason = format!("provider failed {what}: {error}; fix the cause, then {exits}");
    if op == ProviderOp::ReactivateOld {
        // The old version may be inactive or active: a resume gathers the
        // evidence again before anything else is revoked.
        rot.reactivating = false;
        rot.evidence_ok = false;
        rot.halt_from(RotationState::Verified, reason, now);
    } else {
        rot.halt(reason, now);
    }
}

/// Deadlines: redeliveries due after a reconnect, hosts silent past theirs.
fn tick(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) {
    let deadline = rot.policy.host_deadline_ms;
    if !matches!(rot.state, RotationState::RollingOut | RotationState::Halted) {
        return;
    }
    let due = rot.hosts_where(|h| {
        h.redeliver_at_ms.is_some_and(|t| now >= t)
            || (h.state.in_flight() && h.delivered_ms.is_some_and(|d| now - d > deadline))
    });
    for name in due {
        let Some(h) = rot.host_mut(&name) else { continue };
        if h.redeliver_at_ms.is_some_and(|t| now >= t) {
            h.redeliver_at_ms = None;
            if h.state.in_flight() || h.state == HostState::Unreachable {
                h.delivered_ms = Some(now);
                h.set(HostState::Delivered, now);
                actions.push(Action::Deliver { host: name.clone() });
                continue;
            }
        }
        if h.state.in_flight() && h.delivered_ms.is_some_and(|d| now - d > deadline) {
            h.error = Some(format!(
                "no healthy report within {} of delivery (last stage: {})",
                fmt_ms(deadline),
                h.state.as_str()
            ));
            h.set(HostState::Unreachable, now);
        }
    }
}

fn pause(rot: &mut Rotation, by: &str, now: i64) -> Result<(), Refusal> {
    if rot.state != RotationState::RollingOut || rot.paused {
        return Err(Refusal(format!(
            "rotation {} is {}{}: only a rolling-out rotation can be paused",
            rot.id,
            rot.state.as_str(),
            if rot.paused { " (already paused)" } else { "" }
        )));
    }
    rot.paused = true;
    rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note: format!("paused by {by}") });
    Ok(())
}

fn exclude(rot: &mut Rotation, host: &str, by: String, reason: String, now: i64) -> Result<(), Refusal> {
    if rot.state.is_terminal() || rot.verified() {
        return Err(Refusal(format!(
            "rotation {id} is {}: exclusions only matter before verification{}",
            rot.state.as_str(),
            if rot.state.is_terminal() {
                ""
            } else {
                "; to revoke the old version despite its use: `rekey rotate revoke ID --reason …`"
            },
            id = rot.id
        )));
    }
    let id = rot.id.clone();
    let h = rot.host_mut(host).ok_or_else(|| Refusal(format!("host {host:?} is not a target of rotation {id}")))?;
    if h.state == HostState::Excluded {
        return Err(Refusal(format!("host {host} is already excluded")));
    }
    let note = format!("host {host} excluded by {by}: {reason}");
    h.exclusion = Some(Exclusion { by, reason, at_ms: now });
    h.rollback_pending = false;
    h.set(HostState::Excluded, now);
    rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note });
    Ok(())
}

/// What an agent's stage report says.
struct Reported {
    stage: Stage,
    fingerprint: String,
    error: String,
    at_ms: i64,
}

fn report(rot: &mut Rotation, host: &str, version: &str, r: Reported, now: i64, actions: &mut Vec<Action>) {
    let Reported { stage, fingerprint, error, at_ms } = r;
    if rot.new_version.as_deref() != Some(version) || rot.state.is_terminal() || rot.verified() || rot.delete_new_issued
    {
        return; // stale, about another version, or after the decision was made
    }
    let expected = rot.expected_fingerprint.clone();
    let aborting = rot.state == RotationState::Aborting;
    if rot.hosts.get(host).is_none_or(|h| h.state == HostState::Excluded) {
        return;
    }
    let Some(h) = rot.host_mut(host) else { return };
    h.redeliver_at_ms = None;
    h.last_report = Some(ReportTimes { host_ms: at_ms, received_ms: now });
    let at = h.host_time(at_ms, now);
    if aborting && matches!(stage, Stage::Delivered | Stage::Applied | Stage::Restarted | Stage::Healthy) {
        // Anything that may hold the new version must confirm a rollback
        // before the new version is deleted.
        h.rollback_pending = true;
    }
    match stage {
        Stage::Delivered | Stage::Applied | Stage::Restarted => {
            let next = match stage {
                Stage::Delivered => HostState::Delivered,
                Stage::Applied => HostState::Applied,
                _ => HostState::Restarted,
            };
            // Forward only: a late "applied" never undoes "healthy".
            if (h.state.in_flight() || h.state == HostState::Unreachable) && next.rank() > h.state.rank() {
                h.set_at(next, at, now);
            }
        }
        Stage::Healthy => {
            if expected.as_deref() == Some(fingerprint.as_str()) {
                h.fingerprint = Some(fingerprint);
                h.error = None;
                h.set_at(HostState::Healthy, at, now);
                if aborting {
                    actions.push(Action::Rollback { host: host.to_string() });
                }
            } else {
                h.fingerprint = Some(fingerprint.clone());
                h.error = Some(format!(
                    "host reports a loaded version with fingerprint {fingerprint}, expected {}",
                    expected.unwrap_or_default()
                ));
                h.set_at(HostState::Failed, at, now);
            }
        }
        Stage::Failed | Stage::Refused => {
            let prefix = if stage == Stage::Refused { "agent refused the delivery: " } else { "" };
            h.error = Some(format!("{prefix}{}", if error.is_empty() { "failed (no reason given)" } else { &error }));
            if h.state != HostState::RolledBack || stage == Stage::Refused {
                h.set_at(HostState::Failed, at, now);
            }
            if stage == Stage::Refused {
                h.rollback_pending = false; // nothing was applied
            }
        }
        Stage::RolledBack => {
            h.rollback_pending = false;
            h.fingerprint = None;
            h.set_at(HostState::RolledBack, at, now);
        }
    }
}

fn connected(rot: &mut Rotation, host: &str, applied: Option<(String, String)>, now: i64, actions: &mut Vec<Action>) {
    let Some(new) = rot.new_version.clone() else { return };
    if rot.verified() {
        return;
    }
    let expected = rot.expected_fingerprint.clone();
    let state = rot.state;
    let delete_new_issued = rot.delete_new_issued;
    let Some(h) = rot.host_mut(host) else { return };
    let on_new = applied.as_ref().is_some_and(|(v, f)| *v == new && Some(f) == expected.as_ref());
    let touched = h.state.in_flight() || h.state == HostState::Unreachable || h.state == HostState::Healthy;
    match state {
        RotationState::RollingOut | RotationState::Halted if touched => {
            if on_new {
                h.fingerprint = expected;
                h.error = None;
                h.set(HostState::Healthy, now);
            } else if h.state == HostState::Healthy && state == RotationState::RollingOut {
                // It lost the version it had confirmed: send it again.
                h.delivered_ms = Some(now);
                h.set(HostState::Delivered, now);
                actions.push(Action::Deliver { host: host.to_string() });
            } else if h.delivered_ms.is_some() && h.state != HostState::Healthy {
                // It may have missed (part of) its delivery while away; if it
                // was mid-apply its reports come first. Re-deliver on a tick.
                h.redeliver_at_ms = Some(now + REDELIVER_AFTER_MS);
            }
        }
        RotationState::Aborting if !delete_new_issued && h.rollback_pending => {
            // Trust an agent that says it runs another version, unless it
            // may still be applying ours; when in doubt, ask it to roll back.
            let on_other = applied.as_ref().is_some_and(|(v, _)| *v != new);
            if on_other && !h.state.in_flight() && h.state != HostState::Unreachable {
                h.rollback_pending = false;
                h.set(HostState::RolledBack, now);
            } else {
                actions.push(Action::Rollback { host: host.to_string() });
            }
        }
        _ => {}
    }
}

fn resume(rot: &mut Rotation, by: &str, now: i64, actions: &mut Vec<Action>) -> Result<(), Refusal> {
    match rot.state {
        RotationState::RollingOut if rot.paused => {
            rot.paused = false;
            rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note: format!("resumed by {by}") });
        }
        RotationState::Halted => {
            let from = rot.halted_from.unwrap_or(RotationState::RollingOut);
            rot.halt_reason = None;
            rot.halted_from = None;
            rot.paused = false;
            match from {
                RotationState::Generating if rot.new_version.is_none() => {
                    rot.goto(RotationState::Generating, format!("resumed by {by}: generating again"), now);
                    actions.push(Action::Create);
                }
                RotationState::Deactivating => {
                    rot.goto(RotationState::Deactivating, format!("resumed by {by}: deactivating again"), now);
                    actions.push(Action::DeactivateOld);
                }
                RotationState::Verified | RotationState::Grace => {
                    // The operator dealt with the consumer: uses before now no longer hold revocation.
                    rot.evidence_ok = false;
                    rot.usage_check_pending = false;
                    rot.next_check_ms = None;
                    rot.evidence_since_ms = Some(now);
                    rot.goto(
                        RotationState::Verified,
                        format!("resumed by {by}: checking usage evidence again, counting from now"),
                        now,
                    );
                }
                RotationState::Deleting => {
                    rot.goto(RotationState::Deleting, format!("resumed by {by}: deleting again"), now);
                    actions.push(Action::DeleteOld);
                }
                RotationState::Aborting => {
                    rot.goto(RotationState::Aborting, format!("resumed by {by}: aborting again"), now);
                }
                _ => {
                    // Failed and unreachable hosts get the new version again.
                    let retry = rot.hosts_where(|h| {
                        matches!(h.state, HostState::Failed | HostState::RolledBack | HostState::Unreachable)
                    });
                    for name in retry {
                        if let Some(h) = rot.host_mut(&name) {
                            h.error = None;
                            h.set(HostState::Pending, now);
                        }
                    }
                    rot.goto(RotationState::RollingOut, format!("resumed by {by}: failed hosts retry"), now);
                }
            }
        }
        s => {
            return Err(Refusal(format!(
                "rotation {} is {}{}: only a halted or paused rotation can be resumed",
                rot.id,
                s.as_str(),
                if rot.paused { " (paused)" } else { "" }
            )));
        }
    }
    Ok(())
}

fn abort(rot: &mut Rotation, by: &str, now: i64, actions: &mut Vec<Action>) -> Result<(), Refusal> {
    match rot.state {
        RotationState::Planned => {
            rot.goto(RotationState::Aborted, format!("aborted by {by} before anything changed"), now);
            Ok(())
        }
        RotationState::Generating => Err(Refusal(format!(
            "rotation {} is generating its new version; abort once it is rolling out or halted",
            rot.id
        ))),
        RotationState::Halted if rot.halted_from.is_some_and(RotationState::is_past_verification) => {
            Err(Refusal(format!(
                "rotation {id} halted after every host confirmed the new version, so there is nothing to roll back: \
                 resume it (`rekey rotate resume {id}`), or decide: `rekey rotate revoke|finish|abandon {id} --reason …`",
                id = rot.id
            )))
        }
        RotationState::RollingOut | RotationState::Halted => {
            rot.paused = false;
            rot.halt_reason = None;
            rot.halted_from = None;
            let may_hold_new = rot.hosts_where(|h| {
                h.state.in_flight()
                    || h.state == HostState::Healthy
                    || h.state == HostState::Failed
                    || (h.state == HostState::Unreachable && h.delivered_ms.is_some())
            });
            for name in may_hold_new {
                if let Some(h) = rot.host_mut(&name) {
                    h.rollback_pending = true;
                    actions.push(Action::Rollback { host: name });
                }
            }
            rot.goto(RotationState::Aborting, format!("aborted by {by}: rolling hosts back to the old version"), now);
            Ok(())
        }
        RotationState::Aborting => Err(Refusal(format!("rotation {} is already aborting", rot.id))),
        s => Err(Refusal(format!(
            "rotation {id} is {}: every host already confirmed the new version, so there is nothing to roll back; \
             to end it now: `rekey rotate revoke|finish|abandon {id} --reason …`",
            s.as_str(),
            id = rot.id
        ))),
    }
}

/// When the last target host confirmed the new version.
/// Whether [`advance`] should look at the rotation again (its state changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Continue,
    Stop,
}

/// Moves the rotation forward as far as its state allows.
fn advance(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) {
    loop {
        let step = match rot.state {
            RotationState::RollingOut if !rot.paused => advance_rollout(rot, now, actions),
            RotationState::Verified => advance_verified(rot, now, actions),
            RotationState::Grace => advance_grace(rot, now, actions),
            RotationState::Monitoring => advance_monitoring(rot, now, actions),
            RotationState::Aborting => advance_aborting(rot, now, actions),
            _ => Step::Stop,
        };
        if step == Step::Stop {
            return;
        }
    }
}

/// Delivers the current wave; once it settled, halts, starts the next wave or verifies.
fn advance_rollout(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) -> Step {
    // Deliver every pending host up to the current wave.
    let upto = rot.current_wave;
    for name in rot.hosts_where(|h| h.wave <= upto && h.state == HostState::Pending) {
        if let Some(h) = rot.host_mut(&name) {
            h.delivered_ms = Some(now);
            h.set(HostState::Delivered, now);
            actions.push(Action::Deliver { host: name });
        }
    }
    let wave_settled = rot.hosts.values().filter(|h| h.wave <= upto).all(|h| h.state.settled());
    if !wave_settled {
        return Step::Stop;
    }
    let failed = rot.failed_hosts();
    let canary_failed: Vec<_> = failed.iter().filter(|(_, h)| h.wave == 0 && rot.policy.canary > 0).collect();
    if !canary_failed.is_empty() || failed.len() > rot.failure_budget() {
        // Named up to a bound: every host's error is in its own record.
        let list = rekey_common::error::named(
            failed.iter().map(|(n, h)| format!("{n}: {}", h.error.as_deref().unwrap_or("failed"))),
            "; ",
        );
        let why = if !canary_failed.is_empty() {
            "the canary failed".to_string()
        } else {
            format!(
                "{} host{} failed, over the failure budget of {}",
                failed.len(),
                if failed.len() == 1 { "" } else { "s" },
                rot.failure_budget()
            )
        };
        rot.halt(format!("{why} ({list}); the old version is untouched — fix and resume, or abort"), now);
        return Step::Stop;
    }
    if upto + 1 < rot.waves.len() {
        rot.current_wave += 1;
        if rot.pause_after.contains(&upto) {
            // `pause_after`: the next wave waits for an operator's resume.
            rot.paused = true;
            let note = format!("wave {upto} confirmed; paused before wave {} (pause_after)", rot.current_wave);
            rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note });
            return Step::Stop;
        }
        let note = format!("wave {} of {} started", rot.current_wave, rot.waves.len() - 1);
        rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note });
        return Step::Continue;
    }
    if rot.gate_open() {
        rot.goto(RotationState::Verified, "every target host confirmed the new version", now);
        return Step::Continue;
    }
    if !failed.is_empty() {
        let list = rekey_common::error::named(failed.iter().map(|(n, _)| n.as_str()), ", ");
        rot.halt(
            format!("rollout finished but {list} did not confirm the new version; fix and resume, or exclude them"),
            now,
        );
    }
    // Otherwise: waiting for unreachable hosts to come back (or be excluded).
    Step::Stop
}

/// Gathers the revocation evidence, then starts revoking (or finishes).
fn advance_verified(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) -> Step {
    let revoking = rot.policy.deactivate || rot.policy.delete;
    if rot.old_version.is_some() && revoking && rot.policy.require_evidence && !rot.evidence_ok {
        // Ask once the provider data has settled (its granularity after the switch).
        let ready = evidence_from_ms(rot) + rot.policy.usage_granularity_ms;
        let due = rot.next_check_ms.is_none_or(|t| now >= t);
        if !rot.usage_check_pending && now >= ready && due {
            rot.usage_check_pending = true;
            actions.push(Action::CheckUsage);
        }
        return Step::Stop;
    }
    if rot.old_version.is_none() {
        enter_monitoring(rot, "first version in place, nothing to revoke", now);
    } else if rot.policy.deactivate {
        rot.goto(RotationState::Deactivating, "deactivating the old version", now);
        actions.push(Action::DeactivateOld);
        return Step::Stop;
    } else if rot.policy.delete {
        rot.goto(RotationState::Deleting, "deleting the old version", now);
        actions.push(Action::DeleteOld);
        return Step::Stop;
    } else {
        enter_monitoring(rot, "revocation disabled by policy: old version left in place", now);
    }
    Step::Continue
}

/// Watches the deactivated old version; deletes it when the grace period ends.
fn advance_grace(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) -> Step {
    if rot.reactivating {
        return Step::Stop;
    }
    if rot.old_version.is_some() && !rot.usage_check_pending && rot.next_check_ms.is_some_and(|t| now >= t) {
        rot.usage_check_pending = true;
        rot.next_check_ms = Some(now + rot.policy.check_every_ms);
        actions.push(Action::CheckUsage);
        return Step::Stop;
    }
    if rot.usage_check_pending {
        return Step::Stop; // the last check's answer decides whether deletion may follow
    }
    if rot.phase_until_ms.is_some_and(|t| now >= t) {
        if rot.policy.delete {
            rot.goto(RotationState::Deleting, "grace period over; deleting the old version", now);
            actions.push(Action::DeleteOld);
        } else {
            enter_monitoring(rot, "grace period over; deletion disabled by policy", now);
        }
        return Step::Continue;
    }
    Step::Stop
}

/// Checks the retired key's usage until the monitoring window ends.
fn advance_monitoring(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) -> Step {
    if rot.old_version.is_some() && !rot.usage_check_pending && rot.next_check_ms.is_some_and(|t| now >= t) {
        rot.usage_check_pending = true;
        rot.next_check_ms = Some(now + rot.policy.check_every_ms);
        actions.push(Action::CheckUsage);
    }
    if rot.phase_until_ms.is_some_and(|t| now >= t) {
        rot.goto(RotationState::Completed, "monitoring window over; completed", now);
    }
    Step::Stop
}

/// Deletes the new version once every host confirmed its rollback.
fn advance_aborting(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) -> Step {
    if rot.hosts.values().any(|h| h.rollback_pending) || rot.delete_new_issued {
        return Step::Stop;
    }
    if rot.new_version.is_some() {
        rot.delete_new_issued = true;
        actions.push(Action::DeleteNew);
    } else {
        rot.goto(RotationState::Aborted, "aborted; no new version existed", now);
    }
    Step::Stop
}

/// When this rotation next needs a [`Event::Tick`]: a usage check, the end of
/// grace or monitoring, a redelivery or a host's deadline. The driver sleeps
/// until the soonest of these, so windows last what the policy says.
pub fn next_due(rot: &Rotation) -> Option<i64> {
    let mut due = Vec::new();
    match rot.state {
        RotationState::Verified if !rot.evidence_ok && !rot.usage_check_pending => {
            let ready = evidence_from_ms(rot) + rot.policy.usage_granularity_ms;
            due.push(rot.next_check_ms.map_or(ready, |t| t.max(ready)));
        }
        // A check in flight or a reactivation: its answer comes as an event.
        RotationState::Grace | RotationState::Monitoring if !rot.usage_check_pending && !rot.reactivating => {
            if rot.old_version.is_some() {
                due.extend(rot.next_check_ms);
            }
            due.extend(rot.phase_until_ms);
        }
        RotationState::RollingOut | RotationState::Halted => {
            for h in rot.hosts.values() {
                due.extend(h.redeliver_at_ms);
                if h.state.in_flight() {
                    due.extend(h.delivered_ms.map(|d| d + rot.policy.host_deadline_ms + 1));
                }
            }
        }
        _ => {}
    }
    due.into_iter().min()
}

/// What a coordinator restarted in the middle of this rotation must redo.
/// Deliveries and rollbacks are redone as agents reconnect ([`Event::Connected`]).
pub fn on_restart(rot: &mut Rotation, now: i64) -> Vec<Action> {
    let mut actions = match rot.state {
        RotationState::Generating => vec![Action::Create],
        RotationState::Deactivating => vec![Action::DeactivateOld],
        RotationState::Deleting => vec![Action::DeleteOld],
        RotationState::Aborting if rot.delete_new_issued => vec![Action::DeleteNew],
        RotationState::Grace if rot.reactivating => vec![Action::ReactivateOld],
        RotationState::Verified | RotationState::Grace | RotationState::Monitoring if rot.usage_check_pending => {
            vec![Action::CheckUsage]
        }
        _ => vec![],
    };
    advance(rot, now, &mut actions);
    actions
}

#[cfg(test)]
mod decide_tests;
#[cfg(test)]
mod tests;
