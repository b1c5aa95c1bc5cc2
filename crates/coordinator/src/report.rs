//! Incident reports: what was rotated, where, when, by whom, what failed —
//! built from a rotation and the audit chain, as Markdown or JSON. Reports
//! name versions, hosts, fingerprints and operators; never a secret value.

use crate::audit::AuditRecord;
use crate::engine::machine::{HostState, Rotation, RotationState, Usage};
use rekey_common::time::{format_duration_ms, format_unix_ms};
use serde_json::{Value, json};

/// Times to the millisecond, as the records keep them: events a few hundred
/// milliseconds apart (a use of the old key and the switch) keep their order.
fn ts(ms: i64) -> String {
    format_unix_ms(ms)
}

fn dur(ms: i64) -> String {
    format_duration_ms(ms)
}

/// The audit records that concern one rotation.
pub fn records_of<'a>(audit: &'a [AuditRecord], rotation: &str) -> Vec<&'a AuditRecord> {
    audit.iter().filter(|r| r.details["rotation"] == rotation).collect()
}

/// The report as a JSON document.
pub fn rotation_json(rot: &Rotation, audit: &[AuditRecord], chain_head: &str) -> Value {
    let mine = records_of(audit, &rot.id);
    json!({
        "kind": "rotation",
        "id": rot.id,
        "secret": rot.secret,
        "outcome": rot.state.as_str(),
        "started_by": rot.started_by,
        "started": ts(rot.created_ms),
        "finished": if rot.state.is_terminal() { Some(ts(rot.updated_ms)) } else { None },
        "duration": dur(rot.updated_ms - rot.created_ms),
        "as_of": ts(rot.updated_ms),
        "summary": outcome_lines(rot),
        "watched": watched_lines(rot, audit),
        "old_version": rot.old_version,
        "new_version": rot.new_version,
        "expected_fingerprint": rot.expected_fingerprint,
        "policy": rot.policy,
        "waves": rot.waves,
        "timeline": rot.timeline.iter().map(|t| json!({"at": ts(t.at_ms), "state": t.state.as_str(), "note": t.note})).collect::<Vec<_>>(),
        "hosts": hosts_json(rot),
        "failures": failures_json(&mine),
        "rolled_back": rolled_back(&mine),
        "exclusions": rot.hosts.iter().filter_map(|(n, h)| h.exclusion.as_ref().map(|e| json!({"host": n, "by": e.by, "reason": e.reason}))).collect::<Vec<_>>(),
        "operator_actions": operator_actions_json(&mine),
        "scope": scans_json(rot, audit),
        "revocation_evidence": rot.evidence.iter().map(|e| json!({
            "at": ts(e.at_ms), "phase": e.phase.as_str(), "usage": e.usage, "error": e.error, "verdict": e.verdict,
        })).collect::<Vec<_>>(),
        "alerts": mine.iter().filter(|r| r.action.starts_with("alert.")).map(|r| json!({"at": ts(r.at_ms), "details": r.details})).collect::<Vec<_>>(),
        "audit_chain_head": chain_head,
    })
}

/// Every host: its outcome, when it got and confirmed the new version, its history.
fn hosts_json(rot: &Rotation) -> Vec<Value> {
    rot.hosts
        .iter()
        .map(|(name, h)| {
            let at = |s: HostState| h.history.iter().find(|(st, _)| *st == s).map(|(_, t)| ts(*t));
            json!({
                "host": name,
                "wave": h.wave,
                "outcome": h.state.as_str(),
                "delivered": at(HostState::Delivered),
                "healthy": at(HostState::Healthy),
                "fingerprint": h.fingerprint,
                "error": h.error,
                "rolled_back": h.history.iter().any(|(s, _)| *s == HostState::RolledBack),
                "excluded": h.exclusion.as_ref().map(|e| json!({"by": e.by, "reason": e.reason, "at": ts(e.at_ms)})),
                "history": h.history.iter().map(|(s, t)| json!([s.as_str(), ts(*t)])).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Scope scans of this secret (operators' and the tripwire's): the consumer
/// map before the rotation (up to a day earlier) and after it.
fn scans_json(rot: &Rotation, audit: &[AuditRecord]) -> Vec<Value> {
    let end = if rot.state.is_terminal() { rot.updated_ms } else { i64::MAX };
    audit
        .iter()
        .filter(|r| r.action == "scope.result" && r.details["secret"] == rot.secret.as_str())
        .filter(|r| r.at_ms >= rot.created_ms - 86_400_000 && r.at_ms <= end)
        .map(|r| {
            json!({
                "at": ts(r.at_ms),
                "when": if r.at_ms < rot.created_ms { "before" } else { "after" },
                "by": r.actor,
                "scan": r.details["scan"],
                "hosts_with_value": r.details["hosts_with_value"],
                "occurrences": r.details["occurrences"],
                "undeclared": r.details["undeclared"],
                "leftovers": r.details["leftovers"],
                "not_answering": r.details["not_answering"],
            })
        })
        .collect()
}

/// Every failure any host reported, even if a later retry succeeded.
fn failures_json(mine: &[&AuditRecord]) -> Vec<Value> {
    let mut failures: Vec<Value> = Vec::new();
    for r in mine {
        if r.action == "host.state"
            && matches!(r.details["to"].as_str(), Some("failed" | "unreachable"))
            && let Some(err) = r.details["error"].as_str()
        {
            let host = r.details["host"].clone();
            if !failures.iter().any(|f| f["host"] == host && f["error"] == err) {
                failures.push(json!({"host": host, "at": ts(r.at_ms), "state": r.details["to"], "error": err}));
            }
        }
    }
    failures
}

fn rolled_back(mine: &[&AuditRecord]) -> Vec<String> {
    mine.iter()
        .filter(|r| r.action == "host.state" && r.details["to"] == "rolled_back")
        .filter_map(|r| r.details["host"].as_str().map(str::to_string))
        .collect()
}

/// What operators did (their commands), not every transition they caused.
fn operator_actions_json(mine: &[&AuditRecord]) -> Vec<Value> {
    mine.iter()
        .filter(|r| r.actor.starts_with("operator/"))
        .filter(|r| {
            r.action == "rotation.start"
                || r.details["to"] == "excluded"
                || r.details["note"].as_str().is_some_and(|n| n.contains(&format!("by {}", r.actor)))
        })
        .map(|r| json!({"seq": r.seq, "at": ts(r.at_ms), "actor": r.actor, "action": r.action, "details": r.details}))
        .collect()
}

/// A JSON value of the report as Markdown text: `-` for null.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// The items of a JSON array of the report (none if it is not one).
fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The report as Markdown, for humans and incident tickets: the sections of
/// the JSON report, in the same order.
pub fn rotation_markdown(rot: &Rotation, audit: &[AuditRecord], chain_head: &str) -> String {
    let j = rotation_json(rot, audit, chain_head);
    let mut out = String::new();
    summary_md(&mut out, rot, &j);
    list_md(&mut out, "Outcome", &j["summary"]);
    timeline_md(&mut out, rot);
    hosts_md(&mut out, &j);
    failures_md(&mut out, &j);
    exclusions_md(&mut out, &j);
    scope_md(&mut out, &j);
    evidence_md(&mut out, rot);
    list_md(&mut out, "What was watched after the switch", &j["watched"]);
    operator_actions_md(&mut out, &j);
    out.push_str(&format!(
        "\n---\nBuilt from the audit chain at head `{chain_head}` (`rekey audit verify` checks it). \
         This report contains version ids and keyed fingerprints, never secret values.\n"
    ));
    out
}

fn summary_md(out: &mut String, rot: &Rotation, j: &Value) {
    out.push_str(&format!("# Rotation report: `{}` ({})\n\n", rot.secret, rot.id));
    out.push_str("| | |\n|---|---|\n");
    out.push_str(&format!("| outcome | **{}** |\n", rot.state.as_str()));
    out.push_str(&format!("| started | {} by `{}` |\n", text(&j["started"]), rot.started_by));
    if rot.state.is_terminal() {
        out.push_str(&format!("| finished | {} |\n", text(&j["finished"])));
        out.push_str(&format!("| duration | {} |\n", text(&j["duration"])));
    } else {
        out.push_str(&format!("| finished | not finished: `{}` as of {} |\n", rot.state.as_str(), text(&j["as_of"])));
        out.push_str(&format!("| duration | {} so far |\n", text(&j["duration"])));
    }
    out.push_str(&format!(
        "| versions | `{}` → `{}` |\n",
        rot.old_version.as_deref().unwrap_or("(none)"),
        rot.new_version.as_deref().unwrap_or("(none)")
    ));
    out.push_str(&format!("| hosts | {} in {} waves |\n", rot.hosts.len(), rot.waves.len()));
    out.push_str(&format!(
        "| new version fingerprint | `{}` |\n\n",
        rot.expected_fingerprint.as_deref().unwrap_or("-")
    ));
}

/// A section heading with one blank line before it, whatever came before.
fn heading(out: &mut String, title: &str) {
    while !out.ends_with("\n\n") {
        out.push('\n');
    }
    out.push_str(&format!("## {title}\n\n"));
}

fn timeline_md(out: &mut String, rot: &Rotation) {
    heading(out, "Timeline");
    out.push_str("| time | state | event |\n|---|---|---|\n");
    for t in &rot.timeline {
        out.push_str(&format!("| {} | {} | {} |\n", ts(t.at_ms), t.state.as_str(), t.note.replace('|', "\\|")));
    }
}

fn hosts_md(out: &mut String, j: &Value) {
    out.push_str("\n## Hosts\n\n| host | wave | outcome | delivered | confirmed | fingerprint | note |\n|---|---|---|---|---|---|---|\n");
    for h in items(&j["hosts"]) {
        let note = match (&h["excluded"], &h["error"]) {
            (Value::Object(e), _) => format!("excluded by {}: {}", text(&e["by"]), text(&e["reason"])),
            (_, Value::String(e)) => e.clone(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | `{}` | {} |\n",
            text(&h["host"]),
            text(&h["wave"]),
            text(&h["outcome"]),
            text(&h["delivered"]),
            text(&h["healthy"]),
            text(&h["fingerprint"]),
            note.replace('|', "\\|")
        ));
    }
}

fn failures_md(out: &mut String, j: &Value) {
    let failures = items(&j["failures"]);
    out.push_str("\n## Failures and rollbacks\n\n");
    if failures.is_empty() {
        out.push_str("No host reported a failure.\n");
    }
    for f in failures {
        out.push_str(&format!(
            "- {} **{}** {}: {}\n",
            text(&f["at"]),
            text(&f["host"]),
            text(&f["state"]),
            text(&f["error"])
        ));
    }
    let rolled: Vec<String> = items(&j["rolled_back"]).iter().map(text).collect();
    if !rolled.is_empty() {
        out.push_str(&format!("- rolled back to the old version by their agents: {}\n", rolled.join(", ")));
    }
}

fn exclusions_md(out: &mut String, j: &Value) {
    let exclusions = items(&j["exclusions"]);
    out.push_str("\n## Exclusions\n\n");
    if exclusions.is_empty() {
        out.push_str("None.\n");
    }
    for e in exclusions {
        out.push_str(&format!("- **{}** excluded by `{}`: {}\n", text(&e["host"]), text(&e["by"]), text(&e["reason"])));
    }
}

fn scope_md(out: &mut String, j: &Value) {
    out.push_str("\n## Scope (where the secret was found)\n\n");
    let scans = items(&j["scope"]);
    if scans.is_empty() {
        out.push_str("No scope scan of this secret around this rotation (`rekey scope SECRET` maps it).\n");
    }
    for sc in scans {
        let places = |k: &str| {
            items(&sc[k])
                .iter()
                .map(|o| format!("{}:{} line {}", text(&o["host"]), text(&o["path"]), text(&o["line"])))
                .collect::<Vec<_>>()
        };
        let hosts = sc["hosts_with_value"]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        out.push_str(&format!(
            "- {} ({}, by `{}`): {} occurrences on {}",
            text(&sc["at"]),
            text(&sc["when"]),
            text(&sc["by"]),
            text(&sc["occurrences"]),
            if hosts.is_empty() { "no host".to_string() } else { hosts }
        ));
        let (u, l) = (places("undeclared"), places("leftovers"));
        if !u.is_empty() {
            out.push_str(&format!("; undeclared: {}", u.join("; ")));
        }
        if !l.is_empty() {
            out.push_str(&format!("; leftovers of the old value: {}", l.join("; ")));
        }
        out.push('\n');
    }
}

fn evidence_md(out: &mut String, rot: &Rotation) {
    out.push_str("\n## Revocation evidence\n\n");
    if rot.evidence.is_empty() {
        let why = if !rot.policy.require_evidence {
            "evidence was not required by the policy"
        } else if rot.state.is_past_verification() || rot.state == RotationState::Halted {
            "none was recorded"
        } else {
            "the rotation did not reach revocation"
        };
        out.push_str(&format!("No usage check of the old version: {why}.\n"));
    }
    for e in &rot.evidence {
        out.push_str(&format!("- {} ({}): {} — {}\n", ts(e.at_ms), e.phase.as_str(), usage_text(e), e.verdict));
    }
}

/// A section of plain sentences (the JSON report's lists of strings).
fn list_md(out: &mut String, title: &str, lines: &Value) {
    heading(out, title);
    for l in items(lines) {
        out.push_str(&format!("- {}\n", text(l)));
    }
}

/// What a usage check returned, in words that keep "no data" apart from "no use".
fn usage_text(e: &crate::engine::machine::EvidenceEntry) -> String {
    match (&e.usage, &e.error) {
        (Some(Usage::At(ms)), _) => match &e.source {
            Some(from) => format!("last used {} from {from}", ts(*ms)),
            None => format!("last used {}", ts(*ms)),
        },
        (Some(Usage::Gone), _) => "the version no longer exists at the provider".into(),
        (Some(Usage::Never), _) => "the provider reported no use".into(),
        (Some(Usage::Unknown), _) => "the provider keeps no usage data".into(),
        (None, Some(err)) => format!("the check failed: {err}"),
        (None, None) => "no answer".into(),
    }
}

/// The hosts by outcome: confirmed the new version, excluded, the rest.
struct Tally {
    confirmed: usize,
    excluded: Vec<String>,
    rolled_back: Vec<String>,
    other: Vec<String>,
}

fn tally(rot: &Rotation) -> Tally {
    let mut t = Tally { confirmed: 0, excluded: vec![], rolled_back: vec![], other: vec![] };
    for (name, h) in &rot.hosts {
        match h.state {
            HostState::Healthy => t.confirmed += 1,
            HostState::Excluded => t.excluded.push(name.clone()),
            HostState::RolledBack => t.rolled_back.push(name.clone()),
            s => t.other.push(format!("{name} ({})", s.as_str())),
        }
    }
    t
}

/// What the rotation's state means for the hosts and both versions, in
/// sentences that hold for every state: a report of a rotation that did not
/// complete never reads like one that did.
pub fn outcome_lines(rot: &Rotation) -> Vec<String> {
    let t = tally(rot);
    let new = rot.new_version.as_deref().map(|v| format!("`{v}`")).unwrap_or_else(|| "(none created)".into());
    let hosts = format!("{} of {} target hosts confirmed the new version {new}", t.confirmed, rot.hosts.len());
    let mut out = vec![match rot.state {
        RotationState::Completed => format!("Completed: {hosts}."),
        RotationState::Monitoring => format!("Rolled out: {hosts}; the old version is being monitored."),
        RotationState::Halted => format!(
            "Halted{}: {}. {hosts}. Nothing more happens until an operator acts (`rekey rotate status {}` shows the ways out).",
            rot.halted_from.map(|f| format!(" during `{}`", f.as_str())).unwrap_or_default(),
            rot.halt_reason.as_deref().unwrap_or("no reason recorded"),
            rot.id
        ),
        RotationState::Aborted => "Aborted: the rotation was abandoned; the old version stays the current one.".into(),
        RotationState::Aborting => "Aborting: hosts are being rolled back to the old version.".into(),
        RotationState::Abandoned => {
            format!("Abandoned: rekey stopped acting; the provider and the hosts were left as they were. {hosts}.")
        }
        s @ (RotationState::Planned
        | RotationState::Generating
        | RotationState::RollingOut
        | RotationState::Verified
        | RotationState::Deactivating
        | RotationState::Grace
        | RotationState::Deleting) => format!(
            "In progress: `{}` as of its last change ({}); {hosts} so far. This report is a snapshot: build it again when the rotation has ended.",
            s.as_str(),
            ts(rot.updated_ms)
        ),
    }];
    for d in &rot.decisions {
        out.push(format!(
            "Operator decision `{}` by `{}` at {} (while `{}`): {}.",
            d.kind.as_str(),
            d.by,
            ts(d.at_ms),
            d.from.as_str(),
            d.reason
        ));
    }
    if !t.rolled_back.is_empty() {
        out.push(format!("Rolled back to the old version: {}.", t.rolled_back.join(", ")));
    }
    if !t.other.is_empty() {
        out.push(format!("Not confirmed: {}.", t.other.join(", ")));
    }
    if !t.excluded.is_empty() {
        out.push(format!("Excluded by an operator (never confirmed): {}.", t.excluded.join(", ")));
    }
    if matches!(rot.state, RotationState::Aborted | RotationState::Aborting) {
        out.push(match (&rot.new_version, rot.delete_new_issued, rot.state) {
            (None, _, _) => "No new version had been created.".into(),
            (Some(v), true, RotationState::Aborted) => format!("The new version `{v}` was deleted at the provider."),
            (Some(v), true, _) => format!("The new version `{v}` is being deleted at the provider."),
            (Some(v), false, _) => format!("The new version `{v}` was not deleted by rekey."),
        });
    }
    out.push(old_version_line(rot));
    out
}

/// What rekey did to the old version, from the rotation's own record.
fn old_version_line(rot: &Rotation) -> String {
    let Some(old) = &rot.old_version else {
        return "There was no old version to revoke.".into();
    };
    let entered = |s: RotationState| rot.timeline.iter().position(|e| e.state == s);
    let deleted = entered(RotationState::Deleting).is_some_and(|i| {
        rot.timeline[i..].iter().any(|e| matches!(e.state, RotationState::Monitoring | RotationState::Completed))
    });
    if let Some(at) = rot.old_revoked_ms {
        format!("The old version `{old}` was deleted at the provider (or found already gone) at {}.", ts(at))
    } else if deleted {
        format!("The old version `{old}` was deleted at the provider.")
    } else if let Some(at) = rot.deactivated_ms {
        format!("The old version `{old}` was deactivated at {} and not deleted by rekey.", ts(at))
    } else if matches!(rot.state, RotationState::Aborted | RotationState::Aborting) {
        format!("The old version `{old}` was not touched.")
    } else {
        format!(
            "rekey has not deactivated or deleted the old version `{old}`: as far as rekey knows, it is still usable."
        )
    }
}

/// After the switch, what rekey watched and what it could not: the
/// provider's usage checks of the old version (and whether they could see
/// anything) and the fleet's leftover scans (run, or skipped and why).
pub fn watched_lines(rot: &Rotation, audit: &[AuditRecord]) -> Vec<String> {
    let entered = |s: RotationState| rot.timeline.iter().find(|e| e.state == s).map(|e| e.at_ms);
    let Some(monitoring) = entered(RotationState::Monitoring) else {
        let why = if rot.policy.monitor_ms == 0 {
            "the policy has no monitoring period (`monitor` is 0)".to_string()
        } else if rot.state.is_terminal() {
            format!("the rotation ended (`{}`) before its monitoring period", rot.state.as_str())
        } else {
            format!("the rotation has not reached its monitoring period (`{}`)", rot.state.as_str())
        };
        let mut out = vec![format!("No monitoring of the old version: {why}.")];
        out.extend(usage_lines(rot, None));
        return out;
    };
    let mut out = usage_lines(rot, Some(monitoring));
    out.extend(scan_lines(rot, audit));
    out
}

/// The usage checks made from grace on, by what they could tell.
fn usage_lines(rot: &Rotation, monitoring_from: Option<i64>) -> Vec<String> {
    let old = rot.old_version.as_deref().unwrap_or("-");
    let after: Vec<_> = rot
        .evidence
        .iter()
        .filter(|e| matches!(e.phase, RotationState::Grace | RotationState::Deleting | RotationState::Monitoring))
        .collect();
    if after.is_empty() {
        return if monitoring_from.is_some() {
            vec![format!("No usage check of the old version `{old}` at the provider after the switch.")]
        } else {
            vec![]
        };
    }
    let count = |f: &dyn Fn(&&crate::engine::machine::EvidenceEntry) -> bool| after.iter().filter(|e| f(e)).count();
    let used = count(&|e| matches!(e.usage, Some(Usage::At(_))));
    let never = count(&|e| e.usage == Some(Usage::Never));
    let gone = count(&|e| e.usage == Some(Usage::Gone));
    let unknown = count(&|e| e.usage == Some(Usage::Unknown));
    let failed = count(&|e| e.usage.is_none());
    let mut out = vec![format!(
        "{} usage checks of the old version `{old}` at the provider after the switch: {used} saw a use, {never} reported no use, {gone} found it gone, {unknown} returned no usage data, {failed} failed.",
        after.len()
    )];
    if unknown > 0 {
        out.push(
            "The provider keeps no usage data for this secret: use of the old version was NOT watched at the provider."
                .into(),
        );
    }
    let blind = after
        .iter()
        .filter(|e| {
            matches!(e.usage, Some(Usage::Never | Usage::Gone)) && monitoring_from.is_some_and(|m| e.at_ms >= m)
        })
        .count();
    if blind > 0 {
        out.push(format!(
            "{blind} of the checks that reported no use ran after the old version was deleted: a provider may report \
             nothing for a deleted version, so they could not see a use and are not evidence that nobody used it."
        ));
    }
    if let Some(e) = after.iter().rev().find(|e| e.usage.is_none()) {
        out.push(format!("Last failed check: {}.", e.error.as_deref().unwrap_or("no answer")));
    }
    out
}

/// The fleet's leftover scans of the old value during monitoring.
fn scan_lines(rot: &Rotation, audit: &[AuditRecord]) -> Vec<String> {
    let mine = records_of(audit, &rot.id);
    let scans: Vec<_> =
        mine.iter().filter(|r| r.action == "scope.result" && r.details["purpose"] == "tripwire").collect();
    let skipped: Vec<_> = mine.iter().filter(|r| r.action == "tripwire.skipped").collect();
    let mut out = Vec::new();
    if !scans.is_empty() {
        let silent: usize = scans.iter().filter(|r| !items(&r.details["not_answering"]).is_empty()).count();
        out.push(format!(
            "{} leftover scans of the fleet for the old value, the last at {}{}.",
            scans.len(),
            ts(scans.last().map(|r| r.at_ms).unwrap_or_default()),
            if silent > 0 { format!(" ({silent} with hosts not answering)") } else { String::new() }
        ));
    }
    for r in &skipped {
        out.push(format!(
            "The fleet was NOT searched for leftover copies of the old value (from {}): {}.",
            ts(r.at_ms),
            text(&r.details["reason"])
        ));
    }
    if scans.is_empty() && skipped.is_empty() {
        out.push("No leftover scan of the fleet was recorded during monitoring.".into());
    }
    out
}

fn operator_actions_md(out: &mut String, j: &Value) {
    out.push_str("\n## Operator actions\n\n");
    for a in items(&j["operator_actions"]) {
        let what = a["details"]["note"].as_str().map(str::to_string).unwrap_or_else(|| text(&a["action"]));
        out.push_str(&format!("- {} `{}`: {} (audit #{})\n", text(&a["at"]), text(&a["actor"]), what, text(&a["seq"])));
    }
}

/// A campaign's report as JSON: the incident and every rotation's report.
pub fn incident_json(
    inc: &crate::engine::campaign::Incident,
    rotations: &[Rotation],
    audit: &[AuditRecord],
    chain_head: &str,
) -> Value {
    let secrets: Vec<Value> = inc
        .secrets
        .iter()
        .map(|(name, p)| {
            let rot = p.rotation.as_ref().and_then(|id| rotations.iter().find(|r| &r.id == id));
            json!({
                "secret": name,
                "rotation": p.rotation,
                "error": p.error,
                "outcome": rot.map(|r| r.state.as_str()).unwrap_or(if p.error.is_some() { "not started" } else { "waiting" }),
                "report": rot.map(|r| rotation_json(r, audit, chain_head)),
            })
        })
        .collect();
    json!({
        "kind": "incident",
        "id": inc.id,
        "name": inc.name,
        "pattern": inc.pattern,
        "concurrency": inc.concurrency,
        "opened": ts(inc.opened_ms),
        "opened_by": inc.opened_by,
        "closed": inc.closed_ms.map(ts),
        "closed_by": inc.closed_by,
        "secrets": secrets,
        "audit_chain_head": chain_head,
    })
}

/// A campaign's report as Markdown: a summary table, then each rotation.
pub fn incident_markdown(
    inc: &crate::engine::campaign::Incident,
    rotations: &[Rotation],
    audit: &[AuditRecord],
    chain_head: &str,
) -> String {
    let mut out = format!("# Incident report: {} ({})\n\n", inc.name, inc.id);
    out.push_str("| | |\n|---|---|\n");
    out.push_str(&format!("| opened | {} by `{}` |\n", ts(inc.opened_ms), inc.opened_by));
    out.push_str(&format!(
        "| closed | {} |\n",
        inc.closed_ms
            .map(|t| format!("{} by `{}`", ts(t), inc.closed_by.as_deref().unwrap_or("-")))
            .unwrap_or("open".into())
    ));
    out.push_str(&format!(
        "| secrets | `{}` → {} secrets, {} at a time |\n\n",
        inc.pattern,
        inc.secrets.len(),
        inc.concurrency
    ));
    out.push_str(
        "## Secrets\n\n| secret | rotation | outcome | hosts confirmed | old → new version |\n|---|---|---|---|---|\n",
    );
    for (name, p) in &inc.secrets {
        let rot = p.rotation.as_ref().and_then(|id| rotations.iter().find(|r| &r.id == id));
        let (outcome, hosts, versions) = match rot {
            Some(r) => (
                r.state.as_str().to_string(),
                format!("{}/{}", r.hosts.values().filter(|h| h.state == HostState::Healthy).count(), r.hosts.len()),
                format!(
                    "`{}` → `{}`",
                    r.old_version.as_deref().unwrap_or("-"),
                    r.new_version.as_deref().unwrap_or("-")
                ),
            ),
            None => (
                p.error.clone().map(|e| format!("not started: {e}")).unwrap_or("waiting".into()),
                "-".into(),
                "-".into(),
            ),
        };
        out.push_str(&format!(
            "| {name} | {} | {outcome} | {hosts} | {versions} |\n",
            p.rotation.as_deref().unwrap_or("-")
        ));
    }
    for p in inc.secrets.values() {
        if let Some(r) = p.rotation.as_ref().and_then(|id| rotations.iter().find(|r| &r.id == id)) {
            let body = rotation_markdown(r, audit, chain_head);
            // One level deeper, and one chain footer for the whole report.
            let body =
                body.split("\n---\n").next().unwrap_or(&body).replace("\n## ", "\n### ").replacen("# ", "## ", 1);
            out.push('\n');
            out.push_str(&body);
        }
    }
    out.push_str(&format!(
        "\n---\nBuilt from the audit chain at head `{chain_head}` (`rekey audit verify` checks it). \
         This report contains version ids and keyed fingerprints, never secret values.\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    //! A report must not read like a success when the rotation was not one:
    //! one test per state whose report could lie.

    use super::*;
    use crate::engine::machine::{Decision, DecisionKind, EvidenceEntry, Policy, TimelineEntry};

    /// A rotation of `api-key` from `v1` to `v2` over these hosts, in `state`.
    fn rotation(state: RotationState, hosts: &[(&str, HostState)]) -> Rotation {
        let waves = vec![hosts.iter().map(|(h, _)| h.to_string()).collect()];
        let policy = Policy { monitor_ms: 60_000, ..Policy::default() };
        let mut r = Rotation::new(
            "rot-1".into(),
            "api-key".into(),
            "operator/admin".into(),
            policy,
            Some("v1".into()),
            waves,
            String::new(),
            1_000,
        );
        r.new_version = Some("v2".into());
        for (h, s) in hosts {
            r.hosts.get_mut(*h).unwrap().state = *s;
        }
        r.state = state;
        r.updated_ms = 61_250;
        r
    }

    fn passed(r: &mut Rotation, states: &[(RotationState, i64)]) {
        for (state, at_ms) in states {
            r.timeline.push(TimelineEntry { at_ms: *at_ms, state: *state, note: String::new() });
        }
    }

    fn md(r: &Rotation, audit: &[AuditRecord]) -> String {
        rotation_markdown(r, audit, "head")
    }

    fn assert_never_claims_success(report: &str) {
        for lie in ["every target host confirmed", "| finished | 1970", "Completed:"] {
            assert!(!report.contains(lie), "the report claims {lie:?}:\n{report}");
        }
    }

    #[test]
    fn a_halted_rotation_says_why_who_is_not_confirmed_and_that_the_old_key_is_live() {
        let mut r = rotation(
            RotationState::Halted,
            &[("h1", HostState::Healthy), ("h2", HostState::Failed), ("h3", HostState::Pending)],
        );
        r.halted_from = Some(RotationState::RollingOut);
        r.halt_reason = Some("the failure budget (0 hosts) is spent".into());
        let report = md(&r, &[]);
        assert_never_claims_success(&report);
        for truth in [
            "Halted during `rolling_out`: the failure budget (0 hosts) is spent. 1 of 3 target hosts confirmed the new version `v2`",
            "`rekey rotate status rot-1` shows the ways out",
            "Not confirmed: h2 (failed), h3 (pending).",
            "rekey has not deactivated or deleted the old version `v1`: as far as rekey knows, it is still usable.",
            "| finished | not finished: `halted` as of 1970-01-01T00:01:01.250Z |",
            "| duration | 60.250s so far |",
        ] {
            assert!(report.contains(truth), "missing {truth:?}:\n{report}");
        }
        let json = rotation_json(&r, &[], "head");
        assert_eq!(json["finished"], Value::Null);
        assert!(json["summary"][0].as_str().unwrap().starts_with("Halted"));
    }

    #[test]
    fn an_aborted_rotation_says_the_hosts_went_back_and_the_new_key_is_gone() {
        let mut r = rotation(RotationState::Aborted, &[("h1", HostState::RolledBack), ("h2", HostState::Unreachable)]);
        r.delete_new_issued = true;
        let report = md(&r, &[]);
        assert!(!report.contains("every target host confirmed") && !report.contains("Completed:"), "{report}");
        for truth in [
            "Aborted: the rotation was abandoned; the old version stays the current one.",
            "Rolled back to the old version: h1.",
            "Not confirmed: h2 (unreachable).",
            "The new version `v2` was deleted at the provider.",
            "The old version `v1` was not touched.",
        ] {
            assert!(report.contains(truth), "missing {truth:?}:\n{report}");
        }
    }

    #[test]
    fn an_abandoned_rotation_says_who_stopped_it_and_what_was_left() {
        let mut r = rotation(RotationState::Abandoned, &[("h1", HostState::Healthy), ("h2", HostState::Failed)]);
        r.deactivated_ms = Some(30_000);
        r.decisions.push(Decision {
            kind: DecisionKind::Abandon,
            by: "operator/alice".into(),
            reason: "the vendor rotated it by hand".into(),
            at_ms: 60_000,
            from: RotationState::Halted,
            hosts_on_new: false,
        });
        let report = md(&r, &[]);
        assert!(!report.contains("every target host confirmed") && !report.contains("Completed:"), "{report}");
        for truth in [
            "Abandoned: rekey stopped acting; the provider and the hosts were left as they were. 1 of 2 target hosts confirmed the new version `v2`.",
            "Operator decision `abandon` by `operator/alice` at 1970-01-01T00:01:00.000Z (while `halted`): the vendor rotated it by hand.",
            "Not confirmed: h2 (failed).",
            "The old version `v1` was deactivated at 1970-01-01T00:00:30.000Z and not deleted by rekey.",
            "No monitoring of the old version: the rotation ended (`abandoned`) before its monitoring period.",
        ] {
            assert!(report.contains(truth), "missing {truth:?}:\n{report}");
        }
    }

    #[test]
    fn a_rotation_in_progress_is_a_snapshot_not_an_outcome() {
        let r = rotation(RotationState::RollingOut, &[("h1", HostState::Healthy), ("h2", HostState::Delivered)]);
        let report = md(&r, &[]);
        assert_never_claims_success(&report);
        for truth in [
            "In progress: `rolling_out` as of its last change (1970-01-01T00:01:01.250Z); 1 of 2 target hosts confirmed the new version `v2` so far. This report is a snapshot",
            "Not confirmed: h2 (delivered).",
            "No monitoring of the old version: the rotation has not reached its monitoring period (`rolling_out`).",
            "No usage check of the old version: the rotation did not reach revocation.",
        ] {
            assert!(report.contains(truth), "missing {truth:?}:\n{report}");
        }
    }

    #[test]
    fn a_completed_rotation_names_a_host_that_failed_within_the_budget() {
        let mut r = rotation(
            RotationState::Completed,
            &[("h1", HostState::Healthy), ("h2", HostState::Healthy), ("h3", HostState::Failed)],
        );
        passed(
            &mut r,
            &[
                (RotationState::Deleting, 40_000),
                (RotationState::Monitoring, 41_000),
                (RotationState::Completed, 61_000),
            ],
        );
        let report = md(&r, &[]);
        assert!(!report.contains("every target host confirmed"), "{report}");
        for truth in [
            "Completed: 2 of 3 target hosts confirmed the new version `v2`.",
            "Not confirmed: h3 (failed).",
            "The old version `v1` was deleted at the provider.",
            "| finished | 1970-01-01T00:01:01.250Z |",
        ] {
            assert!(report.contains(truth), "missing {truth:?}:\n{report}");
        }
    }

    #[test]
    fn monitoring_that_observes_nothing_says_so() {
        let mut r = rotation(RotationState::Monitoring, &[("h1", HostState::Healthy)]);
        passed(&mut r, &[(RotationState::Deleting, 40_000), (RotationState::Monitoring, 41_000)]);
        let check = |at_ms, usage| EvidenceEntry {
            at_ms,
            phase: RotationState::Monitoring,
            usage: Some(usage),
            error: None,
            source: None,
            verdict: "no use since the switch".into(),
        };
        r.evidence = vec![check(43_000, Usage::Never), check(45_000, Usage::Never)];
        let skipped = AuditRecord {
            seq: 9,
            at_ms: 42_000,
            actor: "rekeyd".into(),
            action: "tripwire.skipped".into(),
            details: json!({"rotation": "rot-1", "secret": "api-key", "reason": "the old version v1 was not created by rekey"}),
            prev_hash: String::new(),
            hash: String::new(),
        };
        let report = md(&r, &[skipped]);
        for truth in [
            "## What was watched after the switch",
            "2 usage checks of the old version `v1` at the provider after the switch: 0 saw a use, 2 reported no use, 0 found it gone, 0 returned no usage data, 0 failed.",
            "2 of the checks that reported no use ran after the old version was deleted: a provider may report nothing for a deleted version, so they could not see a use",
            "The fleet was NOT searched for leftover copies of the old value (from 1970-01-01T00:00:42.000Z): the old version v1 was not created by rekey.",
            "the provider reported no use — no use since the switch",
        ] {
            assert!(report.contains(truth), "missing {truth:?}:\n{report}");
        }
        r.evidence = vec![check(43_000, Usage::Unknown)];
        let report = md(&r, &[]);
        assert!(report.contains("use of the old version was NOT watched at the provider"), "{report}");
        assert!(report.contains("No leftover scan of the fleet was recorded during monitoring."), "{report}");
    }
}
