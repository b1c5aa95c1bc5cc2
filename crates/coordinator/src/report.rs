//! Incident reports: what was rotated, where, when, by whom, what failed —
//! built from a rotation and the audit chain, as Markdown or JSON. Reports
//! name versions, hosts, fingerprints and operators; never a secret value.

use crate::audit::AuditRecord;
use crate::engine::machine::{HostState, Rotation};
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
    timeline_md(&mut out, rot);
    hosts_md(&mut out, &j);
    failures_md(&mut out, &j);
    exclusions_md(&mut out, &j);
    scope_md(&mut out, &j);
    evidence_md(&mut out, rot);
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
    out.push_str(&format!("| finished | {} |\n", text(&j["finished"])));
    out.push_str(&format!("| duration | {} |\n", text(&j["duration"])));
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

fn timeline_md(out: &mut String, rot: &Rotation) {
    out.push_str("## Timeline\n\n| time | state | event |\n|---|---|---|\n");
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
        out.push_str("None.\n");
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
        out.push_str("None: every target host confirmed the new version.\n");
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
        out.push_str("No usage checks (the provider reports no usage data, evidence was not required, or nothing was revoked).\n");
    }
    for e in &rot.evidence {
        out.push_str(&format!("- {} ({}): {}\n", ts(e.at_ms), e.phase.as_str(), e.verdict));
    }
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
